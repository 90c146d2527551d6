//! The store over a real etcd cluster (etcd-client).

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tokio::sync::mpsc;

use super::{
    KeyValue, LeaseId, Listing, Revision, Store, StoreError, WatchEvent, WatchStream, WATCH_CHANNEL,
};

/// Connection settings for [`EtcdStore`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// TLS to etcd (`https://` endpoints); `None` for plaintext.
    pub tls: Option<EtcdTls>,
}

/// TLS material for etcd, as PEM text.
#[derive(Clone)]
pub struct EtcdTls {
    /// CA(s) that sign etcd's server certificates.
    pub ca_pem: String,
    /// Client certificate and key, for etcd's `--client-cert-auth`.
    pub identity: Option<(String, String)>,
    /// Name to verify in the server certificate; defaults to the
    /// endpoint's host.
    pub server_name: Option<String>,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

fn err(e: etcd_client::Error) -> StoreError {
    match e {
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable => {
            StoreError::Unavailable(s.message().to_owned())
        }
        etcd_client::Error::TransportError(t) => StoreError::Unavailable(t.to_string()),
        other => StoreError::Other(other.to_string()),
    }
}

/// Retries an operation that failed because the member it reached is
/// unavailable: the client's balancer sends the next try to another member,
/// so losing one member of a cluster costs a retry, not an error.
async fn retry<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    const ATTEMPTS: u32 = 4;
    let mut delay = Duration::from_millis(25);
    for attempt in 1..=ATTEMPTS {
        match op().await {
            Err(StoreError::Unavailable(why)) if attempt < ATTEMPTS => {
                tracing::debug!(%why, attempt, "etcd member unavailable; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            r => return r,
        }
    }
    Err(StoreError::Unavailable("retries exhausted".into()))
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        create_revision: k.create_revision(),
        mod_revision: k.mod_revision(),
        lease: (k.lease() != 0).then_some(k.lease()),
    }
}

impl EtcdStore {
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, StoreError> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout(opts.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        if let Some(tls) = &opts.tls {
            if let Some(e) = opts.endpoints.iter().find(|e| !e.starts_with("https://")) {
                return Err(StoreError::Other(format!(
                    "etcd endpoint {e}: TLS is configured, so endpoints must be https://"
                )));
            }
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            if let Some(name) = &tls.server_name {
                t = t.domain_name(name.clone());
            }
            co = co.with_tls(t);
        }
        let client = Client::connect(&opts.endpoints, Some(co))
            .await
            .map_err(err)?;
        Ok(Self { client })
    }

    /// Compacts etcd's history up to `revision` (tests and maintenance).
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.client
            .clone()
            .compact(revision, None)
            .await
            .map_err(err)?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        retry(|| async {
            let r = self.client.clone().get(key, None).await.map_err(err)?;
            Ok(r.kvs().first().map(kv))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        retry(|| async {
            let r = self
                .client
                .clone()
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(err)?;
            Ok(Listing {
                revision: r.header().map(|h| h.revision()).unwrap_or(0),
                kvs: r.kvs().iter().map(kv).collect(),
            })
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        retry(|| async {
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            let r = self
                .client
                .clone()
                .put(key, value.clone(), opts)
                .await
                .map_err(|e| lease_err(e, lease))?;
            Ok(r.header().map(|h| h.revision()).unwrap_or(0))
        })
        .await
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: Revision,
    ) -> Result<bool, StoreError> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, value, opts)]);
        let r = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| lease_err(e, lease))?;
        Ok(r.succeeded())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        retry(|| async {
            let r = self.client.clone().delete(key, None).await.map_err(err)?;
            Ok(r.deleted() > 0)
        })
        .await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd leases are whole seconds; round up so a lease never lives
        // shorter than asked.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        retry(|| async {
            let r = self
                .client
                .clone()
                .lease_grant(secs.max(1) as i64, None)
                .await
                .map_err(err)?;
            Ok(r.id())
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        retry(|| async {
            let lerr = |e| lease_err(e, Some(lease));
            let (mut keeper, mut stream) = self
                .client
                .clone()
                .lease_keep_alive(lease)
                .await
                .map_err(lerr)?;
            keeper.keep_alive().await.map_err(lerr)?;
            match stream.message().await.map_err(lerr)? {
                Some(r) if r.ttl() > 0 => Ok(Duration::from_secs(r.ttl() as u64)),
                _ => Err(StoreError::LeaseNotFound(lease)),
            }
        })
        .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.client
            .clone()
            .lease_revoke(lease)
            .await
            .map_err(|e| lease_err(e, Some(lease)))?;
        Ok(())
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = self
            .client
            .clone()
            .watch(prefix, Some(opts))
            .await
            .map_err(err)?;
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        tokio::spawn(async move {
            loop {
                let msg = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(StoreError::Unavailable("watch stream ended".into())))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(err(e))).await;
                        return;
                    }
                };
                if msg.canceled() {
                    let e = if msg.compact_revision() > 0 {
                        StoreError::Compacted {
                            requested: from,
                            compact_revision: msg.compact_revision(),
                        }
                    } else {
                        StoreError::Other(format!("watch canceled: {}", msg.cancel_reason()))
                    };
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                let events: Vec<WatchEvent> = msg
                    .events()
                    .iter()
                    .filter_map(|e| {
                        let k = e.kv()?;
                        Some(match e.event_type() {
                            EventType::Put => WatchEvent::Put(kv(k)),
                            EventType::Delete => WatchEvent::Delete {
                                key: String::from_utf8_lossy(k.key()).into_owned(),
                                mod_revision: k.mod_revision(),
                            },
                        })
                    })
                    .collect();
                if events.is_empty() {
                    continue;
                }
                // Bounded: a consumer that stops reading ends the watch.
                if tx.try_send(Ok(events)).is_err() {
                    tracing::warn!("etcd watch consumer lagging; closing the watch");
                    return;
                }
            }
        });
        Ok(rx)
    }
}

/// etcd reports an unknown lease in several error shapes (gRPC status,
/// keep-alive error); they all say "lease not found".
fn lease_err(e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
    match lease {
        Some(l) if e.to_string().contains("lease not found") => StoreError::LeaseNotFound(l),
        _ => err(e),
    }
}
