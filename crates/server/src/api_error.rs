//! Failures of one HTTP request, each with a status and a stable code
//! (`spec/provisioning.md` §2). The body never carries internal details: those are logged.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Why a request was refused. Each variant maps to one HTTP status and one stable
/// snake_case code, which clients match on; the message is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiError {
    /// 400 `malformed_request`: not JSON, wrong content type, missing or unknown fields,
    /// bad hex, a date that is not `YYYY-MM-DD`, a count out of range.
    MalformedRequest,
    /// 413 `payload_too_large`: the body is over [`crate::MAX_BODY_BYTES`].
    PayloadTooLarge,
    /// 404 `not_found`: no such route.
    NotFound,
    /// 405 `method_not_allowed`: the route exists, the method does not.
    MethodNotAllowed,
    /// 401 `unauthorized`: an admin endpoint without the right bearer token.
    Unauthorized,
    /// 409 `model_exists`: the capsule id is registered with another key or other terms.
    ModelExists,
    /// 404 `model_not_found`: no model with this id.
    ModelNotFound,
    /// 404 `licence_not_found`: no licence with this id (admin endpoints).
    LicenceNotFound,
    /// 400 `exceeds_policy`: queries or expiry beyond what the model allows.
    ExceedsPolicy,
    /// 403 `unknown_licence`: the licence token is not known.
    UnknownLicence,
    /// 403 `licence_expired`: the licence's last day has passed.
    LicenceExpired,
    /// 409 `licence_already_provisioned`: the licence is bound to an enclave instance.
    LicenceAlreadyProvisioned,
    /// 403 `nonce_invalid`: the nonce was not issued for this licence, was used, or expired.
    NonceInvalid,
    /// 403 `platform_not_allowed`: this server does not accept evidence from the platform.
    PlatformNotAllowed,
    /// 403 `measurement_not_allowed`: the enclave build is not on the allowed list.
    MeasurementNotAllowed,
    /// 403 `evidence_rejected`: the evidence does not verify or is not bound to this
    /// enclave key, instance and nonce.
    EvidenceRejected,
    /// 409 `licence_not_provisioned`: a top-up for a licence no enclave holds yet.
    LicenceNotProvisioned,
    /// 403 `instance_mismatch`: a top-up for an instance the licence is not bound to.
    InstanceMismatch,
    /// 500 `internal`: a server fault (database, I/O); details are in the server's log.
    Internal,
}

impl ApiError {
    /// Every variant, for documentation checks and clients' tables.
    pub const ALL: [ApiError; 19] = [
        ApiError::MalformedRequest,
        ApiError::PayloadTooLarge,
        ApiError::NotFound,
        ApiError::MethodNotAllowed,
        ApiError::Unauthorized,
        ApiError::ModelExists,
        ApiError::ModelNotFound,
        ApiError::LicenceNotFound,
        ApiError::ExceedsPolicy,
        ApiError::UnknownLicence,
        ApiError::LicenceExpired,
        ApiError::LicenceAlreadyProvisioned,
        ApiError::NonceInvalid,
        ApiError::PlatformNotAllowed,
        ApiError::MeasurementNotAllowed,
        ApiError::EvidenceRejected,
        ApiError::LicenceNotProvisioned,
        ApiError::InstanceMismatch,
        ApiError::Internal,
    ];

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ApiError::MalformedRequest | ApiError::ExceedsPolicy => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound | ApiError::ModelNotFound | ApiError::LicenceNotFound => {
                StatusCode::NOT_FOUND
            }
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::ModelExists
            | ApiError::LicenceAlreadyProvisioned
            | ApiError::LicenceNotProvisioned => StatusCode::CONFLICT,
            ApiError::UnknownLicence
            | ApiError::LicenceExpired
            | ApiError::NonceInvalid
            | ApiError::PlatformNotAllowed
            | ApiError::MeasurementNotAllowed
            | ApiError::EvidenceRejected
            | ApiError::InstanceMismatch => StatusCode::FORBIDDEN,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients match on.
    pub fn code(self) -> &'static str {
        match self {
            ApiError::MalformedRequest => "malformed_request",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Unauthorized => "unauthorized",
            ApiError::ModelExists => "model_exists",
            ApiError::ModelNotFound => "model_not_found",
            ApiError::LicenceNotFound => "licence_not_found",
            ApiError::ExceedsPolicy => "exceeds_policy",
            ApiError::UnknownLicence => "unknown_licence",
            ApiError::LicenceExpired => "licence_expired",
            ApiError::LicenceAlreadyProvisioned => "licence_already_provisioned",
            ApiError::NonceInvalid => "nonce_invalid",
            ApiError::PlatformNotAllowed => "platform_not_allowed",
            ApiError::MeasurementNotAllowed => "measurement_not_allowed",
            ApiError::EvidenceRejected => "evidence_rejected",
            ApiError::LicenceNotProvisioned => "licence_not_provisioned",
            ApiError::InstanceMismatch => "instance_mismatch",
            ApiError::Internal => "internal",
        }
    }

    /// One sentence for a person, saying what to do.
    pub fn message(self) -> &'static str {
        match self {
            ApiError::MalformedRequest => {
                "The request is not the JSON this endpoint expects; check it against spec/provisioning.md."
            }
            ApiError::PayloadTooLarge => {
                "The request body is over 64 KiB; send only the fields the endpoint expects."
            }
            ApiError::NotFound => {
                "There is no such endpoint; check the URL against spec/provisioning.md."
            }
            ApiError::MethodNotAllowed => {
                "This endpoint does not take that HTTP method; check spec/provisioning.md."
            }
            ApiError::Unauthorized => {
                "This endpoint needs the server's admin token as 'Authorization: Bearer <token>'; read it from the admin-token file in the server's data directory."
            }
            ApiError::ModelExists => {
                "A model with this capsule id is already registered with another key or other terms; seal the model again to get a new capsule id."
            }
            ApiError::ModelNotFound => {
                "No model with this id is registered; register the capsule first."
            }
            ApiError::LicenceNotFound => "No licence with this id exists; check the licence id.",
            ApiError::ExceedsPolicy => {
                "The queries or expiry asked for go beyond what the model's registration allows; ask for fewer queries or an earlier expiry."
            }
            ApiError::UnknownLicence => {
                "This licence token is not known to the server; check the token the provider gave you."
            }
            ApiError::LicenceExpired => {
                "This licence has expired; ask the provider for a new licence."
            }
            ApiError::LicenceAlreadyProvisioned => {
                "This licence is already provisioned to an enclave instance; use that instance, or ask the provider for a new licence."
            }
            ApiError::NonceInvalid => {
                "The setup nonce is unknown, was already used, belongs to another licence or has expired; ask for a new nonce and run setup again."
            }
            ApiError::PlatformNotAllowed => {
                "This server does not accept attestation evidence from this platform; ask the provider which platforms it accepts."
            }
            ApiError::MeasurementNotAllowed => {
                "This enclave build is not on the server's allowed list; install the enclave build the provider supports."
            }
            ApiError::EvidenceRejected => {
                "The attestation evidence did not verify for this enclave key, instance and nonce; run setup again from an unmodified enclave."
            }
            ApiError::LicenceNotProvisioned => {
                "This licence is not provisioned to any enclave yet; run setup first."
            }
            ApiError::InstanceMismatch => {
                "This licence is provisioned to another enclave instance; request top-ups from that instance."
            }
            ApiError::Internal => {
                "The server failed to handle the request; try again later, and tell the provider if it persists."
            }
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.message() }
        });
        let mut response = (self.status(), Json(body)).into_response();
        if self == ApiError::Unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        tracing::error!(error = %e, "database error");
        ApiError::Internal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut codes: Vec<_> = ApiError::ALL.iter().map(|e| e.code()).collect();
        for c in &codes {
            assert!(
                c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_'),
                "{c}"
            );
        }
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ApiError::ALL.len());
    }

    #[test]
    fn every_code_is_in_the_spec() {
        let spec = include_str!("../../../spec/provisioning.md");
        for e in ApiError::ALL {
            assert!(
                spec.contains(&format!("`{}`", e.code())),
                "spec/provisioning.md does not document `{}`",
                e.code()
            );
        }
    }
}
