//! Per-query latency through the enclave process boundary against the
//! in-process model, on the bundled MNIST CNN, batch 1.
//!
//! ```text
//! cargo build --release -p capsule-enclave --bins --examples
//! target/release/examples/boundary_overhead [QUERIES]
//! ```
//!
//! `StreamingModel::run` is the enclave's layer stream fed from memory: it
//! unseals every layer per query, as the enclave does, without the pipe and
//! the counter. Each enclave query is a `Query` frame, the `SendLayers` answer, every
//! layer's sealed chunks, unsealing, the run, a durable counter increment
//! (an `fdatasync` of the counter file) and the `Output` frame. A `Status`
//! round trip shows the bare cost of crossing the pipe twice.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use capsule_enclave::{SealedModel, StreamingModel};
use capsule_format::{Capsule, Policy};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn time(n: usize, mut f: impl FnMut(usize)) -> Duration {
    for i in 0..n.min(20) {
        f(i); // warm up caches, threads, the page cache
    }
    median(
        (0..n)
            .map(|i| {
                let start = Instant::now();
                f(i);
                start.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let sealed =
        common::mnist_capsule_in_chunks(Policy::default(), capsule_format::DEFAULT_CHUNK_SIZE);
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let inputs: Vec<_> = (0..n).map(|i| common::input(1, i as u32)).collect();

    let model = SealedModel::open(&capsule, &sealed.key).unwrap();
    let in_process = time(n, |i| {
        model.run(std::slice::from_ref(&inputs[i])).unwrap();
    });

    // The enclave's own layer stream, fed from memory: every query unseals every layer.
    let mut streaming = StreamingModel::open(&capsule, &sealed.key, None).unwrap();
    let in_process_streaming = time(n, |i| {
        streaming.run(std::slice::from_ref(&inputs[i])).unwrap();
    });

    let dir = tempfile::tempdir().unwrap();
    let terms = common::Terms {
        queries: 10 * n as u64 + 100,
        ..common::Terms::default()
    };
    let (mut enclave, _, _) = common::ready_enclave(
        &dir.path().join("platform"),
        &sealed,
        &common::server_key(),
        terms,
    );
    let through_enclave = time(n, |i| {
        enclave.query(&capsule, &inputs[i]).unwrap();
    });
    let round_trip = time(n, |_| {
        enclave.status().unwrap();
    });

    // Two parts of a query that the in-process run does not pay.
    let unsealer = capsule.unseal(&sealed.key).unwrap();
    let unseal = time(n, |_| {
        for layer in 0..capsule.header().layers.len() {
            unsealer
                .open_layer(layer, capsule.sealed_layer(layer))
                .unwrap();
        }
    });
    let platform =
        capsule_attest::SimPlatform::open_or_create(&dir.path().join("platform")).unwrap();
    let mut counter = platform.create_counter(&[0xbe; 16]).unwrap();
    let increment = time(n, |_| {
        capsule_attest::MonotonicCounter::increment(&mut counter).unwrap();
    });

    println!(
        "MNIST CNN ({} parameters, {} layers, {} sealed bytes), batch 1, median of {n}:",
        capsule.header().param_count(),
        capsule.header().layers.len(),
        sealed.bytes.len() - capsule.prefix().len()
    );
    println!("  in-process SealedModel::run   {in_process:>10.1?}");
    println!("  in-process StreamingModel::run{in_process_streaming:>10.1?}");
    println!("  EnclaveProcess::query         {through_enclave:>10.1?}");
    println!("  Status round trip (pipe only) {round_trip:>10.1?}");
    println!("  unseal every layer            {unseal:>10.1?}");
    println!("  counter increment (fdatasync) {increment:>10.1?}");
    println!(
        "  ratio query / in-process      {:>10.2}x",
        through_enclave.as_secs_f64() / in_process.as_secs_f64()
    );
    println!(
        "  (the counter lives in {}; its fdatasync is part of every query)",
        dir.path().display()
    );
}
