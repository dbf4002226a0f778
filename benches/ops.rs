//! Per-operation micro-benchmarks (criterion) on real parts: a fresh SoftHSM2
//! token and a fresh swtpm in a temp dir.
//!
//! - HMAC-SHA256 and AES-256-GCM seal/open: SoftHSM2 with the token key,
//!   SoftHSM2 with a session-object copy of it (the default), and the TPM
//!   backend (keys unsealed into locked memory, RustCrypto).
//! - TOTP codes: HMAC of the counter under the seed's own key object in
//!   SoftHSM2, vs a sealed seed opened then computed in software (the TPM
//!   backend's path and the fallback), vs software from a seed in memory.
//! - Ticket verification: split, HMAC in the backend, claims, replay lookup
//!   in a real LMDB store (no write: the nonce is burnt by `consume`).
//! - Start and bind: backend open (login and session copies / primary key
//!   and unseal), installing an HMAC secret.
//! - The zeroizing allocator: alloc + write + free vs the system allocator.
//!
//! `cargo bench --bench ops` (add `-- --quick` for a fast pass, or a name
//! filter such as `-- hmac`). Figures and the machine: BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use base64::Engine;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use secrecy::{SecretSlice, SecretString};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenvault_webhook::custody::ticket;
use tokenvault_webhook::custody::totp::{code_device, code_software, Params};
use tokenvault_webhook::keys::pkcs11::{
    find_softhsm_module, init_token, open_module, Pkcs11Backend,
};
use tokenvault_webhook::keys::tpm::{swtpm, TpmBackend, TpmSettings};
use tokenvault_webhook::keys::{Backend, KeyBackendBase, MacKeys, OtpAlg};
use tokenvault_webhook::sandbox::zalloc::ZeroizingAlloc;
use tokenvault_webhook::store::Store;

const PIN: &str = "user-pin-1234";

struct Parts {
    _tmp: tempfile::TempDir,
    ctx: cryptoki::context::Pkcs11,
    /// SoftHSM2, keys copied into session objects (the default).
    hsm: Backend,
    /// SoftHSM2, every operation under the token object itself.
    hsm_token: Backend,
    tpm: Backend,
    tpm_settings: TpmSettings,
    _swtpm: swtpm::Swtpm,
    store: Store,
    secret: SecretSlice<u8>,
}

fn softhsm(dir: &Path) -> cryptoki::context::Pkcs11 {
    let module = find_softhsm_module().expect("SoftHSM2 required (apt-get install softhsm2)");
    let conf = dir.join("softhsm2.conf");
    std::fs::create_dir(dir.join("tokens")).unwrap();
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
    )
    .unwrap();
    // SAFETY: before any other thread exists and before the module loads.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let ctx = open_module(&module).unwrap();
    init_token(
        &ctx,
        "bench",
        &SecretString::from("so-pin-1234"),
        &SecretString::from(PIN),
    )
    .unwrap();
    ctx
}

fn pkcs11(ctx: &cryptoki::context::Pkcs11, copy_to_session: bool) -> Pkcs11Backend {
    Pkcs11Backend::connect(
        ctx.clone(),
        "bench",
        SecretString::from(PIN),
        4,
        copy_to_session,
    )
    .unwrap()
}

fn parts() -> Parts {
    let tmp = tempfile::tempdir().unwrap();
    let secret = SecretSlice::from(vec![7u8; 32]);
    let ctx = softhsm(tmp.path());
    let hsm = pkcs11(&ctx, true);
    hsm.ensure_aes_key().unwrap();
    let id = hsm.install_hmac(&secret).unwrap();
    hsm.activate_hmac(&id).unwrap();
    let hsm_token = pkcs11(&ctx, false);
    hsm_token.ensure_aes_key().unwrap();
    hsm_token.activate_hmac(&id).unwrap();

    let sw = swtpm::start(&tmp.path().join("swtpm"), swtpm::free_port_pair().unwrap()).unwrap();
    let tpm_settings = TpmSettings {
        tcti: sw.tcti(),
        dir: tmp.path().join("tpm"),
        pcrs: vec![],
    };
    let tpm = TpmBackend::open(tpm_settings.clone()).unwrap();
    tpm.ensure_aes_key().unwrap();
    let id = tpm.install_hmac(&secret).unwrap();
    tpm.activate_hmac(&id).unwrap();

    let store = Store::open(&tmp.path().join("state"), 64 << 20).unwrap();
    Parts {
        ctx,
        hsm: Arc::new(hsm),
        hsm_token: Arc::new(hsm_token),
        tpm: Arc::new(tpm),
        tpm_settings,
        _swtpm: sw,
        store,
        secret,
        _tmp: tmp,
    }
}

fn backends(p: &Parts) -> [(&'static str, &Backend); 3] {
    [
        ("softhsm-session-copy", &p.hsm),
        ("softhsm-token-key", &p.hsm_token),
        ("tpm-unsealed", &p.tpm),
    ]
}

fn keys(c: &mut Criterion, p: &Parts) {
    let msg = [0x5au8; 256];
    let mut g = c.benchmark_group("hmac_sha256_256B");
    for (name, b) in backends(p) {
        g.bench_function(name, |x| x.iter(|| black_box(b.hmac_sha256(&msg).unwrap())));
    }
    g.finish();
    let mut g = c.benchmark_group("aes_gcm_seal_64B");
    for (name, b) in backends(p) {
        g.bench_function(name, |x| {
            x.iter(|| black_box(b.seal(b"aad", &msg[..64]).unwrap()))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("aes_gcm_open_64B");
    for (name, b) in backends(p) {
        let sealed = b.seal(b"aad", &msg[..64]).unwrap();
        g.bench_function(name, |x| {
            x.iter(|| black_box(b.open(b"aad", &sealed).unwrap()))
        });
    }
    g.finish();
}

fn totp(c: &mut Criterion, p: &Parts) {
    let seed = b"12345678901234567890";
    let params = Params::default();
    let now = 1_700_000_000u64;
    let id = p
        .hsm
        .install_otp(&SecretSlice::from(seed.to_vec()), OtpAlg::Sha1)
        .unwrap()
        .expect("SoftHSM2 offers CKM_SHA_1_HMAC");
    let mut g = c.benchmark_group("totp_code_sha1");
    g.bench_function("softhsm-seed-key-object", |x| {
        x.iter(|| black_box(code_device(&p.hsm, &id, &params, now).unwrap()))
    });
    for (name, b) in [("softhsm", &p.hsm), ("tpm", &p.tpm)] {
        let sealed = b.seal(b"totp", seed).unwrap();
        g.bench_function(format!("{name}-sealed-seed-then-software"), |x| {
            x.iter(|| {
                let s = b.open(b"totp", &sealed).unwrap();
                black_box(code_software(&s, &params, now))
            })
        });
    }
    g.bench_function("software-seed-in-memory", |x| {
        x.iter(|| black_box(code_software(seed, &params, now)))
    });
    g.finish();
}

fn tickets(c: &mut Criterion, p: &Parts) {
    let now = 1_800_000_000i64;
    let claims = serde_json::json!({
        "sub": "user-1", "svc": "github", "pur": "credential",
        "iat": now, "exp": now + 60, "nonce": "n0nce-bench-0001",
    });
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut g = c.benchmark_group("ticket_verify");
    for (name, b) in backends(p) {
        let raw = format!(
            "{payload}.{}",
            hex::encode(b.hmac_sha256(payload.as_bytes()).unwrap())
        );
        g.bench_function(name, |x| {
            x.iter(|| {
                black_box(
                    ticket::verify(b, &p.store, &raw, &["credential"], "github", now).unwrap(),
                )
            })
        });
    }
    g.finish();
}

fn lifecycle(c: &mut Criterion, p: &Parts) {
    let mut g = c.benchmark_group("start");
    g.sample_size(10);
    g.bench_function("softhsm-connect-login-copy-keys", |x| {
        x.iter_custom(|n| {
            let mut t = Duration::ZERO;
            for _ in 0..n {
                let s = Instant::now();
                let b = pkcs11(&p.ctx, true);
                b.ensure_aes_key().unwrap();
                b.probe().unwrap();
                t += s.elapsed();
                drop(b);
            }
            t
        })
    });
    g.bench_function("tpm-primary-and-unseal", |x| {
        x.iter_custom(|n| {
            let mut t = Duration::ZERO;
            for _ in 0..n {
                let s = Instant::now();
                let b = TpmBackend::open(p.tpm_settings.clone()).unwrap();
                t += s.elapsed();
                drop(b);
            }
            t
        })
    });
    g.finish();
    let mut g = c.benchmark_group("bind_install_hmac");
    g.sample_size(10);
    for (name, b) in [("softhsm", &p.hsm), ("tpm", &p.tpm)] {
        g.bench_function(name, |x| {
            x.iter_custom(|n| {
                let mut t = Duration::ZERO;
                for _ in 0..n {
                    let s = Instant::now();
                    let id = b.install_hmac(&p.secret).unwrap();
                    t += s.elapsed();
                    // Keep the token small: drop every key but the new one.
                    b.activate_hmac(&id).unwrap();
                    b.destroy_hmac_except(Some(&id)).unwrap();
                }
                t
            })
        });
    }
    g.finish();
}

fn alloc_cycle<A: GlobalAlloc>(a: &A, layout: Layout) {
    // SAFETY: the layout is non-zero-sized; the block is written then freed.
    unsafe {
        let ptr = a.alloc(layout);
        assert!(!ptr.is_null());
        std::ptr::write_bytes(ptr, 0xa5, layout.size());
        black_box(ptr);
        a.dealloc(ptr, layout);
    }
}

fn allocator(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_write_free");
    for size in [32usize, 256, 4096, 32 * 1024, 256 * 1024] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        g.bench_with_input(BenchmarkId::new("system", size), &layout, |x, l| {
            x.iter(|| alloc_cycle(&System, *l))
        });
        g.bench_with_input(BenchmarkId::new("zeroizing", size), &layout, |x, l| {
            x.iter(|| alloc_cycle(&ZeroizingAlloc::system(), *l))
        });
    }
    g.finish();
}

fn all(c: &mut Criterion) {
    let p = parts();
    keys(c, &p);
    totp(c, &p);
    tickets(c, &p);
    lifecycle(c, &p);
    allocator(c);
}

criterion_group!(benches, all);
criterion_main!(benches);
