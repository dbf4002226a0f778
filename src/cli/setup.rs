//! What every command does first: load the configuration, export what the
//! key libraries read from the environment, start logging, refuse root,
//! read secret files, open the store.

use crate::config::{Config, KeyBackendKind, Profile, StoreBackendKind};
use crate::store::pg::PgSettings;
use crate::store::Store;
use anyhow::{bail, Context, Result};
use secrecy::SecretString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub fn init_logging(level: &str, json: bool) {
    // tss-esapi logs every context open and close at info: keep its warnings.
    let quiet = |f: tracing_subscriber::EnvFilter| match "tss_esapi=warn".parse() {
        Ok(d) => f.add_directive(d),
        Err(_) => f,
    };
    let filter = quiet(
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
    );
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Sets what the PKCS#11 module and the TSS libraries read from the
/// environment. Must run before any thread exists.
pub fn prepare_module_env(cfg: &Config) {
    if cfg.keys.backend == KeyBackendKind::Tpm && std::env::var_os("TSS2_LOG").is_none() {
        // The TSS libraries print their own errors to stderr; ours name the
        // cause and the fix. TSS2_LOG set by the operator still wins.
        // SAFETY: called from main before the runtime or any thread starts.
        unsafe { std::env::set_var("TSS2_LOG", "all+none") };
    }
    if let Some(conf) = cfg
        .keys
        .pkcs11
        .as_ref()
        .and_then(|p| p.softhsm_conf.as_ref())
    {
        // SAFETY: called from main before the runtime or any thread starts.
        unsafe { std::env::set_var("SOFTHSM2_CONF", conf) };
    }
}

/// Reads a secret from a file no one but its owner (and group, read-only) can access.
pub fn read_secret_file(path: &Path) -> Result<SecretString> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Group read is allowed (0640 root:tokenvault-webhook for operator
    // commands run as the service user); group write and any access by
    // others are not.
    if meta.permissions().mode() & 0o027 != 0 {
        bail!(
            "{} is writable by group or accessible by others (mode {:o}); chmod 640 (or 600) it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let raw = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
    );
    let pin = raw.trim_end_matches(['\n', '\r']);
    if pin.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(SecretString::from(pin.to_string()))
}

pub fn refuse_root(cfg: &Config) -> Result<()> {
    if crate::sandbox::is_root() && cfg.profile != Profile::Dev {
        bail!("refusing to run as root; run as the tokenvault-webhook user (profile = \"dev\" allows root for development)");
    }
    Ok(())
}

/// Loads the config, exports module settings and starts logging: everything
/// that must happen before any thread exists.
pub fn load_for_run(path: &Path) -> Result<Config> {
    let cfg = Config::load(path)?;
    prepare_module_env(&cfg);
    init_logging(&cfg.log.level, cfg.log.json);
    Ok(cfg)
}

/// The configured store: LMDB in `store.path` (sized by
/// `store.map_size_mib`), or the PostgreSQL database of `[store.postgres]`,
/// whose schema must be there already (`init` makes it).
pub fn open_store(cfg: &Config) -> Result<Store> {
    open_store_as(cfg, false)
}

/// [`open_store`], creating or migrating a PostgreSQL schema when `migrate`.
pub fn open_store_as(cfg: &Config, migrate: bool) -> Result<Store> {
    match cfg.store.backend {
        StoreBackendKind::Lmdb => Ok(Store::open(&cfg.store.path, cfg.store.map_size_mib << 20)?),
        StoreBackendKind::Postgres => Ok(Store::open_postgres(&pg_settings(cfg)?, migrate)?),
    }
}

/// Where the database password is read from: its systemd credential (the
/// service), else its file (operator commands).
pub fn pg_password_source(cfg: &Config) -> Result<std::path::PathBuf> {
    let p = cfg
        .store
        .postgres
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("[store.postgres] missing"))?;
    if let (Some(name), Some(dir)) = (
        &p.password_credential,
        std::env::var_os("CREDENTIALS_DIRECTORY"),
    ) {
        return Ok(Path::new(&dir).join(name));
    }
    match &p.password_file {
        Some(f) => Ok(f.clone()),
        None => bail!("store.postgres.password_credential is set but $CREDENTIALS_DIRECTORY is not (run under systemd with LoadCredential=, or also set password_file)"),
    }
}

/// The database settings, with the password read from its source.
pub fn pg_settings(cfg: &Config) -> Result<PgSettings> {
    let p = cfg
        .store
        .postgres
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("[store.postgres] missing"))?;
    Ok(PgSettings {
        url: p.url.clone(),
        password: read_secret_file(&pg_password_source(cfg)?)?,
        ca_file: p.ca_file.clone(),
        pool_size: p.pool_size,
        capacity_bytes: (p.capacity_mib as u64) << 20,
    })
}

/// `configtest` and `doctor`: the database's connection, TLS and schema,
/// as one line each (Ok) or the problem and its fix (Err).
pub fn check_database(cfg: &Config) -> std::result::Result<Vec<String>, (String, String)> {
    use crate::store::pg::{check, SchemaState, PG_SCHEMA_VERSION};
    let settings = pg_settings(cfg).map_err(|e| {
        (
            format!("database password: {e}"),
            "set store.postgres.password_file (mode 0600) or password_credential".into(),
        )
    })?;
    let c = check(&settings).map_err(|e| {
        (
            format!("database {}: {e}", settings.url),
            "check store.postgres.url, ca_file and the password; the server must offer TLS with a certificate from that CA for the URL's host".into(),
        )
    })?;
    let mut out = vec![
        format!(
            "database {} reachable (PostgreSQL {})",
            settings.url, c.server_version
        ),
        format!(
            "database TLS {} verified against {}",
            c.tls,
            settings.ca_file.display()
        ),
    ];
    match c.schema {
        SchemaState::At(v) if v == PG_SCHEMA_VERSION => {
            out.push(format!("database schema version {v}"))
        }
        SchemaState::At(v) if v > PG_SCHEMA_VERSION => {
            return Err((
                format!(
                    "database schema version {v} is newer than this build ({PG_SCHEMA_VERSION})"
                ),
                "upgrade this node to the version the other nodes run".into(),
            ))
        }
        other => {
            return Err((
                format!("database schema {other:?} (this build: {PG_SCHEMA_VERSION})"),
                "run `tokenvault-webhook init` once (it creates or migrates the schema)".into(),
            ))
        }
    }
    Ok(out)
}
