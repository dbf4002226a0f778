//! `backup` and `restore`.

use super::device::open_device;
use super::setup::{load_for_run, refuse_root};
use crate::config::Config;
use crate::custody::fields::open_fields;
use crate::keys::{Backend, HmacKeyId};
use crate::protocol::document::TokenDocument;
use crate::protocol::storage::{Collection, MAX_PAGE};
use crate::store::backup::stage_restore;
use crate::store::{Store, META_BOUND_AT, META_HMAC_KEY_ID};
use anyhow::{anyhow, bail, Result};
use serde_json::json;
use std::path::Path;

/// `backup` and `restore` of a PostgreSQL store: refused, with the
/// database's own recipe (the rows it dumps are as sealed as LMDB's).
fn refuse_postgres(cfg: &Config, what: &str) -> Result<()> {
    let Some(pg) = cfg
        .store
        .postgres
        .as_ref()
        .filter(|_| cfg.store.backend == crate::config::StoreBackendKind::Postgres)
    else {
        return Ok(());
    };
    bail!(
        "{what} is refused with store.backend = \"postgres\": back the database up with PostgreSQL's own tools. \
         The tables tvw_kv, tvw_sizes and tvw_schema hold everything; every document in them stays sealed by the HSM's keys.\n\
         \n  back up (while the nodes serve; one consistent snapshot):\n    \
         pg_dump --dbname='{url}' --format=custom --table=tvw_kv --table=tvw_sizes --table=tvw_schema --file=tvw.dump\n\
         \n  restore (every node stopped; into the same database):\n    \
         pg_restore --dbname='{url}' --clean --if-exists --single-transaction tvw.dump\n\
         \n  (password: PGPASSWORD or a PGPASSFILE holding store.postgres.password_file's; TLS: PGSSLMODE=verify-full PGSSLROOTCERT={ca})\n\
         the keys are not in the dump: back the HSM up with its vendor's tools (SoftHSM2: its token directory)",
        url = pg.url,
        ca = pg.ca_file.display()
    )
}

/// `backup --out FILE`: works while the service runs; needs no keys.
pub fn backup(config: &Path, out: &Path) -> Result<()> {
    let cfg: Config = load_for_run(config)?;
    refuse_root(&cfg)?;
    refuse_postgres(&cfg, "backup")?;
    if out.exists() {
        bail!("{} exists; choose a new file", out.display());
    }
    let store = super::setup::open_store(&cfg)?;
    let tokens = store.count(crate::protocol::storage::Collection::Tokens)?;
    let bytes = store.backup_to(out)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "backup": out.display().to_string(),
            "bytes": bytes,
            "tokens": tokens,
        }))?
    );
    eprintln!("documents stay sealed: the backup is useless without this appliance's HSM or TPM keys (back those up with the device's own tools)");
    Ok(())
}

/// What a restore found in the backup.
struct Checked {
    tokens: u64,
    fields: u64,
    totp_keys: u64,
    oauth_clients: u64,
    bind_codes: u64,
    bound: bool,
}

/// Every document must parse and every sealed field open under the current
/// keys; every TOTP seed key it names must be in the device; every OAuth
/// client secret and outstanding bind code must open too.
fn check(store: &Store, backend: &Backend) -> Result<Checked> {
    let otp_keys = backend
        .list_otp()
        .map_err(|e| anyhow!("key backend: {e}"))?;
    let mut c = Checked {
        tokens: 0,
        fields: 0,
        totp_keys: 0,
        oauth_clients: 0,
        bind_codes: 0,
        bound: false,
    };
    let mut after: Option<String> = None;
    loop {
        let project =
            |k: &[u8], v: &[u8]| Ok((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
        let (page, more) = store.list_as(
            Collection::Tokens,
            false,
            Some(MAX_PAGE),
            after.as_deref(),
            None,
            &project,
        )?;
        for (service, v) in &page {
            let doc: TokenDocument = serde_json::from_slice(v)
                .map_err(|_| anyhow!("token {service:?}: the document does not parse"))?;
            let opened = open_fields(backend, service, &doc).map_err(|e| {
                anyhow!("token {service:?}: {e} (was the backup taken with other keys?)")
            })?;
            c.fields += opened.len() as u64;
            drop(opened);
            if let Some(id) = &doc.otp {
                if !otp_keys.contains(id) {
                    bail!("token {service:?}: its TOTP seed key {id} is not in the key device");
                }
                c.totp_keys += 1;
            }
            c.tokens += 1;
        }
        match more.next_cursor {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    for raw in store.oauth_all()? {
        let client: crate::broker::oauth::OAuthClient = serde_json::from_slice(&raw)
            .map_err(|_| anyhow!("an OAuth client record does not parse"))?;
        client.secret(backend).map_err(|e| {
            anyhow!(
                "OAuth client {:?}: its secret does not open: {} (was the backup taken with other keys?)",
                client.name,
                e.message()
            )
        })?;
        c.oauth_clients += 1;
    }
    for (code, rec) in store.bind_codes_all()? {
        crate::binding::code_opens(backend, &code, &rec).map_err(|e| {
            anyhow!("an outstanding bind code does not open: {e} (was the backup taken with other keys?)")
        })?;
        c.bind_codes += 1;
    }
    Ok(c)
}

/// `restore --from FILE [--force]`: the service must be stopped.
pub fn restore(config: &Path, from: &Path, force: bool) -> Result<()> {
    let cfg: Config = load_for_run(config)?;
    refuse_root(&cfg)?;
    refuse_postgres(&cfg, "restore")?;
    if !from.is_file() {
        bail!("{} is not a file", from.display());
    }
    let backend = open_device(&cfg)?.backend();
    let staged = stage_restore(&cfg.store.path, from, force, cfg.store.map_size_mib << 20)?;
    let backend = crate::custody::keyring::keyring(backend, staged.store());
    let mut checked = check(staged.store(), &backend)?;
    // The binding: the backup's HMAC key must still be in the device (a
    // re-bind since the backup destroyed it). If not, restore unbound.
    let key = staged.store().meta_get(META_HMAC_KEY_ID)?;
    if let Some(id) = key {
        let id = HmacKeyId(String::from_utf8_lossy(&id).into_owned());
        if backend.activate_hmac(&id).is_ok() {
            checked.bound = true;
        } else {
            staged.store().meta_delete_blocking(META_HMAC_KEY_ID)?;
            staged.store().meta_delete_blocking(META_BOUND_AT)?;
            eprintln!("the backup's binding key is no longer in the key device (re-bound since the backup): the restored store is unbound; bind again with register-url");
        }
    }
    let kept = staged.commit()?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "restored": cfg.store.path.display().to_string(),
            "tokens": checked.tokens,
            "fieldsVerified": checked.fields,
            "totpKeysVerified": checked.totp_keys,
            "oauthClientsVerified": checked.oauth_clients,
            "bindCodesVerified": checked.bind_codes,
            "bound": checked.bound,
            "previous": kept.map(|p| p.display().to_string()),
        }))?
    );
    Ok(())
}
