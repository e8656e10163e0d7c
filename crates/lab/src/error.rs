//! The lab's one error type.

use std::fmt;
use std::path::PathBuf;

/// Everything that can make a lab run fail.
#[derive(Debug)]
pub enum Error {
    /// A data file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// An IDX file (MNIST's format) is malformed.
    InvalidIdx {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A data set's images and labels disagree, or a subset asks for more than there is.
    InvalidData {
        /// What was wrong.
        reason: String,
    },
    /// candle failed while training or running a model.
    Training(candle_core::Error),
    /// Our engine refused a graph or failed to run it.
    Engine(capsule_engine::Error),
    /// A defense of `capsule-defense` refused its parameters or input.
    Defense(capsule_defense::Error),
    /// A plot could not be encoded.
    Plot {
        /// What the encoder said.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Error::InvalidIdx { path, reason } => {
                write!(f, "{} is not a valid IDX file: {reason}", path.display())
            }
            Error::InvalidData { reason } => write!(f, "invalid data: {reason}"),
            Error::Training(e) => write!(f, "training failed: {e}"),
            Error::Engine(e) => write!(f, "engine: {e}"),
            Error::Defense(e) => write!(f, "defense: {e}"),
            Error::Plot { reason } => write!(f, "cannot write the plot: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Training(e) => Some(e),
            Error::Engine(e) => Some(e),
            Error::Defense(e) => Some(e),
            _ => None,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Error {
        Error::Training(e)
    }
}

impl From<capsule_engine::Error> for Error {
    fn from(e: capsule_engine::Error) -> Error {
        Error::Engine(e)
    }
}

impl From<capsule_defense::Error> for Error {
    fn from(e: capsule_defense::Error) -> Error {
        Error::Defense(e)
    }
}
