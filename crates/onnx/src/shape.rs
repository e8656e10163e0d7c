//! Best-effort static shape inference over engine ops.
//!
//! The importer needs shapes in three places: `auto_pad = SAME_*` with a
//! stride above 1 (the padding depends on the input size), old-opset Softmax
//! (whether its axis is the last one), and unfolded BatchNormalization (the
//! rank of the per-channel constants). ONNX files carry shapes for inputs and
//! outputs but often not for intermediate values, so we propagate them.
//!
//! `None` means "not known here": inference never fails, it only knows less.
//! All arithmetic is checked, since the shapes come from untrusted files.

use capsule_engine::{ConvAttrs, Op, PoolAttrs};

/// A shape whose dimensions may be unknown (dynamic).
pub(crate) type Shape = Vec<Option<usize>>;

/// The output shape of `op` applied to inputs of the given shapes.
pub(crate) fn infer(op: &Op, inputs: &[Option<&Shape>]) -> Option<Shape> {
    let first = inputs.first().copied().flatten();
    match op {
        Op::Relu
        | Op::Clip { .. }
        | Op::Sigmoid
        | Op::HardSigmoid { .. }
        | Op::Tanh
        | Op::Identity
        | Op::Softmax { .. } => first.cloned(),
        Op::Conv(attrs) => conv(attrs, first?, inputs.get(1).copied().flatten()),
        Op::MaxPool(pool) | Op::AveragePool { pool, .. } => pool_shape(pool, first?),
        Op::GlobalAveragePool => {
            let x = first?;
            (x.len() == 4).then(|| vec![x[0], x[1], Some(1), Some(1)])
        }
        Op::Gemm {
            trans_a, trans_b, ..
        } => {
            let a = first?;
            let b = inputs.get(1).copied().flatten()?;
            if a.len() != 2 || b.len() != 2 {
                return None;
            }
            let rows = if *trans_a { a[1] } else { a[0] };
            let cols = if *trans_b { b[0] } else { b[1] };
            Some(vec![rows, cols])
        }
        Op::MatMul => matmul(first?, inputs.get(1).copied().flatten()?),
        Op::Add | Op::Sub | Op::Mul | Op::Div => {
            broadcast(first?, inputs.get(1).copied().flatten()?)
        }
        Op::Concat { axis } => concat(*axis, inputs),
        Op::Flatten { axis } => {
            let x = first?;
            let axis = flatten_axis(*axis, x.len())?;
            Some(vec![product(&x[..axis]), product(&x[axis..])])
        }
        Op::Reshape { shape, allowzero } => reshape(first, shape, *allowzero),
    }
}

/// Maps a possibly negative axis into `0..rank`.
pub(crate) fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let rank_i = i64::try_from(rank).ok()?;
    let a = if axis < 0 { axis + rank_i } else { axis };
    (0..rank_i).contains(&a).then_some(a as usize)
}

/// Maps Flatten's axis, in `-rank..=rank`, into `0..=rank`.
pub(crate) fn flatten_axis(axis: i64, rank: usize) -> Option<usize> {
    let rank_i = i64::try_from(rank).ok()?;
    let a = if axis < 0 { axis + rank_i } else { axis };
    (0..=rank_i).contains(&a).then_some(a as usize)
}

/// Numpy broadcasting of two shapes; `None` when they are known to be incompatible.
pub(crate) fn broadcast(a: &Shape, b: &Shape) -> Option<Shape> {
    let rank = a.len().max(b.len());
    let dim = |s: &Shape, i: usize| -> Option<usize> {
        // Right-aligned; missing leading dimensions are 1.
        let offset = rank - s.len();
        if i < offset { Some(1) } else { s[i - offset] }
    };
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (Some(1), d) | (d, Some(1)) => Ok(d),
            (Some(x), Some(y)) if x == y => Ok(Some(x)),
            (Some(_), Some(_)) => Err(()),
            (Some(x), None) | (None, Some(x)) => Ok(Some(x)),
            (None, None) => Ok(None),
        })
        .collect::<Result<Shape, ()>>()
        .ok()
}

/// One spatial output size of a window op (ONNX and onnxruntime semantics).
/// `None` when the window does not fit.
pub(crate) fn window_out(
    input: usize,
    kernel: usize,
    stride: usize,
    pad_head: usize,
    pad_tail: usize,
    dilation: usize,
    ceil_mode: bool,
) -> Option<usize> {
    let span = input.checked_add(pad_head)?.checked_add(pad_tail)?;
    let effective = kernel
        .checked_sub(1)?
        .checked_mul(dilation)?
        .checked_add(1)?;
    let room = span.checked_sub(effective)?;
    if stride == 0 {
        return None;
    }
    let mut out = if ceil_mode {
        room.div_ceil(stride)
    } else {
        room / stride
    } + 1;
    // A last window that would start inside the tail padding is dropped.
    if ceil_mode && (out - 1).checked_mul(stride)? >= input.checked_add(pad_head)? {
        out -= 1;
    }
    Some(out)
}

fn product(dims: &[Option<usize>]) -> Option<usize> {
    dims.iter()
        .try_fold(1usize, |acc, d| acc.checked_mul((*d)?))
}

fn conv(attrs: &ConvAttrs, x: &Shape, w: Option<&Shape>) -> Option<Shape> {
    if x.len() != 4 {
        return None;
    }
    let m = w.and_then(|w| w.first().copied().flatten());
    let spatial = |i: usize| {
        x[2 + i].and_then(|d| {
            window_out(
                d,
                attrs.kernel[i],
                attrs.strides[i],
                attrs.pads[i],
                attrs.pads[i + 2],
                attrs.dilations[i],
                false,
            )
        })
    };
    Some(vec![x[0], m, spatial(0), spatial(1)])
}

fn pool_shape(pool: &PoolAttrs, x: &Shape) -> Option<Shape> {
    if x.len() != 4 {
        return None;
    }
    let spatial = |i: usize| {
        x[2 + i].and_then(|d| {
            window_out(
                d,
                pool.kernel[i],
                pool.strides[i],
                pool.pads[i],
                pool.pads[i + 2],
                pool.dilations[i],
                pool.ceil_mode,
            )
        })
    };
    Some(vec![x[0], x[1], spatial(0), spatial(1)])
}

fn matmul(a: &Shape, b: &Shape) -> Option<Shape> {
    if a.is_empty() || b.is_empty() {
        return None;
    }
    let a2: Shape = if a.len() == 1 {
        vec![Some(1), a[0]]
    } else {
        a.clone()
    };
    let b2: Shape = if b.len() == 1 {
        vec![b[0], Some(1)]
    } else {
        b.clone()
    };
    let batch = broadcast(&a2[..a2.len() - 2].to_vec(), &b2[..b2.len() - 2].to_vec())?;
    let mut out = batch;
    if a.len() > 1 {
        out.push(a2[a2.len() - 2]);
    }
    if b.len() > 1 {
        out.push(b2[b2.len() - 1]);
    }
    Some(out)
}

fn concat(axis: i64, inputs: &[Option<&Shape>]) -> Option<Shape> {
    let shapes: Vec<&Shape> = inputs.iter().copied().collect::<Option<_>>()?;
    let first = shapes.first()?;
    let axis = normalize_axis(axis, first.len())?;
    if shapes.iter().any(|s| s.len() != first.len()) {
        return None;
    }
    let mut out = Shape::with_capacity(first.len());
    for i in 0..first.len() {
        if i == axis {
            out.push(
                shapes
                    .iter()
                    .try_fold(0usize, |acc, s| acc.checked_add(s[i]?)),
            );
        } else {
            out.push(shapes.iter().find_map(|s| s[i]));
        }
    }
    Some(out)
}

fn reshape(x: Option<&Shape>, target: &[i64], allowzero: bool) -> Option<Shape> {
    let mut out: Shape = Vec::with_capacity(target.len());
    for (i, &d) in target.iter().enumerate() {
        out.push(match d {
            0 if !allowzero => x.and_then(|x| x.get(i).copied().flatten()),
            -1 => None,
            d => Some(usize::try_from(d).ok()?),
        });
    }
    if let Some(pos) = target.iter().position(|&d| d == -1) {
        let total = x.and_then(|x| product(x));
        let known: Option<usize> = out
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != pos)
            .try_fold(1usize, |acc, (_, d)| acc.checked_mul((*d)?));
        out[pos] = match (total, known) {
            (Some(t), Some(k)) if k != 0 && t % k == 0 => Some(t / k),
            _ => None,
        };
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(dims: &[usize]) -> Shape {
        dims.iter().map(|&d| Some(d)).collect()
    }

    #[test]
    fn window_sizes_match_onnx() {
        // 8 wide, 3x3 stride 2 pad 1: floor((8+2-3)/2)+1 = 4.
        assert_eq!(window_out(8, 3, 2, 1, 1, 1, false), Some(4));
        // ceil mode: 5 wide, k2 s2: ceil(3/2)+1 = 3.
        assert_eq!(window_out(5, 2, 2, 0, 0, 1, true), Some(3));
        // Window larger than the padded input.
        assert_eq!(window_out(2, 5, 1, 0, 0, 1, false), None);
        assert_eq!(window_out(2, 1, 0, 0, 0, 1, false), None);
    }

    #[test]
    fn broadcasting_and_matmul() {
        let a = vec![None, Some(3), Some(1)];
        assert_eq!(broadcast(&a, &s(&[4])), Some(vec![None, Some(3), Some(4)]));
        assert_eq!(broadcast(&s(&[2, 3]), &s(&[4, 3])), None);
        assert_eq!(
            matmul(&s(&[2, 1, 3, 4]), &s(&[5, 4, 6])),
            Some(s(&[2, 5, 3, 6]))
        );
        assert_eq!(matmul(&s(&[4]), &s(&[4, 6])), Some(s(&[6])));
    }

    #[test]
    fn reshape_and_flatten() {
        let x = vec![None, Some(2), Some(3)];
        assert_eq!(
            reshape(Some(&x), &[0, -1], false),
            Some(vec![None, None]),
            "unknown total leaves -1 unknown"
        );
        assert_eq!(
            reshape(Some(&s(&[2, 3, 4])), &[0, -1], false),
            Some(s(&[2, 12]))
        );
        let op = Op::Flatten { axis: -1 };
        assert_eq!(infer(&op, &[Some(&s(&[2, 3, 4]))]), Some(s(&[6, 4])));
    }
}
