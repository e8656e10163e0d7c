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
/// A weight that several nodes read (exporters tie equal tensors, such as two all-zero
/// biases) gets a layer of its own, named after it, just before its first reader's: so
/// every node's own weights stay apart from what it shares, and a dense layer whose bias
/// is shared can still be streamed chunk by chunk.
///
/// Weights no node reads are left out; the engine refuses such a graph before sealing.
pub fn seal_layers<'a>(
    graph: &Graph,
    weights: &'a HashMap<String, Tensor>,
    prefix: &str,
) -> Vec<LayerPlaintext<'a>> {
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for node in &graph.nodes {
        let read: HashSet<&str> = node.inputs.iter().map(String::as_str).collect();
        for name in read.into_iter().filter(|name| weights.contains_key(*name)) {
            *readers.entry(name).or_default() += 1;
        }
    }
    let mut assigned = HashSet::new();
    let mut layers = Vec::new();
    for node in &graph.nodes {
        let mut own = Vec::new();
        for (name, t) in node
            .inputs
            .iter()
            .filter_map(|name| weights.get_key_value(name))
        {
            if !assigned.insert(name.as_str()) {
                continue;
            }
            let tensor = (format!("{prefix}{name}"), t.shape().to_vec(), t.data());
            if readers[name.as_str()] > 1 {
                layers.push(LayerPlaintext {
                    name: format!("{prefix}{name}"),
                    tensors: vec![tensor],
                });
            } else {
                own.push(tensor);
            }
        }
        if !own.is_empty() {
            layers.push(LayerPlaintext {
                name: format!("{prefix}{}", node.name),
                tensors: own,
            });
        }
    }
    layers
}
