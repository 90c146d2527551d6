//! Two `fedmesh controller --leader-elect` processes against an API
//! server that speaks the Lease protocol: one leads and labels its pod,
//! the other stands by (ready, so a PodDisruptionBudget can move the
//! leader); killing the leader hands over within the lease; a graceful
//! stop releases the lease; a leader cut off from the API server exits.
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fedmesh_testkit::fake_kube::FakeKube;

mod common;
use common::{bin, free_tcp as free, http_get as get, kubeconfig};

const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/fedmesh-system/leases/fedmesh-controller";

struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(dir: &Path, kubeconfig: &Path, pod: &str, admin: SocketAddr) -> Proc {
        let cfg = dir.join(format!("{pod}.yaml"));
        std::fs::write(
            &cfg,
            format!(
                "cluster: east\ntrust_domain: east.acme\ngateways: [\"127.0.0.1:15443\"]\nlease_ttl: 2s\n\
                 store: {{ kind: embedded }}\nbundle: {}\npins_dir: {}\nkubernetes: {{ write_back: false }}\nadmin: \"{admin}\"\n",
                dir.join("ca/bundle.pem").display(),
                dir.join("pins").display(),
            ),
        )
        .unwrap();
        let mut child = Command::new(bin())
            .args([
                "controller",
                "--leader-elect",
                "--leader-lease",
                "2s",
                "--config",
            ])
            .arg(&cfg)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", "fedmesh-system")
            .env("FEDMESH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Proc { child, lines }
    }

    fn wait_line(&self, want: &str, within: Duration) -> Duration {
        let t = Instant::now();
        while t.elapsed() < within {
            match self.lines.recv_timeout(within.saturating_sub(t.elapsed())) {
                Ok(l) if l.contains(want) => return t.elapsed(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        panic!("no `{want}` within {within:?}");
    }

    fn exit_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn label(fake: &FakeKube, pod: &str) -> String {
    fake.object(&format!("/api/v1/namespaces/fedmesh-system/pods/{pod}"))
        .unwrap()["metadata"]["labels"]["fedmesh.io/leader"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn holder(fake: &FakeKube) -> String {
    fake.object(LEASE).map_or(String::new(), |l| {
        l["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    })
}

fn setup() -> (
    tokio::runtime::Runtime,
    FakeKube,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = rt.block_on(FakeKube::start()).unwrap();
    for p in ["a", "b"] {
        fake.put_pod("fedmesh-system", p);
    }
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args(["ca", "init", "--trust-domain", "east.acme", "--out"])
        .arg(dir.path().join("ca"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let kubeconfig = kubeconfig(dir.path(), &fake.url());
    (rt, fake, dir, kubeconfig)
}

#[test]
fn one_leads_the_other_stands_by_and_takes_over() {
    let (_rt, fake, dir, kc) = setup();
    let (admin_a, admin_b) = (free(), free());
    let mut a = Proc::spawn(dir.path(), &kc, "a", admin_a);
    a.wait_line(
        "controller leading as fedmesh-system/a",
        Duration::from_secs(15),
    );
    a.wait_line("controller up", Duration::from_secs(10));
    let mut b = Proc::spawn(dir.path(), &kc, "b", admin_b);
    b.wait_line(
        "controller standing by as fedmesh-system/b",
        Duration::from_secs(15),
    );
    assert_eq!(holder(&fake), "a");
    assert_eq!(label(&fake, "a"), "true");
    assert_eq!(label(&fake, "b"), "false");
    // The standby is live and ready, and says what it is.
    assert!(get(admin_b, "/ready").starts_with("HTTP/1.1 200"));
    assert!(get(admin_b, "/status").contains("standby"));
    assert!(get(admin_a, "/metrics").contains("fedmesh_controller_leader 1"));
    // The standby stays standby while the leader renews.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(holder(&fake), "a");

    // The leader dies without a word: the standby leads within the lease.
    a.child.kill().unwrap();
    let took = b.wait_line(
        "controller leading as fedmesh-system/b",
        Duration::from_secs(10),
    );
    assert!(took < Duration::from_secs(5), "took over after {took:?}");
    println!("standby leading {took:?} after the leader was killed (lease 2 s)");
    b.wait_line("controller up", Duration::from_secs(10));
    assert_eq!(label(&fake, "b"), "true");
    assert!(get(admin_b, "/metrics").contains("fedmesh_controller_leader 1"));

    // A graceful stop releases the lease and unlabels the pod.
    let pid = b.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = b
        .exit_within(Duration::from_secs(10))
        .expect("exits on SIGTERM");
    assert!(status.success());
    assert_eq!(holder(&fake), "");
    assert_eq!(label(&fake, "b"), "false");
}

#[test]
fn a_leader_cut_off_from_the_api_server_exits() {
    let (_rt, fake, dir, kc) = setup();
    let mut a = Proc::spawn(dir.path(), &kc, "a", free());
    a.wait_line("controller up", Duration::from_secs(15));
    fake.set_down(true);
    // Steps down within the renew deadline (2/3 of the 2 s lease) plus
    // one retry: before a standby could take over.
    let t = Instant::now();
    let status = a
        .exit_within(Duration::from_secs(5))
        .expect("exits after losing the lease");
    assert!(!status.success());
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "exited after {:?}",
        t.elapsed()
    );
}
