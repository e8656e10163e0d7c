//! How a model's weights are cut into the capsule's layers at seal time.
//!
//! The enclave unseals a layer just before the first node that reads it and
//! zeroizes it after the last ([`crate::SealedModel`], spec/enclave-protocol.md), so the
//! grouping decides how much plaintext is alive at once. It lives here, beside the code
//! that reads the layers back, so that `mlcapsule seal`, the benchmarks and the tests
//! cannot group differently from what the enclave expects.

use std::collections::{HashMap, HashSet};

use capsule_engine::{Graph, Tensor};
use capsule_format::LayerPlaintext;

/// Groups `weights` into capsule layers: one layer per node that is the first to read
/// one or more weights, named after that node and holding those weights in the order the
/// node reads them. `prefix` is put before every layer and tensor name (the detector's
/// layers use [`capsule_format::DETECTOR_PREFIX`]).
///
/// Weights no node reads are left out; the engine refuses such a graph before sealing.
pub fn seal_layers<'a>(
    graph: &Graph,
    weights: &'a HashMap<String, Tensor>,
    prefix: &str,
) -> Vec<LayerPlaintext<'a>> {
    let mut assigned = HashSet::new();
    let mut layers = Vec::new();
    for node in &graph.nodes {
        let tensors: Vec<_> = node
            .inputs
            .iter()
            .filter_map(|name| weights.get_key_value(name))
            .filter(|(name, _)| assigned.insert(name.as_str()))
            .map(|(name, t)| (format!("{prefix}{name}"), t.shape().to_vec(), t.data()))
            .collect();
        if !tensors.is_empty() {
            layers.push(LayerPlaintext {
                name: format!("{prefix}{}", node.name),
                tensors,
            });
        }
    }
    layers
}
