//! Direct convolution for images of few channels: the first Conv of an image
//! network (3 channels of RGB), where im2col unrolls a matrix only
//! `C * kH * kW` rows deep (27 for a 3x3 kernel) but as wide as the output, and
//! spends as long writing and packing it as the GEMM spends multiplying it.
//!
//! Here each output value is computed in registers: for a block of
//! [`BLOCK_OUTPUTS`] output channels and [`BLOCK_COLUMNS`] cells of an output
//! row, every tap of the kernel adds one weight per channel times a run of
//! [`BLOCK_COLUMNS`] input cells, loaded once for the whole block. The input is
//! first copied, with its padding, into one plane per channel and *column
//! phase* (input column modulo the stride), so that those runs are contiguous
//! at any stride: tap column `kj` of output column `j` reads phase `kj % s`,
//! cell `j + kj / s`.
//!
//! Measured per node (`mlcapsule bench --profile`, EPYC Zen 2), im2col and
//! `gemm` before, this after, at one and two threads:
//! - VGG-16's first Conv (3 to 64 channels, 3x3, 224x224): 4.7 to 3.1 ms and
//!   3.1 to 2.0 (onnxruntime at two threads: 2.3);
//! - ResNet-18's (7x7, stride 2): 3.6 to 2.9 ms and 2.0 to 1.6 (onnxruntime:
//!   1.65);
//! - MobileNetV2's (3x3, stride 2, to 32 channels) alone: 0.64 to 0.44 ms at
//!   one thread. In the network the node timed slower than im2col, but the
//!   whole query did not (11.32 to 11.23 ms, alternated runs).

use super::{BLOCKS_PER_THREAD, Geometry, copy_strided, split_rows};
use crate::graph::Activation;
use crate::kernels;
use crate::threads::{for_each_chunk, for_each_task, threads};

/// Output channels computed together: each input run loaded feeds this many.
pub(crate) const BLOCK_OUTPUTS: usize = 6;

/// Output cells of a row computed together: two AVX2 vectors per channel, so
/// that with [`BLOCK_OUTPUTS`] channels 12 vectors of sums (enough to keep the
/// FMA units busy), the two of cells and the weight fill the 16 registers.
pub(crate) const BLOCK_COLUMNS: usize = 16;

/// Most input channels taken here.
const MAX_CHANNELS: usize = 4;

/// Fewest output cells per row: narrower rows waste most of a block.
const MIN_OUTPUT_WIDTH: usize = BLOCK_COLUMNS;

/// True when the Conv of `geo` is computed here: one group, no dilation, few
/// input channels (at least one: with none, im2col's empty sums give the bias),
/// and rows wide enough.
pub(super) fn applies(geo: &Geometry) -> bool {
    geo.group == 1
        && (1..=MAX_CHANNELS).contains(&geo.channels)
        && geo.h.dilation() == 1
        && geo.w.dilation() == 1
        && geo.w.output() >= MIN_OUTPUT_WIDTH
}

/// The input of one image as [`kernels::direct_row`] reads it, and one block's
/// weights.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DirectInput<'a> {
    /// `[C, stride, rows, pitch]`: each channel's padded plane, split by column
    /// phase, zero outside the image.
    pub planes: &'a [f32],
    /// The stride along H.
    pub row_stride: usize,
    /// Cells per row of a phase plane.
    pub pitch: usize,
    /// Where each tap's cells start, counted from the first cell that output
    /// cell `(0, 0)` reads; taps in `[C, kH, kW]` order.
    pub offsets: &'a [usize],
    /// The block's weights, one array of [`BLOCK_OUTPUTS`] per tap, in the
    /// order of `offsets` (zero for channels past the layer's last).
    pub taps: &'a [[f32; BLOCK_OUTPUTS]],
    pub bias: [f32; BLOCK_OUTPUTS],
    /// Applied to each sum as it is stored.
    pub activation: Activation,
}

/// Output row `oh` of a block of output channels: `rows[i]` (the row of the
/// block's channel `i`, all of them as long) gets the bias plus every tap's
/// weight times its input cell, summed in tap order, then the activation.
#[inline(always)]
pub(crate) fn direct_row_body<const FMA: bool>(
    input: &DirectInput<'_>,
    oh: usize,
    rows: &mut [&mut [f32]],
) {
    let width = rows.first().map_or(0, |r| r.len());
    for first in (0..width).step_by(BLOCK_COLUMNS) {
        let base = oh * input.row_stride * input.pitch + first;
        let mut acc = [[0.0f32; BLOCK_COLUMNS]; BLOCK_OUTPUTS];
        for (a, &b) in acc.iter_mut().zip(&input.bias) {
            *a = [b; BLOCK_COLUMNS];
        }
        for (&offset, weights) in input.offsets.iter().zip(input.taps) {
            let cells = &input.planes[base + offset..][..BLOCK_COLUMNS];
            for (a, &w) in acc.iter_mut().zip(weights) {
                for (v, &x) in a.iter_mut().zip(cells) {
                    *v = kernels::fmadd::<FMA>(w, x, *v);
                }
            }
        }
        let len = BLOCK_COLUMNS.min(width - first);
        for (row, a) in rows.iter_mut().zip(&acc) {
            for (y, &v) in row[first..first + len].iter_mut().zip(a) {
                *y = input.activation.apply(v);
            }
        }
    }
}

/// Computes the Conv of `geo` (for which [`applies`] holds) into `y`, then adds
/// `residual` (laid out like `y`) and applies the activation.
pub(super) fn conv(
    geo: &Geometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    let (c, m) = (geo.channels, geo.out_channels);
    let [kh, kw] = [geo.h.kernel(), geo.w.kernel()];
    let (sh, sw) = (geo.h.stride(), geo.w.stride());
    let (height, width) = (geo.h.input(), geo.w.input());
    let (out_height, out_width) = (geo.h.output(), geo.w.output());
    let out_plane = geo.out_plane();
    // Rows read: up to (OH - 1) sh + kH; cells per phase row: the last block
    // reads up to OW rounded up to a block, plus the widest shift.
    let rows = (out_height - 1) * sh + kh;
    let pitch = out_width.next_multiple_of(BLOCK_COLUMNS) + (kw - 1) / sw;
    let plane = rows * pitch;
    let taps = c * kh * kw;
    // Each block's weights, tap-major.
    let blocks = m.div_ceil(BLOCK_OUTPUTS);
    let mut packed = vec![[0.0f32; BLOCK_OUTPUTS]; blocks * taps];
    for (o, kernel) in w.chunks_exact(taps).enumerate() {
        let (block, lane) = (o / BLOCK_OUTPUTS, o % BLOCK_OUTPUTS);
        for (t, &v) in kernel.iter().enumerate() {
            packed[block * taps + t][lane] = v;
        }
    }
    // Tap (ch, ki, kj) reads phase kj % sw of channel ch, kj / sw cells right.
    let mut offsets = Vec::with_capacity(taps);
    for ch in 0..c {
        for ki in 0..kh {
            for kj in 0..kw {
                offsets.push((ch * sw + kj % sw) * plane + ki * pitch + kj / sw);
            }
        }
    }
    let mut planes = crate::buffers::take(c * sw * plane);
    let (top, left) = (geo.h.pad_begin(), geo.w.pad_begin());
    // By index, not `chunks_exact`: an image may have no cells (all padding).
    let in_len = c * height * width;
    for (n, out) in y.chunks_exact_mut(m * out_plane).enumerate() {
        let image = &x[n * in_len..][..in_len];
        // Padded cell (r, phase + s j) is input cell (r - top, phase + s j - left).
        // One plane per task: channel `i / sw`, phase `i % sw`. (Built on the
        // query's thread alone, the planes were 3-9 % of a first Conv's samples;
        // split, at two threads ResNet-18's first Conv went 1.70 → 1.62 ms,
        // VGG-16's 2.14 → 2.10, whole queries 23.72 → 23.39 and MobileNetV2's
        // 7.37 → 7.29, alternated.)
        for_each_chunk(
            &mut planes,
            plane,
            || (),
            |(), i, dst| {
                let (ch, phase) = (i / sw, i % sw);
                let source = &image[ch * height * width..][..height * width];
                for (r, dst_row) in dst.chunks_exact_mut(pitch).enumerate() {
                    let src = r
                        .checked_sub(top)
                        .filter(|&ir| ir < height)
                        .map(|ir| &source[ir * width..][..width]);
                    phase_row(src, phase, sw, left, dst_row);
                }
            },
        );
        let planes = &planes[..];
        let residual = residual.map(|r| &r[n * m * out_plane..][..m * out_plane]);
        // Bands of output rows, a few per thread; each task computes every
        // channel of its rows, so the input rows they read stay in cache.
        let per = out_height.div_ceil(BLOCKS_PER_THREAD * threads()).max(1);
        let work = split_rows(out, out_plane, out_height, per, |rows| {
            rows.len() * out_width
        });
        let activation = match residual {
            // Added before the activation, below.
            Some(_) => Activation::None,
            None => geo.activation,
        };
        let inputs: Vec<DirectInput<'_>> = (0..blocks)
            .map(|block| DirectInput {
                planes,
                row_stride: sh,
                pitch,
                offsets: &offsets,
                taps: &packed[block * taps..][..taps],
                bias: std::array::from_fn(|i| {
                    let o = block * BLOCK_OUTPUTS + i;
                    bias.and_then(|b| b.get(o)).copied().unwrap_or(0.0)
                }),
                activation,
            })
            .collect();
        for_each_task(work, |(band, mut segments)| {
            for (i, oh) in band.enumerate() {
                for (input, outputs) in inputs.iter().zip(segments.chunks_mut(BLOCK_OUTPUTS)) {
                    // On the stack: a `Vec` here was a `malloc` and a `free` per
                    // row and block, 3 % of MobileNetV2's first Conv alone.
                    let count = outputs.len();
                    let mut cells = outputs
                        .iter_mut()
                        .map(|s| &mut s[i * out_width..][..out_width]);
                    let mut rows: [&mut [f32]; BLOCK_OUTPUTS] =
                        std::array::from_fn(|_| cells.next().unwrap_or_default());
                    kernels::direct_row(input, oh, &mut rows[..count]);
                }
                if let Some(r) = residual {
                    for (o, segment) in segments.iter_mut().enumerate() {
                        let at = o * out_plane + oh * out_width;
                        let row = &mut segment[i * out_width..][..out_width];
                        kernels::bias_add_activate(row, 0.0, &r[at..][..out_width], geo.activation);
                    }
                }
            }
        });
    }
    crate::buffers::give(planes);
}

/// One row of a phase plane: `dst[j]` is input cell `phase + stride * j - left`
/// of `src` (the padded row's input row, if any), or 0 outside it.
fn phase_row(src: Option<&[f32]>, phase: usize, stride: usize, left: usize, dst: &mut [f32]) {
    // The first cell at or right of the left padding, and the input cell it reads.
    let start = left.saturating_sub(phase).div_ceil(stride).min(dst.len());
    let from = (phase + stride * start).saturating_sub(left);
    let (pad, rest) = dst.split_at_mut(start);
    pad.fill(0.0);
    let Some(src) = src.and_then(|s| s.get(from..)) else {
        rest.fill(0.0);
        return;
    };
    let count = src.len().div_ceil(stride).min(rest.len());
    let (cells, right) = rest.split_at_mut(count);
    right.fill(0.0);
    copy_strided(src, stride, cells);
}
