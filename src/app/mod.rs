//! The application core: what every request and background task works
//! with (the key backend, counted into the metrics; the store; the clock;
//! the domain's settings), free of HTTP. `server` wraps it with its own
//! settings (origins, limits, body size); the domain (`custody`, `broker`,
//! `binding`) is called with plain parts of it.

pub mod export;
pub mod metrics;

use crate::keys::Backend;
use crate::store::Store;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The domain's settings, fixed at start-up.
pub struct Settings {
    pub broker: crate::broker::Broker,
    pub minter: crate::custody::gcp::Minter,
    pub public_url: String,
    pub frontend_url: String,
    pub code_ttl_secs: i64,
    pub webhook_id: String,
    /// How the owner's approvals behave.
    pub policy: crate::custody::policy::Settings,
}

#[derive(Clone)]
pub struct App {
    /// The key backend, counted into `metrics`.
    pub backend: Backend,
    pub store: Store,
    pub settings: Arc<Settings>,
    pub started: Instant,
    bound: Arc<AtomicBool>,
    metrics: Arc<metrics::Metrics>,
    /// What signed requests, tickets and document times are judged by.
    pub clock: crate::clock::Clock,
}

impl App {
    pub fn new(backend: Backend, store: Store, settings: Settings, bound: bool) -> Self {
        let metrics = Arc::new(metrics::Metrics::default());
        let backend: Backend = Arc::new(metrics::Metered {
            inner: backend,
            metrics: metrics.clone(),
        });
        App {
            backend,
            metrics,
            store,
            settings: Arc::new(settings),
            started: Instant::now(),
            bound: Arc::new(AtomicBool::new(bound)),
            clock: crate::clock::Clock::system(),
        }
    }

    /// Unix seconds by this state's clock.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// What a use of a credential is checked with (the owner's policy).
    pub fn gate(&self) -> crate::custody::policy::Gate<'_> {
        crate::custody::policy::Gate {
            store: &self.store,
            backend: &self.backend,
            settings: &self.settings.policy,
            clock: &self.clock,
        }
    }

    /// The metrics, to hand to a background task.
    pub fn metrics_handle(&self) -> Arc<metrics::Metrics> {
        self.metrics.clone()
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    pub fn is_bound(&self) -> bool {
        self.bound.load(Ordering::Acquire)
    }

    pub fn set_bound(&self) {
        self.bound.store(true, Ordering::Release);
    }
}
