//! How many threads the kernels use: one process-wide knob.
//!
//! All parallel work (rayon tasks over batch items, channel planes or image
//! panels, and the GEMM's own splitting) runs on rayon's global pool and is
//! cut into at most [`threads`] pieces at a time, so a count of 2 on a
//! 2-core machine never has more than 2 busy threads: the GEMM and the
//! loops around it share one pool instead of competing. With a count of 1
//! every kernel runs on the calling thread.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

/// 0 until [`set_threads`] is called: then rayon's default (the cores).
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Makes every later model run use `n` threads (at least 1).
///
/// The first call also sizes rayon's global pool, when nothing has used
/// rayon yet, to `n` or the number of cores, whichever is larger, so that
/// later calls can move between 1 thread and the cores in one process.
/// The count never exceeds the pool's size.
///
/// ```
/// capsule_engine::set_threads(1);
/// assert_eq!(capsule_engine::threads(), 1);
/// ```
pub fn set_threads(n: usize) {
    let n = n.max(1);
    // Fails when the pool already exists; the count below still applies.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(cores))
        .build_global();
    THREADS.store(
        n.min(rayon::current_num_threads().max(1)),
        Ordering::Relaxed,
    );
}

/// The number of threads kernels use: what [`set_threads`] set, else
/// the size of rayon's pool (by default the number of cores).
#[must_use]
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => rayon::current_num_threads().max(1),
        n => n,
    }
}

/// Calls `f(scratch, index, chunk)` on every `size`-long chunk of `data`
/// (the last may be shorter), in parallel when more than one thread is
/// allowed, with one `scratch` per worker made by `init`.
pub(crate) fn for_each_chunk<T, S, I, F>(data: &mut [T], size: usize, init: I, f: F)
where
    T: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, usize, &mut [T]) + Sync + Send,
{
    let size = size.max(1);
    if threads() <= 1 || data.len() <= size {
        let mut scratch = init();
        for (i, chunk) in data.chunks_mut(size).enumerate() {
            f(&mut scratch, i, chunk);
        }
    } else {
        data.par_chunks_mut(size)
            .enumerate()
            .for_each_init(init, |scratch, (i, chunk)| f(scratch, i, chunk));
    }
}

/// `f(task)` for every task, in parallel when more than one thread is
/// allowed.
pub(crate) fn for_each_task<T, F>(tasks: Vec<T>, f: F)
where
    T: Send,
    F: Fn(T) + Sync + Send,
{
    if threads() <= 1 || tasks.len() <= 1 {
        tasks.into_iter().for_each(f);
    } else {
        tasks.into_par_iter().for_each(f);
    }
}

/// `f(i)` for every `i` in `0..n`, collected in order, in parallel when
/// more than one thread is allowed.
pub(crate) fn map_range<R, F>(n: usize, f: F) -> Vec<R>
where
    R: Send,
    F: Fn(usize) -> R + Sync + Send,
{
    if threads() <= 1 {
        (0..n).map(f).collect()
    } else {
        (0..n).into_par_iter().map(f).collect()
    }
}
