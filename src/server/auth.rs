//! HMAC-signed requests from Token Vault, as an extractor.
//!
//! Order: bound? → headers present and well-formed → body within the limit →
//! timestamp window → MAC (in the key backend, constant-time compare) →
//! request id recorded (durable, single-use for 10 minutes). The id is only
//! recorded after the signature verifies, so an attacker cannot burn ids.

use super::{now, AppState};
use crate::protocol::signature::{self as sig, SignatureError};
use crate::protocol::ApiError;
use crate::store::ReplayNs;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;

pub struct Signed {
    pub body: Bytes,
    pub request_id: String,
}

fn header<'a>(h: &'a HeaderMap, name: &'static str) -> Result<&'a str, ApiError> {
    h.get(name)
        .ok_or(ApiError::AuthFailed(
            "Missing X-TokenVault signature headers",
        ))?
        .to_str()
        .map_err(|_| ApiError::AuthFailed("Malformed X-TokenVault header"))
}

fn sig_err(e: SignatureError) -> ApiError {
    ApiError::AuthFailed(e.reason())
}

/// Reads a body up to `limit` bytes; 413 beyond it. An oversized body is
/// drained (up to 4x the limit, 16 MiB at most, 5 s at most) before the 413
/// goes out, so the client reads the JSON error instead of a broken pipe.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    if declared.is_none_or(|len| len <= limit as u64) {
        let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        loop {
            match body.frame().await {
                None => return Ok(buf.freeze()),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                        if buf.len() > limit {
                            break;
                        }
                    }
                }
                Some(Err(_)) => return Err(ApiError::invalid("Request body could not be read")),
            }
        }
    }
    let cap = (limit.saturating_mul(4)).min(16 << 20);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut seen = 0usize;
        while let Some(Ok(f)) = body.frame().await {
            if let Ok(d) = f.into_data() {
                seen += d.len();
            }
            if seen > cap {
                break;
            }
        }
    })
    .await;
    Err(ApiError::PayloadTooLarge)
}

impl FromRequest<AppState> for Signed {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        if !state.is_bound() {
            return Err(ApiError::SetupRequired);
        }
        let (parts, body) = req.into_parts();
        let h = &parts.headers;
        let mac =
            sig::parse_signature_header(header(h, sig::SIGNATURE_HEADER)?).map_err(sig_err)?;
        let ts_str = header(h, sig::TIMESTAMP_HEADER)?.to_string();
        let rid = header(h, sig::REQUEST_ID_HEADER)?.to_string();
        sig::validate_request_id(&rid).map_err(sig_err)?;
        let body = read_body(body, h, state.settings.body_limit).await?;
        let t = now();
        sig::parse_timestamp(&ts_str, t).map_err(sig_err)?;
        let expected = state
            .backend
            .hmac_sha256(&sig::signing_payload(&ts_str, &body))?;
        if !sig::mac_eq(&expected, &mac) {
            return Err(ApiError::AuthFailed("HMAC signature invalid"));
        }
        let fresh = state
            .store
            .replay_remember(ReplayNs::RequestId, &rid, t + sig::REQUEST_ID_TTL_SECS, t)
            .await?;
        if !fresh {
            return Err(ApiError::AuthFailed("Request id already used"));
        }
        Ok(Signed {
            body,
            request_id: rid,
        })
    }
}
