//! The TPM backend on a fresh swtpm per test (killed on drop). swtpm missing
//! is a failure, never a skip.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::swtpm::{free_port_pair, start, Swtpm};
use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    tpm: Swtpm,
}

fn fixture() -> Fixture {
    assert!(
        swtpm::available(),
        "swtpm is required for this test (apt-get install swtpm swtpm-tools); it is not skipped"
    );
    let dir = tempfile::tempdir().unwrap();
    let tpm = start(&dir.path().join("swtpm"), free_port_pair().unwrap()).unwrap();
    Fixture { dir, tpm }
}

impl Fixture {
    fn settings(&self, pcrs: &[u8]) -> TpmSettings {
        TpmSettings {
            tcti: self.tpm.tcti(),
            dir: self.dir.path().join("state/tpm"),
            pcrs: pcrs.to_vec(),
        }
    }
    fn raw(&self) -> Context {
        Context::new(TctiNameConf::from_str(&self.tpm.tcti()).unwrap()).unwrap()
    }
}

#[test]
fn tpm_backend_conforms_and_holds_keys_in_locked_memory() {
    let f = fixture();
    let b = TpmBackend::open(f.settings(&[])).unwrap();
    assert!(!b.aes_key_present());
    assert_eq!(b.seal(b"a", b"x"), Err(KeyError::NoAesKey));
    assert!(b.ensure_aes_key().unwrap());
    assert!(!b.ensure_aes_key().unwrap());
    super::super::conformance::run_all(&b);
    // Seeds are sealed fields under this backend: the device path reports so.
    assert!(!super::super::conformance::otp_matches_rfc6238(&b));
    assert!(b.keys_locked());
    assert_eq!(b.kind(), "tpm");
}

/// Two processes on one TPM and blob dir (the server and `rotate-key`): a
/// generation one creates is unsealed by the other on first use; one the
/// other destroys is dropped from memory when the key ring says so.
#[test]
fn tpm_generations_cross_processes() {
    let f = fixture();
    let server = TpmBackend::open(f.settings(&[])).unwrap();
    assert!(server.ensure_aes_key().unwrap());
    let old = server.seal_with(1, b"a", b"one").unwrap();
    let cli = TpmBackend::open(f.settings(&[])).unwrap();
    assert_eq!(cli.aes_generations().unwrap(), vec![1]);
    assert!(cli.create_aes(2).unwrap());
    assert!(f.dir.path().join("state/tpm/aes-2.json").exists());
    let new = server.seal_with(2, b"a", b"two").unwrap();
    assert_eq!(cli.open_with(2, b"a", &new).unwrap().as_slice(), b"two");
    cli.destroy_aes(1).unwrap();
    assert!(!f.dir.path().join("state/tpm/aes.json").exists());
    assert_eq!(cli.open_with(1, b"a", &old), Err(KeyError::NoAesKey));
    // The server still holds its unsealed copy until told.
    assert!(server.open_with(1, b"a", &old).is_ok());
    server.forget_aes_except(&[2]);
    assert_eq!(server.open_with(1, b"a", &old), Err(KeyError::NoAesKey));
    assert_eq!(server.open_with(2, b"a", &new).unwrap().as_slice(), b"two");
    // A restart finds generation 2 alone, and `init` does not add a first key.
    let again = TpmBackend::open(f.settings(&[])).unwrap();
    assert!(!again.ensure_aes_key().unwrap());
    assert_eq!(again.aes_generations().unwrap(), vec![2]);
    assert_eq!(again.open_with(2, b"a", &new).unwrap().as_slice(), b"two");
    assert!(again.keys_locked());
}

#[test]
fn tpm_keys_survive_restart_and_leaked_handles_are_flushed() {
    let f = fixture();
    let secret: Vec<u8> = (0u8..32).collect();
    let (sealed, id, mac) = {
        let b = TpmBackend::open(f.settings(&[])).unwrap();
        b.ensure_aes_key().unwrap();
        let id = b.install_hmac(&SecretSlice::from(secret.clone())).unwrap();
        b.activate_hmac(&id).unwrap();
        (
            b.seal(b"aad", b"ghp_kept").unwrap(),
            id,
            b.hmac_sha256(b"msg").unwrap(),
        )
    };
    // The sealed blobs hold neither key in any readable form.
    for e in std::fs::read_dir(f.dir.path().join("state/tpm")).unwrap() {
        let text = std::fs::read(e.unwrap().path()).unwrap();
        let hay = String::from_utf8_lossy(&text).to_string();
        assert!(!hay.contains(&hex::encode(&secret)));
        assert!(!hay.contains(&b64().encode(&secret)));
        assert!(!text.windows(secret.len()).any(|w| w == secret.as_slice()));
    }
    // A process killed with objects loaded leaves them in the simulator's
    // 3 slots: fill them all.
    {
        let mut ctx = f.raw();
        for _ in 0..3 {
            ctx.execute_with_nullauth_session(|c| {
                c.create_primary(
                    Hierarchy::Owner,
                    primary_template()?,
                    None,
                    None,
                    None,
                    None,
                )
            })
            .unwrap();
        }
        let full = ctx.execute_with_nullauth_session(|c| {
            c.create_primary(
                Hierarchy::Owner,
                primary_template()?,
                None,
                None,
                None,
                None,
            )
        });
        assert!(full.is_err(), "the simulator should be out of object slots");
        std::mem::forget(ctx);
    }
    let b = TpmBackend::open(f.settings(&[])).unwrap();
    assert!(b.aes_key_present());
    assert_eq!(b.open(b"aad", &sealed).unwrap().as_slice(), b"ghp_kept");
    b.activate_hmac(&id).unwrap();
    assert_eq!(b.hmac_sha256(b"msg").unwrap(), mac);
    // A re-bind replaces the sealed secret: the old blob is gone.
    let id2 = b.install_hmac(&SecretSlice::from(vec![9u8; 32])).unwrap();
    b.activate_hmac(&id2).unwrap();
    assert_eq!(b.destroy_hmac_except(Some(&id2)).unwrap(), 1);
    let blobs: Vec<String> = std::fs::read_dir(f.dir.path().join("state/tpm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(blobs.contains(&format!("hmac-{}.json", id2.0)));
    assert!(!blobs.contains(&format!("hmac-{}.json", id.0)));
    drop(b);
    let b = TpmBackend::open(f.settings(&[])).unwrap();
    assert_eq!(b.activate_hmac(&id), Err(KeyError::NoHmacKey));
    b.activate_hmac(&id2).unwrap();
}

#[test]
fn tpm_pcr_policy_refuses_after_pcr_change() {
    let f = fixture();
    let b = TpmBackend::open(f.settings(&[16])).unwrap();
    b.ensure_aes_key().unwrap();
    let sealed = b.seal(b"", b"pcr-bound").unwrap();
    drop(b);
    let blob = read_blob(&f.dir.path().join("state/tpm/aes.json")).unwrap();
    assert_eq!(blob.pcrs, vec![16]);
    // Same PCR values: unseals.
    let b = TpmBackend::open(f.settings(&[16])).unwrap();
    assert_eq!(b.open(b"", &sealed).unwrap().as_slice(), b"pcr-bound");
    drop(b);
    // Extend PCR 16 (the debug PCR): the policy no longer holds.
    {
        use tss_esapi::handles::PcrHandle;
        use tss_esapi::structures::DigestValues;
        let mut ctx = f.raw();
        let mut v = DigestValues::new();
        v.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(vec![0xab; 32]).unwrap(),
        );
        ctx.execute_with_nullauth_session(|c| c.pcr_extend(PcrHandle::Pcr16, v))
            .unwrap();
    }
    match TpmBackend::open(f.settings(&[16])) {
        Err(e @ TpmSetupError::PcrChanged { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("PCR values changed") && msg.contains("[16]"),
                "{msg}"
            );
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("unsealed after a PCR change"),
    }
}

#[test]
fn tpm_blobs_from_another_tpm_are_refused_by_name() {
    let a = fixture();
    let b = TpmBackend::open(a.settings(&[])).unwrap();
    b.ensure_aes_key().unwrap();
    drop(b);
    // Another TPM (fresh simulator state: another owner seed), same blobs.
    let other = fixture();
    let mut s = a.settings(&[]);
    s.tcti = other.tpm.tcti();
    match TpmBackend::open(s) {
        Err(e @ TpmSetupError::WrongTpm(_)) => {
            assert!(e.to_string().contains("different TPM"), "{e}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened another TPM's blobs"),
    }
    // And an unreachable TPM names the TCTI.
    let mut s = a.settings(&[]);
    s.tcti = super::swtpm::tcti_for(free_port_pair().unwrap());
    match TpmBackend::open(s) {
        Err(e @ TpmSetupError::Connect { .. }) => assert!(e.to_string().contains("swtpm:host")),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened without a TPM"),
    }
}
