//! The store's engine seam: named tables of byte keys and values, read in
//! a snapshot and changed in a transaction. Every store operation is
//! written once against [`Read`] and [`Write`]; an engine (LMDB here) only
//! implements them, so each engine gives the same answers, byte for byte
//! (keys are compared as bytes, `memcmp` order, by every engine).

use super::StoreError;
use crate::protocol::storage::Collection;
use std::borrow::Cow;
use std::ops::Bound;

/// The store's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(in crate::store) enum Table {
    Tokens,
    ProxyConfigs,
    Audit,
    VaultConfig,
    Replay,
    BindCodes,
    Meta,
    TotpState,
    OauthClients,
    /// Each token's listing item (`{"key":…,"meta":{…}}`, public meta
    /// only), rendered when the document or its policy is written.
    TokenItems,
    /// The appliance's own audit trail (see [`super::trail`]).
    Trail,
    /// The owner's policies by service, approvals by id, and per-agent use
    /// counts (see [`super::policy`]). No protocol collection reaches them.
    Policies,
    Approvals,
    PolicyUses,
}

impl Table {
    pub const ALL: [Table; 14] = [
        Table::Tokens,
        Table::ProxyConfigs,
        Table::Audit,
        Table::VaultConfig,
        Table::Replay,
        Table::BindCodes,
        Table::Meta,
        Table::TotpState,
        Table::OauthClients,
        Table::TokenItems,
        Table::Trail,
        Table::Policies,
        Table::Approvals,
        Table::PolicyUses,
    ];

    /// The table's stable name (an LMDB database's name).
    pub fn name(self) -> &'static str {
        match self {
            Table::Tokens => "tokens",
            Table::ProxyConfigs => "proxy_configs",
            Table::Audit => "audit",
            Table::VaultConfig => "vault_config",
            Table::Replay => "replay",
            Table::BindCodes => "bind_codes",
            Table::Meta => "meta",
            Table::TotpState => "totp_state",
            Table::OauthClients => "oauth_clients",
            Table::TokenItems => "token_items",
            Table::Trail => "trail",
            Table::Policies => "policies",
            Table::Approvals => "approvals",
            Table::PolicyUses => "policy_uses",
        }
    }

    /// Where a protocol collection's documents live.
    pub fn of(c: Collection) -> Table {
        match c {
            Collection::Tokens => Table::Tokens,
            Collection::ProxyConfigs => Table::ProxyConfigs,
            Collection::Audit => Table::Audit,
            Collection::VaultConfig => Table::VaultConfig,
        }
    }
}

/// A row, owned: (key, value).
pub(in crate::store) type Row = (Vec<u8>, Vec<u8>);

/// Called with each row of a scan; returns whether to go on.
pub(in crate::store) type Visit<'v> = &'v mut dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError>;

/// A consistent snapshot of every table.
pub(in crate::store) trait Read {
    fn get(&self, t: Table, k: &[u8]) -> Result<Option<Cow<'_, [u8]>>, StoreError>;
    /// Visits the rows with keys between `lo` and `hi`, ascending (or
    /// descending with `rev`), until `visit` returns false.
    fn scan(
        &self,
        t: Table,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
        rev: bool,
        visit: Visit<'_>,
    ) -> Result<(), StoreError>;
    /// How many rows `t` holds.
    fn len(&self, t: Table) -> Result<u64, StoreError>;
    /// Bytes `t` takes in the engine, for the trail's size bound (`None`:
    /// the engine does not bound the trail by size).
    fn footprint(&self, t: Table) -> Result<Option<u64>, StoreError>;
}

/// A write transaction: its reads see its own writes; all of it lands or
/// none.
pub(in crate::store) trait Write: Read {
    fn put(&mut self, t: Table, k: &[u8], v: &[u8]) -> Result<(), StoreError>;
    /// Removes a row; false when there was none.
    fn delete(&mut self, t: Table, k: &[u8]) -> Result<bool, StoreError>;
    fn clear(&mut self, t: Table) -> Result<(), StoreError>;
}

/// Shorthands over [`Read`], for every reader and writer.
pub(in crate::store) trait ReadExt: Read {
    /// Every row of `t`, ascending.
    fn each(&self, t: Table, visit: Visit<'_>) -> Result<(), StoreError> {
        self.scan(t, Bound::Unbounded, Bound::Unbounded, false, visit)
    }

    /// Every row of `t`, owned, ascending.
    fn rows(&self, t: Table) -> Result<Vec<Row>, StoreError> {
        let mut out = Vec::new();
        self.each(t, &mut |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// The row's value, owned.
    fn get_owned(&self, t: Table, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(t, k)?.map(Cow::into_owned))
    }

    /// Whether the row holds exactly `expected`.
    fn holds(&self, t: Table, k: &[u8], expected: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(t, k)?.as_deref() == Some(expected))
    }

    /// The row's value parsed as JSON (`what` names it in a corruption error).
    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        t: Table,
        k: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.get(t, k)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|_| StoreError::Corrupt(what)),
            None => Ok(None),
        }
    }
}

impl<R: Read + ?Sized> ReadExt for R {}

/// A range bound on owned bytes, borrowed for a scan.
pub(in crate::store) fn bound(b: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match b {
        Bound::Included(k) => Bound::Included(k.as_slice()),
        Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
        Bound::Unbounded => Bound::Unbounded,
    }
}
