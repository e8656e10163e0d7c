//! MLCapsule's platform abstraction (`spec/attestation.md`).
//!
//! An enclave needs three things from the platform it runs on, and the provisioning
//! server needs one:
//!
//! - [`Attester`] (client, inside the enclave process): evidence that a given binary
//!   (its *measurement*) runs on a genuine platform and chose 64 bytes of *report data*
//!   (in MLCapsule, `capsule_format::report_data`, which binds the enclave's key, its
//!   instance id and the server's nonce); and *sealing*, encryption to a key that only this
//!   binary on this platform can derive.
//! - [`MonotonicCounter`] (client): a counter that only goes up and is durable before it
//!   answers, the anchor of the query budget against rollback.
//! - [`Verifier`] (server): checks [`Evidence`] and says which platform and measurement it
//!   proves. Whether to *trust* that platform and that measurement is the server's policy,
//!   not this crate's.
//!
//! The only platform today is [`SIM`], a software emulation for development
//! ([`SimPlatform`], [`SimAttester`], [`SimCounter`], [`SimVerifier`]): a 32-byte secret in a
//! private directory stands in for the hardware's fused keys. It protects against other
//! unprivileged users of the machine and against copying state to another machine, and
//! **not** against the machine's owner or root, who can read the directory and so forge
//! evidence, unseal state and roll counters back (`spec/attestation.md` §2).
//!
//! ```
//! use capsule_attest::{Attester, MonotonicCounter, SimPlatform, SimVerifier, Verifier};
//!
//! let dir = tempfile::tempdir()?;
//! let platform = SimPlatform::open_or_create(&dir.path().join("platform"))?;
//! let attester = platform.attester([7; 32]); // measurement: measure_file(enclave binary)
//!
//! // Setup: the enclave attests its report data; the server verifies it.
//! let report_data = [1u8; 64];
//! let evidence = attester.attest(&report_data)?;
//! let json = serde_json::to_string(&evidence)?;
//! let received: capsule_attest::Evidence = serde_json::from_str(&json)?;
//! let verified = SimVerifier.verify(&received, &report_data)?;
//! assert_eq!(verified.measurement, [7; 32]);
//!
//! // The enclave keeps state sealed to itself, and counts queries.
//! let sealed = attester.seal(b"grant", b"model key")?;
//! assert_eq!(&attester.unseal(b"grant", &sealed)?[..], b"model key");
//! let mut counter = platform.create_counter(&[9; 16])?;
//! assert_eq!(counter.increment()?, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What it does not do: decide which platforms or measurements are trusted (the server
//! does), talk to a network, or provide any hardware protection. TPM 2.0 (quote over PCRs,
//! NV counter), SGX DCAP, SEV-SNP and Nitro are planned as further implementations of
//! [`Attester`] + [`MonotonicCounter`] (client) and [`Verifier`] (server), each with its own
//! platform name in [`Evidence::platform`].

mod error;
mod evidence;
mod measure;
mod sim;

pub use error::Error;
pub use evidence::{Evidence, VerifiedEvidence};
pub use measure::measure_file;
pub use sim::{SimAttester, SimCounter, SimPlatform, SimVerifier};

/// Platform name of the software-emulated development platform (`spec/attestation.md` §3).
pub const SIM: &str = "sim";

/// The client side of a platform, used inside the enclave process.
///
/// An attester is bound to one measurement: the binary it attests and seals for.
pub trait Attester {
    /// The platform's name, as put in [`Evidence::platform`] (e.g. [`SIM`]).
    fn platform(&self) -> &'static str;

    /// The measurement this attester attests and seals for.
    fn measurement(&self) -> [u8; 32];

    /// Evidence that this measurement runs on this platform and chose `report_data`.
    fn attest(&self, report_data: &[u8; 64]) -> Result<Evidence, Error>;

    /// Seals to this platform AND this measurement (another binary or machine cannot
    /// unseal). `aad` is bound: [`Attester::unseal`] needs the same bytes.
    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error>;

    /// Opens what [`Attester::seal`] made with the same platform, measurement and `aad`.
    /// Any failure is [`Error::Unseal`], whatever its cause.
    fn unseal(&self, aad: &[u8], sealed: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, Error>;
}

/// A counter that never goes down, for one enclave instance.
pub trait MonotonicCounter {
    /// The current value, as last read or durably written.
    fn value(&self) -> u64;

    /// Adds one and returns the new value only after it is durable (fsync'd).
    ///
    /// On error the value is unchanged in memory; the write may or may not have reached the
    /// disk, so the caller must not release what the increment was paying for.
    fn increment(&mut self) -> Result<u64, Error>;
}

/// The server side of a platform.
pub trait Verifier {
    /// Checks that `evidence` is genuine for its platform and attests exactly
    /// `expected_report_data`, and returns what it proves. Trust in the platform and the
    /// measurement is the caller's decision.
    fn verify(
        &self,
        evidence: &Evidence,
        expected_report_data: &[u8; 64],
    ) -> Result<VerifiedEvidence, Error>;
}
