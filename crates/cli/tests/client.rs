//! End-to-end tests of the provider and client commands: a real server
//! process on loopback, a real enclave process, real files.
//!
//! They need `mlcapsule-enclave` beside `mlcapsule` (built by `cargo test --workspace`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_mlcapsule"));
    let enclave = exe.with_file_name("mlcapsule-enclave");
    assert!(
        enclave.exists(),
        "{} is missing: run the tests with 'cargo test --workspace'",
        enclave.display()
    );
    exe
}

/// A client's directories plus the server's, all in one temporary directory.
struct World {
    dir: tempfile::TempDir,
    capsule: PathBuf,
    key: PathBuf,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let capsule = dir.path().join("m.capsule");
        let key = dir.path().join("m.key");
        let out = run(&[
            "seal",
            repo().join("models/mnist-cnn.onnx").to_str().unwrap(),
            "-o",
            capsule.to_str().unwrap(),
            "--key-out",
            key.to_str().unwrap(),
            "--preset",
            "mnist",
        ]);
        assert!(out.status.success());
        World { dir, capsule, key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Client flags: state and platform directories.
    fn client(&self, state: &str) -> Vec<String> {
        vec![
            "--state".into(),
            self.path(state).display().to_string(),
            "--platform".into(),
            self.path("platform").display().to_string(),
        ]
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn run_owned(args: &[String]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .trim()
        .to_owned()
}

/// A clean failure: exit code 1, last stderr line an `error:` mentioning `needle`.
fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: "), "{stderr}");
    assert!(
        last.to_lowercase().contains(&needle.to_lowercase()),
        "'{needle}' not in: {stderr}"
    );
}

/// `mlcapsule server` on a free loopback port.
struct Server {
    child: Child,
    url: String,
    token: String,
}

impl Server {
    fn start(data: &Path) -> Server {
        Server::start_with(data, &[])
    }

    fn start_with(data: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(bin())
            .args(["server", "--listen", "127.0.0.1:0", "--allow-sim", "--data"])
            .arg(data)
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(url) = line.split("listening on ").nth(1) {
                break url.trim().to_owned();
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let token = std::fs::read_to_string(data.join("admin-token"))
            .unwrap()
            .trim()
            .to_owned();
        Server { child, url, token }
    }

    fn admin(&self, args: &[&str]) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend([
            "--server".into(),
            self.url.clone(),
            "--token".into(),
            self.token.clone(),
        ]);
        run_owned(&all)
    }

    /// Registers the world's capsule and creates a licence; returns the licence token.
    fn licence(&self, world: &World, queries: u64) -> String {
        let model = stdout(&self.admin(&[
            "model",
            "add",
            world.capsule.to_str().unwrap(),
            "--key",
            world.key.to_str().unwrap(),
        ]));
        assert_eq!(model.len(), 32, "model add prints only the id: {model}");
        let token = stdout(&self.admin(&[
            "license",
            "create",
            "--model",
            &model,
            "--queries",
            &queries.to_string(),
        ]));
        assert!(
            token.starts_with("mlc-licence-v1."),
            "license create prints only the token: {token}"
        );
        token
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn setup(world: &World, server: &str, token: &str, state: &str) -> Output {
    let mut args = vec![
        "setup".to_string(),
        world.capsule.display().to_string(),
        "--server".into(),
        server.to_owned(),
        "--license".into(),
        token.to_owned(),
    ];
    args.extend(world.client(state));
    run_owned(&args)
}

fn classify(world: &World, state: &str) -> Output {
    let mut args = vec![
        "run".to_string(),
        world.capsule.display().to_string(),
        repo()
            .join("models/samples/digit-7-0.png")
            .display()
            .to_string(),
        "--json".into(),
    ];
    args.extend(world.client(state));
    run_owned(&args)
}

fn status(world: &World, state: &str) -> serde_json::Value {
    let mut args = vec!["status".to_string(), "--json".into()];
    args.extend(world.client(state));
    serde_json::from_str(&stdout(&run_owned(&args))).unwrap()
}

#[test]
fn licence_runs_offline_exactly_its_budget_then_tops_up() {
    let world = World::new();
    let server = Server::start(&world.path("server"));
    let token = server.licence(&world, 3);
    let out = setup(&world, &server.url, &token, "state");
    stdout(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("NO hardware isolation"));
    let url = server.url.clone();
    drop(server); // offline from here

    for _ in 0..3 {
        let out = classify(&world, "state");
        let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(report[0]["top"][0]["class"], 7);
        assert!(String::from_utf8_lossy(&out.stderr).contains("NO hardware isolation"));
    }
    let out = classify(&world, "state");
    fails_with(&out, "3 of 3 queries used");
    fails_with(&out, "topup");
    assert!(
        out.stdout.is_empty(),
        "an exhausted budget must release no output"
    );
    let s = status(&world, "state");
    assert_eq!(
        (
            s[0]["status"]["used"].as_u64(),
            s[0]["status"]["left"].as_u64()
        ),
        (Some(3), Some(0))
    );

    // Top-up needs the server: a clear error while it is down.
    let mut args = vec!["topup".to_string(), "--server".into(), url];
    args.extend(world.client("state"));
    fails_with(&run_owned(&args), "cannot reach the provisioning server");

    let server = Server::start(&world.path("server"));
    let id = token.split('.').nth(1).unwrap();
    stdout(&server.admin(&["license", "grant", id, "--queries", "2"]));
    let mut args = vec!["topup".to_string(), "--server".into(), server.url.clone()];
    args.extend(world.client("state"));
    assert!(stdout(&run_owned(&args)).contains("2 left"));
    stdout(&classify(&world, "state"));
    let s = status(&world, "state");
    assert_eq!(
        (
            s[0]["status"]["used"].as_u64(),
            s[0]["status"]["total"].as_u64()
        ),
        (Some(4), Some(5))
    );
}

#[test]
fn a_memory_budget_runs_the_same_and_one_too_small_is_refused_uncounted() {
    let world = World::new();
    let server = Server::start(&world.path("server"));
    let token = server.licence(&world, 5);
    stdout(&setup(&world, &server.url, &token, "state"));
    drop(server);

    let classify_with = |budget: Option<&str>| {
        let mut args = vec![
            "run".to_string(),
            world.capsule.display().to_string(),
            repo()
                .join("models/samples/digit-7-0.png")
                .display()
                .to_string(),
            "--json".into(),
        ];
        if let Some(budget) = budget {
            args.extend(["--memory-budget".to_string(), budget.to_string()]);
        }
        args.extend(world.client("state"));
        run_owned(&args)
    };
    let unbudgeted = classify_with(None);
    let plain = stdout(&unbudgeted);
    let stderr = String::from_utf8_lossy(&unbudgeted.stderr);
    assert!(
        stderr.contains("no weight memory budget: enclave peak resident memory"),
        "{stderr}"
    );
    let out = classify_with(Some("8MiB"));
    assert_eq!(
        stdout(&out),
        plain,
        "the budget changes nothing in the answer"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("weight memory budget 8.0 MiB: enclave peak resident memory"),
        "{stderr}"
    );

    let out = classify_with(Some("1000"));
    fails_with(&out, "raise --memory-budget to at least");
    fails_with(&out, "needs");
    let s = status(&world, "state");
    assert_eq!(
        s[0]["status"]["used"].as_u64(),
        Some(2),
        "the refusal is not counted"
    );
}

#[test]
fn wrong_and_reused_licence_tokens_are_refused() {
    let world = World::new();
    let server = Server::start(&world.path("server"));
    let token = server.licence(&world, 3);
    let forged = format!("{}x", &token[..token.len() - 1]);
    fails_with(&setup(&world, &server.url, &forged, "a"), "unknown_licence");
    stdout(&setup(&world, &server.url, &token, "a"));
    // A fresh state directory (a fresh enclave instance) gets nothing.
    fails_with(
        &setup(&world, &server.url, &token, "b"),
        "licence_already_provisioned",
    );
    // The same state directory refuses a second setup locally.
    fails_with(&setup(&world, &server.url, &token, "a"), "already set up");
}

#[test]
fn server_down_during_setup_is_a_clear_error_and_retry_works() {
    let world = World::new();
    let server = Server::start(&world.path("server"));
    let token = server.licence(&world, 2);
    let url = server.url.clone();
    drop(server);
    fails_with(
        &setup(&world, &url, &token, "state"),
        "cannot reach the provisioning server",
    );
    let server = Server::start(&world.path("server"));
    stdout(&setup(&world, &server.url, &token, "state"));
    stdout(&classify(&world, "state"));
}

#[test]
fn restoring_an_older_state_directory_restores_no_queries() {
    let world = World::new();
    let server = Server::start(&world.path("server"));
    let token = server.licence(&world, 2);
    stdout(&setup(&world, &server.url, &token, "state"));
    let backup = world.path("backup");
    copy_dir(&world.path("state"), &backup);
    stdout(&classify(&world, "state"));
    stdout(&classify(&world, "state"));
    fails_with(&classify(&world, "state"), "budget exhausted");
    std::fs::remove_dir_all(world.path("state")).unwrap();
    copy_dir(&backup, &world.path("state"));
    fails_with(&classify(&world, "state"), "2 of 2 queries used");
}

#[test]
fn tampered_state_and_state_on_another_platform_are_refused() {
    let world = World::new();
    let server = Server::start(&world.path("server"));
    let token = server.licence(&world, 2);
    stdout(&setup(&world, &server.url, &token, "state"));
    let ledger = std::fs::read_dir(world.path("state"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("ledger.sealed");
    let good = std::fs::read(&ledger).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&ledger, &bad).unwrap();
    fails_with(&classify(&world, "state"), "does not open");
    std::fs::write(&ledger, &good).unwrap();
    stdout(&classify(&world, "state"));

    // The same state on another machine: another platform directory.
    let args = vec![
        "run".to_string(),
        world.capsule.display().to_string(),
        repo()
            .join("models/samples/digit-7-0.png")
            .display()
            .to_string(),
        "--state".into(),
        world.path("state").display().to_string(),
        "--platform".into(),
        world.path("other-platform").display().to_string(),
    ];
    let out = run_owned(&args);
    fails_with(&out, "no counter on this platform");
    assert!(out.stdout.is_empty());
}

#[test]
fn unlisted_enclave_measurement_is_refused() {
    let world = World::new();
    // A server that accepts only some other build of the enclave. It still
    // allows its sibling binary by default, so point it at a fake sibling.
    let dir = world.path("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("mlcapsule");
    std::fs::copy(bin(), &fake).unwrap();
    std::fs::write(dir.join("mlcapsule-enclave"), b"another build").unwrap();
    // Another test's child, forked while `copy` held the new file open for
    // writing, keeps that descriptor until it execs: until then Linux refuses
    // to run the file ("Text file busy"). That lasts microseconds; try again.
    let mut tries = 0;
    let mut child = loop {
        let spawned = Command::new(&fake)
            .args(["server", "--listen", "127.0.0.1:0", "--allow-sim", "--data"])
            .arg(world.path("server"))
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break other.unwrap(),
        }
    };
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let server = Server {
        child,
        url,
        token: std::fs::read_to_string(world.path("server/admin-token"))
            .unwrap()
            .trim()
            .to_owned(),
    };
    let token = server.licence(&world, 2);
    fails_with(
        &setup(&world, &server.url, &token, "state"),
        "measurement_not_allowed",
    );
}

/// SIGKILL the host (`mlcapsule run`, and with it the pipe to its enclave) at
/// random moments: the outputs that reach the user never outnumber the
/// queries counted.
#[test]
fn killing_the_host_never_yields_uncounted_outputs() {
    let world = World::new();
    let server = Server::start(&world.path("server"));
    let token = server.licence(&world, 1000);
    stdout(&setup(&world, &server.url, &token, "state"));
    drop(server);
    let mut released = 0u64;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..25 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut args = vec![
            "run".to_string(),
            world.capsule.display().to_string(),
            repo()
                .join("models/samples/digit-7-0.png")
                .display()
                .to_string(),
            "--json".into(),
        ];
        args.extend(world.client("state"));
        let mut child = Command::new(bin())
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(seed % 40_000));
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("\"top\"") {
            released += 1;
        }
    }
    // A killed host's enclave finishes its query (and exits on the closed pipe) on its
    // own; until then the counter is locked, and `status` says so: wait, as it asks.
    let mut args = vec!["status".to_string(), "--json".into()];
    args.extend(world.client("state"));
    let mut out = run_owned(&args);
    for _ in 0..100 {
        if out.status.success()
            || !String::from_utf8_lossy(&out.stderr).contains("held by another enclave process")
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        out = run_owned(&args);
    }
    let status: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let used = status[0]["status"]["used"].as_u64().unwrap();
    assert!(
        released <= used,
        "{released} outputs released but only {used} queries counted"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
