//! Command line: `dev`, `serve`, `init`, `register-url`, `configtest`.

pub mod backup;
pub mod dev;
pub mod doctor;
pub mod import;
pub mod rotate;

use crate::config::{Config, KeyBackendKind, Profile, DEFAULT_CONFIG_PATH};
use crate::keys::pkcs11::{find_softhsm_module, open_module, Pkcs11Backend};
use crate::keys::tpm::{TpmBackend, TpmSettings};
use crate::keys::Backend;
use crate::server::listener::{serve, ServeOptions};
use crate::server::{app, AppState, Settings};
use crate::store::{Store, META_WEBHOOK_ID};
use crate::tls::{load_tls, TlsKeySource};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use secrecy::SecretString;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "tokenvault-webhook",
    version,
    about = "Hardware-backed Token Vault webhook appliance"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Landlock sandbox (`off` only for debugging: it is logged loudly).
    #[arg(long, global = true, default_value = "on", value_parser = ["on", "off"])]
    pub landlock: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// A complete throwaway appliance in DIR (own SoftHSM token, self-signed
    /// TLS, DIR/config.toml), in the foreground. Re-running reuses DIR.
    Dev {
        #[arg(long)]
        dir: PathBuf,
        /// Listen address (default 127.0.0.1:8443, or what DIR/config.toml says).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Key backend for a new DIR: pkcs11 (a SoftHSM2 token in DIR) or
        /// tpm (an swtpm with its state in DIR). Default: what DIR/config.toml
        /// says, or pkcs11.
        #[arg(long, value_parser = ["pkcs11", "tpm"])]
        backend: Option<String>,
    },
    /// Serve HTTPS with the configured keys and store.
    Serve,
    /// Create the AES key in the HSM, the store and the webhook id (idempotent).
    Init,
    /// Print a one-time registration URL (JSON) for binding to Token Vault.
    RegisterUrl,
    /// Check the configuration file and exit.
    Configtest,
    /// Check config, key backend and keys, TLS certificate, clock, Landlock,
    /// file ownership and modes; one line per finding with its fix.
    Doctor,
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
    /// OAuth clients used by /v1/refresh-notify (works while the server runs).
    OauthClient {
        #[command(subcommand)]
        action: OauthAction,
    },
    /// The TLS certificate key in the HSM (tls.key_in_hsm = true).
    TlsKey {
        #[command(subcommand)]
        action: TlsKeyAction,
    },
    /// Write a consistent, compacted copy of the store to FILE (works while
    /// the service runs; documents stay sealed under the device's keys).
    Backup {
        #[arg(long)]
        out: PathBuf,
    },
    /// Replace the store with a backup, after checking that every document
    /// opens under the current keys. The service must be stopped; an
    /// existing store is replaced only with --force (and kept aside).
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Import a public reference webhook's stores: --from its
    /// tokenvault_store.json (keys), --kv its tokenvault_kv_store.json
    /// (collections); credentials are re-sealed under this appliance's keys.
    Import {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        kv: PathBuf,
    },
    /// Create a new AES key generation, re-seal every document, OAuth
    /// secret, bind code and ACME file under it in batches while the
    /// service runs, then destroy the old key. Re-run to resume after a crash.
    RotateKey {
        /// Show the key generations and documents per generation; change nothing.
        #[arg(long)]
        status: bool,
        /// Documents per batch (one durable write each).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Pause between batches in milliseconds (bounds the load on a busy appliance).
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
    },
    /// The appliance's own audit trail (hash-chained, head signed).
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditAction {
    /// Check every link and hash of the chain and the signature of its head.
    Verify,
    /// Print the newest events, one JSON object per line.
    Tail {
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
    },
}

#[derive(Subcommand, Debug)]
pub enum TlsKeyAction {
    /// Generate the ECDSA P-256 key in the HSM (non-extractable; an existing
    /// key is kept), then write a CSR and/or a self-signed certificate.
    Generate {
        /// Write a certificate signing request (PEM) here, for your CA.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Write a self-signed certificate (PEM) here (testing, private CAs).
        #[arg(long)]
        self_signed: Option<PathBuf>,
        /// DNS name or IP for the certificate (repeat; default: public_url's host).
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Import an existing P-256 key (PEM, PKCS#8 or SEC1) once; shred the file afterwards.
    Import {
        #[arg(long)]
        key_file: PathBuf,
    },
    /// Show the HSM's TLS key: public key fingerprint and attributes.
    Show,
}

#[derive(Subcommand, Debug)]
pub enum OauthAction {
    /// Register a client; its secret is sealed under the HSM key.
    Add {
        /// Provider name, matched case-insensitively against refreshHint.provider, then the service.
        name: String,
        #[arg(long)]
        client_id: String,
        /// File holding the client secret (mode 0600; never pass secrets in argv).
        #[arg(long)]
        client_secret_file: PathBuf,
        /// The provider's token endpoint; the only place the secret is ever sent.
        #[arg(long)]
        token_url: String,
        /// Client authentication: post (client_secret_post) or basic (client_secret_basic).
        #[arg(long, default_value = "post")]
        auth: String,
    },
    /// List registered clients (never their secrets).
    List,
    /// Remove a client.
    Remove { name: String },
}

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

pub(crate) fn read_pin_for_doctor(cfg: &Config) -> Result<()> {
    read_secret_file(&pin_source(cfg)?).map(|_| ())
}

/// Where the user PIN is read from: the systemd credential first (the
/// service), then the file (operator commands run as the service user).
fn pin_source(cfg: &Config) -> Result<PathBuf> {
    let p = cfg
        .keys
        .pkcs11
        .as_ref()
        .ok_or_else(|| anyhow!("[keys.pkcs11] missing"))?;
    if let (Some(name), Some(dir)) = (&p.pin_credential, std::env::var_os("CREDENTIALS_DIRECTORY"))
    {
        return Ok(Path::new(&dir).join(name));
    }
    if let Some(f) = &p.pin_file {
        return Ok(f.clone());
    }
    bail!("keys.pkcs11.pin_credential is set but $CREDENTIALS_DIRECTORY is not (run under systemd with LoadCredential=, or also set pin_file)")
}

pub fn open_pkcs11(cfg: &Config) -> Result<Arc<Pkcs11Backend>> {
    let p = cfg
        .keys
        .pkcs11
        .as_ref()
        .ok_or_else(|| anyhow!("[keys.pkcs11] missing"))?;
    let module = match &p.module {
        Some(m) => m.clone(),
        None => find_softhsm_module().ok_or_else(|| {
            anyhow!("no PKCS#11 module configured and SoftHSM2 not found (apt-get install softhsm2, or set keys.pkcs11.module)")
        })?,
    };
    let ctx = open_module(&module)?;
    let source = pin_source(cfg)?;
    let pin = read_secret_file(&source)?;
    let mut backend =
        Pkcs11Backend::connect(ctx, &p.token_label, pin, p.sessions, p.copy_keys_to_session)?;
    // A PIN changed on the HSM is picked up from the same source without a
    // restart (the sandbox keeps it readable).
    backend.set_pin_reader(Box::new(move || read_secret_file(&source).ok()));
    Ok(Arc::new(backend))
}

fn refuse_root(cfg: &Config) -> Result<()> {
    if crate::sandbox::is_root() && cfg.profile != Profile::Dev {
        bail!("refusing to run as root; run as the tokenvault-webhook user (profile = \"dev\" allows root for development)");
    }
    Ok(())
}

/// The configured key device, before it is erased into a [`Backend`].
pub enum Device {
    Pkcs11(Arc<Pkcs11Backend>),
    Tpm(Arc<TpmBackend>),
}

impl Device {
    pub fn backend(&self) -> Backend {
        match self {
            Device::Pkcs11(b) => b.clone(),
            Device::Tpm(b) => b.clone(),
        }
    }

    /// `init`, part 1: the AES key. Idempotent.
    pub fn ensure_aes_key(&self) -> Result<()> {
        match self {
            Device::Pkcs11(b) => {
                if b.ensure_aes_key()? {
                    tracing::info!("AES-256 key created in the HSM (sensitive, non-extractable)");
                }
            }
            Device::Tpm(b) => {
                if b.ensure_aes_key().map_err(|e| anyhow!("TPM: {e}"))? {
                    tracing::info!(dir = %b.blob_dir().display(), "AES-256 key created and sealed to the TPM");
                }
            }
        }
        Ok(())
    }
}

/// The certificate key: its PEM file, or the HSM's TLS key.
/// None in ACME mode without `key_in_hsm` (the ACME client keeps its own key).
pub fn tls_key_source(cfg: &Config, device: &Device) -> Result<Option<TlsKeySource>> {
    if cfg.tls.mode == crate::config::TlsMode::Acme && !cfg.tls.key_in_hsm {
        return Ok(None);
    }
    tls_key_source_inner(cfg, device).map(Some)
}

pub(crate) fn tls_key_source_inner(cfg: &Config, device: &Device) -> Result<TlsKeySource> {
    match (&cfg.tls.key, cfg.tls.key_in_hsm, device) {
        (_, true, Device::Pkcs11(b)) => {
            if !b.tls_key_present().map_err(|e| anyhow!("HSM: {e}"))? {
                bail!("tls.key_in_hsm is set but the token has no TLS key: run `tokenvault-webhook --config FILE tls-key generate --csr FILE` (or `tls-key import`)");
            }
            let k = crate::tls::hsm_key::HsmTlsKey::new(b.clone())
                .map_err(|e| anyhow!("HSM TLS key: {e}"))?;
            Ok(TlsKeySource::Hsm(Arc::new(k)))
        }
        (_, true, _) => bail!("tls.key_in_hsm needs the pkcs11 backend"),
        (Some(k), false, _) => Ok(TlsKeySource::File(k.clone())),
        (None, false, _) => bail!("tls.key is not set"),
    }
}

/// Where the TPM backend keeps its sealed blobs.
pub fn tpm_blob_dir(cfg: &Config) -> PathBuf {
    cfg.store.path.join("tpm")
}

/// Opens the configured backend: logs in to the token, or unseals the
/// TPM-sealed keys into locked memory.
pub fn open_device(cfg: &Config) -> Result<Device> {
    match cfg.keys.backend {
        KeyBackendKind::Pkcs11 => Ok(Device::Pkcs11(open_pkcs11(cfg)?)),
        KeyBackendKind::Tpm => {
            let t = cfg.keys.tpm.clone().unwrap_or_default();
            let b = TpmBackend::open(TpmSettings {
                tcti: t.tcti,
                dir: tpm_blob_dir(cfg),
                pcrs: t.pcrs,
            })
            .map_err(|e| anyhow!("TPM: {e}"))?;
            Ok(Device::Tpm(Arc::new(b)))
        }
    }
}

/// `init`: AES key, store, webhook id. Idempotent.
pub fn init(cfg: &Config, device: &Device) -> Result<(Store, String)> {
    device.ensure_aes_key()?;
    open_store(cfg, &device.backend())
}

/// `init`, part 2: the store and the webhook id.
pub fn open_store(cfg: &Config, backend: &Backend) -> Result<(Store, String)> {
    let store = Store::open(&cfg.store.path, cfg.store.map_size_mib << 20)?;
    let mut rnd = [0u8; 12];
    backend.fill_random(&mut rnd)?;
    let id = store.meta_get_or_init_blocking(
        META_WEBHOOK_ID,
        format!("wh_{}", hex::encode(rnd)).into_bytes(),
    )?;
    Ok((store, String::from_utf8_lossy(&id).into_owned()))
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Configtest => {
            let cfg = Config::load(&cli.config)?;
            for (what, p) in [
                ("tls.cert", Some(&cfg.tls.cert)),
                ("tls.key", cfg.tls.key.as_ref()),
            ]
            .into_iter()
            .filter_map(|(w, p)| Some((w, p?)))
            {
                if !p.exists() {
                    eprintln!("{}: warning: {what} {} does not exist yet (create it before starting the service)", cli.config.display(), p.display());
                }
            }
            if let Some(dir) = cfg.helper.socket.as_ref().and_then(|p| p.parent()) {
                if !dir.is_dir() {
                    eprintln!(
                        "{}: warning: helper.socket's directory {} does not exist yet",
                        cli.config.display(),
                        dir.display()
                    );
                }
            }
            println!(
                "{}: configuration OK (run `doctor` for keys, TLS and files)",
                cli.config.display()
            );
            Ok(())
        }
        Command::Doctor => doctor::run(&cli.config),
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Init => {
            let cfg = load_for_run(&cli.config)?;
            refuse_root(&cfg)?;
            let device = open_device(&cfg)?;
            let (_store, id) = init(&cfg, &device)?;
            println!(
                "initialised: webhook id {id}, store {}",
                cfg.store.path.display()
            );
            Ok(())
        }
        Command::RegisterUrl => {
            let cfg = load_for_run(&cli.config)?;
            refuse_root(&cfg)?;
            let store = Store::open(&cfg.store.path, cfg.store.map_size_mib << 20)?;
            let backend = crate::custody::keyring::keyring(open_device(&cfg)?.backend(), &store);
            let (reg, rec) = crate::binding::prepare(
                &backend,
                &cfg.binding.frontend_url,
                &cfg.public_url(cfg.server.listen),
                cfg.binding.code_ttl_secs,
                crate::server::now(),
            )?;
            store.put_bind_code_blocking(&reg.code, &rec)?;
            println!("{}", serde_json::to_string_pretty(&reg)?);
            Ok(())
        }
        Command::Serve => {
            let cfg = load_for_run(&cli.config)?;
            refuse_root(&cfg)?;
            let device = open_device(&cfg)?;
            let tls_key = tls_key_source(&cfg, &device)?;
            sandbox(&cfg, cfg.server.listen, cli.landlock == "on")?;
            let store = Store::open(&cfg.store.path, cfg.store.map_size_mib << 20)?;
            run_server(cfg, device.backend(), store, None, tls_key)
        }
        Command::Dev {
            dir,
            listen,
            backend,
        } => dev::run(&dir, listen, backend.as_deref(), cli.landlock == "on"),
        Command::OauthClient { action } => oauth_client(&cli.config, action),
        Command::TlsKey { action } => tls_key(&cli.config, action),
        Command::Backup { out } => backup::backup(&cli.config, &out),
        Command::Restore { from, force } => backup::restore(&cli.config, &from, force),
        Command::Import { from, kv } => import::import(&cli.config, &from, &kv),
        Command::Audit { action } => audit(&cli.config, action),
        Command::RotateKey {
            status,
            batch,
            pause_ms,
        } => rotate::run(&cli.config, status, batch, pause_ms),
    }
}

fn audit(config: &Path, action: AuditAction) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let store = Store::open(&cfg.store.path, cfg.store.map_size_mib << 20)?;
    match action {
        AuditAction::Tail { lines } => {
            for r in store.trail_tail(lines)? {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        AuditAction::Verify => {
            let report = store
                .trail_verify()
                .map_err(|e| anyhow!("audit trail BROKEN: {e}"))?;
            let signature = match &report.signed {
                None => "no signed head yet".to_string(),
                Some(s) => {
                    let backend = open_device(&cfg)?.backend();
                    let key = store
                        .meta_get(crate::store::META_HMAC_KEY_ID)?
                        .ok_or_else(|| anyhow!("the trail has a signed head but the appliance is not bound: cannot check it"))?;
                    backend.activate_hmac(&crate::keys::HmacKeyId(
                        String::from_utf8_lossy(&key).into_owned(),
                    ))?;
                    let mac =
                        backend.hmac_sha256(&crate::store::trail::head_message(s.seq, &s.hash))?;
                    let given = hex::decode(&s.mac).unwrap_or_default();
                    if !crate::protocol::signature::mac_eq(&mac, &given) {
                        bail!("audit trail BROKEN: the signature of the head (record {}) does not verify with this appliance's HMAC key (re-bound since? then it was signed with the previous key)", s.seq);
                    }
                    format!("head record {} signed and verified", s.seq)
                }
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "ok": true,
                    "records": report.records,
                    "from": report.anchor.seq + 1,
                    "to": report.head.seq,
                    "signature": signature,
                    "unsignedAfterHead": report.signed.as_ref().map_or(report.head.seq, |s| report.head.seq - s.seq),
                }))?
            );
            Ok(())
        }
    }
}

fn tls_key(config: &Path, action: TlsKeyAction) -> Result<()> {
    use crate::tls::hsm_key::{HsmSigningKey, HsmTlsKey};
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let Device::Pkcs11(b) = open_device(&cfg)? else {
        bail!("the TLS key can live in the HSM only with keys.backend = \"pkcs11\"");
    };
    match action {
        TlsKeyAction::Generate {
            csr,
            self_signed,
            names,
        } => {
            if b.generate_tls_key()? {
                eprintln!("generated an ECDSA P-256 key in the HSM (tokenvault-tls, sensitive, non-extractable)");
            } else {
                eprintln!("the HSM already holds the TLS key (tokenvault-tls); using it");
            }
            let names = if names.is_empty() {
                let u = url::Url::parse(&cfg.public_url(cfg.server.listen))?;
                vec![u.host_str().unwrap_or("localhost").to_string()]
            } else {
                names
            };
            let key = Arc::new(HsmTlsKey::new(b.clone()).map_err(|e| anyhow!("HSM TLS key: {e}"))?);
            let pair = rcgen::KeyPair::from_remote(Box::new(HsmSigningKey(key)))?;
            let mut params = rcgen::CertificateParams::new(names.clone())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, names[0].clone());
            if let Some(path) = csr {
                let req = params.serialize_request(&pair)?;
                std::fs::write(&path, req.pem()?)?;
                eprintln!(
                    "CSR for {} written to {} (signed by the HSM)",
                    names.join(", "),
                    path.display()
                );
            }
            if let Some(path) = self_signed {
                let cert = params.self_signed(&pair)?;
                std::fs::write(&path, cert.pem())?;
                eprintln!(
                    "self-signed certificate for {} written to {}",
                    names.join(", "),
                    path.display()
                );
            }
            Ok(())
        }
        TlsKeyAction::Import { key_file } => {
            use p256::pkcs8::DecodePrivateKey;
            let pem = zeroize::Zeroizing::new(
                std::fs::read_to_string(&key_file)
                    .with_context(|| format!("cannot read {}", key_file.display()))?,
            );
            let sk = p256::SecretKey::from_pkcs8_pem(&pem)
                .or_else(|_| p256::SecretKey::from_sec1_pem(&pem))
                .map_err(|_| {
                    anyhow!(
                        "{}: not a P-256 private key (PEM, PKCS#8 or SEC1)",
                        key_file.display()
                    )
                })?;
            let scalar = zeroize::Zeroizing::new(sk.to_bytes().to_vec());
            let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(
                &sk.public_key(),
                false,
            );
            b.import_tls_key(&scalar, point.as_bytes())?;
            eprintln!("imported into the HSM as tokenvault-tls (sensitive, non-extractable). Now shred {} and set tls.key_in_hsm = true", key_file.display());
            Ok(())
        }
        TlsKeyAction::Show => {
            let key = HsmTlsKey::new(b.clone())
                .map_err(|e| anyhow!("no TLS key in the HSM ({e}): run `tls-key generate`"))?;
            let (sensitive, extractable) =
                b.tls_key_attributes().map_err(|e| anyhow!("HSM: {e}"))?;
            let fp = hex::encode(ring::digest::digest(&ring::digest::SHA256, key.spki()).as_ref());
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "label": crate::keys::pkcs11::tls::TLS_LABEL,
                    "algorithm": "ECDSA P-256",
                    "spkiSha256": fp,
                    "sensitive": sensitive,
                    "extractable": extractable,
                }))?
            );
            Ok(())
        }
    }
}

fn oauth_client(config: &Path, action: OauthAction) -> Result<()> {
    use crate::broker::oauth;
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let store = Store::open(&cfg.store.path, cfg.store.map_size_mib << 20)?;
    match action {
        OauthAction::Add {
            name,
            client_id,
            client_secret_file,
            token_url,
            auth,
        } => {
            let auth = match auth.as_str() {
                "post" => oauth::ClientAuth::Post,
                "basic" => oauth::ClientAuth::Basic,
                _ => bail!("--auth must be post or basic"),
            };
            let secret = read_secret_file(&client_secret_file)?;
            let backend = crate::custody::keyring::keyring(open_device(&cfg)?.backend(), &store);
            let c = oauth::OAuthClient::new(
                &backend,
                &name,
                &client_id,
                &secret,
                &token_url,
                auth,
                cfg.profile == Profile::Dev,
            )
            .map_err(|e| anyhow!(e))?;
            oauth::save(&store, &c).map_err(|e| anyhow!(e))?;
            println!(
                "added OAuth client {} (client id {}, token URL {}, auth {:?})",
                c.name, c.client_id, c.token_url, c.auth
            );
        }
        OauthAction::List => {
            for c in oauth::all(&store) {
                println!("{}\t{}\t{}\t{:?}", c.name, c.client_id, c.token_url, c.auth);
            }
        }
        OauthAction::Remove { name } => {
            if !store.oauth_delete_blocking(oauth::key(&name))? {
                bail!("no OAuth client named {name}");
            }
            println!("removed OAuth client {}", oauth::key(&name));
        }
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

pub fn run_server(
    cfg: Config,
    backend: Backend,
    store: Store,
    listen: Option<SocketAddr>,
    tls_key: Option<TlsKeySource>,
) -> Result<()> {
    if !backend.aes_key_present() {
        bail!(
            "no AES key in the {} backend: run `tokenvault-webhook --config FILE init` first",
            backend.kind()
        );
    }
    let webhook_id = store
        .meta_get(META_WEBHOOK_ID)?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .ok_or_else(|| {
            anyhow!("store not initialised: run `tokenvault-webhook --config FILE init` first")
        })?;
    store.set_trail_bound(cfg.audit.max_share_percent, cfg.store.reserve_percent);
    // Seals follow the store's AES generation (see `rotate-key`).
    let dyn_backend = crate::custody::keyring::keyring(backend, &store);
    let bound = crate::binding::restore_active_key(&dyn_backend, &store)?;
    remove_orphan_otp_keys(&dyn_backend, &store)?;
    let (tls, acme) = match (cfg.tls.mode, &tls_key) {
        (crate::config::TlsMode::Files, Some(key)) => (load_tls(&cfg.tls.cert, key)?, None),
        (crate::config::TlsMode::Files, None) => bail!("tls.key is not set"),
        (crate::config::TlsMode::Acme, _) => {
            let a = cfg
                .tls
                .acme
                .clone()
                .ok_or_else(|| anyhow!("[tls.acme] missing"))?;
            let hsm_key = match &tls_key {
                Some(TlsKeySource::Hsm(k)) => Some(k.clone()),
                _ => None,
            };
            let acme = Arc::new(crate::tls::acme::Acme::new(
                crate::tls::acme::AcmeSettings {
                    directory_url: a.directory_url,
                    ca_bundle: a.ca_bundle,
                    email: a.email,
                    domains: a.domains,
                    dir: cfg.store.path.join("acme"),
                    cert_path: cfg.tls.cert.clone(),
                    renew_days_before: a.renew_days_before,
                    hsm_key,
                    challenge: a.challenge,
                },
                dyn_backend.clone(),
            ));
            let tls = crate::tls::TlsState::new(
                acme.initial_cert().map_err(|e| anyhow!("ACME: {e}"))?,
                true,
            )?;
            (tls, Some(acme))
        }
    };
    let listen = listen.unwrap_or(cfg.server.listen);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tvw-worker")
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let bound_addr = listener.local_addr()?;
        let dev = cfg.profile == Profile::Dev;
        let public_url = cfg.public_url(bound_addr);
        let shield = Arc::new(crate::server::shield::Shield::new(shield_settings(&cfg)));
        let state = AppState::new(
            dyn_backend,
            store.clone(),
            Settings {
                broker: crate::broker::Broker {
                    proxy: crate::broker::proxy::Proxy::new(
                        crate::broker::egress::EgressPolicy {
                            allow_loopback: cfg.proxy.allow_loopback.unwrap_or(dev),
                            deny_hosts: cfg.proxy.deny_hosts.clone(),
                            deny_cidrs: cfg.proxy.deny_cidrs.clone(),
                            allow_cidrs: cfg.proxy.allow_cidrs.clone(),
                        },
                        cfg.proxy.require_config.unwrap_or(!dev),
                        Duration::from_secs(cfg.proxy.timeout_secs.unwrap_or(30)),
                        cfg.proxy.max_response_bytes.unwrap_or(32 << 20),
                    )
                    .map_err(|e| anyhow!("proxy HTTP client: {e}"))?,
                    refresher: Arc::new(
                        crate::broker::refresh::Refresher::new()
                            .map_err(|e| anyhow!("refresh HTTP client: {e}"))?,
                    ),
                },
                direct: crate::server::direct::DirectSettings {
                    allowed_origins: cfg.direct_access.allowed_origins.clone(),
                    deny: cfg.direct_access.deny_cidrs.clone(),
                    trusted_proxies: cfg.direct_access.trusted_proxies.clone(),
                    limiter: crate::server::direct::RateLimiter::new(
                        cfg.direct_access.rate_limit_per_minute,
                        cfg.direct_access.rate_limit_burst,
                    ),
                },
                minter: crate::custody::gcp::Minter::new(cfg.profile == Profile::Dev)
                    .map_err(|e| anyhow!("HTTP client: {e}"))?,
                public_url: public_url.clone(),
                frontend_url: cfg.binding.frontend_url.clone(),
                code_ttl_secs: cfg.binding.code_ttl_secs,
                body_limit: cfg.server.body_limit_bytes,
                webhook_id: webhook_id.clone(),
                shield: shield.clone(),
                helpers_on_public: dev,
            },
            bound,
        );
        if dev {
            tracing::info!("dev: /v1/register-url and /bind are also served on this listener, to loopback peers without forwarding headers");
        }
        serve_helpers(&cfg, &state).await?;
        {
            // Failing unauthenticated requests beyond the log budget: one
            // summary line a minute instead of a line each.
            let shield = shield.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let minute = shield.take_minute();
                    if minute.is_empty() {
                        continue;
                    }
                    let total: u64 = minute.values().sum();
                    let by: Vec<String> = minute
                        .iter()
                        .map(|((route, status), n)| format!("{route} {status}: {n}"))
                        .collect();
                    tracing::warn!(total, by = %by.join(", "), "failing unauthenticated requests in the last minute");
                }
            });
        }
        if let Some(addr) = cfg.metrics.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
            let at = l.local_addr()?;
            let router = crate::server::metrics::router(state.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, router).await {
                    tracing::error!(error = %e, "metrics listener stopped");
                }
            });
            tracing::info!(%at, "metrics: Prometheus text at http://{at}/metrics");
            eprintln!("METRICS http://{at}/metrics");
        }
        {
            // The audit trail: sign the head, apply retention.
            let (store, backend) = (store.clone(), state.backend.clone());
            let every = Duration::from_secs(cfg.audit.sign_every_secs.max(1));
            let keep = i64::from(cfg.audit.retention_days) * 86_400;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let t = crate::server::now();
                    let mac = |m: &[u8]| backend.hmac_sha256(m).ok();
                    if let Err(e) = store.trail_sign_head(t, mac).await {
                        tracing::warn!(error = %e, "audit trail: signing the head failed");
                    }
                    match store.trail_prune(t - keep).await {
                        Ok(n) if n > 0 => tracing::info!(removed = n, "audit trail: retention applied"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "audit trail: retention failed"),
                    }
                }
            });
        }
        let (pruner, keys) = (store.clone(), state.backend.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                // Reading the key state drops cached copies of an AES
                // generation `rotate-key` retired, on a server that only reads.
                let _ = keys.aes_readable();
                match pruner.prune(crate::server::now()).await {
                    Ok(n) if n > 0 => tracing::debug!(removed = n, "pruned replay memory"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning failed"),
                }
            }
        });
        let opts = ServeOptions {
            cert: cfg.tls.cert.clone(),
            key: tls_key.clone(),
            handshake_timeout: Duration::from_secs(cfg.server.handshake_timeout_secs),
            header_timeout: Duration::from_secs(cfg.server.header_timeout_secs),
            idle_timeout: Duration::from_secs(cfg.server.idle_timeout_secs),
            max_connections: cfg.server.max_connections,
            max_h2_streams: cfg.server.max_h2_streams,
            shield: shield.clone(),
            reload_on_hup: cfg.tls.mode == crate::config::TlsMode::Files,
        };
        tracing::info!(webhook_id = %webhook_id, bound, "tokenvault-webhook {} serving", crate::protocol::VERSION);
        eprintln!("READY {public_url} (listening on {bound_addr})");
        crate::sandbox::notify::notify(&format!(
            "READY=1\nSTATUS=serving {public_url} ({})",
            if bound { "bound" } else { "not bound yet: run register-url" }
        ));
        if let Some(every) = crate::sandbox::notify::watchdog_interval() {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    crate::sandbox::notify::notify("WATCHDOG=1");
                }
            });
        }
        if !bound {
            let page = if dev {
                format!("https://{bound_addr}/bind")
            } else {
                cfg.helper
                    .listen
                    .map(|h| format!("http://{h}/bind"))
                    .unwrap_or_else(|| "the [helper] listener's /bind (not configured)".into())
            };
            eprintln!(
                "Not bound yet. From this machine run:\n  tokenvault-webhook --config {} register-url\nor open {page} in a browser here, then open the registrationUrl it gives.",
                cfg.source.display(),
            );
        }
        state.watch_tls(tls.clone());
        if let Some(acme) = acme {
            if let Some(addr) = cfg.tls.acme.as_ref().and_then(|a| a.http01_listen) {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} for HTTP-01"))?;
                let router = crate::tls::acme::http01_router(acme.http01_tokens());
                tracing::info!(%addr, "HTTP-01 listener");
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, router).await {
                        tracing::error!(error = %e, "HTTP-01 listener stopped");
                    }
                });
            }
            tokio::spawn(acme.run(tls.clone()));
        }
        serve(listener, tls, app(state), opts, async {
            shutdown_signal().await;
            crate::sandbox::notify::notify("STOPPING=1");
        })
        .await;
        Ok::<(), anyhow::Error>(())
    })
}

/// The hostile-network limits of `[limits]`.
pub fn shield_settings(cfg: &Config) -> crate::server::shield::ShieldSettings {
    let l = &cfg.limits;
    crate::server::shield::ShieldSettings {
        max_connections_per_ip: l.max_connections_per_ip,
        ipv6_prefix_len: l.ipv6_prefix_len,
        request_timeout: Duration::from_secs(l.request_timeout_secs),
        min_body_rate: l.min_body_bytes_per_sec,
        body_grace: Duration::from_secs(l.body_grace_secs),
        body_budget: l.body_budget_mib << 20,
        failures_per_minute: l.failures_per_minute,
        failure_burst: l.failure_burst,
        exchange_per_minute: l.exchange_per_minute,
        exchange_burst: l.exchange_burst,
        failure_log_lines_per_minute: l.failure_log_lines_per_minute,
    }
}

/// The bind helpers' own listener and/or unix socket (`[helper]`).
async fn serve_helpers(cfg: &Config, state: &AppState) -> Result<()> {
    if let Some(addr) = cfg.helper.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (helper.listen)"))?;
        let at = l.local_addr()?;
        let router = crate::server::helper_app(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, router).await {
                tracing::error!(error = %e, "helper listener stopped");
            }
        });
        tracing::info!(%at, "bind helpers: http://{at}/bind and /v1/register-url (loopback only)");
        eprintln!("HELPER http://{at}");
    }
    if let Some(path) = &cfg.helper.socket {
        use std::os::unix::fs::PermissionsExt;
        if path.exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot bind {} (helper.socket)", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let router = crate::server::helper_app(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, router).await {
                tracing::error!(error = %e, "helper socket stopped");
            }
        });
        tracing::info!(socket = %path.display(), "bind helpers on a unix socket");
        eprintln!("HELPER unix:{}", path.display());
    }
    Ok(())
}

/// Creates a directory (and parents) with mode 0700 if it does not exist.
/// The SoftHSM token directory named in a softhsm2.conf.
fn softhsm_token_dir(conf: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(conf).ok()?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "directories.tokendir")
        .map(|(_, v)| PathBuf::from(v.trim()))
}

/// System files every deployment reads: libraries (the PKCS#11 module's
/// dependencies, NSS), CA bundles, resolver configuration. Missing ones are
/// skipped (they differ between distributions).
const SYSTEM_READ_ONLY: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/etc/ssl/certs",
    "/usr/share/ca-certificates",
    "/etc/pki/tls/certs",
    "/etc/pki/ca-trust",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
];

/// The Landlock plan for this configuration.
pub fn sandbox_plan(cfg: &Config, listen: SocketAddr) -> crate::sandbox::landlock::Plan {
    let mut ro: Vec<PathBuf> = vec![cfg.source.clone()];
    // ACME keeps its certificate under the state dir (read-write below).
    let cert = Some(&cfg.tls.cert).filter(|_| cfg.tls.mode == crate::config::TlsMode::Files);
    for f in [cert, cfg.tls.key.as_ref()].into_iter().flatten() {
        if let Some(d) = f.parent() {
            if !ro.contains(&d.to_path_buf()) {
                ro.push(d.to_path_buf());
            }
        }
    }
    let mut rw = vec![cfg.store.path.clone()];
    let mut tpm_ports = Vec::new();
    if cfg.keys.backend == KeyBackendKind::Tpm {
        // Sealing a new HMAC secret (bind) reaches the TPM after start-up.
        let t = cfg.keys.tpm.clone().unwrap_or_default();
        if let Some(dev) = t.tcti.strip_prefix("device:") {
            rw.push(PathBuf::from(dev));
        } else if let Some(port) = crate::keys::tpm::swtpm::port_of(&t.tcti) {
            tpm_ports = vec![port, port.saturating_add(1)];
        }
    }
    if let Some(p) = cfg
        .keys
        .pkcs11
        .as_ref()
        .filter(|_| cfg.keys.backend == KeyBackendKind::Pkcs11)
    {
        if let Some(m) = p.module.clone().or_else(find_softhsm_module) {
            ro.push(m);
        }
        if let Ok(pin) = pin_source(cfg) {
            if pin.exists() && !ro.contains(&pin) {
                ro.push(pin);
            }
        }
        let conf = p
            .softhsm_conf
            .clone()
            .or_else(|| Some(PathBuf::from("/etc/softhsm/softhsm2.conf")).filter(|c| c.exists()));
        if let Some(conf) = conf {
            if let Some(t) = softhsm_token_dir(&conf) {
                rw.push(t);
            }
            ro.push(conf);
        }
    }
    if let Some(ca) = cfg.tls.acme.as_ref().and_then(|a| a.ca_bundle.as_ref()) {
        if cfg.tls.mode == crate::config::TlsMode::Acme {
            ro.push(ca.clone());
        }
    }
    ro.extend(cfg.sandbox.extra_read_only.iter().cloned());
    rw.extend(cfg.sandbox.extra_read_write.iter().cloned());
    // The helper socket is created (and replaced) in its directory.
    if let Some(dir) = cfg.helper.socket.as_ref().and_then(|p| p.parent()) {
        rw.push(dir.to_path_buf());
    }
    ro.extend(
        SYSTEM_READ_ONLY
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists()),
    );
    let connect_ports = match (&cfg.sandbox.connect_ports, cfg.profile) {
        (Some(ports), _) => Some(ports.clone()),
        (None, Profile::Dev) => None,
        (None, Profile::Production) => Some(vec![443]),
    }
    .map(|mut p| {
        p.extend(
            tpm_ports
                .iter()
                .filter(|t| !p.contains(t))
                .copied()
                .collect::<Vec<_>>(),
        );
        p
    });
    crate::sandbox::landlock::Plan {
        read_only: ro,
        read_write: rw,
        bind_ports: Some(listen.port()).filter(|p| *p != 0).map(|p| {
            let mut v = vec![p];
            if let Some(h) = cfg.tls.acme.as_ref().and_then(|a| a.http01_listen) {
                if cfg.tls.mode == crate::config::TlsMode::Acme {
                    v.push(h.port());
                }
            }
            if let Some(m) = cfg.metrics.listen.filter(|m| m.port() != 0) {
                v.push(m.port());
            }
            if let Some(h) = cfg.helper.listen.filter(|h| h.port() != 0) {
                v.push(h.port());
            }
            v
        }),
        connect_ports,
    }
}

/// Applies Landlock (before any thread exists) and logs the rules and the
/// self-test. `enabled = false` is for debugging and says so loudly.
pub fn sandbox(cfg: &Config, listen: SocketAddr, enabled: bool) -> Result<()> {
    crate::sandbox::notify::init();
    if !enabled || !cfg.sandbox.landlock {
        tracing::warn!(
            "LANDLOCK DISABLED ({}): the service runs without its filesystem and network sandbox",
            if enabled {
                "sandbox.landlock = false"
            } else {
                "--landlock=off"
            }
        );
        return Ok(());
    }
    // The state dir is ours to create; every other path must already exist.
    crate::fsutil::create_private_dir(&cfg.store.path)
        .with_context(|| format!("cannot create {}", cfg.store.path.display()))?;
    let plan = sandbox_plan(cfg, listen);
    match crate::sandbox::landlock::apply(&plan)? {
        None => tracing::warn!("this kernel has no Landlock: running without the sandbox"),
        Some(applied) => {
            tracing::info!(abi = applied.abi, rules = %applied.rules.join("; "), "landlock enforced");
            for line in crate::sandbox::landlock::self_test(&plan) {
                tracing::info!("{line}");
            }
        }
    }
    Ok(())
}

/// TOTP seed objects no document refers to (a crash between enrolment and
/// its write, or between an overwrite and the old key's destruction).
fn remove_orphan_otp_keys(backend: &Backend, store: &Store) -> Result<()> {
    let referenced = store.referenced_otp_keys()?;
    let mut removed = 0;
    for id in backend.list_otp()? {
        if !referenced.contains(&id) {
            backend.destroy_otp(&id)?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::warn!(removed, "removed orphaned TOTP key objects");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::REFERENCE_CONFIG;

    fn tpm_config(tcti: &str, pcrs: &str) -> Config {
        let text = REFERENCE_CONFIG
            .replace("backend = \"pkcs11\"", "backend = \"tpm\"")
            .replace(
                "tcti = \"device:/dev/tpmrm0\"",
                &format!("tcti = \"{tcti}\""),
            )
            .replace("pcrs = []", &format!("pcrs = {pcrs}"));
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn tpm_sandbox_reaches_the_tpm_and_nothing_of_softhsm() {
        let listen: SocketAddr = ([0, 0, 0, 0], 8443).into();
        let c = tpm_config("device:/dev/tpmrm0", "[7]");
        assert_eq!(c.keys.tpm.as_ref().unwrap().pcrs, vec![7]);
        let plan = sandbox_plan(&c, listen);
        assert!(plan.read_write.contains(&PathBuf::from("/dev/tpmrm0")));
        assert!(!plan
            .read_only
            .iter()
            .chain(plan.read_write.iter())
            .any(|p| p.to_string_lossy().contains("softhsm")));
        assert_eq!(plan.connect_ports, Some(vec![443]));
        // A simulator over TCP: its server and control ports, no device.
        let c = tpm_config("swtpm:host=127.0.0.1,port=2321", "[]");
        let plan = sandbox_plan(&c, listen);
        assert_eq!(plan.connect_ports, Some(vec![443, 2321, 2322]));
        assert!(!plan.read_write.contains(&PathBuf::from("/dev/tpmrm0")));
        // Bad TCTIs and PCRs are configuration errors.
        let text = REFERENCE_CONFIG.replace("pcrs = []", "pcrs = [24]");
        assert!(Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .contains("PCR 24"));
        let text = REFERENCE_CONFIG.replace("tcti = \"device:/dev/tpmrm0\"", "tcti = \"bogus\"");
        assert!(Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .contains("keys.tpm.tcti \"bogus\""));
    }
}
