//! Typed cryptographic operations on catalogue keys (AES-GCM, HMAC, CMAC, ECDSA,
//! KCVs, public-key export) and the ceremony's key creation, import and state
//! changes. Every operation runs inside the token; callers never see a handle.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::nid::Nid;
use openssl::pkey::PKey;
use zeroize::Zeroizing;

use super::keys::{
    self, create_metadata, label, write_metadata, Algorithm, Catalogue, Family, KeyClass, KeyEntry, KeyMeta,
    KeyState, ED25519_PARAMS, GCM_LIMIT, GCM_RESERVE_STEP, P256_PARAMS,
};
use super::token::Hsm;
use super::{ck, ck_verify, Error, Result};

/// AES-GCM IV length (96 bits) and tag length (128 bits).
pub const GCM_IV_LEN: usize = 12;
pub const GCM_TAG_LEN: usize = 16;


pub(super) fn random_iv() -> Result<[u8; GCM_IV_LEN]> {
    let mut iv = [0u8; GCM_IV_LEN];
    openssl::rand::rand_bytes(&mut iv).map_err(|e| Error::Token { op: "os rng", rv: e.to_string() })?;
    Ok(iv)
}

/// Normalises a raw r||s P-256 signature to low-S (s <= n/2).
pub fn low_s_normalise(sig: &mut [u8]) -> Result<()> {
    if sig.len() != 64 {
        return Err(Error::Token { op: "ecdsa", rv: format!("signature of {} bytes", sig.len()) });
    }
    let err = |e: openssl::error::ErrorStack| Error::Token { op: "ecdsa low-s", rv: e.to_string() };
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(err)?;
    let mut order = BigNum::new().map_err(err)?;
    let mut ctx = BigNumContext::new().map_err(err)?;
    group.order(&mut order, &mut ctx).map_err(err)?;
    let s = BigNum::from_slice(&sig[32..]).map_err(err)?;
    let mut half = BigNum::new().map_err(err)?;
    half.rshift1(&order).map_err(err)?;
    if s > half {
        let mut low = BigNum::new().map_err(err)?;
        low.checked_sub(&order, &s).map_err(err)?;
        let bytes = low.to_vec_padded(32).map_err(err)?;
        sig[32..].copy_from_slice(&bytes);
    }
    Ok(())
}

/// DER SubjectPublicKeyInfo of a P-256 or Ed25519 public key object.
pub(crate) fn public_key_der(session: &Session, h: ObjectHandle, alg: Algorithm) -> Result<Vec<u8>> {
    let attrs = session
        .get_attributes(h, &[AttributeType::EcPoint, AttributeType::EcParams])
        .map_err(ck("get_attributes"))?;
    let mut point = None;
    for a in attrs {
        if let Attribute::EcPoint(p) = a {
            point = Some(p);
        }
    }
    let point = point.ok_or_else(|| Error::Catalogue("public key without CKA_EC_POINT".into()))?;
    // CKA_EC_POINT is a DER OCTET STRING around the SEC1 point (SoftHSM); accept a bare point too.
    let sec1 = match point.as_slice() {
        [0x04, len, rest @ ..] if *len as usize == rest.len() => rest.to_vec(),
        [0x04, 0x81, len, rest @ ..] if *len as usize == rest.len() => rest.to_vec(),
        _ => point.clone(),
    };
    let err = |e: openssl::error::ErrorStack| Error::Catalogue(format!("public key: {e}"));
    if alg == Algorithm::Ed25519 {
        return PKey::public_key_from_raw_bytes(&sec1, openssl::pkey::Id::ED25519)
            .and_then(|k| k.public_key_to_der())
            .map_err(err);
    }
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(err)?;
    let mut ctx = BigNumContext::new().map_err(err)?;
    let p = EcPoint::from_bytes(&group, &sec1, &mut ctx).map_err(err)?;
    let key = EcKey::from_public_key(&group, &p).map_err(err)?;
    PKey::from_ec_key(key).and_then(|k| k.public_key_to_der()).map_err(err)
}

/// Key check value, computed in the token: TDES/DES = E(0^8); AES = CMAC(0^16);
/// HMAC = HMAC(0^16) with the key's hash; P-256 = SHA-256 of the public key's SPKI.
/// First three bytes, upper-case hex.
pub(crate) fn kcv(session: &Session, h: ObjectHandle, alg: Algorithm, spki: Option<&[u8]>) -> Result<String> {
    let full = match alg.family() {
        // Single DES is stored as K||K (see Algorithm::key_type): TDES computes it.
        Family::Des => session.encrypt(&Mechanism::Des3Ecb, h, &[0u8; 8]).map_err(ck("kcv encrypt"))?,
        Family::Aes => session.sign(&Mechanism::AesCMac, h, &[0u8; 16]).map_err(ck("kcv cmac"))?,
        Family::Hmac => {
            let mech = alg.hmac_mechanism().ok_or_else(|| Error::Catalogue("no HMAC mechanism".into()))?;
            session.sign(&mech, h, &[0u8; 16]).map_err(ck("kcv hmac"))?
        }
        Family::Ec => {
            let spki = spki.ok_or_else(|| Error::Catalogue("no public key for KCV".into()))?;
            crate::crypto::sha256(spki).to_vec()
        }
    };
    Ok(hex::encode_upper(&full[..3.min(full.len())]))
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Counts one AES-GCM invocation, persisting a new reservation in the token's
/// metadata when the current one is used up (so a restart never reuses counts).
pub(super) fn count_gcm(hsm: &Hsm, session: &Session, entry: &KeyEntry) -> Result<()> {
    let used = entry.gcm.used.fetch_add(1, Ordering::AcqRel) + 1;
    if used > GCM_LIMIT {
        return Err(Error::Exhausted(format!(
            "{}: AES-GCM invocation limit reached; rotate the key",
            entry.key_ref()
        )));
    }
    // Once per key version and process, whether the count crossed 90% or started above it.
    if used >= GCM_LIMIT / 10 * 9 && !entry.gcm.warned.swap(true, Ordering::AcqRel) {
        tracing::warn!(key = %entry.key_ref(), "AES-GCM invocations at 90% of the limit; rotate the key");
    }
    if used > entry.gcm.reserved.load(Ordering::Acquire) {
        let _g = hsm.object_guard();
        let reserved = entry.gcm.reserved.load(Ordering::Acquire);
        if used > reserved {
            let new = keys::reserve_gcm(session, &entry.meta.label(), used.max(reserved))?;
            // Another appliance may have reserved the counts below `new - step`:
            // continue above them.
            let floor = new.saturating_sub(GCM_RESERVE_STEP);
            let _ = entry.gcm.used.fetch_max(floor.max(used), Ordering::AcqRel);
            entry.gcm.reserved.store(new, Ordering::Release);
        }
    }
    Ok(())
}

/// The value a key is stored with: single DES as K||K (see `Algorithm::key_type`).
fn stored_value(alg: Algorithm, value: &Zeroizing<Vec<u8>>) -> Zeroizing<Vec<u8>> {
    if alg == Algorithm::Des {
        Zeroizing::new([value.as_slice(), value.as_slice()].concat())
    } else {
        Zeroizing::new(value.to_vec())
    }
}

fn read_meta(session: &Session, h: ObjectHandle) -> Result<KeyMeta> {
    let attrs = session.get_attributes(h, &[AttributeType::Value]).map_err(ck("get_attributes"))?;
    let value = attrs
        .into_iter()
        .find_map(|a| if let Attribute::Value(v) = a { Some(v) } else { None })
        .ok_or_else(|| Error::Catalogue("metadata object without value".into()))?;
    serde_json::from_slice(&value).map_err(|e| Error::Catalogue(format!("metadata unreadable: {e}")))
}

pub(super) fn current<'a>(cat: &'a Catalogue, entry: &KeyEntry) -> Result<&'a Arc<KeyEntry>> {
    cat.handles_of(entry)
}

impl Hsm {
    /// AES-GCM encryption under `key` (resolved by the caller for a new operation).
    /// Returns (IV, ciphertext || tag). `aad` must be non-empty.
    pub async fn gcm_encrypt(&self, key: &Arc<KeyEntry>, aad: Vec<u8>, plaintext: Vec<u8>) -> Result<([u8; 12], Vec<u8>)> {
        if aad.is_empty() {
            return Err(Error::InvalidInput("AES-GCM needs non-empty associated data".into()));
        }
        let key = Arc::clone(key);
        let this = self.clone();
        let plaintext = Zeroizing::new(plaintext);
        self.call(move |s, cat| {
            let e = current(cat, &key)?;
            count_gcm(&this, s, e)?;
            let mut iv = random_iv()?;
            let ivc = iv;
            let params = GcmParams::new(&mut iv, &aad, (GCM_TAG_LEN as u64 * 8).into())
                .map_err(|err| Error::Token { op: "gcm params", rv: err.to_string() })?;
            let ct = s.encrypt(&Mechanism::AesGcm(params), e.handle, &plaintext).map_err(ck("gcm encrypt"))?;
            Ok((ivc, ct))
        })
        .await
    }

    /// AES-GCM decryption; a tag mismatch is [`Error::VerifyFailed`].
    pub async fn gcm_decrypt(
        &self,
        key: &Arc<KeyEntry>,
        iv: [u8; 12],
        aad: Vec<u8>,
        ciphertext: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        if aad.is_empty() {
            return Err(Error::InvalidInput("AES-GCM needs non-empty associated data".into()));
        }
        if ciphertext.len() < GCM_TAG_LEN {
            return Err(Error::InvalidInput("ciphertext shorter than the GCM tag".into()));
        }
        let key = Arc::clone(key);
        self.call(move |s, cat| {
            let e = current(cat, &key)?;
            let mut iv = iv;
            let params = GcmParams::new(&mut iv, &aad, (GCM_TAG_LEN as u64 * 8).into())
                .map_err(|err| Error::Token { op: "gcm params", rv: err.to_string() })?;
            s.decrypt(&Mechanism::AesGcm(params), e.handle, &ciphertext)
                .map(Zeroizing::new)
                .map_err(ck_verify("gcm decrypt"))
        })
        .await
    }

    /// HMAC of `data` under an HMAC key (blocking; for the audit sequencer and CLI).
    pub fn hmac_blocking(&self, key: &Arc<KeyEntry>, data: &[u8]) -> Result<Vec<u8>> {
        let mech = key
            .meta
            .algorithm
            .hmac_mechanism()
            .ok_or_else(|| Error::KeyUsage { key: key.key_ref(), reason: "not an HMAC key".into() })?;
        self.exec(|s, cat| {
            let e = current(cat, key)?;
            s.sign(&mech, e.handle, data).map_err(ck("hmac"))
        })
    }

    /// HMAC of `data` under an HMAC key.
    pub async fn hmac(&self, key: &Arc<KeyEntry>, data: Vec<u8>) -> Result<Vec<u8>> {
        let alg = key.meta.algorithm;
        if alg.hmac_mechanism().is_none() {
            return Err(Error::KeyUsage { key: key.key_ref(), reason: "not an HMAC key".into() });
        }
        let key = Arc::clone(key);
        self.call(move |s, cat| {
            let e = current(cat, &key)?;
            let mech = alg.hmac_mechanism().ok_or_else(|| Error::Catalogue("no HMAC mechanism".into()))?;
            s.sign(&mech, e.handle, &data).map_err(ck("hmac"))
        })
        .await
    }

    /// ECDSA P-256 over SHA-256(data); raw r||s, low-S (blocking).
    pub fn ecdsa_sign_blocking(&self, key: &Arc<KeyEntry>, data: &[u8]) -> Result<Vec<u8>> {
        if key.meta.algorithm != Algorithm::EcP256 {
            return Err(Error::KeyUsage { key: key.key_ref(), reason: "not a P-256 key".into() });
        }
        let digest = crate::crypto::sha256(data);
        let mut sig = self.exec(|s, cat| {
            let e = current(cat, key)?;
            s.sign(&Mechanism::Ecdsa, e.handle, &digest).map_err(ck("ecdsa sign"))
        })?;
        low_s_normalise(&mut sig)?;
        Ok(sig)
    }

    /// A 64-byte signature of `data` on a token worker, by the key's algorithm: ECDSA
    /// P-256 over SHA-256(data), raw r||s, low-S; or pure Ed25519 over `data`.
    pub async fn sign(&self, key: &Arc<KeyEntry>, data: Vec<u8>) -> Result<[u8; 64]> {
        let alg = key.meta.algorithm;
        let input = match alg {
            Algorithm::EcP256 => crate::crypto::sha256(&data).to_vec(),
            Algorithm::Ed25519 => data,
            _ => return Err(Error::KeyUsage { key: key.key_ref(), reason: "not a signature key".into() }),
        };
        let key = Arc::clone(key);
        let mut sig = self
            .call(move |s, cat| {
                let e = current(cat, &key)?;
                match alg {
                    Algorithm::Ed25519 => s
                        .sign(&Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)), e.handle, &input)
                        .map_err(ck("eddsa sign")),
                    _ => s.sign(&Mechanism::Ecdsa, e.handle, &input).map_err(ck("ecdsa sign")),
                }
            })
            .await?;
        if alg == Algorithm::EcP256 {
            low_s_normalise(&mut sig)?;
        }
        <[u8; 64]>::try_from(sig.as_slice())
            .map_err(|_| Error::Token { op: "sign", rv: format!("signature of {} bytes", sig.len()) })
    }

    /// Reads the flags of a key's token original (tests and `ceremony list --flags`).
    pub fn key_flags(&self, key: &KeyEntry) -> Result<keys::KeyFlags> {
        self.exec(|s, cat| keys::read_flags(s, current(cat, key)?.token_handle))
    }

    /// Attempts to read CKA_VALUE of a key's token original; `None` when the token withholds it.
    pub fn try_read_value(&self, key: &KeyEntry) -> Result<Option<Vec<u8>>> {
        self.exec(|s, cat| {
            let h = current(cat, key)?.token_handle;
            match s.get_attributes(h, &[AttributeType::Value]) {
                Ok(attrs) => Ok(attrs.into_iter().find_map(|a| if let Attribute::Value(v) = a { Some(v) } else { None })),
                Err(_) => Ok(None),
            }
        })
    }

    /// Test hook: widens a token original's usage flags behind the catalogue's back.
    #[doc(hidden)]
    pub fn widen_usage_for_test(&self, key: &KeyEntry) -> Result<()> {
        self.with_anchor(|s, cat| {
            let h = current(cat, key)?.token_handle;
            s.update_attributes(h, &[Attribute::Decrypt(true), Attribute::Encrypt(true)]).map_err(ck("update_attributes"))
        })
    }

    /// Creates a key version in the token (generated inside it, or from `value`) with
    /// its metadata, and returns the metadata. `state` is the new version's state.
    pub fn create_key(
        &self,
        name: &str,
        class: KeyClass,
        alg: Algorithm,
        value: Option<Zeroizing<Vec<u8>>>,
        state: KeyState,
    ) -> Result<KeyMeta> {
        self.create_key_at(name, class, alg, value, state, None)
    }

    /// As [`Hsm::create_key`], at version `at` (the parts of a compound key share one
    /// version) instead of the next free one; an existing version is refused.
    pub fn create_key_at(
        &self,
        name: &str,
        class: KeyClass,
        alg: Algorithm,
        value: Option<Zeroizing<Vec<u8>>>,
        state: KeyState,
        at: Option<u32>,
    ) -> Result<KeyMeta> {
        keys::validate_name(name).map_err(Error::InvalidInput)?;
        if alg == Algorithm::Des && value.is_none() {
            return Err(Error::InvalidInput("single DES keys exist only as halves of a retail-MAC pair".into()));
        }
        let usage = class
            .usage(alg)
            .ok_or_else(|| Error::InvalidInput(format!("class {class} does not allow algorithm {alg}")))?;
        let copyable = keys::uses_session_copy(name, class);
        let meta = self.with_anchor(|s, _| {
            let fresh = self.catalogue_fresh(s)?;
            let version = match at {
                Some(v) if fresh.get(name, v).is_ok() || v == 0 => {
                    return Err(Error::InvalidInput(format!("{name}/v{v} exists already")));
                }
                Some(v) => v,
                None => fresh.next_version(name),
            };
            let lbl = label(name, version);
            let common = |usage_attrs: Vec<Attribute>| {
                let mut t = vec![
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Modifiable(copyable),
                    Attribute::Label(lbl.clone().into_bytes()),
                    Attribute::Id(lbl.clone().into_bytes()),
                ];
                t.extend(usage_attrs);
                t
            };
            let (handle, spki) = if alg.is_asymmetric() {
                if value.is_some() {
                    return Err(Error::InvalidInput("asymmetric keys are generated in the token, not imported".into()));
                }
                let public = vec![
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Modifiable(copyable),
                    Attribute::Verify(true),
                    Attribute::EcParams(if alg == Algorithm::Ed25519 { ED25519_PARAMS } else { P256_PARAMS }.to_vec()),
                    Attribute::Label(lbl.clone().into_bytes()),
                    Attribute::Id(lbl.clone().into_bytes()),
                ];
                let private = common(vec![
                    Attribute::Sign(usage.sign),
                    Attribute::Derive(false),
                    Attribute::Decrypt(false),
                    Attribute::Unwrap(false),
                ]);
                let mech = if alg == Algorithm::Ed25519 { Mechanism::EccEdwardsKeyPairGen } else { Mechanism::EccKeyPairGen };
                let (pubh, privh) = s.generate_key_pair(&mech, &public, &private).map_err(ck("generate_key_pair"))?;
                let spki = public_key_der(s, pubh, alg)?;
                (privh, Some(spki))
            } else {
                let len = alg.secret_len().ok_or_else(|| Error::Catalogue("no key length".into()))?;
                let mut t = common(usage.attributes());
                t.push(Attribute::Class(ObjectClass::SECRET_KEY));
                t.push(Attribute::KeyType(alg.key_type()));
                let h = match value {
                    Some(v) => {
                        if v.len() != len {
                            return Err(Error::InvalidInput(format!(
                                "{alg} key must be {len} bytes, got {}",
                                v.len()
                            )));
                        }
                        t.push(Attribute::Value(stored_value(alg, &v).to_vec()));
                        let h = s.create_object(&t).map_err(ck("create_object"));
                        if let Some(Attribute::Value(mut v)) = t.pop() {
                            zeroize::Zeroize::zeroize(&mut v);
                        }
                        h?
                    }
                    None => {
                        let mech = match alg.family() {
                            Family::Aes => Mechanism::AesKeyGen,
                            Family::Des => match alg {
                                Algorithm::Des => Mechanism::DesKeyGen,
                                Algorithm::Tdes2 => Mechanism::Des2KeyGen,
                                _ => Mechanism::Des3KeyGen,
                            },
                            _ => Mechanism::GenericSecretKeyGen,
                        };
                        if matches!(alg.family(), Family::Aes | Family::Hmac) {
                            t.push(Attribute::ValueLen((len as u64).into()));
                        }
                        // CKA_CLASS / CKA_KEY_TYPE are implied by the mechanism for DES/AES keygen;
                        // SoftHSM accepts them when consistent.
                        s.generate_key(&mech, &t).map_err(ck("generate_key"))?
                    }
                };
                (h, None)
            };
            let kcv = kcv(s, handle, alg, spki.as_deref())?;
            let meta = KeyMeta {
                name: name.to_string(),
                version,
                class,
                algorithm: alg,
                state,
                created: now_rfc3339(),
                kcv,
                rev: 0,
            };
            create_metadata(s, &meta)?;
            Ok(meta)
        })?;
        self.reload()?;
        Ok(meta)
    }

    /// Sets the state of one version (rotate / retire).
    pub fn set_state(&self, name: &str, version: u32, state: KeyState) -> Result<KeyMeta> {
        let meta = self.with_anchor(|s, _| {
            let cat = self.catalogue_fresh(s)?;
            let e = cat.get(name, version)?;
            let mut meta = read_meta(s, e.meta_handle)?;
            meta.state = state;
            write_metadata(s, e.meta_handle, &mut meta)?;
            Ok(meta)
        })?;
        self.reload()?;
        Ok(meta)
    }

    /// The catalogue as the token holds it now (the ceremony works on it directly).
    fn catalogue_fresh(&self, anchor: &Session) -> Result<Catalogue> {
        keys::load(anchor, None, false, 0)
    }

    /// Computes the KCV of a clear component or key value the way the token would, by
    /// importing it as a temporary session object (clear value held in zeroizing memory).
    pub fn kcv_of_value(&self, alg: Algorithm, value: &Zeroizing<Vec<u8>>) -> Result<String> {
        let len = alg.secret_len().ok_or_else(|| Error::InvalidInput("asymmetric keys have no components".into()))?;
        if value.len() != len {
            return Err(Error::InvalidInput(format!("{alg} component must be {len} bytes, got {}", value.len())));
        }
        let usage = match alg.family() {
            Family::Des => (true, false),
            _ => (false, true),
        };
        self.with_anchor(|s, _| {
            let t = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(alg.key_type()),
                Attribute::Token(false),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(usage.0),
                Attribute::Sign(usage.1),
                Attribute::Value(stored_value(alg, value).to_vec()),
            ];
            let h = s.create_object(&t).map_err(ck("create_object"));
            if let Some(Attribute::Value(mut v)) = t.into_iter().last() {
                zeroize::Zeroize::zeroize(&mut v);
            }
            let h = h?;
            super::token::note_created();
            let r = kcv(s, h, alg, None);
            let _ = keys::destroy_if_present(s, h);
            r
        })
    }

    /// As [`Hsm::random`], from async code (on a token worker thread).
    pub async fn random_async(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        self.call(move |s, _| {
            let mut v = Zeroizing::new(vec![0u8; len]);
            s.generate_random_slice(&mut v).map_err(ck("generate_random"))?;
            Ok(v)
        })
        .await
    }

    /// A fresh random value from the token's RNG, in zeroizing memory.
    pub fn random(&self, len: usize) -> Result<Zeroizing<Vec<u8>>> {
        self.exec(|s, _| {
            let mut v = Zeroizing::new(vec![0u8; len]);
            s.generate_random_slice(&mut v).map_err(ck("generate_random"))?;
            Ok(v)
        })
    }
}
