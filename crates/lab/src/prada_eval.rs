//! PRADA against model extraction (Juuti et al.; MLCapsule §7.2; algorithms.md §1, §4.2).
//!
//! A target MNIST classifier answers label-only queries; every query first goes through
//! [`capsule_defense::Prada`] with the provider's δ, under the `record` action so that the
//! whole W trace is seen (under `deny` the first alarm would end the stream). Measured:
//!
//! - benign streams: real MNIST test images in three seeded orders; any alarm is a false one;
//! - Papernot et al.'s Jacobian-based dataset augmentation (JbDA): a seed set of real test
//!   images, then rounds of `x + λ·sign(∂F̂[label(x)]/∂x)` computed on a substitute F̂
//!   trained with candle on the labels the target returned;
//! - Tramèr-style random queries: pixels uniform in [0, 1].
//!
//! δ is chosen as PRADA's authors do, as the largest value that raises no alarm on benign
//! traffic, but on separate calibration streams (real training images, three orders) so that
//! the test streams measure a false-alarm rate instead of restating the calibration: δ is the
//! smallest W seen on the calibration streams, rounded down to two decimals.

use candle_core::{Device, Tensor, Var};
use capsule_defense::{Prada, PradaAction, PradaPolicy};

use crate::Error;
use crate::data::{CLASSES, Dataset, Images};
use crate::models::{Architecture, Cnn};
use crate::plot::{COLORS, HLine, Panel, Series};
use crate::rng::Rng;
use crate::train::{self, Optimizer, TrainConfig};

/// The experiment's size and seed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PradaConfig {
    /// Training images of the target.
    pub target_train: usize,
    /// The target's training epochs.
    pub target_epochs: usize,
    /// Queries in each benign stream (test and calibration).
    pub benign_queries: usize,
    /// Number of benign streams (orders), for calibration and for test each.
    pub streams: usize,
    /// JbDA seed images per class.
    pub seeds_per_class: usize,
    /// JbDA augmentation rounds (the seed set doubles each round).
    pub jbda_rounds: usize,
    /// JbDA step λ (pixels in [0, 1]).
    pub lambda: f32,
    /// Substitute training epochs per round.
    pub substitute_epochs: usize,
    /// Queries of the random-query attack.
    pub random_queries: usize,
    /// Seeds everything.
    pub seed: u64,
}

impl PradaConfig {
    /// The full run (a few minutes on 2 cores).
    #[must_use]
    pub fn full() -> PradaConfig {
        PradaConfig {
            target_train: 10_000,
            target_epochs: 2,
            benign_queries: 5000,
            streams: 3,
            seeds_per_class: 10,
            jbda_rounds: 4,
            lambda: 0.1,
            substitute_epochs: 10,
            random_queries: 3000,
            seed: 2,
        }
    }

    /// A smoke run of a few seconds.
    #[must_use]
    pub fn quick() -> PradaConfig {
        PradaConfig {
            target_train: 1000,
            target_epochs: 1,
            benign_queries: 300,
            streams: 3,
            seeds_per_class: 3,
            jbda_rounds: 3,
            lambda: 0.1,
            substitute_epochs: 3,
            random_queries: 300,
            seed: 2,
        }
    }
}

/// One stream of queries through PRADA.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamTrace {
    /// What the stream was.
    pub name: String,
    /// Queries sent.
    pub queries: usize,
    /// (query number, W) at every test PRADA ran.
    pub w: Vec<(u64, f64)>,
    /// The query (1-based) that raised the first alarm, if any.
    pub first_alarm: Option<u64>,
    /// Tests that raised an alarm.
    pub alarms: u64,
    /// Queries PRADA stored in its growing sets at the end.
    pub stored: usize,
}

impl StreamTrace {
    /// The smallest W of the stream (1 if never tested).
    #[must_use]
    pub fn min_w(&self) -> f64 {
        self.w.iter().map(|p| p.1).fold(1.0, f64::min)
    }
}

/// The experiment's outcome.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PradaReport {
    /// What was run.
    pub config: PradaConfig,
    /// The target's test accuracy.
    pub target_accuracy: f64,
    /// The δ used for the test streams and the attacks.
    pub delta: f64,
    /// The calibration streams (real training images) that chose δ.
    pub calibration: Vec<StreamTrace>,
    /// The benign test streams.
    pub benign: Vec<StreamTrace>,
    /// The JbDA attack.
    pub jbda: StreamTrace,
    /// Agreement of the JbDA substitute with the target on the test set after the last round.
    pub substitute_agreement: f64,
    /// The random-query attack.
    pub random: StreamTrace,
}

impl PradaReport {
    /// Alarms over all benign test streams.
    #[must_use]
    pub fn benign_alarms(&self) -> u64 {
        self.benign.iter().map(|s| s.alarms).sum()
    }

    /// The floors, each with whether it holds.
    #[must_use]
    pub fn floors(&self) -> Vec<(&'static str, f64, bool)> {
        vec![
            (
                "benign alarms == 0",
                self.benign_alarms() as f64,
                self.benign_alarms() == 0,
            ),
            (
                "JbDA detected within 300 queries",
                self.jbda.first_alarm.map_or(f64::NAN, |q| q as f64),
                self.jbda.first_alarm.is_some_and(|q| q <= 300),
            ),
        ]
    }

    /// W against queries for every stream, with δ.
    #[must_use]
    pub fn panels(&self) -> Vec<Panel> {
        let trace = |s: &StreamTrace, color: [u8; 3]| Series {
            label: match s.first_alarm {
                Some(q) => format!("{} (alarm at {q})", s.name),
                None => format!("{} (no alarm)", s.name),
            },
            points: s.w.iter().map(|&(q, w)| (q as f64, w)).collect(),
            color,
            markers: false,
        };
        let mut series: Vec<Series> = self
            .benign
            .iter()
            .enumerate()
            .map(|(i, s)| trace(s, [60 + 40 * i as u8, 140 + 30 * i as u8, 60]))
            .collect();
        series.push(trace(&self.jbda, COLORS[1]));
        series.push(trace(&self.random, COLORS[0]));
        let mut attacks = series.split_off(self.benign.len());
        for s in &mut attacks {
            s.markers = true;
        }
        let delta = HLine {
            y: self.delta,
            label: format!("delta = {:.2}", self.delta),
            color: [0, 0, 0],
        };
        vec![
            Panel {
                title: "PRADA: Shapiro-Wilk W".into(),
                x_label: "queries".into(),
                y_label: "W".into(),
                series: series.iter().cloned().chain(attacks.clone()).collect(),
                hlines: vec![delta.clone()],
                y_range: None,
                x_range: None,
            },
            Panel {
                title: "first 1000 queries".into(),
                x_label: "queries".into(),
                y_label: "W".into(),
                series: series.into_iter().chain(attacks).collect(),
                hlines: vec![delta],
                y_range: None,
                x_range: Some((0.0, 1000.0)),
            },
        ]
    }
}

/// Sends `inputs` (one after the other) with the target's labels `classes` through a fresh
/// PRADA detector.
pub fn stream(
    name: &str,
    policy: &PradaPolicy,
    inputs: &[f32],
    classes: &[usize],
) -> Result<StreamTrace, Error> {
    let mut prada = Prada::new(policy.clone())?;
    let d = inputs.len() / classes.len().max(1);
    let mut w = Vec::new();
    for (x, &c) in inputs.chunks(d.max(1)).zip(classes) {
        if let Some(t) = prada.observe(x, c)?.test {
            w.push((t.query, t.w));
        }
    }
    Ok(StreamTrace {
        name: name.into(),
        queries: classes.len(),
        w,
        first_alarm: prada.state().first_alarm().map(|t| t.query),
        alarms: prada.state().alarms(),
        stored: prada.state().stored(),
    })
}

/// The target's predicted classes for `inputs`.
fn labels_of(target: &Cnn, inputs: &[f32]) -> Result<Vec<usize>, Error> {
    Ok(target
        .predict(inputs, 512)?
        .chunks(CLASSES)
        .map(|p| capsule_defense::argmax(p).unwrap_or(0))
        .collect())
}

/// `images` in `n` seeded orders, truncated to `len` queries each.
fn orders(images: &Images, n: usize, len: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    (0..n)
        .map(|_| {
            let mut p = rng.permutation(images.len());
            p.truncate(len);
            p
        })
        .collect()
}

/// Runs the whole experiment.
///
/// Errors: [`Error::InvalidData`] when the data set is too small, or errors of candle and of
/// the defense.
pub fn run(data: &Dataset, config: &PradaConfig) -> Result<PradaReport, Error> {
    let mut rng = Rng::new(config.seed);
    if config.target_train > data.train.len() / 2 || config.benign_queries > data.test.len() {
        return Err(Error::InvalidData {
            reason: "the data set is smaller than the configuration asks".into(),
        });
    }
    // The target: the first half of a shuffle of the training split. The second half feeds
    // the calibration streams.
    let perm = rng.permutation(data.train.len());
    let (train_idx, spare_idx) = perm.split_at(data.train.len() / 2);
    let train_set = data.train.select(&train_idx[..config.target_train])?;
    let spare = data.train.select(spare_idx)?;
    let target = Cnn::new(Architecture::mnist_classifier(64), &mut rng)?;
    train::fit(
        &target,
        &train_set.pixels,
        &train_set.labels_u32(),
        &TrainConfig {
            epochs: config.target_epochs,
            batch_size: 32,
            optimizer: Optimizer::Adam { lr: 1e-3 },
            seed: rng.next_u64(),
            stop_below: None,
        },
    )?;
    let test_classes = labels_of(&target, &data.test.pixels)?;
    let target_accuracy = test_classes
        .iter()
        .zip(&data.test.labels)
        .filter(|(p, l)| **p == usize::from(**l))
        .count() as f64
        / data.test.len().max(1) as f64;

    // Calibration: δ = min W over benign training-image streams, rounded down.
    let probe = PradaPolicy::new(0.01, PradaAction::Record);
    let mut calibration = Vec::new();
    for (i, order) in orders(&spare, config.streams, config.benign_queries, &mut rng)
        .into_iter()
        .enumerate()
    {
        let x = spare.select(&order)?.pixels;
        let c = labels_of(&target, &x)?;
        calibration.push(stream(&format!("calibration {}", i + 1), &probe, &x, &c)?);
    }
    let min_w = calibration
        .iter()
        .map(StreamTrace::min_w)
        .fold(1.0, f64::min);
    let delta = ((min_w * 100.0).floor() / 100.0).clamp(0.01, 0.99);
    let policy = PradaPolicy::new(delta, PradaAction::Record);

    let mut benign = Vec::new();
    for (i, order) in orders(&data.test, config.streams, config.benign_queries, &mut rng)
        .into_iter()
        .enumerate()
    {
        let (x, c) = gather(&data.test, &test_classes, &order);
        benign.push(stream(&format!("benign {}", i + 1), &policy, &x, &c)?);
    }

    let (jbda_x, substitute) = jbda_queries(&target, data, config, &mut rng)?;
    let jbda_c = labels_of(&target, &jbda_x)?;
    let jbda = stream("JbDA", &policy, &jbda_x, &jbda_c)?;
    let sub_classes = labels_of(&substitute, &data.test.pixels)?;
    let substitute_agreement = sub_classes
        .iter()
        .zip(&test_classes)
        .filter(|(a, b)| a == b)
        .count() as f64
        / test_classes.len().max(1) as f64;

    let d = data.test.dim();
    let random_x: Vec<f32> = (0..config.random_queries * d)
        .map(|_| rng.uniform() as f32)
        .collect();
    let random_c = labels_of(&target, &random_x)?;
    let random = stream("random", &policy, &random_x, &random_c)?;

    Ok(PradaReport {
        config: config.clone(),
        target_accuracy,
        delta,
        calibration,
        benign,
        jbda,
        substitute_agreement,
        random,
    })
}

fn gather(images: &Images, classes: &[usize], order: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let mut x = Vec::with_capacity(order.len() * images.dim());
    let mut c = Vec::with_capacity(order.len());
    for &i in order {
        x.extend_from_slice(images.image(i));
        c.push(classes[i]);
    }
    (x, c)
}

/// The JbDA attacker's queries, in the order it sends them, and its final substitute.
///
/// Round 0 queries the seed set (real test images, `seeds_per_class` per class); each round
/// trains the substitute on everything labelled so far, then queries one Jacobian step from
/// every point: `x + λ·sign(∂F̂[label(x)]/∂x)`, clipped to [0, 1].
pub fn jbda_queries(
    target: &Cnn,
    data: &Dataset,
    config: &PradaConfig,
    rng: &mut Rng,
) -> Result<(Vec<f32>, Cnn), Error> {
    let d = data.test.dim();
    let mut per_class = [0usize; CLASSES];
    let mut set: Vec<f32> = Vec::new();
    for i in rng.permutation(data.test.len()) {
        let l = usize::from(data.test.labels[i]);
        if per_class[l] < config.seeds_per_class {
            per_class[l] += 1;
            set.extend_from_slice(data.test.image(i));
        }
    }
    let mut queries = set.clone();
    let mut labels: Vec<u32> = labels_of(target, &set)?
        .into_iter()
        .map(|c| c as u32)
        .collect();
    let substitute = Cnn::new(Architecture::mnist_classifier(64), rng)?;
    for round in 0..config.jbda_rounds {
        train::fit(
            &substitute,
            &set,
            &labels,
            &TrainConfig {
                epochs: config.substitute_epochs,
                batch_size: 32,
                optimizer: Optimizer::Adam { lr: 1e-3 },
                seed: rng.next_u64(),
                stop_below: None,
            },
        )?;
        if round + 1 == config.jbda_rounds {
            break;
        }
        let grads = class_gradients(&substitute, &set, &labels)?;
        let new: Vec<f32> = set
            .iter()
            .zip(&grads)
            .map(|(&x, &g)| (x + config.lambda * g.signum() * f32::from(g != 0.0)).clamp(0.0, 1.0))
            .collect();
        let new_labels = labels_of(target, &new)?;
        queries.extend_from_slice(&new);
        set.extend_from_slice(&new);
        labels.extend(new_labels.into_iter().map(|c| c as u32));
        debug_assert_eq!(set.len(), labels.len() * d);
    }
    Ok((queries, substitute))
}

/// ∂F̂[label]/∂x for every input, F̂'s logits (one row of the Jacobian per input).
fn class_gradients(net: &Cnn, inputs: &[f32], labels: &[u32]) -> Result<Vec<f32>, Error> {
    let d = net.architecture().input_len();
    let mut out = Vec::with_capacity(inputs.len());
    for (xs, ys) in inputs.chunks(256 * d).zip(labels.chunks(256)) {
        let x = Var::from_tensor(&Tensor::from_slice(xs, (ys.len(), d), &Device::Cpu)?)?;
        let logits = net.forward_frozen(x.as_tensor())?;
        let idx = Tensor::from_slice(ys, (ys.len(), 1), &Device::Cpu)?;
        let picked = logits.gather(&idx, 1)?.sum_all()?;
        let grads = picked.backward()?;
        let g = grads.get(x.as_tensor()).ok_or_else(|| Error::InvalidData {
            reason: "no gradient reached the input".into(),
        })?;
        out.extend(g.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}
