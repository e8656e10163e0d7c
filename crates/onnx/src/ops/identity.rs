//! `Identity`, `Dropout` (an identity at inference) and `Pad` by zero cells.

use capsule_engine::Op;

use crate::Error;
use crate::constant::Constant;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx};

pub(crate) const OPS: &[(&str, Convert)] =
    &[("Identity", identity), ("Dropout", dropout), ("Pad", pad)];

/// Identity; of a constant, a constant itself (unless a graph output), so that
/// nodes that need constants can read it: PyTorch's exporter writes one
/// initializer for equal tensors and Identity nodes for the others (the
/// running means and variances of a freshly initialised DenseNet's
/// BatchNormalizations).
fn identity(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "input")?;
    let out = cx.output()?;
    if let Some(value) = draft.constant(x).cloned()
        && !draft.outputs.iter().any(|o| o == out)
    {
        return draft.add_constant(out, value);
    }
    cx.emit(draft, Op::Identity, vec![x.to_string()])
}

/// Dropout (opset 7, 10, 12, 13): only its first output; from opset 12 the
/// optional `training_mode` input must be absent or a constant false.
fn dropout(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "data")?;
    cx.only_first_output_used(draft, "mask")?;
    if cx.input(2).is_some() {
        let training = match cx.constant_input(draft, 2, "training_mode")? {
            Constant::Int { values, .. } => values.iter().any(|&v| v != 0),
            Constant::Float(t) => t.data().iter().any(|&v| v != 0.0),
        };
        if training {
            return Err(cx.unsupported(
                "training_mode is true; export the model in eval mode (model.eval())".into(),
            ));
        }
    }
    cx.emit(draft, Op::Identity, vec![x.to_string()])
}

/// Pad (opset 2, 11, 13, 18, 19, 21) that adds no cells, as PyTorch writes
/// before some pooling layers (DenseNet's AvgPool2d): an identity. Pads of
/// any cell are not supported, and say so. From opset 11 the pads are a
/// constant input (the optional `axes` input must then be absent), before
/// it the `pads` attribute.
fn pad(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "data")?;
    let pads: Vec<i64> = if cx.opset >= 11 {
        match cx.constant_input(draft, 1, "pads")? {
            Constant::Int { values, .. } => values.clone(),
            Constant::Float(_) => {
                return Err(cx.invalid("its pads input must be an int64 tensor".into()));
            }
        }
    } else {
        cx.attrs.ints("pads")?.unwrap_or_default().to_vec()
    };
    if pads.iter().any(|&p| p != 0) {
        return Err(cx.unsupported(format!(
            "it pads by {pads:?}; the engine runs Pad only when it adds no cells (fold \
             the padding into the Conv or pooling that follows, e.g. its padding argument)"
        )));
    }
    cx.emit(draft, Op::Identity, vec![x.to_string()])
}
