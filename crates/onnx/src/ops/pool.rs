//! `MaxPool`, `AveragePool` and `GlobalAveragePool` (2-D), and `ReduceMean`
//! over the two spatial axes.

use capsule_engine::{Op, PoolAttrs};

use crate::Error;
use crate::constant::Constant;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx, window};
use crate::shape;

pub(crate) const OPS: &[(&str, Convert)] = &[
    ("MaxPool", max_pool),
    ("AveragePool", average_pool),
    ("GlobalAveragePool", global_average_pool),
    ("ReduceMean", reduce_mean),
];

/// MaxPool (opset 8, 10, 11, 12): ceil_mode and dilations from opset 10;
/// the optional Indices output must be unused.
fn max_pool(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    cx.only_first_output_used(draft, "Indices")?;
    let (x, pool) = pool_attrs(cx, draft)?;
    cx.emit(draft, Op::MaxPool(pool), vec![x.to_string()])
}

/// AveragePool (opset 7, 10, 11, 19): count_include_pad from opset 7,
/// ceil_mode from 10, dilations from 19.
fn average_pool(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let (x, pool) = pool_attrs(cx, draft)?;
    let count_include_pad = cx.attrs.flag("count_include_pad", false)?;
    let op = Op::AveragePool {
        pool,
        count_include_pad,
    };
    cx.emit(draft, op, vec![x.to_string()])
}

/// GlobalAveragePool (opset 1): over H and W of an NCHW input.
fn global_average_pool(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "X")?;
    check_rank4(cx, draft, x)?;
    cx.emit(draft, Op::GlobalAveragePool, vec![x.to_string()])
}

/// ReduceMean (opset 1, 11, 13, 18) over the two spatial axes of an NCHW
/// tensor, as MNASNet and ShuffleNet pool their last features: a
/// GlobalAveragePool, then a Flatten when `keepdims` is 0. The axes are an
/// attribute before opset 18 and a constant input from it. Other axes are
/// not supported, and say so.
fn reduce_mean(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "data")?.to_string();
    let axes: Vec<i64> = if cx.opset >= 18 {
        match cx.input(1) {
            None => Vec::new(),
            Some(_) => match cx.constant_input(draft, 1, "axes")? {
                Constant::Int { values, .. } => values.clone(),
                Constant::Float(_) => {
                    return Err(cx.invalid("its axes input must be an int64 tensor".into()));
                }
            },
        }
    } else {
        cx.attrs.ints("axes")?.unwrap_or_default().to_vec()
    };
    let keepdims = cx.attrs.int("keepdims", 1)? != 0;
    let rank = draft.shape(&x).map(|s| s.len());
    let mut normalized: Vec<Option<usize>> = match rank {
        Some(r) => axes.iter().map(|&a| shape::normalize_axis(a, r)).collect(),
        None => vec![None],
    };
    normalized.sort_unstable();
    if rank != Some(4) || normalized != [Some(2), Some(3)] {
        let rank = rank.map_or("unknown rank".into(), |r| format!("rank {r}"));
        return Err(cx.unsupported(format!(
            "it averages over axes {axes:?} (all when empty) of a tensor of {rank}; the \
             engine runs ReduceMean only over the last two axes of an NCHW tensor (a global \
             average pool)"
        )));
    }
    if keepdims {
        return cx.emit(draft, Op::GlobalAveragePool, vec![x]);
    }
    let pooled = cx.push_step(draft, "pool", Op::GlobalAveragePool, vec![x])?;
    cx.emit(draft, Op::Flatten { axis: 1 }, vec![pooled])
}

fn pool_attrs<'a>(cx: &NodeCx<'a>, draft: &Draft) -> Result<(&'a str, PoolAttrs), Error> {
    let x = cx.required(0, "X")?;
    check_rank4(cx, draft, x)?;
    let kernel = window::kernel_attr(cx)?
        .ok_or_else(|| cx.invalid("its required attribute kernel_shape is missing".into()))?;
    let geometry = window::read(cx, kernel, draft.shape(x).as_ref())?;
    let ceil_mode = cx.attrs.flag("ceil_mode", false)?;
    // Under auto_pad the spec's output size is ceil(in / stride) (SAME) or
    // the floor formula (VALID), which explicit pads reproduce without ceil_mode.
    let ceil_mode = ceil_mode && !geometry.auto_padded;
    let pool = PoolAttrs {
        kernel,
        strides: geometry.strides,
        pads: geometry.pads,
        dilations: geometry.dilations,
        ceil_mode,
    };
    Ok((x, pool))
}

fn check_rank4(cx: &NodeCx<'_>, draft: &Draft, x: &str) -> Result<(), Error> {
    match draft.shape(x) {
        Some(s) if s.len() != 4 => Err(cx.unsupported(format!(
            "only 2-D pooling (rank-4 NCHW input) is supported, this input has rank {}",
            s.len()
        ))),
        _ => Ok(()),
    }
}
