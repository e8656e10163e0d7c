//! `mlcapsule lab`: the attack lab's evaluations (issue 5), each printing a table and writing
//! a PNG plot and a JSON report into `--out`.
//!
//! The full runs take minutes on 2 cores and are not tests; `--quick` runs each in seconds
//! for the smoke test `tests/lab.rs` (floors not expected there):
//!
//! ```text
//! mlcapsule lab mia      # Figure 4 on Fashion-MNIST: MIA vs noise strength c   (~2-5 min)
//! mlcapsule lab prada    # PRADA: benign streams, JbDA and random queries       (~4 min)
//! mlcapsule lab kennen --export models/detector   # kennen-io + detector        (~14 min)
//! ```
//!
//! (Times measured with a debug build on 2 shared cores; a release build is faster.)

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use capsule_lab::data::Dataset;
use capsule_lab::{kennen, mia, plot, prada_eval};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Options of `mlcapsule lab`.
#[derive(Args)]
pub struct LabArgs {
    #[command(subcommand)]
    experiment: Experiment,
}

#[derive(Subcommand)]
enum Experiment {
    /// Membership inference against an overfit CNN with MLCapsule's noising, c = 0..1 (the
    /// paper's Figure 4).
    Mia(Common),
    /// PRADA against benign streams, a Jacobian-augmentation attack and random queries.
    Prada(Common),
    /// kennen-io queries and the input detector that refuses them.
    Kennen(KennenArgs),
}

#[derive(Args)]
struct Common {
    /// Print one JSON object on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Where to write the plot and the JSON report.
    #[arg(long, value_name = "DIR", default_value = "lab-out")]
    out: PathBuf,
    /// A small, fast version for smoke tests (seconds, not minutes; floors not expected).
    #[arg(long)]
    quick: bool,
    /// The IDX files, plain or .gz. Default: for `mia`, Fashion-MNIST from Debian's
    /// dataset-fashion-mnist (/usr/share/datasets/fashion-mnist) when installed; otherwise,
    /// and for the others, MNIST in build/mnist here or in the source tree.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Override the experiment's seed.
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args)]
struct KennenArgs {
    #[command(flatten)]
    common: Common,
    /// Also write the trained detector for sealing: DIR/detector.json (engine graph) and one
    /// `DIR/<weight>.npy` per weight.
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf>,
}

/// Runs `mlcapsule lab`.
pub fn main(args: LabArgs) -> anyhow::Result<()> {
    match args.experiment {
        Experiment::Mia(c) => run_mia(&c),
        Experiment::Prada(c) => run_prada(&c),
        Experiment::Kennen(k) => run_kennen(&k),
    }
}

/// Debian's dataset-fashion-mnist puts the gzipped IDX files here.
const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

fn load(common: &Common, prefer_fashion: bool) -> anyhow::Result<(Dataset, PathBuf)> {
    let dir = match &common.data {
        Some(d) => d.clone(),
        None if prefer_fashion
            && Path::new(FASHION_MNIST)
                .join(format!("{}.gz", capsule_lab::data::TEST_IMAGES))
                .exists() =>
        {
            PathBuf::from(FASHION_MNIST)
        }
        None => {
            let here = PathBuf::from("build/mnist");
            if here.join(capsule_lab::data::TRAIN_IMAGES).exists() {
                here
            } else {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../build/mnist"))
            }
        }
    };
    let data = Dataset::load(&dir).with_context(|| {
        format!(
            "cannot load the data set from {}; run scripts/fetch-mnist.sh (MNIST), \
             apt-get install dataset-fashion-mnist, or pass --data DIR",
            dir.display()
        )
    })?;
    Ok((data, dir))
}

/// Writes the plot and the report, then prints either the table or the summary JSON.
fn finish(
    common: &Common,
    name: &str,
    panels: &[plot::Panel],
    report: Value,
    summary: Value,
    table: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&common.out)
        .with_context(|| format!("cannot create {}", common.out.display()))?;
    let png = common.out.join(format!("{name}.png"));
    plot::render(panels, &png)?;
    let json_path = common.out.join(format!("{name}.json"));
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    let footer = format!("wrote {} and {}", png.display(), json_path.display());
    if common.json {
        eprintln!("{table}{footer}");
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{table}{footer}");
    }
    Ok(())
}

fn floors_table(floors: &[(&str, f64, bool)]) -> String {
    let mut s = String::from("floors:\n");
    for (name, value, ok) in floors {
        s += &format!(
            "  {:<40} {:>10.4}  {}\n",
            name,
            value,
            if *ok { "ok" } else { "NOT MET" }
        );
    }
    s
}

fn percentiles(q: &[f64]) -> String {
    q.iter()
        .map(|v| format!("{v:.1e}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_mia(common: &Common) -> anyhow::Result<()> {
    let (data, dir) = load(common, true)?;
    let mut config = if common.quick {
        mia::MiaConfig::quick()
    } else {
        mia::MiaConfig::full()
    };
    config.seed = common.seed.unwrap_or(config.seed);
    let started = Instant::now();
    let report = mia::run(&data, &config)?;
    let seconds = started.elapsed().as_secs_f64();
    let mut table = format!(
        "membership inference on {}: {} members, {} non-members; target train acc {:.4}, test acc {:.4} ({seconds:.1} s)\n\
         target trained {} epochs to loss {:.1e}; {:.3} of the posteriors have entropy exactly 0 in f32\n\
         entropy percentiles 10/25/50/75/90: members {}, non-members {}\n\
         {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        dir.display(),
        config.members,
        config.non_members,
        report.train_accuracy,
        report.test_accuracy,
        report.epoch_loss.len(),
        report.epoch_loss.last().copied().unwrap_or(f64::NAN),
        report.saturated,
        percentiles(&report.member_entropy),
        percentiles(&report.non_member_entropy),
        "c",
        "AUC-ent",
        "AUC-max",
        "aware",
        "inverted",
        "kept",
        "acc-out",
        "JSD",
        "JSD-pap",
        "|dP|",
    );
    for r in &report.rows {
        table += &format!(
            "{:>4.1} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4}\n",
            r.c,
            r.auc_entropy,
            r.auc_max_posterior,
            r.defense_aware_entropy,
            r.auc_inverted,
            r.label_kept,
            r.accuracy_non_members,
            r.jsd,
            r.jsd_paper,
            r.mean_abs_delta
        );
    }
    if let Some(b) = report.best() {
        table += &format!("best c = {:.1}\n", b.c);
    }
    table += &floors_table(&report.floors());
    let col = |f: fn(&mia::MiaRow) -> f64| -> Vec<f64> { report.rows.iter().map(f).collect() };
    let summary = json!({
        "c": col(|r| r.c),
        "auc": col(|r| r.auc_entropy),
        "defense_aware_auc": col(|r| r.defense_aware_entropy),
        "label_kept": col(|r| r.label_kept),
        "auc_max_posterior": col(|r| r.auc_max_posterior),
        "defense_aware_auc_max_posterior": col(|r| r.defense_aware_max_posterior),
        "auc_inverted": col(|r| r.auc_inverted),
        "accuracy": col(|r| r.accuracy_non_members),
        "jsd": col(|r| r.jsd),
        "jsd_paper": col(|r| r.jsd_paper),
        "mean_abs_delta": col(|r| r.mean_abs_delta),
        "best_c": report.best().map(|b| b.c),
        "train_accuracy": report.train_accuracy,
        "test_accuracy": report.test_accuracy,
        "data": dir.display().to_string(),
        "seconds": seconds,
    });
    let full = json!({ "summary": summary, "report": report });
    finish(common, "mia", &report.panels(), full, summary, &table)
}

fn run_prada(common: &Common) -> anyhow::Result<()> {
    let (data, dir) = load(common, false)?;
    let mut config = if common.quick {
        prada_eval::PradaConfig::quick()
    } else {
        prada_eval::PradaConfig::full()
    };
    config.seed = common.seed.unwrap_or(config.seed);
    let started = Instant::now();
    let report = prada_eval::run(&data, &config)?;
    let seconds = started.elapsed().as_secs_f64();
    let mut table = format!(
        "PRADA: target test acc {:.4}; delta = {:.2} (min W on {} calibration streams, rounded down) ({seconds:.1} s)\n\
         {:<16} {:>8} {:>8} {:>8} {:>12} {:>8}\n",
        report.target_accuracy,
        report.delta,
        report.calibration.len(),
        "stream",
        "queries",
        "min W",
        "stored",
        "first alarm",
        "alarms"
    );
    for s in report
        .calibration
        .iter()
        .chain(&report.benign)
        .chain([&report.jbda, &report.random])
    {
        table += &format!(
            "{:<16} {:>8} {:>8.4} {:>8} {:>12} {:>8}\n",
            s.name,
            s.queries,
            s.min_w(),
            s.stored,
            s.first_alarm.map_or("never".into(), |q| q.to_string()),
            s.alarms
        );
    }
    table += &format!(
        "JbDA substitute agrees with the target on {:.4} of the test set\n",
        report.substitute_agreement
    );
    table += &floors_table(&report.floors());
    let summary = json!({
        "benign_alarms": report.benign_alarms(),
        "jbda_queries_to_detection": report.jbda.first_alarm,
        "random_queries_to_detection": report.random.first_alarm,
        "delta": report.delta,
        "benign_min_w": report.benign.iter().map(|s| s.min_w()).collect::<Vec<_>>(),
        "jbda_queries": report.jbda.queries,
        "random_queries": report.random.queries,
        "substitute_agreement": report.substitute_agreement,
        "target_accuracy": report.target_accuracy,
        "data": dir.display().to_string(),
        "seconds": seconds,
    });
    let full = json!({ "summary": summary, "report": report });
    finish(common, "prada", &report.panels(), full, summary, &table)
}

fn run_kennen(args: &KennenArgs) -> anyhow::Result<()> {
    let common = &args.common;
    let (data, dir) = load(common, false)?;
    let mut config = if common.quick {
        kennen::KennenConfig::quick()
    } else {
        kennen::KennenConfig::full()
    };
    config.seed = common.seed.unwrap_or(config.seed);
    let started = Instant::now();
    let outcome = kennen::run(&data, &config)?;
    let seconds = started.elapsed().as_secs_f64();
    let r = &outcome.report;
    let mut table = format!(
        "kennen-io: {} classifiers (mean test acc {:.4}), {} x {} crafted queries, mean L2 change {:.3} ({seconds:.1} s)\n",
        config.family, r.family_accuracy, config.sets, config.queries_per_set, r.mean_perturbation
    );
    for (name, acc) in kennen::ATTRIBUTES.iter().zip(&r.attribute_accuracy) {
        table += &format!("  metamodel on held-out nets: {name:<18} {acc:.3} (chance 0.5)\n");
    }
    table += &format!(
        "detector: held-out accuracy {:.4} ({} crafted missed, {} real flagged of {} + {}), \
         false refusals {:.4} of {} real test digits (run in our engine; max diff to candle {:.1e})\n",
        r.heldout_accuracy,
        r.heldout_missed,
        r.heldout_false_alarms,
        config.detector_test,
        config.detector_test,
        r.false_refusal_rate,
        r.refusal_checked,
        r.engine_max_diff
    );
    table += &floors_table(&r.floors());
    if let Some(dir) = &args.export {
        export_detector(&outcome.detector, dir)?;
        table += &format!("detector written to {}\n", dir.display());
    }
    let summary = json!({
        "heldout_accuracy": r.heldout_accuracy,
        "false_refusal_rate": r.false_refusal_rate,
        "attribute_accuracy": r.attribute_accuracy,
        "mean_perturbation": r.mean_perturbation,
        "engine_max_diff": r.engine_max_diff,
        "data": dir.display().to_string(),
        "seconds": seconds,
    });
    let full = json!({ "summary": summary, "report": r, "samples": outcome.samples });
    finish(common, "kennen", &r.panels(), full, summary, &table)
}

/// `dir/detector.json` (the engine graph) and `dir/<weight>.npy`, plus the policy section the
/// capsule needs (`dir/detector-policy.json`).
fn export_detector(detector: &capsule_lab::models::Cnn, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (graph, weights) = kennen::detector_graph(detector)?;
    std::fs::write(dir.join("detector.json"), graph.to_json())?;
    for (name, tensor) in &weights {
        std::fs::write(
            dir.join(format!("{name}.npy")),
            capsule_engine::write_npy(tensor),
        )?;
    }
    std::fs::write(
        dir.join("detector-policy.json"),
        serde_json::to_vec_pretty(&kennen::detector_policy())?,
    )?;
    Ok(())
}
