//! `provis.log.debug/info/warn/error(message)`: the minion's log, with
//! minion and service fields (always granted).

use rquickjs::{Coerced, Ctx, Function, Object, Value};

use super::{CallDeadline, HostContext, JsResult};

pub(super) fn install<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    _deadline: &CallDeadline,
) -> JsResult<Value<'js>> {
    let api = Object::new(ctx.clone())?;
    for level in ["debug", "info", "warn", "error"] {
        let (minion, service, secrets) = (
            host.minion_id.clone(),
            host.service.clone(),
            host.secrets.clone(),
        );
        api.set(
            level,
            Function::new(ctx.clone(), move |message: Coerced<String>| {
                let message = secrets.redact(&message.0).into_owned();
                match level {
                    "debug" => tracing::debug!(%minion, %service, "{message}"),
                    "info" => tracing::info!(%minion, %service, "{message}"),
                    "warn" => tracing::warn!(%minion, %service, "{message}"),
                    _ => tracing::error!(%minion, %service, "{message}"),
                }
            })?,
        )?;
    }
    Ok(api.into_value())
}
