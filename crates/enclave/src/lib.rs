//! MLCapsule's trusted side: turns a capsule and its model key into a runnable model.
//!
//! Today this crate opens a capsule in the calling process (the provider's
//! developer mode). It is the code that will run inside the enclave process:
//! it verifies the header MAC, unseals each layer, checks that the sealed
//! tensors are exactly the weights the public architecture declares, and
//! hands them to the engine. Plaintext weights live only in zeroizing buffers
//! while they are decoded, and then in the engine's own tensors.
//!
//! ```no_run
//! # fn demo(bytes: &[u8], key: &capsule_format::ModelKey, x: capsule_engine::Tensor) {
//! let capsule = capsule_format::Capsule::parse(bytes).unwrap();
//! let model = capsule_enclave::SealedModel::open(&capsule, key).unwrap();
//! let outputs = model.run(&[x]).unwrap();
//! # }
//! ```
//!
//! What it does not do: parse ONNX, talk to a network, or read files; the
//! host hands it every byte.

use std::collections::HashMap;
use std::fmt;

use capsule_engine::{Graph, Model, Tensor};
use capsule_format::{Capsule, Header, ModelKey};

/// Why a capsule could not be opened or run.
#[derive(Debug)]
pub enum Error {
    /// The capsule or key was rejected (tampering, wrong key, corruption).
    Format(capsule_format::Error),
    /// The authenticated architecture is not a graph this engine can run.
    Architecture(capsule_engine::Error),
    /// The model rejected an input, or the weights do not fit the graph.
    Engine(capsule_engine::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Format(e) => e.fmt(f),
            Error::Architecture(e) => write!(
                f,
                "{e}; the capsule was sealed by an incompatible mlcapsule version, upgrade mlcapsule"
            ),
            Error::Engine(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl From<capsule_format::Error> for Error {
    fn from(e: capsule_format::Error) -> Error {
        Error::Format(e)
    }
}

/// A model whose weights were unsealed from a capsule, ready to run.
pub struct SealedModel {
    header: Header,
    model: Model,
}

impl SealedModel {
    /// Verifies and unseals `capsule` with `key` and builds the engine model.
    pub fn open(capsule: &Capsule<'_>, key: &ModelKey) -> Result<SealedModel, Error> {
        let unsealer = capsule.unseal(key)?;
        let header = unsealer.header().clone();
        let graph: Graph = serde_json::from_value(header.architecture.clone()).map_err(|e| {
            Error::Architecture(capsule_engine::Error::InvalidGraph {
                reason: format!("architecture does not parse: {e}"),
            })
        })?;
        let mut weights = HashMap::with_capacity(header.tensors.len());
        for layer in 0..header.layers.len() {
            let plaintext = unsealer.open_layer(layer, capsule.sealed_layer(layer))?;
            for (name, shape, values) in unsealer.layer_tensors(layer, &plaintext) {
                let tensor = Tensor::new(shape, values).map_err(Error::Engine)?;
                if weights.insert(name.clone(), tensor).is_some() {
                    return Err(Error::Engine(capsule_engine::Error::InvalidWeights {
                        reason: format!("tensor '{name}' is sealed twice"),
                    }));
                }
            }
        }
        // Model::new checks that the sealed tensors are exactly the declared params.
        let model = Model::new(graph, weights).map_err(Error::Engine)?;
        Ok(SealedModel { header, model })
    }

    /// The authenticated header: preprocessing, labels, policy.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The model's public graph.
    pub fn graph(&self) -> &Graph {
        self.model.graph()
    }

    /// Runs one batch.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        self.model.run(inputs).map_err(Error::Engine)
    }
}
