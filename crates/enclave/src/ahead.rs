//! Opening layers ahead of the nodes that read them, and wiping spent ones, on
//! rayon's pool.
//!
//! A query's stream hands each layer it received, sealed, to an [`Opener`]; one job
//! on rayon's pool at a time opens the queued layers in order, while the query's
//! thread computes the nodes before them. Keeping to one job bounds the unsealing
//! to one core at a time, so that at one engine thread it takes the second core and
//! at two it never holds both, except when the query waits for the layer it opens:
//! then the query's thread opens the rest, on every core ([`Opener::next`]). At one
//! engine thread the stream also hands it large
//! buffers its nodes are done with ([`Spent`]), to wipe when no layer waits to be
//! opened; [`Opener::settle`] gives them back.
//!
//! On the pool, a job opens or wipes at most [`STEP_BYTES`] and then queues the next
//! one, so that a worker that picks it up while it waits for its share of a node
//! returns within tens of µs (a job that opened whole layers could hold it for a
//! millisecond; MobileNetV2 and ResNet-18 measured the same either way). At one
//! engine thread the job instead stays on its core until the run closes it (see
//! [`Opener::new`]).
//!
//! Not here: which layers to open ahead and when (the stream decides, within its
//! look-ahead and memory budget), and the layers' bytes themselves.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use capsule_format::{TAG_LEN, Unsealer};
use zeroize::Zeroize;

use crate::model::wipe;
use crate::stream::{open_chunks, open_chunks_in_place, values_from_le};

/// A layer to open: where its sealed chunks are, and the buffers for its tensors.
pub(crate) struct Job<L> {
    pub layer: usize,
    pub sealed: Sealed<L>,
    pub buffers: Buffers,
}

/// Where a queued layer's sealed chunks are.
pub(crate) enum Sealed<L> {
    /// Apart from its buffers, back to back (each chunk's ciphertext, then its tag): a
    /// capsule in memory.
    Apart(L),
    /// In its buffers, each chunk's ciphertext where its plaintext goes (read there
    /// from the host's frames, so that the enclave holds no second copy of the layer),
    /// and every chunk's tag here, in order.
    InPlace(Vec<[u8; TAG_LEN]>),
}

impl<L: AsRef<[u8]>> Job<L> {
    /// Opens chunks `chunks` of the layer into its buffers (see [`open_chunks`]).
    fn open(
        &mut self,
        unsealer: &Unsealer,
        chunks: Range<u64>,
        parallel: bool,
    ) -> Result<(), capsule_format::Error> {
        let buffers = &mut self.buffers.0;
        match &self.sealed {
            Sealed::Apart(sealed) => {
                let sealed = sealed.as_ref();
                let step = unsealer.header().chunk_size as usize + TAG_LEN;
                let at = |chunk: u64| chunk_at(sealed, chunk, step);
                let bytes = &sealed[at(chunks.start)..at(chunks.end)];
                open_chunks(unsealer, self.layer, chunks, bytes, buffers, parallel)
            }
            Sealed::InPlace(tags) => {
                open_chunks_in_place(unsealer, self.layer, chunks, tags, buffers, parallel)
            }
        }
    }
}

/// A layer the opener is done with: its buffers (garbage if `result` is an error).
pub(crate) struct Opened {
    pub layer: usize,
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

/// How long [`Opener::next`], off the pool, waits for the job's worker to wake up
/// and begin the layer it waits for, before it opens the layer alone.
const WAKE_WAIT: Duration = Duration::from_micros(100);

/// How long [`Opener::next`] and [`Opener::settle`] poll, off the pool, before they
/// sleep.
const SPIN: Duration = Duration::from_micros(500);

/// Spin-loop hints between two polls (well under a µs), so that the opener is not
/// kept from the lock it reports through.
const POLL_SPINS: usize = 64;

/// Most bytes the opener's job opens (at least one chunk) or wipes in one step, a
/// few tens of µs, before it looks at its queues again (and, on the pool, queues
/// itself anew).
const STEP_BYTES: usize = 256 << 10;

/// A weight tensor's buffer that its query no longer reads, to be wiped and then kept
/// for the next query; wiped when dropped unless taken.
pub(crate) struct Spent {
    pub param: usize,
    pub buffer: Buffers,
}

/// Layers queued to open and layers opened, in the order they were queued; buffers
/// queued to wipe and buffers wiped.
pub(crate) struct Opener<L> {
    state: Mutex<State<L>>,
    ready: Condvar,
    /// Its job waits for more work, up to [`LINGER`], rather than stop.
    linger: bool,
    /// No job: [`Opener::next`] opens each layer and [`Opener::retire`] wipes each
    /// buffer on the query's thread (there is no other core to do it on).
    inline: bool,
}

/// How long an opener's job that lingers waits for more work before it stops.
const LINGER: Duration = Duration::from_millis(1);

/// A layer out of the opener's queue.
enum Ready<L> {
    Opened(Opened),
    /// Handed over, to be opened from this chunk on.
    Handed(Job<L>, u64),
}

struct State<L> {
    /// Layers not yet wholly opened; the first is under way from chunk `next_chunk`
    /// (and out of the queue while `opening`).
    queue: VecDeque<Job<L>>,
    next_chunk: u64,
    opening: bool,
    /// Layers out of the queue, in its order: opened, or handed to [`Opener::next`]
    /// to open the rest of.
    done: VecDeque<Ready<L>>,
    /// Buffers to wipe; the first is wiped up to value `wiped_to` (and out of the
    /// queue while `wiping`).
    spent: VecDeque<Spent>,
    wiped_to: usize,
    wiping: bool,
    wiped: Vec<(usize, Vec<f32>)>,
    /// [`Opener::next`] waits for the first queued layer.
    waited_on: bool,
    /// Layers [`Opener::next`] opened the rest of so far.
    #[cfg(test)]
    handovers: usize,
    /// A job on the pool works through the queues (always so while one is not empty).
    running: bool,
    /// The job is at work on one of the pool's workers, not merely queued for one:
    /// [`Opener::next`] shares a layer with the pool off it only then.
    awake: bool,
    /// [`Opener::close`] was called.
    closed: bool,
}

impl<L: AsRef<[u8]> + Send> Opener<L> {
    /// An opener for a query run on this thread. Off rayon's pool at one engine
    /// thread, its job lingers between layers until [`Opener::close`]: there it
    /// has the other core to itself, and a thread off the pool that queues a job
    /// for a sleeping worker must wake it, which cost 37 µs per layer in this
    /// virtual machine (nine times per MobileNetV2 query). On the pool, a job
    /// that lingered could sit on top of the query's own work, so it stops.
    ///
    /// With one engine thread and rayon's pool no larger (one core, or a CPU quota
    /// or affinity of one), there is no job at all: a job would only take turns
    /// with the query on its core, and the query would spin while waiting for it
    /// (ResNet-18 at 1 thread under `taskset -c 1`, streaming/plain: 1.66-1.70).
    pub fn new() -> Arc<Opener<L>> {
        let alone = capsule_engine::threads() == 1 && rayon::current_thread_index().is_none();
        let inline = alone && rayon::current_num_threads() <= 1;
        Arc::new(Opener {
            linger: alone && !inline,
            inline,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                next_chunk: 0,
                opening: false,
                done: VecDeque::new(),
                spent: VecDeque::new(),
                wiped_to: 0,
                wiping: false,
                wiped: Vec::new(),
                waited_on: false,
                #[cfg(test)]
                handovers: 0,
                running: false,
                awake: false,
                closed: false,
            }),
            ready: Condvar::new(),
        })
    }

    /// Queues `job`, and starts a job on `scope` unless one is running.
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
        if !self.inline {
            self.start(state, unsealer, scope);
        }
    }

    /// Queues `spent` to wipe once no layer waits to be opened, and starts a job on
    /// `scope` unless one is running. [`Opener::settle`] gives the buffers back. Not
    /// for an opener that [runs inline](Opener::inline): it would only wipe them there.
    pub fn retire<'scope>(
        self: &Arc<Self>,
        spent: Vec<Spent>,
        unsealer: &'scope Unsealer,
        scope: &rayon::Scope<'scope>,
    ) where
        L: 'scope,
    {
        let mut state = self.lock();
        state.spent.extend(spent);
        self.start(state, unsealer, scope);
    }

    fn start<'scope>(
        self: &Arc<Self>,
        mut state: MutexGuard<'_, State<L>>,
        unsealer: &'scope Unsealer,
        scope: &rayon::Scope<'scope>,
    ) where
        L: 'scope,
    {
        if !state.running {
            state.running = true;
            let opener = Arc::clone(self);
            scope.spawn(move |scope| opener.step(unsealer, scope));
        }
    }

    /// The next layer opened, in queue order, waiting for it; `None` if nothing is
    /// queued or being opened.
    ///
    /// A layer the job is opening, the job hands over at its next step, and this
    /// thread opens the rest; one the job has not begun, this thread takes. It opens
    /// on every core it can ([`open_chunks`] in parallel): it has nothing else to do,
    /// and one core opened at 4-6 GB/s inside a query here, two at about 9. The job
    /// goes on to the next layers, or helps.
    ///
    /// Off the pool, a job whose worker is still asleep can neither hand over nor help,
    /// so after [`WAKE_WAIT`] this thread takes the layer and opens it alone. A worker
    /// woken for a job took 0.5-1.6 ms to start it in some queries (dwsep3x3 512x14x14
    /// at one thread, Intel Xeon), and a query waited as long. With this (that case,
    /// each query timed alone, two runs of 300-370 queries each way): streaming
    /// queries back to back, mean 0.99 → 0.83-0.84 ms, 90th percentile 1.41-1.46 →
    /// 0.95, 99th 2.55-2.62 → 1.08-1.09; between plain and cached queries (four runs
    /// of 150-170), mean 0.92-1.30 → 0.85-1.02, median 0.86-0.90 → 0.83-0.93.
    pub fn next(&self, unsealer: &Unsealer) -> Option<Opened> {
        let inline = self.inline;
        let on_pool = rayon::current_thread_index().is_some();
        let given_up = Instant::now() + WAKE_WAIT;
        let next = self.wait_for(|state| {
            if inline {
                return Some(
                    state
                        .queue
                        .pop_front()
                        .map(|job| (Ready::Handed(job, 0), false)),
                );
            }
            let next = match state.done.pop_front() {
                Some(ready) => Some(Some((ready, true))),
                None if state.queue.is_empty() && !state.opening => Some(None),
                // Not begun by the job: taken at once from a job awake (it would
                // hand it over at its next step), or after `WAKE_WAIT` from one whose
                // worker has not woken up yet.
                None if !state.opening
                    && (state.awake || on_pool || Instant::now() >= given_up) =>
                {
                    match state.queue.pop_front() {
                        None => None,
                        Some(job) => {
                            let first = std::mem::take(&mut state.next_chunk);
                            #[cfg(test)]
                            {
                                state.handovers += 1;
                            }
                            Some(Some((Ready::Handed(job, first), state.awake || on_pool)))
                        }
                    }
                }
                None => None,
            };
            state.waited_on = next.is_none();
            next
        });
        let (mut job, first, shared) = match next? {
            (Ready::Opened(opened), _) => return Some(opened),
            (Ready::Handed(job, first), shared) => (job, first, shared),
        };
        let count = unsealer.header().chunk_count(job.layer);
        let result = job.open(unsealer, first..count, shared);
        if result.is_ok() {
            values_from_le(&mut job.buffers.0);
        }
        Some(Opened {
            layer: job.layer,
            buffers: job.buffers,
            result,
        })
    }

    /// Wipes the buffers still queued here, on this thread (as the opener's job may
    /// be busy), waits for the one it is wiping, and gives back every wiped buffer
    /// with its param.
    pub fn settle(&self) -> Vec<(usize, Vec<f32>)> {
        loop {
            let spent = self.wait_for(|state| {
                if let Some(spent) = state.spent.pop_front() {
                    // Wiped whole again if the opener's job had begun it.
                    state.wiped_to = 0;
                    Some(Some(spent))
                } else if state.wiping {
                    None
                } else {
                    Some(None)
                }
            });
            let Some(Spent { param, buffer }) = spent else {
                break;
            };
            let mut buffers = buffer.take();
            for buf in &mut buffers {
                wipe(buf);
            }
            let mut state = self.lock();
            state.wiped.extend(buffers.into_iter().map(|b| (param, b)));
        }
        std::mem::take(&mut self.lock().wiped)
    }

    /// Waits until `ready` takes an answer from the state. On one of the pool's
    /// threads it runs the pool's jobs meanwhile (the opener's may be queued behind
    /// them). Off the pool, it polls for up to [`SPIN`] before it sleeps: a thread
    /// woken from a condition variable resumes tens of µs late in a virtual machine,
    /// as much as a small layer's whole wait.
    fn wait_for<T>(&self, mut ready: impl FnMut(&mut State<L>) -> Option<T>) -> T {
        let spin_until = Instant::now() + SPIN;
        let mut state = self.lock();
        loop {
            if let Some(answer) = ready(&mut state) {
                return answer;
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

    /// Opens the next chunks of the first queued layer or, with none queued, wipes
    /// the next part of the first spent buffer: up to [`STEP_BYTES`]. Then queues a
    /// job on `scope` for the rest, or stops when nothing is left.
    fn step<'scope>(self: Arc<Self>, unsealer: &'scope Unsealer, scope: &rayon::Scope<'scope>)
    where
        L: 'scope,
    {
        let _stopped = Stopped(&self);
        let mut idle_since: Option<Instant> = None;
        loop {
            if self.linger {
                // First the query's share of a layer it opens itself.
                rayon::yield_now();
            }
            let mut state = self.lock();
            state.awake = true;
            let mut worked = true;
            if let Some(job) = state.queue.pop_front() {
                let first = state.next_chunk;
                if state.waited_on && state.done.is_empty() {
                    state.next_chunk = 0;
                    state.done.push_back(Ready::Handed(job, first));
                    #[cfg(test)]
                    {
                        state.handovers += 1;
                    }
                } else {
                    state.opening = true;
                    drop(state);
                    state = self.open_step(job, first, unsealer);
                }
            } else if let Some(spent) = state.spent.pop_front() {
                let from = state.wiped_to;
                state.wiping = true;
                drop(state);
                state = self.wipe_step(spent, from);
            } else if self.linger
                && !state.closed
                && idle_since.is_none_or(|since| since.elapsed() < LINGER)
            {
                // Waits for the query's next layer here, rather than have the
                // query's thread wake a worker for it.
                drop(state);
                idle_since.get_or_insert_with(Instant::now);
                for _ in 0..POLL_SPINS {
                    std::hint::spin_loop();
                }
                continue;
            } else {
                worked = false;
            }
            idle_since = None;
            let more = !state.queue.is_empty() || !state.spent.is_empty();
            let stay = more || (self.linger && worked && !state.closed);
            state.running = stay;
            state.awake = stay && self.linger;
            drop(state);
            self.ready.notify_all();
            if self.linger && stay {
                continue;
            }
            if more {
                let opener = Arc::clone(&self);
                scope.spawn(move |scope| opener.step(unsealer, scope));
            }
            return;
        }
    }

    /// Tells a lingering job (see [`Opener::new`]) that nothing more will come: it
    /// stops once the queues are empty.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Opens chunks of `job` from chunk `first` on, and puts it back at the front of
    /// the queue, or among the opened layers when it is done.
    fn open_step(
        &self,
        mut job: Job<L>,
        first: u64,
        unsealer: &Unsealer,
    ) -> MutexGuard<'_, State<L>> {
        let header = unsealer.header();
        let count = header.chunk_count(job.layer);
        let sealed_chunk = header.chunk_size as usize + TAG_LEN;
        let last = first
            .saturating_add((STEP_BYTES / sealed_chunk).max(1) as u64)
            .min(count);
        let result = job.open(unsealer, first..last, false);
        let finished = result.is_err() || last == count;
        if finished && result.is_ok() {
            values_from_le(&mut job.buffers.0);
        }
        let mut state = self.lock();
        state.opening = false;
        if finished {
            state.next_chunk = 0;
            state.done.push_back(Ready::Opened(Opened {
                layer: job.layer,
                buffers: job.buffers,
                result,
            }));
        } else {
            state.next_chunk = last;
            state.queue.push_front(job);
        }
        state
    }

    /// Wipes the values of `spent` from `from` on, up to [`STEP_BYTES`], and puts it
    /// back at the front of its queue, or among the wiped buffers when it is done.
    fn wipe_step(&self, mut spent: Spent, from: usize) -> MutexGuard<'_, State<L>> {
        let total: usize = spent.buffer.0.iter().map(Vec::len).sum();
        let to = from.saturating_add(STEP_BYTES / 4).min(total);
        let mut start = 0;
        for buf in &mut spent.buffer.0 {
            let end = start + buf.len();
            let (a, b) = (from.max(start), to.min(end));
            if a < b {
                wipe(&mut buf[a - start..b - start]);
            }
            start = end;
        }
        let mut state = self.lock();
        state.wiping = false;
        if to == total {
            state.wiped_to = 0;
            let param = spent.param;
            let buffers = spent.buffer.take();
            state.wiped.extend(buffers.into_iter().map(|b| (param, b)));
        } else {
            state.wiped_to = to;
            state.spent.push_front(spent);
        }
        state
    }

    /// Whether this opener has no job (see [`Opener::new`]): layers open, and buffers
    /// are best wiped, on the query's thread, when it gets to them.
    pub fn inline(&self) -> bool {
        self.inline
    }

    /// How many layers [`Opener::next`] opened the rest of on its own thread (handed
    /// over by the job, or taken before it began them).
    #[cfg(test)]
    pub fn handovers(&self) -> usize {
        self.lock().handovers
    }

    fn lock(&self) -> MutexGuard<'_, State<L>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Marks the opener stopped if its job panics, so that [`Opener::next`] and
/// [`Opener::settle`] do not wait for work that will never be done. What was queued
/// is wiped as it is dropped.
struct Stopped<'o, L>(&'o Opener<L>);

impl<L> Drop for Stopped<'_, L> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.running = false;
            state.awake = false;
            state.opening = false;
            state.wiping = false;
            state.queue.clear();
            state.spent.clear();
            drop(state);
            self.0.ready.notify_all();
        }
    }
}

/// Where chunk `chunk` starts in a layer's sealed bytes `sealed`, chunks of
/// `sealed_chunk` bytes back to back (the end, past the last).
fn chunk_at(sealed: &[u8], chunk: u64, sealed_chunk: usize) -> usize {
    usize::try_from(chunk)
        .map_or(sealed.len(), |c| c.saturating_mul(sealed_chunk))
        .min(sealed.len())
}
