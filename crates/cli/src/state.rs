//! The client's state directory: one folder per capsule with the public facts
//! of its enclave instance, the instance's sealed ledger and, for a capsule
//! whose policy keeps state, its sealed defense state (`defense.sealed`).
//!
//! Nothing here is secret to the host except the licence token (a bearer
//! secret, kept 0600). The sealed files open only inside the enclave on this
//! platform. Restoring an older copy of this directory restores no queries:
//! the platform's monotonic counter, kept elsewhere, is the truth; and an older
//! defense state makes the enclave refuse queries until `mlcapsule topup`
//! resynchronises it (enclave-protocol §7.4).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Where client state lives unless `--state` says otherwise.
pub fn default_state_dir() -> PathBuf {
    data_home().join("mlcapsule/state")
}

/// Where the `sim` platform keeps its secret and counters unless `--platform` says otherwise.
/// Deliberately outside the state directory, so that restoring state never restores counters.
pub fn default_platform_dir() -> PathBuf {
    std::env::var_os("MLCAPSULE_SIM_PLATFORM")
        .map(PathBuf::from)
        .unwrap_or_else(|| data_home().join("mlcapsule/sim-platform"))
}

fn data_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share"),
        None => PathBuf::from(".mlcapsule"),
    }
}

/// The public record of one provisioned enclave instance.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Instance {
    /// The capsule this instance runs (hex).
    pub capsule_id: String,
    /// Where the capsule was at setup, for `status`.
    pub capsule_path: PathBuf,
    /// The enclave instance (hex): the name of its monotonic counter.
    pub instance_id: String,
    /// The licence.
    pub licence_id: String,
    /// The licence token, needed for top-ups (a bearer secret).
    pub licence_token: String,
    /// The provisioning server used at setup.
    pub server: String,
    /// The platform, e.g. `sim`.
    pub platform: String,
}

impl Instance {
    /// The instance id as bytes.
    pub fn instance_bytes(&self) -> anyhow::Result<[u8; 16]> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(&self.instance_id, &mut id)
            .context("the state directory's instance id is corrupt; run mlcapsule setup again")?;
        Ok(id)
    }
}

/// A state directory.
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The directory at `root` (created when first written).
    pub fn new(root: PathBuf) -> StateDir {
        StateDir { root }
    }

    fn folder(&self, capsule_id: &str) -> PathBuf {
        self.root.join(capsule_id)
    }

    /// Whether an instance exists for this capsule.
    pub fn has(&self, capsule_id: &str) -> bool {
        self.folder(capsule_id).join("instance.json").exists()
    }

    /// Saves an instance record and its sealed ledger, each atomically.
    pub fn save(&self, instance: &Instance, sealed: &[u8]) -> anyhow::Result<()> {
        let folder = self.folder(&instance.capsule_id);
        create_private_dir(&self.root)?;
        create_private_dir(&folder)?;
        write_atomic(
            &folder.join("instance.json"),
            &serde_json::to_vec_pretty(instance)?,
        )?;
        self.save_sealed(&instance.capsule_id, sealed)
    }

    /// Replaces the sealed ledger of an instance, atomically.
    pub fn save_sealed(&self, capsule_id: &str, sealed: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.folder(capsule_id).join("ledger.sealed"), sealed)
    }

    /// Replaces the sealed defense state of an instance, atomically. Called before the
    /// answer it came with is shown (enclave-protocol §7.4).
    pub fn save_defense(&self, capsule_id: &str, sealed: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.folder(capsule_id).join("defense.sealed"), sealed)
    }

    /// The sealed defense state of an instance, if one was stored.
    pub fn load_defense(&self, capsule_id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.folder(capsule_id).join("defense.sealed");
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Loads the instance of `capsule_id` and its sealed ledger.
    pub fn load(&self, capsule_id: &str) -> anyhow::Result<(Instance, Vec<u8>)> {
        let folder = self.folder(capsule_id);
        let record = folder.join("instance.json");
        if !record.exists() {
            bail!(
                "this capsule is not set up in {} (no licence provisioned here); run 'mlcapsule setup MODEL.capsule --server URL --license TOKEN' first",
                self.root.display()
            );
        }
        let instance: Instance =
            serde_json::from_slice(&std::fs::read(&record)?).with_context(|| {
                format!("{} is corrupt; run mlcapsule setup again", record.display())
            })?;
        let sealed = std::fs::read(folder.join("ledger.sealed")).with_context(|| {
            format!(
                "the sealed ledger in {} is missing; run mlcapsule setup again",
                folder.display()
            )
        })?;
        Ok((instance, sealed))
    }

    /// Every instance in the directory, sorted by capsule id.
    pub fn list(&self) -> anyhow::Result<Vec<Instance>> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(out);
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if self.has(&name) {
                out.push(self.load(&name)?.0);
            }
        }
        out.sort_by(|a, b| a.capsule_id.cmp(&b.capsule_id));
        Ok(out)
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename, mode 0600.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}
