//! Window geometry shared by Conv and the pools: strides, pads, dilations,
//! and `auto_pad` turned into explicit pads.

use crate::Error;
use crate::ops::{NodeCx, to_usize};
use crate::shape::Shape;

/// A 2-D window's geometry with ONNX's defaults applied.
pub(crate) struct Window {
    /// `[sH, sW]`, default 1.
    pub(crate) strides: [usize; 2],
    /// `[top, left, bottom, right]`, default 0.
    pub(crate) pads: [usize; 4],
    /// `[dH, dW]`, default 1.
    pub(crate) dilations: [usize; 2],
    /// True when `auto_pad` was `SAME_*` or `VALID`: the output size then
    /// follows the spec's auto-pad formula, which never rounds up.
    pub(crate) auto_padded: bool,
}

/// Reads a node's `kernel_shape` attribute, which must have two entries.
pub(crate) fn kernel_attr(cx: &NodeCx<'_>) -> Result<Option<[usize; 2]>, Error> {
    match cx.attrs.ints("kernel_shape")? {
        None => Ok(None),
        Some(k) => Ok(Some(pair(cx, "kernel_shape", k, 1)?)),
    }
}

/// Reads `strides`, `pads`, `dilations` and `auto_pad` for a window of size
/// `kernel` over input `x` (NCHW; its height and width are needed only for
/// `SAME_*` padding with a stride above 1).
pub(crate) fn read(
    cx: &NodeCx<'_>,
    kernel: [usize; 2],
    x: Option<&Shape>,
) -> Result<Window, Error> {
    if kernel.contains(&0) {
        return Err(cx.invalid(format!("kernel_shape {kernel:?} has a zero entry")));
    }
    let strides = match cx.attrs.ints("strides")? {
        Some(s) => pair(cx, "strides", s, 1)?,
        None => [1, 1],
    };
    let dilations = match cx.attrs.ints("dilations")? {
        Some(d) => pair(cx, "dilations", d, 1)?,
        None => [1, 1],
    };
    let explicit = match cx.attrs.ints("pads")? {
        Some(p) => {
            if p.len() != 4 {
                return Err(cx.invalid(format!(
                    "pads has {} entries, expected 4 (top, left, bottom, right)",
                    p.len()
                )));
            }
            let mut pads = [0; 4];
            for (slot, &v) in pads.iter_mut().zip(p) {
                *slot = to_usize(cx, "pads", v)?;
            }
            Some(pads)
        }
        None => None,
    };
    let auto_pad = cx.attrs.string("auto_pad", "NOTSET")?;
    let (pads, auto_padded) = match auto_pad.as_str() {
        "NOTSET" | "" => (explicit.unwrap_or([0; 4]), false),
        "VALID" => ([0; 4], true),
        "SAME_UPPER" | "SAME_LOWER" => {
            let mut pads = [0; 4];
            for axis in 0..2 {
                let total = same_total(cx, &auto_pad, axis, kernel, strides, dilations, x)?;
                let (head, tail) = if auto_pad == "SAME_UPPER" {
                    (total / 2, total - total / 2)
                } else {
                    (total - total / 2, total / 2)
                };
                pads[axis] = head;
                pads[axis + 2] = tail;
            }
            (pads, true)
        }
        other => {
            return Err(cx.invalid(format!(
                "auto_pad '{other}' is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER"
            )));
        }
    };
    if auto_padded && explicit.is_some_and(|p| p != [0; 4]) {
        return Err(cx.invalid(format!(
            "it sets both auto_pad '{auto_pad}' and explicit pads, which ONNX forbids"
        )));
    }
    Ok(Window {
        strides,
        pads,
        dilations,
        auto_padded,
    })
}

/// Total padding along one spatial axis for `SAME_*`: the output size is
/// `ceil(input / stride)` and the padding makes the windows fit it.
fn same_total(
    cx: &NodeCx<'_>,
    mode: &str,
    axis: usize,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    x: Option<&Shape>,
) -> Result<usize, Error> {
    let overflow = || cx.invalid("its window size overflows".into());
    let effective = (kernel[axis] - 1)
        .checked_mul(dilations[axis])
        .and_then(|v| v.checked_add(1))
        .ok_or_else(overflow)?;
    if strides[axis] == 1 {
        // out = in, so the total is effective - 1 whatever the input size.
        return Ok(effective - 1);
    }
    let input = x
        .filter(|s| s.len() == 4)
        .and_then(|s| s[2 + axis])
        .ok_or_else(|| {
            cx.unsupported(format!(
                "auto_pad {mode} with stride {} needs the input's {}, which the model does \
                 not declare; re-export the model with a fixed input size or with explicit pads",
                strides[axis],
                if axis == 0 { "height" } else { "width" }
            ))
        })?;
    let out = input.div_ceil(strides[axis]);
    let needed = out
        .saturating_sub(1)
        .checked_mul(strides[axis])
        .and_then(|v| v.checked_add(effective))
        .ok_or_else(overflow)?;
    Ok(needed.saturating_sub(input))
}

/// A two-entry attribute whose entries are at least `min`.
fn pair(cx: &NodeCx<'_>, what: &str, values: &[i64], min: usize) -> Result<[usize; 2], Error> {
    let [a, b] = values else {
        return Err(cx.unsupported(format!(
            "{what} has {} entries; only 2-D windows (NCHW inputs) are supported",
            values.len()
        )));
    };
    let out = [to_usize(cx, what, *a)?, to_usize(cx, what, *b)?];
    if out.iter().any(|&v| v < min) {
        return Err(cx.invalid(format!("{what} {out:?} must be at least {min}")));
    }
    Ok(out)
}
