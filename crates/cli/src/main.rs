//! `mlcapsule`: seal, inspect and run machine-learning model capsules.
//!
//! The binary is the only crate that reads files and talks to people; the
//! libraries (`capsule-format`, `capsule-engine`, `capsule-onnx`,
//! `capsule-enclave`) do the work.

mod input;
mod inspect;
mod run;
mod seal;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Guarded offline deployment of machine-learning models.
///
/// A provider seals an ONNX model into a capsule (public architecture, weights
/// encrypted layer by layer, authenticated policy); the capsule runs only with
/// its model key.
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
    /// Seal an ONNX model into a capsule and write a new model key.
    Seal(seal::SealArgs),
    /// Print a capsule's public manifest (never a secret).
    Inspect(inspect::InspectArgs),
    /// Classify inputs with a capsule (and its key) or a plain ONNX model.
    Run(run::RunArgs),
    /// Seal the bundled MNIST model and classify its sample digits.
    Demo(DemoArgs),
}

/// Options of `mlcapsule demo`.
#[derive(Args)]
struct DemoArgs {
    /// Where the bundled model lives (default: the source tree's `models/`).
    #[arg(long, value_name = "DIR")]
    models: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Seal(args) => seal::main(args),
        Command::Inspect(args) => inspect::main(args),
        Command::Run(args) => run::main(args),
        Command::Demo(args) => demo(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, outermost first.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Seals `models/mnist-cnn.onnx` into a temporary directory and classifies the sample digits.
fn demo(args: DemoArgs) -> anyhow::Result<()> {
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
    let dir = std::env::temp_dir().join(format!("mlcapsule-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let capsule = dir.join("mnist-cnn.capsule");
    let key = dir.join("mnist-cnn.key");
    println!("== seal: {} -> {}", onnx.display(), capsule.display());
    seal::main(seal::SealArgs::for_demo(onnx, capsule.clone(), key.clone()))?;
    println!("\n== inspect (public manifest, no key needed)");
    inspect::main(inspect::InspectArgs {
        capsule: capsule.clone(),
        json: false,
    })?;
    let mut samples: Vec<PathBuf> = std::fs::read_dir(models.join("samples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    samples.sort();
    println!(
        "\n== run: {} sample digits through the capsule",
        samples.len()
    );
    run::main(run::RunArgs::for_demo(capsule, key, samples))?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
