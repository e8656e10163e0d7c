//! `metrics::auc` against scikit-learn's `roc_auc_score` on the vectors in
//! `tests/vectors/auc.txt` (made by `tests/vectors/auc_vectors.py`).

use capsule_lab::metrics::auc;

#[test]
fn auc_matches_scikit_learn() {
    let text = include_str!("vectors/auc.txt");
    let mut cases = 0;
    for block in text.split("\n\n") {
        let field = |key: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
        };
        let (Some(name), Some(labels), Some(scores), Some(want)) = (
            field("name:"),
            field("labels:"),
            field("scores:"),
            field("auc:"),
        ) else {
            continue;
        };
        let labels: Vec<bool> = labels.split(' ').map(|v| v == "1").collect();
        let scores: Vec<f64> = scores.split(' ').map(|v| v.parse().unwrap()).collect();
        let want: f64 = want.parse().unwrap();
        let got = auc(&scores, &labels).unwrap();
        assert!(
            (got - want).abs() < 1e-12,
            "{name}: {got} vs scikit-learn {want}"
        );
        cases += 1;
    }
    assert_eq!(cases, 8, "every case in auc.txt was read");
}
