//! The provider's defenses in the enclave process (spec/policy.md §4,
//! spec/enclave-protocol.md §5.6 and §7.4): the input detector refuses before the model
//! is touched, output policies shape what leaves, PRADA stops an extraction stream, and
//! its state survives restarts but no rollback.

mod common;

use capsule_enclave::{EnclaveProcess, Error, SealedModel, Status};
use capsule_engine::Tensor;
use capsule_format::Capsule;
use common::{
    SealedCapsule, Terms, defended_capsule, enclave_bin, input, mean_detector, ready_enclave,
    sample_digits, server_key, topup_token,
};
use serde_json::json;

fn platform_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let platform = dir.path().join("platform");
    (dir, platform)
}

/// A PRADA policy in its JSON form, every default written out.
fn prada(delta: f64, action: &str) -> serde_json::Value {
    json!({
        "delta": delta, "action": action, "min_distances": 100, "min_class_distances": 10,
        "test_every": 10, "trim_sigmas": 3.0, "max_stored": 3000, "max_distances": 5000,
        "dg_initial_zero": false, "storage": "u8"
    })
}

fn policy(
    prada: Option<serde_json::Value>,
    detector: bool,
    output: serde_json::Value,
) -> serde_json::Value {
    json!({
        "noise": null,
        "output": output,
        "prada": prada,
        "detector": detector.then(|| json!({
            "enabled": true, "threshold": 0.5, "crafted_class": 1, "scores": "logits"
        })),
    })
}

fn no_output_policy() -> serde_json::Value {
    json!({"reverse_sigmoid": null, "top_k": null, "label_only": false, "round": null})
}

/// The bytes of one value: the MNIST input range after normalisation, for clipping.
const LOW: f32 = (0.0 - 0.1307) / 0.3081;
const HIGH: f32 = (1.0 - 0.1307) / 0.3081;

/// A Jacobian-augmentation-like extraction stream (Papernot et al.): start from real seed
/// digits, and each round add to every point so far a step of 0.1 (in pixel units) along a
/// sign vector, as the attack does with the sign of its substitute's gradient.
fn jacobian_like(seeds: &[Tensor], count: usize) -> Vec<Tensor> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut sign = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if state & 1 == 0 { 1.0 } else { -1.0 }
    };
    let step = 0.1 / 0.3081;
    let mut set: Vec<Tensor> = seeds.to_vec();
    let mut stream = set.clone();
    while stream.len() < count {
        let next: Vec<Tensor> = set
            .iter()
            .map(|x| {
                let data = x
                    .data()
                    .iter()
                    .map(|v| (v + step * sign()).clamp(LOW, HIGH))
                    .collect();
                Tensor::new(x.shape().to_vec(), data).unwrap()
            })
            .collect();
        stream.extend(next.iter().cloned());
        set.extend(next);
    }
    stream.truncate(count);
    stream
}

/// The rows as one batch.
fn batch(rows: &[Tensor]) -> Tensor {
    let data = rows.iter().flat_map(|t| t.data().iter().copied()).collect();
    Tensor::new(vec![rows.len(), 1, 28, 28], data).unwrap()
}

/// Runs one batch and takes the defense state that came with it, as a host must.
fn query(
    enclave: &mut EnclaveProcess,
    capsule: &Capsule<'_>,
    x: &Tensor,
    state: &mut Option<Vec<u8>>,
) -> Result<(Tensor, Status), Error> {
    let result = enclave.query(capsule, x);
    if let Some(new) = enclave.take_defense_state() {
        *state = Some(new);
    }
    result
}

fn restart(
    platform: &std::path::Path,
    id: [u8; 16],
    ledger: &[u8],
    capsule: &Capsule<'_>,
    defense: Option<&[u8]>,
) -> (EnclaveProcess, Status) {
    let mut enclave = EnclaveProcess::spawn(&enclave_bin(), platform, Some(id)).unwrap();
    let status = enclave.load_with_defense(ledger, capsule, defense).unwrap();
    (enclave, status)
}

#[test]
fn a_flagged_query_is_refused_and_counted_without_touching_the_model() {
    let (_dir, platform) = platform_dir();
    let detector = mean_detector(1.0);
    let sealed = defended_capsule(policy(None, true, no_output_policy()), Some(&detector));
    // Break the model's last layer: any query that opens it fails authentication.
    let mut broken = sealed.bytes.clone();
    let last = broken.len() - 5;
    broken[last] ^= 1;
    let broken = SealedCapsule {
        bytes: broken,
        key: sealed.key.clone(),
    };
    let capsule = Capsule::parse(&broken.bytes).unwrap();
    let (mut enclave, _, status) =
        ready_enclave(&platform, &broken, &server_key(), Terms::default());
    assert_eq!(status.defense.as_ref().unwrap().detector_refusals, Some(0));

    let mut state = None;
    let crafted = Tensor::new(vec![2, 1, 28, 28], vec![2.0; 2 * 784]).unwrap();
    let refused = query(&mut enclave, &capsule, &crafted, &mut state).unwrap_err();
    assert!(
        matches!(&refused, Error::QueryRefusedDetector { .. }),
        "{refused:?}"
    );
    assert_eq!(refused.code(), "query_refused_detector");
    assert!(
        refused
            .to_string()
            .starts_with("the provider's policy refused this query"),
        "{refused}"
    );
    assert!(
        state.is_some(),
        "a counted refusal brings its defense state"
    );
    let status = enclave.status().unwrap();
    assert_eq!(status.used, 2, "a refused batch is counted");
    let defense = status.defense.unwrap();
    assert_eq!((defense.detector_refusals, defense.stamp), (Some(1), 2));

    // The refusal never opened the broken layer; a query the detector passes does.
    let passed = query(&mut enclave, &capsule, &input(1, 3), &mut state).unwrap_err();
    assert_eq!(passed.code(), "capsule_rejected", "{passed}");
    assert_eq!(enclave.status().unwrap().used, 2, "a failed query is not");
}

#[test]
fn output_policies_shape_what_leaves_the_enclave() {
    let (_dir, platform) = platform_dir();
    let label_only =
        json!({"reverse_sigmoid": null, "top_k": null, "label_only": true, "round": null});
    let sealed = defended_capsule(policy(None, false, label_only), None);
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let plain = SealedModel::open(&capsule, &sealed.key).unwrap();
    let (mut enclave, _, status) =
        ready_enclave(&platform, &sealed, &server_key(), Terms::default());
    assert!(status.defense.is_none(), "output policies keep no state");
    let digits = batch(&sample_digits());
    let (released, _) = enclave.query(&capsule, &digits).unwrap();
    assert!(enclave.take_defense_state().is_none());
    let raw = plain.run(std::slice::from_ref(&digits)).unwrap().remove(0);
    for (out, model) in released.data().chunks(10).zip(raw.data().chunks(10)) {
        let label = capsule_defense::argmax(model).unwrap();
        let mut one_hot = [0.0f32; 10];
        one_hot[label] = 1.0;
        assert_eq!(out, one_hot);
    }
}

#[test]
fn prada_stops_an_extraction_stream_and_no_rollback_lifts_the_alarm() {
    let (_dir, platform) = platform_dir();
    let sealed = defended_capsule(
        policy(Some(prada(0.9, "deny")), false, no_output_policy()),
        None,
    );
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let server = server_key();
    let (mut enclave, ledger, _) = ready_enclave(&platform, &sealed, &server, Terms::default());
    let id = enclave.info().instance_id;

    // Benign: the ten real digits pass.
    let mut state = None;
    query(&mut enclave, &capsule, &batch(&sample_digits()), &mut state).unwrap();
    // The attack, ten queries a batch, until refused.
    let attack = jacobian_like(&sample_digits(), 400);
    let mut before_alarm = state.clone();
    let mut refused = None;
    for rows in attack.chunks(10) {
        before_alarm = state.clone();
        match query(&mut enclave, &capsule, &batch(rows), &mut state) {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("PRADA flags the extraction stream");
    assert!(
        matches!(&refused, Error::QueryRefusedPrada { .. }),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains("model-extraction attack"),
        "{refused}"
    );
    let status = enclave.status().unwrap();
    let used = status.used;
    let prada = status.defense.unwrap().prada.unwrap();
    assert!(prada.denying && prada.alarms == 1, "{prada:?}");
    let alarm = prada.first_alarm.unwrap();
    assert!(alarm.query <= 300 && alarm.w < 0.9, "{alarm:?}");

    // Latched: refused again, not counted.
    let again = query(&mut enclave, &capsule, &input(1, 1), &mut state).unwrap_err();
    assert!(
        matches!(again, Error::QueryRefusedPrada { .. }),
        "{again:?}"
    );
    assert_eq!(enclave.status().unwrap().used, used);
    drop(enclave);

    // A restart with the latest state: still refused.
    let (mut enclave, status) = restart(&platform, id, &ledger, &capsule, state.as_deref());
    assert_eq!(status.defense.as_ref().unwrap().behind, 0);
    let e = query(&mut enclave, &capsule, &input(1, 2), &mut state).unwrap_err();
    assert!(matches!(e, Error::QueryRefusedPrada { .. }), "{e:?}");
    drop(enclave);

    // The state from before the alarm is behind the counter: refused until a top-up
    // resynchronises it, and even then the alarm counter keeps the alarm.
    let (mut enclave, status) = restart(&platform, id, &ledger, &capsule, before_alarm.as_deref());
    let behind = status.defense.as_ref().unwrap().behind;
    assert!(behind >= 1, "{status:?}");
    assert!(
        status
            .defense
            .as_ref()
            .unwrap()
            .prada
            .as_ref()
            .unwrap()
            .denying,
        "the alarm counter remembers"
    );
    let stale = query(&mut enclave, &capsule, &input(1, 2), &mut state).unwrap_err();
    assert!(
        matches!(stale, Error::DefenseStateStale { behind: b } if b == behind),
        "{stale:?}"
    );
    assert!(stale.to_string().contains("mlcapsule topup"), "{stale}");
    let (_, topped) = enclave.topup(&topup_token(&server, id, 1, 2000)).unwrap();
    let resynced = enclave
        .take_defense_state()
        .expect("a resync brings the state");
    let defense = topped.defense.unwrap();
    assert_eq!(
        (defense.behind, defense.unobserved, defense.resyncs),
        (0, behind, 1)
    );
    let e = query(&mut enclave, &capsule, &input(1, 2), &mut state).unwrap_err();
    assert!(matches!(e, Error::QueryRefusedPrada { .. }), "{e:?}");
    drop(enclave);
    let (_, status) = restart(&platform, id, &ledger, &capsule, Some(&resynced));
    assert_eq!(status.defense.unwrap().behind, 0);
}

#[test]
fn a_stale_or_missing_state_is_refused_until_a_topup_resynchronises_it() {
    let (_dir, platform) = platform_dir();
    let sealed = defended_capsule(
        policy(Some(prada(0.9, "record")), false, no_output_policy()),
        None,
    );
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let server = server_key();
    let (mut enclave, ledger, status) =
        ready_enclave(&platform, &sealed, &server, Terms::default());
    let id = enclave.info().instance_id;
    assert_eq!(
        status.defense.as_ref().unwrap().behind,
        0,
        "a first run starts fresh"
    );

    let mut state = None;
    query(&mut enclave, &capsule, &input(1, 1), &mut state).unwrap();
    let first = state.clone().unwrap();
    query(&mut enclave, &capsule, &input(2, 2), &mut state).unwrap();
    let latest = state.clone().unwrap();
    drop(enclave);

    // The current state carries PRADA's memory across restarts.
    let (mut enclave, status) = restart(&platform, id, &ledger, &capsule, Some(&latest));
    let defense = status.defense.unwrap();
    assert_eq!((defense.stamp, defense.behind), (3, 0));
    assert_eq!(defense.prada.unwrap().observed, 3);
    query(&mut enclave, &capsule, &input(1, 3), &mut state).unwrap();
    drop(enclave);

    // An older copy, a missing one and a tampered one are all behind.
    let mut tampered = latest.clone();
    tampered[10] ^= 1;
    for (old, behind) in [(Some(&first[..]), 3), (None, 4), (Some(&tampered[..]), 4)] {
        let (mut enclave, status) = restart(&platform, id, &ledger, &capsule, old);
        assert_eq!(status.defense.unwrap().behind, behind);
        let e = query(&mut enclave, &capsule, &input(1, 4), &mut state).unwrap_err();
        assert!(
            matches!(e, Error::DefenseStateStale { behind: b } if b == behind),
            "{e:?}"
        );
        assert_eq!(enclave.status().unwrap().used, 4, "nothing was counted");
    }

    // A top-up resynchronises: the gap is recorded, and queries run again.
    let (mut enclave, _) = restart(&platform, id, &ledger, &capsule, Some(&first));
    let (_, status) = enclave.topup(&topup_token(&server, id, 1, 2000)).unwrap();
    let defense = status.defense.unwrap();
    assert_eq!(
        (defense.unobserved, defense.resyncs, defense.stamp),
        (3, 1, 4)
    );
    assert!(enclave.take_defense_state().is_some());
    let (_, status) = query(&mut enclave, &capsule, &input(1, 5), &mut state).unwrap();
    assert_eq!(status.defense.unwrap().prada.unwrap().observed, 2);
}

#[test]
fn policies_the_enclave_cannot_enforce_are_refused_at_load() {
    let (_dir, platform) = platform_dir();
    let server = server_key();
    let unknown = json!({"noise": null, "output": no_output_policy(), "prada": null,
                         "detector": null, "watermark": {"strength": 1}});
    let no_network = policy(None, true, no_output_policy());
    let out_of_range = json!({"noise": {"c": 2.0, "prior": null}, "output": no_output_policy(),
                              "prada": null, "detector": null});
    for (defense, needle) in [
        (unknown, "not one this enclave can enforce"),
        (no_network, "holds none"),
        (out_of_range, "invalid"),
    ] {
        let sealed = defended_capsule(defense, None);
        let capsule = Capsule::parse(&sealed.bytes).unwrap();
        let mut enclave = EnclaveProcess::spawn(&enclave_bin(), &platform, None).unwrap();
        let state = common::provision(&mut enclave, &sealed, &server, Terms::default()).unwrap();
        let refused = enclave.load(&state, &capsule).unwrap_err();
        assert_eq!(refused.code(), "capsule_rejected", "{refused}");
        assert!(refused.to_string().contains(needle), "{refused}");
    }
}
