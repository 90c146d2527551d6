//! The controller's check of a pod's service account token: a
//! TokenReview against an API server stand-in that answers like the real
//! one (audiences, unknown tokens, users that are not service accounts).
#![cfg(feature = "kube")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedmesh_testkit::fake_kube::FakeKube;

fn client(fake: &FakeKube) -> kube::Client {
    kube::Client::try_from(kube::Config::new(fake.url().parse().unwrap())).unwrap()
}

#[tokio::test]
async fn token_reviews_name_the_service_account_or_refuse() {
    use fedmesh_api::server::TokenReviewer;
    use fedmesh_federation::k8s::{service_account_of, KubeTokenReviewer};
    let fake = FakeKube::start().await.unwrap();
    fake.allow_token("web", "system:serviceaccount:shop:web", &["fedmesh"]);
    fake.allow_token(
        "apiserver-only",
        "system:serviceaccount:shop:web",
        &["https://kubernetes.default.svc"],
    );
    fake.allow_token("human", "alice@acme.net", &["fedmesh"]);
    let r = KubeTokenReviewer::new(client(&fake));
    assert_eq!(
        r.review("web").await.unwrap(),
        ("shop".into(), "web".into())
    );
    assert!(r
        .review("apiserver-only")
        .await
        .unwrap_err()
        .contains("audiences"));
    assert!(r
        .review("human")
        .await
        .unwrap_err()
        .contains("not a service account"));
    assert!(r
        .review("forged")
        .await
        .unwrap_err()
        .contains("invalid bearer token"));
    assert_eq!(service_account_of("system:serviceaccount:a:b:c"), None);
    assert_eq!(service_account_of("system:serviceaccount::b"), None);
}
