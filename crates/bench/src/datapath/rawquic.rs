//! The raw quinn path: one QUIC connection with a gateway's TLS,
//! transport and UDP socket buffer settings (quinn's own socket), and no
//! proxy. Its server end
//! is `fedmesh-bench quic-peer`, a separate process that runs the app on
//! each stream it accepts.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use fedmesh_gateway::{quic_baseline_endpoint, GatewayConfig, GatewaySettings};

/// What the peer prints once it listens.
pub const UP: &str = "quic-peer listening on";

fn settings(config: &Path) -> anyhow::Result<GatewaySettings> {
    GatewayConfig::load(config).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `fedmesh-bench quic-peer --config GATEWAY_YAML`: serves the app on
/// every stream of every connection until killed.
pub async fn serve(config: &Path) -> anyhow::Result<()> {
    let s = settings(config)?;
    let id = fedmesh_trust::SvidSource::new(s.identity.clone())?;
    let server =
        fedmesh_gateway::quic_server_config(&id, s.bundles.clone(), &s.limits, &s.congestion)?;
    let ep = quic_baseline_endpoint(s.quic, Some(server), &s.limits)?;
    println!("{UP} {}", ep.local_addr()?);
    while let Some(incoming) = ep.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(super::load::app(tokio::io::join(recv, send)));
            }
        });
    }
    Ok(())
}

/// Connects to a `quic-peer` at `addr` as the gateway of `config`.
pub async fn connect(
    config: &Path,
    addr: SocketAddr,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let s = settings(config)?;
    let id = fedmesh_trust::SvidSource::new(s.identity.clone())?;
    let client =
        fedmesh_gateway::quic_client_config(&id, s.bundles.clone(), &s.limits, &s.congestion)?;
    let mut ep = quic_baseline_endpoint("127.0.0.1:0".parse()?, None, &s.limits)?;
    ep.set_default_client_config(client);
    let conn = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        ep.connect(addr, "fedmesh.invalid")?,
    )
    .await
    .context("no QUIC handshake with the quic-peer within 10 s")??;
    Ok((ep, conn))
}
