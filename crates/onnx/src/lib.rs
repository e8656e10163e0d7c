//! ONNX models to MLCapsule's engine IR, on the provider's side.
//!
//! [`import`] decodes an ONNX file (protobuf, with hand-written prost
//! messages: no build script, no `protoc`) and converts it into a
//! [`capsule_engine::Graph`] plus its weights, ready to be sealed. The
//! conversion happens once, when the provider seals a model: the client
//! runtime (the enclave) only ever reads the engine's own graph format and
//! never parses protobuf.
//!
//! What the import does:
//!
//! - checks the default-domain opset ([`MIN_OPSET`] to [`MAX_OPSET`]) and
//!   rejects custom-domain operators;
//! - folds initializers, `Constant` and `ConstantOfShape` nodes into constants; constant
//!   operands that the engine takes as attributes (Clip's bounds, Reshape's
//!   shape) become attributes, float constants that nodes read become params;
//! - converts each node with ONNX's attribute defaults for that opset,
//!   turning `auto_pad` into explicit pads and mapping pre-13 Softmax onto
//!   opset-13 semantics only where they agree;
//! - folds BatchNormalization into the preceding Conv or Gemm, or otherwise
//!   runs it as a per-channel Mul and Add;
//! - removes Identity and Dropout nodes (an Identity of a constant is that
//!   constant), Pads that add no cells, dead nodes and unread weights;
//! - names every node uniquely (`{op_type}_{index}` when the model has no name).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let bytes = include_bytes!("../tests/vectors/relu/model.onnx");
//! // bytes: the contents of an exported `model.onnx`
//! let imported = capsule_onnx::import(bytes)?;
//! println!(
//!     "opset {}: {} nodes, {} weight scalars",
//!     imported.opset,
//!     imported.graph.nodes.len(),
//!     imported.graph.param_count()
//! );
//! # Ok(())
//! # }
//! ```
//!
//! Not here: executing a model (`capsule-engine`), encryption and the capsule
//! format (`capsule-format`), file I/O (the CLI reads the file), ONNX models
//! with external data files, shape computations at run time (`Shape`,
//! `Gather`, ... feeding a Reshape), and operators beyond the engine's set (an
//! unsupported one fails with [`Error::UnsupportedOp`] naming it and its node).
//! The enclave never links this crate.
//!
//! Memory: the decoded protobuf and the converted weights coexist briefly, so
//! importing takes about three times the model file's size at peak.

mod attributes;
mod constant;
mod draft;
mod error;
mod fold;
mod ops;
mod proto;
mod prune;
mod shape;

use std::collections::{HashMap, HashSet};

use capsule_engine::{Graph, Tensor, ValueInfo};
use prost::Message;

use crate::attributes::Attributes;
use crate::constant::Constant;
use crate::draft::Draft;
use crate::proto::{GraphProto, ModelProto, ValueInfoProto, data_type, type_proto};
pub use error::Error;

/// The oldest default-domain ONNX opset the importer accepts.
pub const MIN_OPSET: i64 = 7;
/// The newest default-domain ONNX opset the importer accepts.
pub const MAX_OPSET: i64 = 21;

/// An imported model: the engine graph and the weights its params name.
#[derive(Clone, Debug, PartialEq)]
pub struct Imported {
    /// The architecture, in the engine's IR.
    pub graph: Graph,
    /// One tensor per entry of `graph.params`, by name, with the declared shape.
    pub weights: HashMap<String, Tensor>,
    /// The model's default-domain (`ai.onnx`) opset version.
    pub opset: i64,
}

/// Imports an ONNX model from the bytes of a `.onnx` file.
///
/// Fails with [`Error::NotOnnx`] when the bytes are not an ONNX model, and
/// with the other variants when the model is malformed or uses what the
/// engine cannot run. Never panics on any input.
pub fn import(bytes: &[u8]) -> Result<Imported, Error> {
    let mut model = ModelProto::decode(bytes).map_err(|e| Error::NotOnnx {
        reason: format!("protobuf decoding failed: {e}"),
    })?;
    let Some(mut graph) = model.graph.take() else {
        return Err(Error::NotOnnx {
            reason: "the protobuf message holds no ONNX graph".into(),
        });
    };
    let opset = default_opset(&model)?;
    if graph.node.is_empty() {
        return Err(Error::invalid("the graph has no nodes"));
    }
    if graph.output.is_empty() {
        return Err(Error::invalid("the graph declares no outputs"));
    }
    let mut draft = Draft::new(opset, value_names(&graph), source_reads(&graph));

    let mut initializers = HashSet::new();
    // Each tensor's protobuf copy is dropped once converted, so that the
    // weights are not held twice.
    for tensor in std::mem::take(&mut graph.initializer) {
        let name = tensor.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(Error::invalid("an initializer has no name"));
        }
        draft.add_constant(&name, Constant::from_proto(&tensor, &name)?)?;
        initializers.insert(name);
    }
    // Before IR version 4, initializers were also listed as inputs; they are
    // weights, not inputs the caller supplies.
    for input in &graph.input {
        if !initializers.contains(input.name.as_deref().unwrap_or("")) {
            draft.add_input(graph_input(input)?)?;
        }
    }
    for info in graph.value_info.iter().chain(&graph.output) {
        if let (Some(name), Some(shape)) = (&info.name, declared_shape(info)) {
            draft.declare_shape(name, shape);
        }
    }

    let names = node_names(&graph, &mut draft);
    for (node, name) in graph.node.iter().zip(&names) {
        convert_node(node, name, &mut draft)?;
    }

    for output in &graph.output {
        let name = output.name.as_deref().unwrap_or("");
        if !draft.is_defined(name) {
            return Err(Error::invalid(format!(
                "graph output '{name}' is not produced by any node"
            )));
        }
        if let Some(t) = tensor_type(output) {
            let elem = t.elem_type.unwrap_or(data_type::FLOAT);
            if elem != data_type::FLOAT {
                return Err(Error::UnsupportedDataType {
                    value: name.to_string(),
                    data_type: data_type::name(elem).to_string(),
                });
            }
        }
        draft.outputs.push(name.to_string());
    }

    fold::fold_affine(&mut draft);
    prune::remove_identities(&mut draft);
    prune::remove_dead_nodes(&mut draft);
    let (graph, weights) = draft.finish()?;
    Ok(Imported {
        graph,
        weights,
        opset,
    })
}

/// The default-domain opset, checked against the supported range.
fn default_opset(model: &ModelProto) -> Result<i64, Error> {
    let version = model
        .opset_import
        .iter()
        .find(|o| matches!(o.domain.as_deref(), None | Some("" | "ai.onnx")))
        .map(|o| o.version.unwrap_or(0))
        .ok_or_else(|| {
            Error::invalid(
                "the model declares no opset for the default ONNX domain; \
                 re-export it with opset 13-17",
            )
        })?;
    if !(MIN_OPSET..=MAX_OPSET).contains(&version) {
        return Err(Error::UnsupportedOpset {
            domain: String::new(),
            version,
        });
    }
    Ok(version)
}

/// Converts one ONNX node with the converter registered for its op type.
fn convert_node(node: &proto::NodeProto, name: &str, draft: &mut Draft) -> Result<(), Error> {
    let op = node.op_type.as_deref().unwrap_or("");
    if op.is_empty() {
        return Err(Error::invalid(format!("node '{name}' has no op_type")));
    }
    let domain = node.domain.as_deref().unwrap_or("");
    if !domain.is_empty() && domain != "ai.onnx" {
        return Err(Error::UnsupportedDomain {
            domain: domain.to_string(),
            op: op.to_string(),
            node: name.to_string(),
        });
    }
    let Some(convert) = ops::converter(op) else {
        return Err(Error::UnsupportedOp {
            op: op.to_string(),
            node: name.to_string(),
        });
    };
    for input in node.input.iter().filter(|i| !i.is_empty()) {
        if !draft.is_defined(input) {
            return Err(Error::invalid(format!(
                "node '{name}' ({op}) reads '{input}', which no earlier node, input or \
                 initializer defines (the nodes must be in topological order)"
            )));
        }
    }
    let cx = ops::NodeCx {
        name,
        op,
        opset: draft.opset,
        inputs: &node.input,
        outputs: &node.output,
        attrs: Attributes::new(op, name, &node.attribute)?,
    };
    convert(&cx, draft)
}

/// A unique name per node: its own when it has a unique one, else
/// `{op_type}_{index}` (made unique).
fn node_names(graph: &GraphProto, draft: &mut Draft) -> Vec<String> {
    let mut names: Vec<Option<String>> = graph
        .node
        .iter()
        .map(|n| {
            let name = n.name.as_deref().unwrap_or("");
            (!name.is_empty() && draft.reserve_node(name)).then(|| name.to_string())
        })
        .collect();
    for (i, (slot, node)) in names.iter_mut().zip(&graph.node).enumerate() {
        if slot.is_none() {
            let op = node.op_type.as_deref().unwrap_or("node");
            *slot = Some(draft.fresh_node(&format!("{op}_{i}")));
        }
    }
    names.into_iter().flatten().collect()
}

/// Every value name the model mentions, so generated names avoid them all.
fn value_names(graph: &GraphProto) -> HashSet<String> {
    let infos = graph
        .input
        .iter()
        .chain(&graph.output)
        .chain(&graph.value_info)
        .filter_map(|v| v.name.clone());
    let tensors = graph.initializer.iter().filter_map(|t| t.name.clone());
    let nodes = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output).cloned());
    infos.chain(tensors).chain(nodes).collect()
}

/// How many nodes read each value in the source model, graph outputs counting once.
fn source_reads(graph: &GraphProto) -> HashMap<String, usize> {
    let mut reads = HashMap::new();
    let nodes = graph.node.iter().flat_map(|n| &n.input);
    let outputs = graph.output.iter().filter_map(|o| o.name.as_ref());
    for name in nodes.chain(outputs).filter(|n| !n.is_empty()) {
        *reads.entry(name.clone()).or_default() += 1;
    }
    reads
}

fn tensor_type(info: &ValueInfoProto) -> Option<&type_proto::Tensor> {
    match info.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => Some(t),
    }
}

/// The shape a value info declares, `None` for unknown dimensions; `None`
/// altogether when it declares no rank.
fn declared_shape(info: &ValueInfoProto) -> Option<shape::Shape> {
    use proto::tensor_shape_proto::dimension::Value;
    let shape = tensor_type(info)?.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Value::DimValue(v)) => usize::try_from(v).ok(),
                _ => None,
            })
            .collect(),
    )
}

/// A graph input the caller supplies: float32 with a known rank.
fn graph_input(info: &ValueInfoProto) -> Result<ValueInfo, Error> {
    let name = info.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(Error::invalid("a graph input has no name"));
    }
    let Some(t) = tensor_type(info) else {
        return Err(Error::invalid(format!(
            "graph input '{name}' is not a tensor (sequences, maps and optionals are not supported)"
        )));
    };
    let elem = t.elem_type.unwrap_or(0);
    if elem != data_type::FLOAT {
        return Err(Error::UnsupportedDataType {
            value: name,
            data_type: data_type::name(elem).to_string(),
        });
    }
    let Some(shape) = declared_shape(info) else {
        return Err(Error::invalid(format!(
            "graph input '{name}' declares no shape; re-export the model with input shapes \
             (dynamic dimensions are fine)"
        )));
    };
    Ok(ValueInfo { name, shape })
}

#[cfg(test)]
mod tests;
