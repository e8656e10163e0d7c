//! `mlcapsule seal`: ONNX model in, capsule and model key out.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use capsule_engine::{Graph, Tensor};
use capsule_format::{LayerPlaintext, ModelKey, Policy, Preprocessing, SealRequest};
use clap::{Args, ValueEnum};

/// Options of `mlcapsule seal`.
#[derive(Args)]
pub struct SealArgs {
    /// The ONNX model to seal.
    model: PathBuf,
    /// Where to write the capsule.
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// Where to write the new model key (default: the capsule path with `.key`).
    /// Created readable by its owner only.
    #[arg(long, value_name = "FILE")]
    key_out: Option<PathBuf>,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
    /// Plaintext bytes per sealed chunk.
    #[arg(long, value_name = "BYTES", default_value_t = capsule_format::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    #[command(flatten)]
    preprocessing: PreprocessingArgs,
    /// Class names, one per line, in output order.
    #[arg(long, value_name = "FILE")]
    labels: Option<PathBuf>,
    /// Policy: most queries a licence for this capsule may grant.
    #[arg(long, value_name = "N")]
    max_queries: Option<u64>,
    /// Policy: last day the model may run (UTC, YYYY-MM-DD).
    #[arg(long, value_name = "DATE")]
    expires: Option<String>,
}

/// How `run` turns images into input tensors; stored, authenticated, in the capsule.
#[derive(Args, Default)]
#[command(next_help_heading = "Image preprocessing (stored in the capsule)")]
struct PreprocessingArgs {
    /// Start from a common recipe; the flags below override its parts.
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Input image size, HEIGHTxWIDTH.
    #[arg(long, value_name = "HxW", value_parser = parse_size)]
    image_size: Option<[u32; 2]>,
    /// 1 (grey) or 3 (RGB).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
    channels: Option<u8>,
    /// Multiplies 0..255 pixel values first.
    #[arg(long)]
    scale: Option<f32>,
    /// Per-channel mean, comma-separated.
    #[arg(long, value_delimiter = ',')]
    mean: Option<Vec<f32>>,
    /// Per-channel standard deviation, comma-separated.
    #[arg(long, value_delimiter = ',')]
    std: Option<Vec<f32>>,
    /// Resize the shorter side to this, then center-crop.
    #[arg(long, value_name = "PIXELS")]
    resize_shorter: Option<u32>,
}

/// Common preprocessing recipes.
#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    /// 28x28 grey, MNIST mean and std.
    Mnist,
    /// 224x224 RGB after a 256 shorter-side resize, ImageNet mean and std.
    Imagenet,
}

fn parse_size(s: &str) -> Result<[u32; 2], String> {
    let (h, w) = s
        .split_once('x')
        .ok_or("expected HEIGHTxWIDTH, e.g. 28x28")?;
    let dim = |v: &str| v.parse::<u32>().map_err(|e| format!("'{v}': {e}"));
    Ok([dim(h)?, dim(w)?])
}

impl PreprocessingArgs {
    fn build(&self) -> anyhow::Result<Option<Preprocessing>> {
        let mut p = match self.preset {
            Some(Preset::Mnist) => Preprocessing {
                size: [28, 28],
                channels: 1,
                scale: 1.0 / 255.0,
                mean: vec![0.1307],
                std: vec![0.3081],
                resize_shorter: None,
            },
            Some(Preset::Imagenet) => Preprocessing {
                size: [224, 224],
                channels: 3,
                scale: 1.0 / 255.0,
                mean: vec![0.485, 0.456, 0.406],
                std: vec![0.229, 0.224, 0.225],
                resize_shorter: Some(256),
            },
            None if self.image_size.is_none() => return Ok(None),
            None => Preprocessing {
                size: [0, 0],
                channels: 3,
                scale: 1.0 / 255.0,
                mean: vec![0.0; 3],
                std: vec![1.0; 3],
                resize_shorter: None,
            },
        };
        if let Some(size) = self.image_size {
            p.size = size;
        }
        if let Some(c) = self.channels {
            anyhow::ensure!(c == 1 || c == 3, "--channels must be 1 or 3");
            p.channels = c;
        }
        if let Some(s) = self.scale {
            p.scale = s;
        }
        if let Some(m) = &self.mean {
            p.mean = m.clone();
        } else if p.mean.len() != p.channels as usize {
            p.mean = vec![0.0; p.channels as usize];
        }
        if let Some(s) = &self.std {
            p.std = s.clone();
        } else if p.std.len() != p.channels as usize {
            p.std = vec![1.0; p.channels as usize];
        }
        if self.resize_shorter.is_some() {
            p.resize_shorter = self.resize_shorter;
        }
        let c = p.channels as usize;
        anyhow::ensure!(
            p.mean.len() == c && p.std.len() == c,
            "--mean and --std need {c} values each (one per channel)"
        );
        anyhow::ensure!(
            p.std.iter().all(|s| *s != 0.0),
            "--std values must be non-zero"
        );
        anyhow::ensure!(
            p.size[0] > 0 && p.size[1] > 0,
            "--image-size must be positive"
        );
        Ok(Some(p))
    }
}

impl SealArgs {
    /// The arguments `mlcapsule demo` seals the bundled MNIST model with.
    pub fn for_demo(model: PathBuf, output: PathBuf, key_out: PathBuf) -> SealArgs {
        SealArgs {
            model,
            output,
            key_out: Some(key_out),
            force: true,
            chunk_size: capsule_format::DEFAULT_CHUNK_SIZE,
            preprocessing: PreprocessingArgs {
                preset: Some(Preset::Mnist),
                ..Default::default()
            },
            labels: None,
            max_queries: None,
            expires: None,
        }
    }
}

/// Runs `mlcapsule seal`.
pub fn main(args: SealArgs) -> anyhow::Result<()> {
    let key_out = args
        .key_out
        .clone()
        .unwrap_or_else(|| args.output.with_extension("key"));
    anyhow::ensure!(
        key_out != args.output,
        "--key-out must differ from --output"
    );
    for path in [&args.output, &key_out] {
        if path.exists() && !args.force {
            bail!(
                "{} already exists; choose another path or pass --force to overwrite it",
                path.display()
            );
        }
    }
    if !(capsule_format::MIN_CHUNK_SIZE..=capsule_format::MAX_CHUNK_SIZE).contains(&args.chunk_size)
    {
        bail!(
            "--chunk-size must be between {} and {} bytes",
            capsule_format::MIN_CHUNK_SIZE,
            capsule_format::MAX_CHUNK_SIZE
        );
    }
    if let Some(date) = &args.expires {
        anyhow::ensure!(
            is_iso_date(date),
            "--expires '{date}' is not a date like 2027-01-31"
        );
    }
    let preprocessing = args.preprocessing.build()?;
    let labels = match &args.labels {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read labels file {}", path.display()))?
                .lines()
                .map(str::to_owned)
                .collect(),
        ),
        None => None,
    };

    let bytes = std::fs::read(&args.model)
        .with_context(|| format!("cannot read {}", args.model.display()))?;
    let imported = capsule_onnx::import(&bytes)
        .with_context(|| format!("cannot seal {}", args.model.display()))?;
    let graph = imported.graph;
    let weights = imported.weights;
    // Catch what the engine cannot run now, on the provider's machine, not the client's.
    let checked = capsule_engine::Model::new(graph.clone(), weights.clone())
        .with_context(|| format!("{} imports but cannot run", args.model.display()))?;
    drop(checked);

    let request = SealRequest {
        architecture: serde_json::to_value(&graph)?,
        preprocessing,
        labels,
        policy: Policy {
            max_queries: args.max_queries,
            expires: args.expires.clone(),
        },
        chunk_size: args.chunk_size,
        layers: layers(&graph, &weights),
    };
    let total: u64 = graph.param_count() as u64 * 4;
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template("sealing {bar:40} {bytes}/{total_bytes} ({eta})")
            .expect("a valid template"),
    );
    if total < 16 << 20 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let key = ModelKey::generate();
    let capsule_id = capsule_format::new_capsule_id();
    let sealed = capsule_format::seal(&request, &key, capsule_id, &mut |done| {
        bar.set_position(done)
    })?;
    bar.finish_and_clear();

    write_key_file(&key_out, &key.to_key_file(&capsule_id), args.force)?;
    std::fs::write(&args.output, &sealed)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "sealed {} ({} layers, {} parameters) into {} ({} bytes); model key in {} (keep it secret)",
        args.model.display(),
        request.layers.len(),
        graph.param_count(),
        args.output.display(),
        sealed.len(),
        key_out.display()
    );
    Ok(())
}

/// Groups the weights into layers: each layer holds the params that a node is
/// the first to read, named after that node, in graph order.
fn layers<'a>(graph: &Graph, weights: &'a HashMap<String, Tensor>) -> Vec<LayerPlaintext<'a>> {
    let mut assigned = HashSet::new();
    let mut out = Vec::new();
    for node in &graph.nodes {
        let tensors: Vec<_> = node
            .inputs
            .iter()
            .filter_map(|name| weights.get_key_value(name))
            .filter(|(name, _)| assigned.insert(name.as_str()))
            .map(|(name, t)| (name.clone(), t.shape().to_vec(), t.data()))
            .collect();
        if !tensors.is_empty() {
            out.push(LayerPlaintext {
                name: node.name.clone(),
                tensors,
            });
        }
    }
    out
}

fn is_iso_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// Writes the key file with mode 0600 from the start (never world-readable, not even briefly).
fn write_key_file(path: &Path, text: &str, overwrite: bool) -> anyhow::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create key file {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}
