//! Serving certificates: the certificate files and their key (a PEM file
//! or the HSM-held key), the serving state that the accept loop reads at
//! each handshake, reload on SIGHUP, the TLS-ALPN-01 challenge resolver, and
//! ACME (`acme`). The accept loop itself is `server::listener`.

pub mod acme;
pub mod hsm_key;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("{0}: no certificate found")]
    NoCert(PathBuf),
    #[error("{0}: no private key found")]
    NoKey(PathBuf),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}: the certificate's public key is not the HSM's TLS key (tokenvault-tls)")]
    Mismatch(PathBuf),
}

/// Where the certificate's private key is.
#[derive(Debug, Clone)]
pub enum TlsKeySource {
    /// A PEM file (read at start and on SIGHUP, zeroized after parsing).
    File(PathBuf),
    /// The PKCS#11 token: every handshake signature is made there.
    Hsm(Arc<hsm_key::HsmTlsKey>),
}

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Answers TLS-ALPN-01 validation handshakes with the challenge certificate
/// for their SNI name, every other handshake with the serving certificate.
#[derive(Debug)]
struct Resolver {
    cert: Arc<rustls::sign::CertifiedKey>,
    challenges: Arc<RwLock<HashMap<String, Arc<rustls::sign::CertifiedKey>>>>,
}

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut p| p.any(|p| p == ACME_TLS_ALPN));
        if acme {
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.challenges.read().ok()?.get(&name).cloned();
        }
        Some(self.cert.clone())
    }
}

/// The serving certificate, swappable without dropping connections (SIGHUP,
/// ACME renewal): new handshakes use the new one, open connections keep theirs.
#[derive(Debug)]
pub struct TlsState {
    config: RwLock<Arc<ServerConfig>>,
    challenges: Arc<RwLock<HashMap<String, Arc<rustls::sign::CertifiedKey>>>>,
    not_after: AtomicI64,
    acme: bool,
}

impl TlsState {
    /// `acme`: also answer TLS-ALPN-01 validation handshakes.
    pub fn new(
        cert: Arc<rustls::sign::CertifiedKey>,
        acme: bool,
    ) -> Result<Arc<TlsState>, TlsError> {
        let challenges = Arc::new(RwLock::new(HashMap::new()));
        let config = build_config(cert.clone(), challenges.clone(), acme)?;
        Ok(Arc::new(TlsState {
            config: RwLock::new(config),
            challenges,
            not_after: AtomicI64::new(not_after(&cert).unwrap_or(0)),
            acme,
        }))
    }

    /// Serves `cert` from the next handshake on.
    pub fn install(&self, cert: Arc<rustls::sign::CertifiedKey>) -> Result<(), TlsError> {
        let config = build_config(cert.clone(), self.challenges.clone(), self.acme)?;
        if let Ok(mut g) = self.config.write() {
            *g = config;
        }
        self.not_after
            .store(not_after(&cert).unwrap_or(0), Ordering::Relaxed);
        Ok(())
    }

    pub fn config(&self) -> Option<Arc<ServerConfig>> {
        self.config.read().ok().map(|g| g.clone())
    }

    /// Unix time the serving certificate expires (0: unknown).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(Ordering::Relaxed)
    }

    pub fn set_challenge(&self, name: &str, cert: Arc<rustls::sign::CertifiedKey>) {
        if let Ok(mut g) = self.challenges.write() {
            g.insert(name.to_ascii_lowercase(), cert);
        }
    }

    pub fn clear_challenge(&self, name: &str) {
        if let Ok(mut g) = self.challenges.write() {
            g.remove(&name.to_ascii_lowercase());
        }
    }
}

fn build_config(
    cert: Arc<rustls::sign::CertifiedKey>,
    challenges: Arc<RwLock<HashMap<String, Arc<rustls::sign::CertifiedKey>>>>,
    acme: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver { cert, challenges }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if acme {
        cfg.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Ok(Arc::new(cfg))
}

/// Expiry of the leaf certificate (Unix time).
pub fn not_after(cert: &rustls::sign::CertifiedKey) -> Option<i64> {
    let leaf = cert.cert.first()?;
    let (_, c) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(c.validity().not_after.timestamp())
}

/// Reads a PEM chain and pairs it with its key; refuses a key that is not
/// the certificate's.
pub fn load_certified(
    cert: &Path,
    key: &TlsKeySource,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|e| TlsError::Read(cert.into(), e))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read(cert.into(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert.into()));
    }
    let signing: Arc<dyn rustls::sign::SigningKey> = match key {
        TlsKeySource::File(key) => {
            let key_pem = zeroize::Zeroizing::new(
                std::fs::read(key).map_err(|e| TlsError::Read(key.clone(), e))?,
            );
            let key_der: PrivateKeyDer<'static> =
                rustls_pemfile::private_key(&mut key_pem.as_slice())
                    .map_err(|e| TlsError::Read(key.clone(), e))?
                    .ok_or_else(|| TlsError::NoKey(key.clone()))?;
            rustls::crypto::ring::sign::any_supported_type(&key_der)?
        }
        TlsKeySource::Hsm(k) => Arc::new(hsm_key::HsmSigningKey(k.clone())),
    };
    let certified = rustls::sign::CertifiedKey::new(certs, signing);
    match certified.keys_match() {
        Ok(()) => Ok(Arc::new(certified)),
        Err(_) if matches!(key, TlsKeySource::Hsm(_)) => Err(TlsError::Mismatch(cert.into())),
        Err(e) => Err(TlsError::Rustls(e)),
    }
}

/// A certificate file and its key, as a serving state (files mode).
pub fn load_tls(cert: &Path, key: &TlsKeySource) -> Result<Arc<TlsState>, TlsError> {
    TlsState::new(load_certified(cert, key)?, false)
}

/// Re-reads the certificate (and a key file) on SIGHUP; a file that does
/// not load leaves the current certificate serving.
pub fn spawn_reloader(current: Arc<TlsState>, cert: PathBuf, key: TlsKeySource) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; certificate reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match load_certified(&cert, &key).and_then(|c| current.install(c)) {
                Ok(()) => {
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; keeping the current certificate")
                }
            }
        }
    });
}
