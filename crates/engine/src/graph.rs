//! The graph IR: what a model computes, without its weights.
//!
//! A [`Graph`] is the public architecture of a model. It is what a capsule
//! stores in the clear (as JSON, see `spec/capsule-v1.md` section "Architecture"),
//! and what the ONNX importer produces. It names every weight tensor it needs in
//! [`Graph::params`] but never holds their values: weights arrive separately,
//! so that the same graph runs on plain or unsealed weights.
//!
//! Only what the engine can execute is representable: every [`Op`] variant has
//! a kernel. Layouts are ONNX's: tensors are row-major, images are NCHW.

use serde::{Deserialize, Serialize};

/// A model's architecture: inputs, weight declarations, nodes and outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// The graph's inputs in call order. A `None` dimension is dynamic
    /// (usually the batch dimension) and is fixed by the caller's tensor.
    pub inputs: Vec<ValueInfo>,
    /// The weight tensors the graph reads, with their exact shapes.
    pub params: Vec<ParamInfo>,
    /// The nodes in a topological order: each node's inputs are graph
    /// inputs, params, or outputs of earlier nodes.
    pub nodes: Vec<Node>,
    /// The names of the values the graph returns, in order.
    pub outputs: Vec<String>,
}

/// A graph input: its name and shape (`None` marks a dynamic dimension).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValueInfo {
    /// Value name, unique in the graph.
    pub name: String,
    /// Dimensions; `None` is dynamic.
    pub shape: Vec<Option<usize>>,
}

/// A weight tensor the graph reads: name and shape. Values are supplied at load time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamInfo {
    /// Value name, unique in the graph.
    pub name: String,
    /// Exact shape.
    pub shape: Vec<usize>,
}

/// One operation applied to named values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The node's name in the source model (for error messages and layer names).
    pub name: String,
    /// What the node computes.
    pub op: Op,
    /// Input value names, in the operator's order (ONNX's).
    pub inputs: Vec<String>,
    /// Output value names.
    pub outputs: Vec<String>,
}

/// The operators the engine executes, with ONNX semantics (opset 13 unless noted).
///
/// Constant operands that ONNX passes as inputs (Clip's bounds, Reshape's
/// shape) are attributes here: the importer folds them, so the executor never
/// reads integer tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op")]
pub enum Op {
    /// 2-D convolution, NCHW. Inputs: X, W `[M, C/group, kH, kW]`, optional B `[M]`.
    /// `activation` is a fused element-wise op applied after the bias.
    Conv(ConvAttrs),
    /// `Y = alpha * op(A) * op(B) + beta * C`, A and B rank 2, C broadcast
    /// (unidirectionally) to the output.
    Gemm {
        /// Scale of the product.
        alpha: f32,
        /// Scale of C.
        beta: f32,
        /// Transpose A before the product.
        trans_a: bool,
        /// Transpose B before the product.
        trans_b: bool,
    },
    /// numpy `matmul`: rank >= 1, leading dimensions broadcast.
    MatMul,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, min), max)`; ReLU6 is `Clip { min: 0, max: 6 }`.
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// `1 / (1 + exp(-x))`.
    Sigmoid,
    /// `min(max(alpha * x + beta, 0), 1)`; `x * HardSigmoid(x)` with alpha
    /// 1/6 and beta 1/2 is HardSwish (MobileNetV3's activation).
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// Hyperbolic tangent.
    Tanh,
    /// Max pooling over H and W; padding never wins the max.
    MaxPool(PoolAttrs),
    /// Average pooling over H and W.
    AveragePool {
        /// Window geometry.
        #[serde(flatten)]
        pool: PoolAttrs,
        /// Count padded cells in the divisor.
        count_include_pad: bool,
    },
    /// Mean over H and W, keeping them as size 1.
    GlobalAveragePool,
    /// Element-wise sum with numpy broadcasting.
    Add,
    /// Element-wise difference with numpy broadcasting.
    Sub,
    /// Element-wise product with numpy broadcasting.
    Mul,
    /// Element-wise quotient with numpy broadcasting.
    Div,
    /// Join inputs along `axis` (negative counts from the end).
    Concat {
        /// The axis to join along.
        axis: i64,
    },
    /// Reshape to 2-D: dimensions before `axis` form the rows.
    Flatten {
        /// First dimension of the columns (negative counts from the end).
        axis: i64,
    },
    /// Reshape to `shape`; `0` copies the input's dimension (unless `allowzero`),
    /// `-1` is inferred.
    Reshape {
        /// Target shape.
        shape: Vec<i64>,
        /// Treat `0` as a literal zero dimension.
        allowzero: bool,
    },
    /// `exp(x) / sum(exp(x))` along `axis` (opset 13 semantics).
    Softmax {
        /// The axis to normalise over.
        axis: i64,
    },
    /// Output equals input (ONNX Identity, and Dropout at inference).
    Identity,
}

/// An element-wise activation fused into the op that precedes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Activation {
    /// No activation.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, min), max)`.
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
}

/// Convolution geometry (2-D only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvAttrs {
    /// `[kH, kW]`.
    pub kernel: [usize; 2],
    /// `[sH, sW]`.
    pub strides: [usize; 2],
    /// `[top, left, bottom, right]`, ONNX's `pads` order.
    pub pads: [usize; 4],
    /// `[dH, dW]`.
    pub dilations: [usize; 2],
    /// Number of groups; `group == C == M` is a depthwise convolution.
    pub group: usize,
    /// Activation applied after the bias (set by fusion; `None` from ONNX).
    #[serde(default)]
    pub activation: Activation,
}

/// Pooling window geometry (2-D only).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolAttrs {
    /// `[kH, kW]`.
    pub kernel: [usize; 2],
    /// `[sH, sW]`.
    pub strides: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    /// `[dH, dW]`.
    pub dilations: [usize; 2],
    /// Round the output size up instead of down.
    pub ceil_mode: bool,
}

impl Op {
    /// The ONNX operator name (`"Conv"`, `"MaxPool"`, ...), for messages and layer names.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Op::Conv(_) => "Conv",
            Op::Gemm { .. } => "Gemm",
            Op::MatMul => "MatMul",
            Op::Relu => "Relu",
            Op::Clip { .. } => "Clip",
            Op::Sigmoid => "Sigmoid",
            Op::HardSigmoid { .. } => "HardSigmoid",
            Op::Tanh => "Tanh",
            Op::MaxPool(_) => "MaxPool",
            Op::AveragePool { .. } => "AveragePool",
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::Add => "Add",
            Op::Sub => "Sub",
            Op::Mul => "Mul",
            Op::Div => "Div",
            Op::Concat { .. } => "Concat",
            Op::Flatten { .. } => "Flatten",
            Op::Reshape { .. } => "Reshape",
            Op::Softmax { .. } => "Softmax",
            Op::Identity => "Identity",
        }
    }
}

impl Graph {
    /// The architecture as compact JSON, the form a capsule stores.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a Graph always serialises")
    }

    /// Parses an architecture written by [`Graph::to_json`].
    pub fn from_json(bytes: &[u8]) -> Result<Graph, crate::Error> {
        serde_json::from_slice(bytes).map_err(|e| crate::Error::InvalidGraph {
            reason: format!("architecture JSON does not parse: {e}"),
        })
    }

    /// Number of weight scalars the graph declares.
    pub fn param_count(&self) -> usize {
        self.params
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }
}
