//! `provis.minion.id`, `provis.minion.roles`: who runs the service.

use rquickjs::{Ctx, Object, Value};
use serde_json::json;

use super::{CallDeadline, HostContext, JsResult, to_js};

pub(super) fn install<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    _deadline: &CallDeadline,
) -> JsResult<Value<'js>> {
    let minion = Object::new(ctx.clone())?;
    minion.set("id", host.minion_id.as_str())?;
    minion.set("roles", to_js(ctx, &json!(host.roles))?)?;
    Ok(minion.into_value())
}
