//! `provis events`: the fleet's events from `PROVIS_EVENTS`, past and (with
//! --follow) as they happen.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer;
use clap::Args;
use futures::StreamExt;
use provis_core::MinionId;
use provis_core::event::CloudEvent;
use provis_core::storage::STREAM_EVENTS;
use wildmatch::WildMatch;

use crate::fleet_args::FleetArgs;
use crate::output::Output;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  provis events --since 24h
  provis events --follow --type 'service.*'
  provis events --minion m1 --type minion.offline --output json")]
pub struct EventsArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Keep printing events as they happen
    #[arg(long)]
    follow: bool,
    /// Events from this long ago on, e.g. 30m, 24h, 7d
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    since: Duration,
    /// Only event types matching this glob, e.g. 'service.*' or minion.offline
    #[arg(long = "type", value_name = "PATTERN")]
    kind: Option<String>,
    /// Only events emitted by this minion (or `master`)
    #[arg(long)]
    minion: Option<MinionId>,
    /// How to print events: a line each, or one JSON document (CloudEvents) per line
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

pub async fn run(fleet: &FleetArgs, args: EventsArgs) -> anyhow::Result<ExitCode> {
    let client = fleet.client().await?;
    let js = async_nats::jetstream::new(client.nats().clone());
    let stream = js
        .get_stream(STREAM_EVENTS)
        .await
        .context("cannot open the event stream; is a provis master running?")?;
    let source = args
        .minion
        .as_ref()
        .map_or_else(|| "*".to_owned(), ToString::to_string);
    let start_time = time::OffsetDateTime::now_utc() - args.since;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: format!("{}.event.{source}.>", client.subjects().prefix()),
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await?;
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await?;
    let pattern = args.kind.as_deref().map(WildMatch::new);
    while args.follow || pending > 0 {
        let Some(message) = messages.next().await else {
            break;
        };
        let message = message?;
        pending = pending.saturating_sub(1);
        let event: CloudEvent = match serde_json::from_slice(&message.payload) {
            Ok(event) => event,
            Err(err) => {
                eprintln!(
                    "provis: skipping an event on {} that is not a CloudEvent: {err}",
                    message.subject
                );
                continue;
            }
        };
        if pattern
            .as_ref()
            .is_some_and(|p| !p.matches(event.short_kind()))
        {
            continue;
        }
        match args.output {
            Output::Json => outln!("{}", serde_json::to_string(&event)?),
            Output::Table => outln!(
                "{}  {:10}  {:24}  {}",
                event.time,
                event.subject,
                event.short_kind(),
                event.data
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
