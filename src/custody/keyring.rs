//! The key device as every process (server and CLI) uses it: seals under
//! the AES generation the store records as active, opens blobs that do not
//! record their generation under any readable one, and tells the device to
//! drop cached copies of generations another process retired.

use crate::keys::{AesGen, Backend, KeyError, SealKeys};
use crate::store::generations::AesState;
use crate::store::Store;
use std::sync::Mutex;
use zeroize::Zeroizing;

/// The device as the appliance uses it: seals under the store's active
/// generation, opens unrecorded blobs under any readable one, and tells the
/// device to drop cached copies of generations another process retired.
pub struct KeyRing {
    inner: Backend,
    store: Store,
    seen: Mutex<Vec<AesGen>>,
}

/// Wraps `inner` for use with `store`.
pub fn keyring(inner: Backend, store: &Store) -> Backend {
    std::sync::Arc::new(KeyRing {
        inner,
        store: store.clone(),
        seen: Mutex::new(Vec::new()),
    })
}

impl KeyRing {
    fn state(&self) -> Result<AesState, KeyError> {
        let st = self.store.aes_state().map_err(|e| {
            tracing::error!(error = %e, "cannot read the AES key state");
            KeyError::Unavailable
        })?;
        let readable = st.readable();
        if let Ok(mut seen) = self.seen.lock() {
            if *seen != readable {
                if seen.iter().any(|g| !readable.contains(g)) {
                    tracing::info!(keep = ?readable, "AES key generation retired; dropping cached copies");
                }
                self.inner.forget_aes_except(&readable);
                *seen = readable;
            }
        }
        Ok(st)
    }
}

impl SealKeys for KeyRing {
    fn seal_with(&self, gen: AesGen, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.inner.seal_with(gen, aad, plaintext)
    }
    fn open_with(
        &self,
        gen: AesGen,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.inner.open_with(gen, aad, sealed)
    }
    fn aes_active(&self) -> Result<AesGen, KeyError> {
        Ok(self.state()?.active)
    }
    fn aes_readable(&self) -> Result<Vec<AesGen>, KeyError> {
        Ok(self.state()?.readable())
    }
}

crate::keys::forward_keys!(KeyRing, inner: base, random, mac, otp, gens);
