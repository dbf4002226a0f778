//! The command line: the clap tree and the dispatch. Each command lives in
//! its own file; `setup` and `device` hold what several commands share.

pub mod audit;
pub mod backup;
pub mod configtest;
pub mod dev;
pub mod device;
pub mod doctor;
pub mod import;
pub mod init;
pub mod landlock;
pub mod oauth_client;
pub mod policy;
pub mod register_url;
pub mod rotate;
pub mod serve;
pub mod setup;
pub mod tls_key;

pub use device::{open_device, Device};
pub use setup::load_for_run;

use crate::config::DEFAULT_CONFIG_PATH;
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

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
        /// For a new DIR: keep the store in this PostgreSQL database
        /// (postgres://USER@HOST:PORT/DB) instead of LMDB in DIR; needs
        /// --postgres-ca and --postgres-password-file.
        #[arg(long, requires_all = ["postgres_ca", "postgres_password_file"])]
        postgres: Option<String>,
        /// The CA the database's certificate chains to.
        #[arg(long)]
        postgres_ca: Option<PathBuf>,
        /// File holding the database password (mode 0600).
        #[arg(long)]
        postgres_password_file: Option<PathBuf>,
        /// For a new DIR: another node of the appliance in JOIN (a DIR made
        /// with --postgres): the same database and HSM token, its own
        /// listener and state.
        #[arg(long, conflicts_with_all = ["postgres", "backend"])]
        join: Option<PathBuf>,
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
    /// The owner's rules for a service, enforced on every use; no signed
    /// request can read or change them.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Approve a pending use (see `approvals list`): once, or for more uses
    /// or minutes (a standing approval).
    Approve {
        id: String,
        /// Uses this approval allows.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Minutes it stays usable (default: policy.approval_ttl_secs).
        #[arg(long)]
        minutes: Option<i64>,
    },
    /// Deny a pending use.
    Deny { id: String },
    /// Approvals asked for, given, denied or expired.
    Approvals {
        #[command(subcommand)]
        action: ApprovalsAction,
    },
    /// The appliance's own audit trail (hash-chained, head signed).
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyAction {
    /// Set SERVICE's rules (replacing any it had). With no rule given, the
    /// policy allows everything (and is removed).
    Set {
        service: String,
        /// Each use needs `approve ID` by the owner.
        #[arg(long)]
        approval: bool,
        /// Only this agent (a ticket's aid or sub; repeat).
        #[arg(long = "agent")]
        agents: Vec<String>,
        /// At most N uses per agent: N/minute or N/hour.
        #[arg(long)]
        rate: Option<String>,
        /// Allowed UTC hours, HH:MM-HH:MM (repeat).
        #[arg(long)]
        hours: Vec<String>,
        /// Never returned in plaintext: proxy injection, TOTP codes and
        /// minted tokens only.
        #[arg(long)]
        no_reveal: bool,
        /// A host /v1/proxy may inject it into (repeat).
        #[arg(long = "upstream")]
        upstreams: Vec<String>,
    },
    /// Show one service's policy, or every policy (JSON).
    Show { service: Option<String> },
    /// Remove SERVICE's policy.
    Clear { service: String },
}

#[derive(Subcommand, Debug)]
pub enum ApprovalsAction {
    /// Every approval still kept, oldest first (JSON lines).
    List {
        /// Only the pending ones.
        #[arg(long)]
        pending: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditAction {
    /// Check every link and hash of the chain and the signature of its head.
    Verify,
    /// Write every record since a time as JSON lines (for a SIEM), oldest
    /// first.
    Export {
        /// RFC 3339 (2026-12-01T00:00:00Z) or unix seconds.
        #[arg(long)]
        since: String,
    },
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
        /// The client's name (letters, digits, '-', '_', '.'; stored lower-case).
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
        /// A service whose refresh token this client may refresh (repeat).
        /// Default: the service named like the client. refresh-notify uses
        /// only the client registered for the service; refreshHint.provider
        /// never picks another.
        #[arg(long = "service")]
        services: Vec<String>,
    },
    /// List registered clients (never their secrets).
    List,
    /// Remove a client.
    Remove { name: String },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Configtest => configtest::run(&cli.config),
        Command::Doctor => doctor::run(&cli.config),
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Init => init::run(&cli.config),
        Command::RegisterUrl => register_url::run(&cli.config),
        Command::Serve => serve::run(&cli.config, cli.landlock == "on"),
        Command::Dev {
            dir,
            listen,
            backend,
            postgres,
            postgres_ca,
            postgres_password_file,
            join,
        } => {
            let store = match (postgres, postgres_ca, postgres_password_file, join) {
                (Some(url), Some(ca), Some(pw), _) => {
                    dev::DevStore::Postgres(dev::DevPostgres { url, ca, pw })
                }
                (_, _, _, Some(node)) => dev::DevStore::Join(node),
                _ => dev::DevStore::Lmdb,
            };
            dev::run(
                &dir,
                listen,
                backend.as_deref(),
                store,
                cli.landlock == "on",
            )
        }
        Command::OauthClient { action } => oauth_client::run(&cli.config, action),
        Command::TlsKey { action } => tls_key::run(&cli.config, action),
        Command::Backup { out } => backup::backup(&cli.config, &out),
        Command::Restore { from, force } => backup::restore(&cli.config, &from, force),
        Command::Import { from, kv } => import::import(&cli.config, &from, &kv),
        Command::Audit { action } => audit::run(&cli.config, action),
        Command::Policy { action } => policy::run(&cli.config, action),
        Command::Approve { id, uses, minutes } => {
            policy::decide(&cli.config, &id, Some((uses, minutes)))
        }
        Command::Deny { id } => policy::decide(&cli.config, &id, None),
        Command::Approvals { action } => policy::approvals(&cli.config, action),
        Command::RotateKey {
            status,
            batch,
            pause_ms,
        } => rotate::run(&cli.config, status, batch, pause_ms),
    }
}
