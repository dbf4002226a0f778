//! OAuth clients the appliance refreshes with (`/v1/refresh-notify`). The
//! client secret is sealed under the key backend's AES key; the token URL is
//! the only place it is ever sent.

use crate::keys::Backend;
use crate::protocol::ApiError;
use crate::store::Store;
use base64::Engine;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// client_secret_post (RFC 6749 §2.3.1, body)
    Post,
    /// client_secret_basic (Authorization: Basic)
    Basic,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OAuthClient {
    pub name: String,
    pub client_id: String,
    pub token_url: String,
    pub auth: ClientAuth,
    sealed_secret: String,
    /// The services this client may refresh (`oauth-client add --service`).
    /// Empty (and in clients stored before the field existed): the service
    /// of the client's own name. A refresh token goes only to the client
    /// registered for its service, whatever a caller's hint names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

fn aad(name: &str) -> Vec<u8> {
    format!("tokenvault-webhook/oauth-client/v1\0{name}").into_bytes()
}

pub fn key(name: &str) -> String {
    name.trim().to_ascii_lowercase()
}

impl OAuthClient {
    pub fn new(
        backend: &Backend,
        name: &str,
        client_id: &str,
        secret: &SecretString,
        token_url: &str,
        auth: ClientAuth,
        allow_http: bool,
    ) -> Result<Self, String> {
        let name = key(name);
        if name.is_empty()
            || name.len() > 128
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err("name must be 1-128 characters of letters, digits, '-', '_' or '.'".into());
        }
        if client_id.is_empty() {
            return Err("client id must not be empty".into());
        }
        let u = url::Url::parse(token_url).map_err(|e| format!("token URL: {e}"))?;
        if u.scheme() != "https" && !(allow_http && u.scheme() == "http") {
            return Err("token URL must be https".into());
        }
        if secret.expose_secret().is_empty() {
            return Err("client secret file is empty".into());
        }
        let sealed = backend
            .seal(&aad(&name), secret.expose_secret().as_bytes())
            .map_err(|e| format!("sealing the client secret: {e}"))?;
        Ok(OAuthClient {
            name,
            client_id: client_id.into(),
            token_url: token_url.into(),
            auth,
            sealed_secret: base64::engine::general_purpose::STANDARD.encode(sealed),
            services: Vec::new(),
        })
    }

    /// The same client, for these services (none: its own name's).
    pub fn with_services(mut self, services: Vec<String>) -> Result<Self, String> {
        if services.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err("a service name must be 1-256 characters".into());
        }
        self.services = services;
        self.services.sort();
        self.services.dedup();
        Ok(self)
    }

    /// Whether this client may refresh `service`.
    pub fn refreshes(&self, service: &str) -> bool {
        if self.services.is_empty() {
            key(service) == self.name
        } else {
            self.services.iter().any(|s| s == service)
        }
    }

    /// The services it refreshes, as `oauth-client list` shows them.
    pub fn services_label(&self) -> String {
        if self.services.is_empty() {
            format!("{} (its name)", self.name)
        } else {
            self.services.join(",")
        }
    }

    pub fn secret(&self, backend: &Backend) -> Result<Zeroizing<String>, ApiError> {
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(&self.sealed_secret)
            .map_err(|_| ApiError::Internal)?;
        let pt = backend.open(&aad(&self.name), &sealed)?;
        Ok(Zeroizing::new(
            String::from_utf8(pt.to_vec()).map_err(|_| ApiError::Internal)?,
        ))
    }
}

pub fn save(store: &Store, c: &OAuthClient) -> Result<(), String> {
    let raw = serde_json::to_vec(c).map_err(|e| e.to_string())?;
    store
        .oauth_put_blocking(c.name.clone(), raw)
        .map_err(|e| e.to_string())
}

/// `rotate-key`: re-seals every client secret under `gen` (compare-and-set
/// on the stored record). Returns how many changed.
pub fn rekey_all(
    store: &Store,
    backend: &Backend,
    gen: crate::keys::AesGen,
) -> Result<usize, String> {
    let mut n = 0;
    for raw in store.oauth_all().map_err(|e| e.to_string())? {
        let mut c: OAuthClient = serde_json::from_slice(&raw)
            .map_err(|_| "stored OAuth client is corrupt".to_string())?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let sealed = b64
            .decode(&c.sealed_secret)
            .map_err(|_| format!("OAuth client {}: sealed secret is not base64", c.name))?;
        let Some(new) = crate::keys::reseal_blob(backend.as_ref(), gen, &aad(&c.name), &sealed)
            .map_err(|e| format!("OAuth client {}: {e}", c.name))?
        else {
            continue;
        };
        c.sealed_secret = b64.encode(new);
        let out = serde_json::to_vec(&c).map_err(|e| e.to_string())?;
        if store
            .replace_oauth_blocking(c.name.clone(), raw, out)
            .map_err(|e| e.to_string())?
        {
            n += 1;
        }
    }
    Ok(n)
}

/// The registered clients' secrets, for a rotation.
pub struct SealedClients(pub Store);

impl crate::keys::SealedElsewhere for SealedClients {
    fn name(&self) -> &'static str {
        "oauthClients"
    }
    fn reseal(&self, backend: &Backend, gen: crate::keys::AesGen) -> Result<usize, String> {
        rekey_all(&self.0, backend, gen)
    }
}

pub fn get(store: &Store, name: &str) -> Option<OAuthClient> {
    store
        .oauth_get(&key(name))
        .ok()
        .flatten()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
}

pub fn all(store: &Store) -> Vec<OAuthClient> {
    store
        .oauth_all()
        .unwrap_or_default()
        .iter()
        .filter_map(|raw| serde_json::from_slice(raw).ok())
        .collect()
}

/// The client registered for `service` (`oauth-client add` refuses a
/// second client for a service, so there is at most one; if a store holds
/// two anyway, the first by name).
pub fn for_service(store: &Store, service: &str) -> Option<OAuthClient> {
    all(store).into_iter().find(|c| c.refreshes(service))
}

/// Another registered client that already refreshes one of `c`'s services.
pub fn overlap(store: &Store, c: &OAuthClient) -> Option<(String, String)> {
    let effective = |x: &OAuthClient| -> Vec<String> {
        if x.services.is_empty() {
            vec![x.name.clone()]
        } else {
            x.services.clone()
        }
    };
    all(store)
        .into_iter()
        .filter(|o| o.name != c.name)
        .find_map(|o| {
            let shared = effective(c)
                .into_iter()
                .find(|s| o.refreshes(s))
                .or_else(|| effective(&o).into_iter().find(|s| c.refreshes(s)));
            shared.map(|s| (o.name.clone(), s))
        })
}
