//! `fedmesh gateway` and `fedmesh sidecar`: run a daemon from static YAML
//! until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use fedmesh_gateway::{Gateway, GatewayConfig};
use fedmesh_sidecar::{Sidecar, SidecarConfig};
use prometheus_client::registry::Registry;

#[derive(clap::Args)]
pub struct Args {
    /// YAML config file (see docs/operations.md for the format).
    #[arg(long)]
    config: PathBuf,
    /// Validate the config, print the effective settings and exit.
    #[arg(long)]
    check: bool,
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
    let settings = GatewayConfig::load(&args.config)?;
    tracing::info!(?settings.limits, cluster = %settings.catalog.cluster, "effective gateway config");
    if args.check {
        println!(
            "config ok: gateway {} of cluster {}",
            settings.identity.id(),
            settings.catalog.cluster
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut registry = Registry::default();
    let gw = Gateway::build(settings, &mut registry).await?;
    println!(
        "gateway up: quic {} tunnel {}{}",
        gw.quic_addr(),
        gw.tunnel_addr(),
        gw.admin_addr()
            .map(|a| format!(" admin http://{a}/metrics"))
            .unwrap_or_default()
    );
    until_signal().await?;
    gw.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub async fn sidecar(args: Args) -> anyhow::Result<ExitCode> {
    let settings = SidecarConfig::load(&args.config)?;
    tracing::info!(?settings.limits, identity = %settings.identity.id(), "effective sidecar config");
    if args.check {
        println!("config ok: sidecar {}", settings.identity.id());
        return Ok(ExitCode::SUCCESS);
    }
    let mut registry = Registry::default();
    let sc = Sidecar::build(settings, &mut registry).await?;
    for o in sc.outbound() {
        println!("outbound {} -> {}:{}", o.listen, o.service.host(), o.port);
    }
    if let Some(a) = sc.inbound_addr() {
        println!("inbound {a} as {}", sc.identity());
    }
    until_signal().await?;
    sc.shutdown();
    Ok(ExitCode::SUCCESS)
}
