//! MLCapsule's byte formats and their cryptography.
//!
//! This crate owns the capsule format, `spec/capsule-v1.md`: a versioned
//! first line, a JSON header (architecture, an optional input detector,
//! tensor table, chunk table, policy) authenticated by an HMAC keyed from the
//! model key, and the weights as AEAD chunks (AEGIS-256X4 by default,
//! AEGIS-256X2 or AES-256-GCM), one stream per layer, whose nonces and associated data bind
//! capsule id, layer, chunk index and a last-chunk flag. Sections of the spec
//! are cited as `capsule-v1 §N` where they are implemented.
//!
//! ```
//! use capsule_format::{seal, Capsule, LayerPlaintext, ModelKey, Policy, SealRequest};
//! let key = ModelKey::generate();
//! let weights = [1.0f32, 2.0, 3.0];
//! let request = SealRequest {
//!     architecture: serde_json::json!({"nodes": []}),
//!     preprocessing: None,
//!     labels: None,
//!     detector: None,
//!     policy: Policy::default(),
//!     chunk_size: capsule_format::DEFAULT_CHUNK_SIZE,
//!     aead: capsule_format::Aead::SEAL_DEFAULT,
//!     layers: vec![LayerPlaintext {
//!         name: "dense".into(),
//!         tensors: vec![("w".into(), vec![3], &weights[..])],
//!     }],
//! };
//! let bytes = seal(&request, &key, capsule_format::new_capsule_id(), &mut |_| {}).unwrap();
//! let capsule = Capsule::parse(&bytes).unwrap();            // no key needed
//! assert_eq!(capsule.header().param_count(), 3);
//! let tensors = capsule.open_all(&key).unwrap();             // key needed
//! assert_eq!(tensors[0].2, weights);
//! ```
//!
//! What it does not do: read or write files, decide where keys live, run a
//! model, or interpret the architecture, the detector's graph or the defense
//! policy (`policy.defense`): it authenticates them as opaque JSON, so that it
//! links neither the engine nor the defenses. Decryption errors are coarse on
//! purpose (no oracle).

mod capsule;
mod chunk;
mod error;
mod grant;
mod header;
mod key;
mod seal;

pub use capsule::{Capsule, CapsuleLayout, NamedTensor, Unsealer};
pub use chunk::{Aead, TAG_LEN};
pub use error::Error;
pub use grant::{
    EnclaveKey, Grant, INSTANCE_ID_LEN, SealedGrant, TOPUP_PREFIX, TopUp, report_data, seal_grant,
    server_public_key,
};
pub use header::{
    DEFAULT_CHUNK_SIZE, DETECTOR_PREFIX, Detector, DetectorInput, FORMAT, Header, LayerEntry,
    MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Policy, Preprocessing, TensorEntry,
};
pub use key::{CAPSULE_ID_LEN, KEY_FILE_PREFIX, KEY_ID_LEN, KEY_LEN, ModelKey};
pub use seal::{LayerPlaintext, SealRequest, new_capsule_id, seal};

/// The first line of every version-1 capsule (capsule-v1 §3).
pub const VERSION_LINE: &[u8] = b"mlcapsule/v1\n";
/// Largest header a reader accepts: 16 MiB.
pub const MAX_HEADER_LEN: usize = 16 * 1024 * 1024;
/// Length of the header MAC.
pub const MAC_LEN: usize = 32;
