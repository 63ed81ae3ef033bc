//! How listing commands print: a table for people, or JSON for programs.

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table for people
    Table,
    /// JSON for programs
    Json,
}

/// Why a line did not reach stdout.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Its reader went away (`provis … | head -1`): nothing more to say.
    #[error("stdout was closed by its reader")]
    Closed,
    #[error("cannot write to stdout")]
    Write(#[source] std::io::Error),
}

impl From<std::io::Error> for OutputError {
    fn from(err: std::io::Error) -> Self {
        if err.kind() == std::io::ErrorKind::BrokenPipe {
            Self::Closed
        } else {
            Self::Write(err)
        }
    }
}

/// Writes one line to stdout. A closed stdout is [`OutputError::Closed`],
/// which the caller returns with `?`; [`crate::main`] ends quietly on it.
pub fn write_line(line: std::fmt::Arguments<'_>) -> Result<(), OutputError> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_fmt(line)?;
    Ok(stdout.write_all(b"\n")?)
}

/// Writes to stdout without a newline; see [`write_line`].
pub fn write_text(text: std::fmt::Arguments<'_>) -> Result<(), OutputError> {
    use std::io::Write as _;
    Ok(std::io::stdout().lock().write_fmt(text)?)
}

/// True when `err` is stdout closed by its reader (not any broken pipe:
/// one to the bus is a failure like any other).
pub fn is_closed_stdout(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<OutputError>(),
            Some(OutputError::Closed)
        )
    })
}

/// Ok when `printed` went out or its reader went away: a command whose
/// outcome decides its exit code keeps it when nobody reads the rest.
pub fn unless_closed(printed: Result<(), OutputError>) -> Result<(), OutputError> {
    match printed {
        Err(OutputError::Closed) => Ok(()),
        other => other,
    }
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
