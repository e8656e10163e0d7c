//! Property test: no mutation of a capsule is accepted, and none panics.

use capsule_format::{
    Capsule, Detector, DetectorInput, LayerPlaintext, ModelKey, Policy, SealRequest, seal,
};
use proptest::prelude::*;

fn capsule(key: &ModelKey) -> Vec<u8> {
    let w: Vec<f32> = (0..100).map(|i| i as f32 * 0.25).collect();
    let request = SealRequest {
        architecture: serde_json::json!({"nodes": ["a", "b"]}),
        preprocessing: None,
        labels: Some(vec!["cat".into(), "dog".into()]),
        detector: Some(Detector {
            architecture: serde_json::json!({"nodes": ["d"]}),
            input: DetectorInput::IDENTITY,
        }),
        policy: Policy {
            max_queries: Some(3),
            expires: None,
            defense: Some(serde_json::json!({"output": {"label_only": true}})),
        },
        chunk_size: 64,
        aead: capsule_format::Aead::SEAL_DEFAULT,
        layers: vec![
            LayerPlaintext {
                name: "detector/d".into(),
                tensors: vec![("detector/w".into(), vec![5], &w[..5])],
            },
            LayerPlaintext {
                name: "l0".into(),
                tensors: vec![("w".into(), vec![10, 6], &w[..60])],
            },
            LayerPlaintext {
                name: "l1".into(),
                tensors: vec![("v".into(), vec![40], &w[60..])],
            },
        ],
    };
    seal(&request, key, [7; 16], &mut |_| {}).unwrap()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Truncate { len: usize },
    Insert { at: usize, byte: u8 },
    Remove { at: usize },
    SwapRanges { a: usize, b: usize, len: usize },
}

fn mutation(len: usize) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0..len, 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (0..len).prop_map(|len| Mutation::Truncate { len }),
        (0..=len, any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        (0..len).prop_map(|at| Mutation::Remove { at }),
        (0..len, 0..len, 1usize..80).prop_map(|(a, b, len)| Mutation::SwapRanges { a, b, len }),
    ]
}

fn apply(bytes: &[u8], m: &Mutation) -> Vec<u8> {
    let mut out = bytes.to_vec();
    match *m {
        Mutation::Flip { at, bit } => out[at] ^= 1 << bit,
        Mutation::Truncate { len } => out.truncate(len),
        Mutation::Insert { at, byte } => out.insert(at, byte),
        Mutation::Remove { at } => {
            out.remove(at);
        }
        Mutation::SwapRanges { a, b, len } => {
            let (a, b) = (a.min(b), a.max(b));
            let len = len.min(b - a).min(out.len() - b);
            for i in 0..len {
                out.swap(a + i, b + i);
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_mutation_is_rejected(m in mutation(capsule(&ModelKey::from_bytes([1; 32])).len())) {
        let key = ModelKey::from_bytes([1; 32]);
        let good = capsule(&key);
        let bad = apply(&good, &m);
        prop_assume!(bad != good);
        let opened = Capsule::parse(&bad).and_then(|c| c.open_all(&key));
        prop_assert!(opened.is_err(), "mutation {m:?} was accepted");
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut with_magic = b"mlcapsule/v1\n".to_vec();
        with_magic.extend_from_slice(&bytes);
        for candidate in [&bytes, &with_magic] {
            if let Ok(c) = Capsule::parse(candidate) {
                let _ = c.open_all(&ModelKey::from_bytes([0; 32]));
            }
        }
    }
}

#[test]
fn unmutated_capsule_opens() {
    let key = ModelKey::from_bytes([1; 32]);
    let tensors = Capsule::parse(&capsule(&key))
        .unwrap()
        .open_all(&key)
        .unwrap();
    assert_eq!(tensors.len(), 3);
    assert_eq!(tensors[0].0, "detector/w");
    assert_eq!(tensors[2].2[0], 15.0);
}

/// The layout a host finds from the prefix and the length alone is the one `parse`
/// finds in the whole capsule; a wrong length is refused as `parse` refuses it.
#[test]
fn the_layout_from_the_prefix_matches_the_whole_capsule() {
    use capsule_format::{CapsuleLayout, Error};

    let bytes = capsule(&ModelKey::from_bytes([1; 32]));
    let whole = Capsule::parse(&bytes).unwrap();
    let prefix_len = CapsuleLayout::prefix_len(&bytes[..CapsuleLayout::START_LEN]).unwrap();
    assert_eq!(prefix_len, whole.prefix().len());
    let total = bytes.len() as u64;
    let layout = CapsuleLayout::parse(&bytes[..prefix_len], total).unwrap();
    assert_eq!(layout.prefix_end(), prefix_len);
    assert_eq!(layout.header().capsule_id, whole.header().capsule_id);
    for layer in 0..whole.header().layers.len() {
        let range = layout.sealed_range(layer);
        let sealed = &bytes[range.start as usize..range.end as usize];
        assert_eq!(sealed, whole.sealed_layer(layer), "layer {layer}");
    }
    assert_eq!(layout.sealed_range(2).end, total);
    assert!(matches!(
        CapsuleLayout::parse(&bytes[..prefix_len], total - 1),
        Err(Error::Truncated { expected, found }) if expected == total && found == total - 1
    ));
    assert!(matches!(
        CapsuleLayout::parse(&bytes[..prefix_len], total + 5),
        Err(Error::TrailingData { .. })
    ));
    assert!(matches!(
        CapsuleLayout::prefix_len(b"mlcapsule/v9\n\0\0\0\x01"),
        Err(Error::UnsupportedVersion { .. })
    ));
    assert!(matches!(
        CapsuleLayout::prefix_len(&bytes[..CapsuleLayout::START_LEN - 1]),
        Err(Error::Truncated { .. })
    ));
}
