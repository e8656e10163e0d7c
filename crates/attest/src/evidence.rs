//! Attestation evidence as it travels, and what a verifier concludes from it
//! (`spec/attestation.md` §1.1).

use serde::{Deserialize, Serialize};

/// Attestation evidence as it travels (JSON, hex for bytes).
///
/// Everything in it is public. It proves nothing until a [`crate::Verifier`] for its
/// platform has checked it against the report data the verifier expects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evidence {
    /// The platform that made it, e.g. [`crate::SIM`].
    pub platform: String,
    /// What runs: SHA-256 of the enclave binary ([`crate::measure_file`]).
    #[serde(with = "hex")]
    pub measurement: [u8; 32],
    /// The 64 bytes the enclave chose to attest (`capsule_format::report_data`).
    #[serde(with = "hex")]
    pub report_data: [u8; 64],
    /// `sim`: the platform's Ed25519 attestation public key (32 bytes).
    #[serde(with = "hex")]
    pub platform_key: Vec<u8>,
    /// `sim`: Ed25519 over
    /// `"mlcapsule/v1 sim report\n" || platform || 0x00 || measurement || report_data`.
    #[serde(with = "hex")]
    pub signature: Vec<u8>,
}

/// What verified evidence proves: this measurement runs on this platform instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedEvidence {
    /// The platform, e.g. [`crate::SIM`].
    pub platform: String,
    /// The measurement of the enclave binary.
    pub measurement: [u8; 32],
    /// Identifies the platform instance (the machine): SHA-256 of `platform_key`.
    pub platform_id: [u8; 32],
}
