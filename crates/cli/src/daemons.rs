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
    /// Gateway: on SIGTERM/SIGINT, refuse new streams from peers (they go
    /// elsewhere before any payload; `/ready` turns 503) and let open ones
    /// run this long before stopping. A second signal stops at once.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: std::time::Duration,
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
    let err = |problems| fedmesh_gateway::ConfigError {
        path: args.config.display().to_string(),
        problems,
    };
    // Kept raw too: renewed SVIDs are written back to its identity files.
    let raw: GatewayConfig = fedmesh_transport::read_yaml(&args.config).map_err(err)?;
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
    let mut registry = Registry::default();
    let link = settings.controller.clone();
    let bundles = settings.bundles.clone();
    let gw = std::sync::Arc::new(Gateway::build(settings, &mut registry).await?);
    let _follower = match &link {
        Some(link) => {
            let g = gw.clone();
            Some(crate::control::follow(
                link,
                "gateway",
                gw.identity_source(),
                bundles,
                &raw.identity,
                move |c, v| g.set_config(c, v),
            )?)
        }
        None => None,
    };
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
    drop(_follower);
    match std::sync::Arc::try_unwrap(gw) {
        Ok(gw) => gw.shutdown().await,
        Err(gw) => gw.close(),
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn sidecar(args: Args) -> anyhow::Result<ExitCode> {
    let err = |problems| fedmesh_sidecar::ConfigError {
        path: args.config.display().to_string(),
        problems,
    };
    // Kept raw too: renewed SVIDs are written back to its identity files.
    let raw: SidecarConfig = fedmesh_transport::read_yaml(&args.config).map_err(err)?;
    let settings = raw.settings().map_err(err)?;
    tracing::info!(?settings.limits, identity = %settings.identity.id(), "effective sidecar config");
    if args.check {
        println!("config ok: sidecar {}", settings.identity.id());
        return Ok(ExitCode::SUCCESS);
    }
    let mut registry = Registry::default();
    let link = settings.controller.clone();
    let bundles = settings.bundles.clone();
    let sc = std::sync::Arc::new(Sidecar::build(settings, &mut registry).await?);
    let _follower = match &link {
        Some(link) => {
            let s = sc.clone();
            Some(crate::control::follow(
                link,
                &format!("sidecar/{}", sc.identity()),
                sc.identity_source(),
                bundles,
                &raw.identity,
                move |c, v| s.set_config(c, v),
            )?)
        }
        None => None,
    };
    for o in sc.outbound() {
        println!("outbound {} -> {}:{}", o.listen, o.service.host(), o.port);
    }
    if let Some(a) = sc.inbound_addr() {
        println!("inbound {a} as {}", sc.identity());
    }
    until_signal().await?;
    drop(_follower);
    if let Ok(sc) = std::sync::Arc::try_unwrap(sc) {
        sc.shutdown();
    }
    Ok(ExitCode::SUCCESS)
}
