#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The owner's policy on the real binary (both backends): approvals
//! decided with the CLI while the server runs, agents, rates and hours on a
//! frozen clock, every decision in the audit trail.

mod fakes;
mod harness;

use harness::*;
use serde_json::{json, Value};

const CRED: &str = "/v1/credential";

/// The pending approvals `approvals list --pending` shows.
fn pending(a: &Appliance) -> Vec<Value> {
    a.cli_ok(&["approvals", "list", "--pending"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn trail(a: &Appliance) -> Vec<Value> {
    a.cli_ok(&["audit", "tail", "-n", "200"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn an_approval_is_single_use_bound_to_service_use_and_agent() {
    let (_t, mut a) = Appliance::start_configured("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    a.bind().await;
    a.store_ok("gh", json!({"accessToken":"ghp_gated"})).await;
    a.store_ok("other", json!({"accessToken":"ghp_other"}))
        .await;
    let me = json!({"aid":"agent-7"});
    // Allowed before the policy.
    assert_eq!(
        a.read_as(CRED, "agent_credential", "gh", me.clone())
            .await
            .0,
        200
    );
    a.cli_ok(&["policy", "set", "gh", "--approval"]);
    let (s, v) = a.read_as(CRED, "agent_credential", "gh", me.clone()).await;
    assert_refused(s, &v, 403, "approval_required");
    assert!(!v.to_string().contains("ghp_gated"));
    let id = v["approvalId"].as_str().unwrap().to_string();
    // Asking again while pending names the same approval; one is pending.
    let (_, v2) = a.read_as(CRED, "agent_credential", "gh", me.clone()).await;
    assert_eq!(v2["approvalId"], id.as_str());
    let p = pending(&a);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (
            p[0]["id"].as_str(),
            p[0]["service"].as_str(),
            p[0]["purpose"].as_str(),
            p[0]["agent"].as_str()
        ),
        (
            Some(id.as_str()),
            Some("gh"),
            Some("credential"),
            Some("agent-7")
        )
    );
    a.wait_metrics("one approval pending", |m| {
        metric(m, "tvw_approvals_pending") == 1
    })
    .await;
    a.wait_log("approval needed").await;
    // Other services are not gated.
    assert_eq!(
        a.read_as(CRED, "agent_credential", "other", me.clone())
            .await
            .0,
        200
    );
    // Approved once: the same agent reads once; another agent is not covered.
    let out = a.cli_ok(&["approve", &id]);
    assert!(out.contains("1 use(s)"), "{out}");
    let (s, v) = a
        .read_as(CRED, "agent_credential", "gh", json!({"aid":"agent-8"}))
        .await;
    assert_refused(s, &v, 403, "approval_required");
    assert_ne!(v["approvalId"], id.as_str());
    let (s, v) = a.read_as(CRED, "agent_credential", "gh", me.clone()).await;
    assert_eq!(
        (s, v["token"]["accessToken"].as_str()),
        (200, Some("ghp_gated")),
        "{v}"
    );
    // Used up: the next read asks again, under a new id.
    let (s, v) = a.read_as(CRED, "agent_credential", "gh", me.clone()).await;
    assert_refused(s, &v, 403, "approval_required");
    let id2 = v["approvalId"].as_str().unwrap().to_string();
    assert_ne!(id2, id);
    // A decided approval cannot be decided again; an unknown one is not found.
    assert!(a.cli_err(&["approve", &id]).contains("not pending"));
    assert!(a
        .cli_err(&["deny", "ap_0000000000000000"])
        .contains("no approval"));
    // Denied: the read stays refused, and asks anew.
    a.cli_ok(&["deny", &id2]);
    let (s, v) = a.read_as(CRED, "agent_credential", "gh", me.clone()).await;
    assert_refused(s, &v, 403, "approval_required");
    // A standing approval: three uses.
    let id3 = v["approvalId"].as_str().unwrap().to_string();
    a.cli_ok(&["approve", &id3, "--uses", "3", "--minutes", "5"]);
    for _ in 0..3 {
        assert_eq!(
            a.read_as(CRED, "agent_credential", "gh", me.clone())
                .await
                .0,
            200
        );
    }
    assert_eq!(
        a.read_as(CRED, "agent_credential", "gh", me.clone())
            .await
            .0,
        403
    );
    // The purpose is bound too: a reveal is another approval.
    let (_, v) = a.read_as(CRED, "user_reveal", "gh", me.clone()).await;
    assert_eq!(v["error"], "approval_required");
    // Every step is in the trail, with who and why, and no secret.
    let t = trail(&a);
    let policy_lines: Vec<&str> = t.iter().filter_map(|r| r["policy"].as_str()).collect();
    for needle in [
        "approval required: ",
        "approved: ",
        "denied ",
        "approved ",
        "{\"approval\":true}",
    ] {
        assert!(
            policy_lines.iter().any(|l| l.contains(needle)),
            "{needle}: {policy_lines:?}"
        );
    }
    assert!(t
        .iter()
        .any(|r| r["event"] == "approval_given" && r["sub"] == "owner (cli)"));
    assert!(t.iter().any(|r| r["event"] == "approval_denied"));
    assert!(t.iter().any(|r| r["event"] == "policy_set"));
    assert!(!serde_json::to_string(&t).unwrap().contains("ghp_gated"));
    let out = a.cli_ok(&["audit", "verify"]);
    assert!(out.contains("\"ok\": true"), "{out}");
}

#[tokio::test]
async fn a_waiting_request_is_answered_when_the_owner_approves_or_denies() {
    let (_t, mut a) = Appliance::start_configured("[policy]\napproval_wait_secs = 120\n");
    a.bind().await;
    a.store_ok("gh", json!({"accessToken":"ghp_waits"})).await;
    a.cli_ok(&["policy", "set", "gh", "--approval"]);
    for (answer, status) in [("approve", 200), ("deny", 403)] {
        let before = a.log_text().matches("approval needed").count();
        let (r, ()) = tokio::join!(
            a.read_as(CRED, "agent_credential", "gh", json!({"aid":"waiter"})),
            async {
                a.wait_log_count("approval needed", before + 1).await;
                let id = pending(&a)[0]["id"].as_str().unwrap().to_string();
                a.cli_ok(&[answer, &id]);
            }
        );
        assert_eq!(r.0, status, "{answer}: {}", r.1);
        if status == 200 {
            assert_eq!(r.1["token"]["accessToken"], "ghp_waits");
        } else {
            assert_eq!(r.1["error"], "policy_denied");
        }
    }
}

#[tokio::test]
async fn an_undecided_approval_expires_and_can_no_longer_be_given() {
    let (_t, mut a) = Appliance::start_configured(
        "[policy]\napproval_ttl_secs = 10\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    a.bind().await;
    a.store_ok("gh", json!({"accessToken":"ghp_late"})).await;
    a.cli_ok(&["policy", "set", "gh", "--approval"]);
    let (_, v) = a.read_as(CRED, "agent_credential", "gh", json!({})).await;
    let id = v["approvalId"].as_str().unwrap().to_string();
    a.wait_metrics("the approval pending", |m| {
        metric(m, "tvw_approvals_pending") == 1
    })
    .await;
    // The event: the pending gauge drops when its time is up.
    a.wait_metrics("the approval lapsed", |m| {
        metric(m, "tvw_approvals_pending") == 0
    })
    .await;
    assert!(a.cli_err(&["approve", &id]).contains("expired"));
    let (s, v) = a.read_as(CRED, "agent_credential", "gh", json!({})).await;
    assert_refused(s, &v, 403, "approval_required");
    assert_ne!(v["approvalId"], id.as_str());
}

#[tokio::test]
async fn agents_hours_and_rates_are_enforced_on_a_frozen_clock() {
    // Frozen a little ahead, so tickets signed at real time stay valid.
    let at = now() + 30;
    let (_t, mut a) = Appliance::start_frozen("", at);
    a.bind().await;
    a.wait_log("TEST CLOCK").await;
    for s in ["agents", "hours", "closed", "rate"] {
        a.store_ok(s, json!({"accessToken": format!("tok-{s}")}))
            .await;
    }
    let minute = at.rem_euclid(86_400) / 60;
    let hm = |m: i64| {
        format!(
            "{:02}:{:02}",
            m.rem_euclid(1440) / 60,
            m.rem_euclid(1440) % 60
        )
    };
    let open = format!("{}-{}", hm(minute - 60), hm(minute + 60));
    let shut = format!("{}-{}", hm(minute + 120), hm(minute + 180));
    a.cli_ok(&[
        "policy", "set", "agents", "--agent", "agent-a", "--agent", "user-9",
    ]);
    a.cli_ok(&["policy", "set", "hours", "--hours", &open]);
    a.cli_ok(&["policy", "set", "closed", "--hours", &shut]);
    a.cli_ok(&["policy", "set", "rate", "--rate", "2/hour"]);
    // Agents: by aid or sub; anyone else refused.
    assert_eq!(
        a.read_as(CRED, "agent_credential", "agents", json!({"aid":"agent-a"}))
            .await
            .0,
        200
    );
    assert_eq!(
        a.read_as(CRED, "agent_credential", "agents", json!({"sub":"user-9"}))
            .await
            .0,
        200
    );
    let (s, v) = a
        .read_as(CRED, "agent_credential", "agents", json!({"aid":"agent-b"}))
        .await;
    assert_refused(s, &v, 403, "policy_denied");
    // Hours (UTC) by the frozen clock.
    assert_eq!(
        a.read_as(CRED, "agent_credential", "hours", json!({}))
            .await
            .0,
        200
    );
    let (s, v) = a
        .read_as(CRED, "agent_credential", "closed", json!({}))
        .await;
    assert_refused(s, &v, 403, "policy_denied");
    assert!(v["message"].as_str().unwrap().contains("hours"));
    // Two per agent per hour; the third is 429 with Retry-After; another
    // agent has its own count.
    for _ in 0..2 {
        assert_eq!(
            a.read_as(CRED, "agent_credential", "rate", json!({"aid":"r1"}))
                .await
                .0,
            200
        );
    }
    let (s, v) = a
        .read_as(CRED, "agent_credential", "rate", json!({"aid":"r1"}))
        .await;
    assert_refused(s, &v, 429, "rate_limited");
    assert_eq!(
        a.read_as(CRED, "agent_credential", "rate", json!({"aid":"r2"}))
            .await
            .0,
        200
    );
    // The refusals are in the trail with their reasons.
    let reasons: Vec<String> = trail(&a)
        .iter()
        .filter_map(|r| r["policy"].as_str().map(str::to_string))
        .collect();
    for why in [
        "denied: agent not allowed",
        "denied: outside hours",
        "denied: rate 2/hour",
    ] {
        assert!(reasons.iter().any(|r| r == why), "{why}: {reasons:?}");
    }
    // doctor shows the rules.
    let doctor = a.cli_ok(&["doctor"]);
    assert!(
        doctor.contains("owner policy on 4 service(s)")
            && doctor.contains("rate {\"rate\":{\"max\":2"),
        "{doctor}"
    );
    // show and clear.
    let shown: Value = serde_json::from_str(&a.cli_ok(&["policy", "show"])).unwrap();
    assert_eq!(shown["rate"]["rate"], json!({"max": 2, "perSecs": 3600}));
    assert_eq!(shown["agents"]["agents"], json!(["agent-a", "user-9"]));
    a.cli_ok(&["policy", "clear", "closed"]);
    assert_eq!(
        a.read_as(CRED, "agent_credential", "closed", json!({}))
            .await
            .0,
        200
    );
    assert!(a
        .cli_err(&["policy", "show", "closed"])
        .contains("no policy"));
    assert!(a
        .cli_err(&["policy", "set", "x", "--rate", "fast"])
        .contains("N/minute"));
    assert!(a
        .cli_err(&["policy", "set", "x", "--hours", "25:00-26:00"])
        .contains("HH:MM"));
}

#[tokio::test]
async fn a_new_approval_request_is_announced_to_the_owners_hook_without_a_secret() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let tx = tx.clone();
            async move {
                tx.send(v).unwrap();
                "ok"
            }
        }),
    );
    let hook = fakes::serve(app).await;
    let (_t, mut a) = Appliance::start_configured(&format!(
        "[policy]\nnotify_url = \"{hook}/hook\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n"
    ));
    a.bind().await;
    a.store_ok("gh", json!({"accessToken":"ghp_hooked"})).await;
    a.cli_ok(&["policy", "set", "gh", "--approval"]);
    let (_, v) = a
        .read_as(CRED, "agent_credential", "gh", json!({"aid":"bot"}))
        .await;
    let id = v["approvalId"].as_str().unwrap().to_string();
    // The event: the hook's POST.
    let got = rx.recv().await.unwrap();
    assert_eq!(
        (
            got["event"].as_str(),
            got["approvalId"].as_str(),
            got["service"].as_str(),
            got["agent"].as_str()
        ),
        (
            Some("approval_required"),
            Some(id.as_str()),
            Some("gh"),
            Some("bot")
        )
    );
    assert_eq!(got["approve"], format!("tokenvault-webhook approve {id}"));
    assert!(!got.to_string().contains("ghp_hooked"));
    // Asking again while pending announces nothing new.
    let (_, v) = a
        .read_as(CRED, "agent_credential", "gh", json!({"aid":"bot"}))
        .await;
    assert_eq!(v["approvalId"], id.as_str());
    a.wait_metrics("one announcement sent", |m| {
        metric(m, "tvw_approval_notify_sent_total") == 1
    })
    .await;
    assert!(rx.try_recv().is_err());
}
