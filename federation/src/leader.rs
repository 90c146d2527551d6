//! Leader election for a controller Deployment with several replicas: one
//! `coordination.k8s.io/v1` Lease, held by the leader and renewed every
//! `retry`; a standby takes it over once the holder has not renewed for
//! `duration` (timed on the standby's own clock from when it last saw
//! the record change, so clock skew between nodes does not matter).
//! Every write is an optimistic-concurrency replace (resourceVersion), so
//! two candidates can never both win a round.
//!
//! The leader also labels its own pod `fedmesh.io/leader=true`, which is
//! what the controller API Service selects: proxies reach the leader
//! alone, while every replica stays ready (a PodDisruptionBudget can
//! then let a node drain move the leader).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use tokio::sync::watch;

/// Label the leader puts on its own pod.
pub const LEADER_LABEL: &str = "fedmesh.io/leader";

#[derive(Debug, Clone)]
pub struct ElectionSettings {
    pub namespace: String,
    pub lease: String,
    /// This candidate: its pod name.
    pub identity: String,
    /// A holder that has not renewed for this long has lost the lease.
    pub duration: Duration,
    /// How often the leader renews and a standby tries.
    pub retry: Duration,
    /// The leader steps down when it could not renew for this long (less
    /// than `duration`, so it stops before anyone else can start).
    pub renew_deadline: Duration,
}

impl ElectionSettings {
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            lease: "fedmesh-controller".into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            renew_deadline: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ElectionError {
    #[error("lease {lease}: {source}")]
    Api {
        lease: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("settings: renew_deadline ({deadline:?}) must be shorter than duration ({duration:?}) and longer than retry ({retry:?})")]
    Settings {
        deadline: Duration,
        duration: Duration,
        retry: Duration,
    },
}

/// One candidate.
pub struct Elector {
    leases: Api<Lease>,
    pods: Api<Pod>,
    s: ElectionSettings,
    /// The last record seen and when (our clock) it was first seen.
    observed: Option<(String, Option<Timestamp>, Instant)>,
}

/// Outcome of one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    Leader,
    /// Someone else holds a live lease.
    Standby,
    /// Lost a race (409): try again next round.
    Conflict,
}

impl Elector {
    pub fn new(client: Client, s: ElectionSettings) -> Result<Self, ElectionError> {
        if s.renew_deadline >= s.duration || s.renew_deadline <= s.retry {
            return Err(ElectionError::Settings {
                deadline: s.renew_deadline,
                duration: s.duration,
                retry: s.retry,
            });
        }
        Ok(Self {
            leases: Api::namespaced(client.clone(), &s.namespace),
            pods: Api::namespaced(client, &s.namespace),
            s,
            observed: None,
        })
    }

    fn err(&self, e: kube::Error) -> ElectionError {
        ElectionError::Api {
            lease: format!("{}/{}", self.s.namespace, self.s.lease),
            source: Box::new(e),
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.s.identity.clone()),
            // Whole seconds, rounded up: a standby never waits less.
            lease_duration_seconds: Some(self.s.duration.as_secs_f64().ceil().max(1.0) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: create, renew, take over an expired lease, or stand by.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Round, ElectionError> {
        let current = match self.leases.get_opt(&self.s.lease).await {
            Ok(l) => l,
            Err(e) => return Err(self.err(e)),
        };
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.s.lease.clone()),
                    namespace: Some(self.s.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(0, None)),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Round::Leader),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Conflict),
                Err(e) => Err(self.err(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renewed = spec.renew_time.as_ref().map(|t| t.0);
        let now = Instant::now();
        let seen_at = match &self.observed {
            Some((h, r, at)) if *h == holder && *r == renewed => *at,
            _ => {
                self.observed = Some((holder.clone(), renewed, now));
                now
            }
        };
        let mine = holder == self.s.identity;
        let duration = spec
            .lease_duration_seconds
            .and_then(|d| u64::try_from(d).ok())
            .map_or(self.s.duration, Duration::from_secs);
        // An empty holder is a released lease: free at once.
        let expired = holder.is_empty() || now.duration_since(seen_at) >= duration;
        if !mine && !expired {
            return Ok(Round::Standby);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(if mine {
            self.spec(transitions, spec.acquire_time.clone())
        } else {
            self.spec(transitions.saturating_add(1), None)
        });
        match self
            .leases
            .replace(&self.s.lease, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Round::Leader),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Conflict),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Gives the lease up (a graceful stop): a standby takes over on its
    /// next round instead of waiting out `duration`.
    pub async fn release(&mut self) -> Result<(), ElectionError> {
        let Some(mut lease) = self
            .leases
            .get_opt(&self.s.lease)
            .await
            .map_err(|e| self.err(e))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.s.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .leases
            .replace(&self.s.lease, &PostParams::default(), &lease)
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Sets this pod's leader label (the API Service selects `true`).
    pub async fn label_pod(&self, leader: bool) -> Result<(), ElectionError> {
        let patch = serde_json::json!({
            "metadata": { "labels": { LEADER_LABEL: if leader { "true" } else { "false" } } }
        });
        self.pods
            .patch(
                &self.s.identity,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map(drop)
            .map_err(|e| self.err(e))
    }

    /// Waits (retrying every `retry`, API errors logged and retried) until
    /// this candidate leads.
    pub async fn acquire(&mut self) {
        loop {
            // kube retries some answers (503) by itself: bound the round.
            let round = tokio::time::timeout(self.s.duration, self.try_acquire_or_renew()).await;
            match round {
                Ok(Ok(Round::Leader)) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election round failed"),
                Err(_) => {
                    tracing::warn!(timeout = ?self.s.duration, "leader election round timed out")
                }
            }
            tokio::time::sleep(self.s.retry).await;
        }
    }

    /// Renews in the background; the receiver turns `false` (and the task
    /// ends) once renewal has failed for `renew_deadline` or someone else
    /// holds the lease. The leader must stop leading then. Dropping the
    /// receiver ends the task at its next round, returning the elector
    /// (to [`release`](Self::release) the lease).
    pub fn hold(mut self) -> (watch::Receiver<bool>, tokio::task::JoinHandle<Self>) {
        let (tx, rx) = watch::channel(true);
        let task = tokio::spawn(async move {
            let mut last_ok = Instant::now();
            loop {
                tokio::time::sleep(self.s.retry).await;
                // A hung request must not keep a leader past its deadline.
                let left = self.s.renew_deadline.saturating_sub(last_ok.elapsed());
                let round = tokio::time::timeout(left, self.try_acquire_or_renew()).await;
                match round.unwrap_or(Ok(Round::Conflict)) {
                    Ok(Round::Leader) => last_ok = Instant::now(),
                    Ok(Round::Standby) => {
                        tracing::error!(lease = %self.s.lease, "another controller holds the lease: stepping down");
                        break;
                    }
                    Ok(Round::Conflict) => {}
                    Err(e) => tracing::warn!(error = %e, "renewing the leader lease failed"),
                }
                if last_ok.elapsed() >= self.s.renew_deadline {
                    tracing::error!(lease = %self.s.lease, deadline = ?self.s.renew_deadline, "could not renew the leader lease in time: stepping down");
                    break;
                }
                if tx.is_closed() {
                    break;
                }
            }
            let _ = tx.send(false);
            self
        });
        (rx, task)
    }
}
