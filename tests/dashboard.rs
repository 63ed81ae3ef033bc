//! End-to-end: the master's dashboard. Pages need a session opened with a
//! one-time token; the fleet page stays fast at 10,000 minions; and, in a
//! real browser (Debian's chromium driven by Playwright for Python) against
//! `provis up`: the printed URL logs in, the fleet lists every minion, a
//! minion's charts have points, a call from the CLI shows on the live
//! events page without a reload. Screenshots land in
//! `target/tmp/dashboard-screenshots/`.
#![cfg(test)]

use std::path::Path;
use std::time::{Duration, Instant};

use provis_testkit::{TestFleet, UpFleet, http_get_with_cookie, python_command, run_to_end};
use serde_json::Value;

fn provis() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_provis"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_needs_a_session_and_the_fleet_page_stays_fast_at_ten_thousand_minions() {
    let keys = tempfile::tempdir().expect("tmp");
    let observer = provis_core::identity::Identity::create(&keys.path().join("watcher.key"))
        .expect("observer key");
    let stranger =
        provis_core::identity::Identity::create(&keys.path().join("stranger.key")).expect("key");
    let observers = vec![observer.public_key().to_owned()];
    let mut fleet = TestFleet::start_with(|config| config.observers = observers)
        .await
        .expect("fleet");
    for id in ["m1", "m2"] {
        fleet.add_minion(id, &["web.eu"]).await.expect("minion");
    }
    let addr = fleet.serve_dashboard().await.expect("dashboard");
    for path in [
        "/",
        "/minion/m1",
        "/events",
        "/events/stream",
        "/jobs",
        "/query",
    ] {
        let refused = http_get_with_cookie(addr, path, None).await.expect("get");
        assert_eq!(refused.status, 401, "{path} without a session");
    }

    let token = fleet
        .master()
        .await
        .expect("master")
        .dashboard_token(Duration::from_secs(60), Some("test".into()))
        .await
        .expect("token")
        .token;
    let login = http_get_with_cookie(addr, &format!("/login?token={token}"), None)
        .await
        .expect("login");
    assert_eq!(login.status, 303, "{}", login.body);
    let cookie = login
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_owned();
    assert!(
        login
            .header("set-cookie")
            .is_some_and(|c| c.contains("HttpOnly"))
    );
    let again = http_get_with_cookie(addr, &format!("/login?token={token}"), None)
        .await
        .expect("login again");
    assert_eq!(again.status, 401, "a token logs in once");
    let wrong = http_get_with_cookie(addr, "/", Some("provis_session=forged"))
        .await
        .expect("forged");
    assert_eq!(wrong.status, 401);

    // A link signed with an observer's key logs in too, once; a key the
    // master does not list does not.
    let signed_link = |key: &str| {
        let (code, stdout, stderr) = run_to_end(
            std::process::Command::new(provis())
                .args(["dashboard", "login", "--url", &format!("http://{addr}")])
                .arg("--identity")
                .arg(keys.path().join(key)),
        )
        .expect("provis dashboard login");
        assert_eq!(code, 0, "{stderr}");
        stdout
            .trim()
            .strip_prefix(&format!("http://{addr}"))
            .expect("a link to this dashboard")
            .to_owned()
    };
    let link = signed_link("watcher.key");
    let signed = http_get_with_cookie(addr, &link, None)
        .await
        .expect("signed");
    assert_eq!(signed.status, 303, "{}", signed.body);
    let replayed = http_get_with_cookie(addr, &link, None)
        .await
        .expect("again");
    assert_eq!(replayed.status, 401, "a signed link logs in once");
    let refused = http_get_with_cookie(addr, &signed_link("stranger.key"), None)
        .await
        .expect("stranger");
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert!(
        refused.body.contains("not one of the master"),
        "{}",
        refused.body
    );
    drop(stranger);

    let get = |path: String| {
        let cookie = cookie.clone();
        async move {
            let page = http_get_with_cookie(addr, &path, Some(&cookie))
                .await
                .expect("page");
            assert_eq!(page.status, 200, "{path}: {}", page.body);
            page.body
        }
    };
    let home = get("/".into()).await;
    assert!(
        home.contains("/minion/m1") && home.contains("/minion/m2"),
        "{home}"
    );
    let minion = get("/minion/m1".into()).await;
    assert!(minion.contains("<svg class=\"chart\""), "{minion}");
    assert!(get("/roles".into()).await.contains("web.eu"));
    for path in [
        "/convergence",
        "/rollouts",
        "/jobs",
        "/events",
        "/query?expression=true",
    ] {
        get(path.into()).await;
    }
    let filtered = get("/?where=state.mem.free_pct%20%3C".into()).await;
    assert!(
        filtered.contains("class=\"error\""),
        "a bad expression says why: {filtered}"
    );

    // 9,998 more minions in the master's view: the first page (100 rows)
    // and a filtered page are built from the view without reading the rest.
    {
        let feed = fleet.master_feed().expect("feed");
        let template = feed
            .view
            .registry()
            .get("m1")
            .cloned()
            .expect("m1's record");
        let mut registry = feed.view.registry_mut();
        for n in 0..9_998 {
            let mut record = template.clone();
            record.id = format!("sim{n:05}").parse().expect("id");
            registry.insert(record.id.to_string(), record);
        }
    }
    let started = Instant::now();
    let page = get("/".into()).await;
    let took = started.elapsed();
    assert!(
        page.contains("of 10000 minions"),
        "{}",
        &page[..page.len().min(2000)]
    );
    assert_eq!(page.matches("<tr class=").count(), 100, "one page of rows");
    assert!(
        took < Duration::from_secs(1),
        "first page of 10,000 in {took:?}"
    );
    // Filtered on the server: the rows are right (its time is the CEL
    // expression's over every minion; a benchmark's business, not a test's).
    let page = get("/?where=id.startsWith(%22sim099%22)&page=0".into()).await;
    // sim09900 … sim09997
    assert!(
        page.contains("98 of 10000 minions"),
        "{}",
        &page[..page.len().min(2000)]
    );
    fleet.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_printed_url_logs_in_and_shows_the_fleet_charts_and_live_events() {
    let up = UpFleet::start(provis(), 3, &[]).await.expect("provis up");
    let printed = up.printed();
    let login = printed
        .lines()
        .find_map(|line| line.strip_prefix("dashboard: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("provis up prints a dashboard URL: {printed}"))
        .to_owned();
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/dashboard_browser.py");
    let (code, stdout, stderr) = run_to_end(
        python_command(&script)
            .arg(&login)
            .arg(provis())
            .arg(up.context())
            .arg(&shots)
            .args(["m1", "m2", "m3"]),
    )
    .expect("python3 runs (scripts/test.sh installs playwright and chromium)");
    assert_eq!(code, 0, "{stdout}{stderr}");
    let seen: Value = serde_json::from_str(stdout.trim()).expect("json");
    assert_eq!(seen["without_session"], 401, "{seen}");
    assert_eq!(
        seen["fleet_lists"],
        serde_json::json!(["m1", "m2", "m3"]),
        "{seen}"
    );
    assert!(
        seen["chart_points"].as_u64().is_some_and(|n| n > 0),
        "{seen}"
    );
    for page in ["roles", "convergence", "rollouts", "jobs", "query"] {
        assert_eq!(seen[page], 200, "{page}: {seen}");
    }
    assert!(
        seen["event_seconds"].as_f64().is_some_and(|s| s < 2.0),
        "the call shows within 2 s: {seen}"
    );
    for shot in ["fleet", "minion", "events", "roles", "convergence"] {
        assert!(shots.join(format!("{shot}.png")).exists(), "{shot}.png");
    }
    up.stop().await.expect("up stops");
}
