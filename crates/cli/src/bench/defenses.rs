//! The per-query cost of the provider's defenses inside the enclave (issue 5's floors),
//! measured by [`capsule_enclave::measure_defense_costs`] on the enclave's own code: the
//! detector stage, PRADA's guard, noising with the output policies, and sealing the
//! defense state.
//!
//! The model is the bundled MNIST CNN; the detector has the kennen-io detector's
//! architecture (two 5x5 convolutions with 10 and 20 filters, FC 50, FC 2) with
//! freshly initialised weights, which cost the same as trained ones; PRADA is filled with
//! `stored` queries all in the queried class, the worst case, where every stored query
//! is compared. The queries are the ten sample digits in `models/samples`.
//!
//! What this does not include: the process boundary, the layer stream and the counter's
//! `fdatasync`, which every query pays with or without defenses
//! (`cargo run --release -p capsule-enclave --example boundary_overhead` measures them).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use capsule_engine::Tensor;
use capsule_format::{
    Capsule, DETECTOR_PREFIX, Detector, DetectorInput, ModelKey, Policy, SealRequest,
};
use serde_json::json;

/// One defense's figure beside the floor and the paper's measurement.
struct Row {
    name: &'static str,
    median: Option<Duration>,
    floor_ms: Option<f64>,
    paper_ms: Option<f64>,
}

/// Measures and prints the defenses' costs: `stored` PRADA queries, `rounds` passes over
/// the sample digits.
pub(super) fn run(stored: usize, rounds: usize, json: bool) -> anyhow::Result<()> {
    let models = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models"));
    let onnx = models.join("mnist-cnn.onnx");
    let bytes = std::fs::read(&onnx).with_context(|| {
        format!(
            "the bundled model {} is needed for the defense costs; run from a checkout of MLCapsule",
            onnx.display()
        )
    })?;
    let model = capsule_onnx::import(&bytes)?;
    let digits = sample_digits(&models.join("samples"))?;

    let mut rng = capsule_lab::rng::Rng::new(5);
    let detector =
        capsule_lab::models::Cnn::new(capsule_lab::models::Architecture::detector(), &mut rng)?
            .to_engine()?;

    let policy = json!({
        "noise": {"c": 0.5, "prior": null},
        "output": {"reverse_sigmoid": {"beta": 1.0, "gamma": 0.1}, "top_k": 3,
                   "label_only": false, "round": 3},
        "prada": {"delta": 0.95, "action": "record", "min_distances": 100,
                  "min_class_distances": 10, "test_every": 10, "trim_sigmas": 3.0,
                  "max_stored": stored.max(1), "max_distances": 5000, "dg_initial_zero": false,
                  "storage": "u8"},
        "detector": {"enabled": true, "threshold": 0.5, "crafted_class": 1,
                     "scores": "probabilities"}
    });
    let mut layers = capsule_enclave::seal_layers(&detector.0, &detector.1, DETECTOR_PREFIX);
    layers.extend(capsule_enclave::seal_layers(
        &model.graph,
        &model.weights,
        "",
    ));
    let request = SealRequest {
        architecture: serde_json::to_value(&model.graph)?,
        preprocessing: None,
        labels: None,
        detector: Some(Detector {
            architecture: serde_json::to_value(&detector.0)?,
            input: DetectorInput::IDENTITY,
        }),
        policy: Policy {
            defense: Some(policy),
            ..Policy::default()
        },
        chunk_size: capsule_format::DEFAULT_CHUNK_SIZE,
        aead: capsule_format::Aead::SEAL_DEFAULT,
        layers,
    };
    let key = ModelKey::generate();
    let sealed = capsule_format::seal(
        &request,
        &key,
        capsule_format::new_capsule_id(),
        &mut |_| {},
    )?;
    let capsule = Capsule::parse(&sealed)?;

    // The sim platform seals the defense state as a client's would.
    let dir = tempfile::tempdir()?;
    let platform = capsule_attest::SimPlatform::open_or_create(dir.path())?;
    let attester = platform.attester([0; 32]);
    let costs =
        capsule_enclave::measure_defense_costs(&capsule, &key, &attester, &digits, stored, rounds)?;

    let rows = [
        Row {
            name: "detector (kennen-io size)",
            median: costs.detector,
            floor_ms: Some(1.0),
            paper_ms: Some(0.832),
        },
        Row {
            name: "prada",
            median: costs.prada,
            floor_ms: Some(1.0),
            paper_ms: Some(35.0),
        },
        Row {
            name: "noising + output policies",
            median: costs.release,
            floor_ms: Some(0.05),
            paper_ms: Some(0.026),
        },
        Row {
            name: "seal defense state",
            median: costs.seal,
            floor_ms: None,
            paper_ms: None,
        },
    ];
    if json {
        for row in &rows {
            let mut line = json!({
                "case": format!("defense {}", row.name),
                "mode": "enclave",
                "threads": capsule_engine::threads(),
                "batch": 1,
                "median_ms": row.median.map(|d| super::round(d.as_secs_f64() * 1e3)),
                "runs": rounds * digits.len(),
            });
            if row.name == "prada" {
                line["stored"] = costs.prada_stored.into();
            }
            if row.name == "seal defense state" {
                line["state_bytes"] = costs.state_bytes.into();
            }
            if let Some(floor) = row.floor_ms {
                line["floor_ms"] = floor.into();
            }
            if let Some(paper) = row.paper_ms {
                line["paper_ms"] = paper.into();
            }
            println!("{line}");
        }
        return Ok(());
    }
    println!(
        "\nDefenses per query inside the enclave (MNIST CNN, batch 1; PRADA with {} stored \
         queries, all in the queried class)",
        costs.prada_stored
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "defense", "median ms", "floor ms", "paper ms"
    );
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}"));
    for row in &rows {
        let name = match row.name {
            "seal defense state" => {
                format!("seal state ({:.2} MB)", costs.state_bytes as f64 / 1e6)
            }
            name => name.to_string(),
        };
        println!(
            "{:<28} {:>10} {:>10} {:>10}",
            name,
            row.median
                .map_or("-".to_string(), |d| format!("{:.4}", d.as_secs_f64() * 1e3)),
            cell(row.floor_ms),
            cell(row.paper_ms),
        );
    }
    Ok(())
}

/// The sample digits `digit-*.npy` (not their `.out.npy` outputs), each a batch of one.
fn sample_digits(dir: &Path) -> anyhow::Result<Vec<Tensor>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the sample digits in {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("digit-") && n.ends_with(".npy") && !n.ends_with(".out.npy")
            })
        })
        .collect();
    names.sort();
    names
        .iter()
        .map(|path| {
            let t = capsule_engine::npy::read_npy(&std::fs::read(path)?)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(Tensor::new(vec![1, 1, 28, 28], t.data().to_vec())?)
        })
        .collect()
}
