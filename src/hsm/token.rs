//! The token: one PKCS#11 context per process (OS_LOCKING_OK), the slot found by
//! token label, one logged-in anchor session that owns the session key copies, a
//! bounded pool of operation sessions run off the async runtime, and recovery
//! (lost sessions are replaced, a lost login is redone and keys re-copied once).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
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
}

impl std::fmt::Debug for HsmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmOptions")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pool_size", &self.pool_size)
            .field("session_copies", &self.session_copies)
            .finish_non_exhaustive()
    }
}

struct Live {
    slot: Slot,
    /// Owns the login and the session key copies; `None` after a test hook closed it.
    anchor: Option<Session>,
}

struct Inner {
    ctx: Pkcs11,
    opts: HsmOptions,
    live: Mutex<Option<Live>>,
    /// Bumped by every recovery; pooled sessions of an older generation are discarded.
    generation: AtomicU64,
    pool: Mutex<Vec<(u64, Session)>>,
    permits: tokio::sync::Semaphore,
    catalogue: RwLock<Arc<Catalogue>>,
    recovering: Mutex<Option<Instant>>,
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
        let hsm = Hsm {
            inner: Arc::new(Inner {
                ctx,
                opts,
                live: Mutex::new(None),
                generation: AtomicU64::new(0),
                pool: Mutex::new(Vec::new()),
                permits: tokio::sync::Semaphore::new(pool_size),
                catalogue: RwLock::new(Arc::new(Catalogue::default())),
                recovering: Mutex::new(None),
            }),
        };
        hsm.establish()?;
        Ok(hsm)
    }

    pub fn token_label(&self) -> &str {
        &self.inner.opts.token_label
    }

    /// The current catalogue (cheap: an `Arc` clone).
    pub fn catalogue(&self) -> Arc<Catalogue> {
        Arc::clone(&self.inner.catalogue.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// True while the token is attached and logged in.
    pub fn is_live(&self) -> bool {
        lock(&self.inner.live).is_some()
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
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                Err(Error::Unavailable("token login refused: user PIN incorrect".into()))
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => Err(Error::Unavailable("token login refused: PIN locked".into())),
            Err(e) => Err(ck("C_Login")(e)),
        }
    }

    /// Attaches to the token: slot by label, anchor session, login, catalogue.
    fn establish(&self) -> Result<()> {
        let slot = self.find_slot()?;
        let anchor = self.inner.ctx.open_rw_session(slot).map_err(ck("C_OpenSession"))?;
        self.login(&anchor)?;
        let cat = {
            let _g = lock(&OBJECTS);
            keys::load(&anchor, None, self.inner.opts.session_copies)?
        };
        let n = cat.len();
        *self.inner.catalogue.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cat);
        *lock(&self.inner.live) = Some(Live { slot, anchor: Some(anchor) });
        tracing::info!(token = %self.inner.opts.token_label, keys = n, "token attached");
        Ok(())
    }

    /// Drops every session of generation `seen` and attaches again. Concurrent callers
    /// that saw the same generation wait and reuse the first caller's result.
    fn recover(&self, seen: u64) -> Result<()> {
        let mut last_failure = lock(&self.inner.recovering);
        if self.inner.generation.load(Ordering::Acquire) != seen && self.is_live() {
            return Ok(());
        }
        if let Some(t) = *last_failure {
            if t.elapsed() < RECOVERY_BACKOFF {
                return Err(Error::Unavailable("token not attached".into()));
            }
        }
        tracing::warn!(token = %self.inner.opts.token_label, "token session lost: logging in again and reloading keys");
        lock(&self.inner.pool).clear();
        *lock(&self.inner.live) = None;
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        let attached = match self.establish() {
            Err(Error::Unavailable(m)) => {
                // The token is not listed: a module may only enumerate tokens when it is
                // initialised (SoftHSM does), so start the library afresh and look again.
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
                *last_failure = Some(Instant::now());
                Err(match e {
                    Error::Unavailable(m) => Error::Unavailable(m),
                    other => Error::Unavailable(other.to_string()),
                })
            }
        }
    }

    /// C_Finalize + C_Initialize: every session of this process ends (they were being
    /// replaced anyway) and the module enumerates its slots and tokens again.
    fn reinitialise(&self) -> Result<()> {
        lock(&self.inner.pool).clear();
        *lock(&self.inner.live) = None;
        if let Err(e) = self.inner.ctx.clone().finalize() {
            tracing::debug!(error = %e, "C_Finalize");
        }
        match self.inner.ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => Ok(()),
            Err(e) => Err(Error::Unavailable(format!("C_Initialize: {e}"))),
        }
    }

    fn take_session(&self) -> Result<(u64, Session)> {
        let gen = self.inner.generation.load(Ordering::Acquire);
        {
            let mut pool = lock(&self.inner.pool);
            while let Some((g, s)) = pool.pop() {
                if g == gen {
                    return Ok((g, s));
                }
            }
        }
        // Read the slot in its own statement: the guard must be gone before recover()
        // takes the same lock.
        let attached = lock(&self.inner.live).as_ref().map(|l| l.slot);
        let slot = match attached {
            Some(slot) => slot,
            None => {
                self.recover(gen)?;
                let attached = lock(&self.inner.live).as_ref().map(|l| l.slot);
                attached.ok_or_else(|| Error::Unavailable("token not attached".into()))?
            }
        };
        let gen = self.inner.generation.load(Ordering::Acquire);
        let s = self.inner.ctx.open_rw_session(slot).map_err(ck("C_OpenSession"))?;
        Ok((gen, s))
    }

    fn give_back(&self, gen: u64, s: Session) {
        if gen == self.inner.generation.load(Ordering::Acquire) {
            let mut pool = lock(&self.inner.pool);
            if pool.len() < self.inner.opts.pool_size.max(1) * 2 {
                pool.push((gen, s));
            }
        }
    }

    /// Runs `f` on a pooled session with the current catalogue, blocking the calling
    /// thread. A lost session or login is recovered once and `f` retried.
    pub(crate) fn exec<T>(&self, f: impl Fn(&Session, &Catalogue) -> Result<T>) -> Result<T> {
        let (gen, s) = self.take_session()?;
        let cat = self.catalogue();
        match f(&s, &cat) {
            Ok(v) => {
                self.give_back(gen, s);
                Ok(v)
            }
            Err(e) if e.is_recoverable() => {
                drop(s);
                tracing::warn!(error = %e, "retrying after token recovery");
                self.recover(gen)?;
                let (gen, s) = self.take_session()?;
                let cat = self.catalogue();
                let r = f(&s, &cat);
                match &r {
                    Err(e) if e.is_recoverable() => drop(s),
                    Err(Error::Unavailable(_)) => drop(s),
                    _ => self.give_back(gen, s),
                }
                r
            }
            Err(e @ Error::Unavailable(_)) => Err(e),
            Err(e) => {
                self.give_back(gen, s);
                Err(e)
            }
        }
    }

    /// As [`Hsm::exec`], from async code: waits for a pool permit, then runs on the
    /// blocking thread pool so PKCS#11 never blocks a runtime worker.
    pub(crate) async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Session, &Catalogue) -> Result<T> + Send + 'static,
    {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("token pool closed".into()))?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.exec(f))
            .await
            .map_err(|e| Error::Token { op: "blocking task", rv: e.to_string() })?
    }

    /// Runs `f` with the anchor session while object creation/search is serialised.
    pub(crate) fn with_anchor<T>(&self, f: impl FnOnce(&Session) -> Result<T>) -> Result<T> {
        let gen = self.inner.generation.load(Ordering::Acquire);
        let needs_recovery = lock(&self.inner.live).as_ref().is_none_or(|l| l.anchor.is_none());
        if needs_recovery {
            self.recover(gen)?;
        }
        let _objects = lock(&OBJECTS);
        let live = lock(&self.inner.live);
        let anchor = live
            .as_ref()
            .and_then(|l| l.anchor.as_ref())
            .ok_or_else(|| Error::Unavailable("token not attached".into()))?;
        f(anchor)
    }

    /// Serialises a token-object change made on an operation session.
    pub(crate) fn object_guard(&self) -> MutexGuard<'_, ()> {
        lock(&OBJECTS)
    }

    /// Re-reads the catalogue from the token (SIGHUP, AdminService.ReloadKeys, after a
    /// ceremony change). Unchanged keys keep their session copies.
    pub fn reload(&self) -> Result<usize> {
        let copies = self.inner.opts.session_copies;
        let previous = self.catalogue();
        let cat = match self.with_anchor(|anchor| keys::load(anchor, Some(&previous), copies)) {
            Err(e) if e.is_recoverable() => {
                self.recover(self.inner.generation.load(Ordering::Acquire))?;
                return Ok(self.catalogue().len());
            }
            other => other?,
        };
        let n = cat.len();
        for (label, reason) in cat.refused() {
            tracing::error!(key = %label, %reason, "key refused at reload");
        }
        *self.inner.catalogue.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cat);
        tracing::debug!(keys = n, "key catalogue reloaded");
        Ok(n)
    }

    /// Test hook: closes every session this process holds (pool and anchor), as
    /// C_CloseAllSessions would. The token logs the application out and destroys
    /// the session key copies; the catalogue keeps its now-stale handles, so the next
    /// operation must notice, log in again and re-copy the keys.
    #[doc(hidden)]
    pub fn close_all_sessions_for_test(&self) {
        lock(&self.inner.pool).clear();
        if let Some(live) = lock(&self.inner.live).as_mut() {
            if let Some(anchor) = live.anchor.take() {
                if let Err(e) = anchor.close() {
                    tracing::warn!(error = %e, "closing anchor session");
                }
            }
        }
    }

    /// Number of recoveries so far (for tests and health reporting).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }
}
