//! The client's endpoints (`spec/provisioning.md` §4, §6): a setup nonce, the attested
//! setup that releases the grant to exactly one enclave instance, and signed top-ups.
//! Each needs the licence token in the body.

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use axum::Json;
use axum::extract::State;
use capsule_attest::{Evidence, SIM, SimVerifier, Verifier as _};
use capsule_format::{
    CAPSULE_ID_LEN, Grant, INSTANCE_ID_LEN, SealedGrant, TopUp, report_data, seal_grant,
};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::admin::{count, unsigned};
use crate::day::{Day, now_unix};
use crate::extract::ApiJson;
use crate::keys::sha256;
use crate::store::{Binding, LicenceRow};
use crate::{ApiError, AppState};

/// Length of a setup nonce.
pub(crate) const NONCE_LEN: usize = 32;
/// How long a setup nonce stays valid.
pub(crate) const NONCE_TTL_S: i64 = 300;

/// The licence a token names, if it is known and has not expired.
async fn live_licence(state: &AppState, token: &str) -> Result<LicenceRow, ApiError> {
    let licence = state
        .inner
        .store
        .licence_by_token(&sha256(token.trim().as_bytes()))
        .await?
        .ok_or(ApiError::UnknownLicence)?;
    if licence
        .expires
        .as_deref()
        .and_then(Day::parse)
        .is_some_and(|d| d.has_passed())
    {
        return Err(ApiError::LicenceExpired);
    }
    Ok(licence)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NonceRequest {
    licence: Zeroizing<String>,
}

#[derive(Serialize)]
pub(crate) struct NonceIssued {
    nonce: String,
    expires_in_s: i64,
}

/// `POST /v1/setup/nonce`.
pub(crate) async fn nonce(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<NonceRequest>,
) -> Result<Json<NonceIssued>, ApiError> {
    let licence = live_licence(&state, &req.licence).await?;
    if licence.instance_id.is_some() {
        return Err(ApiError::LicenceAlreadyProvisioned);
    }
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| ApiError::Internal)?;
    let now = now_unix();
    state
        .inner
        .store
        .insert_nonce(&nonce, &licence.id, now + NONCE_TTL_S, now)
        .await?;
    Ok(Json(NonceIssued {
        nonce: hex::encode(nonce),
        expires_in_s: NONCE_TTL_S,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetupRequest {
    licence: Zeroizing<String>,
    #[serde(with = "hex")]
    nonce: [u8; NONCE_LEN],
    #[serde(with = "hex")]
    instance_id: [u8; INSTANCE_ID_LEN],
    #[serde(with = "hex")]
    enclave_key: [u8; 32],
    evidence: Evidence,
}

#[derive(Serialize)]
pub(crate) struct SetupDone {
    sealed_grant: SealedGrant,
    licence_id: String,
    queries: u64,
    expires: Option<String>,
    server_key: String,
}

/// `POST /v1/setup`. The checks run in the order of `spec/provisioning.md` §4.2, each
/// with its own code; the nonce is spent by the first request that presents it, whether
/// the later checks pass or not.
pub(crate) async fn setup(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<SetupRequest>,
) -> Result<Json<SetupDone>, ApiError> {
    let inner = &state.inner;
    let licence = live_licence(&state, &req.licence).await?;
    let now = now_unix();
    if !inner
        .store
        .consume_nonce(&req.nonce, &licence.id, now)
        .await?
    {
        tracing::info!(licence_id = licence.id, "setup refused: nonce invalid");
        return Err(ApiError::NonceInvalid);
    }

    let evidence = &req.evidence;
    if !(evidence.platform == SIM && inner.allow_sim) {
        tracing::info!(
            licence_id = licence.id,
            platform = evidence.platform,
            "setup refused: platform not allowed"
        );
        return Err(ApiError::PlatformNotAllowed);
    }
    if !inner.allowed_measurements.contains(&evidence.measurement) {
        tracing::info!(
            licence_id = licence.id,
            measurement = hex::encode(evidence.measurement),
            "setup refused: measurement not allowed"
        );
        return Err(ApiError::MeasurementNotAllowed);
    }
    let expected = report_data(&req.enclave_key, &req.instance_id, &req.nonce);
    let verified = match SimVerifier.verify(evidence, &expected) {
        Ok(v) if v.platform == evidence.platform && v.measurement == evidence.measurement => v,
        Ok(_) => {
            tracing::warn!(
                licence_id = licence.id,
                "verifier result disagrees with evidence"
            );
            return Err(ApiError::EvidenceRejected);
        }
        Err(e) => {
            tracing::info!(licence_id = licence.id, error = %e, "setup refused: evidence rejected");
            return Err(ApiError::EvidenceRejected);
        }
    };

    let instance_hex = hex::encode(req.instance_id);
    let binding = Binding {
        licence_id: &licence.id,
        instance_id: &instance_hex,
        enclave_key: &hex::encode(req.enclave_key),
        platform: &verified.platform,
        measurement: &hex::encode(verified.measurement),
        platform_id: &hex::encode(verified.platform_id),
        now,
    };
    let Some((tx, row)) = inner.store.begin_provision(&binding).await? else {
        tracing::info!(
            licence_id = licence.id,
            "setup refused: licence already provisioned"
        );
        return Err(ApiError::LicenceAlreadyProvisioned);
    };

    let mut capsule_id = [0u8; CAPSULE_ID_LEN];
    hex::decode_to_slice(&row.model_id, &mut capsule_id).map_err(|_| ApiError::Internal)?;
    let model_key = inner
        .keys
        .unwrap_model_key(&capsule_id, &row.sealed_key)
        .ok_or_else(|| {
            tracing::error!(
                model_id = row.model_id,
                "stored model key does not unwrap under the master key"
            );
            ApiError::Internal
        })?;
    let queries = unsigned(row.total_queries);
    let grant = Grant::new(
        licence.id.clone(),
        req.instance_id,
        capsule_id,
        &model_key,
        queries,
        row.expires.clone(),
        inner.keys.server_key(),
    );
    // X25519 takes any 32 bytes, so this fails only on a fault; the transaction rolls back.
    let sealed_grant = seal_grant(&grant, &req.enclave_key, &req.nonce).map_err(|_| {
        tracing::error!(licence_id = licence.id, "sealing the grant failed");
        ApiError::Internal
    })?;
    tx.commit().await?;
    tracing::info!(
        licence_id = licence.id,
        instance_id = instance_hex,
        platform = verified.platform,
        "licence provisioned"
    );
    Ok(Json(SetupDone {
        sealed_grant,
        licence_id: licence.id,
        queries,
        expires: row.expires,
        server_key: hex::encode(inner.keys.server_key()),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopUpRequest {
    licence: Zeroizing<String>,
    #[serde(with = "hex")]
    instance_id: [u8; INSTANCE_ID_LEN],
    #[serde(default)]
    used: Option<u64>,
    #[serde(default)]
    detections: Option<Detections>,
}

/// What the enclave's defenses recorded (provisioning §6.1), as the client reports it.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Detections {
    prada_alarms: u64,
    prada_denying: bool,
    #[serde(default)]
    first_alarm: Option<FirstAlarm>,
    detector_refusals: u64,
    unobserved_queries: u64,
    resyncs: u64,
}

/// The first PRADA alarm: the query it was raised at, W, and the sample size.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FirstAlarm {
    query: u64,
    w: f64,
    distances: u64,
}

impl Detections {
    /// Counts in range (provisioning §1), W a number in [0, 1].
    fn check(&self) -> Result<(), ApiError> {
        for n in [
            self.prada_alarms,
            self.detector_refusals,
            self.unobserved_queries,
            self.resyncs,
        ] {
            count(n)?;
        }
        if let Some(a) = &self.first_alarm {
            count(a.query)?;
            count(a.distances)?;
            if !(0.0..=1.0).contains(&a.w) {
                return Err(ApiError::MalformedRequest);
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
pub(crate) struct TopUpIssued {
    token: String,
    seq: u64,
    total_queries: u64,
    expires: Option<String>,
}

/// `POST /v1/topup`.
pub(crate) async fn topup(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TopUpRequest>,
) -> Result<Json<TopUpIssued>, ApiError> {
    let used = req.used.map(count).transpose()?;
    let detections = match &req.detections {
        Some(d) => {
            d.check()?;
            Some(serde_json::to_string(d).map_err(|_| ApiError::Internal)?)
        }
        None => None,
    };
    let licence = live_licence(&state, &req.licence).await?;
    let instance_hex = hex::encode(req.instance_id);
    match &licence.instance_id {
        None => return Err(ApiError::LicenceNotProvisioned),
        Some(bound) if *bound != instance_hex => {
            tracing::info!(
                licence_id = licence.id,
                instance_id = instance_hex,
                "top-up refused: instance mismatch"
            );
            return Err(ApiError::InstanceMismatch);
        }
        Some(_) => {}
    }
    let row = state
        .inner
        .store
        .next_topup(
            &licence.id,
            &instance_hex,
            used,
            detections.as_deref(),
            now_unix(),
        )
        .await?
        .ok_or(ApiError::InstanceMismatch)?;
    let topup = TopUp {
        licence_id: licence.id,
        instance_id: req.instance_id,
        seq: unsigned(row.topup_seq),
        total_queries: unsigned(row.total_queries),
        expires: row.expires,
    };
    let token = topup.sign(state.inner.keys.signer());
    tracing::info!(
        licence_id = topup.licence_id,
        seq = topup.seq,
        total_queries = topup.total_queries,
        "top-up issued"
    );
    if let Some(d) = &req.detections
        && (d.prada_alarms > 0 || d.detector_refusals > 0 || d.unobserved_queries > 0)
    {
        tracing::warn!(
            licence_id = topup.licence_id,
            prada_alarms = d.prada_alarms,
            detector_refusals = d.detector_refusals,
            unobserved_queries = d.unobserved_queries,
            "the client's enclave reports detections"
        );
    }
    Ok(Json(TopUpIssued {
        token,
        seq: topup.seq,
        total_queries: topup.total_queries,
        expires: topup.expires,
    }))
}
