//! `Softmax`, mapped to the engine's opset-13 semantics.
//!
//! Before opset 13, Softmax coerced its input to 2-D at `axis` (default 1)
//! and normalised over all dimensions from `axis` on. That equals opset 13's
//! per-axis softmax when every dimension after `axis` is 1 (in particular
//! when `axis` is the last). Otherwise, when the shape is known well enough,
//! the old semantics are spelled out as Flatten, Softmax(-1), Reshape.

use capsule_engine::{Node, Op};

use crate::Error;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx};
use crate::shape;

pub(crate) const OPS: &[(&str, Convert)] = &[("Softmax", softmax)];

fn softmax(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let x = cx.required(0, "input")?;
    let x_shape = draft.shape(x);
    if cx.opset >= 13 {
        let axis = cx.attrs.int("axis", -1)?;
        if let Some(s) = &x_shape
            && shape::normalize_axis(axis, s.len()).is_none()
        {
            return Err(cx.invalid(format!("axis {axis} is out of range for rank {}", s.len())));
        }
        return cx.emit(draft, Op::Softmax { axis }, vec![x.to_string()]);
    }
    let axis = cx.attrs.int("axis", 1)?;
    if axis == -1 {
        return cx.emit(draft, Op::Softmax { axis }, vec![x.to_string()]);
    }
    let Some(s) = x_shape else {
        return Err(cx.unsupported(format!(
            "before opset 13, Softmax normalises over all dimensions from axis {axis} on; \
             the input's rank is unknown, so this cannot be mapped to a per-axis softmax; \
             re-export with opset 13 or later, or with a known input shape"
        )));
    };
    let Some(a) = shape::normalize_axis(axis, s.len()) else {
        return Err(cx.invalid(format!("axis {axis} is out of range for rank {}", s.len())));
    };
    if s[a + 1..].iter().all(|&d| d == Some(1)) {
        return cx.emit(draft, Op::Softmax { axis }, vec![x.to_string()]);
    }
    let Some(target) = reshape_target(&s, a) else {
        return Err(cx.unsupported(format!(
            "before opset 13, Softmax normalises over all dimensions from axis {axis} on, \
             and the input shape {s:?} is not known well enough to express that; \
             re-export with opset 13 or later"
        )));
    };
    let out = cx.output()?;
    let flat = draft.fresh_value(&format!("{out}.flat"));
    let normalised = draft.fresh_value(&format!("{out}.normalised"));
    let flatten_node = draft.fresh_node(&format!("{}.flatten", cx.name));
    let reshape_node = draft.fresh_node(&format!("{}.reshape", cx.name));
    let steps = [
        (
            flatten_node,
            Op::Flatten { axis: a as i64 },
            x.to_string(),
            flat.clone(),
        ),
        (
            cx.name.to_string(),
            Op::Softmax { axis: -1 },
            flat,
            normalised.clone(),
        ),
        (
            reshape_node,
            Op::Reshape {
                shape: target,
                allowzero: false,
            },
            normalised,
            out.to_string(),
        ),
    ];
    for (name, op, input, output) in steps {
        draft.push(Node {
            name,
            op,
            inputs: vec![input],
            outputs: vec![output],
        })?;
    }
    Ok(())
}

/// The Reshape target that restores `shape` after flattening at `axis`: every
/// dimension from `axis` on must be known, and at most one before it unknown
/// (it becomes `-1`).
fn reshape_target(shape: &[Option<usize>], axis: usize) -> Option<Vec<i64>> {
    let unknown_leading = shape[..axis].iter().filter(|d| d.is_none()).count();
    if unknown_leading > 1 || shape[axis..].iter().any(Option::is_none) {
        return None;
    }
    shape
        .iter()
        .map(|d| match d {
            Some(v) => i64::try_from(*v).ok(),
            None => Some(-1),
        })
        .collect()
}
