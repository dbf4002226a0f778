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

pub fn run_all(b: &(dyn KeyBackend + Sync)) {
    reports_health(b);
    random_is_random(b);
    hmac_matches_spec_vector(b);
    hmac_rotation_replaces_key(b);
    seal_open_roundtrip_and_tamper(b);
    concurrent_use(b);
}
