//! Opening layers ahead of the nodes that read them, on rayon's pool.
//!
//! A query's stream hands each layer it received, sealed, to an [`Opener`]; one job
//! on rayon's pool at a time opens the queued layers in order, while the query's
//! thread computes the nodes before them. Keeping to one job bounds the unsealing
//! to one core at a time, so that at one engine thread it takes the second core and
//! at two it never holds both.
//!
//! Not here: which layers to open ahead and when (the stream decides, within its
//! look-ahead and memory budget), and the layers' bytes themselves.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use capsule_format::Unsealer;
use zeroize::Zeroize;

use crate::stream::open_whole;

/// A layer to open: its sealed chunks back to back, and the buffers for its tensors.
pub(crate) struct Job<L> {
    pub layer: usize,
    pub sealed: L,
    pub buffers: Buffers,
}

/// A layer the opener is done with: its buffers (garbage if `result` is an error)
/// and the sealed bytes they came from.
pub(crate) struct Opened<L> {
    pub layer: usize,
    pub sealed: L,
    pub buffers: Buffers,
    pub result: Result<(), capsule_format::Error>,
}

/// A layer's tensor buffers, in plaintext order, wiped when dropped unless taken (so
/// that a query abandoned mid-way leaves no plaintext behind).
pub(crate) struct Buffers(pub Vec<Vec<f32>>);

impl Buffers {
    pub fn take(mut self) -> Vec<Vec<f32>> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        for buffer in &mut self.0 {
            buffer.zeroize();
        }
    }
}

/// How long [`Opener::next`] polls, off the pool, before it sleeps.
const SPIN: Duration = Duration::from_micros(500);

/// Spin-loop hints between two polls of [`Opener::next`] (well under a µs), so
/// that the opener is not kept from the lock it reports through.
const POLL_SPINS: usize = 64;

/// Layers queued to open and layers opened, in the order they were queued.
pub(crate) struct Opener<L> {
    state: Mutex<State<L>>,
    ready: Condvar,
}

struct State<L> {
    queue: VecDeque<Job<L>>,
    done: VecDeque<Opened<L>>,
    /// A job on the pool is opening the queue (always so while it is not empty).
    running: bool,
}

impl<L: AsRef<[u8]> + Send> Opener<L> {
    pub fn new() -> Arc<Opener<L>> {
        Arc::new(Opener {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                done: VecDeque::new(),
                running: false,
            }),
            ready: Condvar::new(),
        })
    }

    /// Queues `job`, and starts a job on `scope` to open it unless one is running.
    pub fn push<'scope>(
        self: &Arc<Self>,
        job: Job<L>,
        unsealer: &'scope Unsealer,
        scope: &rayon::Scope<'scope>,
    ) where
        L: 'scope,
    {
        let mut state = self.lock();
        state.queue.push_back(job);
        if !state.running {
            state.running = true;
            let opener = Arc::clone(self);
            scope.spawn(move |_| opener.work(unsealer));
        }
    }

    /// The next layer opened, in queue order, waiting for it (and running the pool's
    /// jobs meanwhile when called on one of its threads, as the opening job may be
    /// queued behind them); `None` if nothing is queued or being opened.
    ///
    /// Off the pool, it polls for up to [`SPIN`] before it sleeps: a thread woken
    /// from a condition variable resumes tens of µs late in a virtual machine,
    /// as much as a small layer's whole wait.
    pub fn next(&self) -> Option<Opened<L>> {
        let spin_until = Instant::now() + SPIN;
        let mut state = self.lock();
        loop {
            if let Some(opened) = state.done.pop_front() {
                return Some(opened);
            }
            if !state.running {
                return None;
            }
            if rayon::current_thread_index().is_some() {
                drop(state);
                if let Some(rayon::Yield::Idle) = rayon::yield_now() {
                    std::thread::yield_now();
                }
                state = self.lock();
            } else if Instant::now() < spin_until {
                drop(state);
                for _ in 0..POLL_SPINS {
                    std::hint::spin_loop();
                }
                state = self.lock();
            } else {
                state = self
                    .ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// Opens the queued layers one by one until the queue is empty.
    fn work(&self, unsealer: &Unsealer) {
        let _stopped = Stopped(self);
        loop {
            let mut job = {
                let mut state = self.lock();
                match state.queue.pop_front() {
                    Some(job) => job,
                    None => {
                        state.running = false;
                        drop(state);
                        self.ready.notify_all();
                        return;
                    }
                }
            };
            let chunks = 0..unsealer.header().chunk_count(job.layer);
            let result = open_whole(
                unsealer,
                job.layer,
                chunks,
                job.sealed.as_ref(),
                &mut job.buffers.0,
                false,
            );
            self.lock().done.push_back(Opened {
                layer: job.layer,
                sealed: job.sealed,
                buffers: job.buffers,
                result,
            });
            self.ready.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<L>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Marks the opener stopped if its job panics, so that [`Opener::next`] does not wait
/// for layers that will never come.
struct Stopped<'o, L>(&'o Opener<L>);

impl<L> Drop for Stopped<'_, L> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.running = false;
            state.queue.clear();
            drop(state);
            self.0.ready.notify_all();
        }
    }
}
