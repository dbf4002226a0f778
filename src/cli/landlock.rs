//! The Landlock plan for a configuration, and applying it.

use super::device::pin_source;
use crate::config::{Config, KeyBackendKind, Profile};
use crate::keys::pkcs11::find_softhsm_module;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The SoftHSM token directory named in a softhsm2.conf.
fn softhsm_token_dir(conf: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(conf).ok()?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "directories.tokendir")
        .map(|(_, v)| PathBuf::from(v.trim()))
}

/// System files every deployment reads: libraries (the PKCS#11 module's
/// dependencies, NSS), CA bundles, resolver configuration. Missing ones are
/// skipped (they differ between distributions).
const SYSTEM_READ_ONLY: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/etc/ssl/certs",
    "/usr/share/ca-certificates",
    "/etc/pki/tls/certs",
    "/etc/pki/ca-trust",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
];

/// The Landlock plan for this configuration.
pub fn sandbox_plan(cfg: &Config, listen: SocketAddr) -> crate::sandbox::landlock::Plan {
    let mut ro: Vec<PathBuf> = vec![cfg.source.clone()];
    // ACME keeps its certificate under the state dir (read-write below).
    let cert = Some(&cfg.tls.cert).filter(|_| cfg.tls.mode == crate::config::TlsMode::Files);
    for f in [cert, cfg.tls.key.as_ref()].into_iter().flatten() {
        if let Some(d) = f.parent() {
            if !ro.contains(&d.to_path_buf()) {
                ro.push(d.to_path_buf());
            }
        }
    }
    let mut rw = vec![cfg.store.path.clone()];
    let mut tpm_ports = Vec::new();
    if cfg.keys.backend == KeyBackendKind::Tpm {
        // Sealing a new HMAC secret (bind) reaches the TPM after start-up.
        let t = cfg.keys.tpm.clone().unwrap_or_default();
        if let Some(dev) = t.tcti.strip_prefix("device:") {
            rw.push(PathBuf::from(dev));
        } else if let Some(port) = crate::keys::tpm::swtpm::port_of(&t.tcti) {
            tpm_ports = vec![port, port.saturating_add(1)];
        }
    }
    if let Some(p) = cfg
        .keys
        .pkcs11
        .as_ref()
        .filter(|_| cfg.keys.backend == KeyBackendKind::Pkcs11)
    {
        if let Some(m) = p.module.clone().or_else(find_softhsm_module) {
            ro.push(m);
        }
        if let Ok(pin) = pin_source(cfg) {
            if pin.exists() && !ro.contains(&pin) {
                ro.push(pin);
            }
        }
        let conf = p
            .softhsm_conf
            .clone()
            .or_else(|| Some(PathBuf::from("/etc/softhsm/softhsm2.conf")).filter(|c| c.exists()));
        if let Some(conf) = conf {
            if let Some(t) = softhsm_token_dir(&conf) {
                rw.push(t);
            }
            ro.push(conf);
        }
    }
    if let Some(ca) = cfg.tls.acme.as_ref().and_then(|a| a.ca_bundle.as_ref()) {
        if cfg.tls.mode == crate::config::TlsMode::Acme {
            ro.push(ca.clone());
        }
    }
    // The database: its CA and password file, and its port (below).
    let mut db_ports = Vec::new();
    if let Some(pg) = cfg
        .store
        .postgres
        .as_ref()
        .filter(|_| cfg.store.backend == crate::config::StoreBackendKind::Postgres)
    {
        ro.push(pg.ca_file.clone());
        if let Ok(f) = super::setup::pg_password_source(cfg) {
            if f.exists() && !ro.contains(&f) {
                ro.push(f);
            }
        }
        db_ports.push(pg.port());
    }
    ro.extend(cfg.sandbox.extra_read_only.iter().cloned());
    rw.extend(cfg.sandbox.extra_read_write.iter().cloned());
    // The audit export file is created (and appended to) in its directory.
    if let Some(dir) = cfg.audit.export_file.as_ref().and_then(|p| p.parent()) {
        rw.push(dir.to_path_buf());
    }
    // The helper socket is created (and replaced) in its directory.
    if let Some(dir) = cfg.helper.socket.as_ref().and_then(|p| p.parent()) {
        rw.push(dir.to_path_buf());
    }
    ro.extend(
        SYSTEM_READ_ONLY
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists()),
    );
    let connect_ports = match (&cfg.sandbox.connect_ports, cfg.profile) {
        (Some(ports), _) => Some(ports.clone()),
        (None, Profile::Dev) => None,
        (None, Profile::Production) => Some(vec![443]),
    }
    .map(|mut p| {
        for t in tpm_ports.iter().chain(db_ports.iter()) {
            if !p.contains(t) {
                p.push(*t);
            }
        }
        p
    });
    crate::sandbox::landlock::Plan {
        read_only: ro,
        read_write: rw,
        bind_ports: Some(listen.port()).filter(|p| *p != 0).map(|p| {
            let mut v = vec![p];
            if let Some(h) = cfg.tls.acme.as_ref().and_then(|a| a.http01_listen) {
                if cfg.tls.mode == crate::config::TlsMode::Acme {
                    v.push(h.port());
                }
            }
            if let Some(m) = cfg.metrics.listen.filter(|m| m.port() != 0) {
                v.push(m.port());
            }
            if let Some(h) = cfg.helper.listen.filter(|h| h.port() != 0) {
                v.push(h.port());
            }
            v
        }),
        connect_ports,
    }
}

/// Applies Landlock (before any thread exists) and logs the rules and the
/// self-test. `enabled = false` is for debugging and says so loudly.
pub fn sandbox(cfg: &Config, listen: SocketAddr, enabled: bool) -> Result<()> {
    crate::sandbox::notify::init();
    if !enabled || !cfg.sandbox.landlock {
        tracing::warn!(
            "LANDLOCK DISABLED ({}): the service runs without its filesystem and network sandbox",
            if enabled {
                "sandbox.landlock = false"
            } else {
                "--landlock=off"
            }
        );
        return Ok(());
    }
    // The state dir is ours to create; every other path must already exist.
    crate::fsutil::create_private_dir(&cfg.store.path)
        .with_context(|| format!("cannot create {}", cfg.store.path.display()))?;
    let plan = sandbox_plan(cfg, listen);
    match crate::sandbox::landlock::apply(&plan)? {
        None => tracing::warn!("this kernel has no Landlock: running without the sandbox"),
        Some(applied) => {
            tracing::info!(abi = applied.abi, rules = %applied.rules.join("; "), "landlock enforced");
            for line in crate::sandbox::landlock::self_test(&plan) {
                tracing::info!("{line}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::REFERENCE_CONFIG;

    fn tpm_config(tcti: &str, pcrs: &str) -> Config {
        let text = REFERENCE_CONFIG
            .replace("backend = \"pkcs11\"", "backend = \"tpm\"")
            .replace(
                "tcti = \"device:/dev/tpmrm0\"",
                &format!("tcti = \"{tcti}\""),
            )
            .replace("pcrs = []", &format!("pcrs = {pcrs}"));
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn tpm_sandbox_reaches_the_tpm_and_nothing_of_softhsm() {
        let listen: SocketAddr = ([0, 0, 0, 0], 8443).into();
        let c = tpm_config("device:/dev/tpmrm0", "[7]");
        assert_eq!(c.keys.tpm.as_ref().unwrap().pcrs, vec![7]);
        let plan = sandbox_plan(&c, listen);
        assert!(plan.read_write.contains(&PathBuf::from("/dev/tpmrm0")));
        assert!(!plan
            .read_only
            .iter()
            .chain(plan.read_write.iter())
            .any(|p| p.to_string_lossy().contains("softhsm")));
        assert_eq!(plan.connect_ports, Some(vec![443]));
        // A simulator over TCP: its server and control ports, no device.
        let c = tpm_config("swtpm:host=127.0.0.1,port=2321", "[]");
        let plan = sandbox_plan(&c, listen);
        assert_eq!(plan.connect_ports, Some(vec![443, 2321, 2322]));
        assert!(!plan.read_write.contains(&PathBuf::from("/dev/tpmrm0")));
        // Bad TCTIs and PCRs are configuration errors.
        let text = REFERENCE_CONFIG.replace("pcrs = []", "pcrs = [24]");
        assert!(Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .contains("PCR 24"));
        let text = REFERENCE_CONFIG.replace("tcti = \"device:/dev/tpmrm0\"", "tcti = \"bogus\"");
        assert!(Config::parse(&text)
            .unwrap()
            .validate()
            .unwrap_err()
            .contains("keys.tpm.tcti \"bogus\""));
    }
}
