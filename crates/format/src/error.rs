//! The format's one error type.

use std::fmt;

/// Why a capsule or key could not be read.
///
/// Decryption failures are deliberately coarse: they say where authentication
/// failed, never why, so that they are no oracle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The file does not start with a capsule version line (capsule-v1 §3).
    NotACapsule,
    /// The file is a capsule of another version.
    UnsupportedVersion {
        /// The version line found, without its newline.
        found: String,
    },
    /// The header is not valid JSON or breaks a rule of capsule-v1 §4.
    InvalidHeader {
        /// What rule was broken.
        reason: String,
    },
    /// The file is shorter than its header says.
    Truncated {
        /// Length the header implies.
        expected: u64,
        /// Length found.
        found: u64,
    },
    /// The file is longer than its header says.
    TrailingData {
        /// Length the header implies.
        expected: u64,
        /// Length found.
        found: u64,
    },
    /// The model key does not belong to this capsule.
    WrongKey,
    /// The header MAC failed although the key matches the key id: the header was changed.
    HeaderModified,
    /// A sealed chunk failed authentication.
    ChunkFailed {
        /// Layer name from the (authenticated) header.
        layer: String,
        /// Chunk index within the layer.
        chunk: u64,
    },
    /// A sealed grant does not open with this enclave key and context, or does not parse.
    InvalidGrant,
    /// A top-up token is malformed or its signature does not verify.
    InvalidToken,
    /// A key file is malformed (capsule-v1 §2.1).
    InvalidKeyFile {
        /// What is wrong.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotACapsule => write!(
                f,
                "not an MLCapsule capsule (no 'mlcapsule/v1' first line); pass a file made by 'mlcapsule seal'"
            ),
            Error::UnsupportedVersion { found } => write!(
                f,
                "unsupported capsule version '{found}'; this build reads mlcapsule/v1, upgrade mlcapsule or re-seal the model"
            ),
            Error::InvalidHeader { reason } => write!(
                f,
                "capsule header is corrupt ({reason}); get a fresh copy of the capsule from the provider"
            ),
            Error::Truncated { expected, found } => write!(
                f,
                "capsule is truncated: its header promises {expected} bytes but the file has {found}; copy it again"
            ),
            Error::TrailingData { expected, found } => write!(
                f,
                "capsule has trailing data: its header promises {expected} bytes but the file has {found}; get a fresh copy"
            ),
            Error::WrongKey => write!(
                f,
                "wrong key: this model key does not belong to this capsule; use the key file written when it was sealed"
            ),
            Error::HeaderModified => write!(
                f,
                "capsule header failed authentication: it was modified after sealing; get a fresh copy from the provider"
            ),
            Error::ChunkFailed { layer, chunk } => write!(
                f,
                "sealed weights failed authentication (layer '{layer}', chunk {chunk}): the capsule is corrupt or was tampered with; get a fresh copy"
            ),
            Error::InvalidGrant => write!(
                f,
                "the provisioning grant does not open for this enclave; run 'mlcapsule setup' again"
            ),
            Error::InvalidToken => write!(
                f,
                "the top-up token is malformed or not signed by this licence's server; ask the provider for a new one"
            ),
            Error::InvalidKeyFile { reason } => write!(
                f,
                "invalid key file ({reason}); pass the key file written by 'mlcapsule seal'"
            ),
        }
    }
}

impl std::error::Error for Error {}
