//! Membership inference against an overfit target, and MLCapsule's noising defense
//! (paper §7.3, Figure 4; algorithms.md §3).
//!
//! The target is a small CNN trained to ~100 % training accuracy on a small MNIST subset (the
//! members). Non-members are test images. The attacks are ML-Leaks' adversary 3, which needs
//! no shadow model: a threshold on the maximum posterior, or on the posterior's entropy (the
//! paper's attack); both are scored by ROC AUC, which needs no threshold. Each query's
//! posterior goes through `capsule_defense::noise::noise` (Algorithm 1) with strength c and
//! T = the members' class prior, for c = 0, 0.1, …, 1.
//!
//! Algorithm 1 is deterministic: an attacker who knows which way it bends the score flips it
//! ([`crate::metrics::defense_aware`]), and one who also knows c and T can try to undo it
//! (given P' the weight cα is a root of a one-dimensional equation, see [`preimages`]). Both
//! are reported beside the plain attacks, so the figures do not overstate the defense.
//!
//! Measured limits (see the `mlcapsule lab mia` report): on (Fashion-)MNIST a small CNN
//! generalises its confidence well, so members and most non-members both get near-zero
//! entropy and the undefended threshold attack stays far below the paper's CIFAR-100 AUC of
//! 0.97; the entropy percentiles in [`MiaReport`] show the overlap.

use capsule_defense::NoisePolicy;

use crate::Error;
use crate::data::{CLASSES, Dataset, Images};
use crate::metrics::{self, auc, defense_aware, entropy};
use crate::models::{Activation, Architecture, Cnn, ConvLayer};
use crate::plot::{COLORS, HLine, Panel, Series};
use crate::rng::Rng;
use crate::train::{self, Optimizer, TrainConfig};

/// The experiment's size, target and seed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MiaConfig {
    /// Training images of the target (the members), the first ones of a seeded shuffle of the
    /// training split.
    pub members: usize,
    /// Test images used as non-members, the first ones of a seeded shuffle of the test split.
    pub non_members: usize,
    /// The target network, trained without regularisation (no dropout, no weight decay).
    pub target: Architecture,
    /// Training epochs, all of them run: far past 100 % training accuracy the members' loss
    /// keeps falling and the members' posteriors keep moving away from the non-members'.
    pub epochs: usize,
    /// Examples per training step.
    pub batch_size: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// The noise strengths evaluated.
    pub c: Vec<f64>,
    /// Seeds the subsets, the initialisation and training.
    pub seed: u64,
}

impl MiaConfig {
    /// The full run: 100 members against 100 non-members, the [`MiaConfig::target`] of
    /// [`overfit_target`] with a 512-unit hidden layer trained for 200 epochs, c in steps of
    /// 0.1.
    #[must_use]
    pub fn full() -> MiaConfig {
        MiaConfig {
            members: 100,
            non_members: 100,
            target: overfit_target(512),
            epochs: 200,
            batch_size: 10,
            lr: 1e-3,
            c: (0..=10).map(|i| f64::from(i) / 10.0).collect(),
            seed: 1,
        }
    }

    /// A smoke run of a few seconds: a narrower target, a few epochs.
    #[must_use]
    pub fn quick() -> MiaConfig {
        MiaConfig {
            target: overfit_target(64),
            epochs: 5,
            ..MiaConfig::full()
        }
    }
}

/// The target: conv 5×5 ×8 → 2×2 max-pool → tanh → FC `hidden` → tanh → FC 10, no dropout,
/// on 28×28 images. Still a CNN, but one whose capacity sits in the wide fully connected
/// layer: on 100 images it memorises rather than generalises its confidence, which a deeper
/// convolutional stack does (its confident test images are as confident as its members).
/// Bounded tanh features, as in ML-Leaks' target, keep the non-members' logits from growing
/// with the members'.
#[must_use]
pub fn overfit_target(hidden: usize) -> Architecture {
    Architecture {
        input: [1, 28, 28],
        convs: vec![ConvLayer {
            filters: 8,
            kernel: 5,
            padding: 0,
        }],
        pool: true,
        hidden: vec![hidden],
        classes: CLASSES,
        activation: Activation::Tanh,
        dropout: 0.0,
    }
}

/// The measurements at one noise strength c.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MiaRow {
    /// Noise strength.
    pub c: f64,
    /// AUC of the entropy attack (lower entropy means member; the paper's attack).
    pub auc_entropy: f64,
    /// AUC of the max-posterior attack (ML-Leaks adversary 3).
    pub auc_max_posterior: f64,
    /// max(AUC, 1 − AUC) of the entropy attack.
    pub defense_aware_entropy: f64,
    /// max(AUC, 1 − AUC) of the max-posterior attack.
    pub defense_aware_max_posterior: f64,
    /// AUC of the entropy attack on the least confident preimage of P' ([`preimages`]): an
    /// attacker who knows c and T and undoes the noise.
    pub auc_inverted: f64,
    /// Share of all queries (members and non-members) whose predicted label is unchanged.
    pub label_kept: f64,
    /// Accuracy of the released labels on the members.
    pub accuracy_members: f64,
    /// Accuracy of the released labels on the non-members (test accuracy).
    pub accuracy_non_members: f64,
    /// Mean Jensen–Shannon divergence between P and P', standard convention (½ KL + ½ KL).
    pub jsd: f64,
    /// The same in the paper's convention (without the ½): twice `jsd`.
    pub jsd_paper: f64,
    /// Mean |P_δ − P'_δ| over all queries, δ the correct class (paper §7.3).
    pub mean_abs_delta: f64,
}

/// The experiment's outcome.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MiaReport {
    /// What was run.
    pub config: MiaConfig,
    /// Target accuracy on its training set (members), undefended.
    pub train_accuracy: f64,
    /// Target accuracy on the non-members, undefended.
    pub test_accuracy: f64,
    /// The prior T given to the defense (the members' class shares).
    pub prior: Vec<f64>,
    /// One row per c.
    pub rows: Vec<MiaRow>,
    /// Training loss per epoch.
    pub epoch_loss: Vec<f64>,
    /// Posterior entropy of the members (undefended) at the 10th, 25th, 50th, 75th and 90th
    /// percentiles.
    pub member_entropy: [f64; 5],
    /// The same for the non-members.
    pub non_member_entropy: [f64; 5],
    /// Share of all undefended posteriors whose entropy is exactly 0 in f32 (saturated).
    pub saturated: f64,
}

/// The floors of issue 5 for this experiment.
pub mod floors {
    /// AUC of the undefended attack at c = 0, at least.
    pub const AUC_AT_ZERO: f64 = 0.8;
    /// Defense-aware AUC at the best c, at most.
    pub const DEFENSE_AWARE: f64 = 0.6;
    /// Share of labels kept at the best c, at least.
    pub const LABEL_KEPT: f64 = 0.997;
}

impl MiaReport {
    /// The best c: the lowest defense-aware entropy AUC among the c > 0 that keep the label
    /// on at least [`floors::LABEL_KEPT`] of the queries.
    #[must_use]
    pub fn best(&self) -> Option<&MiaRow> {
        self.rows
            .iter()
            .filter(|r| r.c > 0.0 && r.label_kept >= floors::LABEL_KEPT)
            .min_by(|a, b| a.defense_aware_entropy.total_cmp(&b.defense_aware_entropy))
    }

    /// The floors, each with whether it holds: (name, measured, holds).
    #[must_use]
    pub fn floors(&self) -> Vec<(&'static str, f64, bool)> {
        let mut out = Vec::new();
        if let Some(r0) = self.rows.iter().find(|r| r.c == 0.0) {
            out.push((
                "AUC at c=0 >= 0.8 (entropy)",
                r0.auc_entropy,
                r0.auc_entropy >= floors::AUC_AT_ZERO,
            ));
        }
        match self.best() {
            Some(b) => {
                out.push((
                    "defense-aware AUC at best c <= 0.6",
                    b.defense_aware_entropy,
                    b.defense_aware_entropy <= floors::DEFENSE_AWARE,
                ));
                out.push((
                    "label kept at best c >= 0.997",
                    b.label_kept,
                    b.label_kept >= floors::LABEL_KEPT,
                ));
            }
            None => out.push(("a c > 0 keeping >= 99.7 % of labels", 0.0, false)),
        }
        out
    }

    /// Figure 4 of the paper, both panels: attack AUC against c, and utility loss against c.
    #[must_use]
    pub fn panels(&self) -> Vec<Panel> {
        let pts = |f: fn(&MiaRow) -> f64| self.rows.iter().map(|r| (r.c, f(r))).collect();
        let series = |label: &str, color: usize, f: fn(&MiaRow) -> f64| Series {
            label: label.into(),
            points: pts(f),
            color: COLORS[color],
            markers: true,
        };
        vec![
            Panel {
                title: "Membership inference vs c".into(),
                x_label: "c (noise strength)".into(),
                y_label: "ROC AUC".into(),
                series: vec![
                    series("entropy attack (paper)", 0, |r| r.auc_entropy),
                    series("max-posterior attack", 1, |r| r.auc_max_posterior),
                    series("entropy, defense-aware max(AUC,1-AUC)", 2, |r| {
                        r.defense_aware_entropy
                    }),
                    series("entropy after inverting (c, T known)", 4, |r| {
                        r.auc_inverted
                    }),
                ],
                hlines: vec![
                    HLine {
                        y: 0.5,
                        label: "chance".into(),
                        color: [120, 120, 120],
                    },
                    HLine {
                        y: floors::DEFENSE_AWARE,
                        label: "floor 0.6 (defense-aware)".into(),
                        color: COLORS[3],
                    },
                ],
                y_range: Some((0.0, 1.0)),
                x_range: Some((0.0, 1.0)),
            },
            Panel {
                title: "Utility vs c".into(),
                x_label: "c (noise strength)".into(),
                y_label: "divergence / error".into(),
                series: vec![
                    series("JSD(P,P') standard (1/2 KL + 1/2 KL)", 0, |r| r.jsd),
                    series("JSD(P,P') paper (no 1/2)", 1, |r| r.jsd_paper),
                    series("mean |P_delta - P'_delta|", 2, |r| r.mean_abs_delta),
                    series("labels changed (share)", 3, |r| 1.0 - r.label_kept),
                ],
                hlines: vec![HLine {
                    y: 0.25,
                    label: "paper's bound 0.25".into(),
                    color: [120, 120, 120],
                }],
                y_range: None,
                x_range: Some((0.0, 1.0)),
            },
        ]
    }
}

/// The posteriors P that Algorithm 1 maps to `noised` under strength `c` and prior `prior`,
/// as an attacker who knows both would compute them, ordered from the least to the most
/// confident.
///
/// With w = cα(P) the map is P' = (1 − w)P + wT, so every preimage is P(w) = (P' − wT)/(1 − w)
/// for a root w of cα(P(w)) = w in [0, min(c, min_k P'_k/T_k)] (P(w) must stay non-negative).
/// The roots are bracketed on a grid and refined by bisection. There can be more than one:
/// Algorithm 1 is not injective (a near one-hot P and a moderately confident one can give the
/// same P'), which is why undoing it does not simply restore the undefended attack. Precision
/// is limited by P' being `f32`.
#[must_use]
pub fn preimages(noised: &[f32], c: f64, prior: &[f64]) -> Vec<Vec<f64>> {
    const GRID: usize = 400;
    let q: Vec<f64> = noised.iter().map(|&v| f64::from(v)).collect();
    let k = q.len();
    if k < 2 || c <= 0.0 || prior.len() != k {
        return vec![q];
    }
    let recover = |w: f64| -> Vec<f64> {
        let mut p: Vec<f64> = q
            .iter()
            .zip(prior)
            .map(|(a, t)| ((a - w * t) / (1.0 - w)).max(0.0))
            .collect();
        let s: f64 = p.iter().sum();
        if s > 0.0 {
            p.iter_mut().for_each(|v| *v /= s);
        }
        p
    };
    let alpha = |p: &[f64]| {
        let h = -p
            .iter()
            .filter(|&&v| v > 0.0)
            .map(|&v| v * v.ln())
            .sum::<f64>();
        (1.0 - h / (k as f64).ln()).clamp(0.0, 1.0)
    };
    let w_max = q
        .iter()
        .zip(prior)
        .filter(|(_, t)| **t > 0.0)
        .map(|(a, t)| a / t)
        .fold(c.min(1.0 - 1e-9), f64::min);
    let f = |w: f64| c * alpha(&recover(w)) - w;
    let mut roots = Vec::new();
    let mut prev = (0.0, f(0.0));
    if prev.1 == 0.0 {
        roots.push(0.0);
    }
    for i in 1..=GRID {
        let w = w_max * i as f64 / GRID as f64;
        let fw = f(w);
        if fw == 0.0 {
            roots.push(w);
        } else if (prev.1 > 0.0) != (fw > 0.0) && prev.1 != 0.0 {
            let (mut lo, mut hi) = (prev.0, w);
            for _ in 0..60 {
                let mid = 0.5 * (lo + hi);
                if (f(mid) > 0.0) == (prev.1 > 0.0) {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            roots.push(0.5 * (lo + hi));
        }
        prev = (w, fw);
    }
    // P with exact zeros puts the root on the boundary w_max, where f32 rounding may keep f
    // from changing sign.
    if prev.1.abs() < 1e-4 && roots.last().is_none_or(|r| (w_max - r).abs() > 1e-9) {
        roots.push(w_max);
    }
    if roots.is_empty() {
        // P' was not produced by Algorithm 1 with these parameters (rounding): the closest
        // feasible guess is the most confident one.
        roots.push(w_max);
    }
    roots.into_iter().map(recover).collect()
}

/// Trains the target and runs the attacks for every c of `config`.
///
/// Errors: [`Error::InvalidData`] when the dataset is smaller than asked, [`Error::Training`]
/// and [`Error::Defense`] from candle and the defense.
pub fn run(data: &Dataset, config: &MiaConfig) -> Result<MiaReport, Error> {
    let mut rng = Rng::new(config.seed);
    if config.members > data.train.len() || config.non_members > data.test.len() {
        return Err(Error::InvalidData {
            reason: format!(
                "{} members and {} non-members asked, the data has {} and {}",
                config.members,
                config.non_members,
                data.train.len(),
                data.test.len()
            ),
        });
    }
    let members = data
        .train
        .select(&rng.permutation(data.train.len())[..config.members])?;
    let non_members = data
        .test
        .select(&rng.permutation(data.test.len())[..config.non_members])?;

    let net = Cnn::new(config.target.clone(), &mut rng)?;
    let report = train::fit(
        &net,
        &members.pixels,
        &members.labels_u32(),
        &TrainConfig {
            epochs: config.epochs,
            batch_size: config.batch_size,
            optimizer: Optimizer::Adam { lr: config.lr },
            seed: rng.next_u64(),
            stop_below: None,
        },
    )?;
    let p_in = net.predict(&members.pixels, 256)?;
    let p_out = net.predict(&non_members.pixels, 256)?;
    let prior = members.class_prior();
    let rows = config
        .c
        .iter()
        .map(|&c| evaluate(c, &prior, (&p_in, &members), (&p_out, &non_members)))
        .collect::<Result<Vec<_>, Error>>()?;
    let entropies = |p: &[f32]| -> Vec<f64> { p.chunks(CLASSES).map(entropy).collect() };
    let (h_in, h_out) = (entropies(&p_in), entropies(&p_out));
    let saturated = h_in.iter().chain(&h_out).filter(|&&h| h == 0.0).count() as f64
        / (h_in.len() + h_out.len()).max(1) as f64;
    Ok(MiaReport {
        member_entropy: quantiles(h_in),
        non_member_entropy: quantiles(h_out),
        saturated,
        config: config.clone(),
        train_accuracy: train::accuracy(&p_in, &members.labels),
        test_accuracy: train::accuracy(&p_out, &non_members.labels),
        prior,
        rows,
        epoch_loss: report.epoch_loss,
    })
}

/// The 10th, 25th, 50th, 75th and 90th percentiles (nearest rank).
fn quantiles(mut v: Vec<f64>) -> [f64; 5] {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        v.get(((v.len().saturating_sub(1)) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    [at(0.1), at(0.25), at(0.5), at(0.75), at(0.9)]
}

/// All measurements at one c.
fn evaluate(
    c: f64,
    prior: &[f64],
    members: (&[f32], &Images),
    non_members: (&[f32], &Images),
) -> Result<MiaRow, Error> {
    let policy = NoisePolicy {
        c,
        prior: Some(prior.to_vec()),
    };
    let mut neg_entropy = Vec::new();
    let mut max_post = Vec::new();
    let mut inverted = Vec::new();
    let mut is_member = Vec::new();
    let (mut kept, mut total) = (0usize, 0usize);
    let mut hits = [0usize; 2];
    let (mut jsd, mut abs_delta) = (Vec::new(), Vec::new());
    for (set, (probs, images)) in [members, non_members].into_iter().enumerate() {
        for (p, &label) in probs.chunks(CLASSES).zip(&images.labels) {
            let q = capsule_defense::noise::noise(p, &policy)?;
            neg_entropy.push(-entropy(&q));
            max_post.push(q.iter().copied().fold(0.0f32, f32::max).into());
            inverted.push(
                -preimages(&q, c, prior)[0]
                    .iter()
                    .filter(|&&v| v > 0.0)
                    .map(|&v| -v * v.ln())
                    .sum::<f64>(),
            );
            is_member.push(set == 0);
            let label_before = capsule_defense::argmax(p);
            let label_after = capsule_defense::argmax(&q);
            kept += usize::from(label_before == label_after);
            total += 1;
            hits[set] += usize::from(label_after == Some(usize::from(label)));
            jsd.push(metrics::jsd(p, &q));
            let d = usize::from(label);
            abs_delta.push((f64::from(p[d]) - f64::from(q[d])).abs());
        }
    }
    let auc_of = |s: &[f64]| auc(s, &is_member).unwrap_or(f64::NAN);
    let auc_entropy = auc_of(&neg_entropy);
    let auc_max_posterior = auc_of(&max_post);
    let mean_jsd = metrics::mean(&jsd);
    Ok(MiaRow {
        c,
        auc_entropy,
        auc_max_posterior,
        defense_aware_entropy: defense_aware(auc_entropy),
        defense_aware_max_posterior: defense_aware(auc_max_posterior),
        auc_inverted: auc_of(&inverted),
        label_kept: kept as f64 / total.max(1) as f64,
        accuracy_members: hits[0] as f64 / members.1.len().max(1) as f64,
        accuracy_non_members: hits[1] as f64 / non_members.1.len().max(1) as f64,
        jsd: mean_jsd,
        jsd_paper: 2.0 * mean_jsd,
        mean_abs_delta: metrics::mean(&abs_delta),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preimages_contain_the_original() {
        let prior = vec![0.1; 10];
        for p in [
            vec![
                0.91f32, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01,
            ],
            vec![0.5, 0.3, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            vec![
                0.99, 0.002, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001, 0.001,
            ],
        ] {
            for c in [0.3, 0.5, 0.9] {
                let q = capsule_defense::noise::noise(
                    &p,
                    &NoisePolicy {
                        c,
                        prior: Some(prior.clone()),
                    },
                )
                .unwrap();
                let all = preimages(&q, c, &prior);
                let found = all.iter().any(|back| {
                    p.iter()
                        .zip(back)
                        .all(|(a, b)| (f64::from(*a) - b).abs() < 1e-4)
                });
                assert!(found, "{p:?} c={c}: {all:?}");
            }
        }
    }
}
