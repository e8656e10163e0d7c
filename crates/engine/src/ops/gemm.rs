//! Matrix products: Gemm (`alpha * op(A) * op(B) + beta * C`) and MatMul
//! (numpy `matmul`). Both end in [`kernels::gemm`]; transposes are strides,
//! never copies.

use super::broadcast::Broadcast;
use super::{KernelResult, Mismatch};
use crate::kernels::{self, MatMut, MatRef};
use crate::tensor::{Tensor, volume};
use crate::threads::for_each_chunk;

/// Gemm's attributes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmAttrs {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

/// Gemm: A and B rank 2; C, when given, broadcasts (unidirectionally) to
/// the `[M, N]` output: a scalar, `[N]`, `[1, N]`, `[M, 1]` or `[M, N]`.
pub(crate) fn gemm(attrs: GemmAttrs, a: &Tensor, b: &Tensor, c: Option<&Tensor>) -> KernelResult {
    let (&[a0, a1], &[b0, b1]) = (a.shape(), b.shape()) else {
        return Err(Mismatch(format!(
            "A and B must be matrices (rank 2), got {:?} and {:?}",
            a.shape(),
            b.shape()
        )));
    };
    let a = MatRef::new(a.data(), a0, a1).t_if(attrs.trans_a);
    let b = MatRef::new(b.data(), b0, b1).t_if(attrs.trans_b);
    let (m, k) = if attrs.trans_a { (a1, a0) } else { (a0, a1) };
    let (kb, n) = if attrs.trans_b { (b1, b0) } else { (b0, b1) };
    if k != kb {
        return Err(Mismatch(format!(
            "op(A) is {m}x{k} but op(B) is {kb}x{n}: inner dimensions differ"
        )));
    }
    let shape = vec![m, n];
    let len = volume(&shape)
        .ok_or_else(|| Mismatch(format!("the output shape {shape:?} is too large")))?;
    // Written whole below: C broadcast then beta = 1, or beta = 0.
    let mut y = crate::buffers::take(len);
    let mut beta = 0.0;
    if let Some(c) = c {
        let plan = Broadcast::new(c.shape(), &shape)
            .ok()
            .filter(|plan| plan.shape() == shape && c.shape().len() <= 2)
            .ok_or_else(|| {
                Mismatch(format!(
                    "C's shape {:?} does not broadcast to the output's [{m}, {n}]",
                    c.shape()
                ))
            })?;
        if attrs.beta != 0.0 {
            let (run, stride, _) = plan.run();
            let c = c.data();
            plan.for_each_run(|o, i, _| {
                let out = &mut y[o..o + run];
                if stride == 1 {
                    out.iter_mut()
                        .zip(&c[i..i + run])
                        .for_each(|(o, &c)| *o = attrs.beta * c);
                } else {
                    out.fill(attrs.beta * c[i]);
                }
            });
            beta = 1.0;
        }
    }
    kernels::gemm(attrs.alpha, a, b, beta, MatMut::new(&mut y, m, n));
    Ok(Tensor::from_parts(shape, y))
}

/// MatMul with numpy semantics: the last two dimensions multiply as
/// matrices and the leading ones broadcast; a 1-D operand is a row (for A)
/// or column (for B) vector whose dimension is removed from the result.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> KernelResult {
    let (sa, sb) = (a.shape(), b.shape());
    // A 1-D A is a row vector [1, K]; a 1-D B is a column vector [K, 1].
    let a_dims = match sa {
        [] => None,
        &[k] => Some((&[][..], 1, k)),
        [batch @ .., m, k] => Some((batch, *m, *k)),
    };
    let b_dims = match sb {
        [] => None,
        &[k] => Some((&[][..], k, 1)),
        [batch @ .., k, n] => Some((batch, *k, *n)),
    };
    let (Some((batch_a, m, k)), Some((batch_b, kb, n))) = (a_dims, b_dims) else {
        return Err(Mismatch(format!(
            "operands must have rank 1 or more, got {sa:?} and {sb:?}"
        )));
    };
    if k != kb {
        return Err(Mismatch(format!(
            "cannot multiply {sa:?} by {sb:?}: inner dimensions {k} and {kb} differ"
        )));
    }
    let batch = Broadcast::new(batch_a, batch_b)
        .map_err(|e| Mismatch(format!("batch dimensions of {sa:?} and {sb:?}: {}", e.0)))?;
    let mut shape = batch.shape().to_vec();
    if sa.len() > 1 {
        shape.push(m);
    }
    if sb.len() > 1 {
        shape.push(n);
    }
    let len = volume(&shape)
        .ok_or_else(|| Mismatch(format!("the output shape {shape:?} is too large")))?;
    let mut y = vec![0.0; len];
    if len == 0 {
        return Ok(Tensor::from_parts(shape, y));
    }
    let (a, b) = (a.data(), b.data());
    let (a_len, b_len, y_len) = (m * k, k * n, m * n);
    if batch_b.iter().all(|&d| d == 1) {
        // One B for every batch item: A's batch is the output's, and folds
        // into the rows of a single product.
        let rows = batch.len() * m;
        let a = MatRef::new(a, rows, k);
        kernels::gemm(
            1.0,
            a,
            MatRef::new(b, k, n),
            0.0,
            MatMut::new(&mut y, rows, n),
        );
        return Ok(Tensor::from_parts(shape, y));
    }
    let mut pairs = Vec::with_capacity(batch.len());
    batch.for_each_index(|_, i, j| pairs.push((i, j)));
    let product = |(i, j): (usize, usize), out: &mut [f32]| {
        let a = MatRef::new(&a[i * a_len..], m, k);
        let b = MatRef::new(&b[j * b_len..], k, n);
        kernels::gemm(1.0, a, b, 0.0, MatMut::new(out, m, n));
    };
    if kernels::splits_itself(m, k, n) {
        y.chunks_mut(y_len)
            .zip(pairs)
            .for_each(|(out, p)| product(p, out));
    } else {
        for_each_chunk(&mut y, y_len, || (), |(), i, out| product(pairs[i], out));
    }
    Ok(Tensor::from_parts(shape, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(shape: &[usize], seed: usize) -> Tensor {
        let n = shape.iter().product();
        let data = (0..n)
            .map(|i| ((i * 37 + seed * 11) % 19) as f32 / 4.0 - 2.0)
            .collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    }

    fn assert_close(got: &Tensor, shape: &[usize], want: &[f32]) {
        assert_eq!(got.shape(), shape);
        for (i, (g, w)) in got.data().iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "[{i}] {g} vs {w}");
        }
    }

    /// `sum_l A[i, l] B[l, j]` on dense row-major matrices.
    fn naive_product(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
            }
        }
        c
    }

    fn transpose(t: &Tensor) -> Tensor {
        let [r, c] = t.shape().try_into().unwrap();
        let data = (0..r * c).map(|i| t.data()[(i % r) * c + i / r]).collect();
        Tensor::new(vec![c, r], data).unwrap()
    }

    #[test]
    fn gemm_transposes_and_broadcasts_c() {
        let (m, k, n) = (4, 5, 3);
        let (a, b) = (tensor(&[m, k], 1), tensor(&[k, n], 2));
        let product = naive_product(a.data(), b.data(), m, k, n);
        let c_shapes: [&[usize]; 6] = [&[], &[1], &[n], &[1, n], &[m, 1], &[m, n]];
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta { transpose(&a) } else { a.clone() };
            let b = if tb { transpose(&b) } else { b.clone() };
            for c_shape in c_shapes {
                let c = tensor(c_shape, 3);
                let attrs = GemmAttrs {
                    alpha: 0.5,
                    beta: -2.0,
                    trans_a: ta,
                    trans_b: tb,
                };
                let got = gemm(attrs, &a, &b, Some(&c)).unwrap();
                let want: Vec<f32> = (0..m * n)
                    .map(|idx| {
                        let (i, j) = (idx / n, idx % n);
                        let ci = match c_shape {
                            [] | [1] => 0,
                            [_] => j,
                            [1, _] => j,
                            [_, 1] => i,
                            _ => idx,
                        };
                        0.5 * product[idx] - 2.0 * c.data()[ci]
                    })
                    .collect();
                assert_close(&got, &[m, n], &want);
            }
            let attrs = GemmAttrs {
                alpha: 1.0,
                beta: 1.0,
                trans_a: ta,
                trans_b: tb,
            };
            assert_close(&gemm(attrs, &a, &b, None).unwrap(), &[m, n], &product);
        }
    }

    #[test]
    fn gemm_with_zero_beta_ignores_c() {
        let c = Tensor::new(vec![1], vec![f32::NAN]).unwrap();
        let attrs = GemmAttrs {
            alpha: 1.0,
            beta: 0.0,
            trans_a: false,
            trans_b: false,
        };
        let y = gemm(attrs, &tensor(&[2, 2], 1), &tensor(&[2, 2], 2), Some(&c)).unwrap();
        assert!(y.data().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn gemm_shape_errors() {
        let attrs = GemmAttrs {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: false,
        };
        let (a, b) = (tensor(&[2, 3], 0), tensor(&[3, 4], 0));
        let err = |a: &Tensor, b: &Tensor, c: Option<&Tensor>| gemm(attrs, a, b, c).unwrap_err().0;
        assert!(err(&tensor(&[2, 3, 1], 0), &b, None).contains("rank 2"));
        assert!(err(&a, &tensor(&[4, 3], 0), None).contains("inner dimensions"));
        assert!(err(&a, &b, Some(&tensor(&[3], 0))).contains("does not broadcast"));
        assert!(err(&a, &b, Some(&tensor(&[1, 2, 4], 0))).contains("does not broadcast"));
        assert!(err(&a, &b, Some(&tensor(&[4, 4], 0))).contains("does not broadcast"));
    }

    /// numpy matmul by its definition, for operands of rank >= 2 with equal
    /// batch shapes after broadcasting is written out by the caller.
    fn naive_matmul(a: &Tensor, b: &Tensor) -> Vec<f32> {
        let (sa, sb) = (a.shape(), b.shape());
        let rank = sa.len().max(sb.len());
        let pad = |s: &[usize]| [vec![1; rank - s.len()], s.to_vec()].concat();
        let (pa, pb) = (pad(sa), pad(sb));
        let (m, k, n) = (pa[rank - 2], pa[rank - 1], pb[rank - 1]);
        let batch: Vec<usize> = (0..rank - 2).map(|i| pa[i].max(pb[i])).collect();
        let count: usize = batch.iter().product();
        let mut y = Vec::new();
        for flat in 0..count {
            let mut idx = vec![0; batch.len()];
            let mut rest = flat;
            for (i, &d) in batch.iter().enumerate().rev() {
                idx[i] = rest % d;
                rest /= d;
            }
            let offset = |p: &[usize]| {
                idx.iter()
                    .zip(p)
                    .fold(0, |o, (&i, &d)| o * d + if d == 1 { 0 } else { i })
            };
            let (ia, ib) = (offset(&pa[..rank - 2]), offset(&pb[..rank - 2]));
            y.extend(naive_product(
                &a.data()[ia * m * k..][..m * k],
                &b.data()[ib * k * n..][..k * n],
                m,
                k,
                n,
            ));
        }
        y
    }

    #[test]
    fn matmul_broadcasts_batch_dimensions() {
        let cases: [(&[usize], &[usize], &[usize]); 7] = [
            (&[3, 4], &[4, 5], &[3, 5]),
            (&[2, 3, 4], &[4, 5], &[2, 3, 5]),
            (&[2, 3, 4], &[1, 4, 5], &[2, 3, 5]),
            (&[2, 3, 4], &[2, 4, 5], &[2, 3, 5]),
            (&[2, 1, 3, 4], &[5, 4, 2], &[2, 5, 3, 2]),
            (&[3, 4], &[2, 4, 5], &[2, 3, 5]),
            (&[1, 2, 2, 3], &[3, 1, 3, 2], &[3, 2, 2, 2]),
        ];
        for (sa, sb, sy) in cases {
            let (a, b) = (tensor(sa, 1), tensor(sb, 2));
            let got = matmul(&a, &b).unwrap();
            assert_close(&got, sy, &naive_matmul(&a, &b));
        }
    }

    #[test]
    fn matmul_vectors_lose_their_dimension() {
        let (v, m) = (tensor(&[4], 1), tensor(&[4, 3], 2));
        let got = matmul(&v, &m).unwrap();
        assert_close(&got, &[3], &naive_product(v.data(), m.data(), 1, 4, 3));
        let mt = tensor(&[3, 4], 3);
        let got = matmul(&mt, &v).unwrap();
        assert_close(&got, &[3], &naive_product(mt.data(), v.data(), 3, 4, 1));
        let got = matmul(&v, &v).unwrap();
        let dot: f32 = v.data().iter().map(|x| x * x).sum();
        assert_close(&got, &[], &[dot]);
        let batched = tensor(&[2, 3, 4], 4);
        let got = matmul(&batched, &v).unwrap();
        assert_close(
            &got,
            &[2, 3],
            &naive_product(batched.data(), v.data(), 6, 4, 1),
        );
    }

    #[test]
    fn matmul_shape_errors() {
        let err = |a: &[usize], b: &[usize]| matmul(&tensor(a, 0), &tensor(b, 0)).unwrap_err().0;
        assert!(err(&[], &[3]).contains("rank 1 or more"));
        assert!(err(&[2, 3], &[4, 2]).contains("inner dimensions 3 and 4"));
        assert!(err(&[2, 2, 3], &[3, 3, 2]).contains("batch dimensions"));
    }

    #[test]
    fn matmul_of_empty_operands() {
        let y = matmul(&Tensor::zeros(vec![0, 3]), &tensor(&[3, 2], 0)).unwrap();
        assert_eq!(y.shape(), &[0, 2]);
        let y = matmul(&Tensor::zeros(vec![2, 0]), &Tensor::zeros(vec![0, 2])).unwrap();
        assert_eq!(y.data(), &[0.0; 4]);
    }
}
