//! Operators that only rearrange data: `Concat`, `Flatten`, `Reshape`.

use capsule_engine::Op;

use crate::Error;
use crate::constant::Constant;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx};
use crate::shape;

pub(crate) const OPS: &[(&str, Convert)] = &[
    ("Concat", concat),
    ("Flatten", flatten),
    ("Reshape", reshape),
];

/// Concat (opset 4, 11, 13): `axis` is required; negative from opset 11.
fn concat(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    if !cx.attrs.has("axis") {
        return Err(cx.invalid("its required attribute axis is missing".into()));
    }
    let axis = cx.attrs.int("axis", 0)?;
    let mut inputs = Vec::with_capacity(cx.inputs.len());
    for i in 0..cx.inputs.len() {
        inputs.push(cx.required(i, "inputs")?.to_string());
    }
    if inputs.is_empty() {
        return Err(cx.invalid("it has no inputs".into()));
    }
    if let Some(s) = draft.shape(&inputs[0])
        && shape::normalize_axis(axis, s.len()).is_none()
    {
        return Err(cx.invalid(format!("axis {axis} is out of range for rank {}", s.len())));
    }
    cx.emit(draft, Op::Concat { axis }, inputs)
}

/// Flatten (opset 1, 9, 11, 13): `axis` defaults to 1, range `-r..=r`.
fn flatten(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "input")?;
    let axis = cx.attrs.int("axis", 1)?;
    if let Some(s) = draft.shape(x)
        && shape::flatten_axis(axis, s.len()).is_none()
    {
        return Err(cx.invalid(format!("axis {axis} is out of range for rank {}", s.len())));
    }
    cx.emit(draft, Op::Flatten { axis }, vec![x.to_string()])
}

/// Reshape (opset 5, 13, 14): the target shape is a constant int64 input;
/// `allowzero` from opset 14.
fn reshape(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "data")?;
    let shape_name = cx.required(1, "shape")?;
    let Some(constant) = draft.constant(shape_name) else {
        return Err(cx.unsupported(format!(
            "its target shape '{shape_name}' is computed at run time (typically from \
             Shape/Gather/Concat); re-export with a constant shape, e.g. torch.flatten(x, 1) \
             instead of x.view(x.size(0), -1)"
        )));
    };
    let Constant::Int { shape, values } = constant else {
        return Err(cx.invalid(format!(
            "its shape input '{shape_name}' must be an int64 tensor"
        )));
    };
    if shape.len() != 1 {
        return Err(cx.invalid(format!(
            "its shape input '{shape_name}' must be 1-D, got shape {shape:?}"
        )));
    }
    let allowzero = cx.attrs.flag("allowzero", false)?;
    if let Some(&bad) = values.iter().find(|&&v| v < -1) {
        return Err(cx.invalid(format!("its target shape has an invalid entry {bad}")));
    }
    if values.iter().filter(|&&v| v == -1).count() > 1 {
        return Err(cx.invalid("its target shape has more than one -1".into()));
    }
    if allowzero && values.contains(&0) && values.contains(&-1) {
        return Err(cx.invalid("with allowzero, a target shape cannot hold both 0 and -1".into()));
    }
    let op = Op::Reshape {
        shape: values.clone(),
        allowzero,
    };
    cx.emit(draft, op, vec![x.to_string()])
}
