//! Pooling over NCHW images: MaxPool, AveragePool and GlobalAveragePool.
//!
//! Window geometry follows ONNX as onnxruntime implements it (see
//! [`Axis`]): padding never wins a max; `ceil_mode` adds a last, partial
//! window unless it would start in the end padding. AveragePool divides by
//! the window's in-bounds cells, or with `count_include_pad` by its cells
//! inside the padded extent (a `ceil_mode` window is clipped there).

use super::window::{Axis, Span};
use super::{KernelResult, Mismatch};
use crate::graph::PoolAttrs;
use crate::kernels;
use crate::tensor::{Tensor, volume};
use crate::threads::{for_each_chunk, map_range};

/// MaxPool. A window with no cell in the input (possible only with
/// dilation) yields `f32::MIN`, as onnxruntime's does.
pub(crate) fn max_pool(attrs: &PoolAttrs, x: &Tensor) -> KernelResult {
    let by_rows = (attrs.dilations == [1, 1]).then_some(ByRows::Max);
    pool(attrs, x, by_rows, |window| window.fold(f32::MIN, at_least))
}

/// How [`pool`] computes windows without dilation, by rows.
#[derive(Clone, Copy)]
enum ByRows {
    /// [`max_by_rows_body`].
    Max,
    /// [`mean_by_rows_body`], `count_include_pad` or not.
    Mean(bool),
}

/// `v` where it is greater than `acc`, else `acc`: the max of the two that
/// ignores a NaN `v` (comparisons with NaN are false). Starting from a
/// number (MaxPool starts from `f32::MIN`), a max taken this way never
/// becomes NaN, so it agrees with `f32::max` (which ignores NaN on either
/// side). On x86 it is one `maxps`, where `f32::max` must also compare and
/// blend: ResNet-18's MaxPool (64x112x112, 3x3, stride 2) as a model of
/// its own, median ms of five alternated runs, 0.200 → 0.155 at one thread
/// and 0.112 → 0.093 at two; inside the network, where its input comes
/// from memory, 0.217-0.220 → 0.187-0.199 at one thread (EPYC Zen 2).
#[inline(always)]
fn at_least(acc: f32, v: f32) -> f32 {
    if v > acc { v } else { acc }
}

/// AveragePool. A window with no cell to divide by yields 0.
pub(crate) fn average_pool(attrs: &PoolAttrs, count_include_pad: bool, x: &Tensor) -> KernelResult {
    let by_rows = (attrs.dilations == [1, 1]).then_some(ByRows::Mean(count_include_pad));
    pool(attrs, x, by_rows, |window| {
        let cells = if count_include_pad {
            window.rows.padded_taps * window.cols.padded_taps
        } else {
            window.rows.taps * window.cols.taps
        };
        if cells == 0 {
            return 0.0;
        }
        window.fold(0.0, |sum, v| sum + v) / cells as f32
    })
}

/// Fewest input elements for which GlobalAveragePool is split over threads
/// (a batch of 8 of MobileNetV2's last features is below it).
const GLOBAL_POOL_PARALLEL_MIN: usize = 1 << 20;

/// GlobalAveragePool: the mean of each channel over all dimensions after
/// the second, which are kept with size 1. An empty channel's mean is NaN,
/// as in numpy.
pub(crate) fn global_average_pool(x: &Tensor) -> KernelResult {
    let shape = x.shape();
    let (Some(&batch), Some(&channels), Some(spatial)) = (
        shape.first(),
        shape.get(1),
        shape.get(2..).filter(|s| !s.is_empty()),
    ) else {
        return Err(Mismatch(format!(
            "X must have shape [N, C, D1, ...] (rank 3 or more), got {shape:?}"
        )));
    };
    let mut out_shape = vec![batch, channels];
    out_shape.resize(shape.len(), 1);
    let planes = batch * channels;
    if planes == 0 {
        return Ok(Tensor::from_parts(out_shape, Vec::new()));
    }
    let size = x.len() / planes;
    let y = if size == 0 {
        vec![f32::NAN; planes]
    } else {
        debug_assert_eq!(volume(spatial), Some(size));
        let data = x.data();
        let mean = |p: usize| kernels::sum(&data[p * size..][..size]) / size as f32;
        // A pass over memory: split over threads only when it is long.
        if x.len() >= GLOBAL_POOL_PARALLEL_MIN {
            map_range(planes, mean)
        } else {
            (0..planes).map(mean).collect()
        }
    };
    Ok(Tensor::from_parts(out_shape, y))
}

/// The cells of one input plane a pooling window covers.
struct Window<'a> {
    plane: &'a [f32],
    width: usize,
    rows: Span,
    cols: Span,
    row_step: usize,
    col_step: usize,
}

impl Window<'_> {
    /// Folds the in-bounds cells, row by row.
    fn fold(&self, init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
        let mut acc = init;
        for t in 0..self.rows.taps {
            let row =
                &self.plane[(self.rows.first + t * self.row_step) * self.width..][..self.width];
            acc = row[self.cols.first..]
                .iter()
                .step_by(self.col_step)
                .take(self.cols.taps)
                .fold(acc, |acc, &v| f(acc, v));
        }
        acc
    }
}

/// Slides a window over every plane of `x` and reduces each placement
/// with `reduce`, one rayon task per plane.
///
/// With `by_rows` (pools without dilation) `reduce` is not called: each
/// output row is the max or sum of its window's input rows, taken
/// element-wise in one vectorised pass per row, then the max or mean of each
/// window's cells of that line. The same maxima (of the in-bounds cells and
/// `f32::MIN`), without a fold per output cell, which cost VGG-16's first
/// MaxPool 14 ms; the same means but for rounding (the cells are added
/// column by column, not row by row), which DenseNet's 2x2 AveragePools
/// (128-512 planes) took 0.66 ms to fold at two threads, against 0.035 for
/// onnxruntime's.
fn pool(
    attrs: &PoolAttrs,
    x: &Tensor,
    by_rows: Option<ByRows>,
    reduce: impl Fn(&Window<'_>) -> f32 + Sync,
) -> KernelResult {
    let &[batch, channels, height, width] = x.shape() else {
        return Err(Mismatch(format!(
            "X must have shape [N, C, H, W], got {:?}",
            x.shape()
        )));
    };
    let [kh, kw] = attrs.kernel;
    let [sh, sw] = attrs.strides;
    let [dh, dw] = attrs.dilations;
    let [top, left, bottom, right] = attrs.pads;
    let h = Axis::new(height, kh, sh, dh, (top, bottom), attrs.ceil_mode)
        .map_err(|e| Mismatch(format!("along H: {e}")))?;
    let w = Axis::new(width, kw, sw, dw, (left, right), attrs.ceil_mode)
        .map_err(|e| Mismatch(format!("along W: {e}")))?;
    let shape = vec![batch, channels, h.output(), w.output()];
    let len = volume(&shape)
        .ok_or_else(|| Mismatch(format!("the output shape {shape:?} is too large")))?;
    if len == 0 {
        return Ok(Tensor::from_parts(shape, Vec::new()));
    }
    let rows: Vec<Span> = (0..h.output()).map(|o| h.span(o)).collect();
    let cols: Vec<Span> = (0..w.output()).map(|o| w.span(o)).collect();
    let in_plane = height * width;
    // Every output cell is written below.
    let mut y = crate::buffers::take(len);
    for_each_chunk(
        &mut y,
        h.output() * w.output(),
        Vec::new,
        |line: &mut Vec<f32>, p, out| {
            let plane = &x.data()[p * in_plane..][..in_plane];
            match by_rows {
                Some(ByRows::Max) => {
                    line.resize(2 * width, 0.0);
                    let (line, wide) = line.split_at_mut(width);
                    kernels::max_by_rows(plane, [width, kw, sw], &rows, &cols, line, wide, out);
                    return;
                }
                Some(ByRows::Mean(include_pad)) => {
                    line.resize(width, 0.0);
                    kernels::mean_by_rows(plane, include_pad, &rows, &cols, line, out);
                    return;
                }
                None => {}
            }
            for (out_row, &rows) in out.chunks_mut(w.output()).zip(&rows) {
                for (o, &cols) in out_row.iter_mut().zip(&cols) {
                    *o = reduce(&Window {
                        plane,
                        width,
                        rows,
                        cols,
                        row_step: dh,
                        col_step: dw,
                    });
                }
            }
        },
    );
    Ok(Tensor::from_parts(shape, y))
}

/// [`pool`]'s AveragePool of one plane (`[H, W]`, `W` = `line.len()`) by
/// rows, for windows without dilation: `line` holds the element-wise sum of
/// each output row's input rows (in-bounds), and each output cell is the sum
/// of its window's cells of that line over the window's in-bounds cells, or
/// over its cells inside the padded extent with `include_pad`. A window with
/// no cell to divide by yields 0. Compiled per instruction set by
/// `kernels::mean_by_rows`.
#[inline(always)]
pub(crate) fn mean_by_rows_body<const FMA: bool>(
    plane: &[f32],
    include_pad: bool,
    rows: &[Span],
    cols: &[Span],
    line: &mut [f32],
    out: &mut [f32],
) {
    let width = line.len();
    for (out_row, r) in out.chunks_mut(cols.len()).zip(rows) {
        let row = |t: usize| &plane[(r.first + t) * width..][..width];
        if r.taps == 0 {
            line.fill(0.0);
        } else {
            line.copy_from_slice(row(0));
        }
        for t in 1..r.taps {
            for (l, &v) in line.iter_mut().zip(row(t)) {
                *l += v;
            }
        }
        for (o, c) in out_row.iter_mut().zip(cols) {
            let cells = if include_pad {
                r.padded_taps * c.padded_taps
            } else {
                r.taps * c.taps
            };
            let sum: f32 = line[c.first..c.first + c.taps].iter().sum();
            *o = if cells == 0 { 0.0 } else { sum / cells as f32 };
        }
    }
}

/// [`pool`]'s MaxPool of one plane (`[H, W]`) by rows, for windows
/// without dilation, `kernel` cells wide and `stride` apart along a row
/// (`[W, kernel, stride]`): `line` (`W` long) holds each output row's
/// element-wise max of its input rows, `wide` (`W` long) the max of each run
/// of `kernel` cells of `line`, so that the windows that lie whole inside
/// the row take one vectorised pass per cell of the kernel, not a fold each
/// (ResNet-18's 3x3 MaxPool with stride 2 took 0.99 ms by folds, 6.5 times
/// onnxruntime's time).
///
/// Compiled per instruction set by `kernels::max_by_rows`.
#[inline(always)]
pub(crate) fn max_by_rows_body<const FMA: bool>(
    plane: &[f32],
    [width, kernel, stride]: [usize; 3],
    rows: &[Span],
    cols: &[Span],
    line: &mut [f32],
    wide: &mut [f32],
    out: &mut [f32],
) {
    // The outputs whose windows lie whole inside the row: consecutive ones,
    // `stride` cells apart.
    let start = cols.iter().position(|c| c.taps == kernel);
    let whole = start.map_or(0..0, |s| {
        s..s + cols[s..].iter().take_while(|c| c.taps == kernel).count()
    });
    for (out_row, rows) in out.chunks_mut(cols.len()).zip(rows) {
        if rows.taps == 0 {
            out_row.fill(f32::MIN);
            continue;
        }
        let row = |t: usize| &plane[(rows.first + t) * width..][..width];
        // Up to three rows in one pass, from `f32::MIN`, so that `line` holds
        // no NaN. (`at_least` in a pass that reads `line` too compiles to a
        // masked store, which took ResNet-18's MaxPool from 0.20 to 0.35 ms;
        // passes that accumulate take `f32::max`, the same without NaN.)
        match rows.taps {
            1 => {
                for (l, &a) in line.iter_mut().zip(row(0)) {
                    *l = at_least(f32::MIN, a);
                }
            }
            2 => {
                for ((l, &a), &b) in line.iter_mut().zip(row(0)).zip(row(1)) {
                    *l = at_least(at_least(f32::MIN, a), b);
                }
            }
            _ => {
                let rows3 = row(0).iter().zip(row(1)).zip(row(2));
                for (l, ((&a, &b), &c)) in line.iter_mut().zip(rows3) {
                    *l = at_least(at_least(at_least(f32::MIN, a), b), c);
                }
            }
        }
        for t in 3..rows.taps {
            for (l, &v) in line.iter_mut().zip(row(t)) {
                *l = l.max(v);
            }
        }
        if !whole.is_empty() {
            let at = cols[whole.start].first;
            let out = &mut out_row[whole.clone()];
            whole_windows(&line[at..], [kernel, stride], wide, out);
        }
        // The windows cut by the row's ends, one fold each.
        for o in (0..whole.start).chain(whole.end..cols.len()) {
            let span = cols[o];
            out_row[o] = line[span.first..span.first + span.taps]
                .iter()
                .fold(f32::MIN, |acc, &v| at_least(acc, v));
        }
    }
}

/// The max of each window of `kernel` cells of `line`, `stride` cells apart
/// from its start, into `out` (`line` holds all of them, and no NaN);
/// `wide` is working memory at least as long as their span. Written
/// as passes over slices and pairs, which vectorise: windows of 2 and of 3
/// cells with stride 2 (VGG's and ResNet's) are one pass over pairs, without
/// `wide`.
#[inline(always)]
fn whole_windows(line: &[f32], [kernel, stride]: [usize; 2], wide: &mut [f32], out: &mut [f32]) {
    if kernel == 2 && stride == 2 {
        for (o, pair) in out.iter_mut().zip(line.as_chunks::<2>().0) {
            *o = at_least(pair[0], pair[1]);
        }
        return;
    }
    if kernel == 3 && stride == 2 {
        // Window j is cells 2j (the first of pair j of `line`) and 2j + 1 and
        // 2j + 2 (pair j of `line` shifted by one): one pass over pairs.
        // ResNet-18's MaxPool (64x112x112), per node in the network at one
        // thread: 0.31 ms through `wide` (with the copy of the first row,
        // now fused above), 0.20 this way, 0.19 with `at_least`;
        // onnxruntime 0.10 (EPYC Zen 2).
        let n = out.len();
        let (firsts, _) = line[..2 * n].as_chunks::<2>();
        let (rests, _) = line[1..2 * n + 1].as_chunks::<2>();
        for ((o, first), rest) in out.iter_mut().zip(firsts).zip(rests) {
            *o = at_least(at_least(first[0], rest[0]), rest[1]);
        }
        return;
    }
    let span = (out.len() - 1) * stride + 1;
    let wide = &mut wide[..span];
    wide.copy_from_slice(&line[..span]);
    for t in 1..kernel {
        for (w, &v) in wide.iter_mut().zip(&line[t..]) {
            *w = w.max(v);
        }
    }
    match stride {
        1 => {
            out.copy_from_slice(&wide[..out.len()]);
        }
        2 => {
            // Pairs, not `step_by`, so that the loop vectorises; the last
            // window's start has no partner.
            let (pairs, last) = wide.as_chunks::<2>();
            for (o, pair) in out.iter_mut().zip(pairs) {
                *o = pair[0];
            }
            if let (Some(o), Some(&w)) = (out.last_mut(), last.first()) {
                *o = w;
            }
        }
        _ => {
            for (o, &w) in out.iter_mut().zip(wide.iter().step_by(stride)) {
                *o = w;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attrs(
        kernel: [usize; 2],
        strides: [usize; 2],
        pads: [usize; 4],
        ceil_mode: bool,
    ) -> PoolAttrs {
        PoolAttrs {
            kernel,
            strides,
            pads,
            dilations: [1, 1],
            ceil_mode,
        }
    }

    fn iota(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(shape, (1..=n).map(|v| v as f32).collect()).unwrap()
    }

    // Expected values from the ONNX backend node tests and onnxruntime.

    #[test]
    fn onnx_maxpool_2d_ceil() {
        let y = max_pool(
            &attrs([3, 3], [2, 2], [0; 4], true),
            &iota(vec![1, 1, 4, 4]),
        )
        .unwrap();
        assert_eq!(y.shape(), &[1, 1, 2, 2]);
        assert_eq!(y.data(), &[11.0, 12.0, 15.0, 16.0]);
    }

    #[test]
    fn onnx_averagepool_2d_ceil() {
        let p = attrs([3, 3], [2, 2], [0; 4], true);
        let y = average_pool(&p, false, &iota(vec![1, 1, 4, 4])).unwrap();
        assert_eq!(y.data(), &[6.0, 7.5, 12.0, 13.5]);
    }

    #[test]
    fn onnx_averagepool_2d_precomputed_pads() {
        // 5x5 input 1..=25, 5x5 kernel, pads 2: the corner window holds
        // 1+2+3+6+7+8+11+12+13 = 63 over 9 cells, or over 25 with padding.
        // Expected values from onnxruntime 1.31.
        let p = attrs([5, 5], [1, 1], [2, 2, 2, 2], false);
        let x = iota(vec![1, 1, 5, 5]);
        let y = average_pool(&p, false, &x).unwrap();
        let want: Vec<f32> = (0..25)
            .map(|i| 7.0 + 2.5 * (i / 5) as f32 + 0.5 * (i % 5) as f32)
            .collect();
        assert_eq!(y.data(), want.as_slice());
        let y = average_pool(&p, true, &x).unwrap();
        #[rustfmt::skip]
        let want = [
            2.52, 3.6, 4.8, 4.08, 3.24,
            4.56, 6.4, 8.4, 7.04, 5.52,
            7.2, 10.0, 13.0, 10.8, 8.4,
            6.96, 9.6, 12.4, 10.24, 7.92,
            6.12, 8.4, 10.8, 8.88, 6.84,
        ];
        for (g, w) in y.data().iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn onnx_maxpool_2d_dilations() {
        let p = PoolAttrs {
            dilations: [2, 2],
            ..attrs([2, 2], [1, 1], [0; 4], false)
        };
        let y = max_pool(&p, &iota(vec![1, 1, 4, 4])).unwrap();
        assert_eq!(y.data(), &[11.0, 12.0, 15.0, 16.0]);
    }

    #[test]
    fn padding_never_wins_the_max() {
        let x = Tensor::new(vec![1, 1, 2, 2], vec![-4.0, -3.0, -2.0, -1.0]).unwrap();
        let y = max_pool(&attrs([2, 2], [1, 1], [1, 1, 1, 1], false), &x).unwrap();
        assert_eq!(
            y.data(),
            &[-4.0, -3.0, -3.0, -2.0, -1.0, -1.0, -2.0, -1.0, -1.0]
        );
    }

    #[test]
    fn ceil_mode_with_count_include_pad_clips_to_the_padded_extent() {
        // One row of 6 cells, pads (1, 1), kernel 3, stride 2, ceil_mode:
        // windows start at padded positions 0, 2, 4 and 6. The last covers
        // cell 5, one pad cell, and a cell past the padded extent (8): it
        // counts 2 cells with count_include_pad, 1 without.
        let x = iota(vec![1, 1, 1, 6]);
        let p = attrs([1, 3], [1, 2], [0, 1, 0, 1], true);
        let y = average_pool(&p, true, &x).unwrap();
        assert_eq!(y.data(), &[1.0, 3.0, 5.0, 3.0]);
        let y = average_pool(&p, false, &x).unwrap();
        assert_eq!(y.data(), &[1.5, 3.0, 5.0, 6.0]);
        // Without padding the last window (cells 4, 5, and 6 past the end)
        // has 2 cells either way.
        let p = attrs([1, 3], [1, 2], [0; 4], true);
        for include_pad in [false, true] {
            let y = average_pool(&p, include_pad, &x).unwrap();
            assert_eq!(y.data(), &[2.0, 4.0, 5.5]);
        }
    }

    #[test]
    fn ceil_mode_drops_a_window_starting_in_the_end_padding() {
        // 5 cells, pads (1, 1), kernel 2, stride 2: ceil would give 4
        // windows, but the 4th would start at padded position 6, the pad.
        let p = attrs([1, 2], [1, 2], [0, 1, 0, 1], true);
        let y = max_pool(&p, &iota(vec![1, 1, 1, 5])).unwrap();
        assert_eq!(y.data(), &[1.0, 3.0, 5.0]);
    }

    #[test]
    fn global_average_pool_keeps_spatial_dims() {
        let y = global_average_pool(&iota(vec![2, 3, 2, 2])).unwrap();
        assert_eq!(y.shape(), &[2, 3, 1, 1]);
        assert_eq!(y.data(), &[2.5, 6.5, 10.5, 14.5, 18.5, 22.5]);
        let y = global_average_pool(&iota(vec![1, 2, 3])).unwrap();
        assert_eq!((y.shape(), y.data()), (&[1, 2, 1][..], &[2.0, 5.0][..]));
        assert!(global_average_pool(&iota(vec![2, 3])).is_err());
        let y = global_average_pool(&Tensor::zeros(vec![1, 2, 0, 3])).unwrap();
        assert!(y.data().iter().all(|v| v.is_nan()));
    }

    #[test]
    fn shape_errors_name_the_axis() {
        let p = attrs([3, 3], [1, 1], [0; 4], false);
        assert!(
            max_pool(&p, &iota(vec![1, 4, 4]))
                .unwrap_err()
                .0
                .contains("[N, C, H, W]")
        );
        assert!(
            max_pool(&p, &iota(vec![1, 1, 4, 2]))
                .unwrap_err()
                .0
                .contains("along W")
        );
    }

    /// Pooling by brute force: place each window on a padded copy of the
    /// image, where out-of-input cells are marked `None`.
    fn naive(attrs: &PoolAttrs, x: &Tensor, max: bool, include_pad: bool) -> Tensor {
        let [n, c, h, w] = x.shape().try_into().unwrap();
        let [kh, kw] = attrs.kernel;
        let [sh, sw] = attrs.strides;
        let [dh, dw] = attrs.dilations;
        let [pt, pl, pb, pr] = attrs.pads;
        let (ph, pw) = (h + pt + pb, w + pl + pr);
        let out_len = |padded: usize, k: usize, s: usize, d: usize, begin: usize, input: usize| {
            let span = padded - (d * (k - 1) + 1);
            if attrs.ceil_mode {
                let mut o = span.div_ceil(s) + 1;
                if (o - 1) * s >= begin + input {
                    o -= 1;
                }
                o
            } else {
                span / s + 1
            }
        };
        let oh = out_len(ph, kh, sh, dh, pt, h);
        let ow = out_len(pw, kw, sw, dw, pl, w);
        let mut y = Vec::new();
        for plane in x.data().chunks(h * w).take(n * c) {
            for i in 0..oh {
                for j in 0..ow {
                    let mut cells = Vec::new();
                    let mut padded_cells = 0;
                    for ki in 0..kh {
                        for kj in 0..kw {
                            let (r, q) = (i * sh + ki * dh, j * sw + kj * dw);
                            if r < ph && q < pw {
                                padded_cells += 1;
                            }
                            if (pt..pt + h).contains(&r) && (pl..pl + w).contains(&q) {
                                cells.push(plane[(r - pt) * w + (q - pl)]);
                            }
                        }
                    }
                    y.push(if max {
                        cells.iter().copied().fold(f32::MIN, f32::max)
                    } else {
                        let d = if include_pad {
                            padded_cells
                        } else {
                            cells.len()
                        };
                        if d == 0 {
                            0.0
                        } else {
                            cells.iter().sum::<f32>() / d as f32
                        }
                    });
                }
            }
        }
        Tensor::new(vec![n, c, oh, ow], y).unwrap()
    }

    fn any_pool() -> impl Strategy<Value = (PoolAttrs, Vec<usize>)> {
        (
            (
                1usize..4,
                1usize..4,
                1usize..4,
                1usize..4,
                1usize..3,
                1usize..3,
            ),
            [0usize..3, 0usize..3, 0usize..3, 0usize..3],
            (1usize..3, 1usize..4, 1usize..10, 1usize..10, any::<bool>()),
        )
            .prop_map(
                |((kh, kw, sh, sw, dh, dw), pads, (n, c, h, w, ceil_mode))| {
                    let pads = [pads[0] % kh, pads[1] % kw, pads[2] % kh, pads[3] % kw];
                    let attrs = PoolAttrs {
                        kernel: [kh, kw],
                        strides: [sh, sw],
                        pads,
                        dilations: [dh, dw],
                        ceil_mode,
                    };
                    (attrs, vec![n, c, h, w])
                },
            )
            .prop_filter("window fits the padded input", |(a, x)| {
                let extent = |k: usize, d: usize| d * (k - 1) + 1;
                x[2] + a.pads[0] + a.pads[2] >= extent(a.kernel[0], a.dilations[0])
                    && x[3] + a.pads[1] + a.pads[3] >= extent(a.kernel[1], a.dilations[1])
            })
    }

    /// The row-wise MaxPool (no dilation) keeps the fold's answer where the
    /// order of `f32::max` could show: NaN cells, whole windows of NaN
    /// (`f32::MIN`), -inf, in pairs and in wider, padded windows.
    #[test]
    fn max_by_rows_ignores_nan_as_the_fold_does() {
        let cells = [
            f32::NAN,
            1.0,
            f32::NEG_INFINITY,
            -2.0,
            f32::NAN,
            f32::NAN,
            3.0,
        ];
        let data: Vec<f32> = (0..2 * 7 * 9).map(|i| cells[i % cells.len()]).collect();
        let x = Tensor::new(vec![1, 2, 7, 9], data).unwrap();
        for (kernel, strides, pads) in [
            ([2, 2], [2, 2], [0; 4]),
            ([3, 3], [2, 2], [1; 4]),
            ([2, 3], [1, 2], [1, 0, 0, 2]),
        ] {
            for ceil_mode in [false, true] {
                let p = attrs(kernel, strides, pads, ceil_mode);
                let (got, want) = (max_pool(&p, &x).unwrap(), naive(&p, &x, true, false));
                assert_eq!(got.shape(), want.shape());
                for (g, w) in got.data().iter().zip(want.data()) {
                    assert_eq!(g.to_bits(), w.to_bits(), "{p:?}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn random_pools_match_brute_force((attrs, shape) in any_pool(), seed in any::<u32>()) {
            let n: usize = shape.iter().product();
            let data = (0..n as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) % 1000)
                .map(|v| v as f32 / 100.0 - 5.0)
                .collect();
            let x = Tensor::new(shape, data).unwrap();
            prop_assert_eq!(max_pool(&attrs, &x).unwrap(), naive(&attrs, &x, true, false));
            for include_pad in [false, true] {
                let got = average_pool(&attrs, include_pad, &x).unwrap();
                let want = naive(&attrs, &x, false, include_pad);
                prop_assert_eq!(got.shape(), want.shape());
                for (g, w) in got.data().iter().zip(want.data()) {
                    prop_assert!((g - w).abs() < 1e-5, "{} vs {}", g, w);
                }
            }
        }
    }
}
