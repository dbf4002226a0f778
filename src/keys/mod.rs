//! Key backends. A small base trait plus one trait per capability; the rest
//! of the appliance holds a [`Backend`] (`Arc<dyn KeyBackend>`).
//!
//! Backends never touch LMDB: which HMAC key is active is recorded by the
//! store, and handed to the backend with [`MacKeys::activate_hmac`].

#[cfg(test)]
pub mod conformance;
pub mod locked;
pub mod pkcs11;
#[cfg(test)]
pub mod soft;
pub mod tpm;

use secrecy::SecretSlice;
use std::sync::Arc;
use zeroize::Zeroizing;

pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The device or its sessions are not usable right now (503, health degraded).
    #[error("key backend unavailable")]
    Unavailable,
    /// No HMAC key is installed (the webhook is not bound).
    #[error("no HMAC key installed")]
    NoHmacKey,
    /// No AES key exists in the backend (run `init`).
    #[error("no AES key present")]
    NoAesKey,
    /// Authenticated decryption failed: wrong key, wrong AAD, or tampering.
    #[error("decryption failed")]
    DecryptFailed,
    /// The caller passed something the backend refuses (sizes, lengths).
    #[error("invalid input to key backend")]
    InvalidInput,
}

/// Identifier of an HMAC key inside the backend (CKA_ID for PKCS#11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HmacKeyId(pub String);

pub trait KeyBackendBase: Send + Sync {
    /// Short name for logs and health (`pkcs11`, `soft`).
    fn kind(&self) -> &'static str;
    /// False after the last operation failed for a device reason.
    fn healthy(&self) -> bool;
    /// Whether an AES key exists.
    fn aes_key_present(&self) -> bool;
    /// Cheap liveness probe that talks to the device.
    fn probe(&self) -> Result<(), KeyError>;
}

pub trait RandomSource {
    fn fill_random(&self, buf: &mut [u8]) -> Result<(), KeyError>;
}

pub trait MacKeys {
    /// Installs `secret` as a new, non-extractable HMAC key and returns its id.
    /// It is not used until [`MacKeys::activate_hmac`].
    fn install_hmac(&self, secret: &SecretSlice<u8>) -> Result<HmacKeyId, KeyError>;
    /// Makes `id` the key used by [`MacKeys::hmac_sha256`].
    fn activate_hmac(&self, id: &HmacKeyId) -> Result<(), KeyError>;
    /// Destroys every HMAC key except `keep`.
    fn destroy_hmac_except(&self, keep: Option<&HmacKeyId>) -> Result<usize, KeyError>;
    /// HMAC-SHA256 under the active key.
    fn hmac_sha256(&self, data: &[u8]) -> Result<[u8; 32], KeyError>;
}

/// Generation of the AES key: 1 is the key `init` created, each
/// `rotate-key` adds the next. Token documents record theirs (`kid`).
pub type AesGen = u32;
pub const FIRST_AES_GEN: AesGen = crate::protocol::document::FIRST_KID;

pub trait SealKeys {
    /// AES-256-GCM under generation `gen` with a fresh 12-byte IV; returns
    /// IV ‖ ciphertext ‖ tag. `NoAesKey` if that generation does not exist.
    fn seal_with(&self, gen: AesGen, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError>;
    /// Inverse of [`SealKeys::seal_with`].
    fn open_with(
        &self,
        gen: AesGen,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError>;
    /// The generation new seals use. A bare device answers
    /// [`FIRST_AES_GEN`]; the store's key ring answers what the store records
    /// (a wrapper around the key ring must forward this).
    fn aes_active(&self) -> Result<AesGen, KeyError> {
        Ok(FIRST_AES_GEN)
    }
    /// Generations a blob without a recorded generation may be under, the
    /// active one first (more than one only while a rotation runs).
    fn aes_readable(&self) -> Result<Vec<AesGen>, KeyError> {
        Ok(vec![self.aes_active()?])
    }

    /// Seals under the active generation.
    fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.seal_with(self.aes_active()?, aad, plaintext)
    }
    /// Opens a blob that does not record its generation: each readable
    /// generation in turn (GCM's tag tells a wrong key from the right one).
    fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let mut last = KeyError::DecryptFailed;
        for gen in self.aes_readable()? {
            match self.open_with(gen, aad, sealed) {
                Err(e @ (KeyError::DecryptFailed | KeyError::NoAesKey)) => last = e,
                r => return r,
            }
        }
        Err(last)
    }
}

/// What is sealed under the AES key outside the store's documents (OAuth
/// client secrets, ACME files): its owner implements this, and whoever runs
/// a rotation hands it in, so the rotation names none of the owners.
pub trait SealedElsewhere {
    /// For the report and errors: `oauthClients`, `acmeFiles`, ….
    fn name(&self) -> &'static str;
    /// Re-seals everything it owns under `gen`; how many changed.
    fn reseal(&self, backend: &Backend, gen: AesGen) -> Result<usize, String>;
}

/// Re-seals a blob that does not record its generation under `gen`;
/// `None` if it already is. For `rotate-key`.
pub fn reseal_blob(
    b: &dyn KeyBackend,
    gen: AesGen,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Option<Vec<u8>>, KeyError> {
    match b.open_with(gen, aad, sealed) {
        Ok(_) => return Ok(None),
        Err(KeyError::DecryptFailed) => {}
        Err(e) => return Err(e),
    }
    let pt = b.open(aad, sealed)?;
    b.seal_with(gen, aad, &pt).map(Some)
}

/// Creating and retiring AES key generations (`rotate-key`).
pub trait AesGenerations {
    /// Creates generation `gen` (sensitive, non-extractable) unless it
    /// exists. Returns whether it was created.
    fn create_aes(&self, gen: AesGen) -> Result<bool, KeyError>;
    /// Generations present in the device, ascending.
    fn aes_generations(&self) -> Result<Vec<AesGen>, KeyError>;
    /// Destroys generation `gen` in the device (absent is not an error).
    fn destroy_aes(&self, gen: AesGen) -> Result<(), KeyError>;
    /// Drops this process's cached copies (session objects, unsealed
    /// memory) of every generation not in `keep`: another process retired them.
    fn forget_aes_except(&self, keep: &[AesGen]);
}

/// HMAC hash of a TOTP seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtpAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl OtpAlg {
    pub fn name(self) -> &'static str {
        match self {
            OtpAlg::Sha1 => "SHA1",
            OtpAlg::Sha256 => "SHA256",
            OtpAlg::Sha512 => "SHA512",
        }
    }
    /// HMAC block size: longer keys are hashed first by HMAC itself.
    pub fn block_len(self) -> usize {
        match self {
            OtpAlg::Sha1 | OtpAlg::Sha256 => 64,
            OtpAlg::Sha512 => 128,
        }
    }
}

/// TOTP seeds held by the device. A backend that cannot answers `None` from
/// [`OtpKeys::install_otp`] and the seed is kept as a sealed field instead.
pub trait OtpKeys {
    /// Imports a seed as a non-extractable key; its id, or `None` if unsupported.
    fn install_otp(&self, seed: &SecretSlice<u8>, alg: OtpAlg) -> Result<Option<String>, KeyError>;
    /// HMAC of the 8-byte big-endian `counter` under seed `id`.
    fn otp_hmac(&self, id: &str, alg: OtpAlg, counter: u64) -> Result<Vec<u8>, KeyError>;
    fn destroy_otp(&self, id: &str) -> Result<(), KeyError>;
    /// Ids of every seed object (for orphan removal at start-up).
    fn list_otp(&self) -> Result<Vec<String>, KeyError>;
}

pub trait KeyBackend:
    KeyBackendBase + RandomSource + MacKeys + SealKeys + AesGenerations + OtpKeys
{
}
impl<T: KeyBackendBase + RandomSource + MacKeys + SealKeys + AesGenerations + OtpKeys> KeyBackend
    for T
{
}

pub type Backend = Arc<dyn KeyBackend>;

/// Implements the named capability traits for a wrapper by forwarding every
/// method to its field `$inner` (a [`Backend`]); the wrapper writes the
/// traits it changes itself. Capabilities: `base`, `random`, `mac`, `otp`,
/// `gens`.
macro_rules! forward_keys {
    ($ty:ty, $inner:ident: $($cap:ident),+) => {
        $($crate::keys::forward_keys!(@$cap $ty, $inner);)+
    };
    (@base $ty:ty, $inner:ident) => {
        impl $crate::keys::KeyBackendBase for $ty {
            fn kind(&self) -> &'static str {
                self.$inner.kind()
            }
            fn healthy(&self) -> bool {
                self.$inner.healthy()
            }
            fn aes_key_present(&self) -> bool {
                self.$inner.aes_key_present()
            }
            fn probe(&self) -> Result<(), $crate::keys::KeyError> {
                self.$inner.probe()
            }
        }
    };
    (@random $ty:ty, $inner:ident) => {
        impl $crate::keys::RandomSource for $ty {
            fn fill_random(&self, buf: &mut [u8]) -> Result<(), $crate::keys::KeyError> {
                self.$inner.fill_random(buf)
            }
        }
    };
    (@mac $ty:ty, $inner:ident) => {
        impl $crate::keys::MacKeys for $ty {
            fn install_hmac(
                &self,
                secret: &secrecy::SecretSlice<u8>,
            ) -> Result<$crate::keys::HmacKeyId, $crate::keys::KeyError> {
                self.$inner.install_hmac(secret)
            }
            fn activate_hmac(
                &self,
                id: &$crate::keys::HmacKeyId,
            ) -> Result<(), $crate::keys::KeyError> {
                self.$inner.activate_hmac(id)
            }
            fn destroy_hmac_except(
                &self,
                keep: Option<&$crate::keys::HmacKeyId>,
            ) -> Result<usize, $crate::keys::KeyError> {
                self.$inner.destroy_hmac_except(keep)
            }
            fn hmac_sha256(&self, data: &[u8]) -> Result<[u8; 32], $crate::keys::KeyError> {
                self.$inner.hmac_sha256(data)
            }
        }
    };
    (@otp $ty:ty, $inner:ident) => {
        impl $crate::keys::OtpKeys for $ty {
            fn install_otp(
                &self,
                seed: &secrecy::SecretSlice<u8>,
                alg: $crate::keys::OtpAlg,
            ) -> Result<Option<String>, $crate::keys::KeyError> {
                self.$inner.install_otp(seed, alg)
            }
            fn otp_hmac(
                &self,
                id: &str,
                alg: $crate::keys::OtpAlg,
                counter: u64,
            ) -> Result<Vec<u8>, $crate::keys::KeyError> {
                self.$inner.otp_hmac(id, alg, counter)
            }
            fn destroy_otp(&self, id: &str) -> Result<(), $crate::keys::KeyError> {
                self.$inner.destroy_otp(id)
            }
            fn list_otp(&self) -> Result<Vec<String>, $crate::keys::KeyError> {
                self.$inner.list_otp()
            }
        }
    };
    (@gens $ty:ty, $inner:ident) => {
        impl $crate::keys::AesGenerations for $ty {
            fn create_aes(&self, gen: $crate::keys::AesGen) -> Result<bool, $crate::keys::KeyError> {
                self.$inner.create_aes(gen)
            }
            fn aes_generations(&self) -> Result<Vec<$crate::keys::AesGen>, $crate::keys::KeyError> {
                self.$inner.aes_generations()
            }
            fn destroy_aes(&self, gen: $crate::keys::AesGen) -> Result<(), $crate::keys::KeyError> {
                self.$inner.destroy_aes(gen)
            }
            fn forget_aes_except(&self, keep: &[$crate::keys::AesGen]) {
                self.$inner.forget_aes_except(keep)
            }
        }
    };
}
pub(crate) use forward_keys;

/// Checks the sealed layout before it reaches a device that would accept odd sizes.
pub(crate) fn split_sealed(sealed: &[u8]) -> Result<(&[u8], &[u8]), KeyError> {
    if sealed.len() < IV_LEN + TAG_LEN {
        return Err(KeyError::DecryptFailed);
    }
    Ok(sealed.split_at(IV_LEN))
}
