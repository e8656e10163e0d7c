//! The crate's one error type.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why attesting, verifying, sealing or counting failed.
///
/// Cryptographic failures are coarse on purpose: [`Error::Unseal`] does not say whether the
/// key, the associated data or the bytes were wrong, so that it is no oracle. Every message
/// ends with what to do next.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory of the platform could not be created, read or written.
    Io {
        /// What was being done, e.g. "create the platform directory".
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// Other users can write the platform directory, or access its `counters` directory or
    /// its secret, so the `sim` platform would protect nothing.
    InsecurePermissions {
        /// The file or directory concerned.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The `platform-secret` file is not a regular file of exactly 32 bytes.
    InvalidPlatformSecret {
        /// The file concerned.
        path: PathBuf,
    },
    /// The evidence names a platform this verifier does not handle.
    UnsupportedPlatform {
        /// The platform named in the evidence.
        platform: String,
    },
    /// The evidence's signature does not verify under its platform key (or the key is
    /// malformed): it was modified or forged.
    InvalidEvidence,
    /// The evidence is validly signed but attests other report data than expected: it was
    /// made for another enclave key, instance or setup nonce.
    ReportDataMismatch,
    /// The system's random number generator failed.
    RandomFailed,
    /// The data is too large for one sealed blob.
    SealFailed,
    /// Sealed data does not open: wrong platform, wrong measurement, wrong associated data,
    /// or modified bytes. Deliberately says no more.
    Unseal,
    /// No counter exists for this enclave instance.
    CounterMissing {
        /// The enclave instance.
        instance_id: [u8; 16],
    },
    /// A counter already exists for this enclave instance.
    CounterExists {
        /// The enclave instance.
        instance_id: [u8; 16],
    },
    /// Neither slot of the counter file authenticates: the file was damaged or modified.
    CounterTampered {
        /// The enclave instance.
        instance_id: [u8; 16],
    },
    /// Another open handle (in this or another process) holds the counter.
    CounterInUse {
        /// The enclave instance.
        instance_id: [u8; 16],
    },
    /// The counter reached `u64::MAX` and cannot be incremented.
    CounterExhausted {
        /// The enclave instance.
        instance_id: [u8; 16],
    },
}

impl Error {
    /// Maps an I/O error on `path` while doing `action`.
    pub(crate) fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io {
                action,
                path,
                source,
            } => write!(
                f,
                "could not {action} {}: {source}; check that the path exists and that you own it",
                path.display()
            ),
            Error::InsecurePermissions { path, mode } => write!(
                f,
                "{} gives other users access (mode {mode:03o}), so they could read or replace the \
                 sim platform's secret or state; run `chmod go-rwx {}` and retry",
                path.display(),
                path.display()
            ),
            Error::InvalidPlatformSecret { path } => write!(
                f,
                "{} is not a sim platform secret (a regular file of exactly 32 bytes); restore it \
                 from a backup, or use a new platform directory (state sealed on this platform \
                 will not open there, and its enclaves must be set up again)",
                path.display()
            ),
            Error::UnsupportedPlatform { platform } => write!(
                f,
                "attestation evidence is from platform {platform:?}, which this verifier does not \
                 handle; use the verifier for that platform, or set the enclave up on a supported one"
            ),
            Error::InvalidEvidence => f.write_str(
                "attestation evidence does not verify under its platform key: it was modified or \
                 forged; run setup again with an unmodified enclave",
            ),
            Error::ReportDataMismatch => f.write_str(
                "attestation evidence was made for another setup (its report data does not bind \
                 this enclave key, instance and nonce); start setup again to get a fresh nonce",
            ),
            Error::RandomFailed => f.write_str(
                "the operating system's random number generator failed; check that getrandom(2) \
                 or /dev/urandom works and retry",
            ),
            Error::SealFailed => {
                f.write_str("the data is too large to seal as one blob; seal it in smaller parts")
            }
            Error::Unseal => f.write_str(
                "sealed data does not open on this platform: it was made on another machine or by \
                 another enclave build, or was modified; restore the original state files, or run \
                 setup again to provision this enclave build on this machine",
            ),
            Error::CounterMissing { instance_id } => write!(
                f,
                "no monotonic counter exists for enclave instance {} on this platform (counters \
                 never restart from 0); run setup to provision this instance, or use the platform \
                 directory it was set up with",
                hex::encode(instance_id)
            ),
            Error::CounterExists { instance_id } => write!(
                f,
                "a monotonic counter already exists for enclave instance {} (counters are never \
                 reset); open it instead, or create the counter of a fresh instance id",
                hex::encode(instance_id)
            ),
            Error::CounterTampered { instance_id } => write!(
                f,
                "counter tampered: the monotonic counter of enclave instance {} does not \
                 authenticate (the file was damaged or modified), so its budget cannot be \
                 trusted; run setup again to provision a new instance",
                hex::encode(instance_id)
            ),
            Error::CounterInUse { instance_id } => write!(
                f,
                "the monotonic counter of enclave instance {} is held by another enclave process; \
                 wait for it to finish (or stop it), then retry",
                hex::encode(instance_id)
            ),
            Error::CounterExhausted { instance_id } => write!(
                f,
                "the monotonic counter of enclave instance {} reached its maximum; run setup to \
                 provision a new instance",
                hex::encode(instance_id)
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
