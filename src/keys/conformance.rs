//! One conformance suite, the same functions run against every backend.

use super::*;
use hmac::{Hmac, Mac};
use secrecy::SecretSlice;
use sha2::Sha256;

fn soft_hmac(secret: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap();
    m.update(data);
    m.finalize().into_bytes().into()
}

pub fn random_is_random(b: &dyn KeyBackend) {
    let mut a = [0u8; 32];
    let mut c = [0u8; 32];
    b.fill_random(&mut a).unwrap();
    b.fill_random(&mut c).unwrap();
    assert_ne!(a, c);
    assert_ne!(a, [0u8; 32]);
}

/// The spec's request-signature and ticket vectors through the backend's
/// HMAC and the protocol's own payload, header and ticket parsing.
pub fn hmac_matches_spec_vector(b: &dyn KeyBackend) {
    use crate::protocol::signature::{mac_eq, parse_signature_header, signing_payload};
    use crate::testvectors as tv;
    let v = tv::get("requestSignature");
    let payload = signing_payload(tv::s(v, "timestamp"), tv::s(v, "rawBody").as_bytes());
    for (secret, sig) in [
        (tv::hex_bytes(v, "secretHex"), v),
        (
            tv::hex_bytes(&v["signatureUnderWrongSecret"], "secretHex"),
            &v["signatureUnderWrongSecret"],
        ),
    ] {
        let id = b.install_hmac(&SecretSlice::from(secret)).unwrap();
        b.activate_hmac(&id).unwrap();
        let presented =
            parse_signature_header(&format!("sha256={}", tv::s(sig, "signatureHex"))).unwrap();
        assert!(mac_eq(&b.hmac_sha256(&payload).unwrap(), &presented));
    }
    // Under the wrong secret (active now), the right signature is refused.
    let right = parse_signature_header(&format!("sha256={}", tv::s(v, "signatureHex"))).unwrap();
    assert!(!mac_eq(&b.hmac_sha256(&payload).unwrap(), &right));
    // The ticket vector: its MAC over the payload string, by the backend.
    let t = tv::get("ticket");
    let secret = tv::hex_bytes(t, "secretHex");
    let id = b.install_hmac(&SecretSlice::from(secret.clone())).unwrap();
    b.activate_hmac(&id).unwrap();
    let split = crate::protocol::ticket::split(tv::s(t, "value")).unwrap();
    assert!(mac_eq(
        &b.hmac_sha256(split.payload_b64.as_bytes()).unwrap(),
        &split.mac
    ));
    // Long and empty inputs agree with a software HMAC.
    let long = vec![0x5au8; 70_000];
    assert_eq!(b.hmac_sha256(&long).unwrap(), soft_hmac(&secret, &long));
    assert_eq!(b.hmac_sha256(b"").unwrap(), soft_hmac(&secret, b""));
}

pub fn hmac_rotation_replaces_key(b: &dyn KeyBackend) {
    let s1: Vec<u8> = (0u8..32).collect();
    let s2: Vec<u8> = (1u8..33).collect();
    let id1 = b.install_hmac(&SecretSlice::from(s1.clone())).unwrap();
    b.activate_hmac(&id1).unwrap();
    let id2 = b.install_hmac(&SecretSlice::from(s2.clone())).unwrap();
    assert_ne!(id1, id2);
    // Installing does not switch.
    assert_eq!(b.hmac_sha256(b"x").unwrap(), soft_hmac(&s1, b"x"));
    b.activate_hmac(&id2).unwrap();
    assert_eq!(b.hmac_sha256(b"x").unwrap(), soft_hmac(&s2, b"x"));
    assert!(b.destroy_hmac_except(Some(&id2)).unwrap() >= 1);
    assert_eq!(b.hmac_sha256(b"x").unwrap(), soft_hmac(&s2, b"x"));
    assert_eq!(b.activate_hmac(&id1), Err(KeyError::NoHmacKey));
    // Short secrets are refused (SoftHSM's minimum for SHA256-HMAC is 32 bytes).
    assert_eq!(
        b.install_hmac(&SecretSlice::from(vec![1u8; 16])),
        Err(KeyError::InvalidInput)
    );
}

pub fn seal_open_roundtrip_and_tamper(b: &dyn KeyBackend) {
    let sealed = b.seal(b"aad-1", b"ghp_secret").unwrap();
    assert_eq!(sealed.len(), IV_LEN + 10 + TAG_LEN);
    assert_eq!(b.open(b"aad-1", &sealed).unwrap().as_slice(), b"ghp_secret");
    assert_eq!(b.open(b"aad-2", &sealed), Err(KeyError::DecryptFailed));
    let mut t = sealed.clone();
    let last = t.len() - 1;
    t[last] ^= 1;
    assert_eq!(b.open(b"aad-1", &t), Err(KeyError::DecryptFailed));
    let mut t = sealed.clone();
    t[IV_LEN] ^= 1;
    assert_eq!(b.open(b"aad-1", &t), Err(KeyError::DecryptFailed));
    // Truncated input never reaches the device.
    assert_eq!(
        b.open(b"aad-1", &sealed[..20]),
        Err(KeyError::DecryptFailed)
    );
    // Fresh IV per seal.
    let again = b.seal(b"aad-1", b"ghp_secret").unwrap();
    assert_ne!(sealed[..IV_LEN], again[..IV_LEN]);
    // Empty plaintext works.
    let e = b.seal(b"", b"").unwrap();
    assert_eq!(b.open(b"", &e).unwrap().len(), 0);
}

pub fn reports_health(b: &dyn KeyBackend) {
    b.probe().unwrap();
    assert!(b.healthy());
    assert!(b.aes_key_present());
}

pub fn concurrent_use(b: &(dyn KeyBackend + Sync)) {
    std::thread::scope(|s| {
        for t in 0..4u8 {
            s.spawn(move || {
                for i in 0..50u8 {
                    let msg = [t, i];
                    let sealed = b.seal(&[t], &msg).unwrap();
                    assert_eq!(b.open(&[t], &sealed).unwrap().as_slice(), &msg);
                    b.hmac_sha256(&msg).unwrap();
                }
            });
        }
    });
}

/// Key generations (`rotate-key`): a second AES key next to the first,
/// each opening only its own blobs, re-sealing from one to the other, and
/// destroying the first without touching the second.
pub fn aes_generations(b: &dyn KeyBackend) {
    assert_eq!(b.aes_generations().unwrap(), vec![FIRST_AES_GEN]);
    let old = b.seal_with(1, b"aad", b"under-1").unwrap();
    assert_eq!(b.open_with(2, b"aad", &old), Err(KeyError::NoAesKey));
    assert_eq!(b.seal_with(2, b"aad", b"x"), Err(KeyError::NoAesKey));
    assert!(b.create_aes(2).unwrap());
    assert!(!b.create_aes(2).unwrap(), "creating twice keeps the key");
    assert_eq!(b.aes_generations().unwrap(), vec![1, 2]);
    let new = b.seal_with(2, b"aad", b"under-2").unwrap();
    assert_eq!(b.open_with(2, b"aad", &new).unwrap().as_slice(), b"under-2");
    // Each key opens only its own blobs.
    assert_eq!(b.open_with(1, b"aad", &new), Err(KeyError::DecryptFailed));
    assert_eq!(b.open_with(2, b"aad", &old), Err(KeyError::DecryptFailed));
    // A bare device reads generation 1 only: a blob under 2 needs its generation.
    assert_eq!(b.open(b"aad", &new), Err(KeyError::DecryptFailed));
    assert_eq!(reseal_blob(b, 1, b"aad", &old).unwrap(), None);
    let moved = reseal_blob(b, 2, b"aad", &old).unwrap().unwrap();
    assert_eq!(
        b.open_with(2, b"aad", &moved).unwrap().as_slice(),
        b"under-1"
    );
    b.destroy_aes(1).unwrap();
    b.destroy_aes(1).unwrap();
    assert_eq!(b.aes_generations().unwrap(), vec![2]);
    assert_eq!(b.open_with(1, b"aad", &old), Err(KeyError::NoAesKey));
    assert_eq!(b.seal_with(1, b"aad", b"x"), Err(KeyError::NoAesKey));
    assert!(b.aes_key_present());
    b.forget_aes_except(&[2]);
    assert_eq!(
        b.open_with(2, b"aad", &moved).unwrap().as_slice(),
        b"under-1"
    );
    assert!(b.healthy());
}

pub fn run_all(b: &(dyn KeyBackend + Sync)) {
    reports_health(b);
    random_is_random(b);
    hmac_matches_spec_vector(b);
    hmac_rotation_replaces_key(b);
    seal_open_roundtrip_and_tamper(b);
    concurrent_use(b);
    otp_matches_rfc6238(b);
    // Last: it retires generation 1.
    aes_generations(b);
}

/// RFC 6238 through the device, when the backend holds seeds; identical to
/// the software path. Returns whether the device path was exercised.
pub fn otp_matches_rfc6238(b: &dyn KeyBackend) -> bool {
    use crate::custody::totp::{base32_decode, code_software, truncate, Params};
    let vectors = spec_totp_vectors();
    let mut exercised = false;
    for (b32, alg, digits, period, t, code) in &vectors {
        let seed = base32_decode(b32).unwrap();
        let Some(id) = b
            .install_otp(&SecretSlice::from(seed.to_vec()), *alg)
            .unwrap()
        else {
            continue;
        };
        exercised = true;
        let mac = b.otp_hmac(&id, *alg, t / period).unwrap();
        assert_eq!(truncate(&mac, *digits).as_str(), *code, "device {alg:?}");
        let p = Params {
            alg: *alg,
            digits: *digits,
            period: *period,
        };
        assert_eq!(
            code_software(&seed, &p, *t).as_str(),
            *code,
            "software {alg:?}"
        );
        assert!(b.list_otp().unwrap().contains(&id));
        b.destroy_otp(&id).unwrap();
        assert!(!b.list_otp().unwrap().contains(&id));
        assert!(b.otp_hmac(&id, *alg, 1).is_err(), "destroyed");
    }
    // A seed longer than the HMAC block (pre-hashed for the device).
    let long = vec![0x33u8; 150];
    if let Some(id) = b
        .install_otp(&SecretSlice::from(long.clone()), OtpAlg::Sha1)
        .unwrap()
    {
        let p = Params {
            alg: OtpAlg::Sha1,
            digits: 8,
            period: 30,
        };
        assert_eq!(
            truncate(&b.otp_hmac(&id, OtpAlg::Sha1, 1000).unwrap(), 8),
            code_software(&long, &p, 30_000)
        );
        b.destroy_otp(&id).unwrap();
    }
    exercised
}

/// vectors.json's TOTP vectors (RFC 6238 Appendix B and the spec's extras),
/// each `(base32 seed, algorithm, digits, period, time, code)`.
pub fn spec_totp_vectors() -> Vec<(String, OtpAlg, u32, u64, u64, String)> {
    use crate::testvectors as tv;
    tv::totp()
        .into_iter()
        .map(|v| {
            let name = tv::s(v, "algorithm");
            let alg = [OtpAlg::Sha1, OtpAlg::Sha256, OtpAlg::Sha512]
                .into_iter()
                .find(|a| a.name() == name)
                .unwrap_or_else(|| panic!("vector algorithm {name}"));
            (
                tv::s(v, "secretBase32").to_string(),
                alg,
                tv::u(v, "digits") as u32,
                tv::u(v, "period"),
                tv::u(v, "time"),
                tv::s(v, "code").to_string(),
            )
        })
        .collect()
}
