//! The engine's one error type.

use std::fmt;

/// Everything that can go wrong while building or running a model.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The graph is not executable as written (dangling value, bad attribute, cycle).
    InvalidGraph {
        /// What is wrong.
        reason: String,
    },
    /// A weight the graph declares is missing or has another shape.
    InvalidWeights {
        /// What is wrong.
        reason: String,
    },
    /// An input or intermediate tensor has a shape the op cannot take.
    ShapeMismatch {
        /// Where: an input name or `op node-name`.
        context: String,
        /// What is wrong.
        reason: String,
    },
    /// A `.npy` file is malformed or uses a layout the engine does not read.
    InvalidNpy {
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidGraph { reason } => write!(f, "invalid model graph: {reason}"),
            Error::InvalidWeights { reason } => write!(f, "invalid model weights: {reason}"),
            Error::ShapeMismatch { context, reason } => {
                write!(f, "shape mismatch in {context}: {reason}")
            }
            Error::InvalidNpy { reason } => write!(f, "invalid .npy file: {reason}"),
        }
    }
}

impl std::error::Error for Error {}
