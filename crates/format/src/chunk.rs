//! Sealing and opening one chunk (capsule-v1 §6).

use std::fmt;
use std::str::FromStr;

use aegis::aegis256x2::Aegis256X2;
use aegis::aegis256x4::Aegis256X4;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::key::{CAPSULE_ID_LEN, KEY_LEN};

/// Bytes an AEAD tag adds to each chunk, under either [`Aead`].
pub const TAG_LEN: usize = 16;

const AAD_LABEL: &[u8] = b"mlcapsule/v1 chunk";

/// The authenticated cipher that seals a capsule's chunks (capsule-v1 §1, §4, §6), named
/// by the header's `aead` member. Each takes a 256-bit key and gives a 128-bit tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Aead {
    /// AES-256-GCM (NIST SP 800-38D), from `aws-lc-rs`: the choice where a FIPS-approved
    /// cipher is required. A header without an `aead` member means this one.
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// AEGIS-256X2 (draft-irtf-cfrg-aegis-aead), from the `aegis` crate (libaegis):
    /// built on the AES round function, 2-3x AES-256-GCM's speed on a core with AES-NI
    /// and more with VAES. [`Aead::SEAL_DEFAULT`] until AEGIS-256X4 replaced it.
    #[serde(rename = "aegis-256x2")]
    Aegis256X2,
    /// AEGIS-256X4 (draft-irtf-cfrg-aegis-aead), from the `aegis` crate: four AEGIS-256
    /// states side by side, which fill a 512-bit VAES register where X2 fills 256 bits,
    /// so about twice X2's speed on a core with AVX-512 and VAES (`bench/README.md`).
    /// What [`Aead::SEAL_DEFAULT`] seals with.
    #[serde(rename = "aegis-256x4")]
    Aegis256X4,
}

impl Aead {
    /// Every cipher a reader accepts.
    pub const ALL: [Aead; 3] = [Aead::Aegis256X4, Aead::Aegis256X2, Aead::Aes256Gcm];
    /// What a provider seals with unless it asks otherwise: the fastest.
    pub const SEAL_DEFAULT: Aead = Aead::Aegis256X4;
    /// What a header without an `aead` member declares (capsule-v1 §4).
    pub const ABSENT: Aead = Aead::Aes256Gcm;

    /// The name the header and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            Aead::Aes256Gcm => "aes-256-gcm",
            Aead::Aegis256X2 => "aegis-256x2",
            Aead::Aegis256X4 => "aegis-256x4",
        }
    }

    /// The HKDF info that derives this cipher's payload key (capsule-v1 §2): a key is
    /// never shared between two ciphers.
    pub(crate) fn payload_info(self) -> &'static [u8] {
        match self {
            Aead::Aes256Gcm => b"mlcapsule/v1 payload",
            Aead::Aegis256X2 => b"mlcapsule/v1 payload aegis-256x2",
            Aead::Aegis256X4 => b"mlcapsule/v1 payload aegis-256x4",
        }
    }

    pub(crate) fn is_absent(&self) -> bool {
        *self == Aead::ABSENT
    }
}

impl fmt::Display for Aead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Aead {
    type Err = String;

    fn from_str(s: &str) -> Result<Aead, String> {
        Aead::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Aead::ALL.iter().map(|a| a.name()).collect();
                format!("unknown AEAD '{s}'; choose one of {}", names.join(", "))
            })
    }
}

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
    /// `uint32(l) || uint56(i) || uint8(last)`: AES-256-GCM's whole nonce, and the
    /// first 12 of AEGIS-256X2's and X4's 32 bytes, the rest zero.
    fn nonce(self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.layer.to_be_bytes());
        n[4..11].copy_from_slice(&self.index.to_be_bytes()[1..]);
        n[11] = u8::from(self.last);
        n
    }

    fn gcm_nonce(self) -> Nonce {
        Nonce::assume_unique_for_key(self.nonce())
    }

    fn aegis_nonce(self) -> [u8; 32] {
        let mut n = [0u8; 32];
        n[..12].copy_from_slice(&self.nonce());
        n
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
    cipher: Cipher,
    capsule_id: [u8; CAPSULE_ID_LEN],
}

enum Cipher {
    Aes256Gcm(LessSafeKey),
    Aegis(Lanes, Zeroizing<[u8; KEY_LEN]>),
}

/// How many AEGIS-256 states run side by side.
#[derive(Clone, Copy)]
enum Lanes {
    X2,
    X4,
}

/// `$body` with `$aegis` naming the `aegis` crate's type for `$lanes`: the two have the
/// same methods, but no trait in common.
macro_rules! with_aegis {
    ($lanes:expr, $aegis:ident => $body:expr) => {
        match $lanes {
            Lanes::X2 => {
                type $aegis = Aegis256X2<TAG_LEN>;
                $body
            }
            Lanes::X4 => {
                type $aegis = Aegis256X4<TAG_LEN>;
                $body
            }
        }
    };
}

impl ChunkKey {
    pub(crate) fn new(
        aead: Aead,
        payload_key: &[u8; KEY_LEN],
        capsule_id: [u8; CAPSULE_ID_LEN],
    ) -> ChunkKey {
        let cipher = match aead {
            Aead::Aes256Gcm => {
                let unbound =
                    UnboundKey::new(&AES_256_GCM, payload_key).expect("32 bytes is an AES-256 key");
                Cipher::Aes256Gcm(LessSafeKey::new(unbound))
            }
            Aead::Aegis256X2 => Cipher::Aegis(Lanes::X2, Zeroizing::new(*payload_key)),
            Aead::Aegis256X4 => Cipher::Aegis(Lanes::X4, Zeroizing::new(*payload_key)),
        };
        ChunkKey { cipher, capsule_id }
    }

    /// Encrypts `buf` in place and appends its tag.
    pub(crate) fn seal(&self, at: ChunkPosition, buf: &mut Vec<u8>) {
        let aad = at.aad(&self.capsule_id);
        match &self.cipher {
            Cipher::Aes256Gcm(key) => key
                .seal_in_place_append_tag(at.gcm_nonce(), Aad::from(aad), buf)
                .expect("a chunk below 64 MiB never exceeds AES-GCM's length limit"),
            Cipher::Aegis(lanes, key) => {
                let tag = with_aegis!(lanes, Aegis => {
                    Aegis::new(key, &at.aegis_nonce()).encrypt_in_place(buf, &aad)
                });
                buf.extend_from_slice(&tag);
            }
        }
    }

    /// Decrypts a sealed chunk in place; on success the plaintext is
    /// `buf[..buf.len() - TAG_LEN]`. On failure `buf` holds garbage and must be discarded.
    pub(crate) fn open_in_place(&self, at: ChunkPosition, buf: &mut [u8]) -> Result<(), ()> {
        let split = buf.len().checked_sub(TAG_LEN).ok_or(())?;
        let (ciphertext, tag) = buf.split_at_mut(split);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| ())?;
        self.open_in_place_apart(at, ciphertext, &tag)
    }

    /// Decrypts the ciphertext in `buf` in place, authenticated by `tag`. On failure
    /// `buf` is zeroized (it may hold unauthenticated bytes).
    pub(crate) fn open_in_place_apart(
        &self,
        at: ChunkPosition,
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), ()> {
        let aad = at.aad(&self.capsule_id);
        let opened = match &self.cipher {
            Cipher::Aes256Gcm(key) => key
                .open_in_place_separate_tag(at.gcm_nonce(), Aad::from(aad), tag, buf)
                .is_ok(),
            Cipher::Aegis(lanes, key) => with_aegis!(lanes, Aegis => {
                Aegis::new(key, &at.aegis_nonce())
                    .decrypt_in_place(buf, tag, &aad)
                    .is_ok()
            }),
        };
        wiped_unless(opened, buf)
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
        let aad = at.aad(&self.capsule_id);
        let opened = match &self.cipher {
            Cipher::Aes256Gcm(key) => key
                .open_separate_gather(at.gcm_nonce(), Aad::from(aad), ciphertext, tag, out)
                .is_ok(),
            Cipher::Aegis(lanes, key) => {
                let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| ())?;
                with_aegis!(lanes, Aegis => {
                    let mut opener = Aegis::new(key, &at.aegis_nonce()).decryptor(&aad, out);
                    opener.update(ciphertext).is_ok() && opener.finalize(tag).is_ok()
                })
            }
        };
        wiped_unless(opened, out)
    }
}

/// `Ok` if `opened`; otherwise zeroizes `buf`, which may hold unauthenticated bytes.
fn wiped_unless(opened: bool, buf: &mut [u8]) -> Result<(), ()> {
    if opened {
        return Ok(());
    }
    zeroize::Zeroize::zeroize(buf);
    Err(())
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
        let n = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1];
        assert_eq!(at.gcm_nonce().as_ref(), &n);
        assert_eq!(at.aegis_nonce()[..12], n);
        assert_eq!(at.aegis_nonce()[12..], [0; 20]);
    }

    #[test]
    fn aead_names_round_trip_and_unknown_ones_fail() {
        for aead in Aead::ALL {
            assert_eq!(aead.name().parse::<Aead>(), Ok(aead));
            let json = serde_json::to_string(&aead).unwrap();
            assert_eq!(json, format!("\"{}\"", aead.name()));
        }
        let err = "aes-128-gcm".parse::<Aead>().unwrap_err();
        assert!(
            err.contains("aegis-256x4, aegis-256x2, aes-256-gcm"),
            "{err}"
        );
        for (i, a) in Aead::ALL.into_iter().enumerate() {
            for b in &Aead::ALL[i + 1..] {
                assert_ne!(a.payload_info(), b.payload_info(), "{a} {b}");
            }
        }
    }

    /// Test vector 2 of AEGIS-256X2 and of AEGIS-256X4 in draft-irtf-cfrg-aegis-aead
    /// (appendix A): the `aegis` crate is called with key, nonce and associated data in
    /// their places, and [`Lanes`] names the right variant.
    #[test]
    fn aegis_256x2_and_x4_match_the_drafts_test_vectors() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let nonce: [u8; 32] = std::array::from_fn(|i| 0x10 + i as u8);
        let ad = [1, 2, 3, 4, 1, 2, 3, 4];
        let msg: Vec<u8> = (0..120).map(|i| [4, 5, 6, 7][i % 4]).collect();
        let seal = |lanes: Lanes| {
            let mut msg = msg.clone();
            let tag = with_aegis!(lanes, Aegis => {
                Aegis::new(&key, &nonce).encrypt_in_place(&mut msg, &ad)
            });
            (msg, tag)
        };
        let (msg, tag) = seal(Lanes::X2);
        assert_eq!(
            hex::encode(&msg),
            "72120c2ea8236180d67859001f4729077b7064c414384fe3a7b52f1571f4f8a7\
             d0f01e18db4f3bc0adb150702e5d147a8d36522132761b994c1bd395589e2ccf\
             0790dfe2a3d12d61cd666b2859827739db4037dd3124c78424459376f6cac08e\
             1a7223a2a43e398ce6385cd654a19f481cba3b8f25910b42"
        );
        assert_eq!(hex::encode(tag), "635d391828520bf1512763f0c8f5cdbd");
        let (msg, tag) = seal(Lanes::X4);
        assert_eq!(
            hex::encode(&msg),
            "bfc2085b7e8017da99b0b6d646ae4d01f4ba8f2e7dfca1d759ae48a135139b9a\
             aac6b4f5db810d426be1fdaff4e1454153a34b11da78ed7e418ee2ee9853042e\
             95536aecbb694cea1b16a478eb0d4d1bf6509b1ce652a45af58e0e46ffccfa2d\
             0426e702391d2ff5813808b81748a490dd656465fed61f09"
        );
        assert_eq!(hex::encode(tag), "b63b611b13975e2f3dc3cb6c2397bfcd");
    }

    #[test]
    fn every_field_of_the_position_is_authenticated() {
        for aead in Aead::ALL {
            let key = ChunkKey::new(aead, &[3; KEY_LEN], [4; CAPSULE_ID_LEN]);
            let at = ChunkPosition {
                layer: 1,
                index: 2,
                last: false,
            };
            let mut sealed = b"weights".to_vec();
            key.seal(at, &mut sealed);
            assert_eq!(sealed.len(), 7 + TAG_LEN);
            let others = [
                ChunkPosition { layer: 0, ..at },
                ChunkPosition { index: 3, ..at },
                ChunkPosition { last: true, ..at },
            ];
            for other in others {
                let mut buf = sealed.clone();
                assert!(
                    key.open_in_place(other, &mut buf).is_err(),
                    "{aead} {other:?}"
                );
            }
            let spliced = ChunkKey::new(aead, &[3; KEY_LEN], [5; CAPSULE_ID_LEN]);
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
            assert_eq!(out, [0; 7], "{aead}: unauthenticated bytes are wiped");
            assert!(key.open_into(at, &sealed, &mut [0u8; 6]).is_err());
            assert!(
                key.open_in_place(at, &mut sealed[..TAG_LEN - 1].to_vec())
                    .is_err()
            );
        }
    }

    #[test]
    fn a_chunk_sealed_under_one_aead_opens_under_no_other() {
        let at = ChunkPosition {
            layer: 0,
            index: 0,
            last: true,
        };
        for sealer in Aead::ALL {
            let mut sealed = b"weights".to_vec();
            ChunkKey::new(sealer, &[3; KEY_LEN], [4; CAPSULE_ID_LEN]).seal(at, &mut sealed);
            for opener in Aead::ALL {
                let key = ChunkKey::new(opener, &[3; KEY_LEN], [4; CAPSULE_ID_LEN]);
                let opened = key.open_in_place(at, &mut sealed.clone());
                assert_eq!(opened.is_ok(), sealer == opener, "{sealer} → {opener}");
            }
        }
    }
}
