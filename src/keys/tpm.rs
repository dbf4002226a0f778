//! TPM 2.0 backend (tss-esapi). The AES-256 key and each HMAC secret are
//! sealed to the TPM as keyed-hash objects under a primary key the TPM
//! re-creates from its owner seed and a fixed template; the sealed blobs live
//! in `<store.path>/tpm` and are useless without this TPM (and, with `pcrs`,
//! without the same PCR values). At start the keys are unsealed over a
//! session salted to the primary key (so they cross the bus encrypted) into
//! locked, zeroizing pages; per-request HMAC and AES-GCM then run in software.
//! The TPM is reached again only to seal a new HMAC secret (bind).

use super::locked::{LockError, LockedKey};
use super::*;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::RwLock;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Digest, EccPoint, EccScheme, KeyDerivationFunctionScheme, KeyedHashScheme,
    PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;
use zeroize::Zeroizing;

const BLOB_FORMAT: &str = "tvw-tpm-sealed-v1";
const AES_BLOB: &str = "aes.json";

/// The sealed blob of AES generation `gen` (`aes.json` is generation 1).
fn aes_blob(gen: AesGen) -> String {
    if gen == FIRST_AES_GEN {
        AES_BLOB.into()
    } else {
        format!("aes-{gen}.json")
    }
}

fn aes_gen_of(name: &str) -> Option<AesGen> {
    if name == AES_BLOB {
        return Some(FIRST_AES_GEN);
    }
    name.strip_prefix("aes-")?
        .strip_suffix(".json")?
        .parse()
        .ok()
        .filter(|g| *g > FIRST_AES_GEN)
}
const HMAC_PREFIX: &str = "hmac-";

/// Why the TPM backend could not start; each names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TpmSetupError {
    #[error("cannot reach the TPM via {tcti:?}: {detail} (is the device present and the service user in the `tss` group? for swtpm: is it running, with its control port at port+1?)")]
    Connect { tcti: String, detail: String },
    #[error("{0}: this sealed key was made by a different TPM, or this TPM was cleared (its owner seed changed); restore the original TPM, or re-initialise (documents sealed under the old key are then lost)")]
    WrongTpm(PathBuf),
    #[error("{path}: PCR values changed since this key was sealed (PCRs {pcrs:?}, SHA-256 bank), e.g. a firmware or Secure Boot change; boot the state it was sealed in")]
    PcrChanged { path: PathBuf, pcrs: Vec<u8> },
    #[error("the TPM is in dictionary-attack lockout; wait for it to recover or reset it with the lockout authorisation (tpm2_dictionarylockout --clear-lockout)")]
    Lockout,
    #[error("the TPM owner hierarchy has an authorisation value; this appliance needs an owner hierarchy without one (tpm2_changeauth -c owner)")]
    OwnerAuth,
    #[error("{0}: {1}")]
    Blob(PathBuf, String),
    #[error("TPM {op} failed: {detail}")]
    Command { op: &'static str, detail: String },
    #[error("locked memory: {0}")]
    Lock(#[from] LockError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

#[derive(Debug, Clone)]
pub struct TpmSettings {
    pub tcti: String,
    /// Where the sealed blobs live (`<store.path>/tpm`).
    pub dir: PathBuf,
    /// PCRs (SHA-256 bank) new seals are bound to.
    pub pcrs: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct SealedBlob {
    format: String,
    purpose: String,
    pcrs: Vec<u8>,
    public: String,
    private: String,
}

type HmacKeys = (HashMap<String, LockedKey>, Option<String>);

pub struct TpmBackend {
    settings: TpmSettings,
    /// Unsealed AES keys by generation. A generation another process
    /// created (`rotate-key`) is unsealed on first use.
    aes: RwLock<BTreeMap<AesGen, LockedKey>>,
    hmac: RwLock<HmacKeys>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn rc_kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        _ => None,
    }
}

fn cmd(op: &'static str) -> impl Fn(tss_esapi::Error) -> TpmSetupError {
    move |e| match rc_kind(&e) {
        Some(Tss2ResponseCodeKind::Lockout) => TpmSetupError::Lockout,
        Some(Tss2ResponseCodeKind::AuthFail) | Some(Tss2ResponseCodeKind::BadAuth)
            if op == "create primary" =>
        {
            TpmSetupError::OwnerAuth
        }
        _ => TpmSetupError::Command {
            op,
            detail: e.to_string(),
        },
    }
}

/// One connection: leftovers flushed, the primary key loaded. Everything it
/// loaded is flushed when it is dropped.
struct Conn {
    ctx: Context,
    primary: Option<KeyHandle>,
    /// One connection per process at a time: without a resource manager
    /// (a simulator, or /dev/tpm0) connections share the TPM's handles, and
    /// each one flushes what it finds at start. Dropped last.
    _serial: std::sync::MutexGuard<'static, ()>,
}

static TPM_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(h) = self.primary.take() {
            let _ = self.ctx.flush_context(h.into());
        }
    }
}

/// The storage primary key: ECC P-256, restricted decryption, AES-128-CFB
/// for its children. The template is fixed, so the TPM re-creates the same
/// key from its owner seed every time.
fn primary_template() -> Result<Public, tss_esapi::Error> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                .with_ecc_scheme(EccScheme::Null)
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(false)
                .with_is_decryption_key(true)
                .with_restricted(true)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

fn sealed_template(policy: Option<Digest>) -> Result<Public, tss_esapi::Error> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_admin_with_policy(true)
        .with_user_with_auth(policy.is_none())
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(policy.unwrap_or_default())
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Default::default())
        .build()
}

fn pcr_selection(pcrs: &[u8]) -> Result<PcrSelectionList, tss_esapi::Error> {
    let mut slots = Vec::with_capacity(pcrs.len());
    for p in pcrs {
        slots.push(PcrSlot::try_from(1u32 << p)?);
    }
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
}

impl Conn {
    fn open(tcti: &str) -> Result<Conn, TpmSetupError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| TpmSetupError::Connect {
            tcti: tcti.into(),
            detail: e.to_string(),
        })?;
        let serial = TPM_SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let ctx = Context::new(conf).map_err(|e| TpmSetupError::Connect {
            tcti: tcti.into(),
            detail: e.to_string(),
        })?;
        let mut c = Conn {
            ctx,
            primary: None,
            _serial: serial,
        };
        c.flush_leftovers();
        let primary = c
            .ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(
                    Hierarchy::Owner,
                    primary_template()?,
                    None,
                    None,
                    None,
                    None,
                )
            })
            .map_err(cmd("create primary"))?
            .key_handle;
        c.primary = Some(primary);
        Ok(c)
    }

    /// Transient objects and sessions a killed process left behind (a
    /// simulator without a resource manager has only 3 object slots). With
    /// /dev/tpmrm0 the resource manager shows only this connection's, so
    /// this finds nothing there.
    fn flush_leftovers(&mut self) {
        let mut flushed = 0;
        for first in [0x8000_0000u32, 0x0200_0000, 0x0300_0000] {
            let handles = match self.ctx.get_capability(CapabilityType::Handles, first, 64) {
                Ok((CapabilityData::Handles(list), _)) => list.into_inner(),
                _ => continue,
            };
            for h in handles {
                if !matches!(
                    h,
                    TpmHandle::Transient(_)
                        | TpmHandle::HmacSession(_)
                        | TpmHandle::PolicySession(_)
                        | TpmHandle::LoadedSession(_)
                ) {
                    continue;
                }
                if let Ok(obj) = self.ctx.tr_from_tpm_public(h) {
                    if self.ctx.flush_context(obj).is_ok() {
                        flushed += 1;
                    }
                }
            }
        }
        if flushed > 0 {
            tracing::warn!(
                flushed,
                "flushed TPM handles left behind by an earlier process"
            );
        }
    }

    fn primary(&self) -> Result<KeyHandle, TpmSetupError> {
        self.primary.ok_or(TpmSetupError::Command {
            op: "primary",
            detail: "not loaded".into(),
        })
    }

    /// A session salted to the primary key: parameters it protects cross
    /// the bus encrypted (`decrypt`: the command's first parameter,
    /// `encrypt`: the response's).
    fn salted(
        &mut self,
        kind: SessionType,
        decrypt: bool,
        encrypt: bool,
    ) -> Result<AuthSession, TpmSetupError> {
        let primary = self.primary()?;
        let s = self
            .ctx
            .start_auth_session(
                Some(primary),
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(cmd("start session"))?
            .ok_or(TpmSetupError::Command {
                op: "start session",
                detail: "no session".into(),
            })?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(decrypt)
            .with_encrypt(encrypt)
            .build();
        self.ctx
            .tr_sess_set_attributes(s, attrs, mask)
            .map_err(cmd("session attributes"))?;
        Ok(s)
    }

    fn end(&mut self, s: AuthSession) {
        let h: ObjectHandle = SessionHandle::from(s).into();
        let _ = self.ctx.flush_context(h);
    }

    /// Digest of PolicyPCR over the current values of `pcrs`.
    fn pcr_policy(&mut self, pcrs: &[u8]) -> Result<Digest, TpmSetupError> {
        let sel = pcr_selection(pcrs).map_err(cmd("PCR selection"))?;
        let (_, _, values) = self
            .ctx
            .execute_without_session(|ctx| ctx.pcr_read(sel.clone()))
            .map_err(cmd("PCR read"))?;
        if values.value().len() != pcrs.len() {
            return Err(TpmSetupError::Command {
                op: "PCR read",
                detail: format!(
                    "{} of {} PCR values returned",
                    values.value().len(),
                    pcrs.len()
                ),
            });
        }
        let mut h = Sha256::new();
        for v in values.value() {
            h.update(v.value());
        }
        let pcr_digest = Digest::try_from(h.finalize().to_vec()).map_err(cmd("PCR digest"))?;
        let trial = self
            .ctx
            .execute_without_session(|ctx| {
                ctx.start_auth_session(
                    None,
                    None,
                    None,
                    SessionType::Trial,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(cmd("trial session"))?
            .ok_or(TpmSetupError::Command {
                op: "trial session",
                detail: "no session".into(),
            })?;
        let result = (|| {
            let ps = PolicySession::try_from(trial).map_err(cmd("trial session"))?;
            self.ctx
                .execute_without_session(|ctx| ctx.policy_pcr(ps, pcr_digest, sel))
                .map_err(cmd("PolicyPCR"))?;
            self.ctx
                .execute_without_session(|ctx| ctx.policy_get_digest(ps))
                .map_err(cmd("policy digest"))
        })();
        self.end(trial);
        result
    }

    fn seal(&mut self, secret: &[u8], pcrs: &[u8]) -> Result<(Public, Private), TpmSetupError> {
        let policy = if pcrs.is_empty() {
            None
        } else {
            Some(self.pcr_policy(pcrs)?)
        };
        let template = sealed_template(policy).map_err(cmd("sealed template"))?;
        let data = SensitiveData::try_from(secret.to_vec()).map_err(cmd("sealed data"))?;
        let primary = self.primary()?;
        let s = self.salted(SessionType::Hmac, true, false)?;
        let r = self.ctx.execute_with_session(Some(s), |ctx| {
            ctx.create(primary, template, None, Some(data), None, None)
        });
        self.end(s);
        let r = r.map_err(cmd("create sealed object"))?;
        Ok((r.out_public, r.out_private))
    }

    fn unseal(
        &mut self,
        path: &Path,
        blob: &SealedBlob,
    ) -> Result<Zeroizing<Vec<u8>>, TpmSetupError> {
        let bad = |what: &str| TpmSetupError::Blob(path.to_path_buf(), what.to_string());
        let public = b64()
            .decode(&blob.public)
            .ok()
            .and_then(|b| Public::unmarshall(&b).ok())
            .ok_or_else(|| bad("public part unreadable"))?;
        let private = b64()
            .decode(&blob.private)
            .ok()
            .and_then(|b| Private::try_from(b).ok())
            .ok_or_else(|| bad("private part unreadable"))?;
        let primary = self.primary()?;
        let obj = self
            .ctx
            .execute_with_nullauth_session(|ctx| ctx.load(primary, private, public))
            .map_err(|e| match rc_kind(&e) {
                Some(Tss2ResponseCodeKind::Integrity) | Some(Tss2ResponseCodeKind::Binding) => {
                    TpmSetupError::WrongTpm(path.to_path_buf())
                }
                _ => cmd("load sealed object")(e),
            })?;
        let kind = if blob.pcrs.is_empty() {
            SessionType::Hmac
        } else {
            SessionType::Policy
        };
        let result = (|| {
            let s = self.salted(kind, false, true)?;
            let r = (|| {
                if !blob.pcrs.is_empty() {
                    let sel = pcr_selection(&blob.pcrs).map_err(cmd("PCR selection"))?;
                    let ps = PolicySession::try_from(s).map_err(cmd("policy session"))?;
                    self.ctx
                        .execute_without_session(|ctx| ctx.policy_pcr(ps, Digest::default(), sel))
                        .map_err(cmd("PolicyPCR"))?;
                }
                self.ctx
                    .execute_with_session(Some(s), |ctx| ctx.unseal(obj.into()))
                    .map_err(|e| match rc_kind(&e) {
                        Some(Tss2ResponseCodeKind::PolicyFail)
                        | Some(Tss2ResponseCodeKind::Value)
                        | Some(Tss2ResponseCodeKind::PcrChanged) => TpmSetupError::PcrChanged {
                            path: path.to_path_buf(),
                            pcrs: blob.pcrs.clone(),
                        },
                        _ => cmd("unseal")(e),
                    })
            })();
            self.end(s);
            r
        })();
        let _ = self.ctx.flush_context(obj.into());
        Ok(Zeroizing::new(result?.value().to_vec()))
    }

    fn random(&mut self, n: usize) -> Result<Zeroizing<Vec<u8>>, TpmSetupError> {
        let d = self
            .ctx
            .execute_without_session(|ctx| ctx.get_random(n))
            .map_err(cmd("get random"))?;
        Ok(Zeroizing::new(d.value().to_vec()))
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), TpmSetupError> {
    crate::fsutil::write_atomic(path, data).map_err(|e| TpmSetupError::Io(path.to_path_buf(), e))
}

fn read_blob(path: &Path) -> Result<SealedBlob, TpmSetupError> {
    let text = std::fs::read(path).map_err(|e| TpmSetupError::Io(path.to_path_buf(), e))?;
    let blob: SealedBlob = serde_json::from_slice(&text)
        .map_err(|e| TpmSetupError::Blob(path.to_path_buf(), format!("not a sealed key: {e}")))?;
    if blob.format != BLOB_FORMAT {
        return Err(TpmSetupError::Blob(
            path.to_path_buf(),
            format!("unknown format {:?}", blob.format),
        ));
    }
    Ok(blob)
}

fn hmac_id_of(name: &str) -> Option<&str> {
    name.strip_prefix(HMAC_PREFIX)?.strip_suffix(".json")
}

impl TpmBackend {
    /// Connects, flushes leftovers and unseals every key present (the AES
    /// key if `init` ran, the HMAC secrets of past binds) into locked memory.
    pub fn open(settings: TpmSettings) -> Result<TpmBackend, TpmSetupError> {
        let b = TpmBackend {
            settings,
            aes: RwLock::new(BTreeMap::new()),
            hmac: RwLock::new((HashMap::new(), None)),
        };
        let mut hmac_paths: Vec<(String, PathBuf)> = Vec::new();
        let mut aes_paths: Vec<(AesGen, PathBuf)> = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&b.settings.dir) {
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = hmac_id_of(&name) {
                    hmac_paths.push((id.to_string(), e.path()));
                } else if let Some(gen) = aes_gen_of(&name) {
                    aes_paths.push((gen, e.path()));
                }
            }
        }
        let mut conn = Conn::open(&b.settings.tcti)?;
        let mut aes = BTreeMap::new();
        for (gen, path) in aes_paths {
            aes.insert(gen, b.unseal_aes(&mut conn, &path)?);
        }
        if let Ok(mut g) = b.aes.write() {
            *g = aes;
        }
        let mut map = HashMap::new();
        for (id, path) in hmac_paths {
            let blob = read_blob(&path)?;
            let key = conn.unseal(&path, &blob)?;
            map.insert(id, LockedKey::new(&key)?);
        }
        if let Ok(mut g) = b.hmac.write() {
            g.0 = map;
        }
        Ok(b)
    }

    fn unseal_aes(&self, conn: &mut Conn, path: &Path) -> Result<LockedKey, TpmSetupError> {
        let blob = read_blob(path)?;
        self.warn_if_policy_differs(path, &blob);
        let key = conn.unseal(path, &blob)?;
        if key.len() != 32 {
            return Err(TpmSetupError::Blob(
                path.to_path_buf(),
                "not a 32-byte key".into(),
            ));
        }
        Ok(LockedKey::new(&key)?)
    }

    fn warn_if_policy_differs(&self, path: &Path, blob: &SealedBlob) {
        if blob.pcrs != self.settings.pcrs {
            tracing::warn!(
                file = %path.display(),
                sealed_to = ?blob.pcrs,
                configured = ?self.settings.pcrs,
                "this key is sealed to other PCRs than keys.tpm.pcrs; new seals use the configured PCRs"
            );
        }
    }

    /// `init`: creates and seals the AES key unless one exists. Returns
    /// whether it created one.
    pub fn ensure_aes_key(&self) -> Result<bool, TpmSetupError> {
        if self.aes.read().is_ok_and(|g| !g.is_empty()) {
            return Ok(false);
        }
        let path = self.settings.dir.join(AES_BLOB);
        if path.exists() {
            return Err(TpmSetupError::Blob(
                path,
                "exists but was not unsealed".into(),
            ));
        }
        self.create_gen(FIRST_AES_GEN)
    }

    /// Creates and seals generation `gen` unless its blob exists.
    fn create_gen(&self, gen: AesGen) -> Result<bool, TpmSetupError> {
        let path = self.settings.dir.join(aes_blob(gen));
        if path.exists() {
            return Ok(false);
        }
        crate::fsutil::create_private_dir(&self.settings.dir)
            .map_err(|e| TpmSetupError::Io(self.settings.dir.clone(), e))?;
        let mut conn = Conn::open(&self.settings.tcti)?;
        let key = fresh_key(&mut conn)?;
        self.write_sealed(&mut conn, &path, "aes", &key)?;
        let locked = LockedKey::new(&key)?;
        if let Ok(mut g) = self.aes.write() {
            g.insert(gen, locked);
        }
        Ok(true)
    }

    fn write_sealed(
        &self,
        conn: &mut Conn,
        path: &Path,
        purpose: &str,
        secret: &[u8],
    ) -> Result<(), TpmSetupError> {
        let (public, private) = conn.seal(secret, &self.settings.pcrs)?;
        let blob = SealedBlob {
            format: BLOB_FORMAT.into(),
            purpose: purpose.into(),
            pcrs: self.settings.pcrs.clone(),
            public: b64().encode(public.marshall().map_err(cmd("marshal public"))?),
            private: b64().encode(private.value()),
        };
        let json = serde_json::to_vec_pretty(&blob)
            .map_err(|e| TpmSetupError::Blob(path.to_path_buf(), e.to_string()))?;
        write_atomic(path, &json)
    }

    /// Files this backend keeps (for doctor and tests).
    pub fn blob_dir(&self) -> &Path {
        &self.settings.dir
    }

    /// Whether every key held in memory sits in a locked page.
    pub fn keys_locked(&self) -> bool {
        let aes = self
            .aes
            .read()
            .map(|g| g.values().all(|k| k.is_locked()))
            .unwrap_or(false);
        let hmac = self
            .hmac
            .read()
            .map(|g| g.0.values().all(|k| k.is_locked()))
            .unwrap_or(false);
        aes && hmac
    }

    /// Runs `f` with the key of generation `gen`, unsealing it first if
    /// another process created it since this one started.
    fn with_aes<T>(
        &self,
        gen: AesGen,
        f: impl FnOnce(&LockedKey) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        {
            let g = self.aes.read().map_err(|_| KeyError::Unavailable)?;
            if let Some(k) = g.get(&gen) {
                return f(k);
            }
        }
        let path = self.settings.dir.join(aes_blob(gen));
        if !path.exists() {
            return Err(KeyError::NoAesKey);
        }
        let mut conn = Conn::open(&self.settings.tcti).map_err(unavailable("connect"))?;
        // Another thread may have unsealed it while this one waited.
        if !self.aes.read().is_ok_and(|g| g.contains_key(&gen)) {
            let key = self
                .unseal_aes(&mut conn, &path)
                .map_err(unavailable("unseal"))?;
            tracing::info!(generation = gen, "AES key generation unsealed on first use");
            let mut g = self.aes.write().map_err(|_| KeyError::Unavailable)?;
            g.entry(gen).or_insert(key);
        }
        drop(conn);
        let g = self.aes.read().map_err(|_| KeyError::Unavailable)?;
        f(g.get(&gen).ok_or(KeyError::NoAesKey)?)
    }
}

/// 32 bytes from the TPM's RNG mixed with the OS RNG: neither alone decides the key.
fn fresh_key(conn: &mut Conn) -> Result<Zeroizing<Vec<u8>>, TpmSetupError> {
    let mut key = conn.random(32)?;
    if key.len() != 32 {
        return Err(TpmSetupError::Command {
            op: "get random",
            detail: format!("{} bytes", key.len()),
        });
    }
    let mut os = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(os.as_mut()).map_err(|e| TpmSetupError::Command {
        op: "OS random",
        detail: e.to_string(),
    })?;
    for (k, o) in key.iter_mut().zip(os.iter()) {
        *k ^= o;
    }
    Ok(key)
}

fn unavailable(what: &'static str) -> impl Fn(TpmSetupError) -> KeyError {
    move |e| {
        tracing::error!(error = %e, "TPM {what} failed");
        KeyError::Unavailable
    }
}

impl KeyBackendBase for TpmBackend {
    fn kind(&self) -> &'static str {
        "tpm"
    }
    /// Per-request crypto runs on keys already unsealed: nothing to fail.
    fn healthy(&self) -> bool {
        true
    }
    fn aes_key_present(&self) -> bool {
        self.aes.read().is_ok_and(|g| !g.is_empty())
    }
    fn probe(&self) -> Result<(), KeyError> {
        if self.aes_key_present() {
            Ok(())
        } else {
            Err(KeyError::NoAesKey)
        }
    }
}

impl RandomSource for TpmBackend {
    fn fill_random(&self, buf: &mut [u8]) -> Result<(), KeyError> {
        getrandom::getrandom(buf).map_err(|_| KeyError::Unavailable)
    }
}

impl MacKeys for TpmBackend {
    fn install_hmac(&self, secret: &SecretSlice<u8>) -> Result<HmacKeyId, KeyError> {
        let secret = secret.expose_secret();
        if secret.len() < 32 || secret.len() > 128 {
            return Err(KeyError::InvalidInput);
        }
        let mut id = [0u8; 8];
        self.fill_random(&mut id)?;
        let id = hex::encode(id);
        let path = self.settings.dir.join(format!("{HMAC_PREFIX}{id}.json"));
        let key = LockedKey::new(secret).map_err(|e| {
            tracing::error!(error = %e, "cannot lock HMAC key memory");
            KeyError::Unavailable
        })?;
        crate::fsutil::create_private_dir(&self.settings.dir).map_err(|e| {
            tracing::error!(error = %e, "TPM blob dir");
            KeyError::Unavailable
        })?;
        let mut conn = Conn::open(&self.settings.tcti).map_err(unavailable("connect"))?;
        self.write_sealed(&mut conn, &path, "hmac", secret)
            .map_err(unavailable("seal"))?;
        let mut g = self.hmac.write().map_err(|_| KeyError::Unavailable)?;
        g.0.insert(id.clone(), key);
        Ok(HmacKeyId(id))
    }

    fn activate_hmac(&self, id: &HmacKeyId) -> Result<(), KeyError> {
        let mut g = self.hmac.write().map_err(|_| KeyError::Unavailable)?;
        if !g.0.contains_key(&id.0) {
            return Err(KeyError::NoHmacKey);
        }
        g.1 = Some(id.0.clone());
        Ok(())
    }

    fn destroy_hmac_except(&self, keep: Option<&HmacKeyId>) -> Result<usize, KeyError> {
        let mut g = self.hmac.write().map_err(|_| KeyError::Unavailable)?;
        let doomed: Vec<String> =
            g.0.keys()
                .filter(|k| keep.is_none_or(|h| &h.0 != *k))
                .cloned()
                .collect();
        for id in &doomed {
            let path = self.settings.dir.join(format!("{HMAC_PREFIX}{id}.json"));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot remove sealed HMAC key");
                    return Err(KeyError::Unavailable);
                }
            }
            g.0.remove(id);
        }
        if g.1.as_ref().is_some_and(|a| !g.0.contains_key(a)) {
            g.1 = None;
        }
        Ok(doomed.len())
    }

    fn hmac_sha256(&self, data: &[u8]) -> Result<[u8; 32], KeyError> {
        let g = self.hmac.read().map_err(|_| KeyError::Unavailable)?;
        let id = g.1.as_ref().ok_or(KeyError::NoHmacKey)?;
        let key = g.0.get(id).ok_or(KeyError::NoHmacKey)?;
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.as_slice())
            .map_err(|_| KeyError::InvalidInput)?;
        m.update(data);
        Ok(m.finalize().into_bytes().into())
    }
}

/// TOTP seeds are sealed fields under this backend (the key is in software
/// memory anyway; a TPM HMAC per code would cost 60-140 µs for nothing).
impl OtpKeys for TpmBackend {
    fn install_otp(&self, _: &SecretSlice<u8>, _: OtpAlg) -> Result<Option<String>, KeyError> {
        Ok(None)
    }
    fn otp_hmac(&self, _: &str, _: OtpAlg, _: u64) -> Result<Vec<u8>, KeyError> {
        Err(KeyError::InvalidInput)
    }
    fn destroy_otp(&self, _: &str) -> Result<(), KeyError> {
        Ok(())
    }
    fn list_otp(&self) -> Result<Vec<String>, KeyError> {
        Ok(Vec::new())
    }
}

impl SealKeys for TpmBackend {
    fn seal_with(&self, gen: AesGen, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        let mut iv = [0u8; IV_LEN];
        self.fill_random(&mut iv)?;
        let ct = self.with_aes(gen, |k| {
            let cipher =
                Aes256Gcm::new_from_slice(k.as_slice()).map_err(|_| KeyError::InvalidInput)?;
            cipher
                .encrypt(
                    &Nonce::from(iv),
                    Payload {
                        msg: plaintext,
                        aad,
                    },
                )
                .map_err(|_| KeyError::InvalidInput)
        })?;
        let mut out = Vec::with_capacity(IV_LEN + ct.len());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    fn open_with(
        &self,
        gen: AesGen,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let (iv, ct) = split_sealed(sealed)?;
        let iv: [u8; IV_LEN] = iv.try_into().map_err(|_| KeyError::DecryptFailed)?;
        self.with_aes(gen, |k| {
            let cipher =
                Aes256Gcm::new_from_slice(k.as_slice()).map_err(|_| KeyError::InvalidInput)?;
            cipher
                .decrypt(&Nonce::from(iv), Payload { msg: ct, aad })
                .map(Zeroizing::new)
                .map_err(|_| KeyError::DecryptFailed)
        })
    }
}

impl AesGenerations for TpmBackend {
    fn create_aes(&self, gen: AesGen) -> Result<bool, KeyError> {
        self.create_gen(gen)
            .map_err(unavailable("AES key creation"))
    }

    fn aes_generations(&self) -> Result<Vec<AesGen>, KeyError> {
        let mut gens: Vec<AesGen> = match std::fs::read_dir(&self.settings.dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter_map(|e| aes_gen_of(&e.file_name().to_string_lossy()))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::error!(dir = %self.settings.dir.display(), error = %e, "cannot list sealed keys");
                return Err(KeyError::Unavailable);
            }
        };
        gens.sort_unstable();
        Ok(gens)
    }

    /// Removes the sealed blob (the key cannot be unsealed again) and the
    /// unsealed copy in this process.
    fn destroy_aes(&self, gen: AesGen) -> Result<(), KeyError> {
        let path = self.settings.dir.join(aes_blob(gen));
        match std::fs::remove_file(&path) {
            Ok(()) => {
                let _ = crate::fsutil::fsync_dir(&self.settings.dir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot remove sealed AES key");
                return Err(KeyError::Unavailable);
            }
        }
        if let Ok(mut g) = self.aes.write() {
            g.remove(&gen);
        }
        Ok(())
    }

    fn forget_aes_except(&self, keep: &[AesGen]) {
        if let Ok(mut g) = self.aes.write() {
            g.retain(|gen, _| keep.contains(gen));
        }
    }
}

/// A software TPM for tests and `dev --backend tpm`: `swtpm socket` on two
/// loopback ports (server and control), state in a directory, stopped on
/// drop and when this process dies.
pub mod swtpm {
    use anyhow::{bail, Context as _, Result};
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    pub struct Swtpm {
        child: Option<Child>,
        pub port: u16,
    }

    impl Swtpm {
        pub fn tcti(&self) -> String {
            tcti_for(self.port)
        }
    }

    pub fn tcti_for(port: u16) -> String {
        format!("swtpm:host=127.0.0.1,port={port}")
    }

    /// The server port in a `swtpm:` TCTI string.
    pub fn port_of(tcti: &str) -> Option<u16> {
        let rest = tcti.strip_prefix("swtpm:")?;
        rest.split(',')
            .find_map(|kv| kv.strip_prefix("port="))
            .and_then(|p| p.parse().ok())
    }

    pub fn available() -> bool {
        Command::new("swtpm")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn pair_free(port: u16) -> bool {
        port < u16::MAX
            && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok()
    }

    /// A free pair of consecutive loopback ports.
    pub fn free_port_pair() -> Result<u16> {
        for _ in 0..64 {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            let p = l.local_addr()?.port();
            drop(l);
            if pair_free(p) {
                return Ok(p);
            }
        }
        bail!("no free pair of loopback ports for swtpm")
    }

    pub fn port_pair_free(port: u16) -> bool {
        pair_free(port)
    }

    /// Runs swtpm under a small shell guard whose stdin is a pipe from us:
    /// when we close it (drop) or die, even by SIGKILL, the guard stops
    /// swtpm. No signal from this process is needed, so it works from inside
    /// a Landlock domain that scopes signals (where PR_SET_PDEATHSIG and
    /// kill() to the outside are refused). An asynchronous list's stdin is
    /// /dev/null in a non-interactive shell, hence the pipe on fd 3.
    const GUARD: &str =
        "exec 3<&0; swtpm \"$@\" </dev/null & pid=$!; (read -r _ <&3; kill $pid 2>/dev/null) & wait $pid";

    /// Starts `swtpm socket` with state in `state_dir` on `port` (server)
    /// and `port + 1` (control), and waits until it accepts connections.
    pub fn start(state_dir: &Path, port: u16) -> Result<Swtpm> {
        if !available() {
            bail!("swtpm not found: apt-get install swtpm swtpm-tools");
        }
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(GUARD)
            .arg("swtpm-guard")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state_dir.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start swtpm")?;
        let mut s = Swtpm {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port + 1)).is_ok()
                && TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
            {
                return Ok(s);
            }
            if let Some(c) = s.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    s.child = None;
                    bail!(
                        "swtpm exited at start ({st}); is port {port} or {} in use?",
                        port + 1
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("swtpm did not listen on 127.0.0.1:{port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    impl Drop for Swtpm {
        fn drop(&mut self) {
            if let Some(mut c) = self.child.take() {
                // Closing the guard's stdin stops swtpm (SIGTERM: it finishes
                // writing its state), then the guard exits.
                drop(c.stdin.take());
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = c.kill();
            }
        }
    }
}

#[cfg(test)]
mod tests;
