//! The minion's local gRPC API (`proto/provis/v1/minion.proto`): calls,
//! services, state and events of this one machine, without NATS. A call
//! through it takes the same checks and the same dispatcher as a call over
//! NATS, so the results are the same.
//!
//! Where it listens ([`GrpcListen`]) decides who may ask:
//! - a Unix socket (the default, `grpc.sock` in the data dir), mode 0660:
//!   the minion's user and group, nobody else on the machine;
//! - TCP: anyone who reaches the port, so every RPC must be signed by a key
//!   the minion trusts (its `trusted_callers`, or an operator of the call
//!   policy allowed the RPC's service and method: `Health` is `sys.ping`,
//!   `ListServices` `sys.services`, `WatchEvents` `sys.events`, and
//!   `GetState` of a service is that service's `state`); a minion that pins
//!   no key refuses every RPC over TCP. Off loopback, TCP must be TLS.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt as _};
use prost::Message;
use provis_core::envelope::{error_reply, open_envelope};
use provis_js::StateStore;
use provis_proto::v1::minion_server::{Minion, MinionServer};
use provis_proto::v1::{
    CallEnvelope, CallReply, Event, GetStateRequest, GetStateResponse, HealthRequest,
    HealthResponse, ListServicesRequest, ListServicesResponse, ServiceInfo, StateEntry,
    WatchEventsRequest,
};
use tonic::transport::{Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::dispatch::Dispatcher;
use crate::events::EventBus;

/// Where the local API listens: `grpc_listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcListen {
    Off,
    /// A Unix socket, owner and group only.
    Unix(std::path::PathBuf),
    /// TCP, where every RPC must be signed.
    Tcp(std::net::SocketAddr),
}

/// The socket's name in the data dir when `grpc_listen` is `unix`.
pub const DEFAULT_SOCKET: &str = "grpc.sock";

impl GrpcListen {
    /// Reads `unix` (the socket in `data_dir`), `unix:PATH`, `IP:PORT` or `off`.
    pub fn parse(text: &str, data_dir: &std::path::Path) -> Result<Self, String> {
        if text == "off" {
            return Ok(Self::Off);
        }
        if text == "unix" {
            return Ok(Self::Unix(data_dir.join(DEFAULT_SOCKET)));
        }
        if let Some(path) = text.strip_prefix(provis_core::minion_api::UNIX_SCHEME) {
            if path.is_empty() {
                return Err("unix: needs a path (unix:/run/provis/grpc.sock)".into());
            }
            return Ok(Self::Unix(path.into()));
        }
        text.parse().map(Self::Tcp).map_err(|_| {
            "grpc_listen must be unix (the socket in the data dir), unix:PATH, IP:PORT (e.g. 127.0.0.1:7422) or off".into()
        })
    }
}

/// Binds the socket at `path` with mode 0660. A socket left by an earlier
/// run is replaced; one that answers belongs to a running minion and is not.
pub async fn bind_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process serves this socket (a second minion on the same data dir?)",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// What the gRPC API listens on.
#[derive(Debug)]
pub enum ApiListener {
    /// TCP, over TLS with the identity when given.
    Tcp(tokio::net::TcpListener, Option<Identity>),
    /// A Unix socket, removed when the API stops.
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// What the gRPC API serves from.
///
/// On stop the server takes no new connection and ends once the calls in
/// flight answered; event watches end with the stop.
#[derive(Debug, Clone)]
pub struct MinionApi {
    pub guard: provis_core::call_auth::CallGuard,
    pub dispatcher: Arc<Dispatcher>,
    pub state: Arc<StateStore>,
    pub events: EventBus,
    pub nats: async_nats::Client,
    /// Changes when the master assigns other roles.
    pub roles: Arc<std::sync::RwLock<Vec<String>>>,
    pub started: Instant,
    /// Fires when the minion stops: open event watches end.
    pub stop: tokio_util::sync::CancellationToken,
    /// Calls' timeouts count from arrival by this clock.
    pub clock: provis_core::clock::BusClock,
    /// Served over TCP: every RPC must be signed (see the module docs).
    pub signed_only: bool,
}

/// The TLS identity from `grpc_tls_cert` and `grpc_tls_key`: none when
/// neither is set, an error when only one is or a file cannot be read.
pub fn tls_identity(config: &crate::MinionConfig) -> Result<Option<Identity>, crate::MinionError> {
    let fail = |reason: String| crate::MinionError::Grpc {
        addr: config.grpc_listen.clone(),
        reason,
    };
    match (&config.grpc_tls_cert, &config.grpc_tls_key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let read = |path: &std::path::Path| {
                std::fs::read(path).map_err(|source| crate::MinionError::GrpcTls {
                    path: path.to_owned(),
                    source,
                })
            };
            Ok(Some(Identity::from_pem(read(cert)?, read(key)?)))
        }
        _ => Err(fail("grpc_tls_cert and grpc_tls_key go together".into())),
    }
}

/// Serves the API on `listener` until `stop` fires and the calls in flight answered.
pub async fn serve(
    api: MinionApi,
    listener: ApiListener,
    stop: tokio_util::sync::CancellationToken,
) {
    let served = match listener {
        ApiListener::Tcp(listener, tls) => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let mut server = tonic::transport::Server::builder();
            if let Some(identity) = tls {
                server = match server.tls_config(ServerTlsConfig::new().identity(identity)) {
                    Ok(server) => server,
                    Err(err) => {
                        tracing::error!(error = %err, "gRPC TLS settings refused; the API does not start");
                        return;
                    }
                };
            }
            server
                .add_service(MinionServer::new(api))
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await
        }
        ApiListener::Unix(listener, path) => {
            let incoming = futures::stream::unfold(listener, |listener| async move {
                let accepted = listener.accept().await.map(|(stream, _)| stream);
                Some((accepted, listener))
            });
            let served = tonic::transport::Server::builder()
                .add_service(MinionServer::new(api))
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                .await;
            let _ = std::fs::remove_file(&path);
            served
        }
    };
    if let Err(err) = served {
        tracing::error!(error = %err, "gRPC API stopped");
    }
}

impl MinionApi {
    /// Over TCP, the request must be signed by a caller the policy lets
    /// call `service.method` here; on the local socket, anyone who can open
    /// it may ask.
    fn check_caller<T: Message>(
        &self,
        request: &Request<T>,
        rpc: &str,
        service: &str,
        method: &str,
    ) -> Result<(), Status> {
        if !self.signed_only {
            return Ok(());
        }
        let metadata = request.metadata();
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let signed = match (
            text(provis_core::call_auth::RPC_SIGNER),
            text(provis_core::call_auth::RPC_ISSUED).and_then(|t| t.parse().ok()),
            text(provis_core::call_auth::RPC_NONCE),
            text(provis_core::call_auth::RPC_SIGNATURE),
        ) {
            (Some(signer), Some(issued_unix_ms), Some(nonce), Some(signature)) => {
                Some(provis_core::call_auth::RpcSignature {
                    signer,
                    issued_unix_ms,
                    nonce,
                    signature,
                })
            }
            _ => None,
        };
        let body = request.get_ref().encode_to_vec();
        let minion = self.dispatcher.minion();
        let signer = self
            .guard
            .admit_rpc(rpc, minion, &body, signed.as_ref())
            .map_err(|err| Status::unauthenticated(err.to_string()))?;
        self.guard
            .authorize(&signer, service, method, &self.roles())
            .map_err(|err| Status::permission_denied(err.to_string()))
    }

    fn roles(&self) -> Vec<provis_core::RoleName> {
        self.roles
            .read()
            .map(|r| r.iter().filter_map(|r| r.parse().ok()).collect())
            .unwrap_or_default()
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Minion for MinionApi {
    async fn call(&self, request: Request<CallEnvelope>) -> Result<Response<CallReply>, Status> {
        // The same checks as over NATS: re-encoding is cheap and keeps one path.
        let arrival = provis_core::envelope::Arrival::now(&self.clock);
        if self.signed_only && !self.guard.enforcing() {
            return Err(Status::unauthenticated(
                provis_core::call_auth::CallAuthError::NoCallers.to_string(),
            ));
        }
        let envelope = request.into_inner();
        let admitted = self.guard.admit(&envelope).map_err(|err| {
            (
                envelope.call_id.clone(),
                provis_core::envelope::EnvelopeError::Denied(err),
            )
        });
        let payload = envelope.encode_to_vec();
        let roles = self.roles();
        let checked = admitted.and_then(|signer| {
            let call = open_envelope(&payload, arrival)?;
            if let Some(signer) = signer {
                self.guard
                    .authorize(&signer, &call.service, &call.method, &roles)
                    .map_err(|err| {
                        (
                            call.call_id.clone(),
                            provis_core::envelope::EnvelopeError::Denied(err),
                        )
                    })?;
            }
            Ok(call)
        });
        let reply = match checked {
            Ok(call) => self.dispatcher.run(&call).await,
            Err((call_id, err)) => error_reply(
                &call_id,
                self.dispatcher.minion(),
                err.code(),
                err.to_string(),
                Default::default(),
            ),
        };
        Ok(Response::new(reply))
    }

    async fn list_services(
        &self,
        request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        self.check_caller(&request, "ListServices", "sys", "services")?;
        let services = self
            .dispatcher
            .describe_services()
            .into_iter()
            .map(|s| ServiceInfo {
                name: s["name"].as_str().unwrap_or_default().to_owned(),
                version: s["version"].as_str().unwrap_or_default().to_owned(),
                digest: s["digest"].as_str().unwrap_or_default().to_owned(),
                methods: s["methods"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(|m| m.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                builtin: s["builtin"].as_bool().unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ListServicesResponse { services }))
    }

    async fn get_state(
        &self,
        request: Request<GetStateRequest>,
    ) -> Result<Response<GetStateResponse>, Status> {
        let service = request.get_ref().service.clone();
        self.check_caller(&request, "GetState", &service, "state")?;
        let request = request.into_inner();
        let entries = self
            .state
            .list(&request.service, &request.prefix)
            .into_iter()
            .map(|(key, value)| StateEntry {
                key,
                value_json: value.to_string(),
            })
            .collect();
        Ok(Response::new(GetStateResponse { entries }))
    }

    async fn health(
        &self,
        request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        self.check_caller(&request, "Health", "sys", "ping")?;
        Ok(Response::new(HealthResponse {
            minion: self.dispatcher.minion().to_owned(),
            roles: self.roles.read().map(|r| r.clone()).unwrap_or_default(),
            version: provis_core::VERSION.to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            nats_connected: self.nats.connection_state()
                == async_nats::connection::State::Connected,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.check_caller(&request, "WatchEvents", "sys", "events")?;
        let prefix = request.into_inner().type_prefix;
        let receiver = self.events.subscribe();
        let stream =
            futures::stream::unfold((receiver, prefix), |(mut receiver, prefix)| async move {
                loop {
                    match receiver.recv().await {
                        Ok(event)
                            if event.short_kind().starts_with(&prefix)
                                || event.kind.starts_with(&prefix) =>
                        {
                            let item = Event {
                                id: event.id,
                                source: event.source,
                                r#type: event.kind,
                                time: event.time,
                                subject: event.subject,
                                data_json: event.data.to_string(),
                            };
                            return Some((Ok(item), (receiver, prefix)));
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            let status = Status::data_loss(format!(
                                "watcher fell behind; {missed} events missed"
                            ));
                            return Some((Err(status), (receiver, prefix)));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
        let stop = self.stop.clone();
        Ok(Response::new(Box::pin(
            stream.take_until(stop.cancelled_owned()),
        )))
    }
}
