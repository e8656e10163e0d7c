//! The input detector's decision rule (MLCapsule §7.1, against kennen-io).
//!
//! The detector is a small network sealed in the capsule beside the model; the enclave runs
//! it on every input before the model and refuses the query, without running the model, when
//! the detector says "crafted". This module holds only that decision: the network, its
//! training and running it belong to others.

use crate::Error;
use crate::policy::{DetectorPolicy, DetectorScores};

/// The detector's decision on one input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorDecision {
    /// The detector's probability that the input was crafted, in [0, 1] (NaN stays NaN).
    pub score: f64,
    /// True when the query must be refused: the detector is enabled and the score is at least
    /// the threshold, or is NaN (a detector that says nothing usable fails closed).
    pub refuse: bool,
}

/// Decides on one input from the detector network's `output`.
///
/// The score is `output[crafted_class]` for a vector of two or more values, `output[0]` for a
/// single value; with `scores = "logits"` it is first passed through softmax (sigmoid for a
/// single value). A disabled detector never refuses.
///
/// Errors: [`Error::DetectorOutput`] when the output is empty or has no `crafted_class`.
///
/// ```
/// use capsule_defense::{DetectorPolicy, DetectorScores, detector::decide};
/// let policy = DetectorPolicy {
///     enabled: true,
///     threshold: 0.5,
///     crafted_class: 1,
///     scores: DetectorScores::Probabilities,
/// };
/// assert!(decide(&policy, &[0.1, 0.9])?.refuse);
/// assert!(!decide(&policy, &[0.8, 0.2])?.refuse);
/// # Ok::<(), capsule_defense::Error>(())
/// ```
pub fn decide(policy: &DetectorPolicy, output: &[f32]) -> Result<DetectorDecision, Error> {
    let index = match output.len() {
        0 => {
            return Err(Error::DetectorOutput {
                len: 0,
                crafted_class: policy.crafted_class,
            });
        }
        1 => 0,
        n if policy.crafted_class < n => policy.crafted_class,
        n => {
            return Err(Error::DetectorOutput {
                len: n,
                crafted_class: policy.crafted_class,
            });
        }
    };
    let score = match policy.scores {
        DetectorScores::Probabilities => f64::from(output[index]),
        DetectorScores::Logits if output.len() == 1 => 1.0 / (1.0 + (-f64::from(output[0])).exp()),
        DetectorScores::Logits => softmax_at(output, index),
    };
    let refuse = policy.enabled && (score.is_nan() || score >= policy.threshold);
    Ok(DetectorDecision { score, refuse })
}

/// softmax(logits)[index], stable for large logits; NaN if any logit is NaN.
fn softmax_at(logits: &[f32], index: usize) -> f64 {
    let max = logits
        .iter()
        .map(|&v| f64::from(v))
        .fold(f64::NEG_INFINITY, f64::max);
    if logits.iter().any(|v| v.is_nan()) || !max.is_finite() {
        return f64::NAN;
    }
    let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    (f64::from(logits[index]) - max).exp() / sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(scores: DetectorScores) -> DetectorPolicy {
        DetectorPolicy {
            enabled: true,
            threshold: 0.5,
            crafted_class: 1,
            scores,
        }
    }

    #[test]
    fn probabilities_and_logits() {
        let p = policy(DetectorScores::Probabilities);
        assert!(decide(&p, &[0.5, 0.5]).unwrap().refuse);
        assert!(!decide(&p, &[0.51, 0.49]).unwrap().refuse);
        assert!(decide(&p, &[0.7]).unwrap().refuse);
        let l = policy(DetectorScores::Logits);
        assert!(decide(&l, &[0.0, 3.0]).unwrap().refuse);
        assert!(!decide(&l, &[1000.0, 3.0]).unwrap().refuse);
        assert!(!decide(&l, &[-2.0]).unwrap().refuse);
    }

    #[test]
    fn nan_fails_closed_and_disabled_never_refuses() {
        let mut p = policy(DetectorScores::Probabilities);
        assert!(decide(&p, &[0.2, f32::NAN]).unwrap().refuse);
        assert!(
            decide(&policy(DetectorScores::Logits), &[f32::NAN, 0.0])
                .unwrap()
                .refuse
        );
        p.enabled = false;
        assert!(!decide(&p, &[0.0, 1.0]).unwrap().refuse);
    }

    #[test]
    fn missing_class_is_an_error() {
        let mut p = policy(DetectorScores::Probabilities);
        p.crafted_class = 2;
        assert!(matches!(
            decide(&p, &[0.1, 0.9]),
            Err(Error::DetectorOutput { len: 2, .. })
        ));
        assert!(decide(&p, &[]).is_err());
    }
}
