//! `tls-key generate|import|show`: the certificate key in the HSM.

use super::device::{open_device, Device};
use super::setup::{load_for_run, refuse_root};
use super::TlsKeyAction;
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use std::sync::Arc;

pub fn run(config: &Path, action: TlsKeyAction) -> Result<()> {
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
