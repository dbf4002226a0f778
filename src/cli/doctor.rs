//! `doctor`: checks an installation end to end and prints one line per
//! finding with its fix. Exits non-zero on any problem.

use super::device::{open_pkcs11, read_pin_for_doctor};
use super::setup::prepare_module_env;
use crate::config::{Config, KeyBackendKind};
use crate::keys::KeyBackendBase;
use anyhow::{bail, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

struct Report {
    problems: usize,
    warnings: usize,
}

impl Report {
    fn ok(&self, what: &str) {
        println!("ok      {what}");
    }
    fn warn(&mut self, what: &str, fix: &str) {
        self.warnings += 1;
        println!("warning {what} -> {fix}");
    }
    fn fail(&mut self, what: &str, fix: &str) {
        self.problems += 1;
        println!("PROBLEM {what} -> {fix}");
    }
}

fn mode(p: &Path) -> Option<(u32, u32)> {
    std::fs::metadata(p)
        .ok()
        .map(|m| (m.permissions().mode() & 0o7777, m.uid()))
}

pub fn run(config: &Path) -> Result<()> {
    let mut r = Report {
        problems: 0,
        warnings: 0,
    };
    let cfg = match Config::load(config) {
        Ok(c) => {
            r.ok(&format!("config {} is valid", config.display()));
            c
        }
        Err(e) => {
            r.fail(
                &format!("config: {e}"),
                "fix the file (see packaging/config.reference.toml)",
            );
            bail!("1 problem");
        }
    };
    prepare_module_env(&cfg);
    // SAFETY: reads only.
    let uid = unsafe { libc::geteuid() };
    if let Some((m, _)) = mode(config) {
        if m & 0o002 != 0 {
            r.fail(
                &format!("{} is world-writable", config.display()),
                "chmod o-w it",
            );
        }
    }
    // State directory.
    match mode(&cfg.store.path) {
        None => r.fail(
            &format!("state dir {} missing", cfg.store.path.display()),
            "run `init` (or systemctl start, which runs it)",
        ),
        Some((m, owner)) => {
            if owner != uid {
                r.fail(
                    &format!(
                        "state dir {} is owned by uid {owner}, not this user ({uid})",
                        cfg.store.path.display()
                    ),
                    "run doctor as the service user, or chown it to the service user",
                );
            } else if m & 0o077 != 0 {
                r.fail(
                    &format!("state dir {} has mode {m:o}", cfg.store.path.display()),
                    "chmod 700 it",
                );
            } else {
                r.ok(&format!(
                    "state dir {} (mode {m:o})",
                    cfg.store.path.display()
                ));
            }
        }
    }
    // TLS.
    let acme_unissued = cfg.tls.mode == crate::config::TlsMode::Acme && !cfg.tls.cert.exists();
    if cfg.tls.mode == crate::config::TlsMode::Acme {
        let a = cfg.tls.acme.as_ref();
        r.ok(&format!(
            "TLS by ACME from {} for {:?}",
            a.map(|a| a.directory_url.as_str()).unwrap_or("?"),
            a.map(|a| a.domains.clone()).unwrap_or_default()
        ));
        if acme_unissued {
            r.warn(
                "no ACME certificate issued yet",
                "start the service; check that the domains resolve here and port 443 reaches server.listen",
            );
        }
    }
    let key_source = if cfg.tls.mode == crate::config::TlsMode::Acme && !cfg.tls.key_in_hsm {
        Err(("".to_string(), "".to_string()))
    } else {
        tls_key_for_doctor(&cfg)
    };
    match (std::fs::read(&cfg.tls.cert), key_source) {
        _ if acme_unissued => {}
        (Ok(pem), Err((what, _))) if what.is_empty() => report_expiry(&mut r, &pem),
        (Err(e), _) => r.fail(
            &format!("TLS certificate {}: {e}", cfg.tls.cert.display()),
            "install a certificate there (PEM chain)",
        ),
        (_, Err((what, fix))) => r.fail(&what, &fix),
        (Ok(pem), Ok(source)) => {
            if let crate::tls::TlsKeySource::File(key) = &source {
                if let Some((km, _)) = mode(key) {
                    if km & 0o027 != 0 {
                        r.fail(
                            &format!("TLS key {} has mode {km:o}", key.display()),
                            "chmod 640 (or 600) it",
                        );
                    }
                }
            } else {
                r.ok("TLS key is in the HSM");
            }
            match crate::tls::load_tls(&cfg.tls.cert, &source) {
                Err(e) => r.fail(
                    &format!("TLS: {e}"),
                    "check the certificate and key match and are PEM",
                ),
                Ok(_) => report_expiry(&mut r, &pem),
            }
        }
    }
    // Clock.
    let year = time::OffsetDateTime::now_utc().year();
    if !(2024..2100).contains(&year) {
        r.fail(
            &format!("system clock says {year}"),
            "fix the clock (NTP): tickets and TOTP depend on it",
        );
    } else {
        r.ok("system clock plausible");
    }
    // Landlock.
    match crate::sandbox::landlock::kernel_abi() {
        0 => r.warn(
            "kernel has no Landlock",
            "use a kernel with Landlock (5.13+, network rules 6.7+)",
        ),
        a if a < 4 => r.warn(
            &format!("Landlock ABI {a}: no network rules"),
            "use a kernel 6.7 or newer",
        ),
        a => r.ok(&format!("Landlock ABI {a}")),
    }
    check_limits(&cfg, &mut r);
    // The database (store.backend = "postgres").
    if cfg.store.backend == crate::config::StoreBackendKind::Postgres {
        match super::setup::check_database(&cfg) {
            Ok(lines) => {
                for l in lines {
                    r.ok(&l);
                }
            }
            Err((what, fix)) => r.fail(&what, &fix),
        }
    }
    // Keys.
    match cfg.keys.backend {
        KeyBackendKind::Pkcs11 => check_pkcs11(&cfg, &mut r),
        KeyBackendKind::Tpm => check_tpm(&cfg, &mut r),
    }
    if r.problems > 0 {
        bail!("{} problem(s), {} warning(s)", r.problems, r.warnings);
    }
    println!("doctor: no problems ({} warning(s))", r.warnings);
    Ok(())
}

/// The hostile-network limits, the trail's bound and where the bind helpers are.
fn check_limits(cfg: &Config, r: &mut Report) {
    let l = &cfg.limits;
    r.ok(&format!(
        "limits: {} connections per client (IPv6 per /{}), bodies within {} s at >= {} B/s after {} s, {} MiB body budget, {} failures/min (burst {}) per client, {} exchanges/min, {} failure log lines/min",
        l.max_connections_per_ip,
        l.ipv6_prefix_len,
        l.request_timeout_secs,
        l.min_body_bytes_per_sec,
        l.body_grace_secs,
        l.body_budget_mib,
        l.failures_per_minute,
        l.failure_burst,
        l.exchange_per_minute,
        l.failure_log_lines_per_minute,
    ));
    if l.max_connections_per_ip == 0 {
        r.warn(
            "limits.max_connections_per_ip = 0: one address can hold every connection",
            "set a cap (64 by default); behind a TCP load balancer size it for the balancer",
        );
    }
    if l.failures_per_minute == 0 {
        r.warn(
            "limits.failures_per_minute = 0: unauthenticated failures are not limited per address",
            "set a budget (120 by default)",
        );
    }
    r.ok(&format!(
        "audit trail bounded to {} % of the {} MiB map, {} % of the map reserved for documents and once-only records",
        cfg.audit.max_share_percent, cfg.store.map_size_mib, cfg.store.reserve_percent
    ));
    // Token Vault's own refresh hands refresh tokens to whoever signs.
    match &cfg.refresh.tv_refresh {
        crate::config::ServiceSwitch::Off => r.ok(
            "refresh.tv_refresh off: no refresh token leaves the box (refresh-notify with an `oauth-client` refreshes here)",
        ),
        t => r.ok(&format!(
            "refresh.tv_refresh {}: whoever holds the HMAC secret can read those services' refresh tokens (Token Vault's built-in Google/GitHub refresh needs it)",
            t.describe()
        )),
    }
    r.ok(&format!(
        "owner approvals: decidable for {} s, requests wait {} s, at most {} pending (`policy show` lists the rules)",
        cfg.policy.approval_ttl_secs, cfg.policy.approval_wait_secs, cfg.policy.max_pending_approvals
    ));
    check_policies(cfg, r);
    if cfg.audit.syslog {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(&cfg.audit.syslog_socket) {
            Ok(m) if m.file_type().is_socket() => r.ok(&format!(
                "audit trail streamed to syslog at {}",
                cfg.audit.syslog_socket.display()
            )),
            _ => r.warn(
                &format!(
                    "audit.syslog is on but {} is not a socket",
                    cfg.audit.syslog_socket.display()
                ),
                "set audit.syslog_socket to the syslog/journald socket (/dev/log, /run/systemd/journal/dev-log)",
            ),
        }
    }
    if let Some(f) = &cfg.audit.export_file {
        match f.parent().map(|d| d.is_dir()) {
            Some(true) => r.ok(&format!("audit trail appended to {}", f.display())),
            _ => r.warn(
                &format!(
                    "audit.export_file's directory for {} does not exist",
                    f.display()
                ),
                "create it, writable by the service user (the package's unit has LogsDirectory=)",
            ),
        }
    }
    let mut helpers = Vec::new();
    if let Some(h) = cfg.helper.listen {
        helpers.push(format!("http://{h}"));
    }
    if let Some(p) = &cfg.helper.socket {
        helpers.push(format!("unix:{}", p.display()));
        if p.parent().is_some_and(|d| !d.is_dir()) {
            r.fail(
                &format!(
                    "helper.socket {}: its directory does not exist",
                    p.display()
                ),
                "create it (systemd: RuntimeDirectory=) or change helper.socket",
            );
        }
    }
    match (cfg.profile, helpers.is_empty()) {
        (crate::config::Profile::Dev, _) => r.ok(
            "dev: bind helpers also on the public listener, to loopback peers without forwarding headers",
        ),
        (_, true) => r.ok("bind helpers: only `register-url` (none served)"),
        (_, false) => r.ok(&format!("bind helpers on {}", helpers.join(" and "))),
    }
}

fn check_pkcs11(cfg: &Config, r: &mut Report) {
    if let Err(e) = read_pin_for_doctor(cfg) {
        r.fail(
            &format!("HSM PIN: {e}"),
            "provide the PIN file (0640 root:tokenvault-webhook) or run under systemd",
        );
    } else {
        match open_pkcs11(cfg) {
            Err(e) => r.fail(
                &format!("key backend: {e:#}"),
                "check keys.pkcs11 (module, token_label, PIN)",
            ),
            Ok(b) => {
                if b.probe().is_ok() {
                    r.ok("key backend reachable, logged in");
                } else {
                    r.fail("key backend does not answer", "check the HSM");
                }
                if b.aes_key_present() {
                    match b.aes_key_attributes() {
                        Ok((true, false)) => {
                            r.ok("AES-256 key present, sensitive, non-extractable")
                        }
                        Ok(_) => r.fail(
                            "AES key is extractable or not sensitive",
                            "recreate the token's keys",
                        ),
                        Err(_) => r.fail("AES key attributes unreadable", "check the HSM"),
                    }
                } else {
                    r.fail("no AES key in the HSM", "run `init`");
                }
                check_generations(cfg, b.as_ref(), r);
            }
        }
    }
}

/// The store, if one exists (a warning if it does not open).
fn existing_store(cfg: &Config, r: &mut Report) -> Option<crate::store::Store> {
    if cfg.store.backend == crate::config::StoreBackendKind::Lmdb
        && !cfg
            .store
            .path
            .join(crate::store::backup::DATA_FILE)
            .exists()
    {
        return None;
    }
    match super::setup::open_store(cfg) {
        Ok(s) => Some(s),
        Err(e) => {
            r.warn(&format!("store: {e}"), "check the state dir");
            None
        }
    }
}

/// The owner's policies (which services, which rules) and the approvals
/// waiting for the owner.
fn check_policies(cfg: &Config, r: &mut Report) {
    let Some(store) = existing_store(cfg, r) else {
        return;
    };
    match store.policy_all() {
        Ok(all) if all.is_empty() => r.ok("owner policy: none set (every signed use is obeyed)"),
        Ok(all) => {
            let mut shown = Vec::new();
            for (service, raw) in all {
                match serde_json::from_slice::<crate::custody::policy::Policy>(&raw) {
                    Ok(p) => shown.push(format!(
                        "{service} {}",
                        serde_json::to_string(&p).unwrap_or_default()
                    )),
                    Err(_) => r.fail(
                        &format!("owner policy of {service} does not parse"),
                        "set it again with `policy set`",
                    ),
                }
            }
            r.ok(&format!(
                "owner policy on {} service(s): {}",
                shown.len(),
                shown.join("; ")
            ));
        }
        Err(e) => r.warn(&format!("owner policies: {e}"), "check the state dir"),
    }
    let now = crate::clock::system_now();
    let waiting = store.approval_all().map(|all| {
        all.into_iter()
            .filter(|a| {
                a.state == crate::store::policy::ApprovalState::Pending && a.expires_at > now
            })
            .count()
    });
    if let Some(n) = waiting.ok().filter(|n| *n > 0) {
        r.warn(
            &format!("{n} use(s) waiting for the owner's approval"),
            "see `approvals list --pending`, then `approve ID` or `deny ID`",
        );
    }
}

/// The store's active AES generation is in the device; no rotation is
/// left half-way.
fn check_generations(cfg: &Config, device: &dyn crate::keys::KeyBackend, r: &mut Report) {
    let Some(store) = existing_store(cfg, r) else {
        return;
    };
    let st = match store.aes_state() {
        Ok(st) => st,
        Err(e) => return r.warn(&format!("store: {e}"), "check the state dir"),
    };
    let gens = device.aes_generations().unwrap_or_default();
    if !gens.contains(&st.active) {
        r.fail(
            &format!(
                "the store's AES key generation {} is not in the key device (it has {gens:?})",
                st.active
            ),
            "use the device that holds this store's keys, or restore them with the device's tools",
        );
    } else if let Some(from) = st.previous {
        r.warn(
            &format!(
                "a key rotation from generation {from} to {} has not finished",
                st.active
            ),
            "run `tokenvault-webhook rotate-key` again: it resumes",
        );
    } else {
        r.ok(&format!("AES key generation {} active", st.active));
    }
}

fn check_tpm(cfg: &Config, r: &mut Report) {
    let tcti = cfg.keys.tpm.clone().unwrap_or_default().tcti;
    match super::device::open_device(cfg) {
        Err(e) => r.fail(
            &format!("key backend: {e:#}"),
            "check keys.tpm (tcti, pcrs), the tss group and the sealed blobs",
        ),
        Ok(super::device::Device::Tpm(b)) => {
            r.ok(&format!("TPM reachable via {tcti}"));
            if b.aes_key_present() && b.keys_locked() {
                r.ok("AES-256 key unsealed from the TPM into locked memory");
            } else if b.aes_key_present() {
                r.fail(
                    "unsealed keys are not in locked memory",
                    "raise LimitMEMLOCK= (RLIMIT_MEMLOCK)",
                );
            } else {
                r.fail("no AES key sealed to the TPM", "run `init`");
            }
            check_generations(cfg, b.as_ref(), r);
            let dir = super::device::tpm_blob_dir(cfg);
            match std::fs::metadata(&dir) {
                Ok(m) if m.permissions().mode() & 0o077 == 0 => {
                    r.ok(&format!("{} is private", dir.display()))
                }
                Ok(m) => r.warn(
                    &format!(
                        "{} has mode {:o}",
                        dir.display(),
                        m.permissions().mode() & 0o777
                    ),
                    &format!("chmod 700 {}", dir.display()),
                ),
                Err(_) => {}
            }
        }
        Ok(_) => r.fail("key backend is not the TPM", "check keys.backend"),
    }
}

/// The TLS key source, or a finding and its fix.
fn tls_key_for_doctor(cfg: &Config) -> Result<crate::tls::TlsKeySource, (String, String)> {
    if cfg.tls.key_in_hsm {
        let device = super::device::open_device(cfg).map_err(|e| {
            (
                format!("HSM for the TLS key: {e:#}"),
                "check [keys.pkcs11]".to_string(),
            )
        })?;
        return super::device::tls_key_source_inner(cfg, &device).map_err(|e| {
            (
                format!("TLS key: {e:#}"),
                "tokenvault-webhook tls-key generate --csr FILE (or tls-key import)".to_string(),
            )
        });
    }
    match &cfg.tls.key {
        Some(k) if mode(k).is_some() => Ok(crate::tls::TlsKeySource::File(k.clone())),
        Some(k) => Err((
            format!("TLS key {} missing", k.display()),
            "install the private key there (PEM)".to_string(),
        )),
        None => Err((
            "tls.key not set".to_string(),
            "set tls.key or tls.key_in_hsm".to_string(),
        )),
    }
}

fn report_expiry(r: &mut Report, pem: &[u8]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match x509_parser::pem::parse_x509_pem(pem) {
        Ok((_, p)) => match p.parse_x509() {
            Ok(c) => {
                let left = c.validity().not_after.timestamp() - now;
                if left <= 0 {
                    r.fail(
                        "TLS certificate has expired",
                        "renew it, then `systemctl reload tokenvault-webhook`",
                    );
                } else if left < 30 * 86_400 {
                    r.warn(
                        &format!("TLS certificate expires in {} days", left / 86_400),
                        "renew it, then `systemctl reload tokenvault-webhook`",
                    );
                } else {
                    r.ok(&format!(
                        "TLS certificate valid for {} more days",
                        left / 86_400
                    ));
                }
                if c.validity().not_before.timestamp() > now {
                    r.fail("TLS certificate is not valid yet", "check the system clock");
                }
            }
            Err(_) => r.fail(
                "TLS certificate does not parse",
                "install a PEM X.509 certificate",
            ),
        },
        Err(_) => r.fail(
            "TLS certificate is not PEM",
            "install a PEM X.509 certificate",
        ),
    }
}
