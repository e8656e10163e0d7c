//! Output buffers recycled within one run of a plan.
//!
//! Every kernel that computes into a new tensor would otherwise get a
//! freshly zeroed allocation per node, and the zeroing alone is a pass over
//! memory as long as the output. Instead, [`Plan::run`](crate::Plan::run)
//! hands the buffers of values it frees to a small per-thread bin, and
//! kernels that overwrite every element of their output [`take`] from it.
//! When a run ends the bin keeps at most [`KEEP_BYTES`] of its smallest
//! buffers for the next run on the same thread, and frees the rest: like
//! onnxruntime's memory arena, a process that runs a model again keeps the
//! memory its intermediates needed, rather than paying page faults for it
//! on every query.

use std::cell::RefCell;

/// Most buffers the bin holds.
const CAPACITY: usize = 8;

/// Values shorter than this (1 MiB of `f32`) are not put in much larger
/// buffers (see [`take`]).
const SMALL: usize = 1 << 18;

/// Most bytes the bin keeps between runs: a batch of 8 through
/// MobileNetV2 or ResNet-18, two intermediates of VGG-16's.
const KEEP_BYTES: usize = 256 << 20;

thread_local! {
    static BIN: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` values whose contents are unspecified (zeros, or an
/// earlier value of this run): the caller must overwrite every element.
///
/// Takes a binned buffer that can hold `len` values: one already `len`
/// long if there is one, else the smallest that can grow to it. A buffer
/// cut short for a smaller value must be zeroed back to length when a
/// larger one takes it (safe code cannot reuse the cut-off values), so a
/// value under [`SMALL`] takes only a buffer at most twice its length and
/// is otherwise allocated: that refilling was 4.4 % of MobileNetV2's time,
/// 2.7 % since. Larger values take any buffer that fits, so that a run
/// holds no more memory than it must (allocating them too raised VGG-16's
/// peak by 15 MiB).
pub(crate) fn take(len: usize) -> Vec<f32> {
    let reused = BIN.with_borrow_mut(|bin| {
        let fits = |v: &Vec<f32>| v.capacity() >= len && (len >= SMALL || v.capacity() / 2 <= len);
        let best = bin
            .iter()
            .enumerate()
            .filter(|(_, v)| fits(v) && v.len() >= len)
            .min_by_key(|(_, v)| v.len())
            .or_else(|| {
                bin.iter()
                    .enumerate()
                    .filter(|(_, v)| fits(v))
                    .min_by_key(|(_, v)| v.capacity())
            })
            .map(|(i, _)| i)?;
        Some(bin.swap_remove(best))
    });
    match reused {
        Some(mut v) => {
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, 0.0);
            }
            v
        }
        None => vec![0.0; len],
    }
}

/// Offers `buffer` for reuse by a later [`take`] in this run.
pub(crate) fn give(buffer: Vec<f32>) {
    if buffer.capacity() == 0 {
        return;
    }
    BIN.with_borrow_mut(|bin| {
        if bin.len() == CAPACITY {
            // Keep the largest buffers: they are the costly ones to zero.
            let smallest = (0..bin.len()).min_by_key(|&i| bin[i].capacity());
            match smallest {
                Some(i) if bin[i].capacity() < buffer.capacity() => bin[i] = buffer,
                _ => {}
            }
        } else {
            bin.push(buffer);
        }
    });
}

/// Frees all but [`KEEP_BYTES`] of the smallest buffers (at the end of a run).
pub(crate) fn trim() {
    BIN.with_borrow_mut(|bin| {
        bin.sort_unstable_by_key(Vec::capacity);
        let mut kept = 0usize;
        bin.retain(|v| {
            kept = kept.saturating_add(v.capacity() * size_of::<f32>());
            kept <= KEEP_BYTES
        });
    });
}

/// Frees every buffer in the bin.
#[cfg(test)]
fn clear() {
    BIN.with_borrow_mut(Vec::clear);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_smallest_buffer_that_fits() {
        clear();
        give(vec![1.0; 100]);
        give(vec![2.0; 10]);
        give(vec![3.0; 50]);
        let v = take(30);
        assert_eq!(v.len(), 30);
        assert_eq!(v[0], 3.0);
        // Not the 100-long buffer: more than twice as long.
        assert_eq!(take(20), vec![0.0; 20]);
        let w = take(200);
        assert_eq!(w, vec![0.0; 200]);
        assert_eq!(take(60)[0], 1.0);
        // Large values take any buffer that holds them.
        give(vec![4.0; 3 * SMALL]);
        assert_eq!(take(SMALL)[0], 4.0);
        clear();
        assert_eq!(take(5), vec![0.0; 5]);
        give(vec![1.0; KEEP_BYTES / 4 + 1]);
        give(vec![1.0; 7]);
        trim();
        assert_eq!(take(7), vec![1.0; 7]);
        assert_eq!(take(8), vec![0.0; 8]);
    }
}
