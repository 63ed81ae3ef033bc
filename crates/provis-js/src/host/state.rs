//! `provis.state`: the minion's state database, one namespace per service;
//! a service writes its own and reads any (always granted).

use rquickjs::function::Opt;
use rquickjs::{Coerced, Ctx, Function, Object, Value};
use serde_json::json;

use super::{CallDeadline, HostContext, JsResult, from_js, throw, to_js};

pub(super) fn install<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    _deadline: &CallDeadline,
) -> JsResult<Value<'js>> {
    let api = Object::new(ctx.clone())?;
    let (store, own) = (host.state.clone(), host.service.clone());
    api.set(
        "get",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  key: Coerced<String>,
                  service: Opt<String>|
                  -> JsResult<Value<'js>> {
                let namespace = service.0.unwrap_or_else(|| own.clone());
                match store.get(&namespace, &key.0) {
                    Some(value) => to_js(&ctx, &value),
                    None => Ok(Value::new_undefined(ctx)),
                }
            },
        )?,
    )?;
    let (store, own, secrets) = (
        host.state.clone(),
        host.service.clone(),
        host.secrets.clone(),
    );
    api.set(
        "set",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, key: Coerced<String>, value: Value<'js>| -> JsResult<()> {
                // State is readable by other services and shipped in
                // summaries: never a secret's value.
                let value = secrets.redact_json(from_js(&ctx, value)?);
                store
                    .set(&own, &key.0, value)
                    .or_else(|err| throw(&ctx, err))
            },
        )?,
    )?;
    let (store, own) = (host.state.clone(), host.service.clone());
    api.set(
        "delete",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, key: Coerced<String>| -> JsResult<bool> {
                store.delete(&own, &key.0).or_else(|err| throw(&ctx, err))
            },
        )?,
    )?;
    let (store, own) = (host.state.clone(), host.service.clone());
    api.set(
        "list",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  prefix: Opt<String>,
                  service: Opt<String>|
                  -> JsResult<Value<'js>> {
                let namespace = service.0.unwrap_or_else(|| own.clone());
                let entries: Vec<serde_json::Value> = store
                    .list(&namespace, prefix.0.as_deref().unwrap_or(""))
                    .into_iter()
                    .map(|(key, value)| json!({ "key": key, "value": value }))
                    .collect();
                to_js(&ctx, &serde_json::Value::Array(entries))
            },
        )?,
    )?;
    Ok(api.into_value())
}
