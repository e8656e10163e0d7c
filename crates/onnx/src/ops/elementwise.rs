//! Element-wise operators: activations and numpy-broadcast arithmetic.

use capsule_engine::Op;

use crate::Error;
use crate::constant::Constant;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx};

pub(crate) const OPS: &[(&str, Convert)] = &[
    ("Relu", |cx, d| unary(cx, d, Op::Relu)),
    ("Sigmoid", |cx, d| unary(cx, d, Op::Sigmoid)),
    ("Tanh", |cx, d| unary(cx, d, Op::Tanh)),
    ("HardSigmoid", hard_sigmoid),
    ("HardSwish", hard_swish),
    ("Clip", clip),
    ("Add", |cx, d| binary(cx, d, Op::Add)),
    ("Sub", |cx, d| binary(cx, d, Op::Sub)),
    ("Mul", |cx, d| binary(cx, d, Op::Mul)),
    ("Div", |cx, d| binary(cx, d, Op::Div)),
    ("Sum", sum),
];

fn unary(cx: &NodeCx<'_>, draft: &mut Draft, op: Op) -> Result<(), Error> {
    let x = cx.required(0, "X")?;
    cx.emit(draft, op, vec![x.to_string()])
}

/// HardSigmoid (opset 6, 22): `alpha` defaults to 0.2, `beta` to 0.5.
fn hard_sigmoid(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "X")?;
    let alpha = cx.attrs.float("alpha", 0.2)?;
    let beta = cx.attrs.float("beta", 0.5)?;
    cx.emit(draft, Op::HardSigmoid { alpha, beta }, vec![x.to_string()])
}

/// HardSwish (opset 14): `x * HardSigmoid(x)` with alpha 1/6 and beta 1/2, as
/// a HardSigmoid and a Mul (which the engine's plan fuses again).
fn hard_swish(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "X")?.to_string();
    let hard_sigmoid = Op::HardSigmoid {
        alpha: 1.0 / 6.0,
        beta: 0.5,
    };
    let gate = cx.push_step(draft, "gate", hard_sigmoid, vec![x.clone()])?;
    cx.emit(draft, Op::Mul, vec![x, gate])
}

/// Add, Sub, Mul, Div (opset 7, 13, 14): numpy broadcasting from opset 7.
fn binary(cx: &NodeCx<'_>, draft: &mut Draft, op: Op) -> Result<(), Error> {
    let a = cx.required(0, "A")?;
    let b = cx.required(1, "B")?;
    cx.emit(draft, op, vec![a.to_string(), b.to_string()])
}

/// Sum (opset 6, 8, 13): variadic; one input is an Identity, more a chain of Adds.
fn sum(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let mut inputs = Vec::with_capacity(cx.inputs.len());
    for i in 0..cx.inputs.len() {
        inputs.push(cx.required(i, "data_0")?.to_string());
    }
    let Some((first, rest)) = inputs.split_first() else {
        return Err(cx.invalid("it has no inputs".into()));
    };
    let Some((last, middle)) = rest.split_last() else {
        return cx.emit(draft, Op::Identity, vec![first.clone()]);
    };
    let mut acc = first.clone();
    for (i, next) in middle.iter().enumerate() {
        acc = cx.push_step(draft, &format!("add{i}"), Op::Add, vec![acc, next.clone()])?;
    }
    cx.emit(draft, Op::Add, vec![acc, last.clone()])
}

/// Clip: bounds are attributes `min`/`max` before opset 11 and optional
/// constant scalar inputs from opset 11. An absent bound is the float32
/// limit, as in ONNX (infinities have no JSON form).
fn clip(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "input")?;
    let (min, max) = if cx.opset < 11 {
        (
            cx.attrs.float("min", f32::MIN)?,
            cx.attrs.float("max", f32::MAX)?,
        )
    } else {
        (
            bound(cx, draft, 1, "min", f32::MIN)?,
            bound(cx, draft, 2, "max", f32::MAX)?,
        )
    };
    if min.is_nan() || max.is_nan() {
        return Err(cx.invalid("its bounds must not be NaN".into()));
    }
    let op = Op::Clip {
        min: min.clamp(f32::MIN, f32::MAX),
        max: max.clamp(f32::MIN, f32::MAX),
    };
    cx.emit(draft, op, vec![x.to_string()])
}

fn bound(cx: &NodeCx<'_>, draft: &Draft, i: usize, what: &str, default: f32) -> Result<f32, Error> {
    if cx.input(i).is_none() {
        return Ok(default);
    }
    match cx.constant_input(draft, i, what)? {
        Constant::Float(t) if t.len() == 1 => Ok(t.data()[0]),
        Constant::Int { values, .. } if values.len() == 1 => Ok(values[0] as f32),
        c => Err(cx.invalid(format!(
            "its {what} bound must be a scalar, got shape {:?}",
            c.shape()
        ))),
    }
}
