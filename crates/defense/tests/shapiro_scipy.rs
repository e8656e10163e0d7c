//! Shapiro–Wilk against scipy.stats.shapiro: the vectors in tests/vectors/shapiro.json,
//! written by tests/vectors/make_shapiro.py (30 samples of 3 to 5000 values).

use capsule_defense::shapiro_wilk;

#[derive(serde::Deserialize)]
struct Vectors {
    scipy: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    w: f64,
    p: f64,
    sample: Vec<f64>,
}

fn vectors() -> Vectors {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/shapiro.json");
    let text = std::fs::read_to_string(path).expect("tests/vectors/shapiro.json is committed");
    serde_json::from_str(&text).expect("shapiro.json parses")
}

#[test]
fn w_and_p_match_scipy() {
    let v = vectors();
    assert!(v.cases.len() >= 30, "scipy {}: too few cases", v.scipy);
    let mut sizes = Vec::new();
    for case in &v.cases {
        let got = shapiro_wilk(&case.sample).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert!(
            (got.w - case.w).abs() <= 1e-6,
            "{}: W {} vs scipy {}",
            case.name,
            got.w,
            case.w
        );
        let rel = (got.p_value - case.p).abs() / case.p.max(1e-300);
        assert!(
            rel <= 1e-4 || (got.p_value - case.p).abs() <= 1e-12,
            "{}: p {} vs scipy {}",
            case.name,
            got.p_value,
            case.p
        );
        sizes.push(case.sample.len());
    }
    assert_eq!(sizes.iter().min(), Some(&3));
    assert_eq!(sizes.iter().max(), Some(&5000));
}

/// How close we are, for the record: `cargo test -p capsule-defense --test shapiro_scipy -- --nocapture`.
#[test]
fn report_largest_differences() {
    let v = vectors();
    let (mut dw, mut dp) = (0.0f64, 0.0f64);
    for case in &v.cases {
        let got = shapiro_wilk(&case.sample).unwrap();
        dw = dw.max((got.w - case.w).abs());
        dp = dp.max((got.p_value - case.p).abs() / case.p.max(1e-300));
    }
    println!(
        "largest |ΔW| = {dw:e}, largest relative Δp = {dp:e} (scipy {})",
        v.scipy
    );
    assert!(dw <= 1e-6 && dp <= 1e-4);
}
