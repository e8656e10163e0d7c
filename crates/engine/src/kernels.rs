//! Matrix products and the instruction-set dispatch: the crate's only
//! `unsafe` code, each block behind a checked safe front.
//!
//! [`sgemm`] wraps `gemm::gemm` (the `gemm` crate, which picks AVX-512,
//! AVX2+FMA or portable kernels at run time), which takes raw pointers and
//! strides. Before the call it checks, at run time and in release builds,
//! that every element the product can read or write lies inside the slices
//! it was given. A failed check is a bug in the engine, not in the model or
//! its input, and panics rather than touching memory the slices do not cover.
//!
//! [`gemm()`] routes each product: a few rows against a large transposed
//! matrix (a dense layer at small batch, `x * W^T`) goes to a row-dot kernel
//! that streams `W` once, at memory speed; everything else to `gemm`. A
//! product whose columns do not fill `gemm`'s last block of 16 may get that
//! block computed apart ([`last_columns_apart`]): on AVX2 when the product
//! is narrow, on AVX-512 when one column is left.
//!
//! Threads: the `gemm` crate splits large products over rayon's pool into
//! at most [`threads`](crate::threads::threads) pieces. Callers parallelise
//! over batch items or groups only when [`splits_itself`] says the products
//! are too small for that, so a product is never split twice.
//!
//! Instruction sets: hot loops elsewhere in the crate are written as safe,
//! autovectorisable Rust generic over `const FMA: bool`; `multiversion!`
//! compiles each for AVX-512, AVX2+FMA and the baseline, and calls the best
//! one this CPU has (detected once, at run time). The `unsafe` there is
//! the call of a `#[target_feature]` function, sound because the features
//! were detected.
//!
//! Twelve kernels are written with `std::arch` intrinsics instead. The
//! sixteen-plane depthwise convolution ([`depthwise3x3_x16`]), for AVX-512
//! (16x16 transposes) and for AVX2 (8x8), the one-plane depthwise
//! convolutions at stride 2 ([`depthwise3x3_stride2`], AVX-512 and AVX2) and
//! at stride 1 on planes at most 32 wide ([`depthwise3x3_stride1`], AVX-512)
//! and Winograd's three transforms in either tiling ([`winograd_weights`],
//! [`winograd_input`], [`winograd_output`], AVX-512), because their transposes, deinterleaves
//! and shifts across lanes are shuffles that LLVM does not find on its own
//! (or, for rows of 7-28 tiles, finds only in four-lane and scalar code);
//! the direct convolution's row ([`direct_row`], AVX2 and AVX-512), because
//! LLVM kept its twelve vectors of sums in memory; and the 1x1 Conv of few
//! inputs or outputs ([`pointwise`], AVX-512), written with
//! intrinsics from the start for its 24 vectors of sums and masked row
//! tails (no portable version of it was tried); and the product of a
//! matrix and one vector ([`matrix_vector`], AVX-512), for its sixteen
//! vectors of sums added up by one transpose. Their `unsafe` is that
//! call, masked loads and stores whose masks
//! cover exactly the slices they are given (AVX-512), whole-vector loads
//! and stores of eight-element arrays (AVX2), and the direct row's loads of
//! its taps' cells from a block of the input whose length is checked once
//! per block of output cells, not once per tap, as the matrix-vector
//! product's are from rows sliced once per sixteen rows.
//!
//! [`zero_uncached`], which the enclave wipes large weight buffers with, is
//! here for its non-temporal stores: each goes through an aligned reference
//! to one vector of the slice. [`prefetch_l2`] and [`prefetch_l1`] are here
//! for their prefetch instruction, a hint that reads no value.
//!
//! [`LineAligned`], the global allocator that the `mlcapsule` and
//! `mlcapsule-enclave` binaries install (and the engine's own tests, so that
//! valgrind checks it), is here for its pointer arithmetic: it hands out the
//! system's blocks shifted onto a cache line, with the system's address kept
//! in the eight bytes before each, and zeroes every block it frees.

use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::graph::Activation;
use crate::ops::{
    DirectInput, OutputRows, PhasedPlane, Sixteens, Span, TileSource, Tiling, bias_activate_body,
    bias_add_activate_body, depthwise_phased_body, depthwise_x16_body, depthwise3x3_body,
    direct_row_body, logistic_body, logistic_in_place_body, max_by_rows_body, mean_by_rows_body,
    silu_body, silu_in_place_body, winograd_input_body, winograd_output_body,
    winograd_weights_body, winograd4_input_body, winograd4_output_body, winograd4_weights_body,
};
use crate::threads::{self, for_each_chunk};

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

    /// The `rows x cols` matrix whose rows start `row_stride` apart in
    /// `data` (a block of columns of a wider row-major matrix).
    pub(crate) fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> MatRef<'a> {
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// Columns `range` of the matrix (`range.start <= range.end <= cols`),
    /// sharing the data.
    fn columns(self, range: Range<usize>) -> MatRef<'a> {
        let skip = (range.start * self.col_stride).min(self.data.len());
        MatRef {
            data: &self.data[skip..],
            cols: range.len(),
            ..self
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

    /// The `rows x cols` matrix whose rows start `row_stride` apart in
    /// `data` (a block of columns of a wider row-major matrix).
    pub(crate) fn strided(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> MatMut<'a> {
        MatMut {
            data,
            rows,
            cols,
            row_stride,
        }
    }

    /// Columns `range` of the matrix (`range.start <= range.end <= cols`).
    fn columns(&mut self, range: Range<usize>) -> MatMut<'_> {
        let skip = range.start.min(self.data.len());
        MatMut {
            data: &mut self.data[skip..],
            rows: self.rows,
            cols: range.len(),
            row_stride: self.row_stride,
        }
    }
}

/// Smallest product (in multiply-adds) worth splitting over threads.
const PARALLEL_MIN_WORK: usize = 1 << 20;

/// Most rows of A the row-dot kernel takes (larger batches go to `gemm`).
const ROW_DOT_MAX_ROWS: usize = 8;

/// Smallest row-dot product (in multiply-adds) split over threads: B of
/// 1.5 MiB at batch 1, a layer that a network reads mostly from memory, where
/// two cores stream it faster than one. ResNet-18's `512 x 1000` classifier at
/// two threads: 0.17-0.20 ms per node whole, 0.095-0.106 split (whole queries
/// 24.53 → 24.31 ms, alternated); a dense 512x512 layer, read from cache, ran
/// 10 % slower split (0.021 → 0.023 ms), so it stays whole (EPYC Zen 2).
const ROW_DOT_PARALLEL_MIN: usize = 3 << 17;

/// Columns of C one row-dot task computes.
const ROW_DOT_BLOCK: usize = 64;

/// True when [`gemm()`] splits an `m x k` by `k x n` product over threads
/// itself; callers then must not run such products in parallel tasks.
pub(crate) fn splits_itself(m: usize, k: usize, n: usize) -> bool {
    threads::threads() > 1 && m.saturating_mul(k).saturating_mul(n) >= PARALLEL_MIN_WORK
}

/// `C = alpha * A * B + beta * C`, on as many threads as the product is
/// worth (see the module header). When `beta` is 0, C's previous contents
/// are ignored (NaNs included).
///
/// # Panics
///
/// As [`sgemm`].
pub(crate) fn gemm(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) {
    product(alpha, a, b, beta, c, true);
}

/// [`gemm()`] on the calling thread only, for callers that already split
/// their work over threads.
pub(crate) fn gemm_single(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) {
    product(alpha, a, b, beta, c, false);
}

fn product(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>, threaded: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let row_dot = m <= ROW_DOT_MAX_ROWS
        && k >= 16
        && (a.col_stride == 1 || k == 1)
        && (b.row_stride == 1 || k == 1)
        && b.rows == k
        && c.rows == m
        && c.cols == n;
    if row_dot && m > 0 && n > 0 {
        row_dots(alpha, a, b, beta, c, threaded);
        return;
    }
    if threaded && splits_itself(m, k, n) {
        let parallel = gemm::Parallelism::Rayon(threads::threads());
        sgemm(alpha, a, b, beta, c, parallel);
    } else if apart(n) {
        last_columns_apart(alpha, a, b, beta, c);
    } else {
        sgemm(alpha, a, b, beta, c, gemm::Parallelism::None);
    }
}

/// Columns of a row-major C that the `gemm` crate's kernels compute at
/// once: it transposes such a product, so they are its AVX2 kernel's 16
/// rows, or one of the up to four vectors of 16 rows of its AVX-512 kernel.
const BLOCK_COLUMNS: usize = 16;

/// True when [`product`] computes the last `n % BLOCK_COLUMNS` columns of C
/// apart ([`last_columns_apart`]).
///
/// - AVX2: every partial block below [`APART_BELOW`] columns.
/// - AVX-512: a last block of one column. The kernel masks a partial vector,
///   and runs it at the cost of a full one, so a product of 49 columns (a
///   Conv on a 7x7 image) cost as much as one of 64. Apart, 48 columns go to
///   the three-vector kernel and the last one to `gemm`'s matrix-vector
///   kernel. On Zen 4, one thread, `1280 x 320` weights by 49 columns: 0.47
///   → 0.39 ms; `960 x 160`: 0.187 → 0.154; by 113 columns: 0.93 → 0.84.
///   With two to four columns left the product got 1-2 % slower (50, 51, 52
///   and 196 columns), as the last block still runs a masked vector.
fn apart(n: usize) -> bool {
    match isa() {
        Isa::Avx2 => n > BLOCK_COLUMNS && n < APART_BELOW,
        Isa::Avx512 => n > BLOCK_COLUMNS && n % BLOCK_COLUMNS == 1,
        Isa::Baseline => false,
    }
}

/// Fewest columns of C for which [`product`] leaves the last, partial
/// block of [`BLOCK_COLUMNS`] to `gemm` on AVX2: from 64 columns on,
/// computing it apart gained nothing (98 and 196 columns, EPYC Zen 2).
const APART_BELOW: usize = 64;

/// [`sgemm`] on one thread, with the last `n % BLOCK_COLUMNS` columns of C
/// computed apart, from contiguous copies of their columns of B and C.
///
/// With 49 columns (a Conv on a 7x7 image), one `gemm` call ran the whole
/// product at the pace of its last, one-column block: `960 x 160` weights
/// took 0.22 ms, where 48 columns took 0.16 and the last one alone, from
/// contiguous copies, 0.013 (left strided, the 48 and the 1 together took
/// as long as one call). Apart, the product took 0.84-0.89 of one call's time,
/// with the same sums (EPYC Zen 2; ResNet-18's `512 x 4608` by 49: 0.89-0.98).
///
/// The last columns (at most [`ROW_DOT_MAX_ROWS`] of them, from a row-major
/// A) go to the row-dot kernel, as rows of `Cᵀ = Bᵀ Aᵀ`, not to `gemm`'s
/// matrix-vector kernel, which took 15 % of that `512 x 4608` by 49 product
/// at one thread. On AVX-512 (Xeon, `bench/ab.py`, alternated): that Conv
/// alone 1.001x at one thread and 0.897x at two (4 rounds), ResNet-18 0.984x
/// and 0.981x (6 rounds), MobileNetV2 0.991x and 1.009x (4). Not measured
/// on AVX2, where up to 15 columns are left and up to 8 take this path.
///
/// On AVX-512 the one column left goes to [`matrix_vector`] instead. There the
/// row-dot kernel took 3.9 % of the samples of three Winograd Convs of 256
/// channels at 14x14 (49 tiles: each of its 16 GEMMs per block of output
/// channels has one column left), and 14.4 % of a 512-channel 3x3 Conv at 7x7
/// (`perf`, one thread); leaving the column out altogether made them 0.91x and
/// 0.84x as long, ResNet-18 0.94x. With `matrix_vector` (`bench/ab.py`, 5
/// rounds, against the row-dot kernel, Intel Xeon): the Winograd Convs 0.971x
/// at one thread and 0.974x at two, the Conv at 7x7 0.980x and 1.013x,
/// ResNet-18 0.996x and 0.980x, MobileNetV2 0.983x and 0.957x, each within a
/// spread of about ±5 %. What is left is reading A a second time: from L2 for
/// the Winograd GEMMs, from memory for the 9.4 MB of the Conv at 7x7. Cutting
/// A into blocks of 1 MiB of rows, each multiplied by both the columns and
/// the vector while in L2, made ResNet-18 1.016x as long at one thread and
/// 0.981x at two (6 rounds), and was dropped; so was handing the transposed
/// product to `gemm`, whose kernels then run along A's rows (1.44x).
fn last_columns_apart(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, mut c: MatMut<'_>) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let whole = n - n % BLOCK_COLUMNS;
    let none = gemm::Parallelism::None;
    let (b_whole, c_whole) = (b.columns(0..whole), c.columns(0..whole));
    sgemm(alpha, a, b_whole, beta, c_whole, none);
    let rest = n - whole;
    if rest == 0 {
        return;
    }
    // The copies index B and C as `sgemm` reads them; views shorter than
    // their matrices panic here as they would there. Both are transposed:
    // row `j` of `b_rest` is column `whole + j` of B, row `j` of `c_rest`
    // column `whole + j` of C.
    let mut b_rest = vec![0.0; rest * k];
    for (j, row) in b_rest.chunks_exact_mut(k.max(1)).enumerate() {
        for (l, v) in row.iter_mut().enumerate() {
            *v = b.data[l * b.row_stride + (whole + j) * b.col_stride];
        }
    }
    // One column left (on AVX-512, see `apart`): A, whose rows are contiguous,
    // times a vector.
    let mut one_column = |first: usize, dots: &[f32]| {
        for (i, &dot) in (first..).zip(dots) {
            let y = &mut c.data[i * c.row_stride + whole];
            *y = if beta == 0.0 {
                alpha * dot
            } else {
                alpha * dot + beta * *y
            };
        }
    };
    if rest == 1
        && a.col_stride == 1
        && k > 0
        && m > 0
        && matrix_vector(a, &b_rest, &mut one_column)
    {
        return;
    }
    let mut c_rest = vec![0.0; rest * m];
    if beta != 0.0 {
        for (j, row) in c_rest.chunks_exact_mut(m.max(1)).enumerate() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = c.data[i * c.row_stride + whole + j];
            }
        }
    }
    let (b_rest, c_view) = (
        MatRef::new(&b_rest, rest, k),
        MatMut::new(&mut c_rest, rest, m),
    );
    if a.col_stride == 1 && rest <= ROW_DOT_MAX_ROWS && k > 0 && m > 0 {
        // `C_restᵀ = B_restᵀ Aᵀ`: a few rows against Aᵀ, whose columns are
        // A's rows, contiguous. (`sgemm` takes empty sums and empty products.)
        row_dots(alpha, b_rest, a.t(), beta, c_view, false);
    } else {
        sgemm(alpha, b_rest, a.t(), beta, c_view, none);
    }
    for (j, row) in c_rest.chunks_exact(m.max(1)).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            c.data[i * c.row_stride + whole + j] = v;
        }
    }
}

/// The row-dot kernel: every `C[i, j]` is the dot product of row `i` of A
/// and column `j` of B, both contiguous (B is a transposed row-major
/// matrix). Each task takes [`ROW_DOT_BLOCK`] columns of B, reads them once
/// and multiplies them by every row of A while they are in cache.
fn row_dots(alpha: f32, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>, threaded: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let a_rows: Vec<&[f32]> = (0..m).map(|i| &a.data[i * a.row_stride..][..k]).collect();
    let column = |j: usize| &b.data[j * b.col_stride..][..k];
    // Products land in `dots` (column-major, m per column), then in C.
    let mut dots = vec![0.0f32; m * n];
    let from_memory = n * k * size_of::<f32>() > ROW_DOT_PREFETCH_MIN_BYTES;
    let work = m * k * n;
    let block = if threaded && threads::threads() > 1 && work >= ROW_DOT_PARALLEL_MIN {
        ROW_DOT_BLOCK * m
    } else {
        m * n
    };
    for_each_chunk(
        &mut dots,
        block,
        || (),
        |(), index, out| {
            let first = index * (block / m);
            let columns: Vec<&[f32]> = (first..first + out.len() / m).map(column).collect();
            dots_into(&a_rows, &columns, out, from_memory);
        },
    );
    for i in 0..m {
        let row = &mut c.data[i * c.row_stride..][..n];
        for (j, y) in row.iter_mut().enumerate() {
            let product = alpha * dots[j * m + i];
            *y = if beta == 0.0 {
                product
            } else {
                product + beta * *y
            };
        }
    }
}

/// Cache lines at the start of each column of B that [`dots_into`] asks for
/// ([`prefetch_l1`]) two quads of columns before it reads them, when B is
/// larger than [`ROW_DOT_PREFETCH_MIN_BYTES`]. Read from memory, each quad's
/// four columns are four short streams that the hardware prefetcher has to
/// find anew; asked for early, they start at once. MobileNetV2's `1000 x
/// 1280` classifier, whose 5 MB leave the cache between queries, in the
/// network: 0.85-0.90x its time at one thread, 0.90-1.00x at two (three
/// alternated runs); ResNet-18's `1000 x 512` 0.89x and 0.93x. In C on
/// this Zen 4, B evicted before each pass, 4 and 8 lines each gained 7-20 %
/// from run to run; prefetching whole quads ahead (`prefetcht1`) lost.
const PREFETCH_AHEAD_LINES: usize = 4;

/// Smallest B (bytes) for which [`row_dots`] prefetches (see
/// [`PREFETCH_AHEAD_LINES`]): a core's L2. Smaller ones are likely in cache,
/// where the prefetches cost time: 512x512 and 256x256 dense layers alone
/// took 1.02-1.04x as long with them.
const ROW_DOT_PREFETCH_MIN_BYTES: usize = 1 << 20;

/// Writes into `out` the dot product of every row of A (`a_rows`) with
/// every column of B (`columns`), column-major: `out[j * m + i]` for row
/// `i` and column `j`. Columns go four at a time ([`dots4`]), each result
/// bit for bit what [`dot`] gives. With `from_memory` (B is likely out of
/// cache) it asks for the first lines of the columns two quads ahead.
///
/// # Panics
///
/// When `out` is shorter than `a_rows.len() * columns.len()` (an engine bug).
pub(crate) fn dots_into(a_rows: &[&[f32]], columns: &[&[f32]], out: &mut [f32], from_memory: bool) {
    let m = a_rows.len();
    let (quads, rest) = columns.as_chunks::<4>();
    for (q, quad) in quads.iter().enumerate() {
        if from_memory {
            // The start of each column two quads on (see `PREFETCH_AHEAD_LINES`).
            for ahead in quads.get(q + 2).into_iter().flatten() {
                prefetch_l1(&ahead[..ahead.len().min(16 * PREFETCH_AHEAD_LINES)]);
            }
        }
        for (i, row) in a_rows.iter().enumerate() {
            for (t, d) in dots4(row, *quad).into_iter().enumerate() {
                out[(4 * q + t) * m + i] = d;
            }
        }
    }
    let done = 4 * quads.len();
    for (jj, column) in rest.iter().enumerate() {
        for (i, row) in a_rows.iter().enumerate() {
            out[(done + jj) * m + i] = dot(row, column);
        }
    }
}

/// Index one past the last element a nonempty `rows x cols` view with
/// these strides reaches, or `None` on overflow.
fn reach(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Option<usize> {
    (rows - 1)
        .checked_mul(row_stride)?
        .checked_add((cols - 1).checked_mul(col_stride)?)?
        .checked_add(1)
}

/// A stride as `gemm` takes it. Along a dimension of one element the
/// stride is only ever multiplied by 0, and 0 is passed.
fn stride(len: usize, stride: usize) -> isize {
    if len <= 1 {
        return 0;
    }
    // `reach` bounded `(len - 1) * stride` by a slice length, which is at
    // most `isize::MAX`.
    isize::try_from(stride).expect("stride bounded by a slice length")
}

/// One call of `gemm::gemm`: `C = alpha * A * B + beta * C`, split over
/// threads as `parallel` says. When `beta` is 0, C's previous contents are
/// ignored (NaNs included).
///
/// # Panics
///
/// When the dimensions disagree, a view does not cover its matrix, or C's
/// rows overlap. All three are engine bugs.
pub(crate) fn sgemm(
    alpha: f32,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    c: MatMut<'_>,
    parallel: gemm::Parallelism,
) {
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
    // SAFETY: `gemm::gemm` reads A (`lhs`) at offsets `i*lhs_rs + l*lhs_cs`
    // (i < m, l < k), B (`rhs`) at `l*rhs_rs + j*rhs_cs` (l < k, j < n),
    // and reads (only when `read_dst`) and writes C (`dst`) at
    // `i*dst_rs + j*dst_cs` (i < m, j < n). The asserts above bound the
    // largest offset of each by its slice's length (`stride` zeroes only
    // strides that are multiplied by index 0), so every access is in
    // bounds. C's elements are distinct (dst_cs = 1, and dst_rs >= n when
    // m > 1), as the function requires. C is borrowed mutably and A and B
    // immutably, so C aliases neither, and all three outlive the call,
    // which keeps no pointer. `gemm` computes `dst = alpha*dst +
    // beta*lhs*rhs`: its `alpha` is our `beta` and the reverse.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            1,
            stride(m, c.row_stride),
            beta != 0.0,
            a.data.as_ptr(),
            stride(k, a.col_stride),
            stride(m, a.row_stride),
            b.data.as_ptr(),
            stride(n, b.col_stride),
            stride(k, b.row_stride),
            beta,
            alpha,
            false,
            false,
            false,
            parallel,
        );
    }
}

/// The instruction sets `multiversion!` compiles for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// The target's baseline (SSE2 on x86-64): no FMA.
    Baseline,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F and VL, AVX2 and FMA.
    Avx512,
}

/// The instruction set the engine's kernels run with on this CPU (detected
/// once, at run time), as a report names it: `"AVX-512"`, `"AVX2 and FMA"` or
/// `"baseline (no FMA)"`. For benchmark reports, whose figures depend on it.
#[must_use]
pub fn instruction_set() -> &'static str {
    match isa() {
        Isa::Avx512 => "AVX-512",
        Isa::Avx2 => "AVX2 and FMA",
        Isa::Baseline => "baseline (no FMA)",
    }
}

/// 0: not detected yet; otherwise 1 + the index of an [`Isa`].
static ISA: AtomicU8 = AtomicU8::new(0);

/// The best instruction set of this CPU, detected once.
pub(crate) fn isa() -> Isa {
    const ALL: [Isa; 3] = [Isa::Baseline, Isa::Avx2, Isa::Avx512];
    match ISA.load(Ordering::Relaxed) {
        0 => {
            let found = detect();
            let index = ALL.iter().position(|&i| i == found).unwrap_or(0);
            ISA.store(index as u8 + 1, Ordering::Relaxed);
            found
        }
        n => ALL[usize::from(n - 1).min(2)],
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    if avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
        Isa::Avx512
    } else if avx2 {
        Isa::Avx2
    } else {
        Isa::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Baseline
}

/// Bytes of this CPU's last-level cache that the calling core shares, as the CPU
/// reports it (CPUID's deterministic cache parameters: leaf 4 on Intel, leaf
/// 0x8000001D on AMD); `None` where it does not say (another architecture, or a
/// hypervisor that hides them). Read once. In a virtual machine it is the cache
/// the hypervisor declares, which other guests may share: a hint for how much of
/// a query's data can stay cached, not a promise.
#[must_use]
pub fn last_level_cache() -> Option<usize> {
    static LLC: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *LLC.get_or_init(read_last_level_cache)
}

#[cfg(target_arch = "x86_64")]
fn read_last_level_cache() -> Option<usize> {
    use std::arch::x86_64::__cpuid_count;
    // Each sub-leaf describes one cache until one of type 0; the deepest level
    // that holds data (type 1, data, or 3, unified) is the last.
    let caches_in = |leaf: u32| {
        (0..16)
            .map(move |sub| __cpuid_count(leaf, sub))
            .take_while(|r| r.eax & 0x1f != 0)
            .filter(|r| matches!(r.eax & 0x1f, 1 | 3))
            .map(|r| {
                let level = (r.eax >> 5) & 0x7;
                let ways = ((r.ebx >> 22) & 0x3ff) as usize + 1;
                let partitions = ((r.ebx >> 12) & 0x3ff) as usize + 1;
                let line = (r.ebx & 0xfff) as usize + 1;
                let sets = r.ecx as usize + 1;
                (level, ways * partitions * line * sets)
            })
            .max_by_key(|&(level, _)| level)
            .map(|(_, bytes)| bytes)
    };
    let max_basic = __cpuid_count(0, 0).eax;
    let max_extended = __cpuid_count(0x8000_0000, 0).eax;
    let intel = (max_basic >= 4).then(|| caches_in(4)).flatten();
    intel.or_else(|| {
        (max_extended >= 0x8000_001d)
            .then(|| caches_in(0x8000_001d))
            .flatten()
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn read_last_level_cache() -> Option<usize> {
    None
}

/// Defines `fn $name(args)` that calls `$body::<FMA>(args)` compiled for
/// the best [`Isa`] of this CPU. `$body` must be a safe function generic
/// over `const FMA: bool`, marked `#[inline(always)]` so that it is
/// compiled inside each `#[target_feature]` copy; with `FMA` true it may
/// use `f32::mul_add`, which is then one instruction.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident;) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body::<true>($($arg),*)
                }
                match isa() {
                    // SAFETY: `isa` returns `Avx512` only when the CPU has
                    // every feature `avx512` is compiled with (detected
                    // at run time), and the function is otherwise safe.
                    Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above, for AVX2 and FMA.
                    Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    Isa::Baseline => {}
                }
            }
            $body::<false>($($arg),*)
        }
    };
}

multiversion! {
    /// `sum_i x[i] * y[i]` over the shorter length.
    pub(crate) fn dot(x: &[f32], y: &[f32]) -> f32 => dot_body;
}

multiversion! {
    /// `sum_i x[i]` (see `sum_body`).
    pub(crate) fn sum(x: &[f32]) -> f32 => sum_body;
}

multiversion! {
    /// [`dot`] of `x` with each of four vectors at once (see `dots4_body`).
    fn dots4(x: &[f32], ys: [&[f32]; 4]) -> [f32; 4] => dots4_body;
}

/// The body of a front of an AVX-512-only kernel: runs `x16::$kernel(args)`
/// and is true where the CPU has AVX-512 and `$when` holds; is false, having
/// touched nothing, elsewhere (the caller then takes its portable path).
macro_rules! on_avx512 {
    ($kernel:ident($($arg:ident),*) if $when:expr) => {{
        let run = isa() == Isa::Avx512 && $when;
        #[cfg(target_arch = "x86_64")]
        if run {
            #[allow(unsafe_code)]
            // SAFETY: `isa` returns `Avx512` only when the CPU has every feature
            // the `x16` kernels are compiled with (detected at run time), and
            // they are otherwise safe.
            unsafe {
                x16::$kernel($($arg),*)
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = ($($arg),*);
        run
    }};
}

/// One plane of a 3x3 depthwise convolution with one cell of padding, for
/// [`depthwise3x3_stride2`] and [`depthwise3x3_stride1`].
pub(crate) struct OnePlane<'a, P = &'a [f32]> {
    /// `[H, W]`.
    pub plane: P,
    /// `W`.
    pub width: usize,
    /// Row-major over the kernel.
    pub taps: &'a [f32; 9],
    pub bias: f32,
    pub activation: Activation,
}

/// Computes `p` into `out` (`[H, W]`) as [`depthwise3x3`] does at stride 1,
/// and returns true, where the CPU has AVX-512 and the plane is at most 32
/// cells wide; returns false, touching nothing, otherwise.
/// [`x16::depthwise3x3_stride1`] keeps an input row in one or two vectors,
/// loaded once for the three output rows that read it and shifted by a cell
/// each way in registers: no padded copy of the plane (the portable
/// kernel's) and no transposes (those of [`depthwise3x3_x16`]). It sums the
/// same products in the same order as the portable kernel, with zeros for
/// the padding, so the outputs are the same bits. Wider planes stay with the
/// portable kernel: a block of 16 columns at a time down the plane, three
/// loads per row and block, was 1.5 times quicker alone on 56x56 and 112x112
/// planes, but level inside MobileNetV2 on 56x56 and twice as slow on
/// 112x112 (0.29 against 0.14 ms for that node); down bands of 8 or 16 rows,
/// the next band prefetched, it was no better there, and row by row with
/// nine loads per vector (each across two cache lines) it was slower alone.
pub(crate) fn depthwise3x3_stride1(p: &OnePlane<'_>, out: &mut [f32]) -> bool {
    on_avx512!(depthwise3x3_stride1(p, out) if (1..=32).contains(&p.width))
}

/// [`depthwise3x3_stride1`] with the output written over the input plane,
/// and returns true, under the same conditions; returns false, touching
/// nothing, otherwise. Saves a second plane's worth of cache: MobileNetV2's
/// depthwise Convs read what the 1x1 Conv before them wrote, and nothing else
/// reads it after them.
pub(crate) fn depthwise3x3_stride1_in_place(p: &mut OnePlane<'_, &mut [f32]>) -> bool {
    on_avx512!(depthwise3x3_stride1_in_place(p) if (1..=32).contains(&p.width))
}

/// Computes `p` into `out` (`[OH, OW]`, `OW = out_width`) as [`depthwise3x3`]
/// does at stride 2, and returns true, where the CPU has AVX-512 or AVX2 and
/// FMA; returns false, touching nothing, where it has not.
/// [`x16::depthwise3x3_stride2`] and [`x8::depthwise3x3_stride2`] take each
/// input row's even and odd cells apart in registers, where the portable code
/// writes them to its scratch and reads them back; they sum the same products
/// in the same order, so the outputs are the same bits.
pub(crate) fn depthwise3x3_stride2(p: &OnePlane<'_>, out: &mut [f32], out_width: usize) -> bool {
    if on_avx512!(depthwise3x3_stride2(p, out, out_width) if true) {
        return true;
    }
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx2 {
        #[allow(unsafe_code)]
        // SAFETY: `isa` returns `Avx2` only when the CPU has AVX2 and FMA
        // (detected at run time), the features `x8::depthwise3x3_stride2` is
        // compiled with, and the function is otherwise safe.
        unsafe {
            x8::depthwise3x3_stride2(p, out, out_width)
        };
        return true;
    }
    false
}

/// A 1x1 Conv's tile for [`pointwise`]: its `M` output channels (as many
/// as `bias` has values), cells `columns` of each plane.
pub(crate) struct Pointwise<'a> {
    /// `[K, plane]`: the image's `K = depth` input channels.
    pub image: &'a [f32],
    /// Cells per plane, input and output.
    pub plane: usize,
    /// The tile's output channels' weights for its input channels.
    pub weights: Taps<'a>,
    /// `K`: input channels, of the image and of each row of weights.
    pub depth: usize,
    /// `M` values, one per output channel.
    pub bias: &'a [f32],
    /// `[M, plane]`, laid out like the tile's output channels: added to each
    /// sum before the activation (a residual connection fused into the Conv).
    pub residual: Option<&'a [f32]>,
    pub activation: Activation,
    pub columns: Range<usize>,
}

/// A [`Pointwise`] tile's weights: `K` values per output channel.
pub(crate) enum Taps<'a> {
    /// `[M, K]`, row-major with rows `stride` apart (`K`, or more where the
    /// tile takes only some of a Conv's input channels), only read.
    Strided { values: &'a [f32], stride: usize },
    /// One row per output channel (its first `K` values), which [`pointwise`]
    /// overwrites with zeros once it has summed that channel's last cells,
    /// while they are in cache: weights a caller hands over, which must not
    /// outlive the Conv (see `ops::conv::conv_spending`).
    Spent(Vec<&'a mut [f32]>),
}

impl Taps<'_> {
    /// Output channel `o`'s `k` weights.
    fn row(&self, o: usize, k: usize) -> &[f32] {
        match self {
            Taps::Strided { values, stride } => &values[o * stride..][..k],
            Taps::Spent(rows) => &rows[o][..k],
        }
    }

    /// Overwrites the `k` weights of output channels `outputs` with zeros,
    /// where they are spent.
    fn spend(&mut self, outputs: Range<usize>, k: usize) {
        if let Taps::Spent(rows) = self {
            for row in &mut rows[outputs] {
                row[..k].fill(0.0);
            }
        }
    }
}

/// Fewest cells of a row that [`pointwise`] takes: narrower tiles waste most
/// of its vectors of 16.
pub(crate) const POINTWISE_MIN_COLUMNS: usize = 16;

/// Computes `rows[i] = activation(bias[i] + sum_k weights[i, k] * image[k,
/// columns] + residual[i, columns])` for each output channel `i` of `p` (no
/// residual term without one), and returns true, where the CPU has AVX-512;
/// returns false, touching nothing, where it has not. `rows[i]` is channel
/// `i`'s cells `p.columns`. Each sum starts from the bias and adds the input
/// channels in order, one fused multiply-add each, then the residual; but
/// for a cell set apart ([`pointwise_sets_apart`]), whose sum adds sixteen
/// partial sums pairwise, then the bias, then the residual. `scratch` (any
/// contents) holds copies of deep products' cells.
///
/// For 1x1 Convs of few input channels (at most 64, by the caller), which
/// `gemm` multiplies well below its pace on deeper products: 16 input
/// channels are only 16 steps per block of sums, and its bias and activation
/// were a second pass over the output. [`x16::pointwise`] sums six output
/// channels by up to 64 cells in registers from the bias on, applies the
/// activation and stores each vector once. It goes through the cells by
/// panels of 1024, so that every input channel's panel stays in cache for
/// all the output channels that read it. MobileNetV2's
/// layers alone, one thread (Zen 4), `gemm` then this: 16 → 96 channels at
/// 112x112 0.56 → 0.42 ms, at 56x56 0.139 → 0.104, at 28x28 0.034 → 0.027;
/// 32 → 16 at 112x112 0.143 → 0.127; 32 → 192 at 28x28 0.117 → 0.096; at two
/// threads 16 → 96 at 112x112 0.335 → 0.285. From 96 input channels on
/// `gemm` was quicker with many outputs (96 → 576 at 14x14 0.218 against
/// 0.254, 160 → 960 at 7x7 0.152 against 0.175), and at 64 level (64 → 384
/// at 14x14). With few outputs, as in MobileNetV2's projections (96-576 in,
/// 24-96 out, most with a residual), this kernel is the quicker where the
/// caller says (`ops::conv`'s `KERNEL_DEEP_MAX_OUTPUTS`). Deep products go
/// by narrower panels, of at most 256 KiB of input each: on MobileNetV2's
/// projections at 28x28 and 56x56 (96-192 channels in) they took 0.939x the
/// time of panels of 1024 cells (alternated, one thread).
///
/// The loop over the input channels reads each weight and each row of cells
/// without a bounds check (one `assert` per block covers them): the checks
/// were a third of its instructions. A 576 → 96 projection at 14x14 alone
/// then took 0.165 ms against 0.228 at one thread, and 0.113 against 0.139 at
/// two (onnxruntime: 0.15 and 0.10); MobileNetV2 0.913x and 0.906x as long
/// (`bench/ab.py`, Intel Xeon, 5 rounds). Going through deep products by
/// slices of 64 input channels, each read by every block of output channels
/// while in L1, gained nothing more (0.98-1.0x without them).
///
/// Inside a network the output rows are rarely in cache, and 16 → 96 at
/// 112x112 writes 4.8 MB: there it took 0.61-0.66 ms, not 0.42. So each
/// block prefetches into L1 the lines the next block of cells will
/// store to: 0.52-0.53 ms inside MobileNetV2 at one thread, 0.30-0.31 at two
/// (0.34-0.48 without). Prefetching two or more blocks ahead was slower.
pub(crate) fn pointwise(
    p: &mut Pointwise<'_>,
    rows: &mut [&mut [f32]],
    scratch: &mut Vec<f32>,
) -> bool {
    on_avx512!(pointwise(p, rows, scratch) if true)
}

/// Cells of a row [`pointwise`] computes at once on AVX-512: four vectors.
const POINTWISE_SPAN: usize = 64;

/// True when [`pointwise`] sums the last of `columns` cells of a tile apart,
/// as it does a last block of [`POINTWISE_SPAN`] holding 17, 33 or 49
/// cells (a 7x7 plane's 49): each block but the last has all 64.
///
/// Where it does, `x16::pointwise_block` runs one vector per sixteen input
/// channels for the last cell, instead of a fourth vector of one used lane
/// for every input channel. On MobileNetV2's 1x1 Convs on 7x7 planes
/// (160-960 channels in, 160-1280 out), which `ops::conv` then gives this
/// kernel, against `gemm` (its 48 columns, then [`matrix_vector`] for the
/// last, then a pass for the bias and activation), per node in the network
/// (`bench/ab.py --node`, 6 rounds, Intel Xeon): the projections and the
/// last Conv 0.934x as long at one thread and 0.989x at two, the expansions
/// 0.919x and 0.963x; whole MobileNetV2 0.981x and 0.992x (8 rounds). With
/// a fourth vector instead, the 320 -> 1280 Conv took 1.09x `gemm`'s time
/// (inside the network, one thread, one profiled run).
pub(crate) fn pointwise_sets_apart(columns: usize) -> bool {
    isa() == Isa::Avx512 && columns > 0 && sets_apart((columns - 1) % POINTWISE_SPAN + 1)
}

/// True when a block of `cells` (at most [`POINTWISE_SPAN`]) has its last
/// cell summed apart: one past a whole number of vectors, more than one.
fn sets_apart(cells: usize) -> bool {
    cells > 16 && cells % 16 == 1
}

/// Hands to `out` the product of `a` (row-major: `col_stride` 1) and the vector `x`
/// (as long as a row), sixteen rows at a time (`out(i, sums)` gets the sums of
/// rows `i..i + sums.len()`), and returns true, where the CPU has AVX-512; returns
/// false, touching nothing, elsewhere.
///
/// [`x16::matrix_vector`] reads sixteen rows at once, one vector of sums each,
/// and adds each vector's lanes up once, at the end, with one transpose for the
/// sixteen. It serves [`last_columns_apart`], whose products are a GEMM's last
/// column: the row-dot kernel ([`dots_into`]) adds up each row's lanes on its
/// own, and wants its rows and its output in vectors of their own.
fn matrix_vector(a: MatRef<'_>, x: &[f32], out: &mut impl FnMut(usize, &[f32])) -> bool {
    let k = x.len();
    assert!(
        a.col_stride == 1
            && a.cols == k
            && reach(a.rows, k, a.row_stride, 1).is_some_and(|r| r <= a.data.len()),
        "a {}x{} matrix with strides {} and {} in {} values, by {k}",
        a.rows,
        a.cols,
        a.row_stride,
        a.col_stride,
        a.data.len()
    );
    on_avx512!(matrix_vector(a, x, out) if true)
}

multiversion! {
    /// Sixteen planes of a depthwise convolution of any window (see `depthwise_x16_body`).
    pub(crate) fn depthwise_x16(p: &Sixteens<'_>, sums: &mut [[f32; 16]], out_width: usize) => depthwise_x16_body;
}

multiversion! {
    /// One plane of a depthwise convolution of any window (see `depthwise_phased_body`).
    pub(crate) fn depthwise_phased(
        p: &PhasedPlane<'_>,
        wide: &mut [f32],
        out: &mut [f32],
        out_width: usize,
    ) => depthwise_phased_body;
}

multiversion! {
    /// One plane of a 3x3 depthwise convolution (see `depthwise3x3_body`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn depthwise3x3(
        plane: &[f32],
        width: usize,
        stride: usize,
        taps: &[f32],
        bias: f32,
        activation: Activation,
        out: &mut [f32],
        out_width: usize,
        scratch: &mut Vec<f32>,
    ) => depthwise3x3_body;
}

multiversion! {
    /// `data[i] = activation(data[i] + bias)` (see `bias_activate_body`).
    pub(crate) fn bias_activate(data: &mut [f32], bias: f32, activation: Activation) => bias_activate_body;
}

multiversion! {
    /// `data[i] = activation(data[i] + bias + residual[i])` (see `bias_add_activate_body`).
    pub(crate) fn bias_add_activate(
        data: &mut [f32],
        bias: f32,
        residual: &[f32],
        activation: Activation,
    ) => bias_add_activate_body;
}

multiversion! {
    /// `out[i] = logistic(x[i])` (see `ops::elementwise::logistic`).
    pub(crate) fn logistic(x: &[f32], out: &mut [f32]) => logistic_body;
}

multiversion! {
    /// `out[i] = x[i] * logistic(x[i])` (see `ops::elementwise::silu_body`).
    pub(crate) fn silu(x: &[f32], out: &mut [f32]) => silu_body;
}

multiversion! {
    /// `data[i] *= logistic(data[i])` (see `ops::elementwise::silu_in_place_body`).
    pub(crate) fn silu_in_place(data: &mut [f32]) => silu_in_place_body;
}

multiversion! {
    /// `data[i] = logistic(data[i])` (see `ops::elementwise::logistic`).
    pub(crate) fn logistic_in_place(data: &mut [f32]) => logistic_in_place_body;
}

multiversion! {
    /// One plane of an AveragePool without dilation (see `mean_by_rows_body`).
    pub(crate) fn mean_by_rows(
        plane: &[f32],
        include_pad: bool,
        rows: &[Span],
        cols: &[Span],
        line: &mut [f32],
        out: &mut [f32],
    ) => mean_by_rows_body;
}

multiversion! {
    /// One plane of a MaxPool without dilation (see `max_by_rows_body`).
    pub(crate) fn max_by_rows(
        plane: &[f32],
        geometry: [usize; 3],
        rows: &[Span],
        cols: &[Span],
        line: &mut [f32],
        wide: &mut [f32],
        out: &mut [f32],
    ) => max_by_rows_body;
}

/// Calls the AVX-512 kernel (`x16::...`, with its arguments) where the CPU
/// has AVX-512, else the portable code.
macro_rules! x16_or_portable {
    (x16::$kernel:ident($($arg:expr),* $(,)?), $portable:expr) => {{
        #[cfg(target_arch = "x86_64")]
        if isa() == Isa::Avx512 {
            #[allow(unsafe_code)]
            // SAFETY: `isa` returns `Avx512` only when the CPU has every
            // feature the `x16` kernels are compiled with (detected at run
            // time), and the kernel is otherwise safe.
            return unsafe { x16::$kernel($($arg),*) };
        }
        $portable
    }};
}

multiversion! {
    /// [`winograd_weights`] for F(2x2, 3x3) in portable code (see `winograd_weights_body`).
    fn winograd_weights_portable(w: &[f32], u: &mut [&mut [f32]]) => winograd_weights_body;
}

multiversion! {
    /// [`winograd_weights`] for F(4x4, 3x3) in portable code (see `winograd4_weights_body`).
    fn winograd4_weights_portable(w: &[f32], u: &mut [&mut [f32]]) => winograd4_weights_body;
}

/// Winograd's weight transform in `tiling` (see `winograd_weights_body` and
/// `winograd4_weights_body`, the portable code). With AVX-512,
/// [`x16::winograd_weights`] (and [`x16::winograd4_weights`]) gathers each
/// tap of sixteen kernels into a vector with one 16x16 transpose, where the
/// portable code moves the 144 values one by one (two thirds of its time,
/// `perf`); it then computes the same sums in the same order, so U is the
/// same bits.
pub(crate) fn winograd_weights(tiling: Tiling, w: &[f32], u: &mut [&mut [f32]]) {
    match tiling {
        Tiling::F2 => {
            x16_or_portable!(x16::winograd_weights(w, u), winograd_weights_portable(w, u))
        }
        Tiling::F4 => {
            x16_or_portable!(
                x16::winograd4_weights(w, u),
                winograd4_weights_portable(w, u)
            )
        }
    }
}

multiversion! {
    /// [`winograd_input`] for F(2x2, 3x3) in portable code (see `winograd_input_body`).
    fn winograd_input_portable(
        source: &TileSource<'_>,
        tile_row: usize,
        tiles: usize,
        v: &mut [f32],
        stride: usize,
        scratch: &mut Vec<f32>,
    ) => winograd_input_body;
}

multiversion! {
    /// [`winograd_input`] for F(4x4, 3x3) in portable code (see `winograd4_input_body`).
    fn winograd4_input_portable(
        source: &TileSource<'_>,
        tile_row: usize,
        tiles: usize,
        v: &mut [f32],
        stride: usize,
        scratch: &mut Vec<f32>,
    ) => winograd4_input_body;
}

/// Winograd's input transform of one tile row in `tiling` (see
/// `winograd_input_body` and `winograd4_input_body`, the portable code,
/// whose sums this computes in the same order, so V is the same bits). With
/// AVX-512, [`x16::winograd_input`] takes sixteen tiles at a time, each
/// row's cells split into even and odd ones in registers
/// ([`x16::winograd4_input`]: four ways); LLVM compiled the portable loops,
/// rows of 7-28 tiles, into scalar and four-lane code. With F(2x2, 3x3)'s
/// transforms so written, three 3x3 Convs in a row, at one and two threads
/// (Intel Xeon, `bench/ab.py`, 3 rounds): 64 channels at 56x56 4.89 → 3.93
/// ms and 2.86 → 2.29, 128 at 28x28 0.87 and 0.87 as long, 256 at 14x14
/// 0.92; ResNet-18 0.93 and 0.95 as long (5 rounds), VGG-16 0.95 and 0.93
/// (2).
pub(crate) fn winograd_input(
    tiling: Tiling,
    source: &TileSource<'_>,
    tile_row: usize,
    tiles: usize,
    v: &mut [f32],
    stride: usize,
    scratch: &mut Vec<f32>,
) {
    match tiling {
        Tiling::F2 => x16_or_portable!(
            x16::winograd_input(source, tile_row, tiles, v, stride, scratch),
            winograd_input_portable(source, tile_row, tiles, v, stride, scratch)
        ),
        Tiling::F4 => x16_or_portable!(
            x16::winograd4_input(source, tile_row, tiles, v, stride, scratch),
            winograd4_input_portable(source, tile_row, tiles, v, stride, scratch)
        ),
    }
}

multiversion! {
    /// [`winograd_output`] for F(2x2, 3x3) in portable code (see `winograd_output_body`).
    fn winograd_output_portable(
        p: &[f32],
        stride: usize,
        tiles: usize,
        out: OutputRows<'_>,
        scratch: &mut Vec<f32>,
    ) => winograd_output_body;
}

multiversion! {
    /// [`winograd_output`] for F(4x4, 3x3) in portable code (see `winograd4_output_body`).
    fn winograd4_output_portable(
        p: &[f32],
        stride: usize,
        tiles: usize,
        out: OutputRows<'_>,
        scratch: &mut Vec<f32>,
    ) => winograd4_output_body;
}

/// Winograd's output transform of one band of tile rows in `tiling` (see
/// `winograd_output_body` and `winograd4_output_body`, the portable code,
/// whose sums this computes in the same order). With AVX-512,
/// [`x16::winograd_output`] (and [`x16::winograd4_output`]) takes sixteen
/// tiles of a tile row at a time and interleaves each output row's cells in
/// registers.
pub(crate) fn winograd_output(
    tiling: Tiling,
    p: &[f32],
    stride: usize,
    tiles: usize,
    out: OutputRows<'_>,
    scratch: &mut Vec<f32>,
) {
    match tiling {
        Tiling::F2 => x16_or_portable!(
            x16::winograd_output(p, stride, tiles, out),
            winograd_output_portable(p, stride, tiles, out, scratch)
        ),
        Tiling::F4 => x16_or_portable!(
            x16::winograd4_output(p, stride, tiles, out),
            winograd4_output_portable(p, stride, tiles, out, scratch)
        ),
    }
}

/// True when F(4x4, 3x3) pays against F(2x2, 3x3) on this CPU: where its
/// transforms run as AVX-512 kernels, or as the portable code compiled for
/// AVX2. With AVX-512's kernels swapped for the portable code's AVX2 build
/// (a temporary switch; the GEMMs kept AVX-512), F(4x4, 3x3) against F(2x2,
/// 3x3), three 3x3 Convs in a row at one and two threads (Intel Xeon,
/// `bench/ab.py`, 3 rounds): 64 channels at 56x56 0.884x and 0.929x as long,
/// 128 at 28x28 0.983x and 0.867x, 256 at 56x56 0.843x and 0.792x. Without
/// AVX2, not measured: F(2x2, 3x3) only.
pub(crate) fn winograd4_pays() -> bool {
    cfg!(target_arch = "x86_64") && isa() != Isa::Baseline
}

/// Partial sums of [`dot`], [`dots4`] and [`sum`]: enough to vectorise
/// (a sum in order is one long chain of dependent additions).
const LANES: usize = 32;

/// [`dot`] with [`LANES`] partial sums.
#[inline(always)]
fn dot_body<const FMA: bool>(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let (xs, x_rest) = x[..n].as_chunks::<LANES>();
    let (ys, y_rest) = y[..n].as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (x, y) in xs.iter().zip(ys) {
        for l in 0..LANES {
            acc[l] = fmadd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    fold_lanes(acc, tail_dot::<FMA>(x_rest, y_rest))
}

/// [`sum`] with [`LANES`] partial sums.
#[inline(always)]
fn sum_body<const FMA: bool>(x: &[f32]) -> f32 {
    let (xs, rest) = x.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for x in xs {
        for l in 0..LANES {
            acc[l] += x[l];
        }
    }
    fold_lanes(acc, rest.iter().sum::<f32>())
}

/// Four [`dot_body`]s in one pass over `x`, each summed in the same order
/// as [`dot_body`] sums it (so each result is bit for bit `dot`'s): reading
/// four rows of a matrix at once keeps more memory reads in flight than
/// reading one after the other.
#[inline(always)]
fn dots4_body<const FMA: bool>(x: &[f32], ys: [&[f32]; 4]) -> [f32; 4] {
    let n = ys.iter().fold(x.len(), |n, y| n.min(y.len()));
    let (xs, x_rest) = x[..n].as_chunks::<LANES>();
    let (c0, r0) = ys[0][..n].as_chunks::<LANES>();
    let (c1, r1) = ys[1][..n].as_chunks::<LANES>();
    let (c2, r2) = ys[2][..n].as_chunks::<LANES>();
    let (c3, r3) = ys[3][..n].as_chunks::<LANES>();
    let mut a0 = [0.0f32; LANES];
    let mut a1 = [0.0f32; LANES];
    let mut a2 = [0.0f32; LANES];
    let mut a3 = [0.0f32; LANES];
    for (i, x) in xs.iter().enumerate() {
        let (y0, y1, y2, y3) = (&c0[i], &c1[i], &c2[i], &c3[i]);
        for l in 0..LANES {
            a0[l] = fmadd::<FMA>(x[l], y0[l], a0[l]);
            a1[l] = fmadd::<FMA>(x[l], y1[l], a1[l]);
            a2[l] = fmadd::<FMA>(x[l], y2[l], a2[l]);
            a3[l] = fmadd::<FMA>(x[l], y3[l], a3[l]);
        }
    }
    [
        fold_lanes(a0, tail_dot::<FMA>(x_rest, r0)),
        fold_lanes(a1, tail_dot::<FMA>(x_rest, r1)),
        fold_lanes(a2, tail_dot::<FMA>(x_rest, r2)),
        fold_lanes(a3, tail_dot::<FMA>(x_rest, r3)),
    ]
}

/// The dot product of the elements past the last whole chunk, in order.
#[inline(always)]
fn tail_dot<const FMA: bool>(x: &[f32], y: &[f32]) -> f32 {
    x.iter()
        .zip(y)
        .fold(0.0, |sum, (x, y)| fmadd::<FMA>(*x, *y, sum))
}

/// `rest` plus the partial sums `acc`, added pairwise in a fixed order
/// (the same on every CPU of one kind).
#[inline(always)]
fn fold_lanes(mut acc: [f32; LANES], rest: f32) -> f32 {
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            acc[l] += acc[l + width];
        }
    }
    acc[0] + rest
}

/// Sixteen planes of a 3x3 depthwise convolution with one cell of padding
/// on every side and the same stride (1 or 2) along both axes, for
/// [`depthwise3x3_x16`].
pub(crate) struct Sixteen<'a> {
    /// `[16, H, W]`: one plane per lane, back to back.
    pub input: &'a [f32],
    /// `W`.
    pub width: usize,
    pub stride: usize,
    /// `taps[t][l]`: tap `t` (row-major over the 3x3 kernel) of lane `l`.
    pub taps: [[f32; 16]; 9],
    /// Lane `l`'s bias.
    pub bias: [f32; 16],
    pub activation: Activation,
}

/// One output row of a block of output channels of a direct convolution (see
/// `direct_row_body`, the portable code, whose sums this computes in the same
/// order): with AVX-512, [`x16::direct_row`] keeps up to 24 vectors of sums in
/// registers; with AVX2, [`x8::direct_row`] keeps twelve, which the compiler
/// did not do for the portable loops (they ran ten times slower than im2col
/// and `gemm`).
pub(crate) fn direct_row(input: &DirectInput<'_>, oh: usize, rows: &mut [&mut [f32]]) {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        Isa::Avx512 => {
            #[allow(unsafe_code)]
            // SAFETY: `isa` returns `Avx512` only when the CPU has every
            // feature `x16::direct_row` is compiled with (detected at run
            // time), and the function is otherwise safe.
            unsafe {
                x16::direct_row(input, oh, rows)
            };
            return;
        }
        Isa::Avx2 => {
            #[allow(unsafe_code)]
            // SAFETY: `isa` returns `Avx2` only when the CPU has AVX2 and FMA
            // (detected at run time), the features `x8::direct_row` is
            // compiled with, and the function is otherwise safe.
            unsafe {
                x8::direct_row(input, oh, rows)
            };
            return;
        }
        Isa::Baseline => {}
    }
    direct_row_body::<false>(input, oh, rows);
}

/// Computes `planes` into `out` (`[16, OH, OW]`) sixteen planes to a
/// vector (two with AVX2), where the CPU has AVX-512 or AVX2 and FMA, and
/// returns true; returns false,
/// touching nothing, where it has not (the caller then takes the planes one
/// at a time). `scratch` is working memory; its contents do not matter.
///
/// The planes are transposed, 16x16 cells at a time, into a padded
/// `[H + 2, W + 2, 16]` layout; every output cell is then nine vector
/// multiply-adds at fixed offsets, whatever the stride and however narrow
/// the plane, and the cells are transposed back. Each lane sums its taps in
/// the order of the one-plane kernel ([`depthwise3x3`]) for a cell away
/// from the edges, so the two agree bit for bit wherever that kernel pads
/// rather than skips the edge taps (planes narrower than 32 cells and
/// stride 2). It pays where planes are narrow or strided: the one-plane
/// kernel's vectors then run mostly empty or wait for a deinterleave.
pub(crate) fn depthwise3x3_x16(
    planes: &Sixteen<'_>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        Isa::Avx512 => {
            #[allow(unsafe_code)]
            // SAFETY: `isa` returns `Avx512` only when the CPU has every
            // feature `x16::depthwise3x3` is compiled with, and the function
            // is otherwise safe.
            unsafe {
                x16::depthwise3x3(planes, out, scratch)
            };
            return true;
        }
        Isa::Avx2 => {
            #[allow(unsafe_code)]
            // SAFETY: as above, for AVX2 and FMA and `x8::depthwise3x3`.
            unsafe {
                x8::depthwise3x3(planes, out, scratch)
            };
            return true;
        }
        Isa::Baseline => {}
    }
    let _ = (planes, out, scratch);
    false
}

/// Evaluates `$run` with `$act` bound to `$activation` as a closure on
/// `$vector`s (made with the intrinsics named), one copy of the code per
/// activation, applied as each cell is stored. `max(0, x)` and
/// `min(max, max(min, x))` keep a NaN and a -0 as `relu` and `clip` do: the
/// instructions return their second operand when either is NaN or both are
/// zeros.
#[cfg(target_arch = "x86_64")]
macro_rules! with_vector_activation {
    ($vector:ty, $zero:ident, $splat:ident, $max:ident, $min:ident;
     $activation:expr, $act:ident => $run:expr) => {{
        let zero = $zero();
        match $activation {
            Activation::None => {
                let $act = |v: $vector| v;
                $run
            }
            Activation::Relu => {
                let $act = |v: $vector| $max(zero, v);
                $run
            }
            Activation::Clip { min, max } => {
                let (min, max) = ($splat(min), $splat(max));
                let $act = |v: $vector| $min(max, $max(min, v));
                $run
            }
        }
    }};
}

/// What the sixteen-plane kernels share whatever their instruction set: the
/// padded `[H + 2, W + 2, 16]` layout in `scratch` and the walk over its
/// cells. Every item is `#[inline(always)]`, so that each
/// `#[target_feature]` copy compiles it with its own vectors.
#[cfg(target_arch = "x86_64")]
mod interleaved {
    use super::Sixteen;

    /// The dimensions of one call.
    pub(super) struct Layout {
        pub width: usize,
        pub stride: usize,
        /// Cells per input plane.
        pub plane: usize,
        pub out_width: usize,
        /// Cells per output plane.
        pub out_plane: usize,
        /// Cells per padded row (`W + 2`).
        pub pitch: usize,
        /// Cells of the padded layout.
        pub padded: usize,
    }

    impl Layout {
        /// The layout of `p`, whose output takes `out_len` elements.
        #[inline(always)]
        pub(super) fn new(p: &Sixteen<'_>, out_len: usize) -> Layout {
            let (width, stride) = (p.width, p.stride);
            let plane = p.input.len() / 16;
            let height = plane / width;
            let out_height = (height - 1) / stride + 1;
            let out_width = (width - 1) / stride + 1;
            let out_plane = out_height * out_width;
            assert_eq!(out_len, 16 * out_plane, "sixteen output planes");
            let pitch = width + 2;
            Layout {
                width,
                stride,
                plane,
                out_width,
                out_plane,
                pitch,
                padded: (height + 2) * pitch,
            }
        }

        /// The padded input, its border zeroed, and the output cells, both
        /// carved out of `scratch`.
        #[inline(always)]
        pub(super) fn split<'s>(
            &self,
            scratch: &'s mut Vec<f32>,
        ) -> (&'s mut [[f32; 16]], &'s mut [[f32; 16]]) {
            let need = 16 * (self.padded + self.out_plane);
            if scratch.len() < need {
                scratch.resize(need, 0.0);
            }
            let (pad, cells) = scratch[..need].split_at_mut(16 * self.padded);
            let (pad, _) = pad.as_chunks_mut::<16>();
            let (cells, _) = cells.as_chunks_mut::<16>();
            // The padding: rows 0 and H + 1, columns 0 and W + 1.
            let (pitch, height) = (self.pitch, self.padded / self.pitch - 2);
            pad[..pitch].fill([0.0; 16]);
            pad[(height + 1) * pitch..].fill([0.0; 16]);
            for r in 1..=height {
                pad[r * pitch] = [0.0; 16];
                pad[r * pitch + self.width + 1] = [0.0; 16];
            }
            (pad, cells)
        }

        /// A walk over the padded layout's inner cells, row by row: where
        /// input cells 0, 1, .. of every plane go.
        #[inline(always)]
        pub(super) fn cursor(&self) -> Cursor {
            Cursor {
                row: 1,
                column: 1,
                pitch: self.pitch,
                width: self.width,
            }
        }
    }

    /// See [`Layout::cursor`].
    pub(super) struct Cursor {
        row: usize,
        column: usize,
        pitch: usize,
        width: usize,
    }

    impl Cursor {
        /// The padded index of the next input cell.
        #[inline(always)]
        pub(super) fn next(&mut self) -> usize {
            let at = self.row * self.pitch + self.column;
            self.column += 1;
            if self.column > self.width {
                (self.row, self.column) = (self.row + 1, 1);
            }
            at
        }
    }
}

/// AVX-512 code of [`depthwise3x3_x16`].
#[cfg(target_arch = "x86_64")]
mod x16 {
    use std::arch::x86_64::{
        __m512, __mmask16, _MM_HINT_T0, _mm_prefetch, _mm512_add_ps, _mm512_alignr_epi32,
        _mm512_castps_si512, _mm512_castsi512_ps, _mm512_cvtss_f32, _mm512_fmadd_ps,
        _mm512_loadu_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_max_ps,
        _mm512_min_ps, _mm512_mul_ps, _mm512_permutex2var_ps, _mm512_set1_ps, _mm512_setr_epi32,
        _mm512_setzero_ps, _mm512_shuffle_f32x4, _mm512_shuffle_ps, _mm512_sub_ps,
        _mm512_unpackhi_ps, _mm512_unpacklo_ps,
    };

    use super::interleaved::Layout;
    use std::ops::Range;

    use super::{OnePlane, Pointwise, Sixteen};
    use crate::graph::Activation;
    use crate::ops::{
        Arith, BLOCK_OUTPUTS, DirectInput, OutputRows, TileSource, clip, f4_input, f4_output,
        f4_weights, relu,
    };

    /// [`with_vector_activation`] on AVX-512 vectors.
    macro_rules! with_activation {
        ($activation:expr, $act:ident => $run:expr) => {
            with_vector_activation!(
                __m512, _mm512_setzero_ps, _mm512_set1_ps, _mm512_max_ps, _mm512_min_ps;
                $activation, $act => $run
            )
        };
    }

    /// [`super::direct_row`]: for each block of up to 64 output cells, one
    /// vector of sums per 16 cells and output channel (up to 24 vectors),
    /// each tap's cells loaded once and multiplied by the block's
    /// [`BLOCK_OUTPUTS`] weights. A block's vectors cover the cells left in
    /// the row rounded up to 16, which the input's pitch (a multiple of
    /// [`crate::ops::BLOCK_COLUMNS`], 16, past the row) holds: it reads no
    /// further than `x8`'s blocks of 16 cells do.
    ///
    /// Against `x8::direct_row` (one thread, Intel Xeon with two AVX-512 FMA
    /// units, `bench/ab.py`, 4 rounds): ResNet-18's first Conv alone (7x7,
    /// stride 2) 2.64 → 1.69 ms with blocks of up to 64 cells (1.93 with
    /// blocks of 32), VGG-16's (3x3 on 224x224) 2.72 → 1.96, MobileNetV2's
    /// (3x3, stride 2, to 32 channels) 0.38 → 0.26.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn direct_row(input: &DirectInput<'_>, oh: usize, rows: &mut [&mut [f32]]) {
        with_activation!(input.activation, act => {
            let width = rows.first().map_or(0, |r| r.len());
            // The furthest cell the block's taps read, past its first.
            let furthest = input.offsets.iter().max().copied().unwrap_or(0);
            let mut first = 0;
            while first < width {
                let vectors = (width - first).div_ceil(16).min(4);
                match vectors {
                    4 => direct_block::<4>(input, oh, first, furthest, rows, &act),
                    3 => direct_block::<3>(input, oh, first, furthest, rows, &act),
                    2 => direct_block::<2>(input, oh, first, furthest, rows, &act),
                    _ => direct_block::<1>(input, oh, first, furthest, rows, &act),
                }
                first += 16 * vectors;
            }
        })
    }

    /// The `16 * VECTORS` output cells of `rows` from `first` on (fewer at
    /// the row's end) for [`direct_row`]; `first` is a multiple of 16.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn direct_block<const VECTORS: usize>(
        input: &DirectInput<'_>,
        oh: usize,
        first: usize,
        furthest: usize,
        rows: &mut [&mut [f32]],
        act: &impl Fn(__m512) -> __m512,
    ) {
        let width = rows.first().map_or(0, |r| r.len());
        let base = oh * input.row_stride * input.pitch + first;
        // Checked once per block, as in `x8::direct_row`.
        let block = &input.planes[base..][..furthest + 16 * VECTORS];
        let mut acc: [[__m512; VECTORS]; BLOCK_OUTPUTS] =
            std::array::from_fn(|i| [_mm512_set1_ps(input.bias[i]); VECTORS]);
        for (&offset, weights) in input.offsets.iter().zip(input.taps) {
            let x: [__m512; VECTORS] = std::array::from_fn(|v| {
                #[allow(unsafe_code)]
                // SAFETY: `offset + 16 * v + 16 <= furthest + 16 * VECTORS`,
                // `block`'s length, so the load reads sixteen elements of `block`.
                unsafe {
                    _mm512_loadu_ps(block.as_ptr().add(offset + 16 * v))
                }
            });
            for (sums, &w) in acc.iter_mut().zip(weights) {
                let w = _mm512_set1_ps(w);
                for (sum, &x) in sums.iter_mut().zip(&x) {
                    *sum = _mm512_fmadd_ps(w, x, *sum);
                }
            }
        }
        let end = (first + 16 * VECTORS).min(width);
        for (row, sums) in rows.iter_mut().zip(&acc) {
            for (v, &sum) in sums.iter().enumerate() {
                let from = first + 16 * v;
                if from < end {
                    store(&mut row[from..(from + 16).min(end)], act(sum));
                }
            }
        }
    }

    /// [`super::winograd_input`]: the four input rows copied with their
    /// padding (and zeros up to what the last block of sixteen tiles
    /// reads), then per block B^T over the rows' raw cells, a split of each
    /// combined row into even and odd cells (two cells right for the tiles'
    /// third and fourth columns), and B over those.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn winograd_input(
        source: &TileSource<'_>,
        tile_row: usize,
        tiles: usize,
        v: &mut [f32],
        stride: usize,
        scratch: &mut Vec<f32>,
    ) {
        // Padded columns 0..2 tiles + 2 hold the tiles' input; the last
        // block's loads reach column 32 blocks + 2.
        let pitch = 32 * tiles.div_ceil(16) + 2;
        if scratch.len() < 4 * pitch {
            scratch.resize(4 * pitch, 0.0);
        }
        let padded = &mut scratch[..4 * pitch];
        source.pad_rows(2 * tile_row, 4, padded);
        let padded = &*padded;
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        for first in (0..tiles).step_by(16) {
            let n = (tiles - first).min(16);
            // Row i's cells 2 first .. 2 first + 32, then the same two cells right.
            let d: [[__m512; 4]; 4] = std::array::from_fn(|i| {
                let cells = &padded[i * pitch + 2 * first..][..34];
                [
                    load(&cells[..16]),
                    load(&cells[16..32]),
                    load(&cells[2..18]),
                    load(&cells[18..34]),
                ]
            });
            // B^T d, as the portable code's four combined rows.
            let combined: [[__m512; 4]; 4] = [
                std::array::from_fn(|q| _mm512_sub_ps(d[0][q], d[2][q])),
                std::array::from_fn(|q| _mm512_add_ps(d[1][q], d[2][q])),
                std::array::from_fn(|q| _mm512_sub_ps(d[2][q], d[1][q])),
                std::array::from_fn(|q| _mm512_sub_ps(d[1][q], d[3][q])),
            ];
            for (i, [lo, hi, lo2, hi2]) in combined.into_iter().enumerate() {
                // Tile t's columns: even[t], odd[t], even[t + 1], odd[t + 1].
                let (e, o) = (
                    _mm512_permutex2var_ps(lo, evens, hi),
                    _mm512_permutex2var_ps(lo, odds, hi),
                );
                let (e2, o2) = (
                    _mm512_permutex2var_ps(lo2, evens, hi2),
                    _mm512_permutex2var_ps(lo2, odds, hi2),
                );
                let outs = [
                    _mm512_sub_ps(e, e2),
                    _mm512_add_ps(o, e2),
                    _mm512_sub_ps(e2, o),
                    _mm512_sub_ps(o, o2),
                ];
                for (j, x) in outs.into_iter().enumerate() {
                    store(&mut v[(4 * i + j) * stride + first..][..n], x);
                }
            }
        }
    }

    /// [`super::winograd_output`]: per tile row of the band and block of
    /// sixteen tiles, A^T over the block's sixteen products, then for each
    /// of its two output rows A over those and the two cells of every tile
    /// interleaved into a row of 32; the bias, residual and activation then
    /// go over the band's rows as in the portable code.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn winograd_output(p: &[f32], stride: usize, tiles: usize, out: OutputRows<'_>) {
        let width = out.width;
        let row_tiles = width.div_ceil(2);
        let products: [&[f32]; 16] = std::array::from_fn(|xi| &p[xi * stride..][..tiles]);
        for (tile_row, rows) in out.rows.chunks_mut(2 * width).enumerate() {
            let at = tile_row * row_tiles;
            for first in (0..row_tiles).step_by(16) {
                let n = (row_tiles - first).min(16);
                let m: [__m512; 16] =
                    std::array::from_fn(|xi| load(&products[xi][at + first..][..n]));
                for (a, row) in rows.chunks_mut(width).enumerate() {
                    // A^T M, row a: columns j of the block's tiles.
                    let s: [__m512; 4] = std::array::from_fn(|j| match a {
                        0 => _mm512_add_ps(_mm512_add_ps(m[j], m[4 + j]), m[8 + j]),
                        _ => _mm512_sub_ps(_mm512_sub_ps(m[4 + j], m[8 + j]), m[12 + j]),
                    });
                    // (A^T M) A: cells 2t and 2t + 1 of the row.
                    let left = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]);
                    let right = _mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]);
                    let cells = &mut row[2 * first..];
                    let count = cells.len().min(32);
                    let (a, b) = cells[..count].split_at_mut(count.min(16));
                    let [first_half, second_half] = zip(left, right);
                    store(a, first_half);
                    store(b, second_half);
                }
            }
        }
        out.finish::<true>();
    }

    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn depthwise3x3(planes: &Sixteen<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
        // One copy of the loops per activation, applied as each cell is stored.
        match planes.activation {
            Activation::None => run(planes, out, scratch, |v| v),
            Activation::Relu => run(planes, out, scratch, relu),
            Activation::Clip { min, max } => run(planes, out, scratch, |v| clip(v, min, max)),
        }
    }

    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn run(p: &Sixteen<'_>, out: &mut [f32], scratch: &mut Vec<f32>, act: impl Fn(f32) -> f32) {
        let layout = Layout::new(p, out.len());
        let (plane, out_plane) = (layout.plane, layout.out_plane);
        let (pad, cells) = layout.split(scratch);
        // In: sixteen cells of every plane at a time, flat across rows.
        let mut cursor = layout.cursor();
        for first in (0..plane).step_by(16) {
            let n = (plane - first).min(16);
            let mut rows = [_mm512_setzero_ps(); 16];
            for (lane, v) in rows.iter_mut().enumerate() {
                *v = load(&p.input[lane * plane + first..][..n]);
            }
            // A loop of constant length, unrolled, keeps the cells in registers.
            for (j, v) in transpose(rows).into_iter().enumerate() {
                if j < n {
                    store(&mut pad[cursor.next()], v);
                }
            }
        }
        let (pitch, stride) = (layout.pitch, layout.stride);
        let [w0, w1, w2, w3, w4, w5, w6, w7, w8] = &p.taps;
        for (y, out_row) in cells.chunks_exact_mut(layout.out_width).enumerate() {
            let row = |ki: usize| &pad[(y * stride + ki) * pitch..][..pitch];
            let (r0, r1, r2) = (row(0), row(1), row(2));
            for (x, cell) in out_row.iter_mut().enumerate() {
                let at = x * stride;
                let (s0, s1, s2) = (&r0[at], &r0[at + 1], &r0[at + 2]);
                let (s3, s4, s5) = (&r1[at], &r1[at + 1], &r1[at + 2]);
                let (s6, s7, s8) = (&r2[at], &r2[at + 1], &r2[at + 2]);
                for l in 0..16 {
                    let top =
                        w2[l].mul_add(s2[l], w1[l].mul_add(s1[l], w0[l].mul_add(s0[l], p.bias[l])));
                    let mid = w5[l].mul_add(s5[l], w4[l].mul_add(s4[l], w3[l] * s3[l]));
                    let bottom = w8[l].mul_add(s8[l], w7[l].mul_add(s7[l], w6[l] * s6[l]));
                    cell[l] = act(top + mid + bottom);
                }
            }
        }
        // Out: sixteen cells of every plane at a time.
        for first in (0..out_plane).step_by(16) {
            let n = (out_plane - first).min(16);
            let mut rows = [_mm512_setzero_ps(); 16];
            for (v, cell) in rows.iter_mut().zip(&cells[first..first + n]) {
                *v = load(cell);
            }
            for (lane, v) in transpose(rows).into_iter().enumerate() {
                store(&mut out[lane * out_plane + first..][..n], v);
            }
        }
    }

    /// [`super::depthwise3x3_stride2`]: [`super::depthwise3x3`] at stride 2 into
    /// `out` (`[OH, OW]`, `OW = out_width`). Output cell `j` reads input cells
    /// `2j - 1`, `2j` and `2j + 1` of three input rows: two loads of 32 cells
    /// and two permutes give every `2j` and every `2j + 1`, and a shift by one
    /// lane (the cell before the block in front) every `2j - 1`. Rows of
    /// at most 32 outputs go row by row ([`stride2_rows`]), wider ones in
    /// strips of sixteen output cells ([`stride2_strips`]). The sums are the portable
    /// kernel's, in its order, with zeros in the padding (masked loads past
    /// the row's end, zero vectors for the rows above and below the plane).
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn depthwise3x3_stride2(p: &OnePlane<'_>, out: &mut [f32], out_width: usize) {
        with_activation!(p.activation, act => match out_width.div_ceil(16) {
            0 | 1 => stride2_rows::<1>(p, out, out_width, act),
            2 => stride2_rows::<2>(p, out, out_width, act),
            _ => stride2_strips(p, out, out_width, act),
        })
    }

    /// Stride 2 into rows of at most `16 V` cells, row by row: each input row
    /// is taken apart into `V` vectors of each kind of cell once, and the odd
    /// input rows serve the two output rows that read them. MobileNetV2's
    /// layers alone, one thread (Zen 4): 144 planes into 28x28 0.112 → 0.050
    /// ms and 192 into 14x14 0.041 → 0.026 against a kernel that took three
    /// input rows apart for every output row, and the sixteen-plane kernel;
    /// into 56x56 (four vectors) it was level with that kernel, and into 7x7
    /// (576 planes) 0.051 against the sixteen-plane kernel's 0.038.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn stride2_rows<const V: usize>(
        p: &OnePlane<'_>,
        out: &mut [f32],
        out_width: usize,
        act: impl Fn(__m512) -> __m512,
    ) {
        let width = p.width;
        let zero = _mm512_setzero_ps();
        let taps = p.taps.map(|t| _mm512_set1_ps(t));
        let bias = _mm512_set1_ps(p.bias);
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        // Input row `r`'s cells `2j - 1`, `2j` and `2j + 1` for each block of 16
        // outputs `j`, or zeros below the plane.
        let cells = |r: usize| -> [[__m512; 3]; V] {
            let Some(row) = p.plane.get(r * width..(r + 1) * width) else {
                return [[zero; 3]; V];
            };
            let part = |from: usize| load(&row[from.min(width)..(from + 16).min(width)]);
            let pairs: [(__m512, __m512); V] = std::array::from_fn(|v| {
                let (lo, hi) = (part(32 * v), part(32 * v + 16));
                (
                    _mm512_permutex2var_ps(lo, evens, hi),
                    _mm512_permutex2var_ps(lo, odds, hi),
                )
            });
            std::array::from_fn(|v| {
                let (m, r) = pairs[v];
                let before = if v == 0 { zero } else { pairs[v - 1].1 };
                [after(before, r), m, r]
            })
        };
        // Output row `oh` reads input rows `2 oh - 1`, `2 oh` and `2 oh + 1`.
        let mut top = [[zero; 3]; V];
        for (oh, out_row) in out.chunks_exact_mut(out_width).enumerate() {
            let (here, below) = (cells(2 * oh), cells(2 * oh + 1));
            for v in 0..V {
                let sums = act(nine_taps(&taps, bias, [top[v], here[v], below[v]]));
                let cells = (16 * v).min(out_width)..(16 * v + 16).min(out_width);
                store(&mut out_row[cells], sums);
            }
            top = below;
        }
    }

    /// Most strips of 16 output cells that [`stride2_strips`] takes down the
    /// plane at once (wider rows go in bands of this many): their cells of
    /// the last odd input row stay on the stack, not on the heap (a `Vec` of
    /// them made MobileNetV2's 96 planes into 56x56 1.6x as slow).
    const STRIPS: usize = 16;

    /// Stride 2 into rows of more than 32 cells, sixteen output cells (a
    /// strip) at a time: each input row is taken apart once, and the odd input
    /// rows serve the two output rows that read them, as in [`stride2_rows`],
    /// with each strip's odd row kept for the next output row. A strip's
    /// cells `2j - 1` are its odd cells shifted by a lane, the cell before the
    /// strip coming in (one scalar load), and strips whose 32 input cells are
    /// all inside the row load them without masks. Against a kernel that took
    /// three input rows apart afresh for each output row, with a masked load
    /// for every 16 cells, MobileNetV2's 96 planes 112x112 into 56x56 (one
    /// thread, Zen 4): alone 0.238 → 0.150-0.164 ms, inside the network 0.258
    /// → 0.233 (6 alternated rounds), where their input comes from memory.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn stride2_strips(
        p: &OnePlane<'_>,
        out: &mut [f32],
        out_width: usize,
        act: impl Fn(__m512) -> __m512,
    ) {
        let width = p.width;
        let zero = _mm512_setzero_ps();
        let taps = p.taps.map(|t| _mm512_set1_ps(t));
        let bias = _mm512_set1_ps(p.bias);
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        // Input row `row`'s cells `2j - 1`, `2j` and `2j + 1` for the strip of
        // outputs `j` from `first`.
        let cells = |row: &[f32], first: usize| -> [__m512; 3] {
            let at = 2 * first;
            let (lo, hi) = match row.get(at..at + 32) {
                Some(both) => (load(&both[..16]), load(&both[16..])),
                None => {
                    let part = |from: usize| load(&row[from.min(width)..(from + 16).min(width)]);
                    (part(at), part(at + 16))
                }
            };
            let m = _mm512_permutex2var_ps(lo, evens, hi);
            let r = _mm512_permutex2var_ps(lo, odds, hi);
            let before = match at.checked_sub(1) {
                Some(left) => _mm512_set1_ps(row[left]),
                None => zero,
            };
            [after(before, r), m, r]
        };
        for band in (0..out_width).step_by(16 * STRIPS) {
            let strips = (out_width - band).div_ceil(16).min(STRIPS);
            // Per strip, input row `2 oh - 1`'s cells for output row `oh`: the
            // padding's zeros for the first.
            let mut top = [[zero; 3]; STRIPS];
            for (oh, out_row) in out.chunks_exact_mut(out_width).enumerate() {
                let row = |r: usize| p.plane.get(r * width..(r + 1) * width);
                let (here, below) = (row(2 * oh), row(2 * oh + 1));
                for (strip, top) in top.iter_mut().enumerate().take(strips) {
                    let first = band + 16 * strip;
                    let here = here.map_or([zero; 3], |row| cells(row, first));
                    let below = below.map_or([zero; 3], |row| cells(row, first));
                    let sums = act(nine_taps(&taps, bias, [*top, here, below]));
                    store(&mut out_row[first..(first + 16).min(out_width)], sums);
                    *top = below;
                }
            }
        }
    }

    /// [`super::depthwise3x3_stride1`]: `p`'s plane (at most 32 cells wide)
    /// into `out` (`[H, W]`) at stride 1, row by row. Input row `r` is `V`
    /// vectors `m` of 16 cells, zero past the row; `l` (every `j - 1`) and `r`
    /// (every `j + 1`) are them shifted by a lane, the neighbouring vector's
    /// cell or a zero coming in. Three rows are held at once, each loaded
    /// once for the three output rows that read it; rows above and below the
    /// plane are zero vectors.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn depthwise3x3_stride1(p: &OnePlane<'_>, out: &mut [f32]) {
        let mut rows = Rows::Apart(p.plane, out);
        with_activation!(p.activation, act => if p.width > 16 {
            stride1_with::<2>(p.width, p.taps, p.bias, &mut rows, act);
        } else {
            stride1_with::<1>(p.width, p.taps, p.bias, &mut rows, act);
        })
    }

    /// [`super::depthwise3x3_stride1_in_place`]: as [`depthwise3x3_stride1`],
    /// each output row written over its input row.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn depthwise3x3_stride1_in_place(p: &mut OnePlane<'_, &mut [f32]>) {
        let mut rows = Rows::InPlace(&mut *p.plane);
        with_activation!(p.activation, act => if p.width > 16 {
            stride1_with::<2>(p.width, p.taps, p.bias, &mut rows, act);
        } else {
            stride1_with::<1>(p.width, p.taps, p.bias, &mut rows, act);
        })
    }

    /// Where [`stride1_with`] reads input rows and writes output rows.
    enum Rows<'a> {
        /// From a plane into another.
        Apart(&'a [f32], &'a mut [f32]),
        /// Each output row over its input row.
        InPlace(&'a mut [f32]),
    }

    impl Rows<'_> {
        /// Input row `r`, `width` long, or `None` below the plane.
        fn input(&self, r: usize, width: usize) -> Option<&[f32]> {
            let plane = match self {
                Rows::Apart(plane, _) => plane,
                Rows::InPlace(plane) => &**plane,
            };
            plane.get(r * width..(r + 1) * width)
        }

        /// The output plane.
        fn output(&mut self) -> &mut [f32] {
            match self {
                Rows::Apart(_, out) => out,
                Rows::InPlace(plane) => plane,
            }
        }
    }

    /// The rows of a plane `width` cells wide convolved with `taps`, plus
    /// `bias`, from and into `rows`, `V` vectors to a row. Input row `r + 1`
    /// is loaded before output row `r` is stored, and no input row above it
    /// is read after that: so the output may overwrite the input.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    fn stride1_with<const V: usize>(
        width: usize,
        taps: &[f32; 9],
        bias: f32,
        rows: &mut Rows<'_>,
        act: impl Fn(__m512) -> __m512,
    ) {
        let zero = _mm512_setzero_ps();
        let taps = taps.map(|t| _mm512_set1_ps(t));
        let bias = _mm512_set1_ps(bias);
        // A row's cells `j - 1`, `j` and `j + 1` of each block, or zeros.
        let cells = |row: Option<&[f32]>| -> [[__m512; 3]; V] {
            let Some(row) = row else {
                return [[zero; 3]; V];
            };
            let m: [__m512; V] =
                std::array::from_fn(|v| load(&row[(16 * v).min(width)..(16 * v + 16).min(width)]));
            std::array::from_fn(|v| {
                let left = if v == 0 { zero } else { m[v - 1] };
                let right = if v + 1 == V { zero } else { m[v + 1] };
                [after(left, m[v]), m[v], before(m[v], right)]
            })
        };
        let mut above = [[zero; 3]; V];
        let mut here = cells(rows.input(0, width));
        for r in 0..rows.output().len() / width {
            let below = cells(rows.input(r + 1, width));
            let out_row = &mut rows.output()[r * width..][..width];
            for v in 0..V {
                let sums = act(nine_taps(&taps, bias, [above[v], here[v], below[v]]));
                let cells = (16 * v).min(width)..(16 * v + 16).min(width);
                store(&mut out_row[cells], sums);
            }
            (above, here) = (here, below);
        }
    }

    /// Steps of sixteen kernels ahead of the one it transforms that
    /// [`winograd_weights`] asks the CPU to load (`prefetcht0`): `perf
    /// annotate` put a third of its time on the loads of the kernels, which come
    /// from beyond L2 (9.4 MB for 512 channels). Three 512-channel 3x3 Convs at
    /// 14x14 in a row took 0.951x as long at one thread and 0.967x at two
    /// (`bench/ab.py`, 3 rounds); ResNet-18 0.973x and 0.990x (6 rounds), VGG-16
    /// 0.978x and 0.975x. Eight steps ahead read 1.01-1.02x against four.
    const WEIGHTS_AHEAD: usize = 4;

    /// Kernels `first..first + n` (`n` at most 16) of `w` (nine taps each)
    /// as `taps[k]`: tap `k` of each kernel in its lane (zero past `n`);
    /// and a request for the kernels [`WEIGHTS_AHEAD`] steps on.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn taps_of_sixteen(w: &[f32], first: usize, n: usize) -> [__m512; 16] {
        // The kernels WEIGHTS_AHEAD steps on, nine cache lines: a hint,
        // which reads no value and never faults, past the end too.
        let ahead = w.as_ptr().wrapping_add((first + 16 * WEIGHTS_AHEAD) * 9);
        for line in 0..9 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(16 * line).cast());
        }
        let mut rows = [_mm512_setzero_ps(); 16];
        for (row, kernel) in rows
            .iter_mut()
            .zip(w[first * 9..(first + n) * 9].chunks_exact(9))
        {
            *row = load(kernel);
        }
        transpose(rows)
    }

    /// [`super::winograd_weights`]: sixteen kernels at a time, each loaded
    /// whole (nine lanes), transposed so that each tap is one vector over the
    /// kernels, then `G g G^T` as `winograd_weights_body` computes it.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn winograd_weights(w: &[f32], u: &mut [&mut [f32]]) {
        let pairs = w.len() / 9;
        let half = _mm512_set1_ps(0.5);
        // The rows and columns of G: a, (a + b + c) / 2, (a - b + c) / 2, c.
        let g = |a: __m512, b: __m512, c: __m512| {
            [
                a,
                _mm512_mul_ps(half, _mm512_add_ps(_mm512_add_ps(a, b), c)),
                _mm512_mul_ps(half, _mm512_add_ps(_mm512_sub_ps(a, b), c)),
                c,
            ]
        };
        for first in (0..pairs).step_by(16) {
            let n = (pairs - first).min(16);
            let taps = taps_of_sixteen(w, first, n);
            // G g: four rows of three.
            let gg: [[__m512; 4]; 3] =
                std::array::from_fn(|j| g(taps[j], taps[3 + j], taps[6 + j]));
            for r in 0..4 {
                let out = g(gg[0][r], gg[1][r], gg[2][r]);
                for (j, &values) in out.iter().enumerate() {
                    store(&mut u[4 * r + j][first..first + n], values);
                }
            }
        }
    }

    /// The AVX-512 [`Arith`] of F(4x4, 3x3)'s transforms.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn vector_arith() -> impl Arith<__m512> {
        (
            |a: __m512, b: __m512| _mm512_add_ps(a, b),
            |a: __m512, b: __m512| _mm512_sub_ps(a, b),
            |k: f32, a: __m512| _mm512_mul_ps(_mm512_set1_ps(k), a),
        )
    }

    /// [`super::winograd_weights`] for F(4x4, 3x3): sixteen kernels at a time, transposed
    /// as in [`winograd_weights`], then `G g G^T` as
    /// `winograd4_weights_body` computes it.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn winograd4_weights(w: &[f32], u: &mut [&mut [f32]]) {
        let ops = vector_arith();
        let pairs = w.len() / 9;
        for first in (0..pairs).step_by(16) {
            let n = (pairs - first).min(16);
            let taps = taps_of_sixteen(w, first, n);
            let columns: [[__m512; 6]; 3] =
                std::array::from_fn(|j| f4_weights(&ops, [taps[j], taps[3 + j], taps[6 + j]]));
            for r in 0..6 {
                let row = f4_weights(&ops, [columns[0][r], columns[1][r], columns[2][r]]);
                for (j, values) in row.into_iter().enumerate() {
                    store(&mut u[6 * r + j][first..first + n], values);
                }
            }
        }
    }

    /// [`super::winograd_input`] for F(4x4, 3x3): the six input rows copied with their
    /// padding (and zeros up to what the last block of sixteen tiles
    /// reads), then per block B^T over the rows' raw cells (five vectors
    /// each), a split of each combined row's cells by their column modulo
    /// four (two permutes deep) and the first two of those shifted by a
    /// tile for the tiles' last two columns, and B over those.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn winograd4_input(
        source: &TileSource<'_>,
        tile_row: usize,
        tiles: usize,
        v: &mut [f32],
        stride: usize,
        scratch: &mut Vec<f32>,
    ) {
        let ops = vector_arith();
        // Padded columns 0..4 tiles + 2 hold the tiles' input; the last
        // block's loads reach column 64 blocks + 16.
        let pitch = 64 * tiles.div_ceil(16) + 16;
        if scratch.len() < 6 * pitch {
            scratch.resize(6 * pitch, 0.0);
        }
        let padded = &mut scratch[..6 * pitch];
        source.pad_rows(4 * tile_row, 6, padded);
        let padded = &*padded;
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        // A tile on: lanes 1..16, then the next block's first (or second) cell.
        let next0 = _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);
        let next1 = _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17);
        for first in (0..tiles).step_by(16) {
            let n = (tiles - first).min(16);
            // Row i's cells 4 first .. 4 first + 80, five vectors.
            let d: [[__m512; 5]; 6] = std::array::from_fn(|i| {
                let cells = &padded[i * pitch + 4 * first..][..80];
                std::array::from_fn(|q| load(&cells[16 * q..16 * q + 16]))
            });
            // B^T d, vector by vector: combined[q][i], row i of vector q.
            let combined: [[__m512; 6]; 5] =
                std::array::from_fn(|q| f4_input(&ops, std::array::from_fn(|i| d[i][q])));
            for i in 0..6 {
                let c: [__m512; 5] = std::array::from_fn(|q| combined[q][i]);
                let (e01, o01) = (
                    _mm512_permutex2var_ps(c[0], evens, c[1]),
                    _mm512_permutex2var_ps(c[0], odds, c[1]),
                );
                let (e23, o23) = (
                    _mm512_permutex2var_ps(c[2], evens, c[3]),
                    _mm512_permutex2var_ps(c[2], odds, c[3]),
                );
                // phase[k][t]: cell 4t + k of the combined row.
                let phase0 = _mm512_permutex2var_ps(e01, evens, e23);
                let phase1 = _mm512_permutex2var_ps(o01, evens, o23);
                let z = [
                    phase0,
                    phase1,
                    _mm512_permutex2var_ps(e01, odds, e23),
                    _mm512_permutex2var_ps(o01, odds, o23),
                    _mm512_permutex2var_ps(phase0, next0, c[4]),
                    _mm512_permutex2var_ps(phase1, next1, c[4]),
                ];
                for (j, x) in f4_input(&ops, z).into_iter().enumerate() {
                    store(&mut v[(6 * i + j) * stride + first..][..n], x);
                }
            }
        }
    }

    /// [`super::winograd_output`] for F(4x4, 3x3): per tile row of the band and block of
    /// sixteen tiles, A^T over the block's 36 products, then for each of
    /// its four output rows A over those and the four cells of every tile
    /// interleaved (two permutes deep) into a row of 64; the bias, residual
    /// and activation then go over the band's rows as in the portable code.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn winograd4_output(p: &[f32], stride: usize, tiles: usize, out: OutputRows<'_>) {
        let ops = vector_arith();
        let width = out.width;
        let row_tiles = width.div_ceil(4);
        let products: [&[f32]; 36] = std::array::from_fn(|xi| &p[xi * stride..][..tiles]);
        for (tile_row, rows) in out.rows.chunks_mut(4 * width).enumerate() {
            let at = tile_row * row_tiles;
            for first in (0..row_tiles).step_by(16) {
                let n = (row_tiles - first).min(16);
                let m: [__m512; 36] =
                    std::array::from_fn(|xi| load(&products[xi][at + first..][..n]));
                // A^T M: s[j][a], row a of column j.
                let s: [[__m512; 4]; 6] =
                    std::array::from_fn(|j| f4_output(&ops, std::array::from_fn(|i| m[6 * i + j])));
                for (a, row) in rows.chunks_mut(width).enumerate() {
                    // (A^T M) A: cell 4t + b of the row in o[b].
                    let o = f4_output(&ops, std::array::from_fn(|j| s[j][a]));
                    let [x02, y02] = zip(o[0], o[2]);
                    let [x13, y13] = zip(o[1], o[3]);
                    let [c0, c1] = zip(x02, x13);
                    let [c2, c3] = zip(y02, y13);
                    let cells = [c0, c1, c2, c3];
                    let span = &mut row[4 * first..];
                    let count = span.len().min(64);
                    for (chunk, x) in span[..count].chunks_mut(16).zip(cells) {
                        store(chunk, x);
                    }
                }
            }
        }
        out.finish::<true>();
    }

    /// Output channels [`pointwise`] sums at once: six vectors of sums per
    /// vector of cells, with four vectors of cells 24 sums, the four cells and
    /// a weight in 29 of the 32 registers.
    const POINTWISE_CHANNELS: usize = 6;

    /// Deepest product with a cell set apart ([`super::pointwise_sets_apart`])
    /// whose cells [`pointwise`] reads in place. Deeper, it first copies each
    /// panel's rows of cells (but the one apart) into its scratch, each row a
    /// whole number of vectors long: every block of output channels reads
    /// them, and a row of a 7x7 plane, 196 bytes on from the last, has most
    /// of its vectors straddle two lines. Inside MobileNetV2, against reading
    /// in place (`bench/ab.py --node`, 6 rounds): its 7x7 projections and last
    /// Conv 0.930x as long at one thread and 0.984x at two, the expansions
    /// 0.979x and 1.004x. Its projections at 14x14 (no cell apart, panels of
    /// 64 cells) took 1.061x and 1.033x as long copied, and are not.
    const POINTWISE_PACK_MIN_DEPTH: usize = 64;

    /// The cells [`pointwise_block`] reads: input channel `k`'s cell `c` at
    /// `values[k * pitch + c - first]`, the image itself or a panel of it.
    struct Cells<'a> {
        values: &'a [f32],
        pitch: usize,
        first: usize,
    }

    /// Vectors of cells [`pointwise`] sums at once.
    const POINTWISE_VECTORS: usize = super::POINTWISE_SPAN / 16;

    /// Cells of each row [`pointwise`] computes for one block of output
    /// channels before it moves to the next.
    const POINTWISE_PANEL: usize = 1024;

    /// Most input values of one panel (256 KiB): deeper products take
    /// narrower panels.
    const POINTWISE_PANEL_FLOATS: usize = 1 << 16;

    /// [`super::pointwise`]: blocks of [`POINTWISE_VECTORS`] vectors of cells,
    /// and in each, blocks of [`POINTWISE_CHANNELS`] output channels (fewer
    /// for the last), each summed over the whole depth in registers.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn pointwise(
        p: &mut Pointwise<'_>,
        rows: &mut [&mut [f32]],
        scratch: &mut Vec<f32>,
    ) {
        with_activation!(p.activation, act => {
            let span = 16 * POINTWISE_VECTORS;
            let (start, end) = (p.columns.start, p.columns.end);
            let panel = (POINTWISE_PANEL_FLOATS / p.depth.max(1) / span * span)
                .clamp(span, POINTWISE_PANEL);
            for panel_first in (start..end).step_by(panel) {
                let panel_end = (panel_first + panel).min(end);
                // A last block of `16 V + 1` cells (49 on a 7x7 plane) takes
                // its last cell apart (see `pointwise_block`), reading that
                // cell's input values from one gathered column.
                let last_block = (panel_end - panel_first - 1) % span + 1;
                let column: Vec<f32> = if super::sets_apart(last_block) {
                    (0..p.depth).map(|k| p.image[k * p.plane + panel_end - 1]).collect()
                } else {
                    Vec::new()
                };
                let cells = if p.depth > POINTWISE_PACK_MIN_DEPTH && !column.is_empty() {
                    // Each vector of cells then loads one whole line.
                    let width = panel_end - panel_first - 1;
                    let pitch = width.next_multiple_of(16);
                    if scratch.len() < p.depth * pitch {
                        scratch.resize(p.depth * pitch, 0.0);
                    }
                    let rows = scratch.chunks_exact_mut(pitch).take(p.depth);
                    for (k, row) in rows.enumerate() {
                        row[..width].copy_from_slice(&p.image[k * p.plane + panel_first..][..width]);
                    }
                    Cells { values: &scratch[..p.depth * pitch], pitch, first: panel_first }
                } else {
                    Cells { values: p.image, pitch: p.plane, first: 0 }
                };
                for at in (0..rows.len()).step_by(POINTWISE_CHANNELS) {
                    for first in (panel_first..panel_end).step_by(span) {
                        let block = first..(first + span).min(panel_end);
                        let apart = (block.end == panel_end && !column.is_empty())
                            .then_some(&column[..]);
                        pointwise_blocks(p, &cells, at, block, rows, act, apart);
                    }
                    if panel_end == end {
                        let outputs = at..(at + POINTWISE_CHANNELS).min(rows.len());
                        p.weights.spend(outputs, p.depth);
                    }
                }
            }
            if start >= end {
                // No cells to sum: spent weights are done with all the same.
                p.weights.spend(0..rows.len(), p.depth);
            }
        })
    }

    /// [`pointwise_block`] for the output channels from `at` (at most
    /// [`POINTWISE_CHANNELS`]), with as many vectors as `cells` (at most 64)
    /// fill, or with the last cell apart (`apart`: its column of the image).
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn pointwise_blocks(
        p: &Pointwise<'_>,
        source: &Cells<'_>,
        at: usize,
        cells: Range<usize>,
        rows: &mut [&mut [f32]],
        act: impl Fn(__m512) -> __m512,
        apart: Option<&[f32]>,
    ) {
        let n = (rows.len() - at).min(POINTWISE_CHANNELS);
        let rows = &mut rows[at..at + n];
        match n {
            6 => pointwise_vectors::<6>(p, source, at, cells, rows, act, apart),
            5 => pointwise_vectors::<5>(p, source, at, cells, rows, act, apart),
            4 => pointwise_vectors::<4>(p, source, at, cells, rows, act, apart),
            3 => pointwise_vectors::<3>(p, source, at, cells, rows, act, apart),
            2 => pointwise_vectors::<2>(p, source, at, cells, rows, act, apart),
            _ => pointwise_vectors::<1>(p, source, at, cells, rows, act, apart),
        }
    }

    /// [`pointwise_block`] with as many vectors as `cells` fill, or as its
    /// cells but the last fill, with that one `apart`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn pointwise_vectors<const O: usize>(
        p: &Pointwise<'_>,
        source: &Cells<'_>,
        at: usize,
        cells: Range<usize>,
        rows: &mut [&mut [f32]],
        act: impl Fn(__m512) -> __m512,
        apart: Option<&[f32]>,
    ) {
        if let Some(column) = apart {
            match cells.len() / 16 {
                1 => pointwise_block::<O, 1, true>(p, source, at, cells, rows, act, column),
                2 => pointwise_block::<O, 2, true>(p, source, at, cells, rows, act, column),
                _ => pointwise_block::<O, 3, true>(p, source, at, cells, rows, act, column),
            }
            return;
        }
        match cells.len().div_ceil(16) {
            0 => {}
            1 => pointwise_block::<O, 1, false>(p, source, at, cells, rows, act, &[]),
            2 => pointwise_block::<O, 2, false>(p, source, at, cells, rows, act, &[]),
            3 => pointwise_block::<O, 3, false>(p, source, at, cells, rows, act, &[]),
            _ => {
                pointwise_block::<O, POINTWISE_VECTORS, false>(p, source, at, cells, rows, act, &[])
            }
        }
    }

    /// Output channels `at..at + O` of `p` at cells `cells` (at most `16 V`,
    /// or `16 V + 1` with `APART`) into `rows` (their rows, each indexed from
    /// `p.columns.start`).
    ///
    /// With `APART`, the last cell (`column`: its input values, one per input
    /// channel) is summed apart, after the others, sixteen input channels at
    /// a time into one vector per output channel, from the weights the main
    /// loop left in L1: where a 49-cell block would run a fourth vector for
    /// one cell, a quarter of its multiply-adds, it runs one per sixteen
    /// input channels. (Summed in the main loop, those vectors made it spill
    /// sums to the stack.) Its lanes are then added as [`add_lanes`] does,
    /// then the bias, not in the other cells' order.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn pointwise_block<const O: usize, const V: usize, const APART: bool>(
        p: &Pointwise<'_>,
        source: &Cells<'_>,
        at: usize,
        cells: Range<usize>,
        rows: &mut [&mut [f32]],
        act: impl Fn(__m512) -> __m512,
        column: &[f32],
    ) {
        let len = cells.len() - usize::from(APART);
        // Lanes of each vector of cells that lie in `cells`.
        let lens: [usize; V] = std::array::from_fn(|v| len.saturating_sub(16 * v).min(16));
        let masks: [__mmask16; V] = std::array::from_fn(|v| lanes(lens[v]));
        let mut sums: [[__m512; V]; O] =
            std::array::from_fn(|o| [_mm512_set1_ps(p.bias[at + o]); V]);
        // Each output channel's weights, and the first input value this
        // block reads: input channel `k`'s cells are `plane * k` further on.
        let n = p.depth;
        let taps: [&[f32]; O] = std::array::from_fn(|o| p.weights.row(at + o, n));
        let (pitch, first) = (source.pitch, cells.start - source.first);
        assert!(n == 0 || source.values.len() >= first + (n - 1) * pitch + len);
        let image = source.values.as_ptr().wrapping_add(first);
        assert!(!APART || column.len() == n);
        for k in 0..n {
            let row = image.wrapping_add(k * pitch);
            let x: [__m512; V] = std::array::from_fn(|v| {
                #[allow(unsafe_code)]
                // SAFETY: the lanes `masks[v]` enables are values
                // `first + k * pitch + 16 v ..` up to `first + k * pitch + len`
                // of the cells, inside them by the assert above (with `k < n`);
                // masked lanes are not accessed and cannot fault.
                unsafe {
                    _mm512_maskz_loadu_ps(masks[v], row.add(16 * v))
                }
            });
            for (sum, taps) in sums.iter_mut().zip(&taps) {
                #[allow(unsafe_code)]
                // SAFETY: every `taps` has length `n`, and `k < n`.
                let w = _mm512_set1_ps(unsafe { *taps.get_unchecked(k) });
                for (s, &x) in sum.iter_mut().zip(&x) {
                    *s = _mm512_fmadd_ps(w, x, *s);
                }
            }
        }
        // The cell apart, from the weights the loop above left in cache.
        let mut apart = [_mm512_setzero_ps(); O];
        if APART {
            for k in (0..n).step_by(16) {
                let ks = k..(k + 16).min(n);
                let xs = load(&column[ks.clone()]);
                for (sum, taps) in apart.iter_mut().zip(&taps) {
                    *sum = _mm512_fmadd_ps(load(&taps[ks.clone()]), xs, *sum);
                }
            }
        }
        if let Some(residual) = p.residual {
            for (o, sum) in sums.iter_mut().enumerate() {
                let row = &residual[(at + o) * p.plane + cells.start..][..len];
                for (v, s) in sum.iter_mut().enumerate() {
                    *s = _mm512_add_ps(*s, load(&row[(16 * v).min(len)..][..lens[v]]));
                }
            }
        }
        let from = cells.start - p.columns.start;
        // The lines the next block of cells will store to, while this one is
        // stored: inside a network the output rows are rarely in cache.
        for row in rows.iter() {
            for v in 0..V {
                let line = row.as_ptr().wrapping_add(from + len + 16 * v);
                _mm_prefetch::<_MM_HINT_T0>(line.cast());
            }
        }
        for (o, (row, sum)) in rows.iter_mut().zip(sums).enumerate() {
            if APART {
                let last = cells.end - 1;
                let mut y = add_lanes(apart[o]) + p.bias[at + o];
                if let Some(residual) = p.residual {
                    y += residual[(at + o) * p.plane + last];
                }
                row[last - p.columns.start] = _mm512_cvtss_f32(act(_mm512_set1_ps(y)));
            }
            let row = &mut row[from..][..len];
            for (v, s) in sum.into_iter().enumerate() {
                store(&mut row[16 * v..][..lens[v]], act(s));
            }
        }
    }

    /// The sum of `v`'s lanes, added pairwise: each lane `l < w` takes lane
    /// `l + w`, for `w` from 8 down to 1.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn add_lanes(v: __m512) -> f32 {
        let mut lanes = [0.0f32; 16];
        store(&mut lanes, v);
        let mut width = 16;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                lanes[l] += lanes[l + width];
            }
        }
        lanes[0]
    }

    /// [`super::matrix_vector`]: for each sixteen rows
    /// (the last block padded with its last row, whose sums are not handed
    /// out), one vector of sums per row, sixteen lanes of `x` at a time, then
    /// the sixteen vectors transposed and added up, lane `i` for row `i`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) fn matrix_vector(
        a: super::MatRef<'_>,
        x: &[f32],
        out: &mut impl FnMut(usize, &[f32]),
    ) {
        let k = x.len();
        let whole = k - k % 16;
        let row = |i: usize| &a.data[i * a.row_stride..][..k];
        for first in (0..a.rows).step_by(16) {
            let last = (a.rows - first).min(16) - 1;
            let starts: [*const f32; 16] =
                std::array::from_fn(|i| row(first + i.min(last)).as_ptr());
            let mut sums = [_mm512_setzero_ps(); 16];
            let mut at = 0;
            while at < whole {
                let xv = load(&x[at..at + 16]);
                sums = std::array::from_fn(|i| {
                    #[allow(unsafe_code)]
                    // SAFETY: `starts[i]` begins a row of `k` values (sliced
                    // above), and `at + 16 <= whole <= k`, so the load reads
                    // sixteen values of it.
                    let v = unsafe { _mm512_loadu_ps(starts[i].add(at)) };
                    _mm512_fmadd_ps(v, xv, sums[i])
                });
                at += 16;
            }
            if whole < k {
                let xv = load(&x[whole..]);
                sums = std::array::from_fn(|i| {
                    _mm512_fmadd_ps(load(&row(first + i.min(last))[whole..]), xv, sums[i])
                });
            }
            // Halves added pairwise, as `fold_lanes` adds a row's lanes.
            let mut halves = transpose(sums);
            let mut width = 16;
            while width > 1 {
                width /= 2;
                for l in 0..width {
                    halves[l] = _mm512_add_ps(halves[l], halves[l + width]);
                }
            }
            let mut lanes = [0.0f32; 16];
            store(&mut lanes, halves[0]);
            out(first, &lanes[..=last]);
        }
    }

    /// The lanes of `a` and `b` taken in turn (`a[0]`, `b[0]`, `a[1]`, ...): the
    /// first eight of each in the first vector, the last eight in the second.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn zip(a: __m512, b: __m512) -> [__m512; 2] {
        let low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        [
            _mm512_permutex2var_ps(a, low, b),
            _mm512_permutex2var_ps(a, high, b),
        ]
    }

    /// The first `src.len()` (at most 16) lanes from `src`, the others 0.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn load(src: &[f32]) -> __m512 {
        let mask = lanes(src.len());
        #[allow(unsafe_code)]
        // SAFETY: the mask enables the first `src.len()` lanes only, so the
        // load reads the elements of `src` and nothing past them (masked
        // lanes are not accessed and cannot fault).
        unsafe {
            _mm512_maskz_loadu_ps(mask, src.as_ptr())
        }
    }

    /// Writes the first `dst.len()` (at most 16) lanes of `v` to `dst`.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn store(dst: &mut [f32], v: __m512) {
        let mask = lanes(dst.len());
        #[allow(unsafe_code)]
        // SAFETY: as in `load`: only the elements of `dst` are written.
        unsafe {
            _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, v)
        }
    }

    /// Lanes `15..31` of (`low`, `high`), as `valignd` counts: `low`'s last
    /// lane, then `high`'s first fifteen (each cell's left neighbour).
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn after(low: __m512, high: __m512) -> __m512 {
        let bits = _mm512_castps_si512;
        _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(bits(high), bits(low)))
    }

    /// Lanes `1..17` of (`low`, `high`): `low`'s last fifteen, then `high`'s
    /// first (each cell's right neighbour).
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn before(low: __m512, high: __m512) -> __m512 {
        let bits = _mm512_castps_si512;
        _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(bits(high), bits(low)))
    }

    /// The bias plus the nine taps over three input rows' cells `j - 1`, `j`
    /// and `j + 1` (`rows[k]`, for kernel row `k`), summed in the portable
    /// kernel's order: each kernel row left to right, the first onto the
    /// bias, then the three rows' sums top to bottom.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn nine_taps(taps: &[__m512; 9], bias: __m512, rows: [[__m512; 3]; 3]) -> __m512 {
        let [[l0, m0, r0], [l1, m1, r1], [l2, m2, r2]] = rows;
        let [w0, w1, w2, w3, w4, w5, w6, w7, w8] = *taps;
        let top = _mm512_fmadd_ps(
            w2,
            r0,
            _mm512_fmadd_ps(w1, m0, _mm512_fmadd_ps(w0, l0, bias)),
        );
        let mid = _mm512_fmadd_ps(w5, r1, _mm512_fmadd_ps(w4, m1, _mm512_mul_ps(w3, l1)));
        let bottom = _mm512_fmadd_ps(w8, r2, _mm512_fmadd_ps(w7, m2, _mm512_mul_ps(w6, l2)));
        _mm512_add_ps(_mm512_add_ps(top, mid), bottom)
    }

    /// The mask of the first `n` lanes; `n` must be at most 16.
    #[inline(always)]
    fn lanes(n: usize) -> __mmask16 {
        assert!(n <= 16, "at most sixteen lanes");
        ((1u32 << n) - 1) as __mmask16
    }

    /// `rows` transposed: 64 shuffles on four registers' worth of lanes.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    #[inline]
    fn transpose(r: [__m512; 16]) -> [__m512; 16] {
        // Pairs of rows interleaved within each 128-bit lane.
        let mut t = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        // u[4g + j], 128-bit lane L: column 4L + j of rows 4g .. 4g + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let (lo01, hi01, lo23, hi23) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm512_shuffle_ps::<0x44>(lo01, lo23);
            u[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(lo01, lo23);
            u[4 * g + 2] = _mm512_shuffle_ps::<0x44>(hi01, hi23);
            u[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(hi01, hi23);
        }
        // Gather column j's four 128-bit pieces (rows 0-3, 4-7, 8-11, 12-15).
        let mut columns: [__m512; 16] = [_mm512_setzero_ps(); 16];
        for j in 0..4 {
            // Columns j and 8 + j (`even`) or 4 + j and 12 + j (`odd`), rows 0-7 and 8-15.
            let even_top = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
            let even_bottom = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
            let odd_top = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
            let odd_bottom = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
            columns[j] = _mm512_shuffle_f32x4::<0x88>(even_top, even_bottom);
            columns[8 + j] = _mm512_shuffle_f32x4::<0xDD>(even_top, even_bottom);
            columns[4 + j] = _mm512_shuffle_f32x4::<0x88>(odd_top, odd_bottom);
            columns[12 + j] = _mm512_shuffle_f32x4::<0xDD>(odd_top, odd_bottom);
        }
        columns
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn transpose_swaps_rows_and_columns() {
            if super::super::isa() != super::super::Isa::Avx512 {
                return;
            }
            let rows: [[f32; 16]; 16] =
                std::array::from_fn(|i| std::array::from_fn(|j| (16 * i + j) as f32));
            let mut t = [[0.0f32; 16]; 16];
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX-512 (checked above).
            unsafe {
                let columns = transpose(rows.map(|row| load(&row)));
                for (dst, v) in t.iter_mut().zip(columns) {
                    store(dst, v);
                }
            }
            for i in 0..16 {
                for j in 0..16 {
                    assert_eq!(t[i][j], rows[j][i], "cell ({i}, {j})");
                }
            }
        }
    }
}

/// AVX2 code of [`depthwise3x3_x16`]: the layout and taps of [`x16`],
/// with the transposes eight lanes wide, for each half of the sixteen
/// planes in turn.
#[cfg(target_arch = "x86_64")]
mod x8 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_blend_ps, _mm256_castpd_ps, _mm256_castps_pd,
        _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_max_ps, _mm256_min_ps, _mm256_mul_ps,
        _mm256_permute2f128_ps, _mm256_permute4x64_pd, _mm256_permutevar8x32_ps, _mm256_set1_ps,
        _mm256_setr_epi32, _mm256_setzero_ps, _mm256_shuffle_ps, _mm256_storeu_ps,
        _mm256_unpackhi_ps, _mm256_unpacklo_ps,
    };

    use super::interleaved::Layout;
    use super::{OnePlane, Sixteen};
    use crate::graph::Activation;
    use crate::ops::{BLOCK_COLUMNS, BLOCK_OUTPUTS, DirectInput};

    /// [`with_vector_activation`] on AVX2 vectors.
    macro_rules! with_activation {
        ($activation:expr, $act:ident => $run:expr) => {
            with_vector_activation!(
                __m256, _mm256_setzero_ps, _mm256_set1_ps, _mm256_max_ps, _mm256_min_ps;
                $activation, $act => $run
            )
        };
    }

    /// [`super::direct_row`]: for each block of [`BLOCK_COLUMNS`] output cells,
    /// two vectors of sums per output channel, each tap's cells loaded once
    /// and multiplied by the block's [`BLOCK_OUTPUTS`] weights.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn direct_row(input: &DirectInput<'_>, oh: usize, rows: &mut [&mut [f32]]) {
        with_activation!(input.activation, act => direct_row_with(input, oh, rows, act))
    }

    #[target_feature(enable = "avx2,fma")]
    fn direct_row_with(
        input: &DirectInput<'_>,
        oh: usize,
        rows: &mut [&mut [f32]],
        act: impl Fn(__m256) -> __m256,
    ) {
        const VECTORS: usize = BLOCK_COLUMNS / 8;
        let width = rows.first().map_or(0, |r| r.len());
        // The furthest cell a block's taps read, past its first, plus one.
        let reach = input.offsets.iter().max().map_or(0, |&o| o + BLOCK_COLUMNS);
        for first in (0..width).step_by(BLOCK_COLUMNS) {
            let base = oh * input.row_stride * input.pitch + first;
            // Checked once per block rather than on every tap's load below:
            // those checks were a third of the loop's instructions, and
            // ResNet-18's first Conv took 2.85 ms with them, 2.73 without
            // (VGG-16's 3.26 and 2.92; one thread, alternated, EPYC Zen 2).
            let block = &input.planes[base..][..reach];
            let mut acc: [[__m256; VECTORS]; BLOCK_OUTPUTS] =
                std::array::from_fn(|i| [_mm256_set1_ps(input.bias[i]); VECTORS]);
            for (&offset, weights) in input.offsets.iter().zip(input.taps) {
                let x: [__m256; VECTORS] = std::array::from_fn(|v| {
                    #[allow(unsafe_code)]
                    // SAFETY: `offset + 8 * v + 8 <= offset + BLOCK_COLUMNS <= reach`,
                    // `block`'s length, so the load reads eight elements of `block`.
                    unsafe {
                        _mm256_loadu_ps(block.as_ptr().add(offset + 8 * v))
                    }
                });
                for (sums, &w) in acc.iter_mut().zip(weights) {
                    let w = _mm256_set1_ps(w);
                    for (sum, &x) in sums.iter_mut().zip(&x) {
                        *sum = _mm256_fmadd_ps(w, x, *sum);
                    }
                }
            }
            let len = BLOCK_COLUMNS.min(width - first);
            for (row, sums) in rows.iter_mut().zip(&acc) {
                for (v, &sum) in sums.iter().enumerate() {
                    let from = first + 8 * v;
                    if from < first + len {
                        store(&mut row[from..(from + 8).min(first + len)], act(sum));
                    }
                }
            }
        }
    }

    /// [`super::depthwise3x3_stride2`] on AVX2: eight output cells (a strip)
    /// at a time, as `x16`'s kernel for wide rows does sixteen. Each input
    /// row is taken apart into even and odd cells once, in registers, and
    /// the odd input rows serve the two output rows that read them.
    /// MobileNetV2's layers alone, one thread (EPYC Zen 3), against the
    /// portable kernel (even and odd cells written to scratch and read back):
    /// 96 planes 112x112 into 56x56 0.342 → 0.276 ms, 144 into 28x28 0.168 →
    /// 0.135; against the sixteen-plane kernel, 192 into 14x14 0.064 → 0.060,
    /// but 576 into 7x7 0.052 → 0.192 (rows narrower than a strip stay with
    /// that kernel: `ops::conv`'s `sixteen_planes_pay`). Inside the network,
    /// the four nodes together 0.778 → 0.576 ms at one thread, 0.436 → 0.337
    /// at two.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn depthwise3x3_stride2(p: &OnePlane<'_>, out: &mut [f32], out_width: usize) {
        with_activation!(p.activation, act => stride2_strips(p, out, out_width, act))
    }

    /// Most strips of eight output cells that [`stride2_strips`] takes down
    /// the plane at once (wider rows go in bands of this many), so that
    /// their cells of the last odd input row stay on the stack.
    const STRIPS: usize = 32;

    /// The strips of [`depthwise3x3_stride2`]. A strip's cells `2j - 1` are
    /// its odd cells shifted by a lane, the cell before the strip (one scalar
    /// load) coming in; strips whose 16 input cells are all inside the row
    /// load them without copies.
    #[target_feature(enable = "avx2,fma")]
    fn stride2_strips(
        p: &OnePlane<'_>,
        out: &mut [f32],
        out_width: usize,
        act: impl Fn(__m256) -> __m256,
    ) {
        let width = p.width;
        let zero = _mm256_setzero_ps();
        let taps = p.taps.map(|t| _mm256_set1_ps(t));
        let bias = _mm256_set1_ps(p.bias);
        // Lane i takes lane i - 1 (lane 0 is replaced by the cell before).
        let shift = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
        // `shuffle_ps` leaves each 128-bit half's pairs interleaved with the
        // other operand's: 64-bit units 0, 2, 1, 3 put them in order.
        let in_order =
            |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
        // Input row `row`'s cells `2j - 1`, `2j` and `2j + 1` for the strip of
        // outputs `j` from `first`.
        let cells = |row: &[f32], first: usize| -> [__m256; 3] {
            let at = 2 * first;
            let (lo, hi) = match row.get(at..at + 16) {
                Some(both) => (load(&both[..8]), load(&both[8..])),
                None => {
                    let part = |from: usize| load(&row[from.min(width)..(from + 8).min(width)]);
                    (part(at), part(at + 8))
                }
            };
            let m = in_order(_mm256_shuffle_ps::<0x88>(lo, hi));
            let r = in_order(_mm256_shuffle_ps::<0xDD>(lo, hi));
            let before = match at.checked_sub(1) {
                Some(left) => _mm256_set1_ps(row[left]),
                None => zero,
            };
            let l = _mm256_blend_ps::<1>(_mm256_permutevar8x32_ps(r, shift), before);
            [l, m, r]
        };
        for band in (0..out_width).step_by(8 * STRIPS) {
            let strips = (out_width - band).div_ceil(8).min(STRIPS);
            // Per strip, input row `2 oh - 1`'s cells for output row `oh`: the
            // padding's zeros for the first.
            let mut top = [[zero; 3]; STRIPS];
            for (oh, out_row) in out.chunks_exact_mut(out_width).enumerate() {
                let row = |r: usize| p.plane.get(r * width..(r + 1) * width);
                let (here, below) = (row(2 * oh), row(2 * oh + 1));
                for (strip, top) in top.iter_mut().enumerate().take(strips) {
                    // A last, partial strip moves left over the one before it
                    // (whose cells it computes again, to the same bits) where
                    // the row has room: whole vectors load and store without
                    // copies.
                    let first = (band + 8 * strip).min(out_width.saturating_sub(8));
                    let here = here.map_or([zero; 3], |row| cells(row, first));
                    let below = below.map_or([zero; 3], |row| cells(row, first));
                    let sums = act(nine_taps(&taps, bias, [*top, here, below]));
                    store(&mut out_row[first..(first + 8).min(out_width)], sums);
                    *top = below;
                }
            }
        }
    }

    /// The bias plus the nine taps over three input rows' cells `j - 1`, `j`
    /// and `j + 1`, in the order of `x16`'s (the portable kernel's).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn nine_taps(taps: &[__m256; 9], bias: __m256, rows: [[__m256; 3]; 3]) -> __m256 {
        let [[l0, m0, r0], [l1, m1, r1], [l2, m2, r2]] = rows;
        let [w0, w1, w2, w3, w4, w5, w6, w7, w8] = *taps;
        let top = _mm256_fmadd_ps(
            w2,
            r0,
            _mm256_fmadd_ps(w1, m0, _mm256_fmadd_ps(w0, l0, bias)),
        );
        let mid = _mm256_fmadd_ps(w5, r1, _mm256_fmadd_ps(w4, m1, _mm256_mul_ps(w3, l1)));
        let bottom = _mm256_fmadd_ps(w8, r2, _mm256_fmadd_ps(w7, m2, _mm256_mul_ps(w6, l2)));
        _mm256_add_ps(_mm256_add_ps(top, mid), bottom)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn depthwise3x3(planes: &Sixteen<'_>, out: &mut [f32], scratch: &mut Vec<f32>) {
        with_activation!(planes.activation, act => run(planes, out, scratch, act))
    }

    #[target_feature(enable = "avx2,fma")]
    fn run(
        p: &Sixteen<'_>,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
        act: impl Fn(__m256) -> __m256,
    ) {
        let layout = Layout::new(p, out.len());
        let (plane, out_plane) = (layout.plane, layout.out_plane);
        let (pad, cells) = layout.split(scratch);
        // In: eight cells of eight planes at a time, flat across rows.
        let mut cursor = layout.cursor();
        for first in (0..plane).step_by(8) {
            let n = (plane - first).min(8);
            let at: [usize; 8] = std::array::from_fn(|_| cursor.next());
            for half in 0..2 {
                let rows: [__m256; 8] =
                    std::array::from_fn(|i| load(&p.input[(8 * half + i) * plane + first..][..n]));
                for (&at, v) in at.iter().zip(transpose(rows)).take(n) {
                    store(&mut pad[at][8 * half..][..8], v);
                }
            }
        }
        taps(p, &layout, pad, cells, act);
        // Out: eight cells of eight planes at a time.
        for first in (0..out_plane).step_by(8) {
            let n = (out_plane - first).min(8);
            for half in 0..2 {
                let mut rows = [_mm256_setzero_ps(); 8];
                for (v, cell) in rows.iter_mut().zip(&cells[first..first + n]) {
                    *v = load(&cell[8 * half..][..8]);
                }
                for (i, v) in transpose(rows).into_iter().enumerate() {
                    store(&mut out[(8 * half + i) * out_plane + first..][..n], v);
                }
            }
        }
    }

    /// Every output cell, as [`super::x16`] computes them (the same sums in
    /// the same order), but eight lanes at a time over every cell: their
    /// taps and bias then stay in registers while the cells stream past.
    /// (Written with intrinsics: the compiler unrolls an eight-lane loop
    /// and then leaves it scalar.)
    #[target_feature(enable = "avx2,fma")]
    fn taps(
        p: &Sixteen<'_>,
        layout: &Layout,
        pad: &[[f32; 16]],
        cells: &mut [[f32; 16]],
        act: impl Fn(__m256) -> __m256,
    ) {
        let (pitch, stride) = (layout.pitch, layout.stride);
        for half in [0, 8] {
            let lanes = |cell: &[f32; 16]| load(&cell[half..][..8]);
            let [w0, w1, w2, w3, w4, w5, w6, w7, w8] = p.taps.each_ref().map(lanes);
            let bias = lanes(&p.bias);
            for (y, out_row) in cells.chunks_exact_mut(layout.out_width).enumerate() {
                let row = |ki: usize| &pad[(y * stride + ki) * pitch..][..pitch];
                let (r0, r1, r2) = (row(0), row(1), row(2));
                for (x, cell) in out_row.iter_mut().enumerate() {
                    let at = x * stride;
                    let tap = |w: __m256, row: &[[f32; 16]], kj: usize, acc: __m256| {
                        _mm256_fmadd_ps(w, lanes(&row[at + kj]), acc)
                    };
                    let top = tap(w2, r0, 2, tap(w1, r0, 1, tap(w0, r0, 0, bias)));
                    let mid = tap(w5, r1, 2, tap(w4, r1, 1, _mm256_mul_ps(w3, lanes(&r1[at]))));
                    let bottom = tap(w8, r2, 2, tap(w7, r2, 1, _mm256_mul_ps(w6, lanes(&r2[at]))));
                    let v = act(_mm256_add_ps(_mm256_add_ps(top, mid), bottom));
                    store(&mut cell[half..][..8], v);
                }
            }
        }
    }

    /// The first `src.len()` (at most 8) lanes from `src`, the others 0.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn load(src: &[f32]) -> __m256 {
        let mut lanes = [0.0; 8];
        let full: &[f32; 8] = match src.try_into() {
            Ok(full) => full,
            Err(_) => {
                lanes[..src.len()].copy_from_slice(src);
                &lanes
            }
        };
        #[allow(unsafe_code)]
        // SAFETY: the load reads the eight elements of `full`.
        unsafe {
            _mm256_loadu_ps(full.as_ptr())
        }
    }

    /// Writes the first `dst.len()` (at most 8) lanes of `v` to `dst`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn store(dst: &mut [f32], v: __m256) {
        let n = dst.len();
        if let Ok(full) = <&mut [f32; 8]>::try_from(&mut *dst) {
            #[allow(unsafe_code)]
            // SAFETY: the store writes the eight elements of `full`.
            unsafe {
                _mm256_storeu_ps(full.as_mut_ptr(), v)
            };
            return;
        }
        let mut lanes = [0.0; 8];
        #[allow(unsafe_code)]
        // SAFETY: as above, into `lanes`.
        unsafe {
            _mm256_storeu_ps(lanes.as_mut_ptr(), v)
        };
        dst.copy_from_slice(&lanes[..n]);
    }

    /// `rows` transposed: 24 shuffles.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn transpose(r: [__m256; 8]) -> [__m256; 8] {
        // Pairs of rows interleaved within each 128-bit half.
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // u[4g + j], half H: column 4H + j of rows 4g .. 4g + 4.
        let mut u = [_mm256_setzero_ps(); 8];
        for g in 0..2 {
            let (lo01, hi01, lo23, hi23) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
            u[4 * g] = _mm256_shuffle_ps::<0x44>(lo01, lo23);
            u[4 * g + 1] = _mm256_shuffle_ps::<0xEE>(lo01, lo23);
            u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(hi01, hi23);
            u[4 * g + 3] = _mm256_shuffle_ps::<0xEE>(hi01, hi23);
        }
        // Column j: the low halves of rows 0-3 and 4-7; column 4 + j: the high.
        let mut columns = [_mm256_setzero_ps(); 8];
        for j in 0..4 {
            columns[j] = _mm256_permute2f128_ps::<0x20>(u[j], u[4 + j]);
            columns[4 + j] = _mm256_permute2f128_ps::<0x31>(u[j], u[4 + j]);
        }
        columns
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn transpose_swaps_rows_and_columns() {
            if super::super::isa() == super::super::Isa::Baseline {
                return;
            }
            let rows: [[f32; 8]; 8] =
                std::array::from_fn(|i| std::array::from_fn(|j| (8 * i + j) as f32));
            let mut t = [[0.0f32; 8]; 8];
            #[allow(unsafe_code)]
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe {
                let columns = transpose(rows.map(|row| load(&row)));
                for (dst, v) in t.iter_mut().zip(columns) {
                    store(dst, v);
                }
            }
            for i in 0..8 {
                for j in 0..8 {
                    assert_eq!(t[i][j], rows[j][i], "cell ({i}, {j})");
                }
            }
        }
    }
}

/// Asks the CPU to bring every cache line of `data` into its L2 cache
/// (`prefetcht1`), and returns at once: see [`prefetch`].
///
/// For weights a product is about to read that are not in cache. Inside
/// MobileNetV2, whose 14 MB of weights leave the cache between queries,
/// `gemm` read each 1x1 Conv's weights by short runs of rows as it packed
/// them, too short for the hardware prefetcher: 160 -> 960 on 7x7 took
/// 0.28-0.30 ms there against 0.15 alone. All lines asked for at once
/// first, it took 0.21-0.22 (one thread, Zen 4, four alternated rounds).
pub(crate) fn prefetch_l2(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(data);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Asks the CPU to bring every cache line of `data` into its L1 cache
/// (`prefetcht0`), and returns at once: see [`prefetch`]. For the first few
/// lines of rows read soon after (see [`dots_into`]).
pub(crate) fn prefetch_l1(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(data);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// `_mm_prefetch` with `HINT` on every cache line of `data`: SSE, which every
/// x86-64 CPU has. A hint, which never faults and changes no value.
#[cfg(target_arch = "x86_64")]
fn prefetch<const HINT: i32>(data: &[f32]) {
    for line in data.chunks(64 / std::mem::size_of::<f32>()) {
        #[allow(unsafe_code)]
        // SAFETY: SSE, the one feature `_mm_prefetch` needs, is in every
        // x86-64 CPU (the target's baseline); a prefetch reads no value and
        // cannot fault, and the pointer is into `data` anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<HINT>(line.as_ptr().cast())
        };
    }
}

/// Sets every byte of `buf` to zero with non-temporal stores (SSE2, which every
/// x86-64 CPU has; elsewhere `fill`): each cache line goes to memory without
/// first being read, and leaves the cache instead of evicting what others read.
///
/// For wiping large buffers that have mostly left the cache already: there an
/// ordinary store reads each line from memory before it writes it back. A
/// 9.4 MB buffer out of cache, zeroed on one core in 256 KiB pieces, took
/// 0.46-0.48 ms against 0.67-0.70 with `fill`; in cache, though, 0.42-0.45
/// against 0.23-0.25 (EPYC Zen 2). The stores are ordered before the return
/// (`sfence`).
pub fn zero_uncached(buf: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: every bit pattern is a valid `__m128i`, as it is a valid `u8`.
        let (head, body, tail) = unsafe { buf.align_to_mut::<std::arch::x86_64::__m128i>() };
        head.fill(0);
        // SAFETY: SSE2, the feature `stream_zeros` is compiled with, is part of
        // the x86-64 baseline: every x86-64 CPU has it.
        unsafe { stream_zeros(body) };
        tail.fill(0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    buf.fill(0);
}

/// [`zero_uncached`] of whole, aligned vectors, then a store fence.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn stream_zeros(body: &mut [std::arch::x86_64::__m128i]) {
    use std::arch::x86_64::{_mm_setzero_si128, _mm_sfence, _mm_stream_si128};
    let zero = _mm_setzero_si128();
    for v in body {
        // SAFETY: `v` is a valid, aligned and exclusive reference; the store
        // writes its sixteen bytes and nothing else.
        unsafe { _mm_stream_si128(v, zero) };
    }
    _mm_sfence();
}

/// The system allocator, with every block of [`LINE_ALIGNED_FROM`] bytes or
/// more starting on a cache line (64 bytes): install it in a binary with
/// `#[global_allocator] static ALLOC: capsule_engine::LineAligned =
/// capsule_engine::LineAligned;`.
///
/// What it is for: a tensor's speed should not depend on where `malloc` put
/// it. glibc returns 16-byte-aligned blocks, so a row of weights or of an
/// activation starts at any multiple of 16 bytes within its cache line, and
/// an AVX2 kernel that reads it with 32-byte loads splits one load in two
/// across lines. A dense 256x256 layer, read from cache by the row-dot
/// kernel, ran 4-12 % slower from the enclave's weight buffers (16 bytes into
/// a line, its input 48) than from the plain model's (both on a line, by
/// chance): sealed-cached/plain 1.04-1.12 over four runs of `mlcapsule bench
/// --only "dense 256" --threads 1,2`, 0.98-1.003 with this allocator in the
/// same runs, and 0.97-1.04 in three full runs of `mlcapsule bench` after
/// (EPYC Zen 2). MobileNetV2, ResNet-18 and VGG-16 did not move in any mode
/// (their GEMMs copy the weights into aligned panels first).
///
/// How: a large block is allocated 72 bytes longer than asked, through the
/// system allocator (`calloc` for zeroed blocks, so that a large zeroed block
/// still gets the kernel's fresh zero pages rather than a `memset`); the
/// block handed out starts at the first cache line at least 8 bytes in, and
/// those 8 bytes before it hold the address the system returned, which
/// `dealloc` frees. Smaller blocks, and any block that asks for more than 64
/// bytes of alignment, go to the system allocator unchanged.
///
/// Every block it frees, it first overwrites with zeros, and a `realloc`
/// allocates, copies and frees (so zeroes) the old block, where the system's
/// `realloc` may move a block and free the old one as it was: no freed block
/// keeps what it held. That covers what the enclave cannot wipe itself: the
/// `gemm` crate packs an operand of a product into a buffer of its own, which
/// it frees as it is, and a dense layer's product at batch 16 freed a whole
/// packed copy of its weights (256x512) that way. Zeroing cost ResNet-18
/// 1.018x and 1.024x as long at one and two threads, MobileNetV2 0.987x and
/// 1.003x (`bench/ab.py`, 4 rounds, plain; ResNet-18's streaming/plain 0.971x
/// and 0.986x, 3 rounds), on the Intel Xeon of `bench/README.md`. Not
/// covered: memory never freed, such as `gemm`'s slab of 2 MiB per thread,
/// kept for the thread's life (after the products tried, it held no weights).
///
/// Not for memory a foreign library frees itself: every block must come back
/// through this allocator (as it does in a Rust binary that installs it).
#[derive(Clone, Copy, Debug, Default)]
pub struct LineAligned;

#[cfg(test)]
thread_local! {
    /// Zero bytes the blocks [`LineAligned`] freed on this thread held as it
    /// freed them.
    static WIPED_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Size from which [`LineAligned`] aligns a block to a cache line: 256
/// values, an input row of a dense 256x256 layer (which the row-dot kernel
/// reads once per four rows of weights). Smaller blocks are left as the
/// system gives them: the 72 bytes a block takes beyond its size would be a
/// large share of them. From 4096 bytes instead, the input rows were left as
/// they came, and that layer's sealed-cached/plain read 1.005-1.064.
pub const LINE_ALIGNED_FROM: usize = 1024;

/// A cache line, the alignment of a large block.
const LINE: usize = 64;

/// Room a large block takes beyond its size: the header holding the system's
/// address, and up to a line minus 8 bytes of slack before the aligned start.
const LINE_SLACK: usize = LINE + size_of::<usize>();

/// The system allocation behind a large block of `layout`, or `None` when
/// `layout` is passed to the system unchanged.
fn line_outer(layout: std::alloc::Layout) -> Option<std::alloc::Layout> {
    if layout.size() < LINE_ALIGNED_FROM || layout.align() > LINE {
        return None;
    }
    let size = layout.size().checked_add(LINE_SLACK)?;
    std::alloc::Layout::from_size_align(size, align_of::<usize>()).ok()
}

impl LineAligned {
    /// The block for `layout` out of `get`'s system allocation (null if it
    /// failed); `get` is `System.alloc` or `System.alloc_zeroed`.
    ///
    /// # Safety
    ///
    /// As [`std::alloc::GlobalAlloc::alloc`]: `layout` has a nonzero size.
    unsafe fn place(
        layout: std::alloc::Layout,
        get: impl FnOnce(std::alloc::Layout) -> *mut u8,
    ) -> *mut u8 {
        let Some(outer) = line_outer(layout) else {
            return get(layout);
        };
        let raw = get(outer);
        if raw.is_null() {
            return raw;
        }
        let header = size_of::<usize>();
        // From the system's address, the first line boundary at least `header`
        // bytes in: between `header` and `header + LINE - 1` bytes in, so the
        // block (`layout.size()` bytes) ends within the `layout.size() +
        // LINE_SLACK` bytes allocated.
        let offset = (raw as usize + header).next_multiple_of(LINE) - raw as usize;
        // SAFETY: `offset + layout.size() <= outer.size()` (above): the block
        // and its header lie inside the system's allocation. The header is the
        // `usize` just before a 64-byte-aligned address, so it is aligned.
        unsafe {
            let block = raw.add(offset);
            block.sub(header).cast::<*mut u8>().write(raw);
            block
        }
    }
}

// SAFETY: every block is either the system allocator's own (small ones, and
// those with an alignment above a line, passed through both ways by the same
// `line_outer` test on the caller's layout, which `dealloc` gets unchanged)
// or lies inside one system allocation sized for it (`place`), whose address
// its header keeps for `dealloc`. Large blocks are aligned to a line, which
// satisfies any alignment up to 64 that their layout asks. Zeroed blocks come
// from `System.alloc_zeroed`, which zeroes the whole allocation. `realloc`
// keeps the contents up to the smaller size (it copies them). `dealloc`
// writes only inside the block it frees.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as `GlobalAlloc::alloc` (the caller's contract, passed on).
        unsafe { Self::place(layout, |l| std::alloc::System.alloc(l)) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as `GlobalAlloc::alloc_zeroed`.
        unsafe { Self::place(layout, |l| std::alloc::System.alloc_zeroed(l)) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's block, `layout.size()` bytes, still live.
        unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
        // The zeros are a store the optimiser may not drop as dead before the
        // free: the block's address escapes here.
        std::hint::black_box(ptr);
        // The zero bytes the block now holds (all of them), for the tests.
        #[cfg(test)]
        WIPED_HERE.set(
            // SAFETY: the block, just written whole.
            WIPED_HERE.get()
                + unsafe { std::slice::from_raw_parts(ptr, layout.size()) }
                    .iter()
                    .filter(|&&b| b == 0)
                    .count(),
        );
        match line_outer(layout) {
            // SAFETY: a small block is the system's, allocated with `layout`.
            None => unsafe { std::alloc::System.dealloc(ptr, layout) },
            // SAFETY: a large block came from `place`, which wrote the system's
            // address in the `usize` before it and allocated it with `outer`.
            Some(outer) => unsafe {
                let raw = ptr.sub(size_of::<usize>()).cast::<*mut u8>().read();
                std::alloc::System.dealloc(raw, outer);
            },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // `GlobalAlloc::realloc`'s contract: `new_size`, rounded up to the
        // alignment, does not overflow `isize`, so this layout exists.
        let Ok(new) = std::alloc::Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        // Never the system's `realloc`, which may move a block and free the
        // old one as it was: a new block, and the old one freed here, zeroed.
        // SAFETY: `new` has a nonzero size (`new_size` is nonzero by the
        // contract); `ptr` holds `layout.size()` bytes and the new block
        // `new_size`, distinct allocations; `ptr` was allocated here with
        // `layout`.
        unsafe {
            let moved = self.alloc(new);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            moved
        }
    }
}

/// `a * b + c`, fused when `FMA` (and then one instruction).
#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn line_aligned_blocks_start_on_lines_and_keep_their_contents() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = LineAligned;
        for size in [1, 100, 1023, 1024, 1025, 4096, 100_000, 3 << 20] {
            for align in [1, 4, 16, 64, 128] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: nonzero sizes; every block is freed with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "{size} bytes at {align}");
                    if size >= LINE_ALIGNED_FROM {
                        assert_eq!(p as usize % 64, 0, "{size} bytes at {align}");
                    }
                    std::ptr::write_bytes(p, 0xAB, size);
                    a.dealloc(p, layout);
                    let z = a.alloc_zeroed(layout);
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    let line = if size >= LINE_ALIGNED_FROM { 64 } else { 1 };
                    assert_eq!(z as usize % align.max(line), 0);
                    a.dealloc(z, layout);
                }
            }
        }
        // Growing and shrinking, across the threshold and beyond it, keeps the
        // bytes both sizes have (each `realloc` moves the block; blocks
        // allocated in between keep the freed ones from coming straight back).
        let pattern = |i: usize| (i % 251) as u8;
        let mut layout = Layout::from_size_align(64, 4).unwrap();
        let sizes = [
            5000,
            200_000,
            1024,
            1023,
            32,
            70_000,
            1 << 20,
            9000,
            3 << 20,
            100,
        ];
        // SAFETY: as above; each realloc's result replaces the block and its layout.
        unsafe {
            let mut p = a.alloc(layout);
            let mut others = Vec::new();
            for (n, &size) in sizes.iter().enumerate() {
                for i in 0..layout.size() {
                    p.add(i).write(pattern(i + n));
                }
                let other = Layout::from_size_align(4096 + 8 * n, 4).unwrap();
                others.push((a.alloc(other), other));
                let kept = layout.size().min(size);
                p = a.realloc(p, layout, size);
                assert!(!p.is_null());
                layout = Layout::from_size_align(size, 4).unwrap();
                if size >= LINE_ALIGNED_FROM {
                    assert_eq!(p as usize % 64, 0);
                }
                for i in 0..kept {
                    assert_eq!(
                        p.add(i).read(),
                        pattern(i + n),
                        "byte {i} of {kept}, to {size}"
                    );
                }
            }
            a.dealloc(p, layout);
            for (q, l) in others {
                a.dealloc(q, l);
            }
        }
    }

    /// Every block freed, directly or by `realloc`, is zeroed whole first, on
    /// the thread that frees it.
    #[test]
    #[allow(unsafe_code)]
    fn freed_blocks_are_zeroed_whole() {
        use std::alloc::{GlobalAlloc, Layout};
        let a = LineAligned;
        for size in [1, 100, 1023, 1024, 100_000, 3 << 20] {
            for align in [4, 128] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: nonzero sizes; each block is freed once, with its layout.
                unsafe {
                    let p = a.alloc(layout);
                    std::ptr::write_bytes(p, 0xAB, size);
                    let grown = Layout::from_size_align(2 * size, align).unwrap();
                    let before = WIPED_HERE.get();
                    let q = a.realloc(p, layout, grown.size());
                    assert_eq!(WIPED_HERE.get() - before, size, "realloc of {size}");
                    assert!(
                        std::slice::from_raw_parts(q, size)
                            .iter()
                            .all(|&b| b == 0xAB)
                    );
                    let before = WIPED_HERE.get();
                    a.dealloc(q, grown);
                    assert_eq!(WIPED_HERE.get() - before, 2 * size, "free of {}", 2 * size);
                }
            }
        }
    }

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

    /// `len` fractions from `seed`, so that the order of a sum shows in its bits.
    fn fractions(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 10_007) as f32 / 997.0 - 5.0)
            .collect()
    }

    /// A plane of `cells` fractions (one a NaN where `nan` says), nine taps,
    /// and the activation numbered `activation` (0 to 2), for the depthwise
    /// kernels' tests.
    fn depthwise_case(
        cells: usize,
        nan: Option<usize>,
        seed: usize,
        activation: usize,
    ) -> (Vec<f32>, [f32; 9], Activation) {
        let mut plane = fractions(cells, seed);
        if let Some(at) = nan {
            plane[at % cells] = f32::NAN;
        }
        let taps = fractions(9, seed + 1).try_into().unwrap();
        let activation = [
            Activation::None,
            Activation::Relu,
            Activation::Clip {
                min: -1.0,
                max: 2.0,
            },
        ][activation];
        (plane, taps, activation)
    }

    /// The bits of `v`, every NaN as the same one: the kernels compared with
    /// these must agree bit for bit on every other value.
    fn nan_blind_bits(v: &[f32]) -> Vec<u32> {
        v.iter()
            .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
            .collect()
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

    /// The last-level cache read from CPUID is the one Linux reports in sysfs (which
    /// it reads from the same leaves, parsed by its own code), where both say.
    #[test]
    fn last_level_cache_is_what_linux_reports() {
        let Some(bytes) = last_level_cache() else {
            return;
        };
        let caches = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let read = |name: &str| std::fs::read_to_string(entry.path().join(name)).ok();
                let kind = read("type")?;
                let level: u32 = read("level")?.trim().parse().ok()?;
                let size = read("size")?;
                let kib: usize = size.trim().strip_suffix('K')?.parse().ok()?;
                (kind.trim() != "Instruction").then_some((level, kib << 10))
            })
            .max_by_key(|&(level, _)| level);
        if let Some((level, reported)) = caches {
            assert_eq!(bytes, reported, "level {level} cache");
        }
        assert!(bytes >= 64 << 10, "{bytes} bytes");
    }

    #[test]
    fn zero_uncached_zeroes_exactly_its_slice() {
        let mut buf = vec![0xAAu8; 4096];
        // Every alignment of the start and the end, and a slice of many vectors.
        let cases = (0..17).flat_map(|start| (0..40).map(move |len| (start, len)));
        for (start, len) in cases.chain([(3, 4000)]) {
            buf.fill(0xAA);
            zero_uncached(&mut buf[start..start + len]);
            for (i, &b) in buf.iter().enumerate() {
                let want = if (start..start + len).contains(&i) {
                    0
                } else {
                    0xAA
                };
                assert_eq!(b, want, "byte {i} after zeroing {len} bytes from {start}");
            }
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
            sgemm(
                1.0,
                a,
                b,
                0.0,
                MatMut::new(&mut c, m, n),
                gemm::Parallelism::None,
            );
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
        sgemm(2.0, a, b, 0.5, view, gemm::Parallelism::None);
        for i in 0..m {
            for j in 0..n {
                let want = 2.0 * product[i * n + j] + 0.5 * before[i * 3 + j];
                assert!((c[i * 3 + j] - want).abs() < 1e-3);
            }
            assert_eq!(c[i * 3 + 2], before[i * 3 + 2]);
        }
    }

    /// Every row's sum reaches `out`, once, at its place: blocks of sixteen
    /// rows and a partial one, rows longer than the vector (a block of columns
    /// of a wider matrix), vectors shorter than, as long as and longer than a
    /// multiple of sixteen. The values are small integers, so every sum is
    /// exact whatever the order.
    #[test]
    fn matrix_vector_gives_every_row_its_sum() {
        for (m, k, pitch) in [
            (1, 1, 1),
            (7, 19, 19),
            (16, 16, 20),
            (37, 40, 45),
            (50, 300, 300),
        ] {
            let a = values(m * pitch, 3);
            let x = values(k, 4);
            let view = MatRef::strided(&a, m, k, pitch);
            let mut got = vec![f32::NAN; m];
            let mut calls = 0;
            let ran = matrix_vector(view, &x, &mut |first, sums| {
                calls += 1;
                assert!(
                    sums.len() <= 16 && first % 16 == 0,
                    "rows {first} + {}",
                    sums.len()
                );
                for (g, &v) in got[first..][..sums.len()].iter_mut().zip(sums) {
                    assert!(g.is_nan(), "a row's sum handed out twice");
                    *g = v;
                }
            });
            if !ran {
                assert_eq!(calls, 0, "handed out sums where it did not run");
                continue;
            }
            let want: Vec<f32> = (0..m)
                .map(|i| (0..k).map(|l| a[i * pitch + l] * x[l]).sum())
                .collect();
            assert_eq!(got, want, "{m}x{k}, rows {pitch} apart");
        }
    }

    /// The last columns computed apart land where one call puts them, with
    /// alpha, beta, a transposed B and padded rows of C, from a row-major A
    /// (the row-dot kernel, up to 8 columns left) and a transposed one
    /// (`gemm`), and with empty sums (`k` = 0) or no rows, whatever the CPU:
    /// [`product`] takes this path only on AVX2 and AVX-512, see [`apart`]
    /// (under valgrind, which has no AVX-512, an image without rows or
    /// columns took it with `k` = 0).
    #[test]
    fn last_columns_apart_match_the_definition() {
        let shapes = [(7, 19), (7, 0), (0, 19)];
        let columns = [16, 17, 20, 31, 49, 63, 113];
        let cases = shapes.iter().flat_map(|&(m, k)| {
            columns
                .iter()
                .flat_map(move |&n| [(m, k, n, false), (m, k, n, true)])
        });
        for (m, k, n, a_transposed) in cases {
            let a = values(m * k, 5);
            let a = if a_transposed {
                MatRef::new(&a, k, m).t()
            } else {
                MatRef::new(&a, m, k)
            };
            // B stored transposed: `[n, k]`, viewed as `[k, n]`.
            let b = values(n * k, 6);
            let b = MatRef::new(&b, n, k).t();
            let product = naive(&a, &b);
            let pitch = n + 3;
            let mut c = values(m * pitch, 7);
            let before = c.clone();
            let view = MatMut::strided(&mut c, m, n, pitch);
            last_columns_apart(2.0, a, b, 0.5, view);
            for i in 0..m {
                for j in 0..n {
                    let want = 2.0 * product[i * n + j] + 0.5 * before[i * pitch + j];
                    let got = c[i * pitch + j];
                    assert!(
                        (got - want).abs() < 1e-3,
                        "{m}x{k} by {n}, A transposed {a_transposed}: C[{i}, {j}] {got}, want {want}"
                    );
                }
                assert_eq!(
                    c[i * pitch + n..][..3],
                    before[i * pitch + n..][..3],
                    "{m}x{k} by {n}"
                );
            }
        }
    }

    #[test]
    fn empty_inner_dimension_scales_c() {
        let mut c = vec![2.0; 6];
        let (a, b) = (MatRef::new(&[], 2, 0), MatRef::new(&[], 0, 3));
        sgemm(
            1.0,
            a,
            b,
            0.5,
            MatMut::new(&mut c, 2, 3),
            gemm::Parallelism::None,
        );
        assert_eq!(c, [1.0; 6]);
        c[0] = f32::NAN;
        sgemm(
            1.0,
            a,
            b,
            0.0,
            MatMut::new(&mut c, 2, 3),
            gemm::Parallelism::None,
        );
        assert_eq!(c, [0.0; 6]);
    }

    #[test]
    fn large_products_match_the_definition() {
        // Large enough for `gemm` to split over threads when it may.
        let (m, k, n) = (250, 40, 150);
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
    fn row_dots_match_the_definition() {
        // A few rows of A times a transposed B: the dense-layer shape.
        for (m, k, n) in [(1, 16, 1), (1, 300, 130), (3, 77, 65), (8, 1000, 200)] {
            let (a, w) = (values(m * k, 7), values(n * k, 8));
            let (a, b) = (MatRef::new(&a, m, k), MatRef::new(&w, n, k).t());
            let product = naive(&a, &b);
            let mut c: Vec<f32> = (0..m * (n + 1)).map(|v| v as f32).collect();
            let before = c.clone();
            let view = MatMut {
                data: &mut c,
                rows: m,
                cols: n,
                row_stride: n + 1,
            };
            gemm(0.5, a, b, 2.0, view);
            for i in 0..m {
                for j in 0..n {
                    let want = 0.5 * product[i * n + j] + 2.0 * before[i * (n + 1) + j];
                    let got = c[i * (n + 1) + j];
                    assert!(
                        (got - want).abs() <= 1e-3 * want.abs().max(1.0),
                        "{got} vs {want}"
                    );
                }
                assert_eq!(c[i * (n + 1) + n], before[i * (n + 1) + n]);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn dispatched_dot_matches_the_portable_one(
            x in proptest::collection::vec(-100.0f32..100.0, 0..200),
            y in proptest::collection::vec(-100.0f32..100.0, 0..200),
        ) {
            let exact: f64 = x.iter().zip(&y).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let scale: f64 = x.iter().zip(&y).map(|(a, b)| f64::from((a * b).abs())).sum();
            for got in [dot(&x, &y), dot_body::<false>(&x, &y)] {
                proptest::prop_assert!((f64::from(got) - exact).abs() <= 1e-5 * scale.max(1.0));
            }
        }

        #[test]
        fn dispatched_sum_matches_the_portable_one(
            x in proptest::collection::vec(-100.0f32..100.0, 0..200),
        ) {
            let exact: f64 = x.iter().copied().map(f64::from).sum();
            let scale: f64 = x.iter().map(|v| f64::from(v.abs())).sum();
            for got in [sum(&x), sum_body::<false>(&x)] {
                proptest::prop_assert!((f64::from(got) - exact).abs() <= 1e-5 * scale.max(1.0));
            }
        }

        #[test]
        fn stride2_depthwise_matches_the_portable_kernel_bit_for_bit(
            width in 1usize..600,
            height in 1usize..12,
            activation in 0usize..3,
            nan in proptest::option::of(0usize..2000),
            seed in 0usize..1000,
        ) {
            let (plane, taps, activation) = depthwise_case(width * height, nan, seed, activation);
            let (out_width, out_height) = (width.div_ceil(2), height.div_ceil(2));
            let p = OnePlane { plane: &plane[..], width, taps: &taps, bias: 0.25, activation };
            let mut got = vec![f32::NAN; out_width * out_height];
            if !depthwise3x3_stride2(&p, &mut got, out_width) {
                return Ok(()); // not on this CPU
            }
            let mut want = vec![f32::NAN; out_width * out_height];
            // Scratch left over from elsewhere must not matter.
            let mut scratch = vec![7.0; 5];
            depthwise3x3(&plane, width, 2, &taps, 0.25, activation, &mut want, out_width, &mut scratch);
            proptest::prop_assert_eq!(nan_blind_bits(&got), nan_blind_bits(&want));
        }

        #[test]
        fn pointwise_matches_the_definition_bit_for_bit(
            channels in 1usize..14,
            depth in 1usize..200,
            plane in 1usize..1200,
            start in 0usize..1200,
            len in 0usize..1200,
            activation in 0usize..3,
            nan in proptest::option::of(0usize..80_000),
            seed in 0usize..1000,
            with_residual in proptest::bool::ANY,
            // The tile's input channels may be some of a deeper Conv's.
            more_weights in proptest::option::of(1usize..50),
            // The weights handed over, to be overwritten once read.
            spent in proptest::bool::ANY,
        ) {
            let start = start % plane;
            let columns = start..(start + len).min(plane);
            let (mut image, _, activation) = depthwise_case(depth * plane, None, seed, activation);
            if let Some(at) = nan {
                let cells = image.len();
                image[at % cells] = f32::NAN;
            }
            let stride = depth + more_weights.unwrap_or(0);
            let weights = fractions(channels * stride, seed + 2);
            let bias = fractions(channels, seed + 3);
            let residual = with_residual.then(|| fractions(channels * plane, seed + 4));
            let mut handed = weights.clone();
            let taps = if spent {
                Taps::Spent(handed.chunks_mut(stride).collect())
            } else {
                Taps::Strided { values: &weights, stride }
            };
            let mut p = Pointwise {
                image: &image, plane, weights: taps, depth, bias: &bias,
                residual: residual.as_deref(), activation, columns: columns.clone(),
            };
            // Each row a little longer than the columns: the kernel must not
            // write past them.
            let mut got = vec![vec![f32::NAN; columns.len() + 1]; channels];
            let mut rows: Vec<&mut [f32]> =
                got.iter_mut().map(|r| &mut r[..columns.len()]).collect();
            // Scratch left over from elsewhere must not matter.
            let mut scratch = vec![7.0; 5];
            let done = pointwise(&mut p, &mut rows, &mut scratch);
            drop(p);
            proptest::prop_assert_eq!(done, isa() == Isa::Avx512);
            if !done {
                proptest::prop_assert!(got.iter().flatten().all(|v| v.is_nan()), "touched nothing");
                proptest::prop_assert_eq!(&handed, &weights, "touched nothing");
                return Ok(());
            }
            for (o, (row, read)) in handed.chunks(stride).zip(weights.chunks(stride)).enumerate() {
                let (used, rest) = row.split_at(depth);
                if spent {
                    proptest::prop_assert!(used.iter().all(|&w| w.to_bits() == 0), "channel {} spent", o);
                } else {
                    proptest::prop_assert_eq!(used, &read[..depth], "channel {} read", o);
                }
                proptest::prop_assert_eq!(rest, &read[depth..], "channel {}: past its K", o);
            }
            // A last block of 17, 33 or 49 cells (blocks of 64 from the
            // start) takes its last cell apart.
            let apart = columns.len().checked_sub(1).and_then(|before_last| {
                let last_block = before_last % 64 + 1;
                (last_block > 16 && last_block % 16 == 1).then(|| columns.end - 1)
            });
            for (o, row) in got.iter().enumerate() {
                let want: Vec<f32> = columns
                    .clone()
                    .map(|c| {
                        let product = |k: usize| (weights[o * stride + k], image[k * plane + c]);
                        let sum = if Some(c) == apart {
                            // Sixteen sums, of the input channels `k` with
                            // `k % 16 == l`, added pairwise, then the bias.
                            let mut lanes: Vec<f32> = (0..16)
                                .map(|l| {
                                    (l..depth).step_by(16).fold(0.0, |s, k| {
                                        let (w, x) = product(k);
                                        w.mul_add(x, s)
                                    })
                                })
                                .collect();
                            for width in [8, 4, 2, 1] {
                                for l in 0..width {
                                    lanes[l] += lanes[l + width];
                                }
                            }
                            lanes[0] + bias[o]
                        } else {
                            // From the bias, one fused multiply-add per
                            // input channel in order.
                            (0..depth).fold(bias[o], |s, k| {
                                let (w, x) = product(k);
                                w.mul_add(x, s)
                            })
                        };
                        let sum = match &residual {
                            Some(r) => sum + r[o * plane + c],
                            None => sum,
                        };
                        activation.apply(sum)
                    })
                    .chain([f32::NAN])
                    .collect();
                proptest::prop_assert_eq!(nan_blind_bits(row), nan_blind_bits(&want), "channel {}", o);
            }
        }

        #[test]
        fn stride1_depthwise_matches_the_padded_definition_bit_for_bit(
            width in 1usize..40,
            height in 1usize..12,
            activation in 0usize..3,
            nan in proptest::option::of(0usize..2000),
            seed in 0usize..1000,
        ) {
            let (plane, taps, activation) = depthwise_case(width * height, nan, seed, activation);
            let p = OnePlane { plane: &plane[..], width, taps: &taps, bias: 0.25, activation };
            let mut got = vec![f32::NAN; width * height];
            let done = depthwise3x3_stride1(&p, &mut got);
            proptest::prop_assert_eq!(done, isa() == Isa::Avx512 && width <= 32);
            if !done {
                proptest::prop_assert!(got.iter().all(|v| v.is_nan()), "touched nothing");
                return Ok(());
            }
            // The zero-padded plane, and each cell's nine taps in the portable
            // kernel's order (`nine_taps`): three sums of a row each, then the rows.
            let cell = |r: usize, c: usize| -> f32 {
                let (r, c) = (r.wrapping_sub(1), c.wrapping_sub(1));
                if r < height && c < width { plane[r * width + c] } else { 0.0 }
            };
            let mut want = vec![0.0f32; width * height];
            for (i, y) in want.iter_mut().enumerate() {
                let (r, c) = (i / width, i % width);
                let x = |ki: usize, kj: usize| cell(r + ki, c + kj);
                let w = |ki: usize, kj: usize| taps[3 * ki + kj];
                let top = w(0, 2).mul_add(x(0, 2), w(0, 1).mul_add(x(0, 1), w(0, 0).mul_add(x(0, 0), 0.25)));
                let mid = w(1, 2).mul_add(x(1, 2), w(1, 1).mul_add(x(1, 1), w(1, 0) * x(1, 0)));
                let bottom = w(2, 2).mul_add(x(2, 2), w(2, 1).mul_add(x(2, 1), w(2, 0) * x(2, 0)));
                *y = activation.apply(top + mid + bottom);
            }
            proptest::prop_assert_eq!(nan_blind_bits(&got), nan_blind_bits(&want));
            // Written over its input, the same bits.
            let mut over = plane.clone();
            let mut one = OnePlane { plane: &mut over[..], width, taps: &taps, bias: 0.25, activation };
            proptest::prop_assert_eq!(depthwise3x3_stride1_in_place(&mut one), true);
            proptest::prop_assert_eq!(nan_blind_bits(&over), nan_blind_bits(&got));
            if width < 32 {
                // There the portable kernel pads too, and agrees.
                let mut portable = vec![f32::NAN; width * height];
                let mut scratch = vec![7.0; 5];
                depthwise3x3(&plane, width, 1, &taps, 0.25, activation, &mut portable, width, &mut scratch);
                proptest::prop_assert_eq!(nan_blind_bits(&got), nan_blind_bits(&portable));
            }
        }

        #[test]
        fn dispatched_winograd_weights_match_the_portable_ones_bit_for_bit(
            pairs in 0usize..70,
            f4: bool,
            nan in proptest::option::of(0usize..700),
            seed in 0usize..1000,
        ) {
            type Weights = fn(&[f32], &mut [&mut [f32]]);
            let (tiling, portable, dispatched): (_, Weights, Weights) = match f4 {
                false => (Tiling::F2, winograd_weights_portable, |w, u| {
                    winograd_weights(Tiling::F2, w, u)
                }),
                true => (Tiling::F4, winograd4_weights_portable, |w, u| {
                    winograd_weights(Tiling::F4, w, u)
                }),
            };
            // Fractions, so that the order of the sums shows in the bits.
            let mut w = fractions(9 * pairs, seed);
            if let (Some(at), false) = (nan, w.is_empty()) {
                let len = w.len();
                w[at % len] = f32::NAN;
            }
            let transform = |f: Weights| -> Vec<u32> {
                let mut u = vec![7.0f32; tiling.cells() * pairs];
                let mut slices: Vec<&mut [f32]> = u.chunks_mut(pairs.max(1)).collect();
                f(&w, &mut slices);
                nan_blind_bits(&u)
            };
            proptest::prop_assert_eq!(transform(dispatched), transform(portable));
        }

        #[test]
        fn dispatched_winograd_input_matches_the_portable_one_bit_for_bit(
            (width, height) in (1usize..90, 1usize..12),
            (pad_top, pad_left) in (0usize..3, 0usize..3),
            (tile_row, tiles, gap) in (0usize..5, 1usize..45, 0usize..20),
            f4: bool,
            nan in proptest::option::of(0usize..700),
            seed in 0usize..1000,
        ) {
            type Input = fn(&TileSource<'_>, usize, usize, &mut [f32], usize, &mut Vec<f32>);
            let (tiling, portable, dispatched): (_, Input, Input) = match f4 {
                false => (Tiling::F2, winograd_input_portable, |s, r, t, v, k, x| {
                    winograd_input(Tiling::F2, s, r, t, v, k, x)
                }),
                true => (Tiling::F4, winograd4_input_portable, |s, r, t, v, k, x| {
                    winograd_input(Tiling::F4, s, r, t, v, k, x)
                }),
            };
            let mut plane = fractions(width * height, seed);
            if let Some(at) = nan {
                let len = plane.len();
                plane[at % len] = f32::NAN;
            }
            let source = TileSource { plane: &plane, width, pad_top, pad_left };
            let stride = tiles + gap;
            let transform = |f: Input| {
                let mut v = vec![7.0f32; tiling.cells() * stride];
                // Scratch left dirty by an earlier call changes nothing.
                let mut scratch = vec![f32::NAN; 50];
                f(&source, tile_row, tiles, &mut v, stride, &mut scratch);
                nan_blind_bits(&v)
            };
            proptest::prop_assert_eq!(transform(dispatched), transform(portable));
        }

        #[test]
        fn dispatched_winograd_output_matches_the_portable_one_bit_for_bit(
            (width, tile_rows, short) in (1usize..80, 1usize..4, 0usize..4),
            gap in 0usize..20,
            f4: bool,
            (activation, with_residual) in (0usize..3, proptest::bool::ANY),
            nan in proptest::option::of(0usize..5000),
            seed in 0usize..1000,
        ) {
            type Output = fn(&[f32], usize, usize, OutputRows<'_>, &mut Vec<f32>);
            let (tiling, portable, dispatched): (_, Output, Output) = match f4 {
                false => (Tiling::F2, winograd_output_portable, |p, k, t, o, x| {
                    winograd_output(Tiling::F2, p, k, t, o, x)
                }),
                true => (Tiling::F4, winograd4_output_portable, |p, k, t, o, x| {
                    winograd_output(Tiling::F4, p, k, t, o, x)
                }),
            };
            let size = tiling.size();
            let tiles = tile_rows * width.div_ceil(size);
            let stride = tiles + gap;
            let mut p = fractions(tiling.cells() * stride, seed);
            if let Some(at) = nan {
                let len = p.len();
                p[at % len] = f32::NAN;
            }
            // A height that is not a multiple leaves the last tile row fewer
            // output rows.
            let rows = size * tile_rows - short % size;
            let residual = fractions(rows * width, seed + 1);
            let (_, _, activation) = depthwise_case(1, None, seed, activation);
            let transform = |f: Output| {
                let mut y = vec![f32::NAN; rows * width];
                let out = OutputRows {
                    rows: &mut y,
                    width,
                    bias: 0.25,
                    residual: with_residual.then_some(&residual[..]),
                    activation,
                };
                f(&p, stride, tiles, out, &mut Vec::new());
                nan_blind_bits(&y)
            };
            proptest::prop_assert_eq!(transform(dispatched), transform(portable));
        }

        #[test]
        fn four_columns_at_once_give_dots_results_exactly(
            m in 1usize..4,
            n in 0usize..11,
            k in 0usize..150,
            seed in 0usize..1000,
            from_memory: bool,
        ) {
            let (a, b) = (fractions(m * k, seed), fractions(n * k, seed + 1));
            let a_rows: Vec<&[f32]> = a.chunks_exact(k.max(1)).take(m).collect();
            let columns: Vec<&[f32]> = b.chunks_exact(k.max(1)).take(n).collect();
            let mut out = vec![f32::NAN; a_rows.len() * columns.len()];
            // Prefetching (from memory) changes no value.
            dots_into(&a_rows, &columns, &mut out, from_memory);
            for (j, column) in columns.iter().enumerate() {
                for (i, row) in a_rows.iter().enumerate() {
                    proptest::prop_assert_eq!(out[j * a_rows.len() + i].to_bits(), dot(row, column).to_bits());
                }
            }
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
            gemm::Parallelism::None,
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
            gemm::Parallelism::None,
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
            gemm::Parallelism::None,
        );
    }
}
