//! The master's dashboard: the fleet, a minion's week of state, roles,
//! convergence, rollouts, jobs, live events and queries, in the browser.
//!
//! Served by `provis master` on `http_addr` (off unless set) from what the
//! master already keeps ([`provis_master::FleetFeed`]): pages are rendered
//! on the server from typed templates (askama), charts are SVG drawn on the
//! server, and the only JavaScript (embedded, like the stylesheet) follows
//! live events through server-sent events. Every page but `/login` needs a
//! session, opened with a one-time token a master issues
//! (`provis dashboard token`); the dashboard only reads.

mod chart;
mod pages;
mod session;

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub use session::{LoginError, Session, Sessions};

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("cannot serve the dashboard")]
    Bind(#[from] provis_telemetry::TelemetryError),
    #[error(
        "the dashboard on {0} is not on loopback: serve it there, or behind a TLS proxy (TLS of its own is not built yet)"
    )]
    NotLoopback(SocketAddr),
}

/// What every handler reads from.
#[derive(Debug, Clone)]
struct App {
    feed: provis_master::FleetFeed,
    sessions: Sessions,
}

/// The dashboard, bound and ready to serve.
#[derive(Debug)]
pub struct Dashboard {
    server: provis_telemetry::HttpServer,
}

impl Dashboard {
    /// Binds `addr` (port 0: any free port) for the master of `feed`.
    pub async fn bind(
        addr: SocketAddr,
        feed: provis_master::FleetFeed,
    ) -> Result<Self, DashboardError> {
        if !addr.ip().is_loopback() {
            return Err(DashboardError::NotLoopback(addr));
        }
        let app = App {
            sessions: Sessions::new(feed.nats.clone(), feed.grants.clone()),
            feed,
        };
        let server = provis_telemetry::HttpServer::bind(addr, router(app)).await?;
        Ok(Self { server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Serves until `stop` is cancelled.
    pub async fn serve(self, stop: tokio_util::sync::CancellationToken) {
        self.server.serve(stop).await;
    }
}

fn router(app: App) -> Router {
    let pages = Router::new()
        .route("/", get(pages::fleet))
        .route("/minion/{id}", get(pages::minion))
        .route("/roles", get(pages::roles))
        .route("/convergence", get(pages::convergence))
        .route("/rollouts", get(pages::rollouts))
        .route("/jobs", get(pages::jobs))
        .route("/job/{id}", get(pages::job))
        .route("/events", get(pages::events))
        .route("/events/stream", get(pages::event_stream))
        .route("/query", get(pages::query))
        .route("/logout", get(logout))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_session,
        ));
    Router::new()
        .merge(pages)
        .route("/login", get(login))
        .route("/assets/dashboard.css", get(stylesheet))
        .route("/assets/dashboard.js", get(script))
        .with_state(app)
}

/// Refuses a request without a session (401, with how to log in); hands
/// the session to the page otherwise.
async fn require_session(State(app): State<App>, mut request: Request, next: Next) -> Response {
    let session = request
        .headers()
        .get(header::COOKIE)
        .and_then(|value| value.to_str().ok())
        .and_then(session::session_id)
        .and_then(|id| app.sessions.get(id));
    match session {
        Some(session) => {
            request.extensions_mut().insert(session);
            next.run(request).await
        }
        None => pages::refused(
            StatusCode::UNAUTHORIZED,
            "This page needs a login.".to_owned(),
        ),
    }
}

#[derive(Debug, serde::Deserialize)]
struct LoginQuery {
    token: Option<String>,
    /// A signed link: the key, when it was made, its signature.
    key: Option<String>,
    at: Option<i64>,
    sig: Option<String>,
}

async fn login(
    State(app): State<App>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(query): axum::extract::Query<LoginQuery>,
) -> Response {
    let opened = match (&query.token, &query.key, query.at, &query.sig) {
        (Some(token), _, _, _) if !token.is_empty() => app.sessions.log_in(token).await,
        (_, Some(key), Some(at_unix_ms), Some(signature)) => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default();
            app.sessions.log_in_signed(&session::SignedLogin {
                key,
                at_unix_ms,
                signature,
                host,
            })
        }
        _ => {
            return pages::refused(
                StatusCode::UNAUTHORIZED,
                "No login token or signed link.".to_owned(),
            );
        }
    };
    match opened {
        Ok(id) => (
            StatusCode::SEE_OTHER,
            [
                (header::LOCATION, "/".to_owned()),
                (
                    header::SET_COOKIE,
                    format!(
                        "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                        session::COOKIE,
                        session::SESSION_TTL.as_secs()
                    ),
                ),
            ],
        )
            .into_response(),
        Err(err @ (LoginError::Unknown | LoginError::Expired | LoginError::BadSignature(_))) => {
            pages::refused(StatusCode::UNAUTHORIZED, err.to_string())
        }
        Err(err) => pages::refused(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}

async fn logout(State(app): State<App>, request: Request) -> Response {
    if let Some(id) = request
        .headers()
        .get(header::COOKIE)
        .and_then(|value| value.to_str().ok())
        .and_then(session::session_id)
    {
        app.sessions.end(id);
    }
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/login".to_owned()),
            (
                header::SET_COOKIE,
                format!("{}=; Path=/; Max-Age=0", session::COOKIE),
            ),
        ],
    )
        .into_response()
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../assets/dashboard.css"),
    )
        .into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/dashboard.js"),
    )
        .into_response()
}
