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
    for (what, dir) in [
        ("helper.socket", cfg.helper.socket.as_ref()),
        ("audit.export_file", cfg.audit.export_file.as_ref()),
    ] {
        if let Some(dir) = dir.and_then(|p| p.parent()).filter(|d| !d.is_dir()) {
            eprintln!(
                "{}: warning: {what}'s directory {} does not exist yet",
                config.display(),
                dir.display()
            );
        }
    }
    if cfg.audit.syslog && !cfg.audit.syslog_socket.exists() {
        eprintln!(
            "{}: warning: audit.syslog is on but {} does not exist",
            config.display(),
            cfg.audit.syslog_socket.display()
        );
    }
    if cfg.store.backend == crate::config::StoreBackendKind::Postgres {
        match super::setup::check_database(&cfg) {
            Ok(lines) => {
                for l in lines {
                    println!("{}: {l}", config.display());
                }
            }
            Err((what, fix)) => anyhow::bail!("{what}\n  fix: {fix}"),
        }
    }
    println!(
        "{}: configuration OK (run `doctor` for keys, TLS and files)",
        config.display()
    );
    Ok(())
}
