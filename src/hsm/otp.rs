//! TOTP/HOTP seeds in the token: a new seed is wrapped under the OTP KEK (AES key
//! wrap with padding) and leaves only as that blob; verification unwraps the blob
//! into a sensitive, unextractable session object (kept in a bounded cache owned by
//! the anchor session) and computes the HMACs of the candidate counters in the
//! token. Truncation to decimal digits is the caller's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cryptoki::mechanism::Mechanism;
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::keys::{destroy_if_present, Catalogue, KeyEntry};
use super::token::{note_created, Hsm};
use super::{ck, ck_verify, Error, OpKind, Result};

/// HMAC hash of a seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedHash {
    Sha1,
    Sha256,
    Sha512,
}

impl SeedHash {
    fn mechanism(self) -> Mechanism<'static> {
        match self {
            SeedHash::Sha1 => Mechanism::Sha1Hmac,
            SeedHash::Sha256 => Mechanism::Sha256Hmac,
            SeedHash::Sha512 => Mechanism::Sha512Hmac,
        }
    }
}

/// Unwrapped seed objects by blob, bounded; the least recently used goes first.
pub struct SeedCache {
    inner: Mutex<SeedCacheInner>,
    capacity: usize,
}

/// A cached seed object; a clone is held by every job using it, so an evicted
/// object is destroyed only once no job uses it any more.
#[derive(Clone)]
struct SeedObject {
    handle: ObjectHandle,
    users: Arc<()>,
    /// Blob MACs (digest of MAC input and MAC) already checked for this seed: the same
    /// check need not run in the token again.
    verified: Arc<Mutex<Vec<[u8; 32]>>>,
    /// Attachment generation the handle belongs to.
    generation: u64,
}

#[derive(Default)]
struct SeedCacheInner {
    generation: u64,
    tick: u64,
    seeds: HashMap<[u8; 32], (SeedObject, u64)>,
    /// Evicted objects waiting for their last user.
    evicted: Vec<SeedObject>,
}

impl SeedCache {
    pub fn new(capacity: usize) -> SeedCache {
        SeedCache { inner: Mutex::new(SeedCacheInner::default()), capacity: capacity.max(1) }
    }
}

fn seed_template(sign: bool, extractable: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Sign(sign),
        Attribute::Verify(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}

impl Hsm {
    /// Wraps a clear seed (zeroizing memory) under `kek` with AES key wrap with padding.
    pub async fn wrap_seed(&self, kek: Arc<KeyEntry>, seed: Zeroizing<Vec<u8>>) -> Result<Vec<u8>> {
        self.call_anchor(move |s, cat| {
            let k = cat.handles_of(&kek)?;
            let mut t = seed_template(false, true);
            t.push(Attribute::Value(seed.to_vec()));
            let h = s.create_object(&t).map_err(ck("create_object"));
            if let Some(Attribute::Value(mut v)) = t.pop() {
                zeroize::Zeroize::zeroize(&mut v);
            }
            let h = h?;
            note_created();
            let wrapped = s.wrap_key(&Mechanism::AesKeyWrapPad, k.handle, h).map_err(ck("wrap seed"));
            destroy_if_present(s, h)?;
            wrapped
        })
        .await
    }

    /// Imports a seed wrapped under `transport` (AES key wrap with padding): unwraps it
    /// in the token into a session object, checks its length (`lens`: the least and
    /// most bytes, where the token reports it) and wraps it under `kek` as
    /// [`Hsm::wrap_seed`] does, so the seed never leaves the token in clear. Data that
    /// does not unwrap, or a seed of another length, is [`Error::VerifyFailed`].
    pub async fn rewrap_seed(
        &self,
        transport: Arc<KeyEntry>,
        wrapped: Vec<u8>,
        kek: Arc<KeyEntry>,
        lens: (usize, usize),
    ) -> Result<Vec<u8>> {
        let (min_len, max_len) = lens;
        self.call_anchor(move |s, cat| {
            let t = cat.handles_of(&transport)?;
            let k = cat.handles_of(&kek)?;
            let h = s
                .unwrap_key(&Mechanism::AesKeyWrapPad, t.handle, &wrapped, &seed_template(false, true))
                .map_err(|e| match e {
                    CkError::Pkcs11(
                        RvError::WrappedKeyInvalid
                        | RvError::WrappedKeyLenRange
                        | RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::DataInvalid
                        | RvError::DataLenRange
                        | RvError::GeneralError,
                        _,
                    ) => Error::VerifyFailed,
                    other => Error::from_ck("unwrap imported seed", OpKind::Verify, other),
                })?;
            note_created();
            let rewrapped = (|| {
                let len = match s.get_attributes(h, &[AttributeType::ValueLen]).map_err(ck("get_attributes"))?.first() {
                    Some(Attribute::ValueLen(n)) => usize::try_from(u64::from(*n)).unwrap_or(usize::MAX),
                    _ => return Err(Error::Token { op: "imported seed length", rv: "no CKA_VALUE_LEN".into() }),
                };
                // A token that reports the unwrapped length (CKA_VALUE_LEN) has it
                // checked here; SoftHSM reports 0 for an unwrapped generic secret, and
                // then the wrapped length (checked by the caller) bounds the seed.
                if len != 0 && !(min_len..=max_len).contains(&len) {
                    return Err(Error::VerifyFailed);
                }
                s.wrap_key(&Mechanism::AesKeyWrapPad, k.handle, h).map_err(ck("wrap seed"))
            })();
            destroy_if_present(s, h)?;
            rewrapped
        })
        .await
    }

    /// HMACs of `messages` under the seed in `wrapped` (unwrapped under `kek` in the
    /// token, or taken from the cache), in one token job that first checks the blob's
    /// MAC (`check`: the HMAC key, its input, the MAC the blob carries; constant-time).
    /// A MAC that does not match is [`Error::VerifyFailed`] and nothing is unwrapped.
    pub async fn seed_hmacs(
        &self,
        cache: &Arc<SeedCache>,
        check: (Arc<KeyEntry>, Vec<u8>, Vec<u8>),
        kek: Arc<KeyEntry>,
        wrapped: Vec<u8>,
        hash: SeedHash,
        messages: Vec<[u8; 8]>,
    ) -> Result<Vec<Zeroizing<Vec<u8>>>> {
        let id = seed_id(&kek, &wrapped);
        let (mac_key, mac_input, mac) = check;
        let check_id = {
            let mut d = mac_input.clone();
            d.extend_from_slice(&mac);
            crate::crypto::sha256(&d)
        };
        let authentic = move |s: &Session, cat: &Catalogue| -> Result<()> {
            let k = cat.handles_of(&mac_key)?;
            let mech = k
                .meta
                .algorithm
                .hmac_mechanism()
                .ok_or_else(|| Error::KeyUsage { key: k.key_ref(), reason: "not an HMAC key".into() })?;
            let computed = s.sign(&mech, k.handle, &mac_input).map_err(ck("seed blob mac"))?;
            if crate::crypto::mac::ct_eq(&computed, &mac) {
                Ok(())
            } else {
                Err(Error::VerifyFailed)
            }
        };
        let sign = move |s: &Session, h: ObjectHandle| -> Result<Vec<Zeroizing<Vec<u8>>>> {
            let mech = hash.mechanism();
            messages.iter().map(|m| s.sign(&mech, h, m).map(Zeroizing::new).map_err(ck("seed hmac"))).collect()
        };
        // Hot path: a cached seed, used on any pooled session (session objects are
        // visible to every session of the application).
        if let Some(obj) = cache.hit(&id, self.catalogue().generation()) {
            let (authentic, sign) = (authentic.clone(), sign.clone());
            let hot = self
                .call(move |s, cat| {
                    // The token was re-attached since the lookup (a recovery, a module
                    // recycle): the handle is gone, so the seed is unwrapped again below.
                    if cat.generation() != obj.generation {
                        return Ok(None);
                    }
                    if !was_verified(&obj, &check_id) {
                        authentic(s, cat)?;
                        mark_verified(&obj, check_id);
                    }
                    sign(s, obj.handle).map(Some)
                })
                .await?;
            if let Some(codes) = hot {
                return Ok(codes);
            }
        }
        let cache = Arc::clone(cache);
        self.call_anchor(move |s, cat| {
            authentic(s, cat)?;
            let obj = cached_seed(s, cat, &cache, &kek, &wrapped, &id)?;
            mark_verified(&obj, check_id);
            sign(s, obj.handle)
        })
        .await
    }
}

/// Blob MACs remembered per seed (normally one subject per seed).
const VERIFIED_PER_SEED: usize = 8;

fn was_verified(obj: &SeedObject, check_id: &[u8; 32]) -> bool {
    obj.verified.lock().map(|v| v.contains(check_id)).unwrap_or(false)
}

fn mark_verified(obj: &SeedObject, check_id: [u8; 32]) {
    if let Ok(mut v) = obj.verified.lock() {
        if !v.contains(&check_id) {
            if v.len() >= VERIFIED_PER_SEED {
                v.remove(0);
            }
            v.push(check_id);
        }
    }
}

fn seed_id(kek: &KeyEntry, wrapped: &[u8]) -> [u8; 32] {
    let mut id_input = kek.meta.label().into_bytes();
    id_input.extend_from_slice(wrapped);
    crate::crypto::sha256(&id_input)
}

impl SeedCache {
    /// A cached seed of the current attachment, marked in use by the returned clone.
    fn hit(&self, id: &[u8; 32], generation: u64) -> Option<SeedObject> {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if c.generation != generation {
            return None;
        }
        c.tick += 1;
        let tick = c.tick;
        c.seeds.get_mut(id).map(|(obj, used)| {
            *used = tick;
            obj.clone()
        })
    }
}

/// The seed object of `wrapped`: from the cache, or unwrapped now (anchor session,
/// object creation serialised). Evicted objects are destroyed once unused.
fn cached_seed(
    s: &Session,
    cat: &Catalogue,
    cache: &SeedCache,
    kek: &KeyEntry,
    wrapped: &[u8],
    id: &[u8; 32],
) -> Result<SeedObject> {
    let mut c = cache.inner.lock().unwrap_or_else(|p| p.into_inner());
    if c.generation != cat.generation() {
        // A new attachment: the old objects went with the old anchor session.
        c.seeds.clear();
        c.evicted.clear();
        c.generation = cat.generation();
    }
    c.tick += 1;
    let tick = c.tick;
    let mut still_used = Vec::new();
    for obj in std::mem::take(&mut c.evicted) {
        if Arc::strong_count(&obj.users) == 1 {
            destroy_if_present(s, obj.handle)?;
        } else {
            still_used.push(obj);
        }
    }
    c.evicted = still_used;
    if let Some((obj, used)) = c.seeds.get_mut(id) {
        *used = tick;
        return Ok(obj.clone());
    }
    if c.seeds.len() >= cache.capacity {
        if let Some(oldest) = c.seeds.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k) {
            if let Some((obj, _)) = c.seeds.remove(&oldest) {
                c.evicted.push(obj);
            }
        }
    }
    let k = cat.handles_of(kek)?;
    let handle = s
        .unwrap_key(&Mechanism::AesKeyWrapPad, k.handle, wrapped, &seed_template(true, false))
        .map_err(ck_verify("unwrap seed"))?;
    note_created();
    let obj = SeedObject { handle, users: Arc::new(()), verified: Arc::default(), generation: cat.generation() };
    c.seeds.insert(*id, (obj.clone(), tick));
    Ok(obj)
}
