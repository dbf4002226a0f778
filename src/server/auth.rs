//! HMAC-signed requests from Token Vault, as an extractor.
//!
//! Order: bound? → headers present and well-formed → timestamp window →
//! request id not seen → body within the route's cap and deadline → MAC (in
//! the key backend, constant-time compare) → request id recorded (durable,
//! single-use until its timestamp has left the window). The id is only
//! recorded after the signature verifies, so an attacker cannot burn ids.

use super::shield::{Budgeted, Event};
use super::AppState;
use crate::protocol::signature::{self as sig, SignatureError};
use crate::protocol::ApiError;
use crate::store::ReplayNs;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use std::time::{Duration, Instant};

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

/// Reads a body up to `limit` bytes (the route's cap), within the
/// request's deadline and minimum rate, against the global body budget.
/// Cheap refusals come first: a declared `Content-Length` over the cap is
/// answered 413 before a byte is read. An oversized body is drained briefly
/// (at most 1 s and 1 MiB) so the client reads the JSON error instead of a
/// broken pipe; the connection then closes.
pub async fn read_body(
    s: &AppState,
    parts: &Parts,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let shield = &s.http.shield;
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    if declared.is_none_or(|len| len <= limit as u64) {
        let arrived = parts
            .extensions
            .get::<Arrived>()
            .map_or_else(Instant::now, |a| a.0);
        let cfg = &shield.cfg;
        let deadline = arrived + cfg.request_timeout;
        let want = declared.unwrap_or(0) as usize;
        let mut permit = if want > 0 {
            Some(shield.reserve(want).ok_or(ApiError::Busy)?)
        } else {
            None
        };
        let mut buf: Vec<u8> = Vec::with_capacity(want);
        loop {
            // The next bytes are due by the time the minimum rate allows
            // (after the grace period), and never after the deadline.
            let due = if cfg.min_body_rate > 0 {
                let secs = (buf.len() as f64 + 1.0) / cfg.min_body_rate as f64;
                (arrived + cfg.body_grace + Duration::from_secs_f64(secs)).min(deadline)
            } else {
                deadline
            };
            let frame = match tokio::time::timeout_at(due.into(), body.frame()).await {
                Ok(f) => f,
                Err(_) => {
                    shield.count(Event::BodyDeadline);
                    return Err(ApiError::RequestTimeout);
                }
            };
            match frame {
                None => {
                    return Ok(Bytes::from_owner(Budgeted { buf, permit }));
                }
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        if buf.len() + d.len() > limit {
                            break;
                        }
                        // Bodies without a declared length take budget as
                        // they grow.
                        let held = permit.as_ref().map_or(0, |p| p.num_permits()) * 1024;
                        if buf.len() + d.len() > held {
                            let more = shield
                                .reserve(buf.len() + d.len() - held)
                                .ok_or(ApiError::Busy)?;
                            match permit.as_mut() {
                                Some(p) => p.merge(more),
                                None => permit = Some(more),
                            }
                        }
                        buf.extend_from_slice(&d);
                    }
                }
                Some(Err(_)) => return Err(ApiError::invalid("Request body could not be read")),
            }
        }
    }
    shield.count(Event::BodyTooLarge);
    let cap = limit.saturating_mul(4).min(1 << 20);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
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

/// When the request's headers had arrived (set by the accept loop): the
/// body's deadline counts from here.
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

impl FromRequest<AppState> for Signed {
    type Rejection = ApiError;

    /// Cheap checks first, in this order: bound, header shapes (signature,
    /// timestamp, request id), the timestamp window, the request id not
    /// already seen (a read), the body against the route's cap; only then
    /// the body is read and the MAC computed in the key backend.
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
        let t = state.now();
        let ts = sig::parse_timestamp(&ts_str, t).map_err(sig_err)?;
        if state.store.replay_seen(ReplayNs::RequestId, &rid, t)? {
            return Err(ApiError::AuthFailed("Request id already used"));
        }
        let body = read_body(state, &parts, body, state.http.body_limit).await?;
        let expected = state
            .backend
            .hmac_sha256(&sig::signing_payload(&ts_str, &body))?;
        if !sig::mac_eq(&expected, &mac) {
            return Err(ApiError::AuthFailed("HMAC signature invalid"));
        }
        crate::store::trail::note(|n| n.authenticated = true);
        let fresh = state
            .store
            .replay_remember(ReplayNs::RequestId, &rid, sig::request_id_expiry(ts, t), t)
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
