//! What one hostile address can spend, bounded: connections per address,
//! buffered request bodies (a global budget), the body's deadline and
//! minimum rate, unauthenticated failures (a per-address budget, then 429
//! before any body is read or key operation run), `/v1/exchange` attempts,
//! and the log lines failing requests produce. Every refusal is counted
//! (`tvw_shield_total`) and failing unauthenticated requests are counted by
//! route and status (`tvw_unauthenticated_rejections_total`) instead of
//! being recorded one by one.

use super::direct::RateLimiter;
use crate::netaddr::client_key;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest body of `/v1/exchange` (`{"code": "<uuid>"}`).
pub const EXCHANGE_BODY_LIMIT: usize = 4 << 10;
/// Largest body of the ticket-only POSTs (`/v1/credential`, `/v1/totp-code`,
/// `/v1/totp-verify`): a ticket, a service name, scopes, a code.
pub const TICKET_BODY_LIMIT: usize = 16 << 10;

/// The limits, from `[limits]` and `[server]`.
#[derive(Debug, Clone)]
pub struct ShieldSettings {
    /// Open connections one client key may hold (0: no cap).
    pub max_connections_per_ip: usize,
    /// IPv6 clients are counted per prefix of this many bits.
    pub ipv6_prefix_len: u8,
    /// From the request's arrival to the last byte of its body.
    pub request_timeout: Duration,
    /// After `body_grace`, a body slower than this on average is refused.
    pub min_body_rate: u64,
    pub body_grace: Duration,
    /// Bytes of request bodies buffered at once, over all connections.
    pub body_budget: usize,
    /// Unauthenticated failures per client key per minute (0: no limit),
    /// with a burst.
    pub failures_per_minute: u32,
    pub failure_burst: u32,
    /// `/v1/exchange` attempts per client key per minute, with a burst.
    pub exchange_per_minute: u32,
    pub exchange_burst: u32,
    /// Access-log lines of failing unauthenticated requests per minute; the
    /// rest are summarised once a minute.
    pub failure_log_lines_per_minute: u32,
}

impl ShieldSettings {
    /// The defaults of `packaging/config.reference.toml`.
    pub fn defaults() -> Self {
        ShieldSettings {
            max_connections_per_ip: 64,
            ipv6_prefix_len: 64,
            request_timeout: Duration::from_secs(30),
            min_body_rate: 1024,
            body_grace: Duration::from_secs(5),
            body_budget: 64 << 20,
            failures_per_minute: 120,
            failure_burst: 60,
            exchange_per_minute: 10,
            exchange_burst: 5,
            failure_log_lines_per_minute: 60,
        }
    }
}

/// Refusals and drops counted by the shield.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// A connection over the per-address cap, closed at accept.
    ConnectionPerIp,
    /// A request refused because its address spent its failure budget.
    FailureLimited,
    /// A `/v1/exchange` over its per-address rate.
    ExchangeLimited,
    /// A body refused because the global body budget was spent.
    BodyBudget,
    /// A body that missed its deadline or minimum rate.
    BodyDeadline,
    /// A body over its route's cap (declared or read).
    BodyTooLarge,
    /// A connection closed for having no request for the idle timeout.
    IdleClosed,
    /// Access-log lines of failing requests not written (summarised).
    LogSuppressed,
    /// A helper request refused for carrying forwarding headers.
    HelperForwarded,
}

const EVENTS: &[&str] = &[
    "connection_per_ip",
    "failure_limited",
    "exchange_limited",
    "body_budget",
    "body_deadline",
    "body_too_large",
    "idle_closed",
    "log_suppressed",
    "helper_forwarded",
];

pub struct Shield {
    pub cfg: ShieldSettings,
    budget: Arc<Semaphore>,
    failures: RateLimiter,
    exchange: RateLimiter,
    conns: Mutex<HashMap<IpAddr, usize>>,
    log_lines: RateLimiter,
    /// Failing unauthenticated requests by (route, status), since start.
    rejected: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// The same, since the last summary line.
    minute: Mutex<BTreeMap<(&'static str, u16), u64>>,
    events: Vec<AtomicU64>,
    /// TLS connections open now.
    open: AtomicU64,
}

/// Budget unit: a permit is 1 KiB of buffered body.
const UNIT: usize = 1024;

fn units(bytes: usize) -> u32 {
    bytes.div_ceil(UNIT).min(u32::MAX as usize) as u32
}

impl Shield {
    pub fn new(cfg: ShieldSettings) -> Self {
        let permits = units(cfg.body_budget).max(1) as usize;
        Shield {
            budget: Arc::new(Semaphore::new(permits)),
            failures: RateLimiter::new(cfg.failures_per_minute, cfg.failure_burst),
            exchange: RateLimiter::new(cfg.exchange_per_minute, cfg.exchange_burst),
            conns: Mutex::new(HashMap::new()),
            // One process-wide bucket: the key is a constant.
            log_lines: RateLimiter::new(
                cfg.failure_log_lines_per_minute,
                cfg.failure_log_lines_per_minute.max(1),
            ),
            rejected: Mutex::new(BTreeMap::new()),
            minute: Mutex::new(BTreeMap::new()),
            events: EVENTS.iter().map(|_| AtomicU64::new(0)).collect(),
            open: AtomicU64::new(0),
            cfg,
        }
    }

    /// Limits that never refuse (handler tests).
    pub fn unlimited() -> Self {
        Shield::new(ShieldSettings {
            max_connections_per_ip: 0,
            failures_per_minute: 0,
            exchange_per_minute: 0,
            failure_log_lines_per_minute: 0,
            ..ShieldSettings::defaults()
        })
    }

    pub fn count(&self, e: Event) {
        if let Some(c) = self.events.get(e as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn event_count(&self, e: Event) -> u64 {
        self.events
            .get(e as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// The key a client is counted under.
    pub fn key(&self, ip: IpAddr) -> IpAddr {
        client_key(ip, self.cfg.ipv6_prefix_len)
    }

    // ---- connections ----------------------------------------------------

    /// A slot for one more connection from `ip`, or `None` over the cap.
    pub fn connection(self: &Arc<Self>, ip: IpAddr) -> Option<ConnSlot> {
        let cap = self.cfg.max_connections_per_ip;
        let key = self.key(ip);
        if cap > 0 {
            let mut m = self.conns.lock().ok()?;
            let n = m.entry(key).or_insert(0);
            if *n >= cap {
                drop(m);
                self.count(Event::ConnectionPerIp);
                return None;
            }
            *n += 1;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(ConnSlot {
            owner: self.clone(),
            key: (cap > 0).then_some(key),
        })
    }

    // ---- failures -------------------------------------------------------

    /// Seconds to wait if `ip` has spent its failure budget (nothing spent).
    pub fn failure_blocked(&self, ip: IpAddr) -> Option<u64> {
        self.failures.peek(self.key(ip)).err()
    }

    /// A failing unauthenticated request from `ip` on `route`: spends from
    /// the address's budget and is counted; whether its log line may be
    /// written.
    pub fn rejected(&self, ip: Option<IpAddr>, route: &'static str, status: u16) -> bool {
        if let Some(ip) = ip {
            let _ = self.failures.check(self.key(ip));
        }
        for m in [&self.rejected, &self.minute] {
            if let Ok(mut m) = m.lock() {
                *m.entry((route, status)).or_insert(0) += 1;
            }
        }
        self.log_line()
    }

    /// Whether a failure's log line may be written now (else counted).
    pub fn log_line(&self) -> bool {
        let ok = self.log_lines.check(IpAddr::from([0, 0, 0, 0])).is_ok();
        if !ok {
            self.count(Event::LogSuppressed);
        }
        ok
    }

    /// The failing unauthenticated requests since the last call, by route
    /// and status (for the once-a-minute summary line).
    pub fn take_minute(&self) -> BTreeMap<(&'static str, u16), u64> {
        self.minute
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }

    /// `Ok`, or the seconds until `ip` may try `/v1/exchange` again.
    pub fn exchange_allowed(&self, ip: Option<IpAddr>) -> Result<(), u64> {
        let Some(ip) = ip else { return Ok(()) };
        let r = self.exchange.check(self.key(ip));
        if r.is_err() {
            self.count(Event::ExchangeLimited);
        }
        r
    }

    // ---- bodies ---------------------------------------------------------

    /// Budget for `bytes` more of buffered body, without waiting.
    pub fn reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let r = self
            .budget
            .clone()
            .try_acquire_many_owned(units(bytes))
            .ok();
        if r.is_none() {
            self.count(Event::BodyBudget);
        }
        r
    }

    /// The Prometheus lines of the shield's counters.
    pub fn render(&self, o: &mut String) {
        let _ = writeln!(
            o,
            "# HELP tvw_unauthenticated_rejections_total Failing requests that proved nothing (no valid signature, ticket or bind code), by route and status; they are counted here, not recorded in the audit trail.\n# TYPE tvw_unauthenticated_rejections_total counter"
        );
        if let Ok(m) = self.rejected.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    o,
                    "tvw_unauthenticated_rejections_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            o,
            "# HELP tvw_shield_total Requests, connections, log lines and trail records refused or dropped by the hostile-network limits.\n# TYPE tvw_shield_total counter"
        );
        for (name, c) in EVENTS.iter().zip(&self.events) {
            let _ = writeln!(
                o,
                "tvw_shield_total{{event=\"{name}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP tvw_body_budget_free_bytes Request-body budget not in use.\n# TYPE tvw_body_budget_free_bytes gauge\ntvw_body_budget_free_bytes {}",
            self.budget.available_permits() * UNIT
        );
        let _ = writeln!(
            o,
            "# HELP tvw_connections_open TLS connections open now.\n# TYPE tvw_connections_open gauge\ntvw_connections_open {}",
            self.open.load(Ordering::Relaxed)
        );
    }
}

/// The client a request is counted under: the TCP peer, or behind a
/// trusted proxy the address it forwarded for (see [`super::direct::client_ip`]).
pub fn client_of<B>(s: &super::AppState, req: &axum::http::Request<B>) -> Option<IpAddr> {
    let peer = req.extensions().get::<super::PeerAddr>().map(|p| p.0.ip());
    super::direct::client_ip(peer, req.headers(), &s.direct().trusted_proxies)
}

/// One open connection, counted against its address until dropped.
pub struct ConnSlot {
    owner: Arc<Shield>,
    /// The counted key (None: no per-address cap).
    key: Option<IpAddr>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let s = &self.owner;
        s.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(key) = self.key.take() {
            if let Ok(mut m) = s.conns.lock() {
                if let Some(n) = m.get_mut(&key) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        m.remove(&key);
                    }
                }
            }
        }
    }
}

/// A buffered body and its share of the budget, released when the last
/// reference to the bytes is dropped (the zeroizing allocator wipes them).
pub struct Budgeted {
    pub buf: Vec<u8>,
    pub permit: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_per_address_and_released() {
        let s = Arc::new(Shield::new(ShieldSettings {
            max_connections_per_ip: 2,
            ..ShieldSettings::defaults()
        }));
        let a: IpAddr = "198.51.100.1".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        let one = s.connection(a).unwrap();
        let _two = s.connection(a).unwrap();
        assert!(s.connection(a).is_none(), "third from one address");
        assert!(s.connection(b).is_some(), "another address is not affected");
        // The mapped form is the same client.
        assert!(s
            .connection("::ffff:198.51.100.1".parse().unwrap())
            .is_none());
        drop(one);
        assert!(s.connection(a).is_some(), "a slot comes back on close");
        assert_eq!(s.event_count(Event::ConnectionPerIp), 2);
        // IPv6: one /64 is one client.
        let v6a: IpAddr = "2001:db8:0:1::a".parse().unwrap();
        let v6b: IpAddr = "2001:db8:0:1::b".parse().unwrap();
        let _x = s.connection(v6a).unwrap();
        let _y = s.connection(v6b).unwrap();
        assert!(s.connection("2001:db8:0:1::c".parse().unwrap()).is_none());
    }

    #[test]
    fn failures_spend_a_budget_per_address() {
        let s = Shield::new(ShieldSettings {
            failures_per_minute: 1,
            failure_burst: 3,
            ..ShieldSettings::defaults()
        });
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        for _ in 0..3 {
            assert!(s.failure_blocked(a).is_none());
            s.rejected(Some(a), "/v1/exchange", 410);
        }
        assert!(s.failure_blocked(a).is_some_and(|w| w >= 1));
        assert!(s.failure_blocked("203.0.113.2".parse().unwrap()).is_none());
        let m = s.take_minute();
        assert_eq!(m.get(&("/v1/exchange", 410)), Some(&3));
        assert!(
            s.take_minute().is_empty(),
            "the minute's summary is taken once"
        );
        let mut text = String::new();
        s.render(&mut text);
        assert!(text.contains(
            "tvw_unauthenticated_rejections_total{route=\"/v1/exchange\",status=\"410\"} 3"
        ));
    }

    #[test]
    fn body_budget_is_shared_and_returned() {
        let s = Shield::new(ShieldSettings {
            body_budget: 8 << 10,
            ..ShieldSettings::defaults()
        });
        let a = s.reserve(6 << 10).unwrap();
        assert!(s.reserve(4 << 10).is_none());
        assert_eq!(s.event_count(Event::BodyBudget), 1);
        drop(a);
        assert!(s.reserve(8 << 10).is_some());
    }

    #[test]
    fn failure_log_lines_are_rate_limited() {
        let s = Shield::new(ShieldSettings {
            failure_log_lines_per_minute: 2,
            ..ShieldSettings::defaults()
        });
        let lines: Vec<bool> = (0..5).map(|_| s.rejected(None, "other", 404)).collect();
        assert_eq!(lines, [true, true, false, false, false]);
        assert_eq!(s.event_count(Event::LogSuppressed), 3);
    }
}
