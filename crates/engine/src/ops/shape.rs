//! Operators that move or relabel data: Concat, Flatten, Reshape, Identity.
//!
//! Flatten, Reshape and Identity keep the data as it is; when the executor
//! hands the input over they cost nothing.

use std::borrow::Cow;

use super::{KernelResult, Mismatch, axis_index};
use crate::tensor::{Tensor, volume};

/// The product of `dims`, or a [`Mismatch`] when it overflows.
fn product(dims: &[usize]) -> Result<usize, Mismatch> {
    volume(dims).ok_or_else(|| Mismatch(format!("dimensions {dims:?} are too large")))
}

/// Concat: joins the inputs along `axis`; all other dimensions must agree.
pub(crate) fn concat(axis: i64, inputs: &[Cow<'_, Tensor>]) -> KernelResult {
    let Some(first) = inputs.first() else {
        return Err(Mismatch("needs at least one input".into()));
    };
    let rank = first.shape().len();
    let axis = axis_index(axis, rank)?;
    let mut shape = first.shape().to_vec();
    shape[axis] = 0;
    for (i, x) in inputs.iter().enumerate() {
        let s = x.shape();
        let agrees = s.len() == rank
            && s.iter()
                .zip(first.shape())
                .enumerate()
                .all(|(d, (a, b))| d == axis || a == b);
        if !agrees {
            return Err(Mismatch(format!(
                "input {i} has shape {s:?}, which differs from input 0's {:?} \
                 outside axis {axis}",
                first.shape()
            )));
        }
        shape[axis] = shape[axis]
            .checked_add(s[axis])
            .ok_or_else(|| Mismatch("the output is too large".into()))?;
    }
    let len = product(&shape)?;
    if len == 0 {
        return Ok(Tensor::from_parts(shape, Vec::new()));
    }
    // Each input contributes `chunk` contiguous values per outer index.
    let outer = product(&shape[..axis])?;
    let inner = product(&shape[axis + 1..])?;
    // A recycled buffer: a fresh one of DenseNet's sizes (up to 3.2 MB) took
    // its pages from the system on every query, 1.9 ms against onnxruntime's
    // 0.15 for the copy.
    let mut y = crate::buffers::take(len);
    let mut at = 0;
    for o in 0..outer {
        for x in inputs {
            let chunk = x.shape()[axis] * inner;
            y[at..at + chunk].copy_from_slice(&x.data()[o * chunk..][..chunk]);
            at += chunk;
        }
    }
    Ok(Tensor::from_parts(shape, y))
}

/// Flatten: a matrix whose rows are the dimensions before `axis`
/// (`-rank..=rank`).
pub(crate) fn flatten(axis: i64, x: Cow<'_, Tensor>) -> KernelResult {
    let rank = x.shape().len();
    // Unlike other axes, Flatten's may be `rank`: all dimensions form the rows.
    let axis = match usize::try_from(axis) {
        Ok(a) if a == rank => rank,
        _ => axis_index(axis, rank)?,
    };
    let shape = vec![product(&x.shape()[..axis])?, product(&x.shape()[axis..])?];
    Ok(relabel(x, shape))
}

/// Reshape to `spec`: `-1` is inferred, `0` copies the input's dimension at
/// the same index unless `allowzero`, where it is a literal 0.
pub(crate) fn reshape(spec: &[i64], allowzero: bool, x: Cow<'_, Tensor>) -> KernelResult {
    let input = x.shape();
    let mut shape = Vec::with_capacity(spec.len());
    let mut inferred = None;
    for (i, &d) in spec.iter().enumerate() {
        let dim = match d {
            -1 if inferred.is_none() => {
                inferred = Some(i);
                1
            }
            -1 => return Err(Mismatch(format!("shape {spec:?} has more than one -1"))),
            0 if !allowzero => *input.get(i).ok_or_else(|| {
                Mismatch(format!(
                    "shape[{i}] = 0 copies input dimension {i}, but the input {input:?} \
                     has rank {}",
                    input.len()
                ))
            })?,
            _ => usize::try_from(d)
                .map_err(|_| Mismatch(format!("shape[{i}] = {d} is not a dimension")))?,
        };
        shape.push(dim);
    }
    let known = product(&shape)?;
    if let Some(i) = inferred {
        if known == 0 || !x.len().is_multiple_of(known) {
            return Err(Mismatch(format!(
                "cannot infer the -1 in {spec:?}: {} values do not split into parts of {known}",
                x.len()
            )));
        }
        shape[i] = x.len() / known;
    } else if known != x.len() {
        return Err(Mismatch(format!(
            "cannot reshape {input:?} ({} values) to {shape:?} ({known} values)",
            x.len()
        )));
    }
    Ok(relabel(x, shape))
}

/// The same values under `shape`, which has as many elements.
fn relabel(x: Cow<'_, Tensor>, shape: Vec<usize>) -> Tensor {
    let (_, data) = x.into_owned().into_parts();
    Tensor::from_parts(shape, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iota(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape.to_vec(), (0..n).map(|v| v as f32).collect()).unwrap()
    }

    fn shape_of(r: KernelResult) -> Vec<usize> {
        r.unwrap().shape().to_vec()
    }

    #[test]
    fn concat_along_each_axis() {
        let (a, b) = (
            iota(&[2, 2]),
            Tensor::new(vec![2, 1], vec![8.0, 9.0]).unwrap(),
        );
        let y = concat(1, &[Cow::Borrowed(&a), Cow::Borrowed(&b)]).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.data(), &[0.0, 1.0, 8.0, 2.0, 3.0, 9.0]);
        let y = concat(-1, &[Cow::Borrowed(&a), Cow::Borrowed(&b)]).unwrap();
        assert_eq!(y.data(), &[0.0, 1.0, 8.0, 2.0, 3.0, 9.0]);
        let c = Tensor::new(vec![1, 2], vec![8.0, 9.0]).unwrap();
        let y = concat(
            -2,
            &[Cow::Borrowed(&a), Cow::Borrowed(&c), Cow::Borrowed(&a)],
        )
        .unwrap();
        assert_eq!(y.shape(), &[5, 2]);
        assert_eq!(
            y.data(),
            &[0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 0.0, 1.0, 2.0, 3.0]
        );
        // channels of NCHW with batch 2
        let (x, z) = (iota(&[2, 1, 2, 2]), iota(&[2, 2, 2, 2]));
        let y = concat(1, &[Cow::Borrowed(&x), Cow::Borrowed(&z)]).unwrap();
        assert_eq!(y.shape(), &[2, 3, 2, 2]);
        assert_eq!(&y.data()[12..16], &x.data()[4..8]);
        assert_eq!(&y.data()[16..24], &z.data()[8..16]);
    }

    #[test]
    fn concat_errors() {
        let (a, b) = (iota(&[2, 2]), iota(&[3, 3]));
        let err = concat(0, &[Cow::Borrowed(&a), Cow::Borrowed(&b)]).unwrap_err();
        assert!(err.0.contains("input 1 has shape [3, 3]"), "{}", err.0);
        assert!(concat(2, &[Cow::Borrowed(&a)]).is_err());
        assert!(concat(-3, &[Cow::Borrowed(&a)]).is_err());
        assert!(concat(0, &[Cow::Borrowed(&iota(&[]))]).is_err());
        assert!(concat(0, &[]).is_err());
    }

    #[test]
    fn flatten_axes() {
        let x = iota(&[2, 3, 4]);
        assert_eq!(shape_of(flatten(1, Cow::Borrowed(&x))), [2, 12]);
        assert_eq!(shape_of(flatten(0, Cow::Borrowed(&x))), [1, 24]);
        assert_eq!(shape_of(flatten(3, Cow::Borrowed(&x))), [24, 1]);
        assert_eq!(shape_of(flatten(-1, Cow::Borrowed(&x))), [6, 4]);
        assert!(flatten(4, Cow::Borrowed(&x)).is_err());
        assert!(flatten(-4, Cow::Borrowed(&x)).is_err());
        assert_eq!(flatten(1, Cow::Borrowed(&x)).unwrap().data(), x.data());
    }

    #[test]
    fn reshape_specials() {
        let x = iota(&[2, 3, 4]);
        let r = |spec: &[i64], allowzero| reshape(spec, allowzero, Cow::Borrowed(&x));
        assert_eq!(shape_of(r(&[4, -1], false)), [4, 6]);
        assert_eq!(shape_of(r(&[0, -1], false)), [2, 12]);
        assert_eq!(shape_of(r(&[0, 0, 2, 2], false)), [2, 3, 2, 2]);
        assert_eq!(shape_of(r(&[24], false)), [24]);
        assert!(
            r(&[0, 0, 0, 0], false)
                .unwrap_err()
                .0
                .contains("has rank 3")
        );
        assert!(
            r(&[-1, -1], false)
                .unwrap_err()
                .0
                .contains("more than one -1")
        );
        assert!(r(&[5, -1], false).unwrap_err().0.contains("cannot infer"));
        assert!(r(&[2, 3], false).unwrap_err().0.contains("cannot reshape"));
        assert!(
            r(&[-2, 12], false)
                .unwrap_err()
                .0
                .contains("not a dimension")
        );
        // allowzero: 0 is a literal dimension
        assert!(r(&[0, 24], true).is_err());
        let empty = iota(&[0, 3]);
        let y = reshape(&[3, 0], true, Cow::Borrowed(&empty)).unwrap();
        assert_eq!(y.shape(), &[3, 0]);
        assert!(reshape(&[0, -1], true, Cow::Borrowed(&empty)).is_err());
    }

    #[test]
    fn relabelling_an_owned_tensor_keeps_its_buffer() {
        let x = iota(&[2, 3]);
        let ptr = x.data().as_ptr();
        let y = reshape(&[3, 2], false, Cow::Owned(x)).unwrap();
        assert_eq!(y.data().as_ptr(), ptr);
    }
}
