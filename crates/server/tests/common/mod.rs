//! Shared fixtures: a server in a temporary data directory driven in-process, and a
//! `sim` platform that makes real evidence.
#![allow(dead_code)]

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use capsule_attest::{Attester as _, Evidence, SimAttester, SimPlatform};
use capsule_format::{EnclaveKey, INSTANCE_ID_LEN, report_data};
use capsule_server::{AppState, ServerConfig};
use serde_json::{Value, json};
use tempfile::TempDir;
use tower::ServiceExt as _;

/// The enclave build the fixture's server allows.
pub const MEASUREMENT: [u8; 32] = [0x4d; 32];
/// The capsule the fixture registers.
pub const CAPSULE_ID: [u8; 16] = [0xc1; 16];
/// Its model key.
pub const MODEL_KEY: [u8; 32] = [0x5a; 32];

pub struct Fixture {
    pub dir: TempDir,
    pub state: AppState,
    pub app: Router,
    pub admin: String,
    pub platform_dir: TempDir,
    pub platform: SimPlatform,
}

pub struct Response {
    pub status: StatusCode,
    pub body: Value,
}

impl Response {
    /// Asserts the JSON error shape with `code` and `status`.
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_error_shape(&self.body, code);
    }
}

/// `{"error": {"code": code, "message": "<non-empty>"}}` and nothing else.
pub fn assert_error_shape(body: &Value, code: &str) {
    let obj = body.as_object().expect("error body is an object");
    assert_eq!(obj.len(), 1, "{body}");
    let err = obj["error"].as_object().expect("error is an object");
    assert_eq!(err.len(), 2, "{body}");
    assert_eq!(err["code"], code, "{body}");
    let message = err["message"].as_str().expect("message is a string");
    assert!(message.len() > 10 && message.ends_with('.'), "{body}");
}

pub fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig {
        data_dir: dir.join("server"),
        allow_sim: true,
        allowed_measurements: vec![MEASUREMENT],
    }
}

impl Fixture {
    pub async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        Fixture::with_config(dir, |_| {}).await
    }

    pub async fn with_config(dir: TempDir, edit: impl FnOnce(&mut ServerConfig)) -> Fixture {
        let mut config = config(dir.path());
        edit(&mut config);
        let state = capsule_server::open(config).await.unwrap();
        let admin = std::fs::read_to_string(state.admin_token_path())
            .unwrap()
            .trim()
            .to_owned();
        let platform_dir = tempfile::tempdir().unwrap();
        let platform = SimPlatform::open_or_create(&platform_dir.path().join("sim")).unwrap();
        Fixture {
            app: capsule_server::app(state.clone()),
            dir,
            state,
            admin,
            platform_dir,
            platform,
        }
    }

    /// A JSON request, with the admin token if `admin`.
    pub async fn call(
        &self,
        method: Method,
        uri: &str,
        admin: bool,
        body: Option<Value>,
    ) -> Response {
        let mut req = Request::builder().method(method).uri(uri);
        if admin {
            req = req.header(header::AUTHORIZATION, format!("Bearer {}", self.admin));
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(serde_json::to_vec(&b).unwrap())),
            None => req.body(Body::empty()),
        }
        .unwrap();
        self.send(req).await
    }

    pub async fn send(&self, req: Request<Body>) -> Response {
        send(&self.app, req).await
    }

    pub async fn post(&self, uri: &str, body: Value) -> Response {
        self.call(Method::POST, uri, false, Some(body)).await
    }

    pub async fn admin_post(&self, uri: &str, body: Value) -> Response {
        self.call(Method::POST, uri, true, Some(body)).await
    }

    /// Registers the fixture's model, unlimited.
    pub async fn add_model(&self) {
        let r = self
            .admin_post(
                "/v1/models",
                json!({
                    "capsule_id": hex::encode(CAPSULE_ID),
                    "name": "mnist-cnn",
                    "model_key": hex::encode(MODEL_KEY),
                    "max_queries": null,
                    "expires": null,
                }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }

    /// Creates a licence for the fixture's model: `(licence_id, token)`.
    pub async fn licence(&self, queries: u64) -> (String, String) {
        let r = self
            .admin_post(
                "/v1/licences",
                json!({"model_id": hex::encode(CAPSULE_ID), "queries": queries, "expires": null}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        (
            r.body["licence_id"].as_str().unwrap().to_owned(),
            r.body["token"].as_str().unwrap().to_owned(),
        )
    }

    /// A fresh setup nonce for the licence, as bytes.
    pub async fn nonce(&self, token: &str) -> [u8; 32] {
        let r = self
            .post("/v1/setup/nonce", json!({"licence": token}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body["expires_in_s"], 300);
        let mut nonce = [0u8; 32];
        hex::decode_to_slice(r.body["nonce"].as_str().unwrap(), &mut nonce).unwrap();
        nonce
    }

    pub fn attester(&self, measurement: [u8; 32]) -> SimAttester {
        self.platform.attester(measurement)
    }
}

/// One enclave instance's side of a setup.
pub struct Enclave {
    pub key: EnclaveKey,
    pub instance_id: [u8; INSTANCE_ID_LEN],
}

impl Enclave {
    pub fn new() -> Enclave {
        let mut instance_id = [0u8; INSTANCE_ID_LEN];
        aws_lc_rs::rand::SecureRandom::fill(
            &aws_lc_rs::rand::SystemRandom::new(),
            &mut instance_id,
        )
        .unwrap();
        Enclave {
            key: EnclaveKey::generate(),
            instance_id,
        }
    }

    /// Evidence from `attester` bound to this enclave's key and instance and `nonce`.
    pub fn evidence(&self, attester: &SimAttester, nonce: &[u8; 32]) -> Evidence {
        attester
            .attest(&report_data(&self.key.public(), &self.instance_id, nonce))
            .unwrap()
    }

    /// The setup request body.
    pub fn setup_body(&self, token: &str, nonce: &[u8; 32], evidence: &Evidence) -> Value {
        json!({
            "licence": token,
            "nonce": hex::encode(nonce),
            "instance_id": hex::encode(self.instance_id),
            "enclave_key": hex::encode(self.key.public()),
            "evidence": evidence,
        })
    }
}

pub async fn send(app: &Router, req: Request<Body>) -> Response {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    assert!(is_json, "{status}: non-JSON response {bytes:?}");
    let body = serde_json::from_slice(&bytes).unwrap();
    Response { status, body }
}
