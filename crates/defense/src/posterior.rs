//! A model's posterior (its output probability vector) as the output policies see it.
//!
//! Every function of this crate that reads a posterior first maps NaN, ±∞ and negative
//! entries to 0: a value that is not a probability says nothing about its class. Functions
//! that need a distribution (noising, reverse sigmoid) then divide by the sum; a vector with
//! nothing left (all zero) becomes the uniform distribution, which releases nothing about the
//! model. The others (top-k, label only, rounding) do not renormalise.

/// The index of the largest entry; the lowest index wins a tie. NaN counts as 0, like
/// everywhere in this crate. `None` for an empty vector.
///
/// ```
/// assert_eq!(capsule_defense::argmax(&[0.2, 0.5, 0.5]), Some(1));
/// assert_eq!(capsule_defense::argmax(&[f32::NAN, 0.1]), Some(1));
/// ```
pub fn argmax(probs: &[f32]) -> Option<usize> {
    argmax_f64(
        &probs
            .iter()
            .map(|&v| clean(f64::from(v)))
            .collect::<Vec<_>>(),
    )
}

/// [`argmax`] on already clean `f64` values.
pub(crate) fn argmax_f64(p: &[f64]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, &v) in p.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

/// One entry made a probability: NaN, ±∞ and negative values become 0.
pub(crate) fn clean(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

/// The entries cleaned, in `f64`, not renormalised.
pub(crate) fn cleaned(probs: &[f32]) -> Vec<f64> {
    probs.iter().map(|&v| clean(f64::from(v))).collect()
}

/// Makes `p` a distribution in place: clean every entry, divide by the sum, or make it uniform
/// when nothing is left.
pub(crate) fn normalise(p: &mut [f64]) {
    for v in p.iter_mut() {
        *v = clean(*v);
    }
    let sum: f64 = p.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        for v in p.iter_mut() {
            *v /= sum;
        }
    } else if !p.is_empty() {
        let u = 1.0 / p.len() as f64;
        p.fill(u);
    }
}

/// The entries as a distribution in `f64` ([`normalise`]).
pub(crate) fn distribution(probs: &[f32]) -> Vec<f64> {
    let mut p = cleaned(probs);
    normalise(&mut p);
    p
}

/// Back to the `f32` the engine and the protocol use.
pub(crate) fn to_f32(p: &[f64]) -> Vec<f32> {
    p.iter().map(|&v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_negative_and_infinite_count_as_zero() {
        assert_eq!(
            distribution(&[f32::NAN, -1.0, f32::INFINITY, 3.0, 1.0]),
            vec![0.0, 0.0, 0.0, 0.75, 0.25]
        );
        assert_eq!(distribution(&[f32::NAN, 0.0]), vec![0.5, 0.5]);
        assert!(distribution(&[]).is_empty());
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), Some(0));
    }
}
