//! Provider commands against the provisioning server: `model add`, `license create`,
//! `license grant`, `license show`. Each prints only what scripts capture.

use std::path::PathBuf;

use anyhow::Context;
use capsule_format::{Capsule, ModelKey};
use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::json;

use crate::api::{Api, admin_token};

/// Where the server is and how to prove you are its admin.
#[derive(Args)]
pub struct AdminConnection {
    /// The provisioning server's base URL.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The admin token (default: $MLCAPSULE_TOKEN).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

impl AdminConnection {
    fn api(&self) -> anyhow::Result<Api> {
        Ok(Api::new(
            &self.server,
            Some(admin_token(self.token.clone())?),
        ))
    }
}

/// `mlcapsule model ...`
#[derive(Subcommand)]
pub enum ModelCommand {
    /// Register a capsule and its model key with the server; prints the model id.
    Add {
        /// The capsule.
        capsule: PathBuf,
        /// Its model key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// A name for people (default: the capsule's file name).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        connection: AdminConnection,
    },
}

/// `mlcapsule license ...`
#[derive(Subcommand)]
pub enum LicenseCommand {
    /// Create a licence for a registered model; prints the licence token for the customer.
    Create {
        /// The model id (`mlcapsule model add` printed it).
        #[arg(long, value_name = "ID")]
        model: String,
        /// Queries the licence grants.
        #[arg(long, value_name = "N")]
        queries: u64,
        /// Last day it may run (UTC, YYYY-MM-DD).
        #[arg(long, value_name = "DATE")]
        expires: Option<String>,
        #[command(flatten)]
        connection: AdminConnection,
    },
    /// Add queries to a licence; the client collects them with `mlcapsule topup`.
    Grant {
        /// The licence id (the part after `mlc-licence-v1.` in its token).
        id: String,
        /// Queries to add.
        #[arg(long, value_name = "N")]
        queries: u64,
        #[command(flatten)]
        connection: AdminConnection,
    },
    /// Show a licence: budget, binding, top-ups and last reported usage.
    Show {
        /// The licence id.
        id: String,
        #[command(flatten)]
        connection: AdminConnection,
    },
}

#[derive(Deserialize)]
struct ModelAdded {
    model_id: String,
}

#[derive(Deserialize)]
struct LicenceCreated {
    token: String,
}

#[derive(Deserialize)]
struct Granted {
    licence_id: String,
    total_queries: u64,
}

/// Runs `mlcapsule model ...`.
pub fn model(command: ModelCommand) -> anyhow::Result<()> {
    let ModelCommand::Add {
        capsule: path,
        key,
        name,
        connection,
    } = command;
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let capsule = Capsule::parse(&bytes).with_context(|| format!("{}", path.display()))?;
    let key_text = std::fs::read_to_string(&key)
        .with_context(|| format!("cannot read key file {}", key.display()))?;
    let model_key =
        ModelKey::from_key_file(&key_text).with_context(|| format!("{}", key.display()))?;
    // Register only a key that really opens this capsule.
    let header = capsule
        .unseal(&model_key)
        .with_context(|| format!("{} does not open {}", key.display(), path.display()))?
        .header()
        .clone();
    let name = name.unwrap_or_else(|| {
        path.file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
    });
    let body = json!({
        "capsule_id": hex::encode(header.capsule_id),
        "name": name,
        "model_key": hex::encode(model_key.expose()),
        "max_queries": header.policy.max_queries,
        "expires": header.policy.expires,
    });
    let added: ModelAdded = connection.api()?.post("/v1/models", &body)?;
    println!("{}", added.model_id);
    Ok(())
}

/// Runs `mlcapsule license ...`.
pub fn license(command: LicenseCommand) -> anyhow::Result<()> {
    match command {
        LicenseCommand::Create {
            model,
            queries,
            expires,
            connection,
        } => {
            let body = json!({"model_id": model, "queries": queries, "expires": expires});
            let created: LicenceCreated = connection.api()?.post("/v1/licences", &body)?;
            println!("{}", created.token);
        }
        LicenseCommand::Grant {
            id,
            queries,
            connection,
        } => {
            let id = licence_id(&id);
            let granted: Granted = connection.api()?.post(
                &format!("/v1/licences/{id}/grant"),
                &json!({"queries": queries}),
            )?;
            println!(
                "licence {} now grants {} queries in total; the client runs 'mlcapsule topup' to collect them",
                granted.licence_id, granted.total_queries
            );
        }
        LicenseCommand::Show { id, connection } => {
            let id = licence_id(&id);
            let status: serde_json::Value = connection.api()?.get(&format!("/v1/licences/{id}"))?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
    }
    Ok(())
}

/// Accepts a licence id or a whole licence token.
fn licence_id(id_or_token: &str) -> &str {
    id_or_token
        .strip_prefix("mlc-licence-v1.")
        .and_then(|rest| rest.split('.').next())
        .unwrap_or(id_or_token)
}
