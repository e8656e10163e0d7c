//! Request extractors whose every rejection is an [`ApiError`] in the JSON error shape.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::{ApiError, AppState, MAX_BODY_BYTES};

/// A JSON body, like [`axum::Json`], refused as `malformed_request` (bad JSON, wrong or
/// missing content type, missing, unknown or ill-typed fields) or `payload_too_large`.
pub(crate) struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge)
            }
            Err(rejection) => {
                tracing::debug!(%rejection, "refused request body");
                Err(ApiError::MalformedRequest)
            }
        }
    }
}

/// Proof that the request carried the admin token as `Authorization: Bearer <token>`.
/// Declared before the body in a handler's arguments, so an unauthenticated request is
/// refused before its body is read.
pub(crate) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then_some(token)
            });
        match presented {
            Some(token) if state.inner.keys.is_admin_token(token) => Ok(Admin),
            _ => {
                tracing::info!("admin request refused: missing or wrong admin token");
                Err(ApiError::Unauthorized)
            }
        }
    }
}

/// Refuses a request whose declared `Content-Length` is over [`MAX_BODY_BYTES`] on every
/// route, before routing; bodies without a length are cut at the same size when read.
pub(crate) async fn refuse_large_bodies(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > MAX_BODY_BYTES as u64 => ApiError::PayloadTooLarge.into_response(),
        _ => next.run(req).await,
    }
}
