//! GCP service-account keys: detected by content, never handed out. The
//! appliance signs an RS256 JWT with the key and trades it at the key's
//! `token_uri` for a short-lived access token, cached per (service, key
//! fingerprint, scopes) until 5 minutes before it expires.

use crate::protocol::ApiError;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use zeroize::Zeroizing;

pub const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
const REFRESH_MARGIN_SECS: i64 = 300;

pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: String,
    pub token_uri: String,
    private_key_pem: Zeroizing<String>,
}

impl ServiceAccount {
    fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.private_key_pem.as_bytes()))
    }
}

/// Recognises a service-account key in a decrypted `accessToken`.
pub fn detect(access_token: Option<&Value>) -> Option<ServiceAccount> {
    let s = access_token?.as_str()?;
    if !s.trim_start().starts_with('{') || !s.contains("service_account") {
        return None;
    }
    // Parsed values are wiped when freed by the zeroizing global allocator.
    let v: Value = serde_json::from_str(s).ok()?;
    if v.get("type")?.as_str()? != "service_account" {
        return None;
    }
    Some(ServiceAccount {
        client_email: v.get("client_email")?.as_str()?.to_string(),
        private_key_id: v
            .get("private_key_id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        token_uri: v
            .get("token_uri")
            .and_then(Value::as_str)
            .unwrap_or("https://oauth2.googleapis.com/token")
            .to_string(),
        private_key_pem: Zeroizing::new(v.get("private_key")?.as_str()?.to_string()),
    })
}

/// `?scopes=a,b` → "a b"; the default is cloud-platform.
pub fn parse_scopes(raw: Option<&str>) -> Result<String, ApiError> {
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else {
        return Ok(DEFAULT_SCOPE.into());
    };
    let scopes: Vec<&str> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if scopes.len() > 32
        || scopes
            .iter()
            .any(|s| s.len() > 256 || !s.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(ApiError::invalid("Parameter scopes is malformed"));
    }
    Ok(scopes.join(" "))
}

pub struct Minted {
    pub access_token: Zeroizing<String>,
    pub expires_at: i64,
}

/// A minted token kept for reuse: in a locked, zeroizing page (never in
/// the heap), removed (and so wiped) once it may no longer be served.
struct Cached {
    token: crate::keys::locked::LockedKey,
    expires_at: i64,
}

type CacheKey = (String, String, String);

pub struct Minter {
    http: reqwest::Client,
    allow_http: bool,
    /// The proxy's egress policy: a stored key's `token_uri` is a caller's
    /// word (it arrived through `/v1/store`), like a proxy upstream.
    policy: std::sync::Arc<crate::egress::EgressPolicy>,
    cache: std::sync::Arc<Mutex<HashMap<CacheKey, Cached>>>,
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl Minter {
    /// `allow_http`: plain-http token URIs too (the `dev` profile, whose
    /// tests run a local token endpoint); otherwise only https.
    pub fn new(
        allow_http: bool,
        policy: std::sync::Arc<crate::egress::EgressPolicy>,
    ) -> Result<Self, String> {
        let http = crate::egress::client_builder(&policy)
            .timeout(Duration::from_secs(10))
            .https_only(!allow_http)
            // No idle connections: their buffers would keep the last
            // token endpoint answer (an access token) in memory.
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Minter {
            http,
            allow_http,
            policy,
            cache: std::sync::Arc::new(Mutex::new(HashMap::new())),
        })
    }

    fn sign_assertion(
        sa: &ServiceAccount,
        scopes: &str,
        now: i64,
    ) -> Result<Zeroizing<String>, ApiError> {
        let der = rustls_pemfile::private_key(&mut sa.private_key_pem.as_bytes())
            .ok()
            .flatten()
            .ok_or(ApiError::GcpMintFailed(
                "service-account private key is not PEM",
            ))?;
        let rustls::pki_types::PrivateKeyDer::Pkcs8(pk8) = der else {
            return Err(ApiError::GcpMintFailed(
                "service-account private key is not PKCS#8",
            ));
        };
        let key = ring::signature::RsaKeyPair::from_pkcs8(pk8.secret_pkcs8_der())
            .map_err(|_| ApiError::GcpMintFailed("service-account private key is not RSA"))?;
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": sa.private_key_id});
        let claims = json!({
            "iss": sa.client_email,
            "scope": scopes,
            "aud": sa.token_uri,
            "iat": now,
            "exp": now + 3600,
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let mut sig = vec![0u8; key.public().modulus_len()];
        key.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &ring::rand::SystemRandom::new(),
            signing_input.as_bytes(),
            &mut sig,
        )
        .map_err(|_| ApiError::GcpMintFailed("signing failed"))?;
        Ok(Zeroizing::new(format!("{signing_input}.{}", b64url(&sig))))
    }

    pub async fn mint(
        &self,
        service: &str,
        sa: &ServiceAccount,
        scopes: &str,
        now: i64,
    ) -> Result<Minted, ApiError> {
        let key = (service.to_string(), sa.fingerprint(), scopes.to_string());
        if let Ok(cache) = self.cache.lock() {
            if let Some(c) = cache.get(&key) {
                if now < c.expires_at - REFRESH_MARGIN_SECS {
                    if let Ok(t) = std::str::from_utf8(c.token.as_slice()) {
                        return Ok(Minted {
                            access_token: Zeroizing::new(t.to_string()),
                            expires_at: c.expires_at,
                        });
                    }
                }
            }
        }
        let uri = url::Url::parse(&sa.token_uri)
            .map_err(|_| ApiError::GcpMintFailed("token_uri is not a URL"))?;
        match uri.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            _ => return Err(ApiError::GcpMintFailed("token_uri must be https")),
        }
        if let Some(why) = self.policy.refuse_url(&uri) {
            tracing::warn!(service, why, "GCP token_uri refused by the egress policy");
            return Err(ApiError::EgressDenied);
        }
        let assertion = Self::sign_assertion(sa, scopes, now)?;
        let form = Zeroizing::new(format!(
            "grant_type={}&assertion={}",
            "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer",
            assertion.as_str()
        ));
        let resp = self
            .http
            .post(uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.as_bytes().to_vec())
            .send()
            .await
            .map_err(|e| {
                if crate::egress::refused(&e) {
                    tracing::warn!(service, "GCP token_uri refused by the egress policy");
                    return ApiError::EgressDenied;
                }
                tracing::warn!(service, error = %e, "GCP token endpoint unreachable");
                ApiError::GcpMintFailed("token endpoint unreachable")
            })?;
        let status = resp.status();
        let body = Zeroizing::new(
            resp.bytes()
                .await
                .map_err(|_| ApiError::GcpMintFailed("token endpoint answer unreadable"))?
                .to_vec(),
        );
        if !status.is_success() {
            tracing::warn!(
                service,
                status = status.as_u16(),
                "GCP token endpoint refused the assertion"
            );
            return Err(ApiError::GcpMintFailed(
                "token endpoint refused the assertion",
            ));
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|_| ApiError::GcpMintFailed("token endpoint answer is not JSON"))?;
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::GcpMintFailed(
                "token endpoint answer has no access_token",
            ))?;
        let expires_in = v
            .get("expires_in")
            .and_then(Value::as_i64)
            .unwrap_or(3600)
            .clamp(60, 86_400);
        let minted = Minted {
            access_token: Zeroizing::new(token.to_string()),
            expires_at: now + expires_in,
        };
        self.remember(key, &minted, now);
        Ok(minted)
    }

    /// Caches a minted token in a locked page until it stops being served
    /// (`expires_at - REFRESH_MARGIN_SECS`), when a timer removes it.
    fn remember(&self, key: CacheKey, minted: &Minted, now: i64) {
        let serve_until = minted.expires_at - REFRESH_MARGIN_SECS;
        if serve_until <= now {
            return;
        }
        let Ok(token) = crate::keys::locked::LockedKey::new(minted.access_token.as_bytes()) else {
            // Too long for a page, or no locked memory: not cached.
            return;
        };
        let expires_at = minted.expires_at;
        if let Ok(mut cache) = self.cache.lock() {
            cache.retain(|_, c| c.expires_at - REFRESH_MARGIN_SECS > now);
            cache.insert(key.clone(), Cached { token, expires_at });
        }
        let cache = std::sync::Arc::downgrade(&self.cache);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_secs((serve_until - now) as u64)).await;
                if let Some(cache) = cache.upgrade() {
                    if let Ok(mut c) = cache.lock() {
                        if c.get(&key).is_some_and(|c| c.expires_at == expires_at) {
                            c.remove(&key);
                        }
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_and_scopes() {
        let sa = json!(
            r#"{"type":"service_account","client_email":"a@p.iam.gserviceaccount.com","private_key_id":"k1","private_key":"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n","token_uri":"https://oauth2.googleapis.com/token"}"#
        );
        let d = detect(Some(&sa)).unwrap();
        assert_eq!(d.client_email, "a@p.iam.gserviceaccount.com");
        assert_eq!(d.private_key_id, "k1");
        assert!(detect(Some(&json!("ghp_plain"))).is_none());
        assert!(detect(Some(&json!(r#"{"type":"authorized_user"}"#))).is_none());
        assert!(detect(None).is_none());
        assert_eq!(parse_scopes(None).unwrap(), DEFAULT_SCOPE);
        assert_eq!(parse_scopes(Some("a, b")).unwrap(), "a b");
        assert!(parse_scopes(Some("a b\n")).is_err());
    }

    fn policy() -> std::sync::Arc<crate::egress::EgressPolicy> {
        std::sync::Arc::new(crate::egress::EgressPolicy::default())
    }

    #[tokio::test]
    async fn token_uri_must_pass_the_egress_policy_before_anything_is_signed() {
        // The key is not even PEM: a refusal here comes before any signing.
        for uri in [
            "https://169.254.169.254/token",
            "https://10.0.0.7/token",
            "https://[::1]:8443/token",
        ] {
            let sa = detect(Some(&json!(format!(r#"{{"type":"service_account","client_email":"a@b","private_key":"x","token_uri":"{uri}"}}"#)))).unwrap();
            let m = Minter::new(false, policy()).unwrap();
            assert_eq!(
                m.mint("s", &sa, DEFAULT_SCOPE, 0).await.err().unwrap(),
                ApiError::EgressDenied,
                "{uri}"
            );
        }
        // Loopback only where the policy allows it (dev).
        let sa = detect(Some(&json!(r#"{"type":"service_account","client_email":"a@b","private_key":"x","token_uri":"http://127.0.0.1:9/token"}"#))).unwrap();
        let m = Minter::new(true, policy()).unwrap();
        assert_eq!(
            m.mint("s", &sa, DEFAULT_SCOPE, 0).await.err().unwrap(),
            ApiError::EgressDenied
        );
        let dev = std::sync::Arc::new(crate::egress::EgressPolicy {
            allow_loopback: true,
            ..Default::default()
        });
        let m = Minter::new(true, dev).unwrap();
        assert_eq!(
            m.mint("s", &sa, DEFAULT_SCOPE, 0).await.err().unwrap(),
            ApiError::GcpMintFailed("service-account private key is not PEM"),
            "past the policy"
        );
    }

    #[tokio::test]
    async fn token_uri_must_be_https_outside_dev() {
        let sa = detect(Some(&json!(r#"{"type":"service_account","client_email":"a@b","private_key":"x","token_uri":"http://127.0.0.1:9/token"}"#))).unwrap();
        let m = Minter::new(false, policy()).unwrap();
        let e = m.mint("s", &sa, DEFAULT_SCOPE, 0).await.err().unwrap();
        assert_eq!(e, ApiError::GcpMintFailed("token_uri must be https"));
        let sa = detect(Some(&json!(r#"{"type":"service_account","client_email":"a@b","private_key":"x","token_uri":"file:///etc/passwd"}"#))).unwrap();
        let m = Minter::new(true, policy()).unwrap();
        assert_eq!(
            m.mint("s", &sa, DEFAULT_SCOPE, 0).await.err().unwrap(),
            ApiError::GcpMintFailed("token_uri must be https")
        );
    }
}
