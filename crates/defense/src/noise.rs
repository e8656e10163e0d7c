//! Membership-inference noising: MLCapsule's Algorithm 1 (paper §7.3).
//!
//! ```text
//! α  = 1 − H(P) / log |P|          H(P) = −Σ P_k log P_k, natural log, 0 log 0 = 0
//! P' = (1 − cα) P + cα T           T: the training class prior (uniform if not given)
//! ```
//!
//! A confident posterior (low entropy, as members of the training set tend to get) is pushed
//! hardest towards the prior, which flattens the gap a membership-inference attack exploits.
//! P' is a convex combination of two distributions, so it is a distribution. The map is
//! deterministic.
//!
//! Labels: with a uniform prior and c < 1 the argmax never changes (P'_k − P'_j =
//! (1 − cα)(P_k − P_j)). With a skewed prior it can flip near ties, and at c = 1 a one-hot
//! posterior becomes the prior itself.

use crate::Error;
use crate::policy::NoisePolicy;
use crate::posterior;

/// Shannon entropy (natural log) of a distribution, with 0 log 0 = 0.
pub fn entropy(p: &[f64]) -> f64 {
    -p.iter()
        .filter(|&&v| v > 0.0)
        .map(|&v| v * v.ln())
        .sum::<f64>()
}

/// The noise magnitude α = 1 − H(P) / log |P| in [0, 1] of a posterior (cleaned and
/// normalised as [`crate::posterior`] says). 1 for a one-hot P, 0 for a uniform P, and
/// 0 when |P| ≤ 1: a single class has nothing to hide.
pub fn noise_magnitude(probs: &[f32]) -> f64 {
    magnitude(&posterior::distribution(probs))
}

pub(crate) fn magnitude(p: &[f64]) -> f64 {
    if p.len() <= 1 {
        return 0.0;
    }
    (1.0 - entropy(p) / (p.len() as f64).ln()).clamp(0.0, 1.0)
}

/// Applies Algorithm 1 to a posterior.
///
/// The posterior is first cleaned and normalised (NaN, infinities and negative entries count
/// as 0; nothing left means uniform). `c` is clamped to [0, 1] (NaN counts as 0) and the prior
/// is renormalised, so an unvalidated policy cannot make the output leave the simplex; call
/// [`NoisePolicy::validate`] to reject such a policy instead.
///
/// Errors: [`Error::ClassCountMismatch`] when the prior has another length than the posterior.
///
/// ```
/// use capsule_defense::{NoisePolicy, noise::noise};
/// let policy = NoisePolicy { c: 0.5, prior: None };
/// let mut one_hot = vec![0.0f32; 10];
/// one_hot[0] = 1.0;
/// let noised = noise(&one_hot, &policy)?;
/// assert!((noised[0] - 0.55).abs() < 1e-6 && (noised[1] - 0.05).abs() < 1e-6);
/// # Ok::<(), capsule_defense::Error>(())
/// ```
pub fn noise(probs: &[f32], policy: &NoisePolicy) -> Result<Vec<f32>, Error> {
    let mut p = posterior::distribution(probs);
    noise_in_place(&mut p, policy)?;
    Ok(posterior::to_f32(&p))
}

/// Algorithm 1 on a distribution in `f64`, in place.
pub(crate) fn noise_in_place(p: &mut [f64], policy: &NoisePolicy) -> Result<(), Error> {
    let k = p.len();
    let prior = match &policy.prior {
        Some(t) if t.len() != k => {
            return Err(Error::ClassCountMismatch {
                what: "the noise prior",
                expected: k,
                found: t.len(),
            });
        }
        Some(t) => {
            let mut t = t.clone();
            posterior::normalise(&mut t);
            t
        }
        None => vec![1.0 / k.max(1) as f64; k],
    };
    let c = if policy.c.is_nan() {
        0.0
    } else {
        policy.c.clamp(0.0, 1.0)
    };
    let weight = c * magnitude(p);
    for (v, t) in p.iter_mut().zip(&prior) {
        *v = (1.0 - weight) * *v + weight * t;
    }
    Ok(())
}

/// Jensen–Shannon divergence between two posteriors in the standard convention
/// ½ KL(P‖M) + ½ KL(Q‖M), M = (P + Q)/2, natural log, in [0, ln 2]. The MLCapsule paper
/// (Figure 4) omits the ½, so its values are twice these. Vectors of different lengths are
/// compared over the shorter one; both are cleaned and normalised first.
pub fn jensen_shannon(p: &[f32], q: &[f32]) -> f64 {
    let (p, q) = (posterior::distribution(p), posterior::distribution(q));
    let kl_to_mid = |a: f64, b: f64| {
        let m = 0.5 * (a + b);
        if a > 0.0 { a * (a / m).ln() } else { 0.0 }
    };
    0.5 * p
        .iter()
        .zip(&q)
        .map(|(&a, &b)| kl_to_mid(a, b) + kl_to_mid(b, a))
        .sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(c: f64) -> NoisePolicy {
        NoisePolicy { c, prior: None }
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    // algorithms.md §3.3, K = 10, uniform prior.
    #[test]
    fn unit_vectors() {
        let mut e1 = vec![0.0f32; 10];
        e1[0] = 1.0;
        assert!((noise_magnitude(&e1) - 1.0).abs() < 1e-12);
        assert_close(
            &noise(&e1, &policy(0.5)).unwrap(),
            &[0.55, 0.05, 0.05, 0.05],
        );
        assert_close(&noise(&e1, &policy(1.0)).unwrap(), &[0.1; 10]);

        let mut half = vec![0.0f32; 10];
        half[0] = 0.5;
        half[1] = 0.5;
        assert!((noise_magnitude(&half) - 0.69897).abs() < 1e-5);
        assert_close(
            &noise(&half, &policy(0.5)).unwrap(),
            &[0.360206, 0.360206, 0.034949, 0.034949],
        );

        let mut skew = vec![0.01f32; 10];
        skew[0] = 0.91;
        assert!((noise_magnitude(&skew) - 0.782728).abs() < 1e-5);
        assert_close(&noise(&skew, &policy(0.5)).unwrap(), &[0.592995, 0.045223]);

        let uniform = vec![0.1f32; 10];
        assert!(noise_magnitude(&uniform).abs() < 1e-6);
        for c in [0.0, 0.3, 1.0] {
            assert_close(&noise(&uniform, &policy(c)).unwrap(), &[0.1; 10]);
        }
    }

    #[test]
    fn single_class_and_empty() {
        assert_eq!(noise_magnitude(&[1.0]), 0.0);
        assert_eq!(noise(&[1.0], &policy(1.0)).unwrap(), vec![1.0]);
        assert_eq!(noise(&[], &policy(1.0)).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn skewed_prior_and_mismatch() {
        let p = NoisePolicy {
            c: 1.0,
            prior: Some(vec![0.2, 0.8]),
        };
        // One-hot at c = 1: the prior itself, so the label flips.
        assert_close(&noise(&[1.0, 0.0], &p).unwrap(), &[0.2, 0.8]);
        assert!(matches!(
            noise(&[0.3, 0.3, 0.4], &p),
            Err(Error::ClassCountMismatch {
                expected: 3,
                found: 2,
                ..
            })
        ));
    }

    #[test]
    fn jsd_conventions() {
        let ln2 = std::f64::consts::LN_2;
        assert!((jensen_shannon(&[1.0, 0.0], &[0.0, 1.0]) - ln2).abs() < 1e-12);
        assert!(jensen_shannon(&[0.3, 0.7], &[0.3, 0.7]).abs() < 1e-12);
    }
}
