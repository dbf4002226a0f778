//! `policy set|show|clear`, `approve`, `deny`, `approvals list`: the
//! owner's rules, set on the box. Each change goes into the audit trail.

use super::setup::{load_for_run, open_store, refuse_root};
use super::{ApprovalsAction, PolicyAction};
use crate::custody::policy::{Policy, Rate, Window};
use crate::store::policy::{ApprovalState, Decided};
use crate::store::trail::{TrailEvent, TrailNote};
use crate::store::Store;
use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// Records an owner's action in the trail and waits until it is durable.
fn record(store: &Store, event: &'static str, service: &str, what: String) -> Result<()> {
    store.trail_append(TrailEvent {
        ts: crate::clock::system_now(),
        event,
        status: 200,
        note: TrailNote {
            service: Some(service.to_string()),
            sub: Some("owner (cli)".into()),
            policy: Some(what),
            authenticated: true,
            ..Default::default()
        },
        peer: None,
    });
    Ok(store.flush_blocking()?)
}

pub fn run(config: &Path, action: PolicyAction) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let store = open_store(&cfg)?;
    match action {
        PolicyAction::Set {
            service,
            approval,
            agents,
            rate,
            hours,
            no_reveal,
            upstreams,
        } => {
            if service.is_empty() || service.len() > 256 {
                bail!("a service name is 1-256 characters");
            }
            let p = Policy {
                approval,
                agents: (!agents.is_empty()).then(|| agents.into_iter().collect()),
                rate: rate
                    .as_deref()
                    .map(Rate::parse)
                    .transpose()
                    .map_err(|e| anyhow!(e))?,
                hours: hours
                    .iter()
                    .map(|h| Window::parse(h))
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow!(e))?,
                no_reveal,
                upstreams: (!upstreams.is_empty())
                    .then(|| upstreams.iter().map(|u| u.to_ascii_lowercase()).collect()),
            };
            if p.is_empty() {
                let had = store.policy_delete_blocking(service.clone())?;
                record(
                    &store,
                    "policy_clear",
                    &service,
                    "cleared (no rule given)".into(),
                )?;
                println!(
                    "{service}: no rule given, so no policy ({})",
                    if had {
                        "the old one removed"
                    } else {
                        "none was set"
                    }
                );
                return Ok(());
            }
            let raw = serde_json::to_vec(&p)?;
            store.policy_put_blocking(service.clone(), raw)?;
            let shown = serde_json::to_string(&p)?;
            record(&store, "policy_set", &service, shown.clone())?;
            println!("{service}: {shown}");
        }
        PolicyAction::Show { service } => {
            let all = match service {
                Some(s) => match store.policy_get(&s)? {
                    Some(raw) => vec![(s, raw)],
                    None => bail!("{s}: no policy (every signed use is obeyed)"),
                },
                None => store.policy_all()?,
            };
            let mut out = serde_json::Map::new();
            for (s, raw) in all {
                let p: Policy = serde_json::from_slice(&raw)
                    .map_err(|_| anyhow!("{s}: the stored policy does not parse"))?;
                out.insert(s, serde_json::to_value(&p)?);
            }
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        PolicyAction::Clear { service } => {
            if !store.policy_delete_blocking(service.clone())? {
                bail!("{service}: no policy to clear");
            }
            record(&store, "policy_clear", &service, "cleared".into())?;
            println!("{service}: policy cleared");
        }
    }
    Ok(())
}

/// `approve ID` (`grant`: uses and minutes) or `deny ID` (`grant` None).
pub fn decide(config: &Path, id: &str, grant: Option<(u32, Option<i64>)>) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let store = open_store(&cfg)?;
    let now = crate::clock::system_now();
    let grant = match grant {
        None => None,
        Some((uses, minutes)) => {
            if uses == 0 || uses > 10_000 {
                bail!("--uses must be 1-10000");
            }
            let secs = match minutes {
                Some(m) if !(1..=7 * 24 * 60).contains(&m) => bail!("--minutes must be 1-10080"),
                Some(m) => m * 60,
                None => cfg.policy.approval_ttl_secs,
            };
            Some((uses, now + secs))
        }
    };
    match store.approval_decide_blocking(id.to_string(), grant, now)? {
        Decided::NotFound => bail!("no approval {id} (see `approvals list`)"),
        Decided::NotPending(a) => bail!(
            "approval {id} is {} now, not pending: nothing changed",
            state_name(a.state)
        ),
        Decided::Done(a) => {
            let (event, what) = match a.state {
                ApprovalState::Approved => (
                    "approval_given",
                    format!(
                        "approved {} for {} ({} by {}), {} use(s) until {}",
                        a.id,
                        a.service,
                        a.purpose,
                        a.agent,
                        a.uses_left,
                        crate::clock::rfc3339(a.expires_at)
                    ),
                ),
                _ => (
                    "approval_denied",
                    format!(
                        "denied {} for {} ({} by {})",
                        a.id, a.service, a.purpose, a.agent
                    ),
                ),
            };
            record(&store, event, &a.service, what.clone())?;
            println!("{what}");
        }
    }
    Ok(())
}

fn state_name(s: ApprovalState) -> &'static str {
    match s {
        ApprovalState::Pending => "pending",
        ApprovalState::Approved => "approved",
        ApprovalState::Denied => "denied",
        ApprovalState::Expired => "expired",
        ApprovalState::Used => "used",
    }
}

pub fn approvals(config: &Path, action: ApprovalsAction) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let store = open_store(&cfg)?;
    let now = crate::clock::system_now();
    match action {
        ApprovalsAction::List { pending } => {
            for a in store.approval_all()? {
                let live = a.expires_at > now;
                let state = match a.state {
                    ApprovalState::Pending | ApprovalState::Approved if !live => "expired",
                    s => state_name(s),
                };
                if pending && state != "pending" {
                    continue;
                }
                println!(
                    "{}",
                    serde_json::json!({
                        "id": a.id, "service": a.service, "purpose": a.purpose,
                        "agent": a.agent, "state": state, "usesLeft": a.uses_left,
                        "createdAt": crate::clock::rfc3339(a.created_at),
                        "expiresAt": crate::clock::rfc3339(a.expires_at),
                    })
                );
            }
        }
    }
    Ok(())
}
