//! `/v1/proxy`: the appliance calls an upstream API with the credential
//! injected into headers, and streams the answer back. The caller never sees
//! the credential; the upstream is pinned to what the vault owner stored and
//! must pass the egress policy.

use crate::custody::gcp::Minter;
use crate::custody::{codes, fields, gcp, ticket};
use crate::egress::{self, EgressPolicy};
use crate::keys::Backend;
use crate::protocol::document::TokenDocument;
use crate::protocol::storage::Collection;
use crate::protocol::ApiError;
use crate::store::{Store, StoreError};
use base64::Engine;
use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

pub const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

pub struct Proxy {
    client: reqwest::Client,
    policy: Arc<EgressPolicy>,
    pub require_config: bool,
    timeout: Duration,
    max_bytes: u64,
}

impl Proxy {
    pub fn new(
        policy: Arc<EgressPolicy>,
        require_config: bool,
        timeout: Duration,
        max_bytes: u64,
    ) -> Result<Self, String> {
        let client = egress::client_builder(&policy)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Proxy {
            client,
            policy,
            require_config,
            timeout,
            max_bytes,
        })
    }
}

#[derive(Deserialize)]
struct Upstream {
    url: Option<String>,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyRequest {
    ticket: Option<String>,
    service: Option<String>,
    upstream: Option<Upstream>,
    #[serde(default)]
    header_templates: BTreeMap<String, String>,
}

/// A decoded `/v1/proxy` body: the fields every request needs, checked
/// before the ticket is (pure: no keys, no store; fuzzed).
pub struct ProxyCall {
    pub service: String,
    pub ticket: String,
    upstream: Upstream,
    /// Header name → template with `${TOKEN}` (filled after the ticket).
    pub header_templates: BTreeMap<String, String>,
}

/// The upstream request a [`ProxyCall`] asks for, validated: an http(s) URL
/// without credentials, an allowed method, a decoded body, headers that are
/// valid and not hop-by-hop.
pub struct Outbound {
    pub url: url::Url,
    pub method: Method,
    pub body: Option<Vec<u8>>,
    pub headers: HeaderMap,
}

impl ProxyCall {
    pub fn decode(body: &[u8]) -> Result<ProxyCall, ApiError> {
        let req: ProxyRequest = serde_json::from_slice(body)
            .map_err(|_| ApiError::invalid("Request body must be a JSON proxy request"))?;
        let service = req
            .service
            .filter(|x| !x.is_empty())
            .ok_or_else(|| ApiError::invalid("Missing required field: service"))?;
        let ticket = req
            .ticket
            .filter(|x| !x.is_empty())
            .ok_or(ApiError::TicketInvalid("Missing ticket"))?;
        let upstream = req
            .upstream
            .ok_or_else(|| ApiError::invalid("Missing required field: upstream"))?;
        Ok(ProxyCall {
            service,
            ticket,
            upstream,
            header_templates: req.header_templates,
        })
    }

    /// The upstream request, checked (pure; the stored-config pin and the
    /// egress policy come after, in [`proxy`]).
    pub fn outbound(&self) -> Result<Outbound, ApiError> {
        let up = &self.upstream;
        let url = url::Url::parse(
            up.url
                .as_deref()
                .ok_or_else(|| ApiError::invalid("Missing required field: upstream.url"))?,
        )
        .map_err(|_| ApiError::invalid("Field upstream.url is not a URL"))?;
        if !matches!(url.scheme(), "https" | "http")
            || url.host_str().is_none()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(ApiError::invalid(
                "Field upstream.url must be an http(s) URL without credentials",
            ));
        }
        let method = up.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
        if !METHODS.contains(&method.as_str()) {
            return Err(ApiError::invalid("Field upstream.method is not allowed"));
        }
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| ApiError::invalid("Field upstream.method is not allowed"))?;
        let body = match up.body.as_deref() {
            None | Some("") => None,
            Some(b) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|_| {
                        ApiError::invalid("Field upstream.body must be standard base64")
                    })?,
            ),
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &up.headers {
            let (n, v) = valid_header(k, v)?;
            headers.append(n, v);
        }
        for h in hop_by_hop(&headers) {
            headers.remove(h.as_str());
        }
        Ok(Outbound {
            url,
            method,
            body,
            headers,
        })
    }
}

fn valid_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), ApiError> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| ApiError::invalid("Header name is not valid"))?;
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(ApiError::invalid(format!(
            "Header {n} has a line break or NUL in its value"
        )));
    }
    let v = HeaderValue::from_str(value)
        .map_err(|_| ApiError::invalid(format!("Header {n} has an invalid value")))?;
    Ok((n, v))
}

/// Hop-by-hop headers, and any named in `Connection`.
fn hop_by_hop(h: &HeaderMap) -> Vec<String> {
    let mut out: Vec<String> = HOP_BY_HOP.iter().map(|s| s.to_string()).collect();
    for v in h.get_all("connection") {
        if let Ok(v) = v.to_str() {
            out.extend(
                v.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty()),
            );
        }
    }
    out
}

/// Headers upstreams commonly echo back (in bodies, error pages, logs a
/// caller can read): `${TOKEN}` is never put into one, whoever asks.
const ECHOED: &[&str] = &[
    "origin",
    "referer",
    "user-agent",
    "x-request-id",
    "x-correlation-id",
    "x-amzn-trace-id",
    "traceparent",
    "tracestate",
    "forwarded",
    "via",
];

fn echoed(name: &str) -> bool {
    ECHOED.contains(&name) || name.starts_with("x-forwarded-")
}

/// The header templates a call may use: the stored proxy config's (the
/// owner's), never the request's. A request that names other templates is
/// refused rather than silently narrowed, so a caller sees why; one that
/// names none uses the stored ones. Without a stored config (only when
/// `proxy.require_config = false`) the request's own are used.
fn templates(
    stored: Option<&Map<String, Value>>,
    requested: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ApiError> {
    let chosen = match stored {
        None => requested.clone(),
        Some(cfg) => {
            let mut own = BTreeMap::new();
            match cfg.get("headerTemplates") {
                None | Some(Value::Null) => {}
                Some(Value::Object(m)) => {
                    for (k, v) in m {
                        let v = v.as_str().ok_or(ApiError::ProxyNotAllowed(
                            "The stored proxy config's headerTemplates are not strings",
                        ))?;
                        own.insert(k.to_ascii_lowercase(), v.to_string());
                    }
                }
                Some(_) => {
                    return Err(ApiError::ProxyNotAllowed(
                        "The stored proxy config's headerTemplates is not an object",
                    ))
                }
            }
            let asked: BTreeMap<String, String> = requested
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect();
            if !asked.is_empty() && asked != own {
                return Err(ApiError::ProxyNotAllowed(
                    "headerTemplates differ from the stored proxy config",
                ));
            }
            own
        }
    };
    for (k, v) in &chosen {
        if v.contains("${TOKEN}") && echoed(&k.to_ascii_lowercase()) {
            return Err(ApiError::ProxyNotAllowed(
                "${TOKEN} cannot go into a header upstreams echo back",
            ));
        }
    }
    Ok(chosen)
}

/// Is `url` under the stored `upstreamUrl` (same scheme, host, port; path prefix at a segment)?
pub fn under(url: &url::Url, base: &str) -> bool {
    let Ok(b) = url::Url::parse(base) else {
        return false;
    };
    if url.scheme() != b.scheme()
        || url.host_str().map(str::to_ascii_lowercase) != b.host_str().map(str::to_ascii_lowercase)
        || url.port_or_known_default() != b.port_or_known_default()
    {
        return false;
    }
    let prefix = b.path().trim_end_matches('/');
    let path = url.path();
    prefix.is_empty() || path == prefix || path.starts_with(&format!("{prefix}/"))
}

/// The value `${TOKEN}` stands for: the access token, a minted GCP token, or
/// the current TOTP code.
async fn token_value(
    d: &Deps<'_>,
    service: &str,
    doc: &TokenDocument,
    at: i64,
) -> Result<Zeroizing<String>, ApiError> {
    if codes::answers_with_code(doc) {
        return Ok(codes::current_code(d.backend, service, doc, at as u64)?.code);
    }
    let access = fields::open_field(d.backend, service, doc, "accessToken")?;
    if let Some(sa) = gcp::detect(access.as_ref()) {
        let scopes = gcp::parse_scopes(None)?;
        return Ok(d.minter.mint(service, &sa, &scopes, at).await?.access_token);
    }
    match access {
        Some(Value::String(t)) if !t.is_empty() => Ok(Zeroizing::new(t)),
        _ => Err(ApiError::invalid("Token has no access token to inject")),
    }
}

/// What a proxy call uses of the appliance.
pub struct Deps<'a> {
    pub backend: &'a Backend,
    pub store: &'a Store,
    pub proxy: &'a Proxy,
    pub minter: &'a Minter,
    /// The owner's policy for each use.
    pub gate: crate::custody::policy::Gate<'a>,
}

/// The upstream's answer, ready to stream back: its status, its headers
/// without hop-by-hop ones, and its body cut off past the size cap.
pub struct Proxied {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: futures::stream::BoxStream<'static, Result<bytes::Bytes, std::io::Error>>,
}

/// One `/v1/proxy` call (its signed body already authenticated): the
/// ticket, the stored config's pin, the egress policy, then the credential
/// and the upstream call.
pub async fn call(d: Deps<'_>, body: bytes::Bytes, at: i64) -> Result<Proxied, ApiError> {
    let p = d.proxy;
    let call = ProxyCall::decode(&body)?;
    // The request body (and its share of the body budget) goes before the
    // upstream call.
    drop(body);
    let service = call.service.clone();
    let tk = ticket::verify(
        d.backend,
        d.store,
        &call.ticket,
        ticket::PROXY,
        &service,
        at,
    )?;
    let Outbound {
        url,
        method,
        body,
        mut headers,
    } = call.outbound()?;
    // Pinned to the vault owner's proxy config.
    let config = match &tk.pid {
        Some(pid) => d.store.get_raw(Collection::ProxyConfigs, pid)?,
        None => None,
    };
    let stored: Option<Map<String, Value>> = match config {
        Some(raw) => {
            Some(serde_json::from_slice(&raw).map_err(|_| StoreError::Corrupt("proxy config"))?)
        }
        None => None,
    };
    match &stored {
        Some(cfg) => {
            let base = cfg.get("upstreamUrl").and_then(Value::as_str).unwrap_or("");
            let svc_ok = cfg.get("serviceName").and_then(Value::as_str) == Some(service.as_str());
            if !svc_ok || !under(&url, base) {
                tracing::warn!(service = %service, pid = ?tk.pid, "proxy request outside its stored config");
                return Err(ApiError::ProxyNotAllowed(
                    "Upstream or service does not match the stored proxy config",
                ));
            }
        }
        None if p.require_config => {
            return Err(ApiError::ProxyNotAllowed(
                "No stored proxy config for this ticket",
            ));
        }
        None => {}
    }
    let header_templates = templates(stored.as_ref(), &call.header_templates)?;
    // The owner's rules, then the hosts the owner lets this credential go to
    // (whatever the stored config says: Token Vault writes that).
    let policy = d
        .gate
        .admit(
            &service,
            crate::custody::policy::Use::Proxy,
            tk.sub.as_deref(),
            tk.aid.as_deref(),
        )
        .await?;
    let host = url.host_str().unwrap_or("");
    if !policy.as_ref().is_none_or(|p| p.allows_upstream(host)) {
        crate::store::trail::note(|n| n.policy = Some("denied: upstream not allowed".into()));
        tracing::warn!(service = %service, host, "proxy upstream outside the owner's policy");
        return Err(ApiError::PolicyDenied(
            "The owner's policy does not let this credential go to that host",
        ));
    }
    // Egress policy on IP literals and denied names (the addresses a name
    // resolves to are checked by the resolver).
    if let Some(why) = p.policy.refuse_url(&url) {
        tracing::warn!(service = %service, why, "proxy upstream refused by egress policy");
        return Err(ApiError::EgressDenied);
    }
    // The credential, only now.
    let (_, doc) = ticket::load_document(d.store, &tk)?;
    ticket::consume(d.store, &tk, at).await?;
    let token = token_value(&d, &service, &doc, at).await?;
    for (k, tmpl) in &header_templates {
        let value = Zeroizing::new(tmpl.replace("${TOKEN}", &token));
        let (n, mut v) = valid_header(k, &value)?;
        if HOP_BY_HOP.contains(&n.as_str()) {
            return Err(ApiError::invalid(format!("Header {n} cannot be templated")));
        }
        v.set_sensitive(true);
        headers.insert(n, v);
    }
    drop(token);
    let mut rb = p.client.request(method, url.clone()).headers(headers);
    if let Some(b) = body {
        rb = rb.body(b);
    }
    let started = std::time::Instant::now();
    let resp = match tokio::time::timeout(p.timeout, rb.send()).await {
        Err(_) => {
            tracing::warn!(service = %service, host = ?url.host_str(), "upstream timed out");
            return Err(ApiError::UpstreamTimeout);
        }
        Ok(Err(e)) if egress::refused(&e) => {
            tracing::warn!(service = %service, host = ?url.host_str(), "proxy upstream refused by egress policy");
            return Err(ApiError::EgressDenied);
        }
        Ok(Err(e)) => {
            tracing::warn!(service = %service, host = ?url.host_str(), kind = if e.is_connect() { "connect" } else { "transport" }, "upstream request failed");
            return Err(ApiError::UpstreamError("transport error"));
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if resp.content_length().is_some_and(|l| l > p.max_bytes) {
        return Err(ApiError::UpstreamError(
            "response larger than proxy.max_response_bytes",
        ));
    }
    tracing::info!(service = %service, host = ?url.host_str(), status = status.as_u16(), ms = started.elapsed().as_millis() as u64, "proxied");
    let drop_list = hop_by_hop(resp.headers());
    let mut headers = HeaderMap::new();
    for (k, v) in resp.headers() {
        if !drop_list.iter().any(|d| d == k.as_str()) {
            headers.append(k.clone(), v.clone());
        }
    }
    headers.insert("x-upstream-status", HeaderValue::from(status.as_u16()));
    // Streamed as it arrives; cut off past the size cap.
    let max = p.max_bytes;
    let mut seen = 0u64;
    let stream = resp.bytes_stream().map(move |chunk| match chunk {
        Ok(b) => {
            seen += b.len() as u64;
            if seen > max {
                Err(std::io::Error::other(
                    "upstream response exceeds proxy.max_response_bytes",
                ))
            } else {
                Ok(b)
            }
        }
        Err(_) => Err(std::io::Error::other("upstream body failed")),
    });
    Ok(Proxied {
        status: status.as_u16(),
        headers,
        body: stream.boxed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_is_scheme_host_port_and_path_segment() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        let base = "https://api.github.com/mcp";
        assert!(under(&u("https://api.github.com/mcp"), base));
        assert!(under(&u("https://API.github.com:443/mcp/tools?x=1"), base));
        assert!(!under(&u("https://api.github.com/mcpx"), base));
        assert!(!under(&u("https://api.github.com/other"), base));
        assert!(!under(&u("http://api.github.com/mcp"), base));
        assert!(!under(&u("https://api.github.com:8443/mcp"), base));
        assert!(!under(&u("https://evil.com/mcp"), base));
        assert!(!under(&u("https://api.github.com.evil.com/mcp"), base));
        assert!(under(
            &u("https://api.github.com/anything"),
            "https://api.github.com/"
        ));
        assert!(!under(&u("https://api.github.com/mcp"), "not a url"));
    }

    #[test]
    fn templates_are_the_stored_configs_and_never_go_into_echoed_headers() {
        let stored: Map<String, Value> = serde_json::from_value(serde_json::json!({
            "upstreamUrl": "https://api.example.com/",
            "serviceName": "gh",
            "headerTemplates": {"Authorization": "Bearer ${TOKEN}"}
        }))
        .unwrap();
        let own: BTreeMap<String, String> =
            [("authorization".to_string(), "Bearer ${TOKEN}".to_string())].into();
        let ask = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // None asked: the stored ones; the same asked (any case): the same.
        assert_eq!(templates(Some(&stored), &ask(&[])).unwrap(), own);
        assert_eq!(
            templates(Some(&stored), &ask(&[("AUTHORIZATION", "Bearer ${TOKEN}")])).unwrap(),
            own
        );
        // Other or extra templates: refused, naming why.
        for bad in [
            ask(&[("Origin", "${TOKEN}")]),
            ask(&[
                ("Authorization", "Bearer ${TOKEN}"),
                ("X-Request-Id", "${TOKEN}"),
            ]),
            ask(&[("Authorization", "token ${TOKEN}")]),
        ] {
            let e = templates(Some(&stored), &bad).unwrap_err();
            assert!(
                matches!(e, ApiError::ProxyNotAllowed(m) if m.contains("differ")),
                "{bad:?}"
            );
        }
        // A stored config (it is written through /v1/storage) cannot put the
        // token into an echoed header either; nor can a request without one.
        let mut evil = stored.clone();
        evil.insert(
            "headerTemplates".into(),
            serde_json::json!({"Referer": "https://x/?t=${TOKEN}"}),
        );
        assert!(matches!(
            templates(Some(&evil), &ask(&[])).unwrap_err(),
            ApiError::ProxyNotAllowed(m) if m.contains("echo")
        ));
        assert!(templates(None, &ask(&[("X-Forwarded-For", "${TOKEN}")])).is_err());
        assert_eq!(
            templates(None, &ask(&[("X-Api-Key", "${TOKEN}")])).unwrap(),
            ask(&[("X-Api-Key", "${TOKEN}")])
        );
    }

    #[test]
    fn header_validation() {
        assert!(valid_header("X-Ok", "v").is_ok());
        assert!(valid_header("X-Bad", "a\r\nInjected: 1").is_err());
        assert!(valid_header("Bad Name", "v").is_err());
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        let l = hop_by_hop(&h);
        assert!(
            l.contains(&"x-private".to_string()) && l.contains(&"transfer-encoding".to_string())
        );
    }
}
