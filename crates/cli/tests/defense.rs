//! End to end, the provider's defenses (spec/policy.md) through `mlcapsule`: a capsule
//! sealed with a policy and an input detector, a real provisioning server on loopback and
//! real enclave processes. A benign client classifying real MNIST digits is answered (its
//! posteriors noised, its labels kept); a scripted Jacobian-style extraction is stopped by
//! PRADA; a query the detector flags is refused and counted; an older defense state is
//! refused until a top-up resynchronises it, and the server receives the detections; a
//! client who edits the policy in the capsule gets an integrity error.
//!
//! Needs `mlcapsule-enclave` beside `mlcapsule` (built by `cargo test --workspace`).
//! `tests/fixtures/mnist-test-200.npy` holds the first 200 MNIST test digits
//! (`tests/fixtures/make_mnist_digits.py`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use capsule_engine::Tensor;
use capsule_engine::npy::{read_npy, write_npy};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_mlcapsule"));
    assert!(
        exe.with_file_name("mlcapsule-enclave").exists(),
        "mlcapsule-enclave is missing: run the tests with 'cargo test --workspace'"
    );
    exe
}

fn mlcapsule<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A clean failure whose `error:` line contains every needle.
fn fails_with(out: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_owned();
    assert!(last.starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(last.contains(needle), "'{needle}' not in: {last}");
    }
    last
}

/// The MNIST normalisation of `--preset mnist`, for pixels in [0, 1].
fn normalise(p: f32) -> f32 {
    (p - 0.1307) / 0.3081
}

/// The fixture's 200 real MNIST test digits, as the model takes them.
fn real_digits() -> Vec<Vec<f32>> {
    let path = repo().join("crates/cli/tests/fixtures/mnist-test-200.npy");
    let pixels = read_npy(&std::fs::read(path).unwrap()).unwrap();
    pixels
        .data()
        .chunks(784)
        .map(|d| d.iter().map(|p| normalise(p / 255.0)).collect())
        .collect()
}

/// A Jacobian-augmentation-like extraction stream (Papernot et al.): real seed digits,
/// then rounds in which every point so far gets a step of 0.1 (pixel units) along a sign
/// vector, as the attack steps along the sign of its substitute's gradient.
fn jacobian_like(seeds: &[Vec<f32>], count: usize) -> Vec<Vec<f32>> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut sign = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if state & 1 == 0 { 1.0 } else { -1.0 }
    };
    let (low, high) = (normalise(0.0), normalise(1.0));
    let mut set = seeds.to_vec();
    let mut stream = set.clone();
    while stream.len() < count {
        let next: Vec<Vec<f32>> = set
            .iter()
            .map(|x| {
                x.iter()
                    .map(|v| (v + 0.1 / 0.3081 * sign()).clamp(low, high))
                    .collect()
            })
            .collect();
        stream.extend(next.iter().cloned());
        set.extend(next);
    }
    stream.truncate(count);
    stream
}

/// Writes rows as one `.npy` batch `[n, 1, 28, 28]`.
fn write_batch(path: &Path, rows: &[Vec<f32>]) {
    let data = rows.iter().flatten().copied().collect();
    let t = Tensor::new(vec![rows.len(), 1, 28, 28], data).unwrap();
    std::fs::write(path, write_npy(&t)).unwrap();
}

/// The detector export of spec/policy.md §8 for a network that flags inputs whose mean
/// pixel (in [0, 1]) is at least 0.5: one Gemm averaging the input, minus 0.5, a logit.
fn write_mean_detector(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let graph = serde_json::json!({
        "inputs": [{"name": "x", "shape": [null, 1, 28, 28]}],
        "params": [{"name": "w", "shape": [784, 1]}, {"name": "b", "shape": [1]}],
        "nodes": [
            {"name": "flatten", "op": {"op": "Flatten", "axis": 1},
             "inputs": ["x"], "outputs": ["flat"]},
            {"name": "score",
             "op": {"op": "Gemm", "alpha": 1.0, "beta": 1.0, "trans_a": false, "trans_b": false},
             "inputs": ["flat", "w", "b"], "outputs": ["logit"]}
        ],
        "outputs": ["logit"]
    });
    std::fs::write(dir.join("detector.json"), graph.to_string()).unwrap();
    let w = Tensor::new(vec![784, 1], vec![1.0 / 784.0; 784]).unwrap();
    std::fs::write(dir.join("w.npy"), write_npy(&w)).unwrap();
    let b = Tensor::new(vec![1], vec![-0.5]).unwrap();
    std::fs::write(dir.join("b.npy"), write_npy(&b)).unwrap();
}

const POLICY: &str = r#"
[noise]
c = 0.5

[output]
round = 4

[prada]
delta = 0.9
action = "deny"

[detector]
threshold = 0.5
scores = "logits"
"#;

/// `mlcapsule server` on a free loopback port.
struct Server {
    child: Child,
    url: String,
    token: String,
}

impl Server {
    fn start(data: &Path) -> Server {
        let mut child = Command::new(bin())
            .args(["server", "--listen", "127.0.0.1:0", "--allow-sim", "--data"])
            .arg(data)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("server exited").unwrap();
            if let Some(url) = line.split("listening on ").nth(1) {
                break url.trim().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let token = std::fs::read_to_string(data.join("admin-token"))
            .unwrap()
            .trim()
            .to_owned();
        Server { child, url, token }
    }

    fn admin(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--server", &self.url, "--token", &self.token]);
        ok(&mlcapsule(&all)).trim().to_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One client: a state directory on the shared platform.
struct Client {
    flags: Vec<String>,
    licence_id: String,
}

impl Client {
    fn setup(dir: &Path, name: &str, capsule: &Path, server: &Server, model: &str) -> Client {
        let token = server.admin(&["license", "create", "--model", model, "--queries", "1000"]);
        let licence_id = token.split('.').nth(1).unwrap().to_owned();
        let flags = vec![
            "--state".into(),
            dir.join(name).display().to_string(),
            "--platform".into(),
            dir.join("platform").display().to_string(),
        ];
        let mut args = vec![
            "setup".to_string(),
            capsule.display().to_string(),
            "--server".into(),
            server.url.clone(),
            "--license".into(),
            token,
        ];
        args.extend(flags.clone());
        ok(&mlcapsule(&args));
        Client { flags, licence_id }
    }

    fn run(&self, capsule: &Path, inputs: &[&Path], extra: &[&str]) -> Output {
        let mut args = vec!["run".to_string(), capsule.display().to_string()];
        args.extend(inputs.iter().map(|p| p.display().to_string()));
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.flags.clone());
        mlcapsule(&args)
    }

    fn status(&self) -> serde_json::Value {
        let mut args = vec!["status".to_string(), "--json".into()];
        args.extend(self.flags.clone());
        let all: serde_json::Value = serde_json::from_str(&ok(&mlcapsule(&args))).unwrap();
        all[0]["status"].clone()
    }

    fn topup(&self) -> String {
        let mut args = vec!["topup".to_string()];
        args.extend(self.flags.clone());
        ok(&mlcapsule(&args))
    }

    fn defense_file(&self) -> PathBuf {
        let state = PathBuf::from(&self.flags[1]);
        let folder = std::fs::read_dir(&state).unwrap().next().unwrap().unwrap();
        folder.path().join("defense.sealed")
    }
}

#[test]
fn defenses_answer_benign_clients_and_stop_attacks_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let capsule = d.join("m.capsule");
    let key = d.join("m.key");
    std::fs::write(d.join("policy.toml"), POLICY).unwrap();
    write_mean_detector(&d.join("detector"));
    let sealed = ok(&mlcapsule(&[
        "seal",
        repo().join("models/mnist-cnn.onnx").to_str().unwrap(),
        "-o",
        capsule.to_str().unwrap(),
        "--key-out",
        key.to_str().unwrap(),
        "--preset",
        "mnist",
        "--policy",
        d.join("policy.toml").to_str().unwrap(),
        "--detector",
        d.join("detector").to_str().unwrap(),
    ]));
    assert!(sealed.contains("input detector"), "{sealed}");
    let shown = ok(&mlcapsule(&["inspect", capsule.to_str().unwrap()]));
    for needle in [
        "noise     c = 0.5",
        "rounded to 4 decimals",
        "W < 0.9: refuse that query and every later one",
        "detector  refuse when",
        "sees input x 0.3081 + 0.1307",
        "detector/score",
    ] {
        assert!(shown.contains(needle), "'{needle}' not in:\n{shown}");
    }

    let server = Server::start(&d.join("server"));
    let model = server.admin(&[
        "model",
        "add",
        capsule.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    let benign = Client::setup(d, "benign", &capsule, &server, &model);
    let attacker = Client::setup(d, "attacker", &capsule, &server, &model);

    // A benign client: 200 real digits in batches of 20, all answered. The released
    // posteriors are noised and rounded in the enclave, the labels are the model's own.
    let digits = real_digits();
    let mut before_last = None;
    for (i, rows) in digits.chunks(20).enumerate() {
        let batch = d.join(format!("benign-{i}.npy"));
        write_batch(&batch, rows);
        if i == 9 {
            before_last = Some(std::fs::read(benign.defense_file()).unwrap());
        }
        let released = d.join("released.npy");
        ok(&benign.run(
            &capsule,
            &[&batch],
            &["--output", released.to_str().unwrap()],
        ));
        if i == 0 {
            let raw = d.join("raw.npy");
            ok(&mlcapsule(&[
                "run",
                capsule.to_str().unwrap(),
                batch.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                "--output",
                raw.to_str().unwrap(),
            ]));
            let released = read_npy(&std::fs::read(&released).unwrap()).unwrap();
            let raw = read_npy(&std::fs::read(&raw).unwrap()).unwrap();
            assert_ne!(released.data(), raw.data(), "the enclave noised the output");
            for (out, model) in released.data().chunks(10).zip(raw.data().chunks(10)) {
                assert_eq!(capsule_defense::argmax(out), capsule_defense::argmax(model));
                let rounded =
                    |v: &f32| (f64::from(*v) * 1e4 - (f64::from(*v) * 1e4).round()).abs() < 1e-3;
                assert!(out.iter().all(rounded), "{out:?}");
            }
        }
    }
    let status = benign.status();
    let prada = &status["defense"]["prada"];
    assert_eq!(prada["observed"], 200, "{status}");
    assert_eq!(prada["alarms"], 0, "no alarm on real digits: {status}");
    assert!(
        prada["last_test"]["w"].is_string(),
        "PRADA did test: {status}"
    );

    // A query the detector flags: refused, counted, recorded; the model never ran.
    let crafted = d.join("crafted.npy");
    write_batch(&crafted, &[vec![normalise(0.9); 784]]);
    let refused = benign.run(&capsule, &[&crafted], &[]);
    fails_with(
        &refused,
        &["provider's policy refused", "input detector", "counted"],
    );
    let status = benign.status();
    assert_eq!(status["used"], 201);
    assert_eq!(status["defense"]["detector_refusals"], 1);

    // An older defense state is refused until a top-up resynchronises it; the server
    // hears of the unobserved queries.
    let current = std::fs::read(benign.defense_file()).unwrap();
    std::fs::write(benign.defense_file(), before_last.unwrap()).unwrap();
    let stale = benign.run(&capsule, &[&d.join("benign-0.npy")], &[]);
    fails_with(&stale, &["21 queries behind", "mlcapsule topup"]);
    let topped = benign.topup();
    assert!(topped.contains("resynchronised"), "{topped}");
    // The restored state never saw the last batch: sent again, it looks as natural as it
    // did the first time (the first batch would be flagged: repeated queries sit at
    // distance 0 from their stored copies).
    ok(&benign.run(&capsule, &[&d.join("benign-9.npy")], &[]));
    let shown: serde_json::Value =
        serde_json::from_str(&server.admin(&["license", "show", &benign.licence_id])).unwrap();
    let reported = &shown["last_reported_detections"];
    assert_eq!(reported["unobserved_queries"], 21, "{shown}");
    assert_eq!(reported["detector_refusals"], 1, "{shown}");
    assert_ne!(current, std::fs::read(benign.defense_file()).unwrap());

    // The attacker: a Jacobian-style stream from ten real seeds, ten queries a run, until
    // PRADA stops it.
    let attack = jacobian_like(&digits[..10], 400);
    let mut answered = 0;
    let mut stopped = None;
    for (i, rows) in attack.chunks(10).enumerate() {
        let batch = d.join(format!("attack-{i}.npy"));
        write_batch(&batch, rows);
        let out = attacker.run(&capsule, &[&batch], &[]);
        if out.status.success() {
            answered += rows.len();
        } else {
            stopped = Some(out);
            break;
        }
    }
    let stopped = stopped.expect("PRADA stops the extraction");
    fails_with(
        &stopped,
        &[
            "provider's policy refused",
            "PRADA",
            "model-extraction attack",
        ],
    );
    assert!(answered < 300, "stopped after {answered} answered queries");
    let used = attacker.status()["used"].clone();
    let again = attacker.run(&capsule, &[&d.join("benign-0.npy")], &[]);
    fails_with(&again, &["refuses every query", "nothing was counted"]);
    let status = attacker.status();
    assert_eq!(status["used"], used);
    assert_eq!(status["defense"]["prada"]["denying"], true);
    attacker.topup();
    let shown: serde_json::Value =
        serde_json::from_str(&server.admin(&["license", "show", &attacker.licence_id])).unwrap();
    let reported = &shown["last_reported_detections"];
    assert_eq!(reported["prada_alarms"], 1, "{shown}");
    assert_eq!(reported["prada_denying"], true, "{shown}");
    eprintln!(
        "PRADA stopped the attack after {answered} answered queries: {}",
        reported["first_alarm"]
    );

    // A client who edits the policy in the capsule (valid JSON, same length) is refused:
    // the header MAC covers it.
    let mut edited = std::fs::read(&capsule).unwrap();
    let at = edited
        .windows(11)
        .position(|w| w == b"\"delta\":0.9")
        .expect("the policy is in the header");
    edited[at + 10] = b'1';
    let edited_path = d.join("edited.capsule");
    std::fs::write(&edited_path, &edited).unwrap();
    let inspected = ok(&mlcapsule(&["inspect", edited_path.to_str().unwrap()]));
    assert!(inspected.contains("W < 0.1"), "{inspected}");
    let refused = benign.run(&edited_path, &[&d.join("benign-0.npy")], &[]);
    fails_with(&refused, &["header", "modified after sealing"]);
}

#[test]
fn seal_checks_the_policy_against_the_model_and_the_detector() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_mean_detector(&d.join("detector"));
    let seal = |policy: &str, detector: bool| {
        std::fs::write(d.join("policy.toml"), policy).unwrap();
        let mut args = vec![
            "seal".to_string(),
            repo().join("models/mnist-cnn.onnx").display().to_string(),
            "-o".into(),
            d.join("m.capsule").display().to_string(),
            "--force".into(),
            "--preset".into(),
            "mnist".into(),
            "--policy".into(),
            d.join("policy.toml").display().to_string(),
        ];
        if detector {
            args.extend([
                "--detector".into(),
                d.join("detector").display().to_string(),
            ]);
        }
        mlcapsule(&args)
    };
    fails_with(
        &seal("[noise]\nc = 0.5\nprior = [0.5, 0.5]\n", false),
        &["noise.prior has 2 classes but 10 were expected"],
    );
    fails_with(&seal("[output]\ntop_k = 11\n", false), &["output.top_k"]);
    fails_with(
        &seal("[noise]\nstrength = 0.5\n", false),
        &["line 2, column 1", "unknown field `strength`"],
    );
    fails_with(
        &seal("[detector]\nthreshold = 0.5\n", false),
        &["needs the detector network", "--detector DIR"],
    );
    fails_with(
        &seal("[output]\nround = 2\n", true),
        &["--detector needs a --policy with a [detector] table"],
    );
    std::fs::remove_file(d.join("detector/b.npy")).unwrap();
    fails_with(
        &seal("[detector]\nscores = \"logits\"\n", true),
        &["cannot read the detector's weight", "b.npy"],
    );
    ok(&seal("", false));
    let shown = ok(&mlcapsule(&[
        "inspect",
        d.join("m.capsule").to_str().unwrap(),
    ]));
    assert!(shown.contains("defenses     none"), "{shown}");
}
