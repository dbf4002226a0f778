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

pub fn hmac_matches_spec_vector(b: &dyn KeyBackend) {
    let secret: Vec<u8> = (0u8..32).collect();
    let id = b.install_hmac(&SecretSlice::from(secret.clone())).unwrap();
    b.activate_hmac(&id).unwrap();
    let body = r#"1700000000.{"operation":"get","collection":"tokens","key":"github","requestId":"req_testfixture01"}"#;
    assert_eq!(
        hex::encode(b.hmac_sha256(body.as_bytes()).unwrap()),
        "c196ad249f0d81158ebfec10a47f7f67122de187c094332e9ae9290bc45fcdeb"
    );
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
    let vectors: &[(&str, OtpAlg, u32, u64, u64, &str)] = &[
        ("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ", OtpAlg::Sha1, 8, 30, 59, "94287082"),
        ("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZA====", OtpAlg::Sha256, 8, 30, 1111111109, "68084774"),
        ("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQGEZDGNA=", OtpAlg::Sha512, 8, 30, 20000000000, "47863826"),
        ("JBSWY3DPEHPK3PXP", OtpAlg::Sha1, 6, 30, 1700000000, "324550"),
        ("JBSWY3DPEHPK3PXP", OtpAlg::Sha256, 8, 45, 1700000000, "64158300"),
    ];
    let mut exercised = false;
    for (b32, alg, digits, period, t, code) in vectors {
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
