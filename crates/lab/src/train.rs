//! Supervised training of a [`Cnn`] with candle's autograd: mini-batch cross-entropy, Adam or
//! plain SGD, shuffled by the lab's seeded [`Rng`] so a run is reproducible.

use candle_core::{Device, Tensor};
use candle_nn::Optimizer as _;

use crate::Error;
use crate::models::Cnn;
use crate::rng::Rng;

/// The optimiser.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Optimizer {
    /// Adam (candle's AdamW with no weight decay).
    Adam {
        /// Learning rate.
        lr: f64,
    },
    /// Stochastic gradient descent without momentum.
    Sgd {
        /// Learning rate.
        lr: f64,
    },
}

/// How to train.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TrainConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// The optimiser.
    pub optimizer: Optimizer,
    /// Seeds the shuffles and dropout masks.
    pub seed: u64,
    /// Stop after the first epoch whose mean training loss is below this (none: run all
    /// epochs).
    pub stop_below: Option<f64>,
}

/// What training did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrainReport {
    /// Mean training loss of each epoch.
    pub epoch_loss: Vec<f64>,
    /// Steps taken.
    pub steps: usize,
}

/// Trains `net` on `n` inputs (one after the other in `inputs`) with `labels`.
///
/// Errors: [`Error::InvalidData`] when inputs and labels disagree, [`Error::Training`] from
/// candle.
pub fn fit(
    net: &Cnn,
    inputs: &[f32],
    labels: &[u32],
    config: &TrainConfig,
) -> Result<TrainReport, Error> {
    let d = net.architecture().input_len();
    if inputs.len() != labels.len() * d {
        return Err(Error::InvalidData {
            reason: format!(
                "{} input values for {} labels of {d} values each",
                inputs.len(),
                labels.len()
            ),
        });
    }
    let mut rng = Rng::new(config.seed);
    let mut opt = Optim::new(net, config.optimizer)?;
    let n = labels.len();
    let bs = config.batch_size.max(1);
    let mut report = TrainReport {
        epoch_loss: Vec::with_capacity(config.epochs),
        steps: 0,
    };
    let mut xb = Vec::with_capacity(bs * d);
    let mut yb = Vec::with_capacity(bs);
    for _ in 0..config.epochs {
        let order = rng.permutation(n);
        let (mut sum, mut batches) = (0.0, 0usize);
        for chunk in order.chunks(bs) {
            xb.clear();
            yb.clear();
            for &i in chunk {
                xb.extend_from_slice(&inputs[i * d..(i + 1) * d]);
                yb.push(labels[i]);
            }
            let x = Tensor::from_slice(&xb, (chunk.len(), d), &Device::Cpu)?;
            let y = Tensor::from_slice(&yb, chunk.len(), &Device::Cpu)?;
            let logits = net.forward(&x, Some(&mut rng))?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
            sum += f64::from(loss.to_scalar::<f32>()?);
            batches += 1;
            report.steps += 1;
        }
        let mean = sum / batches.max(1) as f64;
        report.epoch_loss.push(mean);
        if config.stop_below.is_some_and(|limit| mean < limit) {
            break;
        }
    }
    Ok(report)
}

/// candle's two optimisers behind one type.
pub(crate) enum Optim {
    Adam(candle_nn::AdamW),
    Sgd(candle_nn::SGD),
}

impl Optim {
    pub(crate) fn new(net: &Cnn, optimizer: Optimizer) -> Result<Optim, Error> {
        Optim::for_vars(net.vars().to_vec(), optimizer)
    }

    pub(crate) fn for_vars(
        vars: Vec<candle_core::Var>,
        optimizer: Optimizer,
    ) -> Result<Optim, Error> {
        Ok(match optimizer {
            Optimizer::Adam { lr } => Optim::Adam(candle_nn::AdamW::new(
                vars,
                candle_nn::ParamsAdamW {
                    lr,
                    weight_decay: 0.0,
                    ..Default::default()
                },
            )?),
            Optimizer::Sgd { lr } => Optim::Sgd(candle_nn::SGD::new(vars, lr)?),
        })
    }

    pub(crate) fn backward_step(&mut self, loss: &Tensor) -> Result<(), Error> {
        match self {
            Optim::Adam(o) => o.backward_step(loss)?,
            Optim::Sgd(o) => o.backward_step(loss)?,
        }
        Ok(())
    }
}

/// Share of rows of `probs` (`labels.len()` rows) whose argmax is the label.
#[must_use]
pub fn accuracy(probs: &[f32], labels: &[u8]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let k = probs.len() / labels.len();
    let hits = probs
        .chunks(k)
        .zip(labels)
        .filter(|(p, l)| capsule_defense::argmax(p) == Some(usize::from(**l)))
        .count();
    hits as f64 / labels.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Architecture;

    /// Two separable blobs in 4-d: a short run must learn them, and twice the same.
    #[test]
    fn learns_a_toy_task_deterministically() {
        let mut rng = Rng::new(3);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..200 {
            let c = (i % 2) as u32;
            for _ in 0..4 {
                x.push(c as f32 * 2.0 - 1.0 + 0.3 * rng.normal() as f32);
            }
            y.push(c);
        }
        let arch = Architecture::mlp(4, vec![8], 2, 0.1);
        let cfg = TrainConfig {
            epochs: 5,
            batch_size: 20,
            optimizer: Optimizer::Adam { lr: 0.01 },
            seed: 9,
            stop_below: None,
        };
        let run = || {
            let net = Cnn::new(arch.clone(), &mut Rng::new(1)).unwrap();
            let report = fit(&net, &x, &y, &cfg).unwrap();
            (net.predict(&x, 64).unwrap(), report)
        };
        let (p1, r1) = run();
        let (p2, r2) = run();
        assert_eq!(p1, p2);
        assert_eq!(r1, r2);
        let labels: Vec<u8> = y.iter().map(|&v| v as u8).collect();
        assert!(accuracy(&p1, &labels) > 0.95);
        assert!(r1.epoch_loss.last() < r1.epoch_loss.first());
        assert!(fit(&Cnn::new(arch, &mut rng).unwrap(), &x[1..], &y, &cfg).is_err());
    }
}
