//! The provisioning flows that should work, driven in-process through `app()`.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use axum::http::{Method, StatusCode};
use capsule_format::{SealedGrant, TopUp};
use common::{CAPSULE_ID, Enclave, Fixture, MEASUREMENT, MODEL_KEY};
use serde_json::json;

#[tokio::test]
async fn health_reports_ok_and_version() {
    let f = Fixture::new().await;
    let r = f.call(Method::GET, "/v1/health", false, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.body,
        json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")})
    );
}

#[tokio::test]
async fn setup_releases_the_model_key_to_the_attested_enclave() {
    let f = Fixture::new().await;
    f.add_model().await;
    let (licence_id, token) = f.licence(100).await;
    assert!(licence_id.starts_with("lic_"));
    assert!(token.starts_with(&format!("mlc-licence-v1.{licence_id}.")));

    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    let r = f
        .post("/v1/setup", enclave.setup_body(&token, &nonce, &evidence))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["licence_id"], licence_id);
    assert_eq!(r.body["queries"], 100);
    assert_eq!(r.body["expires"], serde_json::Value::Null);
    assert_eq!(
        r.body["server_key"],
        hex::encode(f.state.server_public_key())
    );

    let sealed: SealedGrant = serde_json::from_value(r.body["sealed_grant"].clone()).unwrap();
    let grant = enclave.key.open_grant(&sealed, &nonce).unwrap();
    assert_eq!(grant.model_key().unwrap().expose(), &MODEL_KEY);
    assert_eq!(grant.queries, 100);
    assert_eq!(grant.licence_id, licence_id);
    assert_eq!(grant.instance_id, enclave.instance_id);
    assert_eq!(grant.capsule_id, CAPSULE_ID);
    assert_eq!(grant.server_key, f.state.server_public_key());
    // Only the enclave's key opens it, and only for this nonce.
    assert!(Enclave::new().key.open_grant(&sealed, &nonce).is_err());
    assert!(enclave.key.open_grant(&sealed, &[0; 32]).is_err());

    let status = f
        .call(
            Method::GET,
            &format!("/v1/licences/{licence_id}"),
            true,
            None,
        )
        .await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.body);
    assert_eq!(status.body["instance_id"], hex::encode(enclave.instance_id));
    assert_eq!(status.body["platform"], "sim");
    assert_eq!(status.body["measurement"], hex::encode(MEASUREMENT));
    assert_eq!(
        status.body["platform_id"],
        hex::encode(f.platform.platform_id())
    );
    assert_eq!(status.body["model_id"], hex::encode(CAPSULE_ID));
    assert_eq!(status.body["model_name"], "mnist-cnn");
    assert_eq!(status.body["topup_seq"], 0);
    assert!(
        status.body["provisioned_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
}

#[tokio::test]
async fn grants_and_topups_issue_signed_increasing_tokens() {
    let f = Fixture::new().await;
    f.add_model().await;
    let (licence_id, token) = f.licence(10).await;
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    let r = f
        .post("/v1/setup", enclave.setup_body(&token, &nonce, &evidence))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let mut server_key = [0u8; 32];
    hex::decode_to_slice(r.body["server_key"].as_str().unwrap(), &mut server_key).unwrap();

    let topup = |used: Option<u64>| {
        f.post(
            "/v1/topup",
            json!({"licence": token, "instance_id": hex::encode(enclave.instance_id), "used": used}),
        )
    };
    let r = topup(Some(3)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t1 = TopUp::verify(r.body["token"].as_str().unwrap(), &server_key).unwrap();
    assert_eq!(
        t1,
        TopUp {
            licence_id: licence_id.clone(),
            instance_id: enclave.instance_id,
            seq: 1,
            total_queries: 10,
            expires: None,
        }
    );
    assert_eq!(r.body["seq"], 1);
    assert_eq!(r.body["total_queries"], 10);

    let g = f
        .admin_post(
            &format!("/v1/licences/{licence_id}/grant"),
            json!({"queries": 15}),
        )
        .await;
    assert_eq!(g.status, StatusCode::OK, "{}", g.body);
    assert_eq!(
        g.body,
        json!({"licence_id": licence_id, "total_queries": 25})
    );

    let r = topup(Some(9)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let t2 = TopUp::verify(r.body["token"].as_str().unwrap(), &server_key).unwrap();
    assert_eq!((t2.seq, t2.total_queries), (2, 25));
    assert_eq!(t2.instance_id, enclave.instance_id);
    // The signature is the server's: another key refuses the token.
    assert!(TopUp::verify(r.body["token"].as_str().unwrap(), &[7; 32]).is_err());

    let status = f
        .call(
            Method::GET,
            &format!("/v1/licences/{licence_id}"),
            true,
            None,
        )
        .await;
    assert_eq!(status.body["topup_seq"], 2);
    assert_eq!(status.body["total_queries"], 25);
    assert_eq!(status.body["last_reported_used"], 9);
    // `used: null` keeps the last report.
    let r = topup(None).await;
    assert_eq!(r.body["seq"], 3);
    let status = f
        .call(
            Method::GET,
            &format!("/v1/licences/{licence_id}"),
            true,
            None,
        )
        .await;
    assert_eq!(status.body["last_reported_used"], 9);
}

#[tokio::test]
async fn topup_detections_are_checked_stored_and_shown() {
    let f = Fixture::new().await;
    f.add_model().await;
    let (licence_id, token) = f.licence(10).await;
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    let r = f
        .post("/v1/setup", enclave.setup_body(&token, &nonce, &evidence))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let instance = hex::encode(enclave.instance_id);
    let path = format!("/v1/licences/{licence_id}");
    let status = || f.call(Method::GET, &path, true, None);
    assert_eq!(status().await.body["last_reported_detections"], json!(null));

    let detections = json!({
        "prada_alarms": 1, "prada_denying": true,
        "first_alarm": {"query": 110, "w": 0.8583, "distances": 101},
        "detector_refusals": 2, "unobserved_queries": 0, "resyncs": 0
    });
    let r = f
        .post(
            "/v1/topup",
            json!({"licence": token, "instance_id": instance, "used": 7, "detections": detections}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let shown = status().await.body;
    assert_eq!(shown["last_reported_detections"], detections);
    assert!(
        shown["last_reported_detections_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    // A top-up without detections keeps the last report.
    let r = f
        .post(
            "/v1/topup",
            json!({"licence": token, "instance_id": instance, "used": 8}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(status().await.body["last_reported_detections"], detections);

    // Malformed detections issue nothing.
    for bad in [
        json!({"prada_alarms": 1}),
        json!({"prada_alarms": -1, "prada_denying": false, "detector_refusals": 0,
               "unobserved_queries": 0, "resyncs": 0}),
        json!({"prada_alarms": 0, "prada_denying": false, "detector_refusals": 0,
               "unobserved_queries": 0, "resyncs": 0, "first_alarm": {"query": 1, "w": 1.5, "distances": 3}}),
        json!({"prada_alarms": 0, "prada_denying": false, "detector_refusals": 0,
               "unobserved_queries": 0, "resyncs": 0, "cleared": true}),
    ] {
        f.post(
            "/v1/topup",
            json!({"licence": token, "instance_id": instance, "detections": bad}),
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, "malformed_request");
    }
    assert_eq!(status().await.body["topup_seq"], 2);
}

#[tokio::test]
async fn model_registration_is_idempotent_and_refuses_another_key() {
    let f = Fixture::new().await;
    f.add_model().await;
    let same = json!({
        "capsule_id": hex::encode(CAPSULE_ID),
        "name": "mnist-cnn",
        "model_key": hex::encode(MODEL_KEY),
        "max_queries": null,
        "expires": null,
    });
    let r = f.admin_post("/v1/models", same.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body, json!({"model_id": hex::encode(CAPSULE_ID)}));

    let mut other_key = same.clone();
    other_key["model_key"] = json!(hex::encode([0x11; 32]));
    f.admin_post("/v1/models", other_key)
        .await
        .assert_error(StatusCode::CONFLICT, "model_exists");
    let mut other_terms = same;
    other_terms["max_queries"] = json!(5);
    f.admin_post("/v1/models", other_terms)
        .await
        .assert_error(StatusCode::CONFLICT, "model_exists");
}

#[tokio::test]
async fn licences_stay_within_the_model_policy() {
    let f = Fixture::new().await;
    let r = f
        .admin_post(
            "/v1/models",
            json!({
                "capsule_id": hex::encode(CAPSULE_ID),
                "name": "limited",
                "model_key": hex::encode(MODEL_KEY),
                "max_queries": 100,
                "expires": "2999-12-31",
            }),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let create = |queries: u64, expires: serde_json::Value| {
        f.admin_post(
            "/v1/licences",
            json!({"model_id": hex::encode(CAPSULE_ID), "queries": queries, "expires": expires}),
        )
    };
    create(101, json!(null))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "exceeds_policy");
    create(10, json!("3000-01-01"))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "exceeds_policy");
    // Without an expiry of its own, a licence takes the model's.
    let r = create(90, json!(null)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["expires"], "2999-12-31");
    let id = r.body["licence_id"].as_str().unwrap().to_owned();
    let grant_uri = format!("/v1/licences/{id}/grant");
    let grant = |q: u64| f.admin_post(&grant_uri, json!({"queries": q}));
    grant(11)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "exceeds_policy");
    let r = grant(10).await;
    assert_eq!(r.body["total_queries"], 100, "{}", r.body);
    grant(1)
        .await
        .assert_error(StatusCode::BAD_REQUEST, "exceeds_policy");

    f.admin_post(
        "/v1/licences",
        json!({"model_id": hex::encode([9u8; 16]), "queries": 1, "expires": null}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "model_not_found");
    f.admin_post("/v1/licences/lic_nope/grant", json!({"queries": 1}))
        .await
        .assert_error(StatusCode::NOT_FOUND, "licence_not_found");
    f.call(Method::GET, "/v1/licences/lic_nope", true, None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "licence_not_found");
}

#[tokio::test]
async fn grants_cannot_overflow_the_total() {
    let f = Fixture::new().await;
    f.add_model().await;
    let (id, _) = f.licence(i64::MAX as u64).await;
    f.admin_post(&format!("/v1/licences/{id}/grant"), json!({"queries": 1}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "exceeds_policy");
    f.admin_post(
        "/v1/licences",
        json!({"model_id": hex::encode(CAPSULE_ID), "queries": u64::MAX}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "malformed_request");
}

#[tokio::test]
async fn the_admin_token_is_private_and_survives_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path());
    let first = capsule_server::open(config.clone()).await.unwrap();
    assert!(first.admin_token_created());
    let path = first.admin_token_path().to_owned();
    let token = std::fs::read_to_string(&path).unwrap();
    assert!(token.trim().starts_with("mlc-admin-v1."));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&config.data_dir)
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    for name in [
        capsule_server::MASTER_KEY_FILE,
        capsule_server::SIGNING_KEY_FILE,
        capsule_server::DB_FILE,
    ] {
        let mode = std::fs::metadata(config.data_dir.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let server_key = first.server_public_key();
    first.close().await;
    drop(first);

    let dir_again = config.data_dir.parent().unwrap().to_owned();
    let second = Fixture::with_config(dir, |_| {}).await;
    assert_eq!(second.dir.path(), dir_again);
    assert!(!second.state.admin_token_created());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), token);
    assert_eq!(second.admin, token.trim());
    assert_eq!(second.state.server_public_key(), server_key);
    // The token still opens the admin endpoints after the restart.
    second.add_model().await;
}

#[tokio::test]
async fn model_keys_and_licence_tokens_are_not_stored_in_plaintext() {
    let f = Fixture::new().await;
    f.add_model().await;
    let (_, token) = f.licence(5).await;
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    let r = f
        .post("/v1/setup", enclave.setup_body(&token, &nonce, &evidence))
        .await;
    assert_eq!(r.status, StatusCode::OK);

    let check = |when: &str| {
        let data_dir = f.state.data_dir();
        let mut seen = 0;
        for entry in std::fs::read_dir(data_dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            if !name.starts_with(capsule_server::DB_FILE) {
                continue;
            }
            let bytes = std::fs::read(entry.path()).unwrap();
            seen += bytes.len();
            let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
            assert!(!has(&MODEL_KEY), "{when}: raw model key in {name}");
            assert!(
                !has(hex::encode(MODEL_KEY).as_bytes()),
                "{when}: hex key in {name}"
            );
            assert!(
                !has(hex::encode_upper(MODEL_KEY).as_bytes()),
                "{when}: hex key in {name}"
            );
            assert!(!has(token.as_bytes()), "{when}: licence token in {name}");
        }
        assert!(seen > 0, "no database files found");
    };
    check("while open");
    f.state.close().await;
    check("after close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_setups_on_one_licence_succeed_exactly_once() {
    let f = Fixture::new().await;
    f.add_model().await;
    let (_, token) = f.licence(10).await;
    let attester = f.attester(MEASUREMENT);
    let mut attempts = Vec::new();
    for _ in 0..50 {
        let nonce = f.nonce(&token).await;
        let enclave = Enclave::new();
        let body = enclave.setup_body(&token, &nonce, &enclave.evidence(&attester, &nonce));
        attempts.push((enclave, nonce, body));
    }
    let mut tasks = Vec::new();
    for (_, _, body) in &attempts {
        let app = f.app.clone();
        let req = axum::http::Request::post("/v1/setup")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap();
        tasks.push(tokio::spawn(async move { common::send(&app, req).await }));
    }
    let mut winners = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let r = task.await.unwrap();
        if r.status == StatusCode::OK {
            winners.push((i, r));
        } else {
            r.assert_error(StatusCode::CONFLICT, "licence_already_provisioned");
        }
    }
    assert_eq!(winners.len(), 1, "exactly one setup may win");
    let (i, r) = &winners[0];
    let (enclave, nonce, _) = &attempts[*i];
    let sealed: SealedGrant = serde_json::from_value(r.body["sealed_grant"].clone()).unwrap();
    let grant = enclave.key.open_grant(&sealed, nonce).unwrap();
    assert_eq!(grant.instance_id, enclave.instance_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parallel_topups_get_distinct_sequence_numbers() {
    let f = Fixture::new().await;
    f.add_model().await;
    let (licence_id, token) = f.licence(10).await;
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    let r = f
        .post("/v1/setup", enclave.setup_body(&token, &nonce, &evidence))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let server_key = f.state.server_public_key();

    let request = |uri: String, admin: bool, body: serde_json::Value| {
        let mut req = axum::http::Request::post(uri).header("content-type", "application/json");
        if admin {
            req = req.header("authorization", format!("Bearer {}", f.admin));
        }
        req.body(axum::body::Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    };
    let mut topups = Vec::new();
    let mut grants = Vec::new();
    for i in 0..50u64 {
        let app = f.app.clone();
        let req = request(
            "/v1/topup".into(),
            false,
            json!({"licence": token, "instance_id": hex::encode(enclave.instance_id), "used": i}),
        );
        topups.push(tokio::spawn(async move { common::send(&app, req).await }));
        if i % 5 == 0 {
            let app = f.app.clone();
            let req = request(
                format!("/v1/licences/{licence_id}/grant"),
                true,
                json!({"queries": 1}),
            );
            grants.push(tokio::spawn(async move { common::send(&app, req).await }));
        }
    }
    for g in grants {
        assert_eq!(g.await.unwrap().status, StatusCode::OK);
    }
    let mut issued = Vec::new();
    for t in topups {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let token = TopUp::verify(r.body["token"].as_str().unwrap(), &server_key).unwrap();
        assert_eq!(token.seq, r.body["seq"].as_u64().unwrap());
        assert_eq!(
            token.total_queries,
            r.body["total_queries"].as_u64().unwrap()
        );
        issued.push((token.seq, token.total_queries));
    }
    issued.sort_unstable();
    let seqs: Vec<u64> = issued.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    // 10 licensed + 10 grants of 1: never more, and never decreasing along the sequence.
    assert!(issued.iter().all(|(_, total)| (10..=20).contains(total)));
    assert!(issued.windows(2).all(|w| w[0].1 <= w[1].1));
    let status = f
        .call(
            Method::GET,
            &format!("/v1/licences/{licence_id}"),
            true,
            None,
        )
        .await;
    assert_eq!(status.body["topup_seq"], 50);
    assert_eq!(status.body["total_queries"], 20);
}

#[tokio::test]
async fn serve_stops_gracefully_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let state = capsule_server::open(common::config(dir.path()))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(capsule_server::serve(state, listener, async {
        let _ = stopped.await;
    }));
    tokio::task::yield_now().await;
    assert!(!server.is_finished());
    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
}
