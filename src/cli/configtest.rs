//! `configtest`: the configuration file parses and validates; files it
//! names that do not exist yet are warned about.

use crate::config::Config;
use anyhow::Result;
use std::path::Path;

pub fn run(config: &Path) -> Result<()> {
    let cfg = Config::load(config)?;
    for (what, p) in [
        ("tls.cert", Some(&cfg.tls.cert)),
        ("tls.key", cfg.tls.key.as_ref()),
    ]
    .into_iter()
    .filter_map(|(w, p)| Some((w, p?)))
    {
        if !p.exists() {
            eprintln!(
                "{}: warning: {what} {} does not exist yet (create it before starting the service)",
                config.display(),
                p.display()
            );
        }
    }
    if let Some(dir) = cfg.helper.socket.as_ref().and_then(|p| p.parent()) {
        if !dir.is_dir() {
            eprintln!(
                "{}: warning: helper.socket's directory {} does not exist yet",
                config.display(),
                dir.display()
            );
        }
    }
    println!(
        "{}: configuration OK (run `doctor` for keys, TLS and files)",
        config.display()
    );
    Ok(())
}
