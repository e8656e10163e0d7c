//! Conv: 2-D convolution over NCHW images with groups, stride, padding,
//! dilation, an optional bias and a fused activation.
//!
//! One of five strategies per call:
//! - *depthwise* (`group == C == M`): a direct loop per channel plane. Each
//!   group's GEMM would have a single row, too thin for a GEMM kernel. The
//!   common 3x3 case with one cell of padding and stride 1 or 2 has its own
//!   kernel ([`depthwise3x3_body`]) that computes each output row in one
//!   vectorised pass over nine shifted input rows. With AVX-512, output
//!   rows of at most 32 cells keep each input row in one or two vectors,
//!   loaded once for the output rows that read it
//!   ([`kernels::depthwise3x3_stride1`] and `_stride2`, which at stride 2
//!   also has an AVX2 form); at stride 2 into rows of at most 8 cells (and
//!   narrow planes on AVX2) planes go sixteen at a time, one per vector lane
//!   ([`kernels::depthwise3x3_x16`]).
//! - *Winograd* F(2x2, 3x3) (3x3 kernel, stride 1, no dilation, one group,
//!   at least 16 channels in and out, and at least 48 output tiles of 2x2
//!   on one thread, 64 per thread on more unless 256 channels or more go
//!   by blocks of output channels over the threads): 16 GEMMs
//!   on transformed weights and inputs, 16 multiply-adds per tile and
//!   channel pair instead of 36 (see [`winograd`]).
//! - *direct* (one group, no dilation, at most 4 input channels: an image
//!   network's first Conv): each output computed in registers from a padded
//!   copy of the image, split by column phase for strided kernels (see
//!   [`direct`]).
//! - *pointwise* (1x1 kernel, stride 1, no padding): an image `[C, H*W]` is
//!   already the GEMM's right operand, so the product reads it in place.
//!   With AVX-512, products of at most [`TILE_MAX_DEPTH`] input channels,
//!   and deeper ones with few output channels or on a 7x7 plane where it
//!   pays ([`Unit::by_pointwise_kernel`]), go to a kernel of ours instead
//!   ([`kernels::pointwise`]), which also applies the bias, the residual and
//!   the activation.
//! - otherwise, *im2col*: each batch item and group is unrolled into a
//!   `[C/group * kH * kW, OH * OW]` matrix of receptive fields, then one GEMM
//!   with the weights `[M/group, C/group * kH * kW]` yields its outputs. A
//!   large image is unrolled a band of output rows at a time
//!   ([`PANEL_LEN`]), into a buffer reused across bands and calls, so the
//!   unrolled matrix stays in cache and is never allocated whole. With
//!   AVX-512, the matrix of a 7x7 output (49 columns) goes to
//!   [`kernels::pointwise`] instead of `gemm` ([`Unit::unrolled_by_kernel`]).
//!
//! The GEMM only writes its output (`beta = 0`); bias, the residual of a
//! fused Add (see [`conv`]) and activation are then applied in one pass
//! over each output block while it is in cache.
//! With more than one thread, one product is split into tasks that each do
//! their share of im2col, GEMM, bias and activation ([`Unit`]); with small
//! products and several batch items or groups, each task takes whole ones.

mod direct;
mod winograd;

use std::borrow::Cow;
use std::ops::Range;

use super::elementwise::{activation, bias_activate_body, binary, clip, relu};
use super::window::Axis;
use super::{KernelResult, Mismatch};
use crate::graph::{Activation, ConvAttrs};
use crate::kernels::{self, MatMut, MatRef, fmadd};
use crate::tensor::{Tensor, volume};
use crate::threads::{for_each_chunk, for_each_task};

pub(crate) use direct::{BLOCK_COLUMNS, BLOCK_OUTPUTS, DirectInput, direct_row_body};
pub(crate) use winograd::{
    Arith, OutputRows, TileSource, Tiling, f4_input, f4_output, f4_weights, winograd_input_body,
    winograd_output_body, winograd_weights_body, winograd4_input_body, winograd4_output_body,
    winograd4_weights_body,
};

/// Most elements of the im2col matrix unrolled at once (1 MiB of `f32`):
/// a band stays in cache between im2col and the GEMM's packing. Smaller
/// bands make the GEMM calls too narrow (measured on ResNet-18).
const PANEL_LEN: usize = 1 << 18;

/// Runs Conv on X `[N, C, H, W]`, W `[M, C/group, kH, kW]` and B `[M]`,
/// then adds `residual` (when given: the other operand of an Add that read
/// the Conv) before the activation.
pub(crate) fn conv(
    attrs: &ConvAttrs,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> KernelResult {
    conv_with(attrs, x, w.shape(), Kernels::Read(w.data()), bias, residual)
}

/// [`conv`] on weights W that the caller hands over: they are zeros when it
/// returns, whether it succeeds or fails. Where the Conv goes by Winograd's
/// blocks of output channels, each block of W is overwritten as soon as it
/// is transformed, and where it goes by depth onto a 7x7 plane
/// ([`spend_by_depth`]), as soon as it is summed: while it is in cache (see
/// [`spends`]). Otherwise W is overwritten after the Conv.
pub(crate) fn conv_spending(
    attrs: &ConvAttrs,
    x: &Tensor,
    w: &mut Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> KernelResult {
    let shape = w.shape().to_vec();
    let result = conv_with(
        attrs,
        x,
        &shape,
        Kernels::Spend(w.data_mut()),
        bias,
        residual,
    );
    if result.is_err() {
        w.data_mut().fill(0.0);
    }
    result
}

/// True when a Conv (`attrs`) on X, W and B of these shapes overwrites W
/// block by block as it reads it, if handed W ([`conv_spending`]): a
/// Winograd Conv computed by blocks of output channels, or a deep im2col
/// Conv onto a 7x7 plane split by depth ([`spend_by_depth`]).
pub(crate) fn spends(attrs: &ConvAttrs, x: &[usize], w: &[usize], bias: Option<&[usize]>) -> bool {
    Geometry::new(attrs, x, w, bias)
        .is_ok_and(|geo| by_winograd_blocks(&geo) || spends_by_depth(&geo))
}

/// True when the Conv of `geo` goes by im2col, [`Unit::by_depth`] and
/// [`kernels::pointwise`] with the whole image in each task's one band (one
/// image and group, a plane whose last cell the kernel sets apart: ResNet-18's
/// layer4 at 7x7, on AVX-512 and more than one thread): [`spend_by_depth`]
/// then computes it on W handed over, as [`grouped`] would on W read.
fn spends_by_depth(geo: &Geometry) -> bool {
    let tasks = crate::threads::threads();
    let taps = geo.kernel_len();
    let depth = geo.channels * taps;
    let plane = geo.out_plane();
    let part = geo.channels.div_ceil(tasks) * taps;
    geo.batch == 1
        && geo.group == 1
        && !geo.is_pointwise()
        && !geo.is_depthwise()
        && !direct::applies(geo)
        && !winograd::applies(geo)
        && tasks > 1
        && geo.channels >= tasks
        && im2col_splits_by_depth(depth, plane)
        && kernels::pointwise_sets_apart(plane)
        && PANEL_LEN / (part * geo.w.output()).max(1) >= geo.h.output()
}

/// [`Unit::by_depth`] with [`kernels::pointwise`] (where [`spends_by_depth`]
/// holds) on weights `w` handed over: each task takes its input channels'
/// part of every output channel's row of W ([`kernels::Taps::Spent`]), and
/// the kernel overwrites each block of six rows' part with zeros as soon as it
/// has summed them, while they are in cache. Read, W is wiped after the Conv
/// by a pass over memory: ResNet-18's layer4 (three 9.4 MB layers and one of
/// 4.7 MB) took 229-305 µs and 100-119 µs per layer for it between two nodes,
/// at two threads. Spent, its streaming/plain there went 0.991x, 0.955x and
/// 0.972x as high in three runs of `bench/ab.py --mode sealed-streaming` (8
/// rounds each; 1.33-1.39 before): the zeroed lines still go back to memory,
/// and no wipe at all of those layers would have given 0.943x.
fn spend_by_depth(
    geo: &Geometry,
    x: &[f32],
    w: &mut [f32],
    terms: (Option<&[f32]>, Option<&[f32]>),
    y: &mut [f32],
) {
    let taps = geo.kernel_len();
    let (plane, in_plane) = (geo.out_plane(), geo.in_plane());
    let per = geo.channels.div_ceil(crate::threads::threads()).max(1);
    // Each part of the input channels, with its columns of every row of W.
    let parts = split_rows(w, geo.channels * taps, geo.channels, per, |part| {
        part.len() * taps
    });
    let mut partials: Vec<Vec<f32>> = parts[1..]
        .iter()
        .map(|_| crate::buffers::take(y.len()))
        .collect();
    let dests = std::iter::once(&mut *y).chain(partials.iter_mut().map(Vec::as_mut_slice));
    let work: Vec<_> = parts.into_iter().zip(dests).collect();
    let columns = geo.valid_columns();
    let zeros = vec![0.0; geo.out_channels];
    for_each_task(work, |((part, rows), dest)| {
        let depth = part.len() * taps;
        let image = &x[part.start * in_plane..part.end * in_plane];
        with_scratch(|scratch| {
            grow(&mut scratch.columns, depth * plane);
            let col = &mut scratch.columns[..depth * plane];
            im2col(geo, &columns, image, 0..geo.h.output(), col);
            let mut tile = kernels::Pointwise {
                image: col,
                plane,
                weights: kernels::Taps::Spent(rows),
                depth,
                bias: &zeros,
                residual: None,
                activation: Activation::None,
                columns: 0..plane,
            };
            let mut out: Vec<&mut [f32]> = dest.chunks_mut(plane).collect();
            let done = kernels::pointwise(&mut tile, &mut out, &mut scratch.panel);
            debug_assert!(done, "spends_by_depth checked for AVX-512");
        });
    });
    add_partials(geo, terms, y, partials);
}

/// True when the Conv of `geo` goes by Winograd's blocks of output channels:
/// neither depthwise nor direct, and Winograd by blocks on these threads.
fn by_winograd_blocks(geo: &Geometry) -> bool {
    !geo.is_depthwise() && !direct::applies(geo) && winograd::spends(geo)
}

/// A Conv's weights W as a strategy reads them.
pub(crate) enum Kernels<'a> {
    /// Read in place, left as they are.
    Read(&'a [f32]),
    /// Handed over ([`conv_spending`]): overwritten with zeros once read.
    Spend(&'a mut [f32]),
}

impl<'a> Kernels<'a> {
    /// The values of W.
    fn values(&self) -> &[f32] {
        match self {
            Kernels::Read(w) => w,
            Kernels::Spend(w) => w,
        }
    }

    /// W cut into consecutive pieces of `len` values (the last one shorter).
    fn pieces(self, len: usize) -> Vec<Kernels<'a>> {
        match self {
            Kernels::Read(w) => w.chunks(len.max(1)).map(Kernels::Read).collect(),
            Kernels::Spend(w) => w.chunks_mut(len.max(1)).map(Kernels::Spend).collect(),
        }
    }
}

/// [`conv`] on `w` (W's values, of shape `w_shape`). Spent W is zeros
/// when it returns `Ok`; on errors [`conv_spending`] overwrites it.
fn conv_with(
    attrs: &ConvAttrs,
    x: &Tensor,
    w_shape: &[usize],
    w: Kernels<'_>,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> KernelResult {
    let mut geo = Geometry::new(attrs, x.shape(), w_shape, bias.map(Tensor::shape))?;
    let shape = vec![geo.batch, geo.out_channels, geo.h.output(), geo.w.output()];
    let len = volume(&shape)
        .ok_or_else(|| Mismatch(format!("the output shape {shape:?} is too large")))?;
    let residual = match residual {
        Some(r) if r.shape() != shape => {
            // Broadcast: the Conv, then the Add and the activation as nodes.
            let plain = ConvAttrs {
                activation: Activation::None,
                ..attrs.clone()
            };
            let y = conv_with(&plain, x, w_shape, w, bias, None)?;
            let y = binary(Cow::Owned(y), Cow::Borrowed(r), |a, b| a + b)?;
            return Ok(activation(Cow::Owned(y), attrs.activation));
        }
        r => r.map(Tensor::data),
    };
    // Every strategy writes every output element.
    let mut y = crate::buffers::take(len);
    if len > 0 && by_winograd_blocks(&geo) {
        winograd::conv(&geo, x.data(), w, bias.map(Tensor::data), residual, &mut y);
        return Ok(Tensor::from_parts(shape, y));
    }
    let w = match w {
        Kernels::Spend(w) if len > 0 && spends_by_depth(&geo) => {
            let terms = (bias.map(Tensor::data), residual);
            spend_by_depth(&geo, x.data(), w, terms, &mut y);
            return Ok(Tensor::from_parts(shape, y));
        }
        w => w,
    };
    if len > 0 {
        let bias = bias.map(Tensor::data);
        let values = w.values();
        if geo.is_depthwise() {
            // Depthwise adds the residual in a pass of its own, after the bias.
            let act = match residual {
                Some(_) => std::mem::replace(&mut geo.activation, Activation::None),
                None => geo.activation,
            };
            depthwise(&geo, x.data(), values, bias, &mut y);
            if let Some(r) = residual {
                kernels::bias_add_activate(&mut y, 0.0, r, act);
            }
        } else if direct::applies(&geo) {
            direct::conv(&geo, x.data(), values, bias, residual, &mut y);
        } else if winograd::applies(&geo) {
            winograd::conv(
                &geo,
                x.data(),
                Kernels::Read(values),
                bias,
                residual,
                &mut y,
            );
        } else {
            grouped(&geo, x.data(), values, bias, residual, &mut y)?;
        }
    }
    if let Kernels::Spend(w) = w {
        w.fill(0.0);
    }
    Ok(Tensor::from_parts(shape, y))
}

/// Narrowest plane a depthwise Conv overwrites ([`depthwise_over_input`]).
/// The kernel stores a row with a masked 64-byte store and then loads the
/// row after next: on planes narrower than 8 cells the two overlap within
/// those 64 bytes, and the load waits for the store. MobileNetV2's
/// depthwise Convs on 7x7 planes took 86 µs in place against 30 apart.
const IN_PLACE_MIN_WIDTH: usize = 8;

/// A depthwise Conv computed over X's own buffer, for a caller that hands X
/// over: `Ok(Y)` where [`kernels::depthwise3x3_stride1_in_place`] applies (3x3
/// kernels, one cell of padding, stride 1, planes [`IN_PLACE_MIN_WIDTH`] to 32
/// cells wide, a CPU with AVX-512), else `Err(x)`, untouched, for [`conv`].
///
/// The depthwise Convs of MobileNetV2's blocks read a value that only they
/// read. Written apart, their output is a second buffer as large as the
/// input (300 KB at 14x14 with 384 channels), and at two threads a recycled
/// one whose lines the other core last read: the depthwise Convs at 14x14
/// then took 25 µs, and 12 µs in place (all of MobileNetV2's depthwise Convs
/// together 0.61 → 0.52 ms; at one thread 0.871 → 0.865). The cost then
/// moves to whichever Conv next writes into a buffer both cores read
/// (MobileNetV2's expansions: +0.06 ms), unless the Conv that reads the
/// depthwise output, a 1x1 projection, splits by depth ([`Unit::by_depth`]):
/// then each core reads only its own channels.
pub(crate) fn depthwise_over_input(
    attrs: &ConvAttrs,
    x: Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<KernelResult, Tensor> {
    let Ok(geo) = Geometry::new(attrs, x.shape(), w.shape(), bias.map(Tensor::shape)) else {
        return Err(x);
    };
    let applies = geo.is_depthwise()
        && geo.h.is_3x3_pad1()
        && geo.w.is_3x3_pad1()
        && geo.h.stride() == 1
        && geo.w.stride() == 1
        && (IN_PLACE_MIN_WIDTH..=32).contains(&geo.w.input())
        && kernels::isa() == kernels::Isa::Avx512
        && !x.is_empty();
    if !applies {
        return Err(x);
    }
    let (shape, mut data) = x.into_parts();
    let plane_len = geo.in_plane();
    let (w, bias) = (w.data(), bias.map(Tensor::data));
    let work = data.len().saturating_mul(9);
    let tasks = if work >= DEPTHWISE_PARALLEL_MIN {
        crate::threads::threads() * BLOCKS_PER_THREAD
    } else {
        1
    };
    let per_task = data.len().div_ceil(plane_len).div_ceil(tasks);
    for_each_chunk(
        &mut data,
        per_task * plane_len,
        || (),
        |(), index, block| {
            for (i, plane) in block.chunks_mut(plane_len).enumerate() {
                let c = (index * per_task + i) % geo.channels;
                let taps: &[f32; 9] = w[c * 9..][..9].try_into().expect("a 3x3 kernel");
                let mut one = kernels::OnePlane {
                    plane,
                    width: geo.w.input(),
                    taps,
                    bias: bias.map_or(0.0, |b| b[c]),
                    activation: geo.activation,
                };
                let done = kernels::depthwise3x3_stride1_in_place(&mut one);
                debug_assert!(done, "checked above");
            }
        },
    );
    Ok(Ok(Tensor::from_parts(shape, data)))
}

/// The sizes of one Conv call, checked against each other.
struct Geometry {
    batch: usize,
    channels: usize,
    out_channels: usize,
    group: usize,
    h: Axis,
    w: Axis,
    activation: Activation,
}

impl Geometry {
    fn new(
        attrs: &ConvAttrs,
        x: &[usize],
        w: &[usize],
        bias: Option<&[usize]>,
    ) -> Result<Geometry, Mismatch> {
        let fail = |reason: String| Err(Mismatch(reason));
        let &[batch, channels, height, width] = x else {
            return fail(format!("X must have shape [N, C, H, W], got {x:?}"));
        };
        let &[out_channels, group_channels, kh, kw] = w else {
            return fail(format!("W must have shape [M, C/group, kH, kW], got {w:?}"));
        };
        let group = attrs.group;
        if group == 0 {
            return fail("group must be at least 1".into());
        }
        if !channels.is_multiple_of(group) {
            return fail(format!(
                "X has {channels} channels, which do not split into {group} groups"
            ));
        }
        if group_channels != channels / group {
            return fail(format!(
                "X has {channels} channels in {group} groups, so W's shape must be \
                 [M, {}, kH, kW]; got {w:?}",
                channels / group
            ));
        }
        if !out_channels.is_multiple_of(group) {
            return fail(format!(
                "W has {out_channels} output channels, which do not split into {group} groups"
            ));
        }
        if [kh, kw] != attrs.kernel {
            return fail(format!(
                "W's kernel is {kh}x{kw} but the node's kernel_shape is {}x{}",
                attrs.kernel[0], attrs.kernel[1]
            ));
        }
        if let Some(b) = bias
            && b != [out_channels]
        {
            return fail(format!("B must have shape [{out_channels}], got {b:?}"));
        }
        let [sh, sw] = attrs.strides;
        let [dh, dw] = attrs.dilations;
        let [top, left, bottom, right] = attrs.pads;
        let h = Axis::new(height, kh, sh, dh, (top, bottom), false)
            .map_err(|e| Mismatch(format!("along H: {e}")))?;
        let w = Axis::new(width, kw, sw, dw, (left, right), false)
            .map_err(|e| Mismatch(format!("along W: {e}")))?;
        Ok(Geometry {
            batch,
            channels,
            out_channels,
            group,
            h,
            w,
            activation: attrs.activation,
        })
    }

    fn is_depthwise(&self) -> bool {
        self.group == self.channels && self.group == self.out_channels
    }

    fn is_pointwise(&self) -> bool {
        self.h.is_identity() && self.w.is_identity()
    }

    fn kernel_len(&self) -> usize {
        self.h.kernel() * self.w.kernel()
    }

    fn in_plane(&self) -> usize {
        self.h.input() * self.w.input()
    }

    fn out_plane(&self) -> usize {
        self.h.output() * self.w.output()
    }

    /// For each kernel column, the output columns it reads the input at.
    fn valid_columns(&self) -> Vec<Range<usize>> {
        (0..self.w.kernel())
            .map(|kj| self.w.valid_outputs(kj))
            .collect()
    }
}

/// The GEMM strategies: one product per batch item and group. The output
/// is not empty.
fn grouped(
    geo: &Geometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    y: &mut [f32],
) -> Result<(), Mismatch> {
    let group_channels = geo.channels / geo.group;
    let group_outputs = geo.out_channels / geo.group;
    // Bounded by W's length: the output is not empty, so M >= 1.
    let depth = group_channels * geo.kernel_len();
    let (in_plane, out_plane) = (geo.in_plane(), geo.out_plane());
    let pointwise = geo.is_pointwise();
    if !pointwise {
        volume(&[depth, out_plane])
            .ok_or_else(|| Mismatch("the im2col matrix is too large".into()))?;
    }
    let columns = geo.valid_columns();
    let out_width = geo.w.output();
    // Output rows per im2col band: the whole image when it fits.
    let band = (PANEL_LEN / (depth * out_width).max(1)).clamp(1, geo.h.output());

    let unit_len = group_outputs * out_plane;
    // Computes the outputs of `unit` (batch item * group) into `out` with
    // `tasks` tasks.
    let run = |unit: usize, out: &mut [f32], tasks: usize| {
        let (n, g) = (unit / geo.group, unit % geo.group);
        let image =
            &x[(n * geo.channels + g * group_channels) * in_plane..][..group_channels * in_plane];
        let unit = Unit {
            geo,
            columns: &columns,
            image,
            weights: &w[g * group_outputs * depth..][..group_outputs * depth],
            bias: bias.map(|b| &b[g * group_outputs..][..group_outputs]),
            residual: residual.map(|r| &r[unit * unit_len..][..unit_len]),
            depth,
            band,
        };
        let by_depth = if pointwise {
            depth >= POINTWISE_DEPTH_SPLIT_RATIO * group_outputs
                && size_of::<f32>() * depth * out_plane <= tasks * POINTWISE_DEPTH_SPLIT_MAX_BYTES
        } else {
            im2col_splits_by_depth(depth, out_plane)
        };
        if tasks > 1 && by_depth && group_channels >= tasks {
            unit.by_depth(out, tasks);
            return;
        }
        // Split the weights, not the image, when they are by far the larger
        // operand: every task packs the operand it shares whole. (At twice,
        // a 512-channel 3x3 Conv on 14x14 got 6 % slower at 2 threads.)
        let by_channels = tasks > 1
            && group_outputs >= ROW_SPLIT_MIN * tasks
            && (pointwise || 4 * out_plane <= group_outputs);
        unit.tiles(out, tasks, by_channels);
    };

    let units = geo.batch * geo.group;
    let threads = crate::threads::threads();
    // Enough units to share evenly, or products too small to split.
    let by_units = (units >= threads && units.is_multiple_of(threads)) || units >= 4 * threads;
    if units > 1 && (by_units || !kernels::splits_itself(group_outputs, depth, out_plane)) {
        // One task per unit, each single-threaded.
        for_each_chunk(y, unit_len, || (), |(), unit, out| run(unit, out, 1));
    } else {
        // One unit at a time, each split over the threads.
        for (unit, out) in y.chunks_mut(unit_len).enumerate() {
            run(unit, out, threads);
        }
    }
    Ok(())
}

/// Most elements of a task's GEMM output buffer for pointwise products
/// (256 KiB): it stays in cache until copied out.
const TILE_LEN: usize = 1 << 16;

/// Deepest pointwise product cut into tiles: with few input channels the
/// product is bound by writing its output, with more the GEMM's repacking
/// of the weights for every tile costs more than the tiles save.
const TILE_MAX_DEPTH: usize = 64;

/// Deepest pointwise product that [`Unit::by_pointwise_kernel`] takes. The
/// deepest it was measured on is 576 (MobileNetV2's projections at 14x14).
const KERNEL_MAX_DEPTH: usize = 1024;

/// Most output channels of a pointwise product deeper than [`TILE_MAX_DEPTH`]
/// that [`Unit::by_pointwise_kernel`] takes. MobileNetV2's projections (96-576
/// channels in, 24-96 out), per node in the network against `gemm`,
/// alternated: at two threads, where those of 24-32 outputs are split by
/// columns and `gemm` writes into a buffer that is then copied, 0.85-0.90x;
/// at one thread 0.93x at 14x14, but 1.07x at 28x28 and 56x56 (those stay
/// with `gemm` there). Whole MobileNetV2 0.950x at two threads and 0.992x at
/// one (medians of 12 rounds). With up to 320 outputs, MobileNetV2's
/// projections at 7x7 (160-320 out) took 1.07-1.08x their time with `gemm`.
const KERNEL_DEEP_MAX_OUTPUTS: usize = 96;

/// Largest plane on which [`Unit::by_pointwise_kernel`] takes a deep product
/// whose tile has whole rows (see [`KERNEL_DEEP_MAX_OUTPUTS`]).
const KERNEL_DEEP_MAX_PLANE: usize = 256;

/// Most bytes of weights a task of [`Unit::tiles`] prefetches into L2
/// ([`kernels::prefetch_l2`]) before its products read them. MobileNetV2's
/// largest 1x1 Conv (320 -> 1280, 1.6 MB, more than a Zen 4 core's 1 MB of
/// L2) still went 0.59 → 0.52 ms inside the network at one thread with it;
/// weights several times the L2 (ResNet-18's deep 3x3 Convs, 2.4-9.4 MB)
/// would evict their own first lines before the product reads them.
const PREFETCH_MAX_BYTES: usize = 2 << 20;

/// Fewest output channels per task for which a pointwise product is split
/// by channels (each task then packs the whole image for the GEMM; fewer
/// channels than this and splitting the image's columns is cheaper). A
/// split by columns copies each task's product out of a buffer of its own
/// (4.5 % of MobileNetV2 at 2 threads with 64 here); 32 made MobileNetV2
/// 3-4 % faster at 2 threads than 64, and 16 was no better than 32.
const ROW_SPLIT_MIN: usize = 32;

/// Fewest input channels per output channel for which a pointwise product
/// is split over its input channels ([`Unit::by_depth`]): MobileNetV2's
/// projections (3-6 per output channel), not its expansions (1/6).
const POINTWISE_DEPTH_SPLIT_RATIO: usize = 2;

/// Most bytes of image per task for which a pointwise product is split over
/// its input channels ([`Unit::by_depth`]): then each task's channels, which
/// the depthwise Conv before it computed on the same thread, can still be in
/// that core's cache (1 MiB of L2 on Zen 4). MobileNetV2's projections at
/// 56x56 (144 channels, 0.9 MB a task) took 1.21-1.33x as long split so.
const POINTWISE_DEPTH_SPLIT_MAX_BYTES: usize = 512 << 10;

/// Shallowest im2col product that [`Unit::by_depth`] splits over its depth.
const DEPTH_SPLIT_MIN: usize = 1024;

/// Fewest rows of depth per output cell for which an im2col product is split
/// over its depth (see [`Unit::by_depth`]): ResNet-18's 3x3 Convs at 14x14
/// (1152 and 2304 deep, 196 cells) and at 7x7 (2304 and 4608, 49 cells), and
/// VGG-16's at 14x14 (4608, 196), but not 128 channels at 28x28 (1152, 784).
const DEPTH_SPLIT_PER_CELL: usize = 4;

/// True when an im2col product `depth` deep onto `plane` output cells is deep
/// enough to split over its depth on several threads ([`Unit::by_depth`]).
fn im2col_splits_by_depth(depth: usize, plane: usize) -> bool {
    depth >= DEPTH_SPLIT_MIN && depth >= DEPTH_SPLIT_PER_CELL * plane
}

/// One batch item and group of a GEMM-strategy Conv, to be computed by
/// several tasks at once, each doing its share of im2col, GEMM, bias and
/// activation (one fork-join per unit).
struct Unit<'a> {
    geo: &'a Geometry,
    columns: &'a [Range<usize>],
    /// `[C/group, H, W]`.
    image: &'a [f32],
    /// `[M/group, depth]`.
    weights: &'a [f32],
    bias: Option<&'a [f32]>,
    /// What the Conv's output is added to before the activation, laid out
    /// like the unit's output.
    residual: Option<&'a [f32]>,
    depth: usize,
    /// Output rows per im2col band.
    band: usize,
}

impl Unit<'_> {
    /// Computes the unit with `tasks` tasks, each taking a block of output
    /// channels (`by_channels`: each task then reads, or unrolls, the whole
    /// image) or of output columns (pointwise) or rows (im2col) for every
    /// channel. A task works through its block a few columns at a time:
    /// im2col for them, the GEMM, then one pass of bias, residual and
    /// activation while the block is in cache. A task that owns whole rows
    /// of the output has the GEMM write there; a task that owns segments of
    /// rows has it write into a small buffer of its own, then copies that
    /// out in the same pass.
    fn tiles(&self, out: &mut [f32], tasks: usize, by_channels: bool) {
        let geo = self.geo;
        let out_plane = geo.out_plane();
        let outputs = out.len() / out_plane;
        let pointwise = geo.is_pointwise();
        // Columns are counted in steps: single cells (pointwise) or whole
        // output rows (im2col).
        let (steps, step_len) = if pointwise {
            (out_plane, 1)
        } else {
            (geo.h.output(), geo.w.output())
        };
        let split = |len: usize, parts: usize| -> Vec<Range<usize>> {
            let per = len.div_ceil(parts.max(1)).max(1);
            (0..len)
                .step_by(per)
                .map(|s| s..(s + per).min(len))
                .collect()
        };
        let (channel_blocks, column_blocks) = if by_channels {
            (split(outputs, tasks), split(steps, 1))
        } else {
            (split(outputs, 1), split(steps, tasks))
        };
        let mut work: Vec<Tile<'_>> = Vec::new();
        if let [columns] = column_blocks.as_slice() {
            // Each tile's rows (channels), whole.
            let mut rest = out;
            for channels in &channel_blocks {
                let (rows, tail) = rest.split_at_mut(channels.len() * out_plane);
                work.push(Tile {
                    channels: channels.clone(),
                    columns: columns.clone(),
                    out: TileOut::Rows(rows),
                });
                rest = tail;
            }
        } else {
            // Each tile's segment of each of its output rows.
            for channels in &channel_blocks {
                for columns in &column_blocks {
                    work.push(Tile {
                        channels: channels.clone(),
                        columns: columns.clone(),
                        out: TileOut::Segments(Vec::new()),
                    });
                }
            }
            for (channel, row) in out.chunks_mut(out_plane).enumerate() {
                let mut rest = row;
                for tile in work.iter_mut() {
                    if tile.channels.contains(&channel)
                        && let TileOut::Segments(segments) = &mut tile.out
                    {
                        let (segment, tail) = rest.split_at_mut(tile.columns.len() * step_len);
                        segments.push(segment);
                        rest = tail;
                    }
                }
            }
        }
        for_each_task(work, |tile| {
            let Tile {
                channels,
                columns: range,
                mut out,
            } = tile;
            if pointwise && self.by_pointwise_kernel(&channels, &range, &mut out) {
                return;
            }
            with_scratch(|scratch| {
                let count = channels.len();
                let sub = if pointwise && self.depth <= TILE_MAX_DEPTH {
                    (TILE_LEN / count).max(16).min(range.len().max(1))
                } else if pointwise {
                    range.len()
                } else if matches!(out, TileOut::Segments(_)) {
                    // The product buffer, copied out after each band, stays
                    // in cache.
                    self.band.min((TILE_LEN / (count * step_len)).max(1))
                } else {
                    self.band
                };
                let weights = MatRef::new(
                    &self.weights[channels.start * self.depth..],
                    count,
                    self.depth,
                );
                let tile_weights =
                    &self.weights[channels.start * self.depth..][..count * self.depth];
                if size_of_val(tile_weights) <= PREFETCH_MAX_BYTES {
                    kernels::prefetch_l2(tile_weights);
                }
                for first in range.clone().step_by(sub.max(1)) {
                    let steps = first..(first + sub).min(range.end);
                    let cols = steps.len() * step_len;
                    let (rhs, unrolled) = if pointwise {
                        let rhs =
                            MatRef::strided(&self.image[first..], self.depth, cols, out_plane);
                        (rhs, None)
                    } else {
                        grow(&mut scratch.columns, self.depth * cols);
                        let col = &mut scratch.columns[..self.depth * cols];
                        im2col(geo, self.columns, self.image, steps.clone(), col);
                        (MatRef::new(col, self.depth, cols), Some(&*col))
                    };
                    let at = (steps.start - range.start) * step_len;
                    let bias = |r: usize| self.bias.map_or(0.0, |b| b[channels.start + r]);
                    // Bias, residual and activation of row `r`'s new segment.
                    let finish = |r: usize, segment: &mut [f32]| match self.residual {
                        Some(res) => {
                            let first = (channels.start + r) * out_plane + steps.start * step_len;
                            let res = &res[first..][..segment.len()];
                            kernels::bias_add_activate(segment, bias(r), res, geo.activation);
                        }
                        None => kernels::bias_activate(segment, bias(r), geo.activation),
                    };
                    match &mut out {
                        TileOut::Rows(rows) => {
                            let panel = &mut scratch.panel;
                            if cols == out_plane
                                && let Some(col) = unrolled
                                && self.unrolled_by_kernel(&channels, col, rows, panel)
                            {
                                continue;
                            }
                            let view = MatMut::strided(&mut rows[at..], count, cols, out_plane);
                            kernels::gemm_single(1.0, weights, rhs, 0.0, view);
                            for (r, row) in rows.chunks_mut(out_plane).enumerate() {
                                finish(r, &mut row[at..at + cols]);
                            }
                        }
                        TileOut::Segments(segments) => {
                            grow(&mut scratch.product, count * cols);
                            let product = &mut scratch.product[..count * cols];
                            let view = MatMut::new(product, count, cols);
                            kernels::gemm_single(1.0, weights, rhs, 0.0, view);
                            for (r, (segment, row)) in
                                segments.iter_mut().zip(product.chunks(cols)).enumerate()
                            {
                                let segment = &mut segment[at..at + cols];
                                segment.copy_from_slice(row);
                                finish(r, segment);
                            }
                        }
                    }
                }
            });
        });
    }

    /// Computes a pointwise tile with [`kernels::pointwise`], and returns true;
    /// returns false, touching nothing, where that kernel does not apply or does
    /// not pay: it takes products of at most [`TILE_MAX_DEPTH`] input channels,
    /// and deeper ones (up to [`KERNEL_MAX_DEPTH`]) of at most
    /// [`KERNEL_DEEP_MAX_OUTPUTS`] output channels where `gemm` would write into
    /// a buffer of the task's own (a split by columns) or the plane is at most
    /// [`KERNEL_DEEP_MAX_PLANE`] cells (MobileNetV2's projections), or of any
    /// number where the kernel sets the tile's last cell apart (a 7x7 plane;
    /// see [`kernels::pointwise_sets_apart`]).
    fn by_pointwise_kernel(
        &self,
        channels: &Range<usize>,
        columns: &Range<usize>,
        out: &mut TileOut<'_>,
    ) -> bool {
        let plane = self.geo.out_plane();
        let few_outputs = self.geo.out_channels <= KERNEL_DEEP_MAX_OUTPUTS
            && (plane <= KERNEL_DEEP_MAX_PLANE || matches!(out, TileOut::Segments(_)));
        let deep_pays = self.depth <= KERNEL_MAX_DEPTH
            && (few_outputs || kernels::pointwise_sets_apart(columns.len()));
        if (self.depth > TILE_MAX_DEPTH && !deep_pays)
            || columns.len() < kernels::POINTWISE_MIN_COLUMNS
        {
            return false;
        }
        let mut rows: Vec<&mut [f32]> = match out {
            TileOut::Rows(rows) => rows
                .chunks_mut(plane)
                .map(|row| &mut row[columns.clone()])
                .collect(),
            TileOut::Segments(segments) => segments.iter_mut().map(|s| &mut s[..]).collect(),
        };
        self.kernel_tile(channels, self.image, columns.clone(), |tile| {
            pointwise_kernel(tile, &mut rows)
        })
    }

    /// Runs `f` on [`kernels::pointwise`]'s view of output channels
    /// `channels` of the unit (their weights, bias, residual and activation)
    /// over `image` (`[depth, plane]`: the unit's image, or its im2col
    /// matrix) at `columns`.
    fn kernel_tile<R>(
        &self,
        channels: &Range<usize>,
        image: &[f32],
        columns: Range<usize>,
        f: impl FnOnce(&mut kernels::Pointwise<'_>) -> R,
    ) -> R {
        let plane = self.geo.out_plane();
        let zeros;
        let bias = match self.bias {
            Some(b) => &b[channels.clone()],
            None => {
                zeros = vec![0.0; channels.len()];
                &zeros
            }
        };
        f(&mut kernels::Pointwise {
            image,
            plane,
            weights: kernels::Taps::Strided {
                values: &self.weights[channels.start * self.depth..channels.end * self.depth],
                stride: self.depth,
            },
            depth: self.depth,
            bias,
            residual: self
                .residual
                .map(|r| &r[channels.start * plane..channels.end * plane]),
            activation: self.geo.activation,
            columns,
        })
    }

    /// Computes output channels `channels` of a unit's whole image into `rows`
    /// (theirs) from its im2col matrix `col` with [`kernels::pointwise`], and
    /// returns true, where that kernel sets the image's last cell apart (a
    /// 7x7 image; [`kernels::pointwise_sets_apart`]); returns false, touching
    /// nothing, elsewhere.
    ///
    /// Against `gemm` (48 columns, then the last one apart, then a pass for
    /// the bias, residual and activation), `bench/ab.py`, 6 rounds, Intel
    /// Xeon: three 512-channel 3x3 Convs at 7x7 (4608 deep) as a model 0.911x
    /// as long at one thread; ResNet-18's layer4 nodes 0.939x at one thread
    /// and 0.910x at two (where its deep Convs go [`Unit::by_depth`], whose
    /// tasks' partial sums take the kernel too, [`partial_sums_by_kernel`]);
    /// whole ResNet-18 0.969x and 0.955x. Session 32 had measured this kernel
    /// there with a fourth vector for the 49th cell: 1.05-1.11x.
    fn unrolled_by_kernel(
        &self,
        channels: &Range<usize>,
        col: &[f32],
        rows: &mut [f32],
        panel: &mut Vec<f32>,
    ) -> bool {
        let plane = self.geo.out_plane();
        if !kernels::pointwise_sets_apart(plane) {
            return false;
        }
        let mut rows: Vec<&mut [f32]> = rows.chunks_mut(plane).collect();
        self.kernel_tile(channels, col, 0..plane, |tile| {
            kernels::pointwise(tile, &mut rows, panel)
        })
    }

    /// Computes the unit with `tasks` tasks that each take a block of its
    /// input channels, for every output: each unrolls only its channels (im2col;
    /// a pointwise unit reads them as they are) and multiplies them by their
    /// columns of the weights, into the output (the first task) or a buffer of
    /// its own; one pass then adds the buffers, in task order, the bias, the
    /// residual and the activation.
    ///
    /// For pointwise products much deeper than their outputs (MobileNetV2's
    /// projections, [`POINTWISE_DEPTH_SPLIT_RATIO`]): split by output channels
    /// or cells, each task reads the whole image or a part of every channel,
    /// so half of what it reads was written by the other core (the depthwise
    /// Conv before it splits by channels), and every line of the image ends in
    /// both cores' caches, where the next Conv to write into that buffer pays
    /// to take each line back. Split by depth, each task reads only the
    /// channels its own core computed, and only the small partial sums cross.
    /// With the depthwise Convs in place ([`depthwise_over_input`]), against
    /// neither, MobileNetV2 at two threads (`bench/ab.py`, alternated):
    /// 0.945 and 0.962 with the two cores sharing a cache (12 and 13 rounds),
    /// 0.897 and 0.900 with them far apart (one round each); per class, in 3-5
    /// far runs each, depthwise 2.26 → 1.24 ms, projections 2.53 → 2.33. With
    /// the cores sharing a cache, the projections alone take 0.93-1.13x as
    /// long as split by channels (most 1.00-1.07), and the expansions after
    /// them 0.82-1.03x (9 of 16 under 0.95).
    ///
    /// For deep im2col products with few output cells. Split by output cells, each task
    /// packs all the weights for products half as wide; split by output channels,
    /// each unrolls the whole image. A `256 x 2304` by `2304 x 196` product (a
    /// 3x3 Conv of ResNet-18 at 14x14) took 1.38 ms at two threads split by depth,
    /// 1.62-1.66 by cells, 1.69-1.70 by channels, and 2.55-2.58 on one thread;
    /// `512 x 2304` by 49 columns 0.84 ms against 0.93 and 1.06 (EPYC Zen 2, the
    /// `gemm` crate alone).
    fn by_depth(&self, out: &mut [f32], tasks: usize) {
        let geo = self.geo;
        let (out_plane, out_width, out_height) = (geo.out_plane(), geo.w.output(), geo.h.output());
        let outputs = out.len() / out_plane;
        let taps = geo.kernel_len();
        let in_plane = geo.in_plane();
        let channels = self.depth / taps;
        let per = channels.div_ceil(tasks).max(1);
        let parts: Vec<Range<usize>> = (0..channels)
            .step_by(per)
            .map(|c| c..(c + per).min(channels))
            .collect();
        let mut partials: Vec<Vec<f32>> = parts[1..]
            .iter()
            .map(|_| crate::buffers::take(out.len()))
            .collect();
        let dests = std::iter::once(&mut *out).chain(partials.iter_mut().map(Vec::as_mut_slice));
        let work: Vec<(Range<usize>, &mut [f32])> = parts.into_iter().zip(dests).collect();
        for_each_task(work, |(part, dest)| {
            let depth = part.len() * taps;
            let image = &self.image[part.start * in_plane..part.end * in_plane];
            let weights = &self.weights[part.start * taps..];
            let matrix = MatRef::strided(weights, outputs, depth, self.depth);
            if geo.is_pointwise() {
                if outputs <= KERNEL_DEEP_MAX_OUTPUTS {
                    let mut done = false;
                    with_scratch(|scratch| {
                        done = partial_sums_by_kernel(
                            (image, out_plane),
                            (weights, depth, self.depth),
                            dest,
                            &mut scratch.panel,
                        );
                    });
                    if done {
                        return;
                    }
                }
                let image = MatRef::new(image, depth, out_plane);
                kernels::gemm_single(
                    1.0,
                    matrix,
                    image,
                    0.0,
                    MatMut::new(dest, outputs, out_plane),
                );
                return;
            }
            with_scratch(|scratch| {
                let band = (PANEL_LEN / (depth * out_width).max(1)).clamp(1, out_height);
                for first in (0..out_height).step_by(band) {
                    let steps = first..(first + band).min(out_height);
                    let cols = steps.len() * out_width;
                    grow(&mut scratch.columns, depth * cols);
                    let col = &mut scratch.columns[..depth * cols];
                    im2col(geo, self.columns, image, steps.clone(), col);
                    if cols == out_plane
                        && kernels::pointwise_sets_apart(cols)
                        && partial_sums_by_kernel(
                            (col, cols),
                            (weights, depth, self.depth),
                            dest,
                            &mut scratch.panel,
                        )
                    {
                        continue;
                    }
                    let at = steps.start * out_width;
                    let view = MatMut::strided(&mut dest[at..], outputs, cols, out_plane);
                    kernels::gemm_single(1.0, matrix, MatRef::new(col, depth, cols), 0.0, view);
                }
            });
        });
        add_partials(geo, (self.bias, self.residual), out, partials);
    }
}

/// Adds `partials` (laid out like `out`, the Conv's output) to `out`, in
/// order, then `bias`, the `residual` and the activation, by blocks of output
/// channels over the threads; gives the partials back to the bin.
fn add_partials(
    geo: &Geometry,
    (bias, residual): (Option<&[f32]>, Option<&[f32]>),
    out: &mut [f32],
    partials: Vec<Vec<f32>>,
) {
    let out_plane = geo.out_plane();
    let outputs = out.len() / out_plane;
    let rows = outputs
        .div_ceil(BLOCKS_PER_THREAD * crate::threads::threads())
        .max(1);
    for_each_chunk(
        out,
        rows * out_plane,
        || (),
        |(), index, block| {
            for (i, row) in block.chunks_mut(out_plane).enumerate() {
                let r = index * rows + i;
                for partial in &partials {
                    let more = &partial[r * out_plane..][..out_plane];
                    kernels::bias_add_activate(row, 0.0, more, Activation::None);
                }
                let bias = bias.map_or(0.0, |b| b[r]);
                match residual {
                    Some(res) => kernels::bias_add_activate(
                        row,
                        bias,
                        &res[r * out_plane..][..out_plane],
                        geo.activation,
                    ),
                    None => kernels::bias_activate(row, bias, geo.activation),
                }
            }
        },
    );
    for partial in partials {
        crate::buffers::give(partial);
    }
}

/// One task of [`Unit::tiles`]: output channels `channels`, column steps
/// `columns`, and the part of each of those channels' rows it writes.
struct Tile<'o> {
    channels: Range<usize>,
    columns: Range<usize>,
    out: TileOut<'o>,
}

/// The part of the output a [`Tile`] writes.
enum TileOut<'o> {
    /// Its channels' rows, whole and in order (the tile spans every column).
    Rows(&'o mut [f32]),
    /// Its segment of each of its channels' rows.
    Segments(Vec<&'o mut [f32]>),
}

/// Working memory of one task of [`Unit::tiles`].
#[derive(Default)]
struct Scratch {
    columns: Vec<f32>,
    product: Vec<f32>,
    /// A few rows, for Winograd's transforms.
    rows: Vec<f32>,
    /// Padded planes, for depthwise convolutions.
    planes: Vec<f32>,
    /// Rows of cells that [`kernels::pointwise`] copies.
    panel: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Runs `f` with this thread's [`Scratch`], or a fresh one if it is in
/// use further up this thread's stack (a task stolen while waiting).
fn with_scratch(f: impl FnOnce(&mut Scratch)) {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    });
}

/// Computes into `dest` (`[M, plane]`) the products of `weights` (its `M`
/// rows of `depth` values, `stride` apart) and `image` (`[depth, plane]`)
/// with [`kernels::pointwise`], no bias, residual or activation (a task's
/// partial sums in [`Unit::by_depth`]), and returns true; returns false,
/// touching nothing, where that kernel does not run.
fn partial_sums_by_kernel(
    (image, plane): (&[f32], usize),
    (weights, depth, stride): (&[f32], usize, usize),
    dest: &mut [f32],
    panel: &mut Vec<f32>,
) -> bool {
    let zeros = vec![0.0; dest.len() / plane];
    let mut tile = kernels::Pointwise {
        image,
        plane,
        weights: kernels::Taps::Strided {
            values: weights,
            stride,
        },
        depth,
        bias: &zeros,
        residual: None,
        activation: Activation::None,
        columns: 0..plane,
    };
    let mut rows: Vec<&mut [f32]> = dest.chunks_mut(plane).collect();
    kernels::pointwise(&mut tile, &mut rows, panel)
}

/// [`kernels::pointwise`] with this thread's scratch for its panels.
fn pointwise_kernel(tile: &mut kernels::Pointwise<'_>, rows: &mut [&mut [f32]]) -> bool {
    let mut done = false;
    with_scratch(|scratch| done = kernels::pointwise(tile, rows, &mut scratch.panel));
    done
}

/// Makes `buffer` at least `len` long; it never shrinks, so that the
/// next, larger use does not zero it again.
fn grow(buffer: &mut Vec<f32>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
}

/// Unrolls output rows `rows` of `image` (`[C/group, H, W]`) into `col`,
/// whose row `(c * kH + ki) * kW + kj` holds, for every output cell of
/// those rows, the input the kernel tap `(ki, kj)` of channel `c` reads
/// there (0 in the padding).
fn im2col(
    geo: &Geometry,
    columns: &[Range<usize>],
    image: &[f32],
    rows: Range<usize>,
    col: &mut [f32],
) {
    let (width, out_width) = (geo.w.input(), geo.w.output());
    let in_plane = geo.in_plane();
    let stride = geo.w.stride();
    let fill = |r: usize, row: &mut [f32]| {
        let (c, tap) = (r / geo.kernel_len(), r % geo.kernel_len());
        let (ki, kj) = (tap / geo.w.kernel(), tap % geo.w.kernel());
        let plane = &image[c * in_plane..][..in_plane];
        let valid_rows = geo.h.valid_outputs(ki);
        let cols = columns[kj].clone();
        for (oh, out) in rows.clone().zip(row.chunks_mut(out_width)) {
            if !valid_rows.contains(&oh) || cols.is_empty() {
                out.fill(0.0);
                continue;
            }
            let src = &plane[geo.h.input_index(oh, ki) * width..][..width];
            let first = geo.w.input_index(cols.start, kj);
            out[..cols.start].fill(0.0);
            out[cols.end..].fill(0.0);
            copy_strided(&src[first..], stride, &mut out[cols.clone()]);
        }
    };
    let row_len = rows.len() * out_width;
    for (r, row) in col.chunks_mut(row_len).enumerate() {
        fill(r, row);
    }
}

/// `dst[j] = src[stride * j]` for every `j` that both cover. Stride 2 goes by
/// pairs, not `step_by`, so that the loop vectorises (the last cell may have no
/// partner).
fn copy_strided(src: &[f32], stride: usize, dst: &mut [f32]) {
    match stride {
        1 => {
            let n = dst.len().min(src.len());
            dst[..n].copy_from_slice(&src[..n]);
        }
        2 => {
            let (pairs, rest) = src.as_chunks::<2>();
            for (d, pair) in dst.iter_mut().zip(pairs) {
                *d = pair[0];
            }
            if let (Some(d), Some(&v)) = (dst.get_mut(pairs.len()), rest.first()) {
                *d = v;
            }
        }
        _ => {
            for (d, &v) in dst.iter_mut().zip(src.iter().step_by(stride)) {
                *d = v;
            }
        }
    }
}

/// Cuts `0..n` into ranges of `per` (the last may be shorter), one per task,
/// and every `row`-long row of `data` into consecutive pieces, `len(range)`
/// long for each task in turn: each task's range with its piece of every
/// row, for tasks that write disjoint parts of each row.
fn split_rows(
    data: &mut [f32],
    row: usize,
    n: usize,
    per: usize,
    len: impl Fn(&Range<usize>) -> usize,
) -> Vec<(Range<usize>, Vec<&mut [f32]>)> {
    let mut work: Vec<(Range<usize>, Vec<&mut [f32]>)> = (0..n)
        .step_by(per.max(1))
        .map(|s| (s..(s + per).min(n), Vec::new()))
        .collect();
    for mut rest in data.chunks_mut(row) {
        for (range, pieces) in &mut work {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len(range));
            pieces.push(piece);
            rest = tail;
        }
    }
    work
}

/// Fewest multiply-adds a depthwise convolution must have to be split over
/// threads: below it, waking another thread costs more than it saves.
const DEPTHWISE_PARALLEL_MIN: usize = 1 << 16;

/// Blocks of work per thread in a parallel pass (a depthwise convolution's
/// planes, a direct one's output rows, the sums of a split over depth), so
/// that a thread that falls behind (on a busy machine) is not waited for: the
/// others take its blocks.
const BLOCKS_PER_THREAD: usize = 4;

/// The depthwise strategy: channel plane `p` of the output reads only
/// plane `p` of the input. The output is not empty.
///
/// Each task takes a block of whole planes (a few blocks per thread), so
/// that it sets up its working memory once per block, not per plane. For each output row, every kernel
/// tap adds a weighted, shifted input row segment: with stride 1 that is a
/// vectorisable `y += w * x` over slices. 3x3 kernels with one cell of
/// padding take [`kernels::depthwise3x3`] (with AVX-512 or AVX2, at stride 2
/// [`kernels::depthwise3x3_stride2`]; with AVX-512, at stride 1 on planes at most 32
/// cells wide [`kernels::depthwise3x3_stride1`]; some narrow planes sixteen
/// at a time, [`kernels::depthwise3x3_x16`], see [`sixteen_planes_pay`]),
/// which also applies the bias and the activation.
fn depthwise(geo: &Geometry, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let (in_plane, out_plane) = (geo.in_plane(), geo.out_plane());
    let (width, out_width) = (geo.w.input(), geo.w.output());
    let stride = geo.w.stride();
    let fast = geo.h.is_3x3_pad1() && geo.w.is_3x3_pad1() && geo.h.stride() == stride;
    let planes = y.len() / out_plane;
    let work = y.len().saturating_mul(geo.kernel_len());
    let tasks = if work >= DEPTHWISE_PARALLEL_MIN {
        crate::threads::threads() * BLOCKS_PER_THREAD
    } else {
        1
    };
    let sixteen = fast && sixteen_planes_pay(out_width, stride);
    let phased = (!fast).then(|| PhasedLayout::new(geo));
    let interleaved = !fast && out_width <= INTERLEAVED_MAX_WIDTH;
    let per_task = if sixteen || interleaved {
        planes.div_ceil(tasks).next_multiple_of(16)
    } else {
        planes.div_ceil(tasks)
    };
    for_each_chunk(
        y,
        per_task * out_plane,
        || (),
        |(), index, block| {
            with_scratch(|s| {
                let first = index * per_task;
                let mut done = 0;
                if interleaved {
                    for out in block.chunks_exact_mut(16 * out_plane) {
                        if !sixteen_any(geo, x, w, bias, first + done, out, s) {
                            break;
                        }
                        done += 16;
                    }
                }
                if sixteen {
                    for out in block.chunks_exact_mut(16 * out_plane) {
                        let planes = sixteen_planes(geo, x, w, bias, first + done);
                        if !kernels::depthwise3x3_x16(&planes, out, &mut s.planes) {
                            break;
                        }
                        done += 16;
                    }
                }
                for (i, out) in block.chunks_mut(out_plane).enumerate().skip(done) {
                    let p = first + i;
                    let c = p % geo.channels;
                    let plane = &x[p * in_plane..][..in_plane];
                    let taps = &w[c * geo.kernel_len()..][..geo.kernel_len()];
                    let b = bias.map_or(0.0, |b| b[c]);
                    if fast {
                        let one = kernels::OnePlane {
                            plane,
                            width,
                            taps: taps.try_into().expect("a 3x3 kernel"),
                            bias: b,
                            activation: geo.activation,
                        };
                        let done = match stride {
                            1 => kernels::depthwise3x3_stride1(&one, out),
                            _ => kernels::depthwise3x3_stride2(&one, out, out_width),
                        };
                        if done {
                            continue;
                        }
                        kernels::depthwise3x3(
                            plane,
                            width,
                            stride,
                            taps,
                            b,
                            geo.activation,
                            out,
                            out_width,
                            &mut s.planes,
                        );
                        continue;
                    }
                    let Some(layout) = &phased else {
                        unreachable!("laid out for every window but the 3x3 ones")
                    };
                    layout.fill(geo, plane, &mut s.planes);
                    let window = PhasedPlane {
                        blocks: &s.planes,
                        phase_len: layout.phase_len,
                        offsets: &layout.offsets,
                        taps,
                        bias: b,
                        activation: geo.activation,
                    };
                    let wide_len = layout.wide_len(geo);
                    s.rows.resize(wide_len, 0.0);
                    let wide = &mut s.rows[..wide_len];
                    kernels::depthwise_phased(&window, wide, out, out_width);
                }
            });
        },
    );
}

/// Widest output rows for which a depthwise Conv that [`PhasedPlane`] would
/// take goes sixteen planes at a time instead ([`depthwise_x16_body`]).
/// Inside EfficientNet-B0 at one thread (`mlcapsule bench --profile`, Intel
/// Xeon), its 5x5 Convs onto 7x7 planes (1152 of them) took 0.13-0.15 ms
/// this way against 0.23 by phased planes; onto 14x14 planes (672) 0.30-0.31
/// both ways.
const INTERLEAVED_MAX_WIDTH: usize = 8;

/// Planes `p..p + 16` of a depthwise Conv into `out` (their sixteen output
/// planes) with [`depthwise_x16_body`], and true; false, touching nothing,
/// when the sixteen are not channels of one image.
fn sixteen_any(
    geo: &Geometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    p: usize,
    out: &mut [f32],
    s: &mut Scratch,
) -> bool {
    let c = p % geo.channels;
    if c + 16 > geo.channels {
        return false;
    }
    let (in_plane, taps) = (geo.in_plane(), geo.kernel_len());
    let (pitch, top, left) = (geo.w.padded(), geo.h.pad_begin(), geo.w.pad_begin());
    // The sixteen planes padded, each cell's sixteen values together.
    s.planes.clear();
    s.planes.resize(16 * geo.h.padded() * pitch, 0.0);
    let (cells, _) = s.planes.as_chunks_mut::<16>();
    let planes = &x[p * in_plane..][..16 * in_plane];
    for (lane, plane) in planes.chunks_exact(in_plane).enumerate() {
        for (y, row) in plane.chunks_exact(geo.w.input()).enumerate() {
            let padded = &mut cells[(top + y) * pitch + left..][..row.len()];
            for (cell, &v) in padded.iter_mut().zip(row) {
                cell[lane] = v;
            }
        }
    }
    s.columns.clear();
    s.columns.resize(16 * taps, 0.0);
    let (weights, _) = s.columns.as_chunks_mut::<16>();
    for (lane, kernel) in w[c * taps..][..16 * taps].chunks_exact(taps).enumerate() {
        for (tap, &v) in weights.iter_mut().zip(kernel) {
            tap[lane] = v;
        }
    }
    let out_plane = geo.out_plane();
    s.rows.clear();
    s.rows.resize(16 * out_plane, 0.0);
    let (sums, _) = s.rows.as_chunks_mut::<16>();
    let window = Sixteens {
        cells: s.planes.as_chunks::<16>().0,
        pitch,
        strides: [geo.h.stride(), geo.w.stride()],
        dilations: [geo.h.dilation(), geo.w.dilation()],
        kernel: [geo.h.kernel(), geo.w.kernel()],
        taps: s.columns.as_chunks::<16>().0,
        bias: std::array::from_fn(|l| bias.map_or(0.0, |b| b[c + l])),
        activation: geo.activation,
    };
    kernels::depthwise_x16(&window, sums, geo.w.output());
    for (lane, plane) in out.chunks_exact_mut(out_plane).enumerate() {
        for (y, sum) in plane.iter_mut().zip(&*sums) {
            *y = sum[lane];
        }
    }
    true
}

/// Sixteen planes of a depthwise convolution of any window, for
/// [`depthwise_x16_body`]: `cells` holds the padded planes (`pitch` cells
/// wide), each cell's sixteen values (one per plane) together, and `taps`
/// each tap's sixteen weights.
pub(crate) struct Sixteens<'a> {
    pub cells: &'a [[f32; 16]],
    pub pitch: usize,
    /// Along H, then W; likewise below.
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    pub kernel: [usize; 2],
    /// Row-major over the kernel.
    pub taps: &'a [[f32; 16]],
    pub bias: [f32; 16],
    pub activation: Activation,
}

/// Sixteen output planes of a depthwise convolution, each output cell's
/// sixteen values (one per plane) together in `sums` (`out_width` cells a
/// row): each starts from the bias and adds each tap's product in the
/// kernel's row-major order, one multiply-add each, then the activation:
/// [`depthwise_phased_body`]'s sums, vectors across planes instead of
/// across cells. On planes of at most [`INTERLEAVED_MAX_WIDTH`] cells a row
/// it wastes no lane where that kernel's wide rows run past the outputs,
/// and it pays no per-plane setup. Compiled per instruction set by
/// `kernels::depthwise_x16`.
#[inline(always)]
pub(crate) fn depthwise_x16_body<const FMA: bool>(
    p: &Sixteens<'_>,
    sums: &mut [[f32; 16]],
    out_width: usize,
) {
    let [stride_h, stride_w] = p.strides;
    let [dh, dw] = p.dilations;
    let [kh, kw] = p.kernel;
    for (oh, row) in sums.chunks_mut(out_width).enumerate() {
        for (ow, out) in row.iter_mut().enumerate() {
            let mut acc = p.bias;
            for ki in 0..kh {
                let at = (oh * stride_h + ki * dh) * p.pitch + ow * stride_w;
                for kj in 0..kw {
                    let (x, w) = (&p.cells[at + kj * dw], &p.taps[ki * kw + kj]);
                    for l in 0..16 {
                        acc[l] = fmadd::<FMA>(w[l], x[l], acc[l]);
                    }
                }
            }
            bias_activate_body::<FMA>(&mut acc, 0.0, p.activation);
            *out = acc;
        }
    }
}

/// How [`PhasedPlane`] lays out the planes of one Conv.
struct PhasedLayout {
    /// Rows of each block.
    rows: usize,
    phase_len: usize,
    /// Where each tap's run starts, in the kernel's row-major order.
    offsets: Vec<usize>,
}

impl PhasedLayout {
    fn new(geo: &Geometry) -> PhasedLayout {
        let [stride_h, stride_w] = [geo.h.stride(), geo.w.stride()];
        let phase_len = geo.w.padded().div_ceil(stride_w);
        // One more row than the padding holds: see `PhasedPlane`.
        let rows = geo.h.padded().div_ceil(stride_h) + 1;
        let (dh, dw) = (geo.h.dilation(), geo.w.dilation());
        let mut offsets = Vec::with_capacity(geo.kernel_len());
        for ki in 0..geo.h.kernel() {
            let (b, a) = ((ki * dh) % stride_h, (ki * dh) / stride_h);
            for kj in 0..geo.w.kernel() {
                let (q, c) = ((kj * dw) % stride_w, (kj * dw) / stride_w);
                offsets.push(((b * stride_w + q) * rows + a) * phase_len + c);
            }
        }
        PhasedLayout {
            rows,
            phase_len,
            offsets,
        }
    }

    /// The wide plane's length: its `OH` rows, then up to a whole number of
    /// runs of [`PHASED_CELLS`].
    fn wide_len(&self, geo: &Geometry) -> usize {
        (geo.h.output() * self.phase_len).next_multiple_of(PHASED_CELLS)
    }

    /// Copies `plane` into `blocks` laid out as [`PhasedPlane`] says, with
    /// zeros for the padding and [`PHASED_CELLS`] more after the last block.
    fn fill(&self, geo: &Geometry, plane: &[f32], blocks: &mut Vec<f32>) {
        let [stride_h, stride_w] = [geo.h.stride(), geo.w.stride()];
        let block_len = self.rows * self.phase_len;
        blocks.clear();
        blocks.resize(stride_h * stride_w * block_len + PHASED_CELLS, 0.0);
        let (top, left) = (geo.h.pad_begin(), geo.w.pad_begin());
        // The input's first column in phase 0, `skip` columns in.
        let skip = (stride_w - left % stride_w) % stride_w;
        let first = (left + skip) / stride_w;
        for (y, row) in plane.chunks_exact(geo.w.input()).enumerate() {
            let (b, a) = ((top + y) % stride_h, (top + y) / stride_h);
            let phases = &mut blocks[b * stride_w * block_len..][..stride_w * block_len];
            let at = |x: usize| {
                let column = left + x;
                (column % stride_w) * block_len + a * self.phase_len + column / stride_w
            };
            for (x, &v) in row.iter().enumerate().take(skip) {
                phases[at(x)] = v;
            }
            if stride_w == 1 {
                phases[a * self.phase_len + left..][..row.len()].copy_from_slice(row);
            } else if stride_w == 2 {
                let (groups, rest) = row.get(skip..).unwrap_or_default().as_chunks::<2>();
                // Both phases at once: this deinterleaves in vectors.
                let (even, odd) = phases.split_at_mut(block_len);
                let even = &mut even[a * self.phase_len + first..][..groups.len()];
                let odd = &mut odd[a * self.phase_len + first..][..groups.len()];
                for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(groups) {
                    *e = pair[0];
                    *o = pair[1];
                }
                if let [v] = rest {
                    phases[at(row.len() - 1)] = *v;
                }
            } else {
                for (x, &v) in row.iter().enumerate().skip(skip) {
                    phases[at(x)] = v;
                }
            }
        }
    }
}

/// One plane of a depthwise convolution of any window, padded and cut into
/// `stride_h * stride_w` blocks by the phases of its rows and columns, for
/// [`depthwise_phased_body`] ([`PhasedLayout`] lays it out). Block `(b, q)`
/// holds the padded cells at rows `b, b + stride_h, ...` and columns `q, q +
/// stride_w, ...`: rows of `phase_len` values, and one more row of zeros.
/// Every tap then reads one contiguous run of a block (from its `offsets`)
/// for all the output cells at once: output row `oh` and column `ow` at
/// `oh * phase_len + ow` of a wide plane whose rows are `phase_len` long. The
/// cells past `out_width` of a wide row are not outputs; they read the next
/// block row, or that last row of zeros; the wide plane ends on a whole run
/// of [`PHASED_CELLS`], whose cells past the last row read at most that many
/// zeros after the last block.
pub(crate) struct PhasedPlane<'a> {
    pub blocks: &'a [f32],
    pub phase_len: usize,
    /// Where each tap's run starts in `blocks`, in the kernel's row-major order.
    pub offsets: &'a [usize],
    /// Row-major over the kernel.
    pub taps: &'a [f32],
    pub bias: f32,
    pub activation: Activation,
}

/// Cells of the wide plane [`depthwise_phased_body`] sums at once.
const PHASED_CELLS: usize = 16;

/// The depthwise windows that no dedicated kernel takes (all but 3x3 with
/// one cell of padding), into `out` (`[OH, out_width]`) through `wide`
/// (`OH * phase_len` values and up to a whole run more, any contents): each
/// cell starts from the bias and adds each tap's product in the kernel's
/// row-major order, one multiply-add each, then the activation. Compiled per
/// instruction set by `kernels::depthwise_phased`. It sums [`PHASED_CELLS`]
/// cells of the wide plane at a time over every tap, in registers, so
/// vectors stay full however narrow the plane. Against the loop over each
/// output row and tap's valid columns that it replaced (no padded copy,
/// stride 2 by `step_by`, rows of 7 or 14 cells in scalar code),
/// EfficientNet-B0's 5x5 Convs inside the network at one thread (`mlcapsule
/// bench --profile`, Intel Xeon): 144 planes 56x56 at stride 2 2.59 →
/// 0.34-0.37 ms, 672 planes of 14x14 1.34 → 0.30-0.31 (1152 of 7x7 0.88-0.94
/// → 0.23, and see [`INTERLEAVED_MAX_WIDTH`]). Summed tap by tap over the
/// whole wide plane in memory, they had taken 0.55, 0.42 and 0.33.
#[inline(always)]
pub(crate) fn depthwise_phased_body<const FMA: bool>(
    p: &PhasedPlane<'_>,
    wide: &mut [f32],
    out: &mut [f32],
    out_width: usize,
) {
    let (runs, _) = wide.as_chunks_mut::<PHASED_CELLS>();
    for (n, run) in runs.iter_mut().enumerate() {
        let at = n * PHASED_CELLS;
        let mut sums = [p.bias; PHASED_CELLS];
        for (&offset, &weight) in p.offsets.iter().zip(p.taps) {
            let x: &[f32; PHASED_CELLS] = p.blocks[offset + at..][..PHASED_CELLS]
                .try_into()
                .expect("a run of cells");
            for (s, &x) in sums.iter_mut().zip(x) {
                *s = fmadd::<FMA>(weight, x, *s);
            }
        }
        *run = sums;
    }
    for (row, wide) in out
        .chunks_exact_mut(out_width)
        .zip(wide.chunks(p.phase_len))
    {
        row.copy_from_slice(&wide[..out_width]);
    }
    bias_activate_body::<FMA>(out, 0.0, p.activation);
}

/// The operands of planes `p..p + 16` (3x3 depthwise) for
/// [`kernels::depthwise3x3_x16`].
fn sixteen_planes<'x>(
    geo: &Geometry,
    x: &'x [f32],
    w: &[f32],
    bias: Option<&[f32]>,
    p: usize,
) -> kernels::Sixteen<'x> {
    let in_plane = geo.in_plane();
    let c = p % geo.channels;
    let (taps, bias) = match w.get(c * 9..(c + 16) * 9) {
        // Sixteen channels in a row.
        Some(run) => {
            let mut taps = [[0.0; 16]; 9];
            for (l, kernel) in run.chunks_exact(9).enumerate() {
                for (tap, &v) in taps.iter_mut().zip(kernel) {
                    tap[l] = v;
                }
            }
            let bias = match bias {
                Some(b) => b[c..c + 16].try_into().expect("16 biases"),
                None => [0.0; 16],
            };
            (taps, bias)
        }
        // The block wraps round to the next batch item's first channels.
        None => {
            let c: [usize; 16] = std::array::from_fn(|l| (p + l) % geo.channels);
            let taps = std::array::from_fn(|t| c.map(|c| w[c * 9 + t]));
            (taps, c.map(|c| bias.map_or(0.0, |b| b[c])))
        }
    };
    kernels::Sixteen {
        input: &x[p * in_plane..][..16 * in_plane],
        width: geo.w.input(),
        stride: geo.w.stride(),
        taps,
        bias,
        activation: geo.activation,
    }
}

/// One plane of a 3x3 depthwise convolution with one cell of padding on
/// every side and stride 1 or 2 along both axes: `out` (`[OH, OW]`, with
/// `OW = out_width`) gets `activation(bias + the nine taps of taps
/// (row-major) over plane)`, where `plane` is `[H, W]` with `W = width`.
/// `scratch` is working memory; its contents on entry do not matter.
///
/// Each output row is one pass over nine input slices of length `OW`, one
/// per tap, that the loop reads in lockstep: with stride 1 they are the
/// three input rows shifted by -1, 0 and +1 (the two edge columns are done
/// apart); with stride 2 the input rows are first split into even and odd
/// columns (with the padding) so that the slices are contiguous too.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn depthwise3x3_body<const FMA: bool>(
    plane: &[f32],
    width: usize,
    stride: usize,
    taps: &[f32],
    bias: f32,
    activation: Activation,
    out: &mut [f32],
    out_width: usize,
    scratch: &mut Vec<f32>,
) {
    let taps: &[f32; 9] = taps.try_into().expect("a 3x3 kernel");
    let args = Plane {
        plane,
        width,
        stride,
        taps,
        bias,
        out_width,
    };
    // One copy of the loops per activation, applied as each value is stored.
    match activation {
        Activation::None => args.run::<FMA>(out, scratch, |v| v),
        Activation::Relu => args.run::<FMA>(out, scratch, relu),
        Activation::Clip { min, max } => args.run::<FMA>(out, scratch, |v| clip(v, min, max)),
    }
}

/// The operands of [`depthwise3x3_body`] but the output.
struct Plane<'a> {
    plane: &'a [f32],
    width: usize,
    stride: usize,
    taps: &'a [f32; 9],
    bias: f32,
    out_width: usize,
}

impl Plane<'_> {
    #[inline(always)]
    fn run<const FMA: bool>(
        &self,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
        act: impl Fn(f32) -> f32 + Copy,
    ) {
        if self.out_width < FLAT_BELOW {
            self.flat::<FMA>(out, scratch, act);
        } else if self.stride == 1 {
            self.wide1::<FMA>(out, scratch, act);
        } else {
            self.wide2::<FMA>(out, scratch, act);
        }
    }

    /// Stride 1, rows wide enough to fill vectors.
    #[inline(always)]
    fn wide1<const FMA: bool>(
        &self,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
        act: impl Fn(f32) -> f32 + Copy,
    ) {
        let Plane {
            plane,
            width,
            taps,
            bias,
            out_width,
            ..
        } = *self;
        let height = plane.len() / width;
        // Input rows -1 and H are padding: a zero row stands in for them.
        grow(scratch, width);
        let zeros = &mut scratch[..width];
        zeros.fill(0.0);
        let zeros = &*zeros;
        let row = |r: usize| -> &[f32] {
            if r == 0 || r > height {
                zeros
            } else {
                &plane[(r - 1) * width..][..width]
            }
        };
        for (oh, out_row) in out.chunks_exact_mut(out_width).enumerate() {
            let rows = [row(oh), row(oh + 1), row(oh + 2)];
            let out_row = &mut out_row[..width];
            if width >= 2 {
                let n = width - 2;
                let at = |r: usize, shift: usize| &rows[r][shift..shift + n];
                nine_taps::<FMA>(
                    &mut out_row[1..1 + n],
                    [
                        at(0, 0),
                        at(0, 1),
                        at(0, 2),
                        at(1, 0),
                        at(1, 1),
                        at(1, 2),
                        at(2, 0),
                        at(2, 1),
                        at(2, 2),
                    ],
                    taps,
                    bias,
                    act,
                );
            }
            // Edge columns: the taps that land in the padding are skipped.
            let last = width - 1;
            let mut left = bias;
            let mut right = bias;
            for (ki, r) in rows.iter().enumerate() {
                left = fmadd::<FMA>(taps[ki * 3 + 1], r[0], left);
                if width >= 2 {
                    left = fmadd::<FMA>(taps[ki * 3 + 2], r[1], left);
                    right = fmadd::<FMA>(taps[ki * 3], r[last - 1], right);
                    right = fmadd::<FMA>(taps[ki * 3 + 1], r[last], right);
                }
            }
            out_row[0] = act(left);
            if width >= 2 {
                out_row[last] = act(right);
            }
        }
    }

    /// Stride 2, rows wide enough to fill vectors. Padded row r (input row
    /// r - 1; rows 0 and H + 1 are zero) becomes `even` (padded columns 0,
    /// 2, .., 2 OW: OW + 1 cells) then `odd` (padded columns 1, 3, ..,
    /// 2 OW - 1: OW cells). Output column j then reads `even[j]`, `odd[j]` and
    /// `even[j + 1]`.
    #[inline(always)]
    fn wide2<const FMA: bool>(
        &self,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
        act: impl Fn(f32) -> f32 + Copy,
    ) {
        let Plane {
            plane,
            width,
            taps,
            bias,
            out_width,
            ..
        } = *self;
        let out_height = out.len() / out_width;
        let pitch = 2 * out_width + 1;
        // Padded rows read: 0 ..= 2 OH, which is at most H + 1.
        let rows = 2 * out_height + 1;
        grow(scratch, pitch * rows);
        let layout = &mut scratch[..pitch * rows];
        // Only the cells the input does not cover are cleared: the top
        // padding row, the bottom one when it is read, and in every row
        // the left padding column and the right one when it is read (odd W).
        layout[..pitch].fill(0.0);
        for r in 1..rows {
            let dst = &mut layout[r * pitch..][..pitch];
            let (even, odd) = dst.split_at_mut(out_width + 1);
            even[0] = 0.0;
            match plane.get((r - 1) * width..r * width) {
                // Padded column c is input column c - 1.
                Some(src) => {
                    if width % 2 == 1 {
                        even[out_width] = 0.0;
                    }
                    deinterleave(src, odd, &mut even[1..]);
                }
                None => dst.fill(0.0),
            }
        }
        let layout = &*layout;
        for (oh, out_row) in out.chunks_exact_mut(out_width).enumerate() {
            let padded = |ki: usize| &layout[(2 * oh + ki) * pitch..][..pitch];
            let rows = [padded(0), padded(1), padded(2)];
            let at = |r: usize, offset: usize| &rows[r][offset..offset + out_width];
            let (even, odd, next) = (0, out_width + 1, 1);
            nine_taps::<FMA>(
                out_row,
                [
                    at(0, even),
                    at(0, odd),
                    at(0, next),
                    at(1, even),
                    at(1, odd),
                    at(1, next),
                    at(2, even),
                    at(2, odd),
                    at(2, next),
                ],
                taps,
                bias,
                act,
            );
        }
    }

    /// Narrow planes (14x14, 7x7), whose rows are too short to fill
    /// vectors: the padded input is laid out so that all output cells, as
    /// one flat array with a few padding columns, read the nine taps at
    /// fixed offsets; one loop then covers the whole plane and the valid
    /// columns are copied out.
    ///
    /// With stride 1 the layout is the padded plane, `W + 2` wide. With
    /// stride 2 it is its four sub-planes of even or odd rows and columns,
    /// `OW + 1` wide each, so that the taps are contiguous again. Only the
    /// padding cells that valid outputs read are cleared; the others may
    /// hold anything, and feed only the discarded columns.
    #[inline(always)]
    fn flat<const FMA: bool>(
        &self,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
        act: impl Fn(f32) -> f32 + Copy,
    ) {
        let Plane {
            plane,
            width,
            stride,
            taps,
            bias,
            out_width,
        } = *self;
        let height = plane.len() / width;
        let out_height = out.len() / out_width;
        // `pitch`: row length of the layout and of the flat output; `source`:
        // layout length; `offsets`: where each tap's stream starts in it.
        let (pitch, source, offsets) = if stride == 1 {
            let q = width + 2;
            let offsets = [0, 1, 2, q, q + 1, q + 2, 2 * q, 2 * q + 1, 2 * q + 2];
            (q, (height + 2) * q, offsets)
        } else {
            let q = out_width + 1;
            let sub = (out_height + 1) * q;
            // Sub-planes: even rows even columns (ee), even-odd (eo), odd-even
            // (oe), odd-odd (oo), in that order.
            let (ee, eo, oe, oo) = (0, sub, 2 * sub, 3 * sub);
            let offsets = [ee, eo, ee + 1, oe, oo, oe + 1, ee + q, eo + q, ee + q + 1];
            (q, 4 * sub, offsets)
        };
        let flat = out_height * pitch - (pitch - out_width);
        grow(scratch, source + flat);
        let (layout, ext) = scratch.split_at_mut(source);
        if stride == 1 {
            layout[..pitch].fill(0.0);
            layout[(height + 1) * pitch..][..pitch].fill(0.0);
            for (r, src) in plane.chunks_exact(width).enumerate() {
                let dst = &mut layout[(r + 1) * pitch..][..pitch];
                dst[0] = 0.0;
                copy(&mut dst[1..=width], src);
                dst[width + 1] = 0.0;
            }
        } else {
            let sub = source / 4;
            // Padded row 0 (and H + 1 when H is odd, as it is then read):
            // even sub-planes, row 0 (and (H + 1) / 2).
            for base in [0, sub] {
                layout[base..][..pitch].fill(0.0);
                if height % 2 == 1 {
                    layout[base + height.div_ceil(2) * pitch..][..pitch].fill(0.0);
                }
            }
            // Padded row r is input row r - 1; padded column c is input
            // column c - 1. Sub-plane row a of the even planes is padded row 2a.
            for (r, src) in plane.chunks_exact(width).enumerate() {
                let padded = r + 1;
                let base = (padded % 2) * 2 * sub + (padded / 2) * pitch;
                let (evens, odds) = layout[base..].split_at_mut(sub);
                // Padded column 0, and W + 1 when W is odd (it is then read).
                evens[0] = 0.0;
                if width % 2 == 1 {
                    evens[out_width] = 0.0;
                }
                // Even padded columns 2b are input columns 2b - 1.
                deinterleave(src, &mut odds[..pitch], &mut evens[1..pitch]);
            }
        }
        let layout = &*layout;
        let at = |t: usize| &layout[offsets[t]..][..flat];
        nine_taps::<FMA>(
            &mut ext[..flat],
            [
                at(0),
                at(1),
                at(2),
                at(3),
                at(4),
                at(5),
                at(6),
                at(7),
                at(8),
            ],
            taps,
            bias,
            act,
        );
        for (oh, out_row) in out.chunks_exact_mut(out_width).enumerate() {
            out_row.copy_from_slice(&ext[oh * pitch..][..out_width]);
        }
    }
}

/// Whether planes of a 3x3 depthwise convolution (one cell of padding) with
/// output rows `out_width` wide go sixteen at a time
/// ([`kernels::depthwise3x3_x16`]) rather than one at a time: narrow planes,
/// whose rows the one-plane kernel's vectors run mostly empty. Measured on the
/// layers alone (`mlcapsule bench --model`, ms):
///
/// - AVX2 (EPYC Zen 2, one thread): 14x14 planes at stride 1 gain 13 % (0.098
///   to 0.085 for 384 channels), 7x7 45 %, stride 2 into 14x14 55 %; 28x28 at
///   stride 1 loses 25 %, and stride 2 into 28x28 (144 channels) 8 % at one
///   thread and 9 % at two.
/// - AVX-512 (EPYC Zen 4), medians of five alternated runs at one and two
///   threads: 14x14 planes at stride 1 gain 9 % and 14 % (384 channels, 0.0556
///   to 0.0508 and 0.0499 to 0.0431), 8 % and 3 % (576 channels); 28x28 at
///   stride 1 loses 14 % and 4 % (192 channels). At stride 2, against the
///   one-plane kernel of `kernels::x16` (in-register deinterleave): into 14x14
///   (192 channels) 0.040 against 0.049 and 0.032 against 0.037, into 7x7 (576)
///   0.038 against 0.075 and 0.028 against 0.053; into 28x28 (144) it loses,
///   0.117 against 0.105 and 0.077 against 0.071.
/// - AVX-512 (a Xeon, per node inside MobileNetV2, an earlier session): 7x7
///   planes and stride 2 into 14x14 or 7x7 gained 25-60 %; 14x14 planes at
///   stride 1 gained 0.01 ms per node at one thread and lost as much at two.
///   The rule follows the Zen 4 figures, measured with today's kernels.
/// - AVX-512 (Zen 4), against one plane at a time row by row (later: one or
///   two vectors per row, [`kernels::depthwise3x3_stride1`] and `_stride2`),
///   medians of five alternated runs, one thread: at stride 1 sixteen at a
///   time lost everywhere it applied, 14x14 planes 0.050 against 0.022 ms
///   (384 channels) and 0.077 against 0.033 (576), 7x7 planes (960) 0.040
///   against 0.028; at two threads 0.05 against 0.024, 0.052 against 0.034
///   and 0.029 against 0.028. At stride 2 it lost into 14x14 (192 channels,
///   0.041 against 0.026 ms) but won into 7x7 (576, 0.038 against 0.051).
/// - AVX2 (EPYC Zen 3), stride 2, alone, one thread, against the strips of
///   [`kernels::depthwise3x3_stride2`]: into 14x14 (192 channels) 0.064
///   against 0.060 ms, into 7x7 (576) 0.052 against 0.192 (a row of seven is
///   less than one strip).
fn sixteen_planes_pay(out_width: usize, stride: usize) -> bool {
    match kernels::isa() {
        kernels::Isa::Baseline => false,
        // Quicker one plane at a time, row by row, but into rows of at most
        // half a vector: `kernels::depthwise3x3_stride1` and `_stride2`.
        kernels::Isa::Avx512 => stride == 2 && out_width <= 8,
        // At stride 2 `kernels::depthwise3x3_stride2`'s strips of eight, but
        // not into rows narrower than a strip.
        kernels::Isa::Avx2 => out_width < if stride == 2 { 8 } else { 16 },
    }
}

/// Output rows narrower than this go through [`Plane::flat`].
const FLAT_BELOW: usize = 32;

/// `dst.copy_from_slice(src)` for short rows, as a loop the compiler
/// inlines rather than a call of `memcpy`.
#[inline(always)]
fn copy(dst: &mut [f32], src: &[f32]) {
    let (dst_chunks, dst_rest) = dst.as_chunks_mut::<8>();
    let (src_chunks, src_rest) = src.as_chunks::<8>();
    for (d, s) in dst_chunks.iter_mut().zip(src_chunks) {
        *d = *s;
    }
    for (d, s) in dst_rest.iter_mut().zip(src_rest) {
        *d = *s;
    }
}

/// Copies the cells of `src` at even indices into `evens` and those at odd
/// indices into `odds`, as far as each reaches. Pairs, not `step_by`, so
/// that the loops vectorise.
#[inline(always)]
fn deinterleave(src: &[f32], evens: &mut [f32], odds: &mut [f32]) {
    let (pairs, rest) = src.as_chunks::<2>();
    for (e, pair) in evens.iter_mut().zip(pairs) {
        *e = pair[0];
    }
    for (o, pair) in odds.iter_mut().zip(pairs) {
        *o = pair[1];
    }
    if let (Some(&last), Some(e)) = (rest.first(), evens.get_mut(pairs.len())) {
        *e = last;
    }
}

/// `out[j] = act(bias + sum_t taps[t] * src[t][j])`, with three partial
/// sums (one per kernel row) so that the loop is not one long dependency
/// chain.
#[inline(always)]
fn nine_taps<const FMA: bool>(
    out: &mut [f32],
    src: [&[f32]; 9],
    taps: &[f32; 9],
    bias: f32,
    act: impl Fn(f32) -> f32,
) {
    let n = out.len();
    let [s0, s1, s2, s3, s4, s5, s6, s7, s8] = src;
    let (s0, s1, s2) = (&s0[..n], &s1[..n], &s2[..n]);
    let (s3, s4, s5) = (&s3[..n], &s4[..n], &s5[..n]);
    let (s6, s7, s8) = (&s6[..n], &s7[..n], &s8[..n]);
    let [w0, w1, w2, w3, w4, w5, w6, w7, w8] = *taps;
    for j in 0..n {
        let top = fmadd::<FMA>(
            w2,
            s2[j],
            fmadd::<FMA>(w1, s1[j], fmadd::<FMA>(w0, s0[j], bias)),
        );
        let mid = fmadd::<FMA>(w5, s5[j], fmadd::<FMA>(w4, s4[j], w3 * s3[j]));
        let bottom = fmadd::<FMA>(w8, s8[j], fmadd::<FMA>(w7, s7[j], w6 * s6[j]));
        out[j] = act(top + mid + bottom);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tiny deterministic generator (xorshift32): the tests need varied
    /// values, not statistical quality.
    struct Rng(u32);

    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            self.0
        }

        fn tensor(&mut self, shape: &[usize]) -> Tensor {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|_| (self.next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            Tensor::new(shape.to_vec(), data).unwrap()
        }
    }

    /// Conv by its definition, one output element at a time.
    fn naive(attrs: &ConvAttrs, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let [n, c, h, wd] = x.shape().try_into().unwrap();
        let [m, cg, kh, kw] = w.shape().try_into().unwrap();
        let [sh, sw] = attrs.strides;
        let [dh, dw] = attrs.dilations;
        let [pt, pl, pb, pr] = attrs.pads;
        let oh = (h + pt + pb - (dh * (kh - 1) + 1)) / sh + 1;
        let ow = (wd + pl + pr - (dw * (kw - 1) + 1)) / sw + 1;
        let mg = m / attrs.group;
        let mut y = vec![0.0f32; n * m * oh * ow];
        for ni in 0..n {
            for mi in 0..m {
                let g = mi / mg;
                for i in 0..oh {
                    for j in 0..ow {
                        let mut acc = b.map_or(0.0, |b| b.data()[mi]);
                        for ci in 0..cg {
                            let ch = g * cg + ci;
                            for ki in 0..kh {
                                for kj in 0..kw {
                                    let ih = (i * sh + ki * dh) as isize - pt as isize;
                                    let iw = (j * sw + kj * dw) as isize - pl as isize;
                                    if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                        continue;
                                    }
                                    let xv = x.data()
                                        [((ni * c + ch) * h + ih as usize) * wd + iw as usize];
                                    let wv = w.data()[((mi * cg + ci) * kh + ki) * kw + kj];
                                    acc += xv * wv;
                                }
                            }
                        }
                        acc = match attrs.activation {
                            Activation::None => acc,
                            Activation::Relu => acc.max(0.0),
                            Activation::Clip { min, max } => acc.max(min).min(max),
                        };
                        y[((ni * m + mi) * oh + i) * ow + j] = acc;
                    }
                }
            }
        }
        Tensor::new(vec![n, m, oh, ow], y).unwrap()
    }

    /// Each element within 1e-4 of `want`, relative to the larger of its
    /// own size and the output's root mean square: an output near zero sums
    /// terms the size of the others, and carries their rounding. (These
    /// tests' weights are not scaled to their depth, so outputs run to
    /// about 8; Winograd's F(4x4, 3x3) on 64 channels at 32x32 was off by
    /// 2.3e-4 there, 2.9e-5 of the root mean square, where the other paths
    /// stay within 4e-5.)
    fn assert_close(got: &Tensor, want: &Tensor) {
        assert_eq!(got.shape(), want.shape());
        let data = want.data();
        let mean_square = data.iter().map(|v| v * v).sum::<f32>() / data.len().max(1) as f32;
        let scale = mean_square.sqrt().max(1.0);
        for (i, (g, w)) in got.data().iter().zip(data).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(scale),
                "[{i}]: {g} vs {w}"
            );
        }
    }

    #[derive(Clone, Debug)]
    struct Case {
        attrs: ConvAttrs,
        x: Vec<usize>,
        w: Vec<usize>,
        bias: bool,
    }

    fn check(case: &Case, seed: u32) {
        let mut rng = Rng(seed | 1);
        let x = rng.tensor(&case.x);
        let w = rng.tensor(&case.w);
        let b = case.bias.then(|| rng.tensor(&case.w[..1]));
        let got = conv(&case.attrs, &x, &w, b.as_ref(), None).unwrap();
        assert_close(&got, &naive(&case.attrs, &x, &w, b.as_ref()));
        // With a residual added before the activation: one of the output's
        // shape (added block by block) and one that broadcasts.
        let plain = ConvAttrs {
            activation: Activation::None,
            ..case.attrs.clone()
        };
        let sum = naive(&plain, &x, &w, b.as_ref());
        let shape = sum.shape().to_vec();
        for r in [rng.tensor(&shape), rng.tensor(&[1, shape[1], 1, 1])] {
            let got = conv(&case.attrs, &x, &w, b.as_ref(), Some(&r)).unwrap();
            let added = binary(Cow::Borrowed(&sum), Cow::Borrowed(&r), |a, b| a + b).unwrap();
            assert_close(&got, &activation(Cow::Owned(added), case.attrs.activation));
        }
    }

    fn case(
        x: [usize; 4],
        m: usize,
        group: usize,
        kernel: [usize; 2],
        strides: [usize; 2],
        pads: [usize; 4],
        dilations: [usize; 2],
    ) -> Case {
        Case {
            attrs: ConvAttrs {
                kernel,
                strides,
                pads,
                dilations,
                group,
                activation: Activation::None,
            },
            x: x.to_vec(),
            w: vec![m, x[1] / group, kernel[0], kernel[1]],
            bias: true,
        }
    }

    /// One of each activation the 3x3 kernels fuse.
    const ACTIVATIONS: [Activation; 3] = [
        Activation::None,
        Activation::Relu,
        Activation::Clip {
            min: -0.1,
            max: 0.2,
        },
    ];

    #[test]
    fn each_strategy_matches_the_definition() {
        let cases = [
            // im2col: plain, strided, padded, dilated, asymmetric, batched
            case([1, 3, 7, 6], 4, 1, [3, 3], [1, 1], [0; 4], [1, 1]),
            case([2, 3, 9, 8], 5, 1, [3, 2], [2, 3], [1, 0, 2, 1], [1, 1]),
            case([2, 4, 8, 8], 6, 1, [3, 3], [1, 1], [2, 2, 2, 2], [2, 3]),
            // im2col onto 49 and 33 cells, one task per image: with AVX-512
            // the pointwise kernel, which sums the last cell apart
            case([2, 16, 7, 7], 20, 1, [3, 3], [1, 1], [2, 2, 2, 2], [2, 2]),
            case([2, 8, 3, 11], 6, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            // grouped
            case([3, 6, 5, 7], 4, 2, [3, 3], [1, 2], [1, 1, 1, 1], [1, 1]),
            case([1, 6, 6, 6], 9, 3, [2, 2], [2, 2], [0, 1, 1, 0], [2, 1]),
            // pointwise (1x1, stride 1, no pad), with and without groups
            case([2, 8, 4, 5], 6, 1, [1, 1], [1, 1], [0; 4], [1, 1]),
            case([2, 8, 4, 5], 6, 2, [1, 1], [1, 1], [0; 4], [3, 2]),
            // pointwise, one image split over threads (given two): by its
            // columns (each task a segment of every row), by output channels
            case([1, 8, 8, 9], 6, 1, [1, 1], [1, 1], [0; 4], [1, 1]),
            case([1, 8, 4, 5], 70, 1, [1, 1], [1, 1], [0; 4], [1, 1]),
            // 1x1 but strided or padded: not pointwise
            case([1, 4, 5, 5], 3, 1, [1, 1], [2, 2], [0; 4], [1, 1]),
            case([1, 4, 5, 5], 3, 1, [1, 1], [1, 1], [1, 1, 1, 1], [1, 1]),
            // depthwise: plain, strided, padded, dilated, batched
            case([1, 5, 7, 7], 5, 5, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            case([3, 4, 9, 8], 4, 4, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),
            case([2, 3, 9, 9], 3, 3, [3, 2], [1, 3], [2, 0, 1, 2], [2, 2]),
            // 3x3 depthwise, pad 1, stride 1 and 2, rows wider than a vector
            case([2, 3, 20, 37], 3, 3, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            case([1, 2, 21, 40], 2, 2, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),
            case([1, 2, 1, 1], 2, 2, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            case([1, 2, 2, 3], 2, 2, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),
            // 3x3 depthwise, sixteen planes at a time: blocks that wrap
            // round to the next batch item, a tail of single planes
            case([2, 24, 7, 7], 24, 24, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            case(
                [3, 13, 14, 11],
                13,
                13,
                [3, 3],
                [2, 2],
                [1, 1, 1, 1],
                [1, 1],
            ),
            // depthwise with a channel multiplier goes through im2col
            case([2, 3, 6, 6], 6, 3, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            // kernel as large as the padded input
            case([1, 2, 3, 3], 2, 1, [5, 5], [1, 1], [1, 1, 1, 1], [1, 1]),
        ];
        for (i, c) in cases.iter().enumerate() {
            check(c, 7 + i as u32);
            let mut unbiased = c.clone();
            unbiased.bias = false;
            check(&unbiased, 99 + i as u32);
        }
    }

    #[test]
    fn big_products_take_the_threaded_path() {
        // 64 x 576 x 1024: the GEMM threads it (given threads), units run
        // in sequence. Dilated, as Winograd does not take it; undilated, it
        // goes by Winograd (F(4x4, 3x3) with AVX-512), with a residual too.
        let c = case([2, 64, 32, 32], 64, 1, [3, 3], [1, 1], [2, 2, 2, 2], [2, 2]);
        if crate::threads::threads() > 1 {
            assert!(kernels::splits_itself(64, 64 * 9, 1024));
        }
        check(&c, 5);
        let c = case([2, 64, 32, 32], 64, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]);
        check(&c, 4);
        // Pointwise with many output channels: split by channels.
        let c = case([1, 32, 16, 16], 160, 1, [1, 1], [1, 1], [0; 4], [1, 1]);
        check(&c, 6);
        // Pointwise with few: split by columns, several tiles per task.
        let c = case([1, 64, 64, 64], 96, 1, [1, 1], [1, 1], [0; 4], [1, 1]);
        check(&c, 7);
        // im2col with four times more output channels than output cells
        // (ResNet-18's last convolutions): split by channels too.
        if crate::threads::threads() > 1 {
            assert!(kernels::splits_itself(128, 64 * 9, 25));
        }
        let c = case([1, 64, 5, 5], 128, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]);
        check(&c, 10);
        // Deep im2col with few output cells (1179 rows of depth, 30 cells): split
        // by depth, 131 input channels into 66 and 65, with and without the ReLU.
        let mut c = case([1, 131, 6, 5], 7, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]);
        check(&c, 11);
        c.attrs.activation = Activation::Relu;
        check(&c, 12);
        // The same onto 49 cells: each task's partial sums by the pointwise
        // kernel (with AVX-512).
        let c = case([1, 120, 7, 7], 20, 1, [3, 3], [1, 1], [2, 2, 2, 2], [2, 2]);
        check(&c, 15);
        // Pointwise much deeper than its outputs (MobileNetV2's projections):
        // split by depth, through the pointwise kernel and through `gemm`.
        let c = case([1, 96, 14, 14], 24, 1, [1, 1], [1, 1], [0; 4], [1, 1]);
        check(&c, 13);
        let c = case([1, 400, 7, 7], 100, 1, [1, 1], [1, 1], [0; 4], [1, 1]);
        check(&c, 14);
        // Depthwise with enough work to split its planes over threads:
        // the 3x3 kernel and the general loop.
        let c = case(
            [2, 40, 20, 20],
            40,
            40,
            [3, 3],
            [1, 1],
            [1, 1, 1, 1],
            [1, 1],
        );
        check(&c, 8);
        let c = case(
            [1, 40, 20, 20],
            40,
            40,
            [5, 5],
            [2, 2],
            [2, 2, 2, 2],
            [1, 1],
        );
        check(&c, 9);
    }

    #[test]
    fn spent_weights_give_the_same_bits_and_read_as_zeros() {
        // Deep im2col onto 49 cells, split by depth (120 channels into 60
        // and 60 at two threads): the pointwise kernel overwrites each task's
        // part of W as it sums it. With a bias, a residual and a ReLU; and
        // one Conv that spends nothing and overwrites W after it.
        let mut deep = case([1, 120, 7, 7], 20, 1, [3, 3], [1, 1], [2, 2, 2, 2], [2, 2]);
        deep.attrs.activation = Activation::Relu;
        let small = case([1, 8, 7, 7], 6, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]);
        for (c, seed) in [(&deep, 21), (&small, 22)] {
            let mut rng = Rng(seed);
            let x = rng.tensor(&c.x);
            let w = rng.tensor(&c.w);
            let b = rng.tensor(&c.w[..1]);
            let shape = naive(&c.attrs, &x, &w, Some(&b)).shape().to_vec();
            let r = rng.tensor(&shape);
            let by_depth = crate::threads::threads() > 1 && kernels::isa() == kernels::Isa::Avx512;
            let spends = spends(&c.attrs, &c.x, &c.w, Some(&c.w[..1]));
            assert_eq!(spends, by_depth && c.x[1] == 120, "{:?}", c.x);
            let read = conv(&c.attrs, &x, &w, Some(&b), Some(&r)).unwrap();
            let mut handed = w.clone();
            let spent = conv_spending(&c.attrs, &x, &mut handed, Some(&b), Some(&r)).unwrap();
            assert!(handed.data().iter().all(|v| v.to_bits() == 0), "{:?}", c.x);
            let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&spent), bits(&read), "{:?}", c.x);
        }
    }

    #[test]
    fn fused_activations() {
        for activation in [
            Activation::Relu,
            Activation::Clip {
                min: -0.2,
                max: 0.3,
            },
        ] {
            for mut c in [
                case([2, 4, 6, 6], 4, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
                case([2, 4, 6, 6], 4, 4, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            ] {
                c.attrs.activation = activation;
                check(&c, 3);
            }
        }
    }

    #[test]
    fn deinterleave_matches_the_cell_by_cell_split() {
        for len in 0..100usize {
            let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
            // Outputs as long as the pairs, one longer (odd rows), and shorter.
            for (e_len, o_len) in [(len / 2, len / 2), (len.div_ceil(2), len / 2), (3, 2)] {
                let mut want = (vec![-1.0; e_len], vec![-1.0; o_len]);
                for (i, &v) in src.iter().enumerate() {
                    let (dst, at) = if i % 2 == 0 {
                        (&mut want.0, i / 2)
                    } else {
                        (&mut want.1, i / 2)
                    };
                    if let Some(d) = dst.get_mut(at) {
                        *d = v;
                    }
                }
                let mut got = (vec![-1.0; e_len], vec![-1.0; o_len]);
                deinterleave(&src, &mut got.0, &mut got.1);
                assert_eq!(got, want, "{len} cells into {e_len} and {o_len}");
            }
        }
    }

    #[test]
    fn depthwise_over_its_input_gives_the_bits_of_a_separate_output() {
        let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let avx512 = kernels::isa() == kernels::Isa::Avx512;
        for (seed, (height, width)) in [(3, 8), (14, 14), (5, 17), (28, 28), (2, 32)]
            .into_iter()
            .enumerate()
        {
            for (a, activation) in ACTIVATIONS.into_iter().enumerate() {
                let mut c = case(
                    [2, 20, height, width],
                    20,
                    20,
                    [3, 3],
                    [1, 1],
                    [1, 1, 1, 1],
                    [1, 1],
                );
                c.attrs.activation = activation;
                let mut rng = Rng((seed * 3 + a) as u32 | 1);
                let (x, w, b) = (rng.tensor(&c.x), rng.tensor(&c.w), rng.tensor(&c.w[..1]));
                let want = conv(&c.attrs, &x, &w, Some(&b), None).unwrap();
                // As the executor runs it when it hands X over.
                let op = crate::graph::Op::Conv(c.attrs.clone());
                let args = vec![Cow::Owned(x.clone()), Cow::Borrowed(&w), Cow::Borrowed(&b)];
                let executed = crate::ops::execute(&op, args).unwrap();
                assert_eq!(bits(&executed), bits(&want), "{height}x{width}, executed");
                match depthwise_over_input(&c.attrs, x.clone(), &w, Some(&b)) {
                    Ok(got) => {
                        assert!(avx512, "only the AVX-512 kernel works in place");
                        assert_eq!(bits(&got.unwrap()), bits(&want), "{height}x{width}");
                    }
                    Err(back) => {
                        assert!(!avx512, "{height}x{width} applies");
                        assert_eq!(back, x);
                    }
                }
            }
        }
        // Elsewhere X comes back as it was: planes 7 or 33 wide, stride 2, a
        // 5x5 kernel, two outputs per channel, and a shape W does not fit.
        let others = [
            case([1, 4, 7, 7], 4, 4, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            case([1, 4, 9, 33], 4, 4, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            case([1, 4, 14, 14], 4, 4, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),
            case([1, 4, 14, 14], 4, 4, [5, 5], [1, 1], [2, 2, 2, 2], [1, 1]),
            case([1, 4, 14, 14], 8, 4, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            case([1, 4, 14, 14], 4, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
        ];
        for c in others {
            let mut rng = Rng(7);
            let (x, w) = (rng.tensor(&c.x), rng.tensor(&c.w));
            let back = depthwise_over_input(&c.attrs, x.clone(), &w, None).err();
            assert_eq!(back, Some(x), "{:?} by {:?}", c.x, c.w);
        }
        let mut rng = Rng(9);
        let c = case([1, 4, 14, 14], 4, 4, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]);
        let (x, w) = (rng.tensor(&c.x), rng.tensor(&[5, 1, 3, 3]));
        assert_eq!(
            depthwise_over_input(&c.attrs, x.clone(), &w, None).err(),
            Some(x)
        );
    }

    #[test]
    fn depthwise3x3_ignores_what_its_scratch_holds() {
        // The kernel clears only the padding cells that valid outputs
        // read: NaNs left in the scratch by an earlier plane must not leak.
        let mut rng = Rng(11);
        let sizes = [
            (1, 1),
            (2, 3),
            (7, 7),
            (14, 14),
            (13, 9),
            (5, 40),
            (9, 33),
            (6, 64),
            (11, 65),
        ];
        for (h, w) in sizes {
            for stride in [1, 2] {
                for activation in ACTIVATIONS {
                    let mut c = case([1, 1, h, w], 1, 1, [3, 3], [stride; 2], [1; 4], [1, 1]);
                    c.attrs.activation = activation;
                    let (x, taps, b) = (rng.tensor(&c.x), rng.tensor(&c.w), rng.tensor(&[1]));
                    let want = naive(&c.attrs, &x, &taps, Some(&b));
                    let mut out = vec![f32::NAN; want.len()];
                    let mut scratch = vec![f32::NAN; 8192];
                    kernels::depthwise3x3(
                        x.data(),
                        w,
                        stride,
                        taps.data(),
                        b.data()[0],
                        activation,
                        &mut out,
                        want.shape()[3],
                        &mut scratch,
                    );
                    let got = Tensor::new(want.shape().to_vec(), out).unwrap();
                    assert_close(&got, &want);
                }
            }
        }
    }

    #[test]
    fn sixteen_planes_match_the_one_plane_kernel_bit_for_bit() {
        // Where the one-plane kernel pads rather than skips the edge taps
        // (narrow planes, and stride 2), the two sum in the same order.
        let mut rng = Rng(23);
        let sizes = [
            (1, 1),
            (2, 3),
            (7, 7),
            (14, 14),
            (13, 9),
            (5, 17),
            (28, 28),
            (56, 56),
            (61, 57),
        ];
        for (h, w) in sizes {
            for (stride, activation) in [1, 2].into_iter().flat_map(|s| ACTIVATIONS.map(|a| (s, a)))
            {
                if stride == 1 && w >= FLAT_BELOW {
                    continue;
                }
                let c = case([1, 16, h, w], 16, 16, [3, 3], [stride; 2], [1; 4], [1, 1]);
                let (x, taps, b) = (rng.tensor(&c.x), rng.tensor(&c.w), rng.tensor(&[16]));
                // A NaN in plane 3 must come out as NaN through every activation.
                let mut x = x.data().to_vec();
                x[3 * h * w + (h * w) / 2] = f32::NAN;
                let out_plane = h.div_ceil(stride) * w.div_ceil(stride);
                let planes = kernels::Sixteen {
                    input: &x,
                    width: w,
                    stride,
                    taps: std::array::from_fn(|t| std::array::from_fn(|l| taps.data()[l * 9 + t])),
                    bias: b.data().try_into().unwrap(),
                    activation,
                };
                let mut got = vec![f32::NAN; 16 * out_plane];
                let mut scratch = vec![f32::NAN; 1 << 16];
                if !kernels::depthwise3x3_x16(&planes, &mut got, &mut scratch) {
                    return; // not on this CPU
                }
                for l in 0..16 {
                    let mut want = vec![f32::NAN; out_plane];
                    kernels::depthwise3x3(
                        &x[l * h * w..][..h * w],
                        w,
                        stride,
                        &taps.data()[l * 9..][..9],
                        b.data()[l],
                        activation,
                        &mut want,
                        w.div_ceil(stride),
                        &mut scratch,
                    );
                    let got = &got[l * out_plane..][..out_plane];
                    // Any NaN is the same NaN here; every other value, bit for bit.
                    let bits = |v: &[f32]| {
                        v.iter()
                            .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(
                        bits(got),
                        bits(&want),
                        "{h}x{w}, stride {stride}, {activation:?}, plane {l}"
                    );
                }
            }
        }
    }

    #[test]
    fn few_channels_take_the_direct_kernel_and_match_the_definition() {
        // Rows of 37 cells (two blocks and a tail), 7x7 at stride 2 over two
        // images, a 2x5 kernel at strides 1 and 3 with uneven padding, and one
        // output channel.
        let cases = [
            case([1, 3, 20, 37], 7, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            case([2, 3, 33, 40], 13, 1, [7, 7], [2, 2], [3, 3, 3, 3], [1, 1]),
            case([1, 2, 9, 50], 5, 1, [2, 5], [1, 3], [0, 1, 2, 0], [1, 1]),
            case([1, 4, 6, 16], 1, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
        ];
        for (i, c) in cases.iter().enumerate() {
            let geo = Geometry::new(&c.attrs, &c.x, &c.w, Some(&c.w[..1])).unwrap();
            assert!(direct::applies(&geo), "case {i}");
            for (j, activation) in ACTIVATIONS.into_iter().enumerate() {
                let mut c = c.clone();
                c.attrs.activation = activation;
                check(&c, 31 + 3 * i as u32 + j as u32);
                c.bias = false;
                check(&c, 61 + 3 * i as u32 + j as u32);
            }
        }
    }

    /// [`kernels::direct_row`] or its portable body.
    type RowKernel<'f> = &'f dyn Fn(&DirectInput<'_>, usize, &mut [&mut [f32]]);

    #[test]
    fn direct_kernel_matches_the_portable_one_bit_for_bit() {
        let mut rng = Rng(41);
        let (c, kh, kw, stride, rows) = (3, 3, 5, 2, 9);
        // Output row 3 of rows of each width: one block of 16 cells; 37 (AVX2:
        // two blocks and a tail of 5; AVX-512: a block of three vectors); 100
        // (AVX-512: a block of four vectors, then one of three). The planes hold
        // the rows it reads and the cells its last block reads.
        for width in [16usize, 37, 100] {
            let pitch = width.next_multiple_of(BLOCK_COLUMNS) + (kw - 1) / stride;
            let mut planes: Vec<f32> = rng.tensor(&[c * stride * rows * pitch]).data().to_vec();
            // A NaN that output cell 10 reads (channel 1, phase 0, row 7, cell
            // 11 for tap (1, 2, 2)) must come out as NaN through every activation.
            planes[(stride * rows + 7) * pitch + 11] = f32::NAN;
            let mut offsets = Vec::new();
            for ch in 0..c {
                for ki in 0..kh {
                    for kj in 0..kw {
                        offsets.push(
                            (ch * stride + kj % stride) * rows * pitch + ki * pitch + kj / stride,
                        );
                    }
                }
            }
            let weights = rng.tensor(&[offsets.len() * BLOCK_OUTPUTS]);
            let taps: Vec<[f32; BLOCK_OUTPUTS]> = weights
                .data()
                .chunks_exact(BLOCK_OUTPUTS)
                .map(|t| t.try_into().unwrap())
                .collect();
            for activation in ACTIVATIONS {
                let input = DirectInput {
                    planes: &planes,
                    row_stride: 2,
                    pitch,
                    offsets: &offsets,
                    taps: &taps,
                    bias: std::array::from_fn(|i| i as f32 - 2.5),
                    activation,
                };
                let run = |f: RowKernel| {
                    let mut out = vec![f32::NAN; BLOCK_OUTPUTS * width];
                    let mut rows: Vec<&mut [f32]> = out.chunks_mut(width).collect();
                    f(&input, 3, &mut rows);
                    out
                };
                let got = run(&kernels::direct_row);
                let want = run(&direct_row_body::<true>);
                // Any NaN is the same NaN here; every other value, bit for bit.
                let bits = |v: &[f32]| {
                    v.iter()
                        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
                        .collect::<Vec<_>>()
                };
                assert_eq!(bits(&got), bits(&want), "width {width}, {activation:?}");
                assert!(got[10].is_nan() && got[5].is_finite(), "{activation:?}");
            }
        }
    }

    #[test]
    fn shape_errors_say_what_was_expected() {
        let attrs = case([1, 4, 5, 5], 2, 2, [3, 3], [1, 1], [0; 4], [1, 1]).attrs;
        let err = |x: &[usize], w: &[usize], b: Option<&[usize]>| {
            let b = b.map(|s| Tensor::zeros(s.to_vec()));
            conv(
                &attrs,
                &Tensor::zeros(x.to_vec()),
                &Tensor::zeros(w.to_vec()),
                b.as_ref(),
                None,
            )
            .unwrap_err()
            .0
        };
        assert!(err(&[4, 5, 5], &[2, 2, 3, 3], None).contains("[N, C, H, W]"));
        assert!(err(&[1, 4, 5, 5], &[2, 2, 3], None).contains("[M, C/group, kH, kW]"));
        assert!(err(&[1, 5, 5, 5], &[2, 2, 3, 3], None).contains("do not split into 2 groups"));
        assert!(err(&[1, 4, 5, 5], &[2, 4, 3, 3], None).contains("[M, 2, kH, kW]"));
        assert!(err(&[1, 4, 5, 5], &[3, 2, 3, 3], None).contains("3 output channels"));
        assert!(err(&[1, 4, 5, 5], &[2, 2, 2, 3], None).contains("kernel_shape is 3x3"));
        assert!(err(&[1, 4, 5, 5], &[2, 2, 3, 3], Some(&[3])).contains("B must have shape [2]"));
        assert!(err(&[1, 4, 2, 5], &[2, 2, 3, 3], None).contains("along H"));
    }

    #[test]
    fn empty_batches_give_empty_outputs() {
        let c = case([0, 4, 5, 5], 2, 1, [3, 3], [1, 1], [0; 4], [1, 1]);
        let y = conv(
            &c.attrs,
            &Tensor::zeros(c.x.clone()),
            &Tensor::zeros(c.w.clone()),
            None,
            None,
        )
        .unwrap();
        assert_eq!(y.shape(), &[0, 2, 3, 3]);
    }

    #[test]
    fn images_without_rows_or_columns_give_the_bias() {
        // No input cell at all, only padding (or no channel): every output is the
        // bias. Through the direct kernel (3 channels, 20 cells a row), im2col
        // and depthwise.
        for (x, m, group, pads) in [
            ([1, 0, 5, 20], 4, 1, [1, 1, 1, 1]),
            ([1, 3, 0, 20], 4, 1, [2, 1, 2, 1]),
            ([2, 3, 2, 0], 4, 1, [1, 9, 1, 9]),
            ([1, 8, 0, 6], 5, 1, [2, 1, 2, 1]),
            ([1, 4, 0, 6], 4, 4, [2, 1, 2, 1]),
        ] {
            let c = case(x, m, group, [3, 3], [1, 1], pads, [1, 1]);
            let bias = Tensor::new(vec![m], (0..m).map(|i| i as f32).collect()).unwrap();
            let y = conv(
                &c.attrs,
                &Tensor::zeros(c.x.clone()),
                &Tensor::zeros(c.w.clone()),
                Some(&bias),
                None,
            )
            .unwrap();
            let plane = y.shape()[2] * y.shape()[3];
            assert!(plane > 0, "{x:?}");
            for (i, v) in y.data().iter().enumerate() {
                assert_eq!(*v, ((i / plane) % m) as f32, "{x:?} [{i}]");
            }
        }
    }

    fn any_case() -> impl Strategy<Value = Case> {
        (
            (1usize..3, 1usize..4, 1usize..4, 0u8..3),
            (1usize..4, 1usize..4),
            (1usize..4, 1usize..4, 1usize..3, 1usize..3),
            [0usize..3, 0usize..3, 0usize..3, 0usize..3],
            (2usize..10, 2usize..10, any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (n, group, per_group, shape),
                    (kh, kw),
                    (sh, sw, dh, dw),
                    pads,
                    (h, w, bias, relu),
                )| {
                    // shape 0: depthwise; 1: grouped; 2: any
                    let (c, m) = match shape {
                        0 => (group, group),
                        1 => (group * per_group, group * (1 + per_group % 2)),
                        _ => (group * per_group, group * 2),
                    };
                    Case {
                        attrs: ConvAttrs {
                            kernel: [kh, kw],
                            strides: [sh, sw],
                            pads,
                            dilations: [dh, dw],
                            group,
                            activation: if relu {
                                Activation::Relu
                            } else {
                                Activation::None
                            },
                        },
                        x: vec![n, c, h, w],
                        w: vec![m, c / group, kh, kw],
                        bias,
                    }
                },
            )
            .prop_filter("kernel fits the padded input", |c| {
                let extent = |k: usize, d: usize| d * (k - 1) + 1;
                let fits = |i: usize, k, d, p: usize| i + p >= extent(k, d);
                fits(
                    c.x[2],
                    c.w[2],
                    c.attrs.dilations[0],
                    c.attrs.pads[0] + c.attrs.pads[2],
                ) && fits(
                    c.x[3],
                    c.w[3],
                    c.attrs.dilations[1],
                    c.attrs.pads[1] + c.attrs.pads[3],
                )
            })
    }

    proptest! {
        #[test]
        fn random_convolutions_match_the_definition(c in any_case(), seed in any::<u32>()) {
            check(&c, seed);
        }
    }

    /// Deep im2col Convs on few output cells, which several threads split over
    /// their depth ([`Unit::by_depth`]): any kernel, stride and padding.
    fn any_deep_case() -> impl Strategy<Value = Case> {
        (
            (1usize..24, 1usize..4, 1usize..4),
            (1usize..3, 1usize..3),
            [0usize..3, 0usize..3, 0usize..3, 0usize..3],
            (3usize..8, 3usize..8, any::<bool>()),
        )
            .prop_map(|((m, kh, kw), (sh, sw), pads, (h, w, relu))| {
                // At least 1024 rows of depth, whatever the kernel.
                let c = 1024usize.div_ceil(kh * kw) + m;
                let mut case = case([1, c, h, w], m, 1, [kh, kw], [sh, sw], pads, [1, 1]);
                if relu {
                    case.attrs.activation = Activation::Relu;
                }
                case
            })
            .prop_filter("kernel fits the padded input", |c| {
                let [top, left, bottom, right] = c.attrs.pads;
                c.x[2] + top + bottom >= c.w[2] && c.x[3] + left + right >= c.w[3]
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn random_deep_convolutions_match_the_definition(
            c in any_deep_case(),
            seed in any::<u32>(),
        ) {
            check(&c, seed);
        }
    }

    /// Convs the direct kernel takes: up to 4 input channels, rows of 16 cells or
    /// more, any kernel, stride and padding (wider than the kernel too).
    fn any_direct_case() -> impl Strategy<Value = Case> {
        (
            (1usize..3, 1usize..5, 1usize..14),
            (1usize..8, 1usize..8, 1usize..4, 1usize..4),
            [0usize..5, 0usize..5, 0usize..5, 0usize..5],
            (1usize..12, 16usize..48, any::<bool>()),
        )
            .prop_map(|((n, c, m), (kh, kw, sh, sw), pads, (h, w, relu))| {
                let mut case = case([n, c, h, w], m, 1, [kh, kw], [sh, sw], pads, [1, 1]);
                if relu {
                    case.attrs.activation = Activation::Relu;
                }
                case
            })
            .prop_filter("kernel fits the padded input, 16 output cells a row", |c| {
                let [top, left, bottom, right] = c.attrs.pads;
                let out_width = (c.x[3] + left + right)
                    .checked_sub(c.w[3])
                    .map(|e| e / c.attrs.strides[1] + 1);
                c.x[2] + top + bottom >= c.w[2] && out_width.is_some_and(|w| w >= 16)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_few_channel_convolutions_match_the_definition(
            c in any_direct_case(),
            seed in any::<u32>(),
        ) {
            let geo = Geometry::new(&c.attrs, &c.x, &c.w, Some(&c.w[..1])).unwrap();
            prop_assert!(direct::applies(&geo));
            check(&c, seed);
        }
    }
}
