//! `dev --dir DIR`: a complete throwaway appliance. Everything it creates
//! lives in DIR: a SoftHSM2 token (own config and token dir, random PINs in
//! 0600 files), a self-signed certificate, DIR/config.toml and the store.

use super::{
    ensure_keys, init_logging, open_pkcs11, open_store, prepare_module_env, read_secret_file,
    run_server,
};
use crate::config::Config;
use crate::keys::pkcs11::{find_softhsm_module, find_token, init_token, open_module};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

const SOFTHSM_TEMPLATE: &str = include_str!("../../hsm-fixtures/softhsm2.conf.in");
pub const DEV_TOKEN_LABEL: &str = "tokenvault-dev";

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

fn random_pin() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| anyhow::anyhow!("OS RNG: {e}"))?;
    Ok(hex::encode(b))
}

fn dev_config(listen: SocketAddr) -> String {
    format!(
        r#"# Written by `tokenvault-webhook dev`: development defaults.
# A normal config: `serve`, `init`, `register-url` and `configtest` accept it.
# See packaging/config.reference.toml for every key.
version = 1
profile = "dev"

[server]
listen = "{listen}"

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"

[keys]
backend = "pkcs11"

[keys.pkcs11]
token_label = "{DEV_TOKEN_LABEL}"
pin_file = "hsm/user-pin"
softhsm_conf = "hsm/softhsm2.conf"

[store]
path = "state"
map_size_mib = 256

[log]
level = "info"
"#
    )
}

/// Creates whatever is missing in DIR. Never overwrites.
fn provision(dir: &Path, listen: SocketAddr) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let hsm = dir.join("hsm");
    std::fs::create_dir_all(hsm.join("tokens"))?;
    std::fs::set_permissions(&hsm, std::fs::Permissions::from_mode(0o700))?;
    let conf = hsm.join("softhsm2.conf");
    if !conf.exists() {
        let tokendir = std::fs::canonicalize(hsm.join("tokens"))?;
        let text = SOFTHSM_TEMPLATE.replace("@TOKENDIR@", &tokendir.to_string_lossy());
        write_private(&conf, text.as_bytes())?;
    }
    for pin in ["user-pin", "so-pin"] {
        if !hsm.join(pin).exists() {
            write_private(&hsm.join(pin), random_pin()?.as_bytes())?;
        }
    }
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls)?;
    if !tls.join("cert.pem").exists() || !tls.join("key.pem").exists() {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        let _ = std::fs::remove_file(tls.join("cert.pem"));
        let _ = std::fs::remove_file(tls.join("key.pem"));
        write_private(&tls.join("key.pem"), ck.key_pair.serialize_pem().as_bytes())?;
        std::fs::write(tls.join("cert.pem"), ck.cert.pem())?;
    }
    let cfg = dir.join("config.toml");
    if !cfg.exists() {
        write_private(&cfg, dev_config(listen).as_bytes())?;
    }
    Ok(())
}

pub fn run(dir: &Path, listen: Option<SocketAddr>, backend: &str, landlock: bool) -> Result<()> {
    if backend != "pkcs11" && backend != "softhsm" {
        bail!("unknown --backend {backend:?}; this build supports pkcs11 (SoftHSM2)");
    }
    if find_softhsm_module().is_none() {
        bail!("SoftHSM2 not found: apt-get install softhsm2 (or dnf install softhsm)");
    }
    let default_listen: SocketAddr = ([127, 0, 0, 1], 8443).into();
    provision(dir, listen.unwrap_or(default_listen))?;
    let cfg_path = dir.join("config.toml");
    let cfg = Config::load(&cfg_path)?;
    prepare_module_env(&cfg);
    init_logging(&cfg.log.level, cfg.log.json);
    // Initialise the token on first use.
    if let Some(p) = &cfg.keys.pkcs11 {
        let module = p
            .module
            .clone()
            .or_else(find_softhsm_module)
            .context("SoftHSM2 module")?;
        let ctx = open_module(&module)?;
        if find_token(&ctx, &p.token_label)?.is_none() {
            let so = read_secret_file(&dir.join("hsm/so-pin"))?;
            let user = read_secret_file(&dir.join("hsm/user-pin"))?;
            init_token(&ctx, &p.token_label, &so, &user)?;
            tracing::info!(label = %p.token_label, "SoftHSM2 token created in {}", dir.join("hsm/tokens").display());
        }
    }
    let backend = open_pkcs11(&cfg)?;
    ensure_keys(&backend)?;
    super::sandbox(&cfg, listen.unwrap_or(cfg.server.listen), landlock)?;
    let (store, id) = open_store(&cfg, &backend)?;
    eprintln!(
        "tokenvault-webhook dev: {} (webhook id {id})\n  config: {}\n  bind:   tokenvault-webhook --config {} register-url",
        dir.display(),
        cfg_path.display(),
        cfg_path.display()
    );
    run_server(cfg, backend, store, listen)
}
