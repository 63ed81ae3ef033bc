//! The gated part of the host API, decided in plain Rust before any JS value
//! is touched: which paths a service may read or write, which programs it may
//! run. Deny by default; a denial names the capability that is missing.
//!
//! Paths are checked twice: lexically (so `..` cannot climb out and nothing
//! outside a grant is even looked at), then after resolving symlinks (so a
//! link inside a granted directory cannot point outside it).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use provis_bundle::manifest::Capabilities;

/// Most bytes of a program's stdout or stderr kept.
pub const MAX_CAPTURE_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Denied {
    #[error("capability {capability} does not cover {path} (service.toml grants: {granted})")]
    Path {
        capability: &'static str,
        path: String,
        granted: String,
    },
    #[error("capability exec does not list {program} (service.toml grants: {granted})")]
    Program { program: String, granted: String },
    #[error("{0} must be an absolute path")]
    NotAbsolute(String),
    #[error("capability http does not list {host} (service.toml grants: {granted})")]
    Host { host: String, granted: String },
    #[error("{0:?} is not an http:// URL (https is not available to services yet)")]
    BadUrl(String),
}

fn granted(list: &[PathBuf]) -> String {
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `path` with `.` and `..` applied without touching the filesystem; `None`
/// when it is not absolute.
fn lexical(path: &str) -> Option<PathBuf> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

/// The canonical form of a grant root, or the root as written when it does not exist yet.
fn canonical_root(root: &Path) -> PathBuf {
    root.canonicalize().unwrap_or_else(|_| root.to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Checks `path` against the grants for `access` and returns the path to use.
/// Reading is allowed under read and write grants; writing only under write grants.
pub fn check_path(
    capabilities: &Capabilities,
    path: &str,
    access: Access,
) -> Result<PathBuf, Denied> {
    let fs = &capabilities.fs;
    let (capability, roots): (&'static str, Vec<&PathBuf>) = match access {
        Access::Read => ("fs.read", fs.read.iter().chain(fs.write.iter()).collect()),
        Access::Write => ("fs.write", fs.write.iter().collect()),
    };
    let deny = |shown: &Path| Denied::Path {
        capability,
        path: shown.display().to_string(),
        granted: granted(&roots.iter().map(|p| (*p).clone()).collect::<Vec<_>>()),
    };
    let wanted = lexical(path).ok_or_else(|| Denied::NotAbsolute(path.to_owned()))?;
    if !roots.iter().any(|root| wanted.starts_with(root)) {
        return Err(deny(&wanted));
    }
    // Resolve symlinks: of the path itself when it exists, else of its parent
    // (a file about to be created). A dangling or looping link is refused.
    // Resolve symlinks through the longest part of the path that exists, then
    // put the missing rest back: a link anywhere on the way (even above
    // directories `mkdir` is about to create) is followed before the check.
    // A dangling or looping link is refused.
    let mut existing = wanted.as_path();
    let mut missing = Vec::new();
    let resolved = loop {
        match existing.canonicalize() {
            Ok(real) => {
                break missing
                    .iter()
                    .rev()
                    .fold(real, |path, part| path.join(part));
            }
            Err(_) if std::fs::symlink_metadata(existing).is_ok() => return Err(deny(&wanted)),
            Err(_) => {
                missing.push(
                    existing
                        .file_name()
                        .ok_or_else(|| deny(&wanted))?
                        .to_owned(),
                );
                existing = existing.parent().ok_or_else(|| deny(&wanted))?;
            }
        }
    };
    if roots
        .iter()
        .any(|root| resolved.starts_with(canonical_root(root)))
    {
        Ok(resolved)
    } else {
        Err(deny(&wanted))
    }
}

/// Checks that `program` is listed, exactly, under `exec`.
pub fn check_program(capabilities: &Capabilities, program: &str) -> Result<PathBuf, Denied> {
    let wanted = lexical(program).ok_or_else(|| Denied::NotAbsolute(program.to_owned()))?;
    if capabilities.exec.contains(&wanted) {
        Ok(wanted)
    } else {
        Err(Denied::Program {
            program: program.to_owned(),
            granted: granted(&capabilities.exec),
        })
    }
}

/// What a finished (or killed) program left behind.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecOutcome {
    /// The exit code; `None` when killed by a signal or the timeout.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

/// Runs `program` with `args` (never through a shell), an empty environment
/// but for a minimal PATH, stdin closed, and a timeout after which it is killed.
pub fn run_program(
    program: &Path,
    args: &[String],
    timeout: Duration,
) -> std::io::Result<ExecOutcome> {
    let mut child = Command::new(program)
        .args(args)
        // Its own process group, so a timeout kills whatever it started too.
        .process_group(0)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let capture = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.take(MAX_CAPTURE_BYTES as u64).read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = capture(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = capture(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (Some(status), false);
        }
        if started.elapsed() >= timeout {
            if let Ok(pid) = i32::try_from(child.id()) {
                let group = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(ExecOutcome {
        code: status.and_then(|s| s.code()),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use provis_bundle::manifest::FsCapability;

    fn caps(read: &[&Path], write: &[&Path]) -> Capabilities {
        Capabilities {
            fs: FsCapability {
                read: read.iter().map(|p| p.to_path_buf()).collect(),
                write: write.iter().map(|p| p.to_path_buf()).collect(),
            },
            exec: vec![PathBuf::from("/bin/echo")],
            ..Capabilities::default()
        }
    }

    #[test]
    fn paths_inside_grants_pass_and_escapes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let www = root.join("www");
        std::fs::create_dir_all(www.join("sub")).unwrap();
        std::fs::write(root.join("secret"), "s").unwrap();
        let c = caps(&[], &[&www]);
        let s = |p: &Path| p.display().to_string();
        assert!(check_path(&c, &s(&www.join("sub/new.txt")), Access::Write).is_ok());
        assert!(check_path(&c, &s(&www.join("index.html")), Access::Read).is_ok());
        // `..` climbing out
        let escape = format!("{}/../secret", www.display());
        assert!(matches!(
            check_path(&c, &escape, Access::Read),
            Err(Denied::Path { .. })
        ));
        // a symlink inside the grant pointing out of it
        std::os::unix::fs::symlink(root.join("secret"), www.join("link")).unwrap();
        assert!(check_path(&c, &s(&www.join("link")), Access::Read).is_err());
        assert!(check_path(&c, &s(&www.join("link")), Access::Write).is_err());
        std::os::unix::fs::symlink(&root, www.join("up")).unwrap();
        // through a link, into directories that do not exist yet (mkdir -p)
        assert!(check_path(&c, &s(&www.join("up/new/deeper")), Access::Write).is_err());
        assert!(check_path(&c, &s(&www.join("sub/new/deeper")), Access::Write).is_ok());
        assert!(check_path(&c, &s(&www.join("up/secret")), Access::Read).is_err());
        // a read-only grant does not allow writing; relative paths are refused
        let c = caps(&[&www], &[]);
        let err = check_path(&c, &s(&www.join("x")), Access::Write).unwrap_err();
        assert!(err.to_string().contains("fs.write"), "{err}");
        assert!(matches!(
            check_path(&c, "www/x", Access::Read),
            Err(Denied::NotAbsolute(_))
        ));
    }

    #[test]
    fn only_listed_programs_run_and_a_slow_one_is_killed() {
        let c = caps(&[], &[]);
        assert!(check_program(&c, "/bin/sh").is_err());
        assert!(check_program(&c, "/bin/../bin/echo").is_ok());
        let out = run_program(
            Path::new("/bin/echo"),
            &["a b".into(), "$HOME".into()],
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((out.code, out.stdout.as_str()), (Some(0), "a b $HOME\n"));
        let out = run_program(
            Path::new("/bin/sleep"),
            &["5".into()],
            Duration::from_millis(100),
        )
        .unwrap();
        assert!(out.timed_out);
        // A program that leaves a child holding its output is cut off with it.
        let started = std::time::Instant::now();
        let script = vec!["-c".to_owned(), "sleep 30 & sleep 30".to_owned()];
        let out = run_program(Path::new("/bin/sh"), &script, Duration::from_millis(200)).unwrap();
        assert!(out.timed_out);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}

/// Checks that `url` is `http://` to a host (and port) listed under `http`.
/// An entry `host` allows any port; `host:port` only that one.
pub fn check_http(capabilities: &Capabilities, url: &str) -> Result<ureq::http::Uri, Denied> {
    let uri: ureq::http::Uri = url.parse().map_err(|_| Denied::BadUrl(url.to_owned()))?;
    if uri.scheme_str() != Some("http") || uri.authority().is_some_and(|a| a.as_str().contains('@'))
    {
        return Err(Denied::BadUrl(url.to_owned()));
    }
    let host = uri
        .host()
        .ok_or_else(|| Denied::BadUrl(url.to_owned()))?
        .to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(80);
    let allowed = capabilities.http.iter().any(|entry| {
        let entry = entry.to_ascii_lowercase();
        match entry.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => {
                h == host && p.parse::<u16>().ok() == Some(port)
            }
            _ => entry == host,
        }
    });
    if allowed {
        Ok(uri)
    } else {
        let granted = if capabilities.http.is_empty() {
            "none".to_owned()
        } else {
            capabilities.http.join(", ")
        };
        Err(Denied::Host {
            host: format!("{host}:{port}"),
            granted,
        })
    }
}

/// What an HTTP request brought back.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpOutcome {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Sends one request to an already checked URL. Redirects are not followed
/// (a redirect could lead to a host the manifest does not list); the body is
/// capped at 1 MiB.
pub fn http_request(
    method: &str,
    uri: ureq::http::Uri,
    headers: &[(String, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<HttpOutcome, String> {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .max_redirects(0)
        .http_status_as_error(false)
        .build();
    let agent = ureq::Agent::new_with_config(config);
    let mut request = ureq::http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request.body(body).map_err(|err| err.to_string())?;
    let mut response = agent.run(request).map_err(|err| err.to_string())?;
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_CAPTURE_BYTES as u64)
        .read_to_string()
        .map_err(|err| err.to_string())?;
    Ok(HttpOutcome {
        status,
        headers,
        body,
    })
}
