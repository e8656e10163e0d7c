//! Scores and distances the evaluations report: ROC AUC, posterior entropy and
//! Jensen–Shannon divergence in both conventions.

/// Area under the ROC curve of `scores` for telling positives (`true`) from negatives, higher
/// score meaning "positive"; ties count one half, as scikit-learn's `roc_auc_score` does (the
/// Mann–Whitney U statistic with mid-ranks). `None` when either class is empty or a score is
/// NaN.
///
/// ```
/// use capsule_lab::metrics::auc;
/// assert_eq!(auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]), Some(0.75));
/// ```
#[must_use]
pub fn auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    if scores.len() != positive.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, mid-ranked) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mid * order[i..=j].iter().filter(|&&k| positive[k]).count() as f64;
        i = j + 1;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos as f64 * n_neg as f64))
}

/// max(AUC, 1 − AUC): the score of an attacker who knows which way the defense bends the
/// statistic and flips it when that helps (algorithms.md §3.3).
#[must_use]
pub fn defense_aware(auc: f64) -> f64 {
    auc.max(1.0 - auc)
}

/// Shannon entropy (natural log) of a posterior, 0 log 0 = 0.
#[must_use]
pub fn entropy(p: &[f32]) -> f64 {
    -p.iter()
        .map(|&v| f64::from(v))
        .filter(|&v| v > 0.0)
        .map(|v| v * v.ln())
        .sum::<f64>()
}

/// Jensen–Shannon divergence, standard convention ½KL(P‖M) + ½KL(Q‖M), in [0, ln 2].
#[must_use]
pub fn jsd(p: &[f32], q: &[f32]) -> f64 {
    capsule_defense::noise::jensen_shannon(p, q)
}

/// Jensen–Shannon divergence as the MLCapsule paper writes it (§7.3, without the ½):
/// twice [`jsd`], in [0, 2 ln 2].
#[must_use]
pub fn jsd_paper(p: &[f32], q: &[f32]) -> f64 {
    2.0 * jsd(p, q)
}

/// Arithmetic mean, 0 for an empty slice.
#[must_use]
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_edges() {
        assert_eq!(auc(&[1.0, 2.0], &[true, true]), None);
        assert_eq!(auc(&[f64::NAN, 2.0], &[true, false]), None);
        assert_eq!(auc(&[0.5; 4], &[true, false, true, false]), Some(0.5));
        assert_eq!(auc(&[0.0, 1.0], &[false, true]), Some(1.0));
        assert_eq!(auc(&[0.0, 1.0], &[true, false]), Some(0.0));
        assert_eq!(defense_aware(0.2), 0.8);
    }

    #[test]
    fn jsd_conventions() {
        let (a, b) = ([1.0f32, 0.0], [0.0f32, 1.0]);
        assert!((jsd(&a, &b) - std::f64::consts::LN_2).abs() < 1e-12);
        assert!((jsd_paper(&a, &b) - 2.0 * std::f64::consts::LN_2).abs() < 1e-12);
        assert!((entropy(&[0.5, 0.5, 0.0]) - std::f64::consts::LN_2).abs() < 1e-12);
    }
}
