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

/// How long `provis events` waits for the event stream to answer.
const STREAM_WAIT: Duration = Duration::from_secs(15);

pub async fn run(fleet: &FleetArgs, args: EventsArgs) -> anyhow::Result<ExitCode> {
    let client = fleet.client().await?;
    let js = async_nats::jetstream::new(client.nats().clone());
    let source = args
        .minion
        .as_ref()
        .map_or_else(|| "*".to_owned(), ToString::to_string);
    let start_time = time::OffsetDateTime::now_utc() - args.since;
    let config = consumer::pull::OrderedConfig {
        filter_subject: format!("{}.event.{source}.>", client.subjects().prefix()),
        deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
        ..Default::default()
    };
    // A stream whose node just died answers again once another leads:
    // that is waited for, a while.
    let started = std::time::Instant::now();
    let consumer = loop {
        let attempt = async {
            let stream = js
                .get_stream(STREAM_EVENTS)
                .await
                .context("cannot open the event stream; is a provis master running?")?;
            anyhow::Ok(stream.create_consumer(config.clone()).await?)
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(consumer)) => break consumer,
            Ok(Err(err)) if started.elapsed() >= STREAM_WAIT => return Err(err),
            Err(_) if started.elapsed() >= STREAM_WAIT => {
                anyhow::bail!("the event stream did not answer within {STREAM_WAIT:?}")
            }
            _ => {
                tracing::info!("the event stream does not answer yet; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
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
