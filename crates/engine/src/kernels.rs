//! Matrix products: the crate's one `unsafe` block, behind a checked safe front.
//!
//! [`sgemm`] wraps `matrixmultiply::sgemm`, which takes raw pointers and
//! strides. Before the call it checks, at run time and in release builds,
//! that every element the product can read or write lies inside the slices it
//! was given. A failed check is a bug in the engine, not in the model or its
//! input, and panics rather than touching memory the slices do not cover.
//!
//! Threads: with its `threading` feature, `matrixmultiply` splits a large
//! product over its own pool of up to `MATMUL_NUM_THREADS` threads (default:
//! the physical cores, at most 4). Rayon's pool would compete with it for the
//! same cores, so the engine uses one or the other for a given product:
//! callers parallelise over batch items or groups only when
//! [`splits_itself`] says the products are too small for `matrixmultiply` to
//! thread, and [`gemm`] splits such small-but-not-tiny products over rayon by
//! row blocks.

use rayon::prelude::*;

/// A read-only matrix view with arbitrary strides: element `(i, j)` of the
/// `rows x cols` matrix is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// The row-major `rows x cols` matrix at the start of `data`.
    pub(crate) fn new(data: &'a [f32], rows: usize, cols: usize) -> MatRef<'a> {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, sharing the data.
    pub(crate) fn t(self) -> MatRef<'a> {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The transpose when `transpose` is set.
    pub(crate) fn t_if(self, transpose: bool) -> MatRef<'a> {
        if transpose { self.t() } else { self }
    }

    /// Rows `first..first + count`, or `None` when out of range.
    fn rows(self, first: usize, count: usize) -> Option<MatRef<'a>> {
        if first.checked_add(count)? > self.rows {
            return None;
        }
        let data = self.data.get(first.checked_mul(self.row_stride)?..)?;
        Some(MatRef {
            data,
            rows: count,
            ..self
        })
    }
}

/// A mutable row-major matrix view: element `(i, j)` of the `rows x cols`
/// matrix is `data[i * row_stride + j]`.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a> MatMut<'a> {
    /// The row-major `rows x cols` matrix at the start of `data`.
    pub(crate) fn new(data: &'a mut [f32], rows: usize, cols: usize) -> MatMut<'a> {
        MatMut {
            data,
            rows,
            cols,
            row_stride: cols,
        }
    }
}

/// Threshold of `matrixmultiply` 0.3's own heuristic (`LoopThreadConfig`):
/// it uses a second thread once `m*k + k*n` reaches twice this.
const MATRIXMULTIPLY_THREAD_FACTOR: usize = 1 << 14;

/// Smallest product (in multiply-adds) worth splitting over rayon.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Fewest rows of C a rayon block gets.
const PARALLEL_MIN_ROWS: usize = 16;

/// True when `matrixmultiply` runs an `m x k` by `k x n` product on several
/// threads of its own (given more than one core).
pub(crate) fn splits_itself(m: usize, k: usize, n: usize) -> bool {
    let size = m.saturating_mul(k).saturating_add(k.saturating_mul(n));
    size >= 2 * MATRIXMULTIPLY_THREAD_FACTOR
}

/// `C = alpha * A * B + beta * C`, on as many threads as the product is
/// worth (see the module header).
///
/// # Panics
///
/// As [`sgemm`].
pub(crate) fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let work = m.saturating_mul(k).saturating_mul(n);
    let blocks = rayon::current_num_threads().min(m / PARALLEL_MIN_ROWS);
    if splits_itself(m, k, n) || work < PARALLEL_MIN_WORK || blocks < 2 || c.rows != m {
        sgemm(alpha, a, b, beta, c);
        return;
    }
    let rows = m.div_ceil(blocks);
    let (ldc, cols) = (c.row_stride, c.cols);
    c.data
        .par_chunks_mut(rows * ldc)
        .enumerate()
        .for_each(|(block, c)| {
            let first = block * rows;
            let count = rows.min(m.saturating_sub(first));
            if count == 0 {
                return;
            }
            let a = a.rows(first, count).expect("row block inside A");
            let c = MatMut {
                data: c,
                rows: count,
                cols,
                row_stride: ldc,
            };
            sgemm(alpha, a, b, beta, c);
        });
}

/// Index one past the last element a nonempty `rows x cols` view with
/// these strides reaches, or `None` on overflow.
fn reach(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Option<usize> {
    (rows - 1)
        .checked_mul(row_stride)?
        .checked_add((cols - 1).checked_mul(col_stride)?)?
        .checked_add(1)
}

/// A stride as `matrixmultiply` takes it. Along a dimension of one element
/// the stride is only ever multiplied by 0, and 0 is passed.
fn stride(len: usize, stride: usize) -> isize {
    if len <= 1 {
        return 0;
    }
    // `reach` bounded `(len - 1) * stride` by a slice length, which is at
    // most `isize::MAX`.
    isize::try_from(stride).expect("stride bounded by a slice length")
}

/// One call of `matrixmultiply::sgemm`: `C = alpha * A * B + beta * C`.
/// When `beta` is 0, C's previous contents are ignored (NaNs included).
///
/// # Panics
///
/// When the dimensions disagree, a view does not cover its matrix, or C's
/// rows overlap. All three are engine bugs.
pub(crate) fn sgemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && c.rows == m && c.cols == n,
        "product of {m}x{k} and {}x{n} into {}x{}",
        b.rows,
        c.rows,
        c.cols
    );
    if m == 0 || n == 0 {
        return;
    }
    assert!(m == 1 || c.row_stride >= n, "rows of C overlap");
    let c_reach = reach(m, n, c.row_stride, 1);
    assert!(
        c_reach.is_some_and(|r| r <= c.data.len()),
        "C ({m}x{n}, row stride {}) exceeds its {} elements",
        c.row_stride,
        c.data.len()
    );
    if k == 0 {
        // An empty sum: A and B may be empty slices, so skip the kernel.
        for i in 0..m {
            let row = &mut c.data[i * c.row_stride..][..n];
            if beta == 0.0 {
                row.fill(0.0);
            } else {
                row.iter_mut().for_each(|v| *v *= beta);
            }
        }
        return;
    }
    for (name, view) in [("A", a), ("B", b)] {
        let end = reach(view.rows, view.cols, view.row_stride, view.col_stride);
        assert!(
            end.is_some_and(|e| e <= view.data.len()),
            "{name} ({}x{}, strides {} and {}) exceeds its {} elements",
            view.rows,
            view.cols,
            view.row_stride,
            view.col_stride,
            view.data.len()
        );
    }
    // SAFETY: `matrixmultiply::sgemm` reads A at offsets `i*rsa + l*csa`
    // (i < m, l < k), B at `l*rsb + j*csb` (l < k, j < n), and reads and
    // writes C at `i*rsc + j*csc` (i < m, j < n). The asserts above bound
    // the largest offset of each by its slice's length (`stride` zeroes
    // only strides that are multiplied by index 0), so every access is in
    // bounds. C's elements are distinct (csc = 1, and rsc >= n when m > 1),
    // as the function requires. C is borrowed mutably and A and B
    // immutably, so C aliases neither, and all three outlive the call, which
    // keeps no pointer.
    #[allow(unsafe_code)]
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            stride(m, a.row_stride),
            stride(k, a.col_stride),
            b.data.as_ptr(),
            stride(k, b.row_stride),
            stride(n, b.col_stride),
            beta,
            c.data.as_mut_ptr(),
            stride(m, c.row_stride),
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &MatRef, b: &MatRef) -> Vec<f32> {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|l| {
                        a.data[i * a.row_stride + l * a.col_stride]
                            * b.data[l * b.row_stride + j * b.col_stride]
                    })
                    .sum();
            }
        }
        c
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 31 + seed * 17) % 23) as f32 - 11.0)
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-3 * w.abs().max(1.0), "[{i}] {g} vs {w}");
        }
    }

    #[test]
    fn transposed_operands() {
        let (m, k, n) = (5, 7, 3);
        let a_data = values(m * k, 1);
        let b_data = values(k * n, 2);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta {
                MatRef::new(&a_data, k, m).t()
            } else {
                MatRef::new(&a_data, m, k)
            };
            let b = if tb {
                MatRef::new(&b_data, n, k).t()
            } else {
                MatRef::new(&b_data, k, n)
            };
            let want = naive(&a, &b);
            let mut c = vec![f32::NAN; m * n];
            sgemm(1.0, a, b, 0.0, MatMut::new(&mut c, m, n));
            assert_close(&c, &want);
        }
    }

    #[test]
    fn alpha_beta_and_padded_rows_of_c() {
        let (m, k, n) = (3, 4, 2);
        let (a, b) = (values(m * k, 3), values(k * n, 4));
        let (a, b) = (MatRef::new(&a, m, k), MatRef::new(&b, k, n));
        let product = naive(&a, &b);
        // C's rows are 3 apart: the third column must stay untouched.
        let mut c: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let before = c.clone();
        let view = MatMut {
            data: &mut c,
            rows: m,
            cols: n,
            row_stride: 3,
        };
        sgemm(2.0, a, b, 0.5, view);
        for i in 0..m {
            for j in 0..n {
                let want = 2.0 * product[i * n + j] + 0.5 * before[i * 3 + j];
                assert!((c[i * 3 + j] - want).abs() < 1e-3);
            }
            assert_eq!(c[i * 3 + 2], before[i * 3 + 2]);
        }
    }

    #[test]
    fn empty_inner_dimension_scales_c() {
        let mut c = vec![2.0; 6];
        let (a, b) = (MatRef::new(&[], 2, 0), MatRef::new(&[], 0, 3));
        sgemm(1.0, a, b, 0.5, MatMut::new(&mut c, 2, 3));
        assert_eq!(c, [1.0; 6]);
        c[0] = f32::NAN;
        sgemm(1.0, a, b, 0.0, MatMut::new(&mut c, 2, 3));
        assert_eq!(c, [0.0; 6]);
    }

    #[test]
    fn parallel_row_blocks_match_one_call() {
        // Big enough to split over rayon, small enough for matrixmultiply
        // to stay single-threaded.
        let (m, k, n) = (250, 40, 150);
        assert!(!splits_itself(m, k, n));
        let (a, b) = (values(m * k, 5), values(k * n, 6));
        let b = MatRef::new(&b, k, n);
        // A read row by row, then column by column.
        for a in [MatRef::new(&a, m, k), MatRef::new(&a, k, m).t()] {
            let mut c = vec![0.0; m * n];
            gemm(1.0, a, b, 0.0, MatMut::new(&mut c, m, n));
            assert_close(&c, &naive(&a, &b));
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn rejects_a_view_shorter_than_its_matrix() {
        let (a, b) = (vec![1.0; 5], vec![1.0; 6]);
        let mut c = vec![0.0; 4];
        let a = MatRef::new(&a, 2, 3);
        sgemm(
            1.0,
            a,
            MatRef::new(&b, 3, 2),
            0.0,
            MatMut::new(&mut c, 2, 2),
        );
    }

    #[test]
    #[should_panic(expected = "product of")]
    fn rejects_disagreeing_dimensions() {
        let mut c = vec![0.0; 4];
        let a = MatRef::new(&[1.0; 6], 2, 3);
        sgemm(
            1.0,
            a,
            MatRef::new(&[1.0; 4], 2, 2),
            0.0,
            MatMut::new(&mut c, 2, 2),
        );
    }

    #[test]
    #[should_panic(expected = "overlap")]
    fn rejects_overlapping_rows_of_c() {
        let mut c = vec![0.0; 4];
        let view = MatMut {
            data: &mut c,
            rows: 2,
            cols: 2,
            row_stride: 1,
        };
        sgemm(
            1.0,
            MatRef::new(&[1.0; 2], 2, 1),
            MatRef::new(&[1.0; 2], 1, 2),
            0.0,
            view,
        );
    }
}
