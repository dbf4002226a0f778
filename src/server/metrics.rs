//! `GET /metrics` on the metrics listener: the appliance's counters
//! ([`crate::app::metrics`]) plus the HTTP layer's own (the shield) and the
//! refresher's.

use super::AppState;
use crate::app::metrics::header;
use std::fmt::Write;

/// `GET /metrics` on the metrics listener.
pub fn router(state: AppState) -> axum::Router {
    use axum::extract::State;
    use axum::response::IntoResponse;
    async fn metrics(State(s): State<AppState>) -> axum::response::Response {
        let mut body = s
            .metrics()
            .render(&s.store, s.backend.kind(), s.backend.healthy());
        s.http.shield.render(&mut body);
        header(
            &mut body,
            "tvw_refresh_joined_total",
            "counter",
            "refresh-notify calls that joined a refresh already in flight for the same service.",
        );
        let _ = writeln!(
            body,
            "tvw_refresh_joined_total {}",
            s.settings.broker.refresher.joined()
        );
        if let Some(n) = &s.settings.policy.notify {
            use std::sync::atomic::Ordering;
            for (name, help, v) in [
                (
                    "tvw_approval_notify_sent_total",
                    "Approval requests announced to policy.notify_url.",
                    n.sent.load(Ordering::Relaxed),
                ),
                (
                    "tvw_approval_notify_failures_total",
                    "Approval announcements that failed (the request is answered regardless).",
                    n.failures.load(Ordering::Relaxed),
                ),
            ] {
                header(&mut body, name, "counter", help);
                let _ = writeln!(body, "{name} {v}");
            }
        }
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response()
    }
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .with_state(state)
}
