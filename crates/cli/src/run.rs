//! `mlcapsule run`: classify inputs with a capsule and its key, or a plain ONNX model.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use capsule_enclave::{CapsuleFile, CapsuleSource, SealedModel, Status};
use capsule_engine::{Graph, Model, Tensor};
use capsule_format::{Capsule, ModelKey, Preprocessing};
use clap::Args;
use serde::Serialize;

use crate::client::{self, ClientDirs};
use crate::input;

/// Options of `mlcapsule run`.
#[derive(Args)]
pub struct RunArgs {
    /// A capsule (needs --key) or, for comparison, a plain ONNX model.
    model: PathBuf,
    /// Input files: .npy tensors, or PNG/JPEG images preprocessed as the capsule says.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The capsule's model key file: the provider's developer mode, in this
    /// process. Without it a capsule runs in the enclave with the licence from `setup`.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// How many classes to print per input.
    #[arg(short = 'k', long, default_value_t = 5)]
    top_k: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Write the model's raw output tensor (the whole batch) as a .npy file.
    #[arg(long, value_name = "OUT.npy")]
    output: Option<PathBuf>,
    /// Through the enclave: cap the plaintext weights it holds at once (bytes, or e.g.
    /// 64MiB); larger dense layers are computed chunk by chunk. (A run through the
    /// enclave reports its process's peak resident memory, with or without a budget.)
    #[arg(long, value_name = "BYTES", value_parser = crate::bench::parse_bytes)]
    memory_budget: Option<u64>,
    #[command(flatten)]
    dirs: ClientDirs,
}

impl RunArgs {
    /// The arguments `mlcapsule demo` runs with.
    pub fn for_demo(model: PathBuf, inputs: Vec<PathBuf>, dirs: ClientDirs) -> RunArgs {
        RunArgs {
            model,
            inputs,
            key: None,
            top_k: 3,
            json: false,
            output: None,
            memory_budget: None,
            dirs,
        }
    }
}

/// A model ready to run, from one of three sources.
enum Loaded {
    /// Through the enclave process, with the licence set up in the state directory (offline).
    Enclave {
        capsule: Box<CapsuleFile>,
        graph: Graph,
    },
    /// In this process, with the model key (the provider's developer mode).
    Sealed(Box<SealedModel>),
    /// A plain ONNX model, for comparison.
    Plain(Model),
}

impl Loaded {
    fn graph(&self) -> &Graph {
        match self {
            Loaded::Enclave { graph, .. } => graph,
            Loaded::Sealed(m) => m.graph(),
            Loaded::Plain(m) => m.graph(),
        }
    }

    fn preprocessing(&self) -> Option<&Preprocessing> {
        match self {
            Loaded::Enclave { capsule, .. } => capsule.header().preprocessing.as_ref(),
            Loaded::Sealed(m) => m.header().preprocessing.as_ref(),
            Loaded::Plain(_) => None,
        }
    }

    /// True when the enclave shapes the output with the capsule's policy (noising, output
    /// policies: spec/policy.md §4 step 4): it releases probabilities, possibly rounded or
    /// cut to the top k, never logits, so they are shown as they are.
    fn shaped_output(&self) -> bool {
        let Loaded::Enclave { capsule, .. } = self else {
            return false;
        };
        capsule
            .header()
            .policy
            .defense
            .as_ref()
            .and_then(|d| serde_json::from_value::<capsule_defense::Policy>(d.clone()).ok())
            .is_some_and(|p| p.noise.is_some() || p.output != Default::default())
    }

    fn labels(&self) -> Option<&[String]> {
        match self {
            Loaded::Enclave { capsule, .. } => capsule.header().labels.as_deref(),
            Loaded::Sealed(m) => m.header().labels.as_deref(),
            Loaded::Plain(_) => None,
        }
    }

    /// Runs one batch; through the enclave, also returns the budget after it and the
    /// enclave's peak resident memory.
    fn run(
        &self,
        batch: Tensor,
        dirs: &ClientDirs,
        memory_budget: Option<u64>,
    ) -> anyhow::Result<(Tensor, Option<EnclaveReport>)> {
        let mut outputs = match self {
            Loaded::Enclave { capsule, .. } => {
                let (output, status, peak_rss) = client::run(capsule, &batch, dirs, memory_budget)?;
                return Ok((output, Some((status, peak_rss))));
            }
            Loaded::Sealed(m) => m.run(&[batch])?,
            Loaded::Plain(m) => m.run(&[batch])?,
        };
        anyhow::ensure!(!outputs.is_empty(), "the model returned no output");
        Ok((outputs.swap_remove(0), None))
    }
}

/// What a query through the enclave reports beside its output: the budget after it and
/// the enclave process's peak resident memory, where the host can read it.
type EnclaveReport = (Status, Option<u64>);

fn load_model(args: &RunArgs) -> anyhow::Result<Loaded> {
    let path = &args.model;
    if args.key.is_none() && is_capsule(path)? {
        // The client's way: through the enclave, which reads the capsule as the host
        // streams it. The header is public; the enclave authenticates it before it runs
        // anything.
        let capsule = CapsuleFile::open(path).with_context(|| format!("{}", path.display()))?;
        let graph: Graph = serde_json::from_value(capsule.header().architecture.clone())
            .with_context(|| {
                format!(
                    "{}: the architecture is not one this mlcapsule can run; upgrade mlcapsule",
                    path.display()
                )
            })?;
        return Ok(Loaded::Enclave {
            capsule: Box::new(capsule),
            graph,
        });
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Some(key_path) = &args.key {
        let capsule = Capsule::parse(&bytes).with_context(|| format!("{}", path.display()))?;
        let text = std::fs::read_to_string(key_path)
            .with_context(|| format!("cannot read key file {}", key_path.display()))?;
        let key =
            ModelKey::from_key_file(&text).with_context(|| format!("{}", key_path.display()))?;
        let model =
            SealedModel::open(&capsule, &key).with_context(|| format!("{}", path.display()))?;
        return Ok(Loaded::Sealed(Box::new(model)));
    }
    let imported = capsule_onnx::import(&bytes).with_context(|| {
        format!(
            "{} is neither a capsule nor a usable ONNX model",
            path.display()
        )
    })?;
    Ok(Loaded::Plain(Model::new(imported.graph, imported.weights)?))
}

/// Whether the file at `path` starts as a capsule does (or as a capsule of another
/// version, which [`CapsuleFile::open`] then names).
fn is_capsule(path: &Path) -> anyhow::Result<bool> {
    let mut start = Vec::with_capacity(MAGIC.len());
    std::fs::File::open(path)
        .and_then(|file| file.take(MAGIC.len() as u64).read_to_end(&mut start))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(start == MAGIC)
}

/// How every capsule's version line starts.
const MAGIC: &[u8] = b"mlcapsule/";

/// One input row's best classes.
#[derive(Serialize)]
struct Row {
    input: String,
    top: Vec<Class>,
}

#[derive(Serialize)]
struct Class {
    class: usize,
    label: Option<String>,
    probability: f32,
}

/// Runs `mlcapsule run`.
pub fn main(args: RunArgs) -> anyhow::Result<()> {
    let model = load_model(&args)?;
    let graph = model.graph();
    let [graph_input] = graph.inputs.as_slice() else {
        bail!(
            "the model takes {} inputs; `run` supports models with exactly one",
            graph.inputs.len()
        );
    };
    let mut names = Vec::new();
    let mut rows: Vec<f32> = Vec::new();
    let mut row_shape: Option<Vec<usize>> = None;
    let mut batch = 0;
    for path in &args.inputs {
        let t = input::load(path, graph_input, model.preprocessing())?;
        let n = t.shape()[0];
        if let Some(shape) = &row_shape {
            anyhow::ensure!(
                shape.as_slice() == &t.shape()[1..],
                "{} has shape {:?}, unlike the inputs before it; run differently shaped inputs separately",
                path.display(),
                t.shape()
            );
        }
        row_shape = Some(t.shape()[1..].to_vec());
        for i in 0..n {
            names.push(if n == 1 {
                path.display().to_string()
            } else {
                format!("{}[{i}]", path.display())
            });
        }
        batch += n;
        rows.extend_from_slice(t.data());
    }
    let mut shape = vec![batch];
    shape.extend(row_shape.unwrap_or_default());
    if args.memory_budget.is_some() && !matches!(model, Loaded::Enclave { .. }) {
        bail!("--memory-budget applies to capsules run through the enclave; drop --key");
    }
    let started = std::time::Instant::now();
    let (output, status) = model.run(Tensor::new(shape, rows)?, &args.dirs, args.memory_budget)?;
    let elapsed = started.elapsed();
    let output = &output;
    // On stderr, after the results, so that stdout stays machine-readable.
    let report_enclave = || {
        if let Some((s, peak_rss)) = &status {
            eprintln!("{} of {} queries used, {} left", s.used, s.total, s.left);
            let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1 << 20));
            let rss = peak_rss.map_or("unknown".to_string(), mib);
            let budget = args
                .memory_budget
                .map_or("no weight memory budget".to_string(), |b| {
                    format!("weight memory budget {}", mib(b))
                });
            eprintln!(
                "{budget}: enclave peak resident memory {rss} (VmHWM), {:.0} ms from start to answer",
                elapsed.as_secs_f64() * 1e3
            );
        }
    };

    if let Some(path) = &args.output {
        std::fs::write(path, capsule_engine::npy::write_npy(output))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let classes = output.len() / batch.max(1);
    if output.shape().len() != 2 || output.shape()[0] != batch {
        match &args.output {
            Some(path) => eprintln!(
                "the model's output has shape {:?}, not [batch, classes]: written to {} only",
                output.shape(),
                path.display()
            ),
            None => eprintln!(
                "the model's output has shape {:?}, not [batch, classes]; use --output to save it",
                output.shape()
            ),
        }
        report_enclave();
        return Ok(());
    }
    let shaped = model.shaped_output();
    let report: Vec<Row> = names
        .into_iter()
        .zip(output.data().chunks_exact(classes))
        .map(|(input, scores)| Row {
            input,
            top: top_k(
                &if shaped {
                    scores.to_vec()
                } else {
                    probabilities(scores)
                },
                args.top_k,
                model.labels(),
            ),
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for row in &report {
            let best: Vec<String> = row
                .top
                .iter()
                .map(|c| {
                    let name = c.label.clone().unwrap_or_else(|| c.class.to_string());
                    format!("{name} ({:.2}%)", 100.0 * c.probability)
                })
                .collect();
            println!("{}: {}", row.input, best.join("  "));
        }
    }
    report_enclave();
    Ok(())
}

/// The scores as they are if they already form a distribution, else their softmax.
fn probabilities(scores: &[f32]) -> Vec<f32> {
    let sum: f32 = scores.iter().sum();
    if scores.iter().all(|p| (0.0..=1.0).contains(p)) && (sum - 1.0).abs() < 1e-3 {
        return scores.to_vec();
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.iter().map(|e| e / total).collect()
}

fn top_k(p: &[f32], k: usize, labels: Option<&[String]>) -> Vec<Class> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    order
        .into_iter()
        .take(k)
        .map(|class| Class {
            class,
            label: labels.and_then(|l| l.get(class).cloned()),
            probability: p[class],
        })
        .collect()
}
