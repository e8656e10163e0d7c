//! Setups per second, in-process (no socket), on a 2-worker runtime.
//!
//! `cargo run --release -p capsule-server --example setup_throughput [-- SETUPS [IN_FLIGHT]]`
//!
//! Each setup is a full `POST /v1/setup`: licence lookup, atomic nonce consumption, `sim`
//! evidence verification (Ed25519), the atomic provisioning update, unwrapping the model key,
//! HPKE sealing of the grant and the commit (SQLite, WAL, `synchronous = FULL`). Licences,
//! nonces and evidence are prepared before the clock starts. A second figure times the whole
//! client flow one at a time: nonce request, attestation, setup.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{Enclave, Fixture, MEASUREMENT};

fn main() {
    let mut args = std::env::args().skip(1);
    let setups: usize = args.next().map_or(400, |a| a.parse().expect("SETUPS"));
    let in_flight: usize = args.next().map_or(16, |a| a.parse().expect("IN_FLIGHT"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(setups, in_flight));
}

async fn run(setups: usize, in_flight: usize) {
    let f = Fixture::new().await;
    f.add_model().await;
    let attester = f.attester(MEASUREMENT);

    let mut bodies = Vec::with_capacity(setups);
    for _ in 0..setups {
        let (_, token) = f.licence(1000).await;
        let nonce = f.nonce(&token).await;
        let enclave = Enclave::new();
        let evidence = enclave.evidence(&attester, &nonce);
        bodies.push(serde_json::to_vec(&enclave.setup_body(&token, &nonce, &evidence)).unwrap());
    }

    let start = Instant::now();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(bodies));
    let mut workers = Vec::new();
    for _ in 0..in_flight {
        let app = f.app.clone();
        let queue = queue.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let Some(body) = queue.lock().unwrap().pop() else {
                    break;
                };
                let req = Request::post("/v1/setup")
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .unwrap();
                let r = common::send(&app, req).await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = start.elapsed();
    println!(
        "setup only: {setups} setups, {in_flight} in flight, 2 worker threads: {:.2} s, {:.0} setups/s",
        elapsed.as_secs_f64(),
        setups as f64 / elapsed.as_secs_f64()
    );

    let flows = setups.min(200);
    let mut tokens = Vec::with_capacity(flows);
    for _ in 0..flows {
        tokens.push(f.licence(1000).await.1);
    }
    let start = Instant::now();
    for token in &tokens {
        let nonce = f.nonce(token).await;
        let enclave = Enclave::new();
        let evidence = enclave.evidence(&attester, &nonce);
        let r = f
            .post("/v1/setup", enclave.setup_body(token, &nonce, &evidence))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let elapsed = start.elapsed();
    println!(
        "full client flow (nonce, attest, setup), one at a time: {flows} flows, {:.2} s, {:.0} flows/s",
        elapsed.as_secs_f64(),
        flows as f64 / elapsed.as_secs_f64()
    );
    f.state.close().await;
}
