//! An injected pod's life without Kubernetes: the same processes and
//! arguments `fedmesh inject` gives a pod, against a controller that reads
//! an API server stand-in. The identity init container trades the pod's
//! service account token for its SVID (a TokenReview); `fedmesh sidecar
//! --kubernetes` takes its config from the environment, follows the
//! controller and serves the Service that selects the pod on its app
//! port; another proxy reaches it through the mesh.
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedmesh_testkit::fake_kube::FakeKube;
use fedmesh_testkit::{run_load, App, AppKind, LoadSpec};
use serde_json::json;

mod common;
use common::{
    bin, ca_init, free_tcp as free, http_get, kube_controller_config, kubeconfig, p, Procs,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_pod_gets_its_identity_and_serves_its_service() {
    let fake = FakeKube::start().await.unwrap();
    let app = App::start(AppKind::Echo, "demo/echo").await.unwrap();
    let app_port = app.addr.port();
    // The Service selecting the pod (its sidecar listens on 127.0.0.1:15006).
    fake.put(
        "/api/v1/services",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": "echo", "namespace": "demo", "annotations": { "fedmesh.io/service-account": "web" } },
            "spec": { "type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [{ "port": app_port, "protocol": "TCP" }] },
        }),
    );
    fake.put(
        "/apis/discovery.k8s.io/v1/endpointslices",
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": "echo-1", "namespace": "demo", "labels": { "kubernetes.io/service-name": "echo" } },
            "addressType": "IPv4",
            "endpoints": [{ "addresses": ["127.0.0.1"], "conditions": { "ready": true } }],
        }),
    );
    fake.allow_token("pod-token", "system:serviceaccount:demo:web", &["fedmesh"]);
    fake.allow_token(
        "wrong-audience",
        "system:serviceaccount:demo:web",
        &["https://kubernetes.default.svc"],
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca_init(d, "ca", "east.acme");
    let kc = kubeconfig(d, &fake.url());
    std::fs::write(d.join("tokens.yaml"), "tokens:\n  - token: client-boot\n    identities: [\"spiffe://east.acme/ns/demo/sa/client\"]\n").unwrap();
    let (api, ctl_admin) = (free(), free());
    kube_controller_config(d, "127.0.0.1:9".parse().unwrap(), ctl_admin, api, false);
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new(bin())
            .args(["controller", "--config", &p(&d.join("controller.yaml"))])
            .env("KUBECONFIG", &kc)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The identity init container, as inject writes it (retries while the
    // controller starts).
    std::fs::write(d.join("token"), "pod-token\n").unwrap();
    std::fs::write(d.join("bad-token"), "wrong-audience\n").unwrap();
    // `--k8s-token-file` (a pod) or `--token-file` (a bootstrap token).
    let request_with = |kind: &str, id: &str, token: &str, out: &str| {
        Command::new(bin())
            .args([
                "cert",
                "request",
                "--controller",
                &api.to_string(),
                "--bundle",
                &p(&d.join("ca/bundle.pem")),
            ])
            .args([
                "--spiffe-id",
                id,
                kind,
                &p(&d.join(token)),
                "--out",
                &p(&d.join(out)),
            ])
            .output()
            .unwrap()
    };
    let request =
        |id: &str, token: &str, out: &str| request_with("--k8s-token-file", id, token, out);
    let o = request("spiffe://east.acme/ns/demo/sa/web", "token", "identity");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The token is web's: no other identity, and no token minted for
    // someone else.
    let o = request("spiffe://east.acme/ns/demo/sa/db", "token", "x");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("the service account token is for spiffe://east.acme/ns/demo/sa/web"));
    let o = request("spiffe://east.acme/ns/demo/sa/web", "bad-token", "y");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("audiences"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The proxy container, as inject writes it.
    procs.0.push(
        Command::new(bin())
            .args(["sidecar", "--kubernetes"])
            .env("FEDMESH_CLUSTER", "east")
            .env("FEDMESH_TRUST_DOMAIN", "east.acme")
            .env("FEDMESH_CONTROLLER", api.to_string())
            .env("FEDMESH_APP_PORTS", app_port.to_string())
            .env("FEDMESH_IDENTITY_DIR", d.join("identity"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // A caller elsewhere in the cluster (explicit outbound listener).
    std::fs::write(d.join("client-token"), "client-boot\n").unwrap();
    let o = request_with(
        "--token-file",
        "spiffe://east.acme/ns/demo/sa/client",
        "client-token",
        "client",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = free();
    std::fs::write(
        d.join("client.yaml"),
        format!(
            "identity: {{ cert: {c}/svid.pem, key: {c}/svid.key }}\nbundles: [ {{ trust_domain: east.acme, path: {c}/bundle.pem }} ]\n\
             controller: {{ address: \"{api}\", cluster: east }}\noutbound: [ {{ listen: \"{out}\", service: echo.demo, port: {app_port}, protocol: tcp }} ]\n",
            c = p(&d.join("client")),
        ),
    )
    .unwrap();
    procs.0.push(
        Command::new(bin())
            .args(["sidecar", "--config", &p(&d.join("client.yaml"))])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The injected sidecar turns ready once it has the controller's config.
    let admin: SocketAddr = "127.0.0.1:15020".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_get(admin, "/ready").starts_with("HTTP/1.1 200") {
        assert!(
            Instant::now() < deadline,
            "the injected sidecar never became ready"
        );
        for c in &mut procs.0 {
            assert!(c.try_wait().unwrap().is_none(), "a process exited early");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let spec = LoadSpec {
        connections: 4,
        requests_per_connection: 5,
        timeout: Duration::from_secs(2),
        ..LoadSpec::default()
    };
    let r = loop {
        let r = run_load(out, &spec).await;
        if r.failed == 0 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((r.ok, r.failed), (20, 0), "{:?}", r.errors);
    assert_eq!(r.served_by.keys().collect::<Vec<_>>(), ["demo/echo"]);

    // Every request the controller made names fedmesh and its version.
    let agents = fake.user_agents();
    let ours = concat!("fedmesh/", env!("CARGO_PKG_VERSION"));
    assert!(!agents.is_empty());
    assert!(agents.iter().all(|a| a == ours), "{agents:?}");
}
