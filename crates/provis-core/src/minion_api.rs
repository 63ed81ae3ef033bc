//! How callers reach a minion's local gRPC API, as its registry entry
//! advertises it: `unix:/path` (the default: a socket only the minion's
//! owner and group may open, for callers on the same machine) or
//! `host:port` over TCP (TLS off loopback), where every RPC must be signed
//! by a key the minion trusts ([`signed_request`]; a `Call` carries its
//! signature in its envelope).

use std::path::PathBuf;

use provis_proto::v1::minion_client::MinionClient;
use tonic::transport::{Channel, Endpoint};

use crate::call_auth::{RPC_ISSUED, RPC_NONCE, RPC_SIGNATURE, RPC_SIGNER, sign_rpc};
use crate::identity::Identity;

/// The scheme of a Unix socket address in the registry.
pub const UNIX_SCHEME: &str = "unix:";

/// Where a minion's API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddress {
    Unix(PathBuf),
    Tcp(String),
}

impl ApiAddress {
    /// Reads an address as the registry holds it.
    pub fn parse(text: &str) -> Self {
        match text.strip_prefix(UNIX_SCHEME) {
            Some(path) => Self::Unix(PathBuf::from(path)),
            None => Self::Tcp(text.to_owned()),
        }
    }
}

impl std::fmt::Display for ApiAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{UNIX_SCHEME}{}", path.display()),
            Self::Tcp(addr) => f.write_str(addr),
        }
    }
}

/// A channel to the API on the Unix socket at `path`.
pub async fn connect_unix(path: PathBuf) -> Result<MinionClient<Channel>, tonic::transport::Error> {
    // The URI is required by the builder and unused: the connector decides.
    let endpoint = Endpoint::from_static("http://minion.local");
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(MinionClient::new(channel))
}

/// `message` as a request signed by `identity` for `minion`'s API over TCP.
pub fn signed_request<T: prost::Message>(
    message: T,
    rpc: &str,
    minion: &str,
    identity: &Identity,
    now_unix_ms: i64,
) -> tonic::Request<T> {
    let signed = sign_rpc(identity, rpc, minion, &message.encode_to_vec(), now_unix_ms);
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    for (key, value) in [
        (RPC_SIGNER, signed.signer),
        (RPC_ISSUED, signed.issued_unix_ms.to_string()),
        (RPC_NONCE, signed.nonce),
        (RPC_SIGNATURE, signed.signature),
    ] {
        if let Ok(value) = value.parse() {
            metadata.insert(key, value);
        }
    }
    request
}
