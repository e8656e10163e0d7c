//! How many threads the kernels use: one process-wide knob.
//!
//! All parallel work (rayon tasks over batch items, channel planes or image
//! panels, and the GEMM's own splitting) runs on rayon's global pool and is
//! cut into at most [`threads`] pieces at a time, so a count of 2 on a
//! 2-core machine never has more than 2 busy threads: the GEMM and the
//! loops around it share one pool instead of competing. With a count of 1
//! every kernel runs on the calling thread; with more, a whole run moves to
//! the pool ([`as_team`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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

/// Runs `f` (a whole model run) on one of rayon's workers while
/// [`threads`]` - 1` others stay awake for its parallel work, and returns
/// what it returns.
///
/// Without this, every parallel region of a run (a few hundred per query
/// on MobileNetV2, many of them 50-200 µs long) wakes a sleeping worker and
/// then the blocked caller: two thread wake-ups per region, each tens of µs
/// in a virtual machine (and up to milliseconds, measured here, for the
/// first one after a pause), which ate most of what the second thread
/// gained. Here the run's own thread is a worker, so it splits work without
/// waking anyone, and each helper ([`help`]) loops on [`rayon::yield_now`],
/// which takes pending work (a region's other half, a layer to unseal) as
/// soon as it is queued. Like onnxruntime's spinning thread pool, helpers
/// keep their cores busy while there is work and for [`LINGER`] after
/// (so back-to-back queries find them awake), yielding the CPU to the OS
/// on every idle turn.
///
/// Runs `f` right here when one thread is allowed, when already on one of
/// rayon's workers (a run inside parallel work has its helpers already), or
/// when `pace` says this plan's runs are quicker here (see [`Pace`]).
pub(crate) fn as_team<R: Send>(pace: &Pace, f: impl FnOnce() -> R + Send) -> R {
    let helpers = threads() - 1;
    if helpers == 0 || rayon::current_thread_index().is_some() {
        return f();
    }
    let start = Instant::now();
    let here = pace.here();
    let result = if here {
        f()
    } else {
        rayon::scope(|_| {
            let _running = Running::enter();
            // A helper that took this run up is not helping it.
            recruit(helpers + usize::from(HELPING.get()));
            f()
        })
    };
    pace.record(here, start.elapsed());
    result
}

/// Runs that took less than this on the pool stay on the calling thread next
/// time: moving a run onto the pool and back costs its caller a wake-up (30-40
/// µs measured here), more than so short a run can gain from a second thread.
const QUICK: Duration = Duration::from_micros(100);

/// Runs that took less than this on the pool are also tried once on the
/// calling thread, and then run where they last went quicker: a run of
/// 100-500 µs may or may not gain more from a second thread than its two
/// wake-ups cost (a streamed 512x512 dense layer took 112 µs on the caller's
/// thread and 167 µs on the pool's two; a plain 1024x1024 one 173 and 100).
/// Longer runs always go to the pool.
const PROBE: Duration = Duration::from_micros(500);

/// Where a plan's runs go quicker (see [`as_team`]): the last time a run of
/// it took on the caller's thread and on the pool, in µs (0 until measured).
/// A plan keeps one.
#[derive(Debug, Default)]
pub(crate) struct Pace {
    here: AtomicU64,
    team: AtomicU64,
}

impl Pace {
    /// Whether the next run should stay on the calling thread.
    fn here(&self) -> bool {
        let here = self.here.load(Ordering::Relaxed);
        let team = self.team.load(Ordering::Relaxed);
        let (quick, probe) = (micros(QUICK), micros(PROBE));
        team != 0 && (team < quick || (team < probe && (here == 0 || here <= team)))
    }

    fn record(&self, here: bool, took: Duration) {
        let slot = if here { &self.here } else { &self.team };
        slot.store(micros(took).max(1), Ordering::Relaxed);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Clone for Pace {
    fn clone(&self) -> Pace {
        Pace {
            here: AtomicU64::new(self.here.load(Ordering::Relaxed)),
            team: AtomicU64::new(self.team.load(Ordering::Relaxed)),
        }
    }
}

/// How long a helper stays after the last work it found.
const LINGER: Duration = Duration::from_millis(1);

/// Helpers started and not yet gone.
static HELPERS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread is in a model run started by [`as_team`].
    static RUNNING: Cell<bool> = const { Cell::new(false) };
    /// This thread is in [`help`].
    static HELPING: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as in a model run until dropped.
struct Running(bool);

impl Running {
    fn enter() -> Running {
        Running(RUNNING.replace(true))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.set(self.0);
    }
}

/// Starts helpers until `helpers` are about.
fn recruit(helpers: usize) {
    let mut about = HELPERS.load(Ordering::Acquire);
    while about < helpers {
        match HELPERS.compare_exchange_weak(about, about + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                rayon::spawn(help);
                about += 1;
            }
            Err(now) => about = now,
        }
    }
}

/// A helper: runs the pool's pending work until it has found none for
/// [`LINGER`].
///
/// A worker that waits for work it shared may pick up a queued helper and
/// run it on top of what it waits in, resuming only when the helper
/// returns. So a helper never waits for a run to end (that run could be
/// the one below it), only for idleness, and one that lands on a run's own
/// thread, or on a helper's, returns at once.
fn help() {
    if !RUNNING.get() && !HELPING.replace(true) {
        let mut last_work = Instant::now();
        loop {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => last_work = Instant::now(),
                _ if last_work.elapsed() >= LINGER => break,
                _ => std::thread::yield_now(),
            }
        }
        HELPING.set(false);
    }
    HELPERS.fetch_sub(1, Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_runs_go_where_they_last_went_quicker() {
        let us = Duration::from_micros;
        let pace = Pace::default();
        assert!(!pace.here(), "the first run goes to the pool");
        pace.record(false, us(300));
        assert!(pace.here(), "a 300 µs run is tried on the caller's thread");
        pace.record(true, us(200));
        assert!(pace.here(), "and stays there while quicker");
        pace.record(true, us(400));
        assert!(
            !pace.here(),
            "back to the pool once slower than it was there"
        );
        pace.record(false, us(50));
        assert!(pace.here(), "a quick run stays on the caller's thread");
        pace.record(false, us(600));
        assert!(!pace.here(), "a long run always goes to the pool");
    }

    #[test]
    fn a_team_run_returns_its_value_and_passes_on_a_panic() {
        set_threads(2);
        let pace = Pace::default();
        let sum = as_team(&pace, || (0..10_000u64).into_par_iter().sum::<u64>());
        assert_eq!(sum, 49_995_000);
        let panicked = std::panic::catch_unwind(|| as_team(&pace, || panic!("a kernel bug")));
        assert!(panicked.is_err());
        assert_eq!(
            as_team(&pace, || (0..100u64).into_par_iter().sum::<u64>()),
            4950
        );
    }
}
