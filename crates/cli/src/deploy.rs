//! `fedmesh install`, `fedmesh inject`, `fedmesh uninject`: thin layers
//! over `fedmesh-deploy`. Output goes to stdout only when the whole input
//! was good; problems go to stderr with exit 2.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use fedmesh_deploy::inject::{self, InjectOptions, Outcome};
use fedmesh_deploy::install::{
    CaFiles, ClusterSetSpec, GatewaySpec, InstallSpec, StoreSpec, StoreTlsFiles,
};

const DEFAULT_IMAGE: &str = concat!("ghcr.io/fedmesh/fedmesh:", env!("CARGO_PKG_VERSION"));

#[derive(clap::Args)]
pub struct InstallArgs {
    /// This cluster's name (RFC 1123 label).
    #[arg(long, required_unless_present = "terraform")]
    cluster: Option<String>,
    /// This cluster's SPIFFE trust domain (`east.acme`).
    #[arg(long, required_unless_present = "terraform")]
    trust_domain: Option<String>,
    /// etcd client URLs of the federation store, comma-separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "terraform")]
    store: Vec<String>,
    /// PEM CA that signs etcd's server certificates (endpoints then https://).
    #[arg(long)]
    store_ca: Option<PathBuf>,
    /// Client certificate and key for etcd's --client-cert-auth.
    #[arg(long, requires = "store_key")]
    store_cert: Option<PathBuf>,
    #[arg(long, requires = "store_cert")]
    store_key: Option<PathBuf>,
    #[arg(long)]
    store_server_name: Option<String>,
    /// The cluster CA directory (`fedmesh ca init --out DIR`).
    #[arg(long, required_unless_present = "terraform")]
    ca: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_IMAGE)]
    image: String,
    #[arg(long, default_value = "IfNotPresent")]
    pull_policy: String,
    /// Gateway Service type: LoadBalancer, NodePort or ClusterIP.
    #[arg(long, default_value = "LoadBalancer")]
    gateway_service_type: String,
    /// Gateway Service annotation `key=value` (repeatable), e.g. for a
    /// cloud load balancer.
    #[arg(long = "gateway-annotation", value_parser = parse_kv)]
    gateway_annotations: Vec<(String, String)>,
    /// The QUIC address peers reach this cluster's gateways at (a reserved
    /// load balancer IP, or a node's IP and the node port). Without it (a
    /// LoadBalancer only) the controller advertises the address the load
    /// balancer gets.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// The TCP fallback address peers reach (default: the advertised IP
    /// with the fallback port or node port).
    #[arg(long)]
    advertise_tcp: Option<SocketAddr>,
    /// NodePort Service: the node ports of QUIC and the TCP fallback (`30443,30444`).
    #[arg(long, value_parser = parse_pair)]
    node_ports: Option<(u16, u16)>,
    #[arg(long, default_value_t = 2)]
    gateway_replicas: u32,
    #[arg(long, default_value_t = 2)]
    controller_replicas: u32,
    /// Allocate ClusterSet IPs from this CIDR (repeatable: one per IP
    /// family) and serve `clusterset.local` from the controller (Service
    /// `fedmesh-dns`).
    #[arg(long = "clusterset-cidr")]
    clusterset_cidrs: Vec<String>,
    /// CoreDNS's ConfigMap, which the controller keeps forwarding
    /// `clusterset.local` to `fedmesh-dns` (`none`: leave CoreDNS alone).
    #[arg(
        long,
        default_value = "kube-system/coredns",
        requires = "clusterset_cidrs"
    )]
    coredns_configmap: String,
    /// Let this principal set faults through the gateways' drill API
    /// (mTLS, port 15022, headless Service `fedmesh-gateway-drills`);
    /// repeatable. None: no drill API.
    #[arg(long = "drill-operator")]
    drill_operators: Vec<String>,
    /// Admit a peer cluster: `NAME=BUNDLE.pem` (repeatable).
    #[arg(long = "peer", value_parser = parse_kv)]
    peers: Vec<(String, String)>,
    /// Terraform `external` data source protocol: read the settings as one
    /// JSON object of strings on stdin, print `{"manifests", "bundle_fingerprint"}`.
    #[arg(long, conflicts_with_all = ["cluster", "trust_domain", "store", "ca", "advertise"])]
    terraform: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}`: expected KEY=VALUE"))
}

fn parse_pair(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("`{s}`: expected QUIC,TCP (two node ports)"))?;
    let p = |x: &str| {
        x.trim()
            .parse::<u16>()
            .map_err(|_| format!("`{x}`: not a port number"))
    };
    Ok((p(a)?, p(b)?))
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

pub fn install(a: InstallArgs) -> anyhow::Result<ExitCode> {
    let terraform = a.terraform;
    let spec = if terraform {
        let mut q = String::new();
        std::io::stdin().read_to_string(&mut q)?;
        match from_query(&q) {
            Ok(s) => s,
            Err(e) => return Ok(usage(e)),
        }
    } else {
        match from_args(a) {
            Ok(s) => s,
            Err(e) => return Ok(usage(format!("{e:#}"))),
        }
    };
    if let Err(e) = spec.validate() {
        return Ok(usage(format!("nothing rendered:\n{e}")));
    }
    let objects = match spec.render() {
        Ok(o) => o,
        Err(e) => return Ok(usage(e)),
    };
    let yaml = fedmesh_deploy::install::to_yaml(&objects)?;
    if terraform {
        // Validated above, so the CA checks out.
        let fingerprint = spec
            .ca
            .check(&spec.trust_domain)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        crate::emit(
            &serde_json::json!({ "manifests": yaml, "bundle_fingerprint": fingerprint })
                .to_string(),
        );
    } else {
        crate::emit(&yaml);
    }
    Ok(ExitCode::SUCCESS)
}

fn read(p: &PathBuf) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| p.display().to_string())
}

fn from_args(a: InstallArgs) -> anyhow::Result<InstallSpec> {
    let missing = |f: &str| anyhow::anyhow!("--{f} is required");
    let ca_dir = a.ca.ok_or_else(|| missing("ca"))?;
    let ca = CaFiles::read_dir(&ca_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tls = match &a.store_ca {
        None => None,
        Some(ca) => Some(StoreTlsFiles {
            ca: read(ca)?,
            cert: a.store_cert.as_ref().map(read).transpose()?,
            key: a.store_key.as_ref().map(read).transpose()?,
            server_name: a.store_server_name.clone(),
        }),
    };
    let mut peers = BTreeMap::new();
    for (name, path) in a.peers {
        let pem = read(&PathBuf::from(&path)).with_context(|| format!("peer `{name}`"))?;
        if peers.insert(name.clone(), pem).is_some() {
            anyhow::bail!("peer `{name}` given twice");
        }
    }
    Ok(InstallSpec {
        cluster: a.cluster.ok_or_else(|| missing("cluster"))?,
        trust_domain: a.trust_domain.ok_or_else(|| missing("trust-domain"))?,
        store: StoreSpec {
            endpoints: a.store,
            tls,
        },
        image: a.image,
        pull_policy: a.pull_policy,
        ca,
        gateway: GatewaySpec {
            service_type: a.gateway_service_type,
            annotations: a.gateway_annotations.into_iter().collect(),
            advertise: a.advertise,
            advertise_tcp: a.advertise_tcp,
            node_ports: a.node_ports,
            replicas: a.gateway_replicas,
        },
        controller_replicas: a.controller_replicas,
        peers,
        clusterset: clusterset(a.clusterset_cidrs, &a.coredns_configmap),
        drill_operators: a.drill_operators,
    })
}

/// ClusterSet IPs and DNS when CIDRs are given; `none` keeps CoreDNS as
/// it is.
fn clusterset(cidrs: Vec<String>, coredns: &str) -> Option<ClusterSetSpec> {
    (!cidrs.is_empty()).then(|| ClusterSetSpec {
        cidrs,
        coredns: (coredns != "none").then(|| coredns.to_owned()),
    })
}

/// The Terraform module's query: every value a string (the `external`
/// protocol); lists and maps as JSON text.
fn from_query(q: &str) -> Result<InstallSpec, String> {
    let m: BTreeMap<String, String> =
        serde_json::from_str(q).map_err(|e| format!("query: not a JSON object of strings: {e}"))?;
    let get = |k: &str| m.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let need = |k: &str| get(k).ok_or_else(|| format!("query: `{k}` is required"));
    let json_of = |k: &str| -> Result<Option<serde_json::Value>, String> {
        get(k)
            .map(|v| serde_json::from_str(v).map_err(|e| format!("query: `{k}`: {e}")))
            .transpose()
    };
    let num = |k: &str, d: u32| -> Result<u32, String> {
        get(k).map_or(Ok(d), |v| {
            v.parse().map_err(|_| format!("query: `{k}`: not a number"))
        })
    };
    let addr = |k: &str| -> Result<Option<SocketAddr>, String> {
        get(k)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("query: `{k}`: `{v}` is not IP:PORT"))
            })
            .transpose()
    };
    let endpoints: Vec<String> = json_of("store_endpoints")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| format!("query: `store_endpoints`: {e}"))?
        .unwrap_or_default();
    let annotations: BTreeMap<String, String> = json_of("gateway_annotations")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| format!("query: `gateway_annotations`: {e}"))?
        .unwrap_or_default();
    let peers: BTreeMap<String, String> = json_of("peers")?
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| format!("query: `peers`: {e}"))?
        .unwrap_or_default();
    let node_ports = get("gateway_node_ports").map(parse_pair).transpose()?;
    let ca_pem = need("ca_cert_pem")?.to_owned();
    Ok(InstallSpec {
        cluster: need("cluster")?.to_owned(),
        trust_domain: need("trust_domain")?.to_owned(),
        store: StoreSpec {
            endpoints,
            tls: get("store_ca_pem").map(|ca| StoreTlsFiles {
                ca: ca.to_owned(),
                cert: get("store_cert_pem").map(str::to_owned),
                key: get("store_key_pem").map(str::to_owned),
                server_name: get("store_server_name").map(str::to_owned),
            }),
        },
        image: get("image").unwrap_or(DEFAULT_IMAGE).to_owned(),
        pull_policy: get("pull_policy").unwrap_or("IfNotPresent").to_owned(),
        ca: CaFiles {
            ca_key: need("ca_key_pem")?.to_owned(),
            chain_pem: get("ca_chain_pem").unwrap_or_default().to_owned(),
            bundle_pem: get("bundle_pem").unwrap_or(&ca_pem).to_owned(),
            ca_pem,
        },
        gateway: GatewaySpec {
            service_type: get("gateway_service_type")
                .unwrap_or("LoadBalancer")
                .to_owned(),
            annotations,
            advertise: addr("gateway_advertise")?,
            advertise_tcp: addr("gateway_advertise_tcp")?,
            node_ports,
            replicas: num("gateway_replicas", 2)?,
        },
        controller_replicas: num("controller_replicas", 2)?,
        peers,
        clusterset: clusterset(
            json_of("clusterset_cidrs")?
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| format!("query: `clusterset_cidrs`: {e}"))?
                .unwrap_or_default(),
            get("coredns_configmap").unwrap_or("kube-system/coredns"),
        ),
        drill_operators: json_of("drill_operators")?
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| format!("query: `drill_operators`: {e}"))?
            .unwrap_or_default(),
    })
}

#[derive(clap::Args)]
pub struct InjectArgs {
    /// YAML to read (default: stdin); the result goes to stdout.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
    /// The cluster the workloads run in.
    #[arg(long)]
    cluster: String,
    /// The cluster's trust bundle (PEM, `bundle.pem` of its CA): sidecars
    /// check their controller against it at first contact.
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long, default_value = DEFAULT_IMAGE)]
    image: String,
    #[arg(long, default_value = "IfNotPresent")]
    pull_policy: String,
    /// Outbound destination ports the redirect leaves alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    skip_outbound_ports: Vec<u16>,
    /// Outbound destination networks the redirect leaves alone (`169.254.169.254/32`).
    #[arg(long, value_delimiter = ',')]
    skip_outbound_cidrs: Vec<fedmesh_deploy::redirect::Cidr>,
}

#[derive(clap::Args)]
pub struct UninjectArgs {
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
}

fn input(file: &Option<PathBuf>) -> anyhow::Result<String> {
    match file {
        Some(p) => read(p),
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            Ok(s)
        }
    }
}

fn report(reports: &[inject::Report]) {
    for r in reports {
        let what = match &r.outcome {
            Outcome::Injected => "injected".to_string(),
            Outcome::Uninjected => "uninjected".to_string(),
            Outcome::Unchanged => "unchanged".to_string(),
            Outcome::NotAWorkload => "not a workload, passed through".to_string(),
            Outcome::Skipped(why) => format!("skipped ({why})"),
        };
        eprintln!("{} {}: {what}", r.kind.to_lowercase(), r.name);
    }
}

pub fn inject(a: InjectArgs) -> anyhow::Result<ExitCode> {
    if let Err(e) = fedmesh_deploy::names::image(&a.image).and_then(|()| {
        fedmesh_deploy::names::one_of(
            "image pull policy",
            &a.pull_policy,
            fedmesh_deploy::names::PULL_POLICIES,
        )
    }) {
        return Ok(usage(e));
    }
    if let Err(e) = fedmesh_deploy::names::cluster_name(&a.cluster) {
        return Ok(usage(e));
    }
    let bundle_pem = read(&a.bundle)?;
    let trust_domain = match fedmesh_deploy::install::check_peer_bundle(&a.cluster, &bundle_pem) {
        Ok(td) => td,
        Err(e) => return Ok(usage(e)),
    };
    let text = input(&a.file)?;
    let opts = InjectOptions {
        image: a.image,
        pull_policy: a.pull_policy,
        cluster: a.cluster,
        bundle_pem,
        trust_domain,
        skip_outbound_ports: a.skip_outbound_ports,
        skip_outbound_cidrs: a
            .skip_outbound_cidrs
            .iter()
            .map(ToString::to_string)
            .collect(),
    };
    match inject::inject(&text, &opts) {
        Ok((out, reports)) => {
            crate::emit(&out);
            report(&reports);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(usage(format!("nothing written: {e}"))),
    }
}

pub fn uninject(a: UninjectArgs) -> anyhow::Result<ExitCode> {
    let text = input(&a.file)?;
    match inject::uninject(&text) {
        Ok((out, reports)) => {
            crate::emit(&out);
            report(&reports);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(usage(format!("nothing written: {e}"))),
    }
}

#[derive(clap::Args)]
pub struct RedirectArgs {
    /// The sidecar's UID: its own connections are not redirected.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The sidecar's transparent outbound listener port.
    #[arg(long, default_value_t = fedmesh_deploy::ports::SIDECAR_OUTBOUND)]
    outbound_port: u16,
    /// Destination ports left alone (comma-separated).
    #[arg(long, value_delimiter = ',')]
    skip_ports: Vec<u16>,
    /// Destination networks left alone (comma-separated CIDRs).
    #[arg(long, value_delimiter = ',')]
    skip_cidrs: Vec<fedmesh_deploy::redirect::Cidr>,
    /// Print the nftables script instead of applying it.
    #[arg(long)]
    dry_run: bool,
    /// Remove the redirect.
    #[arg(long, conflicts_with_all = ["skip_ports", "skip_cidrs"])]
    undo: bool,
}

/// `fedmesh redirect`: the init container's job, in the pod's network
/// namespace (needs CAP_NET_ADMIN and the `nft` binary).
pub fn redirect(a: RedirectArgs) -> anyhow::Result<ExitCode> {
    use fedmesh_deploy::redirect::RedirectSpec;
    if a.outbound_port == 0 {
        return Ok(usage("--outbound-port: must be 1-65535"));
    }
    let script = if a.undo {
        RedirectSpec::undo_script()
    } else {
        RedirectSpec {
            proxy_uid: a.proxy_uid,
            outbound_port: a.outbound_port,
            skip_ports: a.skip_ports,
            skip_cidrs: a.skip_cidrs,
        }
        .nft_script()
    };
    if a.dry_run {
        crate::emit(&script);
        return Ok(ExitCode::SUCCESS);
    }
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft (the image ships it; elsewhere install nftables)")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(script.as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        anyhow::bail!("nft refused the redirect ({status}); the script was:\n{script}");
    }
    crate::emit(&if a.undo {
        "redirect removed\n".to_string()
    } else {
        format!(
            "outbound TCP redirected to :{} (except UID {})\n",
            a.outbound_port, a.proxy_uid
        )
    });
    Ok(ExitCode::SUCCESS)
}
