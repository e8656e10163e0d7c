//! Property tests: noising always yields a distribution, no output policy panics on any input
//! (NaN, infinities, negative values, empty vectors, absurd parameters), labels are kept where
//! the documentation says so, the policy parser never panics, and Shapiro–Wilk stays in range.

use capsule_defense::{
    NoisePolicy, OutputPolicy, Policy, Prada, PradaAction, PradaPolicy, ReverseSigmoid, apply,
    argmax, noise, output, shapiro_wilk,
};
use proptest::prelude::*;

/// Any f32, with NaN, infinities, negative values and zeros well represented.
fn any_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => 0.0f32..=1.0,
        1 => Just(0.0f32),
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => -10.0f32..10.0,
        1 => any::<f32>(),
    ]
}

fn any_vector() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(any_value(), 0..40)
}

/// A probability vector with a clear winner (top two apart by more than 1e-4).
fn clear_distribution() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(0.0f32..1.0, 2..30).prop_filter_map("clear argmax", |v| {
        let sum: f32 = v.iter().sum();
        if sum <= 0.0 {
            return None;
        }
        let p: Vec<f32> = v.iter().map(|x| x / sum).collect();
        let mut sorted = p.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        (sorted[0] - sorted[1] > 1e-4).then_some(p)
    })
}

fn is_distribution(p: &[f32]) -> bool {
    let sum: f64 = p.iter().map(|&v| f64::from(v)).sum();
    p.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)) && (sum - 1.0).abs() < 1e-5
}

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.0f64..=1.0,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => -5.0f64..5.0,
        1 => any::<f64>(),
    ]
}

/// `v` cut to 3 decimals, as a provider would write it.
fn decimal(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn any_output_policy() -> impl Strategy<Value = OutputPolicy> {
    (
        prop::option::of((any_f64(), any_f64())),
        prop::option::of(0usize..50),
        any::<bool>(),
        prop::option::of(0u32..20),
    )
        .prop_map(|(rs, top_k, label_only, round)| OutputPolicy {
            reverse_sigmoid: rs.map(|(beta, gamma)| ReverseSigmoid { beta, gamma }),
            top_k,
            label_only,
            round,
        })
}

proptest! {
    #[test]
    fn noise_is_always_a_distribution(
        p in any_vector().prop_filter("non-empty", |v| !v.is_empty()),
        c in any_f64(),
        prior_values in prop::collection::vec(any_f64(), 40),
        use_prior in any::<bool>(),
    ) {
        let prior = use_prior.then(|| prior_values[..p.len()].to_vec());
        let out = noise::noise(&p, &NoisePolicy { c, prior }).unwrap();
        prop_assert_eq!(out.len(), p.len());
        prop_assert!(is_distribution(&out), "{:?} -> {:?}", p, out);
    }

    #[test]
    fn noise_keeps_the_label_under_a_uniform_prior(p in clear_distribution(), c in 0.0f64..0.999) {
        let out = noise::noise(&p, &NoisePolicy { c, prior: None }).unwrap();
        prop_assert_eq!(argmax(&out), argmax(&p));
    }

    #[test]
    fn output_policies_never_panic(p in any_vector(), k in 0usize..60, d in any::<u32>(),
                                   beta in any_f64(), gamma in any_f64()) {
        prop_assert_eq!(output::top_k(&p, k).len(), p.len());
        prop_assert_eq!(output::label_only(&p).len(), p.len());
        prop_assert_eq!(output::round(&p, d).len(), p.len());
        let rs = output::reverse_sigmoid(&p, &ReverseSigmoid { beta, gamma });
        prop_assert_eq!(rs.len(), p.len());
        prop_assert!(rs.iter().all(|v| v.is_finite() && *v >= 0.0));
    }

    #[test]
    fn labels_are_kept_where_documented(p in clear_distribution(), k in 1usize..30, d in 0u32..6) {
        let label = argmax(&p);
        prop_assert_eq!(argmax(&output::top_k(&p, k)), label);
        prop_assert_eq!(argmax(&output::label_only(&p)), label);
        // Rounding keeps the order, so the label stays among the largest entries.
        let r = output::round(&p, d);
        let top = r.iter().copied().fold(f32::MIN, f32::max);
        prop_assert_eq!(r[label.unwrap()], top);
    }

    #[test]
    fn apply_never_panics(p in any_vector(), out in any_output_policy(),
                          c in any_f64(), with_noise in any::<bool>(),
                          prior in prop::option::of(prop::collection::vec(any_f64(), 0..40))) {
        let policy = Policy {
            noise: with_noise.then_some(NoisePolicy { c, prior }),
            output: out,
            ..Policy::default()
        };
        if let Ok(released) = apply(&policy, &p) {
            prop_assert_eq!(released.len(), p.len());
            if policy.validate().is_ok() && !p.is_empty() && !(policy.noise.is_none() && policy.output == OutputPolicy::default()) {
                prop_assert!(released.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
            }
        }
    }

    #[test]
    fn valid_policies_round_trip_through_json(
        out in any_output_policy()
            .prop_map(|mut o| {
                o.reverse_sigmoid = o.reverse_sigmoid.map(|rs| ReverseSigmoid {
                    beta: decimal(rs.beta),
                    gamma: decimal(rs.gamma),
                });
                o
            })
            .prop_filter("valid", |o| o.validate().is_ok()),
        // Decimals of a few digits, as a provider writes them (serde_json parses long ones
        // to within one unit in the last place, not exactly).
        c in (0u32..=1000).prop_map(|k| f64::from(k) / 1000.0),
    ) {
        let policy = Policy {
            noise: Some(NoisePolicy { c, prior: None }),
            output: out,
            prada: Some(PradaPolicy::new(0.93, PradaAction::Record)),
            detector: None,
        };
        let json = serde_json::to_string(&policy).unwrap();
        let back: Policy = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, policy);
    }

    #[test]
    fn the_toml_parser_never_panics(text in "\\PC{0,200}") {
        let _ = Policy::from_toml(&text);
    }

    #[test]
    fn the_toml_parser_never_panics_on_near_policies(
        key in prop::sample::select(vec!["c", "prior", "top_k", "round", "delta", "action",
                                         "max_stored", "threshold", "beta", "storage", "x"]),
        table in prop::sample::select(vec!["noise", "output", "prada", "detector",
                                           "output.reverse_sigmoid", "other"]),
        value in prop::sample::select(vec!["1", "-1", "0.5", "1e400", "nan", "inf", "\"deny\"",
                                           "[0.5, 0.5]", "[]", "true", "{}", "\"u8\"",
                                           "18446744073709551616"]),
    ) {
        let text = format!("[{table}]\n{key} = {value}\n");
        if let Ok(policy) = Policy::from_toml(&text) {
            prop_assert!(policy.validate().is_ok());
        }
    }

    #[test]
    fn shapiro_wilk_stays_in_range(sample in prop::collection::vec(-1e6f64..1e6, 3..300),
                                   scale in 1e-3f64..1e3, shift in -1e3f64..1e3) {
        match shapiro_wilk(&sample) {
            Ok(r) => {
                prop_assert!((0.0..=1.0 + 1e-12).contains(&r.w), "{:?}", r);
                prop_assert!((0.0..=1.0).contains(&r.p_value), "{:?}", r);
                let moved: Vec<f64> = sample.iter().map(|v| v * scale + shift).collect();
                let r2 = shapiro_wilk(&moved).unwrap();
                prop_assert!((r2.w - r.w).abs() < 1e-6, "{} vs {}", r.w, r2.w);
            }
            Err(e) => prop_assert_eq!(e, capsule_defense::Error::ZeroRange),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn prada_never_panics(queries in prop::collection::vec(
        (prop::collection::vec(any_value(), 1..6), 0usize..5), 1..120)) {
        let mut policy = PradaPolicy::new(0.95, PradaAction::Deny);
        policy.test_every = 1;
        policy.min_distances = 5;
        policy.min_class_distances = 1;
        policy.max_stored = 7;
        policy.max_distances = 20;
        let mut prada = Prada::new(policy.clone()).unwrap();
        for (x, class) in &queries {
            let _ = prada.observe(x, *class);
            prop_assert!(prada.state().stored() <= 7);
            prop_assert!(prada.state().distances() <= 20);
        }
        let json = serde_json::to_vec(prada.state()).unwrap();
        let restored = Prada::restore(policy, serde_json::from_slice(&json).unwrap()).unwrap();
        prop_assert_eq!(restored.state(), prada.state());
    }
}
