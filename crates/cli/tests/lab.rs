//! Smoke tests of `mlcapsule lab … --quick --json`: each evaluation runs end to end on tiny
//! subsets, prints one JSON object with the agreed keys and values in range, and writes its
//! plot and report. The floors are measured by the full runs (see crates/cli/src/lab.rs), not
//! here.
//!
//! They use the real MNIST files in build/mnist (scripts/fetch-mnist.sh) when present, else a
//! synthetic stand-in written in the same IDX format.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// Real MNIST from build/mnist when it is there (scripts/fetch-mnist.sh); otherwise a
/// synthetic stand-in in the same IDX format (a bar whose row encodes the class, plus noise),
/// so the smoke tests always exercise the whole pipeline.
fn data() -> (PathBuf, Option<tempfile::TempDir>) {
    let real = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/mnist");
    if real.join("t10k-images-idx3-ubyte").exists() {
        return (real, None);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (prefix, n) in [("train", 2000u32), ("t10k", 600)] {
        let mut images = vec![0, 0, 8, 3];
        for d in [n, 28, 28] {
            images.extend_from_slice(&d.to_be_bytes());
        }
        let mut labels = vec![0, 0, 8, 1];
        labels.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            let class = (next() % 10) as usize;
            labels.push(class as u8);
            for row in 0..28 {
                for _col in 0..28 {
                    let bar = row == 3 + 2 * class || row == 4 + 2 * class;
                    let noise = (next() % 60) as u8;
                    images.push(if bar { 255 - noise } else { noise / 4 });
                }
            }
        }
        std::fs::write(
            dir.path().join(format!("{prefix}-images-idx3-ubyte")),
            images,
        )
        .unwrap();
        std::fs::write(
            dir.path().join(format!("{prefix}-labels-idx1-ubyte")),
            labels,
        )
        .unwrap();
    }
    (dir.path().to_path_buf(), Some(dir))
}

/// Runs `mlcapsule lab <what> --quick --json` and returns the JSON and the output directory.
fn lab(what: &str, extra: &[&str]) -> (Value, tempfile::TempDir) {
    let (data, _synthetic) = data();
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mlcapsule"))
        .args(["lab", what, "--quick", "--json", "--data"])
        .arg(&data)
        .arg("--out")
        .arg(out.path())
        .args(extra)
        .output()
        .expect("the mlcapsule binary runs");
    assert!(
        output.status.success(),
        "lab {what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "one JSON line: {stdout}");
    let json: Value = serde_json::from_str(stdout.trim()).unwrap();
    for file in ["png", "json"] {
        let path = out.path().join(format!("{what}.{file}"));
        assert!(
            std::fs::metadata(&path).unwrap().len() > 0,
            "{} written",
            path.display()
        );
    }
    (json, out)
}

fn numbers(v: &Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn lab_mia_quick() {
    let (v, _dir) = lab("mia", &[]);
    let c = numbers(&v, "c");
    assert_eq!(c.len(), 11);
    assert_eq!((c[0], c[10]), (0.0, 1.0));
    for key in ["auc", "defense_aware_auc", "label_kept"] {
        let xs = numbers(&v, key);
        assert_eq!(xs.len(), c.len(), "{key}");
        assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)), "{key}: {xs:?}");
    }
    let (auc, aware) = (numbers(&v, "auc"), numbers(&v, "defense_aware_auc"));
    for (a, d) in auc.iter().zip(&aware) {
        assert!((d - a.max(1.0 - a)).abs() < 1e-12 && *d >= 0.5);
    }
    // c = 0 is no noise: every label is kept.
    assert_eq!(numbers(&v, "label_kept")[0], 1.0);
}

#[test]
fn lab_prada_quick() {
    let (v, _dir) = lab("prada", &[]);
    assert!(v["benign_alarms"].as_u64().is_some(), "{v}");
    for key in ["jbda_queries_to_detection", "random_queries_to_detection"] {
        let q = &v[key];
        assert!(
            q.is_null() || q.as_u64().is_some_and(|q| q > 0),
            "{key}: {q}"
        );
    }
    let delta = v["delta"].as_f64().unwrap();
    assert!(delta > 0.0 && delta < 1.0);
}

#[test]
fn lab_kennen_quick_exports_a_detector() {
    let export = tempfile::tempdir().unwrap();
    let export_arg = export.path().to_str().unwrap().to_string();
    let (v, _dir) = lab("kennen", &["--export", &export_arg]);
    for key in ["heldout_accuracy", "false_refusal_rate"] {
        let x = v[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&x), "{key}: {x}");
    }
    assert!(v["engine_max_diff"].as_f64().unwrap() < 1e-4);
    // The exported detector loads in our engine and answers two probabilities per image.
    let graph = std::fs::read(export.path().join("detector.json")).unwrap();
    let graph = capsule_engine::Graph::from_json(&graph).unwrap();
    let mut weights = std::collections::HashMap::new();
    for p in &graph.params {
        let bytes = std::fs::read(export.path().join(format!("{}.npy", p.name))).unwrap();
        weights.insert(p.name.clone(), capsule_engine::read_npy(&bytes).unwrap());
    }
    let model = capsule_engine::Model::new(graph, weights).unwrap();
    let x = capsule_engine::Tensor::zeros(vec![3, 1, 28, 28]);
    let y = model.run(&[x]).unwrap();
    assert_eq!(y[0].shape(), &[3, 2]);
    let sum: f32 = y[0].data()[..2].iter().sum();
    assert!((sum - 1.0).abs() < 1e-5);
}
