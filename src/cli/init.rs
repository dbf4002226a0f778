//! `init`: the AES key, the store and the webhook id (idempotent).

use super::device::{open_device, Device};
use super::setup::{load_for_run, open_store_as, refuse_root};
use crate::config::Config;
use crate::keys::Backend;
use crate::store::{Store, META_WEBHOOK_ID};
use anyhow::Result;
use std::path::Path;

pub fn run(config: &Path) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let device = open_device(&cfg)?;
    let (_store, id) = init(&cfg, &device)?;
    let at = match &cfg.store.postgres {
        Some(pg) if cfg.store.backend == crate::config::StoreBackendKind::Postgres => {
            format!("postgres {}", pg.url)
        }
        _ => cfg.store.path.display().to_string(),
    };
    println!("initialised: webhook id {id}, store {at}");
    Ok(())
}

/// `init`: AES key, store, webhook id. Idempotent.
pub fn init(cfg: &Config, device: &Device) -> Result<(Store, String)> {
    device.ensure_aes_key()?;
    store_and_id(cfg, &device.backend())
}

/// `init`, part 2: the store (a PostgreSQL schema created or migrated)
/// and the webhook id.
pub fn store_and_id(cfg: &Config, backend: &Backend) -> Result<(Store, String)> {
    let store = open_store_as(cfg, true)?;
    let mut rnd = [0u8; 12];
    backend.fill_random(&mut rnd)?;
    let id = store.meta_get_or_init_blocking(
        META_WEBHOOK_ID,
        format!("wh_{}", hex::encode(rnd)).into_bytes(),
    )?;
    Ok((store, String::from_utf8_lossy(&id).into_owned()))
}
