//! Sealing and opening one chunk (capsule-v1 §6).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::key::{CAPSULE_ID_LEN, KEY_LEN};

/// Bytes an AEAD tag adds to each chunk.
pub const TAG_LEN: usize = 16;

const AAD_LABEL: &[u8] = b"mlcapsule/v1 chunk";

/// Where a chunk sits: its layer, its index, and whether it is the layer's last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPosition {
    /// Layer index in the header's chunk table.
    pub layer: u32,
    /// Chunk index within the layer, below 2^56.
    pub index: u64,
    /// True for the layer's last chunk.
    pub last: bool,
}

impl ChunkPosition {
    fn nonce(self) -> Nonce {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.layer.to_be_bytes());
        n[4..11].copy_from_slice(&self.index.to_be_bytes()[1..]);
        n[11] = u8::from(self.last);
        Nonce::assume_unique_for_key(n)
    }

    fn aad(self, capsule_id: &[u8; CAPSULE_ID_LEN]) -> [u8; 18 + CAPSULE_ID_LEN + 13] {
        let mut a = [0u8; 18 + CAPSULE_ID_LEN + 13];
        let (label, rest) = a.split_at_mut(AAD_LABEL.len());
        label.copy_from_slice(AAD_LABEL);
        rest[..CAPSULE_ID_LEN].copy_from_slice(capsule_id);
        let rest = &mut rest[CAPSULE_ID_LEN..];
        rest[..4].copy_from_slice(&self.layer.to_be_bytes());
        rest[4..12].copy_from_slice(&self.index.to_be_bytes());
        rest[12] = u8::from(self.last);
        a
    }
}

/// The payload key of one capsule, ready to seal or open its chunks.
pub struct ChunkKey {
    key: LessSafeKey,
    capsule_id: [u8; CAPSULE_ID_LEN],
}

impl ChunkKey {
    pub(crate) fn new(payload_key: &[u8; KEY_LEN], capsule_id: [u8; CAPSULE_ID_LEN]) -> ChunkKey {
        let unbound =
            UnboundKey::new(&AES_256_GCM, payload_key).expect("32 bytes is an AES-256 key");
        ChunkKey {
            key: LessSafeKey::new(unbound),
            capsule_id,
        }
    }

    /// Encrypts `buf` in place and appends its tag.
    pub(crate) fn seal(&self, at: ChunkPosition, buf: &mut Vec<u8>) {
        self.key
            .seal_in_place_append_tag(at.nonce(), Aad::from(at.aad(&self.capsule_id)), buf)
            .expect("a chunk below 64 MiB never exceeds AES-GCM's length limit");
    }

    /// Decrypts a sealed chunk in place; on success the plaintext is
    /// `buf[..buf.len() - TAG_LEN]`. On failure `buf` holds garbage and must be discarded.
    pub(crate) fn open_in_place(&self, at: ChunkPosition, buf: &mut [u8]) -> Result<(), ()> {
        self.key
            .open_in_place(at.nonce(), Aad::from(at.aad(&self.capsule_id)), buf)
            .map(|_| ())
            .map_err(|_| ())
    }

    /// Decrypts the ciphertext in `buf` in place, authenticated by `tag`. On failure
    /// `buf` is zeroized (it may hold unauthenticated bytes).
    pub(crate) fn open_in_place_apart(
        &self,
        at: ChunkPosition,
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), ()> {
        let opened = self.key.open_in_place_separate_tag(
            at.nonce(),
            Aad::from(at.aad(&self.capsule_id)),
            tag,
            buf,
        );
        if opened.is_err() {
            zeroize::Zeroize::zeroize(buf);
            return Err(());
        }
        Ok(())
    }

    /// Decrypts the sealed chunk `sealed` (ciphertext, then tag) into `out`, which must be
    /// exactly the ciphertext's length, in one pass out of place: the ciphertext is read
    /// once and never copied, so that a caller can open straight into the buffer it
    /// computes from. On failure `out` is zeroized (it may hold unauthenticated bytes).
    pub(crate) fn open_into(
        &self,
        at: ChunkPosition,
        sealed: &[u8],
        out: &mut [u8],
    ) -> Result<(), ()> {
        let Some(split) = sealed.len().checked_sub(TAG_LEN) else {
            return Err(());
        };
        let (ciphertext, tag) = sealed.split_at(split);
        if out.len() != ciphertext.len() {
            return Err(());
        }
        let opened = self.key.open_separate_gather(
            at.nonce(),
            Aad::from(at.aad(&self.capsule_id)),
            ciphertext,
            tag,
            out,
        );
        if opened.is_err() {
            zeroize::Zeroize::zeroize(out);
            return Err(());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_layout_is_layer_index_flag() {
        let at = ChunkPosition {
            layer: 0x0102_0304,
            index: 0x0005_0607_0809_0a0b,
            last: true,
        };
        assert_eq!(at.nonce().as_ref(), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1]);
    }

    #[test]
    fn every_field_of_the_position_is_authenticated() {
        let key = ChunkKey::new(&[3; KEY_LEN], [4; CAPSULE_ID_LEN]);
        let at = ChunkPosition {
            layer: 1,
            index: 2,
            last: false,
        };
        let mut sealed = b"weights".to_vec();
        key.seal(at, &mut sealed);
        let others = [
            ChunkPosition { layer: 0, ..at },
            ChunkPosition { index: 3, ..at },
            ChunkPosition { last: true, ..at },
        ];
        for other in others {
            let mut buf = sealed.clone();
            assert!(key.open_in_place(other, &mut buf).is_err(), "{other:?}");
        }
        let spliced = ChunkKey::new(&[3; KEY_LEN], [5; CAPSULE_ID_LEN]);
        assert!(spliced.open_in_place(at, &mut sealed.clone()).is_err());
        let mut buf = sealed.clone();
        key.open_in_place(at, &mut buf).unwrap();
        assert_eq!(&buf[..buf.len() - TAG_LEN], b"weights");

        let mut out = [0u8; 7];
        key.open_into(at, &sealed, &mut out).unwrap();
        assert_eq!(&out, b"weights");
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        assert!(key.open_into(at, &tampered, &mut out).is_err());
        assert_eq!(out, [0; 7], "unauthenticated bytes are wiped");
        assert!(key.open_into(at, &sealed, &mut [0u8; 6]).is_err());
    }
}
