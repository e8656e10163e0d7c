//! Softmax along one axis (opset 13 semantics), numerically stable.
//!
//! Each slice along the axis is shifted by its maximum before `exp`, so
//! no term overflows and the largest is exactly 1.

use std::borrow::Cow;

use super::{KernelResult, axis_index};
use crate::tensor::Tensor;

/// `exp(x - max) / sum(exp(x - max))` along `axis` (`-rank..rank`).
pub(crate) fn softmax(axis: i64, x: Cow<'_, Tensor>) -> KernelResult {
    let axis = axis_index(axis, x.shape().len())?;
    let mut y = x.into_owned();
    if y.is_empty() {
        return Ok(y);
    }
    let len = y.shape()[axis];
    // Not empty: no product of its dimensions overflows.
    let inner: usize = y.shape()[axis + 1..].iter().product();
    // Work on `inner` slices at once: rows of a block are contiguous, so
    // every pass is a vectorisable zip over a row.
    let mut max = vec![0.0f32; inner];
    let mut sum = vec![0.0f32; inner];
    for block in y.data_mut().chunks_mut(len * inner) {
        max.fill(f32::NEG_INFINITY);
        for row in block.chunks(inner) {
            max.iter_mut().zip(row).for_each(|(m, &v)| *m = m.max(v));
        }
        sum.fill(0.0);
        for row in block.chunks_mut(inner) {
            for ((v, &m), s) in row.iter_mut().zip(&max).zip(&mut sum) {
                *v = (*v - m).exp();
                *s += *v;
            }
        }
        for row in block.chunks_mut(inner) {
            row.iter_mut().zip(&sum).for_each(|(v, &s)| *v /= s);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax by its definition, in f64, over explicit multi-indices.
    fn naive(x: &Tensor, axis: usize) -> Vec<f32> {
        let shape = x.shape();
        let inner: usize = shape[axis + 1..].iter().product();
        let len = shape[axis];
        (0..x.len())
            .map(|i| {
                let start = i - (i / inner % len) * inner;
                let xs: Vec<f64> = (0..len)
                    .map(|l| x.data()[start + l * inner] as f64)
                    .collect();
                let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = xs.iter().map(|v| (v - m).exp()).sum();
                ((x.data()[i] as f64 - m).exp() / total) as f32
            })
            .collect()
    }

    fn tensor(shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|i| ((i * 7919) % 41) as f32 / 4.0 - 5.0)
            .collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    }

    #[test]
    fn every_axis_matches_the_definition() {
        let x = tensor(&[2, 3, 4, 5]);
        for axis in -4..4i64 {
            let y = softmax(axis, Cow::Borrowed(&x)).unwrap();
            let want = naive(&x, axis.rem_euclid(4) as usize);
            for (g, w) in y.data().iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "axis {axis}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let x = Tensor::new(vec![1, 3], vec![1000.0, 1001.0, -1000.0]).unwrap();
        let y = softmax(-1, Cow::Owned(x)).unwrap();
        assert!(y.data().iter().all(|v| v.is_finite()));
        assert!((y.data()[1] - 0.731_058_6).abs() < 1e-6);
        assert_eq!(y.data()[2], 0.0);
        assert!((y.data().iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rejects_axes_out_of_range() {
        let x = tensor(&[2, 3]);
        assert!(softmax(2, Cow::Borrowed(&x)).is_err());
        assert!(softmax(-3, Cow::Borrowed(&x)).is_err());
        assert!(softmax(0, Cow::Borrowed(&tensor(&[]))).is_err());
        let empty = Tensor::zeros(vec![0, 3]);
        assert_eq!(softmax(1, Cow::Borrowed(&empty)).unwrap().shape(), &[0, 3]);
    }
}
