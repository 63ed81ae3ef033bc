//! How listing commands print: a table for people, or JSON for programs.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people
    Table,
    /// JSON for programs
    Json,
}

/// Writes one line to stdout. A closed stdout (`provis … | head -1`) is an
/// error the caller returns with `?`; [`crate::main`] ends quietly on it.
pub fn write_line(line: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_fmt(line)?;
    stdout.write_all(b"\n")
}

/// Writes to stdout without a newline; see [`write_line`].
pub fn write_text(text: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write as _;
    std::io::stdout().lock().write_fmt(text)
}

/// True when `err` says stdout was closed by its reader.
pub fn is_closed_stdout(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `println!` that returns a closed stdout as an error (use with `?`).
macro_rules! outln {
    () => { $crate::output::write_line(format_args!(""))? };
    ($($arg:tt)*) => { $crate::output::write_line(format_args!($($arg)*))? };
}

/// `print!` that returns a closed stdout as an error (use with `?`).
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_text(format_args!($($arg)*))? };
}
