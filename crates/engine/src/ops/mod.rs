//! Operator kernels, one module per family, and the dispatch from [`Op`] to them.
//!
//! Kernels receive their operands as [`Cow`]s: the executor passes a value
//! it will not read again as `Owned`, and a kernel whose output has an
//! operand's shape (activations, arithmetic, reshapes, softmax) computes in
//! that buffer instead of allocating. A kernel reports operands it cannot
//! take as a [`Mismatch`], in words for the user; the executor adds the node.

mod broadcast;
mod conv;
mod elementwise;
mod gemm;
mod pool;
mod shape;
mod softmax;
mod window;

use std::borrow::Cow;
use std::ops::RangeInclusive;

pub(crate) use conv::spends as conv_spends;
pub(crate) use conv::{
    Arith, BLOCK_COLUMNS, BLOCK_OUTPUTS, DirectInput, OutputRows, PhasedPlane, Sixteens,
    TileSource, Tiling, depthwise_phased_body, depthwise_x16_body, depthwise3x3_body,
    direct_row_body, f4_input, f4_output, f4_weights, winograd_input_body, winograd_output_body,
    winograd_weights_body, winograd4_input_body, winograd4_output_body, winograd4_weights_body,
};
pub(crate) use elementwise::{
    bias_activate_body, bias_add_activate_body, clip, hard_sigmoid, hard_swish, logistic_body,
    logistic_in_place_body, relu, sigmoid, silu, silu_body, silu_in_place_body,
};
pub(crate) use pool::{max_by_rows_body, mean_by_rows_body};
pub(crate) use window::Span;

use crate::graph::{Activation, ConvAttrs, Op};
use crate::tensor::Tensor;

/// Why a kernel cannot run on its operands: what was expected and what came.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mismatch(pub(crate) String);

/// What every kernel returns.
pub(crate) type KernelResult = Result<Tensor, Mismatch>;

/// How many inputs `op` takes.
pub(crate) fn arity(op: &Op) -> RangeInclusive<usize> {
    match op {
        Op::Conv(_) | Op::Gemm { .. } => 2..=3,
        Op::MatMul | Op::Add | Op::Sub | Op::Mul | Op::Div => 2..=2,
        Op::Concat { .. } => 1..=usize::MAX,
        Op::Relu
        | Op::Clip { .. }
        | Op::Sigmoid
        | Op::HardSigmoid { .. }
        | Op::Tanh
        | Op::MaxPool(_)
        | Op::AveragePool { .. }
        | Op::GlobalAveragePool
        | Op::Flatten { .. }
        | Op::Reshape { .. }
        | Op::Softmax { .. }
        | Op::Identity => 1..=1,
    }
}

/// Runs a Conv whose output an Add read together with `inputs`' last
/// tensor (the residual), and nothing else did: `inputs` are the Conv's
/// (X, W and maybe B) then the residual, and the result is the Add's
/// output, with `attrs`' activation applied after the Add. A residual of
/// the output's shape is added as each output block is finished; one that
/// broadcasts is added after the Conv, as the Add would.
pub(crate) fn conv_add(attrs: &ConvAttrs, inputs: Vec<Cow<'_, Tensor>>) -> KernelResult {
    let y = match inputs.as_slice() {
        [x, w, r] => conv::conv(attrs, x, w, None, Some(r)),
        [x, w, b, r] => conv::conv(attrs, x, w, Some(b), Some(r)),
        _ => Err(Mismatch(format!(
            "a Conv with a residual takes 3 or 4 inputs, got {}",
            inputs.len()
        ))),
    };
    recycle(inputs);
    y
}

/// Runs a Conv (`attrs`) whose weights W the caller hands over, as
/// [`execute`] would, or as [`conv_add`] when `with_residual`: `inputs` are
/// the step's operands without W (X, maybe B, then the residual). W reads
/// as zeros when it returns, whatever the outcome.
pub(crate) fn conv_spending(
    attrs: &ConvAttrs,
    with_residual: bool,
    inputs: Vec<Cow<'_, Tensor>>,
    w: &mut Tensor,
) -> KernelResult {
    let y = match (with_residual, inputs.as_slice()) {
        (false, [x]) => conv::conv_spending(attrs, x, w, None, None),
        (false, [x, b]) => conv::conv_spending(attrs, x, w, Some(b), None),
        (true, [x, r]) => conv::conv_spending(attrs, x, w, None, Some(r)),
        (true, [x, b, r]) => conv::conv_spending(attrs, x, w, Some(b), Some(r)),
        _ => {
            w.data_mut().fill(0.0);
            Err(Mismatch(format!(
                "a Conv takes 2 or 3 inputs and maybe a residual, got {}",
                inputs.len() + 1
            )))
        }
    };
    recycle(inputs);
    y
}

/// Y in X's own buffer, where the caller hands X over and the Conv is a
/// depthwise one that [`conv::depthwise_over_input`] computes in place;
/// else X back, untouched.
fn conv_in_place<'a>(
    attrs: &ConvAttrs,
    x: Cow<'a, Tensor>,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<KernelResult, Cow<'a, Tensor>> {
    match x {
        Cow::Owned(x) if attrs.group > 1 => {
            conv::depthwise_over_input(attrs, x, w, bias).map_err(Cow::Owned)
        }
        x => Err(x),
    }
}

/// Runs `op` on `inputs`.
pub(crate) fn execute(op: &Op, inputs: Vec<Cow<'_, Tensor>>) -> KernelResult {
    use elementwise::{activation, binary, map};
    match op {
        Op::Conv(attrs) => {
            let n = inputs.len();
            let mut inputs = inputs.into_iter();
            let (Some(x), Some(w), b, None) =
                (inputs.next(), inputs.next(), inputs.next(), inputs.next())
            else {
                return Err(wrong_arity(op, n));
            };
            let x = match conv_in_place(attrs, x, &w, b.as_deref()) {
                Ok(y) => {
                    recycle([w].into_iter().chain(b));
                    return y;
                }
                Err(x) => x,
            };
            let y = conv::conv(attrs, &x, &w, b.as_deref(), None);
            recycle([x, w].into_iter().chain(b));
            y
        }
        &Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let attrs = gemm::GemmAttrs {
                alpha,
                beta,
                trans_a,
                trans_b,
            };
            let y = match inputs.as_slice() {
                [a, b] => gemm::gemm(attrs, a, b, None),
                [a, b, c] => gemm::gemm(attrs, a, b, Some(c)),
                _ => Err(wrong_arity(op, inputs.len())),
            };
            recycle(inputs);
            y
        }
        Op::MatMul => {
            let [a, b] = operands(op, inputs)?;
            let y = gemm::matmul(&a, &b);
            recycle([a, b]);
            y
        }
        Op::Relu => Ok(activation(single(op, inputs)?, Activation::Relu)),
        &Op::Clip { min, max } => Ok(activation(
            single(op, inputs)?,
            Activation::Clip { min, max },
        )),
        Op::Sigmoid => Ok(sigmoid(single(op, inputs)?)),
        &Op::HardSigmoid { alpha, beta } => {
            Ok(map(single(op, inputs)?, |x| hard_sigmoid(x, alpha, beta)))
        }
        Op::Tanh => Ok(map(single(op, inputs)?, f32::tanh)),
        Op::MaxPool(attrs) => {
            let x = single(op, inputs)?;
            let y = pool::max_pool(attrs, &x);
            recycle(vec![x]);
            y
        }
        Op::AveragePool {
            pool,
            count_include_pad,
        } => {
            let x = single(op, inputs)?;
            let y = pool::average_pool(pool, *count_include_pad, &x);
            recycle(vec![x]);
            y
        }
        Op::GlobalAveragePool => {
            let x = single(op, inputs)?;
            let y = pool::global_average_pool(&x);
            recycle(vec![x]);
            y
        }
        Op::Add => {
            let [a, b] = operands(op, inputs)?;
            binary(a, b, |x, y| x + y)
        }
        Op::Sub => {
            let [a, b] = operands(op, inputs)?;
            binary(a, b, |x, y| x - y)
        }
        Op::Mul => {
            let [a, b] = operands(op, inputs)?;
            binary(a, b, |x, y| x * y)
        }
        Op::Div => {
            let [a, b] = operands(op, inputs)?;
            binary(a, b, |x, y| x / y)
        }
        Op::Concat { axis } => {
            let y = shape::concat(*axis, &inputs);
            recycle(inputs);
            y
        }
        Op::Flatten { axis } => shape::flatten(*axis, single(op, inputs)?),
        Op::Reshape { shape, allowzero } => shape::reshape(shape, *allowzero, single(op, inputs)?),
        Op::Softmax { axis } => softmax::softmax(*axis, single(op, inputs)?),
        Op::Identity => Ok(single(op, inputs)?.into_owned()),
    }
}

/// Offers the buffers of the operands the executor handed over (and the
/// kernel did not reuse) to later kernels of this run.
fn recycle<'a>(inputs: impl IntoIterator<Item = Cow<'a, Tensor>>) {
    for input in inputs {
        if let Cow::Owned(t) = input {
            crate::buffers::give(t.into_parts().1);
        }
    }
}

/// The inputs of an op that takes exactly `N`.
fn operands<'a, const N: usize>(
    op: &Op,
    inputs: Vec<Cow<'a, Tensor>>,
) -> Result<[Cow<'a, Tensor>; N], Mismatch> {
    let n = inputs.len();
    inputs.try_into().map_err(|_| wrong_arity(op, n))
}

/// The input of an op that takes exactly one.
fn single<'a>(op: &Op, inputs: Vec<Cow<'a, Tensor>>) -> Result<Cow<'a, Tensor>, Mismatch> {
    let [x] = operands(op, inputs)?;
    Ok(x)
}

/// [`arity`] in words: "1", "2 or 3", "at least 1".
pub(crate) fn expected_inputs(op: &Op) -> String {
    let range = arity(op);
    match (*range.start(), *range.end()) {
        (lo, usize::MAX) => format!("at least {lo}"),
        (lo, hi) if lo == hi => format!("{lo}"),
        (lo, hi) => format!("{lo} or {hi}"),
    }
}

fn wrong_arity(op: &Op, got: usize) -> Mismatch {
    Mismatch(format!(
        "{} takes {} inputs, got {got}",
        op.name(),
        expected_inputs(op)
    ))
}

/// Resolves an ONNX axis attribute against a tensor of rank `rank`:
/// `-rank..rank` maps to `0..rank`, negative values counting from the end.
pub(crate) fn axis_index(axis: i64, rank: usize) -> Result<usize, Mismatch> {
    let out_of_range = || Mismatch(format!("axis {axis} is out of range for rank {rank}"));
    let rank_i = i64::try_from(rank).map_err(|_| out_of_range())?;
    let index = if axis < 0 { axis + rank_i } else { axis };
    if (0..rank_i).contains(&index) {
        usize::try_from(index).map_err(|_| out_of_range())
    } else {
        Err(out_of_range())
    }
}
