//! PIN operations on token keys: deciphering an encrypted PIN block under a zone
//! key or a DUKPT terminal key, re-enciphering it under a destination zone key,
//! PIN verification data (keyward HMAC, IBM 3624 offset, Visa PVV), and the
//! export of a terminal's DUKPT initial key wrapped under a KEK. The clear PIN
//! exists only in zeroizing memory, inside one token job.
//!
//! DUKPT derivations, as far as PKCS#11 allows them in the token:
//! - AES-128 BDK: every step is a one-block AES derivation
//!   (CKM_AES_CBC_ENCRYPT_DATA with a zero IV equals ECB on one block), so the
//!   initial key, the intermediate keys and the PIN working key are sensitive,
//!   unextractable session objects. The initial key and the intermediate keys of
//!   each terminal's last transaction are cached (owned by the anchor session), so
//!   the next transaction derives only the steps its counter changed.
//! - AES-256 BDK: a 256-bit derived key is two AES blocks, which the token cannot
//!   join into one key object; the two halves of the initial key are derived in the
//!   token as extractable session objects, read into zeroizing memory, and the rest
//!   of the derivation and the PIN decryption run there. Nothing is cached.
//! - TDES BDK: the IPEK halves are ECB encryptions under the BDK and its C0C0
//!   variant (stored as a companion key at import: the token has no XOR
//!   mechanism); the non-reversible key generation XORs and splits keys, which the
//!   token cannot, so it runs in zeroizing memory. Nothing is cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cryptoki::mechanism::ekdf::AesCbcDeriveParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use openssl::symm::{Cipher, Crypter, Mode};
use zeroize::Zeroizing;

use super::token::note_created;
use super::keys::{destroy_if_present, Algorithm, Catalogue, Family, KeyEntry};
use super::ops::kcv;
use super::token::Hsm;
use super::{ck, Error, Result};
use crate::crypto::dukpt::{self, AesKeyType, AesKsn, KeyUsage, TdesKsn};
use crate::crypto::mac::ct_eq;
use crate::crypto::pin::{self, Account, Pin, PinError, PinFormat};

impl From<PinError> for Error {
    fn from(e: PinError) -> Self {
        match e {
            PinError::BadBlock => Error::BadPinBlock,
            PinError::Invalid(m) => Error::InvalidInput(m),
        }
    }
}

/// The key an encrypted PIN block came under.
pub enum PinSourceKey {
    /// A PIN zone key (class P0).
    Zone(Arc<KeyEntry>),
    /// An AES DUKPT terminal (AES BDK, 12-byte KSN).
    AesDukpt { bdk: Arc<KeyEntry>, ksn: AesKsn },
    /// A TDES DUKPT terminal (TDES BDK and its variant companion, 10-byte KSN).
    TdesDukpt { bdk: Arc<KeyEntry>, variant: Arc<KeyEntry>, ksn: TdesKsn },
}

impl PinSourceKey {
    /// The BDK or zone key, for responses and the audit trail.
    pub fn key(&self) -> &Arc<KeyEntry> {
        match self {
            PinSourceKey::Zone(k) => k,
            PinSourceKey::AesDukpt { bdk, .. } | PinSourceKey::TdesDukpt { bdk, .. } => bdk,
        }
    }

    /// AES DUKPT creates session objects (cached intermediate keys, or the halves of an
    /// AES-256 initial key): those jobs run on the anchor, with object creation serialised.
    fn needs_anchor(&self) -> bool {
        matches!(self, PinSourceKey::AesDukpt { .. })
    }
}

/// An encrypted PIN block with everything needed to decipher it.
pub struct PinInput {
    pub block: Vec<u8>,
    pub format: PinFormat,
    pub account: Option<Account>,
    pub source: PinSourceKey,
}

/// PIN verification method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvMethod {
    /// HMAC under a V0 key over (account, PIN), first 128 bits.
    KeywardHmac,
    /// IBM 3624 offset under a V1 TDES key.
    Ibm3624,
    /// Visa PVV under a V2 TDES key, with its PIN verification key index.
    VisaPvv { pvki: u8 },
}

/// Bytes of the keyward HMAC kept as verification data.
const KEYWARD_PVD_LEN: usize = 16;

/// Cached AES-128 DUKPT derivations: per terminal (BDK version, initial key ID),
/// the initial key and the intermediate keys of its last transaction, as session
/// objects of the anchor session. Bounded; the least recently used terminal goes.
pub struct DukptCache {
    inner: Mutex<CacheInner>,
    capacity: usize,
}

#[derive(Default)]
struct CacheInner {
    /// Attachment generation the handles belong to.
    generation: u64,
    tick: u64,
    /// (BDK label, BDK KCV, initial key ID): the KCV tells a BDK recreated under the
    /// same label apart.
    terminals: HashMap<(String, String, [u8; 8]), Terminal>,
}

struct Terminal {
    initial: ObjectHandle,
    /// (working counter, key) for each derivation step of the last transaction.
    path: Vec<(u32, ObjectHandle)>,
    used: u64,
}

impl DukptCache {
    pub fn new(capacity: usize) -> DukptCache {
        DukptCache { inner: Mutex::new(CacheInner::default()), capacity: capacity.max(1) }
    }

    /// Terminals currently cached.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|c| c.terminals.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Template of a derived AES-128 key object.
fn derived_template(derive: bool, decrypt: bool, extractable: bool) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(16.into()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(extractable),
        Attribute::Derive(derive),
        Attribute::Decrypt(decrypt),
        Attribute::Encrypt(false),
        // CMAC for the KCV of an exported initial key.
        Attribute::Sign(extractable),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
    ]
}

/// One X9.24-3 derivation step in the token: AES-ECB of one block of derivation data.
fn derive_step(s: &Session, base: ObjectHandle, dd: &[u8; 16], template: &[Attribute]) -> Result<ObjectHandle> {
    let params = AesCbcDeriveParams::new([0u8; 16], dd);
    let h = s.derive_key(&Mechanism::AesCbcEncryptData(params), base, template).map_err(ck("dukpt derive"))?;
    note_created();
    Ok(h)
}

/// One block of a 256-bit derivation, derived in the token and read into zeroizing memory.
fn derive_half(s: &Session, base: ObjectHandle, dd: &[u8; 16]) -> Result<Zeroizing<Vec<u8>>> {
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(16.into()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ];
    let h = derive_step(s, base, dd, &template)?;
    let read = s.get_attributes(h, &[AttributeType::Value]).map_err(ck("dukpt read half"));
    let destroyed = destroy_if_present(s, h);
    let mut value = None;
    for a in read? {
        if let Attribute::Value(v) = a {
            value = Some(Zeroizing::new(v));
        }
    }
    destroyed?;
    value.filter(|v| v.len() == 16).ok_or_else(|| Error::Token { op: "dukpt read half", rv: "no value".into() })
}

/// The AES-256 initial key of a terminal, joined from two token-derived halves.
fn aes256_initial_key(s: &Session, bdk: ObjectHandle, initial_key_id: &[u8; 8]) -> Result<Zeroizing<Vec<u8>>> {
    let mut ik = Zeroizing::new(Vec::with_capacity(32));
    for block in 1..=2u8 {
        let dd = dukpt::derivation_data(KeyUsage::InitialKey, AesKeyType::Aes256, initial_key_id, 0, block);
        ik.extend_from_slice(&derive_half(s, bdk, &dd)?);
    }
    Ok(ik)
}

/// The TDES IPEK: E(BDK, KSN data) || E(BDK variant, KSN data), in the token.
fn tdes_ipek(s: &Session, bdk: ObjectHandle, variant: ObjectHandle, data: &[u8; 8]) -> Result<Zeroizing<[u8; 16]>> {
    let left = Zeroizing::new(s.encrypt(&Mechanism::Des3Ecb, bdk, data).map_err(ck("dukpt ipek"))?);
    let right = Zeroizing::new(s.encrypt(&Mechanism::Des3Ecb, variant, data).map_err(ck("dukpt ipek"))?);
    if left.len() != 8 || right.len() != 8 {
        return Err(Error::Token { op: "dukpt ipek", rv: "unexpected block length".into() });
    }
    let mut ipek = Zeroizing::new([0u8; 16]);
    ipek[..8].copy_from_slice(&left);
    ipek[8..].copy_from_slice(&right);
    Ok(ipek)
}

/// ECB on one or more blocks with a key in zeroizing memory (host-side DUKPT steps).
fn soft_ecb(cipher: Cipher, key: &[u8], mode: Mode, block: &mut [u8]) -> Result<()> {
    let err = |e: openssl::error::ErrorStack| Error::Token { op: "software cipher", rv: e.to_string() };
    let mut c = Crypter::new(cipher, mode, key, None).map_err(err)?;
    c.pad(false);
    let mut out = Zeroizing::new(vec![0u8; block.len() + cipher.block_size()]);
    let n = c.update(block, &mut out).map_err(err)?;
    let m = c.finalize(&mut out[n..]).map_err(err)?;
    if n + m != block.len() {
        return Err(Error::Token { op: "software cipher", rv: "length".into() });
    }
    block.copy_from_slice(&out[..block.len()]);
    Ok(())
}

/// A double-length TDES key as OpenSSL's three-key form (K1 K2 K1).
fn tdes_ede3_key(k: &[u8; 16]) -> Zeroizing<[u8; 24]> {
    let mut out = Zeroizing::new([0u8; 24]);
    out[..16].copy_from_slice(k);
    out[16..].copy_from_slice(&k[..8]);
    out
}

fn token_cipher(s: &Session, mech: &Mechanism, h: ObjectHandle, encrypt: bool, block: &mut [u8]) -> Result<()> {
    let out = Zeroizing::new(if encrypt {
        s.encrypt(mech, h, block).map_err(ck("pin encrypt"))?
    } else {
        s.decrypt(mech, h, block).map_err(ck("pin decrypt"))?
    });
    if out.len() != block.len() {
        return Err(Error::Token { op: "pin cipher", rv: "unexpected block length".into() });
    }
    block.copy_from_slice(&out);
    Ok(())
}

fn ecb_mechanism(alg: Algorithm) -> Result<Mechanism<'static>> {
    match alg.family() {
        Family::Aes => Ok(Mechanism::AesEcb),
        Family::Des => Ok(Mechanism::Des3Ecb),
        _ => Err(Error::KeyUsage { key: alg.to_string(), reason: "not a block-cipher key".into() }),
    }
}

/// Whether a PIN block format goes with a key algorithm: format 4 with AES, 0/1/3 with TDES.
pub fn format_matches(format: PinFormat, alg: Algorithm) -> bool {
    match format {
        PinFormat::Iso4 => alg.family() == Family::Aes,
        _ => alg.family() == Family::Des && alg != Algorithm::Des,
    }
}

impl Hsm {
    /// The clear PIN of `input`. Runs inside a token job; for AES-128 DUKPT sources
    /// `s` must be the anchor session (the cache's objects belong to it).
    fn decipher_in(&self, s: &Session, cat: &Catalogue, cache: &DukptCache, input: &PinInput) -> Result<Pin> {
        self.with_source_cipher(s, cat, cache, &input.source, |decrypt| {
            pin::decipher(input.format, &input.block, input.account.as_ref(), decrypt)
        })
    }

    /// Runs `f` with the one-block decryption of `source` (a zone key, or the PIN working
    /// key of a DUKPT transaction). Inside a token job; for AES-128 DUKPT sources `s`
    /// must be the anchor session. A working key made in the token is destroyed after.
    fn with_source_cipher<T>(
        &self,
        s: &Session,
        cat: &Catalogue,
        cache: &DukptCache,
        source: &PinSourceKey,
        f: impl FnOnce(&mut dyn FnMut(&mut [u8]) -> Result<()>) -> Result<T>,
    ) -> Result<T> {
        match source {
            PinSourceKey::Zone(k) => {
                let e = cat.handles_of(k)?;
                let mech = ecb_mechanism(e.meta.algorithm)?;
                f(&mut |b: &mut [u8]| token_cipher(s, &mech, e.handle, false, b))
            }
            PinSourceKey::AesDukpt { bdk, ksn } => {
                let e = cat.handles_of(bdk)?;
                match e.meta.algorithm {
                    Algorithm::Aes128 => {
                        let working = self.aes128_working_key(s, cat, cache, e, ksn)?;
                        let r = f(&mut |b: &mut [u8]| token_cipher(s, &Mechanism::AesEcb, working, false, b));
                        destroy_if_present(s, working)?;
                        r
                    }
                    Algorithm::Aes256 => {
                        // AES-256 BDK: the PIN working key is an AES-256 key (32 bytes).
                        let ik = aes256_initial_key(s, e.handle, &ksn.initial_key_id())?;
                        let tk = dukpt::aes_transaction_key(&ik, AesKeyType::Aes256, ksn)
                            .map_err(|err| Error::Token { op: "dukpt", rv: err.to_string() })?;
                        let wk = dukpt::aes_working_key(&tk, AesKeyType::Aes256, KeyUsage::PinEncryption, ksn)
                            .map_err(|err| Error::Token { op: "dukpt", rv: err.to_string() })?;
                        f(&mut |b: &mut [u8]| soft_ecb(Cipher::aes_256_ecb(), &wk, Mode::Decrypt, b))
                    }
                    other => Err(Error::KeyUsage { key: e.key_ref(), reason: format!("{other} is not an AES DUKPT BDK") }),
                }
            }
            PinSourceKey::TdesDukpt { bdk, variant, ksn } => {
                let e = cat.handles_of(bdk)?;
                let v = cat.handles_of(variant)?;
                let ipek = tdes_ipek(s, e.handle, v.handle, &ksn.ipek_data())?;
                let pin_key = dukpt::tdes_pin_key(&ipek, ksn)
                    .map_err(|err| Error::Token { op: "dukpt", rv: err.to_string() })?;
                let key = tdes_ede3_key(&pin_key);
                f(&mut |b: &mut [u8]| soft_ecb(Cipher::des_ede3(), &key[..], Mode::Decrypt, b))
            }
        }
    }

    /// The PIN-encryption working key of an AES-128 DUKPT transaction, derived in the
    /// token from the cached path of the terminal's last transaction. The caller
    /// destroys the returned object after use.
    fn aes128_working_key(
        &self,
        s: &Session,
        cat: &Catalogue,
        cache: &DukptCache,
        bdk: &KeyEntry,
        ksn: &AesKsn,
    ) -> Result<ObjectHandle> {
        let mut c = cache.inner.lock().unwrap_or_else(|p| p.into_inner());
        if c.generation != cat.generation() {
            // A new attachment: the old objects went with the old anchor session.
            c.terminals.clear();
            c.generation = cat.generation();
        }
        c.tick += 1;
        let tick = c.tick;
        let id = ksn.initial_key_id();
        let key = (bdk.meta.label(), bdk.meta.kcv.clone(), id);
        if !c.terminals.contains_key(&key) {
            if c.terminals.len() >= cache.capacity {
                if let Some(oldest) = c.terminals.iter().min_by_key(|(_, t)| t.used).map(|(k, _)| k.clone()) {
                    if let Some(t) = c.terminals.remove(&oldest) {
                        for (_, h) in t.path {
                            destroy_if_present(s, h)?;
                        }
                        destroy_if_present(s, t.initial)?;
                    }
                }
            }
            let dd = dukpt::derivation_data(KeyUsage::InitialKey, AesKeyType::Aes128, &id, 0, 1);
            let initial = derive_step(s, bdk.handle, &dd, &derived_template(true, false, false))?;
            c.terminals.insert(key.clone(), Terminal { initial, path: Vec::new(), used: tick });
        }
        let t = c.terminals.get_mut(&key).ok_or_else(|| Error::Token { op: "dukpt cache", rv: "entry".into() })?;
        t.used = tick;
        let wanted = dukpt::derivation_path(ksn.counter());
        let common = t.path.iter().zip(wanted.iter()).take_while(|((have, _), want)| have == *want).count();
        for (_, h) in t.path.drain(common..) {
            destroy_if_present(s, h)?;
        }
        for &working_counter in &wanted[common..] {
            let base = t.path.last().map(|(_, h)| *h).unwrap_or(t.initial);
            let dd = dukpt::derivation_data(KeyUsage::KeyDerivation, AesKeyType::Aes128, &id, working_counter, 1);
            let h = derive_step(s, base, &dd, &derived_template(true, false, false))?;
            t.path.push((working_counter, h));
        }
        let transaction = t.path.last().map(|(_, h)| *h).unwrap_or(t.initial);
        let dd = dukpt::derivation_data(KeyUsage::PinEncryption, AesKeyType::Aes128, &id, ksn.counter(), 1);
        derive_step(s, transaction, &dd, &derived_template(false, true, false))
    }

    /// Runs `f` with the clear PIN of `input`, in one token job.
    async fn with_pin<T, F>(&self, cache: &Arc<DukptCache>, input: Arc<PinInput>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Session, &Catalogue, &Pin) -> Result<T> + Send + Sync + 'static,
    {
        let this = self.clone();
        let cache = Arc::clone(cache);
        if input.source.needs_anchor() {
            self.call_anchor(move |s, cat| {
                let pin = this.decipher_in(s, cat, &cache, &input)?;
                f(s, cat, &pin)
            })
            .await
        } else {
            self.call(move |s, cat| {
                let pin = this.decipher_in(s, cat, &cache, &input)?;
                f(s, cat, &pin)
            })
            .await
        }
    }

    /// Deciphers `input` and enciphers the PIN under `dest` (a zone key) in
    /// `dest_format` with `dest_account`.
    pub async fn translate_pin(
        &self,
        cache: &Arc<DukptCache>,
        input: PinInput,
        dest: Arc<KeyEntry>,
        dest_format: PinFormat,
        dest_account: Option<Account>,
    ) -> Result<Vec<u8>> {
        if !format_matches(dest_format, dest.meta.algorithm) {
            return Err(Error::InvalidInput("destination format does not match the destination key".into()));
        }
        self.with_pin(cache, Arc::new(input), move |s, cat, pin| {
            let e = cat.handles_of(&dest)?;
            let mech = ecb_mechanism(e.meta.algorithm)?;
            let mut random = Zeroizing::new([0u8; 16]);
            openssl::rand::rand_bytes(&mut random[..]).map_err(|err| Error::Token { op: "os rng", rv: err.to_string() })?;
            pin::encipher(dest_format, pin, dest_account.as_ref(), &random[..], |b: &mut [u8]| {
                token_cipher(s, &mech, e.handle, true, b)
            })
        })
        .await
    }

    /// Same-format translation without the account (formats 0, 1, 3): deciphers the
    /// block of `input`, checks the fields that do not depend on the account
    /// ([`pin::recipher`]) and enciphers the clear block, unchanged, under `dest`. The
    /// account `input` states is not used: the block stays bound to its own.
    pub async fn recipher_pin(&self, cache: &Arc<DukptCache>, input: PinInput, dest: Arc<KeyEntry>) -> Result<Vec<u8>> {
        if !format_matches(input.format, dest.meta.algorithm) {
            return Err(Error::InvalidInput("destination format does not match the destination key".into()));
        }
        let anchor = input.source.needs_anchor();
        let this = self.clone();
        let cache = Arc::clone(cache);
        let input = Arc::new(input);
        let job = move |s: &Session, cat: &Catalogue| {
            let e = cat.handles_of(&dest)?;
            let mech = ecb_mechanism(e.meta.algorithm)?;
            this.with_source_cipher(s, cat, &cache, &input.source, |decrypt| {
                pin::recipher(input.format, &input.block, decrypt, |b: &mut [u8]| token_cipher(s, &mech, e.handle, true, b))
            })
        };
        if anchor {
            self.call_anchor(job).await
        } else {
            self.call(job).await
        }
    }

    /// Verification data value for the PIN of `input` (not yet wrapped in the
    /// self-describing string, which the service builds).
    pub async fn pin_verification_value(
        &self,
        cache: &Arc<DukptCache>,
        input: PinInput,
        account: Account,
        method: PvMethod,
        pvk: Arc<KeyEntry>,
    ) -> Result<String> {
        self.with_pin(cache, Arc::new(input), move |s, cat, pin| pv_value(s, cat, &pvk, method, &account, pin)).await
    }

    /// Whether the PIN of `input` matches `value`. A block that does not decode is a
    /// mismatch.
    pub async fn verify_pin(
        &self,
        cache: &Arc<DukptCache>,
        input: PinInput,
        account: Account,
        method: PvMethod,
        pvk: Arc<KeyEntry>,
        value: String,
    ) -> Result<bool> {
        let r = self
            .with_pin(cache, Arc::new(input), move |s, cat, pin| pv_check(s, cat, &pvk, method, &account, pin, &value))
            .await;
        match r {
            Err(Error::BadPinBlock) => Ok(false),
            other => other,
        }
    }

    /// Derives a terminal's DUKPT initial key from `bdk` and returns it wrapped under
    /// `kek` (AES key wrap, RFC 3394) with its KCV. `initial_key_id` is the AES
    /// initial key ID, or for TDES the IPEK derivation data of the initial KSN.
    pub async fn export_terminal_key(
        &self,
        bdk: Arc<KeyEntry>,
        variant: Option<Arc<KeyEntry>>,
        initial_key_id: [u8; 8],
        kek: Arc<KeyEntry>,
    ) -> Result<(Vec<u8>, String)> {
        if kek.meta.algorithm.family() != Family::Aes {
            return Err(Error::KeyUsage { key: kek.key_ref(), reason: "terminal keys are wrapped under AES KEKs".into() });
        }
        // A KEK no weaker than the key it carries (an AES-256 initial key needs an AES-256 KEK).
        let needed = match bdk.meta.algorithm {
            Algorithm::Aes256 => 32,
            _ => 16,
        };
        if kek.meta.algorithm.secret_len().unwrap_or(0) < needed {
            return Err(Error::KeyUsage {
                key: kek.key_ref(),
                reason: format!("weaker than the {} initial key it would carry", bdk.meta.algorithm),
            });
        }
        self.call_anchor(move |s, cat| {
            let b = cat.handles_of(&bdk)?;
            let k = cat.handles_of(&kek)?;
            let (ik, alg) = match (b.meta.algorithm, &variant) {
                (Algorithm::Aes128, _) => {
                    let dd = dukpt::derivation_data(KeyUsage::InitialKey, AesKeyType::Aes128, &initial_key_id, 0, 1);
                    (derive_step(s, b.handle, &dd, &derived_template(false, false, true))?, Algorithm::Aes128)
                }
                (Algorithm::Aes256, _) => {
                    let value = aes256_initial_key(s, b.handle, &initial_key_id)?;
                    (import_transient(s, Algorithm::Aes256, &value)?, Algorithm::Aes256)
                }
                (Algorithm::Tdes2, Some(variant)) => {
                    let v = cat.handles_of(variant)?;
                    let ipek = tdes_ipek(s, b.handle, v.handle, &initial_key_id)?;
                    (import_transient(s, Algorithm::Tdes2, &Zeroizing::new(ipek.to_vec()))?, Algorithm::Tdes2)
                }
                (other, _) => {
                    return Err(Error::KeyUsage { key: b.key_ref(), reason: format!("{other} is not a DUKPT BDK") });
                }
            };
            let wrapped = s.wrap_key(&Mechanism::AesKeyWrap, k.handle, ik).map_err(ck("wrap terminal key"));
            let check = kcv(s, ik, alg, None);
            destroy_if_present(s, ik)?;
            Ok((wrapped?, check?))
        })
        .await
    }
}

/// Imports a derived key value as an extractable session object, to be wrapped once.
fn import_transient(s: &Session, alg: Algorithm, value: &Zeroizing<Vec<u8>>) -> Result<ObjectHandle> {
    let is_aes = alg.family() == Family::Aes;
    let t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(alg.key_type()),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::Encrypt(!is_aes),
        Attribute::Sign(is_aes),
        Attribute::Decrypt(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Value(value.to_vec()),
    ];
    let h = s.create_object(&t).map_err(ck("create_object"));
    if let Some(Attribute::Value(mut v)) = t.into_iter().last() {
        zeroize::Zeroize::zeroize(&mut v);
    }
    let h = h?;
    note_created();
    Ok(h)
}

/// The verification value of `pin` for `account` under `pvk` with `method`.
fn pv_value(s: &Session, cat: &Catalogue, pvk: &KeyEntry, method: PvMethod, account: &Account, pin: &Pin) -> Result<String> {
    let e = cat.handles_of(pvk)?;
    match method {
        PvMethod::KeywardHmac => {
            let mech = e
                .meta
                .algorithm
                .hmac_mechanism()
                .ok_or_else(|| Error::KeyUsage { key: e.key_ref(), reason: "not an HMAC key".into() })?;
            let input = pin::keyward_pvd_input(account, pin);
            let mac = s.sign(&mech, e.handle, &input).map_err(ck("pvd hmac"))?;
            Ok(hex::encode_upper(&mac[..KEYWARD_PVD_LEN.min(mac.len())]))
        }
        PvMethod::Ibm3624 => pin::ibm3624_offset(account, pin, |b: &mut [u8]| {
            token_cipher(s, &Mechanism::Des3Ecb, e.handle, true, b)
        }),
        PvMethod::VisaPvv { pvki } => {
            let pvv = pin::visa_pvv(account, pvki, pin, |b: &mut [u8]| {
                token_cipher(s, &Mechanism::Des3Ecb, e.handle, true, b)
            })?;
            Ok(format!("{pvki}{pvv}"))
        }
    }
}

/// Whether `pin` matches the stored `value` (constant-time comparison).
fn pv_check(
    s: &Session,
    cat: &Catalogue,
    pvk: &KeyEntry,
    method: PvMethod,
    account: &Account,
    pin: &Pin,
    value: &str,
) -> Result<bool> {
    match method {
        PvMethod::Ibm3624 => {
            let e = cat.handles_of(pvk)?;
            pin::ibm3624_verify(account, pin, value, |b: &mut [u8]| {
                token_cipher(s, &Mechanism::Des3Ecb, e.handle, true, b)
            })
        }
        _ => {
            let computed = Zeroizing::new(pv_value(s, cat, pvk, method, account, pin)?);
            Ok(ct_eq(computed.as_bytes(), value.as_bytes()))
        }
    }
}
