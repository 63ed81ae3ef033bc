//! `provis up`: a whole fleet on this machine. Starts nats-server (unless one
//! already answers), a master and N minions as `provis` processes with roles
//! from the config repository, writes the context file so `provis call` in
//! another shell finds the fleet, and stops everything on Ctrl-C or SIGTERM.
//!
//! Secured by default: the nats-server it starts uses TLS (a certificate
//! generated for this machine) and admits connections only through the
//! master's auth callout. `up` creates the master's key and an operator key
//! (the context file's identity, so `provis` commands act as that
//! operator and sign their calls with it), enrolls its minions with
//! one-time tokens, and the minions run only bundles the master's key signed
//! and calls the operator's or the master's key signed. `--insecure` turns all of it off and
//! says so.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Args;
use std::collections::BTreeMap;

use provis_core::master_api::MasterClient;
use provis_core::nats_server::locate_nats_server;
use provis_core::{FleetContext, MinionId, readiness, registry};

use provis_master::repository::ConfigRepository;

use crate::UsageError;

use crate::fleet_args::FleetArgs;
use crate::serve::shutdown_signal;

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Number of minions to start (ids m1, m2, …)
    #[arg(long, env = "PROVIS_MINIONS", default_value_t = 3)]
    minions: u16,
    /// The config the master follows: a git repository, or a folder that is
    /// copied into a git repository in the data dir on the first run
    /// [default: ./examples]
    #[arg(long, env = "PROVIS_REPOSITORY")]
    repository: Option<PathBuf>,
    /// Where nats-server's store, the minions' data and every process's log go
    #[arg(long, env = "PROVIS_UP_DIR", default_value = ".provis/up")]
    dir: PathBuf,
    /// Start the fleet, print what runs, then stop it (for scripts and tests)
    #[arg(long)]
    no_wait: bool,
    /// Run nats-server without TLS and without per-identity admission (it
    /// says so at start); the default is TLS with a certificate generated for
    /// this machine, and every connection admitted by the master
    #[arg(long)]
    insecure: bool,
    /// Run this many nats-servers as one cluster (routes, JetStream on
    /// each, every store kept on 3 of them), minions spread over them
    #[arg(long, env = "PROVIS_CLUSTER", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
    cluster: u16,
}

/// How long each part may take to come up before `up` gives in.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a master or minion `up` started may drain when it stops (its
/// `--drain-timeout-s`); `up` waits that long and a little more before it
/// kills one.
const DRAIN_TIMEOUT_S: &str = "10";
/// How often the master `up` starts fetches the repository it follows:
/// a commit there reaches the demo fleet within seconds.
const POLL_INTERVAL_S: &str = "2";
const STOP_GRACE: Duration = Duration::from_secs(15);

pub async fn run(fleet_args: &FleetArgs, args: UpArgs) -> anyhow::Result<ExitCode> {
    let mut fleet = FleetContext::default();
    fleet_args.apply(&mut fleet);
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let data_dir = args.dir.canonicalize()?;
    let folder = find_repository(args.repository.as_deref())?;
    let repository = followed_repository(&folder, &data_dir)?;
    // Validate before starting anything: a broken repository is a clear error, not a half fleet.
    let desired = ConfigRepository::load(&repository)
        .map_err(|invalid| UsageError(format!("{}: {invalid}", repository.display())))?;

    let mut up = LocalFleet {
        fleet,
        args: &args,
        data_dir,
        desired: &desired,
        repository: &repository,
        processes: Vec::new(),
        secured: None,
        master: None,
        minions: Vec::new(),
        nodes: Vec::new(),
        notes: Vec::new(),
    };
    if let Err(err) = up.bring_up().await {
        stop_all(&mut up.processes).await;
        return Err(err);
    }
    let LocalFleet {
        fleet,
        mut processes,
        notes,
        ..
    } = up;
    let context_path = fleet_args.context_path();
    fleet.save(&context_path)?;
    // A closed stdout ends the printing, not the fleet's orderly stop.
    let printed = print_fleet(
        &processes,
        &fleet,
        &repository,
        &context_path,
        &notes,
        args.no_wait,
    );
    if printed.is_ok() && !args.no_wait {
        tokio::select! {
            () = shutdown_signal() => eprintln!("stopping the fleet"),
            () = watch_exits(&mut processes) => eprintln!("provis: no nats-server runs any more; stopping the fleet"),
        }
    }
    stop_all(&mut processes).await;
    if FleetContext::load(&context_path).ok().flatten().as_ref() == Some(&fleet) {
        let _ = std::fs::remove_file(&context_path);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_fleet(
    processes: &[FleetProcess],
    fleet: &FleetContext,
    repository: &Path,
    context_path: &Path,
    notes: &[String],
    no_wait: bool,
) -> Result<(), crate::output::OutputError> {
    outln!();
    outln!(
        "{:12}  {:6}  {:34}  LOG",
        "PROCESS",
        "PID",
        "ROLE / ADDRESS"
    );
    for process in processes {
        outln!(
            "{:12}  {:6}  {:34}  {}",
            process.name,
            process
                .child
                .id()
                .map_or_else(|| "-".to_owned(), |pid| pid.to_string()),
            process.detail,
            process.log.display()
        );
    }
    outln!();
    outln!(
        "fleet is up: NATS {} (prefix {}), config followed from git in {}",
        fleet.nats_url,
        fleet.prefix,
        repository.display()
    );
    outln!("  commit there and the fleet follows within seconds (provis status shows it)");
    for note in notes {
        outln!("{note}");
    }
    outln!(
        "context written to {}; from another shell try:",
        context_path.display()
    );
    outln!("  provis call --subject role.web sys.ping");
    outln!("  provis call --all sys.facts");
    if no_wait {
        outln!("stopping (--no-wait)");
    } else {
        outln!("press Ctrl-C to stop the fleet");
    }
    Ok(())
}

/// A fleet on this machine as `up` brings it up, phase by phase.
struct LocalFleet<'a> {
    fleet: FleetContext,
    args: &'a UpArgs,
    data_dir: PathBuf,
    desired: &'a ConfigRepository,
    /// The git repository the master follows.
    repository: &'a Path,
    processes: Vec<FleetProcess>,
    /// The keys, when the fleet is secured (the default).
    secured: Option<FleetKeys>,
    /// A connection as the operator, and the master it talks to.
    master: Option<(async_nats::Client, MasterClient)>,
    minions: Vec<MinionId>,
    /// The client URL of each nats-server `up` started (minions are spread
    /// over them); empty when it uses one already running.
    nodes: Vec<String>,
    /// Lines printed once the fleet is up (where metrics are, how other
    /// tools connect).
    notes: Vec<String>,
}

impl LocalFleet<'_> {
    async fn bring_up(&mut self) -> anyhow::Result<()> {
        self.start_bus().await?;
        self.start_master().await?;
        self.apply().await?;
        self.start_minions().await?;
        self.wait_until_live().await?;
        self.wait_until_services_run().await
    }

    /// nats-server: the one already answering, or one started here (TLS and
    /// the master's admission unless --insecure).
    async fn start_bus(&mut self) -> anyhow::Result<()> {
        let fleet = &mut self.fleet;
        let plain = FleetContext {
            tls_ca: None,
            ..fleet.clone()
        };
        if provis_core::client::connect_nats(fleet, "provis-up")
            .await
            .is_ok()
        {
            outln!("using the nats-server already at {}", fleet.nats_url);
            return Ok(());
        }
        if fleet.tls_ca.is_none()
            && provis_core::client::connect_nats(&plain, "provis-up")
                .await
                .is_ok()
        {
            outln!(
                "using the nats-server already at {} (it does not use TLS)",
                fleet.nats_url
            );
            return Ok(());
        }
        let tls = if self.args.insecure {
            eprintln!(
                "INSECURE: nats-server runs without TLS and admits anyone (--insecure); anyone on this machine can read and write the fleet's traffic"
            );
            None
        } else {
            let tls = generate_tls(&self.data_dir)?;
            fleet.tls_ca = Some(tls.0.clone());
            let keys = FleetKeys::load_or_create(&self.data_dir)?;
            fleet.identity = Some(keys.operator_path.clone());
            self.secured = Some(keys);
            Some(tls)
        };
        let auth = self.secured.as_ref().map(|keys| &keys.master);
        let (host, first_port) = loopback_host_port(&fleet.nats_url)?;
        let nodes = cluster_nodes(first_port, self.args.cluster)?;
        for index in 0..nodes.len() {
            self.processes.push(start_nats_server(
                &host,
                &nodes,
                index,
                &self.data_dir,
                tls.as_ref(),
                auth,
            )?);
        }
        // Nothing is admitted before the master answers the callout: wait
        // for the ports, not for a connection.
        for node in &nodes {
            let port = node.client_port;
            let host = host.clone();
            wait_for(
                &format!("nats-server {}", node.name),
                &mut self.processes,
                || {
                    let host = host.clone();
                    async move {
                        tokio::net::TcpStream::connect((host.as_str(), port))
                            .await
                            .is_ok()
                    }
                },
            )
            .await?;
        }
        fleet.nats_url = nodes
            .iter()
            .map(|node| format!("nats://{host}:{}", node.client_port))
            .collect::<Vec<_>>()
            .join(",");
        self.nodes = nodes
            .iter()
            .map(|node| format!("nats://{host}:{}", node.client_port))
            .collect();
        let how = if tls.is_some() {
            "with TLS"
        } else {
            "WITHOUT TLS"
        };
        if nodes.len() > 1 {
            outln!(
                "started a cluster of {} nats-servers at {} {how}",
                nodes.len(),
                fleet.nats_url
            );
        } else {
            outln!("started nats-server at {} {how}", fleet.nats_url);
        }
        Ok(())
    }

    /// `provis master`, and a connection as the operator once it answers.
    async fn start_master(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find the provis executable")?;
        let master_dir = self.data_dir.join("master");
        let master_dir = master_dir.to_str().context("data dir is not UTF-8")?;
        let mut master_args = vec![
            "master",
            "--data-dir",
            master_dir,
            "--drain-timeout-s",
            DRAIN_TIMEOUT_S,
        ];
        let (master_key, operator_key, observer_key) = match &self.secured {
            Some(keys) => (
                keys.master_path.display().to_string(),
                keys.operator.public_key().to_owned(),
                keys.observer.public_key().to_owned(),
            ),
            None => Default::default(),
        };
        if self.secured.is_some() {
            master_args.extend([
                "--signing-key",
                master_key.as_str(),
                "--operators",
                operator_key.as_str(),
                "--observers",
                observer_key.as_str(),
            ]);
        }
        let metrics = free_loopback_addr()?;
        let metrics_addr = metrics.to_string();
        master_args.extend(["--metrics-addr", metrics_addr.as_str()]);
        let dashboard_addr = free_loopback_addr()?.to_string();
        master_args.extend(["--http-addr", dashboard_addr.as_str()]);
        self.notes.push(format!(
            "metrics: http://{metrics}/metrics (and /healthz, /readyz)"
        ));
        if let Some(keys) = &self.secured {
            let public = keys.observer.nkey_public();
            self.notes.push(format!(
                "other tools (read-only, see docs/integrations.md): nkey seed {}, inbox prefix {}, CA {}",
                keys.observer_seed.display(),
                provis_core::bus_access::inbox_prefix(&public),
                self.data_dir.join("tls").join("nats.pem").display(),
            ));
        }
        // On a cluster every store keeps three copies (or one per node).
        let replicas = self.nodes.len().clamp(1, 3).to_string();
        master_args.extend(["--replicas", replicas.as_str()]);
        let repository = self
            .repository
            .to_str()
            .context("the config repository's path is not UTF-8")?;
        master_args.extend([
            "--repository",
            repository,
            "--poll-interval-s",
            POLL_INTERVAL_S,
        ]);
        self.processes.push(FleetProcess::spawn(
            Launch::new(&exe, &master_args),
            Stage::Master,
            "master",
            &self.fleet,
            &self.data_dir,
            "master".to_owned(),
        )?);
        let subjects = provis_core::Subjects::new(self.fleet.prefix.clone());
        // On a secured fleet even this connection waits for the master to admit it.
        let connection = tokio::sync::Mutex::new(None);
        let fleet = &self.fleet;
        wait_for("the master", &mut self.processes, || async {
            let mut slot = connection.lock().await;
            if slot.is_none() {
                *slot = provis_core::client::connect_nats(fleet, "provis-up")
                    .await
                    .ok();
            }
            let Some(nats) = slot.clone() else {
                return false;
            };
            drop(slot);
            let master = MasterClient::new(nats, subjects.clone());
            master
                .request_within::<provis_core::master_api::Ping>(
                    &Default::default(),
                    Duration::from_secs(1),
                )
                .await
                .is_ok()
        })
        .await?;
        let nats = connection.into_inner().context("no connection to NATS")?;
        outln!("started the master");
        let master = MasterClient::new(nats.clone(), subjects);
        // A login that works once, for whoever runs `up` (the token is as
        // secret as the terminal it is printed on).
        match master
            .dashboard_token(
                Duration::from_secs(provis_core::master_api::MAX_DASHBOARD_TOKEN_TTL_S),
                Some("provis up".to_owned()),
            )
            .await
        {
            Ok(answer) => {
                if let Some(url) = answer.url {
                    self.notes.insert(
                        0,
                        format!(
                            "dashboard: {url} (logs in once; more with `provis dashboard token`)"
                        ),
                    );
                }
            }
            Err(err) => {
                tracing::warn!(error = %provis_core::error_chain(&err), "no dashboard login")
            }
        }
        self.master = Some((nats, master));
        Ok(())
    }

    /// Has the master apply the head of the repository it follows.
    async fn apply(&mut self) -> anyhow::Result<()> {
        let (_, master) = self.master.as_ref().context("no master")?;
        let answer = master
            .sync()
            .await
            .context("the master did not apply the config repository")?;
        if !answer.problems.is_empty() {
            let problems: Vec<String> = answer
                .problems
                .iter()
                .map(|p| format!("{}: {}", p.file, p.reason))
                .collect();
            anyhow::bail!(
                "commit {} of {} is invalid:\n  {}",
                answer.commit,
                self.repository.display(),
                problems.join("\n  ")
            );
        }
        outln!(
            "applied commit {} ({} services: {}; {} roles)",
            answer.commit.get(..12).unwrap_or(&answer.commit),
            self.desired.services.len(),
            self.desired
                .services
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            self.desired.roles.len()
        );
        Ok(())
    }

    /// `provis minion` m1…mN with the roles the repository assigns them;
    /// secured, each enrolled at once by a one-time token, running only
    /// bundles the master signed and calls the operator or master signed.
    async fn start_minions(&mut self) -> anyhow::Result<()> {
        let provis = std::env::current_exe().context("cannot find the provis executable")?;
        let (exe, subcommand) = minion_executable(&provis);
        let (_, master) = self.master.clone().context("no master")?;
        for n in 1..=self.args.minions {
            let id: MinionId = format!("m{n}").parse()?;
            let roles: Vec<String> = self
                .desired
                .assignments
                .glob_roles(id.as_str())
                .iter()
                .map(ToString::to_string)
                .collect();
            let roles = roles.join(",");
            let detail = if roles.is_empty() {
                "(no role)".to_owned()
            } else {
                roles.clone()
            };
            let minion_dir = self.data_dir.join(id.as_str());
            let minion_dir = minion_dir.to_str().context("data dir is not UTF-8")?;
            let mut minion_args: Vec<&str> = subcommand.into_iter().collect();
            minion_args.extend([
                "--id",
                id.as_str(),
                "--data-dir",
                minion_dir,
                "--drain-timeout-s",
                DRAIN_TIMEOUT_S,
            ]);
            if !roles.is_empty() {
                minion_args.extend(["--roles", roles.as_str()]);
            }
            let token = match &self.secured {
                Some(_) => {
                    master
                        .enrollment_token(Duration::from_secs(600), Some(id.clone()))
                        .await
                        .context("the master did not issue an enrollment token")?
                        .token
                }
                None => String::new(),
            };
            let (master_public, callers) = self
                .secured
                .as_ref()
                .map(|keys| {
                    let master = keys.master.public_key().to_owned();
                    let callers = format!("{},{master}", keys.operator.public_key());
                    (master, callers)
                })
                .unwrap_or_default();
            if self.secured.is_some() {
                minion_args.extend([
                    "--trusted-bundle-keys",
                    master_public.as_str(),
                    "--trusted-callers",
                    callers.as_str(),
                ]);
            }
            let secrets: &[(&str, &str)] = match &self.secured {
                Some(_) => &[("PROVIS_ENROLLMENT_TOKEN", token.as_str())],
                None => &[],
            };
            // On a cluster, minion n connects to node n (and learns the
            // others from it, to fail over to).
            let fleet = match self.nodes.get(usize::from(n - 1) % self.nodes.len().max(1)) {
                Some(node) if self.nodes.len() > 1 => FleetContext {
                    nats_url: node.clone(),
                    ..self.fleet.clone()
                },
                _ => self.fleet.clone(),
            };
            let detail = if self.nodes.len() > 1 {
                format!("{detail} @ {}", fleet.nats_url)
            } else {
                detail
            };
            self.processes.push(FleetProcess::spawn(
                Launch {
                    secrets,
                    ..Launch::new(&exe, &minion_args)
                },
                Stage::Minion,
                id.as_str(),
                &fleet,
                &self.data_dir,
                detail,
            )?);
            self.minions.push(id);
        }
        Ok(())
    }

    /// Until every minion is live in the registry.
    async fn wait_until_live(&mut self) -> anyhow::Result<()> {
        let (nats, _) = self.master.as_ref().context("no master")?;
        let store = registry::open_registry(&async_nats::jetstream::new(nats.clone())).await?;
        let ids = &self.minions;
        wait_for("the minions", &mut self.processes, || async {
            readiness::minions_live(&store, ids).await.unwrap_or(false)
        })
        .await?;
        outln!("started {} minions", ids.len());
        Ok(())
    }

    /// Until every minion runs every service its roles name.
    async fn wait_until_services_run(&mut self) -> anyhow::Result<()> {
        let (nats, master) = self.master.clone().context("no master")?;
        let specs = self
            .desired
            .roles
            .iter()
            .map(|(role, spec)| (role.to_string(), spec.clone()))
            .collect();
        let expected: BTreeMap<MinionId, readiness::ExpectedServices> = self
            .minions
            .iter()
            .map(|id| {
                let roles = self.desired.assignments.glob_roles(id.as_str());
                let services = provis_core::roles::services_for(&roles, &specs)
                    .into_keys()
                    .map(|name| (name, None))
                    .collect();
                (id.clone(), services)
            })
            .collect();
        let mut client = provis_core::Client::new(nats, master.subjects().clone(), "provis-up");
        if let Some(keys) = &self.secured {
            client =
                client.with_signer(provis_core::identity::Identity::load(&keys.operator_path)?);
        }
        wait_for(
            "the minions to load their services",
            &mut self.processes,
            || readiness::services_run(&client, &expected),
        )
        .await?;
        outln!("every minion runs the services of its roles");
        Ok(())
    }
}

/// The keys of a secured local fleet, kept in the data dir across runs.
struct FleetKeys {
    master: provis_core::identity::Identity,
    master_path: PathBuf,
    operator: provis_core::identity::Identity,
    operator_path: PathBuf,
    /// A read-only identity for other tools, and its nkey seed file.
    observer: provis_core::identity::Identity,
    observer_seed: PathBuf,
}

impl FleetKeys {
    fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        use provis_core::identity::Identity;
        let master_path = data_dir.join("master").join("master.key");
        let operator_path = data_dir.join("operator.key");
        let observer = Identity::load_or_create(&data_dir.join("observer.key"))?;
        let observer_seed = data_dir.join("observer.nk");
        crate::keys::write_secret(&observer_seed, observer.nkey_seed())?;
        Ok(Self {
            master: Identity::load_or_create(&master_path)?,
            master_path,
            operator: Identity::load_or_create(&operator_path)?,
            operator_path,
            observer,
            observer_seed,
        })
    }
}

/// A free port on loopback for the master's metrics.
fn free_loopback_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// What minions run as: `provis-minion` when it sits beside `provis` and is
/// of the same version (the lighter executable a machine that only runs a
/// minion installs; one left over from another build is not used), else
/// `provis minion`.
fn minion_executable(provis: &Path) -> (PathBuf, Option<&'static str>) {
    let beside = provis.with_file_name(format!("provis-minion{}", std::env::consts::EXE_SUFFIX));
    let same_version = std::process::Command::new(&beside)
        .arg("--version")
        .output()
        .is_ok_and(|output| {
            String::from_utf8_lossy(&output.stdout).trim()
                == format!("provis-minion {}", env!("CARGO_PKG_VERSION"))
        });
    if same_version {
        (beside, None)
    } else {
        (provis.to_owned(), Some("minion"))
    }
}

/// The config repository: the one given, else `examples/` here or next to
/// the project the executable was built in.
fn find_repository(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let here = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    [here, exe]
        .into_iter()
        .flatten()
        .flat_map(|start| start.ancestors().map(|dir| dir.join("examples")).collect::<Vec<_>>())
        .find(|dir| dir.join(provis_master::assignments::ASSIGNMENTS_FILE).is_file())
        .context("no config repository found: give one with --repository DIR (it needs an assignments.toml)")
}

/// The git repository the master follows: `folder` itself when it is one,
/// else a repository in the data dir made from it on the first run (and
/// kept, with whatever was committed to it since, on the next).
fn followed_repository(folder: &Path, data_dir: &Path) -> anyhow::Result<PathBuf> {
    if folder.join(".git").exists() {
        return Ok(folder.canonicalize()?);
    }
    let repository = data_dir.join("config");
    if repository.join(".git").exists() {
        outln!(
            "following {} (made from {} on an earlier run)",
            repository.display(),
            folder.display()
        );
        return Ok(repository);
    }
    ConfigRepository::load(folder)
        .map_err(|invalid| UsageError(format!("{}: {invalid}", folder.display())))?;
    let message = format!("The config from {}", folder.display());
    let commit = provis_master::git_source::seed_repository(folder, &repository, &message)
        .with_context(|| format!("cannot make a git repository from {}", folder.display()))?;
    outln!(
        "made git repository {} from {} (commit {})",
        repository.display(),
        folder.display(),
        commit.get(..12).unwrap_or(&commit)
    );
    Ok(repository)
}

/// The order in which the parts of a fleet stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Minion,
    Master,
    NatsServer,
}

/// One child process of the fleet, killed if `up` itself goes away.
struct FleetProcess {
    name: String,
    stage: Stage,
    detail: String,
    log: PathBuf,
    child: tokio::process::Child,
}

/// What to run: a program, its arguments and its secrets (which go in the
/// environment, not the arguments others can list).
struct Launch<'a> {
    program: &'a Path,
    args: &'a [&'a str],
    secrets: &'a [(&'a str, &'a str)],
}

impl<'a> Launch<'a> {
    fn new(program: &'a Path, args: &'a [&'a str]) -> Self {
        Self {
            program,
            args,
            secrets: &[],
        }
    }
}

impl FleetProcess {
    fn spawn(
        launch: Launch<'_>,
        stage: Stage,
        name: &str,
        fleet: &FleetContext,
        data_dir: &Path,
        detail: String,
    ) -> anyhow::Result<Self> {
        let Launch {
            program,
            args,
            secrets,
        } = launch;
        let log = data_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = tokio::process::Command::new(program)
            .args(args)
            // Each part connects as its own key, never as this shell's.
            .env_remove("PROVIS_IDENTITY")
            .env_remove("PROVIS_ENROLLMENT_TOKEN")
            .envs(secrets.iter().copied())
            .env("PROVIS_NATS_URL", &fleet.nats_url)
            .env("PROVIS_PREFIX", fleet.prefix.as_str())
            .envs(
                fleet
                    .tls_ca
                    .as_ref()
                    .map(|ca| ("PROVIS_TLS_CA", ca.as_os_str())),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            stage,
            detail,
            log,
            child,
        })
    }
}

/// A certificate for this machine's nats-server (localhost, 127.0.0.1) and
/// its key, written under the data dir; clients trust the certificate itself.
fn generate_tls(data_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = data_dir.join("tls");
    std::fs::create_dir_all(&dir)?;
    let issued =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .context("cannot generate a TLS certificate")?;
    let (cert, key) = (dir.join("nats.pem"), dir.join("nats.key"));
    std::fs::write(&cert, issued.cert.pem())?;
    let _ = std::fs::remove_file(&key);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)?;
    std::io::Write::write_all(&mut file, issued.signing_key.serialize_pem().as_bytes())?;
    Ok((cert, key))
}

/// The nodes `up` runs: the first on `first_port`, the others on free ports.
fn cluster_nodes(
    first_port: u16,
    size: u16,
) -> anyhow::Result<Vec<provis_core::nats_server::ClusterNode>> {
    let free = || -> anyhow::Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    (0..size.max(1))
        .map(|index| {
            Ok(provis_core::nats_server::ClusterNode {
                name: format!("nats-{}", index + 1),
                client_port: if index == 0 { first_port } else { free()? },
                route_port: free()?,
            })
        })
        .collect()
}

/// Starts node `index` of `nodes` (a lone server when there is one): its
/// configuration written to `<data dir>/<name>.conf`, its store in
/// `<data dir>/jetstream/<name>`.
fn start_nats_server(
    host: &str,
    nodes: &[provis_core::nats_server::ClusterNode],
    index: usize,
    data_dir: &Path,
    tls: Option<&(PathBuf, PathBuf)>,
    master: Option<&provis_core::identity::Identity>,
) -> anyhow::Result<FleetProcess> {
    let node = nodes.get(index).context("no such node")?;
    let binary = locate_nats_server()?;
    let store = data_dir.join("jetstream").join(&node.name);
    let mut config = if nodes.len() > 1 {
        provis_core::nats_server::cluster_node_config("provis-up", nodes, index)
    } else {
        format!(
            "server_name: {}\nlisten: {host}:{}\n",
            node.name, node.client_port
        )
    };
    config.push_str(&format!(
        "jetstream {{\n  store_dir: {:?}\n}}\n",
        store.to_str().context("data dir is not UTF-8")?
    ));
    if let Some((cert, key)) = tls {
        config.push_str(&format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}\n",
            cert.to_str().context("data dir is not UTF-8")?,
            key.to_str().context("data dir is not UTF-8")?
        ));
    }
    if let Some(master) = master {
        // Every connection is admitted by that master's auth callout.
        config.push_str(&provis_core::bus_access::server_auth_config(master));
    }
    let path = data_dir.join(format!("{}.conf", node.name));
    std::fs::write(&path, config)?;
    let path = path.display().to_string();
    let args = ["-c", path.as_str()];
    let url = format!("nats://{host}:{}", node.client_port);
    let detail = if nodes.len() > 1 {
        format!("{url} (routes :{})", node.route_port)
    } else {
        url
    };
    FleetProcess::spawn(
        Launch::new(&binary, &args),
        Stage::NatsServer,
        &node.name,
        &FleetContext::default(),
        data_dir,
        detail,
    )
}

/// `nats://127.0.0.1:4222` → ("127.0.0.1", "4222"); `up` starts servers on loopback only.
fn loopback_host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.strip_prefix("nats://").unwrap_or(url);
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "4222"));
    if !matches!(host, "127.0.0.1" | "localhost" | "::1" | "[::1]") {
        bail!(
            "nothing answers at {url}, and provis up only starts a nats-server on loopback; give --nats-url nats://127.0.0.1:PORT"
        );
    }
    let port: u16 = port.parse().with_context(|| format!("bad port in {url}"))?;
    Ok((host.trim_matches(['[', ']']).to_owned(), port))
}

/// Polls `ready` until it holds; fails early when a process died meanwhile.
async fn wait_for<F, Fut>(
    what: &str,
    processes: &mut [FleetProcess],
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if ready().await {
            return Ok(());
        }
        for process in processes.iter_mut() {
            if let Ok(Some(status)) = process.child.try_wait() {
                bail!(
                    "{} exited ({status}) while waiting for {what}; its log {} ends with:\n{}",
                    process.name,
                    process.log.display(),
                    log_tail(&process.log)
                );
            }
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "{what} did not come up within {READY_TIMEOUT:?}; logs are in {}",
                processes.first().map_or_else(String::new, |p| p
                    .log
                    .parent()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default())
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Resolves with the name of the first process that exits.
/// Says when a part exits on its own (a killed node, a crashed minion: the
/// rest of the fleet goes on, as it would on real machines); resolves once
/// no nats-server is left, when nothing can go on.
async fn watch_exits(processes: &mut [FleetProcess]) {
    let mut reported = std::collections::BTreeSet::new();
    loop {
        for process in processes.iter_mut() {
            if !reported.contains(&process.name)
                && let Ok(Some(status)) = process.child.try_wait()
            {
                eprintln!(
                    "provis: {} exited on its own ({status}); its log is {}",
                    process.name,
                    process.log.display()
                );
                reported.insert(process.name.clone());
            }
        }
        let servers_left = processes
            .iter()
            .filter(|p| p.stage == Stage::NatsServer && !reported.contains(&p.name))
            .count();
        let ran_servers = processes.iter().any(|p| p.stage == Stage::NatsServer);
        if ran_servers && servers_left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Minions first (so they can mark themselves stopped while the bus is up),
/// then the master, then nats-server: SIGTERM to each group, then a kill for
/// any process still there once its drain should have ended.
async fn stop_all(processes: &mut Vec<FleetProcess>) {
    for stage in [Stage::Minion, Stage::Master, Stage::NatsServer] {
        let group: Vec<FleetProcess> = processes.extract_if(.., |p| p.stage == stage).collect();
        for process in &group {
            if let Some(pid) = process.child.id().and_then(|pid| i32::try_from(pid).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        for mut process in group {
            if tokio::time::timeout(STOP_GRACE, process.child.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "provis: {} did not stop within {STOP_GRACE:?}; killing it",
                    process.name
                );
                let _ = process.child.kill().await;
            }
        }
    }
}
