//! The docs are part of the product: every `fedmesh …` command in a code
//! block of the README, `docs/` and the other READMEs must parse with this
//! binary (its subcommands and flags exist); the ones that need no running
//! cluster are run, in order, in a scratch directory and must succeed; and
//! every metric name in `docs/` and the README must be served on the
//! `/metrics` of a running controller, gateway or sidecar.
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedmesh_testkit::fake_kube::FakeKube;

mod common;
use common::{
    bin, ca_init, free_tcp as free, http_get, kube_controller_config, kubeconfig, ok, p, Procs,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Markdown files whose code blocks are checked.
fn doc_files() -> Vec<PathBuf> {
    let root = repo();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    for more in [
        "e2e/README.md",
        "federation/README.md",
        "kind-configs/README.md",
        "terraform/README.md",
        "terraform/modules/fedmesh-cluster/README.md",
    ] {
        if root.join(more).exists() {
            files.push(root.join(more));
        }
    }
    files
}

/// One documented command: where, and its words after `fedmesh`.
#[derive(Debug, Clone)]
struct Documented {
    at: String,
    words: Vec<String>,
    /// `> file`: where its output goes.
    stdout_to: Option<String>,
}

/// The `fedmesh` commands in a markdown file's code blocks. A command is
/// a line (with `\` continuations) that starts with `fedmesh ` or
/// `cargo run --release -- `, possibly after `# ` (usage inside a YAML
/// example); it ends at a shell comment (` #`), a pipe (` | `) or a run
/// of two spaces (the docs put remarks there).
fn commands(path: &Path) -> Vec<Documented> {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path
        .strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string();
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    let mut pending_at = 0;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            pending.clear();
            continue;
        }
        if !in_block {
            continue;
        }
        if pending.is_empty() {
            pending_at = n + 1;
        }
        // Continuation lines lose their indent, which is not a remark gap.
        let line = if pending.is_empty() {
            line
        } else {
            line.trim_start()
        };
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head.trim_end());
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        let mut s = full.trim_start();
        s = s.strip_prefix("# ").unwrap_or(s).trim_start();
        s = s.strip_prefix("$ ").unwrap_or(s);
        if let Some(files) = s.strip_prefix("cat ") {
            // `cat A B > C`: the one shell step the walk-throughs take.
            if let Some((from, to)) = files.split_once(" > ") {
                out.push(Documented {
                    at: format!("{name}:{pending_at}"),
                    words: [
                        vec!["cat".to_owned()],
                        from.split_whitespace().map(str::to_owned).collect(),
                    ]
                    .concat(),
                    stdout_to: to.split_whitespace().next().map(str::to_owned),
                });
            }
            continue;
        }
        let rest = if let Some(r) = s.strip_prefix("fedmesh ") {
            r
        } else if let Some(r) = s.strip_prefix("cargo run --release -- ") {
            r
        } else {
            continue;
        };
        let mut cmd = rest;
        for end in [" #", " | ", "  "] {
            if let Some(i) = cmd.find(end) {
                cmd = &cmd[..i];
            }
        }
        let mut words: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
        let mut stdout_to = None;
        if let Some(i) = words.iter().position(|w| w == ">") {
            stdout_to = words.get(i + 1).cloned();
            words.truncate(i);
        }
        out.push(Documented {
            at: format!("{name}:{pending_at}"),
            words,
            stdout_to,
        });
    }
    out
}

/// A word that stands for something the reader fills in.
fn placeholder(w: &str) -> bool {
    let bare = w.split_once('=').map_or(w, |(_, v)| v);
    w.contains(['[', ']', '|', '<', '>', '…'])
        || w.contains("...")
        || (!bare.is_empty()
            && bare
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_:".contains(c))
            && bare.chars().any(|c| c.is_ascii_uppercase()))
}

/// Commands that need no cluster, store or network: run for real.
const OFFLINE: [&str; 9] = [
    "ca init",
    "ca issue",
    "ca intermediate",
    "trust verify",
    "trust endorse",
    "cluster join",
    "install",
    "inject",
    "uninject",
];

fn help(path: &[String], cache: &mut BTreeMap<Vec<String>, String>) -> String {
    cache
        .entry(path.to_vec())
        .or_insert_with(|| {
            let o = Command::new(bin())
                .args(path)
                .arg("--help")
                .output()
                .unwrap();
            assert!(o.status.success(), "fedmesh {path:?} --help failed");
            String::from_utf8_lossy(&o.stdout).into_owned()
        })
        .clone()
}

/// Whether `help` (a `--help` page) lists `word` as a subcommand.
fn lists_command(help: &str, word: &str) -> bool {
    let Some(i) = help.find("Commands:") else {
        return false;
    };
    help[i..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .any(|l| l.split_whitespace().next() == Some(word))
}

/// Every flag the words use, without values and brackets; `a|b` gives both.
fn flags(words: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for w in words {
        for part in w.split('|') {
            let part = part.trim_matches(|c| "[]()".contains(c));
            if !part.starts_with('-') || part == "-" {
                continue;
            }
            let flag = part.split_once('=').map_or(part, |(f, _)| f);
            out.push(flag.to_owned());
        }
    }
    out
}

/// Files the documented commands read that no earlier command writes: what
/// a reader brings along (an app's manifest, etcd's TLS files, a peer's
/// bundle).
fn fixtures(dir: &Path) {
    let etcd_ca = ca_init(dir, ".etcd-ca", "etcd.test");
    let client = dir.join(".etcd-client");
    ok(&[
        "ca",
        "issue",
        "--ca",
        &p(&etcd_ca),
        "--spiffe-id",
        "spiffe://etcd.test/client",
        "--out",
        &p(&client),
    ]);
    let north = ca_init(dir, ".north-ca", "north.acme");
    for (from, to) in [
        (etcd_ca.join("ca.pem"), "etcd-ca.pem"),
        (client.join("svid.pem"), "etcd-client.pem"),
        (client.join("svid.key"), "etcd-client.key"),
        (north.join("bundle.pem"), "north-bundle.pem"),
    ] {
        std::fs::copy(from, dir.join(to)).unwrap();
    }
    std::fs::write(
        dir.join("app.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: web, namespace: shop }\n\
         spec:\n  selector: { matchLabels: { app: web } }\n  template:\n    metadata: { labels: { app: web } }\n\
         \x20   spec:\n      serviceAccountName: web\n      containers: [ { name: web, image: nginx, ports: [ { containerPort: 8080 } ] } ]\n",
    )
    .unwrap();
}

#[test]
fn every_documented_command_parses_and_the_offline_ones_run() {
    let mut cache = BTreeMap::new();
    let mut problems = Vec::new();
    let mut ran = 0;
    let mut checked = 0;
    for file in doc_files() {
        let scratch = tempfile::tempdir().unwrap();
        fixtures(scratch.path());
        for c in commands(&file) {
            if c.words.first().is_some_and(|w| w == "cat") {
                let mut all = Vec::new();
                for f in &c.words[1..] {
                    match std::fs::read(scratch.path().join(f)) {
                        Ok(b) => all.extend(b),
                        Err(e) => problems.push(format!("{}: cat {f}: {e}", c.at)),
                    }
                }
                if let Some(to) = &c.stdout_to {
                    std::fs::write(scratch.path().join(to), all).unwrap();
                }
                continue;
            }
            checked += 1;
            // The subcommand path, as far as the binary knows it.
            let mut path: Vec<String> = Vec::new();
            for w in &c.words {
                if w.starts_with('-') || placeholder(w) {
                    break;
                }
                if lists_command(&help(&path, &mut cache), w) {
                    path.push(w.clone());
                } else {
                    break;
                }
            }
            if path.is_empty() {
                problems.push(format!(
                    "{}: `fedmesh {}`: no such command",
                    c.at,
                    c.words.join(" ")
                ));
                continue;
            }
            let page = help(&path, &mut cache);
            for f in flags(&c.words) {
                let known = if f.starts_with("--") {
                    page.contains(&format!("{f} "))
                        || page.contains(&format!("{f}\n"))
                        || page.contains(&format!("{f}="))
                        || page.contains(&format!("{f} <"))
                        || page.contains(&format!("{f}..."))
                } else {
                    page.contains(&format!("{f}, ")) || page.contains(&format!("{f} "))
                };
                if !known {
                    problems.push(format!(
                        "{}: `fedmesh {}`: {f} is not a flag of `fedmesh {}`",
                        c.at,
                        c.words.join(" "),
                        path.join(" ")
                    ));
                }
            }
            let offline = OFFLINE.contains(&path.join(" ").as_str());
            if !offline || c.words.iter().any(|w| placeholder(w)) {
                continue;
            }
            let mut cmd = Command::new(bin());
            cmd.args(&c.words)
                .current_dir(scratch.path())
                .stdin(Stdio::null());
            let o = cmd.output().unwrap();
            ran += 1;
            if !o.status.success() {
                problems.push(format!(
                    "{}: `fedmesh {}` failed: {}",
                    c.at,
                    c.words.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            } else if let Some(to) = &c.stdout_to {
                std::fs::write(scratch.path().join(to), &o.stdout).unwrap();
            }
        }
    }
    eprintln!("{checked} documented commands checked, {ran} of them run");
    assert!(
        problems.is_empty(),
        "{} of {checked} documented commands are wrong:\n{}",
        problems.len(),
        problems.join("\n")
    );
    // The README's and the operations guide's walk-throughs alone hold more.
    assert!(
        checked >= 30 && ran >= 10,
        "only {checked} commands found, {ran} run"
    );
}

/// Every `fedmesh_*` name in the docs that is not a crate or log target.
fn documented_metrics() -> BTreeMap<String, String> {
    let crates: BTreeSet<&str> = [
        "fedmesh_gateway",
        "fedmesh_sidecar",
        "fedmesh_federation",
        "fedmesh_api",
        "fedmesh_trust",
        "fedmesh_testkit",
        "fedmesh_transport",
        "fedmesh_catalog",
        "fedmesh_balance",
        "fedmesh_wire",
        "fedmesh_deploy",
        "fedmesh_cli",
        "fedmesh_bench",
        "fedmesh_e2e",
    ]
    .into();
    let mut out = BTreeMap::new();
    let mut files = vec![repo().join("README.md")];
    files.extend(
        doc_files()
            .into_iter()
            .filter(|f| f.parent().is_some_and(|d| d.ends_with("docs"))),
    );
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let bytes = text.as_bytes();
        let mut i = 0;
        while let Some(at) = text[i..].find("fedmesh_") {
            let start = i + at;
            let mut end = start;
            while end < bytes.len()
                && (bytes[end].is_ascii_lowercase()
                    || bytes[end].is_ascii_digit()
                    || bytes[end] == b'_')
            {
                end += 1;
            }
            i = end;
            let before_ok = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric()
                    || bytes[start - 1] == b'_'
                    || bytes[start - 1] == b'-');
            let next = text[end..].chars().next();
            let name = &text[start..end];
            if !before_ok || crates.contains(name) || matches!(next, Some(':') | Some('=')) {
                continue;
            }
            out.entry(name.to_owned())
                .or_insert_with(|| f.strip_prefix(repo()).unwrap_or(&f).display().to_string());
        }
    }
    out
}

/// Sample names and `# TYPE` lines of a Prometheus text page.
fn exposition(page: &str) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut samples = BTreeSet::new();
    let mut types = BTreeMap::new();
    for l in page.lines() {
        if let Some(t) = l.strip_prefix("# TYPE ") {
            let mut it = t.split_whitespace();
            if let (Some(n), Some(k)) = (it.next(), it.next()) {
                types.insert(n.to_owned(), k.to_owned());
            }
        } else if !l.starts_with('#') && !l.is_empty() {
            let name = l.split(['{', ' ']).next().unwrap_or_default();
            samples.insert(name.to_owned());
        }
    }
    (samples, types)
}

/// Whether a metric page serves `name` as a user would query it: a
/// sample name, a gauge/histogram/info family, or a counter family by its
/// `_total` name (families with no label set yet have only their `# TYPE`).
fn served(name: &str, samples: &BTreeSet<String>, types: &BTreeMap<String, String>) -> bool {
    if samples.contains(name) {
        return true;
    }
    if let Some(k) = types.get(name) {
        return k != "counter";
    }
    if let Some(family) = name.strip_suffix("_total") {
        return types.get(family).is_some_and(|k| k == "counter");
    }
    ["_bucket", "_sum", "_count"].iter().any(|s| {
        name.strip_suffix(s)
            .is_some_and(|f| types.get(f).is_some_and(|k| k == "histogram"))
    })
}

fn wait_for_metrics(procs: &mut Procs, admin: SocketAddr, what: &str) -> String {
    let t0 = Instant::now();
    loop {
        let r = http_get(admin, "/metrics");
        if r.starts_with("HTTP/1.1 200") {
            return r;
        }
        for c in &mut procs.0 {
            assert!(c.try_wait().unwrap().is_none(), "a process exited early");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what} /metrics never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_served() {
    let documented = documented_metrics();
    assert!(
        documented.len() >= 40,
        "only {} metric names found",
        documented.len()
    );

    // A controller with the Kubernetes source (the stand-in API server)
    // and the config API, and a gateway and a sidecar following it.
    let fake = FakeKube::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca_init(d, "ca", "east.acme");
    for (who, id) in [
        ("gw", "spiffe://east.acme/ns/fedmesh-system/sa/gateway"),
        ("web", "spiffe://east.acme/ns/shop/sa/web"),
    ] {
        ok(&[
            "ca",
            "issue",
            "--ca",
            &p(&d.join("ca")),
            "--spiffe-id",
            id,
            "--out",
            &p(&d.join(who)),
        ]);
    }
    let kc = kubeconfig(d, &fake.url());
    std::fs::write(d.join("tokens.yaml"), "tokens: []\n").unwrap();
    let (api, ctl_admin, gw_admin, sc_admin) = (free(), free(), free(), free());
    let (quic, tunnel, out, drills) = (free(), free(), free(), free());
    kube_controller_config(d, quic, ctl_admin, api, true);
    let follow = |who: &str| {
        format!(
            "identity: {{ cert: {w}/svid.pem, key: {w}/svid.key }}\nbundles: [ {{ trust_domain: east.acme, path: {b} }} ]\n\
             controller: {{ address: \"{api}\", cluster: east }}\n",
            w = p(&d.join(who)),
            b = p(&d.join("ca/bundle.pem")),
        )
    };
    std::fs::write(
        d.join("gateway.yaml"),
        format!(
            "listen: {{ quic: \"{quic}\", tunnel: \"{tunnel}\", admin: \"{gw_admin}\" }}\n\
             drills: {{ listen: \"{drills}\", operators: [\"spiffe://east.acme/ns/ops/*\"] }}\n{}",
            follow("gw")
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("sidecar.yaml"),
        format!(
            "{}outbound: [ {{ listen: \"{out}\", service: echo.shop, port: 8080, protocol: tcp }} ]\nadmin: \"{sc_admin}\"\n",
            follow("web")
        ),
    )
    .unwrap();
    let mut procs = Procs(Vec::new());
    for (kind, file) in [
        ("controller", "controller.yaml"),
        ("gateway", "gateway.yaml"),
        ("sidecar", "sidecar.yaml"),
    ] {
        procs.0.push(
            Command::new(bin())
                .args([kind, "--config", &p(&d.join(file))])
                .env("KUBECONFIG", &kc)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let mut samples = BTreeSet::new();
    let mut types = BTreeMap::new();
    for (admin, what) in [
        (ctl_admin, "controller"),
        (gw_admin, "gateway"),
        (sc_admin, "sidecar"),
    ] {
        let page = wait_for_metrics(&mut procs, admin, what);
        let (s, t) = exposition(&page);
        samples.extend(s);
        types.extend(t);
    }
    let missing: Vec<String> = documented
        .iter()
        .filter(|(name, _)| !served(name, &samples, &types))
        .map(|(name, file)| format!("{name} (in {file})"))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but not served by a controller, gateway or sidecar:\n  {}",
        missing.join("\n  ")
    );
}
