//! The crate's one error type, and its stable wire codes (`spec/enclave-protocol.md` §6).

use std::fmt;
use std::path::PathBuf;

/// Why the enclave, or the host's handle on it, could not do what was asked.
///
/// Every variant that the enclave process can report has a stable snake_case
/// [code](Error::code) that travels in an `Error` frame; the host turns the
/// frame back into the same variant ([`Error::from_wire`]), so a caller matches
/// on `Error::BudgetExhausted { .. }` whether the enclave runs in its own
/// process or not. Every message ends with what to do next.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// In-process ([`crate::SealedModel`]): the capsule or key was rejected
    /// (tampering, wrong key, corruption). Code `capsule_rejected`.
    Format(capsule_format::Error),
    /// In-process: the authenticated architecture is not a graph this engine
    /// can run. Code `unsupported_architecture`.
    Architecture(capsule_engine::Error),
    /// In-process: the model rejected an input, or the weights do not fit the
    /// graph. Code `query_failed`.
    Engine(capsule_engine::Error),
    /// The enclave rejected the capsule: its header or a sealed chunk failed
    /// authentication, or it does not fit its architecture.
    CapsuleRejected {
        /// The enclave's explanation.
        reason: String,
    },
    /// The enclave cannot run the capsule's architecture.
    UnsupportedArchitecture {
        /// The enclave's explanation.
        reason: String,
    },
    /// The query's input tensors do not fit the model's declared inputs.
    InvalidInput {
        /// What is wrong.
        reason: String,
    },
    /// The model failed while running the query; nothing was counted.
    QueryFailed {
        /// The engine's explanation.
        reason: String,
    },
    /// The query would go over the licence's budget; nothing was computed.
    BudgetExhausted {
        /// Queries used so far (the monotonic counter).
        used: u64,
        /// Queries granted in total.
        total: u64,
    },
    /// The provider's input detector flagged the query (capsule-v1 §4.6); the query was
    /// counted and nothing was released. Code `query_refused_detector`.
    QueryRefusedDetector {
        /// The enclave's explanation.
        reason: String,
    },
    /// PRADA flagged the client's queries as model extraction and the policy denies: the
    /// query that raised the alarm was counted, later ones are refused uncounted. Code
    /// `query_refused_prada`.
    QueryRefusedPrada {
        /// The enclave's explanation.
        reason: String,
    },
    /// The loaded defense state is older than the query counter (an older copy, or a save
    /// lost in a crash): queries are refused until a top-up resynchronises it. Code
    /// `defense_state_stale`.
    DefenseStateStale {
        /// Queries counted that the state has not seen.
        behind: u64,
    },
    /// The licence (or the capsule's policy) expired; nothing was computed.
    LicenceExpired {
        /// The last day the model could run, `YYYY-MM-DD`.
        expires: String,
        /// Today, UTC, by the enclave's clock.
        today: String,
    },
    /// No licence state is loaded: neither `Provision` nor `Load` has succeeded.
    NotProvisioned,
    /// A query came before a capsule was loaded.
    CapsuleNotLoaded,
    /// `Attest` or `Provision` came before `SetupKey`.
    NoEnclaveKey,
    /// The sealed grant does not open with this enclave's key and the setup nonce.
    InvalidGrant,
    /// The grant is bound to another enclave instance.
    GrantWrongInstance,
    /// The sealed state does not open: modified, or sealed by another
    /// platform, enclave binary or instance.
    StateRejected,
    /// The licence is for another capsule than the one loaded.
    CapsuleMismatch {
        /// The capsule id the licence is for, hex.
        licensed: String,
        /// The capsule id of the capsule given, hex.
        found: String,
    },
    /// A top-up token is malformed or not signed by this licence's server.
    InvalidToken,
    /// A top-up token is for another enclave instance or licence.
    TopUpWrongInstance,
    /// A top-up token was already applied, or is older than one that was.
    TopUpReplayed {
        /// The token's sequence number.
        seq: u64,
        /// The last sequence number applied.
        applied: u64,
    },
    /// This enclave instance has no counter on this platform.
    NoCounter,
    /// The platform failed (attestation, sealing, its files).
    Platform {
        /// The platform's explanation.
        reason: String,
    },
    /// The monotonic counter could not be advanced; no output was released.
    CounterFailed {
        /// The platform's explanation.
        reason: String,
    },
    /// The enclave could not sandbox itself, so it refused to start.
    Hardening {
        /// What failed.
        reason: String,
    },
    /// The two sides speak different protocol versions.
    UnsupportedVersion {
        /// The version the reporting side speaks.
        expected: u32,
        /// The version it was offered.
        found: u32,
    },
    /// A frame broke `spec/enclave-protocol.md`; the enclave exits after reporting it.
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// A bug in the enclave (it panicked); it exits after reporting it.
    Internal {
        /// The panic message.
        reason: String,
    },
    /// Host: the enclave binary could not be started.
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The operating system's error.
        reason: String,
    },
    /// Host: the capsule file could not be read while it was streamed to the enclave.
    CapsuleFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Host: the enclave process is gone (exited, killed, or closed its pipes).
    EnclaveDied {
        /// How it ended, as far as the host can tell.
        reason: String,
    },
    /// Host: the enclave reported a code this build does not know (a newer enclave).
    Unknown {
        /// The code.
        code: String,
        /// The enclave's message.
        message: String,
    },
}

impl Error {
    /// The stable wire code of this error (`spec/enclave-protocol.md` §6).
    pub fn code(&self) -> &str {
        match self {
            Error::Format(_) | Error::CapsuleRejected { .. } => "capsule_rejected",
            Error::Architecture(_) | Error::UnsupportedArchitecture { .. } => {
                "unsupported_architecture"
            }
            Error::Engine(_) | Error::QueryFailed { .. } => "query_failed",
            Error::InvalidInput { .. } => "invalid_input",
            Error::BudgetExhausted { .. } => "budget_exhausted",
            Error::LicenceExpired { .. } => "licence_expired",
            Error::QueryRefusedDetector { .. } => "query_refused_detector",
            Error::QueryRefusedPrada { .. } => "query_refused_prada",
            Error::DefenseStateStale { .. } => "defense_state_stale",
            Error::NotProvisioned => "not_provisioned",
            Error::CapsuleNotLoaded => "capsule_not_loaded",
            Error::NoEnclaveKey => "no_enclave_key",
            Error::InvalidGrant => "invalid_grant",
            Error::GrantWrongInstance => "grant_wrong_instance",
            Error::StateRejected => "invalid_state",
            Error::CapsuleMismatch { .. } => "capsule_mismatch",
            Error::InvalidToken => "invalid_token",
            Error::TopUpWrongInstance => "topup_wrong_instance",
            Error::TopUpReplayed { .. } => "topup_replayed",
            Error::NoCounter => "no_counter",
            Error::Platform { .. } => "platform_failed",
            Error::CounterFailed { .. } => "counter_failed",
            Error::Hardening { .. } => "hardening_failed",
            Error::UnsupportedVersion { .. } => "unsupported_version",
            Error::Protocol { .. } => "malformed_frame",
            Error::Internal { .. } => "internal",
            Error::Spawn { .. } => "spawn_failed",
            Error::CapsuleFile { .. } => "capsule_file_unreadable",
            Error::EnclaveDied { .. } => "enclave_died",
            Error::Unknown { code, .. } => code,
        }
    }

    /// True when the enclave exits after reporting this error: the byte
    /// stream can no longer be trusted to be in step.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::Protocol { .. }
                | Error::UnsupportedVersion { .. }
                | Error::Internal { .. }
                | Error::NoCounter
                | Error::Hardening { .. }
                | Error::EnclaveDied { .. }
        )
    }

    /// The error frame's structured details: the members beside `code` and
    /// `message` (`spec/enclave-protocol.md` §6).
    pub(crate) fn wire_details(&self) -> WireDetails {
        let mut d = WireDetails::default();
        match self {
            Error::BudgetExhausted { used, total } => {
                d.used = Some(*used);
                d.total = Some(*total);
            }
            Error::LicenceExpired { expires, today } => {
                d.expires = Some(expires.clone());
                d.today = Some(today.clone());
            }
            Error::TopUpReplayed { seq, applied } => {
                d.seq = Some(*seq);
                d.applied = Some(*applied);
            }
            Error::DefenseStateStale { behind } => d.behind = Some(*behind),
            Error::UnsupportedVersion { expected, found } => {
                d.expected = Some(*expected);
                d.found = Some(*found);
            }
            Error::CapsuleMismatch { licensed, found } => {
                d.licensed = Some(licensed.clone());
                d.capsule = Some(found.clone());
            }
            // Rebuilt on the host as the variant that carries this text.
            Error::Format(_) | Error::Architecture(_) | Error::Engine(_) => {
                d.reason = Some(self.to_string());
            }
            Error::CapsuleRejected { reason }
            | Error::UnsupportedArchitecture { reason }
            | Error::QueryFailed { reason }
            | Error::InvalidInput { reason }
            | Error::QueryRefusedDetector { reason }
            | Error::QueryRefusedPrada { reason }
            | Error::Platform { reason }
            | Error::CounterFailed { reason }
            | Error::Hardening { reason }
            | Error::Protocol { reason }
            | Error::Internal { reason } => d.reason = Some(reason.clone()),
            _ => {}
        }
        d
    }

    /// Rebuilds the error an enclave reported in an `Error` frame.
    ///
    /// Variants with structured details get them back from `details`, so
    /// that the host shows exactly what the enclave said; a frame without
    /// the details its code needs becomes [`Error::Unknown`].
    pub fn from_wire(code: &str, message: &str, details: &WireDetails) -> Error {
        let reason = || details.reason.clone().unwrap_or_else(|| message.to_owned());
        let unknown = || Error::Unknown {
            code: code.to_owned(),
            message: message.to_owned(),
        };
        match code {
            "capsule_rejected" => Error::CapsuleRejected { reason: reason() },
            "unsupported_architecture" => Error::UnsupportedArchitecture { reason: reason() },
            "query_failed" => Error::QueryFailed { reason: reason() },
            "invalid_input" => Error::InvalidInput { reason: reason() },
            "budget_exhausted" => match (details.used, details.total) {
                (Some(used), Some(total)) => Error::BudgetExhausted { used, total },
                _ => unknown(),
            },
            "licence_expired" => match (&details.expires, &details.today) {
                (Some(expires), Some(today)) => Error::LicenceExpired {
                    expires: expires.clone(),
                    today: today.clone(),
                },
                _ => unknown(),
            },
            "query_refused_detector" => Error::QueryRefusedDetector { reason: reason() },
            "query_refused_prada" => Error::QueryRefusedPrada { reason: reason() },
            "defense_state_stale" => match details.behind {
                Some(behind) => Error::DefenseStateStale { behind },
                None => unknown(),
            },
            "not_provisioned" => Error::NotProvisioned,
            "capsule_not_loaded" => Error::CapsuleNotLoaded,
            "no_enclave_key" => Error::NoEnclaveKey,
            "invalid_grant" => Error::InvalidGrant,
            "grant_wrong_instance" => Error::GrantWrongInstance,
            "invalid_state" => Error::StateRejected,
            "capsule_mismatch" => match (&details.licensed, &details.capsule) {
                (Some(licensed), Some(found)) => Error::CapsuleMismatch {
                    licensed: licensed.clone(),
                    found: found.clone(),
                },
                _ => unknown(),
            },
            "invalid_token" => Error::InvalidToken,
            "topup_wrong_instance" => Error::TopUpWrongInstance,
            "topup_replayed" => match (details.seq, details.applied) {
                (Some(seq), Some(applied)) => Error::TopUpReplayed { seq, applied },
                _ => unknown(),
            },
            "no_counter" => Error::NoCounter,
            "platform_failed" => Error::Platform { reason: reason() },
            "counter_failed" => Error::CounterFailed { reason: reason() },
            "hardening_failed" => Error::Hardening { reason: reason() },
            "unsupported_version" => match (details.expected, details.found) {
                (Some(expected), Some(found)) => Error::UnsupportedVersion { expected, found },
                _ => unknown(),
            },
            "malformed_frame" => Error::Protocol { reason: reason() },
            "internal" => Error::Internal { reason: reason() },
            _ => unknown(),
        }
    }
}

/// The optional members of an `Error` frame (`spec/enclave-protocol.md` §6).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireDetails {
    /// `budget_exhausted`: queries used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// `budget_exhausted`: queries granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// `licence_expired`: the last day the model could run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// `licence_expired`: today by the enclave's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub today: Option<String>,
    /// `topup_replayed`: the token's sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// `topup_replayed`: the last sequence number applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// `unsupported_version`: the version the reporting side speaks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<u32>,
    /// `unsupported_version`: the version it was offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<u32>,
    /// `capsule_mismatch`: the capsule id the licence is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licensed: Option<String>,
    /// `capsule_mismatch`: the capsule id of the capsule given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capsule: Option<String>,
    /// `defense_state_stale`: queries the defense state is behind the counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind: Option<u64>,
    /// The explanation inside the message, for codes that carry one
    /// (`capsule_rejected`, `invalid_input`, `platform_failed`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

const SETUP_AGAIN: &str = "run 'mlcapsule setup' again";

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Format(e) => e.fmt(f),
            Error::Architecture(e) => write!(
                f,
                "{e}; the capsule was sealed by an incompatible mlcapsule version, upgrade mlcapsule"
            ),
            Error::Engine(e) => e.fmt(f),
            Error::CapsuleRejected { reason }
            | Error::UnsupportedArchitecture { reason }
            | Error::QueryFailed { reason }
            | Error::QueryRefusedDetector { reason }
            | Error::QueryRefusedPrada { reason } => f.write_str(reason),
            Error::DefenseStateStale { behind } => write!(
                f,
                "the defense state is {behind} queries behind the query counter (an older copy of the state, or a save lost in a crash), so the provider's policy refuses queries; nothing was counted; run 'mlcapsule topup' to resynchronise, which reports the {behind} unobserved queries to the provider"
            ),
            Error::InvalidInput { reason } => write!(
                f,
                "the input does not fit the model ({reason}); nothing was counted, check the input's shape"
            ),
            Error::BudgetExhausted { used, total } => write!(
                f,
                "query budget exhausted: {used} of {total} queries used; run 'mlcapsule topup' to buy more"
            ),
            Error::LicenceExpired { expires, today } => write!(
                f,
                "the licence expired on {expires} (today is {today} UTC by this machine's clock); run 'mlcapsule topup' to extend it"
            ),
            Error::NotProvisioned => write!(
                f,
                "no licence is loaded in the enclave; run 'mlcapsule setup' first, or pass its state"
            ),
            Error::CapsuleNotLoaded => write!(
                f,
                "no capsule is loaded in the enclave; load the licence state and the capsule before querying"
            ),
            Error::NoEnclaveKey => write!(
                f,
                "the enclave has no setup key yet; the setup must start with SetupKey, {SETUP_AGAIN}"
            ),
            Error::InvalidGrant => write!(
                f,
                "the provisioning grant does not open in this enclave (wrong key, nonce or modified); {SETUP_AGAIN}"
            ),
            Error::GrantWrongInstance => write!(
                f,
                "the provisioning grant is for another enclave instance; {SETUP_AGAIN}"
            ),
            Error::StateRejected => write!(
                f,
                "the licence state does not open: it was modified, or sealed on another machine, platform or enclave build; {SETUP_AGAIN}"
            ),
            Error::CapsuleMismatch { licensed, found } => write!(
                f,
                "this licence is for capsule {licensed}, not capsule {found}; pass the capsule the licence was bought for"
            ),
            Error::InvalidToken => write!(
                f,
                "the top-up token is malformed or not signed by this licence's server; ask the provider for a new one"
            ),
            Error::TopUpWrongInstance => write!(
                f,
                "the top-up token is for another licence or enclave instance; ask the provider for a token for this one"
            ),
            Error::TopUpReplayed { seq, applied } => write!(
                f,
                "the top-up token (number {seq}) was already applied or is older than the last one applied (number {applied}); ask the provider for a new one"
            ),
            Error::NoCounter => write!(
                f,
                "this enclave instance has no counter on this platform: the state was copied from another machine or the platform was reset; {SETUP_AGAIN}"
            ),
            Error::Platform { reason } => write!(f, "the enclave platform failed: {reason}"),
            Error::CounterFailed { reason } => write!(
                f,
                "the query counter could not be advanced, so no output was released: {reason}"
            ),
            Error::Hardening { reason } => write!(
                f,
                "the enclave refused to start because it could not sandbox itself ({reason}); run it on a Linux kernel with seccomp (x86_64 or aarch64)"
            ),
            Error::UnsupportedVersion { expected, found } => write!(
                f,
                "enclave protocol version mismatch: expected version {expected}, got {found}; install matching mlcapsule and mlcapsule-enclave binaries"
            ),
            Error::Protocol { reason } => write!(
                f,
                "enclave protocol violation ({reason}); install matching mlcapsule and mlcapsule-enclave binaries"
            ),
            Error::Internal { reason } => write!(
                f,
                "the enclave hit an internal error ({reason}); nothing was counted unless the status shows it, please report this bug"
            ),
            Error::Spawn { path, reason } => write!(
                f,
                "cannot start the enclave binary {} ({reason}); install mlcapsule-enclave next to mlcapsule or set MLCAPSULE_ENCLAVE",
                path.display()
            ),
            Error::CapsuleFile { path, reason } => write!(
                f,
                "cannot read the capsule file {} ({reason}); nothing was counted unless the status shows it",
                path.display()
            ),
            Error::EnclaveDied { reason } => write!(
                f,
                "the enclave process exited unexpectedly ({reason}); your query was not counted unless the status shows it"
            ),
            Error::Unknown { code, message } => {
                write!(f, "{message} (enclave error code '{code}')")
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Format(e) => Some(e),
            Error::Architecture(e) | Error::Engine(e) => Some(e),
            _ => None,
        }
    }
}

impl From<capsule_format::Error> for Error {
    fn from(e: capsule_format::Error) -> Error {
        Error::Format(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Error> {
        vec![
            Error::Format(capsule_format::Error::WrongKey),
            Error::Engine(capsule_engine::Error::InvalidGraph { reason: "g".into() }),
            Error::Architecture(capsule_engine::Error::InvalidGraph { reason: "g".into() }),
            Error::CapsuleRejected { reason: "r".into() },
            Error::InvalidInput { reason: "r".into() },
            Error::UnsupportedArchitecture { reason: "r".into() },
            Error::QueryFailed { reason: "r".into() },
            Error::QueryRefusedDetector { reason: "r".into() },
            Error::QueryRefusedPrada { reason: "r".into() },
            Error::DefenseStateStale { behind: 3 },
            Error::BudgetExhausted { used: 3, total: 3 },
            Error::LicenceExpired {
                expires: "2020-01-01".into(),
                today: "2021-01-01".into(),
            },
            Error::NotProvisioned,
            Error::CapsuleNotLoaded,
            Error::NoEnclaveKey,
            Error::InvalidGrant,
            Error::GrantWrongInstance,
            Error::StateRejected,
            Error::CapsuleMismatch {
                licensed: "aa".into(),
                found: "bb".into(),
            },
            Error::InvalidToken,
            Error::TopUpWrongInstance,
            Error::TopUpReplayed { seq: 1, applied: 2 },
            Error::NoCounter,
            Error::Platform { reason: "r".into() },
            Error::CounterFailed { reason: "r".into() },
            Error::Hardening { reason: "r".into() },
            Error::UnsupportedVersion {
                expected: 1,
                found: 2,
            },
            Error::Protocol { reason: "r".into() },
            Error::Internal { reason: "r".into() },
        ]
    }

    #[test]
    fn every_enclave_error_survives_the_wire() {
        for e in samples() {
            let message = e.to_string();
            let back = Error::from_wire(e.code(), &message, &e.wire_details());
            assert_eq!(back.code(), e.code());
            assert_eq!(back.to_string(), message, "{}", e.code());
            assert!(!matches!(back, Error::Unknown { .. }), "{}", e.code());
        }
    }

    #[test]
    fn unknown_codes_keep_their_message() {
        let e = Error::from_wire("from_the_future", "do X", &WireDetails::default());
        assert_eq!(e.code(), "from_the_future");
        assert!(e.to_string().starts_with("do X"));
        let incomplete = Error::from_wire("budget_exhausted", "m", &WireDetails::default());
        assert!(matches!(incomplete, Error::Unknown { .. }));
    }
}
