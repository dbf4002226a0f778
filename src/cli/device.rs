//! The configured key device: a PKCS#11 token (its PIN from the systemd
//! credential or a file) or a TPM; and the certificate key it may hold.

use super::setup::read_secret_file;
use crate::config::{Config, KeyBackendKind};
use crate::keys::pkcs11::{find_softhsm_module, open_module, Pkcs11Backend};
use crate::keys::tpm::{TpmBackend, TpmSettings};
use crate::keys::Backend;
use crate::tls::TlsKeySource;
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) fn read_pin_for_doctor(cfg: &Config) -> Result<()> {
    read_secret_file(&pin_source(cfg)?).map(|_| ())
}

/// Where the user PIN is read from: the systemd credential first (the
/// service), then the file (operator commands run as the service user).
pub(crate) fn pin_source(cfg: &Config) -> Result<PathBuf> {
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
