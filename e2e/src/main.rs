//! `fedmesh-e2e`: the multi-process rig (see `rig.rs`) and its scenarios.
//!
//! `fedmesh-e2e run [SCENARIO…] [--quick] [--json FILE] [--report drill.html] [--net auto|netns|loopback]`
//! builds the rig (in network namespaces when root with `ip`),
//! runs the scenarios in order on it, prints a table per scenario and a
//! final PASS/FAIL line, and tears everything down (also on Ctrl-C or
//! SIGTERM). `fedmesh-e2e app …` is one of the rig's apps.

mod netns;
mod probe;
mod rig;
mod scenarios;
mod selftest;
mod wan;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Net {
    Auto,
    Netns,
    Loopback,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the rig and run scenarios (all of them when none is named).
    Run {
        scenarios: Vec<String>,
        /// Short durations (CI).
        #[arg(long)]
        quick: bool,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The `drill` scenario's HTML page (default: beside `--json`).
        #[arg(long)]
        report: Option<PathBuf>,
        /// The `fedmesh` binary (default: beside this one, or $FEDMESH_BIN).
        #[arg(long)]
        fedmesh: Option<PathBuf>,
        /// `netns`: a network namespace per cluster (root, `ip`); `loopback`:
        /// 127.0.x.1 addresses; `auto`: namespaces when possible.
        #[arg(long, value_enum, default_value_t = Net::Auto)]
        net: Net,
    },
    /// Serve one app (the rig starts these as processes).
    App {
        /// `echo` (banner, then echo), `http`, or `sink` (reads until EOF,
        /// then answers the byte count as 8 bytes big-endian).
        #[arg(long)]
        kind: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Check the packet-level WAN emulator (root): two namespaces joined
    /// by it, 30 ms RTT and 1 % loss each way; observed loss, RTT and one
    /// TCP flow's goodput against the Mathis estimate.
    WanSelftest {
        /// How long the TCP flow runs.
        #[arg(long, default_value_t = 20)]
        tcp_secs: u64,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A measuring end the rig runs inside a namespace (WAN self-test).
    #[command(hide = true)]
    Probe {
        #[command(subcommand)]
        probe: probe::Probe,
    },
}

fn main() -> ExitCode {
    let filter = std::env::var("FEDMESH_LOG").unwrap_or_else(|_| "fedmesh_e2e=info".into());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(real_main(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::WanSelftest { tcp_secs, json } => {
            if let Err(why) = netns::usable() {
                println!("WAN self-test skipped: {why} (it needs network namespaces)");
                return Ok(ExitCode::SUCCESS);
            }
            netns::clean_stale();
            let ns = netns::Netns::create(&["east", "west"])?;
            let wan = wan::Wan::create(ns.members())?;
            wan.attach("cubic")?;
            println!("{}", wan.describe());
            let m = ns.members();
            let (a, b) = (&m[0], &m[1]);
            let me = std::env::current_exe()?;
            let t =
                selftest::run(&wan, &me, (&a.0, &a.1, a.2), (&b.0, &b.1, b.2), tcp_secs).await?;
            println!("{}", t.summary());
            println!("  packets for no member on the WAN: {}", wan.unroutable());
            for (what, ok, detail) in &t.checks {
                println!("  [{}] {what}: {detail}", if *ok { "ok" } else { "FAIL" });
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&t)?)
                    .with_context(|| path.display().to_string())?;
            }
            drop(wan);
            drop(ns);
            Ok(if t.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Probe { probe } => {
            probe::run(probe).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::App { kind, name, listen } => {
            let kind = match kind.as_str() {
                "echo" => fedmesh_testkit::AppKind::Echo,
                "http" => fedmesh_testkit::AppKind::Http,
                "sink" => fedmesh_testkit::AppKind::Sink,
                other => anyhow::bail!("unknown app kind {other:?} (echo, http, sink)"),
            };
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tokio::select! {
                _ = fedmesh_testkit::serve_app(kind, l, name) => {}
                _ = signal() => {}
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            scenarios,
            quick,
            json,
            report,
            fedmesh,
            net,
        } => {
            let names: Vec<String> = if scenarios.is_empty() {
                scenarios::ALL.iter().map(|s| (*s).to_owned()).collect()
            } else {
                scenarios
            };
            for n in &names {
                if scenarios::NOT_YET.contains(&n.as_str()) {
                    anyhow::bail!("scenario {n} is not built yet (see e2e/README.md)");
                }
                if !scenarios::ALL.contains(&n.as_str())
                    && !scenarios::ON_REQUEST.contains(&n.as_str())
                {
                    anyhow::bail!(
                        "unknown scenario {n:?}; known: {}, and on request {}",
                        scenarios::ALL.join(", "),
                        scenarios::ON_REQUEST.join(", ")
                    );
                }
            }
            let me = std::env::current_exe()?;
            let fedmesh = fedmesh
                .or_else(|| std::env::var_os("FEDMESH_BIN").map(PathBuf::from))
                .or_else(|| me.parent().map(|d| d.join("fedmesh")))
                .filter(|p| p.exists())
                .context(
                    "no fedmesh binary: build it (cargo build -p fedmesh-cli) or pass --fedmesh",
                )?;
            let etcd = fedmesh_testkit::etcd::etcd_binary()
                .context("etcd is not installed (apt-get install etcd-server)")?;
            let ns = match (net, netns::usable()) {
                (Net::Loopback, _) => None,
                (Net::Netns, Err(why)) => anyhow::bail!("--net netns: {why}"),
                (Net::Auto, Err(why)) => {
                    println!("network namespaces skipped ({why}): using loopback addresses");
                    None
                }
                (_, Ok(())) => {
                    netns::clean_stale();
                    match netns::Netns::create(&rig::CLUSTERS) {
                        Ok(n) => Some(n),
                        Err(e) if net == Net::Auto => {
                            println!(
                                "network namespaces skipped ({e:#}): using loopback addresses"
                            );
                            None
                        }
                        Err(e) => return Err(e.context("creating network namespaces")),
                    }
                }
            };
            match &ns {
                Some(n) => println!("rig: 3 clusters in {}", n.describe()),
                None => println!(
                    "rig: 3 clusters on 127.0.11.1, 127.0.12.1, 127.0.13.1 (loopback; cuts by the relays)"
                ),
            }
            println!("3-member etcd; fedmesh {}", fedmesh.display());
            let run = async {
                let t0 = std::time::Instant::now();
                let in_netns = ns.is_some();
                // Short-lived SVIDs: every scenario runs with renewals going
                // on, and `root-rotation` sees every proxy renew in time.
                let ttl = std::time::Duration::from_secs(if quick { 60 } else { 120 });
                let mut rig = match rig::Rig::start(&fedmesh, &me, etcd.clone(), ns, ttl).await {
                    Ok(r) => r,
                    // A host firewall may keep namespaces from reaching the
                    // bridge; `auto` then runs the same rig on loopback.
                    Err(e) if in_netns && net == Net::Auto => {
                        println!(
                            "rig in network namespaces failed ({e:#}); using loopback addresses"
                        );
                        rig::Rig::start(&fedmesh, &me, etcd, None, ttl).await?
                    }
                    Err(e) => return Err(e),
                };
                println!(
                    "rig up in {:.1} s ({})",
                    t0.elapsed().as_secs_f64(),
                    rig.dir.path().display()
                );
                let p = scenarios::Params {
                    quick,
                    report: json.clone(),
                    drill_page: report.clone(),
                };
                let mut outcomes = Vec::new();
                for n in &names {
                    let o = scenarios::run(&mut rig, n, &p).await?;
                    print!("{}", scenarios::render(&o));
                    if !o.passed {
                        for c in rig::CLUSTERS {
                            for who in ["web", "gateway"] {
                                let name = format!("{c}-{who}");
                                eprintln!("--- {name} log (tail)\n{}", rig.log_tail(&name, 8));
                            }
                        }
                    }
                    outcomes.push(o);
                }
                Ok::<_, anyhow::Error>(outcomes)
            };
            let outcomes = tokio::select! {
                r = run => r?,
                _ = signal() => {
                    eprintln!("interrupted: tearing the rig down");
                    return Ok(ExitCode::from(130));
                }
            };
            let passed = outcomes.iter().all(|o| o.passed);
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&outcomes)?)
                    .with_context(|| path.display().to_string())?;
            }
            println!(
                "{}: {} of {} scenarios passed",
                if passed { "PASS" } else { "FAIL" },
                outcomes.iter().filter(|o| o.passed).count(),
                outcomes.len()
            );
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
