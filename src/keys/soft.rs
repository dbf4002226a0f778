//! Software backend for unit tests only (compiled under `cfg(test)`): never a
//! production default, never reachable from configuration.

use super::*;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::Mutex;

/// Installed HMAC keys by id, and the active id.
type HmacKeys = (HashMap<String, Zeroizing<Vec<u8>>>, Option<String>);

pub struct SoftBackend {
    aes: Mutex<std::collections::BTreeMap<AesGen, Zeroizing<[u8; 32]>>>,
    hmac: Mutex<HmacKeys>,
}

impl Default for SoftBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn fresh() -> Zeroizing<[u8; 32]> {
    let mut k = Zeroizing::new([0u8; 32]);
    let _ = getrandom::getrandom(k.as_mut());
    k
}

impl SoftBackend {
    pub fn new() -> Self {
        SoftBackend {
            aes: Mutex::new([(FIRST_AES_GEN, fresh())].into()),
            hmac: Mutex::new((HashMap::new(), None)),
        }
    }
    pub fn without_aes() -> Self {
        SoftBackend {
            aes: Mutex::new(Default::default()),
            hmac: Mutex::new((HashMap::new(), None)),
        }
    }
    fn cipher(&self, gen: AesGen) -> Result<Aes256Gcm, KeyError> {
        let g = self.aes.lock().map_err(|_| KeyError::Unavailable)?;
        let k = g.get(&gen).ok_or(KeyError::NoAesKey)?;
        Aes256Gcm::new_from_slice(k.as_ref()).map_err(|_| KeyError::InvalidInput)
    }
}

impl KeyBackendBase for SoftBackend {
    fn kind(&self) -> &'static str {
        "soft"
    }
    fn healthy(&self) -> bool {
        true
    }
    fn aes_key_present(&self) -> bool {
        self.aes.lock().is_ok_and(|g| !g.is_empty())
    }
    fn probe(&self) -> Result<(), KeyError> {
        Ok(())
    }
}

impl RandomSource for SoftBackend {
    fn fill_random(&self, buf: &mut [u8]) -> Result<(), KeyError> {
        getrandom::getrandom(buf).map_err(|_| KeyError::Unavailable)
    }
}

impl MacKeys for SoftBackend {
    fn install_hmac(&self, secret: &SecretSlice<u8>) -> Result<HmacKeyId, KeyError> {
        if secret.expose_secret().len() < 32 {
            return Err(KeyError::InvalidInput);
        }
        let mut id = [0u8; 8];
        self.fill_random(&mut id)?;
        let id = hex::encode(id);
        let mut g = self.hmac.lock().map_err(|_| KeyError::Unavailable)?;
        g.0.insert(id.clone(), Zeroizing::new(secret.expose_secret().to_vec()));
        Ok(HmacKeyId(id))
    }
    fn activate_hmac(&self, id: &HmacKeyId) -> Result<(), KeyError> {
        let mut g = self.hmac.lock().map_err(|_| KeyError::Unavailable)?;
        if !g.0.contains_key(&id.0) {
            return Err(KeyError::NoHmacKey);
        }
        g.1 = Some(id.0.clone());
        Ok(())
    }
    fn destroy_hmac_except(&self, keep: Option<&HmacKeyId>) -> Result<usize, KeyError> {
        let mut g = self.hmac.lock().map_err(|_| KeyError::Unavailable)?;
        let before = g.0.len();
        g.0.retain(|k, _| keep.is_some_and(|h| &h.0 == k));
        if g.1.as_ref().is_some_and(|a| !g.0.contains_key(a)) {
            g.1 = None;
        }
        Ok(before - g.0.len())
    }
    fn hmac_sha256(&self, data: &[u8]) -> Result<[u8; 32], KeyError> {
        let g = self.hmac.lock().map_err(|_| KeyError::Unavailable)?;
        let id = g.1.as_ref().ok_or(KeyError::NoHmacKey)?;
        let key = g.0.get(id).ok_or(KeyError::NoHmacKey)?;
        let mut m =
            <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| KeyError::InvalidInput)?;
        m.update(data);
        Ok(m.finalize().into_bytes().into())
    }
}

/// The software backend keeps seeds as sealed fields (exercises that path).
impl OtpKeys for SoftBackend {
    fn install_otp(&self, _: &SecretSlice<u8>, _: OtpAlg) -> Result<Option<String>, KeyError> {
        Ok(None)
    }
    fn otp_hmac(&self, _: &str, _: OtpAlg, _: u64) -> Result<Vec<u8>, KeyError> {
        Err(KeyError::InvalidInput)
    }
    fn destroy_otp(&self, _: &str) -> Result<(), KeyError> {
        Ok(())
    }
    fn list_otp(&self) -> Result<Vec<String>, KeyError> {
        Ok(Vec::new())
    }
}

impl SealKeys for SoftBackend {
    fn seal_with(&self, gen: AesGen, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut iv = [0u8; IV_LEN];
        self.fill_random(&mut iv)?;
        let ct = self
            .cipher(gen)?
            .encrypt(
                &Nonce::from(iv),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| KeyError::InvalidInput)?;
        let mut out = iv.to_vec();
        out.extend_from_slice(&ct);
        Ok(out)
    }
    fn open_with(
        &self,
        gen: AesGen,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let (iv, ct) = split_sealed(sealed)?;
        let iv: [u8; IV_LEN] = iv.try_into().map_err(|_| KeyError::DecryptFailed)?;
        self.cipher(gen)?
            .decrypt(&Nonce::from(iv), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| KeyError::DecryptFailed)
    }
}

impl AesGenerations for SoftBackend {
    fn create_aes(&self, gen: AesGen) -> Result<bool, KeyError> {
        let mut g = self.aes.lock().map_err(|_| KeyError::Unavailable)?;
        if g.contains_key(&gen) {
            return Ok(false);
        }
        g.insert(gen, fresh());
        Ok(true)
    }
    fn aes_generations(&self) -> Result<Vec<AesGen>, KeyError> {
        let g = self.aes.lock().map_err(|_| KeyError::Unavailable)?;
        Ok(g.keys().copied().collect())
    }
    fn destroy_aes(&self, gen: AesGen) -> Result<(), KeyError> {
        let mut g = self.aes.lock().map_err(|_| KeyError::Unavailable)?;
        g.remove(&gen);
        Ok(())
    }
    /// One process holds the only copy: nothing cached to drop.
    fn forget_aes_except(&self, _: &[AesGen]) {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn soft_backend_conforms() {
        super::super::conformance::run_all(&super::SoftBackend::new());
        assert!(!super::super::conformance::otp_matches_rfc6238(
            &super::SoftBackend::new()
        ));
    }
}
