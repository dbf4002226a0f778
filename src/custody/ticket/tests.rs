//! Every ticket rule, in order.

use super::*;
use crate::keys::soft::SoftBackend;
use crate::keys::{Backend, MacKeys};
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::SecretSlice;
use serde_json::json;
use sha2::Sha256;
use std::sync::Arc;

const SECRET: [u8; 32] = [0x42; 32];
const NOW: i64 = 1_800_000_000;

fn setup() -> (tempfile::TempDir, Backend, Store) {
    let b = SoftBackend::new();
    let id = b.install_hmac(&SecretSlice::from(SECRET.to_vec())).unwrap();
    b.activate_hmac(&id).unwrap();
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(d.path(), 16 << 20).unwrap();
    (d, Arc::new(b), s)
}

fn make(claims: &Value) -> String {
    make_with(&SECRET, claims)
}

fn make_with(secret: &[u8], claims: &Value) -> String {
    let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(p.as_bytes());
    format!("{p}.{}", hex::encode(m.finalize().into_bytes()))
}

fn good() -> Value {
    json!({"sub":"u1","svc":"github","pur":"agent_credential","iat":NOW - 5,"exp":NOW + 55,"nonce":"0123456789abcdef0123456789abcdef","aid":"agent-1"})
}

fn with(k: &str, v: Value) -> Value {
    let mut c = good();
    c[k] = v;
    c
}

fn without(k: &str) -> Value {
    let mut c = good();
    c.as_object_mut().unwrap().remove(k);
    c
}

fn check(b: &Backend, s: &Store, t: &str) -> Result<Ticket, ApiError> {
    verify(b, s, t, CREDENTIAL, "github", NOW)
}

fn invalid(r: Result<Ticket, ApiError>) -> &'static str {
    match r {
        Err(ApiError::TicketInvalid(m)) => m,
        other => panic!("expected ticket_invalid, got {other:?}"),
    }
}

#[tokio::test]
async fn accepts_a_good_ticket_and_the_spec_vector() {
    let (_d, b, s) = setup();
    let t = check(&b, &s, &make(&good())).unwrap();
    assert_eq!(
        (t.svc.as_str(), t.pur.as_str(), t.exp),
        ("github", "agent_credential", NOW + 55)
    );
    // The spec's vector ticket (vectors.json), under its own secret.
    use crate::testvectors as tv;
    let vt = tv::get("ticket");
    let b2 = SoftBackend::new();
    let id = b2
        .install_hmac(&SecretSlice::from(tv::hex_bytes(vt, "secretHex")))
        .unwrap();
    b2.activate_hmac(&id).unwrap();
    let b2: Backend = Arc::new(b2);
    let v = tv::s(vt, "value");
    let iat = tv::u(&vt["payload"], "iat") as i64;
    let exp = tv::u(&vt["payload"], "exp") as i64;
    let (svc, pur) = (tv::s(&vt["payload"], "svc"), tv::s(&vt["payload"], "pur"));
    assert!(CREDENTIAL.contains(&pur));
    // Its signature verifies; its lifetime (iat .. exp) is far over 300 s:
    // refused by that rule, which comes after the MAC, decode, exp and iat.
    assert!(exp - iat > MAX_TTL_SECS);
    assert_eq!(
        invalid(verify(&b2, &s, v, CREDENTIAL, svc, iat + 10)),
        "Ticket lifetime too long"
    );
    // Under this test's other secret, the same ticket is a signature mismatch.
    assert_eq!(
        invalid(verify(&b, &s, v, CREDENTIAL, svc, iat + 10)),
        "Ticket signature mismatch"
    );
}

#[tokio::test]
async fn shape_and_signature() {
    let (_d, b, s) = setup();
    assert_eq!(invalid(check(&b, &s, "nodot")), "Ticket is malformed");
    assert_eq!(invalid(check(&b, &s, "abc.def")), "Ticket is malformed");
    assert_eq!(
        invalid(check(&b, &s, &make_with(&[1u8; 32], &good()))),
        "Ticket signature mismatch"
    );
    // Tampered payload, original MAC.
    let t = make(&good());
    let (p, m) = t.split_once('.').unwrap();
    let other = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(with("svc", json!("gitlab")).to_string());
    assert_ne!(p, other);
    assert_eq!(
        invalid(check(&b, &s, &format!("{other}.{m}"))),
        "Ticket signature mismatch"
    );
    // Signed garbage payload.
    let junk = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("not json");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&SECRET).unwrap();
    mac.update(junk.as_bytes());
    let t = format!("{junk}.{}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(
        invalid(check(&b, &s, &t)),
        "Ticket payload is not valid JSON"
    );
}

#[tokio::test]
async fn expiry_rules() {
    let (_d, b, s) = setup();
    assert_eq!(
        check(&b, &s, &make(&without("exp"))).unwrap_err(),
        ApiError::TicketExpired
    );
    assert_eq!(
        check(&b, &s, &make(&with("exp", Value::Null))).unwrap_err(),
        ApiError::TicketExpired
    );
    assert_eq!(
        check(&b, &s, &make(&with("exp", json!(NOW)))).unwrap_err(),
        ApiError::TicketExpired
    );
    assert_eq!(
        check(&b, &s, &make(&with("exp", json!(NOW - 100)))).unwrap_err(),
        ApiError::TicketExpired
    );
    // A non-numeric exp never means "never expires".
    assert_eq!(
        invalid(check(&b, &s, &make(&with("exp", json!("9999999999"))))),
        "Ticket exp must be a number"
    );
    assert_eq!(
        invalid(check(&b, &s, &make(&with("exp", json!(true))))),
        "Ticket exp must be a number"
    );
}

#[tokio::test]
async fn issued_at_rules() {
    let (_d, b, s) = setup();
    assert_eq!(
        invalid(check(&b, &s, &make(&without("iat")))),
        "Ticket iat must be a number"
    );
    assert_eq!(
        invalid(check(&b, &s, &make(&with("iat", json!("x"))))),
        "Ticket iat must be a number"
    );
    // 60 s of skew is fine, 61 is not.
    let mut c = good();
    c["iat"] = json!(NOW + 60);
    c["exp"] = json!(NOW + 120);
    assert!(check(&b, &s, &make(&c)).is_ok());
    c["iat"] = json!(NOW + 61);
    c["nonce"] = json!("another-nonce-0001");
    assert_eq!(
        invalid(check(&b, &s, &make(&c))),
        "Ticket issued in the future"
    );
    // exp - iat <= 300.
    let mut c = good();
    c["iat"] = json!(NOW - 100);
    c["exp"] = json!(NOW + 200);
    assert!(check(&b, &s, &make(&c)).is_ok());
    c["exp"] = json!(NOW + 201);
    assert_eq!(
        invalid(check(&b, &s, &make(&c))),
        "Ticket lifetime too long"
    );
}

#[tokio::test]
async fn nonce_rules() {
    let (_d, b, s) = setup();
    assert_eq!(
        invalid(check(&b, &s, &make(&without("nonce")))),
        "Ticket nonce missing or malformed"
    );
    assert_eq!(
        invalid(check(&b, &s, &make(&with("nonce", json!("short"))))),
        "Ticket nonce missing or malformed"
    );
    assert_eq!(
        invalid(check(
            &b,
            &s,
            &make(&with("nonce", json!("bad nonce with spaces")))
        )),
        "Ticket nonce missing or malformed"
    );
    let t = check(&b, &s, &make(&good())).unwrap();
    // Verification alone does not burn the nonce.
    assert!(check(&b, &s, &make(&good())).is_ok());
    consume(&s, &t, NOW).await.unwrap();
    assert_eq!(
        invalid(check(&b, &s, &make(&good()))),
        "Ticket already used"
    );
    // A second consume (a concurrent use that passed verification) loses.
    assert_eq!(
        consume(&s, &t, NOW).await.unwrap_err(),
        ApiError::TicketInvalid("Ticket already used")
    );
}

#[tokio::test]
async fn purpose_and_service_rules() {
    let (_d, b, s) = setup();
    for pur in ["store", "proxy", "totp_code", "", "AGENT_CREDENTIAL"] {
        let r = check(&b, &s, &make(&with("pur", json!(pur))));
        assert_eq!(
            invalid(r),
            "Ticket purpose not valid for this endpoint",
            "{pur}"
        );
    }
    assert_eq!(
        invalid(check(&b, &s, &make(&without("pur")))),
        "Ticket purpose not valid for this endpoint"
    );
    assert!(check(&b, &s, &make(&with("pur", json!("user_reveal")))).is_ok());
    // Purpose tables per endpoint.
    assert!(verify(
        &b,
        &s,
        &make(&with("pur", json!("store"))),
        STORE,
        "github",
        NOW
    )
    .is_ok());
    assert!(verify(
        &b,
        &s,
        &make(&with("pur", json!("agent_credential"))),
        STORE,
        "github",
        NOW
    )
    .is_err());
    for p in ["totp_code", "user_reveal", "agent_credential"] {
        assert!(verify(
            &b,
            &s,
            &make(&with("pur", json!(p))),
            TOTP_CODE,
            "github",
            NOW
        )
        .is_ok());
    }
    assert!(verify(
        &b,
        &s,
        &make(&with("pur", json!("proxy"))),
        PROXY,
        "github",
        NOW
    )
    .is_ok());
    // Service.
    let e = check(&b, &s, &make(&with("svc", json!("gitlab")))).unwrap_err();
    assert_eq!(e.code(), "invalid_request");
    assert_eq!(e.status(), 400);
    assert_eq!(
        invalid(check(&b, &s, &make(&without("svc")))),
        "Ticket has no service"
    );
    // Nothing was burned by any refusal above.
    assert!(!s
        .replay_seen(
            crate::store::ReplayNs::TicketNonce,
            "0123456789abcdef0123456789abcdef",
            NOW
        )
        .unwrap());
}

#[test]
fn creation_id_rule() {
    let mut t = Ticket {
        sub: None,
        svc: "s".into(),
        pur: "agent_credential".into(),
        aid: None,
        pid: None,
        nonce: "n".into(),
        exp: 0,
        mode: None,
        cid: None,
    };
    assert!(check_creation(&t, Some("c1")).is_ok());
    t.cid = Some("c1".into());
    assert!(check_creation(&t, Some("c1")).is_ok());
    assert!(check_creation(&t, None).is_ok());
    assert_eq!(
        check_creation(&t, Some("c2")).unwrap_err(),
        ApiError::StaleCreation
    );
}
