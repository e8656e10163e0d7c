//! The provider's endpoints (`spec/provisioning.md` §3): register a model key, issue
//! licences, grant more queries, read a licence's status. All need the admin token.

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use capsule_format::{CAPSULE_ID_LEN, KEY_LEN, ModelKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::day::{Day, now_unix, rfc3339};
use crate::extract::{Admin, ApiJson};
use crate::keys::{random_token, sha256};
use crate::store::GrantRefusal;
use crate::{ApiError, AppState};

/// Prefix of licence tokens; the licence id and a random secret follow.
pub(crate) const LICENCE_TOKEN_PREFIX: &str = "mlc-licence-v1.";
/// Longest model name accepted.
const MAX_NAME_LEN: usize = 200;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddModel {
    #[serde(with = "hex")]
    capsule_id: [u8; CAPSULE_ID_LEN],
    name: String,
    model_key: Zeroizing<String>,
    #[serde(default)]
    max_queries: Option<u64>,
    #[serde(default)]
    expires: Option<Day>,
}

#[derive(Serialize)]
pub(crate) struct ModelAdded {
    model_id: String,
}

/// `POST /v1/models`.
pub(crate) async fn add_model(
    _: Admin,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<AddModel>,
) -> Result<(StatusCode, Json<ModelAdded>), ApiError> {
    let mut key_bytes = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(req.model_key.as_str(), key_bytes.as_mut())
        .map_err(|_| ApiError::MalformedRequest)?;
    let key = ModelKey::from_bytes(*key_bytes);
    let name = req.name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_LEN {
        return Err(ApiError::MalformedRequest);
    }
    let max_queries = req.max_queries.map(positive_count).transpose()?;
    let model_id = hex::encode(req.capsule_id);
    let expires = req.expires.as_ref().map(Day::as_str);

    let wrapped = state
        .inner
        .keys
        .wrap_model_key(&req.capsule_id, &key)
        .map_err(|_| {
            tracing::error!("wrapping a model key failed");
            ApiError::Internal
        })?;
    let store = &state.inner.store;
    if store
        .insert_model(&model_id, name, &wrapped, max_queries, expires, now_unix())
        .await?
    {
        tracing::info!(model_id, name, "model registered");
        return Ok((StatusCode::CREATED, Json(ModelAdded { model_id })));
    }

    // Registered before: the same request again is a harmless retry; anything else is not.
    let existing = store.model(&model_id).await?.ok_or(ApiError::Internal)?;
    let same_key = state
        .inner
        .keys
        .unwrap_model_key(&req.capsule_id, &existing.sealed_key)
        .is_some_and(|k| k.expose() == key.expose());
    if same_key
        && existing.name == name
        && existing.max_queries == max_queries
        && existing.expires.as_deref() == expires
    {
        Ok((StatusCode::OK, Json(ModelAdded { model_id })))
    } else {
        tracing::info!(
            model_id,
            "model registration refused: exists with other terms"
        );
        Err(ApiError::ModelExists)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateLicence {
    #[serde(with = "hex")]
    model_id: [u8; CAPSULE_ID_LEN],
    queries: u64,
    #[serde(default)]
    expires: Option<Day>,
}

#[derive(Serialize)]
pub(crate) struct LicenceCreated {
    licence_id: String,
    token: String,
    model_id: String,
    queries: u64,
    expires: Option<String>,
}

/// `POST /v1/licences`.
pub(crate) async fn create_licence(
    _: Admin,
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CreateLicence>,
) -> Result<(StatusCode, Json<LicenceCreated>), ApiError> {
    let queries = positive_count(req.queries)?;
    let model_id = hex::encode(req.model_id);
    let store = &state.inner.store;
    let model = store
        .model(&model_id)
        .await?
        .ok_or(ApiError::ModelNotFound)?;
    if model.max_queries.is_some_and(|max| queries > max) {
        return Err(ApiError::ExceedsPolicy);
    }
    // A licence never outlives its model; without an expiry of its own it takes the model's.
    let expires = match (req.expires, model.expires) {
        (Some(asked), Some(limit)) if asked.as_str() > limit.as_str() => {
            return Err(ApiError::ExceedsPolicy);
        }
        (Some(asked), _) => Some(asked.as_str().to_owned()),
        (None, limit) => limit,
    };

    let rng = SystemRandom::new();
    let mut id = [0u8; 16];
    rng.fill(&mut id).map_err(|_| ApiError::Internal)?;
    let licence_id = format!("lic_{}", hex::encode(id));
    let token = random_token(&format!("{LICENCE_TOKEN_PREFIX}{licence_id}."), &rng)
        .map_err(|_| ApiError::Internal)?;
    store
        .insert_licence(
            &licence_id,
            &model_id,
            &sha256(token.as_bytes()),
            queries,
            expires.as_deref(),
            now_unix(),
        )
        .await?;
    tracing::info!(licence_id, model_id, queries, "licence created");
    Ok((
        StatusCode::CREATED,
        Json(LicenceCreated {
            licence_id,
            token,
            model_id,
            queries: req.queries,
            expires,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantRequest {
    queries: u64,
}

#[derive(Serialize)]
pub(crate) struct Granted {
    licence_id: String,
    total_queries: u64,
}

/// `POST /v1/licences/{id}/grant`.
pub(crate) async fn grant(
    _: Admin,
    State(state): State<AppState>,
    Path(licence_id): Path<String>,
    ApiJson(req): ApiJson<GrantRequest>,
) -> Result<Json<Granted>, ApiError> {
    let queries = positive_count(req.queries)?;
    match state.inner.store.grant(&licence_id, queries).await? {
        Ok(total) => {
            tracing::info!(licence_id, queries, total, "queries granted");
            Ok(Json(Granted {
                licence_id,
                total_queries: unsigned(total),
            }))
        }
        Err(GrantRefusal::NoSuchLicence) => Err(ApiError::LicenceNotFound),
        Err(GrantRefusal::ExceedsPolicy) => Err(ApiError::ExceedsPolicy),
    }
}

#[derive(Serialize)]
pub(crate) struct LicenceStatus {
    licence_id: String,
    model_id: String,
    model_name: String,
    total_queries: u64,
    expires: Option<String>,
    expired: bool,
    created_at: String,
    instance_id: Option<String>,
    platform: Option<String>,
    measurement: Option<String>,
    platform_id: Option<String>,
    provisioned_at: Option<String>,
    topup_seq: u64,
    last_reported_used: Option<u64>,
    last_reported_at: Option<String>,
    last_reported_detections: Option<serde_json::Value>,
    last_reported_detections_at: Option<String>,
}

/// `GET /v1/licences/{id}`.
pub(crate) async fn licence_status(
    _: Admin,
    State(state): State<AppState>,
    Path(licence_id): Path<String>,
) -> Result<Json<LicenceStatus>, ApiError> {
    let row = state
        .inner
        .store
        .licence_status(&licence_id)
        .await?
        .ok_or(ApiError::LicenceNotFound)?;
    let expired = row
        .expires
        .as_deref()
        .and_then(Day::parse)
        .is_some_and(|d| d.has_passed());
    Ok(Json(LicenceStatus {
        licence_id: row.id,
        model_id: row.model_id,
        model_name: row.model_name,
        total_queries: unsigned(row.total_queries),
        expires: row.expires,
        expired,
        created_at: rfc3339(row.created_at),
        instance_id: row.instance_id,
        platform: row.platform,
        measurement: row.measurement,
        platform_id: row.platform_id,
        provisioned_at: row.provisioned_at.map(rfc3339),
        topup_seq: unsigned(row.topup_seq),
        last_reported_used: row.last_used.map(unsigned),
        last_reported_at: row.last_used_at.map(rfc3339),
        // Stored by this server after checking it; unreadable only if the file was edited.
        last_reported_detections: row
            .detections
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok()),
        last_reported_detections_at: row.detections_at.map(rfc3339),
    }))
}

/// A count as stored (SQLite integers are signed): at most `i64::MAX`, else malformed.
pub(crate) fn count(n: u64) -> Result<i64, ApiError> {
    i64::try_from(n).map_err(|_| ApiError::MalformedRequest)
}

/// A count that must also be at least 1.
pub(crate) fn positive_count(n: u64) -> Result<i64, ApiError> {
    match count(n)? {
        0 => Err(ApiError::MalformedRequest),
        n => Ok(n),
    }
}

/// A stored count back as unsigned; the schema's CHECKs keep them non-negative.
pub(crate) fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
