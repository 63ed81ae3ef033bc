//! `provis dashboard token`: a one-time login link for the master's
//! dashboard (served by `provis master --http-addr`).

use std::process::ExitCode;

use clap::Subcommand;

use crate::fleet_args::{FleetArgs, operator_identity};

#[derive(Debug, Subcommand)]
pub enum DashboardCommand {
    /// Issue a one-time login token; prints the login URL when the
    /// answering master serves the dashboard
    Token {
        #[command(flatten)]
        fleet: FleetArgs,
        /// How long the token may be used to log in, e.g. 1h, 15m (at most 24h)
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
    },
}

pub async fn run(command: DashboardCommand) -> anyhow::Result<ExitCode> {
    match command {
        DashboardCommand::Token { fleet, ttl } => {
            let answer = fleet
                .master()
                .await?
                .dashboard_token(ttl.into(), Some(operator_identity()))
                .await?;
            match &answer.url {
                Some(url) => outln!("{url}"),
                None => outln!("{}", answer.token),
            }
            eprintln!(
                "one-time login, valid for {ttl}{}",
                if answer.url.is_some() {
                    ""
                } else {
                    ": open http://<the master's http_addr>/login?token=<this token>"
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
