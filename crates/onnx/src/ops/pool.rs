//! `MaxPool`, `AveragePool` and `GlobalAveragePool` (2-D).

use capsule_engine::{Op, PoolAttrs};

use crate::Error;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx, window};

pub(crate) const OPS: &[(&str, Convert)] = &[
    ("MaxPool", max_pool),
    ("AveragePool", average_pool),
    ("GlobalAveragePool", global_average_pool),
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
