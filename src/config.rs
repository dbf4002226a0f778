//! Strict, versioned configuration (TOML). Unknown keys are errors.
//! The fully commented reference is `packaging/config.reference.toml`,
//! which a test parses so the two cannot drift.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/tokenvault-webhook/config.toml";
pub const REFERENCE_CONFIG: &str = include_str!("../packaging/config.reference.toml");
pub const CONFIG_VERSION: u32 = 1;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub version: u32,
    #[serde(default)]
    pub profile: Profile,
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub keys: KeysConfig,
    pub store: StoreConfig,
    #[serde(default)]
    pub binding: BindingConfig,
    #[serde(default)]
    pub direct_access: DirectAccessConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub sandbox: SandboxConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub helper: HelperConfig,
    #[serde(default)]
    pub refresh: RefreshConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The file this was loaded from.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Production,
    Dev,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// The public HTTPS URL Token Vault will call. Defaults to https://<listen>.
    pub public_url: Option<String>,
    #[serde(default = "d_body_limit")]
    pub body_limit_bytes: usize,
    #[serde(default = "d_handshake")]
    pub handshake_timeout_secs: u64,
    #[serde(default = "d_header")]
    pub header_timeout_secs: u64,
    #[serde(default = "d_idle")]
    pub idle_timeout_secs: u64,
    #[serde(default = "d_max_conns")]
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams one connection may open.
    #[serde(default = "d_h2_streams")]
    pub max_h2_streams: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// `files`: `cert` and `key` (or `key_in_hsm`) as installed by the
    /// operator. `acme`: the appliance obtains and renews its certificate.
    #[serde(default)]
    pub mode: TlsMode,
    /// PEM chain. In `acme` mode, where the issued chain is kept (default
    /// `<store.path>/acme/cert.pem`).
    #[serde(default)]
    pub cert: PathBuf,
    /// PEM private key file; not used (and must be absent) with `key_in_hsm`.
    pub key: Option<PathBuf>,
    /// The certificate key is an ECDSA P-256 key in the PKCS#11 token
    /// (`tls-key generate` or `tls-key import`); every handshake signature
    /// is made there.
    #[serde(default)]
    pub key_in_hsm: bool,
    pub acme: Option<AcmeConfig>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Files,
    Acme,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// RFC 8555 directory. Default: Let's Encrypt production.
    #[serde(default = "d_acme_directory")]
    pub directory_url: String,
    /// Extra CA certificate (PEM) to trust for the ACME server (test CAs).
    pub ca_bundle: Option<PathBuf>,
    /// Contact address for the account (expiry and policy mail).
    pub email: Option<String>,
    /// Names on the certificate (DNS names pointing at this appliance).
    pub domains: Vec<String>,
    /// You agree to the ACME server's terms of service.
    #[serde(default)]
    pub accept_terms: bool,
    /// Renew this many days before expiry. Default: when two thirds of the
    /// certificate's lifetime have passed.
    pub renew_days_before: Option<u32>,
    /// `tls-alpn-01` (default: answered on the service's own listener) or
    /// `http-01` (answered on `http01_listen`, usually port 80).
    #[serde(default)]
    pub challenge: AcmeChallenge,
    /// Plain-HTTP listener for HTTP-01 (it serves nothing else).
    pub http01_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum AcmeChallenge {
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    #[serde(rename = "http-01")]
    Http01,
}

impl TlsConfig {
    /// Where the key is, for messages.
    pub fn key_source(&self) -> String {
        match (&self.key, self.key_in_hsm) {
            (_, true) => "the HSM (tokenvault-tls)".into(),
            (Some(k), false) => k.display().to_string(),
            (None, false) => "(none)".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    #[serde(default)]
    pub backend: KeyBackendKind,
    pub pkcs11: Option<Pkcs11Config>,
    pub tpm: Option<TpmConfig>,
}

impl Default for TpmConfig {
    fn default() -> Self {
        TpmConfig {
            tcti: d_tcti(),
            pcrs: Vec::new(),
        }
    }
}

/// TPM 2.0 backend: the AES key and HMAC secret are sealed to the TPM (blobs
/// in `<store.path>/tpm`), unsealed at start into locked memory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// TCTI: `device:/dev/tpmrm0` (default) or `swtpm:host=127.0.0.1,port=2321`.
    #[serde(default = "d_tcti")]
    pub tcti: String,
    /// PCRs (SHA-256 bank) the keys are sealed to; empty: no PCR policy.
    #[serde(default)]
    pub pcrs: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KeyBackendKind {
    #[default]
    Pkcs11,
    Tpm,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Module path; default: the first SoftHSM2 found at the usual paths.
    pub module: Option<PathBuf>,
    pub token_label: String,
    /// File holding the user PIN (mode 0600 or stricter).
    pub pin_file: Option<PathBuf>,
    /// Name of a systemd credential holding the PIN ($CREDENTIALS_DIRECTORY/<name>).
    pub pin_credential: Option<String>,
    /// SoftHSM only: its configuration file (sets SOFTHSM2_CONF for the module).
    pub softhsm_conf: Option<PathBuf>,
    #[serde(default = "d_sessions")]
    pub sessions: usize,
    #[serde(default = "d_true")]
    pub copy_keys_to_session: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub path: PathBuf,
    #[serde(default = "d_map_size")]
    pub map_size_mib: usize,
    /// Share of the map kept free for the writes that matter (documents,
    /// request ids, nonces, TOTP steps, binding): the audit trail never
    /// grows into it.
    #[serde(default = "d_reserve")]
    pub reserve_percent: u8,
    /// Where the documents live: LMDB in `path` (one node), or a
    /// PostgreSQL database shared by several nodes.
    #[serde(default)]
    pub backend: StoreBackendKind,
    pub postgres: Option<PostgresConfig>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackendKind {
    #[default]
    Lmdb,
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://USER@HOST:PORT/DB`: no password (it comes from a file or
    /// a systemd credential); TLS is always on.
    pub url: String,
    /// The CA the database server's certificate must chain to.
    pub ca_file: PathBuf,
    /// File holding the database password (mode 0600/0640).
    pub password_file: Option<PathBuf>,
    /// Name of a systemd credential holding it ($CREDENTIALS_DIRECTORY/<name>).
    pub password_credential: Option<String>,
    /// Connections this node keeps to the database for reads (the writer
    /// and the health probe have one each besides).
    #[serde(default = "d_pg_pool")]
    pub pool_size: usize,
    /// MiB the appliance's data may take in the database: the audit
    /// trail's share (`audit.max_share_percent`) and reserve are of this.
    #[serde(default = "d_map_size")]
    pub capacity_mib: usize,
}

impl PostgresConfig {
    /// The URL, checked: `postgres://` or `postgresql://`, a host (TCP),
    /// no password (it comes from a file or a credential), TLS not turned
    /// off. The store then always requires TLS and verifies it against
    /// `ca_file`.
    pub fn checked_url(&self) -> Result<url::Url, String> {
        let u = url::Url::parse(&self.url).map_err(|e| format!("store.postgres.url: {e}"))?;
        if !matches!(u.scheme(), "postgres" | "postgresql") {
            return Err("store.postgres.url must start with postgres://".into());
        }
        if u.password().is_some() {
            return Err("store.postgres.url must not hold a password: use store.postgres.password_file or password_credential".into());
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err("store.postgres.url must name a host".into());
        }
        for (k, v) in u.query_pairs() {
            match &*k {
                "sslmode" if v == "disable" || v == "prefer" || v == "allow" => {
                    return Err(format!("store.postgres.url: sslmode={v} is refused; TLS to the database is always on and verified against store.postgres.ca_file"));
                }
                "host" | "hostaddr" | "password" => {
                    return Err(format!(
                        "store.postgres.url: give the host in the URL, not as ?{k}= (and never a password)"
                    ));
                }
                _ => {}
            }
        }
        Ok(u)
    }

    /// The database's TCP port (PostgreSQL's default when the URL has none).
    pub fn port(&self) -> u16 {
        self.checked_url()
            .ok()
            .and_then(|u| u.port())
            .unwrap_or(5432)
    }
}

fn d_pg_pool() -> usize {
    8
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    #[serde(default = "d_frontend")]
    pub frontend_url: String,
    #[serde(default = "d_bind_ttl")]
    pub code_ttl_secs: i64,
}

impl Default for BindingConfig {
    fn default() -> Self {
        BindingConfig {
            frontend_url: d_frontend(),
            code_ttl_secs: d_bind_ttl(),
        }
    }
}

/// The endpoints browsers and agents call directly (`/v1/store`, `/v1/credential`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectAccessConfig {
    /// Origins allowed by CORS (exact match; never `*`).
    #[serde(default = "d_origins")]
    pub allowed_origins: Vec<String>,
    /// Peers (CIDRs) that may never use these endpoints, e.g. Token Vault's own egress.
    #[serde(default)]
    pub deny_cidrs: Vec<ipnet::IpNet>,
    /// Reverse proxies whose X-Forwarded-For is believed (empty: none).
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Requests per minute per client address (0 disables the limit).
    #[serde(default = "d_rate")]
    pub rate_limit_per_minute: u32,
    /// Requests a client may send in a burst above the steady rate.
    #[serde(default = "d_burst")]
    pub rate_limit_burst: u32,
}

impl Default for DirectAccessConfig {
    fn default() -> Self {
        DirectAccessConfig {
            allowed_origins: d_origins(),
            deny_cidrs: Vec::new(),
            trusted_proxies: Vec::new(),
            rate_limit_per_minute: d_rate(),
            rate_limit_burst: d_burst(),
        }
    }
}

/// `/v1/proxy` and its egress policy.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Refuse proxy tickets without a stored proxy config (default: true outside dev).
    pub require_config: Option<bool>,
    /// Allow upstreams on loopback addresses (default: only in dev).
    pub allow_loopback: Option<bool>,
    /// Hosts always refused (exact names, case-insensitive).
    #[serde(default)]
    pub deny_hosts: Vec<String>,
    /// Addresses always refused.
    #[serde(default)]
    pub deny_cidrs: Vec<ipnet::IpNet>,
    /// Addresses allowed even though private, link-local or loopback.
    #[serde(default)]
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// Seconds to wait for the upstream's response headers.
    pub timeout_secs: Option<u64>,
    /// Largest upstream response body passed through, bytes.
    pub max_response_bytes: Option<u64>,
}

/// `[refresh]`: Token Vault's own refresh, `POST /v1/refresh`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshConfig {
    /// Whether `/v1/refresh` hands a service's refresh token to Token Vault
    /// (and takes its refreshed tokens back): `"on"`, `"off"` (the default),
    /// or a list of services. Token Vault's built-in Google and GitHub
    /// refresh needs it; whoever holds the HMAC secret can then read those
    /// refresh tokens. `/v1/refresh-notify` (this appliance refreshes with
    /// its own OAuth client) needs nothing handed out.
    #[serde(default)]
    pub tv_refresh: ServiceSwitch,
}

/// `[policy]`: how the owner's approvals behave (the rules themselves are
/// set with `tokenvault-webhook policy set`, not here).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Seconds an approval request may be decided, and an approval used.
    #[serde(default = "d_approval_ttl")]
    pub approval_ttl_secs: i64,
    /// Seconds a request waits for the owner's answer before it is answered
    /// 403 approval_required (0: at once).
    #[serde(default)]
    pub approval_wait_secs: u64,
    /// Pending approvals beyond which new ones are refused (429).
    #[serde(default = "d_max_pending")]
    pub max_pending_approvals: usize,
    /// POSTed a JSON body (no secret) for each new approval request.
    #[serde(default)]
    pub notify_url: Option<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            approval_ttl_secs: d_approval_ttl(),
            approval_wait_secs: 0,
            max_pending_approvals: d_max_pending(),
            notify_url: None,
        }
    }
}

fn d_approval_ttl() -> i64 {
    600
}

fn d_max_pending() -> usize {
    64
}

/// On, off, or only for the listed services.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ServiceSwitch {
    On,
    #[default]
    Off,
    Only(std::collections::BTreeSet<String>),
}

impl<'de> Deserialize<'de> for ServiceSwitch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<String>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "on" => Ok(ServiceSwitch::On),
            Raw::Word(w) if w == "off" => Ok(ServiceSwitch::Off),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "expected \"on\", \"off\" or a list of services, found {w:?}"
            ))),
            Raw::List(l) => Ok(ServiceSwitch::Only(l.into_iter().collect())),
        }
    }
}

impl ServiceSwitch {
    pub fn allows(&self, service: &str) -> bool {
        match self {
            ServiceSwitch::On => true,
            ServiceSwitch::Off => false,
            ServiceSwitch::Only(s) => s.contains(service),
        }
    }

    /// Whether any service is on (the capability is advertised).
    pub fn any(&self) -> bool {
        match self {
            ServiceSwitch::On => true,
            ServiceSwitch::Off => false,
            ServiceSwitch::Only(s) => !s.is_empty(),
        }
    }

    /// For `doctor` and logs.
    pub fn describe(&self) -> String {
        match self {
            ServiceSwitch::On => "on for every service".into(),
            ServiceSwitch::Off => "off".into(),
            ServiceSwitch::Only(s) if s.is_empty() => "off (empty list)".into(),
            ServiceSwitch::Only(s) => format!(
                "on for {}",
                s.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// Landlock (see SECURITY.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Apply Landlock at start (`--landlock=off` overrides for debugging).
    #[serde(default = "d_true")]
    pub landlock: bool,
    /// Outbound TCP ports the service may connect to (default [443]; any in dev).
    pub connect_ports: Option<Vec<u16>>,
    /// More paths the PKCS#11 module needs, read-only / read-write.
    #[serde(default)]
    pub extra_read_only: Vec<PathBuf>,
    #[serde(default)]
    pub extra_read_write: Vec<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            landlock: true,
            connect_ports: None,
            extra_read_only: Vec::new(),
            extra_read_write: Vec::new(),
        }
    }
}

fn d_origins() -> Vec<String> {
    vec![
        "https://tokenvault.uk".into(),
        "https://tokenvault.one".into(),
    ]
}
fn d_rate() -> u32 {
    6000
}
fn d_burst() -> u32 {
    600
}

/// The appliance's own audit trail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Records older than this are dropped (the chain keeps their last hash).
    #[serde(default = "d_retention_days")]
    pub retention_days: u32,
    /// How often the chain head is signed with the HMAC key (when bound).
    #[serde(default = "d_sign_every")]
    pub sign_every_secs: u64,
    /// The trail's size bound, as a share of the store's map: past it the
    /// oldest records are dropped (the anchor keeps the chain verifiable).
    #[serde(default = "d_trail_share")]
    pub max_share_percent: u8,
    /// Stream every trail record to the local syslog (journald reads it)
    /// as RFC 5424 lines with the record as JSON.
    #[serde(default)]
    pub syslog: bool,
    /// The syslog socket (a unix datagram socket).
    #[serde(default = "d_syslog_socket")]
    pub syslog_socket: PathBuf,
    /// Also append every record, as a JSON line, to this file (created
    /// 0600; its directory must be writable by the service).
    #[serde(default)]
    pub export_file: Option<PathBuf>,
}

fn d_syslog_socket() -> PathBuf {
    PathBuf::from("/dev/log")
}

fn d_trail_share() -> u8 {
    20
}
fn d_reserve() -> u8 {
    10
}
fn d_h2_streams() -> u32 {
    32
}

/// What one client address may spend (see SECURITY.md, "Hostile network").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open connections per client address (IPv6: per prefix); 0: no cap.
    #[serde(default = "d_conns_per_ip")]
    pub max_connections_per_ip: usize,
    /// IPv6 clients are counted per prefix of this length.
    #[serde(default = "d_v6_prefix")]
    pub ipv6_prefix_len: u8,
    /// From a request's arrival to the last byte of its body, seconds.
    #[serde(default = "d_request_timeout")]
    pub request_timeout_secs: u64,
    /// After `body_grace_secs`, a body slower than this on average is refused.
    #[serde(default = "d_min_body_rate")]
    pub min_body_bytes_per_sec: u64,
    #[serde(default = "d_body_grace")]
    pub body_grace_secs: u64,
    /// Request bodies buffered at once over all connections, MiB.
    #[serde(default = "d_body_budget")]
    pub body_budget_mib: usize,
    /// Failing unauthenticated requests per client address per minute
    /// before it is answered 429 (0: no limit), and the burst above it.
    #[serde(default = "d_failures")]
    pub failures_per_minute: u32,
    #[serde(default = "d_failure_burst")]
    pub failure_burst: u32,
    /// `/v1/exchange` attempts per client address per minute, and burst.
    #[serde(default = "d_exchange_rate")]
    pub exchange_per_minute: u32,
    #[serde(default = "d_exchange_burst")]
    pub exchange_burst: u32,
    /// Access-log lines of failing unauthenticated requests per minute; the
    /// rest are summarised once a minute (0: no limit).
    #[serde(default = "d_failure_lines")]
    pub failure_log_lines_per_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections_per_ip: d_conns_per_ip(),
            ipv6_prefix_len: d_v6_prefix(),
            request_timeout_secs: d_request_timeout(),
            min_body_bytes_per_sec: d_min_body_rate(),
            body_grace_secs: d_body_grace(),
            body_budget_mib: d_body_budget(),
            failures_per_minute: d_failures(),
            failure_burst: d_failure_burst(),
            exchange_per_minute: d_exchange_rate(),
            exchange_burst: d_exchange_burst(),
            failure_log_lines_per_minute: d_failure_lines(),
        }
    }
}

fn d_conns_per_ip() -> usize {
    64
}
fn d_v6_prefix() -> u8 {
    64
}
fn d_request_timeout() -> u64 {
    30
}
fn d_min_body_rate() -> u64 {
    1024
}
fn d_body_grace() -> u64 {
    5
}
fn d_body_budget() -> usize {
    64
}
fn d_failures() -> u32 {
    120
}
fn d_failure_burst() -> u32 {
    60
}
fn d_exchange_rate() -> u32 {
    10
}
fn d_exchange_burst() -> u32 {
    5
}
fn d_failure_lines() -> u32 {
    60
}

/// The bind helpers (`/v1/register-url`, `/bind`), never on the public
/// listener outside `dev`: an optional loopback listener and/or unix socket
/// that a forwarder of the public port does not reach.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperConfig {
    /// Plain-HTTP listener on a loopback address, e.g. "127.0.0.1:8444".
    pub listen: Option<SocketAddr>,
    /// A unix socket (mode 0600), e.g. "/run/tokenvault-webhook/helper.sock".
    pub socket: Option<PathBuf>,
}

fn d_retention_days() -> u32 {
    365
}
fn d_sign_every() -> u64 {
    60
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention_days: d_retention_days(),
            sign_every_secs: d_sign_every(),
            max_share_percent: d_trail_share(),
            syslog: false,
            syslog_socket: d_syslog_socket(),
            export_file: None,
        }
    }
}

/// Prometheus metrics on a separate plain-HTTP loopback listener.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// e.g. "127.0.0.1:9464"; absent: no metrics listener.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "d_level")]
    pub level: String,
    #[serde(default)]
    pub json: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: d_level(),
            json: false,
        }
    }
}

fn d_body_limit() -> usize {
    1 << 20
}
fn d_handshake() -> u64 {
    10
}
fn d_header() -> u64 {
    10
}
fn d_idle() -> u64 {
    60
}
fn d_max_conns() -> usize {
    4096
}
fn d_acme_directory() -> String {
    "https://acme-v02.api.letsencrypt.org/directory".into()
}
fn d_tcti() -> String {
    "device:/dev/tpmrm0".into()
}
fn d_sessions() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_map_size() -> usize {
    1024
}
fn d_frontend() -> String {
    "https://tokenvault.uk".into()
}
fn d_bind_ttl() -> i64 {
    300
}
fn d_level() -> String {
    "info".into()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, String),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        let mut c = Self::parse(&text).map_err(|e| ConfigError::Parse(path.into(), e))?;
        // Relative paths are relative to the config file's directory.
        let base = path.parent().unwrap_or(Path::new("."));
        c.resolve_paths(base);
        c.source = path.to_path_buf();
        c.validate()
            .map_err(|e| ConfigError::Invalid(path.into(), e))?;
        Ok(c)
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let mut c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        c.canonicalize_nets();
        Ok(c)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.store.path);
        if let Some(pg) = &mut self.store.postgres {
            fix(&mut pg.ca_file);
            if let Some(f) = &mut pg.password_file {
                fix(f);
            }
        }
        if self.tls.mode == TlsMode::Acme && self.tls.cert.as_os_str().is_empty() {
            self.tls.cert = self.store.path.join("acme/cert.pem");
        }
        if !self.tls.cert.as_os_str().is_empty() {
            fix(&mut self.tls.cert);
        }
        if let Some(k) = self.tls.key.as_mut() {
            fix(k);
        }
        if let Some(a) = self.tls.acme.as_mut() {
            if let Some(c) = a.ca_bundle.as_mut() {
                fix(c);
            }
        }
        if let Some(p) = self.helper.socket.as_mut() {
            fix(p);
        }
        if let Some(p) = self.keys.pkcs11.as_mut() {
            for f in [&mut p.module, &mut p.pin_file, &mut p.softhsm_conf]
                .into_iter()
                .flatten()
            {
                fix(f);
            }
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.version != CONFIG_VERSION {
            return Err(format!(
                "unsupported config version {} (this build reads version {CONFIG_VERSION})",
                self.version
            ));
        }
        if let Some(m) = self.metrics.listen {
            if !m.ip().is_loopback() {
                return Err(format!(
                    "metrics.listen = \"{m}\" must be a loopback address (metrics are plain HTTP; scrape them through a local agent or an SSH tunnel)"
                ));
            }
            if m.port() != 0 && m == self.server.listen {
                return Err("metrics.listen must differ from server.listen".into());
            }
        }
        if let (TlsMode::Acme, a) = (self.tls.mode, &self.tls.acme) {
            let Some(a) = a else {
                return Err("tls.mode = \"acme\" needs a [tls.acme] section".into());
            };
            if a.domains.is_empty() {
                return Err("tls.acme.domains: list the DNS names of this appliance".into());
            }
            if !a.accept_terms {
                return Err("tls.acme.accept_terms must be true: read the ACME server's terms of service first".into());
            }
            if self.tls.key.is_some() {
                return Err("tls.key must be absent in acme mode (the key is generated: sealed in the state dir, or in the HSM with key_in_hsm)".into());
            }
            if a.challenge == AcmeChallenge::Http01 && a.http01_listen.is_none() {
                return Err("tls.acme.challenge = \"http-01\" needs tls.acme.http01_listen (e.g. \"0.0.0.0:80\")".into());
            }
            let u = url::Url::parse(&a.directory_url)
                .map_err(|e| format!("tls.acme.directory_url: {e}"))?;
            if u.scheme() != "https" {
                return Err("tls.acme.directory_url must be https".into());
            }
        } else if self.tls.cert.as_os_str().is_empty() {
            return Err("tls.cert is required".into());
        }
        match (&self.tls.key, self.tls.key_in_hsm) {
            (None, false) if self.tls.mode == TlsMode::Files => {
                return Err("tls.key is required (or tls.key_in_hsm = true)".into())
            }
            (Some(_), true) => {
                return Err(
                    "tls.key must be absent with tls.key_in_hsm = true (the key is in the HSM)"
                        .into(),
                )
            }
            (None, true) if self.keys.backend != KeyBackendKind::Pkcs11 => {
                return Err("tls.key_in_hsm needs keys.backend = \"pkcs11\"".into())
            }
            _ => {}
        }
        if let Some(t) = &self.keys.tpm {
            if let Some(bad) = t.pcrs.iter().find(|p| **p > 23) {
                return Err(format!("keys.tpm.pcrs: PCR {bad} out of range 0-23"));
            }
            let known = ["device:", "swtpm:", "mssim:", "tabrmd:"];
            if !known.iter().any(|k| t.tcti.starts_with(k))
                || t.tcti.parse::<tss_esapi::tcti_ldr::TctiNameConf>().is_err()
            {
                return Err(format!(
                    "keys.tpm.tcti {:?}: expected device:PATH, swtpm:host=H,port=P, mssim:... or tabrmd:...",
                    t.tcti
                ));
            }
        }
        match (&self.keys.backend, &self.keys.pkcs11) {
            (KeyBackendKind::Pkcs11, None) => return Err("[keys.pkcs11] is required".into()),
            (KeyBackendKind::Tpm, _) => {}
            (KeyBackendKind::Pkcs11, Some(p)) => {
                if p.pin_file.is_none() && p.pin_credential.is_none() {
                    return Err(
                        "set keys.pkcs11.pin_credential (systemd) and/or keys.pkcs11.pin_file"
                            .into(),
                    );
                }
                if p.token_label.is_empty() || p.token_label.len() > 32 {
                    return Err("keys.pkcs11.token_label must be 1-32 characters".into());
                }
                if p.sessions == 0 || p.sessions > 256 {
                    return Err("keys.pkcs11.sessions must be 1-256".into());
                }
            }
        }
        if let Some(u) = &self.server.public_url {
            let parsed = url::Url::parse(u).map_err(|e| format!("server.public_url: {e}"))?;
            if parsed.scheme() != "https" {
                return Err("server.public_url must be https".into());
            }
        }
        let f = url::Url::parse(&self.binding.frontend_url)
            .map_err(|e| format!("binding.frontend_url: {e}"))?;
        if f.scheme() != "https" && self.profile != Profile::Dev {
            return Err("binding.frontend_url must be https".into());
        }
        if self.server.body_limit_bytes < 1024 || self.server.body_limit_bytes > 64 << 20 {
            return Err("server.body_limit_bytes must be between 1 KiB and 64 MiB".into());
        }
        if self.store.map_size_mib == 0 || self.store.map_size_mib > 1 << 20 {
            return Err("store.map_size_mib must be between 1 and 1048576".into());
        }
        for o in &self.direct_access.allowed_origins {
            let u = url::Url::parse(o)
                .map_err(|e| format!("direct_access.allowed_origins {o:?}: {e}"))?;
            if o == "*" || u.origin().ascii_serialization() != *o {
                return Err(format!(
                    "direct_access.allowed_origins {o:?} must be an exact origin like https://tokenvault.uk"
                ));
            }
        }
        self.validate_limits()?;
        self.validate_policy()?;
        if !(60..=3600).contains(&self.binding.code_ttl_secs) {
            return Err("binding.code_ttl_secs must be 60-3600".into());
        }
        Ok(())
    }

    fn validate_policy(&self) -> Result<(), String> {
        let p = &self.policy;
        if !(10..=86_400).contains(&p.approval_ttl_secs) {
            return Err("policy.approval_ttl_secs must be between 10 and 86400".into());
        }
        if p.approval_wait_secs > 300 || p.approval_wait_secs as i64 >= p.approval_ttl_secs {
            return Err(
                "policy.approval_wait_secs must be at most 300 and below policy.approval_ttl_secs"
                    .into(),
            );
        }
        if let Some(u) = &p.notify_url {
            let ok = url::Url::parse(u).is_ok_and(|u| {
                u.scheme() == "https" || (u.scheme() == "http" && self.profile == Profile::Dev)
            });
            if !ok {
                return Err("policy.notify_url must be an https URL (http only in dev)".into());
            }
        }
        if !(1..=10_000).contains(&p.max_pending_approvals) {
            return Err("policy.max_pending_approvals must be between 1 and 10000".into());
        }
        Ok(())
    }

    fn validate_postgres(&self) -> Result<(), String> {
        let pg = match (self.store.backend, &self.store.postgres) {
            (StoreBackendKind::Lmdb, None) => return Ok(()),
            (StoreBackendKind::Lmdb, Some(_)) => {
                return Err("[store.postgres] is set but store.backend is \"lmdb\"; set store.backend = \"postgres\" or remove the section".into())
            }
            (StoreBackendKind::Postgres, None) => {
                return Err("store.backend = \"postgres\" needs a [store.postgres] section".into())
            }
            (StoreBackendKind::Postgres, Some(pg)) => pg,
        };
        if self.keys.backend == KeyBackendKind::Tpm {
            return Err("store.backend = \"postgres\" is refused with keys.backend = \"tpm\": keys sealed to one TPM cannot be shared by several nodes; use keys.backend = \"pkcs11\" with an HSM every node reaches".into());
        }
        pg.checked_url()?;
        if pg.password_file.is_none() && pg.password_credential.is_none() {
            return Err("[store.postgres] needs password_file or password_credential".into());
        }
        if !(1..=256).contains(&pg.pool_size) {
            return Err("store.postgres.pool_size must be 1-256".into());
        }
        if pg.capacity_mib == 0 || pg.capacity_mib > 1 << 24 {
            return Err("store.postgres.capacity_mib must be between 1 and 16777216".into());
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), String> {
        let l = &self.limits;
        if !(1..=128).contains(&l.ipv6_prefix_len) {
            return Err("limits.ipv6_prefix_len must be 1-128".into());
        }
        if !(1..=3600).contains(&l.request_timeout_secs) {
            return Err("limits.request_timeout_secs must be 1-3600".into());
        }
        if l.body_grace_secs > l.request_timeout_secs {
            return Err(
                "limits.body_grace_secs must not exceed limits.request_timeout_secs".into(),
            );
        }
        if l.body_budget_mib == 0 || l.body_budget_mib > 4096 {
            return Err("limits.body_budget_mib must be 1-4096".into());
        }
        if (l.body_budget_mib << 20) < self.server.body_limit_bytes {
            return Err(
                "limits.body_budget_mib must hold at least one body of server.body_limit_bytes"
                    .into(),
            );
        }
        if !(1..=1000).contains(&self.server.max_h2_streams) {
            return Err("server.max_h2_streams must be 1-1000".into());
        }
        if !(1..=90).contains(&self.audit.max_share_percent) {
            return Err("audit.max_share_percent must be 1-90".into());
        }
        if self.store.reserve_percent > 50 {
            return Err("store.reserve_percent must be 0-50".into());
        }
        self.validate_postgres()?;
        if let Some(h) = self.helper.listen {
            if !h.ip().is_loopback() {
                return Err(format!(
                    "helper.listen = \"{h}\" must be a loopback address (the bind helpers hand out bind codes)"
                ));
            }
            if h.port() != 0 && h == self.server.listen {
                return Err("helper.listen must differ from server.listen".into());
            }
        }
        if let Some(p) = &self.helper.socket {
            if p.is_relative() {
                return Err("helper.socket must be an absolute path".into());
            }
        }
        Ok(())
    }

    /// Address lists in canonical form (IPv4-mapped IPv6 written as IPv4).
    fn canonicalize_nets(&mut self) {
        use crate::netaddr::canonical_nets;
        self.direct_access.deny_cidrs = canonical_nets(&self.direct_access.deny_cidrs);
        self.direct_access.trusted_proxies = canonical_nets(&self.direct_access.trusted_proxies);
        self.proxy.deny_cidrs = canonical_nets(&self.proxy.deny_cidrs);
        self.proxy.allow_cidrs = canonical_nets(&self.proxy.allow_cidrs);
    }

    pub fn public_url(&self, bound: SocketAddr) -> String {
        match &self.server.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("https://{bound}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_config_parses_and_validates() {
        let c = Config::parse(REFERENCE_CONFIG).unwrap();
        c.validate().unwrap();
        assert_eq!(c.version, 1);
        assert_eq!(c.server.body_limit_bytes, 1 << 20);
    }

    #[test]
    fn policy_refresh_and_audit_export_settings_are_checked() {
        let with = |from: &str, to: &str| {
            let text = REFERENCE_CONFIG.replace(from, to);
            assert_ne!(text, REFERENCE_CONFIG, "{from}");
            Config::parse(&text).and_then(|c| c.validate().map(|_| c))
        };
        let c = Config::parse(REFERENCE_CONFIG).unwrap();
        assert_eq!(c.refresh.tv_refresh, ServiceSwitch::Off);
        assert!(!c.audit.syslog && c.audit.export_file.is_none());
        let c = with("tv_refresh = \"off\"", "tv_refresh = [\"github\"]").unwrap();
        assert!(c.refresh.tv_refresh.allows("github") && !c.refresh.tv_refresh.allows("gmail"));
        assert!(with("tv_refresh = \"off\"", "tv_refresh = \"sometimes\"")
            .unwrap_err()
            .contains("expected \"on\""));
        for (from, to, why) in [
            (
                "# notify_url = \"https://ntfy.sh/your-private-topic\"",
                "notify_url = \"http://ntfy.example/t\"",
                "notify_url",
            ),
            (
                "approval_ttl_secs = 600",
                "approval_ttl_secs = 5",
                "approval_ttl_secs",
            ),
            (
                "approval_wait_secs = 0",
                "approval_wait_secs = 900",
                "approval_wait_secs",
            ),
            (
                "max_pending_approvals = 64",
                "max_pending_approvals = 0",
                "max_pending_approvals",
            ),
        ] {
            assert!(with(from, to).unwrap_err().contains(why), "{to}");
        }
        assert!(with(
            "# notify_url = \"https://ntfy.sh/your-private-topic\"",
            "notify_url = \"https://ntfy.sh/t\""
        )
        .is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_versions_are_refused() {
        let bad = REFERENCE_CONFIG.replace("[server]", "[server]\nlisten_typo = 1");
        assert!(Config::parse(&bad).unwrap_err().contains("listen_typo"));
        let v2 = REFERENCE_CONFIG.replace("version = 1", "version = 2");
        assert!(Config::parse(&v2)
            .unwrap()
            .validate()
            .unwrap_err()
            .contains("unsupported config version 2"));
        let http = REFERENCE_CONFIG.replace(
            "# public_url = \"https://webhook.example.com\"",
            "public_url = \"http://webhook.example.com\"",
        );
        assert_eq!(
            Config::parse(&http).unwrap().validate().unwrap_err(),
            "server.public_url must be https"
        );
    }
}
