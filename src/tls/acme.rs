//! ACME (RFC 8555): the appliance obtains and renews its own certificate.
//! TLS-ALPN-01 (RFC 8737) is answered on the service's own listener: the
//! challenge certificate is handed to handshakes that offer `acme-tls/1` for
//! the challenged name (see [`TlsState`]).
//!
//! Kept in `<store.path>/acme`: `cert.pem` (the issued chain, public),
//! `account.sealed` and, without `key_in_hsm`, `key.sealed`: the account
//! credentials and the certificate's private key, AES-256-GCM under the key
//! backend's key. With `key_in_hsm` the certificate key is the HSM's P-256
//! key and the CSR is signed there.
//!
//! Until the first certificate is issued the listener serves a one-day
//! self-signed certificate (health says `degraded`). Renewal runs at two
//! thirds of the lifetime (or `renew_days_before`); a failure keeps the
//! current certificate, logs, and retries with jittered exponential backoff.

use crate::keys::{Backend, KeyError};
use crate::tls::hsm_key::{HsmSigningKey, HsmTlsKey};
use crate::tls::TlsState;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zeroize::Zeroizing;

const AAD_ACCOUNT: &[u8] = b"tokenvault-webhook/acme/v1\0account";
const AAD_KEY: &[u8] = b"tokenvault-webhook/acme/v1\0certificate-key";

/// `rotate-key`: re-seals the ACME account and certificate key files in
/// `dir` (`<store.path>/acme`) under `gen`. Returns how many changed.
pub fn rekey_files(
    backend: &Backend,
    dir: &Path,
    gen: crate::keys::AesGen,
) -> Result<usize, AcmeError> {
    let mut n = 0;
    for (file, aad) in [("account.sealed", AAD_ACCOUNT), ("key.sealed", AAD_KEY)] {
        let path = dir.join(file);
        let sealed = match std::fs::read(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(AcmeError::Io(path, e)),
        };
        if let Some(new) = crate::keys::reseal_blob(backend.as_ref(), gen, aad, &sealed)? {
            write_atomic(&path, &new)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The ACME account and key files in a directory, for a rotation.
pub struct SealedFiles(pub std::path::PathBuf);

impl crate::keys::SealedElsewhere for SealedFiles {
    fn name(&self) -> &'static str {
        "acmeFiles"
    }
    fn reseal(&self, backend: &Backend, gen: crate::keys::AesGen) -> Result<usize, String> {
        rekey_files(backend, &self.0, gen).map_err(|e| e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME server: {0}")]
    Protocol(String),
    #[error("order for {domains:?} ended {status}")]
    Order {
        domains: Vec<String>,
        status: String,
    },
    #[error("no {0} challenge offered")]
    NoChallenge(&'static str),
    #[error("key backend: {0}")]
    Keys(#[from] KeyError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("certificate: {0}")]
    Cert(String),
}

impl From<instant_acme::Error> for AcmeError {
    fn from(e: instant_acme::Error) -> Self {
        AcmeError::Protocol(e.to_string())
    }
}

pub struct AcmeSettings {
    pub directory_url: String,
    pub ca_bundle: Option<PathBuf>,
    pub email: Option<String>,
    pub domains: Vec<String>,
    /// `<store.path>/acme`.
    pub dir: PathBuf,
    pub cert_path: PathBuf,
    pub renew_days_before: Option<u32>,
    pub hsm_key: Option<Arc<HsmTlsKey>>,
    pub challenge: crate::config::AcmeChallenge,
}

/// HTTP-01 answers: token → key authorization, while a challenge is open.
pub type Http01Tokens = Arc<std::sync::RwLock<std::collections::HashMap<String, String>>>;

/// The plain-HTTP listener for HTTP-01: `/.well-known/acme-challenge/{token}`
/// while a challenge is open, 404 for everything else.
pub fn http01_router(tokens: Http01Tokens) -> axum::Router {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    async fn answer(
        State(tokens): State<Http01Tokens>,
        UrlPath(token): UrlPath<String>,
    ) -> axum::response::Response {
        let ka = tokens.read().ok().and_then(|g| g.get(&token).cloned());
        match ka {
            Some(ka) => {
                tracing::info!("answered an HTTP-01 challenge");
                ([("content-type", "application/octet-stream")], ka).into_response()
            }
            None => StatusCode::NOT_FOUND.into_response(),
        }
    }
    axum::Router::new()
        .route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(answer),
        )
        .with_state(tokens)
}

pub struct Acme {
    s: AcmeSettings,
    backend: Backend,
    /// Whether the serving certificate came from the ACME server (not the
    /// bootstrap self-signed one).
    issued: AtomicBool,
    /// The last renewal error, for logs and `doctor`.
    last_error: Mutex<Option<String>>,
    http01: Http01Tokens,
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AcmeError> {
    crate::fsutil::write_atomic(path, data).map_err(|e| AcmeError::Io(path.to_path_buf(), e))
}

fn chain_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, AcmeError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| AcmeError::Cert(e.to_string()))?;
    if certs.is_empty() {
        return Err(AcmeError::Cert("no certificate in the chain".into()));
    }
    Ok(certs)
}

fn software_key(pkcs8: &[u8]) -> Result<Arc<dyn rustls::sign::SigningKey>, AcmeError> {
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()));
    rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| AcmeError::Cert(e.to_string()))
}

/// The self-signed certificate RFC 8737 asks for: the name, and the
/// key authorization's SHA-256 in a critical acmeIdentifier extension.
fn challenge_cert(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let err = |e: rcgen::Error| AcmeError::Cert(e.to_string());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
    let mut p = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(err)?;
    p.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = p.self_signed(&key).map_err(err)?;
    let der = Zeroizing::new(key.serialize_der());
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        software_key(&der)?,
    )))
}

fn now() -> i64 {
    crate::clock::system_now()
}

impl Acme {
    pub fn new(s: AcmeSettings, backend: Backend) -> Acme {
        Acme {
            s,
            backend,
            issued: AtomicBool::new(false),
            last_error: Mutex::new(None),
            http01: Arc::new(std::sync::RwLock::new(std::collections::HashMap::new())),
        }
    }

    /// The tokens the HTTP-01 listener answers.
    pub fn http01_tokens(&self) -> Http01Tokens {
        self.http01.clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }

    fn key_path(&self) -> PathBuf {
        self.s.dir.join("key.sealed")
    }

    fn account_path(&self) -> PathBuf {
        self.s.dir.join("account.sealed")
    }

    /// The stored certificate and its key, or a one-day self-signed
    /// bootstrap certificate until the first issuance.
    pub fn initial_cert(&self) -> Result<Arc<CertifiedKey>, AcmeError> {
        crate::fsutil::create_private_dir(&self.s.dir)
            .map_err(|e| AcmeError::Io(self.s.dir.clone(), e))?;
        match self.load_stored() {
            Ok(Some(c)) => {
                self.issued.store(true, Ordering::Relaxed);
                tracing::info!(cert = %self.s.cert_path.display(), "serving the stored ACME certificate");
                return Ok(c);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "stored ACME certificate unusable; requesting a new one")
            }
        }
        let err = |e: rcgen::Error| AcmeError::Cert(e.to_string());
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let mut p = rcgen::CertificateParams::new(self.s.domains.clone()).map_err(err)?;
        let t = time::OffsetDateTime::now_utc();
        p.not_before = t - time::Duration::minutes(5);
        p.not_after = t + time::Duration::days(1);
        let cert = p.self_signed(&key).map_err(err)?;
        let der = Zeroizing::new(key.serialize_der());
        tracing::warn!(
            domains = ?self.s.domains,
            "no ACME certificate yet: serving a one-day self-signed certificate until issuance"
        );
        Ok(Arc::new(CertifiedKey::new(
            vec![cert.der().clone()],
            software_key(&der)?,
        )))
    }

    fn load_stored(&self) -> Result<Option<Arc<CertifiedKey>>, AcmeError> {
        let pem = match std::fs::read(&self.s.cert_path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AcmeError::Io(self.s.cert_path.clone(), e)),
        };
        let chain = chain_from_pem(&pem)?;
        let key: Arc<dyn rustls::sign::SigningKey> = match &self.s.hsm_key {
            Some(k) => Arc::new(HsmSigningKey(k.clone())),
            None => {
                let sealed = std::fs::read(self.key_path())
                    .map_err(|e| AcmeError::Io(self.key_path(), e))?;
                let der = self.backend.open(AAD_KEY, &sealed)?;
                software_key(&der)?
            }
        };
        let c = CertifiedKey::new(chain, key);
        c.keys_match()
            .map_err(|_| AcmeError::Cert("stored certificate does not match its key".into()))?;
        Ok(Some(Arc::new(c)))
    }

    /// When the serving certificate should be renewed (Unix time).
    fn renew_at(&self, tls: &TlsState) -> i64 {
        if !self.issued.load(Ordering::Relaxed) {
            return 0;
        }
        let not_after = tls.not_after();
        let not_before = std::fs::read(&self.s.cert_path)
            .ok()
            .and_then(|pem| {
                let (_, p) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
                let c = p.parse_x509().ok()?;
                Some(c.validity().not_before.timestamp())
            })
            .unwrap_or(not_after - 90 * 86_400);
        match self.s.renew_days_before {
            Some(d) => not_after - i64::from(d) * 86_400,
            None => not_before + (not_after - not_before) * 2 / 3,
        }
    }

    /// Issues (or renews) until the task is dropped.
    pub async fn run(self: Arc<Self>, tls: Arc<TlsState>) {
        let mut failures: u32 = 0;
        loop {
            let wait = (self.renew_at(&tls) - now()).max(0) as u64;
            if wait > 0 {
                tracing::info!(in_secs = wait, "next ACME renewal scheduled");
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            match self.issue(&tls).await {
                Ok(cert) => match tls.install(cert) {
                    Ok(()) => {
                        failures = 0;
                        self.issued.store(true, Ordering::Relaxed);
                        if let Ok(mut g) = self.last_error.lock() {
                            *g = None;
                        }
                        tracing::info!(domains = ?self.s.domains, not_after = tls.not_after(), "ACME certificate installed");
                        continue;
                    }
                    Err(e) => self.failed(&e.to_string()),
                },
                Err(e) => self.failed(&e.to_string()),
            }
            failures = failures.saturating_add(1);
            let delay = backoff(failures);
            tracing::warn!(
                retry_in_secs = delay.as_secs(),
                failures,
                "ACME issuance failed; the current certificate keeps serving"
            );
            tokio::time::sleep(delay).await;
        }
    }

    fn failed(&self, e: &str) {
        tracing::error!(error = %e, "ACME");
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.to_string());
        }
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        let builder = || match &self.s.ca_bundle {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        if let Ok(sealed) = std::fs::read(self.account_path()) {
            let json = self.backend.open(AAD_ACCOUNT, &sealed)?;
            let creds: AccountCredentials = serde_json::from_slice(&json)
                .map_err(|e| AcmeError::Cert(format!("stored account: {e}")))?;
            return Ok(builder()?.from_credentials(creds).await?);
        }
        let contact: Vec<String> = self.s.email.iter().map(|e| format!("mailto:{e}")).collect();
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, creds) = builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.s.directory_url.clone(),
                None,
            )
            .await?;
        let json =
            Zeroizing::new(serde_json::to_vec(&creds).map_err(|e| AcmeError::Cert(e.to_string()))?);
        write_atomic(
            &self.account_path(),
            &self.backend.seal(AAD_ACCOUNT, &json)?,
        )?;
        tracing::info!(directory = %self.s.directory_url, "ACME account created");
        Ok(account)
    }

    async fn issue(&self, tls: &TlsState) -> Result<Arc<CertifiedKey>, AcmeError> {
        let account = self.account().await?;
        let ids: Vec<Identifier> = self
            .s
            .domains
            .iter()
            .cloned()
            .map(Identifier::Dns)
            .collect();
        let mut order = account.new_order(&NewOrder::new(&ids)).await?;
        let mut challenged = Vec::new();
        let mut tokens = Vec::new();
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(a) = authorizations.next().await {
                let mut authz = a?;
                match authz.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(AcmeError::Order {
                            domains: self.s.domains.clone(),
                            status: format!("authorization {other:?}"),
                        })
                    }
                }
                if self.s.challenge == crate::config::AcmeChallenge::Http01 {
                    let mut ch = authz
                        .challenge(ChallengeType::Http01)
                        .ok_or(AcmeError::NoChallenge("http-01"))?;
                    let ka = ch.key_authorization().as_str().to_string();
                    if let Ok(mut g) = self.http01.write() {
                        g.insert(ch.token.clone(), ka);
                    }
                    tokens.push(ch.token.clone());
                    ch.set_ready().await?;
                    continue;
                }
                let mut ch = authz
                    .challenge(ChallengeType::TlsAlpn01)
                    .ok_or(AcmeError::NoChallenge("tls-alpn-01"))?;
                let name = ch.identifier().to_string();
                let digest = ch.key_authorization().digest();
                tls.set_challenge(&name, challenge_cert(&name, digest.as_ref())?);
                challenged.push(name);
                ch.set_ready().await?;
            }
            let status = order.poll_ready(&RetryPolicy::default()).await?;
            if status != OrderStatus::Ready {
                return Err(AcmeError::Order {
                    domains: self.s.domains.clone(),
                    status: format!("{status:?}"),
                });
            }
            Ok(())
        }
        .await;
        for n in &challenged {
            tls.clear_challenge(n);
        }
        if let Ok(mut g) = self.http01.write() {
            for t in &tokens {
                g.remove(t);
            }
        }
        result?;
        // The CSR: signed by the HSM's key, or by a fresh software key.
        let err = |e: rcgen::Error| AcmeError::Cert(e.to_string());
        let mut params = rcgen::CertificateParams::new(self.s.domains.clone()).map_err(err)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let (csr, software): (Vec<u8>, Option<Zeroizing<Vec<u8>>>) = match &self.s.hsm_key {
            Some(k) => {
                let pair =
                    rcgen::KeyPair::from_remote(Box::new(HsmSigningKey(k.clone()))).map_err(err)?;
                (
                    params.serialize_request(&pair).map_err(err)?.der().to_vec(),
                    None,
                )
            }
            None => {
                let pair =
                    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
                let csr = params.serialize_request(&pair).map_err(err)?.der().to_vec();
                (csr, Some(Zeroizing::new(pair.serialize_der())))
            }
        };
        order.finalize_csr(&csr).await?;
        let chain_pem = order.poll_certificate(&RetryPolicy::default()).await?;
        let chain = chain_from_pem(chain_pem.as_bytes())?;
        let key: Arc<dyn rustls::sign::SigningKey> = match (&software, &self.s.hsm_key) {
            (Some(der), _) => software_key(der)?,
            (None, Some(k)) => Arc::new(HsmSigningKey(k.clone())),
            (None, None) => return Err(AcmeError::Cert("no key".into())),
        };
        let certified = CertifiedKey::new(chain, key);
        certified
            .keys_match()
            .map_err(|_| AcmeError::Cert("issued certificate does not match our key".into()))?;
        // Key first, then the chain: a crash in between leaves the old pair
        // unreadable together, and the next start simply issues again.
        if let Some(der) = &software {
            write_atomic(&self.key_path(), &self.backend.seal(AAD_KEY, der)?)?;
        }
        write_atomic(&self.s.cert_path, chain_pem.as_bytes())?;
        Ok(Arc::new(certified))
    }
}

/// 1 min doubling to 6 h, ±25 % jitter.
fn backoff(failures: u32) -> Duration {
    let base = 60u64
        .saturating_mul(1 << failures.min(10).saturating_sub(1))
        .min(6 * 3600);
    let mut r = [0u8; 2];
    let _ = getrandom::getrandom(&mut r);
    let jitter = (u16::from_le_bytes(r) as u64 % (base / 2 + 1)) as i64 - (base / 4) as i64;
    Duration::from_secs((base as i64 + jitter).max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        for _ in 0..50 {
            let d = backoff(1).as_secs();
            assert!((45..=75).contains(&d), "{d}");
            let d = backoff(20).as_secs();
            assert!((16_200..=27_000).contains(&d), "{d}");
        }
        assert!(backoff(3).as_secs() > backoff(1).as_secs());
    }
}
