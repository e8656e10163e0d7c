//! The capsule header (capsule-v1 §4): everything public about a capsule.

use serde::{Deserialize, Serialize};

use crate::chunk::Aead;
use crate::key::{CAPSULE_ID_LEN, KEY_ID_LEN};
use crate::{Error, TAG_LEN};

/// The value of the header's `format` member.
pub const FORMAT: &str = "mlcapsule/v1";
/// Default plaintext bytes per chunk: 256 KiB, small enough to stay in a core's
/// L2 cache between being opened and being computed from. Chosen when a chunk
/// was first copied into its plaintext buffer and then decrypted there: 2 MiB
/// chunks made ResNet-18 streaming 1.13-1.15x plain at 1 thread, 256 KiB 1.05x.
/// Chunks are now decrypted out of place; the size was not measured again since.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Smallest chunk size a capsule may declare.
pub const MIN_CHUNK_SIZE: u32 = 64;
/// Largest chunk size a capsule may declare: 64 MiB.
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;
/// Prefix of the names of the detector's layers and tensors (capsule-v1 §4.6).
pub const DETECTOR_PREFIX: &str = "detector/";

fn absent_aead() -> Aead {
    Aead::ABSENT
}

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
    /// The cipher that seals the chunks. Omitted from the JSON when it is
    /// [`Aead::ABSENT`] (AES-256-GCM), so that such capsules are byte for byte what
    /// writers made before the member existed.
    #[serde(default = "absent_aead", skip_serializing_if = "Aead::is_absent")]
    pub aead: Aead,
    /// The engine graph, opaque to this crate (capsule-v1 §4.1).
    pub architecture: serde_json::Value,
    /// The input detector network sealed beside the model, if any (capsule-v1 §4.6).
    /// Omitted from the JSON when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector: Option<Detector>,
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
    /// The defense policy (spec/policy.md §5), a JSON object this crate authenticates but
    /// does not interpret, like the architecture: `capsule-defense` defines and parses it.
    /// Omitted from the JSON when absent, so capsules without one are unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defense: Option<serde_json::Value>,
}

/// The input detector network sealed beside the model (capsule-v1 §4.6).
///
/// Its weights are ordinary sealed tensors named [`DETECTOR_PREFIX`]` + param`, in layers
/// named [`DETECTOR_PREFIX`]` + node` that come before every layer of the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Detector {
    /// The detector's engine graph, opaque to this crate like [`Header::architecture`].
    pub architecture: serde_json::Value,
    /// How the detector's input is made from the model's.
    pub input: DetectorInput,
}

/// The detector sees `x * scale + offset`, element by element, where `x` is the model's
/// input as the enclave receives it (capsule-v1 §4.6). Identity: scale 1, offset 0.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorInput {
    /// Multiplies each input value first.
    pub scale: f32,
    /// Added after scaling.
    pub offset: f32,
}

impl DetectorInput {
    /// The identity: the detector takes the model's input unchanged.
    pub const IDENTITY: DetectorInput = DetectorInput {
        scale: 1.0,
        offset: 0.0,
    };
}

impl Header {
    /// Number of chunks in layer `layer` (capsule-v1 §4.4).
    pub fn chunk_count(&self, layer: usize) -> u64 {
        chunk_count(self.layers[layer].plaintext_len, self.chunk_size)
    }

    /// The plaintext bytes of layer `layer` that chunk `chunk` holds (capsule-v1 §4.4):
    /// `chunk_size` bytes from `chunk · chunk_size`, fewer for the last chunk. Empty for a
    /// chunk past the end (or of an empty layer, or of no layer `layer`).
    pub fn chunk_span(&self, layer: usize, chunk: u64) -> std::ops::Range<u64> {
        let len = self.layers.get(layer).map_or(0, |l| l.plaintext_len);
        let size = u64::from(self.chunk_size);
        let start = chunk.saturating_mul(size).min(len);
        start..start.saturating_add(size).min(len)
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

    /// Number of the detector's layers (capsule-v1 §4.6): they come first, so the model's
    /// layers are `detector_layers()..layers.len()`.
    pub fn detector_layers(&self) -> usize {
        self.layers
            .iter()
            .take_while(|l| l.name.starts_with(DETECTOR_PREFIX))
            .count()
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
        self.validate_detector()?;
        if let Some(defense) = &self.policy.defense
            && !defense.is_object()
        {
            return bad("policy.defense is not a JSON object".into());
        }
        Ok(())
    }

    /// capsule-v1 §4.6: detector layers first, each holding only detector tensors.
    fn validate_detector(&self) -> Result<(), Error> {
        let bad = |reason: String| Err(Error::InvalidHeader { reason });
        let first = self.detector_layers();
        if let Some(late) = self.layers[first..]
            .iter()
            .find(|l| l.name.starts_with(DETECTOR_PREFIX))
        {
            return bad(format!(
                "detector layer '{}' comes after a layer of the model",
                late.name
            ));
        }
        if first > 0 && self.detector.is_none() {
            return bad(format!(
                "layer '{}' is a detector layer but the header has no detector",
                self.layers[0].name
            ));
        }
        for t in &self.tensors {
            if t.name.starts_with(DETECTOR_PREFIX) != (t.layer < first) {
                return bad(format!(
                    "tensor '{}' is in layer '{}': detector tensors belong in detector layers and no others",
                    t.name, self.layers[t.layer].name
                ));
            }
        }
        if let Some(detector) = &self.detector {
            let DetectorInput { scale, offset } = detector.input;
            if !(scale.is_finite() && offset.is_finite()) {
                return bad("detector.input scale and offset must be finite numbers".into());
            }
        }
        Ok(())
    }
}

/// `max(1, ceil(len / chunk_size))`.
pub(crate) fn chunk_count(plaintext_len: u64, chunk_size: u32) -> u64 {
    plaintext_len.div_ceil(u64::from(chunk_size)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(layers: &[&str], tensors: &[(&str, usize)], detector: bool) -> Header {
        Header {
            format: FORMAT.into(),
            capsule_id: [0; CAPSULE_ID_LEN],
            key_id: [0; KEY_ID_LEN],
            chunk_size: MIN_CHUNK_SIZE,
            aead: Aead::SEAL_DEFAULT,
            architecture: serde_json::json!({}),
            detector: detector.then(|| Detector {
                architecture: serde_json::json!({}),
                input: DetectorInput::IDENTITY,
            }),
            preprocessing: None,
            labels: None,
            tensors: tensors
                .iter()
                .map(|&(name, layer)| TensorEntry {
                    name: name.into(),
                    shape: vec![1],
                    layer,
                    offset: 0,
                })
                .collect(),
            layers: layers
                .iter()
                .map(|name| LayerEntry {
                    name: (*name).into(),
                    plaintext_len: 4,
                    sealed_sha256: [0; 32],
                })
                .collect(),
            policy: Policy::default(),
        }
    }

    #[test]
    fn detector_layers_come_first_and_hold_only_detector_tensors() {
        let ok = header(&["detector/a", "m"], &[("detector/w", 0), ("w", 1)], true);
        assert!(ok.validate().is_ok());
        assert_eq!(ok.detector_layers(), 1);

        let no_detector = header(&["detector/a", "m"], &[("detector/w", 0), ("w", 1)], false);
        assert!(no_detector.validate().is_err());
        let mixed = header(&["detector/a", "m"], &[("w", 0), ("detector/w", 1)], true);
        assert!(mixed.validate().is_err());
        let late = header(&["m", "detector/a"], &[("w", 0), ("detector/w", 1)], true);
        assert!(late.validate().is_err());

        let mut infinite = ok.clone();
        infinite.detector.as_mut().unwrap().input.scale = f32::INFINITY;
        assert!(infinite.validate().is_err());
    }

    #[test]
    fn defense_is_an_opaque_object_and_absent_members_are_not_written() {
        let plain = header(&["m"], &[("w", 0)], false);
        let json = serde_json::to_string(&plain).unwrap();
        assert!(
            !json.contains("defense") && !json.contains("detector"),
            "{json}"
        );
        let mut defended = plain.clone();
        defended.policy.defense = Some(serde_json::json!({"anything": [1, 2]}));
        assert!(defended.validate().is_ok());
        defended.policy.defense = Some(serde_json::json!([1, 2]));
        assert!(defended.validate().is_err());
    }
}
