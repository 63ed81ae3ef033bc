//! Seconds from a commit to every minion converged on it, for 10 and 200
//! minions (testkit's simulated minions, running injected services): the
//! master fetches, validates (every module compiled), applies, reassigns, and
//! each minion loads the new bundle and reports the commit. Beside it, in the
//! same run, the parts no implementation avoids: fetching the commit with git
//! and compiling its modules once.
//!
//! Run: `cargo bench --bench gitops` (PROVIS_BENCH_SIZES=10,200, 5 rounds).

use std::time::{Duration, Instant};

use provis_testkit::{GitRepo, TestFleet, eventually};

fn commit(repo: &GitRepo, version: usize) -> anyhow::Result<String> {
    repo.commit(
        &format!("greeter {version}"),
        &[
            ("roles/sim.toml", "services = [\"greeter\"]\n"),
            (
                "assignments.toml",
                "[[assign]]\nminions = \"sim*\"\nroles = [\"sim\"]\n",
            ),
            (
                "services/greeter/service.toml",
                &format!("name = \"greeter\"\nversion = \"{version}\"\n"),
            ),
            (
                "services/greeter/main.js",
                &format!("export function hello() {{ return {version} }}\n"),
            ),
        ],
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::var("PROVIS_BENCH_SIZES")
        .unwrap_or_else(|_| "10,200".into())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    for n in sizes {
        let repo = GitRepo::init()?;
        let first = commit(&repo, 1)?;
        let mut fleet = TestFleet::start_following(&repo).await?;
        fleet
            .add_simulated_minions(n, &[], (n / 50).max(1), Duration::from_secs(5), |config| {
                config.inject_services = true;
            })
            .await?;
        eventually("first convergence", Duration::from_secs(300), || {
            fleet.converged_on(&first, n)
        })
        .await?;

        let mut rounds = Vec::new();
        let mut floor = Vec::new();
        for version in 2..7 {
            let head = commit(&repo, version)?;
            let started = Instant::now();
            let answer = fleet.master().await?.sync().await?;
            anyhow::ensure!(
                answer.outcome == provis_core::master_api::SyncOutcome::Applied,
                "{answer:?}"
            );
            let applied = started.elapsed();
            eventually("convergence", Duration::from_secs(300), || {
                fleet.converged_on(&head, n)
            })
            .await?;
            rounds.push((started.elapsed().as_secs_f64(), applied.as_secs_f64()));

            // The floor: git fetch and export of the same commit, and one compile of its modules.
            let started = Instant::now();
            let mirror = tempfile::tempdir()?;
            let source = provis_master::git_source::GitSource::new(
                &repo.path_string(),
                "main",
                mirror.path(),
            );
            let fetched = source.export(&source.fetch_head()?)?;
            provis_master::repository::ConfigRepository::load(&fetched.dir)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            floor.push(started.elapsed().as_secs_f64());
        }
        rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        floor.sort_by(f64::total_cmp);
        let (total, applied) = rounds[rounds.len() / 2];
        let floor = floor[floor.len() / 2];
        println!(
            "{n:>4} minions: commit → all converged {total:.3} s (median of {}; master done applying after {applied:.3} s); fetch+validate floor {floor:.3} s ({:.1}x)",
            rounds.len(),
            total / floor
        );
    }
    Ok(())
}
