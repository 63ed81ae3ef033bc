//! The minion's local gRPC API (`proto/provis/v1/minion.proto`): calls,
//! services, state and events of this one machine, without NATS. It listens
//! on loopback by default; a call through it takes the same checks and the
//! same dispatcher as a call over NATS, so the results are the same.

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

/// Serves the API on `listener` (over TLS with `tls`) until the task is aborted.
pub async fn serve(
    api: MinionApi,
    listener: tokio::net::TcpListener,
    tls: Option<Identity>,
    stop: tokio_util::sync::CancellationToken,
) {
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
    if let Err(err) = server
        .add_service(MinionServer::new(api))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %err, "gRPC API stopped");
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Minion for MinionApi {
    async fn call(&self, request: Request<CallEnvelope>) -> Result<Response<CallReply>, Status> {
        // The same checks as over NATS: re-encoding is cheap and keeps one path.
        let arrival = provis_core::envelope::Arrival::now(&self.clock);
        let envelope = request.into_inner();
        let admitted = self.guard.admit(&envelope).map_err(|err| {
            (
                envelope.call_id.clone(),
                provis_core::envelope::EnvelopeError::Denied(err),
            )
        });
        let payload = envelope.encode_to_vec();
        let roles: Vec<provis_core::RoleName> = self
            .roles
            .read()
            .map(|r| r.iter().filter_map(|r| r.parse().ok()).collect())
            .unwrap_or_default();
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
        _: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
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

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
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
