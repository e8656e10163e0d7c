//! Per-query cost of the defenses, without a benchmark framework: medians of wall-clock
//! timings on this machine.
//!
//! ```text
//! cargo run -p capsule-defense --release --example prada_cost
//! ```
//!
//! - PRADA with 3000 stored queries of MNIST size (784 values), all in the queried class (the
//!   worst case: every query is compared with all 3000), for `u8` and `f32` storage, split
//!   into plain queries and test queries (every 10th runs Shapiro–Wilk over up to 5000
//!   distances);
//! - Shapiro–Wilk alone on 5000 values;
//! - noising (Algorithm 1) and the full output pipeline on 10 and 1000 classes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use capsule_defense::{
    NoisePolicy, OutputPolicy, Policy, Prada, PradaAction, PradaPolicy, ReverseSigmoid, Storage,
    apply, noise::noise, shapiro_wilk,
};

const DIM: usize = 784;
const STORED: usize = 3000;

struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 40) as f32 / (1u64 << 24) as f32
    }
    fn vector(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn micros(d: Duration) -> String {
    format!("{:8.1} µs", d.as_secs_f64() * 1e6)
}

/// Median time of one call of `f`, timed in batches of `batch` calls.
fn per_call(batch: usize, rounds: usize, mut f: impl FnMut()) -> Duration {
    let times = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            t.elapsed() / batch as u32
        })
        .collect();
    median(times)
}

fn prada_cost(storage: Storage) {
    let mut policy = PradaPolicy::new(0.95, PradaAction::Record);
    policy.storage = storage;
    policy.max_stored = STORED;
    policy.dg_initial_zero = true;
    let bound = policy.memory_bound(DIM, 10);
    let mut prada = Prada::new(policy).expect("valid policy");
    let mut rng = Rng(7);
    // Fill class 0's growing set to the bound (uniform noise is admitted often enough), and
    // D to its 5000 distances.
    let fill = Instant::now();
    let mut fed = 0;
    while prada.state().stored() < STORED || prada.state().distances() < 5000 {
        let x = rng.vector(DIM);
        prada.observe(&x, 0).expect("finite input");
        fed += 1;
    }
    let fill = fill.elapsed();

    let (mut plain, mut tested) = (Vec::new(), Vec::new());
    for _ in 0..600 {
        let x = rng.vector(DIM);
        let t = Instant::now();
        let o = prada.observe(black_box(&x), 0).expect("finite input");
        let dt = t.elapsed();
        if o.test.is_some() {
            tested.push(dt);
        } else {
            plain.push(dt);
        }
    }
    println!(
        "PRADA {storage:?}: {} stored in the queried class (filled with {fed} queries in {:.1} s), \
         {} distances, {:.2} MB held (bound {:.2} MB)",
        prada.state().stored_in_class(0),
        fill.as_secs_f64(),
        prada.state().distances(),
        prada.memory_bytes() as f64 / 1e6,
        bound as f64 / 1e6,
    );
    let mut all: Vec<Duration> = plain.iter().chain(&tested).copied().collect();
    let mean = all.iter().sum::<Duration>() / all.len() as u32;
    all.sort();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize];
    println!(
        "  per query: median {} (plain {}, test query {}), mean {}, p90 {}, p99 {}, max {}",
        micros(pct(0.5)),
        micros(median(plain)),
        micros(median(tested)),
        micros(mean),
        micros(pct(0.9)),
        micros(pct(0.99)),
        micros(pct(1.0)),
    );
    let json = serde_json::to_vec(prada.state()).expect("serialises");
    let t = Instant::now();
    let _: capsule_defense::PradaState = serde_json::from_slice(&json).expect("parses");
    println!(
        "  state as JSON: {:.2} MB, parsed in {:.1} ms",
        json.len() as f64 / 1e6,
        t.elapsed().as_secs_f64() * 1e3
    );
}

fn main() {
    for storage in [Storage::U8, Storage::F32] {
        prada_cost(storage);
    }

    let mut rng = Rng(11);
    let sample: Vec<f64> = (0..5000).map(|_| f64::from(rng.uniform())).collect();
    let sw = per_call(1, 51, || {
        black_box(shapiro_wilk(black_box(&sample)).expect("valid sample"));
    });
    println!(
        "Shapiro-Wilk, n = 5000 (sort + coefficients + W): {}",
        micros(sw)
    );

    for classes in [10usize, 1000] {
        let mut p = rng.vector(classes);
        let sum: f32 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= sum);
        let noise_policy = NoisePolicy {
            c: 0.5,
            prior: None,
        };
        let n = per_call(1000, 51, || {
            black_box(noise(black_box(&p), &noise_policy).expect("matching prior"));
        });
        let policy = Policy {
            noise: Some(noise_policy.clone()),
            output: OutputPolicy {
                reverse_sigmoid: Some(ReverseSigmoid::default()),
                top_k: Some(5),
                round: Some(3),
                ..OutputPolicy::default()
            },
            ..Policy::default()
        };
        let pipe = per_call(1000, 51, || {
            black_box(apply(&policy, black_box(&p)).expect("matching prior"));
        });
        println!(
            "{classes:5} classes: noising {}, pipeline (noise + reverse sigmoid + top-5 + round 3) {}",
            micros(n),
            micros(pipe)
        );
    }
}
