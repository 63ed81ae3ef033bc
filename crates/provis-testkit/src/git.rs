//! A throwaway git repository for config-from-git tests, driven with the
//! real `git` command: write files, commit, revert, force-push by resetting.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

#[derive(Debug)]
pub struct GitRepo {
    dir: tempfile::TempDir,
}

impl GitRepo {
    /// An empty repository on branch `main`.
    pub fn init() -> anyhow::Result<Self> {
        let repo = Self {
            dir: tempfile::Builder::new().prefix("provis-git-").tempdir()?,
        };
        repo.git(&["init", "--quiet", "--initial-branch=main"])?;
        repo.git(&["config", "user.name", "provis tests"])?;
        repo.git(&["config", "user.email", "tests@provis.invalid"])?;
        repo.git(&["config", "commit.gpgsign", "false"])?;
        Ok(repo)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_string(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Runs git in the repository and returns its stdout.
    pub fn git(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("git")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .context("running git")?;
        if !output.status.success() {
            bail!(
                "git {args:?} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Writes files (creating directories) and commits everything; returns the commit id.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> anyhow::Result<String> {
        crate::write_files(self.dir.path(), files)?;
        self.git(&["add", "--all"])?;
        self.git(&["commit", "--quiet", "--allow-empty", "-m", message])?;
        self.head()
    }

    /// Commits a fleet whose role `web` runs `count` services named
    /// `svc00`, `svc01`, … (so an apply publishes that many bundles), each
    /// exporting `version()` that answers `version`; returns the commit id.
    pub fn commit_services(&self, count: usize, version: &str) -> anyhow::Result<String> {
        let names: Vec<String> = (0..count).map(|n| format!("svc{n:02}")).collect();
        let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
        let mut files = vec![(
            "roles/web.toml".to_owned(),
            format!("services = [{}]\n", quoted.join(", ")),
        )];
        for name in &names {
            files.push((
                format!("services/{name}/service.toml"),
                format!("name = \"{name}\"\nversion = \"{version}\"\n"),
            ));
            files.push((
                format!("services/{name}/main.js"),
                format!("export function version() {{ return '{version}' }}\n"),
            ));
        }
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(path, text)| (path.as_str(), text.as_str()))
            .collect();
        self.commit(&format!("{count} services at {version}"), &files)
    }

    /// Deletes a file and commits.
    pub fn remove(&self, message: &str, path: &str) -> anyhow::Result<String> {
        self.git(&["rm", "--quiet", "-r", path])?;
        self.git(&["commit", "--quiet", "-m", message])?;
        self.head()
    }

    pub fn head(&self) -> anyhow::Result<String> {
        self.git(&["rev-parse", "HEAD"])
    }

    /// Moves the repository out of reach (as if the remote vanished); returns where it went.
    pub fn hide(&self) -> anyhow::Result<PathBuf> {
        let hidden = self.dir.path().with_extension("hidden");
        std::fs::rename(self.dir.path(), &hidden)?;
        Ok(hidden)
    }

    /// Brings back a repository moved by [`Self::hide`].
    pub fn unhide(&self, hidden: &Path) -> anyhow::Result<()> {
        std::fs::rename(hidden, self.dir.path())?;
        Ok(())
    }
}
