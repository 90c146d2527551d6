//! `fedmesh gateway` and `fedmesh sidecar`: run a daemon from static YAML
//! until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use fedmesh_gateway::{GatewayApp, GatewayConfig};
use fedmesh_sidecar::{SidecarApp, SidecarConfig};
use prometheus_client::registry::Registry;

#[derive(clap::Args)]
pub struct Args {
    /// YAML config file (see docs/operations.md for the format).
    #[arg(long, required_unless_present = "kubernetes")]
    config: Option<PathBuf>,
    /// Sidecar in an injected pod: the config comes from the environment
    /// `fedmesh inject` sets (FEDMESH_CLUSTER, FEDMESH_TRUST_DOMAIN,
    /// FEDMESH_CONTROLLER, FEDMESH_APP_PORTS) and the identity files its
    /// init container wrote.
    #[arg(long, conflicts_with = "config")]
    kubernetes: bool,
    /// Validate the config, print the effective settings and exit.
    #[arg(long)]
    check: bool,
    /// Gateway: on SIGTERM/SIGINT, refuse new streams from peers (they go
    /// elsewhere before any payload; `/ready` turns 503) and let open ones
    /// run this long before stopping. A second signal stops at once.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: std::time::Duration,
    /// Threads that run the proxy's connections [default: one per CPU].
    /// Fewer threads wake each other less; more spread many connections
    /// over cores (one peer's QUIC connection is one task either way).
    #[arg(long, env = "FEDMESH_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

pub(crate) async fn until_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

pub async fn gateway(args: Args) -> anyhow::Result<ExitCode> {
    let Some(config) = &args.config else {
        anyhow::bail!("--kubernetes is for sidecars; a gateway takes --config");
    };
    let err = |problems| fedmesh_gateway::ConfigError {
        path: config.display().to_string(),
        problems,
    };
    // Kept raw too: renewed SVIDs are written back to its identity files.
    let raw: GatewayConfig = fedmesh_transport::read_yaml(config).map_err(err)?;
    let settings = raw.settings().map_err(err)?;
    tracing::info!(?settings.limits, cluster = %settings.catalog.cluster, "effective gateway config");
    if args.check {
        println!(
            "config ok: gateway {} of cluster {}",
            settings.identity.id(),
            settings.catalog.cluster
        );
        return Ok(ExitCode::SUCCESS);
    }
    let app = GatewayApp::build(settings, &raw.identity, &mut Registry::default()).await?;
    let gw = app.gateway();
    println!(
        "gateway up: quic {} tunnel {}{}",
        gw.quic_addr(),
        gw.tunnel_addr(),
        gw.admin_addr()
            .map(|a| format!(" admin http://{a}/metrics"))
            .unwrap_or_default()
    );
    until_signal().await?;
    if !args.drain.is_zero() {
        gw.set_draining(true);
        println!(
            "gateway draining for {:?} (signal again to stop now)",
            args.drain
        );
        tokio::select! {
            _ = tokio::time::sleep(args.drain) => {}
            r = until_signal() => r?,
        }
    }
    app.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Where the injected pod's identity init container writes.
const K8S_IDENTITY: &str = "/var/run/fedmesh/identity";

/// The sidecar config of an injected pod, from its environment.
fn kubernetes_sidecar() -> Result<SidecarConfig, Vec<String>> {
    use fedmesh_deploy::ports;
    let var = |k: &str| {
        std::env::var(k).map_err(|_| format!("{k} is not set (is this an injected pod?)"))
    };
    let mut problems = Vec::new();
    let mut get = |k: &str| var(k).map_err(|e| problems.push(e)).unwrap_or_default();
    let (cluster, td) = (get("FEDMESH_CLUSTER"), get("FEDMESH_TRUST_DOMAIN"));
    let controller = std::env::var("FEDMESH_CONTROLLER").unwrap_or_else(|_| {
        format!(
            "fedmesh-controller.{}.svc:{}",
            fedmesh_deploy::NAMESPACE,
            ports::CONTROLLER_API
        )
    });
    let mut app_ports = Vec::new();
    for p in std::env::var("FEDMESH_APP_PORTS")
        .unwrap_or_default()
        .split(',')
    {
        match p.trim() {
            "" => {}
            p => match p.parse::<u16>() {
                Ok(n) if n > 0 => app_ports.push(n),
                _ => problems.push(format!("FEDMESH_APP_PORTS: `{p}` is not a port")),
            },
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // Overridable for running an "injected pod" outside Kubernetes.
    let id = std::path::PathBuf::from(
        std::env::var("FEDMESH_IDENTITY_DIR").unwrap_or_else(|_| K8S_IDENTITY.into()),
    );
    let any = |port: u16| std::net::SocketAddr::from(([0, 0, 0, 0], port)).to_string();
    let cfg = serde_json::json!({
        "identity": { "cert": id.join("svid.pem"), "key": id.join("svid.key") },
        "bundles": [{ "trust_domain": td, "path": id.join("bundle.pem") }],
        "controller": { "address": controller, "cluster": cluster },
        "transparent": { "listen": any(ports::SIDECAR_OUTBOUND) },
        "inbound": { "listen": any(ports::SIDECAR_INBOUND), "app_ports": app_ports },
        "admin": any(ports::SIDECAR_ADMIN),
    });
    serde_json::from_value(cfg).map_err(|e| vec![e.to_string()])
}

pub async fn sidecar(args: Args) -> anyhow::Result<ExitCode> {
    let path = args.config.as_ref().map_or_else(
        || "environment (--kubernetes)".to_string(),
        |p| p.display().to_string(),
    );
    let err = |problems| fedmesh_sidecar::ConfigError {
        path: path.clone(),
        problems,
    };
    // Kept raw too: renewed SVIDs are written back to its identity files.
    let raw: SidecarConfig = match &args.config {
        Some(config) => fedmesh_transport::read_yaml(config).map_err(err)?,
        None => kubernetes_sidecar().map_err(err)?,
    };
    let settings = raw.settings().map_err(err)?;
    tracing::info!(?settings.limits, identity = %settings.identity.id(), "effective sidecar config");
    if args.check {
        println!("config ok: sidecar {}", settings.identity.id());
        return Ok(ExitCode::SUCCESS);
    }
    let app = SidecarApp::build(settings, &raw.identity, &mut Registry::default()).await?;
    let sc = app.sidecar();
    for o in sc.outbound() {
        println!("outbound {} -> {}:{}", o.listen, o.service.host(), o.port);
    }
    if let Some(a) = sc.inbound_addr() {
        println!("inbound {a} as {}", sc.identity());
    }
    until_signal().await?;
    app.shutdown();
    Ok(ExitCode::SUCCESS)
}
