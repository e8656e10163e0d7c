//! `Gemm` and `MatMul`.

use capsule_engine::Op;

use crate::Error;
use crate::draft::Draft;
use crate::ops::{Convert, NodeCx};

pub(crate) const OPS: &[(&str, Convert)] = &[("Gemm", gemm), ("MatMul", matmul)];

/// Gemm (opset 7, 9, 11, 13): `alpha * op(A) * op(B) + beta * C`; C is
/// optional from opset 11.
fn gemm(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let a = cx.required(0, "A")?;
    let b = cx.required(1, "B")?;
    let c = cx.input(2);
    for (name, what) in [(a, "A"), (b, "B")] {
        if let Some(s) = draft.shape(name)
            && s.len() != 2
        {
            return Err(cx.unsupported(format!(
                "Gemm's {what} must have rank 2, '{name}' has rank {}; \
                     re-export it as MatMul (e.g. without torch.onnx's Gemm fusion)",
                s.len()
            )));
        }
    }
    if c.is_none() && cx.opset < 11 {
        return Err(cx.invalid("its input C is required before opset 11".into()));
    }
    let alpha = finite(cx, "alpha", cx.attrs.float("alpha", 1.0)?)?;
    let beta = finite(cx, "beta", cx.attrs.float("beta", 1.0)?)?;
    let op = Op::Gemm {
        alpha,
        beta,
        trans_a: cx.attrs.flag("transA", false)?,
        trans_b: cx.attrs.flag("transB", false)?,
    };
    let mut inputs = vec![a.to_string(), b.to_string()];
    inputs.extend(c.map(str::to_string));
    cx.emit(draft, op, inputs)
}

/// MatMul (opset 1, 9, 13): numpy `matmul`.
fn matmul(cx: &NodeCx<'_>, draft: &mut Draft) -> Result<(), Error> {
    let a = cx.required(0, "A")?;
    let b = cx.required(1, "B")?;
    cx.emit(draft, Op::MatMul, vec![a.to_string(), b.to_string()])
}

/// Rejects a non-finite float attribute (the architecture is stored as JSON,
/// which has no infinities or NaN).
pub(crate) fn finite(cx: &NodeCx<'_>, what: &str, v: f32) -> Result<f32, Error> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(cx.attrs.invalid(what, format!("must be finite, got {v}")))
    }
}
