//! End-to-end tests of the `mlcapsule` binary: seal, inspect, run, and every
//! kind of bad input the issue names, each a one-line error and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use capsule_engine::npy::read_npy;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mnist() -> PathBuf {
    repo().join("models/mnist-cnn.onnx")
}

fn samples() -> PathBuf {
    repo().join("models/samples")
}

fn mlcapsule(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mlcapsule"))
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("the mlcapsule binary runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "mlcapsule failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Asserts a clean failure: exit code 1 (not a panic's 101), one `error:` line
/// that mentions `needle`.
fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "'{needle}' not in: {stderr}"
    );
}

/// Seals the bundled MNIST model into `dir` with small chunks, so layers have several.
fn seal(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    seal_with(dir, name, &[])
}

/// [`seal`], with more arguments for `mlcapsule seal`.
fn seal_with(dir: &Path, name: &str, more: &[&str]) -> (PathBuf, PathBuf) {
    let capsule = dir.join(format!("{name}.capsule"));
    let key = dir.join(format!("{name}.key"));
    let model = mnist();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"seal",
        &model,
        &"-o",
        &capsule,
        &"--key-out",
        &key,
        &"--chunk-size",
        &"4096",
        &"--preset",
        &"mnist",
    ];
    args.extend(more.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
    ok(&mlcapsule(&args));
    (capsule, key)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn sealed_mnist_matches_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let (capsule, key) = seal(dir.path(), "m");
    let out = dir.path().join("out.npy");
    ok(&mlcapsule(&[
        &"run",
        &capsule,
        &"--key",
        &key,
        &samples().join("batch.npy"),
        &"--output",
        &out,
    ]));
    let ours = read_npy(&std::fs::read(&out).unwrap()).unwrap();
    let reference = read_npy(&std::fs::read(samples().join("batch.out.npy")).unwrap()).unwrap();
    assert_eq!(ours.shape(), reference.shape());
    let diff = max_abs_diff(ours.data(), reference.data());
    assert!(diff <= 1e-4, "max abs difference to onnxruntime {diff}");
}

/// Under either cipher, which `inspect` names, and with the default one when none is asked.
#[test]
fn sealed_and_plain_outputs_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let batch = samples().join("batch.npy");
    let plain = dir.path().join("plain.npy");
    ok(&mlcapsule(&[&"run", &mnist(), &batch, &"--output", &plain]));
    let plain = std::fs::read(plain).unwrap();
    for (name, more, cipher) in [
        ("default", &[][..], "aegis-256x4"),
        ("gcm", &["--aead", "aes-256-gcm"][..], "aes-256-gcm"),
        ("aegis", &["--aead", "aegis-256x2"][..], "aegis-256x2"),
    ] {
        let (capsule, key) = seal_with(dir.path(), name, more);
        let shown = ok(&mlcapsule(&[&"inspect", &capsule]));
        assert!(shown.contains(&format!("cipher       {cipher}")), "{shown}");
        let sealed = dir.path().join(format!("{name}.npy"));
        ok(&mlcapsule(&[
            &"run",
            &capsule,
            &"--key",
            &key,
            &batch,
            &"--output",
            &sealed,
        ]));
        assert_eq!(plain, std::fs::read(sealed).unwrap(), "{name}");
    }
    let unknown = mlcapsule(&[
        &"seal",
        &mnist(),
        &"-o",
        &dir.path().join("x.capsule"),
        &"--aead",
        &"rot13",
    ]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(2), "a usage error: {stderr}");
    assert!(
        stderr
            .contains("unknown AEAD 'rot13'; choose one of aegis-256x4, aegis-256x2, aes-256-gcm"),
        "{stderr}"
    );
}

#[test]
fn sample_digit_images_are_classified_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let (capsule, key) = seal(dir.path(), "m");
    let mut pngs: Vec<PathBuf> = std::fs::read_dir(samples())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    pngs.sort();
    assert_eq!(pngs.len(), 10);
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
        vec![&"run", &capsule, &"--key", &key, &"--json"];
    args.extend(pngs.iter().map(|p| p as &dyn AsRef<std::ffi::OsStr>));
    let report: serde_json::Value = serde_json::from_str(&ok(&mlcapsule(&args))).unwrap();
    for (row, png) in report.as_array().unwrap().iter().zip(&pngs) {
        // Files are named digit-<label>-<test index>.png.
        let name = png.file_name().unwrap().to_str().unwrap();
        let label: usize = name.split('-').nth(1).unwrap().parse().unwrap();
        assert_eq!(row["top"][0]["class"], label, "{name}: {row}");
        assert!(row["top"][0]["probability"].as_f64().unwrap() > 0.5);
    }
}

#[test]
fn key_file_is_owner_only_and_inspect_shows_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (capsule, key) = seal(dir.path(), "m");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let key_text = std::fs::read_to_string(&key).unwrap();
    let secret = key_text.lines().last().unwrap().split(':').nth(1).unwrap();
    for json in [false, true] {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"inspect", &capsule];
        if json {
            args.push(&"--json");
        }
        let text = ok(&mlcapsule(&args));
        assert!(text.contains("parameters"));
        assert!(!text.contains(secret), "inspect printed the model key");
        assert!(
            !text.contains(&secret[..16]),
            "inspect printed part of the model key"
        );
    }
}

#[test]
fn existing_outputs_are_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let (capsule, _) = seal(dir.path(), "m");
    let out = mlcapsule(&[&"seal", &mnist(), &"-o", &capsule]);
    fails_with(&out, "--force");
}

/// Runs the sealed model on one sample with `capsule` and `key`.
fn run_one(capsule: &Path, key: &Path) -> Output {
    mlcapsule(&[
        &"run",
        &capsule,
        &"--key",
        &key,
        &samples().join("digit-7-0.npy"),
    ])
}

#[test]
fn flipped_bytes_anywhere_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (capsule, key) = seal(dir.path(), "m");
    let good = std::fs::read(&capsule).unwrap();
    let header_len = u32::from_be_bytes(good[13..17].try_into().unwrap()) as usize;
    let payload = 17 + header_len + 32;
    let bad = dir.path().join("bad.capsule");
    // Version line, header length, header, MAC, first and last payload byte.
    for (at, needle) in [
        (3, "not an mlcapsule"),
        (14, "header"),
        (17 + header_len / 2, "header"),
        (17 + header_len + 5, "header failed authentication"),
        (payload, "failed authentication"),
        (good.len() - 1, "failed authentication"),
    ] {
        let mut bytes = good.clone();
        bytes[at] ^= 0x20;
        std::fs::write(&bad, &bytes).unwrap();
        fails_with(&run_one(&bad, &key), needle);
    }
}

#[test]
fn truncated_capsule_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (capsule, key) = seal(dir.path(), "m");
    let good = std::fs::read(&capsule).unwrap();
    for len in [good.len() - 1, good.len() / 2, 20, 5] {
        std::fs::write(&capsule, &good[..len]).unwrap();
        fails_with(
            &run_one(&capsule, &key),
            if len == 5 {
                "not an mlcapsule"
            } else {
                "truncated"
            },
        );
    }
}

#[test]
fn swapped_and_spliced_chunks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, key_a) = seal(dir.path(), "a");
    let (b, _) = seal(dir.path(), "b");
    let bytes_a = std::fs::read(&a).unwrap();
    let bytes_b = std::fs::read(&b).unwrap();
    let header: serde_json::Value =
        serde_json::from_str(&ok(&mlcapsule(&[&"inspect", &a, &"--json"]))).unwrap();
    // Find a layer with at least two full chunks; it starts at `start`.
    let sealed_chunk = 4096 + 16;
    let header_len = u32::from_be_bytes(bytes_a[13..17].try_into().unwrap()) as usize;
    let mut start = 17 + header_len + 32;
    let mut target = None;
    for layer in header["layers"].as_array().unwrap() {
        if layer["chunks"].as_u64().unwrap() >= 3 {
            target = Some(start);
            break;
        }
        start += layer["sealed_bytes"].as_u64().unwrap() as usize;
    }
    let start = target.expect("the MNIST model has a layer of three or more 4 KiB chunks");
    let bad = dir.path().join("bad.capsule");

    let mut swapped = bytes_a.clone();
    swapped[start..start + 2 * sealed_chunk].rotate_left(sealed_chunk);
    std::fs::write(&bad, &swapped).unwrap();
    fails_with(&run_one(&bad, &key_a), "chunk 0");

    assert_eq!(bytes_a.len(), bytes_b.len());
    let mut spliced = bytes_a.clone();
    spliced[start..start + sealed_chunk].copy_from_slice(&bytes_b[start..start + sealed_chunk]);
    std::fs::write(&bad, &spliced).unwrap();
    fails_with(&run_one(&bad, &key_a), "failed authentication");
}

#[test]
fn wrong_or_missing_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = seal(dir.path(), "a");
    let (_, key_b) = seal(dir.path(), "b");
    fails_with(&run_one(&a, &key_b), "wrong key");
    // Without --key a capsule runs through the enclave, which needs a licence first.
    let state = dir.path().join("empty-state");
    let out = mlcapsule(&[
        &"run",
        &a,
        &samples().join("digit-7-0.npy"),
        &"--state",
        &state,
    ]);
    fails_with(&out, "mlcapsule setup");
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "not a key\n").unwrap();
    fails_with(&run_one(&a, &garbage), "invalid key file");
}

#[test]
fn non_onnx_and_unsupported_models_are_refused_at_seal() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.onnx");
    std::fs::write(&text, "these are not the weights you are looking for\n").unwrap();
    let out = dir.path().join("x.capsule");
    fails_with(
        &mlcapsule(&[&"seal", &text, &"-o", &out]),
        "not an ONNX model",
    );
    let unknown = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unknown-op.onnx");
    let result = mlcapsule(&[&"seal", &unknown, &"-o", &out]);
    fails_with(&result, "Erf");
    fails_with(&result, "erf_1");
    assert!(
        !out.exists(),
        "a failed seal must not leave a capsule behind"
    );
}

#[test]
fn wrong_input_shape_and_corrupt_image_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (capsule, key) = seal(dir.path(), "m");
    let wide = dir.path().join("wide.npy");
    let t = capsule_engine::Tensor::zeros(vec![1, 1, 28, 29]);
    std::fs::write(&wide, capsule_engine::npy::write_npy(&t)).unwrap();
    let out = mlcapsule(&[&"run", &capsule, &"--key", &key, &wide]);
    fails_with(&out, "[N, 1, 28, 28]");
    let png = dir.path().join("broken.png");
    let mut bytes = std::fs::read(samples().join("digit-7-0.png")).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&png, &bytes).unwrap();
    let out = mlcapsule(&[&"run", &capsule, &"--key", &key, &png]);
    fails_with(&out, "not a readable image");
    let npy = dir.path().join("broken.npy");
    std::fs::write(&npy, b"\x93NUMPY garbage").unwrap();
    let out = mlcapsule(&[&"run", &capsule, &"--key", &key, &npy]);
    fails_with(&out, "not a readable .npy");
}
