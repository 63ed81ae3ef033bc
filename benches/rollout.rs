//! Seconds from a commit to every minion converged on it through a staged
//! rollout (a canary of 1%, then 50%, then the rest, each stage gated by a
//! health call on all its minions), against the same commit applied at once
//! (no rollout.toml) in the same run. The staged figure is the direct one
//! plus what staging costs: per stage, one assignment write per minion,
//! the wait for the stage's minions to report, and one gate call.
//!
//! Run: `cargo bench --bench rollout` (PROVIS_BENCH_SIZES=100,1000, 3 rounds each).

use std::time::{Duration, Instant};

use provis_testkit::{GitRepo, TestFleet, eventually};

const STAGED: &str = "wait_s = 0\n\
    [[stages]]\nname = \"canary\"\npercent = 1\n\
    [[stages]]\npercent = 50\n\
    [gate]\ncall = \"greeter.check\"\ntimeout_s = 30\n";

fn commit(repo: &GitRepo, version: usize, staged: bool) -> anyhow::Result<String> {
    let mut files = vec![
        ("roles/sim.toml", "services = [\"greeter\"]\n".to_owned()),
        (
            "assignments.toml",
            "[[assign]]\nminions = \"sim*\"\nroles = [\"sim\"]\n".to_owned(),
        ),
        (
            "services/greeter/service.toml",
            format!("name = \"greeter\"\nversion = \"{version}\"\n"),
        ),
        (
            "services/greeter/main.js",
            format!(
                "export function hello() {{ return {version} }}\nexport function check() {{ return 'ok' }}\n"
            ),
        ),
    ];
    files.push(("rollout.toml", if staged { STAGED } else { "" }.to_owned()));
    let files: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
    repo.commit(&format!("greeter {version}"), &files)
}

/// Seconds from syncing `head` to every one of `n` minions converged on it
/// (and, when staged, the rollout done).
async fn roll(fleet: &TestFleet, head: &str, n: usize, staged: bool) -> anyhow::Result<f64> {
    let started = Instant::now();
    fleet.master().await?.sync().await?;
    let converged = eventually("convergence", Duration::from_secs(600), || async {
        if !fleet.converged_on(head, n).await {
            return false;
        }
        if !staged {
            return true;
        }
        let Ok(master) = fleet.master().await else {
            return false;
        };
        master.rollout().await.ok().flatten().is_some_and(|r| {
            r.commit == head && r.status == provis_core::master_api::RolloutStatus::Done
        })
    })
    .await;
    if let Err(err) = converged {
        diagnose(fleet, head).await;
        return Err(err);
    }
    Ok(started.elapsed().as_secs_f64())
}

/// What the fleet and the rollout look like when convergence did not come.
async fn diagnose(fleet: &TestFleet, head: &str) {
    let Ok(master) = fleet.master().await else {
        eprintln!("no master to ask");
        return;
    };
    if let Ok(status) = master.status().await {
        let mut commits = std::collections::BTreeMap::<String, usize>::new();
        for minion in &status.minions {
            let on = match (&minion.commit, minion.live) {
                (Some(c), true) if c == head => "head".to_owned(),
                (Some(c), live) => format!("{} live={live}", &c[..8.min(c.len())]),
                (None, live) => format!("none live={live}"),
            };
            *commits.entry(on).or_default() += 1;
        }
        let failed: Vec<_> = status
            .minions
            .iter()
            .filter(|m| !m.failed.is_empty())
            .take(3)
            .collect();
        eprintln!(
            "applied {:?}; {} minions by commit: {commits:?}; failing e.g. {failed:?}",
            status.applied.map(|a| a.commit),
            status.minions.len()
        );
    }
    if let Ok(Some(rollout)) = master.rollout().await {
        let stages: Vec<_> = rollout
            .stages
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.len(),
                    s.state,
                    s.results.values().filter(|o| !o.ok).count(),
                )
            })
            .collect();
        eprintln!(
            "rollout of {} {:?} stage {} reason {:?}: {stages:?}",
            rollout.commit, rollout.status, rollout.stage, rollout.reason
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let sizes: Vec<usize> = std::env::var("PROVIS_BENCH_SIZES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    for n in sizes {
        let repo = GitRepo::init()?;
        let first = commit(&repo, 1, false)?;
        let mut fleet = TestFleet::start_following(&repo).await?;
        fleet
            .add_simulated_minions(n, &[], (n / 50).max(1), Duration::from_secs(5), |config| {
                config.inject_services = true;
            })
            .await?;
        roll(&fleet, &first, n, false).await?;
        let (mut staged, mut direct) = (Vec::new(), Vec::new());
        let mut version = 2;
        for _ in 0..3 {
            let head = commit(&repo, version, false)?;
            direct.push(roll(&fleet, &head, n, false).await?);
            let head = commit(&repo, version + 1, true)?;
            staged.push(roll(&fleet, &head, n, true).await?);
            version += 2;
        }
        let (staged, direct) = (median(staged), median(direct));
        println!(
            "rollout n={n}: staged (canary 1% + 50% + rest, gated) {staged:.3} s, direct {direct:.3} s, ratio {:.2}",
            staged / direct
        );
        fleet.shut_down().await;
    }
    Ok(())
}
