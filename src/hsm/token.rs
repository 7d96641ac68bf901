//! The token: one PKCS#11 context per process (OS_LOCKING_OK), the slot found by
//! token label, one logged-in anchor session that owns the session key copies, a
//! pool of operation sessions driven by a fixed set of worker threads (never the
//! async runtime's), and recovery: lost sessions are replaced, a lost login is redone
//! and keys re-copied, a vanished token is looked for again, all while no operation
//! is in flight (a gate), so no call ever uses a handle of an older attachment.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use secrecy::{ExposeSecret, SecretString};

use super::keys::{self, Catalogue};
use super::{ck, Error, Result};

/// How to reach the token.
#[derive(Clone)]
pub struct HsmOptions {
    /// Path of the PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so).
    pub module: PathBuf,
    /// Token label; the slot is looked up by it every time the token is (re)attached.
    pub token_label: String,
    /// User PIN.
    pub user_pin: SecretString,
    /// Upper bound of concurrent PKCS#11 operations from async callers.
    pub pool_size: usize,
    /// Copy hot-path keys into session objects (the appliance); the ceremony CLI works on token objects.
    pub session_copies: bool,
    /// Re-initialise the module once this many session objects were made since it was
    /// last initialised (0: never; `None`: [`SOFTHSM_RECYCLE_AFTER`] on SoftHSM below 2.7,
    /// whose memory for a session object is freed only by `C_Finalize`, else never).
    pub recycle_after_objects: Option<u64>,
}

/// Session objects between two re-initialisations of SoftHSM below 2.7 by default
/// (each keeps about 600 bytes there until `C_Finalize`: about 30 MiB).
pub const SOFTHSM_RECYCLE_AFTER: u64 = 50_000;

impl std::fmt::Debug for HsmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmOptions")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pool_size", &self.pool_size)
            .field("session_copies", &self.session_copies)
            .field("recycle_after_objects", &self.recycle_after_objects)
            .finish_non_exhaustive()
    }
}

/// The current attachment to the token.
#[derive(Clone, Copy)]
struct Attached {
    slot: Slot,
    /// Generation of this attachment; sessions and catalogues of another one are stale.
    gen: u64,
}

struct Inner {
    ctx: Pkcs11,
    opts: HsmOptions,
    /// `Some` while attached; read briefly, never held across a token call.
    attached: Mutex<Option<Attached>>,
    /// Owns the login and the session key copies; `None` after a test hook closed it.
    anchor: Mutex<Option<Session>>,
    /// Source of attachment generations.
    next_gen: AtomicU64,
    pool: Mutex<Vec<(u64, Session)>>,
    /// Every token operation holds the read side; (re)attaching holds the write side,
    /// so recovery never runs under an operation and no operation sees a half-made
    /// attachment or a handle of an older one.
    gate: RwLock<()>,
    /// Threads that run PKCS#11 calls for async callers.
    workers: Arc<Workers>,
    catalogue: RwLock<Arc<Catalogue>>,
    /// Time of the last failed attach (rate limit), under the recovery lock.
    recovering: Mutex<Option<Instant>>,
    /// The token refused the PIN: never retried automatically (HSMs lock or zeroise
    /// after repeated wrong PINs); an operator restarts the appliance.
    login_refused: AtomicBool,
    /// The token first attached: its serial number and its keys' check values. A token
    /// found later under the same label must match (never attached otherwise).
    identity: Mutex<Option<Identity>>,
    /// Why the token found under the label was last refused (cleared by an attach).
    refused: Mutex<Option<String>>,
    /// Session objects made since the module was last (re)initialised that trigger a
    /// recycle (0: never).
    recycle_after: u64,
    /// [`CREATED`] when the module was last (re)initialised by this `Hsm`.
    created_base: AtomicU64,
    /// Recycles done.
    recycles: AtomicU64,
    /// A recycle is under way: the token counts as attached (health stays SERVING;
    /// calls wait at the gate rather than fail).
    recycling: AtomicBool,
}

/// What identifies the token first attached.
struct Identity {
    serial: String,
    /// Token label of each key version -> its KCV.
    kcvs: std::collections::HashMap<String, String>,
}

/// The token's identity as status answers show it.
#[derive(Debug, Clone, Default)]
pub struct TokenIdentity {
    /// Serial number of the token first attached (empty before).
    pub serial: String,
    /// Why a token found under the label is refused now.
    pub refused: Option<String>,
}

/// A queued token operation; `abandoned` is true once its caller went away.
struct Job {
    run: Box<dyn FnOnce() + Send + 'static>,
    abandoned: Box<dyn Fn() -> bool + Send + 'static>,
}

/// Operations queued for the workers at most; beyond, callers get UNAVAILABLE at once
/// rather than waiting behind work that will outlive their deadline.
const MAX_QUEUED: usize = 4096;

struct WorkQueue {
    jobs: std::collections::VecDeque<Job>,
    idle: usize,
    closed: bool,
}

/// A fixed set of threads draining one job queue. A busy worker takes the next job
/// without sleeping, so under load a submission costs no thread wake-up (a tokio
/// `spawn_blocking` per call costs two context switches).
struct Workers {
    queue: Mutex<WorkQueue>,
    ready: std::sync::Condvar,
}

impl Workers {
    fn start(n: usize) -> Result<Arc<Workers>> {
        let w = Arc::new(Workers {
            queue: Mutex::new(WorkQueue { jobs: std::collections::VecDeque::new(), idle: 0, closed: false }),
            ready: std::sync::Condvar::new(),
        });
        for i in 0..n {
            let worker = Arc::clone(&w);
            std::thread::Builder::new()
                .name(format!("keyward-hsm-{i}"))
                .spawn(move || worker.run())
                .map_err(|e| Error::Unavailable(format!("cannot start token worker threads: {e}")))?;
        }
        Ok(w)
    }

    fn run(&self) {
        let mut q = lock(&self.queue);
        loop {
            if let Some(job) = q.jobs.pop_front() {
                drop(q);
                // A caller that gave up (deadline, reset stream) does not get token work
                // done on its behalf. A panicking job must not take the worker with it;
                // its caller sees the dropped reply channel as UNAVAILABLE.
                if !(job.abandoned)() && std::panic::catch_unwind(std::panic::AssertUnwindSafe(job.run)).is_err() {
                    tracing::error!("token operation panicked");
                }
                q = lock(&self.queue);
                continue;
            }
            if q.closed {
                return;
            }
            q.idle += 1;
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            q.idle -= 1;
        }
    }

    fn submit(&self, job: Job) -> Result<()> {
        let mut q = lock(&self.queue);
        if q.closed {
            return Err(Error::Unavailable("token workers stopped".into()));
        }
        if q.jobs.len() >= MAX_QUEUED {
            return Err(Error::Unavailable("token busy: too many operations queued".into()));
        }
        q.jobs.push_back(job);
        if q.idle > 0 {
            self.ready.notify_one();
        }
        Ok(())
    }

    fn close(&self) {
        lock(&self.queue).closed = true;
        self.ready.notify_all();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.workers.close();
        OPEN.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handle to the token; cheap to clone, shared by every service.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hsm").field("opts", &self.inner.opts).finish_non_exhaustive()
    }
}

/// A poisoned lock only means another thread panicked while holding it; the
/// protected data (sessions, handles) stays consistent, so carry on.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

const RECOVERY_BACKOFF: Duration = Duration::from_millis(500);

/// Object creation and search race in SoftHSM 2.6.1, whose state is per process:
/// serialised across every `Hsm` of the process.
static OBJECTS: Mutex<()> = Mutex::new(());

/// Session objects made in this process (derived and unwrapped keys, transient imports,
/// session key copies). SoftHSM 2.6.1 frees a session object's attributes when it is
/// destroyed but keeps the object itself until `C_Finalize` (upstream SoftHSMv2 issues
/// 562 and 563): this count tells when to re-initialise the module.
static CREATED: AtomicU64 = AtomicU64::new(0);

/// `Hsm`s open in this process. `C_Finalize` ends every session of the process, so a
/// recycle runs only while one is open (the appliance has one; tests may have several).
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// Counts one session object made (call after every successful create, copy, derive,
/// unwrap or generate of a session object).
pub(crate) fn note_created() {
    CREATED.fetch_add(1, Ordering::Relaxed);
}

/// The recycle threshold for `module` when the config leaves it to the appliance.
fn default_recycle(ctx: &Pkcs11) -> u64 {
    match ctx.get_library_info() {
        Ok(info) => {
            let v = info.library_version();
            if info.manufacturer_id().trim_end().starts_with("SoftHSM") && (v.major(), v.minor()) < (2, 7) {
                SOFTHSM_RECYCLE_AFTER
            } else {
                0
            }
        }
        Err(_) => 0,
    }
}

impl Hsm {
    /// Loads the module, finds the token by label, logs in and loads the catalogue.
    pub fn open(opts: HsmOptions) -> Result<Hsm> {
        let ctx = Pkcs11::new(&opts.module).map_err(|e| match e {
            CkError::LibraryLoading(e) => {
                Error::Unavailable(format!("cannot load PKCS#11 module {}: {e}", opts.module.display()))
            }
            other => Error::Unavailable(format!("PKCS#11 module {}: {other}", opts.module.display())),
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(ck("C_Initialize")(e)),
        }
        let pool_size = opts.pool_size.max(1);
        let recycle_after = opts.recycle_after_objects.unwrap_or_else(|| default_recycle(&ctx));
        let workers = Workers::start(pool_size)?;
        OPEN.fetch_add(1, Ordering::AcqRel);
        let hsm = Hsm {
            inner: Arc::new(Inner {
                ctx,
                opts,
                attached: Mutex::new(None),
                anchor: Mutex::new(None),
                next_gen: AtomicU64::new(1),
                pool: Mutex::new(Vec::new()),
                gate: RwLock::new(()),
                workers,
                catalogue: RwLock::new(Arc::new(Catalogue::default())),
                recovering: Mutex::new(None),
                login_refused: AtomicBool::new(false),
                identity: Mutex::new(None),
                refused: Mutex::new(None),
                recycle_after,
                created_base: AtomicU64::new(CREATED.load(Ordering::Relaxed)),
                recycles: AtomicU64::new(0),
                recycling: AtomicBool::new(false),
            }),
        };
        {
            let _w = hsm.gate_write();
            hsm.establish()?;
        }
        Ok(hsm)
    }

    pub fn token_label(&self) -> &str {
        &self.inner.opts.token_label
    }

    /// The current catalogue (cheap: an `Arc` clone).
    pub fn catalogue(&self) -> Arc<Catalogue> {
        Arc::clone(&self.inner.catalogue.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// True while the token is attached and logged in (or re-attached by a recycle).
    pub fn is_live(&self) -> bool {
        lock(&self.inner.attached).is_some() || self.inner.recycling.load(Ordering::Acquire)
    }

    /// The serial number of the token first attached, and why a token is refused now.
    pub fn identity(&self) -> TokenIdentity {
        TokenIdentity {
            serial: lock(&self.inner.identity).as_ref().map(|i| i.serial.clone()).unwrap_or_default(),
            refused: lock(&self.inner.refused).clone(),
        }
    }

    /// Checks, without waiting for a call to fail, that the token is still there:
    /// the anchor session must answer C_GetSessionInfo and the slot C_GetTokenInfo.
    /// A lost token is detached (health turns NOT_SERVING) and looked for again, as a
    /// failed call would; a detached one is attached again when it is back. Blocking:
    /// run it off the async runtime. True when attached afterwards.
    pub fn probe(&self) -> bool {
        match self.attachment() {
            Some(a) => {
                if !self.answers(a) {
                    tracing::warn!(token = %self.inner.opts.token_label, "token probe failed");
                    let _ = self.recover(Some(a.gen));
                }
            }
            None => {
                let _ = self.recover(None);
            }
        }
        self.is_live()
    }

    /// Whether the attachment `a` still answers: the anchor session C_GetSessionInfo and
    /// the slot C_GetTokenInfo. Call without the gate held.
    fn answers(&self, a: Attached) -> bool {
        let _r = self.gate_read();
        let anchor_ok = lock(&self.inner.anchor).as_ref().is_some_and(|s| s.get_session_info().is_ok());
        anchor_ok && self.inner.ctx.get_token_info(a.slot).is_ok()
    }

    /// An operation failed with an error that is not a lost session: if the token no
    /// longer answers, it vanished under the call (SoftHSM answers CKR_GENERAL_ERROR to
    /// the first object creation after its files went): detach, so health and every call
    /// say UNAVAILABLE, and answer UNAVAILABLE; else the error stands.
    fn unless_gone(&self, e: Error, gen: u64) -> Error {
        if !matches!(e, Error::Token { .. }) {
            return e;
        }
        match self.attachment() {
            Some(a) if a.gen == gen && self.answers(a) => e,
            _ => {
                tracing::warn!(error = %e, "token error and the token no longer answers: attaching again");
                let _ = self.recover(Some(gen));
                Error::Unavailable(format!("token lost during the operation ({e})"))
            }
        }
    }

    /// Compares the token just logged in to with the one first attached (the first
    /// attach records it). Keys present in both must have the same check values; keys
    /// new since (a ceremony) are added.
    fn check_identity(&self, serial: &str, cat: &Catalogue) -> Result<()> {
        let kcvs: std::collections::HashMap<String, String> =
            cat.iter().map(|e| (e.meta.label(), e.meta.kcv.clone())).collect();
        let mut known = lock(&self.inner.identity);
        let Some(id) = known.as_mut() else {
            *known = Some(Identity { serial: serial.to_string(), kcvs });
            return Ok(());
        };
        let why = if id.serial != serial {
            Some(format!("serial number {serial:?}, the token first attached had {:?}", id.serial))
        } else {
            let mut changed: Vec<&str> = kcvs
                .iter()
                .filter(|(label, kcv)| id.kcvs.get(*label).is_some_and(|k| k != *kcv))
                .map(|(label, _)| label.as_str())
                .collect();
            changed.sort_unstable();
            (!changed.is_empty()).then(|| format!("key check values differ for {}", changed.join(", ")))
        };
        if let Some(why) = why {
            let msg = format!("token {:?} is not the token first attached: {why}", self.inner.opts.token_label);
            let mut refused = lock(&self.inner.refused);
            if refused.as_deref() != Some(msg.as_str()) {
                tracing::error!(alarm = "token-identity", token = %self.inner.opts.token_label, reason = %why,
                    "ALARM: a different token is attached under the configured label; refused, not serving");
            }
            *refused = Some(msg.clone());
            return Err(Error::Unavailable(msg));
        }
        id.kcvs.extend(kcvs);
        *lock(&self.inner.refused) = None;
        Ok(())
    }

    fn attachment(&self) -> Option<Attached> {
        *lock(&self.inner.attached)
    }

    fn gate_read(&self) -> RwLockReadGuard<'_, ()> {
        self.inner.gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn gate_write(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.inner.gate.write().unwrap_or_else(|p| p.into_inner())
    }

    fn find_slot(&self) -> Result<Slot> {
        let ctx = &self.inner.ctx;
        let label = &self.inner.opts.token_label;
        let slots = ctx.get_slots_with_token().map_err(ck("C_GetSlotList"))?;
        for slot in slots {
            if let Ok(info) = ctx.get_token_info(slot) {
                if info.label().trim_end() == label {
                    return Ok(slot);
                }
            }
        }
        Err(Error::Unavailable(format!("no token labelled {label:?}")))
    }

    fn login(&self, session: &Session) -> Result<()> {
        let pin = SecretString::from(self.inner.opts.user_pin.expose_secret().to_owned());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
            Err(CkError::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired), _)) => {
                self.inner.login_refused.store(true, Ordering::Release);
                Err(Error::LoginRefused(format!("{rv:?}")))
            }
            Err(e) => Err(ck("C_Login")(e)),
        }
    }

    /// Attaches to the token: slot by label, anchor session, login, catalogue. Call
    /// with the gate held for writing.
    fn establish(&self) -> Result<()> {
        let slot = self.find_slot()?;
        let serial = self.inner.ctx.get_token_info(slot).map_err(ck("C_GetTokenInfo"))?.serial_number().trim_end().to_string();
        let anchor = self.inner.ctx.open_rw_session(slot).map_err(ck("C_OpenSession"))?;
        self.login(&anchor)?;
        let gen = self.inner.next_gen.fetch_add(1, Ordering::AcqRel);
        let cat = {
            let _g = lock(&OBJECTS);
            keys::load(&anchor, None, self.inner.opts.session_copies, gen)?
        };
        self.check_identity(&serial, &cat)?;
        let n = cat.len();
        *self.inner.catalogue.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cat);
        *lock(&self.inner.anchor) = Some(anchor);
        *lock(&self.inner.attached) = Some(Attached { slot, gen });
        tracing::info!(token = %self.inner.opts.token_label, keys = n, "token attached");
        Ok(())
    }

    /// Drops the attachment of generation `seen` (or none) and attaches again, with no
    /// operation in flight. Callers that saw the same generation reuse the first
    /// caller's result; attach attempts are rate-limited.
    fn recover(&self, seen: Option<u64>) -> Result<()> {
        let mut last_failure = lock(&self.inner.recovering);
        match (self.attachment(), seen) {
            (Some(a), Some(s)) if a.gen != s => return Ok(()),
            (Some(_), None) => return Ok(()),
            _ => {}
        }
        if self.inner.login_refused.load(Ordering::Acquire) {
            return Err(Error::Unavailable("token login refused earlier: restart after fixing the PIN".into()));
        }
        if let Some(t) = *last_failure {
            if t.elapsed() < RECOVERY_BACKOFF {
                return Err(Error::Unavailable("token not attached".into()));
            }
        }
        tracing::warn!(token = %self.inner.opts.token_label, "token session lost: attaching again and reloading keys");
        let _w = self.gate_write();
        self.detach();
        let attached = match self.establish() {
            Err(Error::Unavailable(m)) => {
                // The token is not listed: a module may only enumerate tokens when it is
                // initialised (SoftHSM does), so start the library afresh and look
                // again. Safe here: the gate is held, so no call is inside the module,
                // and every session of this `Hsm` was closed by detach().
                tracing::warn!(reason = %m, "token not found: re-initialising the PKCS#11 module");
                self.reinitialise().and_then(|()| self.establish())
            }
            other => other,
        };
        match attached {
            Ok(()) => {
                *last_failure = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "token recovery failed");
                self.detach();
                *last_failure = Some(Instant::now());
                Err(match e {
                    Error::Unavailable(m) => Error::Unavailable(m),
                    other => Error::Unavailable(other.to_string()),
                })
            }
        }
    }

    /// Closes every session this `Hsm` holds. Call with the gate held for writing.
    fn detach(&self) {
        *lock(&self.inner.attached) = None;
        lock(&self.inner.pool).clear();
        lock(&self.inner.anchor).take();
    }

    /// C_Finalize + C_Initialize, so the module enumerates its slots and tokens again.
    /// Call with the gate held for writing, after detach().
    fn reinitialise(&self) -> Result<()> {
        if let Err(e) = self.inner.ctx.clone().finalize() {
            tracing::debug!(error = %e, "C_Finalize");
        }
        // C_Finalize freed what SoftHSM kept of the session objects made so far.
        self.inner.created_base.store(CREATED.load(Ordering::Relaxed), Ordering::Relaxed);
        match self.inner.ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            Err(e) => Err(Error::Unavailable(format!("C_Initialize: {e}"))),
        }
    }

    /// Session objects made since the module was last (re)initialised by this `Hsm`.
    pub fn objects_since_recycle(&self) -> u64 {
        CREATED.load(Ordering::Relaxed).saturating_sub(self.inner.created_base.load(Ordering::Relaxed))
    }

    /// Times the module was re-initialised to free the memory of session objects.
    pub fn recycles(&self) -> u64 {
        self.inner.recycles.load(Ordering::Relaxed)
    }

    /// Once `recycle_after` session objects were made since the last (re)initialisation
    /// and this is the process's only `Hsm`, re-initialises the module (`C_Finalize` +
    /// `C_Initialize`) and attaches again: SoftHSM below 2.7 frees the memory of
    /// destroyed session objects only then. Operations wait at the gate meanwhile (no
    /// call fails); the derived-key caches see the new generation and start afresh.
    /// Run on a token worker after a job, never with the gate held.
    fn maybe_recycle(&self) {
        let after = self.inner.recycle_after;
        if after == 0 || self.objects_since_recycle() < after || OPEN.load(Ordering::Acquire) != 1 {
            return;
        }
        let mut last_failure = lock(&self.inner.recovering);
        if self.objects_since_recycle() < after || self.attachment().is_none() {
            // Another worker recycled meanwhile, or the token is away (recovery's job).
            return;
        }
        let started = Instant::now();
        let _w = self.gate_write();
        self.inner.recycling.store(true, Ordering::Release);
        self.detach();
        let attached = self.reinitialise().and_then(|()| self.establish());
        self.inner.recycling.store(false, Ordering::Release);
        // The key copies just made are not what the threshold counts.
        self.inner.created_base.store(CREATED.load(Ordering::Relaxed), Ordering::Relaxed);
        match attached {
            Ok(()) => {
                let n = self.inner.recycles.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(
                    objects = after,
                    recycles = n,
                    millis = started.elapsed().as_millis() as u64,
                    "PKCS#11 module re-initialised to free the memory of destroyed session objects"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "attaching after the module re-initialisation failed");
                self.detach();
                *last_failure = Some(Instant::now());
            }
        }
    }

    /// Attaches if nothing is attached. Never call with the gate held.
    fn ensure_attached(&self) -> Result<Attached> {
        if let Some(a) = self.attachment() {
            return Ok(a);
        }
        self.recover(None)?;
        self.attachment().ok_or_else(|| Error::Unavailable("token not attached".into()))
    }

    /// A session of the current attachment. Call with the gate held for reading.
    fn take_session(&self) -> Result<(u64, Session)> {
        let a = self.attachment().ok_or_else(|| Error::Unavailable("token not attached".into()))?;
        {
            let mut pool = lock(&self.inner.pool);
            while let Some((g, s)) = pool.pop() {
                if g == a.gen {
                    return Ok((g, s));
                }
            }
        }
        let s = self.inner.ctx.open_rw_session(a.slot).map_err(ck("C_OpenSession"))?;
        Ok((a.gen, s))
    }

    fn give_back(&self, gen: u64, s: Session) {
        if self.attachment().is_some_and(|a| a.gen == gen) {
            let mut pool = lock(&self.inner.pool);
            if pool.len() < self.inner.opts.pool_size.max(1) * 2 {
                pool.push((gen, s));
            }
        }
    }

    /// One attempt of `f` under the gate. On failure, the generation it ran under.
    fn attempt<T>(&self, f: &impl Fn(&Session, &Catalogue) -> Result<T>) -> Result<T, (Error, Option<u64>)> {
        let _r = self.gate_read();
        let (gen, s) = self.take_session().map_err(|e| (e, None))?;
        let cat = self.catalogue();
        if cat.generation() != gen {
            // Published together under the write gate: cannot differ while we read.
            return Err((Error::Unavailable("token attachment changing".into()), Some(gen)));
        }
        match f(&s, &cat) {
            Ok(v) => {
                self.give_back(gen, s);
                Ok(v)
            }
            // The session may be the broken part: drop it.
            Err(e) if e.is_recoverable() || matches!(e, Error::Unavailable(_) | Error::Token { .. }) => Err((e, Some(gen))),
            Err(e) => {
                self.give_back(gen, s);
                Err((e, Some(gen)))
            }
        }
    }

    /// Runs `f` on a pooled session with the current catalogue, blocking the calling
    /// thread. A lost session or login is recovered once and `f` retried.
    pub(crate) fn exec<T>(&self, f: impl Fn(&Session, &Catalogue) -> Result<T>) -> Result<T> {
        self.ensure_attached()?;
        match self.attempt(&f) {
            Ok(v) => Ok(v),
            Err((e, Some(gen))) if e.is_recoverable() => {
                tracing::warn!(error = %e, "retrying after token recovery");
                self.recover(Some(gen))?;
                self.attempt(&f).map_err(|(e, g)| match g {
                    Some(g) => self.unless_gone(e, g),
                    None => e,
                })
            }
            Err((e, Some(gen))) => Err(self.unless_gone(e, gen)),
            Err((e, None)) => Err(e),
        }
    }

    /// As [`Hsm::exec`], from async code: the call runs on one of the token worker
    /// threads (`hsm.sessions` of them), so PKCS#11 never blocks a runtime worker.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Session, &Catalogue) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let probe = Arc::clone(&tx);
        let this = self.clone();
        self.inner.workers.submit(Job {
            run: Box::new(move || {
                let r = this.exec(f);
                if let Some(tx) = lock(&tx).take() {
                    let _ = tx.send(r);
                }
                this.maybe_recycle();
            }),
            abandoned: Box::new(move || lock(&probe).as_ref().is_none_or(|t| t.is_closed())),
        })?;
        rx.await.map_err(|_| Error::Unavailable("token worker stopped".into()))?
    }

    /// As [`Hsm::with_anchor`], from async code, on a token worker thread: for work
    /// that creates session objects which must outlive the pooled session (derived
    /// key caches belong to the anchor, which lives as long as the attachment).
    /// A lost session or login is recovered once and `f` retried, as in [`Hsm::exec`].
    pub(crate) async fn call_anchor<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Session, &Catalogue) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T>>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        let probe = Arc::clone(&tx);
        let this = self.clone();
        self.inner.workers.submit(Job {
            run: Box::new(move || {
                let gen = this.generation();
                let r = match this.with_anchor(&f) {
                    Err(e) if e.is_recoverable() => {
                        tracing::warn!(error = %e, "retrying after token recovery");
                        this.recover(Some(gen)).and_then(|()| this.with_anchor(&f))
                    }
                    Err(e) => Err(this.unless_gone(e, gen)),
                    other => other,
                };
                if let Some(tx) = lock(&tx).take() {
                    let _ = tx.send(r);
                }
                this.maybe_recycle();
            }),
            abandoned: Box::new(move || lock(&probe).as_ref().is_none_or(|t| t.is_closed())),
        })?;
        rx.await.map_err(|_| Error::Unavailable("token worker stopped".into()))?
    }

    /// Runs `f` with the anchor session while object creation/search is serialised.
    pub(crate) fn with_anchor<T>(&self, f: impl FnOnce(&Session, &Catalogue) -> Result<T>) -> Result<T> {
        let attached = self.ensure_attached()?;
        if lock(&self.inner.anchor).is_none() {
            self.recover(Some(attached.gen))?;
        }
        let _r = self.gate_read();
        let _objects = lock(&OBJECTS);
        let anchor = lock(&self.inner.anchor);
        let anchor = anchor.as_ref().ok_or_else(|| Error::Unavailable("token not attached".into()))?;
        let cat = self.catalogue();
        f(anchor, &cat)
    }

    /// Serialises a token-object change made on an operation session.
    pub(crate) fn object_guard(&self) -> MutexGuard<'_, ()> {
        lock(&OBJECTS)
    }

    /// Re-reads the catalogue from the token (SIGHUP, AdminService.ReloadKeys, after a
    /// ceremony change). Unchanged keys keep their session copies.
    pub fn reload(&self) -> Result<usize> {
        let copies = self.inner.opts.session_copies;
        let loaded = self.with_anchor(|anchor, previous| {
            let cat = keys::load(anchor, Some(previous), copies, previous.generation())?;
            let n = cat.len();
            for (label, reason) in cat.refused() {
                tracing::error!(key = %label, %reason, "key refused at reload");
            }
            if let Some(id) = lock(&self.inner.identity).as_mut() {
                id.kcvs.extend(cat.iter().map(|e| (e.meta.label(), e.meta.kcv.clone())));
            }
            *self.inner.catalogue.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cat);
            Ok(n)
        });
        match loaded {
            Err(e) if e.is_recoverable() => {
                self.recover(self.attachment().map(|a| a.gen))?;
                Ok(self.catalogue().len())
            }
            Ok(n) => {
                tracing::debug!(keys = n, "key catalogue reloaded");
                Ok(n)
            }
            Err(e) => Err(e),
        }
    }

    /// Test hook: closes every session this `Hsm` holds (pool and anchor), as
    /// C_CloseAllSessions would. The token logs the application out and destroys
    /// the session key copies; the catalogue keeps its now-stale handles, so the next
    /// operation must notice, log in again and re-copy the keys.
    #[doc(hidden)]
    pub fn close_all_sessions_for_test(&self) {
        let _w = self.gate_write();
        lock(&self.inner.pool).clear();
        if let Some(anchor) = lock(&self.inner.anchor).take() {
            if let Err(e) = anchor.close() {
                tracing::warn!(error = %e, "closing anchor session");
            }
        }
    }

    /// Generation of the current attachment (raised by every recovery; 0 when detached).
    pub fn generation(&self) -> u64 {
        self.attachment().map(|a| a.gen).unwrap_or(0)
    }
}
