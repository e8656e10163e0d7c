//! What a client, an attacker or a broken tool may send, one attack a test; each must be
//! refused with its stable code in the JSON error shape.

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use common::{CAPSULE_ID, Enclave, Fixture, MEASUREMENT, MODEL_KEY};
use serde_json::{Value, json};

/// A fixture with the model registered and one licence: `(fixture, licence_id, token)`.
async fn licensed() -> (Fixture, String, String) {
    let f = Fixture::new().await;
    f.add_model().await;
    let (id, token) = f.licence(10).await;
    (f, id, token)
}

/// Provisions the licence to a fresh enclave; returns it.
async fn provision(f: &Fixture, token: &str) -> Enclave {
    let nonce = f.nonce(token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    let r = f
        .post("/v1/setup", enclave.setup_body(token, &nonce, &evidence))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    enclave
}

#[tokio::test]
async fn unknown_licence_tokens_are_refused() {
    let (f, id, token) = licensed().await;
    let forged = format!("mlc-licence-v1.{id}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    for bad in [forged.as_str(), "", "garbage", &token[..token.len() - 1]] {
        f.post("/v1/setup/nonce", json!({"licence": bad}))
            .await
            .assert_error(StatusCode::FORBIDDEN, "unknown_licence");
    }
    // A real nonce and real evidence do not help a wrong token.
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    f.post("/v1/setup", enclave.setup_body(&forged, &nonce, &evidence))
        .await
        .assert_error(StatusCode::FORBIDDEN, "unknown_licence");
    f.post(
        "/v1/topup",
        json!({"licence": forged, "instance_id": hex::encode(enclave.instance_id), "used": 0}),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "unknown_licence");
}

#[tokio::test]
async fn expired_licences_are_refused() {
    let f = Fixture::new().await;
    f.add_model().await;
    let r = f
        .admin_post(
            "/v1/licences",
            json!({"model_id": hex::encode(CAPSULE_ID), "queries": 5, "expires": "2001-01-01"}),
        )
        .await;
    let token = r.body["token"].as_str().unwrap().to_owned();
    f.post("/v1/setup/nonce", json!({"licence": token}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "licence_expired");
    let status = f
        .call(
            Method::GET,
            &format!("/v1/licences/{}", r.body["licence_id"].as_str().unwrap()),
            true,
            None,
        )
        .await;
    assert_eq!(status.body["expired"], true);
}

#[tokio::test]
async fn a_provisioned_licence_gives_nothing_to_a_fresh_enclave() {
    let (f, _, token) = licensed().await;
    // The attacker got a nonce while the licence was still free.
    let early_nonce = f.nonce(&token).await;
    provision(&f, &token).await;

    f.post("/v1/setup/nonce", json!({"licence": token}))
        .await
        .assert_error(StatusCode::CONFLICT, "licence_already_provisioned");
    let fresh = Enclave::new();
    let evidence = fresh.evidence(&f.attester(MEASUREMENT), &early_nonce);
    f.post(
        "/v1/setup",
        fresh.setup_body(&token, &early_nonce, &evidence),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "licence_already_provisioned");
}

#[tokio::test]
async fn a_replayed_nonce_is_refused() {
    let (f, _, token) = licensed().await;
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    // The first use fails a later check, and still spends the nonce.
    let mut wrong_platform = evidence.clone();
    wrong_platform.platform = "sgx".into();
    f.post(
        "/v1/setup",
        enclave.setup_body(&token, &nonce, &wrong_platform),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "platform_not_allowed");
    f.post("/v1/setup", enclave.setup_body(&token, &nonce, &evidence))
        .await
        .assert_error(StatusCode::FORBIDDEN, "nonce_invalid");
    // A nonce the server never issued.
    let made_up = [0x42; 32];
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &made_up);
    f.post("/v1/setup", enclave.setup_body(&token, &made_up, &evidence))
        .await
        .assert_error(StatusCode::FORBIDDEN, "nonce_invalid");
}

#[tokio::test]
async fn a_successful_setup_replayed_verbatim_is_refused() {
    let (f, _, token) = licensed().await;
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let body = enclave.setup_body(
        &token,
        &nonce,
        &enclave.evidence(&f.attester(MEASUREMENT), &nonce),
    );
    assert_eq!(
        f.post("/v1/setup", body.clone()).await.status,
        StatusCode::OK
    );
    f.post("/v1/setup", body)
        .await
        .assert_error(StatusCode::FORBIDDEN, "nonce_invalid");
}

#[tokio::test]
async fn a_nonce_issued_for_another_licence_is_refused() {
    let (f, _, token) = licensed().await;
    let (_, other_token) = f.licence(10).await;
    let other_nonce = f.nonce(&other_token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &other_nonce);
    f.post(
        "/v1/setup",
        enclave.setup_body(&token, &other_nonce, &evidence),
    )
    .await
    .assert_error(StatusCode::FORBIDDEN, "nonce_invalid");
    // It was not spent by the failed attempt: its own licence can still use it.
    let r = f
        .post(
            "/v1/setup",
            enclave.setup_body(&other_token, &other_nonce, &evidence),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn evidence_from_an_unlisted_measurement_is_refused() {
    let (f, _, token) = licensed().await;
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester([0x66; 32]), &nonce);
    f.post("/v1/setup", enclave.setup_body(&token, &nonce, &evidence))
        .await
        .assert_error(StatusCode::FORBIDDEN, "measurement_not_allowed");
    // Claiming the listed measurement without the platform's signature over it fails too.
    let nonce = f.nonce(&token).await;
    let mut claimed = enclave.evidence(&f.attester([0x66; 32]), &nonce);
    claimed.measurement = MEASUREMENT;
    f.post("/v1/setup", enclave.setup_body(&token, &nonce, &claimed))
        .await
        .assert_error(StatusCode::FORBIDDEN, "evidence_rejected");
}

#[tokio::test]
async fn with_no_allowed_measurement_every_setup_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::with_config(dir, |c| c.allowed_measurements.clear()).await;
    f.add_model().await;
    let (_, token) = f.licence(1).await;
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    f.post("/v1/setup", enclave.setup_body(&token, &nonce, &evidence))
        .await
        .assert_error(StatusCode::FORBIDDEN, "measurement_not_allowed");
}

#[tokio::test]
async fn evidence_for_another_enclave_key_is_refused() {
    let (f, _, token) = licensed().await;
    let nonce = f.nonce(&token).await;
    let genuine = Enclave::new();
    let evidence = genuine.evidence(&f.attester(MEASUREMENT), &nonce);
    // The attacker keeps the genuine evidence but swaps in a key it controls.
    let attacker = Enclave {
        key: capsule_format::EnclaveKey::generate(),
        instance_id: genuine.instance_id,
    };
    f.post("/v1/setup", attacker.setup_body(&token, &nonce, &evidence))
        .await
        .assert_error(StatusCode::FORBIDDEN, "evidence_rejected");
    // ...or another instance id.
    let nonce = f.nonce(&token).await;
    let evidence = genuine.evidence(&f.attester(MEASUREMENT), &nonce);
    let mut body = genuine.setup_body(&token, &nonce, &evidence);
    body["instance_id"] = json!(hex::encode([0xee; 16]));
    f.post("/v1/setup", body)
        .await
        .assert_error(StatusCode::FORBIDDEN, "evidence_rejected");
    // ...or evidence made for an earlier nonce.
    let old_nonce = nonce;
    let nonce = f.nonce(&token).await;
    let stale = genuine.evidence(&f.attester(MEASUREMENT), &old_nonce);
    f.post("/v1/setup", genuine.setup_body(&token, &nonce, &stale))
        .await
        .assert_error(StatusCode::FORBIDDEN, "evidence_rejected");
    // None of this provisioned the licence.
    provision(&f, &token).await;
}

#[tokio::test]
async fn sim_evidence_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fixture::with_config(dir, |c| c.allow_sim = false).await;
    f.add_model().await;
    let (_, token) = f.licence(1).await;
    let nonce = f.nonce(&token).await;
    let enclave = Enclave::new();
    let evidence = enclave.evidence(&f.attester(MEASUREMENT), &nonce);
    f.post("/v1/setup", enclave.setup_body(&token, &nonce, &evidence))
        .await
        .assert_error(StatusCode::FORBIDDEN, "platform_not_allowed");
}

#[tokio::test]
async fn topups_go_only_to_the_provisioned_instance() {
    let (f, _, token) = licensed().await;
    let body = |instance: [u8; 16]| json!({"licence": token, "instance_id": hex::encode(instance), "used": null});
    f.post("/v1/topup", body([1; 16]))
        .await
        .assert_error(StatusCode::CONFLICT, "licence_not_provisioned");
    let enclave = provision(&f, &token).await;
    f.post("/v1/topup", body([1; 16]))
        .await
        .assert_error(StatusCode::FORBIDDEN, "instance_mismatch");
    let r = f.post("/v1/topup", body(enclave.instance_id)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["seq"], 1, "the refused requests issued nothing");
}

/// Every admin endpoint: method, path, a valid body.
fn admin_endpoints(licence_id: &str) -> Vec<(Method, String, Option<Value>)> {
    vec![
        (
            Method::POST,
            "/v1/models".into(),
            Some(json!({"capsule_id": hex::encode([3u8; 16]), "name": "m",
                        "model_key": hex::encode(MODEL_KEY), "max_queries": null, "expires": null})),
        ),
        (
            Method::POST,
            "/v1/licences".into(),
            Some(json!({"model_id": hex::encode(CAPSULE_ID), "queries": 1, "expires": null})),
        ),
        (
            Method::POST,
            format!("/v1/licences/{licence_id}/grant"),
            Some(json!({"queries": 1})),
        ),
        (Method::GET, format!("/v1/licences/{licence_id}"), None),
    ]
}

#[tokio::test]
async fn admin_endpoints_need_the_admin_token() {
    let (f, id, _) = licensed().await;
    let wrong = [
        None,
        Some("Bearer mlc-admin-v1.not-the-token-at-all-000000000".to_owned()),
        Some(format!("Bearer {}x", f.admin)),
        Some(format!("Basic {}", f.admin)),
        Some(f.admin.clone()),
        Some("Bearer ".to_owned()),
    ];
    for (method, uri, body) in admin_endpoints(&id) {
        for auth in &wrong {
            let mut req = Request::builder().method(method.clone()).uri(&uri);
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            let req = match &body {
                Some(b) => req
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(serde_json::to_vec(b).unwrap())),
                None => req.body(Body::empty()),
            }
            .unwrap();
            let r = f.send(req).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {uri} with {auth:?}"
            );
            common::assert_error_shape(&r.body, "unauthorized");
        }
        // The right token passes (a control, so the loop above can fail).
        let r = f.call(method.clone(), &uri, true, body.clone()).await;
        assert!(r.status.is_success(), "{method} {uri}: {}", r.body);
    }
}

/// Every endpoint that takes a body: path, whether it needs the admin token, and bodies
/// that are valid JSON but wrong for it (missing fields, bad hex, bad types).
fn body_endpoints(licence_id: &str, token: &str) -> Vec<(String, bool, Vec<Value>)> {
    let ev = json!({"platform": "sim", "measurement": hex::encode(MEASUREMENT),
                    "report_data": hex::encode([0u8; 64]), "platform_key": "00", "signature": "00"});
    let setup = |field: &str, value: Value| {
        let mut b = json!({"licence": token, "nonce": hex::encode([0u8; 32]),
                           "instance_id": hex::encode([0u8; 16]),
                           "enclave_key": hex::encode([0u8; 32]), "evidence": ev});
        b[field] = value;
        b
    };
    vec![
        (
            "/v1/models".into(),
            true,
            vec![
                json!({"capsule_id": "zz", "name": "m", "model_key": hex::encode(MODEL_KEY)}),
                json!({"capsule_id": hex::encode([4u8; 16]), "name": "m", "model_key": "00"}),
                json!({"capsule_id": hex::encode([4u8; 16]), "name": "m",
                       "model_key": hex::encode(MODEL_KEY), "expires": "2026-02-30"}),
                json!({"capsule_id": hex::encode([4u8; 16]), "name": "",
                       "model_key": hex::encode(MODEL_KEY)}),
                json!({"capsule_id": hex::encode([4u8; 16]), "name": "m",
                       "model_key": hex::encode(MODEL_KEY), "max_queries": 0}),
            ],
        ),
        (
            "/v1/licences".into(),
            true,
            vec![
                json!({"model_id": hex::encode(CAPSULE_ID), "queries": 0}),
                json!({"model_id": hex::encode(CAPSULE_ID), "queries": -1}),
                json!({"model_id": "c1c1", "queries": 1}),
                json!({"model_id": hex::encode(CAPSULE_ID), "queries": "1"}),
            ],
        ),
        (
            format!("/v1/licences/{licence_id}/grant"),
            true,
            vec![
                json!({"queries": 0}),
                json!({"queries": 1.5}),
                json!({"q": 1}),
            ],
        ),
        (
            "/v1/setup/nonce".into(),
            false,
            vec![json!({"licence": 5}), json!({"token": token})],
        ),
        (
            "/v1/setup".into(),
            false,
            vec![
                setup("nonce", json!("xyz")),
                setup("nonce", json!(hex::encode([0u8; 31]))),
                setup("instance_id", json!("00")),
                setup("enclave_key", json!(hex::encode([0u8; 33]))),
                setup("evidence", json!({"platform": "sim"})),
                setup("evidence", json!("evidence")),
            ],
        ),
        (
            "/v1/topup".into(),
            false,
            vec![
                json!({"licence": token, "instance_id": "nothex"}),
                json!({"licence": token, "instance_id": hex::encode([0u8; 16]), "used": -3}),
                json!({"licence": token, "instance_id": hex::encode([0u8; 16]), "used": u64::MAX}),
            ],
        ),
    ]
}

#[tokio::test]
async fn malformed_requests_to_every_endpoint_are_refused() {
    let (f, id, token) = licensed().await;
    let endpoints = body_endpoints(&id, &token);
    assert_eq!(endpoints.len(), 6);
    for (uri, admin, specific) in endpoints {
        let auth = format!("Bearer {}", f.admin);
        let build = |content_type: Option<&str>, body: Vec<u8>| {
            let mut req = Request::post(&uri);
            if admin {
                req = req.header(header::AUTHORIZATION, &auth);
            }
            if let Some(ct) = content_type {
                req = req.header(header::CONTENT_TYPE, ct);
            }
            req.body(Body::from(body)).unwrap()
        };
        let json_ct = Some("application/json");
        let mut cases: Vec<(&str, Request<Body>)> = vec![
            ("not JSON", build(json_ct, b"{not json".to_vec())),
            ("truncated", build(json_ct, b"{\"queries\": ".to_vec())),
            ("empty body", build(json_ct, Vec::new())),
            ("array", build(json_ct, b"[]".to_vec())),
            ("empty object", build(json_ct, b"{}".to_vec())),
            (
                "unknown field",
                build(json_ct, br#"{"surprise": true}"#.to_vec()),
            ),
            ("text/plain", build(Some("text/plain"), b"{}".to_vec())),
            ("no content type", build(None, b"{}".to_vec())),
            (
                "invalid UTF-8",
                build(json_ct, b"{\"licence\": \"\xff\"}".to_vec()),
            ),
        ];
        for body in &specific {
            cases.push((
                "wrong fields",
                build(json_ct, serde_json::to_vec(body).unwrap()),
            ));
        }
        for (what, req) in cases {
            let r = f.send(req).await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "{uri}: {what}: {}",
                r.body
            );
            common::assert_error_shape(&r.body, "malformed_request");
        }
    }
}

#[tokio::test]
async fn oversize_bodies_to_every_endpoint_are_refused() {
    let (f, id, token) = licensed().await;
    let big = format!(
        "{{\"licence\": \"{}\"}}",
        "a".repeat(capsule_server::MAX_BODY_BYTES)
    )
    .into_bytes();
    let mut routes: Vec<(Method, String, bool)> = body_endpoints(&id, &token)
        .into_iter()
        .map(|(uri, admin, _)| (Method::POST, uri, admin))
        .collect();
    routes.push((Method::GET, "/v1/health".into(), false));
    routes.push((Method::GET, format!("/v1/licences/{id}"), true));
    assert_eq!(routes.len(), 8);
    for (method, uri, admin) in routes {
        for declared in [true, false] {
            if !declared && method == Method::GET {
                continue; // a GET body without a length is never read, so cannot hurt
            }
            let mut req = Request::builder()
                .method(method.clone())
                .uri(&uri)
                .header(header::CONTENT_TYPE, "application/json");
            if admin {
                req = req.header(header::AUTHORIZATION, format!("Bearer {}", f.admin));
            }
            let body = if declared {
                req = req.header(header::CONTENT_LENGTH, big.len());
                Body::from(big.clone())
            } else {
                // A stream with no length: the limit applies as it is read.
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                    big.chunks(4096).map(|c| Ok(c.to_vec())).collect();
                Body::new(unsized_body(chunks))
            };
            let r = f.send(req.body(body).unwrap()).await;
            assert_eq!(
                r.status,
                StatusCode::PAYLOAD_TOO_LARGE,
                "{method} {uri} (length declared: {declared}): {}",
                r.body
            );
            common::assert_error_shape(&r.body, "payload_too_large");
        }
    }
    // Just under the limit is not refused for its size.
    let fits = format!(
        "{{\"licence\": \"{}\"}}",
        "a".repeat(capsule_server::MAX_BODY_BYTES - 20)
    );
    let r = f
        .send(
            Request::post("/v1/setup/nonce")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(fits))
                .unwrap(),
        )
        .await;
    r.assert_error(StatusCode::FORBIDDEN, "unknown_licence");
}

/// A body of owned chunks whose length is not known in advance (like a chunked upload).
fn unsized_body(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl axum::body::HttpBody<Data = axum::body::Bytes, Error = std::io::Error> + Send + 'static {
    struct Chunks(std::collections::VecDeque<Result<Vec<u8>, std::io::Error>>);
    impl axum::body::HttpBody for Chunks {
        type Data = axum::body::Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            std::task::Poll::Ready(
                self.0
                    .pop_front()
                    .map(|c| c.map(|v| http_body::Frame::data(axum::body::Bytes::from(v)))),
            )
        }
    }
    Chunks(chunks.into())
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let f = Fixture::new().await;
    f.call(Method::GET, "/v1/nothing", false, None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    f.call(Method::GET, "/", false, None)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    f.call(Method::GET, "/v1/setup", false, None)
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    f.call(Method::DELETE, "/v1/models", true, None)
        .await
        .assert_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}
