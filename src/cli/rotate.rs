//! `rotate-key`: see [`crate::custody::rotate`].

use super::device::open_device;
use super::setup::{load_for_run, refuse_root};
use crate::custody::rotate::{self, Options, Progress};
use anyhow::{anyhow, Result};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

pub fn run(config: &Path, status: bool, batch: usize, pause_ms: u64) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let store = super::setup::open_store(&cfg)?;
    let backend = crate::custody::keyring::keyring(open_device(&cfg)?.backend(), &store);
    if status {
        let st = store.aes_state()?;
        let docs: serde_json::Map<String, serde_json::Value> = store
            .tokens_by_generation()?
            .into_iter()
            .map(|(g, n)| {
                let k = if g == 0 {
                    "unsealed".to_string()
                } else {
                    g.to_string()
                };
                (k, n.into())
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "active": st.active,
                "rotating": st.previous.is_some(),
                "previous": st.previous,
                "closed": st.closed,
                "startedAt": st.started_at,
                "retired": st.retired,
                "deviceGenerations": backend.aes_generations()?,
                "documentsByGeneration": docs,
            }))?
        );
        return Ok(());
    }
    let _lock = store.lock_rotation(&cfg.store.path)?;
    let opts = Options {
        batch,
        pause: Duration::from_millis(pause_ms),
        elsewhere: vec![
            Box::new(crate::broker::oauth::SealedClients(store.clone())),
            Box::new(crate::tls::acme::SealedFiles(cfg.store.path.join("acme"))),
        ],
    };
    let mut show = |p: Progress| {
        match p {
        Progress::Started { from, to } => eprintln!(
            "rotate-key: created AES key generation {to}; new writes use it, generation {from} stays readable until every document is moved"
        ),
        Progress::Resumed { from, to, closed } => eprintln!(
            "rotate-key: resuming the rotation from generation {from} to {to}{}",
            if closed { " (final pass)" } else { "" }
        ),
        Progress::Batch { pass, done, total } => {
            eprintln!("rotate-key: pass {pass}: {done}/{total} documents re-sealed")
        }
        Progress::Closed { from } => eprintln!(
            "rotate-key: generation {from} closed for writes; checking for documents written meanwhile"
        ),
        Progress::Retired { gen } => {
            eprintln!("rotate-key: generation {gen} destroyed in the key device")
        }
    }
    };
    let report = rotate::rotate(&store, &backend, &opts, &mut show).map_err(|e| anyhow!("{e}"))?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
