//! The store over a real etcd cluster: etcd's v3 gRPC API (KV, Watch,
//! Lease) through tonic, with the client code generated from
//! `proto/etcd/rpc.proto` by protox at build time, so no `protoc` is
//! needed to build fedmesh.

use std::time::Duration;

use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{
    KeyValue, LeaseId, Listing, Revision, Store, StoreError, WatchEvent, WatchStream, WATCH_CHANNEL,
};

/// Code generated from etcd's protobuf definitions.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// Connection settings for [`EtcdStore`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// TLS to etcd (`https://` endpoints); `None` for plaintext.
    pub tls: Option<EtcdTls>,
    /// Largest response accepted from etcd (a listing of every export in
    /// the federation is the big one).
    pub max_response_bytes: usize,
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

/// Default for [`EtcdOptions::max_response_bytes`].
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            tls: None,
            max_response_bytes: MAX_RESPONSE_BYTES,
        }
    }
}

#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
}

fn err(s: tonic::Status) -> StoreError {
    match s.code() {
        // A connection that failed or broke, a member that lost its
        // leader, or one that did not answer in time: another member (or
        // a later try) may answer.
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            StoreError::Unavailable(s.message().to_owned())
        }
        tonic::Code::Unknown if is_transport(&s) => StoreError::Unavailable(s.message().to_owned()),
        _ => StoreError::Other(format!("{:?}: {}", s.code(), s.message())),
    }
}

/// tonic reports a connection it could not make as `Unknown` with a
/// transport error as its source.
fn is_transport(s: &tonic::Status) -> bool {
    use std::error::Error as _;
    let mut source = s.source();
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// etcd answers an unknown lease with `NotFound` ("etcdserver: requested
/// lease not found").
fn lease_err(s: tonic::Status, lease: Option<LeaseId>) -> StoreError {
    match lease {
        Some(l) if s.code() == tonic::Code::NotFound || s.message().contains("lease not found") => {
            StoreError::LeaseNotFound(l)
        }
        _ => err(s),
    }
}

/// Retries an operation that failed because the member it reached is
/// unavailable: the channel balances over every endpoint, so losing one
/// member of a cluster costs a retry, not an error.
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

fn kv(k: pb::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(&k.key).into_owned(),
        value: k.value,
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        lease: (k.lease != 0).then_some(k.lease),
    }
}

/// The end of the key range that holds every key starting with `prefix`
/// (etcd's `range_end`): the prefix with its last byte below 0xff
/// incremented; `[0]`, every key, when there is none.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn endpoint(url: &str, opts: &EtcdOptions) -> Result<Endpoint, StoreError> {
    let bad = |why: String| StoreError::Other(format!("etcd endpoint {url}: {why}"));
    let url = if url.contains("://") {
        url.to_owned()
    } else if opts.tls.is_some() {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    };
    let mut e = Endpoint::from_shared(url.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(opts.connect_timeout)
        .timeout(opts.request_timeout)
        .tcp_nodelay(true)
        // A member that vanished without a FIN is noticed in seconds,
        // and the balancer moves on.
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    match (&opts.tls, url.starts_with("https://")) {
        (Some(tls), true) => {
            let mut t = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &tls.server_name {
                t = t.domain_name(name.clone());
            }
            e = e.tls_config(t).map_err(|e| bad(e.to_string()))?;
        }
        (Some(_), false) => {
            return Err(bad(
                "TLS is configured, so endpoints must be https://".into()
            ))
        }
        (None, true) => {
            return Err(bad(
                "https:// needs store.tls (the CA to verify etcd)".into()
            ))
        }
        (None, false) => {}
    }
    Ok(e)
}

impl EtcdStore {
    /// Builds a client balanced over every endpoint. Connections are made
    /// on first use (and remade after a member comes back), so this fails
    /// only on a malformed endpoint or TLS setting.
    pub async fn connect(opts: &EtcdOptions) -> Result<Self, StoreError> {
        if opts.endpoints.is_empty() {
            return Err(StoreError::Other("etcd needs at least one endpoint".into()));
        }
        let endpoints = opts
            .endpoints
            .iter()
            .map(|u| endpoint(u, opts))
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(endpoints.into_iter());
        let max = opts.max_response_bytes;
        Ok(Self {
            kv: KvClient::new(channel.clone()).max_decoding_message_size(max),
            watch: WatchClient::new(channel.clone()).max_decoding_message_size(max),
            lease: LeaseClient::new(channel).max_decoding_message_size(max),
        })
    }

    /// Compacts etcd's history up to `revision` (tests and maintenance).
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.kv
            .clone()
            .compact(pb::CompactionRequest {
                revision,
                physical: false,
            })
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn range(&self, key: &[u8], range_end: Vec<u8>) -> Result<pb::RangeResponse, StoreError> {
        let r = self
            .kv
            .clone()
            .range(pb::RangeRequest {
                key: key.to_vec(),
                range_end,
                ..Default::default()
            })
            .await
            .map_err(err)?;
        Ok(r.into_inner())
    }
}

fn revision(h: Option<pb::ResponseHeader>) -> Revision {
    h.map_or(0, |h| h.revision)
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        retry(|| async {
            let r = self.range(key.as_bytes(), Vec::new()).await?;
            Ok(r.kvs.into_iter().next().map(kv))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        retry(|| async {
            let r = self
                .range(prefix.as_bytes(), prefix_end(prefix.as_bytes()))
                .await?;
            Ok(Listing {
                revision: revision(r.header),
                kvs: r.kvs.into_iter().map(kv).collect(),
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
            let r = self
                .kv
                .clone()
                .put(pb::PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: value.clone(),
                    lease: lease.unwrap_or(0),
                })
                .await
                .map_err(|e| lease_err(e, lease))?;
            Ok(revision(r.into_inner().header))
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
        use pb::compare::{CompareResult, CompareTarget, TargetUnion};
        let txn = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Mod as i32,
                key: key.as_bytes().to_vec(),
                target_union: Some(TargetUnion::ModRevision(expected)),
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: key.as_bytes().to_vec(),
                    value,
                    lease: lease.unwrap_or(0),
                })),
            }],
            failure: Vec::new(),
        };
        // Not retried: a transaction that reached etcd before the error
        // may have applied, and a second try would then report a failed
        // comparison against its own write.
        let r = self
            .kv
            .clone()
            .txn(txn)
            .await
            .map_err(|e| lease_err(e, lease))?;
        Ok(r.into_inner().succeeded)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        retry(|| async {
            let r = self
                .kv
                .clone()
                .delete_range(pb::DeleteRangeRequest {
                    key: key.as_bytes().to_vec(),
                    range_end: Vec::new(),
                })
                .await
                .map_err(err)?;
            Ok(r.into_inner().deleted > 0)
        })
        .await
    }

    async fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        // etcd leases are whole seconds; round up so a lease never lives
        // shorter than asked.
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let ttl = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
        retry(|| async {
            let r = self
                .lease
                .clone()
                .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                .await
                .map_err(err)?
                .into_inner();
            if !r.error.is_empty() {
                return Err(StoreError::Other(format!("lease grant: {}", r.error)));
            }
            Ok(r.id)
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        retry(|| async {
            // One request on a fresh stream; the stream ends when this
            // call returns (etcd answers each request with one response).
            let request = tokio_stream::once(pb::LeaseKeepAliveRequest { id: lease });
            let mut responses = self
                .lease
                .clone()
                .lease_keep_alive(request)
                .await
                .map_err(|e| lease_err(e, Some(lease)))?
                .into_inner();
            match responses
                .message()
                .await
                .map_err(|e| lease_err(e, Some(lease)))?
            {
                Some(r) if r.ttl > 0 => Ok(Duration::from_secs(r.ttl.unsigned_abs())),
                Some(_) => Err(StoreError::LeaseNotFound(lease)),
                None => Err(StoreError::Unavailable(
                    "lease keep-alive stream ended without an answer".into(),
                )),
            }
        })
        .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.lease
            .clone()
            .lease_revoke(pb::LeaseRevokeRequest { id: lease })
            .await
            .map_err(|e| lease_err(e, Some(lease)))?;
        Ok(())
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        // The request side stays open for as long as the watch runs: etcd
        // ends a watch stream whose client closed its half.
        let (req_tx, req_rx) = mpsc::channel::<pb::WatchRequest>(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix.as_bytes()),
                    start_revision: from,
                    progress_notify: false,
                },
            )),
        };
        req_tx
            .send(create)
            .await
            .map_err(|_| StoreError::Other("watch request channel closed".into()))?;
        let mut stream = self
            .watch
            .clone()
            .watch(tokio_stream::wrappers::ReceiverStream::new(req_rx))
            .await
            .map_err(err)?
            .into_inner();
        let (tx, rx) = mpsc::channel(WATCH_CHANNEL);
        tokio::spawn(async move {
            let _requests = req_tx;
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
                if msg.canceled {
                    let e = if msg.compact_revision > 0 {
                        StoreError::Compacted {
                            requested: from,
                            compact_revision: msg.compact_revision,
                        }
                    } else {
                        StoreError::Other(format!("watch canceled: {}", msg.cancel_reason))
                    };
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                let events: Vec<WatchEvent> = msg
                    .events
                    .into_iter()
                    .filter_map(|e| {
                        let delete = e.r#type == pb::event::EventType::Delete as i32;
                        let k = e.kv?;
                        Some(if delete {
                            WatchEvent::Delete {
                                key: String::from_utf8_lossy(&k.key).into_owned(),
                                mod_revision: k.mod_revision,
                            }
                        } else {
                            WatchEvent::Put(kv(k))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_exactly_the_prefix() {
        assert_eq!(prefix_end(b"/fedmesh/"), b"/fedmesh0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_and_tls_must_agree() {
        let plain = EtcdOptions::default();
        assert!(endpoint("127.0.0.1:2379", &plain).is_ok());
        assert!(endpoint("https://127.0.0.1:2379", &plain).is_err());
        let tls = EtcdOptions {
            tls: Some(EtcdTls {
                ca_pem: String::new(),
                identity: None,
                server_name: None,
            }),
            ..EtcdOptions::default()
        };
        assert!(endpoint("http://127.0.0.1:2379", &tls).is_err());
        assert!(endpoint("not a url", &plain).is_err());
    }
}
