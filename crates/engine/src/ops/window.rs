//! Sliding-window geometry along one spatial axis, shared by Conv and the pools.
//!
//! Positions are counted in *padded* coordinates, where the input occupies
//! `pad_begin..pad_begin + input`. Every quantity is then unsigned, and
//! [`Axis::new`] checks once that the largest position fits in a `usize`, so
//! the arithmetic below cannot overflow.

use std::ops::Range;

/// One spatial axis of a convolution or pooling window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Axis {
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    pad_begin: usize,
    /// `pad_begin + input + pad_end`.
    padded: usize,
}

/// The kernel taps of one output cell that land on the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    /// Index in the kernel of the first in-bounds tap.
    pub first_tap: usize,
    /// Input index read by that tap (0 when there is none).
    pub first: usize,
    /// Number of in-bounds taps; consecutive taps are `dilation` apart.
    pub taps: usize,
    /// Number of taps inside the padded extent (padding included).
    pub padded_taps: usize,
}

impl Axis {
    /// The geometry of a window of `kernel` taps, `dilation` apart, sliding by
    /// `stride` over `input` cells padded by `pads` (begin, end).
    ///
    /// `ceil` rounds the output length up (pooling's `ceil_mode`), dropping a
    /// last window that would start in the end padding, as ONNX and
    /// onnxruntime do.
    pub(crate) fn new(
        input: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
        pads: (usize, usize),
        ceil: bool,
    ) -> Result<Axis, String> {
        if kernel == 0 || stride == 0 || dilation == 0 {
            return Err(format!(
                "kernel ({kernel}), stride ({stride}) and dilation ({dilation}) must be nonzero"
            ));
        }
        let too_large = || "window geometry overflows".to_string();
        let extent = dilation
            .checked_mul(kernel - 1)
            .and_then(|e| e.checked_add(1))
            .ok_or_else(too_large)?;
        let padded = input
            .checked_add(pads.0)
            .and_then(|p| p.checked_add(pads.1))
            .ok_or_else(too_large)?;
        // Every position computed later is below `padded + stride`.
        padded.checked_add(stride).ok_or_else(too_large)?;
        let Some(slack) = padded.checked_sub(extent) else {
            return Err(format!(
                "the padded input ({padded}) is smaller than the kernel's extent ({extent})"
            ));
        };
        let mut output = slack / stride + 1;
        if ceil && !slack.is_multiple_of(stride) {
            output += 1;
        }
        if ceil && (output - 1) * stride >= pads.0 + input {
            output -= 1;
        }
        Ok(Axis {
            input,
            output,
            kernel,
            stride,
            dilation,
            pad_begin: pads.0,
            padded,
        })
    }

    /// Number of input cells.
    pub(crate) fn input(&self) -> usize {
        self.input
    }

    /// Number of output cells.
    pub(crate) fn output(&self) -> usize {
        self.output
    }

    /// Number of kernel taps.
    pub(crate) fn kernel(&self) -> usize {
        self.kernel
    }

    /// Distance between output cells, in input cells.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// Padding cells before the input.
    pub(crate) fn pad_begin(&self) -> usize {
        self.pad_begin
    }

    /// `pad_begin + input + pad_end`.
    pub(crate) fn padded(&self) -> usize {
        self.padded
    }

    /// Distance between kernel taps, in input cells.
    pub(crate) fn dilation(&self) -> usize {
        self.dilation
    }

    /// True when output cell `o` reads exactly input cell `o` (a 1-tap,
    /// stride-1, unpadded window).
    pub(crate) fn is_identity(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.padded == self.input
    }

    /// True for 3 undilated taps with one cell of padding at each end and
    /// stride 1 or 2: the windows `depthwise3x3_body` computes.
    pub(crate) fn is_3x3_pad1(&self) -> bool {
        self.kernel == 3
            && self.dilation == 1
            && self.pad_begin == 1
            && self.padded == self.input + 2
            && (self.stride == 1 || self.stride == 2)
    }

    /// The taps of output cell `o` (`o < output`).
    pub(crate) fn span(&self, o: usize) -> Span {
        let start = o * self.stride;
        let end = self.pad_begin + self.input;
        let first_tap = self.pad_begin.saturating_sub(start).div_ceil(self.dilation);
        let last_tap = if start < end {
            self.kernel.min((end - start).div_ceil(self.dilation))
        } else {
            0
        };
        let padded_taps = self
            .kernel
            .min((self.padded - start).div_ceil(self.dilation));
        if first_tap >= last_tap {
            return Span {
                first_tap: 0,
                first: 0,
                taps: 0,
                padded_taps,
            };
        }
        Span {
            first_tap,
            first: start + first_tap * self.dilation - self.pad_begin,
            taps: last_tap - first_tap,
            padded_taps,
        }
    }

    /// The output cells whose tap `tap` (`tap < kernel`) lands on the input.
    pub(crate) fn valid_outputs(&self, tap: usize) -> Range<usize> {
        let offset = tap * self.dilation;
        let end = self.pad_begin + self.input;
        if offset >= end {
            return 0..0;
        }
        let first = self.pad_begin.saturating_sub(offset).div_ceil(self.stride);
        let last = self.output.min((end - offset).div_ceil(self.stride));
        if first >= last { 0..0 } else { first..last }
    }

    /// The input cell read by tap `tap` of output cell `o`, for `o` in
    /// [`Axis::valid_outputs`]`(tap)`.
    pub(crate) fn input_index(&self, o: usize, tap: usize) -> usize {
        o * self.stride + tap * self.dilation - self.pad_begin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same questions answered by brute force over signed positions.
    fn naive_taps(axis: &Axis, o: usize) -> Vec<usize> {
        (0..axis.kernel)
            .filter(|&k| {
                let p = (o * axis.stride + k * axis.dilation) as i64 - axis.pad_begin as i64;
                p >= 0 && p < axis.input as i64
            })
            .collect()
    }

    #[test]
    fn spans_and_valid_outputs_agree_with_brute_force() {
        for input in 1..9 {
            for kernel in 1..5 {
                for stride in 1..4 {
                    for dilation in 1..4 {
                        for pads in [(0, 0), (1, 0), (0, 2), (2, 1), (3, 3)] {
                            for ceil in [false, true] {
                                let Ok(axis) =
                                    Axis::new(input, kernel, stride, dilation, pads, ceil)
                                else {
                                    continue;
                                };
                                for o in 0..axis.output {
                                    let taps = naive_taps(&axis, o);
                                    let span = axis.span(o);
                                    assert_eq!(span.taps, taps.len(), "{axis:?} o={o}");
                                    if let Some(&k) = taps.first() {
                                        assert_eq!(span.first_tap, k);
                                        assert_eq!(span.first, axis.input_index(o, k));
                                    }
                                    let padded = (0..kernel)
                                        .filter(|k| o * stride + k * dilation < axis.padded)
                                        .count();
                                    assert_eq!(span.padded_taps, padded, "{axis:?} o={o}");
                                }
                                for tap in 0..kernel {
                                    let valid: Vec<usize> = (0..axis.output)
                                        .filter(|&o| naive_taps(&axis, o).contains(&tap))
                                        .collect();
                                    let range: Vec<usize> = axis.valid_outputs(tap).collect();
                                    assert_eq!(range, valid, "{axis:?} tap={tap}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn output_lengths_follow_onnx() {
        // floor((5 + 2 - 3) / 2) + 1 = 3
        assert_eq!(Axis::new(5, 3, 2, 1, (1, 1), false).unwrap().output(), 3);
        // 4 cells, kernel 3, stride 2: floor gives 1, ceil gives 2
        assert_eq!(Axis::new(4, 3, 2, 1, (0, 0), false).unwrap().output(), 1);
        assert_eq!(Axis::new(4, 3, 2, 1, (0, 0), true).unwrap().output(), 2);
        // ceil would add a window starting at padded position 6 = pad_begin + input: dropped
        assert_eq!(Axis::new(5, 2, 2, 1, (1, 1), true).unwrap().output(), 3);
        // dilation 2 makes a 3-tap kernel span 5 cells
        assert_eq!(Axis::new(5, 3, 1, 2, (0, 0), false).unwrap().output(), 1);
    }

    #[test]
    fn rejects_degenerate_windows() {
        assert!(Axis::new(4, 0, 1, 1, (0, 0), false).is_err());
        assert!(Axis::new(4, 2, 0, 1, (0, 0), false).is_err());
        assert!(Axis::new(4, 2, 1, 0, (0, 0), false).is_err());
        assert!(Axis::new(2, 3, 1, 1, (0, 0), false).is_err());
        assert!(Axis::new(4, 3, 1, usize::MAX, (0, 0), false).is_err());
        assert!(Axis::new(4, 1, 1, 1, (usize::MAX, 1), false).is_err());
        assert!(Axis::new(4, 1, usize::MAX, 1, (0, 0), false).is_err());
    }
}
