//! `register-url`: a one-time registration URL (JSON) for binding to Token
//! Vault; its bind code is sealed into the store.

use super::device::open_device;
use super::setup::{load_for_run, open_store, refuse_root};
use anyhow::Result;
use std::path::Path;

pub fn run(config: &Path) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let store = open_store(&cfg)?;
    let backend = crate::custody::keyring::keyring(open_device(&cfg)?.backend(), &store);
    let (reg, rec) = crate::binding::prepare(
        &backend,
        &cfg.binding.frontend_url,
        &cfg.public_url(cfg.server.listen),
        cfg.binding.code_ttl_secs,
        crate::server::now(),
    )?;
    store.put_bind_code_blocking(&reg.code, &rec)?;
    println!("{}", serde_json::to_string_pretty(&reg)?);
    Ok(())
}
