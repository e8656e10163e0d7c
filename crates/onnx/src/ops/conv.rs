//! `Conv` (2-D, grouped, depthwise, strided, padded, dilated).

use capsule_engine::{Activation, ConvAttrs, Op};

use crate::Error;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx, to_usize, window};

pub(crate) const OPS: &[(&str, Convert)] = &[("Conv", conv)];

/// Conv (opset 1, 11): inputs X `[N, C, H, W]`, W `[M, C/group, kH, kW]`, optional B `[M]`.
fn conv(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "X")?;
    let w = cx.required(1, "W")?;
    let b = cx.input(2);
    let x_shape = draft.shape(x);
    if let Some(s) = &x_shape
        && s.len() != 4
    {
        return Err(cx.unsupported(format!(
            "only 2-D convolutions (rank-4 NCHW input) are supported, this input has rank {}",
            s.len()
        )));
    }
    let w_shape = draft.shape(w);
    if let Some(s) = &w_shape
        && s.len() != 4
    {
        return Err(cx.unsupported(format!(
            "only 2-D convolutions (rank-4 weights) are supported, the weight has rank {}",
            s.len()
        )));
    }
    let from_weight = w_shape.as_ref().and_then(|s| Some([s[2]?, s[3]?]));
    let kernel = match (window::kernel_attr(cx)?, from_weight) {
        (Some(k), Some(wk)) if k != wk => {
            return Err(cx.invalid(format!(
                "kernel_shape {k:?} disagrees with the weight's spatial size {wk:?}"
            )));
        }
        (Some(k), _) => k,
        (None, Some(wk)) => wk,
        (None, None) => {
            return Err(
                cx.unsupported("it has no kernel_shape and its weight's shape is unknown".into())
            );
        }
    };
    let geometry = window::read(cx, kernel, x_shape.as_ref())?;
    let group = to_usize(cx, "group", cx.attrs.int("group", 1)?)?;
    if group == 0 {
        return Err(cx.invalid("group must be at least 1".into()));
    }
    let m = w_shape.as_ref().and_then(|s| s[0]);
    if let Some(m) = m
        && m % group != 0
    {
        return Err(cx.invalid(format!(
            "the weight's {m} output channels are not divisible by group {group}"
        )));
    }
    let c = x_shape.as_ref().and_then(|s| s[1]);
    let per_group = w_shape.as_ref().and_then(|s| s[1]);
    if let (Some(c), Some(per_group)) = (c, per_group)
        && per_group.checked_mul(group) != Some(c)
    {
        return Err(cx.invalid(format!(
            "the input has {c} channels but the weight expects {per_group} per group \
                 times {group} groups"
        )));
    }
    if let (Some(b), Some(m)) = (b, m)
        && let Some(bs) = draft.shape(b)
        && bs != [Some(m)]
    {
        return Err(cx.invalid(format!(
            "the bias has shape {bs:?}, expected [{m}] (one per output channel)"
        )));
    }
    let mut inputs = vec![x.to_string(), w.to_string()];
    inputs.extend(b.map(str::to_string));
    let op = Op::Conv(ConvAttrs {
        kernel,
        strides: geometry.strides,
        pads: geometry.pads,
        dilations: geometry.dilations,
        group,
        activation: Activation::None,
    });
    cx.emit(draft, op, inputs)
}
