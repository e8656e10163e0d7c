//! Customer commands: `setup` (online once), `status`, `topup`, and running a
//! capsule through the enclave (offline). The host code here never holds a
//! model key or a plaintext weight: it moves sealed bytes between the server,
//! the state directory and the enclave process.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use capsule_enclave::{
    CapsuleFile, CapsuleSource, DefenseStatus, EnclaveProcess, Status, default_enclave_binary,
};
use capsule_engine::Tensor;
use capsule_format::SealedGrant;
use clap::Args;
use serde::Deserialize;
use serde_json::json;

use crate::api::Api;
use crate::state::{Instance, StateDir, default_platform_dir, default_state_dir};

/// Where the client keeps its state and its (simulated) platform.
#[derive(Args, Clone, Default)]
pub struct ClientDirs {
    /// The client state directory (default: ~/.local/share/mlcapsule/state).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// The sim platform directory: its secret and monotonic counters
    /// (default: $MLCAPSULE_SIM_PLATFORM or ~/.local/share/mlcapsule/sim-platform).
    #[arg(long, value_name = "DIR")]
    pub platform: Option<PathBuf>,
}

impl ClientDirs {
    fn state(&self) -> StateDir {
        StateDir::new(self.state.clone().unwrap_or_else(default_state_dir))
    }

    fn platform(&self) -> PathBuf {
        self.platform.clone().unwrap_or_else(default_platform_dir)
    }
}

/// Options of `mlcapsule setup`.
#[derive(Args)]
pub struct SetupArgs {
    /// The capsule to provision.
    capsule: PathBuf,
    /// The provider's provisioning server.
    #[arg(long, value_name = "URL")]
    server: String,
    /// The licence token the provider gave you.
    #[arg(long, value_name = "TOKEN")]
    license: String,
    #[command(flatten)]
    dirs: ClientDirs,
}

/// Options of `mlcapsule status`.
#[derive(Args)]
pub struct StatusArgs {
    /// Only this capsule (default: every capsule set up in the state directory).
    capsule: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dirs: ClientDirs,
}

/// Options of `mlcapsule topup`.
#[derive(Args)]
pub struct TopupArgs {
    /// The capsule to top up (default: the only one set up).
    capsule: Option<PathBuf>,
    /// The provisioning server (default: the one used at setup).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    #[command(flatten)]
    dirs: ClientDirs,
}

impl SetupArgs {
    /// The arguments `mlcapsule demo` sets up with.
    pub fn for_demo(
        capsule: PathBuf,
        server: String,
        license: String,
        dirs: ClientDirs,
    ) -> SetupArgs {
        SetupArgs {
            capsule,
            server,
            license,
            dirs,
        }
    }
}

impl StatusArgs {
    /// The arguments `mlcapsule demo` asks for status with.
    pub fn for_demo(dirs: ClientDirs) -> StatusArgs {
        StatusArgs {
            capsule: None,
            json: false,
            dirs,
        }
    }
}

impl TopupArgs {
    /// The arguments `mlcapsule demo` tops up with.
    pub fn for_demo(server: String, dirs: ClientDirs) -> TopupArgs {
        TopupArgs {
            capsule: None,
            server: Some(server),
            dirs,
        }
    }
}

/// Says what the `sim` platform does not protect: once per command.
pub fn warn_if_sim(platform: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if platform == capsule_attest::SIM {
        WARNED.call_once(|| eprintln!(
            "warning: platform 'sim' gives NO hardware isolation: this machine's owner or root can read the released model key and reset the query counter. For development and evaluation only."
        ));
    }
}

fn spawn(
    dirs: &ClientDirs,
    instance: Option<[u8; 16]>,
    memory_budget: Option<u64>,
) -> anyhow::Result<EnclaveProcess> {
    let enclave = EnclaveProcess::spawn_with_budget(
        &default_enclave_binary(),
        &dirs.platform(),
        instance,
        memory_budget,
    )?;
    warn_if_sim(&enclave.info().platform);
    Ok(enclave)
}

/// The capsule at `path`, its prefix read: the rest is read as it is streamed.
fn open_capsule(path: &Path) -> anyhow::Result<CapsuleFile> {
    CapsuleFile::open(path).with_context(|| format!("{}", path.display()))
}

#[derive(Deserialize)]
struct Nonce {
    nonce: String,
}

#[derive(Deserialize)]
struct SetupReply {
    sealed_grant: SealedGrant,
    licence_id: String,
}

#[derive(Deserialize)]
struct TopupReply {
    token: String,
}

/// Runs `mlcapsule setup`: attest the enclave to the server and receive the licence.
pub fn setup(args: SetupArgs) -> anyhow::Result<()> {
    let capsule = open_capsule(&args.capsule)?;
    let capsule_id = hex::encode(capsule.header().capsule_id);
    let state = args.dirs.state();
    if state.has(&capsule_id) {
        bail!(
            "this capsule is already set up in this state directory; run 'mlcapsule status', or use another --state DIR"
        );
    }
    let api = Api::new(&args.server, None);
    let licence = args.license.trim();
    let nonce: Nonce = api.post("/v1/setup/nonce", &json!({"licence": licence}))?;
    let nonce_bytes = hex::decode(&nonce.nonce).context("the server sent a malformed nonce")?;

    let mut enclave = spawn(&args.dirs, None, None)?;
    let info = enclave.info().clone();
    let enclave_key = enclave.setup_key()?;
    let evidence = enclave.attest(&nonce_bytes)?;
    let reply: SetupReply = api.post(
        "/v1/setup",
        &json!({
            "licence": licence,
            "nonce": nonce.nonce,
            "instance_id": hex::encode(info.instance_id),
            "enclave_key": hex::encode(enclave_key),
            "evidence": evidence,
        }),
    )?;
    let sealed = enclave.provision(&nonce_bytes, &reply.sealed_grant)?;
    let status = enclave.load(&sealed, &capsule)?;
    let instance = Instance {
        capsule_id,
        capsule_path: std::fs::canonicalize(&args.capsule).unwrap_or(args.capsule.clone()),
        instance_id: hex::encode(info.instance_id),
        licence_id: reply.licence_id,
        licence_token: licence.to_owned(),
        server: args.server.clone(),
        platform: info.platform.clone(),
    };
    state.save(&instance, &sealed)?;
    println!(
        "set up licence {} on enclave instance {} (platform {}): {} queries{}; runs offline from now on",
        instance.licence_id,
        instance.instance_id,
        info.platform,
        status.total,
        status
            .expires
            .map(|d| format!(", until {d}"))
            .unwrap_or_default()
    );
    Ok(())
}

/// Starts the capsule's enclave instance and loads its sealed ledger and defense state.
fn open_instance(
    dirs: &ClientDirs,
    state: &StateDir,
    instance: &Instance,
    capsule: &CapsuleFile,
    memory_budget: Option<u64>,
) -> anyhow::Result<(EnclaveProcess, Status)> {
    let (_, sealed) = state.load(&instance.capsule_id)?;
    let defense = state.load_defense(&instance.capsule_id)?;
    let mut enclave = spawn(dirs, Some(instance.instance_bytes()?), memory_budget)?;
    let status = enclave.load_with_defense(&sealed, capsule, defense.as_deref())?;
    Ok((enclave, status))
}

/// Stores the defense state the enclave sent, if any: before anything is shown.
fn keep_defense_state(
    enclave: &mut EnclaveProcess,
    state: &StateDir,
    capsule_id: &str,
) -> anyhow::Result<()> {
    if let Some(sealed) = enclave.take_defense_state() {
        state.save_defense(capsule_id, &sealed).context(
            "the defense state could not be saved, so the answer is withheld; the next query will ask for 'mlcapsule topup'",
        )?;
    }
    Ok(())
}

/// Runs one batch through the enclave of the capsule's instance: offline. The defense
/// state that comes with the answer (or a counted refusal) is stored before either is
/// returned (enclave-protocol §7.4). `memory_budget` caps the enclave's plaintext weight
/// memory (§8.1). Also returns the enclave process's peak resident memory after the
/// query, as the host reads it (`VmHWM`), where it can.
pub fn run(
    capsule: &CapsuleFile,
    batch: &Tensor,
    dirs: &ClientDirs,
    memory_budget: Option<u64>,
) -> anyhow::Result<(Tensor, Status, Option<u64>)> {
    let capsule_id = hex::encode(capsule.header().capsule_id);
    let state = dirs.state();
    let (instance, _) = state.load(&capsule_id)?;
    let (mut enclave, _) = open_instance(dirs, &state, &instance, capsule, memory_budget)?;
    let result = enclave.query(capsule, batch);
    let peak_rss = enclave.peak_rss();
    keep_defense_state(&mut enclave, &state, &capsule_id)?;
    let (output, status) = result?;
    Ok((output, status, peak_rss))
}

/// What the defenses recorded, in words, for `status`.
fn defense_text(defense: &DefenseStatus) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &defense.prada {
        let mut text = format!(
            "PRADA observed {} queries ({} stored), {} alarm{}",
            p.observed,
            p.stored,
            p.alarms,
            if p.alarms == 1 { "" } else { "s" }
        );
        if let Some(a) = &p.first_alarm {
            text += &format!(" (first at query {}, W = {:.4})", a.query, a.w);
        }
        if p.denying {
            text += ", every query refused";
        }
        parts.push(text);
    }
    if let Some(r) = defense.detector_refusals {
        parts.push(format!("input detector refused {r} queries"));
    }
    if defense.behind > 0 {
        parts.push(format!(
            "state {} queries behind the counter: run 'mlcapsule topup' to resynchronise",
            defense.behind
        ));
    }
    if defense.resyncs > 0 {
        parts.push(format!(
            "{} queries unobserved over {} resynchronisations",
            defense.unobserved, defense.resyncs
        ));
    }
    parts.join("; ")
}

/// The `detections` of a top-up request (provisioning §6.1), from the enclave's status.
fn detections(defense: &DefenseStatus) -> serde_json::Value {
    let prada = defense.prada.as_ref();
    json!({
        "prada_alarms": prada.map_or(0, |p| p.alarms),
        "prada_denying": prada.is_some_and(|p| p.denying),
        "first_alarm": prada.and_then(|p| p.first_alarm).map(|a| json!({
            "query": a.query, "w": a.w, "distances": a.distances,
        })),
        "detector_refusals": defense.detector_refusals.unwrap_or(0),
        "unobserved_queries": defense.unobserved + defense.behind,
        "resyncs": defense.resyncs,
    })
}

/// Runs `mlcapsule status`.
pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let state = args.dirs.state();
    let instances = match &args.capsule {
        Some(path) => {
            let capsule = open_capsule(path)?;
            vec![state.load(&hex::encode(capsule.header().capsule_id))?.0]
        }
        None => state.list()?,
    };
    if instances.is_empty() {
        bail!("no capsule is set up in this state directory; run 'mlcapsule setup' first");
    }
    let mut report = Vec::new();
    for instance in instances {
        let path = args
            .capsule
            .clone()
            .unwrap_or_else(|| instance.capsule_path.clone());
        let capsule = open_capsule(&path)
            .with_context(|| "pass the capsule's new path: mlcapsule status MODEL.capsule")?;
        let (_, status) = open_instance(&args.dirs, &state, &instance, &capsule, None)?;
        if !args.json {
            println!(
                "{}: {} of {} queries used, {} left; expires {}; licence {}; instance {}; platform {}{}",
                path.display(),
                status.used,
                status.total,
                status.left,
                status.expires.as_deref().unwrap_or("never"),
                status.licence_id,
                instance.instance_id,
                status.platform,
                if status.platform == capsule_attest::SIM {
                    " (no hardware isolation)"
                } else {
                    ""
                }
            );
            if let Some(defense) = &status.defense {
                println!("  defenses: {}", defense_text(defense));
            }
        }
        report.push(json!({"capsule": path, "status": status}));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Runs `mlcapsule topup`: fetch a signed top-up token and apply it in the enclave.
pub fn topup(args: TopupArgs) -> anyhow::Result<()> {
    let state = args.dirs.state();
    let instance = match &args.capsule {
        Some(path) => {
            let capsule = open_capsule(path)?;
            state.load(&hex::encode(capsule.header().capsule_id))?.0
        }
        None => {
            let mut all = state.list()?;
            match all.len() {
                0 => bail!(
                    "no capsule is set up in this state directory; run 'mlcapsule setup' first"
                ),
                1 => all.remove(0),
                n => bail!("{n} capsules are set up here; name one: mlcapsule topup MODEL.capsule"),
            }
        }
    };
    let path = args
        .capsule
        .clone()
        .unwrap_or_else(|| instance.capsule_path.clone());
    let capsule = open_capsule(&path)?;
    let (mut enclave, before) = open_instance(&args.dirs, &state, &instance, &capsule, None)?;
    let server = args
        .server
        .clone()
        .unwrap_or_else(|| instance.server.clone());
    let mut request = json!({
        "licence": instance.licence_token,
        "instance_id": instance.instance_id,
        "used": before.used,
    });
    if let Some(defense) = &before.defense {
        request["detections"] = detections(defense);
    }
    let reply: TopupReply = Api::new(&server, None).post("/v1/topup", &request)?;
    let result = enclave.topup(&reply.token);
    keep_defense_state(&mut enclave, &state, &instance.capsule_id)?;
    let (sealed, after) = result?;
    state.save_sealed(&instance.capsule_id, &sealed)?;
    println!(
        "topped up: {} of {} queries used, {} left (was {} left)",
        after.used, after.total, after.left, before.left
    );
    if let Some(defense) = before.defense.as_ref().filter(|d| d.behind > 0) {
        println!(
            "resynchronised the defense state: {} queries it had not seen were reported to the provider",
            defense.behind
        );
    }
    Ok(())
}
