//! `mlcapsule seal`: ONNX model in, capsule and model key out; with `--policy`, the
//! provider's defenses (spec/policy.md) authenticated in its header, and with `--detector`,
//! the input detector network sealed beside the model (capsule-v1 §4.6).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use capsule_enclave::seal_layers;
use capsule_engine::{Graph, Model, Tensor};
use capsule_format::{
    Aead, DETECTOR_PREFIX, Detector, DetectorInput, ModelKey, Policy, Preprocessing, SealRequest,
};
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
    /// Plaintext bytes per sealed chunk (bytes, or e.g. 64KiB).
    #[arg(long, value_name = "BYTES", default_value_t = capsule_format::DEFAULT_CHUNK_SIZE,
          value_parser = crate::bench::parse_chunk_size)]
    chunk_size: u32,
    /// The cipher that seals the weights' chunks: aegis-256x4 (the fastest to open),
    /// aegis-256x2 or aes-256-gcm (where a FIPS-approved cipher is required).
    #[arg(long, value_name = "AEAD", default_value_t = Aead::SEAL_DEFAULT)]
    aead: Aead,
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
    /// Policy: the defenses the enclave runs on every query (noising, output policies,
    /// PRADA, the input detector's rule), as TOML (spec/policy.md).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// The input detector network to seal beside the model: a directory with
    /// `detector.json` (the engine graph) and one `<param>.npy` per weight
    /// (spec/policy.md §8). Needs a `[detector]` table in --policy.
    #[arg(long, value_name = "DIR")]
    detector: Option<PathBuf>,
    /// What the detector takes: `unit`, image pixels scaled to [0, 1] (derived from the
    /// preprocessing), or `model`, the model's input as it is.
    #[arg(long, value_enum, default_value_t = DetectorTakes::Unit)]
    detector_input: DetectorTakes,
}

/// What the input detector network was trained on.
#[derive(Clone, Copy, ValueEnum)]
enum DetectorTakes {
    /// Pixels scaled to [0, 1] (the lab's convention).
    Unit,
    /// The model's own input.
    Model,
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
            aead: Aead::SEAL_DEFAULT,
            preprocessing: PreprocessingArgs {
                preset: Some(Preset::Mnist),
                ..Default::default()
            },
            labels: None,
            max_queries: None,
            expires: None,
            policy: None,
            detector: None,
            detector_input: DetectorTakes::Unit,
        }
    }

    /// [`SealArgs::for_demo`] with a defense policy file.
    pub fn with_policy(mut self, policy: PathBuf) -> SealArgs {
        self.policy = Some(policy);
        self
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
    let defense = match &args.policy {
        Some(path) => Some(read_policy(path, &checked)?),
        None => None,
    };
    drop(checked);
    let detector = match &args.detector {
        Some(dir) => Some(read_detector(
            dir,
            &graph,
            defense.as_ref(),
            args.detector_input,
            preprocessing.as_ref(),
        )?),
        None => None,
    };
    if let Some(rule) = defense.as_ref().and_then(|p| p.detector.as_ref())
        && rule.enabled
        && detector.is_none()
    {
        bail!(
            "the policy's [detector] table needs the detector network: pass --detector DIR (spec/policy.md §8)"
        );
    }

    let mut all_layers = Vec::new();
    if let Some(d) = &detector {
        all_layers = seal_layers(&d.graph, &d.weights, DETECTOR_PREFIX);
    }
    let detector_layers = all_layers.len();
    all_layers.extend(seal_layers(&graph, &weights, ""));
    let request = SealRequest {
        architecture: serde_json::to_value(&graph)?,
        preprocessing,
        labels,
        detector: detector.as_ref().map(|d| Detector {
            architecture: serde_json::to_value(&d.graph).expect("a Graph always serialises"),
            input: d.input,
        }),
        policy: Policy {
            max_queries: args.max_queries,
            expires: args.expires.clone(),
            defense: defense
                .as_ref()
                .filter(|p| !p.is_empty())
                .map(|p| serde_json::to_value(p).expect("a Policy always serialises")),
        },
        chunk_size: args.chunk_size,
        aead: args.aead,
        layers: all_layers,
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
        request.layers.len() - detector_layers,
        graph.param_count(),
        args.output.display(),
        sealed.len(),
        key_out.display()
    );
    if let Some(d) = &detector {
        println!(
            "input detector from {}: {detector_layers} layers, {} parameters, sealed in front of the model",
            args.detector.as_deref().unwrap_or(Path::new("?")).display(),
            d.graph.param_count()
        );
    }
    if let Some(policy) = &defense {
        for line in crate::inspect::policy_lines(policy) {
            println!("policy: {line}");
        }
    }
    Ok(())
}

/// Reads `policy.toml` and checks it against the model (spec/policy.md §1): the prior's
/// length and `top_k` against the model's classes, which a dry run finds.
fn read_policy(path: &Path, model: &Model) -> anyhow::Result<capsule_defense::Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy file {}", path.display()))?;
    let policy = capsule_defense::Policy::from_toml(&text)
        .with_context(|| format!("cannot use policy {}", path.display()))?;
    let needs_classes = policy.noise.is_some()
        || policy.output != capsule_defense::OutputPolicy::default()
        || policy.prada.is_some();
    if policy.is_empty() {
        return Ok(policy);
    }
    let graph = model.graph();
    anyhow::ensure!(
        graph.inputs.len() == 1 && graph.outputs.len() == 1,
        "{}: a defense policy needs a model with one input and one output, this one has {} and {}",
        path.display(),
        graph.inputs.len(),
        graph.outputs.len()
    );
    let shapes = dry_run(model).with_context(|| {
        format!(
            "{}: the model does not run on a zero input, so its classes are unknown",
            path.display()
        )
    })?;
    match shapes.first().map(Vec::as_slice) {
        Some(&[1, classes]) => policy
            .validate_for_model(classes)
            .with_context(|| format!("cannot use policy {}", path.display()))?,
        other if needs_classes => bail!(
            "{}: noising, output policies and PRADA need a model whose output is [batch, classes], this one gives {:?}",
            path.display(),
            other.unwrap_or_default()
        ),
        _ => {}
    }
    if let Some(prada) = &policy.prada {
        let dim: usize = graph.inputs[0].shape[1..]
            .iter()
            .map(|d| d.unwrap_or(1))
            .product();
        let bound = prada.memory_bound(dim, 1000).saturating_mul(2);
        anyhow::ensure!(
            bound <= capsule_enclave::MAX_DEFENSE_STATE,
            "{}: with prada.max_stored = {} the sealed PRADA state may reach {bound} bytes, more than the enclave keeps ({}); lower prada.max_stored or use storage = \"u8\"",
            path.display(),
            prada.max_stored,
            capsule_enclave::MAX_DEFENSE_STATE
        );
    }
    Ok(policy)
}

/// The shapes of the model's outputs on a zero input of batch 1 (other dynamic
/// dimensions 1 too), if it runs.
fn dry_run(model: &Model) -> Option<Vec<Vec<usize>>> {
    let inputs: Vec<Tensor> = model
        .graph()
        .inputs
        .iter()
        .map(|i| Tensor::zeros(i.shape.iter().map(|d| d.unwrap_or(1)).collect()))
        .collect();
    let outputs = model.run(&inputs).ok()?;
    Some(outputs.iter().map(|t| t.shape().to_vec()).collect())
}

/// An input detector network read from its export directory, checked.
struct DetectorNetwork {
    graph: Graph,
    weights: HashMap<String, Tensor>,
    input: DetectorInput,
}

/// Reads a detector export (spec/policy.md §8: `detector.json` and one `<param>.npy` per
/// weight) and checks that it runs on the model's input and gives what the policy's
/// `[detector]` rule reads.
fn read_detector(
    dir: &Path,
    model: &Graph,
    policy: Option<&capsule_defense::Policy>,
    takes: DetectorTakes,
    preprocessing: Option<&Preprocessing>,
) -> anyhow::Result<DetectorNetwork> {
    let Some(rule) = policy.and_then(|p| p.detector.as_ref()) else {
        bail!(
            "--detector needs a --policy with a [detector] table that says when it refuses (spec/policy.md §3.4)"
        );
    };
    let json_path = dir.join("detector.json");
    let graph =
        Graph::from_json(&std::fs::read(&json_path).with_context(|| {
            format!("cannot read the detector's graph {}", json_path.display())
        })?)
        .with_context(|| format!("{}", json_path.display()))?;
    let mut weights = HashMap::new();
    for param in &graph.params {
        let safe = Path::new(&param.name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        anyhow::ensure!(
            safe,
            "{}: weight name '{}' is not a relative file name",
            json_path.display(),
            param.name
        );
        let path = dir.join(format!("{}.npy", param.name));
        let bytes = std::fs::read(&path)
            .with_context(|| format!("cannot read the detector's weight {}", path.display()))?;
        let tensor = capsule_engine::npy::read_npy(&bytes)
            .with_context(|| format!("{} is not a readable .npy tensor", path.display()))?;
        weights.insert(param.name.clone(), tensor);
    }
    let network = Model::new(graph.clone(), weights.clone())
        .with_context(|| format!("the detector in {} cannot run", dir.display()))?;
    let input = match takes {
        DetectorTakes::Model => DetectorInput::IDENTITY,
        DetectorTakes::Unit => unit_input(preprocessing)?,
    };
    // One zero input of the model's, transformed, must give one score row the rule reads.
    let [model_input] = model.inputs.as_slice() else {
        bail!("an input detector needs a model with one input");
    };
    let x = Tensor::zeros(model_input.shape.iter().map(|d| d.unwrap_or(1)).collect());
    let x = Tensor::new(
        x.shape().to_vec(),
        x.data()
            .iter()
            .map(|v| v * input.scale + input.offset)
            .collect(),
    )?;
    let scores = network.run(&[x]).with_context(|| {
        format!(
            "the detector in {} does not run on the model's input shape {}",
            dir.display(),
            crate::input::shape_text(&model_input.shape)
        )
    })?;
    let [scores] = scores.as_slice() else {
        bail!("the detector in {} must have one output", dir.display());
    };
    anyhow::ensure!(
        scores.shape().first() == Some(&1) && !scores.is_empty(),
        "the detector in {} gives shape {:?} for one input; it must give one row of scores per input",
        dir.display(),
        scores.shape()
    );
    capsule_defense::detector::decide(rule, scores.data())
        .with_context(|| format!("the detector in {} does not fit the policy", dir.display()))?;
    Ok(DetectorNetwork {
        graph,
        weights,
        input,
    })
}

/// The transform from the model's input back to pixels in [0, 1]: with the capsule's
/// preprocessing `x = (p * s - mean) / std` for a pixel `p` in 0..=255, so
/// `p / 255 = x * std / (255 s) + mean / (255 s)`. Needs one mean and std for all channels.
fn unit_input(preprocessing: Option<&Preprocessing>) -> anyhow::Result<DetectorInput> {
    let Some(p) = preprocessing else {
        bail!(
            "--detector-input unit needs the image preprocessing (--preset or --image-size) to know the pixel scale; pass --detector-input model if the detector takes the model's input as it is"
        );
    };
    let same = |v: &[f32]| v.windows(2).all(|w| w[0] == w[1]);
    anyhow::ensure!(
        same(&p.mean) && same(&p.std) && p.scale != 0.0,
        "--detector-input unit needs one mean and std for all channels; pass --detector-input model and build the normalisation into the detector"
    );
    // 1/255 is not exact in f32; do not let that show up as 0.30809996 instead of 0.3081.
    let mut unit = 255.0 * f64::from(p.scale);
    if (unit - 1.0).abs() < 1e-6 {
        unit = 1.0;
    }
    Ok(DetectorInput {
        scale: (f64::from(p.std[0]) / unit) as f32,
        offset: (f64::from(p.mean[0]) / unit) as f32,
    })
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
