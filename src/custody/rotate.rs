//! `rotate-key`: a new AES key generation, everything sealed under the old
//! one re-sealed under it in batches while the service runs, then the old
//! key destroyed. The steps and why no write can be lost are in
//! [`crate::store::keyring`]; each is durable before the next, so a crash
//! at any point resumes where it stopped when the command is run again.

use super::fields;
use crate::keys::{AesGen, Backend, KeyError, SealedElsewhere};
use crate::protocol::document::TokenDocument;
use crate::protocol::ApiError;
use crate::store::generations::AesState;
use crate::store::{Store, StoreError};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("key backend: {0}")]
    Keys(#[from] KeyError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the active AES key generation {0} is not in the key device; nothing was changed")]
    ActiveMissing(AesGen),
    #[error("generation {0} is recorded as the rotation's target but is not in the key device; restore the device's keys (nothing was lost: generation {1} still opens everything)")]
    TargetMissing(AesGen, AesGen),
    #[error("document {service:?} could not be re-sealed ({why}); the rotation stopped with nothing lost: run rotate-key again once this is fixed")]
    Document { service: String, why: String },
    #[error("{0}; the rotation stopped with nothing lost: run rotate-key again")]
    Other(String),
    #[error("documents kept changing under generation {0} for {1} passes; run rotate-key again")]
    NoProgress(AesGen, usize),
}

pub struct Options {
    /// Documents per batch (one durable transaction each).
    pub batch: usize,
    /// Pause between batches, to bound the load on a busy appliance.
    pub pause: Duration,
    /// What else is sealed under the key (OAuth clients, ACME files),
    /// re-sealed in this order after the documents and bind codes.
    pub elsewhere: Vec<Box<dyn SealedElsewhere>>,
}

/// What the command shows as it goes.
pub enum Progress {
    Started {
        from: AesGen,
        to: AesGen,
    },
    Resumed {
        from: AesGen,
        to: AesGen,
        closed: bool,
    },
    Batch {
        pass: usize,
        done: u64,
        total: u64,
    },
    Closed {
        from: AesGen,
    },
    Retired {
        gen: AesGen,
    },
}

#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub from: AesGen,
    pub to: AesGen,
    pub resumed: bool,
    pub documents: u64,
    pub conflicts: u64,
    pub bind_codes: usize,
    /// Per [`SealedElsewhere::name`]: how many it re-sealed.
    #[serde(flatten)]
    pub elsewhere: std::collections::BTreeMap<&'static str, usize>,
}

/// The points between a rotation's durable steps where a crash leaves
/// the most to recover (tests stop the rotation there, as a kill would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The old generation closed to writers.
    Closed,
    /// Bind codes re-sealed.
    BindCodes,
    /// One of [`Options::elsewhere`] re-sealed (by its name).
    Resealed(&'static str),
    /// The old key destroyed in the device, the store not yet told.
    Destroyed,
}

#[cfg(test)]
thread_local! {
    static CRASH_AT: std::cell::Cell<Option<Stage>> = const { std::cell::Cell::new(None) };
}

/// A no-op outside tests; in a test, stops the rotation at `stage` as a
/// crash would (everything durable so far stays).
fn crash_point(stage: Stage) -> Result<(), RotateError> {
    #[cfg(test)]
    if CRASH_AT.with(|c| c.get()) == Some(stage) {
        return Err(RotateError::Other(format!("test crash at {stage:?}")));
    }
    let _ = stage;
    Ok(())
}

/// Runs (or resumes) a rotation to its end.
pub fn rotate(
    store: &Store,
    backend: &Backend,
    opts: &Options,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, RotateError> {
    let mut st = store.aes_state()?;
    let present = backend.aes_generations()?;
    let resumed = st.previous.is_some();
    let (from, to) = match st.previous {
        Some(from) => {
            progress(Progress::Resumed {
                from,
                to: st.active,
                closed: st.closed,
            });
            (from, st.active)
        }
        None => {
            if !present.contains(&st.active) {
                return Err(RotateError::ActiveMissing(st.active));
            }
            let from = st.active;
            // A generation above the active one that the store never
            // recorded is a leftover of a rotation that crashed before its
            // first step was durable: nothing was sealed under it, reuse it.
            // Otherwise one above everything the device or store has used.
            let leftover = present
                .iter()
                .copied()
                .filter(|g| *g > from && !st.retired.contains(g))
                .max();
            let to = leftover.unwrap_or_else(|| {
                present
                    .iter()
                    .chain(st.retired.iter())
                    .copied()
                    .chain([from])
                    .max()
                    .unwrap_or(from)
                    + 1
            });
            backend.create_aes(to)?;
            let now = crate::clock::system_now();
            st = store.update_aes_state(move |s| {
                s.previous = Some(from);
                s.active = to;
                s.closed = false;
                s.started_at = Some(now);
            })?;
            progress(Progress::Started { from, to });
            (from, to)
        }
    };
    if !backend.aes_generations()?.contains(&to) {
        return Err(RotateError::TargetMissing(to, from));
    }
    let mut report = Report {
        from,
        to,
        resumed,
        ..Report::default()
    };
    // Pass 1 runs while writers may still commit under `from`; after the
    // close none can, and the passes that follow find whatever is left.
    let mut pass = 0;
    if !st.closed {
        pass += 1;
        reseal_documents(store, backend, to, opts, pass, &mut report, progress)?;
        store.update_aes_state(|s| s.closed = true)?;
        progress(Progress::Closed { from });
        crash_point(Stage::Closed)?;
    }
    loop {
        pass += 1;
        if reseal_documents(store, backend, to, opts, pass, &mut report, progress)? == 0 {
            break;
        }
        if pass > 50 {
            return Err(RotateError::NoProgress(from, pass));
        }
    }
    // The rest of what is sealed under the key (none of it is written
    // under `from` after the close either: every process seals under the
    // store's active generation).
    report.bind_codes = rekey_bind_codes(store, backend, to)?;
    crash_point(Stage::BindCodes)?;
    for other in &opts.elsewhere {
        let n = other
            .reseal(backend, to)
            .map_err(|e| RotateError::Other(format!("{}: {e}", other.name())))?;
        report.elsewhere.insert(other.name(), n);
        crash_point(Stage::Resealed(other.name()))?;
    }
    // Last look before the key goes: nothing may still need it.
    let left = store.tokens_by_generation()?;
    if let Some(n) = left.get(&from) {
        return Err(RotateError::Other(format!(
            "{n} documents are still under generation {from}"
        )));
    }
    backend.destroy_aes(from)?;
    crash_point(Stage::Destroyed)?;
    store.update_aes_state(move |s| finish(s, from))?;
    progress(Progress::Retired { gen: from });
    Ok(report)
}

fn finish(s: &mut AesState, from: AesGen) {
    s.previous = None;
    s.closed = false;
    s.started_at = None;
    if !s.retired.contains(&from) {
        s.retired.push(from);
    }
}

/// One pass over every document; returns how many needed re-sealing.
fn reseal_documents(
    store: &Store,
    backend: &Backend,
    to: AesGen,
    opts: &Options,
    pass: usize,
    report: &mut Report,
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, RotateError> {
    let by_gen = store.tokens_by_generation()?;
    let total: u64 = by_gen
        .iter()
        .filter(|(g, _)| **g != to)
        .map(|(_, n)| *n)
        .sum();
    let mut seen = 0u64;
    let mut after: Option<String> = None;
    loop {
        let batch = store.tokens_not_under(to, after.as_deref(), opts.batch.max(1))?;
        let mut rows = Vec::with_capacity(batch.docs.len());
        for (service, raw) in batch.docs {
            let mut doc: TokenDocument =
                serde_json::from_slice(&raw).map_err(|_| RotateError::Document {
                    service: service.clone(),
                    why: "not a token document".into(),
                })?;
            match fields::rekey(backend, &service, &mut doc, to) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    return Err(RotateError::Document {
                        service,
                        why: why(&e),
                    })
                }
            }
            seen += 1;
            let new =
                serde_json::to_vec(&doc).map_err(|_| StoreError::Corrupt("token document"))?;
            rows.push((service, raw, new));
        }
        if !rows.is_empty() {
            let tried = rows.len() as u64;
            let written = store.replace_tokens_if_unchanged_blocking(rows)? as u64;
            report.documents += written;
            report.conflicts += tried - written;
            progress(Progress::Batch {
                pass,
                done: seen,
                total: total.max(seen),
            });
            if !opts.pause.is_zero() {
                std::thread::sleep(opts.pause);
            }
        }
        match batch.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    Ok(seen)
}

fn rekey_bind_codes(store: &Store, backend: &Backend, to: AesGen) -> Result<usize, RotateError> {
    let mut n = 0;
    for (code, rec) in store.bind_codes_all()? {
        let new = crate::binding::rekey_code(backend, &code, &rec, to)
            .map_err(|e| RotateError::Other(format!("bind code: {e}")))?;
        if let Some(new) = new {
            if store.replace_bind_code_blocking(&code, &rec, &new)? {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// The reason, without anything of the document's content.
fn why(e: &ApiError) -> String {
    match e {
        ApiError::KeysUnavailable => "key backend unavailable".into(),
        ApiError::KeyRotating => "written concurrently under the retiring key".into(),
        _ => "its fields do not open under their recorded key generation".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::soft::SoftBackend;
    use serde_json::json;
    use std::sync::Arc;

    const ACME_ACCOUNT_AAD: &[u8] = b"tokenvault-webhook/acme/v1\0account";

    /// What `rotate-key` hands in: the store's OAuth clients and the ACME
    /// files in `acme`.
    fn elsewhere(
        store: &Store,
        acme: impl Into<std::path::PathBuf>,
    ) -> Vec<Box<dyn SealedElsewhere>> {
        vec![
            Box::new(crate::broker::oauth::SealedClients(store.clone())),
            Box::new(crate::tls::acme::SealedFiles(acme.into())),
        ]
    }

    /// What a rotation re-seals besides documents: an OAuth client
    /// ("github", secret "client-secret"), an outstanding bind code (its
    /// code returned) and an ACME account file `{}` in `acme` (created).
    fn seal_the_rest(store: &Store, ring: &Backend, acme: &std::path::Path) -> String {
        let client = crate::broker::oauth::OAuthClient::new(
            ring,
            "github",
            "id",
            &secrecy::SecretString::from("client-secret"),
            "https://example.com/token",
            crate::broker::oauth::ClientAuth::Post,
            false,
        )
        .unwrap();
        crate::broker::oauth::save(store, &client).unwrap();
        let (reg, code) = crate::binding::prepare(
            ring,
            "https://tv.example",
            "https://wh.example",
            600,
            crate::clock::system_now(),
        )
        .unwrap();
        store.put_bind_code_blocking(&reg.code, &code).unwrap();
        std::fs::create_dir(acme).unwrap();
        std::fs::write(
            acme.join("account.sealed"),
            ring.seal(ACME_ACCOUNT_AAD, b"{}").unwrap(),
        )
        .unwrap();
        reg.code
    }

    /// `{"accessToken": token}` sealed by `ring` and stored as `service`.
    fn seal_put(store: &Store, ring: &Backend, service: &str, token: &str) -> TokenDocument {
        let p = fields::seal_token_data(
            ring,
            service,
            &json!({ "accessToken": token }),
            None,
            1_700_000_000,
        )
        .unwrap();
        put(store, service, &p.doc).unwrap();
        p.doc
    }

    fn put(store: &Store, service: &str, doc: &TokenDocument) -> Result<(), StoreError> {
        let raw = serde_json::to_vec(doc).unwrap();
        store
            .put_raw_blocking(
                crate::protocol::storage::Collection::Tokens,
                service.into(),
                raw,
                false,
            )
            .map(|_| ())
    }

    fn value(store: &Store, backend: &Backend, service: &str) -> serde_json::Value {
        let raw = store
            .get_raw(crate::protocol::storage::Collection::Tokens, service)
            .unwrap()
            .unwrap();
        let doc: TokenDocument = serde_json::from_slice(&raw).unwrap();
        fields::open_fields(backend, service, &doc).unwrap()["accessToken"].clone()
    }

    #[test]
    fn rotation_moves_everything_resumes_and_retires_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        let device: Backend = Arc::new(SoftBackend::new());
        let ring = crate::custody::keyring::keyring(device.clone(), &store);
        for i in 0..25 {
            let doc = seal_put(&store, &ring, &format!("svc-{i:02}"), &format!("tok-{i}"));
            assert_eq!(doc.kid, Some(1));
        }
        // A document from before key ids (no `kid`: generation 1), and a
        // plaintext one (sealed by the rotation too).
        let mut legacy = fields::seal_token_data(
            &ring,
            "legacy",
            &json!({"accessToken": "tok-legacy"}),
            None,
            1_700_000_000,
        )
        .unwrap()
        .doc;
        legacy.kid = None;
        put(&store, "legacy", &legacy).unwrap();
        let plain = TokenDocument {
            v: 1,
            alg: "none".into(),
            enc: None,
            kid: None,
            fields: [("accessToken".to_string(), "tok-plain".to_string())].into(),
            meta: Default::default(),
            otp: None,
        };
        put(&store, "plain", &plain).unwrap();
        let acme = dir.path().join("acme");
        let bind_code = seal_the_rest(&store, &ring, &acme);

        // A crash right after step 1: generation 2 exists and is active,
        // nothing moved yet. Reads work under either; new writes use 2.
        device.create_aes(2).unwrap();
        store
            .update_aes_state(|s| {
                s.previous = Some(1);
                s.active = 2;
            })
            .unwrap();
        assert_eq!(seal_put(&store, &ring, "during", "tok-during").kid, Some(2));
        assert_eq!(value(&store, &ring, "svc-03"), "tok-3");
        // A write sealed under 1 still lands before the close...
        let late = fields::seal_token_data(
            &device,
            "late",
            &json!({"accessToken": "tok-late"}),
            None,
            1_700_000_000,
        )
        .unwrap();
        assert_eq!(late.doc.kid, Some(1));
        put(&store, "late", &late.doc).unwrap();

        let opts = Options {
            batch: 4,
            pause: Duration::ZERO,
            elsewhere: elsewhere(&store, acme.clone()),
        };
        let mut events = Vec::new();
        let report = rotate(&store, &ring, &opts, &mut |p| {
            events.push(match p {
                Progress::Started { .. } => "started".to_string(),
                Progress::Resumed { from, to, closed } => format!("resumed {from}->{to} {closed}"),
                Progress::Batch { pass, done, total } => format!("batch {pass} {done}/{total}"),
                Progress::Closed { from } => format!("closed {from}"),
                Progress::Retired { gen } => format!("retired {gen}"),
            })
        })
        .unwrap();
        assert!(report.resumed);
        assert_eq!((report.from, report.to), (1, 2));
        assert_eq!(report.documents, 28, "25 + legacy + plain + late");
        assert_eq!(
            (
                report.elsewhere["oauthClients"],
                report.bind_codes,
                report.elsewhere["acmeFiles"]
            ),
            (1, 1, 1)
        );
        assert_eq!(events[0], "resumed 1->2 false");
        assert!(events.contains(&"batch 1 28/28".to_string()), "{events:?}");
        assert!(events.contains(&"closed 1".to_string()));
        assert_eq!(events.last().unwrap(), "retired 1");

        // Everything under 2, every value intact, generation 1 gone.
        assert_eq!(store.tokens_by_generation().unwrap(), [(2, 29)].into());
        assert_eq!(device.aes_generations().unwrap(), vec![2]);
        for (s, v) in [
            ("svc-00", "tok-0"),
            ("svc-24", "tok-24"),
            ("legacy", "tok-legacy"),
            ("plain", "tok-plain"),
            ("during", "tok-during"),
            ("late", "tok-late"),
        ] {
            assert_eq!(value(&store, &ring, s), v, "{s}");
        }
        let c = crate::broker::oauth::get(&store, "github").unwrap();
        assert_eq!(c.secret(&ring).unwrap().as_str(), "client-secret");
        let rec = store.bind_code(&bind_code).unwrap().unwrap();
        assert!(crate::binding::rekey_code(&ring, &bind_code, &rec, 2)
            .unwrap()
            .is_none());
        let st = store.aes_state().unwrap();
        assert_eq!(
            (st.active, st.previous, st.closed, st.retired.clone()),
            (2, None, false, vec![1])
        );

        // A write sealed under the retired generation can no longer land.
        let stale = TokenDocument {
            kid: Some(1),
            ..late.doc.clone()
        };
        assert_eq!(put(&store, "late", &stale), Err(StoreError::KeyRetired));
        assert_eq!(value(&store, &ring, "late"), "tok-late");

        // A second rotation goes to 3 and needs no resume.
        let report = rotate(&store, &ring, &opts, &mut |_| {}).unwrap();
        assert!(!report.resumed);
        assert_eq!((report.from, report.to, report.documents), (2, 3, 29));
        assert_eq!(device.aes_generations().unwrap(), vec![3]);
        assert_eq!(value(&store, &ring, "svc-11"), "tok-11");
    }

    #[test]
    fn a_key_left_by_a_crash_before_the_first_step_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        let device: Backend = Arc::new(SoftBackend::new());
        let ring = crate::custody::keyring::keyring(device.clone(), &store);
        seal_put(&store, &ring, "gh", "v");
        // The crashed run created generation 2 and died before recording it.
        device.create_aes(2).unwrap();
        let opts = Options {
            batch: 64,
            pause: Duration::ZERO,
            elsewhere: elsewhere(&store, dir.path().join("acme")),
        };
        let r = rotate(&store, &ring, &opts, &mut |_| {}).unwrap();
        assert_eq!((r.from, r.to, r.resumed), (1, 2, false));
        assert_eq!(
            device.aes_generations().unwrap(),
            vec![2],
            "no orphan key left"
        );
        assert_eq!(value(&store, &ring, "gh"), "v");
    }

    #[test]
    fn a_document_that_does_not_open_stops_the_rotation_and_keeps_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 16 << 20).unwrap();
        let device: Backend = Arc::new(SoftBackend::new());
        let ring = crate::custody::keyring::keyring(device.clone(), &store);
        let good = fields::seal_token_data(
            &ring,
            "good",
            &json!({"accessToken": "g"}),
            None,
            1_700_000_000,
        )
        .unwrap();
        put(&store, "good", &good.doc).unwrap();
        // Moved from another service: its AAD does not match.
        put(&store, "moved", &good.doc).unwrap();
        let opts = Options {
            batch: 64,
            pause: Duration::ZERO,
            elsewhere: elsewhere(&store, dir.path().join("acme")),
        };
        let e = rotate(&store, &ring, &opts, &mut |_| {}).unwrap_err();
        assert!(
            matches!(&e, RotateError::Document { service, .. } if service == "moved"),
            "{e}"
        );
        assert!(!e.to_string().contains("\"g\""));
        // Nothing lost: both generations still there, the good one readable.
        assert_eq!(device.aes_generations().unwrap(), vec![1, 2]);
        assert_eq!(value(&store, &ring, "good"), "g");
        let st = store.aes_state().unwrap();
        assert_eq!((st.active, st.previous), (2, Some(1)));
    }

    /// A rotation killed at each point between its durable steps: after a
    /// restart (the store reopened, the device as it was) every document,
    /// the OAuth client, the bind code and the ACME file still open, and a
    /// second run finishes the rotation and retires the old key.
    #[test]
    fn a_rotation_killed_at_each_step_loses_nothing_and_resumes_to_the_end() {
        for stage in [
            Stage::Closed,
            Stage::BindCodes,
            Stage::Resealed("oauthClients"),
            Stage::Resealed("acmeFiles"),
            Stage::Destroyed,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let device: Backend = Arc::new(SoftBackend::new());
            let acme = dir.path().join("acme");
            let code = {
                let store = Store::open(dir.path(), 16 << 20).unwrap();
                let ring = crate::custody::keyring::keyring(device.clone(), &store);
                for i in 0..9 {
                    seal_put(&store, &ring, &format!("svc-{i}"), &format!("tok-{i}"));
                }
                let code = seal_the_rest(&store, &ring, &acme);
                let opts = Options {
                    batch: 4,
                    pause: Duration::ZERO,
                    elsewhere: elsewhere(&store, acme.clone()),
                };
                CRASH_AT.with(|c| c.set(Some(stage)));
                let e = rotate(&store, &ring, &opts, &mut |_| {}).unwrap_err();
                CRASH_AT.with(|c| c.set(None));
                assert!(
                    e.to_string().contains(&format!("{stage:?}")),
                    "{stage:?}: {e}"
                );
                code
            };
            // The restart: the store as it is on disk (its data file, opened
            // anew: one process cannot reopen an environment it holds), the
            // device unchanged.
            let after = dir.path().join("restarted");
            std::fs::create_dir(&after).unwrap();
            std::fs::copy(dir.path().join("data.mdb"), after.join("data.mdb")).unwrap();
            let store = Store::open(&after, 16 << 20).unwrap();
            let ring = crate::custody::keyring::keyring(device.clone(), &store);
            let check = |store: &Store, ring: &Backend, when: &str| {
                for i in 0..9 {
                    assert_eq!(
                        value(store, ring, &format!("svc-{i}")),
                        format!("tok-{i}"),
                        "{stage:?} {when}"
                    );
                }
                let c = crate::broker::oauth::get(store, "github").unwrap();
                assert_eq!(
                    c.secret(ring).unwrap().as_str(),
                    "client-secret",
                    "{stage:?} {when}"
                );
                let rec = store.bind_code(&code).unwrap().unwrap();
                assert!(
                    crate::binding::rekey_code(
                        ring,
                        &code,
                        &rec,
                        store.aes_state().unwrap().active
                    )
                    .is_ok(),
                    "{stage:?} {when}: the bind code opens"
                );
                let sealed = std::fs::read(acme.join("account.sealed")).unwrap();
                assert_eq!(
                    ring.open(ACME_ACCOUNT_AAD, &sealed).unwrap().as_slice(),
                    b"{}",
                    "{stage:?} {when}"
                );
            };
            check(&store, &ring, "after the crash");
            let opts = Options {
                batch: 4,
                pause: Duration::ZERO,
                elsewhere: elsewhere(&store, acme.clone()),
            };
            let report = rotate(&store, &ring, &opts, &mut |_| {})
                .unwrap_or_else(|e| panic!("{stage:?}: the resumed rotation failed: {e}"));
            assert!(report.resumed, "{stage:?}");
            assert_eq!((report.from, report.to), (1, 2), "{stage:?}");
            check(&store, &ring, "after the resumed rotation");
            assert_eq!(
                store.tokens_by_generation().unwrap(),
                [(2, 9)].into(),
                "{stage:?}"
            );
            assert_eq!(device.aes_generations().unwrap(), vec![2], "{stage:?}");
            let st = store.aes_state().unwrap();
            assert_eq!(
                (st.active, st.previous, st.closed, st.retired.clone()),
                (2, None, false, vec![1]),
                "{stage:?}"
            );
        }
    }
}
