//! `serve`: the appliance. Opens the device and the store, confines
//! itself, then runs the listeners and the background tasks.

use super::device::{open_device, tls_key_source};
use super::landlock::sandbox as apply_sandbox;
use super::setup::{load_for_run, open_store, refuse_root};
use crate::app::{App, Settings};
use crate::config::{Config, Profile};
use crate::keys::Backend;
use crate::server::listener::{serve, ServeOptions};
use crate::server::{app, AppState, HttpSettings};
use crate::store::{Store, META_WEBHOOK_ID};
use crate::tls::{load_tls, TlsKeySource};
use anyhow::{anyhow, bail, Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub fn run(config: &Path, landlock: bool) -> Result<()> {
    let cfg = load_for_run(config)?;
    refuse_root(&cfg)?;
    let device = open_device(&cfg)?;
    let tls_key = tls_key_source(&cfg, &device)?;
    apply_sandbox(&cfg, cfg.server.listen, landlock)?;
    let store = open_store(&cfg)?;
    run_server(cfg, device.backend(), store, None, tls_key)
}

pub fn run_server(
    cfg: Config,
    backend: Backend,
    store: Store,
    listen: Option<SocketAddr>,
    tls_key: Option<TlsKeySource>,
) -> Result<()> {
    if !backend.aes_key_present() {
        bail!(
            "no AES key in the {} backend: run `tokenvault-webhook --config FILE init` first",
            backend.kind()
        );
    }
    let webhook_id = store
        .meta_get(META_WEBHOOK_ID)?
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .ok_or_else(|| {
            anyhow!("store not initialised: run `tokenvault-webhook --config FILE init` first")
        })?;
    store.set_trail_bound(cfg.audit.max_share_percent, cfg.store.reserve_percent);
    // Seals follow the store's AES generation (see `rotate-key`).
    let dyn_backend = crate::custody::keyring::keyring(backend, &store);
    let bound = crate::binding::restore_active_key(&dyn_backend, &store)?;
    remove_orphan_otp_keys(&dyn_backend, &store)?;
    let (tls, acme) = match (cfg.tls.mode, &tls_key) {
        (crate::config::TlsMode::Files, Some(key)) => (load_tls(&cfg.tls.cert, key)?, None),
        (crate::config::TlsMode::Files, None) => bail!("tls.key is not set"),
        (crate::config::TlsMode::Acme, _) => {
            let a = cfg
                .tls
                .acme
                .clone()
                .ok_or_else(|| anyhow!("[tls.acme] missing"))?;
            let hsm_key = match &tls_key {
                Some(TlsKeySource::Hsm(k)) => Some(k.clone()),
                _ => None,
            };
            let acme = Arc::new(crate::tls::acme::Acme::new(
                crate::tls::acme::AcmeSettings {
                    directory_url: a.directory_url,
                    ca_bundle: a.ca_bundle,
                    email: a.email,
                    domains: a.domains,
                    dir: cfg.store.path.join("acme"),
                    cert_path: cfg.tls.cert.clone(),
                    renew_days_before: a.renew_days_before,
                    hsm_key,
                    challenge: a.challenge,
                },
                dyn_backend.clone(),
            ));
            let tls = crate::tls::TlsState::new(
                acme.initial_cert().map_err(|e| anyhow!("ACME: {e}"))?,
                true,
            )?;
            (tls, Some(acme))
        }
    };
    let listen = listen.unwrap_or(cfg.server.listen);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tvw-worker")
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let bound_addr = listener.local_addr()?;
        let dev = cfg.profile == Profile::Dev;
        let public_url = cfg.public_url(bound_addr);
        let shield = Arc::new(crate::server::shield::Shield::new(shield_settings(&cfg)));
        // One egress policy for every call made on a caller's word.
        let egress = Arc::new(crate::egress::EgressPolicy {
            allow_loopback: cfg.proxy.allow_loopback.unwrap_or(dev),
            deny_hosts: cfg.proxy.deny_hosts.clone(),
            deny_cidrs: cfg.proxy.deny_cidrs.clone(),
            allow_cidrs: cfg.proxy.allow_cidrs.clone(),
        });
        let mut core = App::new(
            dyn_backend,
            store.clone(),
            Settings {
                broker: crate::broker::Broker {
                    proxy: crate::broker::proxy::Proxy::new(
                        egress.clone(),
                        cfg.proxy.require_config.unwrap_or(!dev),
                        Duration::from_secs(cfg.proxy.timeout_secs.unwrap_or(30)),
                        cfg.proxy.max_response_bytes.unwrap_or(32 << 20),
                    )
                    .map_err(|e| anyhow!("proxy HTTP client: {e}"))?,
                    refresher: Arc::new(
                        crate::broker::refresh::Refresher::new()
                            .map_err(|e| anyhow!("refresh HTTP client: {e}"))?,
                    ),
                },
                minter: crate::custody::gcp::Minter::new(dev, egress.clone())
                    .map_err(|e| anyhow!("HTTP client: {e}"))?,
                public_url: public_url.clone(),
                frontend_url: cfg.binding.frontend_url.clone(),
                code_ttl_secs: cfg.binding.code_ttl_secs,
                webhook_id: webhook_id.clone(),
                policy: crate::custody::policy::Settings {
                    approval_ttl_secs: cfg.policy.approval_ttl_secs,
                    approval_wait_secs: cfg.policy.approval_wait_secs,
                    max_pending: cfg.policy.max_pending_approvals,
                    notify: match &cfg.policy.notify_url {
                        Some(u) => Some(Arc::new(
                            crate::custody::policy::Notifier::new(u, dev, &egress)
                                .map_err(|e| anyhow!(e))?,
                        )),
                        None => None,
                    },
                },
            },
            bound,
        );
        // Tests of time-bound rules (rates, hours) freeze the clock: `dev`
        // profile only, and said loudly.
        if let Some(t) = std::env::var("TVW_TEST_FROZEN_CLOCK")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
        {
            if dev {
                tracing::warn!(at = t, "TEST CLOCK: time is frozen (TVW_TEST_FROZEN_CLOCK, dev profile)");
                core.clock = crate::clock::Clock::fixed(t);
            } else {
                tracing::warn!("TVW_TEST_FROZEN_CLOCK ignored: only the dev profile honours it");
            }
        }
        let state = AppState::new(
            core,
            HttpSettings {
            direct: crate::server::direct::DirectSettings {
                allowed_origins: cfg.direct_access.allowed_origins.clone(),
                deny: cfg.direct_access.deny_cidrs.clone(),
                trusted_proxies: cfg.direct_access.trusted_proxies.clone(),
                limiter: crate::server::direct::RateLimiter::new(
                    cfg.direct_access.rate_limit_per_minute,
                    cfg.direct_access.rate_limit_burst,
                ),
            },
                body_limit: cfg.server.body_limit_bytes,
                shield: shield.clone(),
                helpers_on_public: dev,
                tv_refresh: cfg.refresh.tv_refresh.clone(),
            },
        );
        if dev {
            tracing::info!("dev: /v1/register-url and /bind are also served on this listener, to loopback peers without forwarding headers");
        }
        serve_helpers(&cfg, &state).await?;
        {
            // Failing unauthenticated requests beyond the log budget: one
            // summary line a minute instead of a line each.
            let shield = shield.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let minute = shield.take_minute();
                    if minute.is_empty() {
                        continue;
                    }
                    let total: u64 = minute.values().sum();
                    let by: Vec<String> = minute
                        .iter()
                        .map(|((route, status), n)| format!("{route} {status}: {n}"))
                        .collect();
                    tracing::warn!(total, by = %by.join(", "), "failing unauthenticated requests in the last minute");
                }
            });
        }
        if let Some(addr) = cfg.metrics.listen {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
            let at = l.local_addr()?;
            let router = crate::server::metrics::router(state.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, router).await {
                    tracing::error!(error = %e, "metrics listener stopped");
                }
            });
            tracing::info!(%at, "metrics: Prometheus text at http://{at}/metrics");
            eprintln!("METRICS http://{at}/metrics");
        }
        {
            // The audit trail: sign the head, apply retention.
            let (store, backend) = (store.clone(), state.backend.clone());
            let every = Duration::from_secs(cfg.audit.sign_every_secs.max(1));
            let keep = i64::from(cfg.audit.retention_days) * 86_400;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let t = crate::server::now();
                    let mac = |m: &[u8]| backend.hmac_sha256(m).ok();
                    if let Err(e) = store.trail_sign_head(t, mac).await {
                        tracing::warn!(error = %e, "audit trail: signing the head failed");
                    }
                    match store.trail_prune(t - keep).await {
                        Ok(n) if n > 0 => tracing::info!(removed = n, "audit trail: retention applied"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "audit trail: retention failed"),
                    }
                }
            });
        }
        // The audit trail off the box.
        let mut sinks = Vec::new();
        if cfg.audit.syslog {
            sinks.push(crate::app::export::Sink::Syslog(cfg.audit.syslog_socket.clone()));
        }
        if let Some(f) = &cfg.audit.export_file {
            sinks.push(crate::app::export::Sink::File(f.clone()));
        }
        if !sinks.is_empty() {
            tracing::info!(sinks = ?sinks, "audit trail exported as it lands");
            tokio::spawn(crate::app::export::run(
                store.clone(),
                sinks,
                state.metrics_handle(),
                Duration::from_millis(500),
            ));
        }
        if store.is_shared() {
            // Other nodes bind and re-bind on the same store: follow the
            // HMAC key they make active, checked every second, so a
            // replaced secret stops working here within about a second.
            let app = state.app.clone();
            tokio::spawn(async move {
                let mut last = app
                    .store
                    .meta_get(crate::store::META_HMAC_KEY_ID)
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned());
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    match crate::binding::follow_active_key(&app.backend, &app.store, &mut last) {
                        Ok(true) => {
                            if last.is_some() {
                                app.set_bound();
                            }
                            tracing::info!(bound = last.is_some(), "the active HMAC key changed in the store; this node uses it now");
                        }
                        Ok(false) => {}
                        Err(e) => tracing::debug!(error = %e, "could not check the active HMAC key"),
                    }
                }
            });
        }
        let (pruner, keys) = (store.clone(), state.backend.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                // Reading the key state drops cached copies of an AES
                // generation `rotate-key` retired, on a server that only reads.
                let _ = keys.aes_readable();
                let t = crate::server::now();
                match pruner.prune(t).await {
                    Ok(n) if n > 0 => tracing::debug!(removed = n, "pruned replay memory"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning failed"),
                }
                // Approvals not decided (or not used) in time: expired, in
                // the trail; settled ones are kept a day for `approvals list`.
                match pruner.approvals_sweep(t, 86_400).await {
                    Ok(lapsed) => {
                        for a in lapsed {
                            tracing::info!(approval = %a.id, service = %a.service, "approval expired");
                            pruner.trail_append(crate::store::trail::TrailEvent {
                                ts: t,
                                event: "approval_expired",
                                status: 200,
                                note: crate::store::trail::TrailNote {
                                    service: Some(a.service.clone()),
                                    aid: Some(a.agent.clone()),
                                    purpose: Some(a.purpose.clone()),
                                    policy: Some(format!("expired {}", a.id)),
                                    authenticated: true,
                                    ..Default::default()
                                },
                                peer: None,
                            });
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "approval sweep failed"),
                }
            }
        });
        let opts = ServeOptions {
            cert: cfg.tls.cert.clone(),
            key: tls_key.clone(),
            handshake_timeout: Duration::from_secs(cfg.server.handshake_timeout_secs),
            header_timeout: Duration::from_secs(cfg.server.header_timeout_secs),
            idle_timeout: Duration::from_secs(cfg.server.idle_timeout_secs),
            max_connections: cfg.server.max_connections,
            max_h2_streams: cfg.server.max_h2_streams,
            shield: shield.clone(),
            reload_on_hup: cfg.tls.mode == crate::config::TlsMode::Files,
        };
        tracing::info!(webhook_id = %webhook_id, bound, "tokenvault-webhook {} serving", crate::protocol::VERSION);
        eprintln!("READY {public_url} (listening on {bound_addr})");
        crate::sandbox::notify::notify(&format!(
            "READY=1\nSTATUS=serving {public_url} ({})",
            if bound { "bound" } else { "not bound yet: run register-url" }
        ));
        if let Some(every) = crate::sandbox::notify::watchdog_interval() {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    crate::sandbox::notify::notify("WATCHDOG=1");
                }
            });
        }
        if !bound {
            let page = if dev {
                format!("https://{bound_addr}/bind")
            } else {
                cfg.helper
                    .listen
                    .map(|h| format!("http://{h}/bind"))
                    .unwrap_or_else(|| "the [helper] listener's /bind (not configured)".into())
            };
            eprintln!(
                "Not bound yet. From this machine run:\n  tokenvault-webhook --config {} register-url\nor open {page} in a browser here, then open the registrationUrl it gives.",
                cfg.source.display(),
            );
        }
        state.watch_tls(tls.clone());
        if let Some(acme) = acme {
            if let Some(addr) = cfg.tls.acme.as_ref().and_then(|a| a.http01_listen) {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} for HTTP-01"))?;
                let router = crate::tls::acme::http01_router(acme.http01_tokens());
                tracing::info!(%addr, "HTTP-01 listener");
                tokio::spawn(async move {
                    if let Err(e) = axum::serve(l, router).await {
                        tracing::error!(error = %e, "HTTP-01 listener stopped");
                    }
                });
            }
            tokio::spawn(acme.run(tls.clone()));
        }
        serve(listener, tls, app(state), opts, async {
            shutdown_signal().await;
            crate::sandbox::notify::notify("STOPPING=1");
        })
        .await;
        Ok::<(), anyhow::Error>(())
    })
}

/// The hostile-network limits of `[limits]`.
pub fn shield_settings(cfg: &Config) -> crate::server::shield::ShieldSettings {
    let l = &cfg.limits;
    crate::server::shield::ShieldSettings {
        max_connections_per_ip: l.max_connections_per_ip,
        ipv6_prefix_len: l.ipv6_prefix_len,
        request_timeout: Duration::from_secs(l.request_timeout_secs),
        min_body_rate: l.min_body_bytes_per_sec,
        body_grace: Duration::from_secs(l.body_grace_secs),
        body_budget: l.body_budget_mib << 20,
        failures_per_minute: l.failures_per_minute,
        failure_burst: l.failure_burst,
        exchange_per_minute: l.exchange_per_minute,
        exchange_burst: l.exchange_burst,
        failure_log_lines_per_minute: l.failure_log_lines_per_minute,
    }
}

/// The bind helpers' own listener and/or unix socket (`[helper]`).
async fn serve_helpers(cfg: &Config, state: &AppState) -> Result<()> {
    if let Some(addr) = cfg.helper.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (helper.listen)"))?;
        let at = l.local_addr()?;
        let router = crate::server::helper_app(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, router).await {
                tracing::error!(error = %e, "helper listener stopped");
            }
        });
        tracing::info!(%at, "bind helpers: http://{at}/bind and /v1/register-url (loopback only)");
        eprintln!("HELPER http://{at}");
    }
    if let Some(path) = &cfg.helper.socket {
        use std::os::unix::fs::PermissionsExt;
        if path.exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        let l = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot bind {} (helper.socket)", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let router = crate::server::helper_app(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, router).await {
                tracing::error!(error = %e, "helper socket stopped");
            }
        });
        tracing::info!(socket = %path.display(), "bind helpers on a unix socket");
        eprintln!("HELPER unix:{}", path.display());
    }
    Ok(())
}

/// TOTP seed objects no document refers to (a crash between enrolment and
/// its write, or between an overwrite and the old key's destruction).
fn remove_orphan_otp_keys(backend: &Backend, store: &Store) -> Result<()> {
    if store.is_shared() {
        // Another node may have made a key and not yet committed the
        // document that names it: an orphan here is not one there.
        tracing::info!(
            "store shared with other nodes: orphaned TOTP key objects are not swept at start"
        );
        return Ok(());
    }
    let referenced = store.referenced_otp_keys()?;
    let mut removed = 0;
    for id in backend.list_otp()? {
        if !referenced.contains(&id) {
            backend.destroy_otp(&id)?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::warn!(removed, "removed orphaned TOTP key objects");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
