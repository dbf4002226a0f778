//! `dev --dir DIR`: a complete throwaway appliance. Everything it creates
//! lives in DIR: a SoftHSM2 token (own config and token dir, random PINs in
//! 0600 files) or, with `--backend tpm`, an swtpm's state (the simulator is
//! started and stopped with the appliance), a self-signed certificate,
//! DIR/config.toml and the store.

use super::device::{open_device, tls_key_source};
use super::init::store_and_id;
use super::landlock::sandbox;
use super::serve::run_server;
use super::setup::{init_logging, prepare_module_env, read_secret_file};
use crate::config::{Config, KeyBackendKind};
use crate::keys::pkcs11::{find_softhsm_module, find_token, init_token, open_module};
use crate::keys::tpm::swtpm;
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

fn keys_section(backend: KeyBackendKind) -> Result<String> {
    Ok(match backend {
        KeyBackendKind::Pkcs11 => format!(
            r#"[keys]
backend = "pkcs11"

[keys.pkcs11]
token_label = "{DEV_TOKEN_LABEL}"
pin_file = "hsm/user-pin"
softhsm_conf = "hsm/softhsm2.conf"
"#
        ),
        KeyBackendKind::Tpm => format!(
            r#"[keys]
backend = "tpm"

# `dev` runs an swtpm with its state in DIR/swtpm on this port (and the next,
# its control port); it moves to a free pair if these are taken.
[keys.tpm]
tcti = "{}"
"#,
            swtpm::tcti_for(swtpm::free_port_pair()?)
        ),
    })
}

/// Where a new DIR's store lives.
pub enum DevStore {
    Lmdb,
    /// `--postgres`: a PostgreSQL database.
    Postgres(DevPostgres),
    /// `--join NODE`: NODE's database and token (another node).
    Join(std::path::PathBuf),
}

/// `dev --postgres`: the store in a PostgreSQL database.
pub struct DevPostgres {
    pub url: String,
    pub ca: std::path::PathBuf,
    pub pw: std::path::PathBuf,
}

fn store_section(pg: Option<&DevPostgres>) -> Result<String> {
    let Some(pg) = pg else {
        return Ok("[store]\npath = \"state\"\nmap_size_mib = 256\n".into());
    };
    let abs =
        |p: &Path| std::fs::canonicalize(p).with_context(|| format!("cannot read {}", p.display()));
    crate::store::pg::parse_url(&pg.url).map_err(anyhow::Error::msg)?;
    Ok(format!(
        "[store]\n# Local state (ACME, helper files); the documents live in PostgreSQL.\npath = \"state\"\nbackend = \"postgres\"\n\n[store.postgres]\nurl = {}\nca_file = {}\npassword_file = {}\n",
        toml_str(&pg.url),
        toml_str(&abs(&pg.ca)?.to_string_lossy()),
        toml_str(&abs(&pg.pw)?.to_string_lossy()),
    ))
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn dev_config(
    listen: SocketAddr,
    backend: KeyBackendKind,
    pg: Option<&DevPostgres>,
) -> Result<String> {
    let keys = keys_section(backend)?;
    let store = store_section(pg)?;
    Ok(format!(
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

{keys}
{store}
[log]
level = "info"
"#
    ))
}

/// `--join NODE`: NODE's config for another node in DIR: NODE's database
/// and token (absolute paths into NODE), this node's listener and state,
/// NODE's certificate (copied: the nodes stand behind one name).
fn join_config(dir: &Path, node: &Path, listen: SocketAddr) -> Result<()> {
    let text = std::fs::read_to_string(node.join("config.toml"))
        .with_context(|| format!("--join {}: no node there", node.display()))?;
    let cfg = Config::parse(&text).map_err(anyhow::Error::msg)?;
    if cfg.store.backend != crate::config::StoreBackendKind::Postgres {
        bail!(
            "--join {}: that node keeps its store in LMDB; nodes share a store only on PostgreSQL (make it with dev --postgres)",
            node.display()
        );
    }
    let hsm = std::fs::canonicalize(node.join("hsm"))?;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("listen = ") {
            out.push_str(&format!("listen = {}", toml_str(&listen.to_string())));
        } else {
            out.push_str(&line.replace("\"hsm/", &format!("\"{}/", hsm.display())));
        }
        out.push('\n');
    }
    write_private(&dir.join("config.toml"), out.as_bytes())?;
    std::fs::create_dir_all(dir.join("tls"))?;
    for f in ["cert.pem", "key.pem"] {
        if !dir.join("tls").join(f).exists() {
            let data = std::fs::read(node.join("tls").join(f))?;
            write_private(&dir.join("tls").join(f), &data)?;
        }
    }
    Ok(())
}

/// Creates whatever is missing in DIR. Never overwrites.
fn provision(
    dir: &Path,
    listen: SocketAddr,
    backend: KeyBackendKind,
    store: &DevStore,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let cfg = dir.join("config.toml");
    if let DevStore::Join(node) = store {
        if !cfg.exists() {
            join_config(dir, node, listen)?;
        }
        // The token is the other node's.
        return Ok(());
    }
    if !cfg.exists() {
        let pg = match store {
            DevStore::Postgres(p) => Some(p),
            _ => None,
        };
        write_private(&cfg, dev_config(listen, backend, pg)?.as_bytes())?;
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
    if backend == KeyBackendKind::Tpm {
        return Ok(());
    }
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
    Ok(())
}

/// The backend DIR was made with (its config), or the one asked for.
fn choose_backend(dir: &Path, asked: Option<&str>) -> Result<KeyBackendKind> {
    let asked = match asked {
        None => None,
        Some("pkcs11") => Some(KeyBackendKind::Pkcs11),
        Some("tpm") => Some(KeyBackendKind::Tpm),
        Some(other) => bail!("unknown --backend {other:?} (pkcs11 or tpm)"),
    };
    let cfg_path = dir.join("config.toml");
    if !cfg_path.exists() {
        return Ok(asked.unwrap_or_default());
    }
    let existing = Config::load(&cfg_path)?.keys.backend;
    match asked {
        Some(a) if a != existing => bail!(
            "{} was created with backend {:?}; use another --dir for {:?}",
            dir.display(),
            existing,
            a
        ),
        _ => Ok(existing),
    }
}

/// Starts DIR's swtpm on the configured ports, moving to a free pair (and
/// recording it in DIR/config.toml) when they are taken.
fn start_dev_swtpm(dir: &Path, cfg: &Config) -> Result<swtpm::Swtpm> {
    let tcti = cfg.keys.tpm.clone().unwrap_or_default().tcti;
    let Some(mut port) = swtpm::port_of(&tcti) else {
        bail!("dev --backend tpm expects keys.tpm.tcti = \"swtpm:host=127.0.0.1,port=N\", found {tcti:?}");
    };
    // A dev killed a moment ago: its swtpm is stopping (its guard saw the pipe close).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !swtpm::port_pair_free(port) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if !swtpm::port_pair_free(port) {
        let new = swtpm::free_port_pair()?;
        let path = dir.join("config.toml");
        let text = std::fs::read_to_string(&path)?;
        let updated = text.replace(&tcti, &swtpm::tcti_for(new));
        if updated == text {
            bail!(
                "ports {port}/{} are taken and {} could not be updated",
                port + 1,
                path.display()
            );
        }
        std::fs::write(&path, updated)?;
        tracing::warn!(
            old = port,
            new,
            "swtpm ports taken; moved (config.toml updated)"
        );
        port = new;
    }
    let tpm = swtpm::start(&dir.join("swtpm"), port).with_context(|| {
        format!(
            "swtpm for {} (is another `dev` running on this DIR?)",
            dir.display()
        )
    })?;
    tracing::info!(tcti = %tpm.tcti(), state = %dir.join("swtpm").display(), "swtpm started");
    Ok(tpm)
}

pub fn run(
    dir: &Path,
    listen: Option<SocketAddr>,
    backend: Option<&str>,
    store: DevStore,
    landlock: bool,
) -> Result<()> {
    let kind = choose_backend(dir, backend)?;
    if matches!(store, DevStore::Postgres(_)) && kind == KeyBackendKind::Tpm {
        bail!("--postgres needs the pkcs11 backend: keys sealed to one TPM cannot be shared by several nodes");
    }
    match kind {
        KeyBackendKind::Pkcs11 if find_softhsm_module().is_none() => {
            bail!("SoftHSM2 not found: apt-get install softhsm2 (or dnf install softhsm)")
        }
        KeyBackendKind::Tpm if !swtpm::available() => {
            bail!("swtpm not found: apt-get install swtpm swtpm-tools")
        }
        _ => {}
    }
    let default_listen: SocketAddr = ([127, 0, 0, 1], 8443).into();
    provision(dir, listen.unwrap_or(default_listen), kind, &store)?;
    let cfg_path = dir.join("config.toml");
    let mut cfg = Config::load(&cfg_path)?;
    prepare_module_env(&cfg);
    init_logging(&cfg.log.level, cfg.log.json);
    // Lives until the server returns; the simulator stops with it.
    let _swtpm = if kind == KeyBackendKind::Tpm {
        let t = start_dev_swtpm(dir, &cfg)?;
        cfg = Config::load(&cfg_path)?;
        Some(t)
    } else {
        None
    };
    // Initialise the token on first use.
    if let Some(p) = cfg
        .keys
        .pkcs11
        .as_ref()
        .filter(|_| kind == KeyBackendKind::Pkcs11)
    {
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
    let device = open_device(&cfg)?;
    device.ensure_aes_key()?;
    let tls_key = tls_key_source(&cfg, &device)?;
    let backend = device.backend();
    sandbox(&cfg, listen.unwrap_or(cfg.server.listen), landlock)?;
    let (store, id) = store_and_id(&cfg, &backend)?;
    eprintln!(
        "tokenvault-webhook dev: {} (webhook id {id})\n  config: {}\n  bind:   tokenvault-webhook --config {} register-url",
        dir.display(),
        cfg_path.display(),
        cfg_path.display()
    );
    run_server(cfg, backend, store, listen, tls_key)
}
