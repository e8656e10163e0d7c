//! The importer is a parser of untrusted bytes: whatever it is given, it
//! returns an error (never panics), and malformed input is reported as
//! `NotOnnx` or `InvalidModel`.

use std::path::Path;

use capsule_onnx::{Error, import};
use proptest::prelude::*;

fn sample_model() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/chain_batch3/model.onnx");
    std::fs::read(path).expect("test vector present")
}

fn is_malformed(e: &Error) -> bool {
    matches!(e, Error::NotOnnx { .. } | Error::InvalidModel { .. })
}

proptest! {
    #[test]
    fn random_bytes_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let result = import(&bytes);
        prop_assert!(matches!(&result, Err(e) if is_malformed(e)), "{result:?}");
    }

    #[test]
    fn truncated_models_are_rejected(cut in 0usize..1_000_000) {
        let model = sample_model();
        let cut = cut % model.len();
        let result = import(&model[..cut]);
        prop_assert!(matches!(&result, Err(e) if is_malformed(e)), "cut at {cut}: {result:?}");
    }

    #[test]
    fn corrupted_models_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
    ) {
        let mut model = sample_model();
        for (at, byte) in flips {
            let i = at.index(model.len());
            model[i] ^= byte;
        }
        // Any outcome but a panic: a flipped weight byte still imports.
        let _ = import(&model);
    }
}

#[test]
fn every_prefix_of_a_model_is_rejected() {
    let model = sample_model();
    for cut in 0..model.len() {
        let result = import(&model[..cut]);
        assert!(
            matches!(&result, Err(e) if is_malformed(e)),
            "cut at {cut}: {result:?}"
        );
    }
    assert!(import(&model).is_ok());
}
