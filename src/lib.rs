//! tokenvault-webhook: a hardware-backed Token Vault webhook appliance.

pub mod app;
pub mod binding;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod custody;
pub mod egress;
pub mod fsutil;
pub mod keys;
pub mod netaddr;
pub mod protocol;
pub mod sandbox;
pub mod server;
pub mod store;
#[cfg(test)]
pub mod testvectors;
pub mod tls;
