//! Big reference models against onnxruntime. They are generated, not committed
//! (`scripts/models.sh --all` writes them to `build/models/`), so these tests are
//! `#[ignore]`d and run by `scripts/test` with `MLCAPSULE_MODELS` set.

use std::path::{Path, PathBuf};
use std::process::Command;

use capsule_engine::npy::read_npy;

fn models() -> PathBuf {
    std::env::var_os("MLCAPSULE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../build/models"))
}

fn mlcapsule(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mlcapsule"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mlcapsule {:?} failed: {}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn read(path: &Path) -> capsule_engine::Tensor {
    read_npy(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Seals `name.onnx`, runs it sealed and plain on `name.input.npy`, and
/// compares with onnxruntime's `name.output.npy`: relative error on logits
/// at most 1e-4, and sealed equal to plain bit for bit.
fn check(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let m = models();
    let onnx = m.join(format!("{name}.onnx"));
    assert!(
        onnx.exists(),
        "{} is missing: run scripts/models.sh --all",
        onnx.display()
    );
    let capsule = dir.path().join("m.capsule");
    let key = dir.path().join("m.key");
    mlcapsule(&[&"seal", &onnx, &"-o", &capsule, &"--key-out", &key]);
    let input = m.join(format!("{name}.input.npy"));
    let (sealed, plain) = (dir.path().join("sealed.npy"), dir.path().join("plain.npy"));
    mlcapsule(&[
        &"run",
        &capsule,
        &"--key",
        &key,
        &input,
        &"--output",
        &sealed,
    ]);
    mlcapsule(&[&"run", &onnx, &input, &"--output", &plain]);
    assert_eq!(
        std::fs::read(&sealed).unwrap(),
        std::fs::read(&plain).unwrap(),
        "{name}: sealed and plain outputs differ"
    );
    let ours = read(&sealed);
    let reference = read(&m.join(format!("{name}.output.npy")));
    assert_eq!(ours.shape(), reference.shape(), "{name}");
    let worst = ours
        .data()
        .iter()
        .zip(reference.data())
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0f32, f32::max);
    println!("{name}: max relative error to onnxruntime {worst:.2e}");
    assert!(worst <= 1e-4, "{name}: max relative error {worst}");
}

#[test]
#[ignore = "needs build/models from scripts/models.sh"]
fn mobilenetv2_matches_onnxruntime() {
    check("mobilenetv2");
}

#[test]
#[ignore = "needs build/models from scripts/models.sh"]
fn resnet18_matches_onnxruntime() {
    check("resnet18");
}

#[test]
#[ignore = "needs build/models from scripts/models.sh --all"]
fn vgg16_matches_onnxruntime() {
    if std::env::var_os("MLCAPSULE_SKIP_VGG16").is_some_and(|v| v == "1") {
        println!("VGG-16 skipped (MLCAPSULE_SKIP_VGG16=1)");
        return;
    }
    check("vgg16");
}

/// MobileNetV2 with its real ImageNet weights classifies a real photo (Chelsea
/// the cat, from scikit-image) as a cat, through the capsule's own image
/// preprocessing; and on onnxruntime's exact preprocessed tensor its
/// probabilities match onnxruntime's within 1e-4.
#[test]
#[ignore = "needs build/models from scripts/models.sh"]
fn mobilenetv2_classifies_a_real_photo() {
    let dir = tempfile::tempdir().unwrap();
    let m = models();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(m.join("mobilenetv2.json")).unwrap()).unwrap();
    let photo = &meta["photo"];
    let capsule = dir.path().join("m.capsule");
    let key = dir.path().join("m.key");
    let labels = m.join("imagenet-labels.txt");
    mlcapsule(&[
        &"seal",
        &m.join("mobilenetv2.onnx"),
        &"-o",
        &capsule,
        &"--key-out",
        &key,
        &"--preset",
        &"imagenet",
        &"--labels",
        &labels,
    ]);
    let image = m.join(photo["file"].as_str().unwrap());
    let report: serde_json::Value = serde_json::from_str(&mlcapsule(&[
        &"run", &capsule, &"--key", &key, &"--json", &image,
    ]))
    .unwrap();
    let top1 = report[0]["top"][0]["label"].as_str().unwrap().to_owned();
    println!("photo: {}", report[0]["top"]);
    let accepted: Vec<&str> = photo["accepted_top1_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        accepted.contains(&top1.as_str()),
        "top-1 '{top1}' is not one of {accepted:?}"
    );

    let logits = dir.path().join("logits.npy");
    let input = m.join(photo["input"].as_str().unwrap());
    mlcapsule(&[
        &"run",
        &capsule,
        &"--key",
        &key,
        &input,
        &"--output",
        &logits,
    ]);
    let logits = read(&logits);
    let max = logits
        .data()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.data().iter().map(|v| (v - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let reference = read(&m.join(photo["output"].as_str().unwrap()));
    let worst = exp
        .iter()
        .zip(reference.data())
        .map(|(e, r)| (e / sum - r).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 1e-4,
        "photo probabilities differ from onnxruntime by {worst}"
    );
}
