//! `mlcapsule demo`: the whole story on loopback, in a temporary directory.
//!
//! Provider: seal the bundled MNIST model with a defense policy (noised,
//! rounded posteriors; PRADA), start the provisioning server (SQLite), register
//! the model, sell a 5-query licence. Client: set up once online, stop the
//! server, classify digits offline until the budget runs out. Provider grants
//! more; client tops up. Then three attacks are refused.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use capsule_format::{Capsule, ModelKey};
use clap::Args;
use serde_json::{Value, json};

use crate::api::Api;
use crate::client::{self, ClientDirs};
use crate::{run, seal, serve};

/// Options of `mlcapsule demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Where the bundled model lives (default: the source tree's `models/`).
    #[arg(long, value_name = "DIR")]
    models: Option<PathBuf>,
    /// Keep the temporary directory (capsule, server data, client state) for a look.
    #[arg(long)]
    keep: bool,
}

/// A provisioning server on a loopback port, on its own thread.
struct LocalServer {
    url: String,
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl LocalServer {
    fn start(data: &Path) -> anyhow::Result<LocalServer> {
        let allowed = serve::allowed_measurements(&[])?;
        anyhow::ensure!(
            !allowed.is_empty(),
            "the enclave binary {} is missing; build it with 'cargo build --release --workspace'",
            capsule_enclave::default_enclave_binary().display()
        );
        let config = capsule_server::ServerConfig {
            data_dir: data.to_owned(),
            allow_sim: true,
            allowed_measurements: allowed,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let started = async {
                    let state = capsule_server::open(config).await?;
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let addr = listener.local_addr()?;
                    anyhow::Ok((state, listener, addr))
                }
                .await;
                let (state, listener, addr) = match started {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(addr));
                capsule_server::serve(state, listener, async {
                    let _ = stopped.await;
                })
                .await?;
                Ok(())
            })
        });
        let addr = ready_rx
            .recv()
            .context("the server thread ended before it started")?
            .map_err(|e| anyhow::anyhow!("the provisioning server did not start: {e}"))?;
        let token = std::fs::read_to_string(data.join(capsule_server::ADMIN_TOKEN_FILE))?;
        Ok(LocalServer {
            url: format!("http://{addr}"),
            token: token.trim().to_owned(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn admin(&self) -> Api {
        Api::new(&self.url, Some(self.token.clone()))
    }

    fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
        }
        Ok(())
    }
}

/// The demo capsule's defenses (spec/policy.md): noised (MLCapsule Algorithm 1) and
/// rounded posteriors, and PRADA recording alarms.
const DEMO_POLICY: &str = "\
[noise]
c = 0.5

[output]
round = 3

[prada]
delta = 0.9
action = \"record\"
";

fn step(text: &str) {
    println!("\n== {text}");
}

/// Runs `mlcapsule demo`.
pub fn main(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let models = args
        .models
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models")));
    let models = models.canonicalize().unwrap_or(models);
    let onnx = models.join("mnist-cnn.onnx");
    anyhow::ensure!(
        onnx.exists(),
        "the bundled model {} is missing; run from a checkout of MLCapsule or pass --models DIR",
        onnx.display()
    );
    let dir = tempfile::Builder::new()
        .prefix("mlcapsule-demo-")
        .tempdir()?;
    let root = dir.path();
    let capsule = root.join("mnist-cnn.capsule");
    let key = root.join("mnist-cnn.key");
    let dirs = ClientDirs {
        state: Some(root.join("client-state")),
        platform: Some(root.join("sim-platform")),
    };

    step("provider: seal the bundled MNIST model, with its defense policy");
    let policy = root.join("policy.toml");
    std::fs::write(&policy, DEMO_POLICY)?;
    seal::main(seal::SealArgs::for_demo(onnx, capsule.clone(), key.clone()).with_policy(policy))?;

    step("provider: start the provisioning server (SQLite, loopback, accepting the sim platform)");
    let server = LocalServer::start(&root.join("server"))?;
    println!("listening on {}", server.url);

    step("provider: register the model and sell a 5-query licence");
    let bytes = std::fs::read(&capsule)?;
    let parsed = Capsule::parse(&bytes)?;
    let model_key = ModelKey::from_key_file(&std::fs::read_to_string(&key)?)?;
    let added: Value = server.admin().post(
        "/v1/models",
        &json!({
            "capsule_id": hex::encode(parsed.header().capsule_id),
            "name": "mnist-cnn",
            "model_key": hex::encode(model_key.expose()),
            "max_queries": null,
            "expires": null,
        }),
    )?;
    let model_id = added["model_id"].as_str().unwrap_or_default().to_owned();
    let licence: Value = server.admin().post(
        "/v1/licences",
        &json!({"model_id": model_id, "queries": 5, "expires": null}),
    )?;
    let token = licence["token"].as_str().unwrap_or_default().to_owned();
    let licence_id = licence["licence_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!("model {model_id}, licence {licence_id} (5 queries)");

    step("client: set up once, online: the enclave is attested and receives the licence");
    client::setup(client::SetupArgs::for_demo(
        capsule.clone(),
        server.url.clone(),
        token.clone(),
        dirs.clone(),
    ))?;

    step("the server stops: from here on the client is offline");
    let server_dir = root.join("server");
    server.stop()?;

    step("client: classify sample digits until the budget runs out");
    let mut samples: Vec<PathBuf> = std::fs::read_dir(models.join("samples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    samples.sort();
    for sample in samples.iter().take(6) {
        if let Err(e) = run::main(run::RunArgs::for_demo(
            capsule.clone(),
            vec![sample.clone()],
            dirs.clone(),
        )) {
            println!("refused: {}", crate::one_line(&e));
        }
    }

    step("provider grants 3 more queries; client tops up (online) and goes on");
    let server = LocalServer::start(&server_dir)?;
    server.admin().post::<_, Value>(
        &format!("/v1/licences/{licence_id}/grant"),
        &json!({"queries": 3}),
    )?;
    client::topup(client::TopupArgs::for_demo(
        server.url.clone(),
        dirs.clone(),
    ))?;
    for sample in samples.iter().skip(6).take(2) {
        run::main(run::RunArgs::for_demo(
            capsule.clone(),
            vec![sample.clone()],
            dirs.clone(),
        ))?;
    }

    step("attack: a tampered capsule is refused, and the failed query is not counted");
    let mut tampered = bytes.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let tampered_path = root.join("tampered.capsule");
    std::fs::write(&tampered_path, &tampered)?;
    match run::main(run::RunArgs::for_demo(
        tampered_path,
        vec![samples[0].clone()],
        dirs.clone(),
    )) {
        Ok(()) => anyhow::bail!("the tampered capsule was accepted"),
        Err(e) => println!("refused: {}", crate::one_line(&e)),
    }
    run::main(run::RunArgs::for_demo(
        capsule.clone(),
        vec![samples[8].clone()],
        dirs.clone(),
    ))?;
    client::status(client::StatusArgs::for_demo(dirs.clone()))?;

    step("attack: a client who edits the policy in its capsule (no noise) is refused");
    let mut edited = bytes.clone();
    let at = edited
        .windows(7)
        .position(|w| w == b"\"c\":0.5")
        .context("the demo policy is in the header")?;
    edited[at + 6] = b'0';
    let edited_path = root.join("edited-policy.capsule");
    std::fs::write(&edited_path, &edited)?;
    match run::main(run::RunArgs::for_demo(
        edited_path,
        vec![samples[0].clone()],
        dirs.clone(),
    )) {
        Ok(()) => anyhow::bail!("the edited policy was accepted"),
        Err(e) => println!("refused: {}", crate::one_line(&e)),
    }

    step("attack: setting up the same licence again, from a fresh enclave, is refused");
    let fresh = ClientDirs {
        state: Some(root.join("other-state")),
        platform: dirs.platform.clone(),
    };
    match client::setup(client::SetupArgs::for_demo(
        capsule.clone(),
        server.url.clone(),
        token,
        fresh,
    )) {
        Ok(()) => anyhow::bail!("the licence was provisioned twice"),
        Err(e) => println!("refused: {}", crate::one_line(&e)),
    }
    server.stop()?;

    if args.keep {
        let kept = dir.keep();
        println!("\nkept {}", kept.display());
    }
    println!(
        "\ndemo finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
