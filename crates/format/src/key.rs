//! The model key, its key file, and the keys derived from it (capsule-v1 §2).

use aws_lc_rs::{hkdf, rand::SecureRandom};
use zeroize::{Zeroize, Zeroizing};

use crate::Error;
use crate::chunk::Aead;

/// Length of a model key and of every derived key.
pub const KEY_LEN: usize = 32;
/// Length of a capsule id.
pub const CAPSULE_ID_LEN: usize = 16;
/// Length of a key id.
pub const KEY_ID_LEN: usize = 8;
/// The prefix of the key line in a key file (capsule-v1 §2.1).
pub const KEY_FILE_PREFIX: &str = "mlcapsule-model-key/v1:";

/// A capsule's 32-byte model key. Zeroized on drop; its `Debug` hides it.
#[derive(Clone)]
pub struct ModelKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelKey(..)")
    }
}

impl ModelKey {
    /// A fresh key from the operating system's secure generator.
    pub fn generate() -> ModelKey {
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        aws_lc_rs::rand::SystemRandom::new()
            .fill(bytes.as_mut())
            .expect("the operating system's random generator failed");
        ModelKey(bytes)
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ModelKey {
        ModelKey(Zeroizing::new(bytes))
    }

    /// The key's bytes. Handle with care: this is the secret that unlocks the weights.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The key file text (capsule-v1 §2.1), naming the capsule in a comment.
    pub fn to_key_file(&self, capsule_id: &[u8; CAPSULE_ID_LEN]) -> Zeroizing<String> {
        let mut hex_key = hex::encode(self.0.as_ref());
        let text = format!(
            "# MLCapsule model key for capsule {}; anyone with this file can read the weights.\n{KEY_FILE_PREFIX}{hex_key}\n",
            hex::encode(capsule_id)
        );
        hex_key.zeroize();
        Zeroizing::new(text)
    }

    /// Parses key file text (capsule-v1 §2.1).
    pub fn from_key_file(text: &str) -> Result<ModelKey, Error> {
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'));
        let line = lines.next().ok_or_else(|| Error::InvalidKeyFile {
            reason: "no key line".into(),
        })?;
        if lines.next().is_some() {
            return Err(Error::InvalidKeyFile {
                reason: "more than one key line".into(),
            });
        }
        let hex_key = line
            .strip_prefix(KEY_FILE_PREFIX)
            .ok_or_else(|| Error::InvalidKeyFile {
                reason: format!("the key line does not start with '{KEY_FILE_PREFIX}'"),
            })?;
        let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(hex_key, bytes.as_mut()).map_err(|_| Error::InvalidKeyFile {
            reason: "the key is not 64 hexadecimal characters".into(),
        })?;
        Ok(ModelKey(bytes))
    }

    /// `HKDF(K, ID, info)` (capsule-v1 §1), 32 bytes.
    fn derive(&self, capsule_id: &[u8; CAPSULE_ID_LEN], info: &[u8]) -> Zeroizing<[u8; KEY_LEN]> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, capsule_id).extract(self.0.as_ref());
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        prk.expand(&[info], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(out.as_mut()))
            .expect("32 bytes is a valid HKDF-SHA-256 output length");
        out
    }

    /// The derived keys of one capsule whose chunks `aead` seals.
    pub(crate) fn schedule(&self, capsule_id: &[u8; CAPSULE_ID_LEN], aead: Aead) -> KeySchedule {
        let key_id_full = self.derive(capsule_id, b"mlcapsule/v1 key id");
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&key_id_full[..KEY_ID_LEN]);
        KeySchedule {
            header: self.derive(capsule_id, b"mlcapsule/v1 header"),
            payload: self.derive(capsule_id, aead.payload_info()),
            key_id,
        }
    }
}

/// The keys derived from a model key for one capsule (capsule-v1 §2).
pub(crate) struct KeySchedule {
    pub header: Zeroizing<[u8; KEY_LEN]>,
    pub payload: Zeroizing<[u8; KEY_LEN]>,
    pub key_id: [u8; KEY_ID_LEN],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips() {
        let key = ModelKey::from_bytes([7; KEY_LEN]);
        let text = key.to_key_file(&[1; CAPSULE_ID_LEN]);
        let back = ModelKey::from_key_file(&text).unwrap();
        assert_eq!(back.expose(), key.expose());
    }

    #[test]
    fn key_file_rejects_bad_text() {
        for bad in [
            "",
            "# only a comment\n",
            "mlcapsule-model-key/v1:abcd\n",
            "mlcapsule-model-key/v2:0000000000000000000000000000000000000000000000000000000000000000\n",
            "mlcapsule-model-key/v1:zz00000000000000000000000000000000000000000000000000000000000000\n",
        ] {
            assert!(
                matches!(
                    ModelKey::from_key_file(bad),
                    Err(Error::InvalidKeyFile { .. })
                ),
                "{bad:?}"
            );
        }
        let two = format!(
            "{KEY_FILE_PREFIX}{}\n{KEY_FILE_PREFIX}{}\n",
            "00".repeat(32),
            "11".repeat(32)
        );
        assert!(ModelKey::from_key_file(&two).is_err());
    }

    #[test]
    fn derived_keys_differ_by_purpose_and_capsule() {
        let key = ModelKey::from_bytes([9; KEY_LEN]);
        let a = key.schedule(&[0; CAPSULE_ID_LEN], Aead::Aes256Gcm);
        let b = key.schedule(&[1; CAPSULE_ID_LEN], Aead::Aes256Gcm);
        let c = key.schedule(&[0; CAPSULE_ID_LEN], Aead::Aegis256X2);
        let d = key.schedule(&[0; CAPSULE_ID_LEN], Aead::Aegis256X4);
        assert_ne!(*a.header, *a.payload);
        assert_ne!(*a.payload, *b.payload);
        assert_ne!(*a.payload, *c.payload);
        assert_ne!(*c.payload, *d.payload);
        assert_eq!(*a.header, *c.header);
        assert_eq!(*c.header, *d.header);
        assert_ne!(a.key_id, b.key_id);
    }

    #[test]
    fn debug_hides_the_key() {
        let key = ModelKey::from_bytes([0xab; KEY_LEN]);
        assert!(!format!("{key:?}").contains("ab"));
    }
}
