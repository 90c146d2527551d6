//! `fedmesh controller --leader-elect`: stand by until this replica holds
//! the controller Lease, then run; stop leading (exit, so the pod
//! restarts as a standby) the moment the lease is lost.

use std::net::SocketAddr;
#[cfg(feature = "kube")]
use std::sync::{atomic::AtomicBool, Arc};

use prometheus_client::metrics::gauge::Gauge;
#[cfg(feature = "kube")]
use tokio::sync::watch;

/// The leader's side of the election, kept while the controller runs.
pub struct Leadership {
    #[cfg(feature = "kube")]
    inner: Option<(
        watch::Receiver<bool>,
        tokio::task::JoinHandle<fedmesh_federation::leader::Elector>,
    )>,
    /// 1 while leading (0 in the standby's own registry).
    pub gauge: Gauge,
}

impl Leadership {
    /// Not elected: a single replica leads by itself.
    pub fn alone() -> Self {
        let gauge = Gauge::default();
        gauge.set(1);
        Self {
            #[cfg(feature = "kube")]
            inner: None,
            gauge,
        }
    }

    /// Resolves when leadership is lost (never for `alone`).
    pub async fn lost(&mut self) {
        #[cfg(feature = "kube")]
        if let Some((rx, _)) = &mut self.inner {
            let _ = rx.wait_for(|leading| !*leading).await;
            self.gauge.set(0);
            return;
        }
        std::future::pending::<()>().await
    }

    /// A graceful stop: give the lease up and unlabel the pod, so a
    /// standby takes over at once.
    pub async fn release(self) {
        #[cfg(feature = "kube")]
        if let Some((rx, task)) = self.inner {
            // The renew loop ends at its next round once nobody listens,
            // and hands the elector back.
            drop(rx);
            if let Ok(mut e) = task.await {
                let _ = e.label_pod(false).await;
                let _ = e.release().await;
            }
        }
    }
}

/// Who this replica is: the pod name and namespace from the downward API
/// (the manifests set them), else the hostname and `fedmesh-system`.
#[cfg(feature = "kube")]
fn identity() -> (String, String) {
    let name = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "fedmesh-controller".into());
    let ns = std::env::var("POD_NAMESPACE")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| fedmesh_deploy::NAMESPACE.into());
    (name, ns)
}

/// Waits until this replica leads. While standing by, `admin` answers
/// `/live` and `/ready` (a standby is healthy) and `/status` says so; a
/// signal while standing by returns `None`.
#[cfg(feature = "kube")]
pub async fn elect(
    admin: Option<SocketAddr>,
    lease: std::time::Duration,
) -> anyhow::Result<Option<Leadership>> {
    use fedmesh_federation::leader::{ElectionSettings, Elector};
    let (name, ns) = identity();
    let client = fedmesh_federation::k8s::client().await?;
    let settings = ElectionSettings {
        duration: lease,
        retry: (lease / 7).max(std::time::Duration::from_millis(100)),
        renew_deadline: lease * 2 / 3,
        ..ElectionSettings::new(&ns, &name)
    };
    let mut elector = Elector::new(client, settings)?;
    let standby_admin = match admin {
        Some(addr) => {
            let g: Gauge = Gauge::default();
            let status: fedmesh_transport::admin::JsonFn = Arc::new(move || {
                serde_json::json!({ "role": "standby", "lease": "fedmesh-controller" }).to_string()
            });
            let (_, task) = fedmesh_transport::admin::spawn_with(
                addr,
                move |reg| {
                    reg.register("fedmesh_controller_leader", "1 while this replica leads", g)
                },
                Arc::new(AtomicBool::new(true)),
                Some(status),
                None,
            )
            .await?;
            Some(task)
        }
        None => None,
    };
    if let Err(e) = elector.label_pod(false).await {
        tracing::warn!(error = %e, "labelling this pod as standby failed");
    }
    crate::emit(&format!("controller standing by as {ns}/{name}\n"));
    tokio::select! {
        () = elector.acquire() => {}
        r = crate::daemons::until_signal() => {
            r?;
            return Ok(None);
        }
    }
    if let Some(t) = standby_admin {
        t.abort();
        let _ = t.await;
    }
    // Labelled only after winning: the Service never selects a standby.
    if let Err(e) = elector.label_pod(true).await {
        tracing::warn!(error = %e, "labelling this pod as leader failed; proxies will not reach it through the Service");
    }
    crate::emit(&format!("controller leading as {ns}/{name}\n"));
    let gauge = Gauge::default();
    gauge.set(1);
    Ok(Some(Leadership {
        inner: Some(elector.hold()),
        gauge,
    }))
}

#[cfg(not(feature = "kube"))]
pub async fn elect(
    _admin: Option<SocketAddr>,
    _lease: std::time::Duration,
) -> anyhow::Result<Option<Leadership>> {
    anyhow::bail!("--leader-elect needs a build with the `kube` feature")
}
