//! CI's smoke run of `mlcapsule bench`: the smallest case, JSON lines with
//! the keys other tools read. Timings are not checked: benchmarks are not
//! tests.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn run_bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mlcapsule"))
        .arg("bench")
        .args(args)
        .output()
        .expect("the mlcapsule binary runs")
}

/// The JSON lines of a run that must succeed.
fn bench(args: &[&str]) -> Vec<serde_json::Value> {
    let out = run_bench(args);
    assert!(
        out.status.success(),
        "mlcapsule bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

#[test]
fn reports_name_the_machine_and_the_kernels_instruction_set() {
    let out = run_bench(&["--quick", "--only", "dense", "--mode", "plain"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("note: machine: "))
        .unwrap_or_else(|| panic!("no machine line in:\n{text}"));
    assert!(line.contains(" core(s)"), "{line}");
    assert!(line.contains("; engine kernels: "), "{line}");
    // The last-level cache, where the CPU declares one (it sets the zeroing of
    // spent weights, so streaming figures depend on it).
    if let Some(bytes) = capsule_engine::last_level_cache() {
        let cache = format!(", {} MiB of last-level cache;", bytes >> 20);
        assert!(line.contains(&cache), "{line}");
    }
    // With --json the note goes to stderr, so that stdout stays JSON lines.
    let json = run_bench(&["--quick", "--json", "--only", "dense", "--mode", "plain"]);
    assert!(String::from_utf8_lossy(&json.stderr).contains("note: machine: "));
}

#[test]
fn runs_at_two_threads_note_the_core_to_core_round_trip_before_and_after() {
    let round_trips = |threads: &str| -> Vec<f64> {
        let args = [
            "--quick",
            "--only",
            "dense",
            "--mode",
            "plain",
            "--threads",
            threads,
        ];
        let out = run_bench(&args);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("note: core-to-core round trip "))
            .map(|rest| {
                let ns = rest.split_once(": ").and_then(|(_, r)| r.split_once(" ns"));
                ns.and_then(|(ns, _)| ns.parse().ok())
                    .unwrap_or_else(|| panic!("no figure in {rest:?}"))
            })
            .collect()
    };
    assert!(round_trips("1").is_empty(), "one thread shares nothing");
    if std::thread::available_parallelism().map_or(1, usize::from) >= 2 {
        let trips = round_trips("2");
        assert_eq!(trips.len(), 2, "one before the cases, one after");
        assert!(trips.iter().all(|&ns| ns > 0.0), "{trips:?}");
    }
}

/// The error of a run that must fail before it times anything.
fn bench_error(args: &[&str]) -> String {
    let out = run_bench(args);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "nothing was timed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn quick_json_has_every_mode_and_key() {
    let all = bench(&["--quick", "--json"]);
    let (defenses, lines): (Vec<_>, Vec<_>) = all.into_iter().partition(|l| l["mode"] == "enclave");
    let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["plain", "sealed-streaming", "sealed-cached"]);
    for line in &lines {
        assert_eq!(line["case"], "dense 256x256");
        assert_eq!(line["batch"], 1);
        assert!(line["threads"].as_u64().unwrap() >= 1);
        let (min, median, max) = (
            line["min_ms"].as_f64().unwrap(),
            line["median_ms"].as_f64().unwrap(),
            line["max_ms"].as_f64().unwrap(),
        );
        assert!(0.0 <= min && min <= median && median <= max, "{line}");
    }
    assert!(lines[1]["aes_bound_ms"].as_f64().unwrap() > 0.0);
    // Opening the layer once, measured: the whole streaming query takes at least that.
    let open_ms = lines[1]["open_ms"].as_f64().unwrap();
    assert!(
        0.0 < open_ms && open_ms <= lines[1]["max_ms"].as_f64().unwrap(),
        "{}",
        lines[1]
    );
    assert!(lines[1]["ratio_to_plain"].as_f64().unwrap() > 0.0);
    // The sealed modes name their cipher, the default one unless --aead says otherwise.
    assert_eq!(lines[0].get("aead"), None);
    for line in &lines[1..] {
        assert_eq!(line["aead"], "aegis-256x4", "{line}");
    }

    // The defenses' costs inside the enclave, each beside its floor.
    let cases: Vec<&str> = defenses
        .iter()
        .map(|l| l["case"].as_str().unwrap())
        .collect();
    assert_eq!(
        cases,
        [
            "defense detector (kennen-io size)",
            "defense prada",
            "defense noising + output policies",
            "defense seal defense state"
        ]
    );
    for line in &defenses {
        assert!(line["median_ms"].as_f64().unwrap() > 0.0, "{line}");
    }
    assert_eq!(defenses[1]["stored"], 100);
    assert!(defenses[3]["state_bytes"].as_u64().unwrap() > 100 * 784 / 2);
    for line in &defenses[..3] {
        assert!(line["floor_ms"].as_f64().is_some(), "{line}");
    }
}

#[test]
fn the_sealed_modes_take_the_cipher_asked_for() {
    let lines = bench(&["--quick", "--json", "--aead", "aes-256-gcm"]);
    let sealed: Vec<_> = lines
        .iter()
        .filter(|l| l["mode"].as_str().unwrap().starts_with("sealed-"))
        .collect();
    assert_eq!(sealed.len(), 2);
    for line in sealed {
        assert_eq!(line["aead"], "aes-256-gcm", "{line}");
    }
}

#[test]
fn the_modes_asked_for_and_no_others() {
    // The defenses' lines (mode "enclave") are not the case's.
    let case = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut lines = bench(args);
        lines.retain(|l| l["mode"] != "enclave");
        lines
    };
    let lines = case(&[
        "--quick",
        "--json",
        "--mode",
        "sealed-cached,plain,sealed-cached",
    ]);
    let modes: Vec<&str> = lines.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    // Each once, in the order given.
    assert_eq!(modes, ["sealed-cached", "plain"]);
    assert!(lines[0]["ratio_to_plain"].as_f64().unwrap() > 0.0);
    // Without plain there is nothing to divide by.
    let alone = case(&["--quick", "--json", "--mode", "sealed-streaming"]);
    let modes: Vec<&str> = alone.iter().map(|l| l["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["sealed-streaming"]);
    assert_eq!(alone[0].get("ratio_to_plain"), None);
    assert!(alone[0]["open_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn more_threads_than_cores_is_timed_with_a_warning() {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let more = (cores + 1).to_string();
    let out = run_bench(&["--quick", "--json", "--mode", "plain", "--threads", &more]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "warning: {more} threads on a machine with {cores} core"
        )),
        "{stderr}"
    );
    let within = run_bench(&["--quick", "--json", "--mode", "plain", "--threads", "1"]);
    assert!(!String::from_utf8_lossy(&within.stderr).contains("warning"));
}

#[test]
fn defenses_alone() {
    let lines = bench(&["--defenses-only", "--quick", "--json"]);
    assert_eq!(lines.len(), 4);
    assert!(lines.iter().all(|l| l["mode"] == "enclave"), "{lines:?}");
}

#[test]
fn a_user_model_in_plain_mode_only() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/mnist-cnn.onnx");
    let lines = bench(&[
        "--model",
        model,
        "--threads",
        "1",
        "--batch",
        "2",
        "--runs",
        "2",
        "--plain-only",
        "--json",
    ]);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["case"], "mnist-cnn");
    assert_eq!(lines[0]["mode"], "plain");
    assert_eq!(lines[0]["threads"], 1);
    assert_eq!(lines[0]["batch"], 2);
}

#[test]
fn an_only_that_matches_nothing_is_an_error_that_lists_the_cases() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/mnist-cnn.onnx");
    let err = bench_error(&["--model", model, "--only", "resnet", "--json"]);
    assert!(
        err.contains("--only \"resnet\" matches no case") && err.contains("mnist-cnn.onnx"),
        "{err}"
    );
}

#[test]
fn a_model_that_cannot_be_read_fails_before_the_machine_notes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.onnx");
    for path in [missing.as_path(), dir.path()] {
        let err = bench_error(&["--model", path.to_str().unwrap()]);
        assert!(
            err.starts_with(&format!("error: cannot read {}", path.display())),
            "{err}"
        );
        assert!(!err.contains("note:"), "{err}");
    }
}

#[test]
fn a_batch_size_a_model_does_not_take_is_an_error_that_says_which_it_takes() {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fixed-batch.onnx"
    );
    let args = |batch| {
        [
            "--model",
            model,
            "--batch",
            batch,
            "--runs",
            "2",
            "--plain-only",
            "--json",
        ]
    };
    let err = bench_error(&args("1,8"));
    assert!(
        err.contains("fixed batch size of 1: run it with --batch 1") && err.contains("--batch 8"),
        "{err}"
    );
    assert_eq!(bench(&args("1")).len(), 1);
}

#[test]
fn a_profile_has_one_line_per_node_slowest_first() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/mnist-cnn.onnx");
    let args = [
        "--model",
        model,
        "--threads",
        "1",
        "--runs",
        "3",
        "--profile",
    ];
    let lines = bench(&[&args[..], &["--json"]].concat());
    let graph = capsule_onnx::import(&std::fs::read(model).unwrap())
        .unwrap()
        .graph;
    assert_eq!(lines.len(), graph.nodes.len());
    let mut names: Vec<&str> = lines.iter().map(|l| l["node"].as_str().unwrap()).collect();
    let times: Vec<f64> = lines
        .iter()
        .map(|l| l["median_ms"].as_f64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    assert!(times.iter().all(|&t| t >= 0.0));
    for line in &lines {
        assert_eq!(
            (line["case"].as_str(), line["threads"].as_u64()),
            (Some("mnist-cnn"), Some(1))
        );
        assert!(line["op"].is_string(), "{line}");
    }
    names.sort_unstable();
    let mut want: Vec<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    want.sort_unstable();
    assert_eq!(names, want);
}

/// A reader that stops early (`mlcapsule bench --json | head -1`) ends the run
/// quietly, not with a panic about the closed pipe.
#[test]
fn a_closed_stdout_ends_the_run_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mlcapsule"))
        .args(["bench", "--quick", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the mlcapsule binary runs");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with('{'), "{first}");
    // The reader is dropped: the next line written fails with a broken pipe.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
