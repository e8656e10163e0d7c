//! Verification of `sim` evidence (`spec/attestation.md` §4.2).

use aws_lc_rs::signature::{ED25519, UnparsedPublicKey};

use super::keys;
use crate::{Error, Evidence, SIM, VerifiedEvidence, Verifier};

/// Domain separation of the `sim` report signature.
const REPORT_CONTEXT: &[u8] = b"mlcapsule/v1 sim report\n";

/// The bytes a `sim` attestation key signs:
/// `"mlcapsule/v1 sim report\n" || platform || 0x00 || measurement || report_data`.
pub(crate) fn signed_report(
    platform: &str,
    measurement: &[u8; 32],
    report_data: &[u8; 64],
) -> Vec<u8> {
    let mut message =
        Vec::with_capacity(REPORT_CONTEXT.len() + platform.len() + 1 + measurement.len() + 64);
    message.extend_from_slice(REPORT_CONTEXT);
    message.extend_from_slice(platform.as_bytes());
    message.push(0);
    message.extend_from_slice(measurement);
    message.extend_from_slice(report_data);
    message
}

/// Verifies `sim` evidence.
///
/// It checks that the platform is [`SIM`], that the signature verifies under the evidence's
/// own `platform_key`, and that the report data equals the expected one (in constant time).
/// It says nothing about trust in the `sim` platform: anyone can make a `sim` platform and
/// sign whatever measurement they like with it. The SERVER decides whether to accept `sim`
/// at all, which measurements it allows and, if it wants, which platform ids.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimVerifier;

impl Verifier for SimVerifier {
    fn verify(
        &self,
        evidence: &Evidence,
        expected_report_data: &[u8; 64],
    ) -> Result<VerifiedEvidence, Error> {
        if evidence.platform != SIM {
            return Err(Error::UnsupportedPlatform {
                platform: evidence.platform.clone(),
            });
        }
        if evidence.platform_key.len() != 32 {
            return Err(Error::InvalidEvidence);
        }
        let message = signed_report(SIM, &evidence.measurement, &evidence.report_data);
        UnparsedPublicKey::new(&ED25519, &evidence.platform_key)
            .verify(&message, &evidence.signature)
            .map_err(|_| Error::InvalidEvidence)?;
        if !constant_time_eq(&evidence.report_data, expected_report_data) {
            return Err(Error::ReportDataMismatch);
        }
        Ok(VerifiedEvidence {
            platform: SIM.to_string(),
            measurement: evidence.measurement,
            platform_id: keys::platform_id(&evidence.platform_key),
        })
    }
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8; 64], b: &[u8; 64]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attester, SimPlatform};

    fn evidence() -> (tempfile::TempDir, Evidence) {
        let dir = tempfile::tempdir().unwrap();
        let platform = SimPlatform::open_or_create(dir.path()).unwrap();
        let evidence = platform.attester([3; 32]).attest(&[4; 64]).unwrap();
        (dir, evidence)
    }

    #[test]
    fn genuine_evidence_verifies_and_names_platform_measurement_and_machine() {
        let (dir, evidence) = evidence();
        let verified = SimVerifier.verify(&evidence, &[4; 64]).unwrap();
        let platform = SimPlatform::open_or_create(dir.path()).unwrap();
        assert_eq!(
            verified,
            VerifiedEvidence {
                platform: SIM.into(),
                measurement: [3; 32],
                platform_id: platform.platform_id(),
            }
        );
        assert_eq!(evidence.platform_key, platform.platform_key());
    }

    #[test]
    fn evidence_survives_its_json_form() {
        let (_dir, evidence) = evidence();
        let json = serde_json::to_string(&evidence).unwrap();
        assert!(json.contains(&"03".repeat(32)), "{json}");
        let back: Evidence = serde_json::from_str(&json).unwrap();
        assert_eq!(back, evidence);
        SimVerifier.verify(&back, &[4; 64]).unwrap();
        let extra = json.replacen('{', "{\"extra\":1,", 1);
        assert!(serde_json::from_str::<Evidence>(&extra).is_err());
    }

    #[test]
    fn a_change_to_any_field_is_refused() {
        let (_dir, genuine) = evidence();

        let mut e = genuine.clone();
        e.platform = "tpm".into();
        assert!(matches!(
            SimVerifier.verify(&e, &[4; 64]),
            Err(Error::UnsupportedPlatform { platform }) if platform == "tpm"
        ));
        e.platform = "sim ".into();
        assert!(SimVerifier.verify(&e, &[4; 64]).is_err());

        let mut e = genuine.clone();
        e.measurement[31] ^= 1;
        assert!(matches!(
            SimVerifier.verify(&e, &[4; 64]),
            Err(Error::InvalidEvidence)
        ));

        // Changed report data fails on the signature whichever report data is expected.
        let mut e = genuine.clone();
        e.report_data[0] ^= 1;
        let changed = e.report_data;
        for expected in [[4; 64], changed] {
            assert!(matches!(
                SimVerifier.verify(&e, &expected),
                Err(Error::InvalidEvidence)
            ));
        }

        let mut e = genuine.clone();
        e.platform_key[0] ^= 1;
        assert!(matches!(
            SimVerifier.verify(&e, &[4; 64]),
            Err(Error::InvalidEvidence)
        ));
        let mut e = genuine.clone();
        e.platform_key.push(0);
        assert!(matches!(
            SimVerifier.verify(&e, &[4; 64]),
            Err(Error::InvalidEvidence)
        ));

        let mut e = genuine.clone();
        e.signature[10] ^= 0x80;
        assert!(matches!(
            SimVerifier.verify(&e, &[4; 64]),
            Err(Error::InvalidEvidence)
        ));
        let mut e = genuine.clone();
        e.signature.truncate(63);
        assert!(matches!(
            SimVerifier.verify(&e, &[4; 64]),
            Err(Error::InvalidEvidence)
        ));
        e.signature.clear();
        assert!(SimVerifier.verify(&e, &[4; 64]).is_err());

        SimVerifier.verify(&genuine, &[4; 64]).unwrap();
    }

    #[test]
    fn genuine_evidence_for_other_report_data_is_refused() {
        let (_dir, evidence) = evidence();
        let mut expected = [4; 64];
        expected[63] ^= 1;
        assert!(matches!(
            SimVerifier.verify(&evidence, &expected),
            Err(Error::ReportDataMismatch)
        ));
    }

    #[test]
    fn another_platforms_key_cannot_vouch_for_this_evidence() {
        let (_dir, mut evidence) = evidence();
        let (_other_dir, other) = self::evidence();
        evidence.platform_key = other.platform_key;
        assert!(matches!(
            SimVerifier.verify(&evidence, &[4; 64]),
            Err(Error::InvalidEvidence)
        ));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        let a = [9u8; 64];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        for i in [0, 31, 63] {
            b = a;
            b[i] ^= 0x10;
            assert!(!constant_time_eq(&a, &b));
        }
    }
}
