//! The HSM-held TLS key as rustls and rcgen see it: every handshake
//! signature and certificate-request signature is made in the PKCS#11 token
//! (`keys::pkcs11` holds the key and signs a digest).

use crate::keys::pkcs11::tls::{ecdsa_der, P256_SPKI_PREFIX, TLS_LABEL};
use crate::keys::pkcs11::Pkcs11Backend;
use crate::keys::KeyError;
use sha2::{Digest as _, Sha256};
use std::sync::Arc;

/// The HSM's TLS key as a rustls signing key and an rcgen remote key pair.
pub struct HsmTlsKey {
    backend: Arc<Pkcs11Backend>,
    point: Vec<u8>,
    spki: Vec<u8>,
}

impl std::fmt::Debug for HsmTlsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HsmTlsKey(P-256, {TLS_LABEL})")
    }
}

impl HsmTlsKey {
    pub fn new(backend: Arc<Pkcs11Backend>) -> Result<HsmTlsKey, KeyError> {
        let point = backend.tls_public_point()?;
        let spki = [P256_SPKI_PREFIX, &point].concat();
        Ok(HsmTlsKey {
            backend,
            point,
            spki,
        })
    }

    /// SubjectPublicKeyInfo DER.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }

    fn sign_der(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        let digest: [u8; 32] = Sha256::digest(message).into();
        let raw = self.backend.tls_sign_digest(&digest)?;
        ecdsa_der(&raw).ok_or(KeyError::InvalidInput)
    }
}

#[derive(Debug)]
struct HsmSigner(Arc<HsmTlsKey>);

impl rustls::sign::Signer for HsmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0.sign_der(message).map_err(|e| {
            tracing::error!(error = %e, "TLS handshake signature in the HSM failed");
            rustls::Error::General("HSM signature failed".into())
        })
    }
    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// rustls wants an owned `SigningKey`; this shares one [`HsmTlsKey`].
#[derive(Debug, Clone)]
pub struct HsmSigningKey(pub Arc<HsmTlsKey>);

impl rustls::sign::SigningKey for HsmSigningKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(HsmSigner(self.0.clone())) as Box<dyn rustls::sign::Signer>)
    }
    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        Some(rustls::pki_types::SubjectPublicKeyInfoDer::from(
            self.0.spki(),
        ))
    }
    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ECDSA
    }
}

impl rcgen::RemoteKeyPair for HsmSigningKey {
    fn public_key(&self) -> &[u8] {
        &self.0.point
    }
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0
            .sign_der(msg)
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}
