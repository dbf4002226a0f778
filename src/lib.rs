//! tokenvault-webhook: a hardware-backed Token Vault webhook appliance.

pub mod keys;
pub mod protocol;
pub mod store;
