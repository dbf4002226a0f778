//! Domain → HTTP error mapping, one `match` per domain error type.

use crate::binding::BindError;
use crate::keys::KeyError;
use crate::protocol::ApiError;
use crate::store::StoreError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The one place an `ApiError` becomes an HTTP answer: its status, the
/// spec's JSON shape, `Retry-After` where a retry is invited, and
/// `Connection: close` where the request was not read whole.
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let msg = self.message();
        let body = crate::protocol::error::ErrorBody {
            error: self.code(),
            message: &msg,
            approval_id: self.approval_id(),
        };
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(body)).into_response();
        if self.closes_connection() {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(secs) = self.retry_after() {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Unavailable | KeyError::NoAesKey => ApiError::KeysUnavailable,
            KeyError::NoHmacKey => ApiError::SetupRequired,
            KeyError::DecryptFailed | KeyError::InvalidInput => {
                tracing::error!(error = %e, "key operation failed");
                ApiError::Internal
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Full => {
                tracing::error!("the store is full; raise store.map_size_mib");
                ApiError::InsufficientStorage
            }
            StoreError::KeyRetired => ApiError::KeyRotating,
            StoreError::DiskFull => {
                tracing::error!("the store's file system is full; free space under store.path");
                ApiError::InsufficientStorage
            }
            StoreError::KeyTooLong => ApiError::invalid("A key in the request is too long"),
            StoreError::BadCursor => {
                ApiError::invalid("options.after is not a cursor this listing returned")
            }
            StoreError::Unavailable => {
                tracing::warn!("the store's database is unreachable");
                ApiError::StoreUnavailable
            }
            StoreError::Corrupt(_)
            | StoreError::Engine(_)
            | StoreError::Closed
            | StoreError::Config(_) => {
                tracing::error!(error = %e, "store error");
                ApiError::Internal
            }
        }
    }
}

impl From<BindError> for ApiError {
    fn from(e: BindError) -> Self {
        match e {
            BindError::Keys(k) => k.into(),
            BindError::Store(s) => s.into(),
            BindError::Expired => ApiError::CodeExpired,
            BindError::Used => ApiError::CodeUsed,
            BindError::BadFrontend => {
                tracing::error!("binding.frontend_url is not a valid URL");
                ApiError::Internal
            }
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
