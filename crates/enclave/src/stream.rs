//! The paper's "MLCapsule layer" (`spec/enclave-protocol.md` §5.6): during a
//! query the host streams every layer's sealed chunks, and the enclave unseals
//! each layer just before the first node that reads it runs, and zeroizes it
//! right after the last one has.
//!
//! [`LayerStream`] is the engine's [`WeightSource`] for one query: its
//! `prepare` hook pulls `Layer` frames from the host until the layers the
//! next node reads are there, its `release` hook evicts the layers no later
//! node reads. So at any time only the layers in use are in plaintext, in
//! the enclave's own zeroizing buffers.

use std::io::Read;

use capsule_engine::{Node, ParamInfo, Tensor, WeightSource};
use capsule_format::{TAG_LEN, Unsealer};

use crate::error::Error;
use crate::model::{Layout, Weights};
use crate::protocol::{FrameReader, LayerChunk, MessageType, ReadError};

/// Why a query's layer stream stopped.
pub(crate) enum StreamFailure {
    /// The host closed the pipe or it failed: nobody is left to answer.
    Gone,
    /// The host broke the protocol: report, then exit.
    Broken(Error),
    /// A layer did not authenticate: report, and serve on (the stream was drained).
    Rejected(Error),
}

/// The weights of one query, pulled from the host layer by layer.
///
/// A stream covers a range of the capsule's layers: all of them, or the input detector's
/// (the first ones, capsule-v1 §4.6) and then the model's, one stream after the other.
pub(crate) struct LayerStream<'a, R> {
    frames: &'a mut FrameReader<R>,
    unsealer: &'a Unsealer,
    layout: &'a Layout,
    weights: Weights,
    /// Layers fully received (the next one expected is this index).
    received: usize,
    /// One past the last layer of this stream.
    end: usize,
    /// Index of the node about to run or running.
    node: usize,
    /// The sealed bytes of the layer being received (ciphertext only).
    sealed: Vec<u8>,
    failure: Option<StreamFailure>,
}

impl<'a, R: Read> LayerStream<'a, R> {
    /// A stream of layers `layers` of the capsule `unsealer` opens, whose weights
    /// `layout` reads (it must read none outside the range). The host sends the
    /// range's first layer next.
    pub fn new(
        frames: &'a mut FrameReader<R>,
        unsealer: &'a Unsealer,
        layout: &'a Layout,
        layers: std::ops::Range<usize>,
    ) -> LayerStream<'a, R> {
        LayerStream {
            frames,
            unsealer,
            layout,
            weights: Weights::new(layout.plan().graph().params.len()),
            received: layers.start,
            end: layers.end,
            node: 0,
            sealed: Vec::new(),
            failure: None,
        }
    }

    /// Reads the rest of the stream (every layer must be sent, whatever
    /// happened), zeroizes what is left, and says whether it all went well.
    pub fn finish(mut self) -> Result<(), StreamFailure> {
        while self.received < self.end {
            if let Some(StreamFailure::Gone | StreamFailure::Broken(_)) = &self.failure {
                break;
            }
            // Whatever the run did not read is not needed: drain it unopened.
            if let Err(failure) = self.receive(false) {
                self.failure = Some(failure);
            }
        }
        match self.failure.take() {
            None => Ok(()),
            Some(failure) => Err(failure),
        }
    }

    /// Receives the next layer's chunks; with `keep`, unseals it into the weights.
    fn receive(&mut self, keep: bool) -> Result<(), StreamFailure> {
        let layer = self.received;
        let header = self.unsealer.header();
        let chunks = header.chunk_count(layer);
        let chunk_size = u64::from(header.chunk_size);
        let plaintext_len = header.layers[layer].plaintext_len;
        self.sealed.clear();
        for chunk in 0..chunks {
            let plain = if chunk + 1 < chunks {
                chunk_size
            } else {
                plaintext_len - chunk * chunk_size
            };
            let expected_len = plain + TAG_LEN as u64;
            let frame = self.frames.read().map_err(|e| match e {
                ReadError::Closed | ReadError::Io(_) => StreamFailure::Gone,
                ReadError::Malformed(e) => StreamFailure::Broken(e),
            })?;
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
            if frame.blob.len() as u64 != expected_len {
                return Err(broken(format!(
                    "layer {layer} chunk {chunk} must be {expected_len} bytes, got {}",
                    frame.blob.len()
                )));
            }
            if keep {
                self.sealed.extend_from_slice(frame.blob);
            }
        }
        self.received += 1;
        if keep && !self.layout.unread(layer) {
            let plaintext = self
                .unsealer
                .open_layer(layer, &self.sealed)
                .map_err(|e| StreamFailure::Rejected(Error::Format(e)))?;
            self.layout
                .install(self.unsealer, layer, &plaintext, &mut self.weights)
                .map_err(StreamFailure::Rejected)?;
        }
        Ok(())
    }
}

impl<R: Read> WeightSource for LayerStream<'_, R> {
    fn prepare(&mut self, _node: &Node) -> Result<(), capsule_engine::Error> {
        if self.failure.is_none()
            && let Some(needed) = self.layout.needs(self.node)
        {
            while self.received <= needed && self.received < self.end {
                if let Err(failure) = self.receive(true) {
                    self.failure = Some(failure);
                    break;
                }
            }
        }
        match self.failure {
            None => Ok(()),
            // The real failure is kept in `self.failure` and reported by `finish`.
            Some(_) => Err(capsule_engine::Error::InvalidWeights {
                reason: "the layer stream failed".into(),
            }),
        }
    }

    fn param(&self, index: usize, info: &ParamInfo) -> Option<&Tensor> {
        self.weights.param(index, info)
    }

    fn release(&mut self, _node: &Node) {
        for layer in self.layout.done_after(self.node) {
            self.layout.evict(layer, &mut self.weights);
        }
        self.node += 1;
    }
}
