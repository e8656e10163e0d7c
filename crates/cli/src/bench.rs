//! `mlcapsule bench`: latency of plain and sealed inference, the paper's
//! Tables 1 and 2 reproduced on this machine, and any ONNX model.
//!
//! Every case runs in three modes on the same engine, inputs and threads:
//! - `plain`: the weights in memory ([`capsule_engine::Model`]);
//! - `sealed-streaming`: a real capsule sealed in memory; every query opens
//!   each layer's chunks ([`capsule_format::Unsealer::open_layer`]) just
//!   before the first node that reads it and zeroizes it after the last,
//!   as the paper's enclave does;
//! - `sealed-cached`: the capsule unsealed once
//!   ([`capsule_enclave::SealedModel`]), as the enclave keeps a model.
//!
//! After one warm-up query per mode, the modes take turns query by query,
//! so that a noisy machine slows all three alike and the ratios stay fair.
//! Each case reports the median, min and max, and the streaming mode also
//! the AES-GCM bound: the layer bytes it unseals per query divided by
//! [`AES_GCM_BYTES_PER_SEC`], the least unsealing can cost on one core.
//!
//! Not here: the enclave process and its host pipe (the streaming mode
//! unseals in this process), and accuracy checks (`mlcapsule run` and the
//! `reference_models` tests compare outputs with onnxruntime).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capsule_engine::{
    Activation, ConvAttrs, Graph, Model, Node, Op, ParamInfo, Plan, Tensor, ValueInfo, WeightSource,
};
use capsule_format::{
    Capsule, LayerPlaintext, ModelKey, Policy, SealRequest, Unsealer, seal as seal_capsule,
};
use clap::Args;

/// AES-256-GCM throughput of one core here (`ring`, 64 MiB buffer;
/// shared/design/DATA.md): the floor of any streaming figure.
const AES_GCM_BYTES_PER_SEC: f64 = 6.5e9;

/// Sealed/plain latency factors of the MLCapsule paper (Hanzlik et al.,
/// "MLCapsule: Guarded Offline Deployment of Machine Learning as a
/// Service", section 6): Table 1, dense layers on SGX, 12x to 25x with
/// `-O3`; Table 2, convolutions, at most 2.31x. The paper's per-row cells
/// are summarised as these ranges, the figures its text and issue 4 quote.
const PAPER: [(Family, &str); 3] = [
    (Family::Dense, "12-25x"),
    (Family::Conv, "<=2.31x"),
    (Family::Separable, "<=2.31x"),
];

/// Options of `mlcapsule bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Benchmark this ONNX model instead of the default tables (repeatable).
    #[arg(long = "model", value_name = "FILE.onnx")]
    models: Vec<PathBuf>,
    /// Thread counts, comma-separated [default: 1,2; with --model: all cores].
    #[arg(long, value_delimiter = ',', value_name = "N")]
    threads: Vec<usize>,
    /// Batch sizes of whole networks, comma-separated [default: 1,8; with --model: 1].
    #[arg(long, value_delimiter = ',', value_name = "B")]
    batch: Vec<usize>,
    /// Print one JSON object per line and case instead of tables.
    #[arg(long)]
    json: bool,
    /// Only the smallest case, a few queries (CI's smoke run).
    #[arg(long)]
    quick: bool,
    /// Only the plain mode (for comparisons with other engines).
    #[arg(long)]
    plain_only: bool,
    /// Timed queries per mode [default: as many as fit in about 1.5 s, 3 to 30].
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
    /// Where the default run looks for mobilenetv2.onnx, resnet18.onnx and vgg16.onnx.
    #[arg(long, value_name = "DIR", default_value = "build/models")]
    models_dir: PathBuf,
    /// Skip the layer tables (Tables 1 and 2) in the default run.
    #[arg(long)]
    networks_only: bool,
    /// Only the cases whose name contains this text (e.g. "dense 4096", "resnet").
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
}

/// The row families of the paper's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// Table 1: a dense layer.
    Dense,
    /// Table 2: a 3x3 convolution.
    Conv,
    /// Table 2's depthwise-separable form: depthwise 3x3, then pointwise 1x1.
    Separable,
    /// A whole network.
    Network,
}

impl Family {
    fn paper(self) -> Option<&'static str> {
        PAPER.iter().find(|(f, _)| *f == self).map(|(_, p)| *p)
    }
}

/// How a case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Plain,
    Streaming,
    Cached,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Streaming => "sealed-streaming",
            Mode::Cached => "sealed-cached",
        }
    }
}

/// One model to time: its graph, weights and input shape (batch first).
struct Case {
    name: String,
    family: Family,
    graph: Graph,
    weights: HashMap<String, Tensor>,
    /// Input shape without the batch dimension.
    item_shape: Vec<usize>,
}

/// What one mode of one case measured.
struct Timing {
    mode: Mode,
    samples: Vec<f64>,
}

impl Timing {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    fn median(&self) -> f64 {
        let s = self.sorted();
        let n = s.len();
        if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    }

    fn min(&self) -> f64 {
        self.sorted()[0]
    }

    fn max(&self) -> f64 {
        *self.sorted().last().expect("at least one sample")
    }
}

/// Runs `mlcapsule bench`.
pub fn main(args: BenchArgs) -> anyhow::Result<()> {
    let custom = !args.models.is_empty();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = match (&args.threads[..], custom || args.quick) {
        ([], true) => vec![cores],
        ([], false) => vec![1, 2],
        (t, _) => t.to_vec(),
    };
    let batches = match (&args.batch[..], custom || args.quick) {
        ([], true) => vec![1],
        ([], false) => vec![1, 8],
        (b, _) => b.to_vec(),
    };
    if threads.contains(&0) || batches.contains(&0) {
        bail!("--threads and --batch take counts of 1 or more");
    }
    // The pool is sized once, by the first call: make it the largest count.
    capsule_engine::set_threads(threads.iter().copied().max().unwrap_or(1));
    let modes: &[Mode] = if args.plain_only {
        &[Mode::Plain]
    } else {
        &[Mode::Plain, Mode::Streaming, Mode::Cached]
    };
    let mut out = Report::new(args.json);

    let mut layer_cases = Vec::new();
    let mut networks = Vec::new();
    if custom {
        networks.clone_from(&args.models);
    } else if args.quick {
        layer_cases.push(dense(256));
    } else {
        if !args.networks_only {
            layer_cases.extend([256, 512, 1024, 2048, 4096].map(dense));
            let table2 = [(64, 224), (128, 112), (256, 56), (512, 28), (512, 14)];
            layer_cases.extend(table2.map(|(c, hw)| conv(c, hw)));
            layer_cases.extend(table2.map(|(c, hw)| separable(c, hw)));
        }
        for name in ["mobilenetv2", "resnet18", "vgg16"] {
            let path = args.models_dir.join(format!("{name}.onnx"));
            if path.exists() {
                networks.push(path);
            } else {
                out.note(&format!(
                    "{} not found: skipped (scripts/export_models.py makes it)",
                    path.display()
                ));
            }
        }
    }

    let selected = |name: &str| {
        args.only
            .as_ref()
            .is_none_or(|only| name.contains(only.as_str()))
    };
    layer_cases.retain(|case| selected(&case.name));
    let runs = if args.quick { Some(3) } else { args.runs };
    for case in &layer_cases {
        // The paper's layer tables are at batch 1.
        let configs: Vec<(usize, usize)> = threads.iter().map(|&t| (t, 1)).collect();
        bench_case(case, modes, &configs, runs, &mut out)?;
    }
    for path in &networks {
        if !selected(&path.to_string_lossy()) {
            continue;
        }
        let case = network(path)?;
        let configs: Vec<(usize, usize)> = batches
            .iter()
            .flat_map(|&b| threads.iter().map(move |&t| (t, b)))
            .collect();
        bench_case(&case, modes, &configs, runs, &mut out)?;
    }
    out.finish();
    Ok(())
}

/// Times `case` in every mode of `modes` with `threads` threads at batch
/// `batch`, and reports it.
fn bench_case(
    case: &Case,
    modes: &[Mode],
    configs: &[(usize, usize)],
    runs: Option<usize>,
    out: &mut Report,
) -> anyhow::Result<()> {
    let plain = Model::new(case.graph.clone(), case.weights.clone())
        .with_context(|| format!("{} cannot run", case.name))?;
    let sealed = if modes.len() > 1 {
        Some(Sealed::new(case)?)
    } else {
        None
    };
    let capsule = sealed.as_ref().map(Sealed::capsule).transpose()?;
    let unsealer = match (&sealed, &capsule) {
        (Some(s), Some(c)) => Some(c.unseal(&s.key)?),
        _ => None,
    };
    let cached = match (&sealed, &capsule) {
        (Some(s), Some(c)) => Some(
            capsule_enclave::SealedModel::open(c, &s.key)
                .context("cannot open the benchmark capsule")?,
        ),
        _ => None,
    };

    let mut stream = match (&sealed, &capsule, &unsealer) {
        (Some(s), Some(c), Some(u)) => Some(LayerStream::new(c, u, s.plan.graph())),
        _ => None,
    };
    for &(threads, batch) in configs {
        capsule_engine::set_threads(threads);
        let mut shape = vec![batch];
        shape.extend(&case.item_shape);
        let inputs = [pseudo_random(&shape, 1)];
        let mut query = |mode: Mode| -> anyhow::Result<f64> {
            let start = Instant::now();
            let output = match mode {
                Mode::Plain => plain.run(&inputs)?,
                Mode::Streaming => match (&sealed, &mut stream) {
                    (Some(s), Some(source)) => s.stream(source, &inputs)?,
                    _ => bail!("the streaming mode needs the sealed case"),
                },
                Mode::Cached => cached.as_ref().expect("cached").run(&inputs)?,
            };
            let elapsed = start.elapsed();
            std::hint::black_box(output);
            Ok(elapsed.as_secs_f64() * 1e3)
        };

        // Warm-up: caches, allocator, the engine's buffers; it also sizes the run.
        let mut first = Duration::ZERO;
        for &mode in modes {
            first += Duration::from_secs_f64(query(mode)? / 1e3);
        }
        let rounds = runs.unwrap_or_else(|| {
            let per_round = first.as_secs_f64().max(1e-6);
            ((1.5 / per_round) as usize).clamp(3, 30)
        });
        let mut timings: Vec<Timing> = modes
            .iter()
            .map(|&mode| Timing {
                mode,
                samples: Vec::with_capacity(rounds),
            })
            .collect();
        for _ in 0..rounds {
            for timing in &mut timings {
                timing.samples.push(query(timing.mode)?);
            }
        }
        let weight_bytes = case.graph.param_count() * size_of::<f32>();
        out.case(case, threads, batch, weight_bytes, &timings);
    }
    Ok(())
}

/// A case sealed into an in-memory capsule, with the key to open it.
struct Sealed {
    bytes: Vec<u8>,
    key: ModelKey,
    plan: Plan,
}

impl Sealed {
    /// Seals `case` as `mlcapsule seal` would: one layer per node that
    /// first reads a weight, default chunk size.
    fn new(case: &Case) -> anyhow::Result<Sealed> {
        let request = SealRequest {
            architecture: serde_json::to_value(&case.graph)?,
            preprocessing: None,
            labels: None,
            detector: None,
            policy: Policy::default(),
            chunk_size: capsule_format::DEFAULT_CHUNK_SIZE,
            layers: layers(&case.graph, &case.weights),
        };
        let key = ModelKey::generate();
        let bytes = seal_capsule(
            &request,
            &key,
            capsule_format::new_capsule_id(),
            &mut |_| {},
        )
        .context("cannot seal the benchmark case")?;
        let plan = Plan::new(case.graph.clone())?;
        Ok(Sealed { bytes, key, plan })
    }

    fn capsule(&self) -> anyhow::Result<Capsule<'_>> {
        Capsule::parse(&self.bytes).context("the benchmark capsule does not parse")
    }

    /// One query that unseals every layer when it is first needed. The
    /// capsule was parsed and its header checked once, outside the query,
    /// as the enclave does when it loads a model.
    fn stream(
        &self,
        source: &mut LayerStream<'_>,
        inputs: &[Tensor],
    ) -> anyhow::Result<Vec<Tensor>> {
        source.node = 0;
        let outputs = self.plan.run(inputs, source);
        source.evict_all();
        Ok(outputs?)
    }
}

/// The streaming [`WeightSource`]: unseals a layer before the first node
/// that reads it, zeroizes it after the last one. Decoded weights go into
/// buffers kept from query to query (at most the layers in use at once),
/// as an enclave would keep its working memory.
struct LayerStream<'a> {
    capsule: &'a Capsule<'a>,
    unsealer: &'a Unsealer,
    /// Param index by name.
    param_index: HashMap<&'a str, usize>,
    /// Per param: its layer.
    param_layer: Vec<usize>,
    /// Per layer: the params it holds.
    layer_params: Vec<Vec<usize>>,
    /// Per node: the layers it reads.
    node_layers: Vec<Vec<usize>>,
    /// Per layer: the last node that reads it.
    last_reader: Vec<usize>,
    /// Per param: its value while its layer is unsealed.
    loaded: Vec<Option<Tensor>>,
    /// Zeroized buffers of evicted weights, for the next layers.
    spare: Vec<Vec<f32>>,
    /// Index of the node about to run.
    node: usize,
}

impl<'a> LayerStream<'a> {
    fn new(capsule: &'a Capsule<'a>, unsealer: &'a Unsealer, graph: &'a Graph) -> LayerStream<'a> {
        let header = unsealer.header();
        let layer_of: HashMap<&str, usize> = header
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.layer))
            .collect();
        let param_index: HashMap<&str, usize> = graph
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let param_layer: Vec<usize> = graph
            .params
            .iter()
            .map(|p| layer_of.get(p.name.as_str()).copied().unwrap_or(usize::MAX))
            .collect();
        let mut layer_params = vec![Vec::new(); header.layers.len()];
        for (p, &l) in param_layer.iter().enumerate() {
            if let Some(params) = layer_params.get_mut(l) {
                params.push(p);
            }
        }
        let mut last_reader = vec![0; header.layers.len()];
        let node_layers = graph
            .nodes
            .iter()
            .enumerate()
            .map(|(j, node)| {
                let mut layers: Vec<usize> = node
                    .inputs
                    .iter()
                    .filter_map(|name| param_index.get(name.as_str()))
                    .map(|&p| param_layer[p])
                    .filter(|&l| l < last_reader.len())
                    .collect();
                layers.dedup();
                for &l in &layers {
                    last_reader[l] = j;
                }
                layers
            })
            .collect();
        LayerStream {
            capsule,
            unsealer,
            param_index,
            param_layer,
            layer_params,
            node_layers,
            last_reader,
            loaded: vec![None; graph.params.len()],
            spare: Vec::new(),
            node: 0,
        }
    }

    fn evict(&mut self, layer: usize) {
        for &p in &self.layer_params[layer] {
            if let Some(t) = self.loaded[p].take() {
                // Zeroize, as the enclave does; `black_box` keeps the writes.
                let (_, mut data) = t.into_parts();
                data.fill(0.0);
                std::hint::black_box(&data);
                self.spare.push(data);
            }
        }
    }

    fn evict_all(&mut self) {
        for layer in 0..self.layer_params.len() {
            self.evict(layer);
        }
    }
}

impl WeightSource for LayerStream<'_> {
    fn prepare(&mut self, _node: &Node) -> Result<(), capsule_engine::Error> {
        let layers = self.node_layers.get(self.node).cloned().unwrap_or_default();
        for layer in layers {
            let first = self.layer_params[layer][0];
            if self.loaded[first].is_some() {
                continue;
            }
            let plaintext = self
                .unsealer
                .open_layer(layer, self.capsule.sealed_layer(layer))
                .map_err(|e| capsule_engine::Error::InvalidWeights {
                    reason: format!("layer {layer} does not unseal: {e}"),
                })?;
            // Decodes each tensor (capsule-v1 §4.3: little-endian f32 at
            // its offset) into a spare buffer; `layer_tensors` would
            // allocate afresh every query.
            for entry in self
                .unsealer
                .header()
                .tensors
                .iter()
                .filter(|t| t.layer == layer)
            {
                let Some(&p) = self.param_index.get(entry.name.as_str()) else {
                    continue;
                };
                let len = entry.shape.iter().product::<usize>();
                let start = usize::try_from(entry.offset).unwrap_or(usize::MAX);
                let bytes = plaintext
                    .get(start..)
                    .and_then(|b| b.get(..len * 4))
                    .ok_or_else(|| capsule_engine::Error::InvalidWeights {
                        reason: format!("tensor '{}' lies outside its layer", entry.name),
                    })?;
                let mut data = self.spare.pop().unwrap_or_default();
                data.clear();
                data.extend(
                    bytes
                        .as_chunks::<4>()
                        .0
                        .iter()
                        .map(|b| f32::from_le_bytes(*b)),
                );
                self.loaded[p] = Some(Tensor::new(entry.shape.clone(), data)?);
            }
        }
        Ok(())
    }

    fn param(&self, index: usize, _info: &ParamInfo) -> Option<&Tensor> {
        debug_assert!(self.param_layer[index] != usize::MAX);
        self.loaded.get(index)?.as_ref()
    }

    fn release(&mut self, _node: &Node) {
        let done: Vec<usize> = self.node_layers[self.node]
            .iter()
            .copied()
            .filter(|&l| self.last_reader[l] == self.node)
            .collect();
        for layer in done {
            self.evict(layer);
        }
        self.node += 1;
    }
}

/// Groups the weights into layers as `mlcapsule seal` does: each layer
/// holds the params a node is the first to read, named after that node.
/// The capsule's tensor table lists a layer's tensors in this order.
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

/// Table 1's row: a dense `n x n` layer with bias, as an ONNX Gemm with
/// `transB` (PyTorch's `Linear`).
fn dense(n: usize) -> Case {
    let graph = Graph {
        inputs: vec![input_info(&[n])],
        params: vec![param("w", &[n, n]), param("b", &[n])],
        nodes: vec![node(
            "dense",
            Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: false,
                trans_b: true,
            },
            &["x", "w", "b"],
            "y",
        )],
        outputs: vec!["y".into()],
    };
    let weights = fill(&graph, n);
    Case {
        name: format!("dense {n}x{n}"),
        family: Family::Dense,
        graph,
        weights,
        item_shape: vec![n],
    }
}

/// Table 2's row: a 3x3 convolution, `c` channels in and out, on a
/// `c x hw x hw` image, padding 1, with bias.
fn conv(c: usize, hw: usize) -> Case {
    let graph = Graph {
        inputs: vec![input_info(&[c, hw, hw])],
        params: vec![param("w", &[c, c, 3, 3]), param("b", &[c])],
        nodes: vec![node("conv", Op::Conv(conv3x3(1, 1)), &["x", "w", "b"], "y")],
        outputs: vec!["y".into()],
    };
    let weights = fill(&graph, c * 9);
    Case {
        name: format!("conv3x3 {c}x{hw}x{hw}"),
        family: Family::Conv,
        graph,
        weights,
        item_shape: vec![c, hw, hw],
    }
}

/// The depthwise-separable form of [`conv`]: depthwise 3x3, then
/// pointwise 1x1 from `c` to `c` channels, each with bias (two layers).
fn separable(c: usize, hw: usize) -> Case {
    let pointwise = ConvAttrs {
        kernel: [1, 1],
        pads: [0; 4],
        ..conv3x3(1, 1)
    };
    let graph = Graph {
        inputs: vec![input_info(&[c, hw, hw])],
        params: vec![
            param("dw.w", &[c, 1, 3, 3]),
            param("dw.b", &[c]),
            param("pw.w", &[c, c, 1, 1]),
            param("pw.b", &[c]),
        ],
        nodes: vec![
            node("dw", Op::Conv(conv3x3(c, 1)), &["x", "dw.w", "dw.b"], "d"),
            node("pw", Op::Conv(pointwise), &["d", "pw.w", "pw.b"], "y"),
        ],
        outputs: vec!["y".into()],
    };
    let weights = fill(&graph, c);
    Case {
        name: format!("dwsep3x3 {c}x{hw}x{hw}"),
        family: Family::Separable,
        graph,
        weights,
        item_shape: vec![c, hw, hw],
    }
}

/// A whole ONNX network.
fn network(path: &Path) -> anyhow::Result<Case> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let imported = capsule_onnx::import(&bytes)
        .with_context(|| format!("cannot import {}", path.display()))?;
    let [input] = imported.graph.inputs.as_slice() else {
        bail!(
            "{} has {} inputs; bench feeds models with exactly one",
            path.display(),
            imported.graph.inputs.len()
        );
    };
    let Some((_, item)) = input.shape.split_first() else {
        bail!(
            "{}'s input is a scalar; bench needs a batch dimension",
            path.display()
        );
    };
    let item_shape = item
        .iter()
        .map(|d| d.context("only the batch dimension may be dynamic"))
        .collect::<anyhow::Result<Vec<usize>>>()
        .with_context(|| format!("{}'s input shape {:?}", path.display(), input.shape))?;
    let name = path.file_stem().map_or_else(
        || path.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    Ok(Case {
        name,
        family: Family::Network,
        graph: imported.graph,
        weights: imported.weights,
        item_shape,
    })
}

fn conv3x3(group: usize, stride: usize) -> ConvAttrs {
    ConvAttrs {
        kernel: [3, 3],
        strides: [stride, stride],
        pads: [1, 1, 1, 1],
        dilations: [1, 1],
        group,
        activation: Activation::None,
    }
}

fn input_info(item: &[usize]) -> ValueInfo {
    let mut shape = vec![None];
    shape.extend(item.iter().map(|&d| Some(d)));
    ValueInfo {
        name: "x".into(),
        shape,
    }
}

fn param(name: &str, shape: &[usize]) -> ParamInfo {
    ParamInfo {
        name: name.into(),
        shape: shape.to_vec(),
    }
}

fn node(name: &str, op: Op, inputs: &[&str], output: &str) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: vec![output.into()],
    }
}

/// Weights for every param of `graph`, scaled by `1/sqrt(fan_in)` so that
/// activations keep their size (no denormals, no overflow).
fn fill(graph: &Graph, fan_in: usize) -> HashMap<String, Tensor> {
    let scale = 1.0 / (fan_in as f32).sqrt();
    graph
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut t = pseudo_random(&p.shape, i as u32 + 7);
            t.data_mut().iter_mut().for_each(|v| *v *= scale);
            (p.name.clone(), t)
        })
        .collect()
}

/// Values in [-1, 1) from a fixed-seed xorshift: varied, repeatable.
fn pseudo_random(shape: &[usize], seed: u32) -> Tensor {
    let mut state = seed.wrapping_mul(2_654_435_761) | 1;
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::new(shape.to_vec(), data).expect("volume matches")
}

/// Prints results as tables or JSON lines.
struct Report {
    json: bool,
    /// The family of the last table header printed.
    family: Option<Family>,
}

impl Report {
    fn new(json: bool) -> Report {
        Report { json, family: None }
    }

    fn note(&self, text: &str) {
        if self.json {
            eprintln!("note: {text}");
        } else {
            println!("note: {text}");
        }
    }

    fn case(
        &mut self,
        case: &Case,
        threads: usize,
        batch: usize,
        weight_bytes: usize,
        timings: &[Timing],
    ) {
        let plain = timings
            .iter()
            .find(|t| t.mode == Mode::Plain)
            .map(Timing::median);
        let aes_ms = weight_bytes as f64 / AES_GCM_BYTES_PER_SEC * 1e3;
        if self.json {
            for t in timings {
                let mut line = serde_json::json!({
                    "case": case.name,
                    "mode": t.mode.name(),
                    "threads": threads,
                    "batch": batch,
                    "median_ms": round(t.median()),
                    "min_ms": round(t.min()),
                    "max_ms": round(t.max()),
                    "runs": t.samples.len(),
                    "weight_bytes": weight_bytes,
                });
                if let (Some(plain), true) = (plain, t.mode != Mode::Plain) {
                    line["ratio_to_plain"] = round(t.median() / plain).into();
                }
                if t.mode == Mode::Streaming {
                    line["aes_bound_ms"] = round(aes_ms).into();
                    if let Some(paper) = case.family.paper() {
                        line["paper_ratio"] = paper.into();
                    }
                }
                println!("{line}");
            }
            return;
        }
        if self.family != Some(case.family) {
            self.family = Some(case.family);
            let title = match case.family {
                Family::Dense => "Table 1: dense layers (batch 1)",
                Family::Conv => "Table 2: 3x3 convolutions, padding 1 (batch 1)",
                Family::Separable => "Table 2: depthwise-separable 3x3 + 1x1 (batch 1)",
                Family::Network => "Whole networks",
            };
            let paper = case
                .family
                .paper()
                .map_or(String::new(), |p| format!("; paper's sealed/plain: {p}"));
            println!("\n{title}{paper}");
            println!(
                "{:<24} {:>3} {:>5} {:>22} {:>22} {:>6} {:>8} {:>22} {:>6}",
                "case",
                "thr",
                "batch",
                "plain ms [min-max]",
                "streaming ms [min-max]",
                "x",
                "AES ms",
                "cached ms [min-max]",
                "x"
            );
        }
        let cell = |mode: Mode| {
            timings.iter().find(|t| t.mode == mode).map_or(
                ("-".to_string(), "-".to_string()),
                |t| {
                    let ratio = plain.map_or("-".to_string(), |p| format!("{:.2}", t.median() / p));
                    (
                        format!("{} [{}-{}]", ms(t.median()), ms(t.min()), ms(t.max())),
                        ratio,
                    )
                },
            )
        };
        let (plain_cell, _) = cell(Mode::Plain);
        let (streaming, s_ratio) = cell(Mode::Streaming);
        let (cached, c_ratio) = cell(Mode::Cached);
        let mut line = String::new();
        let _ = write!(
            line,
            "{:<24} {:>3} {:>5} {:>22} {:>22} {:>6} {:>8} {:>22} {:>6}",
            case.name,
            threads,
            batch,
            plain_cell,
            streaming,
            s_ratio,
            ms(aes_ms),
            cached,
            c_ratio
        );
        println!("{line}");
    }

    fn finish(&self) {
        if !self.json {
            println!(
                "\nx: median over plain's median, same run, modes alternating. AES ms: weight \
                 bytes / {:.1} GB/s, the least one core spends unsealing a query's layers.",
                AES_GCM_BYTES_PER_SEC / 1e9
            );
        }
    }
}

/// Milliseconds with three significant digits (at least two decimals).
fn ms(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.3}")
    } else if v < 100.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

/// Three decimals: enough for milliseconds, short JSON.
fn round(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
