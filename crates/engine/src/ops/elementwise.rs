//! Element-wise operators: the activations (Relu, Clip, Sigmoid, HardSigmoid,
//! Tanh), the self-gated products the plan fuses (SiLU, HardSwish) and
//! arithmetic with numpy broadcasting (Add, Sub, Mul, Div).
//!
//! They reuse an operand's buffer when the executor hands it over and the
//! output has its shape, and otherwise write into a recycled one, so a chain
//! of activations allocates nothing. Relu and Clip compile to `max`/`min`
//! instructions: no branch depends on the data.

use std::borrow::Cow;

use super::KernelResult;
use super::broadcast::Broadcast;
use crate::graph::Activation;
use crate::kernels::{self, fmadd};
use crate::tensor::Tensor;

/// Applies `f` to every element.
pub(crate) fn map(x: Cow<'_, Tensor>, f: impl Fn(f32) -> f32) -> Tensor {
    match x {
        Cow::Owned(mut x) => {
            x.data_mut().iter_mut().for_each(|v| *v = f(*v));
            x
        }
        Cow::Borrowed(x) => {
            let mut y = crate::buffers::take(x.len());
            for (y, &v) in y.iter_mut().zip(x.data()) {
                *y = f(v);
            }
            Tensor::from_parts(x.shape().to_vec(), y)
        }
    }
}

/// `max(x, 0)`; NaN stays NaN, as in numpy and the ONNX reference.
///
/// A comparison, not `f32::max`: `max` must return the number when one
/// operand is NaN, which costs a compare and a blend after every `vmaxps`
/// (Clip's two were a quarter of MobileNetV2's depthwise kernel
/// instructions in callgrind, about a sixth of its samples in perf).
pub(crate) fn relu(x: f32) -> f32 {
    if x < 0.0 { 0.0 } else { x }
}

/// `min(max(x, min), max)`; NaN stays NaN (see [`relu`]).
pub(crate) fn clip(x: f32, min: f32, max: f32) -> f32 {
    let low = if x < min { min } else { x };
    if low > max { max } else { low }
}

impl Activation {
    /// The activation of one value, as [`relu`] and [`clip`] give it (NaN stays
    /// NaN). For scalar loops; vector kernels bind the activation once, outside
    /// their loops.
    pub(crate) fn apply(self, x: f32) -> f32 {
        match self {
            Activation::None => x,
            Activation::Relu => relu(x),
            Activation::Clip { min, max } => clip(x, min, max),
        }
    }
}

/// Sigmoid as a node: in place when the executor hands the value over, else
/// into a recycled buffer; split over the threads when long
/// ([`SIGMOID_PIECE`]). Each value is [`logistic`]'s, on any CPU.
pub(crate) fn sigmoid(x: Cow<'_, Tensor>) -> Tensor {
    by_pieces(x, kernels::logistic_in_place, kernels::logistic)
}

/// SiLU, `x * sigmoid(x)`, in one pass (a Sigmoid and the Mul of its input
/// by it, fused by the plan), as [`sigmoid`] goes. Each value is `x *
/// logistic(x)`, as the two nodes would give it.
pub(crate) fn silu(x: Cow<'_, Tensor>) -> Tensor {
    by_pieces(x, kernels::silu_in_place, kernels::silu)
}

/// `in_place` on `x`'s values when the executor hands `x` over, else `into`
/// from them into a recycled buffer; split over the threads when long.
fn by_pieces(x: Cow<'_, Tensor>, in_place: fn(&mut [f32]), into: fn(&[f32], &mut [f32])) -> Tensor {
    match x {
        Cow::Owned(mut x) => {
            for_each_piece(x.data_mut(), |_, piece| in_place(piece));
            x
        }
        Cow::Borrowed(x) => {
            let input = x.data();
            let mut out = crate::buffers::take(input.len());
            for_each_piece(&mut out, |at, piece| {
                into(&input[at..][..piece.len()], piece)
            });
            Tensor::from_parts(x.shape().to_vec(), out)
        }
    }
}

/// HardSwish in general form, `x * hard_sigmoid(x, alpha, beta)` (a
/// HardSigmoid and the Mul of its input by it, fused by the plan): in place
/// when the executor hands `x` over.
pub(crate) fn hard_swish(x: Cow<'_, Tensor>, alpha: f32, beta: f32) -> Tensor {
    map(x, |v| v * hard_sigmoid(v, alpha, beta))
}

/// Fewest values per thread of a [`sigmoid`] split over threads: about 20 µs
/// of work.
const SIGMOID_PIECE: usize = 1 << 15;

/// `f(offset, piece)` over `data` cut into one piece per thread (of at least
/// [`SIGMOID_PIECE`] values).
fn for_each_piece(data: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    let piece = data
        .len()
        .div_ceil(crate::threads::threads())
        .max(SIGMOID_PIECE);
    crate::threads::for_each_chunk(data, piece, || (), |(), i, chunk| f(i * piece, chunk));
}

/// Magic number whose addition rounds an `f32` of magnitude below 2^22 to the
/// nearest integer (ties to even): 1.5 * 2^23, whose bits are `0x4B40_0000`.
const ROUNDER: f32 = 12_582_912.0;

/// `ln 2` in two parts: `LN2_HI` has its low nine bits zero, so that
/// `n * LN2_HI` is exact for every `n` [`logistic`] takes.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// Most negative argument [`logistic`] gives a nonzero result for: below it
/// the result would be subnormal (under 1.2e-38), and is 0.
const LOGISTIC_MIN: f32 = -87.0;

/// The logistic function `1 / (1 + e^-x)`, within 3e-7 of its value
/// relative (checked against `f64`'s `exp` in the tests), written without
/// branches or calls so that loops over it vectorise: `e^-|x|` as `2^n e^r`
/// (`n` rounded from `-|x| / ln 2`, `|r| <= ln 2 / 2`, `e^r` by its Taylor
/// polynomial of degree 7, whose remainder is under 6e-9), then `1 / (1 +
/// e)` for `x >= 0` and `e / (1 + e)` below. NaN gives NaN; below
/// [`LOGISTIC_MIN`], 0 (`-inf` too), and `+inf` gives 1.
///
/// `f32::exp` is a call into libm per value: EfficientNet-B0's Sigmoids
/// (its SiLU activations, 3.5 million values) took 13 ms a query at one thread
/// that way.
#[inline(always)]
pub(crate) fn logistic<const FMA: bool>(x: f32) -> f32 {
    let a = -x.abs();
    let a = if a < LOGISTIC_MIN { LOGISTIC_MIN } else { a };
    let t = fmadd::<FMA>(a, std::f32::consts::LOG2_E, ROUNDER);
    let n = t - ROUNDER;
    let r = fmadd::<FMA>(-n, LN2_LO, fmadd::<FMA>(-n, LN2_HI, a));
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = fmadd::<FMA>(p, r, c);
    }
    // 2^n, built from its exponent bits: `t`'s low bits hold `n`, and
    // `LOGISTIC_MIN` keeps `n + 127` at 1 or more.
    let biased = t
        .to_bits()
        .wrapping_sub(ROUNDER.to_bits())
        .wrapping_add(127);
    let e = p * f32::from_bits(biased << 23);
    let s = 1.0 / (1.0 + e);
    if x < LOGISTIC_MIN {
        0.0
    } else if x >= 0.0 {
        s
    } else {
        e * s
    }
}

/// [`logistic`] of every value of `x` into `out` (over the shorter length).
/// Compiled per instruction set by `kernels::logistic`.
#[inline(always)]
pub(crate) fn logistic_body<const FMA: bool>(x: &[f32], out: &mut [f32]) {
    for (y, &x) in out.iter_mut().zip(x) {
        *y = logistic::<FMA>(x);
    }
}

/// `x * logistic(x)` of every value of `x` into `out` (over the shorter
/// length). Compiled per instruction set by `kernels::silu`.
#[inline(always)]
pub(crate) fn silu_body<const FMA: bool>(x: &[f32], out: &mut [f32]) {
    for (y, &x) in out.iter_mut().zip(x) {
        *y = x * logistic::<FMA>(x);
    }
}

/// `x * logistic(x)` of every value of `data`, in place. Compiled per
/// instruction set by `kernels::silu_in_place`.
#[inline(always)]
pub(crate) fn silu_in_place_body<const FMA: bool>(data: &mut [f32]) {
    for v in data {
        *v *= logistic::<FMA>(*v);
    }
}

/// [`logistic`] of every value of `data`, in place. Compiled per instruction
/// set by `kernels::logistic_in_place`.
#[inline(always)]
pub(crate) fn logistic_in_place_body<const FMA: bool>(data: &mut [f32]) {
    for v in data {
        *v = logistic::<FMA>(*v);
    }
}

/// `min(max(alpha * x + beta, 0), 1)`; NaN stays NaN (see [`clip`]).
pub(crate) fn hard_sigmoid(x: f32, alpha: f32, beta: f32) -> f32 {
    clip(alpha * x + beta, 0.0, 1.0)
}

/// Applies a fused activation in place.
pub(crate) fn activate(activation: Activation, data: &mut [f32]) {
    if activation != Activation::None {
        crate::kernels::bias_activate(data, 0.0, activation);
    }
}

/// Relu or Clip as a node: in place when the executor hands the value over.
pub(crate) fn activation(x: Cow<'_, Tensor>, activation: Activation) -> Tensor {
    match x {
        Cow::Owned(mut x) => {
            activate(activation, x.data_mut());
            x
        }
        Cow::Borrowed(x) => match activation {
            Activation::None => x.clone(),
            Activation::Relu => map(Cow::Borrowed(x), relu),
            Activation::Clip { min, max } => map(Cow::Borrowed(x), |v| clip(v, min, max)),
        },
    }
}

/// `data[i] = activation(data[i] + bias)`; adding a zero bias is skipped,
/// so that `-0.0` stays `-0.0`. Compiled per instruction set by
/// `kernels::bias_activate`.
#[inline(always)]
pub(crate) fn bias_activate_body<const FMA: bool>(
    data: &mut [f32],
    bias: f32,
    activation: Activation,
) {
    match (activation, bias == 0.0) {
        (Activation::None, true) => {}
        (Activation::None, false) => data.iter_mut().for_each(|v| *v += bias),
        (Activation::Relu, true) => data.iter_mut().for_each(|v| *v = relu(*v)),
        (Activation::Relu, false) => data.iter_mut().for_each(|v| *v = relu(*v + bias)),
        (Activation::Clip { min, max }, true) => {
            data.iter_mut().for_each(|v| *v = clip(*v, min, max))
        }
        (Activation::Clip { min, max }, false) => {
            data.iter_mut().for_each(|v| *v = clip(*v + bias, min, max))
        }
    }
}

/// `data[i] = activation((data[i] + bias) + residual[i])` over the shorter
/// length: a Conv's bias, the Add of a residual connection that read it,
/// and the activation after that Add, in the graph's order. Compiled per
/// instruction set by `kernels::bias_add_activate`.
#[inline(always)]
pub(crate) fn bias_add_activate_body<const FMA: bool>(
    data: &mut [f32],
    bias: f32,
    residual: &[f32],
    activation: Activation,
) {
    let pairs = data.iter_mut().zip(residual);
    match activation {
        Activation::None => pairs.for_each(|(v, r)| *v = (*v + bias) + r),
        Activation::Relu => pairs.for_each(|(v, r)| *v = relu((*v + bias) + r)),
        Activation::Clip { min, max } => {
            pairs.for_each(|(v, r)| *v = clip((*v + bias) + r, min, max));
        }
    }
}

/// `f(a, b)` element by element, with numpy broadcasting.
pub(crate) fn binary(
    a: Cow<'_, Tensor>,
    b: Cow<'_, Tensor>,
    f: impl Fn(f32, f32) -> f32 + Copy,
) -> KernelResult {
    let plan = Broadcast::new(a.shape(), b.shape())?;
    match (a, b) {
        (Cow::Owned(mut a), b) if a.shape() == plan.shape() => {
            update(a.data_mut(), b.data(), &plan, f);
            if let Cow::Owned(b) = b {
                crate::buffers::give(b.into_parts().1);
            }
            Ok(a)
        }
        (a, Cow::Owned(mut b)) if b.shape() == plan.shape() => {
            update(b.data_mut(), a.data(), &plan.swapped(), move |y, x| f(x, y));
            if let Cow::Owned(a) = a {
                crate::buffers::give(a.into_parts().1);
            }
            Ok(b)
        }
        (a, b) => {
            let mut out = Vec::with_capacity(plan.len());
            combine(&mut out, a.data(), b.data(), &plan, f);
            Ok(Tensor::from_parts(plan.shape().to_vec(), out))
        }
    }
}

/// `acc = f(acc, other)`, where `acc` has the output's shape (`plan`'s `a`).
fn update(acc: &mut [f32], other: &[f32], plan: &Broadcast, f: impl Fn(f32, f32) -> f32) {
    let (n, _, stride) = plan.run();
    plan.for_each_run(|o, _, b| {
        let acc = &mut acc[o..o + n];
        if stride == 1 {
            for (x, &y) in acc.iter_mut().zip(&other[b..b + n]) {
                *x = f(*x, y);
            }
        } else {
            let y = other[b];
            acc.iter_mut().for_each(|x| *x = f(*x, y));
        }
    });
}

/// Appends `f(a, b)` to `out`, run by run (runs come in output order).
fn combine(
    out: &mut Vec<f32>,
    a: &[f32],
    b: &[f32],
    plan: &Broadcast,
    f: impl Fn(f32, f32) -> f32,
) {
    let (n, sa, sb) = plan.run();
    plan.for_each_run(|_, ia, ib| match (sa, sb) {
        (1, 1) => out.extend(
            a[ia..ia + n]
                .iter()
                .zip(&b[ib..ib + n])
                .map(|(&x, &y)| f(x, y)),
        ),
        (1, _) => {
            let y = b[ib];
            out.extend(a[ia..ia + n].iter().map(|&x| f(x, y)));
        }
        (_, 1) => {
            let x = a[ia];
            out.extend(b[ib..ib + n].iter().map(|&y| f(x, y)));
        }
        _ => {
            let v = f(a[ia], b[ib]);
            out.extend(std::iter::repeat_n(v, n));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tensor(shape: &[usize], seed: u32) -> Tensor {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 97)
            .map(|v| v as f32 / 8.0 - 6.0)
            .collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    }

    /// The logistic function in `f64`, from libm's `exp`.
    fn logistic_f64(x: f32) -> f64 {
        1.0 / (1.0 + (-f64::from(x)).exp())
    }

    /// Within 3e-7 relative of the `f64` value, fused or not; 0 below
    /// `LOGISTIC_MIN` (where the value is subnormal); NaN for NaN.
    #[test]
    fn logistic_is_within_3e7_of_the_f64_value() {
        let mut xs: Vec<f32> = (-1_200_000..=1_200_000).map(|i| i as f32 * 1e-4).collect();
        xs.extend([
            0.0, -0.0, 1e-30, -1e-30, 86.99, -86.99, -87.0, -87.01, 88.0, 88.8,
        ]);
        xs.extend([
            -88.8,
            104.0,
            -104.0,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        xs.extend([f32::MAX, f32::MIN, f32::MIN_POSITIVE, -f32::MIN_POSITIVE]);
        let mut worst = 0.0f64;
        for &x in &xs {
            let want = logistic_f64(x);
            for got in [logistic::<true>(x), logistic::<false>(x)] {
                if x < LOGISTIC_MIN {
                    assert_eq!(got.to_bits(), 0, "logistic({x}) = {got}, not 0");
                    continue;
                }
                let error = (f64::from(got) - want).abs() / want;
                worst = worst.max(error);
                assert!(
                    error <= 3e-7,
                    "logistic({x}) = {got}, want {want}: {error:e}"
                );
            }
        }
        assert!(logistic::<true>(f32::NAN).is_nan() && logistic::<false>(f32::NAN).is_nan());
        // The bound is not slack beyond reason: the worst error is a few ulp.
        assert!(worst > 1e-8, "worst relative error {worst:e}");
    }

    /// The node gives `logistic` of each value whether it owns the input or
    /// reads it, on one thread and split over two.
    #[test]
    fn sigmoid_node_gives_logistic_of_every_value() {
        for threads in [1, 2] {
            crate::threads::set_threads(threads);
            for n in [0, 1, 17, SIGMOID_PIECE + 3, 2 * SIGMOID_PIECE + 5] {
                let x = tensor(&[1, n], 7);
                let mut want = x.data().to_vec();
                kernels::logistic_in_place(&mut want);
                let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
                let read = sigmoid(Cow::Borrowed(&x));
                let owned = sigmoid(Cow::Owned(x.clone()));
                for y in [read, owned] {
                    assert_eq!(y.shape(), x.shape());
                    let got: Vec<u32> = y.data().iter().map(|v| v.to_bits()).collect();
                    assert!(got == want, "{n} values at {threads} thread(s)");
                }
            }
        }
    }

    /// numpy broadcasting by explicit multi-indices.
    fn naive(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Tensor {
        let rank = a.shape().len().max(b.shape().len());
        let pad = |s: &[usize]| [vec![1; rank - s.len()], s.to_vec()].concat();
        let (sa, sb) = (pad(a.shape()), pad(b.shape()));
        let shape: Vec<usize> = sa
            .iter()
            .zip(&sb)
            .map(|(&x, &y)| if x == 1 { y } else { x })
            .collect();
        let n: usize = shape.iter().product();
        let at = |t: &Tensor, s: &[usize], idx: &[usize]| {
            let off = idx
                .iter()
                .zip(s)
                .fold(0, |o, (&i, &d)| o * d + if d == 1 { 0 } else { i });
            t.data()[off]
        };
        let data = (0..n)
            .map(|flat| {
                let mut idx = vec![0; rank];
                let mut rest = flat;
                for (i, &d) in shape.iter().enumerate().rev() {
                    idx[i] = rest % d;
                    rest /= d;
                }
                f(at(a, &sa, &idx), at(b, &sb, &idx))
            })
            .collect();
        Tensor::new(shape, data).unwrap()
    }

    /// Two shapes that broadcast: a common shape with some dimensions set
    /// to 1 or dropped from the front on either side.
    fn broadcastable() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        prop::collection::vec((1usize..5, 0u8..4), 0..5).prop_flat_map(|dims| {
            let a: Vec<usize> = dims
                .iter()
                .map(|&(d, m)| if m == 1 { 1 } else { d })
                .collect();
            let b: Vec<usize> = dims
                .iter()
                .map(|&(d, m)| if m == 2 { 1 } else { d })
                .collect();
            let rank = dims.len();
            (Just(a), Just(b), 0..=rank, 0..=rank)
                .prop_map(|(a, b, da, db)| (a[da..].to_vec(), b[db..].to_vec()))
        })
    }

    proptest! {
        #[test]
        fn binary_matches_numpy_broadcasting((sa, sb) in broadcastable(), owned in 0u8..3) {
            let (a, b) = (tensor(&sa, 1), tensor(&sb, 2));
            let want = naive(&a, &b, |x, y| x - y);
            // Exercise the three buffer strategies: fresh, reuse a, reuse b.
            let got = match owned {
                0 => binary(Cow::Borrowed(&a), Cow::Borrowed(&b), |x, y| x - y),
                1 => binary(Cow::Owned(a.clone()), Cow::Borrowed(&b), |x, y| x - y),
                _ => binary(Cow::Borrowed(&a), Cow::Owned(b.clone()), |x, y| x - y),
            }
            .unwrap();
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn per_channel_bias_with_batch() {
        let x = tensor(&[2, 3, 4, 5], 7);
        let bias = tensor(&[3, 1, 1], 9);
        let got = binary(Cow::Borrowed(&x), Cow::Borrowed(&bias), |a, b| a + b).unwrap();
        assert_eq!(got, naive(&x, &bias, |a, b| a + b));
        let got = binary(Cow::Borrowed(&bias), Cow::Owned(x.clone()), |a, b| a / b).unwrap();
        assert_eq!(got, naive(&bias, &x, |a, b| a / b));
    }

    #[test]
    fn reuses_the_owned_operand_when_shapes_allow() {
        let a = tensor(&[4, 3], 1);
        let ptr = a.data().as_ptr();
        let b = tensor(&[3], 2);
        let y = binary(Cow::Owned(a), Cow::Borrowed(&b), |x, y| x * y).unwrap();
        assert_eq!(y.data().as_ptr(), ptr);
    }

    #[test]
    fn rejects_shapes_that_do_not_broadcast() {
        let err = binary(
            Cow::Owned(tensor(&[2, 3], 0)),
            Cow::Owned(tensor(&[2], 0)),
            |x, y| x + y,
        )
        .unwrap_err();
        assert!(err.0.contains("do not broadcast"), "{}", err.0);
    }

    #[test]
    fn activations() {
        let x = Tensor::new(vec![5], vec![-3.0, -0.5, 0.0, 2.0, 9.0]).unwrap();
        assert_eq!(
            map(Cow::Borrowed(&x), relu).data(),
            &[0.0, 0.0, 0.0, 2.0, 9.0]
        );
        let relu6 = map(Cow::Borrowed(&x), |v| clip(v, 0.0, 6.0));
        assert_eq!(relu6.data(), &[0.0, 0.0, 0.0, 2.0, 6.0]);
        let mut data = x.data().to_vec();
        activate(
            Activation::Clip {
                min: -1.0,
                max: 1.0,
            },
            &mut data,
        );
        assert_eq!(data, [-1.0, -0.5, 0.0, 1.0, 1.0]);

        // NaN stays NaN, as numpy's maximum and clip keep it, through the fused kernel
        // too (its vector loop and its tail).
        assert!(relu(f32::NAN).is_nan() && clip(f32::NAN, 0.0, 6.0).is_nan());
        for activation in [Activation::Relu, Activation::Clip { min: 0.0, max: 6.0 }] {
            let mut data = vec![-1.0f32; 37];
            data[3] = f32::NAN;
            data[36] = f32::NAN;
            crate::kernels::bias_activate(&mut data, 0.5, activation);
            assert!(data[3].is_nan() && data[36].is_nan(), "{activation:?}");
            assert!(data.iter().filter(|v| !v.is_nan()).all(|&v| v == 0.0));
        }

        for logistic in [logistic::<true>, logistic::<false>] {
            assert_eq!(logistic(0.0), 0.5);
            assert_eq!(logistic(-200.0), 0.0);
            assert_eq!(logistic(200.0), 1.0);
            assert!((logistic(1.0) - 0.731_058_6).abs() < 1e-6);
        }
    }
}
