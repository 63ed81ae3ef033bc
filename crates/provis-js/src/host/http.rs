//! `provis.http.request({method, url, headers, body, timeout_ms})`: hosts
//! the manifest lists (`http`), no redirects, within the call's deadline.

use rquickjs::{Coerced, Ctx, Function, Object, Value};
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
        "request",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, options: Object<'js>| -> JsResult<Value<'js>> {
                let url: String = options
                    .get("url")
                    .or_else(|_| throw(&ctx, "http.request needs {url: \"http://…\"}"))?;
                let uri = capability::check_http(&caps, &url).or_else(|err| deny(&ctx, err))?;
                let method = options
                    .get::<_, Option<String>>("method")?
                    .unwrap_or_else(|| "GET".to_owned());
                let body = options
                    .get::<_, Option<Coerced<String>>>("body")?
                    .map(|b| b.0.into_bytes())
                    .unwrap_or_default();
                let headers: Vec<(String, String)> =
                    match options.get::<_, Option<Object>>("headers")? {
                        Some(headers) => headers
                            .props::<String, Coerced<String>>()
                            .map(|entry| entry.map(|(k, v)| (k, v.0)))
                            .collect::<JsResult<_>>()?,
                        None => Vec::new(),
                    };
                let timeout =
                    blocking_timeout(options.get::<_, Option<f64>>("timeout_ms")?, &deadline);
                let outcome = capability::http_request(&method, uri, &headers, body, timeout)
                    .or_else(|err| throw(&ctx, format!("http {method} {url} failed: {err}")))?;
                let headers: serde_json::Map<String, serde_json::Value> = outcome
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                to_js(
                    &ctx,
                    &json!({ "status": outcome.status, "headers": headers, "body": outcome.body }),
                )
            },
        )?,
    )?;
    Ok(api.into_value())
}
