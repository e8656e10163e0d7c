//! `mlcapsule bench`: latency of plain and sealed inference, the paper's
//! Tables 1 and 2 reproduced on this machine, and any ONNX model.
//!
//! Every case runs in three modes on the same engine, inputs and threads:
//! - `plain`: the weights in memory ([`capsule_engine::Model`]);
//! - `sealed-streaming`: a real capsule sealed in memory; every query opens
//!   each layer's chunks just before the first node that reads it and
//!   zeroizes it after the last, dense layers chunk by chunk into their
//!   output, with the enclave's own code
//!   ([`capsule_enclave::StreamingModel`], the enclave's layer stream fed
//!   from memory instead of the host's frames), optionally under
//!   `--memory-budget`;
//! - `sealed-cached`: the capsule unsealed once
//!   ([`capsule_enclave::SealedModel`]), as the enclave keeps a model.
//!
//! After warm-up queries (one per mode at least, and for [`WARM_UP`] at
//! least), the modes take turns sample by sample, in orders under which each
//! mode follows each other one equally often ([`TURNS_OF_THREE`]), so that a
//! noisy machine slows all three alike, no mode finds the cache as one
//! other mode left it more often than another, and the ratios stay fair. A
//! sample is one query, or the mean of a few in a row when the quickest mode
//! takes under [`SAMPLE_MIN_MS`] (the same count in every mode).
//! Each case reports the median, min and max, and the streaming mode also
//! issue 4's AES-GCM bound (the layer bytes it unseals per query divided by
//! [`AES_GCM_BYTES_PER_SEC`]) and the time one core takes to open them here
//! ([`time_opening`]), the least CPU time unsealing costs a query.
//!
//! Not here: the enclave process and its host pipe (the streaming mode
//! unseals in this process), and accuracy checks (`mlcapsule run` and the
//! `reference_models` tests compare outputs with onnxruntime).

mod defenses;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capsule_engine::{Activation, ConvAttrs, Graph, Model, Node, Op, ParamInfo, Tensor, ValueInfo};
use capsule_format::{Aead, Capsule, ModelKey, Policy, SealRequest, seal as seal_capsule};
use clap::{Args, ValueEnum};

/// AES-256-GCM throughput of one core here as issue 4 states it (`ring`, in place,
/// 64 MiB buffer; shared/design/DATA.md): the bound each streaming figure is set
/// beside. `aws-lc-rs`, which opens the chunks, decrypts 256 KiB chunks out of place
/// from memory at 9.5-10 GB/s on the same machine, so this bound is conservative.
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
    /// Only these modes, comma-separated (e.g. to profile one alone); ratios
    /// need plain among them [default: all three].
    #[arg(
        long = "mode",
        value_enum,
        value_delimiter = ',',
        value_name = "MODE",
        conflicts_with = "plain_only"
    )]
    modes: Vec<Mode>,
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
    /// Cap the streaming mode's plaintext weight memory (bytes, or e.g. 64MiB, 1GB),
    /// as `mlcapsule run --memory-budget` caps the enclave's.
    #[arg(long, value_name = "BYTES", value_parser = parse_bytes)]
    memory_budget: Option<u64>,
    /// The cipher the sealed modes' capsules are sealed with: aegis-256x4, aegis-256x2 or
    /// aes-256-gcm, as `mlcapsule seal --aead`.
    #[arg(long, value_name = "AEAD", default_value_t = Aead::SEAL_DEFAULT)]
    aead: Aead,
    /// Plaintext bytes per chunk of the sealed modes' capsules, as `mlcapsule seal
    /// --chunk-size`.
    #[arg(long, value_name = "BYTES", default_value_t = capsule_format::DEFAULT_CHUNK_SIZE,
          value_parser = parse_chunk_size)]
    chunk_size: u32,
    /// Only the defenses' per-query costs inside the enclave (noising, detector, PRADA).
    #[arg(long)]
    defenses_only: bool,
    /// Instead of whole queries, time each node of the networks (or --model files) in
    /// plain mode: the median per node over the timed queries, slowest first.
    #[arg(long)]
    profile: bool,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Weights in memory, unsealed.
    Plain,
    /// The layers unsealed on every query, as the enclave does.
    #[value(name = "sealed-streaming")]
    Streaming,
    /// The layers unsealed once, kept in memory.
    #[value(name = "sealed-cached")]
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

/// Least time each configuration runs queries before it times them. With one query
/// per mode, a 2 ms Conv at two threads timed at one thread's speed whenever it was
/// the first configuration (median 2.1-2.5 ms, never under 2.0, against 1.45-1.5
/// once warm), and dense layers at two threads spread over 5x: the second core of
/// this VM takes tens of milliseconds to come up to speed after idling.
const WARM_UP: Duration = Duration::from_millis(250);

/// Shortest sample: a mode whose query is quicker runs several queries in a row per
/// sample, the same number in every mode, and a sample is their mean. This VM's clock
/// reads whole µs, so single 5 µs queries (dense 256x256) could only time as 5 or 6.
const SAMPLE_MIN_MS: f64 = 0.1;

/// What one mode of one case measured.
struct Timing {
    mode: Mode,
    /// Milliseconds per query, each the mean of `reps` queries in a row.
    samples: Vec<f64>,
    reps: usize,
}

impl Timing {
    fn sorted(&self) -> Vec<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    fn median(&self) -> f64 {
        median(&self.samples)
    }

    fn min(&self) -> f64 {
        self.sorted()[0]
    }

    fn max(&self) -> f64 {
        *self.sorted().last().expect("at least one sample")
    }
}

/// The median of `samples` (the mean of the middle two for an even count; 0 for none).
fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
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
    // A missing or unreadable model fails here, before a second of machine notes.
    for path in &args.models {
        std::fs::File::open(path)
            .and_then(|mut file| file.read(&mut [0u8; 1]))
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    let most = threads.iter().copied().max().unwrap_or(1);
    if most > cores {
        // ResNet-18 on a 2-core machine: 23.4 ms at 2 threads, 25.8 at 4.
        eprintln!(
            "warning: {most} threads on a machine with {cores} core(s): threads beyond the cores \
             take turns on them, so those timings measure that contention, not the engine"
        );
    }
    // The pool is sized once, by the first call: make it the largest count.
    capsule_engine::set_threads(most);
    let modes: Vec<Mode> = if args.plain_only {
        vec![Mode::Plain]
    } else if args.modes.is_empty() {
        vec![Mode::Plain, Mode::Streaming, Mode::Cached]
    } else {
        // In the order given, each once.
        let mut modes = Vec::new();
        for &mode in &args.modes {
            if !modes.contains(&mode) {
                modes.push(mode);
            }
        }
        modes
    };
    let mut out = Report::new(args.json, args.aead, args.chunk_size);
    let cache = capsule_engine::last_level_cache().map_or(String::new(), |bytes| {
        format!(", {} MiB of last-level cache", bytes >> 20)
    });
    out.note(&format!(
        "machine: {}, {cores} core(s){cache}; engine kernels: {}",
        cpu_name(),
        capsule_engine::instruction_set()
    ));
    let round_trip_note = |out: &Report, when: &str| {
        if most > 1
            && let Some(trip) = core_round_trip()
        {
            out.note(&format!(
                "core-to-core round trip {when}: {:.0} ns (see bench/README.md)",
                trip.as_secs_f64() * 1e9
            ));
        }
    };
    round_trip_note(&out, "before");

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
    if args.defenses_only {
        layer_cases.clear();
        networks.clear();
    }
    let defenses = (!custom && !args.networks_only && selected("defense")) || args.defenses_only;
    if let Some(only) = &args.only
        && !defenses
        && !layer_cases.iter().any(|case| selected(&case.name))
        && !networks
            .iter()
            .any(|path| selected(&path.to_string_lossy()))
    {
        let mut names: Vec<String> = layer_cases.iter().map(|case| case.name.clone()).collect();
        names.extend(networks.iter().map(|path| path.display().to_string()));
        if !custom && !args.networks_only {
            names.push("defenses".into());
        }
        bail!(
            "--only {only:?} matches no case; the cases of this run are: {}",
            names.join(", ")
        );
    }
    layer_cases.retain(|case| selected(&case.name));
    let runs = if args.quick { Some(3) } else { args.runs };
    if args.profile {
        for path in networks.iter().filter(|p| selected(&p.to_string_lossy())) {
            let case = network(path, &batches)?;
            for &batch in &batches {
                for &threads in &threads {
                    profile(
                        &case,
                        threads,
                        batch,
                        runs.unwrap_or(PROFILE_RUNS),
                        args.json,
                    )?;
                }
            }
        }
        round_trip_note(&out, "after");
        return Ok(());
    }
    for case in &layer_cases {
        // The paper's layer tables are at batch 1.
        let configs: Vec<(usize, usize)> = threads.iter().map(|&t| (t, 1)).collect();
        bench_case(case, &modes, &configs, runs, args.memory_budget, &mut out)?;
    }
    for path in &networks {
        if !selected(&path.to_string_lossy()) {
            continue;
        }
        let case = network(path, &batches)?;
        let configs: Vec<(usize, usize)> = batches
            .iter()
            .flat_map(|&b| threads.iter().map(move |&t| (t, b)))
            .collect();
        bench_case(&case, &modes, &configs, runs, args.memory_budget, &mut out)?;
    }
    round_trip_note(&out, "after");
    out.finish();
    // The defenses' costs: in the default run (or alone), not for a user's model.
    if defenses {
        let (stored, rounds) = if args.quick { (100, 1) } else { (3000, 30) };
        defenses::run(stored, args.runs.unwrap_or(rounds), args.json)?;
    }
    Ok(())
}

/// Times `case` in every mode of `modes` with `threads` threads at batch
/// `batch`, its sealed modes on a capsule sealed with the report's cipher, and
/// reports it.
fn bench_case(
    case: &Case,
    modes: &[Mode],
    configs: &[(usize, usize)],
    runs: Option<usize>,
    budget: Option<u64>,
    out: &mut Report,
) -> anyhow::Result<()> {
    let timed = |mode: Mode| modes.contains(&mode);
    let plain = if timed(Mode::Plain) {
        Some(
            Model::new(case.graph.clone(), case.weights.clone())
                .with_context(|| format!("{} cannot run", case.name))?,
        )
    } else {
        None
    };
    let sealed = if timed(Mode::Streaming) || timed(Mode::Cached) {
        Some(Sealed::new(case, out.aead, out.chunk_size)?)
    } else {
        None
    };
    let capsule = sealed.as_ref().map(Sealed::capsule).transpose()?;
    let cached = match (&sealed, &capsule) {
        (Some(s), Some(c)) if timed(Mode::Cached) => Some(
            capsule_enclave::SealedModel::open(c, &s.key)
                .context("cannot open the benchmark capsule")?,
        ),
        _ => None,
    };

    let open_ms = match (&sealed, &capsule) {
        (Some(s), Some(c)) if timed(Mode::Streaming) => Some(time_opening(c, &s.key)?),
        _ => None,
    };
    let mut stream = match (&sealed, &capsule) {
        (Some(s), Some(c)) if timed(Mode::Streaming) => Some(
            capsule_enclave::StreamingModel::open(c, &s.key, budget)
                .context("cannot open the benchmark capsule")?,
        ),
        _ => None,
    };
    for &(threads, batch) in configs {
        capsule_engine::set_threads(threads);
        let mut shape = vec![batch];
        shape.extend(&case.item_shape);
        let inputs = [pseudo_random(&shape, 1)];
        // Milliseconds per query, over `reps` queries in a row.
        let mut query = |mode: Mode, reps: usize| -> anyhow::Result<f64> {
            let start = Instant::now();
            for _ in 0..reps {
                let output = match mode {
                    Mode::Plain => plain.as_ref().expect("plain is timed").run(&inputs)?,
                    Mode::Streaming => match &mut stream {
                        Some(model) => model.run(&inputs)?,
                        None => bail!("the streaming mode needs the sealed case"),
                    },
                    Mode::Cached => cached.as_ref().expect("cached").run(&inputs)?,
                };
                std::hint::black_box(output);
            }
            Ok(start.elapsed().as_secs_f64() * 1e3 / reps as f64)
        };

        // Warm-up: caches, allocator, the engine's buffers, and the cores' clocks
        // (see `WARM_UP`); the last query of each mode also sizes the run.
        let warm = Instant::now();
        let mut first = Vec::new();
        loop {
            first.clear();
            for &mode in modes {
                first.push(query(mode, 1)?);
            }
            if warm.elapsed() >= WARM_UP {
                break;
            }
        }
        let quickest = first.iter().copied().fold(f64::INFINITY, f64::min);
        let reps = ((SAMPLE_MIN_MS / quickest.max(1e-6)).ceil() as usize).clamp(1, 1000);
        let rounds = runs.unwrap_or_else(|| {
            let per_round = first.iter().sum::<f64>() / 1e3 * reps as f64;
            ((1.5 / per_round.max(1e-6)) as usize).clamp(3, 30)
        });
        let mut timings: Vec<Timing> = modes
            .iter()
            .map(|&mode| Timing {
                mode,
                samples: Vec::with_capacity(rounds),
                reps,
            })
            .collect();
        // The rounds take the modes in turn orders under which each mode runs
        // right after each other one equally often (and finds the cache as that
        // one left it).
        let count = timings.len();
        for round in 0..rounds {
            for turn in 0..count {
                let timing = &mut timings[turn_order(count, round)[turn]];
                timing.samples.push(query(timing.mode, reps)?);
            }
        }
        let weight_bytes = case.graph.param_count() * size_of::<f32>();
        let held = stream.as_ref().map(|m| m.peak_weight_bytes());
        out.case(
            case,
            threads,
            batch,
            Unsealing {
                weight_bytes,
                open_ms,
            },
            &timings,
            held.zip(Some(budget)),
        );
    }
    Ok(())
}

/// Orders of three modes, one per round, under which each mode runs right
/// after each of the other two three times in six rounds, counting the
/// turn from one round to the next. Rounds that start one mode later each
/// time (0 1 2, 1 2 0, 2 0 1) run every mode after one of the others twice
/// as often as after the other: sealed-cached then ran after
/// sealed-streaming, which leaves the weights it wiped to be written back,
/// in two turns of three, and dense 4096x4096 at two threads read cached/plain
/// 1.04-1.12 over six such runs (0.97-0.98 with the streaming mode left out);
/// in these orders 0.92-0.98 over five.
const TURNS_OF_THREE: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [2, 1, 0],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
];

/// The order in which round `round` runs `count` modes (see [`TURNS_OF_THREE`];
/// one or two modes alternate which goes first, which is balanced already).
fn turn_order(count: usize, round: usize) -> Vec<usize> {
    if count == 3 {
        TURNS_OF_THREE[round % TURNS_OF_THREE.len()].to_vec()
    } else {
        (0..count).map(|turn| (round + turn) % count).collect()
    }
}

/// The CPU's model name, family and model number (Linux's `/proc/cpuinfo`; a
/// virtual machine may show only the vendor's brand as the name), or the
/// architecture where they cannot be read: timings depend on the CPU, so every
/// report names it.
fn cpu_name() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // The first processor's value of `key`.
    let field = |key: &str| {
        info.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim() == key).then(|| value.trim().to_owned())
        })
    };
    match (field("model name"), field("cpu family"), field("model")) {
        (Some(name), Some(family), Some(model)) => {
            format!("{name} (family {family}, model {model})")
        }
        (Some(name), _, _) => name,
        _ => format!("an {} CPU", std::env::consts::ARCH),
    }
}

/// How long [`core_round_trip`] passes a value back and forth.
const ROUND_TRIP_FOR: Duration = Duration::from_millis(20);

/// Round trips [`core_round_trip`] times at once.
const ROUND_TRIP_BATCH: u32 = 1000;

/// A round trip this slow means the two threads did not run at once: then
/// [`core_round_trip`] goes on past [`ROUND_TRIP_FOR`], up to [`ROUND_TRIP_LIMIT`].
const ROUND_TRIP_SLOW: Duration = Duration::from_micros(5);

/// Longest that [`core_round_trip`] runs.
const ROUND_TRIP_LIMIT: Duration = Duration::from_millis(200);

/// The time for a value written by one thread to be seen by another and
/// answered, both threads spinning for [`ROUND_TRIP_FOR`] (longer while no
/// batch was quicker than [`ROUND_TRIP_SLOW`] a trip): the quickest batch of
/// [`ROUND_TRIP_BATCH`] trips, per trip. Not the mean: until the scheduler has
/// put the two threads on two CPUs (an idle virtual CPU can take milliseconds
/// to wake), each trip waits for a switch between them, and means of 32 µs were
/// read here after runs that had read 320 ns before. `None` on a machine of one
/// core.
///
/// Two threads gain on one only as far as the data they share moves quickly
/// between their cores. On the shared 2-vCPU machines these figures come from,
/// this reads 50-80 ns for some minutes and 300-360 ns for others (the host
/// moving the two vCPUs between cores that share a cache and cores that do not),
/// and MobileNetV2 at two threads then takes 4.1 and 7.1 ms, one thread 7.4-7.9
/// in both: each report says which it ran under.
fn core_round_trip() -> Option<Duration> {
    use std::sync::atomic::{AtomicU64, Ordering};
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        return None;
    }
    // Odd values are the caller's, even the answerer's; `u64::MAX` ends it.
    let ball = AtomicU64::new(0);
    let wait_for = |value: u64| {
        while ball.load(Ordering::Acquire) != value {
            std::hint::spin_loop();
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            loop {
                match ball.load(Ordering::Acquire) {
                    u64::MAX => return,
                    odd if odd % 2 == 1 => ball.store(odd + 1, Ordering::Release),
                    _ => std::hint::spin_loop(),
                }
            }
        });
        let start = Instant::now();
        let mut trips = 0u64;
        let mut quickest = Duration::MAX;
        // Until both threads have run at once for a batch, or the limit.
        while (start.elapsed() < ROUND_TRIP_FOR || quickest > ROUND_TRIP_BATCH * ROUND_TRIP_SLOW)
            && start.elapsed() < ROUND_TRIP_LIMIT
        {
            let batch = Instant::now();
            for _ in 0..ROUND_TRIP_BATCH {
                ball.store(2 * trips + 1, Ordering::Release);
                wait_for(2 * trips + 2);
                trips += 1;
            }
            quickest = quickest.min(batch.elapsed());
        }
        ball.store(u64::MAX, Ordering::Release);
        Some(quickest / ROUND_TRIP_BATCH)
    })
}

/// Timed queries per configuration of `bench --profile` when `--runs` is not given.
const PROFILE_RUNS: usize = 30;

/// Nodes `bench --profile` lists in its table (the slowest; JSON lists all).
const PROFILE_ROWS: usize = 25;

/// Times each node of `case` over `runs` plain queries (after [`WARM_UP`] of queries)
/// with `threads` threads at batch `batch`, and prints the median per node, slowest
/// first. Two queries of warm-up were not enough at two threads, where the second
/// core comes up to speed only after tens of milliseconds: twenty 1x1 Convs at 28x28
/// (1.1-1.3 ms a query once warm) summed to 2.30 ms over 30 queries, and to 1.27 with
/// this warm-up, in alternated runs.
fn profile(
    case: &Case,
    threads: usize,
    batch: usize,
    runs: usize,
    json: bool,
) -> anyhow::Result<()> {
    let model = Model::new(case.graph.clone(), case.weights.clone())
        .with_context(|| format!("{} cannot run", case.name))?;
    let runs = runs.max(1);
    capsule_engine::set_threads(threads);
    let mut shape = vec![batch];
    shape.extend(&case.item_shape);
    let inputs = [pseudo_random(&shape, 1)];
    let nodes = &case.graph.nodes;
    let warm = Instant::now();
    while warm.elapsed() < WARM_UP {
        std::hint::black_box(model.run_timed(&inputs)?);
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(runs); nodes.len()];
    for _ in 0..runs {
        let (output, times) = model.run_timed(&inputs)?;
        std::hint::black_box(output);
        for (sample, time) in samples.iter_mut().zip(times) {
            sample.push(time.as_secs_f64() * 1e3);
        }
    }
    let mut rows: Vec<(usize, f64)> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| (i, median(s)))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = rows.iter().map(|&(_, ms)| ms).sum();
    if json {
        for &(i, took) in &rows {
            let row = serde_json::json!({
                "case": case.name, "threads": threads, "batch": batch, "node": nodes[i].name,
                "op": nodes[i].op.name(), "median_ms": took,
            });
            println!("{row}");
        }
        return Ok(());
    }
    println!(
        "\n{} at {threads} thread(s), batch {batch}: {} nodes, medians over {runs} queries \
         summing to {} ms; the {} slowest",
        case.name,
        nodes.len(),
        ms(total),
        PROFILE_ROWS.min(rows.len()),
    );
    println!("{:>10} {:>6}  {:<18} node", "ms", "share", "op");
    for &(i, took) in rows.iter().take(PROFILE_ROWS) {
        let share = 100.0 * took / total.max(f64::MIN_POSITIVE);
        let node = &nodes[i];
        println!(
            "{:>10} {share:>5.1}%  {:<18} {}",
            ms(took),
            node.op.name(),
            node.name
        );
    }
    Ok(())
}

/// A case sealed into an in-memory capsule, with the key to open it.
struct Sealed {
    bytes: Vec<u8>,
    key: ModelKey,
}

impl Sealed {
    /// Seals `case` with `aead` in chunks of `chunk_size` bytes as `mlcapsule seal`
    /// would (its grouping into layers).
    fn new(case: &Case, aead: Aead, chunk_size: u32) -> anyhow::Result<Sealed> {
        let request = SealRequest {
            architecture: serde_json::to_value(&case.graph)?,
            preprocessing: None,
            labels: None,
            detector: None,
            policy: Policy::default(),
            chunk_size,
            aead,
            layers: capsule_enclave::seal_layers(&case.graph, &case.weights, ""),
        };
        let key = ModelKey::generate();
        let bytes = seal_capsule(
            &request,
            &key,
            capsule_format::new_capsule_id(),
            &mut |_| {},
        )
        .context("cannot seal the benchmark case")?;
        Ok(Sealed { bytes, key })
    }

    fn capsule(&self) -> anyhow::Result<Capsule<'_>> {
        Capsule::parse(&self.bytes).context("the benchmark capsule does not parse")
    }
}

/// Milliseconds one core takes to open every layer of `capsule` once, chunk by chunk
/// into one reused buffer, as a query's stream opens them: the median of a few passes
/// filling about a tenth of a second, and at least three. Streaming cannot cost less
/// CPU time than this per query.
fn time_opening(capsule: &Capsule<'_>, key: &ModelKey) -> anyhow::Result<f64> {
    let unsealer = capsule
        .unseal(key)
        .context("the benchmark capsule does not open")?;
    let header = unsealer.header();
    let step = header.chunk_size as usize + capsule_format::TAG_LEN;
    let mut buf = vec![0u8; header.chunk_size as usize];
    let mut pass = || -> anyhow::Result<f64> {
        let start = Instant::now();
        for layer in 0..header.layers.len() {
            let sealed = capsule.sealed_layer(layer);
            for chunk in 0..header.chunk_count(layer) {
                let span = unsealer.chunk_span(layer, chunk);
                let at = chunk as usize * step;
                let piece = &sealed[at..(at + step).min(sealed.len())];
                let out = &mut buf[..(span.end - span.start) as usize];
                unsealer
                    .open_chunk_into(layer, chunk, piece, out)
                    .context("the benchmark capsule does not open")?;
            }
        }
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let first = pass()?;
    let passes = ((100.0 / first.max(1e-3)) as usize).clamp(3, 50);
    let mut samples = (0..passes)
        .map(|_| pass())
        .collect::<anyhow::Result<Vec<f64>>>()?;
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
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
/// The model at `path` as a case, checked to take every batch size of `batches`.
fn network(path: &Path, batches: &[usize]) -> anyhow::Result<Case> {
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
    let Some((&declared, item)) = input.shape.split_first() else {
        bail!(
            "{}'s input is a scalar; bench needs a batch dimension",
            path.display()
        );
    };
    if let Some(fixed) = declared
        && let Some(batch) = batches.iter().find(|&&b| b != fixed)
    {
        bail!(
            "{}'s input '{}' has a fixed batch size of {fixed}: run it with --batch {fixed}, \
             or export the model with a dynamic batch dimension to time --batch {batch}",
            path.display(),
            input.name
        );
    }
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
    /// The cipher of the sealed modes' capsules.
    aead: Aead,
    /// Plaintext bytes per chunk of the sealed modes' capsules.
    chunk_size: u32,
}

/// What unsealing a case's weights costs at least: its bytes, and the time one core
/// took to open them here (sealed cases only).
struct Unsealing {
    weight_bytes: usize,
    open_ms: Option<f64>,
}

impl Report {
    fn new(json: bool, aead: Aead, chunk_size: u32) -> Report {
        Report {
            json,
            family: None,
            aead,
            chunk_size,
        }
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
        unsealing: Unsealing,
        timings: &[Timing],
        held: Option<(u64, Option<u64>)>,
    ) {
        let Unsealing {
            weight_bytes,
            open_ms,
        } = unsealing;
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
                    "queries_per_sample": t.reps,
                    "weight_bytes": weight_bytes,
                });
                if t.mode != Mode::Plain {
                    line["aead"] = self.aead.name().into();
                    line["chunk_size"] = self.chunk_size.into();
                    if let Some(plain) = plain {
                        line["ratio_to_plain"] = round(t.median() / plain).into();
                    }
                }
                if t.mode == Mode::Streaming {
                    line["aes_bound_ms"] = round(aes_ms).into();
                    if let Some(open_ms) = open_ms {
                        line["open_ms"] = round(open_ms).into();
                    }
                    if let Some((held, budget)) = held {
                        line["peak_weight_bytes"] = held.into();
                        line["memory_budget"] = budget.into();
                    }
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
                "{:<24} {:>3} {:>5} {:>22} {:>22} {:>6} {:>8} {:>8} {:>22} {:>6}",
                "case",
                "thr",
                "batch",
                "plain ms [min-max]",
                "streaming ms [min-max]",
                "x",
                "AES ms",
                "open ms",
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
            "{:<24} {:>3} {:>5} {:>22} {:>22} {:>6} {:>8} {:>8} {:>22} {:>6}",
            case.name,
            threads,
            batch,
            plain_cell,
            streaming,
            s_ratio,
            ms(aes_ms),
            open_ms.map_or("-".to_string(), ms),
            cached,
            c_ratio
        );
        println!("{line}");
        if let Some((held, Some(budget))) = held {
            println!(
                "{:<24} streaming held at most {} of plaintext weights at once (budget {})",
                "",
                mib(held),
                mib(budget)
            );
        }
    }

    fn finish(&self) {
        if !self.json {
            println!(
                "\nx: median over plain's median, same run, modes alternating. Sealed modes: \
                 chunks of {} bytes sealed with {}. AES ms: weight bytes / {:.1} GB/s, issue 4's AES-GCM \
                 bound. open ms: one core opening every layer once with {}, measured in this \
                 run: the least CPU time streaming spends per query.",
                self.chunk_size,
                self.aead,
                AES_GCM_BYTES_PER_SEC / 1e9,
                self.aead,
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

/// Bytes in MiB, one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// A byte count: digits, optionally followed by a unit (`k`/`KB` = 1000, `KiB` = 1024,
/// and so on up to `G`/`GiB`), as `--memory-budget` takes it.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size: give bytes, or e.g. 64MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{text}': use B, KiB, MiB or GiB"
            ));
        }
    };
    number
        .checked_mul(scale)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("'{text}' is not a usable size"))
}

/// Parses a capsule's chunk size as [`parse_bytes`] does (e.g. 65536 or 64KiB), within
/// the bounds the capsule format allows.
pub fn parse_chunk_size(text: &str) -> Result<u32, String> {
    let (min, max) = (
        capsule_format::MIN_CHUNK_SIZE,
        capsule_format::MAX_CHUNK_SIZE,
    );
    parse_bytes(text)?
        .try_into()
        .ok()
        .filter(|size| (min..=max).contains(size))
        .ok_or_else(|| format!("a chunk size must be between {min} and {max} bytes"))
}

/// Four significant digits: short JSON that still tells 0.0054 from 0.0046 ms
/// (three decimals printed a 0.3 µs defense as 0 and dense 256x256's 5 µs
/// products as 0.005 or 0.006).
fn round(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

#[cfg(test)]
mod round_tests {
    use super::round;

    #[test]
    fn keeps_four_significant_digits() {
        assert_eq!(round(0.000_312_34), 0.000_312_3);
        assert_eq!(round(0.005_449), 0.005_449);
        assert_eq!(round(123.456_7), 123.5);
        assert_eq!(round(1474.12), 1474.0);
        assert_eq!(round(0.0), 0.0);
    }
}

#[cfg(test)]
mod turn_tests {
    use super::turn_order;

    /// Every round runs each mode once, and over a cycle of rounds (six for
    /// three modes, two for two) each mode runs right after each other one
    /// equally often, the turns between rounds counted.
    #[test]
    fn each_mode_follows_each_other_equally_often() {
        for (count, cycle) in [(1, 1), (2, 2), (3, 6)] {
            let turns: Vec<usize> = (0..cycle).flat_map(|r| turn_order(count, r)).collect();
            for round in turns.chunks(count) {
                let mut sorted = round.to_vec();
                sorted.sort_unstable();
                assert_eq!(sorted, (0..count).collect::<Vec<_>>(), "{count} modes");
            }
            let mut follows = vec![vec![0; count]; count];
            for (i, &mode) in turns.iter().enumerate() {
                follows[turns[(i + 1) % turns.len()]][mode] += 1;
            }
            let others: Vec<usize> = (0..count)
                .flat_map(|a| (0..count).filter(move |&b| b != a).map(move |b| (a, b)))
                .map(|(a, b)| follows[a][b])
                .collect();
            assert!(
                others.windows(2).all(|w| w[0] == w[1]),
                "{count} modes: {follows:?}"
            );
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::{parse_bytes, parse_chunk_size};

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("64 mib"), Ok(64 << 20));
        assert_eq!(parse_bytes("2GB"), Ok(2_000_000_000));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("3 lots").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn chunk_sizes_stay_within_the_format() {
        assert_eq!(parse_chunk_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_chunk_size("64"), Ok(64));
        assert_eq!(parse_chunk_size("64MiB"), Ok(64 << 20));
        assert!(
            parse_chunk_size("63")
                .unwrap_err()
                .contains("between 64 and")
        );
        assert!(parse_chunk_size("65MiB").is_err());
        assert!(parse_chunk_size("8GiB").is_err());
    }
}
