//! `provis dashboard token|login`: one-time login links for the master's
//! dashboard (served by `provis master --http-addr`): a token the master
//! issues, or a link signed with an observer's or operator's own key.

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
    /// Make a login link signed with your key (an observer's or an
    /// operator's, as the master lists them): good at that dashboard, for
    /// five minutes, once. No NATS needed.
    Login {
        /// The dashboard, e.g. http://127.0.0.1:8080
        #[arg(long, env = "PROVIS_DASHBOARD_URL")]
        url: String,
        /// The key to sign with [default: the context's identity]
        #[arg(long, env = "PROVIS_IDENTITY")]
        identity: Option<std::path::PathBuf>,
        /// Context file [default: ~/.config/provis/context.toml]
        #[arg(long, env = "PROVIS_CONTEXT")]
        context: Option<std::path::PathBuf>,
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
        DashboardCommand::Login {
            url,
            identity,
            context,
        } => {
            let key = match identity {
                Some(path) => path,
                None => {
                    let path = context.unwrap_or_else(provis_core::FleetContext::default_path);
                    provis_core::FleetContext::load(&path)?
                        .and_then(|fleet| fleet.identity)
                        .ok_or_else(|| {
                            crate::UsageError(
                                "no key to sign with: give --identity (a key from `provis keys create`)"
                                    .into(),
                            )
                        })?
                }
            };
            let identity = provis_core::identity::Identity::load(&key)?;
            let base = url.trim_end_matches('/');
            let host = base
                .strip_prefix("http://")
                .or_else(|| base.strip_prefix("https://"))
                .ok_or_else(|| crate::UsageError(format!("{url:?} is not an http:// URL")))?;
            let at = provis_core::envelope::now_unix_ms();
            let message = provis_core::master_api::signed_login_message(host, at);
            outln!(
                "{base}/login?key={}&at={at}&sig={}",
                identity.public_key(),
                identity.sign(message.as_bytes())
            );
            eprintln!("good at {host} for five minutes, once");
        }
    }
    Ok(ExitCode::SUCCESS)
}
