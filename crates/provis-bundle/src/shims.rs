//! Modules the packer adds to a bundle itself: pure-JavaScript stand-ins for
//! the few Node built-ins a sandbox can honestly provide (`events`, `util`,
//! `process`), and `provis:test`, the assertion API of local tests. They
//! live under `__provis__/` in the bundle and go through the same pipeline
//! as the author's modules. Every other built-in is refused at pack time.

/// Where shims live inside a bundle.
pub const SHIM_DIR: &str = "__provis__";

/// The specifier of the test API.
pub const TEST_API_SPECIFIER: &str = "provis:test";

/// The bundle path of the test API module.
pub const TEST_API_PATH: &str = "__provis__/test.js";

/// The bundle path of the `process` shim given to CommonJS modules.
pub const PROCESS_PATH: &str = "__provis__/shims/process.js";

const SHIMS: &[(&str, &str, &str)] = &[
    (
        "events",
        "__provis__/shims/events.js",
        include_str!("../shims/events.js"),
    ),
    (
        "util",
        "__provis__/shims/util.js",
        include_str!("../shims/util.js"),
    ),
    ("process", PROCESS_PATH, include_str!("../shims/process.js")),
];

/// The bundle path of the shim for built-in `name` (`node:` stripped), if any.
pub fn for_builtin(name: &str) -> Option<&'static str> {
    SHIMS
        .iter()
        .find(|(builtin, _, _)| *builtin == name)
        .map(|(_, path, _)| *path)
}

/// The source of the packer's own module at `path`, if it is one.
pub fn source(path: &str) -> Option<&'static str> {
    if path == TEST_API_PATH {
        return Some(include_str!("../shims/test.js"));
    }
    SHIMS
        .iter()
        .find(|(_, shim, _)| *shim == path)
        .map(|(_, _, source)| *source)
}

/// The built-ins that have a shim, for error messages and docs.
pub fn shimmed() -> impl Iterator<Item = &'static str> {
    SHIMS.iter().map(|(name, _, _)| *name)
}
