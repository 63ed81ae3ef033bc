//! Every call is an event too: the leading master announces each job the
//! moment its caller records it (`job.started`: caller, function, target,
//! how many selected; never the arguments), so tools that follow events
//! (the dashboard, an observer) see calls as they are made. Only the leader
//! announces, so several masters announce each call once.

use futures::StreamExt as _;
use provis_core::Subjects;
use provis_core::jobs::JobRequest;
use provis_core::outbox::Outbox;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::leadership::Leadership;

/// Announces calls until `stop`.
pub async fn announce(
    nats: async_nats::Client,
    subjects: Subjects,
    outbox: Outbox,
    leadership: Leadership,
    stop: CancellationToken,
) {
    let mut requests = match nats.subscribe(subjects.job("*", "request")).await {
        Ok(requests) => requests,
        Err(err) => {
            tracing::warn!(error = %err, "calls not announced as events");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = requests.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        if !leadership.current().leading() {
            continue;
        }
        let Ok(request) = serde_json::from_slice::<JobRequest>(&message.payload) else {
            continue;
        };
        if message.subject.as_str() != subjects.job(&request.job, "request") {
            continue;
        }
        provis_core::event::emit(
            &outbox,
            &subjects,
            "master",
            "job.started",
            json!({
                "job": request.job,
                "caller": request.caller,
                "function": request.function,
                "target": request.target,
                "selected": request.selected.len(),
            }),
        );
    }
}
