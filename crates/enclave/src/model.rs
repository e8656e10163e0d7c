//! From an authenticated header to a runnable model: where each weight lives
//! ([`Layout`]), the weights themselves in zeroizing, reusable storage
//! ([`Weights`]), and the in-process ways to open a capsule: [`SealedModel`]
//! (unsealed once) and [`StreamingModel`] (unsealed on every query, as the
//! enclave does).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use capsule_engine::{Graph, ParamInfo, Plan, Staged, StreamedGemm, Tensor, WeightSource};
use capsule_format::{Capsule, DETECTOR_PREFIX, Header, ModelKey, Unsealer};
use rayon::prelude::*;
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;
use crate::stream::{LayerStream, MemoryFeed, StreamFailure};

/// The public graph of a capsule, compiled, and where each of its weights is
/// sealed: which layer, and which nodes need which layers when.
pub(crate) struct Layout {
    plan: Plan,
    /// Param indices held by each layer.
    layer_params: Vec<Vec<usize>>,
    /// The last node that reads each layer; `None` if no node does.
    layer_last_use: Vec<Option<usize>>,
    /// The highest layer each node reads; `None` if it reads no weight.
    node_needs: Vec<Option<usize>>,
    /// Each layer's tensors, in plaintext order (capsule-v1 §4.3).
    layer_tensors: Vec<Vec<LayerTensor>>,
    /// Layers a dense node can compute chunk by chunk, never holding them whole.
    streamable: Vec<Option<Streamable>>,
    /// The graph cut around the streamable nodes.
    staged: Staged,
    /// Plaintext bytes per chunk (capsule-v1 §4.4).
    chunk_size: u64,
    /// Layer names, for errors.
    layer_names: Vec<String>,
    /// Each layer's plaintext bytes and chunks (capsule-v1 §4.4).
    plaintext_len: Vec<u64>,
    chunk_counts: Vec<u64>,
}

/// One tensor of a layer's plaintext.
#[derive(Clone, Debug)]
pub(crate) struct LayerTensor {
    /// Its param in this layout's graph; `None` for a tensor this layout does not read.
    pub param: Option<usize>,
    pub shape: Vec<usize>,
    /// Where it starts in the layer's plaintext, in bytes.
    pub offset: u64,
    /// Its length in bytes.
    pub bytes: u64,
}

/// A layer that only one Gemm node reads, as its B (and C): the node can
/// take B row by row as the chunks are opened ([`StreamedGemm`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Streamable {
    pub node: usize,
    pub gemm: StreamedGemm,
    /// B's position in the layer's tensors.
    pub b: usize,
    /// C's param, if the node has one.
    pub c: Option<usize>,
}

impl Layout {
    /// Parses and checks the model's architecture, and checks the tensor table
    /// against it (capsule-v1 §4.1): every declared weight is sealed exactly
    /// once with its declared shape, and nothing else is sealed, apart from the
    /// detector's tensors (capsule-v1 §4.6), which this layout never reads.
    pub fn new(header: &Header) -> Result<Layout, Error> {
        Layout::build(&header.architecture, header, None)
    }

    /// The layout of the input detector sealed beside the model (capsule-v1 §4.6):
    /// its graph, and its tensors, named [`DETECTOR_PREFIX`]` + param`. `None` when the
    /// capsule has no detector.
    pub fn detector(header: &Header) -> Result<Option<Layout>, Error> {
        header
            .detector
            .as_ref()
            .map(|d| Layout::build(&d.architecture, header, Some(DETECTOR_PREFIX)))
            .transpose()
    }

    /// A layout of the graph `architecture` over the tensors whose names start with
    /// `prefix` (the detector's) or, without one, those that do not (the model's).
    fn build(
        architecture: &serde_json::Value,
        header: &Header,
        prefix: Option<&str>,
    ) -> Result<Layout, Error> {
        let graph: Graph = serde_json::from_value(architecture.clone()).map_err(|e| {
            Error::Architecture(capsule_engine::Error::InvalidGraph {
                reason: format!("architecture does not parse: {e}"),
            })
        })?;
        let plan = Plan::new(graph).map_err(Error::Architecture)?;
        let graph = plan.graph();
        let declared: HashMap<&str, (usize, &ParamInfo)> = graph
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), (i, p)))
            .collect();
        let invalid =
            |reason: String| Error::Engine(capsule_engine::Error::InvalidWeights { reason });

        let mut param_of = HashMap::with_capacity(header.tensors.len());
        let mut layer_params = vec![Vec::new(); header.layers.len()];
        let mut layer_of_param = vec![None; graph.params.len()];
        for t in &header.tensors {
            // The format keeps the two graphs' tensors apart (capsule-v1 §4.6).
            let name = match (prefix, t.name.strip_prefix(DETECTOR_PREFIX)) {
                (Some(_), Some(name)) => name,
                (None, None) => t.name.as_str(),
                _ => continue,
            };
            let Some(&(index, info)) = declared.get(name) else {
                return Err(invalid(format!(
                    "the graph declares no weight named {}",
                    t.name
                )));
            };
            if info.shape != t.shape {
                return Err(invalid(format!(
                    "weight '{}' is sealed with shape {:?} but the graph declares {:?}",
                    t.name, t.shape, info.shape
                )));
            }
            if param_of.insert(t.name.clone(), index).is_some() {
                return Err(invalid(format!("tensor '{}' is sealed twice", t.name)));
            }
            layer_params[t.layer].push(index);
            layer_of_param[index] = Some(t.layer);
        }
        if let Some(missing) = graph
            .params
            .iter()
            .zip(&layer_of_param)
            .find(|(_, layer)| layer.is_none())
        {
            return Err(invalid(format!(
                "weight '{}{}' is declared but not sealed",
                prefix.unwrap_or_default(),
                missing.0.name
            )));
        }

        let mut layer_last_use = vec![None; header.layers.len()];
        let mut layer_readers = vec![0usize; header.layers.len()];
        let mut node_needs = Vec::with_capacity(graph.nodes.len());
        for (j, node) in graph.nodes.iter().enumerate() {
            let mut needs = None;
            let mut read = Vec::new();
            for input in &node.inputs {
                if let Some(&(index, _)) = declared.get(input.as_str())
                    && let Some(layer) = layer_of_param[index]
                {
                    layer_last_use[layer] = Some(j);
                    needs = needs.max(Some(layer));
                    if !read.contains(&layer) {
                        read.push(layer);
                    }
                }
            }
            for layer in read {
                layer_readers[layer] += 1;
            }
            node_needs.push(needs);
        }

        let mut layer_tensors = vec![Vec::new(); header.layers.len()];
        for t in &header.tensors {
            let name = match (prefix, t.name.strip_prefix(DETECTOR_PREFIX)) {
                (Some(_), Some(_)) | (None, None) => Some(t.name.as_str()),
                _ => None,
            };
            layer_tensors[t.layer].push(LayerTensor {
                param: name.and_then(|n| param_of.get(n).copied()),
                shape: t.shape.clone(),
                offset: t.offset,
                bytes: 4 * t.shape.iter().product::<usize>() as u64,
            });
        }
        for (layer, tensors) in layer_tensors.iter_mut().enumerate() {
            tensors.sort_by_key(|t| t.offset);
            // capsule-v1 §4.3: the tensors exactly fill the plaintext, in order.
            let mut end = 0;
            for t in tensors.iter() {
                if t.offset != end {
                    return Err(invalid(format!(
                        "the tensors of layer '{}' do not fill its plaintext",
                        header.layers[layer].name
                    )));
                }
                end += t.bytes;
            }
            if end != header.layers[layer].plaintext_len {
                return Err(invalid(format!(
                    "the tensors of layer '{}' do not fill its plaintext",
                    header.layers[layer].name
                )));
            }
        }

        let mut streamable = vec![None; header.layers.len()];
        for (j, node) in graph.nodes.iter().enumerate() {
            let param = |i: usize| {
                node.inputs
                    .get(i)
                    .and_then(|name| declared.get(name.as_str()))
                    .map(|&(index, _)| index)
            };
            let Some(b) = param(1) else { continue };
            let c = param(2);
            let Some(layer) = layer_of_param[b] else {
                continue;
            };
            // C may lie in another layer (a shared bias): that one is opened whole.
            let own = layer_params[layer].iter().all(|&p| p == b || Some(p) == c)
                && layer_tensors[layer].iter().all(|t| t.param.is_some())
                && layer_readers[layer] == 1
                && param(0).is_none();
            let gemm = StreamedGemm::of(node, &graph.params[b], c.map(|c| &graph.params[c]));
            if let (true, Some(gemm)) = (own, gemm) {
                let b = layer_tensors[layer]
                    .iter()
                    .position(|t| t.param == Some(b))
                    .expect("B is a tensor of its layer");
                streamable[layer] = Some(Streamable {
                    node: j,
                    gemm,
                    b,
                    c,
                });
            }
        }
        let own: Vec<usize> = streamable.iter().flatten().map(|s| s.node).collect();
        let staged = Staged::new(graph, &own);
        Ok(Layout {
            plan,
            layer_params,
            layer_last_use,
            node_needs,
            layer_tensors,
            streamable,
            staged,
            chunk_size: u64::from(header.chunk_size),
            layer_names: header.layers.iter().map(|l| l.name.clone()).collect(),
            plaintext_len: header.layers.iter().map(|l| l.plaintext_len).collect(),
            chunk_counts: (0..header.layers.len())
                .map(|l| header.chunk_count(l))
                .collect(),
        })
    }

    /// The compiled graph.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The highest layer node `j` reads, if it reads any weight.
    pub fn needs(&self, node: usize) -> Option<usize> {
        self.node_needs.get(node).copied().flatten()
    }

    /// The layers no node reads after node `j`.
    pub fn done_after(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        self.layer_last_use
            .iter()
            .enumerate()
            .filter(move |(_, last)| **last == Some(node))
            .map(|(layer, _)| layer)
    }

    /// True when no node reads layer `layer` at all.
    pub fn unread(&self, layer: usize) -> bool {
        self.layer_last_use[layer].is_none()
    }

    /// Layer `layer`'s tensors, in plaintext order.
    pub fn tensors(&self, layer: usize) -> &[LayerTensor] {
        &self.layer_tensors[layer]
    }

    /// The graph cut around the nodes that can stream their weights.
    pub fn staged(&self) -> &Staged {
        &self.staged
    }

    /// How layer `layer` streams, if a dense node can take it chunk by chunk.
    pub fn streamable(&self, layer: usize) -> Option<&Streamable> {
        self.streamable.get(layer)?.as_ref()
    }

    /// The layer node `node` streams, if it is a streamable dense node.
    pub fn streamed_layer_of(&self, node: usize) -> Option<usize> {
        self.streamable
            .iter()
            .position(|s| s.is_some_and(|s| s.node == node))
    }

    /// Which layers of `layers` a query of batch `batch` computes chunk by chunk, on
    /// `threads` threads, and the most weight memory it then holds at once (plaintext
    /// weights and the buffers chunks are opened into).
    ///
    /// A streamable layer streams when the batch is at most
    /// [`capsule_engine::STREAMED_GEMM_EXACT_ROWS`] (then its output is bit for bit the
    /// plain Gemm's, and it is faster: its weights are read once, from cache), or under a
    /// memory budget. Fails, naming the layer that needs the most, when `budget` is less
    /// than the query needs.
    pub fn query_plan(
        &self,
        layers: Range<usize>,
        batch: usize,
        budget: Option<u64>,
        threads: usize,
    ) -> Result<(Vec<bool>, u64), Error> {
        let stream_all = batch <= capsule_engine::STREAMED_GEMM_EXACT_ROWS || budget.is_some();
        let streamed: Vec<bool> = (0..self.streamable.len())
            .map(|l| stream_all && layers.contains(&l) && self.streamable[l].is_some())
            .collect();
        // Layers arrive in order: layer l is whole in memory from the first node that
        // needs a layer at or after it, to its last reader.
        let mut whole_from = vec![None; streamed.len()];
        for (j, needs) in self.node_needs.iter().enumerate() {
            if let Some(needs) = *needs {
                for slot in whole_from.iter_mut().take(needs + 1) {
                    slot.get_or_insert(j);
                }
            }
        }
        let mut worst = (0u64, None::<(usize, u64)>);
        for j in 0..self.node_needs.len() {
            let mut need = 0u64;
            let mut biggest: Option<(usize, u64)> = None;
            for l in layers.clone() {
                let (Some(from), Some(last)) = (whole_from[l], self.layer_last_use[l]) else {
                    continue;
                };
                let bytes = if streamed[l] {
                    if self.streamable[l].is_some_and(|s| s.node == j) {
                        self.stream_memory(l, threads)
                    } else {
                        continue;
                    }
                } else if (from..=last).contains(&j) {
                    self.layer_tensors[l].iter().map(|t| t.bytes).sum()
                } else {
                    continue;
                };
                need += bytes;
                if biggest.is_none_or(|(_, b)| bytes > b) {
                    biggest = Some((l, bytes));
                }
            }
            if need > worst.0 {
                worst = (need, biggest);
            }
        }
        if let (Some(budget), (need, Some((layer, bytes)))) = (budget, worst)
            && need > budget
        {
            let how = if streamed[layer] {
                "computed chunk by chunk"
            } else {
                "whole: only a Gemm with transB streams"
            };
            return Err(Error::QueryFailed {
                reason: format!(
                    "the weight memory budget of {budget} bytes is too small: layer '{}' needs {bytes} bytes ({how}), {need} bytes with the layers in use beside it; nothing was counted, raise --memory-budget to at least {need}",
                    self.layer_names[layer]
                ),
            });
        }
        Ok((streamed, worst.0))
    }

    /// Weight memory a streamed layer holds while its node runs on `threads` threads:
    /// one opened chunk and a row per lane (`stream::dense_lanes`), the rows that
    /// straddle the lanes' runs of chunks, and its other tensors.
    pub fn stream_memory(&self, layer: usize, threads: usize) -> u64 {
        let Some(s) = &self.streamable[layer] else {
            return 0;
        };
        let chunks = self.chunk_counts[layer];
        let (lanes, runs) = crate::stream::dense_lanes(threads);
        let (lanes, runs) = ((lanes as u64).min(chunks), (runs as u64).min(chunks));
        let chunk = self.chunk_size.min(self.plaintext_len[layer]);
        let row = 4 * s.gemm.row_len() as u64;
        let others: u64 = (self.layer_tensors[layer].iter().enumerate())
            .filter(|&(i, _)| i != s.b)
            .map(|(_, t)| t.bytes)
            .sum();
        lanes * (chunk + row + 4) + (runs + 1) * row + others
    }

    /// Unseals layer `layer` whole from its sealed stream into `weights`, the chunks in
    /// parallel (capsule-v1 §4.3, §6).
    pub fn install_sealed(
        &self,
        unsealer: &Unsealer,
        layer: usize,
        sealed: &[u8],
        weights: &mut Weights,
    ) -> Result<(), Error> {
        let mut buffers = weights.buffers(self, layer);
        if let Err(e) = crate::stream::open_whole(
            unsealer,
            layer,
            sealed,
            &mut buffers,
            capsule_engine::threads() > 1,
        ) {
            weights.give_back(self, layer, buffers);
            return Err(Error::Format(e));
        }
        weights.install(self, layer, buffers)
    }

    /// Unseals the read layers among `layers` of `capsule` whole into fresh weights: a
    /// model kept in memory (developer mode, the provider's benchmarks).
    pub fn open_resident(
        &self,
        unsealer: &Unsealer,
        capsule: &Capsule<'_>,
        layers: Range<usize>,
    ) -> Result<Weights, Error> {
        let mut weights = Weights::new(self.plan().graph().params.len());
        for layer in layers.filter(|&l| !self.unread(l)) {
            self.install_sealed(unsealer, layer, capsule.sealed_layer(layer), &mut weights)?;
        }
        Ok(weights)
    }

    /// The params of layer `layer`'s tensors.
    pub fn params_of(&self, layer: usize) -> &[usize] {
        &self.layer_params[layer]
    }

    /// Zeroizes the weights of layer `layer`; their buffers are kept for the next
    /// query, or freed under a memory budget.
    pub fn evict(&self, layer: usize, weights: &mut Weights) {
        for &index in &self.layer_params[layer] {
            weights.clear(index);
        }
    }
}

/// Weight tensors by param index, and the buffers they are unsealed into.
///
/// Every value is zeroized when its layer is evicted, when a query ends and on drop.
/// Unless it [frees](Weights::freeing) them, it keeps each zeroized buffer for the next
/// query, so that a query does not page in fresh memory for every layer: the enclave's
/// weight memory then stays as large as the model.
pub(crate) struct Weights {
    tensors: Vec<Option<Tensor>>,
    /// Zeroized buffers by param index, for the next time its layer is opened.
    spare: Vec<Vec<f32>>,
    keep_spare: bool,
    /// One buffer per thread for streamed chunks, zeroized when its run of them is done.
    pub scratch: Vec<crate::stream::Scratch>,
    /// Sealed chunks read from the host, a few at a time (ciphertext only).
    pub sealed: Vec<u8>,
    /// Plaintext weight bytes held now, and the most held at once.
    held: u64,
    peak: u64,
}

impl Weights {
    /// Room for `n` params, none present.
    pub fn new(n: usize) -> Weights {
        Weights {
            tensors: (0..n).map(|_| None).collect(),
            spare: vec![Vec::new(); n],
            keep_spare: true,
            scratch: Vec::new(),
            sealed: Vec::new(),
            held: 0,
            peak: 0,
        }
    }

    /// Frees buffers when their layer is evicted instead of keeping them (under a
    /// memory budget).
    pub fn freeing(mut self) -> Weights {
        self.keep_spare = false;
        self
    }

    /// Param `index`, if its layer is open now.
    pub fn tensor(&self, index: usize) -> Option<&Tensor> {
        self.tensors.get(index)?.as_ref()
    }

    /// The most plaintext weight memory held at once so far, scratch included.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Plaintext weight bytes installed now.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Notes `extra` bytes of scratch held on top of the installed weights.
    pub fn note_scratch(&mut self, extra: u64) {
        self.peak = self.peak.max(self.held + extra);
    }

    /// Buffers for layer `layer`'s tensors, in plaintext order: kept ones, or zeroed.
    pub fn buffers(&mut self, layout: &Layout, layer: usize) -> Vec<Vec<f32>> {
        layout
            .tensors(layer)
            .iter()
            .map(|t| self.buffer(t.param, t.bytes as usize / 4))
            .collect()
    }

    /// A buffer of `len` values for param `param`.
    pub fn buffer(&mut self, param: Option<usize>, len: usize) -> Vec<f32> {
        match param.map(|p| std::mem::take(&mut self.spare[p])) {
            Some(buf) if buf.len() == len => buf,
            _ => vec![0.0; len],
        }
    }

    /// Zeroizes layer `layer`'s buffers that were not installed, and keeps or frees them.
    pub fn give_back(&mut self, layout: &Layout, layer: usize, buffers: Vec<Vec<f32>>) {
        for (t, buf) in layout.tensors(layer).iter().zip(buffers) {
            match t.param {
                Some(index) => self.retire(index, buf),
                None => drop(Zeroizing::new(buf)),
            }
        }
    }

    /// Installs layer `layer`'s opened tensors.
    pub fn install(
        &mut self,
        layout: &Layout,
        layer: usize,
        buffers: Vec<Vec<f32>>,
    ) -> Result<(), Error> {
        for (t, mut buf) in layout.tensors(layer).iter().zip(buffers) {
            let Some(index) = t.param else {
                buf.zeroize();
                continue;
            };
            self.clear(index);
            self.held += t.bytes;
            self.tensors[index] = Some(Tensor::new(t.shape.clone(), buf).map_err(Error::Engine)?);
        }
        self.peak = self.peak.max(self.held);
        Ok(())
    }

    /// Zeroizes a buffer of param `index` that is done, and keeps it for the next query
    /// or frees it.
    pub fn retire(&mut self, index: usize, mut buf: Vec<f32>) {
        wipe(&mut buf);
        if self.keep_spare {
            // Keeps the length: the next query opens into it without a pass of its own.
            self.spare[index] = buf;
        }
    }

    fn clear(&mut self, index: usize) {
        if let Some(data) = self.unload(index) {
            self.retire(index, data);
        }
    }

    /// Whether buffers are kept for the next query (no budget): then a query may
    /// have them wiped by the opener's job, off its own path ([`Weights::unload`]).
    pub fn keeps_spares(&self) -> bool {
        self.keep_spare
    }

    /// Takes param `index`'s weights out, not wiped: the caller wipes the buffer and
    /// gives it back with [`Weights::keep`].
    pub fn unload(&mut self, index: usize) -> Option<Vec<f32>> {
        self.hand_over(index).map(|t| t.into_parts().1)
    }

    /// Takes param `index`'s tensor out, not wiped, for the engine to overwrite as it
    /// reads it ([`capsule_engine::WeightSource::take`]): the zeroed buffer comes back
    /// through [`Weights::keep`].
    pub fn hand_over(&mut self, index: usize) -> Option<Tensor> {
        let tensor = self.tensors[index].take()?;
        self.held -= 4 * tensor.len() as u64;
        Some(tensor)
    }

    /// Keeps a buffer of param `index` that has been wiped, for the next query.
    pub fn keep(&mut self, index: usize, buf: Vec<f32>) {
        if self.keep_spare {
            self.spare[index] = buf;
        }
    }

    /// Zeroizes every weight still installed.
    pub fn clear_all(&mut self) {
        for index in 0..self.tensors.len() {
            self.clear(index);
        }
    }
}

impl Drop for Weights {
    fn drop(&mut self) {
        self.clear_all();
    }
}

/// Overwrites plaintext with zeros at memory speed: a vectorised fill (non-temporal
/// stores from [`uncached_wipe_min`] bytes on) that the optimiser cannot drop, because
/// `black_box` makes the buffer observable afterwards. The zeroize
/// crate's volatile stores, one element at a time, cost as much as the AES-GCM that
/// opened the bytes (byte buffers) on every query; it still wipes buffers when they are
/// dropped.
///
/// When [`on_team`], a buffer above [`TEAM_WIPE_PIECE`] bytes is wiped in pieces that
/// the pool's other workers take when they are free: evicting a layer runs between two
/// nodes of a query, and one core alone wiped ResNet-18's 47 MB in 2.6 ms of its 24.
/// A query at one engine thread runs on the caller's thread, which shares a buffer of
/// [`WIPE_SHARE_MIN`] bytes or more with one worker, in pieces of [`WIPE_PIECE`]
/// bytes (conv3x3 512x14x14's 9.4 MB of weights after its only node: 0.335 → 0.235
/// ms); smaller ones it wipes right here.
pub(crate) fn wipe<T: bytemuck::Pod + Send>(buf: &mut [T]) {
    wipe_uncached_from(buf, uncached_wipe_min());
}

/// [`wipe`], with non-temporal stores from `uncached_min` bytes on.
fn wipe_uncached_from<T: bytemuck::Pod + Send>(buf: &mut [T], uncached_min: usize) {
    let size = std::mem::size_of::<T>().max(1);
    let uncached = std::mem::size_of_val(buf) >= uncached_min;
    let zero = |p: &mut [T]| {
        if uncached {
            capsule_engine::zero_uncached(bytemuck::cast_slice_mut(p));
        } else {
            p.fill(T::zeroed());
        }
    };
    let (team_piece, piece) = ((TEAM_WIPE_PIECE / size).max(1), (WIPE_PIECE / size).max(1));
    if buf.len() > team_piece && on_team() {
        buf.par_chunks_mut(team_piece).for_each(zero);
    } else if size_of_val(buf) >= WIPE_SHARE_MIN && alone_off_pool() {
        share_with_worker(buf.chunks_mut(piece), zero);
    } else {
        zero(buf);
    }
    std::hint::black_box(buf);
}

/// Whether this is a query at one engine thread, on the caller's thread, with a worker
/// in rayon's pool to spare (not so on one core): the pool's workers are then free, but
/// handing them work means waking one.
pub(crate) fn alone_off_pool() -> bool {
    capsule_engine::threads() == 1
        && rayon::current_thread_index().is_none()
        && rayon::current_num_threads() > 1
}

/// Fewest pieces (of a layer's chunks, or of [`WIPE_PIECE`] bytes) that a thread off the
/// pool shares with one of its workers ([`share_with_worker`]): waking the worker takes
/// tens of µs here, about what a 256 KiB piece takes to open.
pub(crate) const SHARE_MIN_PIECES: usize = 4;

/// Runs `work` on every item of `items`, on this thread and one of rayon's workers,
/// which take items in turn from one queue: the worker's wake-up costs only the items
/// it misses, and when this thread runs out of items it sleeps, leaving its core to
/// the worker.
pub(crate) fn share_with_worker<I: Send>(
    items: impl Iterator<Item = I> + Send,
    work: impl Fn(I) + Sync,
) {
    let queue = Mutex::new(items);
    let drain = || {
        loop {
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            match next {
                Some(item) => work(item),
                None => break,
            }
        }
    };
    rayon::in_place_scope(|scope| {
        scope.spawn(|_| drain());
        drain();
    });
}

/// Whether a query's work may be split over rayon's pool here: the engine runs on more
/// than one thread, and this is one of the pool's workers (where a query on several
/// threads runs), so idle workers take the pieces at once. From any other thread,
/// handing work to the pool waits for a worker to wake up: tens of µs on this VM, more
/// than a 256x256 dense layer's whole query.
pub(crate) fn on_team() -> bool {
    capsule_engine::threads() > 1 && rayon::current_thread_index().is_some()
}

/// Smallest buffer [`wipe`] zeroes with non-temporal stores
/// ([`capsule_engine::zero_uncached`]), which write each cache line without reading
/// it first: a quarter of the last-level cache ([`capsule_engine::last_level_cache`]),
/// or [`UNCACHED_WIPE_MIN`] where the CPU does not say. A buffer that large has mostly
/// left the cache by the time its node is done, and reading its lines back only to
/// overwrite them is wasted; a smaller one is likely still cached, and so is its
/// zeroed copy when the next query opens the layer into it again, which
/// non-temporal stores would have sent to memory.
///
/// Measured at two engine threads, streaming/plain, alternated. On an EPYC Zen 2 (16
/// MiB of L3 per four cores: 4 MiB), against none: conv3x3 512x14x14 (9.4 MB of
/// weights) 1.21-1.25 → 1.18-1.19, ResNet-18 1.27-1.28 → 1.22-1.23; at one thread,
/// and on dense layers, no change. On an Intel Xeon declaring 480 MiB of L3 (none
/// wiped uncached), against a fixed 4 MiB, three rounds each: MobileNetV2 (its 5.1 MB
/// classifier) 1.40-1.44 → 1.35-1.39, ResNet-18 1.41 → 1.36-1.38, conv3x3 512x14x14
/// at one thread 1.23-1.25 → 1.19; dense layers unchanged. Not measured on Zen 3 and
/// Zen 4 (32 MiB of L3: 8 MiB).
fn uncached_wipe_min() -> usize {
    capsule_engine::last_level_cache().map_or(UNCACHED_WIPE_MIN, |bytes| bytes / 4)
}

/// [`uncached_wipe_min`] where the CPU does not declare its last-level cache.
const UNCACHED_WIPE_MIN: usize = 4 << 20;

/// Bytes of a buffer [`wipe`] leaves to one task off the pool ([`share_with_worker`]).
const WIPE_PIECE: usize = 256 << 10;

/// Smallest buffer [`wipe`] shares with one of the pool's workers off the pool
/// ([`share_with_worker`]): eight [`WIPE_PIECE`]s. One core wipes 1 MiB in about
/// 30 µs, as long as waking a worker takes here, and the caller pays the wake-up's
/// system call on top. From four pieces (the threshold for opening chunks,
/// [`SHARE_MIN_PIECES`]), the 1 MiB 1x1 Conv of dwsep3x3 512x14x14 at one thread,
/// wiped after the query's last node, woke a worker on every query: streaming/plain
/// 1.243 → 1.194 with eight (`bench/ab.py --mode sealed-streaming`, a model of the
/// case, 10 rounds, 0.957x, range 0.917-1.013); MobileNetV2 level (1.005x, 6 rounds).
const WIPE_SHARE_MIN: usize = 8 * WIPE_PIECE;

/// Bytes of a buffer [`wipe`] leaves to one task on the team ([`on_team`]): the pool's
/// workers are awake there, so that buffers from twice this size on are split. Most of
/// MobileNetV2's layers are 16-256 KiB; at two threads, each wiped by the query's
/// thread alone cost as much as all its openings (streaming/plain 1.39 against 1.25
/// with no wiping at all). With 16 KiB pieces instead of 256, alternated (6-8 rounds):
/// 1.55 → 1.40 (cores far, 0.908), 1.36 → 1.27 against 32 KiB pieces (near, 0.960);
/// 8 and 4 KiB read as 16, 64 KiB 1.015 against 32.
const TEAM_WIPE_PIECE: usize = 16 << 10;

impl WeightSource for Weights {
    fn param(&self, index: usize, _info: &ParamInfo) -> Option<&Tensor> {
        self.tensor(index)
    }
}

/// A model whose weights were unsealed from a capsule in this process, ready to run.
///
/// This is the provider's developer mode: the caller holds the model key.
/// Clients run capsules through the enclave process instead
/// ([`crate::EnclaveProcess`]). The weights are zeroized when it is dropped.
pub struct SealedModel {
    header: Header,
    layout: Layout,
    weights: Weights,
}

impl SealedModel {
    /// Verifies and unseals `capsule` with `key` and builds the engine model.
    pub fn open(capsule: &Capsule<'_>, key: &ModelKey) -> Result<SealedModel, Error> {
        let unsealer = capsule.unseal(key)?;
        let header = unsealer.header().clone();
        let layout = Layout::new(&header)?;
        // The developer mode runs the model alone: the detector's layers stay sealed.
        let weights = layout.open_resident(
            &unsealer,
            capsule,
            header.detector_layers()..header.layers.len(),
        )?;
        Ok(SealedModel {
            header,
            layout,
            weights,
        })
    }

    /// The authenticated header: preprocessing, labels, policy.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The model's public graph.
    pub fn graph(&self) -> &Graph {
        self.layout.plan().graph()
    }

    /// Runs one batch.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        self.layout
            .plan()
            .run(inputs, &mut Resident(&self.weights))
            .map_err(Error::Engine)
    }
}

/// Borrowed resident weights: `Plan::run` wants `&mut`, `SealedModel::run` has `&self`.
struct Resident<'a>(&'a Weights);

impl WeightSource for Resident<'_> {
    fn param(&self, index: usize, info: &ParamInfo) -> Option<&Tensor> {
        self.0.param(index, info)
    }
}

/// A capsule opened with its model key whose weights are unsealed on every query, layer
/// by layer, exactly as the enclave unseals what the host streams to it (the same
/// `LayerStream`, fed from memory instead of frames): each layer just before the first
/// node that reads it, zeroized after the last; dense layers chunk by chunk into their
/// output; under an optional budget on the weight memory held at once.
///
/// For the provider's benchmarks (`mlcapsule bench`): what it times is what the enclave
/// runs, without the process boundary and the counter. Runs the model alone, without the
/// detector or the policy, like [`SealedModel`].
pub struct StreamingModel<'c> {
    capsule: &'c Capsule<'c>,
    unsealer: Unsealer,
    layout: Layout,
    weights: Weights,
    budget: Option<u64>,
}

impl<'c> StreamingModel<'c> {
    /// Verifies `capsule`'s header with `key` and prepares its layout; unseals nothing.
    /// `budget` caps the plaintext weight memory a query holds at once, in bytes.
    pub fn open(
        capsule: &'c Capsule<'c>,
        key: &ModelKey,
        budget: Option<u64>,
    ) -> Result<StreamingModel<'c>, Error> {
        let unsealer = capsule.unseal(key)?;
        let layout = Layout::new(unsealer.header())?;
        let mut weights = Weights::new(layout.plan().graph().params.len());
        if budget.is_some() {
            weights = weights.freeing();
        }
        Ok(StreamingModel {
            capsule,
            unsealer,
            layout,
            weights,
            budget,
        })
    }

    /// Runs one batch, unsealing every layer it reads. Fails like the enclave when the
    /// budget is too small for the model.
    pub fn run(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        let header = self.unsealer.header();
        let layers = header.detector_layers()..header.layers.len();
        let batch = inputs
            .first()
            .and_then(|x| x.shape().first())
            .copied()
            .unwrap_or(1);
        let (streamed, _) = self.layout.query_plan(
            layers.clone(),
            batch,
            self.budget,
            capsule_engine::threads(),
        )?;
        let mut stream = LayerStream::new(
            MemoryFeed::new(self.capsule),
            &self.unsealer,
            &self.layout,
            layers,
            &mut self.weights,
            streamed,
            self.budget,
        );
        let result = stream.run(inputs);
        match stream.finish() {
            Ok(()) => result.map_err(Error::Engine),
            Err(StreamFailure::Broken(e) | StreamFailure::Rejected(e)) => Err(e),
            Err(StreamFailure::Gone) => Err(Error::Internal {
                reason: "a capsule in memory cannot go away".into(),
            }),
        }
    }

    /// The most plaintext weight memory a query held at once so far, in bytes.
    pub fn peak_weight_bytes(&self) -> u64 {
        self.weights.peak()
    }

    /// The model's public graph.
    pub fn graph(&self) -> &Graph {
        self.layout.plan().graph()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use capsule_engine::{Activation, ConvAttrs, Model, Node, Op, ValueInfo};
    use capsule_format::{Policy, SealRequest};

    use super::*;

    fn ramp(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|i| ((i * 7 + seed * 13) % 29) as f32 / 14.0 - 1.0)
            .collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    }

    /// Large buffers (non-temporal stores) and small ones, on the pool as a query at
    /// two threads wipes them and off it, at any alignment, come back all zeros.
    #[test]
    fn wipe_zeroes_buffers_of_every_size() {
        let large = UNCACHED_WIPE_MIN / 4 + 3;
        for len in [
            0,
            1,
            5,
            1000,
            TEAM_WIPE_PIECE / 4 * 2 + 3,
            WIPE_PIECE / 4 * 3 + 1,
            large,
        ] {
            let mut buf = vec![f32::NAN; len + 1];
            wipe(&mut buf[1..]);
            assert!(
                buf[0].is_nan(),
                "{len} values: the value before them was wiped"
            );
            assert!(buf[1..].iter().all(|&v| v.to_bits() == 0), "{len} values");
            buf.fill(1.5);
            rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap()
                .install(|| wipe(&mut buf[..len]));
            assert!(
                buf[..len].iter().all(|&v| v.to_bits() == 0),
                "{len} values on a pool"
            );
            assert_eq!(
                buf[len], 1.5,
                "{len} values on a pool: the value after them was wiped"
            );
        }
        // Non-temporal stores, whatever this machine's cache.
        let mut bytes = vec![7u8; UNCACHED_WIPE_MIN + 9];
        wipe_uncached_from(&mut bytes[1..], UNCACHED_WIPE_MIN);
        assert_eq!(bytes[0], 7);
        assert!(bytes[1..].iter().all(|&b| b == 0));
    }

    fn node(name: &str, op: Op, inputs: &[&str], out: &str) -> Node {
        Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.into()],
        }
    }

    /// A 3x3 Conv, stride 1, padding 1.
    fn conv3x3(activation: Activation) -> Op {
        Op::Conv(ConvAttrs {
            kernel: [3, 3],
            strides: [1, 1],
            pads: [1, 1, 1, 1],
            dilations: [1, 1],
            group: 1,
            activation,
        })
    }

    fn param(name: &str, shape: &[usize]) -> ParamInfo {
        ParamInfo {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// x [?, 2, 5, 5] -> Conv(w, b) -> Flatten -> Gemm(fc, fc.b) -> Relu -> Gemm(out):
    /// odd sizes, so that chunks cut rows and tensors anywhere. `fc` is `n x 75`.
    fn model(n: usize) -> (Graph, HashMap<String, Tensor>) {
        let gemm = Op::Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: true,
        };
        let conv = conv3x3(Activation::None);
        let graph = Graph {
            inputs: vec![ValueInfo {
                name: "x".into(),
                shape: vec![None, Some(2), Some(5), Some(5)],
            }],
            params: vec![
                param("w", &[3, 2, 3, 3]),
                param("b", &[3]),
                param("fc", &[n, 75]),
                param("fc.b", &[n]),
                param("out", &[7, n]),
            ],
            nodes: vec![
                node("conv", conv, &["x", "w", "b"], "c"),
                node("flat", Op::Flatten { axis: 1 }, &["c"], "f"),
                node("fc", gemm.clone(), &["f", "fc", "fc.b"], "h"),
                node("relu", Op::Relu, &["h"], "r"),
                node("out", gemm, &["r", "out"], "y"),
            ],
            outputs: vec!["y".into()],
        };
        let weights = graph
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), ramp(&p.shape, i)))
            .collect();
        (graph, weights)
    }

    fn seal(
        graph: &Graph,
        weights: &HashMap<String, Tensor>,
        chunk_size: u32,
    ) -> (Vec<u8>, ModelKey) {
        let request = SealRequest {
            architecture: serde_json::to_value(graph).unwrap(),
            preprocessing: None,
            labels: None,
            detector: None,
            policy: Policy::default(),
            chunk_size,
            aead: capsule_format::Aead::SEAL_DEFAULT,
            layers: crate::grouping::seal_layers(graph, weights, ""),
        };
        let key = ModelKey::generate();
        let bytes = capsule_format::seal(
            &request,
            &key,
            capsule_format::new_capsule_id(),
            &mut |_| {},
        )
        .unwrap();
        (bytes, key)
    }

    /// Within the engine's 1e-4 of `want`, relative (absolute below 1).
    fn assert_close(got: &Tensor, want: &Tensor) {
        for (a, b) in got.data().iter().zip(want.data()) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.data().iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn streaming_gives_the_plain_bits_for_any_chunk_size() {
        let (graph, weights) = model(29);
        let plain = Model::new(graph.clone(), weights.clone()).unwrap();
        // 64: the smallest; 66: not a multiple of 4; 300: one fc row (75 floats); 4096:
        // several rows; default: one chunk per layer.
        for chunk_size in [64, 66, 300, 1000, capsule_format::DEFAULT_CHUNK_SIZE] {
            let (bytes, key) = seal(&graph, &weights, chunk_size);
            let capsule = Capsule::parse(&bytes).unwrap();
            let mut streaming = StreamingModel::open(&capsule, &key, None).unwrap();
            // Under a budget, the dense layers are opened chunk by chunk into the
            // lanes' scratch buffers, never whole.
            let mut budgeted = StreamingModel::open(&capsule, &key, Some(64 << 10)).unwrap();
            let cached = SealedModel::open(&capsule, &key).unwrap();
            // Batch 9 takes the plan (not streamed), the others the streamed Gemm.
            for (batch, seed) in [(1, 1), (3, 2), (9, 3), (1, 4)] {
                let x = ramp(&[batch, 2, 5, 5], seed);
                let want = plain.run(std::slice::from_ref(&x)).unwrap();
                let got = streaming.run(std::slice::from_ref(&x)).unwrap();
                let resident = cached.run(std::slice::from_ref(&x)).unwrap();
                assert_eq!(
                    bits(&got[0]),
                    bits(&want[0]),
                    "chunk {chunk_size}, batch {batch}"
                );
                assert_eq!(bits(&resident[0]), bits(&want[0]));
                let pieces = budgeted.run(std::slice::from_ref(&x)).unwrap();
                if batch <= capsule_engine::STREAMED_GEMM_EXACT_ROWS {
                    assert_eq!(bits(&pieces[0]), bits(&want[0]), "chunk {chunk_size}");
                } else {
                    // Under a budget batch 9 streams too, to rounding.
                    assert_close(&pieces[0], &want[0]);
                }
                // Wiped when each lane's run of chunks was done: no plaintext left.
                let scratch = &budgeted.weights.scratch;
                assert!(!scratch.is_empty(), "chunk {chunk_size}: fc was streamed");
                assert!(
                    scratch.iter().all(crate::stream::Scratch::is_zero),
                    "chunk {chunk_size}, batch {batch}"
                );
            }
        }
    }

    /// A 3x3 Conv of 256 channels at 14x14 goes, on two or more threads, by Winograd's
    /// blocks of output channels, and one of 128 channels at 7x7 by depth through the
    /// pointwise kernel: the engine takes their weights from the stream and gives them
    /// back overwritten. The output is the plain bits, and the buffer kept for the next
    /// query holds zeros (on one thread, the stream wipes it itself).
    #[test]
    fn a_conv_that_overwrites_its_weights_gives_them_back_zeroed() {
        for (c, side, m) in [(256, 14, 256), (128, 7, 64)] {
            let conv = conv3x3(Activation::Relu);
            let graph = Graph {
                inputs: vec![ValueInfo {
                    name: "x".into(),
                    shape: vec![None, Some(c), Some(side), Some(side)],
                }],
                params: vec![param("w", &[m, c, 3, 3]), param("b", &[m])],
                nodes: vec![node("conv", conv, &["x", "w", "b"], "y")],
                outputs: vec!["y".into()],
            };
            let weights: HashMap<String, Tensor> = (graph.params.iter().enumerate())
                .map(|(i, p)| (p.name.clone(), ramp(&p.shape, i)))
                .collect();
            let plain = Model::new(graph.clone(), weights.clone()).unwrap();
            let (bytes, key) = seal(&graph, &weights, capsule_format::DEFAULT_CHUNK_SIZE);
            let capsule = Capsule::parse(&bytes).unwrap();
            let mut streaming = StreamingModel::open(&capsule, &key, None).unwrap();
            for seed in [1, 2] {
                let x = ramp(&[1, c, side, side], seed);
                let want = plain.run(std::slice::from_ref(&x)).unwrap();
                let got = streaming.run(std::slice::from_ref(&x)).unwrap();
                assert_eq!(bits(&got[0]), bits(&want[0]), "{c} channels");
                let kept = &streaming.weights.spare[0];
                assert_eq!(kept.len(), m * c * 9, "the buffer of w is kept");
                assert!(kept.iter().all(|&v| v.to_bits() == 0), "{c} channels");
                assert!(streaming.weights.tensor(0).is_none());
            }
        }
    }

    #[test]
    fn a_layer_larger_than_the_budget_is_computed_in_pieces() {
        let (graph, weights) = model(301);
        let plain = Model::new(graph.clone(), weights.clone()).unwrap();
        let (bytes, key) = seal(&graph, &weights, 1000);
        let capsule = Capsule::parse(&bytes).unwrap();
        let fc_bytes = 301 * 75 * 4;
        let budget = 16 * 1024;
        assert!(fc_bytes > 5 * budget);
        let mut streaming = StreamingModel::open(&capsule, &key, Some(budget)).unwrap();
        for batch in [1, 2] {
            let x = ramp(&[batch, 2, 5, 5], batch);
            let want = plain.run(std::slice::from_ref(&x)).unwrap();
            let got = streaming.run(std::slice::from_ref(&x)).unwrap();
            assert_eq!(bits(&got[0]), bits(&want[0]), "batch {batch}");
            // fc's chunks were opened in the lanes' scratch buffers, which are wiped
            // whole, though only as far as they were written.
            let scratch = &streaming.weights.scratch;
            assert!(!scratch.is_empty(), "fc was streamed");
            assert!(scratch.iter().all(crate::stream::Scratch::is_zero));
        }
        // Above the exact batch the streamed Gemm still runs, to rounding.
        let x = ramp(&[12, 2, 5, 5], 5);
        let want = plain.run(std::slice::from_ref(&x)).unwrap();
        let got = streaming.run(std::slice::from_ref(&x)).unwrap();
        assert_close(&got[0], &want[0]);
        let peak = streaming.peak_weight_bytes();
        assert!(0 < peak && peak <= budget, "held {peak} bytes");
    }

    /// VGG-16 as torch exports it: two dense layers tie their equal (all-zero) biases, so
    /// one C is read by two Gemms. Found when VGG-16 could not stream under 64 MiB.
    #[test]
    fn dense_layers_that_share_a_bias_still_stream_under_a_budget() {
        let (mut graph, weights) = model(301);
        graph.nodes[4].inputs.push("fc.b".into());
        graph.params[4].shape = vec![301, 301];
        let mut weights = weights;
        weights.insert("out".into(), ramp(&[301, 301], 4));
        let layers = crate::grouping::seal_layers(&graph, &weights, "");
        let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            ["conv", "fc.b", "fc", "out"],
            "the shared bias has its own layer"
        );

        let plain = Model::new(graph.clone(), weights.clone()).unwrap();
        let (bytes, key) = seal(&graph, &weights, 1000);
        let capsule = Capsule::parse(&bytes).unwrap();
        let budget = 16 * 1024;
        assert!(301 * 301 * 4 > 20 * budget);
        let mut streaming = StreamingModel::open(&capsule, &key, Some(budget)).unwrap();
        for batch in [1, 3] {
            let x = ramp(&[batch, 2, 5, 5], batch);
            let want = plain.run(std::slice::from_ref(&x)).unwrap();
            let got = streaming.run(std::slice::from_ref(&x)).unwrap();
            assert_eq!(bits(&got[0]), bits(&want[0]), "batch {batch}");
        }
        let peak = streaming.peak_weight_bytes();
        assert!(0 < peak && peak <= budget, "held {peak} bytes");
    }

    #[test]
    fn a_budget_below_the_smallest_workable_size_names_the_layer() {
        let (graph, weights) = model(301);
        let (bytes, key) = seal(&graph, &weights, 1000);
        let capsule = Capsule::parse(&bytes).unwrap();
        // Streamed, `out` (7 x 301) needs a chunk per thread and its straddling rows:
        // more than `fc`, whose rows are shorter.
        let mut streaming = StreamingModel::open(&capsule, &key, Some(4000)).unwrap();
        let err = streaming.run(&[ramp(&[1, 2, 5, 5], 1)]).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::QueryFailed { .. }), "{err:?}");
        assert!(text.contains("layer 'out' needs"), "{text}");
        assert!(text.contains("raise --memory-budget to at least"), "{text}");
        let mut enough = StreamingModel::open(&capsule, &key, Some(16 * 1024)).unwrap();
        assert!(enough.run(&[ramp(&[1, 2, 5, 5], 1)]).is_ok());
    }

    #[test]
    fn a_tampered_chunk_fails_naming_its_layer_and_chunk() {
        let (graph, weights) = model(29);
        let (bytes, key) = seal(&graph, &weights, 256);
        let original = Capsule::parse(&bytes).unwrap();
        let capsule = &original;
        // fc (streamed) is layer 1, out (whole) layer 2; each has several chunks.
        for (layer, name) in [(1, "fc"), (2, "out"), (0, "conv")] {
            let start = capsule.sealed_layer(layer).as_ptr() as usize - bytes.as_ptr() as usize;
            let mut tampered = bytes.clone();
            let chunk = if layer == 0 { 0 } else { 1 };
            tampered[start + chunk * (256 + capsule_format::TAG_LEN) + 5] ^= 0x40;
            let capsule = Capsule::parse(&tampered).unwrap();
            // Streamed chunk by chunk (batch 1, or any batch under a budget) or whole.
            for (budget, batch) in [(None, 1), (None, 9), (Some(64 * 1024), 9)] {
                let mut streaming = StreamingModel::open(&capsule, &key, budget).unwrap();
                let err = streaming.run(&[ramp(&[batch, 2, 5, 5], 1)]).unwrap_err();
                match err {
                    Error::Format(capsule_format::Error::ChunkFailed { layer: l, chunk: c }) => {
                        assert_eq!((l.as_str(), c), (name, chunk as u64), "{budget:?} {batch}")
                    }
                    other => panic!("layer {layer}: {other:?}"),
                }
                // The untampered model runs on.
                let mut good = StreamingModel::open(&original, &key, budget).unwrap();
                assert!(good.run(&[ramp(&[batch, 2, 5, 5], 1)]).is_ok());
            }
        }
    }

    /// A layer larger than two steps of the opener (`fc`, 600 KB, in 1000-byte chunks) is
    /// opened over several jobs, whole and in order, from sealed bytes apart or from its
    /// ciphertext in its own buffers (as the host's frames are read); a tampered chunk in
    /// a later step is named either way; and what the opener is given to wipe comes back
    /// zeroed, whatever its size.
    #[test]
    fn the_opener_opens_and_wipes_in_steps() {
        use crate::ahead::{Buffers, Job, Opener, Sealed, Spent};

        let (graph, weights) = model(2000);
        let (bytes, key) = seal(&graph, &weights, 1000);
        let capsule = Capsule::parse(&bytes).unwrap();
        let unsealer = capsule.unseal(&key).unwrap();
        let layout = Layout::new(unsealer.header()).unwrap();
        let layer = layout_layer(&unsealer, "fc");
        assert!(unsealer.header().layers[layer].plaintext_len > 2 * (256 << 10));
        let mut store = Weights::new(graph.params.len());
        let want = layer_values(&layout, &graph, &weights, layer);

        let sealed = capsule.sealed_layer(layer);
        let mut tampered = sealed.to_vec();
        let bad_chunk = 600;
        tampered[bad_chunk * (1000 + capsule_format::TAG_LEN) + 3] ^= 1;
        let opener = Opener::new();
        let wiped = rayon::in_place_scope(|scope| {
            for sealed in [sealed.to_vec(), tampered] {
                let mut buffers = store.buffers(&layout, layer);
                let tags = in_place(&unsealer, layer, &sealed, &mut buffers);
                let jobs = [
                    (Sealed::Apart(sealed), store.buffers(&layout, layer)),
                    (Sealed::InPlace(tags), buffers),
                ];
                for (sealed, buffers) in jobs {
                    let buffers = Buffers(buffers);
                    let job = Job {
                        layer,
                        sealed,
                        buffers,
                    };
                    opener.push(job, &unsealer, scope);
                }
            }
            let spent = [(3, 100), (4, 3 << 20)].map(|(param, len)| Spent {
                param,
                buffer: Buffers(vec![vec![1.5; len]]),
            });
            opener.retire(spent.into(), &unsealer, scope);

            for _ in 0..2 {
                let opened = opener.next(&unsealer).unwrap();
                assert!(opened.result.is_ok());
                let got: Vec<f32> = opened.buffers.take().concat();
                assert_eq!(got, want);
            }
            for _ in 0..2 {
                let failed = opener.next(&unsealer).unwrap();
                match failed.result {
                    Err(capsule_format::Error::ChunkFailed { chunk, .. }) => {
                        assert_eq!(chunk, bad_chunk as u64)
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert!(opener.next(&unsealer).is_none());
            opener.settle()
        });
        let mut wiped = wiped;
        wiped.sort_by_key(|(param, _)| *param);
        let shape: Vec<(usize, usize)> = wiped.iter().map(|(p, b)| (*p, b.len())).collect();
        assert_eq!(shape, [(3, 100), (4, 3 << 20)]);
        assert!(wiped.iter().all(|(_, b)| b.iter().all(|&v| v == 0.0)));
    }

    /// Writes layer `layer`'s ciphertext from its sealed bytes `sealed` into `buffers`
    /// (its tensors in plaintext order), each chunk's where its plaintext goes, as the
    /// enclave reads the host's frames, and returns the chunks' tags.
    fn in_place(
        unsealer: &capsule_format::Unsealer,
        layer: usize,
        sealed: &[u8],
        buffers: &mut [Vec<f32>],
    ) -> Vec<[u8; capsule_format::TAG_LEN]> {
        let mut ciphertext = Vec::new();
        let mut tags = Vec::new();
        for chunk in 0..unsealer.header().chunk_count(layer) {
            let piece = unsealer.sealed_chunk(layer, sealed, chunk).unwrap();
            let (bytes, tag) = piece.split_at(piece.len() - capsule_format::TAG_LEN);
            ciphertext.extend_from_slice(bytes);
            tags.push(tag.try_into().unwrap());
        }
        let mut rest = &ciphertext[..];
        for buf in buffers {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(buf.as_mut_slice());
            let (mine, tail) = rest.split_at(bytes.len());
            bytes.copy_from_slice(mine);
            rest = tail;
        }
        assert!(rest.is_empty());
        tags
    }

    /// Chunks opened in parallel from a thread off rayon's pool (a query at one engine
    /// thread, opening the layer its next node reads) are shared with one of the pool's
    /// workers: the layer comes out whole, and with two tampered chunks the error names
    /// the first, as a serial pass would.
    #[test]
    fn chunks_shared_with_a_worker_open_whole_and_name_the_first_failure() {
        use crate::stream::open_chunks;

        let (graph, weights) = model(2000);
        let (bytes, key) = seal(&graph, &weights, 1000);
        let capsule = Capsule::parse(&bytes).unwrap();
        let unsealer = capsule.unseal(&key).unwrap();
        let layout = Layout::new(unsealer.header()).unwrap();
        let layer = layout_layer(&unsealer, "fc");
        let count = unsealer.header().chunk_count(layer);
        let mut store = Weights::new(graph.params.len());
        let want = layer_values(&layout, &graph, &weights, layer);
        assert!(rayon::current_thread_index().is_none());

        let sealed = capsule.sealed_layer(layer);
        let mut buffers = store.buffers(&layout, layer);
        open_chunks(&unsealer, layer, 0..count, sealed, &mut buffers, true).unwrap();
        assert_eq!(buffers.concat(), want);

        let mut tampered = sealed.to_vec();
        for bad in [550, 120] {
            tampered[bad * (1000 + capsule_format::TAG_LEN) + 7] ^= 1;
        }
        for _ in 0..20 {
            let err = open_chunks(&unsealer, layer, 0..count, &tampered, &mut buffers, true);
            match err {
                Err(capsule_format::Error::ChunkFailed { chunk, .. }) => assert_eq!(chunk, 120),
                other => panic!("{other:?}"),
            }
        }
    }

    /// A layer the query waits for is handed to its thread, which opens the rest on
    /// every core (here, off the pool, with one of the pool's workers), while the
    /// opener goes on to the next layers; all come out whole and in queue order.
    #[test]
    fn a_waited_for_layer_opens_whole_when_handed_over() {
        use crate::ahead::{Buffers, Job, Opener, Sealed};

        let (graph, weights) = model(8000);
        let (bytes, key) = seal(&graph, &weights, 4096);
        let capsule = Capsule::parse(&bytes).unwrap();
        let unsealer = capsule.unseal(&key).unwrap();
        let layout = Layout::new(unsealer.header()).unwrap();
        let fc = layout_layer(&unsealer, "fc");
        assert!(unsealer.header().layers[fc].plaintext_len > 2 << 20);
        // A chunk spans fc's weights and bias: opened in place through a scratch buffer.
        assert_ne!(layout.tensors(fc)[0].bytes % 4096, 0);
        // fc first, then two small layers, which the opener may finish while the
        // query's thread still opens fc.
        let order = [
            fc,
            layout_layer(&unsealer, "out"),
            layout_layer(&unsealer, "conv"),
        ];
        let mut store = Weights::new(graph.params.len());
        let want: Vec<Vec<f32>> = order
            .iter()
            .map(|&layer| layer_values(&layout, &graph, &weights, layer))
            .collect();
        let mut handed = 0;
        for _ in 0..50 {
            let opener = Opener::new();
            let got: Vec<(usize, Vec<f32>)> = rayon::in_place_scope(|scope| {
                for layer in order {
                    // fc (handed over) in place, as read from frames; the others apart.
                    let mut buffers = store.buffers(&layout, layer);
                    let sealed = capsule.sealed_layer(layer);
                    let sealed = if layer == fc {
                        Sealed::InPlace(in_place(&unsealer, layer, sealed, &mut buffers))
                    } else {
                        Sealed::Apart(sealed)
                    };
                    let job = Job {
                        layer,
                        sealed,
                        buffers: Buffers(buffers),
                    };
                    opener.push(job, &unsealer, scope);
                }
                order
                    .iter()
                    .map(|_| {
                        let opened = opener.next(&unsealer).unwrap();
                        assert!(opened.result.is_ok());
                        (opened.layer, opened.buffers.take().concat())
                    })
                    .collect()
            });
            let layers: Vec<usize> = got.iter().map(|(l, _)| *l).collect();
            assert_eq!(layers, order);
            for ((_, values), want) in got.iter().zip(&want) {
                assert_eq!(values, want);
            }
            handed += opener.handovers();
        }
        // The waiter is usually first to the lock; the opener then hands it fc.
        assert!(handed > 0, "never handed over in 50 queries");
    }

    /// Layer `layer`'s weights as it opens: its tensors' values back to back.
    fn layer_values(
        layout: &Layout,
        graph: &Graph,
        weights: &HashMap<String, Tensor>,
        layer: usize,
    ) -> Vec<f32> {
        layout
            .params_of(layer)
            .iter()
            .flat_map(|&p| weights[&graph.params[p].name].data().to_vec())
            .collect()
    }

    fn layout_layer(unsealer: &capsule_format::Unsealer, name: &str) -> usize {
        unsealer
            .header()
            .layers
            .iter()
            .position(|l| l.name == name)
            .unwrap()
    }

    /// Every item is worked on once, whichever of the two threads takes it.
    #[test]
    fn sharing_with_a_worker_takes_every_item_once() {
        for n in [0, 1, 5, 1000] {
            let seen = Mutex::new(Vec::new());
            share_with_worker(0..n, |i| seen.lock().unwrap().push(i));
            let mut seen = seen.into_inner().unwrap();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
        }
        let mut buf = vec![1.0f32; 5 * WIPE_PIECE];
        share_with_worker(buf.chunks_mut(WIPE_PIECE / 4), |p| p.fill(0.0));
        assert!(buf.iter().all(|&v| v == 0.0));
    }
}
