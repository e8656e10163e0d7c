//! Per-query cost of the provider's defenses inside the enclave's code path, on the
//! bundled MNIST CNN (issue 5's floors: noising under 0.05 ms, the detector under 1 ms,
//! PRADA under 1 ms with 3000 stored queries of MNIST size).
//!
//! ```text
//! cargo run --release -p capsule-enclave --example defense_overhead [ROUNDS]
//! ```
//!
//! The capsule is sealed with noising (c = 0.5), reverse sigmoid, top-3 and rounding,
//! PRADA (`u8` and `f32` storage, 3000 stored queries all in the queried class: the worst
//! case) and a detector network of the kennen-io detector's size (random weights), then
//! measured with [`capsule_enclave::measure_defense_costs`] on the ten sample digits.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use capsule_enclave::measure_defense_costs;
use capsule_format::Capsule;
use serde_json::json;

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.4} ms", d.as_secs_f64() * 1e3))
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let platform = capsule_attest::SimPlatform::open_or_create(dir.path()).expect("a sim platform");
    let attester = platform.attester([0; 32]);
    let detector = common::kennen_sized_detector();
    let digits = common::sample_digits();
    for storage in ["u8", "f32"] {
        let policy = json!({
            "noise": {"c": 0.5, "prior": null},
            "output": {"reverse_sigmoid": {"beta": 1.0, "gamma": 0.1}, "top_k": 3,
                       "label_only": false, "round": 3},
            "prada": {"delta": 0.95, "action": "record", "min_distances": 100,
                      "min_class_distances": 10, "test_every": 10, "trim_sigmas": 3.0,
                      "max_stored": 3000, "max_distances": 5000, "dg_initial_zero": false,
                      "storage": storage},
            "detector": {"enabled": true, "threshold": 0.5, "crafted_class": 1,
                         "scores": "probabilities"}
        });
        let sealed = common::defended_capsule(policy, Some(&detector));
        let capsule = Capsule::parse(&sealed.bytes).expect("a capsule");
        let costs = measure_defense_costs(&capsule, &sealed.key, &attester, &digits, 3000, rounds)
            .expect("the defenses run");
        println!("PRADA storage {storage}, median per query over {rounds} x 10 queries:");
        println!("  detector (kennen-io size)        {}", ms(costs.detector));
        println!(
            "  PRADA, {} stored, D full         {}",
            costs.prada_stored,
            ms(costs.prada)
        );
        println!("  noising + output policies        {}", ms(costs.release));
        println!(
            "  seal the defense state ({:.2} MB) {}",
            costs.state_bytes as f64 / 1e6,
            ms(costs.seal)
        );
        println!("  open it (once per Load)          {}", ms(costs.unseal));
    }
}
