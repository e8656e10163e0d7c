//! Writing a capsule (capsule-v1 §3 to §6), the provider's side.

use aws_lc_rs::{digest, hmac, rand::SecureRandom};
use zeroize::Zeroizing;

use crate::chunk::{Aead, ChunkKey, ChunkPosition};
use crate::header::{
    Detector, FORMAT, Header, LayerEntry, Policy, Preprocessing, TensorEntry, chunk_count,
};
use crate::key::{CAPSULE_ID_LEN, ModelKey};
use crate::{Error, MAX_HEADER_LEN, VERSION_LINE};

/// One layer's weights to seal: named tensors, sealed together as one stream.
pub struct LayerPlaintext<'a> {
    /// Layer name (shown by `inspect`, used in error messages).
    pub name: String,
    /// `(name, shape, values)` per tensor, in the order they are laid out.
    pub tensors: Vec<(String, Vec<usize>, &'a [f32])>,
}

/// Everything that goes into a capsule besides the key.
pub struct SealRequest<'a> {
    /// The engine graph as JSON (capsule-v1 §4.1).
    pub architecture: serde_json::Value,
    /// Image recipe, if any.
    pub preprocessing: Option<Preprocessing>,
    /// Class names, if any.
    pub labels: Option<Vec<String>>,
    /// The input detector network, if any (capsule-v1 §4.6). Its weights go in `layers`,
    /// first, with names prefixed [`crate::DETECTOR_PREFIX`].
    pub detector: Option<Detector>,
    /// The provider's policy.
    pub policy: Policy,
    /// Plaintext bytes per chunk.
    pub chunk_size: u32,
    /// The cipher that seals the chunks; [`Aead::SEAL_DEFAULT`] unless a FIPS-approved
    /// one is required.
    pub aead: Aead,
    /// The weights, layer by layer.
    pub layers: Vec<LayerPlaintext<'a>>,
}

/// A fresh random capsule id.
pub fn new_capsule_id() -> [u8; CAPSULE_ID_LEN] {
    let mut id = [0u8; CAPSULE_ID_LEN];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut id)
        .expect("the operating system's random generator failed");
    id
}

/// Seals `request` under `key` into capsule bytes.
///
/// Deterministic given its arguments (the test vectors rely on it).
/// `progress` is called with the number of plaintext bytes sealed so far.
pub fn seal(
    request: &SealRequest<'_>,
    key: &ModelKey,
    capsule_id: [u8; CAPSULE_ID_LEN],
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<u8>, Error> {
    let keys = key.schedule(&capsule_id, request.aead);
    let chunk_key = ChunkKey::new(request.aead, &keys.payload, capsule_id);

    let mut tensors = Vec::new();
    let mut layers = Vec::with_capacity(request.layers.len());
    let mut payload = Vec::new();
    let mut done = 0u64;
    for (index, layer) in request.layers.iter().enumerate() {
        let layer_index = u32::try_from(index).map_err(|_| Error::InvalidHeader {
            reason: "too many layers".into(),
        })?;
        let mut plaintext = Zeroizing::new(Vec::new());
        for (name, shape, values) in &layer.tensors {
            if shape.iter().product::<usize>() != values.len() {
                return Err(Error::InvalidHeader {
                    reason: format!(
                        "tensor '{name}' has {} values for shape {shape:?}",
                        values.len()
                    ),
                });
            }
            tensors.push(TensorEntry {
                name: name.clone(),
                shape: shape.clone(),
                layer: index,
                offset: plaintext.len() as u64,
            });
            plaintext.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        }
        let start = payload.len();
        let n = chunk_count(plaintext.len() as u64, request.chunk_size);
        let mut pieces = plaintext.chunks(request.chunk_size as usize);
        for i in 0..n {
            let piece = pieces.next().unwrap_or(&[]);
            let mut buf = piece.to_vec();
            chunk_key.seal(
                ChunkPosition {
                    layer: layer_index,
                    index: i,
                    last: i + 1 == n,
                },
                &mut buf,
            );
            payload.extend_from_slice(&buf);
            done += piece.len() as u64;
            progress(done);
        }
        let sealed = digest::digest(&digest::SHA256, &payload[start..]);
        layers.push(LayerEntry {
            name: layer.name.clone(),
            plaintext_len: plaintext.len() as u64,
            sealed_sha256: sealed.as_ref().try_into().expect("SHA-256 is 32 bytes"),
        });
    }

    let header = Header {
        format: FORMAT.into(),
        capsule_id,
        key_id: keys.key_id,
        chunk_size: request.chunk_size,
        aead: request.aead,
        architecture: request.architecture.clone(),
        detector: request.detector.clone(),
        preprocessing: request.preprocessing.clone(),
        labels: request.labels.clone(),
        tensors,
        layers,
        policy: request.policy.clone(),
    };
    header.validate()?;
    let header_json = serde_json::to_vec(&header).expect("a Header always serialises");
    if header_json.len() > MAX_HEADER_LEN {
        return Err(Error::InvalidHeader {
            reason: format!(
                "header is {} bytes, more than the 16 MiB limit",
                header_json.len()
            ),
        });
    }

    let mut out =
        Vec::with_capacity(VERSION_LINE.len() + 4 + header_json.len() + 32 + payload.len());
    out.extend_from_slice(VERSION_LINE);
    out.extend_from_slice(&(header_json.len() as u32).to_be_bytes());
    out.extend_from_slice(&header_json);
    let mac = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, keys.header.as_ref()),
        &out,
    );
    out.extend_from_slice(mac.as_ref());
    out.extend_from_slice(&payload);
    Ok(out)
}
