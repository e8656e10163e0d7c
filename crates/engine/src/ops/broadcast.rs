//! numpy broadcasting of two shapes, compiled into contiguous runs.
//!
//! Adjacent dimensions that broadcast the same way are merged, so the common
//! cases (same shape, a scalar, a per-channel `[1, C, 1, 1]` operand) become
//! one or two loops whose innermost body is a plain slice zip or a slice and a
//! scalar: code the compiler vectorises, with no index arithmetic per element.

use super::Mismatch;
use crate::tensor::volume;

/// How the shapes of operands `a` and `b` broadcast to an output shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Broadcast {
    shape: Vec<usize>,
    len: usize,
    /// Merged dimensions outside the innermost one, outermost first.
    outer: Vec<Dim>,
    /// Length of the innermost merged dimension: the run length.
    inner: usize,
    /// Stride of `a` and `b` along the innermost dimension: 0 or 1.
    inner_a: usize,
    inner_b: usize,
}

/// A merged dimension: its length and each operand's stride along it
/// (0 where the operand is broadcast).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dim {
    len: usize,
    a: usize,
    b: usize,
}

impl Broadcast {
    /// The broadcast of `a` and `b` under numpy's rules: shapes align on the
    /// right, and each pair of dimensions is equal or contains a 1.
    pub(crate) fn new(a: &[usize], b: &[usize]) -> Result<Broadcast, Mismatch> {
        let rank = a.len().max(b.len());
        let dim = |s: &[usize], i: usize| {
            (i + s.len())
                .checked_sub(rank)
                .and_then(|j| s.get(j))
                .copied()
                .unwrap_or(1)
        };
        let mut shape = Vec::with_capacity(rank);
        // (length, a broadcast, b broadcast) for every output dimension
        let mut flags = Vec::with_capacity(rank);
        for i in 0..rank {
            let (da, db) = (dim(a, i), dim(b, i));
            let d = match (da, db) {
                _ if da == db => da,
                (1, _) => db,
                (_, 1) => da,
                _ => {
                    return Err(Mismatch(format!(
                        "shapes {a:?} and {b:?} do not broadcast: \
                         dimension {i} of the result is {da} in one and {db} in the other"
                    )));
                }
            };
            shape.push(d);
            flags.push((d, da != d, db != d));
        }
        let len = volume(&shape)
            .ok_or_else(|| Mismatch(format!("the broadcast shape {shape:?} is too large")))?;
        if len == 0 {
            return Ok(Broadcast {
                shape,
                len,
                outer: Vec::new(),
                inner: 1,
                inner_a: 0,
                inner_b: 0,
            });
        }
        // Merge neighbours that broadcast alike; size-1 dimensions vanish.
        let mut dims: Vec<(usize, bool, bool)> = Vec::with_capacity(rank);
        for (d, fa, fb) in flags.into_iter().filter(|&(d, _, _)| d != 1) {
            match dims.last_mut() {
                Some((len, ga, gb)) if (*ga, *gb) == (fa, fb) => *len *= d,
                _ => dims.push((d, fa, fb)),
            }
        }

        let (mut stride_a, mut stride_b) = (1, 1);
        let mut merged: Vec<Dim> = dims
            .iter()
            .rev()
            .map(|&(len, a_broadcast, b_broadcast)| {
                let a = if a_broadcast { 0 } else { stride_a };
                let b = if b_broadcast { 0 } else { stride_b };
                stride_a *= if a_broadcast { 1 } else { len };
                stride_b *= if b_broadcast { 1 } else { len };
                Dim { len, a, b }
            })
            .collect();
        merged.reverse();
        let innermost = merged.pop().unwrap_or(Dim { len: 1, a: 0, b: 0 });
        Ok(Broadcast {
            shape,
            len,
            outer: merged,
            inner: innermost.len,
            inner_a: innermost.a,
            inner_b: innermost.b,
        })
    }

    /// The output shape.
    pub(crate) fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of output elements.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Run length, and the strides of `a` and `b` within a run (0 or 1).
    pub(crate) fn run(&self) -> (usize, usize, usize) {
        (self.inner, self.inner_a, self.inner_b)
    }

    /// The same broadcast with the roles of `a` and `b` exchanged.
    pub(crate) fn swapped(&self) -> Broadcast {
        Broadcast {
            outer: self
                .outer
                .iter()
                .map(|d| Dim {
                    len: d.len,
                    a: d.b,
                    b: d.a,
                })
                .collect(),
            inner_a: self.inner_b,
            inner_b: self.inner_a,
            ..self.clone()
        }
    }

    /// Calls `f(out, a, b)` with the offsets of each run's first element in
    /// the output and in each operand, in output order: runs tile the output
    /// contiguously from 0 to [`Broadcast::len`].
    pub(crate) fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        if self.len == 0 {
            return;
        }
        let mut index = vec![0usize; self.outer.len()];
        let (mut a, mut b) = (0, 0);
        for run in 0..self.len / self.inner {
            f(run * self.inner, a, b);
            // Advance the odometer, innermost outer dimension first.
            for (dim, i) in self.outer.iter().zip(index.iter_mut()).rev() {
                *i += 1;
                a += dim.a;
                b += dim.b;
                if *i < dim.len {
                    break;
                }
                *i = 0;
                a -= dim.len * dim.a;
                b -= dim.len * dim.b;
            }
        }
    }

    /// Calls `f(out, a, b)` for every output element, in order.
    pub(crate) fn for_each_index(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (n, sa, sb) = self.run();
        self.for_each_run(|o, a, b| {
            for j in 0..n {
                f(o + j, a + j * sa, b + j * sb);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets by explicit multi-index arithmetic.
    fn naive(a: &[usize], b: &[usize]) -> (Vec<usize>, Vec<(usize, usize)>) {
        let rank = a.len().max(b.len());
        let pad = |s: &[usize]| {
            let mut p = vec![1; rank - s.len()];
            p.extend_from_slice(s);
            p
        };
        let (a, b) = (pad(a), pad(b));
        let shape: Vec<usize> = a.iter().zip(&b).map(|(&x, &y)| x.max(y)).collect();
        let n: usize = shape.iter().product();
        let offset = |s: &[usize], idx: &[usize]| {
            idx.iter()
                .zip(s)
                .fold(0, |off, (&i, &d)| off * d + if d == 1 { 0 } else { i })
        };
        let mut pairs = Vec::new();
        for flat in 0..n {
            let mut idx = vec![0; rank];
            let mut rest = flat;
            for (i, &d) in shape.iter().enumerate().rev() {
                idx[i] = rest % d;
                rest /= d;
            }
            pairs.push((offset(&a, &idx), offset(&b, &idx)));
        }
        (shape, pairs)
    }

    #[test]
    fn offsets_match_multi_index_arithmetic() {
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 3], &[2, 3]),
            (&[2, 3], &[3]),
            (&[2, 3], &[]),
            (&[], &[4]),
            (&[2, 1, 4], &[3, 1]),
            (&[1, 3, 1, 1], &[2, 3, 4, 5]),
            (&[2, 3, 4, 5], &[1, 3, 1, 1]),
            (&[5, 1, 2, 1], &[1, 4, 1, 3]),
            (&[1], &[1, 1, 1]),
            (&[3, 1, 1, 2], &[3, 2, 2, 2]),
        ];
        for &(a, b) in cases {
            let bc = Broadcast::new(a, b).unwrap();
            let (shape, pairs) = naive(a, b);
            assert_eq!(bc.shape(), shape.as_slice(), "{a:?} {b:?}");
            let mut got = Vec::new();
            bc.for_each_index(|o, x, y| {
                assert_eq!(o, got.len());
                got.push((x, y));
            });
            assert_eq!(got, pairs, "{a:?} {b:?}");

            let mut swapped = Vec::new();
            bc.swapped().for_each_index(|_, x, y| swapped.push((y, x)));
            assert_eq!(swapped, pairs, "swapped {a:?} {b:?}");
        }
    }

    #[test]
    fn merges_dimensions_that_broadcast_alike() {
        // per-channel bias: channels outside, one plane of 25 inside
        let bc = Broadcast::new(&[1, 8, 5, 5], &[8, 1, 1]).unwrap();
        assert_eq!(bc.run(), (25, 1, 0));
        assert_eq!(bc.outer.len(), 1);
        // a batch dimension adds one loop
        let bc = Broadcast::new(&[2, 8, 5, 5], &[1, 8, 1, 1]).unwrap();
        assert_eq!(bc.outer.len(), 2);
        // same shapes: a single run
        let bc = Broadcast::new(&[2, 8, 5, 5], &[2, 8, 5, 5]).unwrap();
        assert_eq!((bc.run(), bc.outer.len()), ((400, 1, 1), 0));
    }

    #[test]
    fn zero_dimensions_give_an_empty_result() {
        let bc = Broadcast::new(&[0, 3], &[1, 3]).unwrap();
        assert_eq!(bc.shape(), &[0, 3]);
        assert_eq!(bc.len(), 0);
        bc.for_each_run(|_, _, _| panic!("nothing to visit"));
        // 1 broadcasts to 0, as in numpy
        assert_eq!(Broadcast::new(&[1], &[0]).unwrap().shape(), &[0]);
    }

    #[test]
    fn rejects_incompatible_shapes() {
        let err = Broadcast::new(&[2, 3], &[4, 3]).unwrap_err();
        assert!(err.0.contains("[2, 3] and [4, 3]"), "{}", err.0);
        assert!(Broadcast::new(&[0], &[2]).is_err());
        assert!(Broadcast::new(&[usize::MAX, 1], &[1, usize::MAX]).is_err());
    }
}
