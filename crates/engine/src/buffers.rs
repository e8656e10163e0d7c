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

/// Most buffers the bin holds. With 8, MobileNetV2's runs still zeroed fresh
/// or lengthened buffers for some Conv outputs: `memset` was 1.9 % of a
/// one-thread run's samples (perf), 0.8 % with 32. Peak resident memory did
/// not move (VGG-16 1.506 GB, ResNet-18 at batch 8 166-169 MB, plain runs of
/// `mlcapsule bench`): the bin holds only what the run has freed.
const CAPACITY: usize = 32;

/// Most bytes the bin keeps between runs: a batch of 8 through
/// MobileNetV2 or ResNet-18, two intermediates of VGG-16's.
const KEEP_BYTES: usize = 256 << 20;

thread_local! {
    static BIN: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` values whose contents are unspecified (zeros, or an
/// earlier value of this run): the caller must overwrite every element.
///
/// Takes the binned buffer whose length is closest to `len`, among those
/// that can hold it and are at most twice as large; else allocates. A
/// buffer cut short for a smaller value must be zeroed back to length when
/// a larger one takes it (safe code cannot reuse the cut-off values): that
/// refilling was 4.4 % of MobileNetV2's time, 2.7 % later. Taking the
/// closest length, rather than the shortest one long enough, keeps a run's
/// buffers from trading lengths: until this rule, MobileNetV2's largest
/// intermediate (96x112x112) was cut to 32x112x112 by an early node and
/// refilled, 3.2 MB of zeros, on every query (0.16 ms of its 5.5 at two
/// threads). Cutting large buffers for small values without the twice-as-
/// large limit did not lower VGG-16's peak resident memory either (1.506 GB
/// both ways, `mlcapsule bench --model vgg16.onnx --plain-only`).
pub(crate) fn take(len: usize) -> Vec<f32> {
    let reused = BIN.with_borrow_mut(|bin| {
        let fits = |v: &Vec<f32>| v.capacity() >= len && v.capacity() / 2 <= len;
        let best = bin
            .iter()
            .enumerate()
            .filter(|(_, v)| fits(v))
            .min_by_key(|(_, v)| (v.len().abs_diff(len), v.len() < len))
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
    fn takes_the_closest_buffer_that_fits() {
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
        clear();
        // The closest length, not the shortest one that is long enough: the
        // 90-long buffer is refilled rather than the 190-long one cut short.
        give(vec![5.0; 190]);
        let mut cut = vec![6.0; 200];
        cut.truncate(90);
        give(cut);
        let v = take(100);
        assert_eq!((v[0], v[89], v[90]), (6.0, 6.0, 0.0));
        assert_eq!(take(190), vec![5.0; 190]);
        clear();
        assert_eq!(take(5), vec![0.0; 5]);
        give(vec![1.0; KEEP_BYTES / 4 + 1]);
        give(vec![1.0; 7]);
        trim();
        assert_eq!(take(7), vec![1.0; 7]);
        assert_eq!(take(8), vec![0.0; 8]);
    }
}
