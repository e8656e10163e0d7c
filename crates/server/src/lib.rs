//! MLCapsule's provisioning server: the provider's side of `spec/provisioning.md`.
//!
//! The provider registers each sealed capsule's model key, issues licences (a query
//! budget and an expiry, carried by a bearer token) and grants more queries. A client's
//! enclave proves what it is with attestation evidence bound to its fresh key, its
//! instance id and a single-use server nonce; the server then binds the licence to that
//! one instance, atomically and for good, and releases the model key to it as an
//! HPKE-sealed [`capsule_format::Grant`]. Later top-ups are Ed25519-signed
//! [`capsule_format::TopUp`] tokens with a per-licence sequence number.
//!
//! State lives in one data directory: `mlcapsule.db` (SQLite, WAL, migrations embedded
//! and applied at [`open`], no set-up step), `master-key` (model keys are stored only
//! AES-256-GCM-wrapped under it), `server-signing-key.pk8` and `admin-token`, each `0600`
//! in a `0700` directory. The HTTP API is an axum [`Router`] built by [`app`], which tests
//! drive in-process; [`serve`] runs it on a listener until a shutdown future resolves.
//!
//! ```no_run
//! # async fn run() -> Result<(), capsule_server::Error> {
//! use capsule_server::{ServerConfig, open, serve};
//! let state = open(ServerConfig {
//!     data_dir: "/var/lib/mlcapsule".into(),
//!     allow_sim: false,
//!     allowed_measurements: vec![[0u8; 32]],
//! })
//! .await?;
//! if state.admin_token_created() {
//!     println!("admin token written to {}", state.admin_token_path().display());
//! }
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await.unwrap();
//! serve(state, listener, async { /* e.g. tokio::signal::ctrl_c */ }).await
//! # }
//! ```
//!
//! What it does not do: run or even parse a model. It never depends on `capsule-engine`
//! or `capsule-onnx`, and only handles the model key as 32 opaque bytes. It does not
//! terminate TLS (put it behind a TLS proxy, or on loopback), install a tracing
//! subscriber (the binary does), or decide platform trust beyond [`ServerConfig`]: only
//! the `sim` platform has a verifier today, and it is refused unless `allow_sim` is set.

mod admin;
mod api_error;
mod day;
mod error;
mod extract;
mod keys;
mod provision;
mod store;

use std::fs;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

pub use api_error::ApiError;
pub use error::Error;
pub use keys::{ADMIN_TOKEN_FILE, MASTER_KEY_FILE, SIGNING_KEY_FILE};
pub use store::DB_FILE;

use keys::ServerKeys;
use store::Store;

/// Largest request body accepted: 64 KiB. Larger ones get 413 `payload_too_large`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How the server is set up.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The data directory; created `0700` with its database and secrets on first start.
    pub data_dir: PathBuf,
    /// Accept evidence from the `sim` platform, which protects nothing against the
    /// client machine's owner. For development and evaluation only.
    pub allow_sim: bool,
    /// Enclave measurements (SHA-256 of the enclave binary) whose evidence is accepted.
    /// Empty: every setup is refused with `measurement_not_allowed`.
    pub allowed_measurements: Vec<[u8; 32]>,
}

/// The opened server: database, secrets and configuration. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    keys: ServerKeys,
    data_dir: PathBuf,
    allow_sim: bool,
    allowed_measurements: Vec<[u8; 32]>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("data_dir", &self.inner.data_dir)
            .field("allow_sim", &self.inner.allow_sim)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// Whether [`open`] created the admin token file just now (first start, or the file
    /// had been deleted to rotate the token). Tell the operator where it is.
    pub fn admin_token_created(&self) -> bool {
        self.inner.keys.admin_token_created
    }

    /// The admin token file.
    pub fn admin_token_path(&self) -> &Path {
        &self.inner.keys.admin_token_path
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// The server's Ed25519 public key: it signs top-up tokens and is put in every grant.
    pub fn server_public_key(&self) -> [u8; 32] {
        self.inner.keys.server_key()
    }

    /// Closes the database connections. [`serve`] does this when it returns; call it when
    /// dropping a state that was never served (the database stays consistent either way).
    pub async fn close(&self) {
        self.inner.store.close().await;
    }
}

/// Opens the data directory, creating it, its database and its secrets on first start,
/// and applies any pending migrations.
pub async fn open(config: ServerConfig) -> Result<AppState, Error> {
    let dir = config.data_dir;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io(&dir))?;
    let mode = fs::metadata(&dir).map_err(io(&dir))?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format_args!("{:o}", mode & 0o777),
            "the data directory is accessible to other users; chmod 700 it"
        );
    }

    let db_path = dir.join(DB_FILE);
    let first_start = !db_path.exists();
    let keys = ServerKeys::load_or_create(&dir, first_start)?;
    if first_start {
        // SQLite gives its -wal and -shm files the database file's mode: make it 0600.
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&db_path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&db_path)(e)),
        }
    }
    let store = Store::open(&db_path).await?;

    if !config.allow_sim {
        tracing::info!("sim evidence is refused (allow_sim is off)");
    } else {
        tracing::warn!(
            "sim evidence is accepted: the sim platform does not protect the model from the client machine's owner; use it for development only"
        );
    }
    if config.allowed_measurements.is_empty() {
        tracing::warn!("no enclave measurement is allowed: every setup will be refused");
    }
    tracing::info!(
        dir = %dir.display(),
        first_start,
        server_key = hex::encode(keys.server_key()),
        "provisioning server opened"
    );
    Ok(AppState {
        inner: Arc::new(Inner {
            store,
            keys,
            data_dir: dir,
            allow_sim: config.allow_sim,
            allowed_measurements: config.allowed_measurements,
        }),
    })
}

/// The HTTP API of `spec/provisioning.md`, every route under `/v1`.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/models", post(admin::add_model))
        .route("/v1/licences", post(admin::create_licence))
        .route("/v1/licences/{id}", get(admin::licence_status))
        .route("/v1/licences/{id}/grant", post(admin::grant))
        .route("/v1/setup/nonce", post(provision::nonce))
        .route("/v1/setup", post(provision::setup))
        .route("/v1/topup", post(provision::topup))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(extract::refuse_large_bodies))
        .with_state(state)
}

/// Serves [`app`] on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish and closes the database.
pub async fn serve(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "provisioning server listening");
    }
    let store = state.inner.store.clone();
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await;
    store.close().await;
    tracing::info!("provisioning server stopped");
    served.map_err(Error::Serve)
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_server_links_no_engine_and_no_onnx() {
        let manifest = include_str!("../Cargo.toml");
        for forbidden in [
            "capsule-engine",
            "capsule-onnx",
            "capsule-enclave",
            "rusqlite",
        ] {
            assert!(
                !manifest.contains(forbidden),
                "capsule-server must not depend on {forbidden}"
            );
        }
    }
}
