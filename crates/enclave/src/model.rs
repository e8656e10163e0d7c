//! From an authenticated header to a runnable model: where each weight lives
//! ([`Layout`]), the weights themselves in zeroizing storage ([`Weights`]),
//! and [`SealedModel`], the in-process way to open a capsule.

use std::collections::HashMap;

use capsule_engine::{Graph, ParamInfo, Plan, Tensor, WeightSource};
use capsule_format::{Capsule, DETECTOR_PREFIX, Header, ModelKey, Unsealer};
use zeroize::Zeroize;

use crate::error::Error;

/// The public graph of a capsule, compiled, and where each of its weights is
/// sealed: which layer, and which nodes need which layers when.
pub(crate) struct Layout {
    plan: Plan,
    /// Param index of each sealed tensor, by name.
    param_of: HashMap<String, usize>,
    /// Param indices held by each layer.
    layer_params: Vec<Vec<usize>>,
    /// The last node that reads each layer; `None` if no node does.
    layer_last_use: Vec<Option<usize>>,
    /// The highest layer each node reads; `None` if it reads no weight.
    node_needs: Vec<Option<usize>>,
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
        let mut node_needs = Vec::with_capacity(graph.nodes.len());
        for (j, node) in graph.nodes.iter().enumerate() {
            let mut needs = None;
            for input in &node.inputs {
                if let Some(&(index, _)) = declared.get(input.as_str())
                    && let Some(layer) = layer_of_param[index]
                {
                    layer_last_use[layer] = Some(j);
                    needs = needs.max(Some(layer));
                }
            }
            node_needs.push(needs);
        }
        Ok(Layout {
            plan,
            param_of,
            layer_params,
            layer_last_use,
            node_needs,
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

    /// Decodes layer `layer`'s plaintext into `weights` (capsule-v1 §4.3).
    pub fn install(
        &self,
        unsealer: &Unsealer,
        layer: usize,
        plaintext: &[u8],
        weights: &mut Weights,
    ) -> Result<(), Error> {
        for (name, shape, values) in unsealer.layer_tensors(layer, plaintext) {
            let mut tensor = Tensor::new(shape, values).map_err(Error::Engine)?;
            // Layout::new mapped every sealed name to a param.
            match self.param_of.get(&name) {
                Some(&index) => weights.put(index, tensor),
                None => tensor.data_mut().zeroize(),
            }
        }
        Ok(())
    }

    /// Zeroizes and drops the weights of layer `layer`.
    pub fn evict(&self, layer: usize, weights: &mut Weights) {
        for &index in &self.layer_params[layer] {
            weights.clear(index);
        }
    }
}

/// Weight tensors by param index; every value is zeroized before it is freed.
pub(crate) struct Weights(Vec<Option<Tensor>>);

impl Weights {
    /// Room for `n` params, none present.
    pub fn new(n: usize) -> Weights {
        Weights((0..n).map(|_| None).collect())
    }

    fn put(&mut self, index: usize, tensor: Tensor) {
        self.clear(index);
        self.0[index] = Some(tensor);
    }

    fn clear(&mut self, index: usize) {
        if let Some(mut tensor) = self.0[index].take() {
            tensor.data_mut().zeroize();
        }
    }
}

impl Drop for Weights {
    fn drop(&mut self) {
        for index in 0..self.0.len() {
            self.clear(index);
        }
    }
}

impl WeightSource for Weights {
    fn param(&self, index: usize, _info: &ParamInfo) -> Option<&Tensor> {
        self.0.get(index)?.as_ref()
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
        let mut weights = Weights::new(layout.plan().graph().params.len());
        // The developer mode runs the model alone: the detector's layers stay sealed.
        for layer in header.detector_layers()..header.layers.len() {
            let plaintext = unsealer.open_layer(layer, capsule.sealed_layer(layer))?;
            layout.install(&unsealer, layer, &plaintext, &mut weights)?;
        }
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
