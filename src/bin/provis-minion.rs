//! The `provis-minion` command: a minion alone, for machines that run
//! nothing else (the same flags as `provis minion`).

fn main() -> std::process::ExitCode {
    provis_cli::minion_main()
}
