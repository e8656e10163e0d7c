//! Folding per-channel affine maps into the Conv or Gemm that precedes them.
//!
//! BatchNormalization arrives here as `Mul(x, s)` then `Add(_, t)` with
//! per-channel constants (see `ops::batchnorm`). When `x` is the output of a
//! Conv or Gemm with constant weights, and that Mul or Add is the value's only
//! reader (it is not a graph output either), the map is folded into the
//! weights at seal time:
//!
//! - scale `s`: `W'[m] = W[m] * s[m]`, `b'[m] = b[m] * s[m]` (for Gemm the
//!   output columns of `op(B)`, and `C' = C * s`);
//! - shift `t`: `b'[m] = b[m] + t[m]`, adding a bias when there is none
//!   (for Gemm `C' = beta * C + t` and `beta' = 1`).
//!
//! The folded node takes over the Mul's or Add's output name, so downstream
//! references need no renaming, and it disappears. Any per-channel Mul or Add
//! by a constant qualifies, not only those from BatchNormalization: the
//! arithmetic is the same. Weights shared with other nodes are copied, never
//! modified in place.

use std::collections::HashMap;

use capsule_engine::{Op, Tensor};

use crate::constant::Constant;
use crate::draft::Draft;

/// Which half of an affine map a node applies.
#[derive(Clone, Copy, PartialEq)]
enum Affine {
    Scale,
    Shift,
}

/// Folds every eligible per-channel Mul/Add into its producing Conv or Gemm.
pub(crate) fn fold_affine(draft: &mut Draft) {
    let mut reads: HashMap<String, usize> = HashMap::new();
    for value in draft
        .nodes
        .iter()
        .flat_map(|n| &n.inputs)
        .chain(&draft.outputs)
    {
        *reads.entry(value.clone()).or_default() += 1;
    }
    let mut producer: HashMap<String, usize> = HashMap::new();
    for (i, node) in draft.nodes.iter().enumerate() {
        for out in &node.outputs {
            producer.insert(out.clone(), i);
        }
    }
    // Indices of folded Mul/Add nodes, ascending.
    let mut removed: Vec<usize> = Vec::new();
    for i in 0..draft.nodes.len() {
        let kind = match draft.nodes[i].op {
            Op::Mul => Affine::Scale,
            Op::Add => Affine::Shift,
            _ => continue,
        };
        let [a, b] = &draft.nodes[i].inputs[..] else {
            continue;
        };
        for (x, k) in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
            let Some(&p) = producer.get(&x) else {
                continue;
            };
            if reads.get(&x) != Some(&1) || draft.float_constant(&k).is_none() {
                continue;
            }
            if fold_into(draft, &mut reads, p, &k, kind) {
                let output = draft.nodes[i].outputs[0].clone();
                draft.nodes[p].outputs[0] = output.clone();
                producer.insert(output, p);
                producer.remove(&x);
                reads.remove(&x);
                *reads.entry(k).or_default() -= 1;
                removed.push(i);
                break;
            }
        }
    }
    let mut index = 0;
    draft.nodes.retain(|_| {
        index += 1;
        removed.binary_search(&(index - 1)).is_err()
    });
}

/// Folds the constant `k` into node `p`; false (and nothing changed) when
/// `p` is not a Conv or Gemm with constant weights, or `k` is not per-channel.
fn fold_into(
    draft: &mut Draft,
    reads: &mut HashMap<String, usize>,
    p: usize,
    k: &str,
    kind: Affine,
) -> bool {
    let node = &draft.nodes[p];
    let k = draft
        .float_constant(k)
        .expect("checked by the caller")
        .clone();
    match node.op.clone() {
        Op::Conv(attrs) if attrs.activation == capsule_engine::Activation::None => {
            let Some(w) = draft.float_constant(&node.inputs[1]).cloned() else {
                return false;
            };
            let bias = match node.inputs.get(2) {
                Some(b) => match draft.float_constant(b) {
                    Some(t) => Some(t.clone()),
                    None => return false,
                },
                None => None,
            };
            let Some(&channels) = w.shape().first() else {
                return false;
            };
            let Some(v) = per_channel(&k, 4, channels) else {
                return false;
            };
            let per_filter = w.len() / channels.max(1);
            let new_bias = match kind {
                Affine::Scale => {
                    let mut w = w;
                    for (i, x) in w.data_mut().iter_mut().enumerate() {
                        *x *= v[i / per_filter];
                    }
                    replace_input(draft, reads, p, 1, w, "folded");
                    bias.map(|mut b| {
                        b.data_mut().iter_mut().zip(&v).for_each(|(x, s)| *x *= s);
                        b
                    })
                }
                Affine::Shift => {
                    let mut b = bias.unwrap_or_else(|| Tensor::zeros(vec![channels]));
                    b.data_mut().iter_mut().zip(&v).for_each(|(x, t)| *x += t);
                    Some(b)
                }
            };
            if let Some(b) = new_bias {
                set_or_add_input(draft, reads, p, 2, b, "bias");
            }
            true
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let Some(bm) = draft.float_constant(&node.inputs[1]).cloned() else {
                return false;
            };
            let c = match node.inputs.get(2) {
                Some(c) => match draft.float_constant(c) {
                    Some(t) => Some(t.clone()),
                    None => return false,
                },
                None => None,
            };
            let &[rows, cols] = bm.shape() else {
                return false;
            };
            let channels = if trans_b { rows } else { cols };
            let Some(v) = per_channel(&k, 2, channels) else {
                return false;
            };
            match kind {
                Affine::Scale => {
                    let mut bm = bm;
                    for (i, x) in bm.data_mut().iter_mut().enumerate() {
                        let channel = if trans_b { i / cols } else { i % cols };
                        *x *= v[channel];
                    }
                    let new_c = match &c {
                        Some(c) => match columns(c, channels, |x, j| x * v[j]) {
                            Some(c) => Some(c),
                            None => return false,
                        },
                        None => None,
                    };
                    replace_input(draft, reads, p, 1, bm, "folded");
                    if let Some(c) = new_c {
                        set_or_add_input(draft, reads, p, 2, c, "bias");
                    }
                }
                Affine::Shift => {
                    let new_c = match &c {
                        Some(c) => match columns(c, channels, |x, j| beta * x + v[j]) {
                            Some(c) => c,
                            None => return false,
                        },
                        None => Tensor::new(vec![channels], v).expect("one value per channel"),
                    };
                    set_or_add_input(draft, reads, p, 2, new_c, "bias");
                    draft.nodes[p].op = Op::Gemm {
                        alpha,
                        beta: 1.0,
                        trans_a,
                        trans_b,
                    };
                }
            }
            true
        }
        _ => false,
    }
}

/// The per-channel values of `k` when, broadcast against an output of rank
/// `rank` whose axis 1 has `channels` entries, it varies along that axis only
/// (or is constant); `None` when broadcasting would do anything else.
fn per_channel(k: &Tensor, rank: usize, channels: usize) -> Option<Vec<f32>> {
    let shape = k.shape();
    if shape.len() > rank {
        return None;
    }
    let offset = rank - shape.len();
    let mut along_channels = false;
    for (i, &d) in shape.iter().enumerate() {
        match (offset + i == 1, d) {
            (_, 1) => {}
            (true, d) if d == channels => along_channels = true,
            _ => return None,
        }
    }
    if along_channels {
        Some(k.data().to_vec())
    } else {
        Some(vec![k.data().first().copied()?; channels])
    }
}

/// Gemm's C mapped column-wise: `f(c[r][j], j)` over C broadcast to
/// `[rows, channels]` (rows 1 unless C has more); `None` if C does not
/// broadcast to that.
fn columns(c: &Tensor, channels: usize, f: impl Fn(f32, usize) -> f32) -> Option<Tensor> {
    let (rows, c_cols, out_shape) = match *c.shape() {
        [] => (1, 1, vec![channels]),
        [n] => (1, n, vec![channels]),
        [r, n] => (r, n, vec![r, channels]),
        _ => return None,
    };
    if c_cols != 1 && c_cols != channels {
        return None;
    }
    let mut out = Vec::with_capacity(rows * channels);
    for r in 0..rows {
        for j in 0..channels {
            let x = c.data()[r * c_cols + if c_cols == 1 { 0 } else { j }];
            out.push(f(x, j));
        }
    }
    Tensor::new(out_shape, out).ok()
}

/// Gives node `p`'s input `slot` the value `t`: in place when only `p` reads
/// the old constant, else as a new constant named after it with `suffix`.
fn replace_input(
    draft: &mut Draft,
    reads: &mut HashMap<String, usize>,
    p: usize,
    slot: usize,
    t: Tensor,
    suffix: &str,
) {
    let old = draft.nodes[p].inputs[slot].clone();
    if reads.get(&old) == Some(&1) {
        draft.set_constant(&old, Constant::Float(t));
        return;
    }
    let name = draft.fresh_value(&format!("{old}.{suffix}"));
    add_input_constant(draft, reads, &name, t);
    *reads.entry(old).or_default() -= 1;
    draft.nodes[p].inputs[slot] = name;
}

/// Like [`replace_input`], but appends the input when node `p` has none at `slot`.
fn set_or_add_input(
    draft: &mut Draft,
    reads: &mut HashMap<String, usize>,
    p: usize,
    slot: usize,
    t: Tensor,
    suffix: &str,
) {
    if draft.nodes[p].inputs.len() > slot {
        replace_input(draft, reads, p, slot, t, suffix);
        return;
    }
    let name = draft.fresh_value(&format!("{}.{suffix}", draft.nodes[p].name));
    add_input_constant(draft, reads, &name, t);
    draft.nodes[p].inputs.push(name);
}

fn add_input_constant(
    draft: &mut Draft,
    reads: &mut HashMap<String, usize>,
    name: &str,
    t: Tensor,
) {
    draft
        .add_constant(name, Constant::Float(t))
        .expect("a fresh name is not yet defined");
    reads.insert(name.to_string(), 1);
}
