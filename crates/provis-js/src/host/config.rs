//! `provis.config`: this service's config from the minion's roles
//! (read-only data).

use rquickjs::{Ctx, Value};

use super::{CallDeadline, HostContext, JsResult, to_js};

pub(super) fn install<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    _deadline: &CallDeadline,
) -> JsResult<Value<'js>> {
    to_js(ctx, &host.config)
}
