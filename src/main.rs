//! The `provis` command: every subcommand lives in `provis-cli`.

fn main() -> std::process::ExitCode {
    provis_cli::main()
}
