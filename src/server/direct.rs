//! Direct-access guard for the endpoints browsers and agents call
//! (`/v1/store`, `/v1/credential`): client address, deny list, per-address
//! rate limit, and CORS with an exact origin allowlist.

use super::{AppState, PeerAddr};
use crate::netaddr::{canonical, in_any};
use crate::protocol::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

pub struct DirectSettings {
    pub allowed_origins: Vec<String>,
    pub deny: Vec<IpNet>,
    pub trusted_proxies: Vec<IpNet>,
    pub limiter: RateLimiter,
}

impl DirectSettings {
    pub fn permissive_for_tests() -> Self {
        DirectSettings {
            allowed_origins: vec!["https://tokenvault.uk".into()],
            deny: Vec::new(),
            trusted_proxies: Vec::new(),
            limiter: RateLimiter::new(0, 0),
        }
    }
}

/// Token bucket per client address.
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    /// `per_minute == 0` disables limiting.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        RateLimiter {
            per_sec: per_minute as f64 / 60.0,
            burst: burst.max(1) as f64,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Ok, or the seconds to wait; spends a token when Ok.
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        self.bucket(ip, true)
    }

    /// Like [`RateLimiter::check`] without spending: whether a token is there.
    pub fn peek(&self, ip: IpAddr) -> Result<(), u64> {
        self.bucket(ip, false)
    }

    fn bucket(&self, ip: IpAddr, spend: bool) -> Result<(), u64> {
        if self.per_sec <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let Ok(mut map) = self.buckets.lock() else {
            return Ok(());
        };
        if map.len() > MAX_TRACKED {
            let (rate, burst) = (self.per_sec, self.burst);
            map.retain(|_, (tokens, t)| {
                *tokens + now.duration_since(*t).as_secs_f64() * rate < burst
            });
            if map.len() > MAX_TRACKED {
                // More distinct clients limited at once than are tracked:
                // start over rather than grow without bound.
                tracing::warn!(
                    tracked = map.len(),
                    "rate limiter: too many clients tracked; reset"
                );
                map.clear();
            }
        }
        if !spend && !map.contains_key(&ip) {
            return Ok(());
        }
        let (tokens, last) = map.entry(ip).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*last).as_secs_f64() * self.per_sec).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            if spend {
                *tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.per_sec).ceil().max(1.0) as u64)
        }
    }
}

/// Clients a limiter tracks before it drops the ones whose buckets are full.
const MAX_TRACKED: usize = 100_000;

/// The client: the TCP peer, or (only behind a configured trusted proxy) the
/// right-most X-Forwarded-For address that is not itself a trusted proxy.
pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = canonical(peer?);
    if !in_any(trusted, peer) {
        return Some(peer);
    }
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(v) = value.to_str() else { break };
        for part in v.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical(ip);
                    if !in_any(trusted, client) {
                        return Some(client);
                    }
                }
                Err(_) => return Some(client),
            }
        }
    }
    Some(client)
}

fn allowed_origin<'a>(s: &'a AppState, headers: &HeaderMap) -> Option<&'a str> {
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    s.direct()
        .allowed_origins
        .iter()
        .find(|o| o.as_str() == origin)
        .map(String::as_str)
}

fn add_cors(resp: &mut Response, origin: Option<&str>) {
    let h = resp.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(o) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Content-Type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
}

/// Deny list and rate limit, for every direct-access route.
pub async fn access(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    let verdict = match client_ip(peer, req.headers(), &s.direct().trusted_proxies) {
        None => Err(ApiError::Forbidden),
        Some(ip) if in_any(&s.direct().deny, ip) => {
            tracing::warn!(client = %ip, "direct access refused: address in deny_cidrs");
            Err(ApiError::Forbidden)
        }
        Some(ip) => s.direct().limiter.check(ip).map_err(ApiError::RateLimited),
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The routes a browser calls: the only ones that answer with CORS headers.
pub const BROWSER_PATHS: &[&str] = &["/v1/store", "/v1/credential", "/v1/totp-code"];

/// CORS for the browser-facing routes only ([`BROWSER_PATHS`]): exact
/// origins, `Vary: Origin`, preflight 204 (answered here, before any
/// limit: a preflight carries no credential and costs nothing). Every other
/// path passes through untouched.
pub async fn cors(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if !BROWSER_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let origin = allowed_origin(&s, req.headers()).map(str::to_string);
    let mut r = if req.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    add_cors(&mut r, origin.as_deref());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_only_behind_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "198.51.100.7, 10.0.0.9".parse().unwrap());
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(Some(peer), &h, &trusted),
            Some("198.51.100.7".parse().unwrap())
        );
        // An untrusted peer's header is ignored.
        let other: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(client_ip(Some(other), &h, &trusted), Some(other));
        // No trusted proxies configured: never believed.
        assert_eq!(client_ip(Some(peer), &h, &[]), Some(peer));
        assert_eq!(client_ip(None, &h, &trusted), None);
    }

    #[test]
    fn token_bucket() {
        // One refill a minute: nothing below depends on how fast it runs.
        let l = RateLimiter::new(1, 3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.check(ip).is_ok());
        assert!(l.check(ip).is_ok());
        assert!(l.check(ip).is_ok());
        let wait = l.check(ip).unwrap_err();
        assert!(wait >= 1);
        assert!(l.check("192.0.2.2".parse().unwrap()).is_ok(), "per address");
        assert!(RateLimiter::new(0, 0).check(ip).is_ok(), "0 disables");
    }
}
