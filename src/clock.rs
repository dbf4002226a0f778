//! The appliance's clock: the system's, or (in tests) one that stands still
//! until the test moves it, so a test waits for nothing and asserts on a
//! time it set.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Unix seconds now, from the system clock.
pub fn system_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, whole seconds) of Unix seconds `at`.
pub fn rfc3339(at: i64) -> String {
    OffsetDateTime::from_unix_timestamp(at)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// The system clock, or a fixed one shared by its clones.
#[derive(Clone, Debug, Default)]
pub struct Clock(Option<Arc<AtomicI64>>);

impl Clock {
    pub fn system() -> Self {
        Clock(None)
    }

    /// A clock that reads `at` until [`Clock::advance`] or [`Clock::set`].
    pub fn fixed(at: i64) -> Self {
        Clock(Some(Arc::new(AtomicI64::new(at))))
    }

    pub fn now(&self) -> i64 {
        match &self.0 {
            Some(t) => t.load(Ordering::Acquire),
            None => system_now(),
        }
    }

    /// Moves a fixed clock on by `secs`; the system clock ignores it.
    pub fn advance(&self, secs: i64) {
        if let Some(t) = &self.0 {
            t.fetch_add(secs, Ordering::AcqRel);
        }
    }

    /// Sets a fixed clock; the system clock ignores it.
    pub fn set(&self, at: i64) {
        if let Some(t) = &self.0 {
            t.store(at, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_clock_moves_only_when_told_and_clones_share_it() {
        let c = Clock::fixed(1_700_000_000);
        let d = c.clone();
        assert_eq!(c.now(), 1_700_000_000);
        d.advance(5);
        assert_eq!(c.now(), 1_700_000_005);
        c.set(10);
        assert_eq!(d.now(), 10);
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        let s = Clock::system();
        s.set(1);
        assert!(s.now() > 1_700_000_000);
    }
}
