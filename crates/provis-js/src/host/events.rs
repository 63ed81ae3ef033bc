//! `provis.events.emit(kind, data)`: an event on
//! `provis.event.<minion>.<service>.<kind>` (always granted; bounded queue).

use rquickjs::function::Opt;
use rquickjs::{Ctx, Function, Object, Value};

use super::{CallDeadline, HostContext, JsResult, from_js, throw};

pub(super) fn install<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    _deadline: &CallDeadline,
) -> JsResult<Value<'js>> {
    let api = Object::new(ctx.clone())?;
    let (sink, service, secrets) = (
        host.events.clone(),
        host.service.clone(),
        host.secrets.clone(),
    );
    api.set(
        "emit",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, kind: String, data: Opt<Value<'js>>| -> JsResult<()> {
                provis_core::event::check_kind(&kind).or_else(|err| throw(&ctx, err))?;
                let data = match data.0 {
                    Some(value) => secrets.redact_json(from_js(&ctx, value)?),
                    None => serde_json::Value::Null,
                };
                let Some(sink) = &sink else { return Ok(()) };
                let event = super::ServiceEvent {
                    service: service.clone(),
                    kind,
                    data,
                };
                match sink.try_send(event) {
                    // The queue is bounded, outside the service's memory limit: a
                    // service emitting faster than events can leave is told so.
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => throw(
                        &ctx,
                        "events are emitted faster than they can be sent; slow down",
                    ),
                    // Closed only when the minion stops: nowhere to go.
                    _ => Ok(()),
                }
            },
        )?,
    )?;
    Ok(api.into_value())
}
