//! `mlcapsule`: guarded offline deployment of machine-learning models.
//!
//! The binary is the only crate that reads files, speaks HTTP as a client and
//! talks to people; the libraries (`capsule-format`, `capsule-engine`,
//! `capsule-onnx`, `capsule-attest`, `capsule-enclave`, `capsule-server`) do
//! the work.

mod admin;
mod api;
mod bench;
mod client;
mod demo;
mod input;
mod inspect;
mod lab;
mod run;
mod seal;
mod serve;
mod state;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tensors start on cache lines, so that a kernel's speed does not depend on
/// where `malloc` put them (see [`capsule_engine::LineAligned`]).
#[global_allocator]
static ALLOCATOR: capsule_engine::LineAligned = capsule_engine::LineAligned;

/// Guarded offline deployment of machine-learning models.
///
/// A provider seals an ONNX model into a capsule (public architecture, weights
/// encrypted layer by layer, authenticated policy) and sells query budgets
/// through its provisioning server; a client provisions its enclave once,
/// online, then runs queries locally and offline.
#[derive(Parser)]
#[command(
    name = "mlcapsule",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Seal an ONNX model into a capsule and write a new model key (provider).
    Seal(seal::SealArgs),
    /// Print a capsule's public manifest (never a secret).
    Inspect(inspect::InspectArgs),
    /// Run the provisioning server (provider).
    Server(serve::ServerArgs),
    /// Register capsules with the provisioning server (provider, admin).
    #[command(subcommand)]
    Model(admin::ModelCommand),
    /// Create licences and grant queries (provider, admin).
    #[command(subcommand, visible_alias = "licence")]
    License(admin::LicenseCommand),
    /// Provision a licence to this machine's enclave (client, online once).
    Setup(client::SetupArgs),
    /// Classify inputs: through the enclave (client, offline), with --key
    /// (provider's developer mode), or a plain ONNX model.
    Run(run::RunArgs),
    /// Show queries used and left, expiry and platform (client).
    Status(client::StatusArgs),
    /// Collect queries the provider granted (client, online).
    Topup(client::TopupArgs),
    /// The whole story on loopback: seal, serve, license, set up, run, top up, attacks refused.
    Demo(demo::DemoArgs),
    /// Attack-lab evaluations of the defenses: membership inference, PRADA, kennen-io.
    Lab(lab::LabArgs),
    /// Time plain, sealed-streaming and sealed-cached inference: the paper's tables, or --model.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Seal(args) => seal::main(args),
        Command::Inspect(args) => inspect::main(args),
        Command::Server(args) => serve::main(args),
        Command::Model(command) => admin::model(command),
        Command::License(command) => admin::license(command),
        Command::Setup(args) => client::setup(args),
        Command::Run(args) => run::main(args),
        Command::Status(args) => client::status(args),
        Command::Topup(args) => client::topup(args),
        Command::Demo(args) => demo::main(args),
        Command::Lab(args) => lab::main(args),
        Command::Bench(args) => bench::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// Ends the process quietly, with success, when stdout is a pipe its reader closed
/// (`mlcapsule bench --json | head -3`): `println!` panics then, and a user would see
/// a panic for a reader that simply had enough. Every other panic is reported as
/// before.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info);
    }));
}

/// The error and its causes on one line, outermost first.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
