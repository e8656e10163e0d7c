//! Winograd's minimal filtering F(2x2, 3x3) and F(4x4, 3x3) for 3x3,
//! stride-1, undilated convolutions without groups (most of ResNet's and
//! VGG's work).
//!
//! The output is cut into 2x2 tiles; each reads a 4x4 input tile (rows and
//! columns `2t - pad .. 2t - pad + 4`, zero outside the image). With the
//! transforms of Lavin and Gray (2016),
//!
//! ```text
//!   U = G g G^T   (3x3 kernel g -> 4x4)      G   = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]
//!   V = B^T d B   (4x4 input tile d -> 4x4)  B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//!   Y = A^T M A   (4x4 -> 2x2 output tile)   A^T = [1 1 1 0; 0 1 -1 -1]
//! ```
//!
//! an output tile is `Y = A^T [sum_c U(m, c) ⊙ V(c)] A`. Gathering element
//! `xi` (0..16) of every U into a matrix `[M, C]` and of every V into
//! `[C, tiles]` turns the sums into 16 GEMMs of `[M, C] x [C, tiles]`:
//! 16 multiply-adds per output tile and channel pair where im2col needs 36.
//! The transforms add work per input and output cell (not per channel
//! pair), which pays off when the image has enough tiles ([`applies`]).
//!
//! Numerics: the transforms only add, subtract and halve, so results
//! differ from im2col's by a few ulps of the partial sums, well inside the
//! engine's 1e-4 agreement with onnxruntime (checked by the tests below and
//! by the reference models).
//!
//! F(4x4, 3x3) cuts the output into 4x4 tiles, each read from a 6x6 input
//! tile, with the transforms of [`f4_weights`], [`f4_input`] and
//! [`f4_output`]: 36 GEMMs, 2.25 multiply-adds per output cell and channel
//! pair against F(2x2, 3x3)'s 4, and a transformed input of 2.25 values per
//! cell against 4. Its transforms scale by up to 8 and by 1/6 and 1/24, and
//! its sums drift 4-13 times as far from the exact ones as F(2x2, 3x3)'s
//! (the tests below); ResNet-18 and VGG-16 still agree with onnxruntime to
//! 1.9e-6 and 5.2e-7. It is used on large enough images ([`how`]) where its
//! transforms run vectorised ([`kernels::winograd4_pays`]).
//!
//! The weights are transformed on every call: whole, into a buffer of 16/9
//! the weights' size (36/9 for F(4x4, 3x3)), for images cut into bands of
//! tiles; a block of output channels at a time, into a buffer per thread,
//! for small images of many channels ([`by_blocks`]; on one thread, only
//! the smallest). Either buffer is zeroed before it is recycled. The
//! transforms are written as loops that vectorise (over a row's tiles, or
//! over [`LANES`] kernels); `kernels::winograd_*` compile them per
//! instruction set, and on AVX-512 take kernels of their own that compute
//! the same bits.

use std::ops::Range;

use super::{Geometry, Kernels, Scratch, grow, split_rows, with_scratch};
use crate::graph::Activation;
use crate::kernels::{self, MatMut, MatRef};
use crate::ops::{bias_activate_body, bias_add_activate_body};
use crate::threads::{for_each_chunk, for_each_task, threads};

/// Tiles (or kernels) one step of a transform works on.
const LANES: usize = 16;

/// Fewest output tiles per image for which Winograd is used on one thread:
/// below it the weight transform, paid on every call, costs more than the
/// GEMMs save. Three or four 3x3 Convs in a row, on one thread, im2col
/// against Winograd: 512 channels at 14x14 (49 tiles) 37.3 → 32.6 ms, 256 at
/// 16x16 (64 tiles) 14.4 → 9.9; ResNet-18's layer3 Convs 2.92-2.95 → 2.20-2.39 ms
/// each, its whole queries 42.10 → 40.05 ms and VGG-16's 268.2 → 262.5
/// (alternated); its layer4 (16 tiles) 3.16-3.20 → 5.57-6.42 ms each.
const MIN_TILES_ALONE: usize = 48;

/// Fewest output tiles per image and thread for which Winograd is used on
/// several threads, each taking a band of the image's tiles (im2col splits
/// better), unless the image goes by blocks of output channels
/// ([`by_blocks`]). At two
/// threads, im2col against Winograd by bands: 128 channels at 20x20 (100
/// tiles) 3.32 against 4.01 ms, at 16x16 (64) 2.15 against 2.85, 256 at
/// 16x16 7.63 against 9.45; at 24x24 (144 tiles) Winograd wins, 4.38 against
/// 4.81 ms, 256 channels 14.25 against 16.65 (four Convs in a row).
const MIN_TILES_PER_THREAD: usize = 64;

/// Fewest channels (input and output) for which an image is computed by
/// blocks of output channels ([`by_blocks`]). Chosen for
/// the strategy it replaced, whose GEMMs each spanned the image and every
/// channel ("by steps"). Three 3x3 Convs in a row at two threads, median ms
/// of three runs each way, alternated (EPYC Zen 2), before (im2col below
/// 128 tiles, bands from 128) and by steps:
///
/// | channels | image (tiles) | before | by steps |
/// |---|---|---|---|
/// | 512 | 14x14 (49) | 16.69 | 14.13 |
/// | 256 | 14x14 (49) | 4.46-4.48 | 4.12-4.15 |
/// | 192 | 14x14 (49) | 2.61 | 2.64 |
/// | 128 | 14x14 (49) | 1.32 | 1.40 |
/// | 256 | 16x16 (64) | 5.44 | 4.66 |
/// | 128 | 16x16 (64) | 1.57 | 1.52 |
/// | 512 | 28x28 (196) | 45.3-46.1 | 39.4-40.0 |
/// | 256 | 28x28 (196) | 13.0-13.1 | 11.7-12.0 |
/// | 128 | 28x28 (196) | 3.95-4.03 | 3.82-3.87 |
/// | 256 | 56x56 (784) | 35.8-35.9 | 37.8-38.6 |
/// | 64 | 56x56 (784) | 3.52-3.57 | 4.52-4.54 |
const BY_BLOCKS_MIN_CHANNELS: usize = 256;

/// Most tiles per image computed by blocks (see [`BY_BLOCKS_MIN_CHANNELS`]):
/// every image's transformed input is whole in memory, and from 784 tiles on
/// the bands were faster (by steps, above). At 196 tiles (512 channels at
/// 28x28, two threads) blocks took 14.4-14.9 ms against 14.2 by steps,
/// within the spread of the runs (medians of six alternated runs, EPYC
/// Zen 4).
const BY_BLOCKS_MAX_TILES: usize = 256;

/// Most tiles per image computed by blocks on one thread, where U whole is
/// the other way (see [`compute`]). Against U whole, at one thread (Intel
/// Xeon, `bench/ab.py`, 3 rounds): 256 channels at 14x14 (49 tiles) 0.957x
/// as long, 512 at 14x14 0.979x (three Convs in a row), but 512 at 28x28
/// (196 tiles) 1.099x. Whole networks, with 64 here: ResNet-18, whose layer3
/// goes by blocks with this, 0.974x (4 rounds), VGG-16 0.955x (3 rounds);
/// VGG-16 read 1.031x with 256 here.
const BY_BLOCKS_ALONE_MAX_TILES: usize = 64;

/// Most elements of U one block of output channels takes ([`by_blocks`]):
/// 64 channels of 512 (2 MiB). conv3x3 512x14x14 at two threads, plain,
/// medians of ten alternated runs (EPYC Zen 4): U whole 5.20 ms, blocks of
/// 2¹⁹ elements 4.49, of 2²⁰ 4.87; at one thread 2¹⁸ and 2²⁰ read 2-7 %
/// under U whole.
const U_BLOCK_LEN: usize = 1 << 19;

/// Fewest channels (input and output): with fewer, the transforms cost
/// more than the GEMMs save.
const MIN_CHANNELS: usize = 16;

/// Fewest kernels (channel pairs) whose transform is split over threads.
const WEIGHTS_PARALLEL_MIN: usize = 1 << 14;

/// Elements of U one task wipes (256 KiB): VGG-16's 512-channel layers have
/// 16 MiB of U, which one core took 1.6-2 ms to zero. At two threads U's lines
/// sit in both cores' caches after the GEMMs, and ResNet-18's 1 MiB of U for
/// its 128-channel layers took 116-122 µs to zero in one piece (18-20 µs at
/// one thread), 68-69 in four (timed inside the network; whole queries, ten
/// alternated rounds: median 24.63 → 24.50 ms, within the spread).
const WIPE_PIECE: usize = 1 << 16;

/// Fewest tiles one band's GEMMs take, so that they are wide enough to run
/// at the GEMM's speed.
const BAND_MIN_TILES: usize = 96;

/// Most elements of a band's transformed input (or output), when
/// [`BAND_MIN_TILES`] allows: the band then stays in cache between its
/// transforms and its GEMMs.
const BAND_LEN: usize = 1 << 18;

/// The tile sizes, by output cells per tile side: Winograd's F(2x2, 3x3),
/// whose transformed tiles have 4x4 cells, and F(4x4, 3x3), 6x6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tiling {
    F2,
    F4,
}

impl Tiling {
    /// Output cells per tile side.
    pub(crate) fn size(self) -> usize {
        match self {
            Tiling::F2 => 2,
            Tiling::F4 => 4,
        }
    }

    /// Cells of a transformed tile, and so GEMMs per band.
    pub(crate) fn cells(self) -> usize {
        match self {
            Tiling::F2 => 16,
            Tiling::F4 => 36,
        }
    }
}

/// Fewest tiles of F(4x4, 3x3) per image for which it is used, where its
/// transforms run vectorised ([`kernels::winograd4_pays`]).
/// Against F(2x2, 3x3), three 3x3 Convs in a row at one and two threads
/// (Intel Xeon, `bench/ab.py`, 3 rounds): 64 channels at 56x56 (196 tiles)
/// 0.707x and 0.724x as long, 128 at 28x28 (49) 0.756x and 0.777x, 512 at
/// 28x28 0.892x and 0.806x; but 256 at 14x14 (16 tiles, of which 31 % of
/// the cells fall outside the image) 1.338x and 1.406x, 512 at 14x14 1.501x
/// and 1.507x.
const F4_MIN_TILES: usize = 49;

/// How an image is computed: by blocks of output channels ([`by_blocks`])
/// or band by band, and in which tiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    Blocks(Tiling),
    Bands(Tiling),
}

/// How the Conv of `geo` is computed on the engine's threads: F(4x4, 3x3)
/// where it pays ([`F4_MIN_TILES`]), by blocks of output channels when the
/// image's tiles would leave a band of fewer than [`BAND_MIN_TILES`] to a
/// thread; otherwise F(2x2, 3x3), by blocks where [`by_blocks_fit`] says.
///
/// F(4x4, 3x3) by blocks against bands (three Convs in a row, 3 rounds): at
/// two threads 128 channels at 28x28 (49 tiles) 0.779x as long, 64 at 56x56
/// (196) 1.138x; at one thread 0.949x, 1.023x and, 512 channels at 28x28,
/// 1.081x.
fn how(geo: &Geometry) -> How {
    let tasks = threads();
    let tiles4 = tiles(geo, Tiling::F4);
    if kernels::winograd4_pays() && tiles4 >= F4_MIN_TILES {
        if tasks > 1 && tiles4 < BAND_MIN_TILES * tasks {
            How::Blocks(Tiling::F4)
        } else {
            How::Bands(Tiling::F4)
        }
    } else if by_blocks_fit(geo, tasks) {
        How::Blocks(Tiling::F2)
    } else {
        How::Bands(Tiling::F2)
    }
}

/// True when the Conv of `geo` is computed here: Winograd can compute it
/// ([`fits`]) and its image has enough tiles for the engine's threads.
pub(super) fn applies(geo: &Geometry) -> bool {
    let tiles = tiles(geo, Tiling::F2);
    let min_tiles = match threads() {
        0 | 1 => MIN_TILES_ALONE,
        _ if by_blocks_fit(geo, threads()) => MIN_TILES_ALONE,
        n => MIN_TILES_PER_THREAD.saturating_mul(n),
    };
    fits(geo) && tiles >= min_tiles
}

/// The output tiles of one image in `tiling`.
fn tiles(geo: &Geometry, tiling: Tiling) -> usize {
    let size = tiling.size();
    geo.h.output().div_ceil(size) * geo.w.output().div_ceil(size)
}

/// True when the Conv of `geo` is computed by `tasks` tasks by blocks of
/// output channels ([`by_blocks`]), not band by band: at least
/// [`BY_BLOCKS_MIN_CHANNELS`] channels in and out, and at most
/// [`BY_BLOCKS_MAX_TILES`] tiles on several tasks, [`BY_BLOCKS_ALONE_MAX_TILES`]
/// on one. (Blocks split channels, so an image of one tile row goes by
/// blocks too, where bands would leave one task.)
fn by_blocks_fit(geo: &Geometry, tasks: usize) -> bool {
    let max_tiles = match tasks {
        0 => return false,
        1 => BY_BLOCKS_ALONE_MAX_TILES,
        _ => BY_BLOCKS_MAX_TILES,
    };
    geo.channels.min(geo.out_channels) >= BY_BLOCKS_MIN_CHANNELS
        && tiles(geo, Tiling::F2) <= max_tiles
}

/// True when the Conv of `geo` has a 3x3 kernel, stride 1, no dilation, one
/// group, and enough channels for the transforms to pay.
fn fits(geo: &Geometry) -> bool {
    let axes = [geo.h, geo.w];
    geo.group == 1
        && axes
            .iter()
            .all(|a| a.kernel() == 3 && a.stride() == 1 && a.dilation() == 1)
        && geo.channels >= MIN_CHANNELS
        && geo.out_channels >= MIN_CHANNELS
}

/// True when the Conv of `geo` is computed here by blocks of output
/// channels, which overwrite spent weights block by block ([`by_blocks`]).
pub(super) fn spends(geo: &Geometry) -> bool {
    applies(geo) && matches!(how(geo), How::Blocks(_))
}

/// Computes the Conv of `geo` (for which [`applies`] holds) into `y`.
/// `residual`, when given, has `y`'s layout and is added after the bias,
/// before the activation. Spent weights are overwritten only when the Conv
/// goes by blocks ([`spends`]).
pub(super) fn conv(
    geo: &Geometry,
    x: &[f32],
    w: Kernels<'_>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    compute(geo, x, w, bias, residual, y, how(geo));
}

/// [`conv`], by blocks of output channels ([`by_blocks`]) or band by band.
fn compute(
    geo: &Geometry,
    x: &[f32],
    w: Kernels<'_>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    y: &mut [f32],
    how: How,
) {
    let tiling = match how {
        How::Blocks(tiling) => {
            by_blocks(tiling, geo, x, w, bias, residual, y);
            return;
        }
        How::Bands(tiling) => tiling,
    };
    let (c, m) = (geo.channels, geo.out_channels);
    let cells = tiling.cells();
    let mut u = crate::buffers::take(cells * m * c);
    transform_weights(tiling, w.values(), &mut u, m * c);
    let (in_plane, out_plane) = (geo.in_plane(), geo.out_plane());
    let images = x
        .chunks(c * in_plane)
        .zip(y.chunks_mut(m * out_plane))
        .enumerate()
        .map(|(n, (image, out))| {
            let layer = Layer {
                geo,
                image,
                u: &u,
                tiling,
                bias,
                residual: residual.map(|r| &r[n * m * out_plane..][..m * out_plane]),
            };
            (layer, out)
        });
    let (out_height, out_width) = (geo.h.output(), geo.w.output());
    let size = tiling.size();
    let (tile_rows, tile_cols) = (out_height.div_ceil(size), out_width.div_ceil(size));
    let band_rows = (BAND_LEN / (cells * c.max(m) * tile_cols))
        .max(BAND_MIN_TILES.div_ceil(tile_cols))
        .clamp(1, tile_rows);
    let tasks = threads().min(tile_rows);
    let per_task = tile_rows.div_ceil(tasks);
    for (layer, out) in images {
        // Each task's tile rows, and its rows of every output plane.
        let work = split_rows(out, out_plane, tile_rows, per_task, |rows| {
            ((size * rows.end).min(out_height) - size * rows.start) * out_width
        });
        for_each_task(work, |(rows, mut segments)| {
            with_scratch(|scratch| {
                for first in rows.clone().step_by(band_rows) {
                    let band = first..(first + band_rows).min(rows.end);
                    let at = size * (first - rows.start) * out_width;
                    layer.band(band, &mut segments, at, scratch);
                }
            });
        });
    }
    // U is the weights in another basis (G has a left inverse): wiped
    // before the buffer is recycled, as a streaming source wipes the
    // weights themselves once the node has run. A pass over memory, split
    // over the threads when long.
    for_each_chunk(&mut u, WIPE_PIECE, || (), |(), _, piece| piece.fill(0.0));
    crate::buffers::give(u);
}

/// Computes the Conv of `geo` block of output channels by block, for small
/// images of many channels, or where a thread's band would be narrow
/// ([`how`]): the input transform of every image first (V, split by channel
/// planes over the threads), then, each thread taking a run of blocks, a
/// block's U (its channels' kernels transformed into one buffer per
/// thread, [`U_BLOCK_LEN`]), its GEMMs (one per cell of a transformed tile)
/// for every image and its output transform.
///
/// U is never whole in memory: where it was (transformed whole, then read
/// by 16 GEMMs spanning the image, then wiped: 16.8 MB written three times
/// for 512 channels), a block's U is read while it is in cache and one
/// buffer per thread is wiped. Against the image's GEMMs spanning it step
/// by step, this has one fork-join less. Spent weights (handed over by a
/// streaming source) are overwritten a few kernels at a time, right after
/// they are transformed ([`transform_block`]), where the source would wipe
/// them in a pass of its own after the node.
///
/// conv3x3 512x14x14 at two threads, medians of ten alternated runs (EPYC
/// Zen 4), ms:
///
/// | | plain | sealed-streaming | ratio |
/// |---|---|---|---|
/// | by steps, U whole | 5.26 | 6.30 | 1.15 |
/// | by blocks | 4.61 | 5.66 | 1.23 |
/// | by blocks, spent weights overwritten | 4.63 | 5.55 | 1.17 |
///
/// VGG-16's three 14x14 Convs summed per node 12.4-14.0 → 11.9-12.6 ms
/// (three alternated rounds); ResNet-18's layer3 Convs the same, 4.57-4.96
/// against 4.54-4.86 ms (five rounds). Whole networks at two threads did
/// not move beyond their spread (ResNet-18 streaming 22.99 against 22.85 ms,
/// VGG-16 142.6 against 143.8, four and three rounds).
fn by_blocks(
    tiling: Tiling,
    geo: &Geometry,
    x: &[f32],
    w: Kernels<'_>,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    y: &mut [f32],
) {
    let (c, m) = (geo.channels, geo.out_channels);
    let (in_plane, out_plane) = (geo.in_plane(), geo.out_plane());
    let (size, cells) = (tiling.size(), tiling.cells());
    let (tile_rows, tile_cols) = (geo.h.output().div_ceil(size), geo.w.output().div_ceil(size));
    let tiles = tile_rows * tile_cols;
    let images = x.len() / (c * in_plane);
    // V by image and channel, `[N, C, cells, tiles]`, so that each task
    // writes a block of its own; the GEMMs read it strided.
    let mut v = crate::buffers::take(images * cells * c * tiles);
    let per = (images * c).div_ceil(threads().max(1));
    for_each_chunk(
        &mut v,
        per * cells * tiles,
        || (),
        |(), i, block| {
            with_scratch(|scratch| {
                for (j, v) in block.chunks_mut(cells * tiles).enumerate() {
                    let source = TileSource::of(geo, &x[(i * per + j) * in_plane..][..in_plane]);
                    for row in 0..tile_rows {
                        kernels::winograd_input(
                            tiling,
                            &source,
                            row,
                            tile_cols,
                            &mut v[row * tile_cols..],
                            tiles,
                            &mut scratch.rows,
                        );
                    }
                }
            });
        },
    );
    // Output channels per block: a multiple of 16 (the GEMM kernel's rows),
    // and at least one block per thread.
    let tasks = threads().max(1);
    let rows = (U_BLOCK_LEN / (cells * c))
        .min(m.div_ceil(tasks))
        .max(1)
        .next_multiple_of(16);
    let blocks = m.div_ceil(rows);
    let per_task = blocks.div_ceil(tasks);
    // Each task's blocks, with its kernels and its pieces of every image's
    // output.
    let mut work: Vec<_> = (0..blocks)
        .step_by(per_task)
        .zip(w.pieces(per_task * rows * c * 9))
        .map(|(b, w)| (b..(b + per_task).min(blocks), w, Vec::<&mut [f32]>::new()))
        .collect();
    for image in y.chunks_mut(m * out_plane) {
        for (task, piece) in work
            .iter_mut()
            .zip(image.chunks_mut(per_task * rows * out_plane))
        {
            task.2.push(piece);
        }
    }
    for_each_task(work, |(run, mut w, mut pieces)| {
        let mut u = crate::buffers::take(cells * rows * c);
        with_scratch(|scratch| {
            for b in run.clone() {
                let first = b * rows;
                let len = rows.min(m - first);
                let u = &mut u[..cells * len * c];
                let at = (b - run.start) * rows * c * 9;
                transform_block(tiling, &mut w, at..at + len * c * 9, u);
                grow(&mut scratch.product, cells * len * tiles);
                let p = &mut scratch.product[..cells * len * tiles];
                let at = (b - run.start) * rows * out_plane;
                for (n, piece) in pieces.iter_mut().enumerate() {
                    let v = &v[n * cells * c * tiles..][..cells * c * tiles];
                    for xi in 0..cells {
                        kernels::gemm_single(
                            1.0,
                            MatRef::new(&u[xi * len * c..], len, c),
                            MatRef::strided(&v[xi * tiles..], c, tiles, cells * tiles),
                            0.0,
                            MatMut::new(&mut p[xi * len * tiles..], len, tiles),
                        );
                    }
                    let planes = piece[at..][..len * out_plane].chunks_mut(out_plane);
                    for (j, plane) in planes.enumerate() {
                        let channel = first + j;
                        let out = OutputRows {
                            rows: plane,
                            width: geo.w.output(),
                            bias: bias.map_or(0.0, |b| b[channel]),
                            residual: residual
                                .map(|r| &r[(n * m + channel) * out_plane..][..out_plane]),
                            activation: geo.activation,
                        };
                        kernels::winograd_output(
                            tiling,
                            &p[j * tiles..],
                            len * tiles,
                            tiles,
                            out,
                            &mut scratch.rows,
                        );
                    }
                }
            }
        });
        // The weights in another basis, as in `compute`.
        u.fill(0.0);
        crate::buffers::give(u);
    });
    crate::buffers::give(v);
}

/// Kernels one step of [`transform_block`] transforms, then overwrites
/// when they are spent: 18 KiB of them, still in cache.
const SPEND_PIECE: usize = 512;

/// U for the kernels of `w` at `range` (9 values each), into `u`'s slices
/// (one per cell of a transformed tile) of one value per kernel; spent
/// kernels are overwritten with zeros
/// [`SPEND_PIECE`] at a time, right after they are read.
fn transform_block(tiling: Tiling, w: &mut Kernels<'_>, range: Range<usize>, u: &mut [f32]) {
    let pairs = range.len() / 9;
    match w {
        Kernels::Read(w) => {
            let mut slices: Vec<&mut [f32]> = u.chunks_mut(pairs).collect();
            kernels::winograd_weights(tiling, &w[range], &mut slices);
        }
        Kernels::Spend(w) => {
            for first in (0..pairs).step_by(SPEND_PIECE) {
                let last = (first + SPEND_PIECE).min(pairs);
                let mut slices: Vec<&mut [f32]> =
                    u.chunks_mut(pairs).map(|s| &mut s[first..last]).collect();
                let piece = &mut w[range.start + 9 * first..range.start + 9 * last];
                kernels::winograd_weights(tiling, piece, &mut slices);
                piece.fill(0.0);
            }
        }
    }
}

/// U for the `pairs` kernels of `w`, into `u` (one matrix `[M, C]` per cell
/// of a transformed tile): on every thread for large layers, each taking a
/// range of kernels.
fn transform_weights(tiling: Tiling, w: &[f32], u: &mut [f32], pairs: usize) {
    let parts = if pairs >= WEIGHTS_PARALLEL_MIN {
        threads()
    } else {
        1
    };
    let per = pairs.div_ceil(parts).max(1);
    let work = split_rows(u, pairs, pairs, per, |range| range.len());
    for_each_task(work, |(range, mut slices)| {
        kernels::winograd_weights(tiling, &w[range.start * 9..range.end * 9], &mut slices);
    });
}

/// The operands of one image's Conv, shared by its tasks.
struct Layer<'a> {
    geo: &'a Geometry,
    /// `[C, H, W]`.
    image: &'a [f32],
    /// The transformed weights: one matrix `[M, C]` per cell of a
    /// transformed tile.
    u: &'a [f32],
    tiling: Tiling,
    bias: Option<&'a [f32]>,
    /// Laid out like the image's output, `[M, OH, OW]`.
    residual: Option<&'a [f32]>,
}

impl Layer<'_> {
    /// Computes the output rows of tile rows `band` into `segments` (one
    /// per output channel) from offset `at`: the input transform into the
    /// scratch's columns, a GEMM per cell of a transformed tile into its
    /// product, the output transform.
    fn band(
        &self,
        band: Range<usize>,
        segments: &mut [&mut [f32]],
        at: usize,
        scratch: &mut Scratch,
    ) {
        let (geo, tiling) = (self.geo, self.tiling);
        let (c, m) = (geo.channels, geo.out_channels);
        let (size, cells) = (tiling.size(), tiling.cells());
        let out_width = geo.w.output();
        let tile_cols = out_width.div_ceil(size);
        let tiles = band.len() * tile_cols;
        let out_rows = (size * band.end).min(geo.h.output()) - size * band.start;
        let Scratch {
            columns: v,
            product: p,
            rows: scratch,
            ..
        } = scratch;
        grow(v, cells * c * tiles);
        grow(p, cells * m * tiles);
        let (v, p) = (&mut v[..cells * c * tiles], &mut p[..cells * m * tiles]);
        for (channel, plane) in self.image.chunks(geo.in_plane()).enumerate() {
            let source = TileSource::of(geo, plane);
            for (i, row) in band.clone().enumerate() {
                let start = channel * tiles + i * tile_cols;
                kernels::winograd_input(
                    tiling,
                    &source,
                    row,
                    tile_cols,
                    &mut v[start..],
                    c * tiles,
                    scratch,
                );
            }
        }
        for xi in 0..cells {
            kernels::gemm_single(
                1.0,
                MatRef::new(&self.u[xi * m * c..], m, c),
                MatRef::new(&v[xi * c * tiles..], c, tiles),
                0.0,
                MatMut::new(&mut p[xi * m * tiles..], m, tiles),
            );
        }
        let first = size * band.start * out_width;
        for (channel, segment) in segments.iter_mut().enumerate() {
            let len = out_rows * out_width;
            let out = OutputRows {
                rows: &mut segment[at..][..len],
                width: out_width,
                bias: self.bias.map_or(0.0, |b| b[channel]),
                residual: self
                    .residual
                    .map(|r| &r[channel * geo.out_plane() + first..][..len]),
                activation: geo.activation,
            };
            kernels::winograd_output(
                tiling,
                &p[channel * tiles..],
                m * tiles,
                tiles,
                out,
                scratch,
            );
        }
    }
}

/// One input channel plane, as the input transform reads it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TileSource<'a> {
    /// `[H, W]`.
    pub plane: &'a [f32],
    /// `W`.
    pub width: usize,
    /// Padding rows above the plane.
    pub pad_top: usize,
    /// Padding columns left of the plane.
    pub pad_left: usize,
}

impl<'a> TileSource<'a> {
    /// Input rows from `first` on, with their padding, into the `rows` rows
    /// `padded` holds: row `i`'s column `j` is the input cell
    /// `(first + i - pad_top, j - pad_left)`, or 0 outside the plane.
    #[inline(always)]
    pub(crate) fn pad_rows(&self, first: usize, rows: usize, padded: &mut [f32]) {
        let width = self.width;
        let height = self.plane.len() / width.max(1);
        let pitch = padded.len() / rows;
        for (i, d) in padded.chunks_exact_mut(pitch).enumerate() {
            let row = (first + i)
                .checked_sub(self.pad_top)
                .filter(|&r| r < height);
            let skip = self.pad_left.min(pitch);
            let take = row.map_or(0, |_| (pitch - skip).min(width));
            d[..skip].fill(0.0);
            if let Some(r) = row {
                d[skip..skip + take].copy_from_slice(&self.plane[r * width..][..take]);
            }
            d[skip + take..].fill(0.0);
        }
    }

    /// `plane`, an input plane of the Conv of `geo`.
    fn of(geo: &Geometry, plane: &'a [f32]) -> TileSource<'a> {
        TileSource {
            plane,
            width: geo.w.input(),
            pad_top: geo.h.pad_begin(),
            pad_left: geo.w.pad_begin(),
        }
    }
}

/// A band's output rows of one channel, as the output transform writes
/// them.
#[derive(Debug)]
pub(crate) struct OutputRows<'a> {
    /// As many rows of `width` cells per tile row as a tile has (2 or 4;
    /// fewer for the last tile row, where the height is not a multiple).
    pub rows: &'a mut [f32],
    pub width: usize,
    pub bias: f32,
    /// Added after the bias (a fused Add), laid out like `rows`.
    pub residual: Option<&'a [f32]>,
    pub activation: Activation,
}

/// Kernels `first..first + n` (`n` at most [`LANES`]) of `w` (nine taps
/// each) as `g[k][l]`: tap `k` of kernel `first + l` (zero past `n`).
#[inline(always)]
fn taps_of_lanes(w: &[f32], first: usize, n: usize) -> [[f32; LANES]; 9] {
    let mut g = [[0.0f32; LANES]; 9];
    for (l, kernel) in w[first * 9..(first + n) * 9].chunks_exact(9).enumerate() {
        for (k, &tap) in kernel.iter().enumerate() {
            g[k][l] = tap;
        }
    }
    g
}

/// `values[..n]` into `dst[..n]`: a copy of constant length (a few moves,
/// not a call) when `n` is [`LANES`].
#[inline(always)]
fn store_lanes(dst: &mut [f32], values: &[f32; LANES], n: usize) {
    if n == LANES {
        dst[..LANES].copy_from_slice(values);
    } else {
        dst[..n].copy_from_slice(&values[..n]);
    }
}

impl OutputRows<'_> {
    /// Adds the bias (and the residual) to the transformed rows, then
    /// applies the activation: the output transforms' last step.
    #[inline(always)]
    pub(crate) fn finish<const FMA: bool>(self) {
        match self.residual {
            Some(r) => bias_add_activate_body::<FMA>(self.rows, self.bias, r, self.activation),
            None => bias_activate_body::<FMA>(self.rows, self.bias, self.activation),
        }
    }
}

/// Transforms 3x3 kernels into the 16 matrices of U: `w` holds `pairs`
/// kernels of 9 weights (row-major, in `[M, C]` order), and `u` 16 slices
/// of `pairs` cells: `u[xi][p] = (G g_p G^T)[xi]`.
#[inline(always)]
pub(crate) fn winograd_weights_body<const FMA: bool>(w: &[f32], u: &mut [&mut [f32]]) {
    let pairs = w.len() / 9;
    for first in (0..pairs).step_by(LANES) {
        let n = LANES.min(pairs - first);
        let g = taps_of_lanes(w, first, n);
        // G g: four rows of three.
        let mut gg = [[[0.0f32; LANES]; 3]; 4];
        for j in 0..3 {
            for l in 0..LANES {
                let (a, b, c) = (g[j][l], g[3 + j][l], g[6 + j][l]);
                gg[0][j][l] = a;
                gg[1][j][l] = 0.5 * (a + b + c);
                gg[2][j][l] = 0.5 * (a - b + c);
                gg[3][j][l] = c;
            }
        }
        // (G g) G^T.
        for (r, row) in gg.iter().enumerate() {
            let mut out = [[0.0f32; LANES]; 4];
            for l in 0..LANES {
                let (a, b, c) = (row[0][l], row[1][l], row[2][l]);
                out[0][l] = a;
                out[1][l] = 0.5 * (a + b + c);
                out[2][l] = 0.5 * (a - b + c);
                out[3][l] = c;
            }
            for (j, values) in out.iter().enumerate() {
                store_lanes(&mut u[4 * r + j][first..], values, n);
            }
        }
    }
}

/// Transforms the input tiles of tile row `tile_row` of one channel:
/// `v[xi * stride + t] = (B^T d_t B)[xi]` for tiles `t < tiles`.
/// `scratch` is working memory; its contents on entry do not matter.
///
/// Each step is a loop over the whole row, which vectorises: the four input
/// rows are copied with their padding, combined (B^T) into even and odd
/// columns, and those combined again (B) into the 16 outputs.
#[inline(always)]
pub(crate) fn winograd_input_body<const FMA: bool>(
    source: &TileSource<'_>,
    tile_row: usize,
    tiles: usize,
    v: &mut [f32],
    stride: usize,
    scratch: &mut Vec<f32>,
) {
    // Padded columns 0..span hold the tiles' input; tile t starts at 2t.
    let span = 2 * tiles + 2;
    let half = tiles + 1;
    grow(scratch, 4 * span + 8 * half);
    let (padded, rest) = scratch.split_at_mut(4 * span);
    let (even, odd) = rest.split_at_mut(4 * half);
    source.pad_rows(2 * tile_row, 4, padded);
    // B^T d, split into even and odd columns.
    let d: [&[f32]; 4] = std::array::from_fn(|i| &padded[i * span..][..2 * half]);
    {
        let [e0, e1, e2, e3] = split4(&mut even[..4 * half], half);
        let [o0, o1, o2, o3] = split4(&mut odd[..4 * half], half);
        for l in 0..half {
            let (a, b) = (2 * l, 2 * l + 1);
            e0[l] = d[0][a] - d[2][a];
            e1[l] = d[1][a] + d[2][a];
            e2[l] = d[2][a] - d[1][a];
            e3[l] = d[1][a] - d[3][a];
            o0[l] = d[0][b] - d[2][b];
            o1[l] = d[1][b] + d[2][b];
            o2[l] = d[2][b] - d[1][b];
            o3[l] = d[1][b] - d[3][b];
        }
    }
    // (B^T d) B: tile t's columns are even[t], odd[t], even[t + 1], odd[t + 1].
    for i in 0..4 {
        let (e, o) = (&even[i * half..][..half], &odd[i * half..][..half]);
        let out = |j: usize| (4 * i + j) * stride;
        combine(&mut v[out(0)..][..tiles], &e[..tiles], &e[1..], |a, b| {
            a - b
        });
        combine(&mut v[out(1)..][..tiles], &o[..tiles], &e[1..], |a, b| {
            a + b
        });
        combine(&mut v[out(2)..][..tiles], &e[1..], &o[..tiles], |a, b| {
            a - b
        });
        combine(&mut v[out(3)..][..tiles], &o[..tiles], &o[1..], |a, b| {
            a - b
        });
    }
}

/// Transforms a band of tile rows of one output channel back, from the
/// GEMMs' products `p[xi * stride + t]` for tiles `t < tiles` (the band's,
/// row after row) into `out`'s rows, then adds the bias and applies the
/// activation. `scratch` is working memory; its contents on entry do not
/// matter.
///
/// The first step (A^T M) runs over the whole band at once, which keeps
/// its loops long on small images (14 tiles per row at 28x28).
#[inline(always)]
pub(crate) fn winograd_output_body<const FMA: bool>(
    p: &[f32],
    stride: usize,
    tiles: usize,
    out: OutputRows<'_>,
    scratch: &mut Vec<f32>,
) {
    let width = out.width;
    let row_tiles = width.div_ceil(2);
    grow(scratch, 8 * tiles);
    // A^T M: s[a * 4 + j] holds row a, column j of every tile.
    let s = &mut scratch[..8 * tiles];
    let m: [&[f32]; 16] = std::array::from_fn(|xi| &p[xi * stride..][..tiles]);
    {
        let (top, bottom) = s.split_at_mut(4 * tiles);
        for (j, (s0, s1)) in top
            .chunks_exact_mut(tiles)
            .zip(bottom.chunks_exact_mut(tiles))
            .enumerate()
        {
            let (m0, m1, m2, m3) = (m[j], m[4 + j], m[8 + j], m[12 + j]);
            for t in 0..tiles {
                s0[t] = m0[t] + m1[t] + m2[t];
                s1[t] = m1[t] - m2[t] - m3[t];
            }
        }
    }
    // (A^T M) A: each output row's cells 2t and 2t + 1; output row r is row
    // r % 2 of tile row r / 2.
    for (r, row) in out.rows.chunks_mut(width).enumerate() {
        let (pairs, last) = row.as_chunks_mut::<2>();
        let n = pairs.len();
        let (a, at) = (r % 2, (r / 2) * row_tiles);
        let [s0, s1, s2, s3]: [&[f32]; 4] =
            std::array::from_fn(|j| &s[(4 * a + j) * tiles + at..][..row_tiles]);
        let (e0, e1, e2, e3) = (&s0[..n], &s1[..n], &s2[..n], &s3[..n]);
        for (t, pair) in pairs.iter_mut().enumerate() {
            pair[0] = e0[t] + e1[t] + e2[t];
            pair[1] = e1[t] - e2[t] - e3[t];
        }
        if let [cell] = last {
            *cell = s0[n] + s1[n] + s2[n];
        }
    }
    out.finish::<FMA>();
}

/// The arithmetic the F(4x4, 3x3) transforms are written in, on one value
/// (`f32`, the portable code) or on a vector of sixteen (the AVX-512
/// kernels): each is given these three operations as closures, so that
/// both compute the same sums in the same order, to the bit.
pub(crate) trait Arith<T> {
    fn add(&self, a: T, b: T) -> T;
    fn sub(&self, a: T, b: T) -> T;
    /// `k * a`.
    fn scale(&self, k: f32, a: T) -> T;
}

impl<T, A, S, K> Arith<T> for (A, S, K)
where
    A: Fn(T, T) -> T,
    S: Fn(T, T) -> T,
    K: Fn(f32, T) -> T,
{
    #[inline(always)]
    fn add(&self, a: T, b: T) -> T {
        (self.0)(a, b)
    }
    #[inline(always)]
    fn sub(&self, a: T, b: T) -> T {
        (self.1)(a, b)
    }
    #[inline(always)]
    fn scale(&self, k: f32, a: T) -> T {
        (self.2)(k, a)
    }
}

/// The portable code's [`Arith`].
#[inline(always)]
fn scalar() -> impl Arith<f32> {
    (
        |a: f32, b: f32| a + b,
        |a: f32, b: f32| a - b,
        |k: f32, a: f32| k * a,
    )
}

/// One side of F(4x4, 3x3)'s weight transform: G's six rows applied to
/// three taps `(a, b, c)`,
///
/// ```text
///   G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]
/// ```
#[inline(always)]
pub(crate) fn f4_weights<T: Copy>(ops: &impl Arith<T>, [a, b, c]: [T; 3]) -> [T; 6] {
    let ac = ops.add(a, c);
    let outer = ops.add(ops.scale(1.0 / 24.0, a), ops.scale(1.0 / 6.0, c));
    let middle = ops.scale(1.0 / 12.0, b);
    [
        ops.scale(0.25, a),
        ops.scale(-1.0 / 6.0, ops.add(ac, b)),
        ops.scale(-1.0 / 6.0, ops.sub(ac, b)),
        ops.add(outer, middle),
        ops.sub(outer, middle),
        c,
    ]
}

/// One side of F(4x4, 3x3)'s input transform: B^T's six rows applied to
/// six cells,
///
/// ```text
///   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0;
///          0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
/// ```
#[inline(always)]
pub(crate) fn f4_input<T: Copy>(ops: &impl Arith<T>, z: [T; 6]) -> [T; 6] {
    let even = ops.sub(z[4], ops.scale(4.0, z[2]));
    let odd = ops.sub(z[3], ops.scale(4.0, z[1]));
    let near = ops.sub(z[4], z[2]);
    let far = ops.scale(2.0, ops.sub(z[3], z[1]));
    [
        ops.add(ops.sub(ops.scale(4.0, z[0]), ops.scale(5.0, z[2])), z[4]),
        ops.add(even, odd),
        ops.sub(even, odd),
        ops.add(near, far),
        ops.sub(near, far),
        ops.add(ops.sub(ops.scale(4.0, z[1]), ops.scale(5.0, z[3])), z[5]),
    ]
}

/// One side of F(4x4, 3x3)'s output transform: A^T's four rows applied to
/// six products,
///
/// ```text
///   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
/// ```
#[inline(always)]
pub(crate) fn f4_output<T: Copy>(ops: &impl Arith<T>, m: [T; 6]) -> [T; 4] {
    let (sum12, diff12) = (ops.add(m[1], m[2]), ops.sub(m[1], m[2]));
    let (sum34, diff34) = (ops.add(m[3], m[4]), ops.sub(m[3], m[4]));
    [
        ops.add(ops.add(m[0], sum12), sum34),
        ops.add(diff12, ops.scale(2.0, diff34)),
        ops.add(sum12, ops.scale(4.0, sum34)),
        ops.add(ops.add(diff12, ops.scale(8.0, diff34)), m[5]),
    ]
}

/// F(4x4, 3x3)'s weight transform (see [`winograd_weights_body`], whose
/// layout it shares): `u` holds 36 slices, `u[xi][p] = (G g_p G^T)[xi]`.
/// [`LANES`] kernels at a time, each step a loop over them, which
/// vectorises; the AVX-512 kernel computes the same bits.
#[inline(always)]
pub(crate) fn winograd4_weights_body<const FMA: bool>(w: &[f32], u: &mut [&mut [f32]]) {
    let ops = scalar();
    let pairs = w.len() / 9;
    for first in (0..pairs).step_by(LANES) {
        let n = LANES.min(pairs - first);
        let g = taps_of_lanes(w, first, n);
        // G g: six rows of three, column by column.
        let mut columns = [[[0.0f32; LANES]; 6]; 3];
        for (j, column) in columns.iter_mut().enumerate() {
            for l in 0..LANES {
                let values = f4_weights(&ops, [g[j][l], g[3 + j][l], g[6 + j][l]]);
                for (row, value) in column.iter_mut().zip(values) {
                    row[l] = value;
                }
            }
        }
        // (G g) G^T, row by row.
        for r in 0..6 {
            let mut out = [[0.0f32; LANES]; 6];
            for l in 0..LANES {
                let row = [columns[0][r][l], columns[1][r][l], columns[2][r][l]];
                for (cell, value) in out.iter_mut().zip(f4_weights(&ops, row)) {
                    cell[l] = value;
                }
            }
            for (j, values) in out.iter().enumerate() {
                store_lanes(&mut u[6 * r + j][first..], values, n);
            }
        }
    }
}

/// F(4x4, 3x3)'s input transform of tile row `tile_row` of one channel:
/// `v[xi * stride + t] = (B^T d_t B)[xi]` for tiles `t < tiles`, where
/// tile `t` reads the 6x6 input cells from row `4 tile_row - pad_top`,
/// column `4t - pad_left`. `scratch` is working memory.
///
/// Each step is a loop over the row, which vectorises: B^T over the six
/// padded rows, cell by cell; each combined row split into its cells by
/// column modulo four (tile `t`'s six columns are then `q0[t]`, `q1[t]`,
/// `q2[t]`, `q3[t]`, `q0[t + 1]` and `q1[t + 1]`); B over those. The
/// AVX-512 kernel computes the same bits.
#[inline(always)]
pub(crate) fn winograd4_input_body<const FMA: bool>(
    source: &TileSource<'_>,
    tile_row: usize,
    tiles: usize,
    v: &mut [f32],
    stride: usize,
    scratch: &mut Vec<f32>,
) {
    let ops = scalar();
    // Padded columns 0..span: the tiles' 4 tiles + 2, and two more, so that
    // the row splits into four runs of `quarter`.
    let quarter = tiles + 1;
    let span = 4 * quarter;
    grow(scratch, 12 * span + span);
    let (padded, rest) = scratch[..13 * span].split_at_mut(6 * span);
    let (combined, quarters) = rest.split_at_mut(6 * span);
    source.pad_rows(4 * tile_row, 6, padded);
    {
        let d: [&[f32]; 6] = std::array::from_fn(|i| &padded[i * span..][..span]);
        let [c0, c1, c2, c3, c4, c5] = split6(combined, span);
        for column in 0..span {
            let z = std::array::from_fn(|i| d[i][column]);
            let [r0, r1, r2, r3, r4, r5] = f4_input(&ops, z);
            (c0[column], c1[column], c2[column]) = (r0, r1, r2);
            (c3[column], c4[column], c5[column]) = (r3, r4, r5);
        }
    }
    for (i, row) in combined.chunks_exact(span).enumerate() {
        let [q0, q1, q2, q3] = split4(quarters, quarter);
        for (l, cells) in row.chunks_exact(4).enumerate() {
            (q0[l], q1[l], q2[l], q3[l]) = (cells[0], cells[1], cells[2], cells[3]);
        }
        let out: [&mut [f32]; 6] = {
            let mut rows = v.chunks_mut(stride).skip(6 * i);
            std::array::from_fn(|_| rows.next().map_or(&mut [][..], |r| &mut r[..tiles]))
        };
        let [o0, o1, o2, o3, o4, o5] = out;
        let (q0, q1, q2, q3) = (&q0[..quarter], &q1[..quarter], &q2[..tiles], &q3[..tiles]);
        for t in 0..tiles {
            let z = [q0[t], q1[t], q2[t], q3[t], q0[t + 1], q1[t + 1]];
            let [r0, r1, r2, r3, r4, r5] = f4_input(&ops, z);
            (o0[t], o1[t], o2[t]) = (r0, r1, r2);
            (o3[t], o4[t], o5[t]) = (r3, r4, r5);
        }
    }
}

/// F(4x4, 3x3)'s output transform of a band of tile rows of one output
/// channel (see [`winograd_output_body`], whose arguments it shares; `out`
/// holds four rows per tile row): A^T over every column of the band's
/// products first, then A over each row, then the bias and activation.
/// Each step is a loop over the band's or the row's tiles, which
/// vectorises; the AVX-512 kernel computes the same bits.
#[inline(always)]
pub(crate) fn winograd4_output_body<const FMA: bool>(
    p: &[f32],
    stride: usize,
    tiles: usize,
    out: OutputRows<'_>,
    scratch: &mut Vec<f32>,
) {
    let ops = scalar();
    let width = out.width;
    let row_tiles = width.div_ceil(4);
    grow(scratch, 24 * tiles);
    // s[(a * 6 + j) * tiles + t]: row a, column j of A^T M for tile t.
    let s = &mut scratch[..24 * tiles];
    for j in 0..6 {
        let m: [&[f32]; 6] = std::array::from_fn(|i| &p[(6 * i + j) * stride..][..tiles]);
        let mut rows = s.chunks_exact_mut(tiles).skip(j).step_by(6);
        let mut next = || rows.next().unwrap_or_default();
        let [s0, s1, s2, s3] = [next(), next(), next(), next()];
        for t in 0..tiles {
            let [r0, r1, r2, r3] = f4_output(&ops, std::array::from_fn(|i| m[i][t]));
            (s0[t], s1[t], s2[t], s3[t]) = (r0, r1, r2, r3);
        }
    }
    for (r, row) in out.rows.chunks_mut(width).enumerate() {
        let (a, at) = (r % 4, (r / 4) * row_tiles);
        let columns: [&[f32]; 6] =
            std::array::from_fn(|j| &s[(a * 6 + j) * tiles + at..][..row_tiles]);
        let (quads, last) = row.as_chunks_mut::<4>();
        for (t, quad) in quads.iter_mut().enumerate() {
            *quad = f4_output(&ops, std::array::from_fn(|j| columns[j][t]));
        }
        if !last.is_empty() {
            let n = quads.len();
            let values = f4_output(&ops, std::array::from_fn(|j| columns[j][n]));
            last.copy_from_slice(&values[..last.len()]);
        }
    }
    out.finish::<FMA>();
}

/// `dst[t] = f(a[t], b[t])`.
#[inline(always)]
fn combine(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *d = f(a, b);
    }
}

/// The six consecutive `len`-long parts of `data`.
#[inline(always)]
fn split6(data: &mut [f32], len: usize) -> [&mut [f32]; 6] {
    let (a, rest) = data.split_at_mut(3 * len);
    let [a, b, c] = split3(a, len);
    let [d, e, f] = split3(rest, len);
    [a, b, c, d, e, f]
}

/// The three consecutive `len`-long parts of `data`.
#[inline(always)]
fn split3(data: &mut [f32], len: usize) -> [&mut [f32]; 3] {
    let (a, rest) = data.split_at_mut(len);
    let (b, c) = rest.split_at_mut(len);
    [a, b, &mut c[..len]]
}

/// The four consecutive `len`-long parts of `data`.
#[inline(always)]
fn split4(data: &mut [f32], len: usize) -> [&mut [f32]; 4] {
    let (a, rest) = data.split_at_mut(len);
    let (b, rest) = rest.split_at_mut(len);
    let (c, d) = rest.split_at_mut(len);
    [a, b, c, &mut d[..len]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ConvAttrs;
    use crate::tensor::Tensor;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    /// The convolution by its definition, in f64.
    #[allow(clippy::too_many_arguments)]
    fn direct(
        x: &[f32],
        w: &[f32],
        bias: &[f32],
        (n, c, h, wd): (usize, usize, usize, usize),
        m: usize,
        [top, left, bottom, right]: [usize; 4],
    ) -> Vec<f32> {
        let (oh, ow) = (h + top + bottom - 2, wd + left + right - 2);
        let mut y = vec![0.0f32; n * m * oh * ow];
        for b in 0..n {
            for o in 0..m {
                for i in 0..oh {
                    for j in 0..ow {
                        let mut sum = f64::from(bias[o]);
                        for ch in 0..c {
                            for ki in 0..3 {
                                for kj in 0..3 {
                                    let (r, col) = (i + ki, j + kj);
                                    if r < top || r >= top + h || col < left || col >= left + wd {
                                        continue;
                                    }
                                    let xv = x[((b * c + ch) * h + r - top) * wd + col - left];
                                    let wv = w[((o * c + ch) * 3 + ki) * 3 + kj];
                                    sum += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        y[((b * m + o) * oh + i) * ow + j] = sum as f32;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn matches_the_definition_on_odd_sizes_and_uneven_padding() {
        // (batch, channels, height, width), output channels, pads, activation.
        let clip = Activation::Clip {
            min: -0.5,
            max: 0.5,
        };
        let cases = [
            ((1, 16, 16, 16), 16, [1, 1, 1, 1], Activation::None),
            ((2, 17, 17, 19), 20, [1, 1, 1, 1], Activation::Relu),
            ((1, 16, 20, 23), 16, [0, 2, 1, 0], clip),
            ((1, 24, 33, 18), 16, [2, 0, 0, 1], Activation::None),
            // Padding wider than the kernel: whole tiles of zeros.
            ((1, 16, 12, 10), 16, [3, 4, 2, 5], Activation::None),
            // Enough kernels for the weight transform to split over threads.
            ((1, 128, 16, 16), 128, [1, 1, 1, 1], Activation::Relu),
            // Blocks of 16 output channels (U_BLOCK_LEN / (16 * 2048)), the
            // last one short, several per task.
            ((2, 2048, 4, 6), 40, [1, 1, 1, 1], Activation::Relu),
        ];
        for ((n, c, h, wd), m, pads, activation) in cases {
            let x = values(n * c * h * wd, 1);
            let w = values(m * c * 9, 2);
            let bias = values(m, 3);
            let attrs = ConvAttrs {
                kernel: [3, 3],
                strides: [1, 1],
                pads,
                dilations: [1, 1],
                group: 1,
                activation,
            };
            let xt = Tensor::new(vec![n, c, h, wd], x.clone()).unwrap();
            let wt = Tensor::new(vec![m, c, 3, 3], w.clone()).unwrap();
            let bt = Tensor::new(vec![m], bias.clone()).unwrap();
            let geo = Geometry::new(&attrs, xt.shape(), wt.shape(), Some(bt.shape())).unwrap();
            assert!(fits(&geo), "{:?}", (n, c, h, wd));
            let len = n * m * geo.out_plane();
            let residual = values(len, 4);
            let want = direct(&x, &w, &bias, (n, c, h, wd), m, pads);
            let activate = |v: f32| match activation {
                Activation::None => v,
                Activation::Relu => v.max(0.0),
                Activation::Clip { min, max } => v.clamp(min, max),
            };
            // f32 sums drift from the f64 definition as they lengthen.
            let tolerance = 1e-5 * (c as f32 / 128.0).max(1.0).sqrt();
            // Band by band in either tiling and by blocks (on this
            // machine's threads, or one), without and with a residual.
            let ways = [Tiling::F2, Tiling::F4]
                .into_iter()
                .flat_map(|t| [How::Bands(t), How::Blocks(t)]);
            for how in ways {
                for with_residual in [false, true] {
                    let mut y = vec![f32::NAN; len];
                    let r = with_residual.then_some(residual.as_slice());
                    compute(&geo, &x, Kernels::Read(&w), Some(&bias), r, &mut y, how);
                    if let How::Blocks(_) = how {
                        // Handed over, W is overwritten block by block, and
                        // the output is the same to the bit.
                        let mut spent = w.clone();
                        let mut again = vec![f32::NAN; len];
                        let spend = Kernels::Spend(&mut spent);
                        compute(&geo, &x, spend, Some(&bias), r, &mut again, how);
                        assert!(spent.iter().all(|&v| v.to_bits() == 0));
                        assert!(
                            y.iter()
                                .zip(&again)
                                .all(|(a, b)| a.to_bits() == b.to_bits())
                        );
                    }
                    // F(4x4, 3x3)'s transforms scale by up to 8 and 1/24:
                    // its errors here measured 4-13 times F(2x2, 3x3)'s
                    // (1.2e-4 of the sum at 128 channels). A wrong
                    // coefficient is off by the cells' size, not by that.
                    let tolerance = match how {
                        How::Bands(Tiling::F4) | How::Blocks(Tiling::F4) => 16.0 * tolerance,
                        _ => tolerance,
                    };
                    for (i, (g, e)) in y.iter().zip(&want).enumerate() {
                        let e = activate(e + if with_residual { residual[i] } else { 0.0 });
                        let case = (n, c, h, wd, how, with_residual);
                        assert!(
                            (g - e).abs() <= tolerance * e.abs().max(1.0),
                            "{case:?} [{i}] {g} vs {e}"
                        );
                    }
                }
            }
        }
    }
}
