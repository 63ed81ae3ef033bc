//! `provis.fleet.query(expression, {for_ms, any_ms})`: the master's answer
//! from the fleet's state (needs `fleet_query`), within the call's deadline.

use std::time::{Duration, Instant};

use rquickjs::function::Opt;
use rquickjs::{Ctx, Function, Object, Value};

use super::{CallDeadline, HostContext, JsResult, deny, throw, to_js};

pub(super) fn install<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    deadline: &CallDeadline,
) -> JsResult<Value<'js>> {
    let deadline = deadline.clone();
    let api = Object::new(ctx.clone())?;
    let granted = host.capabilities.fleet_query;
    let fleet = host.fleet.clone();
    api.set(
        "query",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, expression: String, options: Opt<Object<'js>>| -> JsResult<Value<'js>> {
            if !granted {
                return deny(&ctx, "capability fleet_query is not granted (service.toml: [capabilities] fleet_query = true)");
            }
            let Some(fleet) = &fleet else {
                return throw(&ctx, "this minion cannot reach the fleet's state database");
            };
            use provis_core::master_api::{QueryMode, QueryRequest};
            let (mode, window_ms) = match options.0 {
                Some(o) => match (o.get::<_, Option<f64>>("for_ms")?, o.get::<_, Option<f64>>("any_ms")?) {
                    (Some(ms), _) => (QueryMode::For, ms as i64),
                    (None, Some(ms)) => (QueryMode::Any, ms as i64),
                    (None, None) => (QueryMode::Latest, 0),
                },
                None => (QueryMode::Latest, 0),
            };
            let question = QueryRequest { expression, mode, window_ms, page: Default::default() };
            // Never past the call's own deadline, and never more than 5 s.
            let left = deadline.get().map_or(Duration::from_secs(5), |at| at.saturating_duration_since(Instant::now()));
            let answer = (fleet.0)(question, left.min(Duration::from_secs(5))).or_else(|err| throw(&ctx, err))?;
            let answer = serde_json::to_value(answer).or_else(|err| throw(&ctx, err))?;
            to_js(&ctx, &answer)
        })?,
    )?;
    Ok(api.into_value())
}
