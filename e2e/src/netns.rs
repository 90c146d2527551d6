//! Network namespaces for the rig (root and `ip` only): one namespace per
//! cluster (`fme2e-<pid>-<cluster>`), each with a veth into a bridge
//! (`fmb<pid>`) in this process's namespace, on the subnet
//! `10.199.<pid % 250>.0/24` (the bridge is `.1`, clusters `.11` up).
//! etcd and the relays stay here, on the bridge address; every cluster
//! process runs inside its namespace.
//!
//! With `nft`, cuts between clusters are nftables rules in the clusters'
//! namespaces (a table `fedmesh_e2e` the rig owns and rewrites whole);
//! without it the relays drop instead, and the rig says so.
//!
//! Everything made is removed on drop, and a run that was SIGKILLed is
//! cleaned up by the next one (names carry the pid that made them; its
//! processes still inside a namespace are killed).

use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

const PREFIX: &str = "fme2e-";

pub struct Netns {
    bridge: Option<String>,
    /// (cluster, namespace, address), in creation order.
    members: Vec<(String, String, IpAddr)>,
    pub host_ip: IpAddr,
    /// `nft` works inside the namespaces.
    pub nft: bool,
}

/// Runs `ip` with `args`; its stderr is the error.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether the rig runner that made a namespace still runs: the pid exists,
/// is no zombie, and is a `fedmesh-e2e` (pids are reused).
fn alive(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    field("Name:") == "fedmesh-e2e" && !field("State:").starts_with('Z')
}

/// Whether this process may create namespaces: root, with `ip`.
pub fn usable() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        return Err("not running as root".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("`ip` (iproute2) is not installed".into()),
    }
}

/// Removes namespaces and bridges left by rigs whose process is gone.
pub fn clean_stale() {
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let pid = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid.filter(|p| !alive(*p)) {
            // Processes of a SIGKILLed run outlive it inside the namespace.
            let pids = Command::new("ip")
                .args(["netns", "pids", name])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for p in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", p]).status();
            }
            let _ = ip(&["netns", "del", name]);
            let _ = ip(&["link", "del", &format!("fmb{pid}")]);
        }
    }
}

impl Netns {
    /// Creates the bridge and one namespace per cluster. On failure,
    /// whatever was made is removed again.
    pub fn create(clusters: &[&str]) -> anyhow::Result<Netns> {
        let pid = std::process::id();
        let net = pid % 250;
        let mut n = Netns {
            bridge: None,
            members: Vec::new(),
            host_ip: format!("10.199.{net}.1").parse()?,
            nft: false,
        };
        let bridge = format!("fmb{pid}");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        n.bridge = Some(bridge.clone());
        ip(&["addr", "add", &format!("{}/24", n.host_ip), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for (i, c) in clusters.iter().enumerate() {
            let ns = format!("{PREFIX}{pid}-{c}");
            ip(&["netns", "add", &ns])?;
            let addr: IpAddr = format!("10.199.{net}.{}", 11 + i).parse()?;
            n.members.push(((*c).to_owned(), ns.clone(), addr));
            let veth = format!("fmv{pid}x{i}");
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &bridge, "up"])?;
            let inside = |args: &[&str]| {
                let mut v = vec!["netns", "exec", &ns, "ip"];
                v.extend_from_slice(args);
                ip(&v)
            };
            inside(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            inside(&["link", "set", "eth0", "up"])?;
            inside(&["link", "set", "lo", "up"])?;
        }
        n.nft = match n.members.first() {
            Some((c, _, _)) => n.set_rules(c, &[]).is_ok(),
            None => false,
        };
        Ok(n)
    }

    /// (cluster, namespace, address) of every cluster.
    pub fn members(&self) -> &[(String, String, IpAddr)] {
        &self.members
    }

    /// A cluster's address inside its namespace.
    pub fn addr(&self, cluster: &str) -> Option<IpAddr> {
        self.members.iter().find(|m| m.0 == cluster).map(|m| m.2)
    }

    pub fn namespace(&self, cluster: &str) -> Option<&str> {
        self.members
            .iter()
            .find(|m| m.0 == cluster)
            .map(|m| m.1.as_str())
    }

    pub fn describe(&self) -> String {
        format!(
            "network namespaces {} ({}), bridge {} at {}; cuts by {}",
            self.members
                .iter()
                .map(|m| m.1.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            self.members
                .iter()
                .map(|m| m.2.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            self.bridge.as_deref().unwrap_or("?"),
            self.host_ip,
            if self.nft {
                "nftables in the namespaces"
            } else {
                "the relays (nft is not installed: apt-get install nftables)"
            }
        )
    }

    /// Redirects TCP connections made in `cluster`'s namespace to `cidr`
    /// to `127.0.0.1:port` (what `fedmesh redirect` does in a pod, for
    /// ClusterSet IPs): a table of its own, untouched by [`set_rules`].
    pub fn redirect_tcp(&self, cluster: &str, cidr: &str, port: u16) -> anyhow::Result<()> {
        let ns = self.namespace(cluster).context("no such cluster")?;
        // A route first, as a pod's default route is: nat output runs
        // after the routing decision.
        ip(&["-n", ns, "route", "replace", cidr, "dev", "eth0"])?;
        let script = format!(
            "table ip fedmesh_e2e_nat {{\n  chain output {{ type nat hook output priority -100; policy accept; ip daddr {cidr} meta l4proto tcp redirect to :{port}; }}\n}}\n"
        );
        nft(ns, &script)
    }

    /// Replaces the rig's nftables rules in `cluster`'s namespace with
    /// `rules` (each an `nft` rule body for the `output` or `input`
    /// chain, e.g. `("output", "ip daddr 10.0.0.1 udp dport 5 drop")`).
    pub fn set_rules(&self, cluster: &str, rules: &[(&str, String)]) -> anyhow::Result<()> {
        let ns = self.namespace(cluster).context("no such cluster")?;
        let mut script = String::from(
            "table inet fedmesh_e2e {}\ndelete table inet fedmesh_e2e\ntable inet fedmesh_e2e {\n  chain output { type filter hook output priority 0; policy accept; }\n  chain input { type filter hook input priority 0; policy accept; }\n}\n",
        );
        for (chain, rule) in rules {
            script.push_str(&format!("add rule inet fedmesh_e2e {chain} {rule}\n"));
        }
        nft(ns, &script)
    }
}

/// Runs an `nft -f -` script in namespace `ns`.
fn nft(ns: &str, script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft")?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        for (_, ns, _) in self.members.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
        if let Some(b) = self.bridge.take() {
            let _ = ip(&["link", "del", &b]);
        }
    }
}
