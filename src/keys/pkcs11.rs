//! PKCS#11 backend (cryptoki). Every HMAC and AES-GCM operation runs in the
//! token. Keys are non-extractable token objects; each pooled session holds a
//! session-object copy (still sensitive and non-extractable), which SoftHSM
//! runs about 3x faster than the token object.
//!
//! Sessions are `Send + !Sync`: they live in a pool and are checked out for
//! one synchronous operation at a time; no lock is held while the device works.

use super::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::{AuthPin, Ulong};
use secrecy::ExposeSecret;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};
use zeroize::Zeroize;

pub mod tls;

pub const AES_LABEL: &str = "tokenvault-aes";
pub const HMAC_LABEL: &str = "tokenvault-hmac";
pub const OTP_LABEL: &str = "tokenvault-totp";
/// CKA_ID of AES generation `gen` (`aes-1` is the key `init` created).
fn aes_id(gen: AesGen) -> Vec<u8> {
    format!("aes-{gen}").into_bytes()
}

/// Usual locations of SoftHSM2 on Debian/Ubuntu and Fedora.
pub const SOFTHSM_MODULE_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
];

pub fn find_softhsm_module() -> Option<PathBuf> {
    SOFTHSM_MODULE_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Errors of set-up (not of per-request operations), with operator-facing detail.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot load PKCS#11 module {0}: {1}")]
    Load(PathBuf, String),
    #[error("no initialised token labelled {0:?} (create it with `softhsm2-util --init-token` or the HSM's tools)")]
    NoToken(String),
    #[error("PIN refused by token {0:?}")]
    BadPin(String),
    #[error("PKCS#11 call failed during {0}: {1}")]
    Call(&'static str, String),
}

fn call(what: &'static str) -> impl Fn(CkError) -> SetupError {
    move |e| SetupError::Call(what, e.to_string())
}

/// Loads and initialises the module. Must happen once per process (SoftHSM
/// keeps global state): share the returned context.
pub fn open_module(module: &Path) -> Result<Pkcs11, SetupError> {
    let ctx = Pkcs11::new(module).map_err(|e| SetupError::Load(module.into(), e.to_string()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(ctx),
        Err(e) => Err(SetupError::Load(module.into(), e.to_string())),
    }
}

pub fn find_token(ctx: &Pkcs11, label: &str) -> Result<Option<Slot>, SetupError> {
    for slot in ctx
        .get_slots_with_initialized_token()
        .map_err(call("C_GetSlotList"))?
    {
        let info = ctx.get_token_info(slot).map_err(call("C_GetTokenInfo"))?;
        if info.label().trim_end() == label {
            return Ok(Some(slot));
        }
    }
    Ok(None)
}

/// Initialises a fresh token in the first free slot (SoftHSM always offers one)
/// and sets its user PIN. Used by `dev` and tests.
pub fn init_token(
    ctx: &Pkcs11,
    label: &str,
    so_pin: &AuthPin,
    user_pin: &AuthPin,
) -> Result<Slot, SetupError> {
    let free = ctx
        .get_slots_with_token()
        .map_err(call("C_GetSlotList"))?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| !i.token_initialized())
                .unwrap_or(false)
        })
        .ok_or_else(|| SetupError::Call("C_InitToken", "no free slot".into()))?;
    ctx.init_token(free, so_pin, label)
        .map_err(call("C_InitToken"))?;
    let slot = find_token(ctx, label)?.ok_or_else(|| SetupError::NoToken(label.into()))?;
    let s = ctx.open_rw_session(slot).map_err(call("C_OpenSession"))?;
    s.login(UserType::So, Some(so_pin))
        .map_err(|_| SetupError::BadPin(label.into()))?;
    s.init_pin(user_pin).map_err(call("C_InitPIN"))?;
    s.logout().map_err(call("C_Logout"))?;
    Ok(slot)
}

struct Pooled {
    session: Session,
    /// AES key handles by generation (session copies with `copy_to_session`).
    aes: Vec<(AesGen, ObjectHandle)>,
    hmac: Option<(u64, ObjectHandle)>,
}

pub struct Pkcs11Backend {
    ctx: Pkcs11,
    label: String,
    /// The user PIN. Replaced when the token refuses it and the source
    /// (PIN file or systemd credential) holds a different one.
    pin: Mutex<AuthPin>,
    /// Re-reads the PIN from its source (set by the CLI).
    pin_reader: Option<PinReader>,
    /// When the token last refused the PIN: the same PIN is not presented
    /// again for [`PIN_RETRY_AFTER`], so a PIN changed on the HSM cannot
    /// make the appliance lock the token with failed logins.
    pin_refused_at: Mutex<Option<Instant>>,
    slot: Mutex<Option<Slot>>,
    pool: Mutex<Vec<Pooled>>,
    max_idle: usize,
    copy_to_session: bool,
    active_hmac: RwLock<Option<(HmacKeyId, u64)>>,
    generation: AtomicU64,
    /// AES generations this process may still hold copies of (`None`: all);
    /// set by [`AesGenerations::forget_aes_except`].
    aes_keep: RwLock<Option<Vec<AesGen>>>,
    healthy: AtomicBool,
    aes_present: AtomicBool,
    /// Whether the token offers CKM_SHA_1/SHA256/SHA512_HMAC (TOTP in the device).
    otp_mechs: [bool; 3],
    /// TOTP key id → object handle. Handles are valid across the sessions of
    /// this application; a lookup per code would make SoftHSM rescan its
    /// token directory. Cleared on any device error.
    otp_handles: Mutex<std::collections::HashMap<String, ObjectHandle>>,
    /// The TLS private key's handle (one lookup, not one per handshake).
    /// Cleared on any device error, like `otp_handles`.
    tls_handle: Mutex<Option<ObjectHandle>>,
}

/// Re-reads the user PIN from its configured source.
pub type PinReader = Box<dyn Fn() -> Option<AuthPin> + Send + Sync>;

/// How long a refused PIN is not presented again (a changed PIN file is
/// tried at once).
pub const PIN_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Is this error about the device or the session (rather than the data)?
fn is_device_error(e: &CkError) -> bool {
    match e {
        CkError::Pkcs11(rv, _) => matches!(
            rv,
            RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionClosed
                | RvError::SessionHandleInvalid
                | RvError::SessionCount
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
                | RvError::PinIncorrect
                | RvError::PinLocked
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::FunctionFailed
                | RvError::HostMemory
        ),
        _ => true,
    }
}

impl Pkcs11Backend {
    /// Connects to the token labelled `label` and logs in. Fails if the token
    /// is missing or the PIN is wrong; later device failures are retried.
    pub fn connect(
        ctx: Pkcs11,
        label: &str,
        pin: AuthPin,
        max_idle: usize,
        copy_to_session: bool,
    ) -> Result<Self, SetupError> {
        let slot = find_token(&ctx, label)?.ok_or_else(|| SetupError::NoToken(label.into()))?;
        let b = Pkcs11Backend {
            ctx,
            label: label.into(),
            pin: Mutex::new(pin),
            pin_reader: None,
            pin_refused_at: Mutex::new(None),
            slot: Mutex::new(Some(slot)),
            pool: Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
            copy_to_session,
            active_hmac: RwLock::new(None),
            generation: AtomicU64::new(0),
            aes_keep: RwLock::new(None),
            healthy: AtomicBool::new(true),
            aes_present: AtomicBool::new(false),
            otp_mechs: [false; 3],
            otp_handles: Mutex::new(std::collections::HashMap::new()),
            tls_handle: Mutex::new(None),
        };
        let mut b = b;
        {
            // Ask for the three mechanisms only (listing all of them makes
            // cryptoki log every type it does not know).
            use cryptoki::mechanism::MechanismType as M;
            let has = |m| b.ctx.get_mechanism_info(slot, m).is_ok_and(|i| i.sign());
            b.otp_mechs = [has(M::SHA1_HMAC), has(M::SHA256_HMAC), has(M::SHA512_HMAC)];
        }
        let s = b.open_session().map_err(|e| match e {
            CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _) => {
                SetupError::BadPin(label.into())
            }
            e => SetupError::Call("C_OpenSession/C_Login", e.to_string()),
        })?;
        let aes = find_one(&s.session, &aes_template(None)).map_err(call("C_FindObjects"))?;
        b.aes_present.store(aes.is_some(), Ordering::Relaxed);
        b.give_back(s);
        Ok(b)
    }

    /// `init`: creates the first AES-256 key unless any generation exists.
    /// Returns true if it was created.
    pub fn ensure_aes_key(&self) -> Result<bool, SetupError> {
        let s = self.open_session().map_err(call("C_OpenSession/C_Login"))?;
        if find_one(&s.session, &aes_template(None))
            .map_err(call("C_FindObjects"))?
            .is_some()
        {
            self.aes_present.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        generate_aes(&s.session, FIRST_AES_GEN).map_err(call("C_GenerateKey"))?;
        self.aes_present.store(true, Ordering::Relaxed);
        Ok(true)
    }

    /// Reads back the AES key's security attributes (for tests and `doctor`).
    pub fn aes_key_attributes(&self) -> Result<(bool, bool), KeyError> {
        self.with_session(|p| {
            // Every generation: all must be sensitive, none extractable.
            let keys = p.session.find_objects(&aes_template(None))?;
            if keys.is_empty() {
                return Err(CkError::InvalidValue);
            }
            let mut sensitive = true;
            let mut extractable = false;
            for h in keys {
                let attrs = p.session.get_attributes(
                    h,
                    &[
                        cryptoki::object::AttributeType::Sensitive,
                        cryptoki::object::AttributeType::Extractable,
                    ],
                )?;
                let (mut s, mut x) = (false, true);
                for a in attrs {
                    match a {
                        Attribute::Sensitive(v) => s = v,
                        Attribute::Extractable(v) => x = v,
                        _ => {}
                    }
                }
                sensitive &= s;
                extractable |= x;
            }
            Ok((sensitive, extractable))
        })
    }

    fn slot(&self) -> Result<Slot, CkError> {
        if let Ok(g) = self.slot.lock() {
            if let Some(s) = *g {
                return Ok(s);
            }
        }
        // Re-resolve (the token may have come back in another slot).
        let slot = find_token(&self.ctx, &self.label)
            .ok()
            .flatten()
            .ok_or(CkError::Pkcs11(
                RvError::TokenNotPresent,
                cryptoki::context::Function::OpenSession,
            ))?;
        if let Ok(mut g) = self.slot.lock() {
            *g = Some(slot);
        }
        Ok(slot)
    }

    fn open_session(&self) -> Result<Pooled, CkError> {
        let slot = self.slot()?;
        let session = match self.ctx.open_rw_session(slot) {
            Ok(s) => s,
            Err(e) => {
                if let Ok(mut g) = self.slot.lock() {
                    *g = None;
                }
                return Err(e);
            }
        };
        self.login(&session)?;
        Ok(Pooled {
            session,
            aes: Vec::new(),
            hmac: None,
        })
    }

    /// Where the user PIN can be re-read after the token refuses it.
    pub fn set_pin_reader(&mut self, reader: PinReader) {
        self.pin_reader = Some(reader);
    }

    /// `C_Login` as the user. After the token refused the PIN, a new PIN
    /// from the source is tried at once; the same PIN only after
    /// [`PIN_RETRY_AFTER`] (each refusal counts towards the token's lockout).
    fn login(&self, session: &Session) -> Result<(), CkError> {
        let refused = self.pin_refused_at.lock().ok().and_then(|g| *g);
        if let Some(at) = refused {
            let fresh = self.pin_reader.as_ref().and_then(|r| r());
            let changed = match (&fresh, self.pin.lock()) {
                (Some(new), Ok(mut cur)) if new.expose_secret() != cur.expose_secret() => {
                    *cur = new.clone();
                    true
                }
                _ => false,
            };
            if changed {
                tracing::info!("trying the new PIN from the PIN source");
            } else if at.elapsed() < PIN_RETRY_AFTER {
                return Err(CkError::Pkcs11(
                    RvError::PinIncorrect,
                    cryptoki::context::Function::Login,
                ));
            }
        }
        let pin = self
            .pin
            .lock()
            .map(|p| p.clone())
            .map_err(|_| CkError::InvalidValue)?;
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                if refused.is_some() {
                    tracing::info!("the token accepted the PIN again");
                    if let Ok(mut g) = self.pin_refused_at.lock() {
                        *g = None;
                    }
                }
                Ok(())
            }
            Err(e) => {
                if matches!(e, CkError::Pkcs11(RvError::PinIncorrect, _)) {
                    tracing::error!(
                        "the token refused the PIN (changed on the HSM?): key operations answer 503 until the PIN source holds the new PIN; the same PIN is not retried for {} s, so the token is not locked",
                        PIN_RETRY_AFTER.as_secs()
                    );
                    if let Ok(mut g) = self.pin_refused_at.lock() {
                        *g = Some(Instant::now());
                    }
                }
                Err(e)
            }
        }
    }

    fn give_back(&self, mut p: Pooled) {
        // A session that was checked out when a generation was retired
        // drops its copy of that key on the way back.
        if let Ok(keep) = self.aes_keep.read() {
            if let Some(keep) = keep.as_ref() {
                self.drop_aes_copies(&mut p, keep);
            }
        }
        if let Ok(mut pool) = self.pool.lock() {
            if pool.len() < self.max_idle {
                pool.push(p);
            }
        }
    }

    /// Runs `f` on a pooled session. On a device or session error the pool
    /// is emptied and `f` is retried once on a fresh session (a token that
    /// came back is used again without a restart); if that fails too the
    /// backend is marked unhealthy and `Unavailable` is returned.
    fn with_session<T>(
        &self,
        mut f: impl FnMut(&mut Pooled) -> Result<T, CkError>,
    ) -> Result<T, KeyError> {
        let mut fresh = false;
        loop {
            let popped = if fresh {
                None
            } else {
                self.pool.lock().ok().and_then(|mut p| p.pop())
            };
            let mut p = match popped {
                Some(p) => p,
                None => self.open_session().map_err(|e| {
                    tracing::error!(error = %e, "PKCS#11 session could not be opened");
                    self.healthy.store(false, Ordering::Relaxed);
                    KeyError::Unavailable
                })?,
            };
            match f(&mut p) {
                Ok(v) => {
                    self.healthy.store(true, Ordering::Relaxed);
                    self.give_back(p);
                    return Ok(v);
                }
                Err(e) if is_device_error(&e) => {
                    drop(p);
                    if let Ok(mut pool) = self.pool.lock() {
                        pool.clear();
                    }
                    if let Ok(mut h) = self.otp_handles.lock() {
                        h.clear();
                    }
                    if let Ok(mut h) = self.tls_handle.lock() {
                        *h = None;
                    }
                    if fresh {
                        tracing::error!(error = %e, "PKCS#11 operation failed on a fresh session");
                        self.healthy.store(false, Ordering::Relaxed);
                        return Err(KeyError::Unavailable);
                    }
                    tracing::warn!(error = %e, "PKCS#11 session failed; retrying on a fresh session");
                    fresh = true;
                }
                Err(CkError::InvalidValue) => {
                    self.give_back(p);
                    return Err(KeyError::NoHmacKey);
                }
                Err(e) => {
                    // Data errors (bad tag etc.): the session is fine but its
                    // operation state is unknown, so it is not reused.
                    tracing::debug!(error = %e, "PKCS#11 data error");
                    return Err(KeyError::DecryptFailed);
                }
            }
        }
    }

    /// Imports `value` as a sensitive, non-extractable, sign-only token
    /// `CKK_GENERIC_SECRET` under a fresh random id (the label and class come
    /// from `template`). The template's copy of the value is zeroized.
    fn import_secret(
        &self,
        template: fn(Option<&str>) -> Vec<Attribute>,
        value: &[u8],
        verify: bool,
    ) -> Result<String, KeyError> {
        let mut raw = [0u8; 8];
        self.fill_random(&mut raw)?;
        let id = hex::encode(raw);
        self.with_session(|p| {
            let mut t = template(Some(&id));
            t.extend([
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Sign(true),
                Attribute::Verify(verify),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Derive(false),
                Attribute::Value(value.to_vec()),
            ]);
            let r = p.session.create_object(&t);
            for a in t.iter_mut() {
                if let Attribute::Value(v) = a {
                    v.zeroize();
                }
            }
            r.map(|_| ())
        })?;
        Ok(id)
    }

    /// The handle of generation `gen` in this session; `None` if the token
    /// has no such key.
    fn drop_aes_copies(&self, p: &mut Pooled, keep: &[AesGen]) {
        p.aes.retain(|(g, h)| {
            let kept = keep.contains(g);
            if !kept && self.copy_to_session {
                let _ = p.session.destroy_object(*h);
            }
            kept
        });
    }

    fn aes_handle(&self, p: &mut Pooled, gen: AesGen) -> Result<Option<ObjectHandle>, CkError> {
        if let Some((_, h)) = p.aes.iter().find(|(g, _)| *g == gen) {
            return Ok(Some(*h));
        }
        let Some(token) = find_one(&p.session, &aes_template(Some(gen)))? else {
            return Ok(None);
        };
        let h = if self.copy_to_session {
            p.session.copy_object(token, &[Attribute::Token(false)])?
        } else {
            token
        };
        p.aes.push((gen, h));
        Ok(Some(h))
    }

    fn hmac_handle(&self, p: &mut Pooled) -> Result<ObjectHandle, CkError> {
        let (id, gen) = self
            .active_hmac
            .read()
            .ok()
            .and_then(|g| g.clone())
            .ok_or(CkError::InvalidValue)?;
        if let Some((g, h)) = p.hmac {
            if g == gen {
                return Ok(h);
            }
            if self.copy_to_session {
                let _ = p.session.destroy_object(h);
            }
            p.hmac = None;
        }
        let token =
            find_one(&p.session, &hmac_template(Some(&id.0)))?.ok_or(CkError::InvalidValue)?;
        let h = if self.copy_to_session {
            p.session.copy_object(token, &[Attribute::Token(false)])?
        } else {
            token
        };
        p.hmac = Some((gen, h));
        Ok(h)
    }
}

/// The AES key of generation `gen`, or (`None`) of any generation.
fn aes_template(gen: Option<AesGen>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Label(AES_LABEL.as_bytes().to_vec()),
    ];
    if let Some(gen) = gen {
        t.push(Attribute::Id(aes_id(gen)));
    }
    t
}

/// A new AES-256 token key: sensitive, non-extractable, encrypt/decrypt only.
fn generate_aes(s: &Session, gen: AesGen) -> Result<ObjectHandle, CkError> {
    let mut t = aes_template(Some(gen));
    t.extend([
        Attribute::ValueLen(Ulong::from(32)),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Sign(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]);
    s.generate_key(&Mechanism::AesKeyGen, &t)
}

fn hmac_template(id: Option<&str>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(true),
        Attribute::Label(HMAC_LABEL.as_bytes().to_vec()),
    ];
    if let Some(id) = id {
        t.push(Attribute::Id(id.as_bytes().to_vec()));
    }
    t
}

fn otp_template(id: Option<&str>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(true),
        Attribute::Label(OTP_LABEL.as_bytes().to_vec()),
    ];
    if let Some(id) = id {
        t.push(Attribute::Id(id.as_bytes().to_vec()));
    }
    t
}

fn otp_index(alg: OtpAlg) -> usize {
    match alg {
        OtpAlg::Sha1 => 0,
        OtpAlg::Sha256 => 1,
        OtpAlg::Sha512 => 2,
    }
}

fn otp_mechanism(alg: OtpAlg) -> Mechanism<'static> {
    match alg {
        OtpAlg::Sha1 => Mechanism::Sha1Hmac,
        OtpAlg::Sha256 => Mechanism::Sha256Hmac,
        OtpAlg::Sha512 => Mechanism::Sha512Hmac,
    }
}

/// The key the device gets for a seed: HMAC hashes keys longer than its block
/// and zero-pads shorter ones, so pre-hashing long seeds and zero-padding up
/// to SoftHSM's minimum key size (20/32/64 bytes) gives identical codes.
pub fn otp_device_key(seed: &[u8], alg: OtpAlg) -> Zeroizing<Vec<u8>> {
    let (digest, min) = match alg {
        OtpAlg::Sha1 => (&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, 20),
        OtpAlg::Sha256 => (&ring::digest::SHA256, 32),
        OtpAlg::Sha512 => (&ring::digest::SHA512, 64),
    };
    let mut k = if seed.len() > alg.block_len() {
        Zeroizing::new(ring::digest::digest(digest, seed).as_ref().to_vec())
    } else {
        Zeroizing::new(seed.to_vec())
    };
    if k.len() < min {
        k.resize(min, 0);
    }
    k
}

fn find_one(s: &Session, t: &[Attribute]) -> Result<Option<ObjectHandle>, CkError> {
    Ok(s.find_objects(t)?.into_iter().next())
}

impl KeyBackendBase for Pkcs11Backend {
    fn kind(&self) -> &'static str {
        "pkcs11"
    }
    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
    fn aes_key_present(&self) -> bool {
        self.aes_present.load(Ordering::Relaxed)
    }
    fn probe(&self) -> Result<(), KeyError> {
        self.with_session(|p| {
            let mut b = [0u8; 1];
            p.session.generate_random_slice(&mut b)
        })
    }
}

impl RandomSource for Pkcs11Backend {
    fn fill_random(&self, buf: &mut [u8]) -> Result<(), KeyError> {
        self.with_session(|p| p.session.generate_random_slice(buf))
    }
}

impl MacKeys for Pkcs11Backend {
    fn install_hmac(&self, secret: &SecretSlice<u8>) -> Result<HmacKeyId, KeyError> {
        // SoftHSM's minimum for CKM_SHA256_HMAC is 32 bytes; the protocol uses exactly 32.
        if secret.expose_secret().len() < 32 {
            return Err(KeyError::InvalidInput);
        }
        let id = self.import_secret(hmac_template, secret.expose_secret(), true)?;
        Ok(HmacKeyId(id))
    }

    fn activate_hmac(&self, id: &HmacKeyId) -> Result<(), KeyError> {
        let found = self.with_session(|p| find_one(&p.session, &hmac_template(Some(&id.0))))?;
        if found.is_none() {
            return Err(KeyError::NoHmacKey);
        }
        let gen = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let mut g = self
            .active_hmac
            .write()
            .map_err(|_| KeyError::Unavailable)?;
        *g = Some((id.clone(), gen));
        Ok(())
    }

    fn destroy_hmac_except(&self, keep: Option<&HmacKeyId>) -> Result<usize, KeyError> {
        self.with_session(|p| {
            let mut n = 0;
            for h in p.session.find_objects(&hmac_template(None))? {
                let attrs = p
                    .session
                    .get_attributes(h, &[cryptoki::object::AttributeType::Id])?;
                let id = attrs.into_iter().find_map(|a| match a {
                    Attribute::Id(v) => Some(v),
                    _ => None,
                });
                let keep_it =
                    matches!((keep, id), (Some(k), Some(v)) if k.0.as_bytes() == v.as_slice());
                if !keep_it {
                    p.session.destroy_object(h)?;
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    fn hmac_sha256(&self, data: &[u8]) -> Result<[u8; 32], KeyError> {
        let mac = self.with_session(|p| {
            let h = self.hmac_handle(p)?;
            p.session.sign(&Mechanism::Sha256Hmac, h, data)
        })?;
        mac.try_into().map_err(|_| KeyError::Unavailable)
    }
}

impl OtpKeys for Pkcs11Backend {
    fn install_otp(&self, seed: &SecretSlice<u8>, alg: OtpAlg) -> Result<Option<String>, KeyError> {
        if !self.otp_mechs[otp_index(alg)] {
            return Ok(None);
        }
        let key = otp_device_key(seed.expose_secret(), alg);
        let id = self.import_secret(otp_template, &key, false)?;
        Ok(Some(id))
    }

    fn otp_hmac(&self, id: &str, alg: OtpAlg, counter: u64) -> Result<Vec<u8>, KeyError> {
        let found = self.with_session(|p| {
            let cached = self
                .otp_handles
                .lock()
                .ok()
                .and_then(|m| m.get(id).copied());
            let h = match cached {
                Some(h) => h,
                None => {
                    let Some(h) = find_one(&p.session, &otp_template(Some(id)))? else {
                        return Ok(None);
                    };
                    if let Ok(mut m) = self.otp_handles.lock() {
                        m.insert(id.to_string(), h);
                    }
                    h
                }
            };
            p.session
                .sign(&otp_mechanism(alg), h, &counter.to_be_bytes())
                .map(Some)
        })?;
        found.ok_or(KeyError::InvalidInput)
    }

    fn destroy_otp(&self, id: &str) -> Result<(), KeyError> {
        if let Ok(mut m) = self.otp_handles.lock() {
            m.remove(id);
        }
        self.with_session(|p| {
            for h in p.session.find_objects(&otp_template(Some(id)))? {
                p.session.destroy_object(h)?;
            }
            Ok(())
        })
    }

    fn list_otp(&self) -> Result<Vec<String>, KeyError> {
        self.with_session(|p| {
            let mut ids = Vec::new();
            for h in p.session.find_objects(&otp_template(None))? {
                for a in p
                    .session
                    .get_attributes(h, &[cryptoki::object::AttributeType::Id])?
                {
                    if let Attribute::Id(v) = a {
                        ids.push(String::from_utf8_lossy(&v).into_owned());
                    }
                }
            }
            Ok(ids)
        })
    }
}

impl SealKeys for Pkcs11Backend {
    fn seal_with(&self, gen: AesGen, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        let ct = self
            .with_session(|p| {
                let Some(h) = self.aes_handle(p, gen)? else {
                    return Ok(None);
                };
                let mut iv = [0u8; IV_LEN];
                p.session.generate_random_slice(&mut iv)?;
                let params = GcmParams::new(&mut iv, aad, Ulong::from((TAG_LEN * 8) as u64))?;
                let ct = p
                    .session
                    .encrypt(&Mechanism::AesGcm(params), h, plaintext)?;
                let mut out = Vec::with_capacity(IV_LEN + ct.len());
                out.extend_from_slice(&iv);
                out.extend_from_slice(&ct);
                Ok(Some(out))
            })?
            .ok_or(KeyError::NoAesKey)?;
        // Enforce the 128-bit tag: the device must have appended exactly 16 bytes.
        if ct.len() != IV_LEN + plaintext.len() + TAG_LEN {
            return Err(KeyError::Unavailable);
        }
        Ok(ct)
    }

    fn open_with(
        &self,
        gen: AesGen,
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let (iv, ct) = split_sealed(sealed)?;
        let mut iv: [u8; IV_LEN] = iv.try_into().map_err(|_| KeyError::DecryptFailed)?;
        let pt = self
            .with_session(|p| {
                let Some(h) = self.aes_handle(p, gen)? else {
                    return Ok(None);
                };
                let params = GcmParams::new(&mut iv, aad, Ulong::from((TAG_LEN * 8) as u64))?;
                p.session
                    .decrypt(&Mechanism::AesGcm(params), h, ct)
                    .map(Some)
            })?
            .ok_or(KeyError::NoAesKey)?;
        Ok(Zeroizing::new(pt))
    }
}

impl AesGenerations for Pkcs11Backend {
    fn create_aes(&self, gen: AesGen) -> Result<bool, KeyError> {
        let created = self.with_session(|p| {
            if find_one(&p.session, &aes_template(Some(gen)))?.is_some() {
                return Ok(false);
            }
            generate_aes(&p.session, gen).map(|_| true)
        })?;
        self.aes_present.store(true, Ordering::Relaxed);
        Ok(created)
    }

    fn aes_generations(&self) -> Result<Vec<AesGen>, KeyError> {
        let mut gens = self.with_session(|p| {
            let mut out = Vec::new();
            for h in p.session.find_objects(&aes_template(None))? {
                for a in p
                    .session
                    .get_attributes(h, &[cryptoki::object::AttributeType::Id])?
                {
                    if let Attribute::Id(id) = a {
                        let gen = std::str::from_utf8(&id)
                            .ok()
                            .and_then(|i| i.strip_prefix("aes-"))
                            .and_then(|g| g.parse::<AesGen>().ok());
                        out.extend(gen);
                    }
                }
            }
            Ok(out)
        })?;
        gens.sort_unstable();
        gens.dedup();
        Ok(gens)
    }

    fn destroy_aes(&self, gen: AesGen) -> Result<(), KeyError> {
        self.with_session(|p| {
            for h in p.session.find_objects(&aes_template(Some(gen)))? {
                p.session.destroy_object(h)?;
            }
            Ok(())
        })?;
        if let Ok(mut pool) = self.pool.lock() {
            for p in pool.iter_mut() {
                if let Some(i) = p.aes.iter().position(|(g, _)| *g == gen) {
                    let (_, h) = p.aes.swap_remove(i);
                    if self.copy_to_session {
                        let _ = p.session.destroy_object(h);
                    }
                }
            }
        }
        Ok(())
    }

    fn forget_aes_except(&self, keep: &[AesGen]) {
        if let Ok(mut k) = self.aes_keep.write() {
            *k = Some(keep.to_vec());
        }
        let Ok(mut pool) = self.pool.lock() else {
            return;
        };
        for p in pool.iter_mut() {
            self.drop_aes_copies(p, keep);
        }
    }
}

#[cfg(test)]
pub mod testing {
    //! A fresh SoftHSM token in a temp dir. SoftHSM is a per-process
    //! singleton, so a test binary uses one of these at most once.
    use super::*;
    use secrecy::SecretString;

    pub struct TempToken {
        pub dir: tempfile::TempDir,
        pub backend: Pkcs11Backend,
    }

    pub fn fresh_token() -> TempToken {
        let module = find_softhsm_module().expect(
            "SoftHSM2 is required for this test (apt-get install softhsm2); it is not skipped",
        );
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.path().join("tokens").display()
            ),
        )
        .unwrap();
        // SAFETY: set before the module is loaded; unit tests that touch SoftHSM
        // run in one test function per binary.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        let ctx = open_module(&module).unwrap();
        let so = SecretString::from("so-pin-1234");
        let user = SecretString::from("user-pin-1234");
        init_token(&ctx, "tv-test", &so, &user).unwrap();
        let backend = Pkcs11Backend::connect(ctx, "tv-test", user, 4, true).unwrap();
        assert!(backend.ensure_aes_key().unwrap());
        assert!(!backend.ensure_aes_key().unwrap());
        TempToken { dir, backend }
    }
}

#[cfg(test)]
mod tests {
    use super::{GcmParams, Mechanism, Ulong};
    use crate::keys::{KeyBackendBase, MacKeys, SealKeys};

    #[test]
    fn softhsm_backend_conforms_and_keys_are_non_extractable() {
        let t = super::testing::fresh_token();
        super::super::conformance::run_all(&t.backend);
        // SoftHSM has CKM_SHA_1/SHA256/SHA512_HMAC: the device path must run, not be skipped.
        assert!(
            super::super::conformance::otp_matches_rfc6238(&t.backend),
            "TOTP device path not exercised"
        );
        let (sensitive, extractable) = t.backend.aes_key_attributes().unwrap();
        assert!(sensitive && !extractable);

        // Pull the login from under the pool: C_Logout destroys the private
        // session-object key copies of every pooled session.
        // (run_all retired generation 1: generation 2 is the key now.)
        let sealed = t.backend.seal_with(2, b"a", b"before").unwrap();
        {
            let pool = t.backend.pool.lock().unwrap();
            assert!(!pool.is_empty());
            pool[0].session.logout().unwrap();
            // The scenario is real: pooled key handles are now dead.
            let p = pool.iter().find(|p| !p.aes.is_empty()).unwrap();
            let mut iv = [0u8; 12];
            let params = GcmParams::new(&mut iv, b"", Ulong::from(128u64)).unwrap();
            assert!(p
                .session
                .encrypt(&Mechanism::AesGcm(params), p.aes[0].1, b"x")
                .is_err());
        }
        // The next operations recover on a fresh session, without a restart.
        assert_eq!(
            t.backend.open_with(2, b"a", &sealed).unwrap().as_slice(),
            b"before"
        );
        t.backend.hmac_sha256(b"x").unwrap();
        assert!(t.backend.healthy());
        // The secrets run_all installed (the spec vectors' HMAC secrets) are
        // in no file of the token directory in plaintext: the objects are
        // private, so SoftHSM stores them encrypted under its token key.
        let v = crate::testvectors::get("requestSignature");
        let secrets = [
            crate::testvectors::hex_bytes(v, "secretHex"),
            crate::testvectors::hex_bytes(&v["signatureUnderWrongSecret"], "secretHex"),
        ];
        fn files(d: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    files(&p, out);
                } else {
                    out.push(p);
                }
            }
        }
        let mut all = Vec::new();
        files(t.dir.path(), &mut all);
        let objects = all
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "object"))
            .count();
        assert!(objects >= 3, "SoftHSM object files found: {all:?}");
        for f in &all {
            let bytes = std::fs::read(f).unwrap();
            for secret in &secrets {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
                    "an HMAC secret in plaintext in {}",
                    f.display()
                );
            }
        }
    }
}
