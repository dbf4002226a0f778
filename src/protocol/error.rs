//! The wire error type: one enum with stable codes, one place that maps it to HTTP.
//!
//! Messages are fixed strings or built from names the caller chose (field
//! names, service names). They never carry a value the caller sent as a
//! secret, nor internal detail; that is logged where the error is raised.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400: malformed request or missing field. The message names the problem, never a value.
    InvalidRequest(String),
    /// 401: HMAC header authentication failed (bad signature, stale timestamp, replay).
    AuthFailed(&'static str),
    /// 401: ticket signature or shape invalid.
    TicketInvalid(&'static str),
    /// 401: ticket expired.
    TicketExpired,
    /// 403: the webhook has not been bound yet.
    SetupRequired,
    /// 404: unknown route.
    NotFound,
    /// 404: no token stored for this service.
    TokenNotFound(String),
    /// 405: route exists, method does not.
    MethodNotAllowed,
    /// 410: bind code unknown or expired.
    CodeExpired,
    /// 410: bind code already exchanged.
    CodeUsed,
    /// 413: body over the configured limit.
    PayloadTooLarge,
    /// 400: the token holds no TOTP seed.
    NotTotp,
    /// 403: the proxy request is outside the vault owner's stored config.
    ProxyNotAllowed(&'static str),
    /// 403: the upstream address is refused by the egress policy.
    EgressDenied,
    /// 502: the upstream could not be reached or answered badly.
    UpstreamError(&'static str),
    /// 504: the upstream did not answer in time.
    UpstreamTimeout,
    /// 403: this client address may not use direct access.
    Forbidden,
    /// 403: the appliance owner's rules refuse this use (a policy set on
    /// the box, or a switch in its configuration); no signed request lifts it.
    PolicyDenied(&'static str),
    /// 403: the owner's approval is needed for this use: the answer names
    /// the approval the owner decides (`tokenvault-webhook approve ID`).
    ApprovalRequired(String),
    /// 409: `mode=create` on a service that already has a token.
    AlreadyExists(String),
    /// 409: the ticket's creation id is not the stored token's.
    StaleCreation,
    /// 429: per-address rate limit; retry after this many seconds.
    RateLimited(u64),
    /// 502: minting a GCP access token failed.
    GcpMintFailed(&'static str),
    /// 503: the key backend (HSM) is unavailable.
    KeysUnavailable,
    /// 503: the store's database is unreachable; nothing was written.
    StoreUnavailable,
    /// 503: the write was sealed under an AES key generation a running
    /// `rotate-key` has just closed; nothing was written, retry.
    KeyRotating,
    /// 408: the request's body did not arrive within its deadline or at its
    /// minimum rate.
    RequestTimeout,
    /// 503: the appliance's budget for buffered request bodies is spent.
    Busy,
    /// 507: the store is full; nothing was written.
    InsufficientStorage,
    /// 500: anything else. Detail is logged, not returned.
    Internal,
}

/// The spec's error shape: `{"error": code, "message": text}`, plus the
/// approval's id when one is needed.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    pub message: &'a str,
    #[serde(rename = "approvalId", skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<&'a str>,
}

impl ApiError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        ApiError::InvalidRequest(msg.into())
    }

    /// The stable machine-readable code (the `error` field).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::AuthFailed(_) => "auth_failed",
            ApiError::TicketInvalid(_) => "ticket_invalid",
            ApiError::TicketExpired => "ticket_expired",
            ApiError::SetupRequired => "setup_required",
            ApiError::NotFound => "not_found",
            ApiError::TokenNotFound(_) => "token_not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::CodeExpired => "code_expired",
            ApiError::CodeUsed => "code_used",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::NotTotp => "not_totp",
            ApiError::ProxyNotAllowed(_) => "proxy_not_allowed",
            ApiError::EgressDenied => "egress_denied",
            ApiError::UpstreamError(_) => "upstream_error",
            ApiError::UpstreamTimeout => "upstream_timeout",
            ApiError::Forbidden => "forbidden",
            ApiError::PolicyDenied(_) => "policy_denied",
            ApiError::ApprovalRequired(_) => "approval_required",
            ApiError::AlreadyExists(_) => "already_exists",
            ApiError::StaleCreation => "stale_creation",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::GcpMintFailed(_) => "gcp_mint_failed",
            ApiError::KeysUnavailable => "hsm_unavailable",
            ApiError::StoreUnavailable => "store_unavailable",
            ApiError::KeyRotating => "key_rotating",
            ApiError::InsufficientStorage => "insufficient_storage",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::Busy => "busy",
            ApiError::Internal => "internal_error",
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::InvalidRequest(_) | ApiError::NotTotp => 400,
            ApiError::AuthFailed(_) | ApiError::TicketInvalid(_) | ApiError::TicketExpired => 401,
            ApiError::SetupRequired => 403,
            ApiError::NotFound | ApiError::TokenNotFound(_) => 404,
            ApiError::MethodNotAllowed => 405,
            ApiError::CodeExpired | ApiError::CodeUsed => 410,
            ApiError::PayloadTooLarge => 413,
            ApiError::Forbidden
            | ApiError::ProxyNotAllowed(_)
            | ApiError::EgressDenied
            | ApiError::PolicyDenied(_)
            | ApiError::ApprovalRequired(_) => 403,
            ApiError::UpstreamError(_) => 502,
            ApiError::UpstreamTimeout => 504,
            ApiError::AlreadyExists(_) | ApiError::StaleCreation => 409,
            ApiError::RateLimited(_) => 429,
            ApiError::GcpMintFailed(_) => 502,
            ApiError::KeysUnavailable
            | ApiError::StoreUnavailable
            | ApiError::KeyRotating
            | ApiError::Busy => 503,
            ApiError::RequestTimeout => 408,
            ApiError::InsufficientStorage => 507,
            ApiError::Internal => 500,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::InvalidRequest(m) => m.clone(),
            ApiError::AuthFailed(m) | ApiError::TicketInvalid(m) => (*m).to_string(),
            ApiError::TicketExpired => "Ticket has expired".into(),
            ApiError::SetupRequired => "Complete /v1/exchange first".into(),
            ApiError::NotFound => "No such endpoint".into(),
            ApiError::TokenNotFound(s) => format!("No token found for service: {s}"),
            ApiError::MethodNotAllowed => "Method not allowed on this endpoint".into(),
            ApiError::CodeExpired => "Registration code expired or not found".into(),
            ApiError::CodeUsed => "Registration code already used".into(),
            ApiError::PayloadTooLarge => "Request body exceeds the configured limit".into(),
            ApiError::NotTotp => "Token is not a TOTP token".into(),
            ApiError::ProxyNotAllowed(m) => (*m).to_string(),
            ApiError::EgressDenied => "Upstream address refused by the egress policy".into(),
            ApiError::UpstreamError(m) => format!("Upstream request failed: {m}"),
            ApiError::UpstreamTimeout => "Upstream request timed out".into(),
            ApiError::Forbidden => "This client may not access credentials".into(),
            ApiError::PolicyDenied(m) => (*m).to_string(),
            ApiError::ApprovalRequired(_) => {
                "The owner's approval is needed for this use; retry with a new ticket once approved".into()
            }
            ApiError::AlreadyExists(s) => format!("A token already exists for service: {s}"),
            ApiError::StaleCreation => {
                "The stored token is not the one this ticket was issued for".into()
            }
            ApiError::RateLimited(_) => "Too many requests; slow down".into(),
            ApiError::GcpMintFailed(m) => format!("Could not mint a GCP access token: {m}"),
            ApiError::KeysUnavailable => "Key backend unavailable; retry later".into(),
            ApiError::StoreUnavailable => {
                "The store's database is unreachable; nothing was stored, retry shortly".into()
            }
            ApiError::KeyRotating => {
                "The encryption key was rotated while this write was in flight; nothing was stored, retry".into()
            }
            ApiError::InsufficientStorage => "Store is full; nothing was written".into(),
            ApiError::RequestTimeout => {
                "The request body did not arrive in time; send it faster".into()
            }
            ApiError::Busy => "Too many request bodies in flight; retry shortly".into(),
            ApiError::Internal => "Internal error".into(),
        }
    }
}

impl ApiError {
    /// The approval this answer names, if any.
    pub fn approval_id(&self) -> Option<&str> {
        match self {
            ApiError::ApprovalRequired(id) => Some(id),
            _ => None,
        }
    }

    /// Seconds for `Retry-After`, where the answer invites a retry.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited(secs) => Some(*secs),
            ApiError::KeyRotating | ApiError::Busy | ApiError::StoreUnavailable => Some(1),
            _ => None,
        }
    }

    /// The client's request was not (fully) read: its connection must not
    /// be reused after the answer.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ApiError::RequestTimeout | ApiError::PayloadTooLarge | ApiError::Busy
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for ApiError {}
