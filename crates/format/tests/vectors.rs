//! The language-neutral test vectors of `spec/vectors/` (capsule-v1 §7).
//!
//! `committed_vectors_are_current` rebuilds every vector from a fixed seed
//! and fails if a committed file differs; run with
//! `MLCAPSULE_REGENERATE_VECTORS=1` to rewrite them after a deliberate format change.
//! `every_vector_meets_its_expectation` walks the folder and checks each file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aws_lc_rs::digest::{SHA256, digest};
use capsule_format::{
    Aead, Capsule, Detector, DetectorInput, Error, LayerPlaintext, ModelKey, Policy, Preprocessing,
    SealRequest, seal,
};

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../spec/vectors")
}

/// 32 pseudo-random bytes from a label: the generator's only source of "randomness".
fn seeded(label: &str) -> [u8; 32] {
    digest(
        &SHA256,
        format!("mlcapsule test vectors/{label}").as_bytes(),
    )
    .as_ref()
    .try_into()
    .unwrap()
}

fn key(label: &str) -> ModelKey {
    ModelKey::from_bytes(seeded(label))
}

fn capsule_id(label: &str) -> [u8; 16] {
    seeded(label)[..16].try_into().unwrap()
}

fn values(label: &str, n: usize) -> Vec<f32> {
    let bytes = seeded(label);
    (0..n)
        .map(|i| f32::from(bytes[i % 32]) / 64.0 - 2.0 + i as f32 / 1024.0)
        .collect()
}

/// Two layers; layer 0 is exactly two 64-byte chunks plus a 16-byte third.
fn sample(policy: Policy, with_extras: bool, id: &str) -> Vec<u8> {
    sample_with(policy, with_extras, false, Aead::Aes256Gcm, id)
}

/// [`sample`], with a one-layer input detector in front when `with_detector` (capsule-v1
/// §4.6), its chunks sealed with `aead`.
fn sample_with(
    policy: Policy,
    with_extras: bool,
    with_detector: bool,
    aead: Aead,
    id: &str,
) -> Vec<u8> {
    let w0 = values("w0", 32);
    let b0 = values("b0", 4);
    let w1 = values("w1", 12);
    let d0 = values("d0", 20);
    let mut layers = vec![
        LayerPlaintext {
            name: "conv1".into(),
            tensors: vec![
                ("conv1.w".into(), vec![8, 4], &w0),
                ("conv1.b".into(), vec![4], &b0),
            ],
        },
        LayerPlaintext {
            name: "fc".into(),
            tensors: vec![("fc.w".into(), vec![3, 4], &w1)],
        },
    ];
    if with_detector {
        layers.insert(
            0,
            LayerPlaintext {
                name: "detector/gemm".into(),
                tensors: vec![("detector/gemm.w".into(), vec![2, 10], &d0)],
            },
        );
    }
    let request = SealRequest {
        architecture: serde_json::json!({"inputs": [], "params": [], "nodes": [], "outputs": []}),
        preprocessing: with_extras.then(|| Preprocessing {
            size: [28, 28],
            channels: 1,
            scale: 1.0 / 255.0,
            mean: vec![0.1307],
            std: vec![0.3081],
            resize_shorter: None,
        }),
        labels: with_extras.then(|| (0..10).map(|d| d.to_string()).collect()),
        detector: with_detector.then(|| Detector {
            architecture: serde_json::json!({"inputs": [], "params": [], "nodes": [], "outputs": []}),
            input: DetectorInput {
                scale: 0.3081,
                offset: 0.1307,
            },
        }),
        policy,
        chunk_size: 64,
        aead,
        layers,
    };
    seal(&request, &key("k1"), capsule_id(id), &mut |_| {}).unwrap()
}

/// Byte range of header JSON in a capsule.
fn header_range(bytes: &[u8]) -> std::ops::Range<usize> {
    let len = u32::from_be_bytes(bytes[13..17].try_into().unwrap()) as usize;
    17..17 + len
}

/// Replaces the header JSON and recomputes the MAC with `key`, as only a key holder could.
fn reheader(bytes: &[u8], edit: impl Fn(&mut serde_json::Value), key: &ModelKey) -> Vec<u8> {
    let range = header_range(bytes);
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[range.clone()]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = b"mlcapsule/v1\n".to_vec();
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    let id: [u8; 16] = hex::decode(header["capsule_id"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let header_key = {
        let prk =
            aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, &id).extract(key.expose());
        let mut k = [0u8; 32];
        prk.expand(&[b"mlcapsule/v1 header"], aws_lc_rs::hkdf::HKDF_SHA256)
            .unwrap()
            .fill(&mut k)
            .unwrap();
        k
    };
    let mac = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &header_key),
        &out,
    );
    out.extend_from_slice(mac.as_ref());
    out.extend_from_slice(&bytes[range.end + 32..]);
    out
}

struct Vector {
    description: &'static str,
    key: ModelKey,
    expect: &'static str,
    bytes: Vec<u8>,
}

fn build() -> BTreeMap<&'static str, Vector> {
    let good = sample(Policy::default(), false, "id1");
    let payload = header_range(&good).end + 32;
    let k1 = key("k1");
    let v = |description, key: &ModelKey, expect, bytes| Vector {
        description,
        key: key.clone(),
        expect,
        bytes,
    };
    let mut out = BTreeMap::new();
    out.insert(
        "ok-two-layers",
        v(
            "two layers, 64-byte chunks, empty policy",
            &k1,
            "ok",
            good.clone(),
        ),
    );
    let policy = Policy {
        max_queries: Some(5),
        expires: Some("2027-01-31".into()),
        defense: None,
    };
    out.insert(
        "ok-policy-labels-preprocessing",
        v(
            "policy, labels and preprocessing set",
            &k1,
            "ok",
            sample(policy, true, "id2"),
        ),
    );
    let defended = Policy {
        max_queries: Some(100),
        expires: None,
        defense: Some(serde_json::json!({
            "noise": {"c": 0.5, "prior": null},
            "output": {"reverse_sigmoid": null, "top_k": null, "label_only": false, "round": 3},
            "prada": {"delta": 0.95, "action": "deny", "min_distances": 100,
                      "min_class_distances": 10, "test_every": 10, "trim_sigmas": 3.0,
                      "max_stored": 3000, "max_distances": 5000, "dg_initial_zero": false,
                      "storage": "u8"},
            "detector": {"enabled": true, "threshold": 0.5, "crafted_class": 1,
                         "scores": "probabilities"}
        })),
    };
    let with_detector = sample_with(defended, true, true, Aead::Aes256Gcm, "id4");
    out.insert(
        "ok-defense-policy-detector",
        v(
            "defense policy and an input detector layer in front of the model's two",
            &k1,
            "ok",
            with_detector.clone(),
        ),
    );
    let late = reheader(
        &with_detector,
        |h| {
            // Move the detector layer behind the model's: tensors and chunks stay in place,
            // only the order rule of capsule-v1 §4.6 is broken.
            let layers = h["layers"].as_array_mut().unwrap();
            let first = layers.remove(0);
            layers.push(first);
        },
        &k1,
    );
    out.insert(
        "invalid-header-detector-after-model",
        v(
            "detector layer listed after the model's layers (MAC valid)",
            &k1,
            "invalid-header",
            late,
        ),
    );
    let not_object = reheader(&good, |h| h["policy"]["defense"] = "deny".into(), &k1);
    out.insert(
        "invalid-header-defense-not-object",
        v(
            "policy.defense is a string, not an object (MAC valid)",
            &k1,
            "invalid-header",
            not_object,
        ),
    );
    out.insert(
        "not-a-capsule",
        v(
            "a text file",
            &k1,
            "not-a-capsule",
            b"hello, world\n".to_vec(),
        ),
    );
    let mut v2 = good.clone();
    v2[11] = b'2';
    out.insert(
        "unsupported-version",
        v("version line mlcapsule/v2", &k1, "unsupported-version", v2),
    );
    let mut broken = good.clone();
    broken[header_range(&good).start] = b'[';
    out.insert(
        "invalid-header-json",
        v("header JSON does not parse", &k1, "invalid-header", broken),
    );
    let unknown = reheader(&good, |h| h["policy"]["unlimited"] = true.into(), &k1);
    out.insert(
        "invalid-header-unknown-policy",
        v(
            "policy has a member the reader does not know (MAC valid)",
            &k1,
            "invalid-header",
            unknown,
        ),
    );
    out.insert(
        "truncated",
        v(
            "last 10 bytes missing",
            &k1,
            "truncated",
            good[..good.len() - 10].to_vec(),
        ),
    );
    let mut trailing = good.clone();
    trailing.push(0);
    out.insert(
        "trailing-data",
        v("one extra byte", &k1, "trailing-data", trailing),
    );
    out.insert(
        "wrong-key",
        v(
            "opened with another key",
            &key("k2"),
            "wrong-key",
            good.clone(),
        ),
    );
    let mut modified = good.clone();
    let fc = good.windows(4).position(|w| w == b"\"fc\"").unwrap();
    modified[fc + 1] = b'g';
    out.insert(
        "header-modified",
        v(
            "layer name changed, MAC not updated",
            &k1,
            "header-modified",
            modified,
        ),
    );
    let mut flipped = good.clone();
    flipped[payload + 70] ^= 1;
    out.insert(
        "chunk-flipped-bit",
        v("one payload bit flipped", &k1, "chunk-failed", flipped),
    );
    let mut swapped = good.clone();
    swapped[payload..payload + 160].rotate_left(80);
    out.insert(
        "chunk-swapped",
        v(
            "chunks 0 and 1 of layer 0 swapped",
            &k1,
            "chunk-failed",
            swapped,
        ),
    );
    let other = sample(Policy::default(), false, "id3");
    let mut spliced = good.clone();
    spliced[payload..payload + 80].copy_from_slice(&other[payload..payload + 80]);
    out.insert(
        "chunk-spliced",
        v(
            "chunk 0 of layer 0 from another capsule under the same key",
            &k1,
            "chunk-failed",
            spliced,
        ),
    );
    // The last chunk of layer 0 dropped and the header re-MACed to match: only the
    // last-chunk flag can catch this.
    let mut cut = reheader(&good, |h| h["layers"][0]["plaintext_len"] = 128.into(), &k1);
    let cut_payload = header_range(&cut).end + 32;
    cut.drain(cut_payload + 160..cut_payload + 192);
    let cut = reheader(
        &cut,
        |h| {
            h["tensors"] = serde_json::json!([
                {"name": "conv1.w", "shape": [8, 4], "layer": 0, "offset": 0},
                {"name": "fc.w", "shape": [3, 4], "layer": 1, "offset": 0}
            ])
        },
        &k1,
    );
    // Each AEGIS variant's capsule, and the same with one payload bit flipped.
    let variants = [
        (
            Aead::Aegis256X2,
            "id5",
            ["ok-aegis-256x2", "the two layers sealed with AEGIS-256X2"],
            [
                "chunk-aegis-256x2-flipped-bit",
                "one payload bit flipped, AEGIS-256X2",
            ],
        ),
        (
            Aead::Aegis256X4,
            "id6",
            ["ok-aegis-256x4", "the two layers sealed with AEGIS-256X4"],
            [
                "chunk-aegis-256x4-flipped-bit",
                "one payload bit flipped, AEGIS-256X4",
            ],
        ),
    ];
    for (aead, id, [ok, ok_text], [flipped, flipped_text]) in variants {
        let capsule = sample_with(Policy::default(), false, false, aead, id);
        let mut broken = capsule.clone();
        broken[header_range(&capsule).end + 32 + 70] ^= 1;
        out.insert(ok, v(ok_text, &k1, "ok", capsule));
        out.insert(flipped, v(flipped_text, &k1, "chunk-failed", broken));
    }
    let aegis = sample_with(Policy::default(), false, false, Aead::Aegis256X2, "id5");
    let downgraded = reheader(
        &aegis,
        |h| {
            h.as_object_mut().unwrap().remove("aead");
        },
        &k1,
    );
    out.insert(
        "chunk-aead-changed-remac",
        v(
            "aead member removed (AES-256-GCM declared) from an AEGIS-256X2 capsule, \
             header re-MACed",
            &k1,
            "chunk-failed",
            downgraded,
        ),
    );
    let mut stripped = aegis.clone();
    let member = b",\"aead\":\"aegis-256x2\"";
    let at = aegis
        .windows(member.len())
        .position(|w| w == member)
        .unwrap();
    stripped[at..at + member.len()].fill(b' ');
    out.insert(
        "header-aead-stripped",
        v(
            "aead member blanked out of an AEGIS-256X2 capsule, MAC not updated",
            &k1,
            "header-modified",
            stripped,
        ),
    );
    let unknown_aead = reheader(&aegis, |h| h["aead"] = "aes-128-ocb".into(), &k1);
    out.insert(
        "invalid-header-unknown-aead",
        v(
            "aead names a cipher the reader does not know (MAC valid)",
            &k1,
            "invalid-header",
            unknown_aead,
        ),
    );
    out.insert(
        "layer-truncated-remac",
        v(
            "last chunk of layer 0 dropped, header re-MACed",
            &k1,
            "chunk-failed",
            cut,
        ),
    );
    out
}

fn encode(v: &Vector) -> Vec<u8> {
    let mut text = format!(
        "description: {}\nmodel_key: {}\nexpect: {}\n",
        v.description,
        hex::encode(v.key.expose()),
        v.expect
    );
    if v.expect == "ok" {
        let capsule = Capsule::parse(&v.bytes).unwrap();
        let unsealer = capsule.unseal(&v.key).unwrap();
        for layer in 0..capsule.header().layers.len() {
            let plain = unsealer
                .open_layer(layer, capsule.sealed_layer(layer))
                .unwrap();
            text += &format!(
                "layer.{layer}.plaintext_sha256: {}\n",
                hex::encode(digest(&SHA256, &plain))
            );
        }
    }
    text.push('\n');
    let mut out = text.into_bytes();
    out.extend_from_slice(&v.bytes);
    out
}

#[test]
fn committed_vectors_are_current() {
    let dir = vectors_dir();
    let regenerate = std::env::var_os("MLCAPSULE_REGENERATE_VECTORS").is_some();
    for (name, vector) in build() {
        let path = dir.join(format!("{name}.vector"));
        let bytes = encode(&vector);
        if regenerate {
            std::fs::write(&path, &bytes).unwrap();
        } else {
            let committed =
                std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                committed == bytes,
                "{name}: committed vector differs from the generator's output"
            );
        }
    }
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::NotACapsule => "not-a-capsule",
        Error::UnsupportedVersion { .. } => "unsupported-version",
        Error::InvalidHeader { .. } => "invalid-header",
        Error::Truncated { .. } => "truncated",
        Error::TrailingData { .. } => "trailing-data",
        Error::WrongKey => "wrong-key",
        Error::HeaderModified => "header-modified",
        Error::ChunkFailed { .. } => "chunk-failed",
        Error::InvalidKeyFile { .. } => "invalid-key-file",
        Error::InvalidGrant | Error::InvalidToken => "other",
    }
}

#[test]
fn every_vector_meets_its_expectation() {
    let mut seen = 0;
    for entry in std::fs::read_dir(vectors_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "vector") {
            continue;
        }
        seen += 1;
        let file = std::fs::read(&path).unwrap();
        let split = file.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
        let fields: BTreeMap<&str, &str> = std::str::from_utf8(&file[..split])
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(": "))
            .collect();
        let bytes = &file[split..];
        let key = ModelKey::from_bytes(
            hex::decode(fields["model_key"])
                .unwrap()
                .try_into()
                .unwrap(),
        );
        let outcome = Capsule::parse(bytes).and_then(|c| {
            let unsealer = c.unseal(&key)?;
            (0..c.header().layers.len())
                .map(|l| {
                    unsealer
                        .open_layer(l, c.sealed_layer(l))
                        .map(|p| hex::encode(digest(&SHA256, &p)))
                })
                .collect::<Result<Vec<_>, _>>()
        });
        match outcome {
            Ok(hashes) => {
                assert_eq!(fields["expect"], "ok", "{}", path.display());
                for (l, h) in hashes.iter().enumerate() {
                    assert_eq!(fields[format!("layer.{l}.plaintext_sha256").as_str()], h);
                }
            }
            Err(e) => assert_eq!(fields["expect"], kind(&e), "{}: {e}", path.display()),
        }
    }
    assert!(
        seen >= 10,
        "only {seen} vectors found in {}",
        vectors_dir().display()
    );
}
