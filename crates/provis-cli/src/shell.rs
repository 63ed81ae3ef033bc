//! `provis completions SHELL` and `provis man --dir DIR`: shell completions
//! and man pages made from the command line's own definition, so they never
//! drift from the flags.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Where to write the pages (provis.1, provis-call.1, …)
    #[arg(long)]
    dir: PathBuf,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: &CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut command = crate::Cli::command();
    // Made whole first: a reader that goes away stops the printing, not the process.
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "provis", &mut script);
    out!("{}", String::from_utf8_lossy(&script));
    Ok(ExitCode::SUCCESS)
}

/// Writes one man page per command and subcommand into `args.dir`.
pub fn man_pages(args: &ManArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let mut command = crate::Cli::command();
    command.build();
    let written = write_pages(&command, &args.dir)?;
    eprintln!("{written} man pages written to {}", args.dir.display());
    Ok(ExitCode::SUCCESS)
}

/// Writes the page of `command` (built: its display name is the page's,
/// e.g. `provis-keys-export`) and those of its subcommands; how many were
/// written.
fn write_pages(command: &clap::Command, dir: &Path) -> anyhow::Result<usize> {
    let name = command
        .get_display_name()
        .unwrap_or_else(|| command.get_name());
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    let mut written = 1;
    for sub in command
        .get_subcommands()
        .filter(|sub| sub.get_name() != "help")
    {
        written += write_pages(sub, dir)?;
    }
    Ok(written)
}
