//! `provis.secrets.get(name)`: a secret's value, if the manifest grants
//! the name (`capabilities.secrets`) and the minion could open the copy
//! sealed to it.

use rquickjs::{Ctx, Function, Object, Value};

use super::{CallDeadline, HostContext, JsResult, deny, throw};

pub(super) fn install<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    _deadline: &CallDeadline,
) -> JsResult<Value<'js>> {
    let api = Object::new(ctx.clone())?;
    let (granted, secrets) = (host.capabilities.secrets.clone(), host.secrets.clone());
    api.set(
        "get",
        Function::new(ctx.clone(), move |ctx: Ctx<'js>, name: String| -> JsResult<String> {
            if !granted.contains(&name) {
                return deny(
                    &ctx,
                    format!("secret {name:?} is not granted: list it in capabilities.secrets of service.toml"),
                );
            }
            match secrets.get(&name) {
                Some(Ok(value)) => Ok(value.clone()),
                Some(Err(why)) => throw(&ctx, format!("secret {name:?}: {why}")),
                None => throw(
                    &ctx,
                    format!("secret {name:?} is not sealed to this minion (provis secret reseal, then commit)"),
                ),
            }
        })?,
    )?;
    Ok(api.into_value())
}
