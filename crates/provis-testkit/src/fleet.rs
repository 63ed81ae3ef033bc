//! A fleet for a test: a [`NatsServer`], a master in-process, and minions
//! either in-process (fast, many per test) or as real `provis` processes
//! (end-to-end, killable).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use provis_core::master_api::MasterClient;
use provis_core::{Client, FleetContext, MinionId, RoleName, Subjects, readiness};
use provis_master::{MasterConfig, MasterHandle};
use provis_minion::{MinionConfig, MinionHandle};

use crate::{NatsServer, ProvisProcess, eventually};

/// Heartbeat period of test minions: short, so liveness settles fast.
pub const TEST_HEARTBEAT_INTERVAL_MS: u64 = 500;

#[derive(Debug)]
pub struct TestFleet {
    // Field order is drop order: processes and minions go before the server.
    processes: BTreeMap<String, ProvisProcess>,
    minions: BTreeMap<String, MinionHandle>,
    master: Option<MasterHandle>,
    master_config: MasterConfig,
    context: FleetContext,
    /// Minions need enrollment: the server admits connections through the
    /// master's auth callout.
    secured: bool,
    workdir: tempfile::TempDir,
    nats: NatsServer,
}

impl TestFleet {
    /// A nats-server and a master serving it.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// A nats-server and a master following `repo` (its branch `main`),
    /// which applies a commit when asked to sync, not on a timer.
    pub async fn start_following(repo: &crate::GitRepo) -> anyhow::Result<Self> {
        let source = repo.path_string();
        Self::start_with(|config| {
            config.repository = Some(source);
            config.poll_interval_s = 3600;
        })
        .await
    }

    /// A nats-server and a master whose settings `adjust` changes first.
    pub async fn start_with(adjust: impl FnOnce(&mut MasterConfig)) -> anyhow::Result<Self> {
        Self::start_on(NatsServer::start()?, adjust).await
    }

    /// A master serving `nats` (a server started with settings of the
    /// test's own), its settings changed by `adjust` first.
    pub async fn start_on(
        nats: NatsServer,
        adjust: impl FnOnce(&mut MasterConfig),
    ) -> anyhow::Result<Self> {
        let workdir = tempfile::Builder::new().prefix("provis-fleet-").tempdir()?;
        Self::launch(nats, workdir, None, adjust).await
    }

    /// A fleet secured as in production: nats-server admits every
    /// connection through the master's auth callout, with per-identity
    /// permissions. This fleet's clients and `provis` commands act as an
    /// operator (key `operator.key` in the workdir, known to the master);
    /// minions added get a one-time enrollment token.
    pub async fn start_secured() -> anyhow::Result<Self> {
        Self::start_secured_with(|_| {}).await
    }

    /// A secured fleet whose master settings `adjust` changes first.
    pub async fn start_secured_with(
        adjust: impl FnOnce(&mut MasterConfig),
    ) -> anyhow::Result<Self> {
        let workdir = tempfile::Builder::new().prefix("provis-fleet-").tempdir()?;
        let master_key = workdir.path().join("master").join("master.key");
        let master = provis_core::identity::Identity::create(&master_key)?;
        let operator_key = workdir.path().join("operator.key");
        let operator = provis_core::identity::Identity::create(&operator_key)?;
        let nats = NatsServer::start_secured(&master)?;
        let operators = vec![operator.public_key().to_owned()];
        Self::launch(nats, workdir, Some(operator_key), move |config| {
            config.signing_key = Some(master_key);
            config.operators = operators;
            adjust(config);
        })
        .await
    }

    async fn launch(
        nats: NatsServer,
        workdir: tempfile::TempDir,
        operator_key: Option<std::path::PathBuf>,
        adjust: impl FnOnce(&mut MasterConfig),
    ) -> anyhow::Result<Self> {
        let master_fleet = FleetContext {
            nats_url: nats.url(),
            ..FleetContext::default()
        };
        let mut config = MasterConfig {
            fleet: master_fleet.clone(),
            // The master's mirror and key stay inside the fleet's scratch space.
            data_dir: Some(workdir.path().join("master")),
            ..MasterConfig::default()
        };
        adjust(&mut config);
        let master = provis_master::start(config.clone())
            .await
            .context("starting the master")?;
        let secured = operator_key.is_some();
        let context = FleetContext {
            identity: operator_key,
            ..master_fleet
        };
        // `provis` commands of this fleet read it (as the operator, when secured).
        context.save(&workdir.path().join("context.toml"))?;
        Ok(Self {
            processes: BTreeMap::new(),
            minions: BTreeMap::new(),
            master: Some(master),
            master_config: config,
            context,
            secured,
            workdir,
            nats,
        })
    }

    /// A NATS connection of this fleet's operator (anonymous when not secured).
    pub async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        Ok(provis_core::client::connect_nats(&self.context, "provis-test").await?)
    }

    /// Connection options as minion `id`, with its own key from its data
    /// dir: what someone who took over that minion's machine can do.
    pub fn minion_options(&self, id: &str) -> anyhow::Result<async_nats::ConnectOptions> {
        let key =
            provis_core::identity::Identity::load(&self.minion_data_dir(id).join("minion.key"))?;
        Ok(self
            .context
            .connect_options_as(&format!("as-{id}"), &key)
            .user_and_password(id.to_owned(), String::new()))
    }

    /// A one-time enrollment token from the master.
    pub async fn enrollment_token(&self) -> anyhow::Result<String> {
        let answer = self
            .master()
            .await?
            .enrollment_token(Duration::from_secs(600), None)
            .await?;
        Ok(answer.token)
    }

    pub fn nats(&self) -> &NatsServer {
        &self.nats
    }

    pub fn nats_mut(&mut self) -> &mut NatsServer {
        &mut self.nats
    }

    pub fn context(&self) -> &FleetContext {
        &self.context
    }

    pub fn subjects(&self) -> Subjects {
        Subjects::new(self.context.prefix.clone())
    }

    /// A call client of this fleet, as operator `operator:test`.
    pub async fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::new(
            self.connect().await?,
            self.subjects(),
            "operator:test",
        ))
    }

    /// Calls `function` (`service.method`) with `args` on minion `id`
    /// (5 s to answer) and returns its reply.
    pub async fn call_one(
        &self,
        id: &str,
        function: &str,
        args: serde_json::Value,
    ) -> anyhow::Result<provis_core::client::MinionReply> {
        let request =
            provis_core::CallRequest::parse_function(function, args, Duration::from_secs(5))?;
        let target = provis_core::CallTarget::Minions(vec![id.parse()?]);
        let report = self.client().await?.call(&target, &request).await?;
        report
            .replies
            .into_iter()
            .next()
            .with_context(|| format!("no reply line for {id}"))
    }

    /// Starts a minion in this process and waits until it is live.
    pub async fn add_minion(&mut self, id: &str, roles: &[&str]) -> anyhow::Result<()> {
        let config = self.minion_config(id, roles)?;
        self.add_minion_with(config).await
    }

    /// Starts a minion with these settings (from [`Self::minion_config`],
    /// adjusted) and waits until it is live.
    pub async fn add_minion_with(&mut self, config: MinionConfig) -> anyhow::Result<()> {
        self.add_minion_on_clock(config, provis_core::clock::BusClock::system())
            .await
    }

    /// Like [`Self::add_minion_with`], on a machine whose clock is `clock`
    /// (for one that is wrong: [`provis_core::clock::BusClock::with_local_skew`]).
    pub async fn add_minion_on_clock(
        &mut self,
        config: MinionConfig,
        clock: provis_core::clock::BusClock,
    ) -> anyhow::Result<()> {
        let id = config.id.to_string();
        let id = id.as_str();
        let mut config = config;
        if self.secured && config.enrollment_token.is_none() {
            config.enrollment_token = Some(self.enrollment_token().await?);
        }
        let minion = provis_minion::start_with_clock(config, clock).await?;
        self.minions.insert(id.to_owned(), minion);
        self.wait_live(&[id]).await
    }

    /// Starts a minion that runs only what the master signed (it pins the
    /// master's key, as read from `master.ping`) and waits until it is live.
    pub async fn add_minion_pinning_master(
        &mut self,
        id: &str,
        roles: &[&str],
    ) -> anyhow::Result<()> {
        let ping = self.master().await?.ping().await?;
        let mut config = self.minion_config(id, roles)?;
        config.trusted_bundle_keys = vec![ping.public_key];
        self.add_minion_with(config).await
    }

    /// Starts `count` minions in this process, `sim0000`, `sim0001`, …, with
    /// `roles`, sharing `connections` NATS connections: the same minion code
    /// as a real fleet, many per process, for scale tests and benchmarks.
    /// They heartbeat every `heartbeat_interval`, serve no gRPC and run only
    /// built-in services unless `adjust` says otherwise. Returns once all are
    /// live in the registry.
    pub async fn add_simulated_minions(
        &mut self,
        count: usize,
        roles: &[&str],
        connections: usize,
        heartbeat_interval: Duration,
        adjust: impl Fn(&mut MinionConfig),
    ) -> anyhow::Result<Vec<String>> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(self.connect().await?);
        }
        let mut ids = Vec::with_capacity(count);
        for n in 0..count {
            let id = format!("sim{n:04}");
            let mut config = self.minion_config(&id, roles)?;
            config.grpc_listen = "off".to_owned();
            config.inject_services = false;
            config.heartbeat_interval_ms = u64::try_from(heartbeat_interval.as_millis())?;
            adjust(&mut config);
            let minion =
                provis_minion::start_on(config, clients[n % clients.len()].clone()).await?;
            self.minions.insert(id.clone(), minion);
            ids.push(id);
        }
        self.wait_selectable("sim", count).await?;
        Ok(ids)
    }

    /// Starts `count` minions in this process, `swarm00000`, `swarm00001`,
    /// …, with `roles`: each on its own NATS connection, with its own key,
    /// enrolled with its own one-time token on a secured fleet, so the
    /// secured path is what gets measured. They serve no gRPC and run only
    /// built-in services unless `adjust` says otherwise. Returns once the
    /// master selects them all.
    pub async fn add_swarm(
        &mut self,
        count: usize,
        roles: &[&str],
        adjust: impl Fn(&mut MinionConfig),
    ) -> anyhow::Result<Vec<String>> {
        use futures::StreamExt as _;
        // Connections are admitted one callout at a time by the master: a
        // few dozen at once keeps nats-server's callout waits short.
        const AT_ONCE: usize = 32;
        let master = self.master().await?;
        let mut configs = Vec::with_capacity(count);
        for n in 0..count {
            let id = format!("swarm{n:05}");
            let mut config = self.minion_config(&id, roles)?;
            config.grpc_listen = "off".to_owned();
            config.inject_services = false;
            adjust(&mut config);
            configs.push(config);
        }
        if self.secured {
            let tokens: Vec<anyhow::Result<String>> = futures::stream::iter(&configs)
                .map(|config| {
                    let master = master.clone();
                    async move {
                        Ok(master
                            .enrollment_token(Duration::from_secs(3_600), Some(config.id.clone()))
                            .await?
                            .token)
                    }
                })
                .buffered(AT_ONCE)
                .collect()
                .await;
            for (config, token) in configs.iter_mut().zip(tokens) {
                config.enrollment_token = Some(token?);
            }
        }
        let ids: Vec<String> = configs.iter().map(|c| c.id.to_string()).collect();
        let started: Vec<_> = futures::stream::iter(configs)
            .map(|config| async move {
                let id = config.id.to_string();
                provis_minion::start(config)
                    .await
                    .map(|minion| (id, minion))
            })
            .buffer_unordered(AT_ONCE)
            .collect()
            .await;
        for started in started {
            let (id, minion) = started?;
            self.minions.insert(id, minion);
        }
        self.wait_selectable("swarm", count).await?;
        Ok(ids)
    }

    /// Waits until the master selects at least `count` minions whose id
    /// starts with `prefix`.
    async fn wait_selectable(&self, prefix: &str, count: usize) -> anyhow::Result<()> {
        let client = self.client().await?;
        eventually(
            &format!("{count} {prefix} minions selectable"),
            Duration::from_secs(300),
            || async {
                client
                    .select(
                        &provis_core::CallTarget::All,
                        None,
                        provis_core::selection::Pick::All,
                        None,
                    )
                    .await
                    .is_ok_and(|selection| {
                        selection.uncertain.is_none()
                            && selection
                                .chosen
                                .iter()
                                .filter(|id| id.as_str().starts_with(prefix))
                                .count()
                                >= count
                    })
            },
        )
        .await
    }

    /// The settings a test minion gets.
    pub fn minion_config(&self, id: &str, roles: &[&str]) -> anyhow::Result<MinionConfig> {
        let roles = roles
            .iter()
            .map(|r| r.parse::<RoleName>())
            .collect::<Result<_, _>>()?;
        // A minion connects as its own key (in its data dir), never the operator's.
        let fleet = FleetContext {
            identity: None,
            ..self.context.clone()
        };
        let mut config = MinionConfig::new(id.parse::<MinionId>()?, roles, fleet);
        config.heartbeat_interval_ms = TEST_HEARTBEAT_INTERVAL_MS;
        config.data_dir = Some(self.minion_data_dir(id));
        Ok(config)
    }

    /// Where minion `id` of this fleet keeps its data; the same across restarts.
    pub fn minion_data_dir(&self, id: &str) -> std::path::PathBuf {
        self.workdir.path().join("minions").join(id)
    }

    /// A scratch directory that lives as long as the fleet.
    pub fn workdir(&self) -> &Path {
        self.workdir.path()
    }

    /// Stops every in-process minion, then the master, each cleanly: what
    /// a process that goes on after this fleet (a benchmark of several
    /// sizes) needs, since a minion whose handle is dropped runs on.
    pub async fn shut_down(mut self) {
        let minions = std::mem::take(&mut self.minions);
        for minion in minions.values() {
            minion.request_stop();
        }
        futures::future::join_all(minions.into_values().map(|minion| minion.wait())).await;
        self.stop_master().await;
    }

    /// What the in-process master knows of the fleet (its view, to read or
    /// to fill with simulated minions).
    pub fn master_feed(&self) -> Option<provis_master::FleetFeed> {
        self.master.as_ref().map(|master| master.control().feed())
    }

    /// Serves the in-process master's dashboard on a free loopback port
    /// until the test ends; its address.
    pub async fn serve_dashboard(&self) -> anyhow::Result<std::net::SocketAddr> {
        let master = self
            .master
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no in-process master"))?;
        let dashboard = provis_dashboard::Dashboard::bind(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            master.control().feed(),
        )
        .await?;
        let addr = dashboard.addr();
        tokio::spawn(dashboard.serve(tokio_util::sync::CancellationToken::new()));
        Ok(addr)
    }

    /// Stops the master cleanly (minions keep running and serving calls).
    pub async fn stop_master(&mut self) {
        if let Some(master) = self.master.take() {
            master.stop().await;
        }
    }

    /// Starts one more master in this process, `name` (its id and data
    /// directory), with the fleet's settings and key.
    pub async fn start_another_master(&self, name: &str) -> anyhow::Result<MasterHandle> {
        let mut config = self.master_config.clone();
        config.signing_key = Some(self.master_config.key_path());
        config.data_dir = Some(self.workdir.path().join(name));
        config.master_id = Some(name.to_owned());
        Ok(provis_master::start(config).await?)
    }

    /// Stops the master and starts it again with the same settings.
    pub async fn restart_master(&mut self) -> anyhow::Result<()> {
        self.stop_master().await;
        self.master = Some(provis_master::start(self.master_config.clone()).await?);
        Ok(())
    }

    /// Replaces the in-process master with a `provis master` process of
    /// this fleet (same data directory, so the same key) with `extra`
    /// arguments, and waits until it serves.
    pub async fn spawn_master_process(
        &mut self,
        provis_bin: &Path,
        extra: &[&std::ffi::OsStr],
    ) -> anyhow::Result<ProvisProcess> {
        self.stop_master().await;
        self.spawn_another_master(provis_bin, "master", extra).await
    }

    /// Starts one more `provis master` process, `name` (its id, and its
    /// data directory in the fleet's scratch space), with the fleet's
    /// master key (minions pin one key for every master), and waits until
    /// it serves. The in-process master, if any, keeps running.
    pub async fn spawn_another_master(
        &mut self,
        provis_bin: &Path,
        name: &str,
        extra: &[&std::ffi::OsStr],
    ) -> anyhow::Result<ProvisProcess> {
        let mut command = self.provis_command(provis_bin);
        command
            .arg("master")
            .arg("--data-dir")
            .arg(self.workdir.path().join(name))
            .arg("--signing-key")
            .arg(self.master_config.key_path())
            .arg("--master-id")
            .arg(name)
            .args(extra);
        if !self.master_config.operators.is_empty() {
            command
                .arg("--operators")
                .arg(self.master_config.operators.join(","));
        }
        let log = self.workdir.path().join(format!("{name}.log"));
        let master = ProvisProcess::spawn(name, command, &log)?;
        eventually(
            "the master process serves",
            Duration::from_secs(15),
            || async { master.log().contains("master serving") },
        )
        .await
        .map_err(|err| err.context(master.log()))?;
        Ok(master)
    }

    /// True when the master applied `commit` and at least `minions`
    /// registered minions, every one of them, converged on it.
    pub async fn converged_on(&self, commit: &str, minions: usize) -> bool {
        let Ok(master) = self.master().await else {
            return false;
        };
        let Ok(status) = master.status().await else {
            return false;
        };
        status
            .applied
            .is_some_and(|applied| applied.commit == commit)
            && status.minions.len() >= minions.max(1)
            && status.minions.iter().all(|m| m.converged)
    }

    /// The commit the master applied, if it answers and applied one.
    pub async fn applied_commit(&self) -> Option<String> {
        let status = self.master().await.ok()?.status().await.ok()?;
        status.applied.map(|applied| applied.commit)
    }

    /// Publishes state samples as minion `minion` would, with their own
    /// timestamps, through JetStream (each acknowledged by the stream).
    pub async fn publish_samples(
        &self,
        minion: &str,
        samples: &[(i64, serde_json::Value)],
    ) -> anyhow::Result<()> {
        let js = async_nats::jetstream::new(self.connect().await?);
        let subject = format!("{}.state.{minion}", self.context.prefix);
        let mut acks = std::collections::VecDeque::new();
        for (at, state) in samples {
            // async-nats holds at most 5,000 unacknowledged publishes.
            if acks.len() >= 4_000
                && let Some(ack) = acks.pop_front()
            {
                ack.await?;
            }
            let payload = serde_json::json!({ "minion": minion, "at_unix_ms": at, "state": state });
            acks.push_back(
                js.publish(subject.clone(), serde_json::to_vec(&payload)?.into())
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
        }
        Ok(())
    }

    /// A client of this fleet's master, as its operator.
    pub async fn master(&self) -> anyhow::Result<MasterClient> {
        Ok(MasterClient::new(self.connect().await?, self.subjects()))
    }

    /// Waits until the master no longer counts minion `id` live.
    pub async fn wait_until_away(&self, id: &str) -> anyhow::Result<()> {
        eventually(
            &format!("{id} is away"),
            Duration::from_secs(20),
            || async {
                let Ok(master) = self.master().await else {
                    return false;
                };
                master.status().await.is_ok_and(|status| {
                    status
                        .minions
                        .iter()
                        .any(|m| m.minion.as_str() == id && !m.live)
                })
            },
        )
        .await
    }

    /// Stops an in-process minion cleanly.
    pub async fn stop_minion(&mut self, id: &str) {
        if let Some(minion) = self.minions.remove(id) {
            minion.stop().await;
        }
    }

    /// A `provis` command (the binary under test) pointed at this fleet, with
    /// a context file of its own so the user's is never read or written.
    pub fn provis_command(&self, provis_bin: &Path) -> Command {
        let mut command = Command::new(provis_bin);
        command
            .env("PROVIS_NATS_URL", &self.context.nats_url)
            .env("PROVIS_PREFIX", self.context.prefix.as_str())
            .env("PROVIS_CONTEXT", self.workdir.path().join("context.toml"))
            .env_remove("PROVIS_LOG");
        command
    }

    /// The `config.applied` events of the last ten minutes that name
    /// `commit`, as `provis events --output json` prints them: how a test
    /// counts applies the way an operator would.
    pub fn applied_events(
        &self,
        provis_bin: &Path,
        commit: &str,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        let (code, stdout, stderr) = crate::run_to_end(self.provis_command(provis_bin).args([
            "events",
            "--type",
            "config.applied",
            "--since",
            "10m",
            "--output",
            "json",
        ]))?;
        anyhow::ensure!(code == 0, "provis events exited {code}: {stderr}");
        Ok(stdout
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["data"]["commit"] == commit)
            .collect())
    }

    /// Starts `provis minion` as a process and waits until it is live.
    pub async fn add_minion_process(
        &mut self,
        provis_bin: &Path,
        id: &str,
        roles: &[&str],
    ) -> anyhow::Result<()> {
        self.add_minion_process_with(provis_bin, id, roles, &[])
            .await
    }

    /// Starts `provis minion` with `extra` arguments as a process and waits until it is live.
    pub async fn add_minion_process_with(
        &mut self,
        provis_bin: &Path,
        id: &str,
        roles: &[&str],
        extra: &[&std::ffi::OsStr],
    ) -> anyhow::Result<()> {
        let mut extra = extra.to_vec();
        let token = match self.secured {
            true => Some(self.enrollment_token().await?),
            false => None,
        };
        if let Some(token) = &token {
            extra.push(std::ffi::OsStr::new("--enrollment-token"));
            extra.push(std::ffi::OsStr::new(token.as_str()));
        }
        self.spawn_minion_process(provis_bin, id, roles, &extra)?;
        self.wait_live(&[id]).await
    }

    /// Starts `provis minion` (or `provis-minion`) as a process and returns
    /// at once: on a secured
    /// fleet without a token it waits for enrollment.
    pub fn spawn_minion_process(
        &mut self,
        provis_bin: &Path,
        id: &str,
        roles: &[&str],
        extra: &[&std::ffi::OsStr],
    ) -> anyhow::Result<()> {
        let mut command = self.provis_command(provis_bin);
        // `provis-minion` is the minion alone; `provis` needs the subcommand.
        if provis_bin.file_stem() != Some(std::ffi::OsStr::new("provis-minion")) {
            command.arg("minion");
        }
        command
            .args(["--id", id, "--heartbeat-interval-ms"])
            .arg(TEST_HEARTBEAT_INTERVAL_MS.to_string())
            .arg("--data-dir")
            .arg(self.minion_data_dir(id));
        if !roles.is_empty() {
            command.args(["--roles", &roles.join(",")]);
        }
        command.args(extra);
        let log = self.workdir.path().join(format!("{id}.log"));
        let process = ProvisProcess::spawn(id, command, &log)?;
        self.processes.insert(id.to_owned(), process);
        Ok(())
    }

    /// The `provis` process started under this id.
    pub fn process_mut(&mut self, id: &str) -> Option<&mut ProvisProcess> {
        self.processes.get_mut(id)
    }

    /// Validates and applies a config repository directory, as `provis apply` does.
    pub async fn apply(
        &self,
        repository: &Path,
    ) -> anyhow::Result<provis_master::apply::ApplySummary> {
        self.apply_signed(repository, None).await
    }

    /// Like [`Self::apply`], the bundles signed by `signer`.
    pub async fn apply_signed(
        &self,
        repository: &Path,
        signer: Option<&provis_core::identity::Identity>,
    ) -> anyhow::Result<provis_master::apply::ApplySummary> {
        let repository = provis_master::repository::ConfigRepository::load(repository)?;
        let js = async_nats::jetstream::new(self.connect().await?);
        Ok(provis_master::apply::apply(&js, &repository, signer, 0).await?)
    }

    /// The fleet's bundle store, to publish services directly (also ones
    /// `provis service publish` would refuse, to test what minions do then).
    pub async fn bundle_store(&self) -> anyhow::Result<provis_bundle::BundleStore> {
        let js = async_nats::jetstream::new(self.connect().await?);
        Ok(provis_bundle::BundleStore::open(&js).await?)
    }

    /// Waits until `minion` runs `service` at `digest` (by asking `sys.services`).
    pub async fn wait_service(
        &self,
        minion: &str,
        service: &str,
        digest: &str,
    ) -> anyhow::Result<()> {
        let client = self.client().await?;
        let expected = BTreeMap::from([(
            minion.parse::<MinionId>()?,
            BTreeMap::from([(service.to_owned(), Some(digest.to_owned()))]),
        )]);
        eventually(
            &format!("{minion} runs {service} at {digest}"),
            Duration::from_secs(20),
            || readiness::services_run(&client, &expected),
        )
        .await
    }

    /// Waits until every minion named is live in the registry.
    pub async fn wait_live(&self, ids: &[&str]) -> anyhow::Result<()> {
        let client = self.client().await?;
        let store = client.registry().await?;
        let ids = ids
            .iter()
            .map(|id| id.parse::<MinionId>())
            .collect::<Result<Vec<_>, _>>()?;
        eventually(
            &format!("minions {ids:?} live in the registry"),
            Duration::from_secs(15),
            || async { readiness::minions_live(&store, &ids).await.unwrap_or(false) },
        )
        .await
        .map_err(|err| {
            let logs: Vec<String> = self
                .processes
                .values()
                .map(|p| format!("---- {} ----\n{}", p.name(), p.log()))
                .collect();
            err.context(logs.join("\n"))
        })
    }
}
