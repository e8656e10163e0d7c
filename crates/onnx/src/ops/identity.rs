//! `Identity` and `Dropout` (an identity at inference).

use capsule_engine::Op;

use crate::Error;
use crate::constant::Constant;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx};

pub(crate) const OPS: &[(&str, Convert)] = &[("Identity", identity), ("Dropout", dropout)];

fn identity(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "input")?;
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
