//! Leader election against an API server that speaks the Lease protocol
//! (optimistic concurrency by resourceVersion): one leader at a time, a
//! standby takes over a lease that stopped being renewed or was released,
//! and a leader that cannot renew steps down before anyone else can lead.
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fedmesh_federation::leader::{ElectionSettings, Elector, Round, LEADER_LABEL};
use fedmesh_testkit::fake_kube::FakeKube;

const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/fedmesh-system/leases/fedmesh-controller";

fn client(fake: &FakeKube) -> kube::Client {
    kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap()
}

fn settings(name: &str) -> ElectionSettings {
    ElectionSettings {
        duration: Duration::from_secs(2),
        retry: Duration::from_millis(100),
        renew_deadline: Duration::from_millis(1200),
        ..ElectionSettings::new("fedmesh-system", name)
    }
}

fn holder(fake: &FakeKube) -> String {
    fake.object(LEASE).unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn one_leader_and_a_standby_takes_over_an_unrenewed_lease() {
    let fake = FakeKube::start().await.unwrap();
    let mut a = Elector::new(client(&fake), settings("a")).unwrap();
    let mut b = Elector::new(client(&fake), settings("b")).unwrap();
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Round::Leader);
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Round::Standby);
    // a renews: b stays standby well past the lease duration.
    let (mut leading, task) = a.hold();
    let until = Instant::now() + Duration::from_millis(3000);
    while Instant::now() < until {
        assert_eq!(b.try_acquire_or_renew().await.unwrap(), Round::Standby);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(*leading.borrow());
    assert_eq!(holder(&fake), "a");
    // a stops renewing (a frozen process): b takes over after the
    // duration, counted on b's clock from the last change it saw.
    task.abort();
    let stopped = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), b.acquire())
        .await
        .unwrap();
    let took = stopped.elapsed();
    // The last renewal b saw was at most one retry before the abort.
    assert!(
        took >= Duration::from_millis(1850),
        "took over after {took:?}, before the lease ran out"
    );
    assert_eq!(holder(&fake), "b");
    let lease = fake.object(LEASE).unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    // a's receiver ends: it was aborted, not told it leads.
    assert!(leading.changed().await.is_err() || !*leading.borrow());
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once_and_the_old_leader_steps_down() {
    let fake = FakeKube::start().await.unwrap();
    fake.put_pod("fedmesh-system", "a");
    let mut a = Elector::new(client(&fake), settings("a")).unwrap();
    let mut b = Elector::new(client(&fake), settings("b")).unwrap();
    a.acquire().await;
    a.label_pod(true).await.unwrap();
    let pod = fake
        .object("/api/v1/namespaces/fedmesh-system/pods/a")
        .unwrap();
    assert_eq!(pod["metadata"]["labels"][LEADER_LABEL], "true");
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Round::Standby);
    a.release().await.unwrap();
    let t = Instant::now();
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Round::Leader);
    assert!(t.elapsed() < Duration::from_millis(500));
    // A leader that finds someone else holding the lease steps down.
    let (mut leading, task) = a.hold();
    tokio::time::timeout(Duration::from_secs(3), leading.wait_for(|l| !*l))
        .await
        .unwrap()
        .unwrap();
    let _ = task.await;
    assert_eq!(holder(&fake), "b");
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_steps_down_before_the_lease_runs_out() {
    let fake = FakeKube::start().await.unwrap();
    let mut a = Elector::new(client(&fake), settings("a")).unwrap();
    a.acquire().await;
    let (mut leading, _task) = a.hold();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.set_down(true);
    let cut = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), leading.wait_for(|l| !*l))
        .await
        .unwrap()
        .unwrap();
    let after = cut.elapsed();
    // Stepped down within the renew deadline (1.2 s after the last
    // renewal), so before a standby could take the 2 s lease.
    assert!(
        after < Duration::from_millis(1900),
        "stepped down after {after:?}"
    );
}

#[tokio::test]
async fn racing_candidates_never_both_lead() {
    let fake = FakeKube::start().await.unwrap();
    for round in 0..20 {
        let mk =
            |i: usize| Elector::new(client(&fake), settings(&format!("c{round}-{i}"))).unwrap();
        let (mut x, mut y, mut z) = (mk(0), mk(1), mk(2));
        let (rx, ry, rz) = tokio::join!(
            x.try_acquire_or_renew(),
            y.try_acquire_or_renew(),
            z.try_acquire_or_renew()
        );
        let results = [rx.unwrap(), ry.unwrap(), rz.unwrap()];
        let leaders = results.iter().filter(|r| **r == Round::Leader).count();
        // The first round creates the lease; later ones take a released
        // one: exactly one wins either way.
        assert_eq!(leaders, 1, "round {round}: {results:?}");
        let winner = results.iter().position(|r| *r == Round::Leader).unwrap();
        assert_eq!(holder(&fake), format!("c{round}-{winner}"));
        [&mut x, &mut y, &mut z][winner].release().await.unwrap();
    }
}

#[test]
fn settings_that_could_overlap_two_leaders_are_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let c =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let s = ElectionSettings {
        renew_deadline: Duration::from_secs(20),
        ..ElectionSettings::new("ns", "x")
    };
    assert!(Elector::new(c, s).is_err());
}
