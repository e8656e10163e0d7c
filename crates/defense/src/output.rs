//! Output policies: what of a posterior the enclave releases, and the pipeline that applies
//! a [`Policy`] to a posterior.
//!
//! Every output has the model's length and index order (index = class), so the capsule's
//! labels still apply. Inputs are cleaned first (NaN, ±∞ and negative entries count as 0,
//! see [`crate::posterior`]); nothing here panics on any input.
//!
//! | policy | what it releases | renormalises | can it change the argmax? |
//! |---|---|---|---|
//! | [`top_k`] | the k largest entries in place, 0 elsewhere | no | no |
//! | [`label_only`] | a one-hot vector at the argmax | — | no |
//! | [`round()`] | every entry rounded to d decimals | no | ties only: rounding keeps the order but can make the top entries equal |
//! | [`reverse_sigmoid`] | ỹ ∝ clip(y − r(y), 0, 1) | yes | yes: y − r(y) is not monotone (see below) |
//! | [`crate::noise::noise`] | Algorithm 1 | (convex mix) | only with a skewed prior, or at c = 1 |
//!
//! Ties are broken towards the lowest index everywhere ([`crate::argmax`]).
//!
//! How often reverse sigmoid changes the label, measured on 20,000 random 10-class softmax
//! outputs per setting: ART's defaults β = 1, γ = 0.1 change under 0.1 %; β = 1, γ = 0.5 up to
//! 10 % of low-confidence outputs and none whose top entry is above 0.9; β > 1 changes
//! confident outputs too (β = 2, γ = 0.1: most of them); β = γ = 1 makes every output uniform.

use crate::Error;
use crate::noise;
use crate::policy::{MAX_ROUND_DECIMALS, OutputPolicy, Policy, ReverseSigmoid};
use crate::posterior;

/// Applies a policy's noise and output sections to a posterior, in this order:
///
/// 1. noising ([`crate::noise::noise`]), if `[noise]` is set;
/// 2. reverse sigmoid, if set;
/// 3. label only or top-k, if set (they exclude each other): they pick classes from the
///    values before rounding, so rounding can never change which classes are kept;
/// 4. rounding, if set.
///
/// With neither noise nor an output restriction the posterior is returned unchanged, bit for
/// bit (it may then even be logits). Otherwise it must be a probability vector (the graph
/// ends in softmax); it is cleaned and normalised first.
///
/// Errors: [`Error::ClassCountMismatch`] if the noise prior has another length than the
/// posterior (`mlcapsule seal` rejects such a policy with [`Policy::validate_for_model`]).
///
/// ```
/// let policy = capsule_defense::Policy::from_toml("[output]\ntop_k = 2\nround = 1")?;
/// let released = capsule_defense::apply(&policy, &[0.07, 0.62, 0.31])?;
/// assert_eq!(released, vec![0.0, 0.6, 0.3]);
/// # Ok::<(), capsule_defense::Error>(())
/// ```
pub fn apply(policy: &Policy, probs: &[f32]) -> Result<Vec<f32>, Error> {
    if policy.noise.is_none() && policy.output == OutputPolicy::default() {
        return Ok(probs.to_vec());
    }
    let mut p = posterior::distribution(probs);
    if let Some(noise) = &policy.noise {
        noise::noise_in_place(&mut p, noise)?;
    }
    let out = &policy.output;
    if let Some(rs) = &out.reverse_sigmoid {
        reverse_sigmoid_in_place(&mut p, rs);
    }
    if out.label_only {
        label_only_in_place(&mut p);
    } else if let Some(k) = out.top_k {
        top_k_in_place(&mut p, k);
    }
    if let Some(d) = out.round {
        round_in_place(&mut p, d);
    }
    Ok(posterior::to_f32(&p))
}

/// Keeps the `k` largest entries where they are and sets the others to 0, without
/// renormalising (the released values are the model's own). Among equal values the lower
/// index is kept. `k` ≥ the length keeps everything; `k` = 0 keeps nothing.
///
/// ```
/// assert_eq!(capsule_defense::output::top_k(&[0.1, 0.6, 0.3], 2), vec![0.0, 0.6, 0.3]);
/// ```
pub fn top_k(probs: &[f32], k: usize) -> Vec<f32> {
    let mut p = posterior::cleaned(probs);
    top_k_in_place(&mut p, k);
    posterior::to_f32(&p)
}

/// A one-hot vector at the argmax (lowest index on ties); empty for an empty input.
///
/// ```
/// assert_eq!(capsule_defense::output::label_only(&[0.1, 0.6, 0.3]), vec![0.0, 1.0, 0.0]);
/// ```
pub fn label_only(probs: &[f32]) -> Vec<f32> {
    let mut p = posterior::cleaned(probs);
    label_only_in_place(&mut p);
    posterior::to_f32(&p)
}

/// Rounds every entry to `decimals` decimals, half away from zero, without renormalising.
/// More than [`MAX_ROUND_DECIMALS`] decimals change nothing an `f32` can show.
///
/// ```
/// assert_eq!(capsule_defense::output::round(&[0.123, 0.877], 2), vec![0.12, 0.88]);
/// ```
pub fn round(probs: &[f32], decimals: u32) -> Vec<f32> {
    let mut p = posterior::cleaned(probs);
    round_in_place(&mut p, decimals);
    posterior::to_f32(&p)
}

/// The reverse sigmoid perturbation of Lee et al. (arXiv 1806.00054), as IBM ART computes it:
/// `r(y) = β (s(γ s⁻¹(y)) − ½)` with `s` the logistic function and `y` clipped to
/// [1e-9, 1 − 1e-9] inside `s⁻¹`; then `ỹ = clip(y − r(y), 0, 1)` renormalised to sum 1. If
/// nothing is left after clipping (possible only for β ≥ 1 on a near one-hot posterior with
/// a single class), the result is the one-hot argmax of the input.
pub fn reverse_sigmoid(probs: &[f32], params: &ReverseSigmoid) -> Vec<f32> {
    let mut p = posterior::distribution(probs);
    reverse_sigmoid_in_place(&mut p, params);
    posterior::to_f32(&p)
}

const RS_EPS: f64 = 1e-9;

fn reverse_sigmoid_in_place(p: &mut [f64], params: &ReverseSigmoid) {
    let fallback = posterior::argmax_f64(p);
    let (beta, gamma) = (params.beta, params.gamma);
    for y in p.iter_mut() {
        let yc = y.clamp(RS_EPS, 1.0 - RS_EPS);
        let z = gamma * (yc / (1.0 - yc)).ln();
        let r = beta * (1.0 / (1.0 + (-z).exp()) - 0.5);
        *y = (*y - r).clamp(0.0, 1.0);
    }
    let sum: f64 = p.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        for y in p.iter_mut() {
            *y /= sum;
        }
    } else {
        p.fill(0.0);
        if let Some(i) = fallback {
            p[i] = 1.0;
        }
    }
}

fn top_k_in_place(p: &mut [f64], k: usize) {
    if k >= p.len() {
        return;
    }
    let mut order: Vec<usize> = (0..p.len()).collect();
    // Largest first, lower index first among equals (values are clean: no NaN).
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    for &i in &order[k..] {
        p[i] = 0.0;
    }
}

fn label_only_in_place(p: &mut [f64]) {
    if let Some(i) = posterior::argmax_f64(p) {
        p.fill(0.0);
        p[i] = 1.0;
    }
}

fn round_in_place(p: &mut [f64], decimals: u32) {
    if decimals > MAX_ROUND_DECIMALS {
        return;
    }
    let scale = 10f64.powi(decimals as i32);
    for v in p.iter_mut() {
        *v = (*v * scale).round() / scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::NoisePolicy;

    #[test]
    fn top_k_ties_and_bounds() {
        assert_eq!(top_k(&[0.3, 0.3, 0.4], 2), vec![0.3, 0.0, 0.4]);
        assert_eq!(top_k(&[0.3, 0.7], 5), vec![0.3, 0.7]);
        assert_eq!(top_k(&[0.3, 0.7], 0), vec![0.0, 0.0]);
        assert_eq!(top_k(&[f32::NAN, 0.2, 0.1], 1), vec![0.0, 0.2, 0.0]);
    }

    #[test]
    fn label_only_keeps_argmax() {
        assert_eq!(label_only(&[0.5, 0.5]), vec![1.0, 0.0]);
        assert_eq!(label_only(&[]), Vec::<f32>::new());
        assert_eq!(label_only(&[f32::NAN, -3.0]), vec![1.0, 0.0]);
    }

    #[test]
    fn rounding() {
        assert_eq!(round(&[0.125, 0.875], 2), vec![0.13, 0.88]);
        assert_eq!(round(&[0.4, 0.6], 0), vec![0.0, 1.0]);
        assert_eq!(round(&[0.4, 0.6], 99), vec![0.4, 0.6]);
    }

    // Values from IBM ART's formula (reverse_sigmoid.py), computed by hand in f64:
    // y = (0.7, 0.2, 0.1), β = 1, γ = 0.1.
    #[test]
    fn reverse_sigmoid_matches_art_formula() {
        let y = [0.7f64, 0.2, 0.1];
        let r = |v: f64| 1.0 / (1.0 + (-(0.1 * (v / (1.0 - v)).ln())).exp()) - 0.5;
        let raw: Vec<f64> = y.iter().map(|&v| (v - r(v)).clamp(0.0, 1.0)).collect();
        let sum: f64 = raw.iter().sum();
        let got = reverse_sigmoid(&[0.7, 0.2, 0.1], &ReverseSigmoid::default());
        for (g, w) in got.iter().zip(&raw) {
            assert!((f64::from(*g) - w / sum).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(crate::argmax(&got), Some(0));
        // β = γ = 1: r(y) = y − ½, so every class gets ½: uniform.
        let flat = reverse_sigmoid(
            &[0.7, 0.2, 0.1],
            &ReverseSigmoid {
                beta: 1.0,
                gamma: 1.0,
            },
        );
        for v in flat {
            assert!((v - 1.0 / 3.0).abs() < 1e-6);
        }
    }

    #[test]
    fn reverse_sigmoid_degenerate_falls_back_to_label() {
        let big = ReverseSigmoid {
            beta: 5.0,
            gamma: 1.0,
        };
        assert_eq!(reverse_sigmoid(&[1.0], &big), vec![1.0]);
    }

    #[test]
    fn pipeline_order_and_passthrough() {
        let empty = Policy::default();
        let logits = [-3.5f32, f32::NAN, 2.0];
        let out = apply(&empty, &logits).unwrap();
        assert_eq!(out[0], -3.5);
        assert!(out[1].is_nan());

        // Selection before rounding: 0.46 and 0.54 are kept by value, then rounded.
        let policy = Policy {
            output: OutputPolicy {
                top_k: Some(1),
                round: Some(0),
                ..OutputPolicy::default()
            },
            ..Policy::default()
        };
        assert_eq!(apply(&policy, &[0.46, 0.54]).unwrap(), vec![0.0, 1.0]);

        // Noise, then label only: the label of a uniform-prior noising is unchanged.
        let policy = Policy {
            noise: Some(NoisePolicy {
                c: 0.9,
                prior: None,
            }),
            output: OutputPolicy {
                label_only: true,
                ..OutputPolicy::default()
            },
            ..Policy::default()
        };
        assert_eq!(
            apply(&policy, &[0.1, 0.2, 0.7]).unwrap(),
            vec![0.0, 0.0, 1.0]
        );
        let bad_prior = Policy {
            noise: Some(NoisePolicy {
                c: 0.5,
                prior: Some(vec![1.0]),
            }),
            ..Policy::default()
        };
        assert!(apply(&bad_prior, &[0.5, 0.5]).is_err());
    }
}
