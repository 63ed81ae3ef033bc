//! `provis.fs`: files under the paths the manifest grants (`fs.read`,
//! `fs.write`); anything else is a `PermissionDenied`.

use rquickjs::{Coerced, Ctx, Function, Object, Value};

use super::{CallDeadline, HostContext, JsResult, deny, throw};
use crate::capability::{self, Access};
use provis_bundle::manifest::Capabilities;

/// The path to use if the manifest grants `access` to it; a denial otherwise.
fn granted_path(
    ctx: &Ctx<'_>,
    caps: &Capabilities,
    path: &str,
    access: Access,
) -> JsResult<std::path::PathBuf> {
    capability::check_path(caps, path, access).or_else(|err| deny(ctx, err))
}

/// A granted file operation that failed on the machine.
fn io_failed<T>(
    ctx: &Ctx<'_>,
    verb: &str,
    path: &std::path::Path,
    err: std::io::Error,
) -> JsResult<T> {
    throw(ctx, format!("cannot {verb} {}: {err}", path.display()))
}

pub(super) fn install<'js>(
    ctx: &Ctx<'js>,
    host: &HostContext,
    _deadline: &CallDeadline,
) -> JsResult<Value<'js>> {
    let api = Object::new(ctx.clone())?;
    let caps = host.capabilities.clone();
    api.set(
        "read",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<String> {
                let path = granted_path(&ctx, &caps, &path, Access::Read)?;
                std::fs::read_to_string(&path).or_else(|err| io_failed(&ctx, "read", &path, err))
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "exists",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<bool> {
                let path = granted_path(&ctx, &caps, &path, Access::Read)?;
                Ok(path.exists())
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "list",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<Vec<String>> {
                let path = granted_path(&ctx, &caps, &path, Access::Read)?;
                let entries =
                    std::fs::read_dir(&path).or_else(|err| io_failed(&ctx, "list", &path, err))?;
                let mut names: Vec<String> = entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                Ok(names)
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "write",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String, text: Coerced<String>| -> JsResult<()> {
                let path = granted_path(&ctx, &caps, &path, Access::Write)?;
                std::fs::write(&path, text.0).or_else(|err| io_failed(&ctx, "write", &path, err))
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "mkdir",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<()> {
                let path = granted_path(&ctx, &caps, &path, Access::Write)?;
                std::fs::create_dir_all(&path).or_else(|err| io_failed(&ctx, "create", &path, err))
            },
        )?,
    )?;
    let caps = host.capabilities.clone();
    api.set(
        "remove",
        Function::new(
            ctx.clone(),
            move |ctx: Ctx<'js>, path: String| -> JsResult<bool> {
                let path = granted_path(&ctx, &caps, &path, Access::Write)?;
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(true),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(err) => throw(&ctx, format!("cannot remove {}: {err}", path.display())),
                }
            },
        )?,
    )?;
    Ok(api.into_value())
}
