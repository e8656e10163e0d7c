//! The `sim` platform's key schedule (`spec/attestation.md` §4): every key is derived
//! from the 32-byte platform secret with HKDF-SHA256.

use aws_lc_rs::hkdf;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use zeroize::Zeroizing;

/// Length of the platform secret and of every derived key.
pub(crate) const KEY_LEN: usize = 32;

/// HKDF salt of the platform-wide keys.
const PLATFORM_SALT: &[u8] = b"mlcapsule/v1 sim";
/// HKDF info of the attestation key seed.
const ATTESTATION_INFO: &[u8] = b"attestation key";
/// HKDF info of the counter MAC key.
const COUNTER_INFO: &[u8] = b"counter";
/// HKDF info of a sealing key (its salt is the measurement).
const SEAL_INFO: &[u8] = b"mlcapsule/v1 sim seal";

/// A secret key of [`KEY_LEN`] bytes, zeroized on drop.
pub(crate) type Key = Zeroizing<[u8; KEY_LEN]>;

fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8]) -> Key {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    hkdf::Salt::new(hkdf::HKDF_SHA256, salt)
        .extract(ikm)
        .expand(&[info], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut out[..]))
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// `HKDF(secret, "mlcapsule/v1 sim", "attestation key")`: the Ed25519 seed.
pub(crate) fn attestation_seed(secret: &Key) -> Key {
    hkdf_sha256(&secret[..], PLATFORM_SALT, ATTESTATION_INFO)
}

/// `HKDF(secret, "mlcapsule/v1 sim", "counter")`: the counter MAC key.
pub(crate) fn counter_key(secret: &Key) -> Key {
    hkdf_sha256(&secret[..], PLATFORM_SALT, COUNTER_INFO)
}

/// `HKDF(secret, measurement, "mlcapsule/v1 sim seal")`: the AES-256-GCM sealing key of
/// one enclave build on this platform.
pub(crate) fn seal_key(secret: &Key, measurement: &[u8; 32]) -> Key {
    hkdf_sha256(&secret[..], measurement, SEAL_INFO)
}

/// The Ed25519 key pair of an attestation seed.
///
/// The key pair lives in AWS-LC's memory, out of reach of our zeroizing, so callers build it only for the
/// duration of one signature and keep the seed (zeroizing) instead.
pub(crate) fn attestation_key_pair(seed: &Key) -> Ed25519KeyPair {
    Ed25519KeyPair::from_seed_unchecked(&seed[..]).expect("any 32 bytes are an Ed25519 seed")
}

/// The Ed25519 public key of an attestation seed.
pub(crate) fn attestation_public_key(seed: &Key) -> [u8; 32] {
    attestation_key_pair(seed)
        .public_key()
        .as_ref()
        .try_into()
        .expect("Ed25519 public keys are 32 bytes")
}

/// SHA-256 of a platform key: the platform id.
pub(crate) fn platform_id(platform_key: &[u8]) -> [u8; 32] {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, platform_key)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}
