//! `Constant` and `ConstantOfShape` nodes: folded into the draft's
//! constants, no engine node.

use capsule_engine::Tensor;

use crate::Error;
use crate::constant::Constant;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx};

pub(crate) const OPS: &[(&str, Convert)] = &[
    ("Constant", constant),
    ("ConstantOfShape", constant_of_shape),
];

/// The largest tensor `ConstantOfShape` may create (2^28 values, 1 GiB of
/// float32): the shape comes from the file, and a typo should not exhaust memory.
const MAX_GENERATED_VALUES: usize = 1 << 28;

/// Constant (opset 1, 9, 11, 12, 13): exactly one of `value`, `value_float`,
/// `value_floats`, `value_int`, `value_ints` (sparse and string values are
/// not supported).
fn constant(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let out = cx.output()?;
    let forms: Vec<&str> = cx.attrs.names().collect();
    if forms.len() != 1 {
        return Err(cx.invalid(format!(
            "it must have exactly one value attribute, found {forms:?}"
        )));
    }
    let value = match forms[0] {
        "value" => {
            let t = cx
                .attrs
                .tensor("value")?
                .ok_or_else(|| cx.invalid("its value attribute holds no tensor".into()))?;
            Constant::from_proto(t, out)?
        }
        "value_float" => scalar_float(cx.attrs.float("value_float", 0.0)?),
        "value_floats" => {
            let v = cx
                .attrs
                .floats("value_floats")?
                .unwrap_or_default()
                .to_vec();
            Constant::Float(Tensor::new(vec![v.len()], v).map_err(|e| cx.invalid(e.to_string()))?)
        }
        "value_int" => Constant::Int {
            shape: vec![],
            values: vec![cx.attrs.int("value_int", 0)?],
        },
        "value_ints" => {
            let v = cx.attrs.ints("value_ints")?.unwrap_or_default().to_vec();
            Constant::Int {
                shape: vec![v.len()],
                values: v,
            }
        }
        other => {
            return Err(cx.unsupported(format!(
                "its {other} form is not supported (only dense numeric constants are)"
            )));
        }
    };
    draft.add_constant(out, value)
}

/// ConstantOfShape (opset 9, 20, 21): a tensor of constant shape filled
/// with `value` (a one-element tensor, default float32 0).
fn constant_of_shape(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let out = cx.output()?;
    let Constant::Int { shape, values } = cx.constant_input(draft, 0, "input")? else {
        return Err(cx.invalid("its shape input must be an int64 tensor".into()));
    };
    if shape.len() != 1 {
        return Err(cx.invalid(format!("its shape input must be 1-D, got shape {shape:?}")));
    }
    let dims = crate::constant::dims(values, out)?;
    let count = crate::constant::element_count(&dims)
        .filter(|&n| n <= MAX_GENERATED_VALUES)
        .ok_or_else(|| cx.invalid(format!("the shape {dims:?} is too large")))?;
    let fill = match cx.attrs.tensor("value")? {
        None => Constant::Float(Tensor::zeros(vec![1])),
        Some(t) => Constant::from_proto(t, out)?,
    };
    let value = match fill {
        Constant::Float(t) if t.len() == 1 => Constant::Float(
            Tensor::new(dims, vec![t.data()[0]; count]).map_err(|e| cx.invalid(e.to_string()))?,
        ),
        Constant::Int { values, .. } if values.len() == 1 => Constant::Int {
            shape: dims,
            values: vec![values[0]; count],
        },
        other => {
            return Err(cx.invalid(format!(
                "its value must hold exactly one element, got shape {:?}",
                other.shape()
            )));
        }
    };
    draft.add_constant(out, value)
}

fn scalar_float(v: f32) -> Constant {
    Constant::Float(Tensor::new(vec![], vec![v]).expect("a scalar holds one value"))
}
