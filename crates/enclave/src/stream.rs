//! The paper's "MLCapsule layer" (`spec/enclave-protocol.md` §5.6): during a
//! query the host streams every layer's sealed chunks, and the enclave unseals
//! each layer just before the first node that reads it, and zeroizes it
//! right after the last one has.
//!
//! [`LayerStream`] is the engine's [`WeightSource`] for one query: its
//! `prepare` hook pulls chunks until the layers the next node reads are
//! there, its `release` hook evicts the layers no later node reads. So at any
//! time only the layers in use are in plaintext, in the enclave's own
//! zeroizing buffers ([`Weights`]), which it reuses from query to query.
//!
//! Chunks are independent AEAD messages: they are opened a group at a time,
//! in parallel, each straight into the tensor it belongs to, with no conversion
//! pass. From a capsule in memory they are decrypted out of place (no copy of the
//! ciphertext). A layer read from the host's frames ahead of its node is read
//! into its own buffers, each chunk's ciphertext where its plaintext goes, and
//! decrypted there in place: the enclave holds no second, sealed copy of it. A
//! dense layer that only one Gemm reads is never whole in memory: each opened
//! chunk's rows of B are multiplied into the output at once, in a per-thread
//! buffer that is wiped when the thread's run of chunks is done ([`StreamedGemm`]).
//!
//! The chunks come from a [`Feed`]: the host's `Layer` frames in the
//! enclave ([`FrameFeed`]), or a capsule in memory for the provider's
//! benchmarks ([`MemoryFeed`]); everything after the feed is the same code.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::io::Read;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use capsule_engine::{Node, ParamInfo, StreamedGemm, Tensor, WeightSource};
use capsule_format::{Capsule, TAG_LEN, Unsealer};
use rayon::prelude::*;
use zeroize::Zeroizing;

use crate::ahead::{Buffers, Job, Opener, Sealed, Spent};
use crate::error::Error;
use crate::model::{
    Layout, SHARE_MIN_PIECES, Weights, alone_off_pool, on_team, share_with_worker, wipe,
};
use crate::protocol::{Frame, FrameReader, LayerChunk, MessageType, ReadError};

/// Most plaintext bytes of layers opened ahead of the node that reads them, when
/// there is no memory budget (there is always room for the next layer). Enough
/// for all of ResNet-18 (44.7 MB), whose last, largest layers then open while
/// the first nodes run: streaming/plain at 2 threads 1.41-1.42 with 16 MiB,
/// 1.35-1.36 with 32, 1.29-1.34 with 64 and 128 (EPYC Zen 2, alternated runs).
/// MobileNetV2 fits in any of them; VGG-16 and dense 4096x4096 are bound by
/// opening and did not move. A caller short of memory sets a budget.
const LOOKAHEAD: u64 = 64 << 20;

/// Sealed bytes the enclave reads from the host's frames at once when it opens a layer
/// as its node needs it (a dense layer chunk by chunk, above all), before it opens
/// them. Reading twice the pipe's 1 MiB keeps the host's writes and the enclave's
/// reads going at once: VGG-16's 411 MB layer through a real enclave, `mlcapsule
/// run` median 690-770 ms with one chunk per thread (512 KiB), as much with 1 MiB,
/// 620-655 with 2 MiB, and no less with 4 (alternated runs, EPYC Zen 2).
const FRAME_READ_BYTES: u64 = 2 << 20;

/// Rows of an opened dense layer's B one task takes when the layer runs on
/// several threads (as the engine's own row-dot kernel splits its work).
const CACHED_BLOCK_ROWS: usize = 64;

/// How a streamed dense layer at `threads` engine threads spreads its chunks: over how
/// many scratch buffers (threads at once), and into how many runs of consecutive chunks
/// at most. On the team, each thread takes one run. Off the pool (a query at one engine
/// thread, or one quick enough to stay on its caller's thread), the caller shares twice
/// as many runs as there are buffers with one of the pool's workers (when there is one),
/// so that a worker that wakes up late still takes its half.
pub(crate) fn dense_lanes(threads: usize) -> (usize, usize) {
    let lanes = match threads {
        0 | 1 if rayon::current_num_threads() > 1 => 2,
        0 | 1 => 1,
        n => n,
    };
    (lanes, 2 * lanes)
}

/// Why a query's layer stream stopped.
pub(crate) enum StreamFailure {
    /// The host closed the pipe or it failed: nobody is left to answer.
    Gone,
    /// The host broke the protocol: report, then exit.
    Broken(Error),
    /// A layer did not authenticate: report, and serve on (the stream was drained).
    Rejected(Error),
}

/// Where a query's sealed chunks come from, in capsule order. `Send`: the engine runs
/// a query on one of rayon's workers when it has more than one thread.
pub(crate) trait Feed: Send {
    /// How many chunks of `chunk_size` bytes of a whole layer to take at once on
    /// `threads` threads: their sealed bytes are held together.
    fn group(&self, threads: usize, chunk_size: u64) -> u64;

    /// The sealed bytes of chunks `chunks` of layer `layer`, back to back (capsule-v1
    /// §4.4). With `keep` false the caller does not need them (they may be skipped).
    fn chunks<'s>(
        &'s mut self,
        header: &capsule_format::Header,
        layer: usize,
        chunks: Range<u64>,
        keep: bool,
        buf: &'s mut Vec<u8>,
    ) -> Result<Option<&'s [u8]>, StreamFailure>;

    /// A whole layer's sealed bytes apart from its buffers, which another thread may
    /// open while the feed goes on.
    type Layer: AsRef<[u8]> + Send;

    /// Every chunk of layer `layer`, to open on another thread: borrowed from something
    /// that outlives the feed, or read into `buffers` (the layer's tensors in plaintext
    /// order, which it exactly fills), each chunk's ciphertext where its plaintext goes.
    fn layer(
        &mut self,
        header: &capsule_format::Header,
        layer: usize,
        buffers: &mut [Vec<f32>],
    ) -> Result<Sealed<Self::Layer>, StreamFailure>;
}

/// The host's `Layer` frames (enclave-protocol §5.6), checked one by one.
pub(crate) struct FrameFeed<'a, R> {
    frames: &'a mut FrameReader<R>,
}

impl<'a, R> FrameFeed<'a, R> {
    pub fn new(frames: &'a mut FrameReader<R>) -> FrameFeed<'a, R> {
        FrameFeed { frames }
    }
}

impl<R: Read> FrameFeed<'_, R> {
    /// Reads the head of the next frame, which must be chunk `chunk` of layer `layer`
    /// with `plain` bytes of ciphertext and a tag, and leaves its blob to read.
    fn next_chunk(&mut self, layer: usize, chunk: u64, plain: u64) -> Result<(), StreamFailure> {
        let (frame, blob_len) = self.frames.read_head().map_err(read_failure)?;
        check_chunk_frame(&frame, layer, chunk, blob_len, plain)
    }
}

/// What a failed read of the host's frames means for the stream.
fn read_failure(e: ReadError) -> StreamFailure {
    match e {
        ReadError::Closed | ReadError::Io(_) => StreamFailure::Gone,
        ReadError::Malformed(e) => StreamFailure::Broken(e),
    }
}

/// Checks that `frame`, with a blob of `blob_len` bytes, is chunk `chunk` of layer
/// `layer`, of `plain` plaintext bytes (§5.6).
fn check_chunk_frame(
    frame: &Frame<'_>,
    layer: usize,
    chunk: u64,
    blob_len: usize,
    plain: u64,
) -> Result<(), StreamFailure> {
    let broken = |reason: String| StreamFailure::Broken(Error::Protocol { reason });
    if frame.kind != MessageType::Layer {
        return Err(broken(format!(
            "expected a Layer frame (layer {layer}, chunk {chunk}), got {:?}",
            frame.kind
        )));
    }
    let at: LayerChunk = frame.json_part().map_err(StreamFailure::Broken)?;
    if u64::from(at.layer) != layer as u64 || at.chunk != chunk {
        return Err(broken(format!(
            "expected layer {layer} chunk {chunk}, got layer {} chunk {}",
            at.layer, at.chunk
        )));
    }
    let expected_len = plain + TAG_LEN as u64;
    if blob_len as u64 != expected_len {
        return Err(broken(format!(
            "layer {layer} chunk {chunk} must be {expected_len} bytes, got {blob_len}"
        )));
    }
    Ok(())
}

impl<R: Read + Send> Feed for FrameFeed<'_, R> {
    /// Never built: frames are read into the layer's buffers.
    type Layer = &'static [u8];

    /// At least one chunk per thread, and [`FRAME_READ_BYTES`] at a time.
    fn group(&self, threads: usize, chunk_size: u64) -> u64 {
        (FRAME_READ_BYTES / chunk_size.max(1)).max(threads.max(1) as u64)
    }

    fn layer(
        &mut self,
        header: &capsule_format::Header,
        layer: usize,
        buffers: &mut [Vec<f32>],
    ) -> Result<Sealed<&'static [u8]>, StreamFailure> {
        let spans: Vec<(u64, Range<u64>)> = (0..header.chunk_count(layer))
            .map(|c| (c, header.chunk_span(layer, c)))
            .collect();
        let mut tags = Vec::with_capacity(spans.len());
        for ((chunk, span), (_, parts)) in spans.iter().zip(split_targets(buffers, &spans)) {
            let plain = span.end - span.start;
            self.next_chunk(layer, *chunk, plain)?;
            if parts.iter().map(|p| p.len() as u64).sum::<u64>() != plain {
                return Err(StreamFailure::Broken(Error::Internal {
                    reason: format!("layer {layer}'s tensors do not hold its chunk {chunk}"),
                }));
            }
            for part in parts {
                self.frames.read_blob(part).map_err(read_failure)?;
            }
            let mut tag = [0u8; TAG_LEN];
            self.frames.read_blob(&mut tag).map_err(read_failure)?;
            tags.push(tag);
        }
        Ok(Sealed::InPlace(tags))
    }

    fn chunks<'s>(
        &'s mut self,
        header: &capsule_format::Header,
        layer: usize,
        chunks: Range<u64>,
        keep: bool,
        buf: &'s mut Vec<u8>,
    ) -> Result<Option<&'s [u8]>, StreamFailure> {
        buf.clear();
        for chunk in chunks {
            let span = header.chunk_span(layer, chunk);
            // A kept chunk's bytes go from the pipe straight to the end of `buf`.
            let before = buf.len();
            let read = if keep {
                self.frames.read_appending(buf)
            } else {
                self.frames.read()
            };
            let frame = read.map_err(read_failure)?;
            let blob_len = if keep {
                buf.len() - before
            } else {
                frame.blob.len()
            };
            check_chunk_frame(&frame, layer, chunk, blob_len, span.end - span.start)?;
        }
        Ok(keep.then_some(buf.as_slice()))
    }
}

/// A capsule in memory: every chunk is already there.
pub(crate) struct MemoryFeed<'c> {
    capsule: &'c Capsule<'c>,
}

impl<'c> MemoryFeed<'c> {
    pub fn new(capsule: &'c Capsule<'c>) -> MemoryFeed<'c> {
        MemoryFeed { capsule }
    }
}

impl<'c> Feed for MemoryFeed<'c> {
    type Layer = &'c [u8];

    fn group(&self, _threads: usize, _chunk_size: u64) -> u64 {
        u64::MAX
    }

    fn layer(
        &mut self,
        _header: &capsule_format::Header,
        layer: usize,
        _buffers: &mut [Vec<f32>],
    ) -> Result<Sealed<&'c [u8]>, StreamFailure> {
        Ok(Sealed::Apart(self.capsule.sealed_layer(layer)))
    }

    fn chunks<'s>(
        &'s mut self,
        header: &capsule_format::Header,
        layer: usize,
        chunks: Range<u64>,
        keep: bool,
        _buf: &'s mut Vec<u8>,
    ) -> Result<Option<&'s [u8]>, StreamFailure> {
        if !keep {
            return Ok(None);
        }
        let sealed = self.capsule.sealed_layer(layer);
        let step = header.chunk_size as usize + TAG_LEN;
        let start = (chunks.start as usize)
            .saturating_mul(step)
            .min(sealed.len());
        let end = (chunks.end as usize).saturating_mul(step).min(sealed.len());
        Ok(Some(&sealed[start..end]))
    }
}

/// The weights of one query, pulled from a [`Feed`] layer by layer.
///
/// A stream covers a range of the capsule's layers: all of them, or the input detector's
/// (the first ones, capsule-v1 §4.6) and then the model's, one stream after the other.
pub(crate) struct LayerStream<'a, F: Feed> {
    feed: F,
    unsealer: &'a Unsealer,
    layout: &'a Layout,
    weights: &'a mut Weights,
    /// Per layer: computed chunk by chunk by its dense node in this query.
    streamed: Vec<bool>,
    /// Layers fully received (the next one expected is this index).
    received: usize,
    /// One past the last layer of this stream.
    end: usize,
    /// Index of the node about to run or running.
    node: usize,
    failure: Option<StreamFailure>,
    /// Opens received layers in the background, ahead of the nodes that read them.
    opener: Arc<Opener<F::Layer>>,
    /// The layers handed to the opener and not installed yet, in order, with their
    /// plaintext sizes.
    ahead: VecDeque<(usize, u64)>,
    /// The sum of `ahead`'s sizes.
    ahead_bytes: u64,
    /// The weight memory budget, which layers opened ahead must fit in too.
    budget: Option<u64>,
}

impl<'a, F: Feed> LayerStream<'a, F> {
    /// A stream of layers `layers` of the capsule `unsealer` opens, whose weights
    /// `layout` reads (it must read none outside the range), into `weights`; the layers
    /// `streamed` says (from [`Layout::query_plan`]) are computed chunk by chunk. The
    /// feed gives the range's first layer next. A layer is opened ahead, while the
    /// nodes before it compute, only when it fits in `budget` beside the layers in use.
    pub fn new(
        feed: F,
        unsealer: &'a Unsealer,
        layout: &'a Layout,
        layers: Range<usize>,
        weights: &'a mut Weights,
        streamed: Vec<bool>,
        budget: Option<u64>,
    ) -> LayerStream<'a, F> {
        LayerStream {
            feed,
            unsealer,
            layout,
            weights,
            streamed,
            received: layers.start,
            end: layers.end,
            node: 0,
            failure: None,
            opener: Opener::new(),
            ahead: VecDeque::new(),
            ahead_bytes: 0,
            budget,
        }
    }

    /// Runs the layout's graph on `inputs` with this stream's weights.
    ///
    /// While a node computes, the next layers are opened on rayon's pool (on another
    /// core when the engine runs on one thread), so that unsealing overlaps compute.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, capsule_engine::Error> {
        let layout = self.layout;
        rayon::in_place_scope(|scope| {
            let mut piped = Piped {
                stream: self,
                scope,
            };
            let result = if piped.stream.streamed.iter().any(|&s| s) {
                layout
                    .staged()
                    .run(inputs, &mut piped, &mut |j, operands, piped| {
                        let a = operands.first().ok_or_else(stream_failed)?;
                        piped.stream.dense(j, a)
                    })
            } else {
                layout.plan().run(inputs, &mut piped)
            };
            // The weights released during the run, wiped.
            for (param, buf) in piped.stream.opener.settle() {
                piped.stream.weights.keep(param, buf);
            }
            piped.stream.opener.close();
            result
        })
    }

    /// Reads the rest of the stream (every layer must be sent, whatever
    /// happened), zeroizes what is left, and says whether it all went well.
    pub fn finish(mut self) -> Result<(), StreamFailure> {
        while !self.ahead.is_empty() {
            if let Err(failure) = self.land(usize::MAX) {
                self.failure.get_or_insert(failure);
            }
        }
        while self.received < self.end {
            if let Some(StreamFailure::Gone | StreamFailure::Broken(_)) = &self.failure {
                break;
            }
            // Whatever the run did not read is not needed: drain it unopened.
            if let Err(failure) = self.receive(false) {
                self.failure = Some(failure);
            }
        }
        self.weights.clear_all();
        match self.failure.take() {
            None => Ok(()),
            Some(failure) => Err(failure),
        }
    }

    /// Waits for the layers opened ahead up to layer `upto`, and installs them; stops
    /// at the first that fails.
    fn land(&mut self, upto: usize) -> Result<(), StreamFailure> {
        while let Some(&(layer, bytes)) = self.ahead.front()
            && layer <= upto
        {
            self.ahead.pop_front();
            self.ahead_bytes -= bytes;
            let opened = match self.opener.next(self.unsealer) {
                Some(opened) if opened.layer == layer => opened,
                _ => {
                    return Err(StreamFailure::Broken(Error::Internal {
                        reason: format!("opening layer {layer} ahead stopped without an answer"),
                    }));
                }
            };
            let buffers = opened.buffers.take();
            if let Err(e) = opened.result {
                self.weights.give_back(self.layout, layer, buffers);
                return Err(StreamFailure::Rejected(Error::Format(e)));
            }
            self.weights
                .install(self.layout, layer, buffers)
                .map_err(StreamFailure::Rejected)?;
        }
        Ok(())
    }

    /// Receives the next layers from layer `from` on (not before: the node about to
    /// run reads those, so nothing would overlap) and queues them to open ahead, as
    /// many as fit: up to
    /// [`LOOKAHEAD`] bytes ahead (at least one layer), or under a budget as many as fit
    /// in it beside the layers installed (the host's frames are read into the layer's
    /// own buffers, so its plaintext is all it holds). A layer computed chunk by chunk
    /// is taken whole only without a budget, when it fits in the look-ahead and a node
    /// other than this one runs before its own; its node then reads it from memory.
    /// (Taken whole just before its node, as VGG-16's second and third dense layers
    /// were, a layer opened no earlier than streamed, and a fresh enclave paged in all
    /// of it: VGG-16 `mlcapsule run` peak 241 to 161 MiB streamed.)
    fn prefetch<'scope>(&mut self, scope: &rayon::Scope<'scope>, from: usize)
    where
        'a: 'scope,
        F::Layer: 'scope,
    {
        let header = self.unsealer.header();
        while from <= self.received && self.received < self.end {
            let layer = self.received;
            if self.layout.unread(layer) {
                if let Err(failure) = self.receive(false) {
                    self.failure = Some(failure);
                    return;
                }
                continue;
            }
            let bytes = header.layers[layer].plaintext_len;
            let after = self.ahead_bytes + bytes;
            let fits = match self.budget {
                Some(budget) => self.weights.held() + after <= budget,
                None => self.ahead_bytes == 0 || after <= LOOKAHEAD,
            };
            // Whole, a streamable layer opens while the nodes before its own compute:
            // worth it only if at least one runs after this one (the layer after a
            // streamed one is received only once that one is done).
            let ahead_of_its_node = self
                .layout
                .streamable(layer)
                .is_some_and(|s| s.node > self.node + 1);
            let whole = !self.streamed[layer]
                || (self.budget.is_none() && bytes <= LOOKAHEAD && ahead_of_its_node);
            if !fits || !whole {
                return;
            }
            let mut buffers = self.weights.buffers(self.layout, layer);
            let sealed = match self.feed.layer(header, layer, &mut buffers) {
                Ok(sealed) => sealed,
                Err(failure) => {
                    self.weights.give_back(self.layout, layer, buffers);
                    self.failure = Some(failure);
                    return;
                }
            };
            self.received += 1;
            self.ahead.push_back((layer, bytes));
            self.ahead_bytes = after;
            self.weights.note_scratch(after);
            let buffers = Buffers(buffers);
            let job = Job {
                layer,
                sealed,
                buffers,
            };
            self.opener.push(job, self.unsealer, scope);
        }
    }

    /// Skips the chunks `rest` of layer `layer` after a failure, to stay in step.
    fn drain(&mut self, layer: usize, rest: Range<u64>) -> Result<(), StreamFailure> {
        let header = self.unsealer.header();
        let mut sealed = std::mem::take(&mut self.weights.sealed);
        let result = self
            .feed
            .chunks(header, layer, rest, false, &mut sealed)
            .map(|_| ());
        self.weights.sealed = sealed;
        result
    }

    /// Receives the next layer's chunks; with `keep`, unseals it whole into the weights.
    fn receive(&mut self, keep: bool) -> Result<(), StreamFailure> {
        let layer = self.received;
        let header = self.unsealer.header();
        let count = header.chunk_count(layer);
        let keep = keep && !self.layout.unread(layer);
        let mut buffers = keep.then(|| self.weights.buffers(self.layout, layer));
        let chunk_size = u64::from(header.chunk_size);
        let group = self
            .feed
            .group(capsule_engine::threads(), chunk_size)
            .max(1);
        // The node waits for this layer: at one engine thread the other core helps.
        let share = on_team() || alone_off_pool();
        let mut sealed = std::mem::take(&mut self.weights.sealed);
        let mut first = 0;
        let mut failed = None;
        while first < count {
            let last = first.saturating_add(group).min(count);
            let bytes = match self
                .feed
                .chunks(header, layer, first..last, keep, &mut sealed)
            {
                Ok(bytes) => bytes,
                Err(failure) => {
                    self.weights.sealed = sealed;
                    if let Some(buffers) = buffers {
                        self.weights.give_back(self.layout, layer, buffers);
                    }
                    return Err(failure);
                }
            };
            if let (Some(bytes), Some(buffers)) = (bytes, buffers.as_mut())
                && let Err(e) =
                    open_chunks(self.unsealer, layer, first..last, bytes, buffers, share)
            {
                failed = Some(e);
                first = last;
                break;
            }
            first = last;
        }
        self.weights.sealed = sealed;
        if let Some(e) = failed {
            if let Some(buffers) = buffers {
                self.weights.give_back(self.layout, layer, buffers);
            }
            self.drain(layer, first..count)?;
            self.received += 1;
            return Err(StreamFailure::Rejected(Error::Format(e)));
        }
        self.received += 1;
        if let Some(mut buffers) = buffers {
            values_from_le(&mut buffers);
            self.weights
                .install(self.layout, layer, buffers)
                .map_err(StreamFailure::Rejected)?;
        }
        Ok(())
    }

    /// Runs dense node `node` on `a`, opening its layer chunk by chunk.
    fn dense(&mut self, node: usize, a: &Tensor) -> Result<Tensor, capsule_engine::Error> {
        if self.failure.is_some() {
            return Err(stream_failed());
        }
        let layer = self
            .layout
            .streamed_layer_of(node)
            .filter(|&l| l <= self.received)
            .ok_or_else(|| capsule_engine::Error::InvalidWeights {
                reason: format!("node {node} streams no layer that comes next"),
            })?;
        if layer < self.received {
            // Opened whole ahead of the node (prepare landed it).
            return self.dense_opened(layer, a);
        }
        match self.stream_layer(layer, a) {
            Ok(y) => Ok(y),
            Err(Streamed::Engine(e)) => Err(e),
            Err(Streamed::Stream(failure)) => {
                self.failure = Some(failure);
                Err(stream_failed())
            }
        }
    }

    /// Runs streamable layer `layer`'s Gemm on `a` from its weights opened whole: the
    /// same products as [`LayerStream::stream_layer`], so the same output bits.
    fn dense_opened(&self, layer: usize, a: &Tensor) -> Result<Tensor, capsule_engine::Error> {
        let s = self
            .layout
            .streamable(layer)
            .expect("streamed layers are streamable");
        let gemm = s.gemm;
        let m = gemm.batch(a)?;
        let param = |p: Option<usize>| {
            p.and_then(|p| self.weights.tensor(p)).ok_or_else(|| {
                capsule_engine::Error::InvalidWeights {
                    reason: format!("layer {layer} is not opened"),
                }
            })
        };
        let b = param(self.layout.tensors(layer)[s.b].param)?;
        let c = s.c.map(|c| param(Some(c))).transpose()?;
        let mut dots = vec![0.0f32; m * gemm.rows()];
        if on_team() {
            // Blocks of rows, read four at a time within each.
            let rows = CACHED_BLOCK_ROWS;
            dots.par_chunks_mut(rows * m.max(1))
                .zip(b.data().par_chunks(rows * gemm.row_len()))
                .for_each(|(out, rows)| gemm.dots(a, rows, out));
        } else {
            gemm.dots(a, b.data(), &mut dots);
        }
        gemm.finish(m, &dots, c)
    }

    fn stream_layer(&mut self, layer: usize, a: &Tensor) -> Result<Tensor, Streamed> {
        let (layout, unsealer) = (self.layout, self.unsealer);
        let s = *layout
            .streamable(layer)
            .expect("streamed layers are streamable");
        let gemm = s.gemm;
        let m = gemm.batch(a).map_err(Streamed::Engine)?;
        let header = unsealer.header();
        let count = header.chunk_count(layer);
        let threads = capsule_engine::threads().max(1);
        let tensors = layout.tensors(layer);
        let b = &tensors[s.b];
        let job = DenseJob {
            gemm,
            a,
            m,
            w: b.offset..b.offset + b.bytes,
            b: s.b,
        };
        // The layer's other tensors (C) are opened whole, into their own buffers.
        let mut others: Vec<(usize, Vec<f32>)> = tensors
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != s.b)
            .map(|(i, t)| (i, self.weights.buffer(t.param, t.bytes as usize / 4)))
            .collect();
        let chunk_bytes = u64::from(header.chunk_size).min(header.layers[layer].plaintext_len);
        // Room for a chunk after the part of a row the chunk before it gave, and for
        // shifting the chunk by up to 3 bytes so that its rows start on floats.
        let scratch_floats = (chunk_bytes as usize + 4 * gemm.row_len() + 4).div_ceil(4);
        let mut scratch = std::mem::take(&mut self.weights.scratch);
        // One scratch buffer per lane; each read of the feed (all chunks from memory, a
        // few from a pipe) is cut into runs of consecutive chunks, one per lane on the
        // team, so that the lanes meet once per read, not once per chunk. Off the pool,
        // this thread and one worker share more runs (`dense_lanes`).
        let (lanes, runs) = dense_lanes(threads);
        let group = self
            .feed
            .group(threads, u64::from(header.chunk_size))
            .clamp(1, count.max(1));
        scratch.resize_with(lanes, Scratch::default);
        for buf in scratch.iter_mut() {
            buf.fit(scratch_floats);
        }
        self.weights
            .note_scratch(self.layout.stream_memory(layer, threads));
        let mut sealed = std::mem::take(&mut self.weights.sealed);
        let mut dots = vec![0.0f32; m * gemm.rows()];
        let mut pending: HashMap<usize, (Zeroizing<Vec<f32>>, usize)> = HashMap::new();
        let mut rows_done = 0usize;
        let mut first = 0;
        let mut outcome = Ok(());
        while first < count {
            let last = first.saturating_add(group).min(count);
            let bytes = match self
                .feed
                .chunks(header, layer, first..last, true, &mut sealed)
            {
                Ok(Some(bytes)) => bytes,
                Ok(None) => &[][..],
                Err(failure) => {
                    outcome = Err(Streamed::Stream(failure));
                    break;
                }
            };
            let step = header.chunk_size as usize + TAG_LEN;
            let work: Vec<(u64, &[u8])> = (first..last)
                .map(|c| {
                    let at = (c - first) as usize * step;
                    (c, &bytes[at.min(bytes.len())..(at + step).min(bytes.len())])
                })
                .collect();
            let opened: Vec<Result<ChunkOut, capsule_format::Error>> =
                if on_team() && work.len() > 1 {
                    work.par_chunks(work.len().div_ceil(lanes))
                        .zip(scratch.par_iter_mut())
                        .map(|(run, buf)| dense_run(unsealer, layer, run, &job, buf))
                        .collect()
                } else if rayon::current_thread_index().is_none()
                    && rayon::current_num_threads() > 1
                    && lanes > 1
                    && work.len() >= SHARE_MIN_PIECES
                {
                    let runs = work.chunks(work.len().div_ceil(runs));
                    let free = Mutex::new(scratch.iter_mut().collect::<Vec<_>>());
                    let outs = Mutex::new(Vec::new());
                    share_with_worker(runs.enumerate(), |(i, run)| {
                        let taken = free.lock().unwrap_or_else(PoisonError::into_inner).pop();
                        let out = match taken {
                            Some(buf) => {
                                let out = dense_run(unsealer, layer, run, &job, buf);
                                free.lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push(buf);
                                out
                            }
                            // Not reached: at most two runs at once, one buffer each.
                            None => dense_run(unsealer, layer, run, &job, &mut Scratch::default()),
                        };
                        outs.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push((i, out));
                    });
                    let mut outs = outs.into_inner().unwrap_or_else(PoisonError::into_inner);
                    outs.sort_by_key(|&(i, _)| i);
                    outs.into_iter().map(|(_, out)| out).collect()
                } else {
                    vec![dense_run(unsealer, layer, &work, &job, &mut scratch[0])]
                };
            first = last;
            for out in opened {
                let out = match out {
                    Ok(out) => out,
                    Err(e) => {
                        outcome = Err(Streamed::Stream(StreamFailure::Rejected(Error::Format(e))));
                        break;
                    }
                };
                let m = job.m;
                dots[out.first_row * m..][..out.dots.len()].copy_from_slice(&out.dots);
                rows_done += out.dots.len() / m.max(1);
                for fragment in out.fragments {
                    match fragment.target {
                        Target::Row(row) => {
                            let (buf, filled) = pending
                                .entry(row)
                                .or_insert_with(|| (Zeroizing::new(vec![0.0; gemm.row_len()]), 0));
                            let dest: &mut [u8] = bytemuck::cast_slice_mut(buf.as_mut_slice());
                            dest[fragment.offset..][..fragment.bytes.len()]
                                .copy_from_slice(&fragment.bytes);
                            *filled += fragment.bytes.len();
                            if *filled == 4 * gemm.row_len() {
                                let (mut row_values, _) =
                                    pending.remove(&row).expect("just filled");
                                from_le(&mut row_values);
                                gemm.dots(a, &row_values, &mut dots[row * m..][..m]);
                                rows_done += 1;
                            }
                        }
                        Target::Other(i) => {
                            let (_, buf) = others
                                .iter_mut()
                                .find(|(t, _)| *t == i)
                                .expect("every other tensor has a buffer");
                            let dest: &mut [u8] = bytemuck::cast_slice_mut(buf.as_mut_slice());
                            dest[fragment.offset..][..fragment.bytes.len()]
                                .copy_from_slice(&fragment.bytes);
                        }
                    }
                }
            }
            if outcome.is_err() {
                break;
            }
        }
        self.weights.sealed = sealed;
        self.weights.scratch = scratch;
        if outcome.is_ok() && rows_done != gemm.rows() {
            outcome = Err(Streamed::Engine(capsule_engine::Error::InvalidWeights {
                reason: format!("layer {layer} gave {rows_done} of its {} rows", gemm.rows()),
            }));
        }
        let result = outcome.and_then(|()| {
            let own_c = s.c.and_then(|param| {
                others
                    .iter_mut()
                    .find(|(i, _)| tensors[*i].param == Some(param))
            });
            let y = match (own_c, s.c) {
                (Some((i, buf)), Some(param)) => {
                    from_le(buf);
                    let c = Tensor::new(tensors[*i].shape.clone(), std::mem::take(buf))
                        .map_err(Streamed::Engine)?;
                    let y = gemm.finish(m, &dots, Some(&c));
                    self.weights.retire(param, c.into_parts().1);
                    y
                }
                // A C of another layer (seal_layers gives a shared one its own), opened
                // whole before this node like any layer it reads.
                (None, Some(param)) => {
                    let c = self.weights.tensor(param).ok_or_else(|| {
                        Streamed::Engine(capsule_engine::Error::InvalidWeights {
                            reason: format!("layer {layer}: its Gemm's C is not opened"),
                        })
                    })?;
                    gemm.finish(m, &dots, Some(c))
                }
                _ => gemm.finish(m, &dots, None),
            };
            y.map_err(Streamed::Engine)
        });
        for (i, buf) in others {
            match tensors[i].param {
                Some(param) if !buf.is_empty() => self.weights.retire(param, buf),
                _ => drop(Zeroizing::new(buf)),
            }
        }
        if let Err(Streamed::Stream(StreamFailure::Rejected(_))) = &result
            && let Err(failure) = self.drain(layer, first..count)
        {
            self.received += 1;
            return Err(Streamed::Stream(failure));
        }
        self.received += 1;
        result
    }
}

/// How a streamed layer failed.
enum Streamed {
    Engine(capsule_engine::Error),
    Stream(StreamFailure),
}

/// Fewest bytes of a weight buffer that a query at one engine thread leaves to the
/// opener's job to wipe: below it, queueing the buffer costs about as much as wiping
/// it (MobileNetV2's layers are mostly smaller; ResNet-18 spent 2.6 ms of its 35
/// wiping its larger ones on the query's own thread).
const DEFERRED_WIPE_MIN: usize = 256 << 10;

/// What the engine sees when the stream failed; the stream keeps the real failure.
fn stream_failed() -> capsule_engine::Error {
    capsule_engine::Error::InvalidWeights {
        reason: "the layer stream failed".into(),
    }
}

/// A [`LayerStream`] during [`LayerStream::run`], with the scope its layers are opened
/// ahead on.
struct Piped<'s, 'scope, 'a, F: Feed> {
    stream: &'s mut LayerStream<'a, F>,
    scope: &'s rayon::Scope<'scope>,
}

impl<'scope, 'a: 'scope, F: Feed> WeightSource for Piped<'_, 'scope, 'a, F>
where
    F::Layer: 'scope,
{
    fn prepare(&mut self, _node: &Node) -> Result<(), capsule_engine::Error> {
        let stream = &mut *self.stream;
        let needed = stream.layout.needs(stream.node);
        if stream.failure.is_none()
            && let Some(needed) = needed
        {
            if let Err(failure) = stream.land(needed) {
                stream.failure = Some(failure);
            }
            // A streamed node's own layer is opened by the node itself.
            let upto = match stream.layout.streamed_layer_of(stream.node) {
                Some(layer) if stream.streamed[layer] => layer,
                _ => needed + 1,
            };
            while stream.failure.is_none() && stream.received < upto && stream.received < stream.end
            {
                if let Err(failure) = stream.receive(true) {
                    stream.failure = Some(failure);
                }
            }
        }
        // The layers after this node's open while it runs.
        if stream.failure.is_none() {
            stream.prefetch(self.scope, needed.map_or(0, |n| n + 1));
        }
        match stream.failure {
            None => Ok(()),
            // The real failure is kept in `stream.failure` and reported by `finish`.
            Some(_) => Err(stream_failed()),
        }
    }

    fn param(&self, index: usize, info: &ParamInfo) -> Option<&Tensor> {
        self.stream.weights.param(index, info)
    }

    /// A weight of a layer that is done after this node, which the engine then
    /// overwrites as it reads it: the layer's eviction skips it, and its buffer comes
    /// back zeroed, without a pass of [`wipe`] over memory.
    fn take(&mut self, index: usize, _info: &ParamInfo) -> Option<Tensor> {
        let stream = &mut *self.stream;
        let layout = stream.layout;
        let done = layout
            .done_after(stream.node)
            .any(|layer| layout.params_of(layer).contains(&index));
        if done {
            stream.weights.hand_over(index)
        } else {
            None
        }
    }

    fn give_back(&mut self, index: usize, zeroed: Vec<f32>) {
        self.stream.weights.keep(index, zeroed);
    }

    fn release(&mut self, _node: &Node) {
        let stream = &mut *self.stream;
        // At one engine thread, large buffers are wiped by the opener's job, on the
        // other core, between its openings, while the next nodes run (at two, the
        // pool has no core to spare; after the last node, nothing would overlap; on
        // one core, there is no other).
        let last = stream.node + 1 >= stream.layout.plan().graph().nodes.len();
        let defer = stream.weights.keeps_spares()
            && capsule_engine::threads() == 1
            && !last
            && !stream.opener.inline();
        let mut spent = Vec::new();
        for layer in stream.layout.done_after(stream.node) {
            if !defer {
                stream.layout.evict(layer, stream.weights);
                continue;
            }
            for &param in stream.layout.params_of(layer) {
                if let Some(mut buffer) = stream.weights.unload(param) {
                    if 4 * buffer.len() < DEFERRED_WIPE_MIN {
                        wipe(&mut buffer);
                        stream.weights.keep(param, buffer);
                    } else {
                        spent.push(Spent {
                            param,
                            buffer: Buffers(vec![buffer]),
                        });
                    }
                }
            }
        }
        if !spent.is_empty() {
            stream.opener.retire(spent, stream.unsealer, self.scope);
        }
        stream.node += 1;
    }
}

/// Opens every chunk of layer `layer` from its sealed bytes `sealed` into `buffers`,
/// the layer's tensors in plaintext order, which it exactly fills (capsule-v1 §4.3),
/// and reads their values in the capsule's byte order. With `parallel`, chunks are
/// opened on several cores (see [`open_chunks`]). On failure the error names the first chunk
/// that did not authenticate, and `buffers` hold garbage.
pub(crate) fn open_whole(
    unsealer: &Unsealer,
    layer: usize,
    sealed: &[u8],
    buffers: &mut [Vec<f32>],
    parallel: bool,
) -> Result<(), capsule_format::Error> {
    let chunks = 0..unsealer.header().chunk_count(layer);
    open_chunks(unsealer, layer, chunks, sealed, buffers, parallel)?;
    values_from_le(buffers);
    Ok(())
}

/// Opens chunks `chunks` of layer `layer` from their sealed bytes `sealed` (back to
/// back) into their places in `buffers`, the layer's tensors in plaintext order. A
/// chunk inside one tensor is opened straight into it, one across tensors into a
/// scratch buffer that is then wiped. The bytes stay in the capsule's order: once
/// every chunk is open, [`values_from_le`] reads them. Errors as [`open_whole`].
///
/// `parallel` says the caller has nothing else for the other cores to do. On one of
/// rayon's workers the chunks are then split over the pool; off it (a query at one
/// engine thread) this thread shares them with one worker ([`share_with_worker`]),
/// from [`SHARE_MIN_PIECES`] chunks on. One core opened at 4-6 GB/s inside a query here,
/// two together at about 9-10 (a 9.4 MB layer: 1.7 ms alone, 0.9-1.06 ms shared).
pub(crate) fn open_chunks(
    unsealer: &Unsealer,
    layer: usize,
    chunks: Range<u64>,
    sealed: &[u8],
    buffers: &mut [Vec<f32>],
    parallel: bool,
) -> Result<(), capsule_format::Error> {
    let step = unsealer.header().chunk_size as usize + TAG_LEN;
    let first = chunks.start;
    let open = |c: u64, out: &mut [u8]| {
        let at = (c - first) as usize * step;
        let piece = &sealed[at.min(sealed.len())..(at + step).min(sealed.len())];
        unsealer.open_chunk_into(layer, c, piece, out)
    };
    open_each(unsealer, layer, chunks, buffers, parallel, false, open)
}

/// Opens chunks `chunks` of layer `layer` in place: `buffers` (the layer's tensors in
/// plaintext order) hold each chunk's ciphertext where its plaintext goes, and `tags`
/// every chunk's tag, from chunk 0. Otherwise as [`open_chunks`].
pub(crate) fn open_chunks_in_place(
    unsealer: &Unsealer,
    layer: usize,
    chunks: Range<u64>,
    tags: &[[u8; TAG_LEN]],
    buffers: &mut [Vec<f32>],
    parallel: bool,
) -> Result<(), capsule_format::Error> {
    open_each(
        unsealer,
        layer,
        chunks,
        buffers,
        parallel,
        true,
        |c, buf| match usize::try_from(c).ok().and_then(|c| tags.get(c)) {
            Some(tag) => unsealer.open_chunk_in_place(layer, c, buf, tag),
            None => Err(capsule_format::Error::ChunkFailed {
                layer: unsealer.header().layers[layer].name.clone(),
                chunk: c,
            }),
        },
    )
}

/// Opens each of chunks `chunks` of layer `layer` into its place in `buffers` with
/// `open`, given the chunk and its place: one tensor's bytes, or for a chunk across
/// tensors this thread's scratch buffer ([`SPANNING`]), scattered to them once it
/// opened, then wiped. `in_place` says `open` reads its ciphertext from that place: the
/// scratch then first gathers it from the tensors. Runs on the cores `parallel` allows
/// (see [`open_chunks`]).
fn open_each(
    unsealer: &Unsealer,
    layer: usize,
    chunks: Range<u64>,
    buffers: &mut [Vec<f32>],
    parallel: bool,
    in_place: bool,
    open: impl Fn(u64, &mut [u8]) -> Result<(), capsule_format::Error> + Sync,
) -> Result<(), capsule_format::Error> {
    let spans: Vec<(u64, Range<u64>)> =
        chunks.map(|c| (c, unsealer.chunk_span(layer, c))).collect();
    let targets = split_targets(buffers, &spans);
    let open = |(c, mut parts): (u64, Vec<&mut [u8]>)| -> Result<(), capsule_format::Error> {
        if let [out] = parts.as_mut_slice() {
            return open(c, out);
        }
        let mut through = |scratch: &mut Vec<u8>| {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            if scratch.len() < len {
                scratch.resize(len, 0);
            }
            let scratch = &mut scratch[..len];
            if in_place {
                let mut at = 0;
                for part in &parts {
                    scratch[at..at + part.len()].copy_from_slice(part);
                    at += part.len();
                }
            }
            let opened = open(c, scratch);
            if opened.is_ok() {
                let mut at = 0;
                for part in &mut parts {
                    part.copy_from_slice(&scratch[at..at + part.len()]);
                    at += part.len();
                }
            }
            // On this thread alone (never `wipe`'s shared pieces): another chunk
            // opened here meanwhile would find the scratch in use.
            scratch.fill(0);
            std::hint::black_box(scratch);
            opened
        };
        // Opening a chunk never opens another on this thread, so the scratch is free;
        // were it not, a buffer of this chunk's own would do.
        SPANNING.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => through(&mut scratch),
            Err(_) => through(&mut Vec::new()),
        })
    };
    if !parallel || targets.len() < 2 {
        return targets.into_iter().try_for_each(open);
    }
    if rayon::current_thread_index().is_some() {
        let results: Vec<Result<(), capsule_format::Error>> =
            targets.into_par_iter().map(open).collect();
        return results.into_iter().collect();
    }
    if targets.len() < SHARE_MIN_PIECES || rayon::current_num_threads() < 2 {
        return targets.into_iter().try_for_each(open);
    }
    let failed: Mutex<Option<(u64, capsule_format::Error)>> = Mutex::new(None);
    share_with_worker(targets.into_iter(), |target| {
        let chunk = target.0;
        if let Err(e) = open(target) {
            let mut failed = failed.lock().unwrap_or_else(PoisonError::into_inner);
            // The first chunk that failed, in chunk order, as a serial pass reports.
            if failed.as_ref().is_none_or(|&(c, _)| c > chunk) {
                *failed = Some((chunk, e));
            }
        }
    });
    match failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
        None => Ok(()),
        Some((_, e)) => Err(e),
    }
}

thread_local! {
    /// Where a chunk across tensors opens, on each thread that opens chunks: at most a
    /// chunk long, zeros between chunks. A quarter of MobileNetV2's bytes are in such
    /// chunks (each layer's last: the end of its weights, and its bias). A fresh buffer
    /// for each, filled from the tensors first, was a heap allocation and one more copy
    /// per chunk: streaming/plain went 1.36-1.37 → 1.35-1.36 at two threads and 1.086
    /// → 1.073 at one without them (MobileNetV2, medians of 8-12 alternated runs, inside
    /// their ranges), and perf's `memmove` samples 738 → 633.
    static SPANNING: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A layer's opened tensors, read in the capsule's byte order (once: on a big-endian
/// machine this swaps bytes).
pub(crate) fn values_from_le(buffers: &mut [Vec<f32>]) {
    for buf in buffers {
        from_le(buf);
    }
}

/// Cuts `buffers` (a layer's tensors in plaintext order, as bytes) into the pieces each
/// chunk of `spans` fills: one piece for a chunk inside a tensor, several for a chunk
/// across tensors.
fn split_targets<'b>(
    buffers: &'b mut [Vec<f32>],
    spans: &[(u64, Range<u64>)],
) -> Vec<(u64, Vec<&'b mut [u8]>)> {
    let mut tensors = buffers
        .iter_mut()
        .map(|b| bytemuck::cast_slice_mut::<f32, u8>(b.as_mut_slice()))
        .filter(|b| !b.is_empty());
    let mut offset = 0u64;
    let mut current: Option<&'b mut [u8]> = tensors.next();
    let mut out = Vec::with_capacity(spans.len());
    for (chunk, span) in spans {
        let mut parts = Vec::new();
        let mut pos = span.start;
        while pos < span.end {
            let Some(slice) = current.take() else { break };
            let end = offset + slice.len() as u64;
            if end <= pos {
                offset = end;
                current = tensors.next();
                continue;
            }
            let slice = &mut slice[(pos - offset) as usize..];
            let take = (span.end.min(end) - pos) as usize;
            let (head, tail) = slice.split_at_mut(take);
            parts.push(head);
            pos += take as u64;
            offset = pos;
            current = if tail.is_empty() {
                tensors.next()
            } else {
                Some(tail)
            };
        }
        out.push((*chunk, parts));
    }
    out
}

/// Values stored little-endian (capsule-v1 §1), in place: nothing to do on a
/// little-endian machine.
fn from_le(values: &mut [f32]) {
    if cfg!(target_endian = "big") {
        for v in values {
            *v = f32::from_bits(u32::from_le(v.to_bits()));
        }
    }
}

/// One lane's buffer for a streamed dense layer's chunks ([`dense_run`]), which remembers
/// how far it was written, so that wiping it when its run is done costs only the bytes
/// that held plaintext: a lane that opened no chunk, or only a layer smaller than the
/// buffer, wipes nothing, or that much. Dense 256x256 at one engine thread opens its one
/// 256 KiB chunk on one lane, and wiping both lanes' buffers whole was 17 % of its
/// streamed query. Zeroized whole when dropped.
#[derive(Default)]
pub(crate) struct Scratch {
    values: Zeroizing<Vec<f32>>,
    /// Values from the start that may hold plaintext; the rest are zero.
    written: usize,
}

impl Scratch {
    /// Makes room for `len` values, which [`LayerStream::stream_layer`] sizes every lane
    /// to before its runs (a new, zeroed buffer; the old one is wiped first).
    fn fit(&mut self, len: usize) {
        if self.values.len() < len {
            self.wipe();
            *self.values = vec![0.0; len];
        }
    }

    /// The buffer, about to hold plaintext in its first `bytes` bytes (grown if it is
    /// shorter: only for a buffer `stream_layer` did not size).
    fn written_to(&mut self, bytes: usize) -> &mut Vec<f32> {
        let len = bytes.div_ceil(4);
        if self.values.len() < len {
            // A new buffer, so that the old one is wiped (a Vec that grows frees its
            // old memory as it is).
            let mut bigger = Zeroizing::new(vec![0.0f32; len]);
            bigger[..self.values.len()].copy_from_slice(&self.values);
            self.wipe();
            self.values = bigger;
        }
        self.written = self.written.max(len);
        &mut self.values
    }

    /// Zeroes the values written since the last wipe.
    pub fn wipe(&mut self) {
        wipe(&mut self.values[..self.written]);
        self.written = 0;
    }

    /// Whether every value is zero, the part not marked written too.
    #[cfg(test)]
    pub fn is_zero(&self) -> bool {
        self.values.iter().all(|v| v.to_bits() == 0)
    }
}

/// A dense node's product, for the chunks of its layer.
struct DenseJob<'a> {
    gemm: StreamedGemm,
    a: &'a Tensor,
    m: usize,
    /// B's bytes in the layer's plaintext.
    w: Range<u64>,
    /// B's position among the layer's tensors (at most one other: C, before or after).
    b: usize,
}

/// What one run of consecutive chunks of a streamed layer gave.
struct ChunkOut {
    /// The first row of B whose products `dots` starts with.
    first_row: usize,
    /// `m` products per row of B wholly inside the run, in row order.
    dots: Vec<f32>,
    /// Bytes of the rows that straddle the run's ends, and of the layer's other tensors.
    fragments: Vec<Fragment>,
}

struct Fragment {
    target: Target,
    /// Byte offset in the row or tensor.
    offset: usize,
    bytes: Zeroizing<Vec<u8>>,
}

impl Fragment {
    /// A copy of `bytes`, bound for byte `offset` of `target`.
    fn copy(target: Target, offset: u64, bytes: &[u8]) -> Fragment {
        Fragment {
            target,
            offset: offset as usize,
            bytes: Zeroizing::new(bytes.to_vec()),
        }
    }
}

enum Target {
    /// A row of B.
    Row(usize),
    /// The layer's tensor at this position.
    Other(usize),
}

/// Opens the consecutive chunks `run` of a streamed layer one after the other into
/// `scratch`, multiplies every row of B that they hold whole into the output's products,
/// and copies out the rest: the head of a row that began before the run, the tail of one
/// that goes on after it, and the layer's other tensors. A row that straddles two chunks
/// of the run is completed in `scratch` itself: the part the first chunk gave is moved to
/// the front, and the next chunk is opened right after it.
///
/// `scratch` keeps the plaintext from chunk to chunk, and is wiped once, when the run
/// is done or fails, on the run's own thread: wiping a 256 KiB buffer after every chunk
/// cost a third of a streamed dense layer's time beside the decryption, and wiping every
/// lane's buffer on the query's thread after the layer took 5 % of dense 512x512's
/// samples at two threads.
fn dense_run(
    unsealer: &Unsealer,
    layer: usize,
    run: &[(u64, &[u8])],
    job: &DenseJob<'_>,
    scratch: &mut Scratch,
) -> Result<ChunkOut, capsule_format::Error> {
    let out = open_run(unsealer, layer, run, job, scratch);
    scratch.wipe();
    out
}

/// [`dense_run`] but for its wiping of `scratch`.
fn open_run(
    unsealer: &Unsealer,
    layer: usize,
    run: &[(u64, &[u8])],
    job: &DenseJob<'_>,
    scratch: &mut Scratch,
) -> Result<ChunkOut, capsule_format::Error> {
    let k = job.gemm.row_len();
    let row_bytes = 4 * k as u64;
    let mut out = ChunkOut {
        first_row: 0,
        dots: Vec::new(),
        fragments: Vec::new(),
    };
    // Bytes of a row, from its start, that the last chunk left at the front of `scratch`.
    let mut left = 0usize;
    for (i, &(chunk, sealed)) in run.iter().enumerate() {
        let carried = std::mem::take(&mut left);
        let span = unsealer.chunk_span(layer, chunk);
        let len = (span.end - span.start) as usize;
        let (ws, we) = (span.start.max(job.w.start), span.end.min(job.w.end));
        // Where the chunk's plaintext goes: right after the carried bytes, or else so
        // that the first row starting in it starts on a float.
        let at = if carried > 0 {
            carried
        } else if ws < we {
            let into_row = (ws - job.w.start) % row_bytes;
            let boundary = if into_row == 0 {
                ws
            } else {
                ws + row_bytes - into_row
            };
            (4 - (boundary - span.start) % 4) as usize % 4
        } else {
            0
        };
        let scratch = scratch.written_to(at + len);
        {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(scratch.as_mut_slice());
            unsealer.open_chunk_into(layer, chunk, sealed, &mut bytes[at..at + len])?;
        }
        // `scratch`'s byte `at - carried` holds the layer's plaintext byte `origin`.
        let origin = span.start - carried as u64;
        let place = |offset: u64| at - carried + (offset - origin) as usize;
        let bytes: &[u8] = bytemuck::cast_slice(scratch.as_slice());
        let opened = |range: Range<u64>| &bytes[place(range.start)..place(range.end)];
        // The layer's other tensor, C, before or after B.
        if span.start < job.w.start {
            let end = span.end.min(job.w.start);
            let piece = opened(span.start..end);
            out.fragments
                .push(Fragment::copy(Target::Other(0), span.start, piece));
        }
        if span.end > job.w.end {
            let from = span.start.max(job.w.end);
            let piece = opened(from..span.end);
            out.fragments.push(Fragment::copy(
                Target::Other(job.b + 1),
                from - job.w.end,
                piece,
            ));
        }
        if ws >= we {
            continue;
        }
        let mut pos = if carried > 0 { origin } else { ws };
        let into_row = (pos - job.w.start) % row_bytes;
        if into_row != 0 {
            // The head of a row that began before this run.
            let row = ((pos - job.w.start) / row_bytes) as usize;
            let end = (pos + row_bytes - into_row).min(we);
            out.fragments
                .push(Fragment::copy(Target::Row(row), into_row, opened(pos..end)));
            pos = end;
        }
        let whole = ((we - pos) / row_bytes) as usize;
        let first = ((pos - job.w.start) / row_bytes) as usize;
        let from = place(pos) / 4;
        if whole > 0 {
            let values = &mut scratch[from..from + whole * k];
            from_le(values);
            if out.dots.is_empty() {
                out.first_row = first;
            }
            debug_assert_eq!(out.first_row + out.dots.len() / job.m.max(1), first);
            let done = out.dots.len();
            out.dots.resize(done + whole * job.m, 0.0);
            job.gemm.dots(job.a, values, &mut out.dots[done..]);
            pos += whole as u64 * row_bytes;
        }
        if pos < we {
            let row = first + whole;
            let rest = (we - pos) as usize;
            let from = place(pos);
            if i + 1 < run.len() {
                let bytes: &mut [u8] = bytemuck::cast_slice_mut(scratch.as_mut_slice());
                bytes.copy_within(from..from + rest, 0);
                left = rest;
            } else {
                // The tail of a row that goes on after this run.
                let bytes: &[u8] = bytemuck::cast_slice(scratch.as_slice());
                out.fragments.push(Fragment::copy(
                    Target::Row(row),
                    0,
                    &bytes[from..from + rest],
                ));
            }
        }
    }
    Ok(out)
}
