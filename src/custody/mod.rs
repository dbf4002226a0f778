//! Credential custody: tickets, sealed token documents, GCP minting.

pub mod codes;
pub mod fields;
pub mod gcp;
pub mod keyring;
pub mod policy;
pub mod rotate;
pub mod ticket;
pub mod totp;
