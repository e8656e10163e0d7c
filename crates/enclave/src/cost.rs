//! What the provider's defenses cost per query, measured on the enclave's own code: the
//! same detector stage, PRADA guard, output policy and state sealing that a session runs
//! (spec/policy.md §4, spec/enclave-protocol.md §7.4), without the process boundary, the
//! layer stream or the counter's `fdatasync`, which every query pays with or without
//! defenses (`examples/boundary_overhead.rs` measures those).
//!
//! Like [`crate::SealedModel`] this opens the capsule with its model key: it is for the
//! provider's benchmarks (`mlcapsule bench --defenses-only`), not for
//! clients.

use std::time::{Duration, Instant};

use capsule_attest::Attester;
use capsule_engine::Tensor;
use capsule_format::{Capsule, ModelKey};

use crate::defense::{Binding, Defenses, Guard};
use crate::error::Error;
use crate::model::Layout;

/// Median cost per query (batch 1) of each defense of a capsule's policy; `None` for a
/// defense the policy does not have.
#[derive(Clone, Debug)]
pub struct DefenseCosts {
    /// The input detector: the input transform, the network and the decision rule.
    pub detector: Option<Duration>,
    /// PRADA's observation of one query, with [`DefenseCosts::prada_stored`] queries stored,
    /// all in the queried class (the worst case: every one is compared); a tenth of the
    /// queries also run the Shapiro–Wilk test.
    pub prada: Option<Duration>,
    /// Queries stored in PRADA's growing sets while [`DefenseCosts::prada`] was measured.
    pub prada_stored: usize,
    /// Noising and the output policies on one posterior.
    pub release: Option<Duration>,
    /// Sealing the defense state after a query (postcard, then the platform's sealing).
    pub seal: Option<Duration>,
    /// Opening the defense state, once per `Load`.
    pub unseal: Option<Duration>,
    /// Bytes of the sealed defense state.
    pub state_bytes: usize,
}

/// Measures [`DefenseCosts`] for the capsule's policy on `queries` (each a batch of one),
/// `rounds` times over, sealing with `attester`. PRADA is first filled with `stored`
/// queries of class 0 (uniform noise; at most the policy's `max_stored`), then observes
/// the queries as if the model had put them all in class 0.
pub fn measure_defense_costs(
    capsule: &Capsule<'_>,
    key: &ModelKey,
    attester: &dyn Attester,
    queries: &[Tensor],
    stored: usize,
    rounds: usize,
) -> Result<DefenseCosts, Error> {
    let unsealer = capsule.unseal(key)?;
    let header = unsealer.header();
    let layout = Layout::new(header)?;
    let defenses = Defenses::new(header, &layout)?;
    let mut model_weights =
        layout.open_resident(&unsealer, capsule, defenses.model_layers.clone())?;
    let posteriors = queries
        .iter()
        .map(|x| {
            layout
                .plan()
                .run(std::slice::from_ref(x), &mut model_weights)
                .map_err(Error::Engine)
                .map(|mut out| out.swap_remove(0))
        })
        .collect::<Result<Vec<Tensor>, Error>>()?;
    let mut costs = DefenseCosts {
        detector: None,
        prada: None,
        prada_stored: 0,
        release: None,
        seal: None,
        unseal: None,
        state_bytes: 0,
    };

    if let Some(stage) = &defenses.detector {
        let mut weights = stage
            .layout
            .open_resident(&unsealer, capsule, stage.layers.clone())?;
        costs.detector = Some(median_per_query(queries, rounds, |x| {
            let input = stage.input_for(x)?;
            let scores = stage
                .layout
                .plan()
                .run(&[input], &mut weights)
                .map_err(Error::Engine)?;
            stage.decide(&scores, 1).map(|_| ())
        })?);
    }

    if defenses.shapes_output() {
        costs.release = Some(median_per_query(&posteriors, rounds, |p| {
            capsule_defense::apply(&defenses.policy, p.data())
                .map(|_| ())
                .map_err(|e| Error::QueryFailed {
                    reason: e.to_string(),
                })
        })?);
    }

    if defenses.stateful() {
        let capsule_id = header.capsule_id;
        let binding = Binding {
            attester,
            instance_id: &[0; 16],
            capsule_id: &capsule_id,
        };
        let mut guard = Guard::open(&defenses.policy, None, &binding, 0)?;
        if let Some(prada) = &defenses.policy.prada {
            let dim = queries.first().map_or(0, Tensor::len);
            let mut class0 = vec![0.0f32; posteriors.first().map_or(1, Tensor::len)];
            class0[0] = 1.0;
            let class0 = Tensor::new(vec![1, class0.len()], class0).map_err(Error::Engine)?;
            let target = stored.min(prada.max_stored);
            // Ever larger noise is always admitted (its distances exceed the threshold,
            // which follows the earlier, smaller ones): fill the set, then D.
            let mut noise = Noise(0x853c_49e6_748f_ea9b);
            let mut i = 0u32;
            let distances = if target == prada.max_stored {
                prada.max_distances
            } else {
                target.min(prada.max_distances)
            };
            let filled = |guard: &Guard| {
                guard
                    .prada_state()
                    .is_none_or(|s| s.stored() >= target && s.distances() >= distances)
            };
            while !filled(&guard) {
                let scale = 1.0 + i as f32 / 64.0;
                let data = noise.vector(dim).iter().map(|v| v * scale).collect();
                let x = Tensor::new(queries[0].shape().to_vec(), data).map_err(Error::Engine)?;
                guard.observe(&x, &class0, 1)?;
                i += 1;
            }
            costs.prada_stored = guard.prada_state().map_or(0, |s| s.stored());
            costs.prada = Some(median_per_query(queries, rounds, |x| {
                guard.observe(x, &class0, 1).map(|_| ())
            })?);
        }
        let mut sealed = Vec::new();
        costs.seal = Some(median_per_query(&[()], rounds.min(20), |_| {
            sealed = guard.seal(&binding)?;
            Ok(())
        })?);
        costs.state_bytes = sealed.len();
        costs.unseal = Some(median_per_query(&[()], rounds.min(20), |_| {
            Guard::open(&defenses.policy, Some(&sealed), &binding, 0).map(|_| ())
        })?);
    }
    Ok(costs)
}

/// The median over `rounds` passes over `items` of the time of one call.
fn median_per_query<T>(
    items: &[T],
    rounds: usize,
    mut f: impl FnMut(&T) -> Result<(), Error>,
) -> Result<Duration, Error> {
    let mut times = Vec::with_capacity(items.len() * rounds);
    for _ in 0..rounds.max(1) {
        for item in items {
            let start = Instant::now();
            f(item)?;
            times.push(start.elapsed());
        }
    }
    times.sort_unstable();
    Ok(times.get(times.len() / 2).copied().unwrap_or_default())
}

/// Uniform noise in [0, 1): the filler PRADA stores readily.
struct Noise(u64);

impl Noise {
    fn vector(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (self.0 >> 40) as f32 / (1u64 << 24) as f32
            })
            .collect()
    }
}
