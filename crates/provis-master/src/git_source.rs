//! Where desired state comes from: one branch of a git repository, given as
//! a local path or a `file://` / `git://` URL. The master keeps a bare
//! mirror of its own, fetches the branch into it (a force-push simply moves
//! the branch), and exports the commit's tree into a directory that
//! [`crate::repository::ConfigRepository::load`] reads.
//!
//! https and ssh remotes are not built in: git2 runs without its TLS and
//! SSH features to keep the build free of OpenSSL and libssh2.

use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid, Repository, TreeWalkMode, TreeWalkResult};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("cannot prepare the mirror at {path}: {reason}")]
    Mirror { path: PathBuf, reason: String },
    #[error("cannot fetch branch {branch} of {source_url}: {reason}")]
    Fetch {
        source_url: String,
        branch: String,
        reason: String,
    },
    #[error("cannot read commit {commit}: {reason}")]
    Read { commit: String, reason: String },
}

/// A fetched commit and the directory its tree was exported to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedCommit {
    pub commit: String,
    pub summary: String,
    pub dir: PathBuf,
}

/// One branch of one repository, mirrored under `work_dir`.
#[derive(Debug, Clone)]
pub struct GitSource {
    pub source: String,
    pub branch: String,
    work_dir: PathBuf,
}

impl GitSource {
    pub fn new(source: &str, branch: &str, work_dir: &Path) -> Self {
        Self {
            source: source.to_owned(),
            branch: branch.to_owned(),
            work_dir: work_dir.to_owned(),
        }
    }

    fn mirror(&self) -> Result<Repository, SourceError> {
        let path = self.work_dir.join("mirror.git");
        let err = |e: git2::Error| SourceError::Mirror {
            path: path.clone(),
            reason: e.message().to_owned(),
        };
        std::fs::create_dir_all(&self.work_dir).map_err(|e| SourceError::Mirror {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        match Repository::open_bare(&path) {
            Ok(repo) => Ok(repo),
            Err(_) => Repository::init_bare(&path).map_err(err),
        }
    }

    /// Fetches the branch and returns its head commit id (no export).
    pub fn fetch_head(&self) -> Result<String, SourceError> {
        let repo = self.mirror()?;
        let fetch_err = |e: git2::Error| SourceError::Fetch {
            source_url: self.source.clone(),
            branch: self.branch.clone(),
            reason: e.message().to_owned(),
        };
        let mut remote = repo.remote_anonymous(&self.source).map_err(fetch_err)?;
        // `+`: a force-pushed branch replaces what was fetched before.
        let refspec = format!("+refs/heads/{0}:refs/provis/{0}", self.branch);
        remote
            .fetch(&[refspec.as_str()], None, None)
            .map_err(fetch_err)?;
        let oid = repo
            .refname_to_id(&format!("refs/provis/{}", self.branch))
            .map_err(fetch_err)?;
        Ok(oid.to_string())
    }

    /// The commit `rev` names in the mirror (fetch first): a commit id,
    /// full or short; `HEAD` or the branch's name for its head; `HEAD~N`.
    pub fn resolve(&self, rev: &str) -> Result<String, SourceError> {
        let repo = self.mirror()?;
        let head = format!("refs/provis/{}", self.branch);
        let spec = match rev
            .strip_prefix("HEAD")
            .or_else(|| rev.strip_prefix(self.branch.as_str()))
        {
            Some(rest) if rest.is_empty() || rest.starts_with(['~', '^']) => {
                format!("{head}{rest}")
            }
            _ => rev.to_owned(),
        };
        repo.revparse_single(&spec)
            .and_then(|object| object.peel_to_commit())
            .map(|commit| commit.id().to_string())
            .map_err(|e| SourceError::Read {
                commit: rev.to_owned(),
                reason: e.message().to_owned(),
            })
    }

    /// Exports `commit`'s tree to a fresh directory under the work dir.
    pub fn export(&self, commit: &str) -> Result<FetchedCommit, SourceError> {
        let repo = self.mirror()?;
        let read_err = |reason: String| SourceError::Read {
            commit: commit.to_owned(),
            reason,
        };
        let oid = Oid::from_str(commit).map_err(|e| read_err(e.message().to_owned()))?;
        let commit_obj = repo
            .find_commit(oid)
            .map_err(|e| read_err(e.message().to_owned()))?;
        let tree = commit_obj
            .tree()
            .map_err(|e| read_err(e.message().to_owned()))?;
        let dir = self.work_dir.join("checkouts").join(commit);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| read_err(e.to_string()))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| read_err(e.to_string()))?;
        let mut failure = None;
        tree.walk(TreeWalkMode::PreOrder, |parent, entry| {
            let Ok(name) = entry.name() else {
                return TreeWalkResult::Skip;
            };
            let path = dir.join(parent).join(name);
            let outcome = match entry.kind() {
                Some(ObjectType::Tree) => std::fs::create_dir_all(&path).map_err(|e| e.to_string()),
                // Symlinks (mode 120000) are not exported: a bundle holds regular files only.
                Some(ObjectType::Blob) if entry.filemode() != 0o120000 => entry
                    .to_object(&repo)
                    .map_err(|e| e.message().to_owned())
                    .and_then(|o| o.peel_to_blob().map_err(|e| e.message().to_owned()))
                    .and_then(|blob| {
                        std::fs::write(&path, blob.content()).map_err(|e| e.to_string())
                    }),
                _ => Ok(()),
            };
            match outcome {
                Ok(()) => TreeWalkResult::Ok,
                Err(reason) => {
                    failure = Some(reason);
                    TreeWalkResult::Abort
                }
            }
        })
        .map_err(|e| read_err(e.message().to_owned()))?;
        if let Some(reason) = failure {
            return Err(read_err(reason));
        }
        self.forget_checkouts_except(commit);
        Ok(FetchedCommit {
            commit: commit.to_owned(),
            summary: commit_obj
                .summary()
                .ok()
                .flatten()
                .unwrap_or_default()
                .to_owned(),
            dir,
        })
    }

    fn forget_checkouts_except(&self, keep: &str) {
        let Ok(entries) = std::fs::read_dir(self.work_dir.join("checkouts")) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name() != keep {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Makes a git repository at `to` (branch `main`) whose first commit holds
/// the files of folder `from` (its own `.git`, if any, left out); returns
/// the commit id. `provis up` follows such a repository when it is given a
/// plain folder, so that its demo is configured from git like a fleet.
pub fn seed_repository(from: &Path, to: &Path, message: &str) -> Result<String, SourceError> {
    let err = |reason: String| SourceError::Mirror {
        path: to.to_owned(),
        reason,
    };
    copy_tree(from, to).map_err(|e| err(format!("copying {}: {e}", from.display())))?;
    let mut options = git2::RepositoryInitOptions::new();
    options.initial_head("main");
    let repo = Repository::init_opts(to, &options).map_err(|e| err(e.message().to_owned()))?;
    let mut index = repo.index().map_err(|e| err(e.message().to_owned()))?;
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .and_then(|()| index.write())
        .map_err(|e| err(e.message().to_owned()))?;
    let tree = index
        .write_tree()
        .and_then(|oid| repo.find_tree(oid))
        .map_err(|e| err(e.message().to_owned()))?;
    let author = git2::Signature::now("provis up", "provis@localhost")
        .map_err(|e| err(e.message().to_owned()))?;
    let commit = repo
        .commit(Some("HEAD"), &author, &author, message, &tree, &[])
        .map_err(|e| err(e.message().to_owned()))?;
    Ok(commit.to_string())
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_name() == ".git" {
            continue;
        }
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&source, &target)?;
        } else if kind.is_file() {
            std::fs::copy(&source, &target)?;
        }
    }
    Ok(())
}
