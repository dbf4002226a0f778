use super::*;
use serde_json::json;

/// RFC 6238 Appendix B and the spec's extra vectors, from vectors.json.
fn rfc() -> Vec<(String, OtpAlg, u32, u64, u64, String)> {
    let v = crate::keys::conformance::spec_totp_vectors();
    assert!(v.len() >= 20, "{} TOTP vectors", v.len());
    v
}

#[test]
fn software_path_matches_rfc6238() {
    for (b32, alg, digits, period, t, code) in &rfc() {
        let seed = base32_decode(b32).unwrap();
        let p = Params {
            alg: *alg,
            digits: *digits,
            period: *period,
        };
        assert_eq!(
            code_software(&seed, &p, *t).as_str(),
            *code,
            "{alg:?} t={t}"
        );
    }
}

#[test]
fn host_truncation_matches_rfc6238() {
    // The device path's truncation, fed by a software HMAC.
    use hmac::{Hmac, Mac};
    for (b32, alg, digits, period, t, code) in &rfc() {
        let seed = base32_decode(b32).unwrap();
        let c = (t / period).to_be_bytes();
        let mac = match alg {
            OtpAlg::Sha1 => ring::hmac::sign(
                &ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &seed),
                &c,
            )
            .as_ref()
            .to_vec(),
            OtpAlg::Sha256 => {
                let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&seed).unwrap();
                m.update(&c);
                m.finalize().into_bytes().to_vec()
            }
            OtpAlg::Sha512 => {
                let mut m = <Hmac<sha2::Sha512> as Mac>::new_from_slice(&seed).unwrap();
                m.update(&c);
                m.finalize().into_bytes().to_vec()
            }
        };
        assert_eq!(truncate(&mac, *digits).as_str(), *code);
    }
}

#[test]
fn base32_round_trip_and_healing() {
    let seed = base32_decode("JBSWY3DPEHPK3PXP").unwrap();
    assert_eq!(seed.as_slice(), b"Hello!\xde\xad\xbe\xef");
    assert_eq!(base32_encode(&seed).as_str(), "JBSWY3DPEHPK3PXP");
    for healed in [
        "jbswy3dpehpk3pxp",
        "JBSW Y3DP EHPK 3PXP",
        "jbsw-y3dp-ehpk-3pxp",
        "JBSWY3DPEHPK3PXP====",
        "JBSWY3DPEHPK3PXP=",
    ] {
        assert_eq!(
            base32_decode(healed).unwrap().as_slice(),
            seed.as_slice(),
            "{healed}"
        );
    }
    assert!(base32_decode("JBSWY3DP!").is_none());
    assert!(
        base32_decode("JBSWY3DP01").is_none(),
        "0 and 1 are not base32"
    );
    let odd = [1u8, 2, 3, 4, 5, 6, 7];
    assert_eq!(
        base32_decode(&base32_encode(&odd)).unwrap().as_slice(),
        &odd
    );
}

fn td(v: serde_json::Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

/// vectors.json `otpauthAccept`: each URI's metadata is what the vector
/// says (tokenType where the vector names one is set by the store path,
/// `fields::seal_token_data`, and checked there).
#[test]
fn otpauth_accept_vectors_from_the_spec_file() {
    for v in crate::testvectors::list("otpauthAccept") {
        let uri = crate::testvectors::s(v, "uri");
        let e = parse_enrolment(&td(json!({ "totpUri": uri })))
            .unwrap_or_else(|e| panic!("{uri}: {}", e.message()))
            .unwrap_or_else(|| panic!("{uri}: not an enrolment"));
        let mut m = Map::new();
        meta_for(&e, &mut m);
        for (k, want) in v["meta"].as_object().unwrap() {
            if k == "tokenType" {
                continue;
            }
            assert_eq!(m.get(k), Some(want), "{uri}: {k}");
        }
    }
}

/// vectors.json `otpauthReject`: every URI refused as a 400, never echoing
/// what was sent.
#[test]
fn otpauth_reject_vectors_from_the_spec_file() {
    for v in crate::testvectors::list("otpauthReject") {
        let uri = v.as_str().unwrap();
        let e = parse_enrolment(&td(json!({ "totpUri": uri })))
            .err()
            .unwrap_or_else(|| panic!("accepted {uri}"));
        assert_eq!(e.code(), "invalid_request", "{uri}");
        let secret = uri
            .split("secret=")
            .nth(1)
            .map(|s| s.split('&').next().unwrap_or(s));
        if let Some(secret) = secret.filter(|s| !s.is_empty()) {
            assert!(!e.message().contains(secret), "{uri}: {}", e.message());
        }
    }
}

#[test]
fn otpauth_accept_vectors() {
    let e = parse_enrolment(&td(json!({"totpUri": "otpauth://totp/Acme:alice%40example.com?secret=JBSWY3DPEHPK3PXP&issuer=Acme&algorithm=SHA256&digits=8&period=45"}))).unwrap().unwrap();
    let mut m = Map::new();
    meta_for(&e, &mut m);
    assert_eq!(
        Value::Object(m),
        json!({"totpIssuer":"Acme","totpAccountName":"alice@example.com","totpAlgorithm":"SHA256","totpDigits":8,"totpPeriod":45,"hasTotpSecret":true})
    );
    let e = parse_enrolment(&td(
        json!({"totpUri": "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP"}),
    ))
    .unwrap()
    .unwrap();
    assert_eq!(
        e.params,
        Params {
            alg: OtpAlg::Sha1,
            digits: 6,
            period: 30
        }
    );
    let e = parse_enrolment(&td(json!({"totpUri": "otpauth://totp/ACME%20Co:bob?secret=jbsw%20y3dp%20ehpk%203pxp&algorithm=sha1"}))).unwrap().unwrap();
    assert_eq!(
        (e.issuer.as_deref(), e.account.as_deref(), e.params.alg),
        (Some("ACME Co"), Some("bob"), OtpAlg::Sha1)
    );
    assert_eq!(e.seed.as_slice(), b"Hello!\xde\xad\xbe\xef");
    // A URI pasted into totpSecret, and explicit fields winning over the URI.
    let e = parse_enrolment(&td(json!({"totpSecret": "otpauth://totp/GitHub:me?secret=JBSWY3DPEHPK3PXP&digits=8", "totpDigits": "7", "totpPeriod": 60, "totpAlgorithm": "sha512"}))).unwrap().unwrap();
    assert_eq!(
        e.params,
        Params {
            alg: OtpAlg::Sha512,
            digits: 7,
            period: 60
        }
    );
    assert_eq!(e.issuer.as_deref(), Some("GitHub"));
    // Raw base32 with defaults; nothing TOTP at all.
    let e = parse_enrolment(&td(json!({"totpSecret": "jbsw y3dp ehpk 3pxp"})))
        .unwrap()
        .unwrap();
    assert_eq!(e.params, Params::default());
    assert!(parse_enrolment(&td(json!({"accessToken": "x"})))
        .unwrap()
        .is_none());
}

#[test]
fn otpauth_reject_vectors_never_echo_the_secret() {
    let rejects = [
        ("not a uri", "otpauth://totp"),
        ("otpauth://hotp/x?secret=JBSWY3DPEHPK3PXP&counter=0", "HOTP"),
        ("otpauth://totp/x", "missing"),
        ("otpauth://totp/x?secret=!!!", "base32"),
        (
            "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP&digits=3",
            "digits",
        ),
        (
            "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP&digits=12",
            "digits",
        ),
        (
            "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP&algorithm=MD5",
            "algorithm",
        ),
        (
            "otpauth://totp/x?secret=JBSWY3DPEHPK3PXP&period=0",
            "period",
        ),
        ("otpauth://totp/x?secret=AAAA", "80 bits"),
    ];
    for (uri, needle) in rejects {
        let e = parse_enrolment(&td(json!({"totpUri": uri})))
            .err()
            .unwrap_or_else(|| panic!("accepted {uri}"));
        let m = e.message();
        assert_eq!(e.code(), "invalid_request");
        assert!(m.contains(needle), "{uri}: {m}");
        assert!(
            !m.contains("JBSWY3DP") && !m.contains("!!!") && !m.contains("AAAA"),
            "{m}"
        );
    }
    for bad in [
        json!({"totpSecret": "JBSWY3DPEHPK3PXP", "totpPeriod": 3601}),
        json!({"totpSecret": "JBSWY3DPEHPK3PXP", "totpDigits": 5}),
        json!({"totpSecret": ""}),
        json!({"totpAlgorithm": "SHA1"}),
        json!({"totpSecret": 123}),
    ] {
        assert!(parse_enrolment(&td(bad.clone())).is_err(), "{bad}");
    }
}

#[test]
fn params_round_trip_through_meta() {
    let e = parse_enrolment(&td(json!({"totpSecret": "JBSWY3DPEHPK3PXP", "totpAlgorithm": "SHA256", "totpDigits": 8, "totpPeriod": 45}))).unwrap().unwrap();
    let mut m = Map::new();
    meta_for(&e, &mut m);
    assert_eq!(params_from_meta(&m), e.params);
    assert_eq!(remaining(&e.params, 90), 45);
    assert_eq!(remaining(&e.params, 91), 44);
}
