//! `provis.exec.run(program, args, {timeout_ms})`: a program the manifest
//! lists (`exec`), without a shell, killed at the call's deadline.

use rquickjs::function::Opt;
use rquickjs::{Array, Coerced, Ctx, Function, Object, Value};
use serde_json::json;

use super::{CallDeadline, HostContext, JsResult, blocking_timeout, deny, throw, to_js};
use crate::capability;

pub(super) fn install<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    deadline: &CallDeadline,
) -> JsResult<Value<'js>> {
    let deadline = deadline.clone();
    let api = Object::new(ctx.clone())?;
    let caps = host.capabilities.clone();
    api.set(
        "run",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>,
                  program: String,
                  args: Opt<Array<'js>>,
                  options: Opt<Object<'js>>|
                  -> JsResult<Value<'js>> {
                let program =
                    capability::check_program(&caps, &program).or_else(|err| deny(&ctx, err))?;
                let args: Vec<String> = match args.0 {
                    Some(array) => array
                        .iter::<Coerced<String>>()
                        .map(|a| a.map(|a| a.0))
                        .collect::<JsResult<_>>()?,
                    None => Vec::new(),
                };
                let requested = options
                    .0
                    .and_then(|o| o.get::<_, Option<f64>>("timeout_ms").ok().flatten());
                let timeout = blocking_timeout(requested, &deadline);
                let outcome = capability::run_program(&program, &args, timeout).or_else(|err| {
                    throw(&ctx, format!("cannot run {}: {err}", program.display()))
                })?;
                to_js(
                    &ctx,
                    &json!({
                        "code": outcome.code,
                        "stdout": outcome.stdout,
                        "stderr": outcome.stderr,
                        "timed_out": outcome.timed_out,
                    }),
                )
            },
        )?,
    )?;
    Ok(api.into_value())
}
