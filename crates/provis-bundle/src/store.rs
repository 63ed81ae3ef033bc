//! Where bundles live: the bytes in the object store `provis_bundles` under
//! their digest, and in the key-value bucket `provis_services` a pointer per
//! service name to its current digest and manifest. Publishing a new version
//! is one object put (skipped when the digest is already stored) and one
//! pointer put; every minion watching the pointer converges on its own.

use async_nats::jetstream::{self, kv, object_store::ObjectStore};
use provis_core::envelope::now_unix_ms;
use provis_core::identity::Identity;
use provis_core::storage::{BUCKET_BUNDLES, BUCKET_SERVICES};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::manifest::ServiceManifest;
use crate::pack::{OpenError, PackedBundle};

/// What `provis_services` holds for one service name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServicePointer {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub manifest: ServiceManifest,
    pub size: usize,
    pub published_unix_ms: i64,
    /// The publisher's signature over the service name and digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<BundleSignature>,
}

/// Who vouches for a bundle: an ed25519 signature over
/// `provis-bundle-v1:<name>:<digest>`, so a signed bundle cannot be
/// re-pointed under another service's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleSignature {
    /// The signer's public key (`ed25519:<hex>`).
    pub signer: String,
    pub signature: String,
}

fn signed_message(name: &str, digest: &str) -> Vec<u8> {
    format!("provis-bundle-v1:{name}:{digest}").into_bytes()
}

/// Version 2 also covers when the pointer was published, so an older
/// pointer put back (as any reader can have JetStream do) is told apart.
fn signed_message_at(name: &str, digest: &str, published_unix_ms: i64) -> Vec<u8> {
    format!("provis-bundle-v2:{name}:{digest}:{published_unix_ms}").into_bytes()
}

impl ServicePointer {
    /// Checks the pointer is signed by one of `trusted`; with no trusted key
    /// at all, anything goes (an unsecured fleet).
    pub fn check_signature(&self, trusted: &[String]) -> Result<(), String> {
        if trusted.is_empty() {
            return Ok(());
        }
        let Some(signed) = &self.signature else {
            return Err(format!(
                "bundle {} of {} is not signed; this minion runs signed bundles only",
                self.digest, self.name
            ));
        };
        if !trusted.contains(&signed.signer) {
            return Err(format!(
                "bundle {} of {} is signed by {}, which this minion does not trust",
                self.digest, self.name, signed.signer
            ));
        }
        if self.signed_at().is_none()
            && !provis_core::identity::verify(
                &signed.signer,
                &signed_message(&self.name, &self.digest),
                &signed.signature,
            )
        {
            return Err(format!(
                "the signature of bundle {} of {} does not verify: refused",
                self.digest, self.name
            ));
        }
        Ok(())
    }

    /// When the pointer was published, if its signature covers that time
    /// (pointers signed before version 2 do not: they count as oldest).
    pub fn signed_at(&self) -> Option<i64> {
        let signed = self.signature.as_ref()?;
        provis_core::identity::verify(
            &signed.signer,
            &signed_message_at(&self.name, &self.digest, self.published_unix_ms),
            &signed.signature,
        )
        .then_some(self.published_unix_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open {bucket} (is a provis master running on this NATS?)")]
    Open {
        bucket: &'static str,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot store bundle {digest}")]
    Put {
        digest: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot fetch bundle {digest}")]
    Fetch {
        digest: String,
        #[source]
        source: async_nats::Error,
    },
    #[error(transparent)]
    Bundle(#[from] OpenError),
    #[error("cannot write the pointer of service {name}")]
    Pointer {
        name: String,
        #[source]
        source: async_nats::Error,
    },
}

/// The bundle object store and the service pointers of one fleet.
#[derive(Clone)]
pub struct BundleStore {
    objects: ObjectStore,
    pointers: kv::Store,
}

impl std::fmt::Debug for BundleStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleStore")
            .field("pointers", &self.pointers.name)
            .finish_non_exhaustive()
    }
}

impl BundleStore {
    /// Opens the buckets the master created.
    pub async fn open(js: &jetstream::Context) -> Result<Self, StoreError> {
        let objects =
            js.get_object_store(BUCKET_BUNDLES)
                .await
                .map_err(|err| StoreError::Open {
                    bucket: BUCKET_BUNDLES,
                    source: Box::new(err),
                })?;
        let pointers = js
            .get_key_value(BUCKET_SERVICES)
            .await
            .map_err(|err| StoreError::Open {
                bucket: BUCKET_SERVICES,
                source: Box::new(err),
            })?;
        Ok(Self { objects, pointers })
    }

    /// The pointer bucket, for watching.
    pub fn pointers(&self) -> &kv::Store {
        &self.pointers
    }

    /// Stores the bundle (unless its digest is already there) and points its
    /// service name at it, signed by `signer` when given.
    pub async fn publish(
        &self,
        bundle: &PackedBundle,
        signer: Option<&Identity>,
    ) -> Result<ServicePointer, StoreError> {
        self.put_bundle(bundle).await?;
        let name = bundle.manifest.name.clone();
        // Never earlier than the pointer it replaces, whatever the clock does.
        let previous = match self.pointers.get(name.as_str()).await {
            Ok(Some(bytes)) => serde_json::from_slice::<ServicePointer>(&bytes)
                .map(|pointer| pointer.published_unix_ms)
                .ok(),
            _ => None,
        };
        let published_unix_ms = previous.map_or(now_unix_ms(), |previous| {
            now_unix_ms().max(previous.saturating_add(1))
        });
        let signature = signer.map(|key| BundleSignature {
            signer: key.public_key().to_owned(),
            signature: key.sign(&signed_message_at(&name, &bundle.digest, published_unix_ms)),
        });
        let pointer = ServicePointer {
            name,
            version: bundle.manifest.version.clone(),
            digest: bundle.digest.clone(),
            manifest: bundle.manifest.clone(),
            size: bundle.bytes.len(),
            published_unix_ms,
            signature,
        };
        self.put_pointer(&pointer).await?;
        Ok(pointer)
    }

    /// Stores the bundle's bytes under its digest, once.
    pub async fn put_bundle(&self, bundle: &PackedBundle) -> Result<(), StoreError> {
        if self.objects.info(&bundle.digest).await.is_ok() {
            return Ok(());
        }
        let mut reader = bundle.bytes.as_ref();
        self.objects
            .put(bundle.digest.as_str(), &mut reader)
            .await
            .map_err(|err| StoreError::Put {
                digest: bundle.digest.clone(),
                source: Box::new(err),
            })?;
        Ok(())
    }

    /// Points a service name at a digest.
    pub async fn put_pointer(&self, pointer: &ServicePointer) -> Result<(), StoreError> {
        let value = serde_json::to_vec(pointer).map_err(|err| StoreError::Pointer {
            name: pointer.name.clone(),
            source: Box::new(err),
        })?;
        self.pointers
            .put(&pointer.name, value.into())
            .await
            .map_err(|err| StoreError::Pointer {
                name: pointer.name.clone(),
                source: Box::new(err),
            })?;
        Ok(())
    }

    /// Stops pointing at any version of `name`: minions unload it.
    pub async fn remove_pointer(&self, name: &str) -> Result<(), StoreError> {
        self.pointers
            .delete(name)
            .await
            .map_err(|err| StoreError::Pointer {
                name: name.to_owned(),
                source: Box::new(err),
            })
    }

    /// Fetches the bundle a pointer names and checks its digest.
    pub async fn fetch(&self, digest: &str) -> Result<PackedBundle, StoreError> {
        let fetch_err = |source: async_nats::Error| StoreError::Fetch {
            digest: digest.to_owned(),
            source,
        };
        let mut object = self
            .objects
            .get(digest)
            .await
            .map_err(|err| fetch_err(Box::new(err)))?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|err| fetch_err(Box::new(err)))?;
        Ok(PackedBundle::from_bytes(bytes.into(), digest)?)
    }

    /// Overwrites the stored bytes of `digest` (tests of tampering only: a
    /// real publisher never writes a digest that does not match).
    pub async fn overwrite_bytes_for_test(
        &self,
        digest: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let mut reader = bytes;
        self.objects
            .put(digest, &mut reader)
            .await
            .map_err(|err| StoreError::Put {
                digest: digest.to_owned(),
                source: Box::new(err),
            })?;
        Ok(())
    }
}
