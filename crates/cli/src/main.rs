//! `fedmesh`: the daemons (`gateway`, `sidecar`) and operator commands
//! (`demo`, `ca`, `trust`). Each subcommand is a thin layer over the
//! libraries; see `fedmesh --help`.

mod ca;
mod control;
mod daemons;
mod demo;
mod deploy;
mod drill;
mod federation;
mod leader;
mod logging;
mod progress;
mod trust;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fedmesh",
    version,
    about = "Multi-cluster service mesh: east-west QUIC gateways, sidecars, SPIFFE trust",
    long_about = "fedmesh connects Kubernetes clusters into one mesh. East-west gateways carry \
traffic between clusters over QUIC with mutual TLS; sidecars carry in-cluster traffic over mTLS; \
every workload has a SPIFFE identity issued by its cluster's own CA.\n\n\
Start with `fedmesh demo`: three clusters on loopback, real QUIC and mTLS, a report at the end."
)]
struct Cli {
    /// Log filter (RUST_LOG syntax: a level, or TARGET=LEVEL pairs), e.g.
    /// `info` or `warn,fedmesh_gateway=debug`. Without it: -v, then the
    /// FEDMESH_LOG and RUST_LOG variables, then the command's default
    /// (daemons `info` without the access log, demo and drills nothing,
    /// other commands `warn`).
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    /// More log lines on stderr: -v info, -vv debug for fedmesh (and the
    /// access log), -vvv trace.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, conflicts_with = "log")]
    verbose: u8,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run three clusters (east, west, north) in this process and send traffic across them.
    Demo(demo::Args),
    /// Create root CAs and issue X.509-SVIDs.
    #[command(subcommand)]
    Ca(ca::Command),
    /// Get an SVID from a cluster's controller with a bootstrap token.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Inspect and verify certificates against trust bundles.
    #[command(subcommand)]
    Trust(trust::Command),
    /// Run an east-west gateway from YAML (static catalog, or following a controller).
    Gateway(daemons::Args),
    /// Run a sidecar from YAML (static catalog, or following a controller).
    Sidecar(daemons::Args),
    /// Run a cluster's federation controller.
    Controller(federation::ControllerArgs),
    /// Admit clusters and list the federation.
    #[command(subcommand)]
    Cluster(federation::ClusterCmd),
    /// List exported services.
    #[command(subcommand)]
    Services(federation::ServicesCmd),
    /// One table: clusters, gateways, exports, imports, bundles, last publish, conflicts.
    Status(federation::StatusArgs),
    /// Print one cluster's Kubernetes manifests (apply with `kubectl apply -f -`).
    Install(Box<deploy::InstallArgs>),
    /// Add the fedmesh sidecar to the workloads of a YAML stream (stdin to stdout).
    Inject(deploy::InjectArgs),
    /// Remove what `fedmesh inject` added.
    Uninject(deploy::UninjectArgs),
    /// Send this network namespace's outbound TCP through the sidecar
    /// (what the injected init container runs).
    Redirect(deploy::RedirectArgs),
    /// Rehearse failures under load and measure what callers see.
    #[command(subcommand)]
    Drill(drill::Command),
}

#[derive(Subcommand)]
enum CertCmd {
    /// First contact: a CSR for `--spiffe-id`, authorized by a bootstrap
    /// token; writes svid.pem, svid.key (0600) and bundle.pem into `--out`.
    /// Renewal afterwards is automatic for proxies with a `controller` section.
    Request {
        /// The controller's API address (`ip:port` or `name:port`).
        #[arg(long)]
        controller: fedmesh_api::addr::HostPort,
        /// This cluster's trust bundle (PEM): the controller must chain to it.
        #[arg(long)]
        bundle: std::path::PathBuf,
        #[arg(long)]
        spiffe_id: fedmesh_trust::SpiffeId,
        /// File holding the bootstrap token.
        #[arg(
            long,
            required_unless_present = "k8s_token_file",
            conflicts_with = "k8s_token_file"
        )]
        token_file: Option<std::path::PathBuf>,
        /// A Kubernetes service account token (projected, audience
        /// `fedmesh`) instead: the controller asks the API server whose it is.
        #[arg(long)]
        k8s_token_file: Option<std::path::PathBuf>,
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    // Before any thread starts (`fedmesh_malloc::tune`).
    let malloc = fedmesh_malloc::tune();
    let cli = Cli::parse();
    let loudness = match cli.command {
        Command::Gateway(_) | Command::Sidecar(_) | Command::Controller(_) => {
            logging::Loudness::Daemon
        }
        Command::Demo(_) | Command::Drill(_) => logging::Loudness::Report,
        _ => logging::Loudness::Command,
    };
    match logging::choose(cli.log.as_deref(), cli.verbose, loudness, |k| {
        std::env::var(k).ok()
    }) {
        Ok(filter) => logging::init(filter, cli.log_json),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    tracing::debug!(?malloc, "allocator settings");
    let result = match cli.command {
        Command::Ca(c) => ca::run(c),
        Command::Trust(c) => return trust::run(c),
        Command::Cert(CertCmd::Request {
            controller,
            bundle,
            spiffe_id,
            token_file,
            k8s_token_file,
            out,
        }) => runtime().and_then(|rt| {
            let token = match (token_file, k8s_token_file) {
                (_, Some(k)) => control::Token::Kubernetes(k),
                (Some(t), None) => control::Token::Bootstrap(t),
                (None, None) => anyhow::bail!("--token-file or --k8s-token-file"),
            };
            rt.block_on(control::request(
                &controller,
                &bundle,
                spiffe_id,
                &token,
                out,
            ))
        }),
        Command::Install(a) => deploy::install(*a),
        Command::Inject(a) => deploy::inject(a),
        Command::Uninject(a) => deploy::uninject(a),
        Command::Redirect(a) => deploy::redirect(a),
        Command::Demo(a) => runtime().and_then(|rt| rt.block_on(demo::run(a))),
        Command::Drill(c) => runtime().and_then(|rt| rt.block_on(drill::run(c))),
        Command::Gateway(a) => {
            runtime_with(a.worker_threads).and_then(|rt| rt.block_on(daemons::gateway(a)))
        }
        Command::Sidecar(a) => {
            runtime_with(a.worker_threads).and_then(|rt| rt.block_on(daemons::sidecar(a)))
        }
        Command::Controller(a) => runtime().and_then(|rt| rt.block_on(federation::controller(a))),
        Command::Cluster(federation::ClusterCmd::Join { pins, name, bundle }) => {
            federation::join(pins, name, bundle)
        }
        Command::Cluster(federation::ClusterCmd::List(a)) => {
            runtime().and_then(|rt| rt.block_on(federation::cluster_list(a)))
        }
        Command::Services(federation::ServicesCmd::List { store, cluster }) => {
            runtime().and_then(|rt| rt.block_on(federation::services_list(store, cluster)))
        }
        Command::Status(a) => runtime().and_then(|rt| rt.block_on(federation::status(a))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes command output to stdout; a reader that went away (`| head`)
/// is not an error worth a panic.
pub(crate) fn emit(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// A runtime with `workers` threads, or tokio's default (one per CPU).
fn runtime_with(workers: Option<u16>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(usize::from(n));
    }
    Ok(b.enable_all().build()?)
}
