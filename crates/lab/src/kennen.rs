//! kennen-io (Oh et al., ICLR 2018) and MLCapsule's detector against it (paper §7.1;
//! algorithms.md §2).
//!
//! A reduced, CPU-minute version of the pipeline:
//!
//! 1. **A family of white-box MNIST classifiers** with four binary attributes (activation
//!    ReLU/tanh, dropout yes/no, kernel 3/5, one or two convolution layers), each trained one
//!    short epoch on its own random subset. Three quarters of the family craft the queries;
//!    the rest only measure whether the crafted queries reveal attributes of nets they never
//!    saw.
//! 2. **kennen-io crafting**: query sets of `n` images, each started from real MNIST digits
//!    and optimised jointly with its own metamodel (an MLP from the `n × 10` concatenated
//!    posteriors to one 2-way head per attribute). The schedule alternates metamodel steps
//!    (inputs frozen, Adam on the metamodel over all training nets) and input steps (metamodel
//!    frozen, the attribute loss summed over a batch of nets back-propagated to the pixels,
//!    then kennen's uniform noise U(±0.5/256) and a clip to [0, 1]). Reduction: kennen takes
//!    ~25,000 SGD input steps at lr 0.1 against thousands of nets (40 GPU-days for the
//!    corpus); the full run here takes 12 Adam input steps (lr 0.01, 4 nets each) against 18
//!    crafting nets, so the images move less far from their starting digits than real
//!    kennen-io queries do: a harder case for the detector, not an easier one. The many
//!    query sets (50 × 100 = 5000 crafted images) are optimised in one batch, each with its
//!    own metamodel.
//! 3. **The detector** of MLCapsule §7.1 ([`Architecture::detector`]), trained with Adam on
//!    4500 crafted + 4500 real training digits, evaluated on 500 crafted images from query
//!    sets it never saw + 500 real digits, then exported to our engine
//!    ([`detector_graph`]) and run there on all 10,000 MNIST test digits to count false
//!    refusals with `capsule_defense::detector::decide` at the policy's default threshold.

use std::collections::HashMap;

use candle_core::{D, Device, Tensor, Var};
use capsule_defense::{DetectorPolicy, DetectorScores};
use capsule_engine as engine;

use crate::Error;
use crate::data::{CLASSES, Dataset, Images};
use crate::models::{Activation, Architecture, Cnn, ConvLayer};
use crate::plot::{COLORS, Panel, Series};
use crate::rng::Rng;
use crate::train::{self, Optim, Optimizer, TrainConfig};

/// The attributes the metamodel predicts, in head order.
pub const ATTRIBUTES: [&str; 4] = ["activation=tanh", "dropout", "kernel=5", "two conv layers"];

/// The experiment's size and seed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KennenConfig {
    /// Classifiers in the family.
    pub family: usize,
    /// Training images per family member (one epoch).
    pub family_train: usize,
    /// Queries per query set (kennen: 100).
    pub queries_per_set: usize,
    /// Query sets crafted; `sets × queries_per_set` crafted images in all.
    pub sets: usize,
    /// Alternations of input and metamodel phases after the first metamodel phase.
    pub rounds: usize,
    /// Input steps per input phase.
    pub input_steps: usize,
    /// Metamodel steps per metamodel phase (the first phase takes four times as many).
    pub meta_steps: usize,
    /// Nets per input step (kennen: 10).
    pub nets_per_step: usize,
    /// Adam's learning rate on the input pixels.
    pub input_lr: f64,
    /// Crafted (and as many real) images to train the detector on (paper: 4500).
    pub detector_train: usize,
    /// Crafted (and as many real) held-out images (paper: 500).
    pub detector_test: usize,
    /// Detector training epochs.
    pub detector_epochs: usize,
    /// Real test digits checked for false refusals (all 10,000 in the full run).
    pub refusal_check: usize,
    /// Seeds everything.
    pub seed: u64,
}

impl KennenConfig {
    /// The full run (several minutes on 2 cores).
    #[must_use]
    pub fn full() -> KennenConfig {
        KennenConfig {
            family: 24,
            family_train: 2000,
            queries_per_set: 100,
            sets: 50,
            rounds: 4,
            input_steps: 3,
            meta_steps: 50,
            nets_per_step: 4,
            input_lr: 0.01,
            detector_train: 4500,
            detector_test: 500,
            detector_epochs: 4,
            refusal_check: 10_000,
            seed: 3,
        }
    }

    /// A smoke run of a few seconds.
    #[must_use]
    pub fn quick() -> KennenConfig {
        KennenConfig {
            family: 6,
            family_train: 300,
            queries_per_set: 20,
            sets: 12,
            rounds: 2,
            input_steps: 2,
            meta_steps: 10,
            nets_per_step: 3,
            input_lr: 0.01,
            detector_train: 200,
            detector_test: 40,
            detector_epochs: 2,
            refusal_check: 500,
            seed: 3,
        }
    }
}

/// The experiment's outcome.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KennenReport {
    /// What was run.
    pub config: KennenConfig,
    /// Mean test accuracy of the family's classifiers.
    pub family_accuracy: f64,
    /// Per attribute, the metamodels' mean accuracy on the family's held-out nets (chance
    /// 0.5): whether the crafted queries do reveal attributes.
    pub attribute_accuracy: Vec<f64>,
    /// Mean attribute loss of the metamodels on the crafting nets, after each phase.
    pub crafting_loss: Vec<f64>,
    /// Mean L2 distance between each crafted query and the digit it started from.
    pub mean_perturbation: f64,
    /// Detector accuracy on the held-out crafted + real images.
    pub heldout_accuracy: f64,
    /// Held-out crafted images the detector let through.
    pub heldout_missed: usize,
    /// Held-out real images the detector flagged.
    pub heldout_false_alarms: usize,
    /// Share of the real test digits the detector (run in our engine) refuses.
    pub false_refusal_rate: f64,
    /// Real test digits checked for false refusals.
    pub refusal_checked: usize,
    /// Largest difference between candle's and our engine's detector output on the held-out
    /// set.
    pub engine_max_diff: f32,
    /// Detector training loss per epoch.
    pub detector_loss: Vec<f64>,
}

/// The trained detector and the report.
#[derive(Debug)]
pub struct KennenOutcome {
    /// The measurements.
    pub report: KennenReport,
    /// The trained detector (class 1 = crafted).
    pub detector: Cnn,
    /// A few crafted queries (flattened 28×28 images), to look at.
    pub samples: Vec<f32>,
}

impl KennenReport {
    /// The floors, each with whether it holds.
    #[must_use]
    pub fn floors(&self) -> Vec<(&'static str, f64, bool)> {
        vec![
            (
                "held-out accuracy >= 0.99",
                self.heldout_accuracy,
                self.heldout_accuracy >= 0.99,
            ),
            (
                "false refusals <= 0.001",
                self.false_refusal_rate,
                self.false_refusal_rate <= 0.001,
            ),
        ]
    }

    /// The crafting loss per phase and the detector's training loss per epoch.
    #[must_use]
    pub fn panels(&self) -> Vec<Panel> {
        let line = |label: &str, v: &[f64], color: usize| Series {
            label: label.into(),
            points: v.iter().enumerate().map(|(i, &y)| (i as f64, y)).collect(),
            color: COLORS[color],
            markers: true,
        };
        vec![
            Panel {
                title: "kennen-io crafting".into(),
                x_label: "phase (metamodel, then input/metamodel pairs)".into(),
                y_label: "metamodel attribute loss".into(),
                series: vec![line(
                    "mean cross-entropy over 4 attributes",
                    &self.crafting_loss,
                    0,
                )],
                ..Panel::default()
            },
            Panel {
                title: "Detector training".into(),
                x_label: "epoch".into(),
                y_label: "loss".into(),
                series: vec![line(
                    &format!(
                        "train loss (held-out acc {:.4}, false refusals {:.4})",
                        self.heldout_accuracy, self.false_refusal_rate
                    ),
                    &self.detector_loss,
                    1,
                )],
                ..Panel::default()
            },
        ]
    }
}

/// The detector's input policy as the capsule should carry it: class 1 means crafted, the
/// graph outputs probabilities, refuse at 0.5.
#[must_use]
pub fn detector_policy() -> DetectorPolicy {
    DetectorPolicy {
        enabled: true,
        threshold: 0.5,
        crafted_class: 1,
        scores: DetectorScores::Probabilities,
    }
}

/// The detector in our engine's IR: input `x` `[?, 1, 28, 28]` (pixels in [0, 1]), output
/// `probs` `[?, 2]` (index 1 = crafted), and its weights, ready to seal beside the model.
pub fn detector_graph(
    detector: &Cnn,
) -> Result<(engine::Graph, HashMap<String, engine::Tensor>), Error> {
    detector.to_engine()
}

/// One family member's attributes, as 0/1 per [`ATTRIBUTES`] entry.
fn attributes(index: usize) -> [u32; 4] {
    [
        (index & 1) as u32,
        ((index >> 1) & 1) as u32,
        ((index >> 2) & 1) as u32,
        ((index >> 3) & 1) as u32,
    ]
}

fn family_architecture(a: [u32; 4]) -> Architecture {
    let kernel = if a[2] == 1 { 5 } else { 3 };
    let mut convs = vec![ConvLayer {
        filters: 8,
        kernel,
        padding: 0,
    }];
    if a[3] == 1 {
        convs.push(ConvLayer {
            filters: 16,
            kernel,
            padding: 0,
        });
    }
    Architecture {
        input: [1, 28, 28],
        convs,
        pool: true,
        hidden: vec![32],
        classes: CLASSES,
        activation: if a[0] == 1 {
            Activation::Tanh
        } else {
            Activation::Relu
        },
        dropout: if a[1] == 1 { 0.5 } else { 0.0 },
    }
}

/// Runs the whole pipeline.
///
/// Errors: [`Error::InvalidData`] when the data set is too small for the configuration, and
/// errors of candle, the engine and the defense.
pub fn run(data: &Dataset, config: &KennenConfig) -> Result<KennenOutcome, Error> {
    let mut rng = Rng::new(config.seed);
    let crafted_total = config.sets * config.queries_per_set;
    let test_sets = config
        .detector_test
        .div_ceil(config.queries_per_set.max(1))
        .max(1);
    let train_sets = config.sets.saturating_sub(test_sets);
    if train_sets * config.queries_per_set < config.detector_train
        || config.refusal_check > data.test.len()
        || crafted_total + 2 * (config.detector_train + config.detector_test) > data.train.len()
    {
        return Err(Error::InvalidData {
            reason: "the configuration asks for more images than the data set or the crafted \
                     sets hold"
                .into(),
        });
    }
    // Disjoint pieces of the training split: query starting points, detector's real images.
    let perm = rng.permutation(data.train.len());
    let (init_idx, rest) = perm.split_at(crafted_total);
    let (real_train_idx, rest) = rest.split_at(config.detector_train);
    let (real_test_idx, rest) = rest.split_at(config.detector_test);
    let init = data.train.select(init_idx)?;

    // 1. The family.
    let mut family = Vec::new();
    let mut family_accuracy = 0.0;
    let eval = data.test.head(1000);
    for i in 0..config.family {
        let attrs = attributes(i);
        let net = Cnn::new(family_architecture(attrs), &mut rng)?;
        let start = rng.below(rest.len().saturating_sub(config.family_train).max(1));
        let subset = data
            .train
            .select(&rest[start..(start + config.family_train).min(rest.len())])?;
        train::fit(
            &net,
            &subset.pixels,
            &subset.labels_u32(),
            &TrainConfig {
                epochs: 1,
                batch_size: 32,
                optimizer: Optimizer::Adam { lr: 2e-3 },
                seed: rng.next_u64(),
                stop_below: None,
            },
        )?;
        family_accuracy += train::accuracy(&net.predict(&eval.pixels, 500)?, &eval.labels);
        family.push((net, attrs));
    }
    family_accuracy /= config.family.max(1) as f64;
    let held_out_nets = (config.family / 4).max(1);
    let (crafting_nets, probe_nets) = family.split_at(config.family - held_out_nets);

    // 2. Crafting.
    let crafting = craft(&init.pixels, crafting_nets, probe_nets, config, &mut rng)?;
    let mean_perturbation = crafting
        .queries
        .chunks(init.dim())
        .zip(init.pixels.chunks(init.dim()))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y) * (x - y))
                .sum::<f32>()
                .sqrt() as f64
        })
        .sum::<f64>()
        / crafted_total.max(1) as f64;

    // 3. The detector: crafted sets [0, train_sets) for training, the last ones held out.
    let d = init.dim();
    let crafted_train = &crafting.queries[..config.detector_train * d];
    let held_start = train_sets * config.queries_per_set;
    let crafted_test = &crafting.queries[held_start * d..(held_start + config.detector_test) * d];
    let real_train = data.train.select(real_train_idx)?;
    let real_test = data.train.select(real_test_idx)?;
    let (x_train, y_train) = labelled(&real_train, crafted_train);
    let detector = Cnn::new(Architecture::detector(), &mut rng)?;
    let trained = train::fit(
        &detector,
        &x_train,
        &y_train,
        &TrainConfig {
            epochs: config.detector_epochs,
            batch_size: 64,
            optimizer: Optimizer::Adam { lr: 1e-3 },
            seed: rng.next_u64(),
            stop_below: None,
        },
    )?;

    let (x_test, y_test) = labelled(&real_test, crafted_test);
    let (graph, weights) = detector_graph(&detector)?;
    let model = engine::Model::new(graph, weights)?;
    let arch = detector.architecture().clone();
    let policy = detector_policy();
    let ours = crate::models::engine_predict(&model, &arch, &x_test)?;
    let theirs = detector.predict(&x_test, 500)?;
    let engine_max_diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let (mut missed, mut false_alarms) = (0, 0);
    for (p, &y) in ours.chunks(2).zip(&y_test) {
        let refuse = capsule_defense::detector::decide(&policy, p)?.refuse;
        match (y, refuse) {
            (1, false) => missed += 1,
            (0, true) => false_alarms += 1,
            _ => {}
        }
    }
    let heldout_accuracy = 1.0 - (missed + false_alarms) as f64 / y_test.len().max(1) as f64;

    let mut refused = 0;
    let check = data.test.head(config.refusal_check);
    for chunk in check.pixels.chunks(1000 * d) {
        let probs = crate::models::engine_predict(&model, &arch, chunk)?;
        for p in probs.chunks(2) {
            refused += usize::from(capsule_defense::detector::decide(&policy, p)?.refuse);
        }
    }
    let samples = crafting.queries[..d * 16.min(crafted_total)].to_vec();
    Ok(KennenOutcome {
        report: KennenReport {
            config: config.clone(),
            family_accuracy,
            attribute_accuracy: crafting.attribute_accuracy,
            crafting_loss: crafting.loss,
            mean_perturbation,
            heldout_accuracy,
            heldout_missed: missed,
            heldout_false_alarms: false_alarms,
            false_refusal_rate: refused as f64 / check.len().max(1) as f64,
            refusal_checked: check.len(),
            engine_max_diff,
            detector_loss: trained.epoch_loss,
        },
        detector,
        samples,
    })
}

/// Real images (label 0) followed by crafted ones (label 1).
fn labelled(real: &Images, crafted: &[f32]) -> (Vec<f32>, Vec<u32>) {
    let mut x = real.pixels.clone();
    x.extend_from_slice(crafted);
    let n_crafted = crafted.len() / real.dim().max(1);
    let y = std::iter::repeat_n(0, real.len())
        .chain(std::iter::repeat_n(1, n_crafted))
        .collect();
    (x, y)
}

struct Crafting {
    queries: Vec<f32>,
    loss: Vec<f64>,
    attribute_accuracy: Vec<f64>,
}

/// Per-set metamodels: `S` independent MLPs (`n·10 → hidden → 2 per attribute`), held as
/// batched weights so one batched matmul runs them all.
struct Metamodels {
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
}

const META_HIDDEN: usize = 128;

impl Metamodels {
    fn new(sets: usize, inputs: usize, rng: &mut Rng) -> Result<Metamodels, Error> {
        let outputs = 2 * ATTRIBUTES.len();
        let var = |shape: &[usize], fan_in: usize, rng: &mut Rng| -> Result<Var, Error> {
            let bound = 1.0 / (fan_in as f32).sqrt();
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.uniform_in(-bound, bound)).collect();
            Ok(Var::from_tensor(&Tensor::from_vec(
                v,
                shape,
                &Device::Cpu,
            )?)?)
        };
        Ok(Metamodels {
            w1: var(&[sets, inputs, META_HIDDEN], inputs, rng)?,
            b1: var(&[sets, 1, META_HIDDEN], inputs, rng)?,
            w2: var(&[sets, META_HIDDEN, outputs], META_HIDDEN, rng)?,
            b2: var(&[sets, 1, outputs], META_HIDDEN, rng)?,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
        ]
    }

    /// `features` `[S, nets, n·10]` → logits `[S, nets, 2·attributes]`.
    fn forward(&self, features: &Tensor, frozen: bool) -> Result<Tensor, Error> {
        let t = |v: &Var| {
            if frozen {
                v.as_tensor().detach()
            } else {
                v.as_tensor().clone()
            }
        };
        let h = features
            .matmul(&t(&self.w1))?
            .broadcast_add(&t(&self.b1))?
            .relu()?;
        Ok(h.matmul(&t(&self.w2))?.broadcast_add(&t(&self.b2))?)
    }
}

/// Mean cross-entropy over attributes; `logits` `[S, nets, 2·A]`, `targets` per net.
fn attribute_loss(logits: &Tensor, targets: &[[u32; 4]]) -> Result<Tensor, Error> {
    let (s, nets, _) = logits.dims3()?;
    let logits = logits.reshape((s * nets * ATTRIBUTES.len(), 2))?;
    let mut y = Vec::with_capacity(s * nets * ATTRIBUTES.len());
    for _ in 0..s {
        for t in targets {
            y.extend_from_slice(t);
        }
    }
    let y = Tensor::from_vec(y, s * nets * ATTRIBUTES.len(), &Device::Cpu)?;
    Ok(candle_nn::loss::cross_entropy(&logits, &y)?)
}

/// The posteriors of `nets` on all queries, as metamodel features `[S, nets, n·10]`.
fn features(x: &Tensor, nets: &[&Cnn], sets: usize) -> Result<Tensor, Error> {
    let per_net = nets
        .iter()
        .map(|net| {
            let p = candle_nn::ops::softmax(&net.forward_frozen(x)?, D::Minus1)?;
            Ok(p.reshape((sets, 1, ()))?)
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Tensor::cat(&per_net, 1)?)
}

fn craft(
    init: &[f32],
    nets: &[(Cnn, [u32; 4])],
    probes: &[(Cnn, [u32; 4])],
    config: &KennenConfig,
    rng: &mut Rng,
) -> Result<Crafting, Error> {
    let (sets, n) = (config.sets, config.queries_per_set);
    let d = init.len() / (sets * n).max(1);
    let x = Var::from_tensor(&Tensor::from_slice(init, (sets * n, d), &Device::Cpu)?)?;
    let meta = Metamodels::new(sets, n * CLASSES, rng)?;
    let mut meta_opt = Optim::for_vars(meta.vars(), Optimizer::Adam { lr: 1e-3 })?;
    let mut input_opt = Optim::for_vars(
        vec![x.clone()],
        Optimizer::Adam {
            lr: config.input_lr,
        },
    )?;
    let all: Vec<&Cnn> = nets.iter().map(|(n, _)| n).collect();
    let all_targets: Vec<[u32; 4]> = nets.iter().map(|(_, a)| *a).collect();
    let mut loss_trace = Vec::new();

    let meta_phase = |steps: usize, opt: &mut Optim| -> Result<f64, Error> {
        let f = features(&x.as_tensor().detach(), &all, sets)?;
        let mut last = f64::NAN;
        for _ in 0..steps {
            let loss = attribute_loss(&meta.forward(&f, false)?, &all_targets)?;
            last = f64::from(loss.to_scalar::<f32>()?);
            opt.backward_step(&loss)?;
        }
        Ok(last)
    };
    loss_trace.push(meta_phase(4 * config.meta_steps, &mut meta_opt)?);
    for _ in 0..config.rounds {
        for _ in 0..config.input_steps {
            let pick: Vec<usize> = rng
                .permutation(nets.len())
                .into_iter()
                .take(config.nets_per_step.max(1))
                .collect();
            let batch: Vec<&Cnn> = pick.iter().map(|&i| &nets[i].0).collect();
            let targets: Vec<[u32; 4]> = pick.iter().map(|&i| nets[i].1).collect();
            let f = features(x.as_tensor(), &batch, sets)?;
            let loss = attribute_loss(&meta.forward(&f, true)?, &targets)?;
            input_opt.backward_step(&loss)?;
            // kennen's U1 noise, then the valid pixel range.
            let noise: Vec<f32> = (0..sets * n * d)
                .map(|_| rng.uniform_in(-0.5 / 256.0, 0.5 / 256.0))
                .collect();
            let noise = Tensor::from_vec(noise, (sets * n, d), &Device::Cpu)?;
            x.set(&(x.as_tensor() + noise)?.clamp(0f32, 1f32)?)?;
        }
        loss_trace.push(meta_phase(config.meta_steps, &mut meta_opt)?);
    }

    // Attribute accuracy on nets that took no part in crafting.
    let probe_nets: Vec<&Cnn> = probes.iter().map(|(n, _)| n).collect();
    let f = features(&x.as_tensor().detach(), &probe_nets, sets)?;
    let logits = meta.forward(&f, true)?;
    let (s, p, _) = logits.dims3()?;
    let pred = logits
        .reshape((s, p, ATTRIBUTES.len(), 2))?
        .argmax(D::Minus1)?
        .to_vec3::<u32>()?;
    let mut attribute_accuracy = vec![0.0; ATTRIBUTES.len()];
    for set in &pred {
        for (net, row) in set.iter().enumerate() {
            for (a, &v) in row.iter().enumerate() {
                attribute_accuracy[a] += f64::from(u8::from(v == probes[net].1[a]));
            }
        }
    }
    for v in &mut attribute_accuracy {
        *v /= (s * p).max(1) as f64;
    }
    Ok(Crafting {
        queries: x.as_tensor().flatten_all()?.to_vec1::<f32>()?,
        loss: loss_trace,
        attribute_accuracy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_covers_every_combination() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..16 {
            let a = attributes(i);
            seen.insert(a);
            let arch = family_architecture(a);
            assert_eq!(arch.convs.len(), 1 + a[3] as usize);
            assert!(arch.params().is_ok());
        }
        assert_eq!(seen.len(), 16);
    }
}
