//! Every case under `tests/vectors/` (built by `generate.py` with onnxruntime
//! as the oracle): import the model, run it with the engine, compare outputs.
//!
//! The folder is walked, never listed by hand; a case is a directory with a
//! `model.onnx`, `input_<i>.npy` and `output_<i>.npy` files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use capsule_engine::{Model, Tensor, read_npy};

/// Absolute error allowed, scaled up for values of magnitude above 1.
const TOLERANCE: f32 = 1e-4;

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", root.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.join("model.onnx").is_file())
        .collect();
    cases.sort();
    cases
}

/// `prefix_0.npy`, `prefix_1.npy`, ... until one is missing.
fn numbered(dir: &Path, prefix: &str) -> Vec<Tensor> {
    (0..)
        .map(|i| dir.join(format!("{prefix}_{i}.npy")))
        .take_while(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("readable npy");
            read_npy(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        })
        .collect()
}

/// Runs one case; `Err` describes the first mismatch.
fn check(dir: &Path) -> Result<(), String> {
    let bytes = std::fs::read(dir.join("model.onnx")).map_err(|e| e.to_string())?;
    let imported = capsule_onnx::import(&bytes).map_err(|e| format!("import: {e}"))?;
    let weights: HashMap<String, Tensor> = imported.weights;
    let model = Model::new(imported.graph, weights).map_err(|e| format!("Model::new: {e}"))?;
    let inputs = numbered(dir, "input");
    let expected = numbered(dir, "output");
    let got = model.run(&inputs).map_err(|e| format!("run: {e}"))?;
    if got.len() != expected.len() {
        return Err(format!(
            "{} outputs, expected {}",
            got.len(),
            expected.len()
        ));
    }
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        if g.shape() != e.shape() {
            return Err(format!(
                "output {i}: shape {:?}, expected {:?}",
                g.shape(),
                e.shape()
            ));
        }
        for (j, (&a, &b)) in g.data().iter().zip(e.data()).enumerate() {
            let allowed = TOLERANCE * b.abs().max(1.0);
            // Written so that NaN on either side is a mismatch.
            let close = (a - b).abs() <= allowed;
            if !close {
                return Err(format!("output {i}[{j}]: {a}, expected {b} (onnxruntime)"));
            }
        }
    }
    Ok(())
}

#[test]
fn engine_matches_onnxruntime_on_every_vector() {
    let cases = cases();
    assert!(
        !cases.is_empty(),
        "no test vectors found; run tests/vectors/generate.py"
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|dir| {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            check(dir).err().map(|e| format!("{name}: {e}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{} vector cases match onnxruntime", cases.len());
}
