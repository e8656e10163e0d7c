//! The importer's one error type.

use std::fmt;

/// Why an ONNX model cannot be imported.
///
/// Every message says what is wrong and, where there is one, what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The bytes are not an ONNX model: protobuf decoding failed, or the
    /// message that decoded holds no graph.
    NotOnnx {
        /// What failed.
        reason: String,
    },
    /// The model's default-domain operator set is outside the supported range
    /// ([`crate::MIN_OPSET`] to [`crate::MAX_OPSET`]).
    UnsupportedOpset {
        /// The operator set domain (`""` is the default ONNX domain).
        domain: String,
        /// The declared version.
        version: i64,
    },
    /// A node uses an operator from a custom domain (`com.microsoft`, ...).
    UnsupportedDomain {
        /// The node's domain.
        domain: String,
        /// The node's operator type.
        op: String,
        /// The node's name.
        node: String,
    },
    /// A node uses an ONNX operator the engine has no kernel for.
    UnsupportedOp {
        /// The operator type, e.g. `LSTM`.
        op: String,
        /// The node's name.
        node: String,
    },
    /// A supported operator is used in a way the engine cannot express
    /// (a 1-D convolution, a non-constant shape, a used Dropout mask, ...).
    UnsupportedNode {
        /// The operator type.
        op: String,
        /// The node's name.
        node: String,
        /// What is not supported.
        reason: String,
    },
    /// A value has an element type the engine does not compute in (it computes
    /// in float32 only; float64 weights are converted).
    UnsupportedDataType {
        /// The value's name.
        value: String,
        /// The ONNX type name, e.g. `int64`.
        data_type: String,
    },
    /// A tensor keeps its data in a file next to the model (ONNX external data).
    ExternalData {
        /// The tensor's name.
        tensor: String,
    },
    /// The model is malformed: inconsistent tensor sizes, a dangling value,
    /// an attribute of the wrong type or out of range, ...
    InvalidModel {
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotOnnx { reason } => write!(
                f,
                "not an ONNX model ({reason}); pass the .onnx file exported by your framework"
            ),
            Error::UnsupportedOpset { domain, version } => {
                let domain = if domain.is_empty() { "ai.onnx" } else { domain };
                write!(
                    f,
                    "unsupported ONNX opset {version} for domain '{domain}' (supported: {}-{}); \
                     re-export the model with opset 13-17",
                    crate::MIN_OPSET,
                    crate::MAX_OPSET
                )
            }
            Error::UnsupportedDomain { domain, op, node } => write!(
                f,
                "unsupported operator '{op}' from custom domain '{domain}' in node '{node}'; \
                 only standard ONNX operators are supported: export without custom or \
                 runtime-specific operators (e.g. without onnxruntime graph optimisations)"
            ),
            Error::UnsupportedOp { op, node } => {
                let supported: Vec<&str> = crate::ops::supported().collect();
                write!(
                    f,
                    "unsupported ONNX operator '{op}' in node '{node}'; supported operators: {}",
                    supported.join(", ")
                )
            }
            Error::UnsupportedNode { op, node, reason } => {
                write!(f, "cannot import node '{node}' ({op}): {reason}")
            }
            Error::UnsupportedDataType { value, data_type } => write!(
                f,
                "value '{value}' has element type {data_type}, but the engine computes in \
                 float32 only; export the model with float32 inputs and weights"
            ),
            Error::ExternalData { tensor } => write!(
                f,
                "tensor '{tensor}' stores its data in an external file, which is not \
                 supported; re-save the model as one file, e.g. with \
                 onnx.save(model, path, save_as_external_data=False)"
            ),
            Error::InvalidModel { reason } => write!(f, "invalid ONNX model: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// An [`Error::InvalidModel`] with the given reason.
    pub(crate) fn invalid(reason: impl Into<String>) -> Error {
        Error::InvalidModel {
            reason: reason.into(),
        }
    }
}
