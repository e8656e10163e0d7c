//! Small convolutional networks: an [`Architecture`], its trainable [`Cnn`] in candle, and
//! its export to our engine's IR.
//!
//! Every network is `[conv → (2×2 max-pool) → activation]* → flatten → [FC → activation →
//! dropout]* → FC`, the shape of the classic PyTorch MNIST example (MLCapsule's detector) and
//! of the small classifiers the lab attacks. Pooling before the activation equals pooling after
//! it for the monotone activations offered here. Dropout (inverted, so inference is the
//! identity) is applied to the flattened features and after each hidden FC layer.
//!
//! Weights are initialised as PyTorch does by default (uniform in ±1/√fan_in), from the lab's
//! seeded [`Rng`]: candle's CPU backend cannot be seeded.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use capsule_engine as engine;

use crate::Error;
use crate::rng::Rng;

/// An element-wise non-linearity between layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// Hyperbolic tangent.
    Tanh,
    /// Logistic sigmoid.
    Sigmoid,
}

/// One convolution layer: `filters` kernels of `kernel × kernel`, stride 1, zero padding
/// `padding` on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConvLayer {
    /// Output channels.
    pub filters: usize,
    /// Kernel side.
    pub kernel: usize,
    /// Zero padding on each side.
    pub padding: usize,
}

/// A network's shape and hyper-parameters; see the module docs for the layer order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Architecture {
    /// Input `[channels, height, width]`.
    pub input: [usize; 3],
    /// Convolution layers, in order.
    pub convs: Vec<ConvLayer>,
    /// A 2×2 max-pool after each convolution.
    pub pool: bool,
    /// Widths of the hidden fully connected layers.
    pub hidden: Vec<usize>,
    /// Number of outputs.
    pub classes: usize,
    /// The non-linearity.
    pub activation: Activation,
    /// Dropout rate in [0, 1) during training; 0 turns it off.
    pub dropout: f32,
}

impl Architecture {
    /// MLCapsule's kennen-io detector (paper §7.1): conv 5×5 ×10 → pool → ReLU → conv 5×5
    /// ×20 → pool → ReLU → FC 50 → dropout → FC 2, on 28×28 images.
    #[must_use]
    pub fn detector() -> Architecture {
        Architecture {
            input: [1, 28, 28],
            convs: vec![
                ConvLayer {
                    filters: 10,
                    kernel: 5,
                    padding: 0,
                },
                ConvLayer {
                    filters: 20,
                    kernel: 5,
                    padding: 0,
                },
            ],
            pool: true,
            hidden: vec![50],
            classes: 2,
            activation: Activation::Relu,
            dropout: 0.5,
        }
    }

    /// A small MNIST classifier: conv 5×5 ×16 → pool → ReLU → conv 5×5 ×32 → pool → ReLU →
    /// FC `hidden` → FC 10, no dropout (the lab wants it able to overfit).
    #[must_use]
    pub fn mnist_classifier(hidden: usize) -> Architecture {
        Architecture {
            input: [1, 28, 28],
            convs: vec![
                ConvLayer {
                    filters: 16,
                    kernel: 5,
                    padding: 0,
                },
                ConvLayer {
                    filters: 32,
                    kernel: 5,
                    padding: 0,
                },
            ],
            pool: true,
            hidden: vec![hidden],
            classes: 10,
            activation: Activation::Relu,
            dropout: 0.0,
        }
    }

    /// A multi-layer perceptron on a flat input of `inputs` values.
    #[must_use]
    pub fn mlp(inputs: usize, hidden: Vec<usize>, classes: usize, dropout: f32) -> Architecture {
        Architecture {
            input: [1, 1, inputs],
            convs: vec![],
            pool: false,
            hidden,
            classes,
            activation: Activation::Relu,
            dropout,
        }
    }

    /// Values per input.
    #[must_use]
    pub fn input_len(&self) -> usize {
        self.input.iter().product()
    }

    /// `[channels, height, width]` after each convolution block, or an error when a kernel
    /// does not fit.
    fn conv_shapes(&self) -> Result<Vec<[usize; 3]>, Error> {
        let mut shape = self.input;
        let mut out = Vec::new();
        for (i, c) in self.convs.iter().enumerate() {
            let h = (shape[1] + 2 * c.padding).checked_sub(c.kernel);
            let w = (shape[2] + 2 * c.padding).checked_sub(c.kernel);
            let (Some(h), Some(w)) = (h, w) else {
                return Err(Error::InvalidData {
                    reason: format!("convolution {i}'s kernel is larger than its input"),
                });
            };
            let (mut h, mut w) = (h + 1, w + 1);
            if self.pool {
                h /= 2;
                w /= 2;
            }
            if h == 0 || w == 0 {
                return Err(Error::InvalidData {
                    reason: format!("convolution block {i} leaves nothing to pool"),
                });
            }
            shape = [c.filters, h, w];
            out.push(shape);
        }
        Ok(out)
    }

    /// Every weight's name and shape, in the order of [`Cnn::vars`]: per convolution
    /// `conv{i}.weight [M, C, k, k]`, `conv{i}.bias [M]`; per FC `fc{i}.weight [out, in]`,
    /// `fc{i}.bias [out]` (the last FC is the output layer).
    pub fn params(&self) -> Result<Vec<(String, Vec<usize>)>, Error> {
        let mut params = Vec::new();
        let mut channels = self.input[0];
        for (i, c) in self.convs.iter().enumerate() {
            params.push((
                format!("conv{i}.weight"),
                vec![c.filters, channels, c.kernel, c.kernel],
            ));
            params.push((format!("conv{i}.bias"), vec![c.filters]));
            channels = c.filters;
        }
        let mut features = match self.conv_shapes()?.last() {
            Some(s) => s.iter().product(),
            None => self.input_len(),
        };
        let widths: Vec<usize> = self.hidden.iter().copied().chain([self.classes]).collect();
        for (i, &out) in widths.iter().enumerate() {
            params.push((format!("fc{i}.weight"), vec![out, features]));
            params.push((format!("fc{i}.bias"), vec![out]));
            features = out;
        }
        Ok(params)
    }
}

/// A trainable network: its architecture and its weights as candle variables.
#[derive(Debug, Clone)]
pub struct Cnn {
    arch: Architecture,
    names: Vec<String>,
    vars: Vec<Var>,
}

impl Cnn {
    /// A network with fresh weights drawn from `rng`.
    ///
    /// Errors: [`Error::InvalidData`] when the layers do not fit the input.
    pub fn new(arch: Architecture, rng: &mut Rng) -> Result<Cnn, Error> {
        let mut names = Vec::new();
        let mut vars = Vec::new();
        let params = arch.params()?;
        for pair in params.chunks(2) {
            let (wname, wshape) = &pair[0];
            let (bname, bshape) = &pair[1];
            let fan_in: usize = wshape[1..].iter().product();
            let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
            for (name, shape) in [(wname, wshape), (bname, bshape)] {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|_| rng.uniform_in(-bound, bound)).collect();
                let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?;
                names.push(name.clone());
                vars.push(Var::from_tensor(&t)?);
            }
        }
        Ok(Cnn { arch, names, vars })
    }

    /// The architecture.
    #[must_use]
    pub fn architecture(&self) -> &Architecture {
        &self.arch
    }

    /// The trainable variables (for an optimiser), in [`Architecture::params`] order.
    #[must_use]
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Logits for a batch `x` of shape `[n, C, H, W]`, tracked for back-propagation.
    /// With `dropout` given (training), dropout masks are drawn from it.
    pub fn forward(&self, x: &Tensor, dropout: Option<&mut Rng>) -> Result<Tensor, Error> {
        let params: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        self.forward_with(&params, x, dropout)
    }

    /// Logits with the weights detached: no gradient flows to the weights (it still flows
    /// to `x` if `x` is a variable). For evaluation and for optimising inputs.
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor, Error> {
        let params: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().detach()).collect();
        self.forward_with(&params, x, None)
    }

    fn forward_with(
        &self,
        params: &[Tensor],
        x: &Tensor,
        mut dropout: Option<&mut Rng>,
    ) -> Result<Tensor, Error> {
        let a = &self.arch;
        let n = x.dims()[0];
        let mut h = x.reshape((n, a.input[0], a.input[1], a.input[2]))?;
        let mut p = params.iter();
        for c in &a.convs {
            let (w, b) = (next(&mut p)?, next(&mut p)?);
            h = conv(&h, w, c.padding)?;
            h = h.broadcast_add(&b.reshape((1, c.filters, 1, 1))?)?;
            if a.pool {
                h = h.max_pool2d(2)?;
            }
            h = activate(&h, a.activation)?;
        }
        h = h.flatten_from(1)?;
        let fcs = a.hidden.len() + 1;
        for i in 0..fcs {
            if let Some(rng) = dropout.as_deref_mut() {
                h = apply_dropout(&h, a.dropout, rng)?;
            }
            let (w, b) = (next(&mut p)?, next(&mut p)?);
            h = h.matmul(&w.t()?)?.broadcast_add(b)?;
            if i + 1 < fcs {
                h = activate(&h, a.activation)?;
            }
        }
        Ok(h)
    }

    /// Softmax probabilities for `n` inputs stored one after the other in `inputs`, computed
    /// in batches of `batch`; returns `n × classes` values, row-major.
    pub fn predict(&self, inputs: &[f32], batch: usize) -> Result<Vec<f32>, Error> {
        let d = self.arch.input_len();
        let mut out = Vec::with_capacity(inputs.len() / d.max(1) * self.arch.classes);
        for chunk in inputs.chunks(batch.max(1) * d) {
            let n = chunk.len() / d;
            let x = Tensor::from_slice(chunk, (n, d), &Device::Cpu)?;
            let probs = candle_nn::ops::softmax(&self.forward_frozen(&x)?, 1)?;
            out.extend(probs.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// The weights as engine tensors, by name.
    pub fn weights(&self) -> Result<HashMap<String, engine::Tensor>, Error> {
        let mut map = HashMap::new();
        for (name, var) in self.names.iter().zip(&self.vars) {
            let t = var.as_tensor();
            let data = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            map.insert(name.clone(), engine::Tensor::new(t.dims().to_vec(), data)?);
        }
        Ok(map)
    }

    /// Replaces the weights with `weights` (as [`Cnn::weights`] returns them).
    ///
    /// Errors: [`Error::InvalidData`] when a weight is missing or has another shape.
    pub fn load_weights(&self, weights: &HashMap<String, engine::Tensor>) -> Result<(), Error> {
        for (name, var) in self.names.iter().zip(&self.vars) {
            let w = weights.get(name).ok_or_else(|| Error::InvalidData {
                reason: format!("weight {name} is missing"),
            })?;
            if w.shape() != var.as_tensor().dims() {
                return Err(Error::InvalidData {
                    reason: format!("weight {name} has shape {:?}", w.shape()),
                });
            }
            var.set(&Tensor::from_slice(w.data(), w.shape(), &Device::Cpu)?)?;
        }
        Ok(())
    }

    /// The network in our engine's IR, ending in a softmax: input `x` of shape
    /// `[?, C, H, W]`, output `probs` of shape `[?, classes]`, plus its weights. The graph
    /// runs in [`capsule_engine::Model`] and can be sealed into a capsule.
    pub fn to_engine(&self) -> Result<(engine::Graph, HashMap<String, engine::Tensor>), Error> {
        Ok((graph(&self.arch)?, self.weights()?))
    }
}

/// A stride-1 convolution as im2col (an `index_select` gather) and one matrix product.
///
/// Same result as candle's `conv2d`, but its backward pass is a scatter-add and two matrix
/// products, several times faster on the CPU than candle's transposed-convolution backward,
/// which dominates training time for these small networks.
fn conv(x: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor, Error> {
    let (n, c, h, wd) = x.dims4()?;
    let (m, _, k, _) = w.dims4()?;
    let x = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?
    } else {
        x.clone()
    };
    let (hp, wp) = (h + 2 * padding, wd + 2 * padding);
    let (oh, ow) = (hp + 1 - k, wp + 1 - k);
    let patch = c * k * k;
    let mut idx = Vec::with_capacity(oh * ow * patch);
    for i in 0..oh {
        for j in 0..ow {
            for ch in 0..c {
                for di in 0..k {
                    for dj in 0..k {
                        idx.push(((ch * hp + i + di) * wp + j + dj) as u32);
                    }
                }
            }
        }
    }
    let idx = Tensor::from_vec(idx, oh * ow * patch, x.device())?;
    let cols = x
        .reshape((n, c * hp * wp))?
        .index_select(&idx, 1)?
        .reshape((n * oh * ow, patch))?;
    let y = cols.matmul(&w.reshape((m, patch))?.t()?)?;
    Ok(y.reshape((n, oh * ow, m))?
        .transpose(1, 2)?
        .reshape((n, m, oh, ow))?)
}

fn next<'a>(p: &mut impl Iterator<Item = &'a Tensor>) -> Result<&'a Tensor, Error> {
    p.next().ok_or_else(|| Error::InvalidData {
        reason: "fewer weights than the architecture needs".into(),
    })
}

fn activate(h: &Tensor, a: Activation) -> Result<Tensor, Error> {
    Ok(match a {
        Activation::Relu => h.relu()?,
        Activation::Tanh => h.tanh()?,
        Activation::Sigmoid => candle_nn::ops::sigmoid(h)?,
    })
}

/// Inverted dropout with a mask from our own generator (candle's would not be reproducible).
fn apply_dropout(h: &Tensor, rate: f32, rng: &mut Rng) -> Result<Tensor, Error> {
    if rate <= 0.0 {
        return Ok(h.clone());
    }
    let keep = 1.0 - rate;
    let mask: Vec<f32> = (0..h.elem_count())
        .map(|_| {
            if rng.uniform() < f64::from(keep) {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, h.dims(), h.device())?;
    Ok(h.mul(&mask)?)
}

/// The engine graph of an architecture (weights named as in [`Architecture::params`]).
pub fn graph(arch: &Architecture) -> Result<engine::Graph, Error> {
    use engine::{ConvAttrs, Node, Op, ParamInfo, PoolAttrs, ValueInfo};
    let params: Vec<ParamInfo> = arch
        .params()?
        .into_iter()
        .map(|(name, shape)| ParamInfo { name, shape })
        .collect();
    let mut nodes = Vec::new();
    let mut value = "x".to_string();
    let push = |nodes: &mut Vec<Node>, name: String, op: Op, inputs: Vec<String>| {
        let out = format!("{name}.out");
        nodes.push(Node {
            name,
            op,
            inputs,
            outputs: vec![out.clone()],
        });
        out
    };
    let act_op = match arch.activation {
        Activation::Relu => Op::Relu,
        Activation::Tanh => Op::Tanh,
        Activation::Sigmoid => Op::Sigmoid,
    };
    for (i, c) in arch.convs.iter().enumerate() {
        let p = c.padding;
        value = push(
            &mut nodes,
            format!("conv{i}"),
            Op::Conv(ConvAttrs {
                kernel: [c.kernel, c.kernel],
                strides: [1, 1],
                pads: [p, p, p, p],
                dilations: [1, 1],
                group: 1,
                activation: engine::Activation::None,
            }),
            vec![value, format!("conv{i}.weight"), format!("conv{i}.bias")],
        );
        if arch.pool {
            value = push(
                &mut nodes,
                format!("pool{i}"),
                Op::MaxPool(PoolAttrs {
                    kernel: [2, 2],
                    strides: [2, 2],
                    pads: [0; 4],
                    dilations: [1, 1],
                    ceil_mode: false,
                }),
                vec![value],
            );
        }
        value = push(&mut nodes, format!("act{i}"), act_op.clone(), vec![value]);
    }
    value = push(
        &mut nodes,
        "flatten".into(),
        Op::Flatten { axis: 1 },
        vec![value],
    );
    let fcs = arch.hidden.len() + 1;
    for i in 0..fcs {
        value = push(
            &mut nodes,
            format!("fc{i}"),
            Op::Gemm {
                alpha: 1.0,
                beta: 1.0,
                trans_a: false,
                trans_b: true,
            },
            vec![value, format!("fc{i}.weight"), format!("fc{i}.bias")],
        );
        if i + 1 < fcs {
            value = push(
                &mut nodes,
                format!("fc{i}.act"),
                act_op.clone(),
                vec![value],
            );
        }
    }
    nodes.push(Node {
        name: "softmax".into(),
        op: Op::Softmax { axis: -1 },
        inputs: vec![value],
        outputs: vec!["probs".into()],
    });
    Ok(engine::Graph {
        inputs: vec![ValueInfo {
            name: "x".into(),
            shape: vec![
                None,
                Some(arch.input[0]),
                Some(arch.input[1]),
                Some(arch.input[2]),
            ],
        }],
        params,
        nodes,
        outputs: vec!["probs".into()],
    })
}

/// Runs `inputs` (`n` inputs one after the other) through our engine and returns the
/// `n × classes` probabilities.
pub fn engine_predict(
    model: &engine::Model,
    arch: &Architecture,
    inputs: &[f32],
) -> Result<Vec<f32>, Error> {
    let d = arch.input_len();
    let n = inputs.len() / d.max(1);
    let x = engine::Tensor::new(
        vec![n, arch.input[0], arch.input[1], arch.input[2]],
        inputs.to_vec(),
    )?;
    let out = model.run(&[x])?;
    Ok(out
        .into_iter()
        .next()
        .map(|t| t.into_parts().1)
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn batch(rng: &mut Rng, arch: &Architecture, n: usize) -> Vec<f32> {
        (0..n * arch.input_len())
            .map(|_| rng.uniform() as f32)
            .collect()
    }

    #[test]
    fn engine_matches_candle() {
        let mut rng = Rng::new(11);
        let mut archs = vec![Architecture::detector(), Architecture::mnist_classifier(64)];
        let mut tanh = Architecture::mnist_classifier(32);
        tanh.activation = Activation::Tanh;
        tanh.convs[0].padding = 2;
        tanh.convs[1].kernel = 3;
        archs.push(tanh);
        let mut sig = Architecture::mlp(784, vec![40, 20], 10, 0.3);
        sig.activation = Activation::Sigmoid;
        archs.push(sig);
        for arch in archs {
            let net = Cnn::new(arch.clone(), &mut rng).unwrap();
            let x = batch(&mut rng, &arch, 5);
            let ours = net.predict(&x, 3).unwrap();
            let (g, w) = net.to_engine().unwrap();
            let g = engine::Graph::from_json(&g.to_json()).unwrap();
            let model = engine::Model::new(g, w).unwrap();
            let theirs = engine_predict(&model, &arch, &x).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-4, "{arch:?}");
        }
    }

    #[test]
    fn im2col_conv_matches_candle_forward_and_backward() {
        let mut rng = Rng::new(4);
        let mut t = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            Var::from_tensor(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap()).unwrap()
        };
        for padding in [0, 2] {
            let x = t(&[3, 2, 9, 8]);
            let w = t(&[4, 2, 3, 3]);
            let ours = conv(x.as_tensor(), w.as_tensor(), padding).unwrap();
            let theirs = x
                .as_tensor()
                .conv2d(w.as_tensor(), padding, 1, 1, 1)
                .unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&flat(&ours), &flat(&theirs)) < 1e-4);
            let g1 = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = theirs.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w] {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(max_diff(&flat(a), &flat(b)) < 1e-3);
            }
        }
    }

    #[test]
    fn weights_round_trip_and_seeded_init() {
        let arch = Architecture::detector();
        let a = Cnn::new(arch.clone(), &mut Rng::new(5)).unwrap();
        let b = Cnn::new(arch.clone(), &mut Rng::new(5)).unwrap();
        let c = Cnn::new(arch.clone(), &mut Rng::new(6)).unwrap();
        let x = batch(&mut Rng::new(1), &arch, 2);
        assert_eq!(a.predict(&x, 2).unwrap(), b.predict(&x, 2).unwrap());
        assert_ne!(a.predict(&x, 2).unwrap(), c.predict(&x, 2).unwrap());
        c.load_weights(&a.weights().unwrap()).unwrap();
        assert_eq!(a.predict(&x, 2).unwrap(), c.predict(&x, 2).unwrap());
    }

    #[test]
    fn kernel_too_large_is_an_error() {
        let mut arch = Architecture::detector();
        arch.convs[1].kernel = 30;
        assert!(Cnn::new(arch, &mut Rng::new(1)).is_err());
    }
}
