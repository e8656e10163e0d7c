//! `mlcapsule server`: the provisioning server (`capsule-server`) on a socket.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use capsule_server::ServerConfig;
use clap::Args;

/// Options of `mlcapsule server`.
#[derive(Args)]
pub struct ServerArgs {
    /// Address to listen on. Keep it on loopback or behind a TLS proxy: tokens are bearer secrets.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Data directory (database, master key, signing key, admin token); created on first start.
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Accept evidence from the `sim` platform. It gives NO hardware isolation:
    /// development and evaluation only.
    #[arg(long)]
    allow_sim: bool,
    /// Enclave measurements (hex SHA-256) to accept, in addition to the
    /// `mlcapsule-enclave` binary installed beside this one.
    #[arg(long = "allow-measurement", value_name = "HEX")]
    allow_measurement: Vec<String>,
}

/// The measurements a server accepts: the listed ones plus the sibling enclave binary's.
pub fn allowed_measurements(extra: &[String]) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut out = Vec::new();
    for m in extra {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(m, &mut bytes).with_context(|| {
            format!("--allow-measurement '{m}' is not 64 hexadecimal characters")
        })?;
        out.push(bytes);
    }
    let enclave = capsule_enclave::default_enclave_binary();
    if let Ok(m) = capsule_attest::measure_file(&enclave) {
        out.push(m);
    }
    Ok(out)
}

/// Runs `mlcapsule server` until Ctrl-C.
pub fn main(args: ServerArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MLCAPSULE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let allowed = allowed_measurements(&args.allow_measurement)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let state = capsule_server::open(ServerConfig {
            data_dir: args.data.clone(),
            allow_sim: args.allow_sim,
            allowed_measurements: allowed.clone(),
        })
        .await
        .with_context(|| format!("cannot open the server's data directory {}", args.data.display()))?;
        if state.admin_token_created() {
            eprintln!("admin token written to {}", state.admin_token_path().display());
        }
        if args.allow_sim {
            eprintln!(
                "WARNING: accepting 'sim' evidence. The sim platform gives NO hardware isolation: the client machine's owner can forge its evidence and read released model keys. Use it for development and evaluation only."
            );
        }
        if allowed.is_empty() {
            eprintln!("WARNING: no enclave measurement is allowed, so every setup will be refused; pass --allow-measurement HEX");
        }
        for m in &allowed {
            eprintln!("accepting enclave measurement {}", hex::encode(m));
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        eprintln!("provisioning server listening on http://{}", listener.local_addr()?);
        capsule_server::serve(state, listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(())
    })
}
