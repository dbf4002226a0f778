//! The owner's policy: rules set on the box (`tokenvault-webhook policy
//! set`) that no signed request can lift. Checked on every use of a
//! credential after its ticket has proved itself and before anything is
//! decrypted: no-reveal, agents, hours, rate, then approval. Upstreams are
//! checked by the proxy once it knows the URL.
//!
//! Every decision is noted for the appliance's audit trail (who, what,
//! why), never a secret.

use crate::protocol::ApiError;
use crate::store::policy::{Approval, Ask};
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A use of a credential, as policies and approvals name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// `/v1/credential` by an agent (`agent_credential`).
    Credential,
    /// A TOTP code (`/v1/totp-code`, or `/v1/credential` of a TOTP token).
    TotpCode,
    /// `/v1/proxy`: injected, never returned.
    Proxy,
    /// Shown to the user (`user_reveal`).
    Reveal,
}

impl Use {
    pub fn name(self) -> &'static str {
        match self {
            Use::Credential => "credential",
            Use::TotpCode => "totp_code",
            Use::Proxy => "proxy",
            Use::Reveal => "reveal",
        }
    }
}

/// A window of the UTC day, minutes since midnight; `end < start` wraps
/// past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub start: u16,
    pub end: u16,
}

impl Window {
    /// `HH:MM-HH:MM`.
    pub fn parse(s: &str) -> Result<Window, String> {
        let hm = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h <= 24 && m < 60 && h * 60 + m <= 1440).then_some(h * 60 + m)
        };
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: hours are HH:MM-HH:MM (UTC)"))?;
        match (hm(a), hm(b)) {
            (Some(start), Some(end)) if start != end => Ok(Window { start, end }),
            _ => Err(format!(
                "{s:?}: hours are HH:MM-HH:MM (UTC), start and end differ"
            )),
        }
    }

    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }

    pub fn label(&self) -> String {
        format!(
            "{:02}:{:02}-{:02}:{:02}",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

/// At most `max` uses per agent per `per_secs` (60: a minute, 3600: an hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    pub max: u32,
    pub per_secs: i64,
}

impl Rate {
    /// `N/minute` or `N/hour`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || format!("{s:?}: a rate is N/minute or N/hour");
        let (n, per) = s.split_once('/').ok_or_else(bad)?;
        let max: u32 = n.trim().parse().map_err(|_| bad())?;
        let per_secs = match per.trim() {
            "minute" | "min" | "m" => 60,
            "hour" | "h" => 3600,
            _ => return Err(bad()),
        };
        if max == 0 {
            return Err(format!("{s:?}: a rate of 0 refuses everything; use --agent or clear the credential instead"));
        }
        Ok(Rate { max, per_secs })
    }

    pub fn label(&self) -> String {
        format!(
            "{}/{}",
            self.max,
            if self.per_secs == 60 {
                "minute"
            } else {
                "hour"
            }
        )
    }
}

/// One service's rules. Absent fields allow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Each use needs the owner's approval (`approve ID`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval: bool,
    /// Only these agents (a ticket's `aid` or `sub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<BTreeSet<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Allowed UTC windows (any of them); empty: any time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hours: Vec<Window>,
    /// Never returned in plaintext: used through the proxy, as TOTP codes
    /// or as minted tokens only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_reveal: bool,
    /// The hosts `/v1/proxy` may inject this credential into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstreams: Option<BTreeSet<String>>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }

    /// Whether `/v1/proxy` may inject into `host`.
    pub fn allows_upstream(&self, host: &str) -> bool {
        self.upstreams.as_ref().is_none_or(|u| {
            u.iter()
                .any(|h| h.eq_ignore_ascii_case(host.trim_end_matches('.')))
        })
    }
}

/// How approvals behave (`[policy]` in the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long an approval request may be decided, and an approval used.
    pub approval_ttl_secs: i64,
    /// How long a request waits for the owner's answer before it is
    /// answered `approval_required` (0: at once).
    pub approval_wait_secs: u64,
    /// Pending approvals beyond which new ones are refused (429).
    pub max_pending: usize,
    /// Where a new approval request is announced (`[policy] notify_url`).
    pub notify: Option<std::sync::Arc<Notifier>>,
}

/// POSTs each new approval request, without any secret in it, to the
/// owner's hook (ntfy, a chat webhook): fire and forget, through the
/// egress policy. Failures are counted and logged.
#[derive(Debug)]
pub struct Notifier {
    client: reqwest::Client,
    url: url::Url,
    pub failures: std::sync::atomic::AtomicU64,
    pub sent: std::sync::atomic::AtomicU64,
}

impl Notifier {
    pub fn new(
        url: &str,
        allow_http: bool,
        policy: &std::sync::Arc<crate::egress::EgressPolicy>,
    ) -> Result<Notifier, String> {
        let url = url::Url::parse(url).map_err(|e| format!("policy.notify_url: {e}"))?;
        if url.scheme() != "https" && !(allow_http && url.scheme() == "http") {
            return Err("policy.notify_url must be https".into());
        }
        let client = crate::egress::client_builder(policy)
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        if let Some(why) = policy.refuse_url(&url) {
            return Err(format!(
                "policy.notify_url refused by the egress policy: {why}"
            ));
        }
        Ok(Notifier {
            client,
            url,
            failures: Default::default(),
            sent: Default::default(),
        })
    }

    /// Announces `a` in the background.
    pub fn announce(self: &std::sync::Arc<Self>, a: &Approval) {
        use std::sync::atomic::Ordering;
        let body = serde_json::json!({
            "event": "approval_required",
            "approvalId": a.id,
            "service": a.service,
            "purpose": a.purpose,
            "agent": a.agent,
            "expiresAt": crate::clock::rfc3339(a.expires_at),
            "approve": format!("tokenvault-webhook approve {}", a.id),
            "deny": format!("tokenvault-webhook deny {}", a.id),
        });
        let me = self.clone();
        tokio::spawn(async move {
            match me.client.post(me.url.clone()).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    me.sent.fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) => {
                    me.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        status = r.status().as_u16(),
                        "approval notify: the hook refused"
                    );
                }
                Err(e) => {
                    me.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        refused = crate::egress::refused(&e),
                        "approval notify failed"
                    );
                }
            }
        });
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            approval_ttl_secs: 600,
            approval_wait_secs: 0,
            max_pending: 64,
            notify: None,
        }
    }
}

/// The stored policy of `service` (None: no rules).
pub fn of(store: &Store, service: &str) -> Result<Option<Policy>, ApiError> {
    match store.policy_get(service)? {
        None => Ok(None),
        Some(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|_| ApiError::from(StoreError::Corrupt("policy"))),
    }
}

/// Who the ticket says is asking: its `aid`, else its `sub`.
pub fn agent_of(sub: Option<&str>, aid: Option<&str>) -> String {
    aid.or(sub)
        .filter(|a| !a.is_empty())
        .unwrap_or("-")
        .to_string()
}

fn note(decision: String) {
    crate::store::trail::note(|n| n.policy = Some(decision));
}

fn refuse(why: &'static str, detail: &str) -> ApiError {
    note(format!("denied: {detail}"));
    ApiError::PolicyDenied(why)
}

/// An approval the caller may be waiting on (from [`admit`]).
pub struct Waiting(pub Approval);

/// The rules before anything is decrypted. `Ok(None)`: allowed.
/// `Ok(Some(w))`: an approval is pending (the caller may wait on it with
/// [`wait`]). `sub`/`aid` are the verified ticket's.
#[allow(clippy::too_many_arguments)]
pub async fn admit(
    store: &Store,
    settings: &Settings,
    service: &str,
    what: Use,
    sub: Option<&str>,
    aid: Option<&str>,
    now: i64,
    new_id: impl FnOnce() -> Result<String, ApiError>,
) -> Result<Option<Waiting>, ApiError> {
    let Some(p) = of(store, service)? else {
        return Ok(None);
    };
    // A user reveal is refused outright under no-reveal; an agent's read
    // only if its answer would be the plaintext, known once the document is
    // opened ([`reveals`]): a TOTP code or a minted token is fine.
    if p.no_reveal && what == Use::Reveal {
        return Err(refuse(
            "This credential is never revealed (no-reveal): use it through /v1/proxy",
            "no-reveal",
        ));
    }
    if let Some(agents) = &p.agents {
        let ok = [sub, aid].into_iter().flatten().any(|a| agents.contains(a));
        if !ok {
            return Err(refuse(
                "This agent may not use this credential (owner policy)",
                "agent not allowed",
            ));
        }
    }
    if !p.hours.is_empty() {
        let minute = (now.rem_euclid(86_400) / 60) as u16;
        if !p.hours.iter().any(|w| w.contains(minute)) {
            return Err(refuse(
                "Outside the hours the owner allows for this credential (UTC)",
                "outside hours",
            ));
        }
    }
    let agent = agent_of(sub, aid);
    if let Some(r) = p.rate {
        if let Err(wait) = store
            .policy_count_use(service, &agent, now, r.per_secs, r.max)
            .await?
        {
            note(format!("denied: rate {}", r.label()));
            return Err(ApiError::RateLimited(wait));
        }
    }
    if !p.approval {
        note("allowed".into());
        return Ok(None);
    }
    let id = new_id()?;
    match store
        .approval_ask(
            service.into(),
            what.name().into(),
            agent,
            id,
            now,
            settings.approval_ttl_secs,
            settings.max_pending,
        )
        .await?
    {
        Ask::Granted(a) => {
            note(format!("approved: {} (uses left {})", a.id, a.uses_left));
            Ok(None)
        }
        Ask::Pending(a, new) => {
            if new {
                if let Some(n) = &settings.notify {
                    n.announce(&a);
                }
                tracing::warn!(approval = %a.id, service = %a.service, purpose = %a.purpose, agent = %a.agent, "approval needed: run `tokenvault-webhook approve {}` (or deny)", a.id);
            }
            note(format!("approval required: {}", a.id));
            Ok(Some(Waiting(a)))
        }
        Ask::Full => {
            note("denied: too many pending approvals".into());
            Err(ApiError::RateLimited(
                settings.approval_ttl_secs.max(1) as u64
            ))
        }
    }
}

/// Whether a credential's answer would be its plaintext (not a TOTP code,
/// not a minted token): refused under no-reveal.
pub fn reveals(p: Option<&Policy>, plaintext: bool) -> Result<(), ApiError> {
    if plaintext && p.is_some_and(|p| p.no_reveal) {
        return Err(refuse(
            "This credential is never revealed (no-reveal): use it through /v1/proxy",
            "no-reveal",
        ));
    }
    Ok(())
}

/// Waits up to the configured time for the owner to decide `w`, checking
/// the store every `poll`; then spends the approval (Ok) or answers
/// `approval_required` / `policy_denied`.
pub async fn wait(
    store: &Store,
    settings: &Settings,
    w: Waiting,
    now: impl Fn() -> i64,
    poll: std::time::Duration,
) -> Result<(), ApiError> {
    use crate::store::policy::ApprovalState;
    let id = w.0.id.clone();
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(settings.approval_wait_secs);
    loop {
        let a = store.approval_get(&id)?;
        match a.as_ref().map(|a| a.state) {
            Some(ApprovalState::Approved) => {
                return match store.approval_spend(id.clone(), now()).await? {
                    Some(g) => {
                        note(format!("approved: {} (uses left {})", g.id, g.uses_left));
                        Ok(())
                    }
                    None => Err(ApiError::ApprovalRequired(id)),
                };
            }
            Some(ApprovalState::Denied) => {
                note(format!("denied by the owner: {id}"));
                return Err(ApiError::PolicyDenied("The owner denied this use"));
            }
            Some(ApprovalState::Pending) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(poll).await;
            }
            _ => return Err(ApiError::ApprovalRequired(id)),
        }
    }
}

/// What a use is checked with: the store, the device (for approval ids),
/// the settings and the clock.
pub struct Gate<'a> {
    pub store: &'a Store,
    pub backend: &'a crate::keys::Backend,
    pub settings: &'a Settings,
    pub clock: &'a crate::clock::Clock,
}

impl Gate<'_> {
    /// [`admit`], then [`wait`] on a pending approval. Returns the policy
    /// (for the checks that come once the answer is known: [`reveals`],
    /// [`Policy::allows_upstream`]).
    pub async fn admit(
        &self,
        service: &str,
        what: Use,
        sub: Option<&str>,
        aid: Option<&str>,
    ) -> Result<Option<Policy>, ApiError> {
        let new_id = || -> Result<String, ApiError> {
            let mut b = [0u8; 8];
            self.backend.fill_random(&mut b)?;
            Ok(format!("ap_{}", hex::encode(b)))
        };
        let now = self.clock.now();
        if let Some(w) = admit(
            self.store,
            self.settings,
            service,
            what,
            sub,
            aid,
            now,
            new_id,
        )
        .await?
        {
            let clock = self.clock.clone();
            wait(
                self.store,
                self.settings,
                w,
                move || clock.now(),
                std::time::Duration::from_millis(200),
            )
            .await?;
        }
        of(self.store, service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_parse_wrap_past_midnight_and_refuse_nonsense() {
        let w = Window::parse("09:00-17:30").unwrap();
        assert_eq!((w.start, w.end), (540, 1050));
        assert!(w.contains(540) && w.contains(1049) && !w.contains(1050) && !w.contains(539));
        assert_eq!(w.label(), "09:00-17:30");
        let night = Window::parse("22:00-06:00").unwrap();
        assert!(night.contains(23 * 60) && night.contains(0) && night.contains(359));
        assert!(!night.contains(360) && !night.contains(12 * 60));
        for bad in [
            "9-17",
            "09:00",
            "25:00-26:00",
            "10:00-10:00",
            "10:60-11:00",
            "a:b-c:d",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
        assert!(Window::parse("00:00-24:00").unwrap().contains(1439));
    }

    #[test]
    fn rates_are_per_minute_or_hour_and_never_zero() {
        assert_eq!(
            Rate::parse("5/minute").unwrap(),
            Rate {
                max: 5,
                per_secs: 60
            }
        );
        assert_eq!(
            Rate::parse("100/hour").unwrap(),
            Rate {
                max: 100,
                per_secs: 3600
            }
        );
        assert_eq!(Rate::parse("100/hour").unwrap().label(), "100/hour");
        for bad in ["0/minute", "5/day", "five/hour", "5"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstreams_match_hosts_case_insensitively_and_no_rule_allows_all() {
        let p = Policy {
            upstreams: Some(["api.example.com".to_string()].into()),
            ..Default::default()
        };
        assert!(p.allows_upstream("API.example.com."));
        assert!(!p.allows_upstream("api.example.com.evil.net"));
        assert!(Policy::default().allows_upstream("anything"));
        assert!(Policy::default().is_empty() && !p.is_empty());
        assert_eq!(agent_of(Some("u"), Some("a")), "a");
        assert_eq!(agent_of(Some("u"), None), "u");
        assert_eq!(agent_of(None, Some("")), "-");
    }

    /// Runs a `_blocking` store call off the runtime (as the CLI would).
    fn blocking<T: Send>(f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|sc| sc.spawn(f).join().unwrap())
    }

    #[tokio::test]
    async fn rules_apply_in_order_and_an_approval_is_spent_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let s = Settings::default();
        let put = |p: &Policy| {
            blocking(|| {
                store
                    .policy_put_blocking("svc".into(), serde_json::to_vec(p).unwrap())
                    .unwrap()
            })
        };
        let ids = std::cell::Cell::new(0);
        let id = || {
            ids.set(ids.get() + 1);
            Ok(format!("ap_{}", ids.get()))
        };
        // 10:00 UTC on some day.
        let at = 1_800_000_000 - 1_800_000_000 % 86_400 + 10 * 3600;
        // One agent's use of "svc" (the sub never counts where an aid is).
        let ask = async |s: &Settings, u: Use, agent: Option<&str>, t: i64| {
            admit(&store, s, "svc", u, None, agent, t, id).await
        };
        // No policy: allowed, nothing written.
        assert!(ask(&s, Use::Credential, None, at).await.unwrap().is_none());
        // Agents come before hours, hours before the rate.
        put(&Policy {
            agents: Some(["a1".to_string()].into()),
            hours: vec![Window::parse("11:00-12:00").unwrap()],
            rate: Some(Rate {
                max: 1,
                per_secs: 60,
            }),
            ..Default::default()
        });
        let e = ask(&s, Use::Credential, Some("a2"), at)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ApiError::PolicyDenied(m) if m.contains("agent")));
        let e = ask(&s, Use::Credential, Some("a1"), at)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ApiError::PolicyDenied(m) if m.contains("hours")));
        let in_hours = at + 3600 + 5;
        assert!(ask(&s, Use::Credential, Some("a1"), in_hours)
            .await
            .unwrap()
            .is_none());
        let e = ask(&s, Use::Credential, Some("a1"), in_hours + 1)
            .await
            .err()
            .unwrap();
        assert_eq!(e, ApiError::RateLimited(54));
        assert!(
            ask(&s, Use::Credential, Some("a1"), in_hours + 55)
                .await
                .unwrap()
                .is_none(),
            "the next minute"
        );
        // No-reveal refuses a reveal before anything else counts.
        put(&Policy {
            no_reveal: true,
            approval: true,
            ..Default::default()
        });
        let e = ask(&s, Use::Reveal, None, at).await.err().unwrap();
        assert!(matches!(e, ApiError::PolicyDenied(m) if m.contains("no-reveal")));
        assert!(reveals(
            Some(&Policy {
                no_reveal: true,
                ..Default::default()
            }),
            true
        )
        .is_err());
        assert!(reveals(
            Some(&Policy {
                no_reveal: true,
                ..Default::default()
            }),
            false
        )
        .is_ok());
        // Approval: pending, approved for one use, spent, asked again.
        let w = ask(&s, Use::Proxy, Some("x"), at).await.unwrap().unwrap();
        assert_eq!(w.0.purpose, "proxy");
        let again = ask(&s, Use::Proxy, Some("x"), at).await.unwrap().unwrap();
        assert_eq!(again.0.id, w.0.id, "one pending per service, use and agent");
        let d = blocking(|| store.approval_decide_blocking(w.0.id.clone(), Some((1, at + 60)), at))
            .unwrap();
        assert!(matches!(d, crate::store::policy::Decided::Done(_)));
        assert!(ask(&s, Use::Proxy, Some("x"), at + 1)
            .await
            .unwrap()
            .is_none());
        let next = ask(&s, Use::Proxy, Some("x"), at + 2)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(next.0.id, w.0.id);
        // A full queue refuses new requests without recording them.
        let tight = Settings {
            max_pending: 1,
            ..Settings::default()
        };
        let e = ask(&tight, Use::Proxy, Some("y"), at + 2)
            .await
            .err()
            .unwrap();
        assert!(matches!(e, ApiError::RateLimited(_)));
        assert_eq!(store.approval_all().unwrap().len(), 2);
        // Lapsed: expired by the next ask, and cannot be given.
        let later = at + 2 + s.approval_ttl_secs;
        let fresh = ask(&s, Use::Proxy, Some("x"), later)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(fresh.0.id, next.0.id);
        let d = blocking(|| {
            store.approval_decide_blocking(next.0.id.clone(), Some((1, later + 60)), later)
        })
        .unwrap();
        assert!(
            matches!(d, crate::store::policy::Decided::NotPending(a) if a.state == crate::store::policy::ApprovalState::Expired)
        );
    }
}
