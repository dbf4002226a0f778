//! The appliance's counters (requests by route and status, latency, key
//! operations, TOTP verifications) and their Prometheus text; served by
//! `server::metrics` on a separate loopback listener (`[metrics] listen`).
//! Labels are fixed sets chosen here: the route template, the status code,
//! the key operation, the verify result. No label ever carries a service
//! name, ticket, token or any request value.

use crate::keys::{
    AesGen, Backend, HmacKeyId, KeyBackendBase, KeyError, MacKeys, OtpAlg, OtpKeys, RandomSource,
    SealKeys,
};
use crate::store::Store;
use secrecy::SecretSlice;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use zeroize::Zeroizing;

/// Routes by their fixed path; anything else is `other`.
pub const ROUTES: &[&str] = &[
    "/v1/health",
    "/v1/storage",
    "/v1/store",
    "/v1/credential",
    "/v1/totp-code",
    "/v1/totp-verify",
    "/v1/proxy",
    "/v1/refresh-notify",
    "/v1/refresh",
    "/v1/exchange",
    "/v1/register-url",
    "/bind",
];
const OTHER: usize = ROUTES.len();

/// Latency bucket upper bounds, seconds.
pub const BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Key operations counted by [`Metered`].
#[derive(Clone, Copy)]
enum Op {
    Hmac,
    Seal,
    Open,
    Random,
    OtpHmac,
    InstallHmac,
    InstallOtp,
    DestroyOtp,
    Probe,
}
const OPS: &[&str] = &[
    "hmac",
    "seal",
    "open",
    "random",
    "otp_hmac",
    "install_hmac",
    "install_otp",
    "destroy_otp",
    "probe",
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; 12],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// What the audit exporter did.
#[derive(Debug, Default)]
pub struct ExportCounters {
    pub sent: AtomicU64,
    pub failures: AtomicU64,
}

pub struct Metrics {
    requests: Mutex<BTreeMap<(usize, u16), u64>>,
    latency: Vec<Histogram>,
    key_ops: Vec<AtomicU64>,
    key_errors: Vec<AtomicU64>,
    verify_accepted: AtomicU64,
    verify_rejected: AtomicU64,
    /// The audit trail's copy off the box (`app::export`).
    pub export: ExportCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            latency: (0..=OTHER).map(|_| Histogram::default()).collect(),
            key_ops: OPS.iter().map(|_| AtomicU64::new(0)).collect(),
            key_errors: OPS.iter().map(|_| AtomicU64::new(0)).collect(),
            verify_accepted: AtomicU64::new(0),
            verify_rejected: AtomicU64::new(0),
            export: Default::default(),
        }
    }
}

/// The `# HELP` and `# TYPE` lines of a metric.
pub fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// A gauge with one value and no labels.
fn gauge(o: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(o, name, "gauge", help);
    let _ = writeln!(o, "{name} {value}");
}

/// The route's fixed label (`other` for anything unknown).
pub fn route_label(path: &str) -> &'static str {
    route_name(route_index(path))
}

fn route_index(path: &str) -> usize {
    ROUTES.iter().position(|r| *r == path).unwrap_or(OTHER)
}

fn route_name(i: usize) -> &'static str {
    ROUTES.get(i).copied().unwrap_or("other")
}

impl Metrics {
    pub fn request(&self, path: &str, status: u16, elapsed: std::time::Duration) {
        let i = route_index(path);
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((i, status)).or_insert(0) += 1;
        }
        if let Some(h) = self.latency.get(i) {
            let secs = elapsed.as_secs_f64();
            for (b, le) in h.buckets.iter().zip(BUCKETS) {
                if secs <= *le {
                    b.fetch_add(1, Ordering::Relaxed);
                }
            }
            h.count.fetch_add(1, Ordering::Relaxed);
            h.sum_us
                .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        }
    }

    pub fn totp_verify(&self, accepted: bool) {
        if accepted {
            self.verify_accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            self.verify_rejected.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn key_op<T>(&self, op: Op, r: Result<T, KeyError>) -> Result<T, KeyError> {
        let i = op as usize;
        if let Some(c) = self.key_ops.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if r.is_err() {
            if let Some(c) = self.key_errors.get(i) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }

    /// The Prometheus text exposition.
    pub fn render(&self, store: &Store, backend_kind: &str, healthy: bool) -> String {
        let mut o = String::with_capacity(8192);
        header(
            &mut o,
            "tvw_requests_total",
            "counter",
            "HTTP requests by route and status.",
        );
        if let Ok(m) = self.requests.lock() {
            for ((i, status), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "tvw_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                    route_name(*i)
                );
            }
        }
        header(
            &mut o,
            "tvw_request_duration_seconds",
            "histogram",
            "Request latency by route.",
        );
        for (i, h) in self.latency.iter().enumerate() {
            let count = h.count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let r = route_name(i);
            for (b, le) in h.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    o,
                    "tvw_request_duration_seconds_bucket{{route=\"{r}\",le=\"{le}\"}} {}",
                    b.load(Ordering::Relaxed)
                );
            }
            let _ = writeln!(
                o,
                "tvw_request_duration_seconds_bucket{{route=\"{r}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                o,
                "tvw_request_duration_seconds_sum{{route=\"{r}\"}} {}",
                h.sum_us.load(Ordering::Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                o,
                "tvw_request_duration_seconds_count{{route=\"{r}\"}} {count}"
            );
        }
        header(
            &mut o,
            "tvw_key_operations_total",
            "counter",
            "Key backend operations.",
        );
        for (name, c) in OPS.iter().zip(&self.key_ops) {
            let _ = writeln!(
                o,
                "tvw_key_operations_total{{backend=\"{backend_kind}\",op=\"{name}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        header(
            &mut o,
            "tvw_key_errors_total",
            "counter",
            "Key backend operations that failed.",
        );
        for (name, c) in OPS.iter().zip(&self.key_errors) {
            let _ = writeln!(
                o,
                "tvw_key_errors_total{{backend=\"{backend_kind}\",op=\"{name}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        gauge(
            &mut o,
            "tvw_key_backend_healthy",
            "1 when the key backend answers.",
            u8::from(healthy),
        );
        header(
            &mut o,
            "tvw_totp_verify_total",
            "counter",
            "TOTP verifications by result.",
        );
        let _ = writeln!(
            o,
            "tvw_totp_verify_total{{result=\"accepted\"}} {}",
            self.verify_accepted.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "tvw_totp_verify_total{{result=\"rejected\"}} {}",
            self.verify_rejected.load(Ordering::Relaxed)
        );
        let u = store.usage();
        gauge(
            &mut o,
            "tvw_store_map_size_bytes",
            "The store's limit: LMDB's map size, or store.postgres.capacity_mib.",
            u.capacity,
        );
        gauge(
            &mut o,
            "tvw_store_used_bytes",
            "LMDB pages in use, or bytes of keys and values in PostgreSQL.",
            u.used,
        );
        header(
            &mut o,
            "tvw_audit_trail_pruned_total",
            "counter",
            "Audit-trail records dropped to keep the trail within audit.max_share_percent.",
        );
        let _ = writeln!(o, "tvw_audit_trail_pruned_total {}", store.trail_pruned());
        if let Ok((head, signed)) = store.trail_seqs() {
            gauge(
                &mut o,
                "tvw_audit_trail_head_seq",
                "Sequence number of the audit trail's newest record.",
                head,
            );
            gauge(
                &mut o,
                "tvw_audit_trail_signed_seq",
                "Sequence number of the newest record covered by a signed head.",
                signed,
            );
        }
        gauge(
            &mut o,
            "tvw_store_file_bytes",
            "Size of the LMDB data file (0 on PostgreSQL).",
            u.file,
        );
        if let crate::store::EngineHealth::Postgres(h) = store.engine_health() {
            gauge(
                &mut o,
                "tvw_db_up",
                "1 while the store's PostgreSQL database answers the probe (each second).",
                u64::from(h.up),
            );
            gauge(
                &mut o,
                "tvw_db_probe_microseconds",
                "Round trip of the last successful database probe.",
                h.probe_micros,
            );
            header(
                &mut o,
                "tvw_db_probe_failures_total",
                "counter",
                "Database probes that failed or timed out.",
            );
            let _ = writeln!(o, "tvw_db_probe_failures_total {}", h.probe_failures);
            gauge(
                &mut o,
                "tvw_db_pool_max",
                "Read connections this node may open (store.postgres.pool_size).",
                h.pool_max as u64,
            );
            gauge(
                &mut o,
                "tvw_db_pool_open",
                "Read connections open now.",
                h.pool_open as u64,
            );
            gauge(
                &mut o,
                "tvw_db_pool_idle",
                "Read connections open and idle.",
                h.pool_idle as u64,
            );
        }
        header(
            &mut o,
            "tvw_audit_exported_total",
            "counter",
            "Audit-trail records sent off the box (syslog, export file).",
        );
        let _ = writeln!(
            o,
            "tvw_audit_exported_total {}",
            self.export.sent.load(Ordering::Relaxed)
        );
        header(
            &mut o,
            "tvw_audit_export_failures_total",
            "counter",
            "Audit export attempts that failed (retried; requests are never held).",
        );
        let _ = writeln!(
            o,
            "tvw_audit_export_failures_total {}",
            self.export.failures.load(Ordering::Relaxed)
        );
        let now = crate::clock::system_now();
        gauge(
            &mut o,
            "tvw_approvals_pending",
            "Uses waiting for the owner's approval (`approvals list --pending`).",
            store.approval_all().map_or(0, |all| {
                all.iter()
                    .filter(|a| {
                        a.state == crate::store::policy::ApprovalState::Pending
                            && a.expires_at > now
                    })
                    .count()
            }),
        );
        gauge(
            &mut o,
            "tvw_tokens",
            "Token documents held.",
            store
                .count(crate::protocol::storage::Collection::Tokens)
                .unwrap_or(0),
        );
        o
    }
}

/// A key backend that counts every operation and failure into [`Metrics`].
pub struct Metered {
    pub inner: Backend,
    pub metrics: Arc<Metrics>,
}

impl KeyBackendBase for Metered {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn healthy(&self) -> bool {
        self.inner.healthy()
    }
    fn aes_key_present(&self) -> bool {
        self.inner.aes_key_present()
    }
    fn probe(&self) -> Result<(), KeyError> {
        self.metrics.key_op(Op::Probe, self.inner.probe())
    }
}

impl RandomSource for Metered {
    fn fill_random(&self, buf: &mut [u8]) -> Result<(), KeyError> {
        self.metrics.key_op(Op::Random, self.inner.fill_random(buf))
    }
}

impl MacKeys for Metered {
    fn install_hmac(&self, secret: &SecretSlice<u8>) -> Result<HmacKeyId, KeyError> {
        self.metrics
            .key_op(Op::InstallHmac, self.inner.install_hmac(secret))
    }
    fn activate_hmac(&self, id: &HmacKeyId) -> Result<(), KeyError> {
        self.inner.activate_hmac(id)
    }
    fn destroy_hmac_except(&self, keep: Option<&HmacKeyId>) -> Result<usize, KeyError> {
        self.inner.destroy_hmac_except(keep)
    }
    fn hmac_sha256(&self, data: &[u8]) -> Result<[u8; 32], KeyError> {
        self.metrics.key_op(Op::Hmac, self.inner.hmac_sha256(data))
    }
}

impl SealKeys for Metered {
    fn seal_with(&self, gen: AesGen, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.metrics
            .key_op(Op::Seal, self.inner.seal_with(gen, aad, plaintext))
    }
    fn open_with(
        &self,
        gen: AesGen,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.metrics
            .key_op(Op::Open, self.inner.open_with(gen, aad, sealed))
    }
    fn aes_active(&self) -> Result<AesGen, KeyError> {
        self.inner.aes_active()
    }
    fn aes_readable(&self) -> Result<Vec<AesGen>, KeyError> {
        self.inner.aes_readable()
    }
}

crate::keys::forward_keys!(Metered, inner: gens);

impl OtpKeys for Metered {
    fn install_otp(&self, seed: &SecretSlice<u8>, alg: OtpAlg) -> Result<Option<String>, KeyError> {
        self.metrics
            .key_op(Op::InstallOtp, self.inner.install_otp(seed, alg))
    }
    fn otp_hmac(&self, id: &str, alg: OtpAlg, counter: u64) -> Result<Vec<u8>, KeyError> {
        self.metrics
            .key_op(Op::OtpHmac, self.inner.otp_hmac(id, alg, counter))
    }
    fn destroy_otp(&self, id: &str) -> Result<(), KeyError> {
        self.metrics
            .key_op(Op::DestroyOtp, self.inner.destroy_otp(id))
    }
    fn list_otp(&self) -> Result<Vec<String>, KeyError> {
        self.inner.list_otp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_are_other_and_buckets_are_cumulative() {
        let m = Metrics::default();
        m.request("/v1/credential", 200, std::time::Duration::from_micros(700));
        m.request(
            "/v1/tokens/github-secret-name",
            404,
            std::time::Duration::from_millis(30),
        );
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path(), 1 << 20).unwrap();
        let text = m.render(&store, "soft", true);
        assert!(text.contains("tvw_requests_total{route=\"/v1/credential\",status=\"200\"} 1"));
        assert!(text.contains("tvw_requests_total{route=\"other\",status=\"404\"} 1"));
        assert!(!text.contains("github-secret-name"));
        assert!(text.contains(
            "tvw_request_duration_seconds_bucket{route=\"/v1/credential\",le=\"0.0005\"} 0"
        ));
        assert!(text.contains(
            "tvw_request_duration_seconds_bucket{route=\"/v1/credential\",le=\"0.001\"} 1"
        ));
        assert!(text.contains(
            "tvw_request_duration_seconds_bucket{route=\"/v1/credential\",le=\"2.5\"} 1"
        ));
        assert!(text.contains("tvw_store_map_size_bytes 1048576"));
    }
}
