//! Conv: 2-D convolution over NCHW images with groups, stride, padding,
//! dilation, an optional bias and a fused activation.
//!
//! One of three strategies per call:
//! - *depthwise* (`group == C == M`): a direct loop per channel plane. Each
//!   group's GEMM would have a single row, too thin for a GEMM kernel.
//! - *pointwise* (1x1 kernel, stride 1, no padding): an image `[C, H*W]` is
//!   already the GEMM's right operand, so the product reads it in place.
//! - otherwise, *im2col*: each batch item and group is unrolled into a
//!   `[C/group * kH * kW, OH * OW]` matrix of receptive fields, then one GEMM
//!   with the weights `[M/group, C/group * kH * kW]` yields its outputs.
//!
//! The bias is written into the output before the GEMM accumulates onto it
//! (`beta = 1`), and the activation runs on each output block while it is
//! still in cache.

use std::ops::Range;

use rayon::prelude::*;

use super::elementwise::activate;
use super::window::Axis;
use super::{KernelResult, Mismatch};
use crate::graph::{Activation, ConvAttrs};
use crate::kernels::{self, MatMut, MatRef};
use crate::tensor::{Tensor, volume};

/// Runs Conv on X `[N, C, H, W]`, W `[M, C/group, kH, kW]` and B `[M]`.
pub(crate) fn conv(
    attrs: &ConvAttrs,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> KernelResult {
    let geo = Geometry::new(attrs, x.shape(), w.shape(), bias.map(Tensor::shape))?;
    let shape = vec![geo.batch, geo.out_channels, geo.h.output(), geo.w.output()];
    let len = volume(&shape)
        .ok_or_else(|| Mismatch(format!("the output shape {shape:?} is too large")))?;
    let mut y = vec![0.0; len];
    if len > 0 {
        let bias = bias.map(Tensor::data);
        if geo.is_depthwise() {
            depthwise(&geo, x.data(), w.data(), bias, &mut y);
        } else {
            grouped(&geo, x.data(), w.data(), bias, &mut y)?;
        }
    }
    Ok(Tensor::from_parts(shape, y))
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
    y: &mut [f32],
) -> Result<(), Mismatch> {
    let group_channels = geo.channels / geo.group;
    let group_outputs = geo.out_channels / geo.group;
    // Bounded by W's length: the output is not empty, so M >= 1.
    let depth = group_channels * geo.kernel_len();
    let (in_plane, out_plane) = (geo.in_plane(), geo.out_plane());
    let pointwise = geo.is_pointwise();
    let col_len = if pointwise {
        0
    } else {
        volume(&[depth, out_plane])
            .ok_or_else(|| Mismatch("the im2col matrix is too large".into()))?
    };
    let columns = geo.valid_columns();

    // Computes the outputs of `unit` (batch item * group) into `out`.
    let run = |col: &mut Vec<f32>, unit: usize, out: &mut [f32], parallel_im2col: bool| {
        let (n, g) = (unit / geo.group, unit % geo.group);
        let image =
            &x[(n * geo.channels + g * group_channels) * in_plane..][..group_channels * in_plane];
        let rhs: &[f32] = if pointwise {
            image
        } else {
            col.resize(col_len, 0.0);
            im2col(geo, &columns, image, col, parallel_im2col);
            col
        };
        let beta = match bias {
            Some(b) => {
                let b = &b[g * group_outputs..][..group_outputs];
                for (row, &b) in out.chunks_mut(out_plane).zip(b) {
                    row.fill(b);
                }
                1.0
            }
            None => 0.0,
        };
        let weights = MatRef::new(&w[g * group_outputs * depth..], group_outputs, depth);
        let rhs = MatRef::new(rhs, depth, out_plane);
        kernels::gemm(
            1.0,
            weights,
            rhs,
            beta,
            MatMut::new(out, group_outputs, out_plane),
        );
        activate(geo.activation, out);
    };

    let units = geo.batch * geo.group;
    let unit_len = group_outputs * out_plane;
    if units > 1 && !kernels::splits_itself(group_outputs, depth, out_plane) {
        // Small products: one rayon task per unit, each GEMM single-threaded.
        y.par_chunks_mut(unit_len)
            .enumerate()
            .for_each_init(Vec::new, |col, (unit, out)| run(col, unit, out, false));
    } else {
        // Large products: matrixmultiply threads each GEMM; rayon fills im2col.
        let mut col = Vec::new();
        for (unit, out) in y.chunks_mut(unit_len).enumerate() {
            run(&mut col, unit, out, true);
        }
    }
    Ok(())
}

/// Unrolls `image` (`[C/group, H, W]`) into `col`, whose row
/// `(c * kH + ki) * kW + kj` holds, for every output cell, the input the
/// kernel tap `(ki, kj)` of channel `c` reads there (0 in the padding).
fn im2col(
    geo: &Geometry,
    columns: &[Range<usize>],
    image: &[f32],
    col: &mut [f32],
    parallel: bool,
) {
    let (width, out_width) = (geo.w.input(), geo.w.output());
    let in_plane = geo.in_plane();
    let stride = geo.w.stride();
    let fill = |(r, row): (usize, &mut [f32])| {
        let (c, tap) = (r / geo.kernel_len(), r % geo.kernel_len());
        let (ki, kj) = (tap / geo.w.kernel(), tap % geo.w.kernel());
        let plane = &image[c * in_plane..][..in_plane];
        let rows = geo.h.valid_outputs(ki);
        let cols = columns[kj].clone();
        for (oh, out) in row.chunks_mut(out_width).enumerate() {
            if !rows.contains(&oh) || cols.is_empty() {
                out.fill(0.0);
                continue;
            }
            let src = &plane[geo.h.input_index(oh, ki) * width..][..width];
            let first = geo.w.input_index(cols.start, kj);
            out[..cols.start].fill(0.0);
            out[cols.end..].fill(0.0);
            let out = &mut out[cols.clone()];
            if stride == 1 {
                out.copy_from_slice(&src[first..first + out.len()]);
            } else {
                for (o, &v) in out.iter_mut().zip(src[first..].iter().step_by(stride)) {
                    *o = v;
                }
            }
        }
    };
    let out_plane = geo.out_plane();
    if parallel {
        col.par_chunks_mut(out_plane).enumerate().for_each(fill);
    } else {
        col.chunks_mut(out_plane).enumerate().for_each(fill);
    }
}

/// The depthwise strategy: channel plane `p` of the output reads only
/// plane `p` of the input. The output is not empty.
///
/// For each output row, every kernel tap adds a weighted, shifted input row
/// segment: with stride 1 that is a vectorisable `y += w * x` over slices.
fn depthwise(geo: &Geometry, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let (in_plane, out_plane) = (geo.in_plane(), geo.out_plane());
    let (width, out_width) = (geo.w.input(), geo.w.output());
    let (kw, stride) = (geo.w.kernel(), geo.w.stride());
    let columns = geo.valid_columns();
    y.par_chunks_mut(out_plane)
        .enumerate()
        .for_each(|(p, out)| {
            let c = p % geo.channels;
            let plane = &x[p * in_plane..][..in_plane];
            let taps = &w[c * geo.kernel_len()..][..geo.kernel_len()];
            out.fill(bias.map_or(0.0, |b| b[c]));
            for (oh, out_row) in out.chunks_mut(out_width).enumerate() {
                let span = geo.h.span(oh);
                for t in 0..span.taps {
                    let ki = span.first_tap + t;
                    let src = &plane[(span.first + t * geo.h.dilation()) * width..][..width];
                    for (kj, cols) in columns.iter().enumerate() {
                        if cols.is_empty() {
                            continue;
                        }
                        let weight = taps[ki * kw + kj];
                        let first = geo.w.input_index(cols.start, kj);
                        let dst = &mut out_row[cols.clone()];
                        if stride == 1 {
                            let src = &src[first..first + dst.len()];
                            for (d, &v) in dst.iter_mut().zip(src) {
                                *d += weight * v;
                            }
                        } else {
                            let src = src[first..].iter().step_by(stride);
                            for (d, &v) in dst.iter_mut().zip(src) {
                                *d += weight * v;
                            }
                        }
                    }
                }
            }
            activate(geo.activation, out);
        });
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

    fn assert_close(got: &Tensor, want: &Tensor) {
        assert_eq!(got.shape(), want.shape());
        for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
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
        let got = conv(&case.attrs, &x, &w, b.as_ref()).unwrap();
        assert_close(&got, &naive(&case.attrs, &x, &w, b.as_ref()));
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

    #[test]
    fn each_strategy_matches_the_definition() {
        let cases = [
            // im2col: plain, strided, padded, dilated, asymmetric, batched
            case([1, 3, 7, 6], 4, 1, [3, 3], [1, 1], [0; 4], [1, 1]),
            case([2, 3, 9, 8], 5, 1, [3, 2], [2, 3], [1, 0, 2, 1], [1, 1]),
            case([2, 4, 8, 8], 6, 1, [3, 3], [1, 1], [2, 2, 2, 2], [2, 3]),
            // grouped
            case([3, 6, 5, 7], 4, 2, [3, 3], [1, 2], [1, 1, 1, 1], [1, 1]),
            case([1, 6, 6, 6], 9, 3, [2, 2], [2, 2], [0, 1, 1, 0], [2, 1]),
            // pointwise (1x1, stride 1, no pad), with and without groups
            case([2, 8, 4, 5], 6, 1, [1, 1], [1, 1], [0; 4], [1, 1]),
            case([2, 8, 4, 5], 6, 2, [1, 1], [1, 1], [0; 4], [3, 2]),
            // 1x1 but strided or padded: not pointwise
            case([1, 4, 5, 5], 3, 1, [1, 1], [2, 2], [0; 4], [1, 1]),
            case([1, 4, 5, 5], 3, 1, [1, 1], [1, 1], [1, 1, 1, 1], [1, 1]),
            // depthwise: plain, strided, padded, dilated, batched
            case([1, 5, 7, 7], 5, 5, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
            case([3, 4, 9, 8], 4, 4, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),
            case([2, 3, 9, 9], 3, 3, [3, 2], [1, 3], [2, 0, 1, 2], [2, 2]),
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
        // 64 x 576 x 1024: matrixmultiply threads it, units run in sequence.
        let c = case([2, 64, 32, 32], 64, 1, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]);
        assert!(kernels::splits_itself(64, 64 * 9, 1024));
        check(&c, 5);
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
    fn shape_errors_say_what_was_expected() {
        let attrs = case([1, 4, 5, 5], 2, 2, [3, 3], [1, 1], [0; 4], [1, 1]).attrs;
        let err = |x: &[usize], w: &[usize], b: Option<&[usize]>| {
            let b = b.map(|s| Tensor::zeros(s.to_vec()));
            conv(
                &attrs,
                &Tensor::zeros(x.to_vec()),
                &Tensor::zeros(w.to_vec()),
                b.as_ref(),
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
        )
        .unwrap();
        assert_eq!(y.shape(), &[0, 2, 3, 3]);
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
}
