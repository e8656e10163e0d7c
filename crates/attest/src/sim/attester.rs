//! The `sim` attester: evidence and sealing for one measurement (`spec/attestation.md`
//! §4.1, §4.3). It holds keys in memory only and touches no file.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use super::keys::{self, Key};
use super::verifier::signed_report;
use crate::{Attester, Error, Evidence, SIM};

/// First byte of a sealed blob.
pub(crate) const SEALED_VERSION: u8 = 1;
/// AES-GCM tag length.
const TAG_LEN: usize = 16;
/// Shortest possible sealed blob: version, nonce, tag.
const SEALED_MIN_LEN: usize = 1 + NONCE_LEN + TAG_LEN;

/// The `sim` platform's [`Attester`] for one measurement, made by
/// [`crate::SimPlatform::attester`].
///
/// Needs no system call to attest, and only `getrandom(2)` to seal (for the nonce), so it
/// works after the enclave process has locked itself down.
#[derive(Clone)]
pub struct SimAttester {
    measurement: [u8; 32],
    attestation_seed: Key,
    platform_key: [u8; 32],
    seal_key: Key,
}

impl std::fmt::Debug for SimAttester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimAttester")
            .field("measurement", &hex::encode(self.measurement))
            .field("platform_key", &hex::encode(self.platform_key))
            .finish_non_exhaustive()
    }
}

impl SimAttester {
    pub(crate) fn new(secret: &Key, measurement: [u8; 32]) -> SimAttester {
        let attestation_seed = keys::attestation_seed(secret);
        SimAttester {
            measurement,
            platform_key: keys::attestation_public_key(&attestation_seed),
            attestation_seed,
            seal_key: keys::seal_key(secret, &measurement),
        }
    }

    /// The platform's Ed25519 attestation public key, as put in [`Evidence::platform_key`].
    pub fn platform_key(&self) -> [u8; 32] {
        self.platform_key
    }

    fn aead_key(&self) -> LessSafeKey {
        LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &self.seal_key[..]).expect("the seal key is 32 bytes"),
        )
    }

    /// [`Attester::seal`] with a given nonce (the test vectors need a fixed one).
    pub(crate) fn seal_with_nonce(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let mut sealed = Vec::with_capacity(SEALED_MIN_LEN + plaintext.len());
        sealed.push(SEALED_VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);
        let tag = self
            .aead_key()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut sealed[1 + NONCE_LEN..],
            )
            .map_err(|_| Error::SealFailed)?;
        sealed.extend_from_slice(tag.as_ref());
        Ok(sealed)
    }
}

impl Attester for SimAttester {
    fn platform(&self) -> &'static str {
        SIM
    }

    fn measurement(&self) -> [u8; 32] {
        self.measurement
    }

    fn attest(&self, report_data: &[u8; 64]) -> Result<Evidence, Error> {
        let message = signed_report(SIM, &self.measurement, report_data);
        let signature = keys::attestation_key_pair(&self.attestation_seed).sign(&message);
        Ok(Evidence {
            platform: SIM.to_string(),
            measurement: self.measurement,
            report_data: *report_data,
            platform_key: self.platform_key.to_vec(),
            signature: signature.as_ref().to_vec(),
        })
    }

    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::RandomFailed)?;
        self.seal_with_nonce(nonce, aad, plaintext)
    }

    fn unseal(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        if sealed.len() < SEALED_MIN_LEN || sealed[0] != SEALED_VERSION {
            return Err(Error::Unseal);
        }
        let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN]
            .try_into()
            .expect("length checked above");
        // Zeroizing from the start: on success this buffer becomes the plaintext.
        let mut buffer = Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
        let plaintext_len = self
            .aead_key()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buffer[..],
            )
            .map_err(|_| Error::Unseal)?
            .len();
        buffer.truncate(plaintext_len);
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimPlatform;
    use proptest::prelude::*;

    fn platform() -> (tempfile::TempDir, SimPlatform) {
        let dir = tempfile::tempdir().unwrap();
        let platform = SimPlatform::open_or_create(dir.path()).unwrap();
        (dir, platform)
    }

    #[test]
    fn sealed_data_opens_with_the_same_measurement_and_aad() {
        let (_dir, platform) = platform();
        let attester = platform.attester([1; 32]);
        for plaintext in [&b""[..], b"x", &[0xA5; 10_000]] {
            let sealed = attester.seal(b"state v1", plaintext).unwrap();
            assert_eq!(sealed.len(), SEALED_MIN_LEN + plaintext.len());
            assert_eq!(sealed[0], SEALED_VERSION);
            // Only long plaintexts: a 1-byte one is among ~30 random bytes one time in 9.
            if plaintext.len() >= 8 {
                assert!(!sealed.windows(plaintext.len()).any(|w| w == plaintext));
            }
            assert_eq!(
                &attester.unseal(b"state v1", &sealed).unwrap()[..],
                plaintext
            );
            // Another attester for the same measurement on the same platform, e.g. the
            // next run of the same enclave binary, opens it too.
            let again = platform.attester([1; 32]);
            assert_eq!(&again.unseal(b"state v1", &sealed).unwrap()[..], plaintext);
        }
        // Random nonces: sealing twice gives different blobs.
        assert_ne!(
            attester.seal(b"", b"same").unwrap(),
            attester.seal(b"", b"same").unwrap()
        );
    }

    #[test]
    fn another_measurement_cannot_unseal() {
        let (_dir, platform) = platform();
        let sealed = platform.attester([1; 32]).seal(b"aad", b"secret").unwrap();
        let mut other = [1; 32];
        other[0] = 2;
        let err = platform
            .attester(other)
            .unseal(b"aad", &sealed)
            .unwrap_err();
        assert!(matches!(err, Error::Unseal));
        assert!(
            err.to_string()
                .starts_with("sealed data does not open on this platform: it was made on another machine or by another enclave build, or was modified"),
            "{err}"
        );
    }

    #[test]
    fn another_platform_cannot_unseal() {
        let (_dir, platform) = platform();
        let (_other_dir, other) = self::platform();
        let sealed = platform.attester([1; 32]).seal(b"aad", b"secret").unwrap();
        assert!(matches!(
            other.attester([1; 32]).unseal(b"aad", &sealed),
            Err(Error::Unseal)
        ));
    }

    #[test]
    fn the_aad_is_bound() {
        let (_dir, platform) = platform();
        let attester = platform.attester([1; 32]);
        let sealed = attester.seal(b"grant", b"secret").unwrap();
        for aad in [&b"grant "[..], b"", b"Grant", b"gran"] {
            assert!(matches!(attester.unseal(aad, &sealed), Err(Error::Unseal)));
        }
    }

    #[test]
    fn any_change_to_a_sealed_blob_is_refused() {
        let (_dir, platform) = platform();
        let attester = platform.attester([1; 32]);
        let sealed = attester.seal(b"aad", b"secret state").unwrap();
        for i in 0..sealed.len() {
            let mut changed = sealed.clone();
            changed[i] ^= 0x01;
            assert!(
                matches!(attester.unseal(b"aad", &changed), Err(Error::Unseal)),
                "byte {i}"
            );
        }
        for len in 0..sealed.len() {
            assert!(matches!(
                attester.unseal(b"aad", &sealed[..len]),
                Err(Error::Unseal)
            ));
        }
        let mut longer = sealed.clone();
        longer.push(0);
        assert!(matches!(
            attester.unseal(b"aad", &longer),
            Err(Error::Unseal)
        ));
    }

    #[test]
    fn attester_reports_its_platform_and_measurement_and_debug_hides_keys() {
        let (_dir, platform) = platform();
        let attester = platform.attester([5; 32]);
        assert_eq!(attester.platform(), SIM);
        assert_eq!(attester.measurement(), [5; 32]);
        assert_eq!(attester.platform_key(), platform.platform_key());
        let debug = format!("{attester:?}");
        assert!(
            !debug.contains(&hex::encode(&attester.seal_key[..])),
            "{debug}"
        );
        assert!(
            !debug.contains(&hex::encode(&attester.attestation_seed[..])),
            "{debug}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_bytes_never_unseal_and_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            aad in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let attester = SimAttester::new(&Zeroizing::new([7; 32]), [1; 32]);
            prop_assert!(matches!(attester.unseal(&aad, &bytes), Err(Error::Unseal)));
            let mut versioned = bytes.clone();
            versioned.insert(0, SEALED_VERSION);
            prop_assert!(matches!(attester.unseal(&aad, &versioned), Err(Error::Unseal)));
        }
    }
}
