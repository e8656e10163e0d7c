//! `BatchNormalization` at inference, as a per-channel affine map.
//!
//! `Y = (X - mean) / sqrt(var + epsilon) * scale + B` is emitted as
//! `Mul(X, s)` then `Add(_, t)` with `s = scale / sqrt(var + epsilon)` and
//! `t = B - mean * s`, both of shape `[C, 1, ...]` so that numpy broadcasting
//! applies them per channel. The folding pass (`crate::fold`) then merges the
//! pair into a preceding Conv or Gemm when it is that node's only reader;
//! otherwise the two element-wise nodes remain and compute the same thing.

use capsule_engine::{Node, Op, Tensor};

use crate::Error;
use crate::constant::Constant;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx};

pub(crate) const OPS: &[(&str, Convert)] = &[("BatchNormalization", batch_norm)];

/// BatchNormalization (opset 7, 9, 14, 15): inference mode only; `spatial`
/// (before opset 9) must be 1 and `training_mode` (opset 14) 0.
fn batch_norm(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "X")?;
    if cx.opset < 9 && !cx.attrs.flag("spatial", true)? {
        return Err(cx.unsupported(
            "spatial = 0 (per-element statistics) is not supported; re-export with opset 9+".into(),
        ));
    }
    if cx.opset >= 14 && cx.attrs.flag("training_mode", false)? {
        return Err(cx.unsupported(
            "training_mode is 1; export the model in eval mode (model.eval())".into(),
        ));
    }
    cx.only_first_output_used(draft, "running statistics, a training output")?;
    let epsilon = f64::from(cx.attrs.float("epsilon", 1e-5)?);
    let mut vectors = Vec::with_capacity(4);
    for (i, what) in [(1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var")] {
        let Constant::Float(t) = cx.constant_input(draft, i, what)? else {
            return Err(cx.invalid(format!("its {what} input must be a float tensor")));
        };
        if t.shape().len() != 1 {
            return Err(cx.invalid(format!(
                "its {what} input must be 1-D (one value per channel), got shape {:?}",
                t.shape()
            )));
        }
        vectors.push(t.data().to_vec());
    }
    let channels = vectors[0].len();
    if vectors.iter().any(|v| v.len() != channels) {
        return Err(cx.invalid("its scale, B, mean and var inputs have different lengths".into()));
    }
    let Some(x_shape) = draft.shape(x) else {
        return Err(cx.unsupported(format!(
            "the rank of its input '{x}' is unknown, so the per-channel constants cannot be \
             shaped; re-export the model with shape information (onnx.shape_inference)"
        )));
    };
    if x_shape.len() < 2 {
        return Err(cx.invalid(format!(
            "its input has rank {}, expected at least 2",
            x_shape.len()
        )));
    }
    if let Some(c) = x_shape[1]
        && c != channels
    {
        return Err(cx.invalid(format!(
            "its input has {c} channels but its statistics have {channels}"
        )));
    }
    let (gamma, beta, mean, var) = (&vectors[0], &vectors[1], &vectors[2], &vectors[3]);
    let mut scale = Vec::with_capacity(channels);
    let mut shift = Vec::with_capacity(channels);
    for c in 0..channels {
        let denominator = f64::from(var[c]) + epsilon;
        if denominator.is_nan() || denominator <= 0.0 {
            return Err(cx.invalid(format!(
                "variance + epsilon is not positive for channel {c}"
            )));
        }
        let s = f64::from(gamma[c]) / denominator.sqrt();
        scale.push(s as f32);
        shift.push((f64::from(beta[c]) - f64::from(mean[c]) * s) as f32);
    }
    let mut shape = vec![channels];
    shape.resize(x_shape.len() - 1, 1);
    let tensor = |v: Vec<f32>| Tensor::new(shape.clone(), v).map_err(|e| cx.invalid(e.to_string()));
    let out = cx.output()?;
    let scale_name = draft.fresh_value(&format!("{}.scale", cx.name));
    let shift_name = draft.fresh_value(&format!("{}.shift", cx.name));
    let scaled = draft.fresh_value(&format!("{out}.scaled"));
    draft.add_constant(&scale_name, Constant::Float(tensor(scale)?))?;
    draft.add_constant(&shift_name, Constant::Float(tensor(shift)?))?;
    let mul_node = draft.fresh_node(&format!("{}.mul", cx.name));
    draft.push(Node {
        name: mul_node,
        op: Op::Mul,
        inputs: vec![x.to_string(), scale_name],
        outputs: vec![scaled.clone()],
    })?;
    cx.emit(draft, Op::Add, vec![scaled, shift_name])
}
