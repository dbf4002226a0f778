//! Per-operation cost of the two key backends, measured on real parts: a
//! fresh SoftHSM2 token (PKCS#11, keys as session-object copies) and a fresh
//! swtpm (keys unsealed into locked memory, software HMAC/AES-GCM).
//! `cargo bench --bench backends` prints a Markdown table for BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use secrecy::{SecretSlice, SecretString};
use std::time::Instant;
use tokenvault_webhook::keys::pkcs11::{
    find_softhsm_module, init_token, open_module, Pkcs11Backend,
};
use tokenvault_webhook::keys::tpm::{swtpm, TpmBackend, TpmSettings};
use tokenvault_webhook::keys::{KeyBackend, MacKeys};

/// Median of `rounds` timings of `iters` calls, in µs per call.
fn per_op(iters: u32, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() * 1e6 / iters as f64
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn once(mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e6
}

fn ops(b: &dyn KeyBackend) -> [f64; 3] {
    let msg = [0x5au8; 256];
    let sealed = b.seal(b"aad", &msg[..64]).unwrap();
    [
        per_op(2000, || {
            std::hint::black_box(b.hmac_sha256(&msg).unwrap());
        }),
        per_op(2000, || {
            std::hint::black_box(b.seal(b"aad", &msg[..64]).unwrap());
        }),
        per_op(2000, || {
            std::hint::black_box(b.open(b"aad", &sealed).unwrap());
        }),
    ]
}

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = SecretSlice::from(vec![7u8; 32]);

    // SoftHSM2: own config and token dir.
    let module = find_softhsm_module().expect("SoftHSM2 required (apt-get install softhsm2)");
    let conf = tmp.path().join("softhsm2.conf");
    std::fs::create_dir(tmp.path().join("tokens")).unwrap();
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tmp.path().join("tokens").display()
        ),
    )
    .unwrap();
    // SAFETY: single-threaded here, before the module loads.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
    let ctx = open_module(&module).unwrap();
    init_token(
        &ctx,
        "bench",
        &SecretString::from("so-pin-1234"),
        &SecretString::from("user-pin-1234"),
    )
    .unwrap();
    let mut hsm = None;
    let hsm_start = once(|| {
        let b = Pkcs11Backend::connect(
            ctx.clone(),
            "bench",
            SecretString::from("user-pin-1234"),
            4,
            true,
        )
        .unwrap();
        b.ensure_aes_key().unwrap();
        hsm = Some(b);
    });
    let hsm = hsm.unwrap();
    let hsm_install = once(|| {
        let id = hsm.install_hmac(&secret).unwrap();
        hsm.activate_hmac(&id).unwrap();
    });
    let hsm_ops = ops(&hsm);

    // swtpm: keys sealed to it, then a restart-equivalent open (unseal).
    let tpm = swtpm::start(&tmp.path().join("swtpm"), swtpm::free_port_pair().unwrap()).unwrap();
    let settings = TpmSettings {
        tcti: tpm.tcti(),
        dir: tmp.path().join("tpm"),
        pcrs: vec![],
    };
    let first = TpmBackend::open(settings.clone()).unwrap();
    let tpm_init = once(|| {
        first.ensure_aes_key().unwrap();
    });
    let tpm_install = once(|| {
        let id = first.install_hmac(&secret).unwrap();
        first.activate_hmac(&id).unwrap();
    });
    drop(first);
    let mut tb = None;
    let tpm_start = once(|| tb = Some(TpmBackend::open(settings.clone()).unwrap()));
    let tb = tb.unwrap();
    let id = std::fs::read_dir(tmp.path().join("tpm"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("hmac-")?
                .strip_suffix(".json")
                .map(String::from)
        })
        .next()
        .unwrap();
    tb.activate_hmac(&tokenvault_webhook::keys::HmacKeyId(id))
        .unwrap();
    let tpm_ops = ops(&tb);

    println!("| operation | SoftHSM2 (PKCS#11) | swtpm (TPM 2.0) |");
    println!("|---|---|---|");
    let names = [
        "HMAC-SHA256, 256 B",
        "AES-256-GCM seal, 64 B",
        "AES-256-GCM open, 64 B",
    ];
    for (i, n) in names.iter().enumerate() {
        println!("| {n} | {:.2} µs | {:.2} µs |", hsm_ops[i], tpm_ops[i]);
    }
    let ms = |us: f64| format!("{:.1} ms", us / 1000.0);
    println!(
        "| start: open + keys ready | {} (login, session copies) | {} (primary + unseal AES and HMAC) |",
        ms(hsm_start),
        ms(tpm_start)
    );
    println!(
        "| init: create AES key | (in start) | {} (seal to TPM) |",
        ms(tpm_init)
    );
    println!(
        "| bind: install HMAC key | {} (C_CreateObject + copy) | {} (seal to TPM, write blob) |",
        ms(hsm_install),
        ms(tpm_install)
    );
}
