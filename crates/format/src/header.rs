//! The capsule header (capsule-v1 §4): everything public about a capsule.

use serde::{Deserialize, Serialize};

use crate::key::{CAPSULE_ID_LEN, KEY_ID_LEN};
use crate::{Error, TAG_LEN};

/// The value of the header's `format` member.
pub const FORMAT: &str = "mlcapsule/v1";
/// Default plaintext bytes per chunk: 2 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 2 * 1024 * 1024;
/// Smallest chunk size a capsule may declare.
pub const MIN_CHUNK_SIZE: u32 = 64;
/// Largest chunk size a capsule may declare: 64 MiB.
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;

/// The public, authenticated description of a capsule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// Random per capsule; salts every derived key.
    #[serde(with = "hex")]
    pub capsule_id: [u8; CAPSULE_ID_LEN],
    /// Identifies the model key without revealing it (capsule-v1 §2).
    #[serde(with = "hex")]
    pub key_id: [u8; KEY_ID_LEN],
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
    /// The engine graph, opaque to this crate (capsule-v1 §4.1).
    pub architecture: serde_json::Value,
    /// Image-to-tensor recipe, if the model takes images.
    pub preprocessing: Option<Preprocessing>,
    /// Class names, index = output position.
    pub labels: Option<Vec<String>>,
    /// Where each weight tensor lives in the layers' plaintext.
    pub tensors: Vec<TensorEntry>,
    /// The chunk table: one sealed stream per layer.
    pub layers: Vec<LayerEntry>,
    /// The provider's policy, enforced by the enclave.
    pub policy: Policy,
}

/// How to turn an image into the model's input tensor (capsule-v1 §4.2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preprocessing {
    /// Input `[height, width]`.
    pub size: [u32; 2],
    /// 1 (grey) or 3 (RGB).
    pub channels: u8,
    /// Multiplies each pixel value (0..=255) first, e.g. `1/255`.
    pub scale: f32,
    /// Per-channel mean subtracted after scaling.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by last.
    pub std: Vec<f32>,
    /// Resize the shorter side to this, then center-crop; `None` resizes straight to `size`.
    pub resize_shorter: Option<u32>,
}

/// One weight tensor's place in a layer's plaintext (capsule-v1 §4.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// The name the architecture uses for it.
    pub name: String,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Index into [`Header::layers`].
    pub layer: usize,
    /// Byte offset in that layer's plaintext.
    pub offset: u64,
}

/// One layer's sealed stream (capsule-v1 §4.4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    /// The layer's name (the graph node that first reads its tensors).
    pub name: String,
    /// Plaintext length in bytes.
    pub plaintext_len: u64,
    /// SHA-256 of the sealed stream.
    #[serde(with = "hex")]
    pub sealed_sha256: [u8; 32],
}

/// The provider's policy (capsule-v1 §4.5). Unknown members are rejected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Queries a licence may buy at most; `None` leaves it to the licence.
    #[serde(default)]
    pub max_queries: Option<u64>,
    /// Last day (UTC, `YYYY-MM-DD`) the model may run.
    #[serde(default)]
    pub expires: Option<String>,
}

impl Header {
    /// Number of chunks in layer `layer` (capsule-v1 §4.4).
    pub fn chunk_count(&self, layer: usize) -> u64 {
        chunk_count(self.layers[layer].plaintext_len, self.chunk_size)
    }

    /// Bytes of layer `layer`'s sealed stream.
    pub fn sealed_len(&self, layer: usize) -> u64 {
        self.layers[layer].plaintext_len + TAG_LEN as u64 * self.chunk_count(layer)
    }

    /// Number of weight scalars across all tensors.
    pub fn param_count(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// Checks the rules of capsule-v1 §4 that do not need the key.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::InvalidHeader { reason });
        if self.format != FORMAT {
            return bad(format!("format is '{}', expected '{FORMAT}'", self.format));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return bad(format!("chunk size {} is out of range", self.chunk_size));
        }
        if self.layers.len() >= u32::MAX as usize {
            return bad("too many layers".into());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if layer.plaintext_len.div_ceil(u64::from(self.chunk_size)) >= 1 << 56 {
                return bad(format!("layer {i} has too many chunks"));
            }
        }
        // Tensors exactly fill their layer, in table order (capsule-v1 §4.3).
        let mut filled = vec![0u64; self.layers.len()];
        for t in &self.tensors {
            let Some(end) = filled.get_mut(t.layer) else {
                return bad(format!(
                    "tensor '{}' names layer {} which does not exist",
                    t.name, t.layer
                ));
            };
            let bytes = t
                .shape
                .iter()
                .try_fold(4u64, |acc, &d| acc.checked_mul(d as u64));
            match bytes {
                Some(bytes) if t.offset == *end => *end += bytes,
                Some(_) => {
                    return bad(format!(
                        "tensor '{}' is not at the next free offset of its layer",
                        t.name
                    ));
                }
                None => return bad(format!("tensor '{}' is too large", t.name)),
            }
        }
        for (layer, end) in self.layers.iter().zip(&filled) {
            if layer.plaintext_len != *end {
                return bad(format!(
                    "layer '{}' is not exactly filled by its tensors",
                    layer.name
                ));
            }
        }
        Ok(())
    }
}

/// `max(1, ceil(len / chunk_size))`.
pub(crate) fn chunk_count(plaintext_len: u64, chunk_size: u32) -> u64 {
    plaintext_len.div_ceil(u64::from(chunk_size)).max(1)
}
