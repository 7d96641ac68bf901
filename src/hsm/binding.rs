//! Token jobs of the binding service: the blind index (HMAC under `binding.index`)
//! and the seal (AES-GCM under `binding`) in one job, and batch re-sealing under the
//! active version. Records exist in clear only in zeroizing memory for the length of
//! one job.

use std::sync::Arc;

use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::session::Session;
use zeroize::Zeroizing;

use super::keys::{Catalogue, KeyEntry};
use super::ops::{count_gcm, current, random_iv, GCM_IV_LEN, GCM_TAG_LEN};
use super::token::Hsm;
use super::{ck, ck_verify, Error, Result};

/// Length of a blind index (HMAC-SHA-256).
pub const INDEX_LEN: usize = 32;

/// One record to re-seal: its key version, IV and ciphertext || tag, and the
/// associated data it was sealed with (which stays the same).
pub struct Resealable {
    pub key: Arc<KeyEntry>,
    pub iv: [u8; GCM_IV_LEN],
    pub aad: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

fn index(s: &Session, cat: &Catalogue, key: &KeyEntry, input: &[u8]) -> Result<[u8; INDEX_LEN]> {
    let e = current(cat, key)?;
    let mech = e
        .meta
        .algorithm
        .hmac_mechanism()
        .ok_or_else(|| Error::KeyUsage { key: e.key_ref(), reason: "not an HMAC key".into() })?;
    let mac = s.sign(&mech, e.handle, input).map_err(ck("blind index"))?;
    mac.get(..INDEX_LEN)
        .and_then(|m| <[u8; INDEX_LEN]>::try_from(m).ok())
        .ok_or_else(|| Error::KeyUsage { key: e.key_ref(), reason: "blind index needs a 32-byte HMAC".into() })
}

fn seal(hsm: &Hsm, s: &Session, cat: &Catalogue, key: &KeyEntry, aad: &[u8], plaintext: &[u8]) -> Result<([u8; GCM_IV_LEN], Vec<u8>)> {
    let e = current(cat, key)?;
    count_gcm(hsm, s, e)?;
    let mut iv = random_iv()?;
    let out_iv = iv;
    let params = GcmParams::new(&mut iv, aad, (GCM_TAG_LEN as u64 * 8).into())
        .map_err(|err| Error::Token { op: "gcm params", rv: err.to_string() })?;
    let ct = s.encrypt(&Mechanism::AesGcm(params), e.handle, plaintext).map_err(ck("binding seal"))?;
    Ok((out_iv, ct))
}

fn open(s: &Session, cat: &Catalogue, r: &Resealable) -> Result<Zeroizing<Vec<u8>>> {
    let e = current(cat, &r.key)?;
    let mut iv = r.iv;
    let params = GcmParams::new(&mut iv, &r.aad, (GCM_TAG_LEN as u64 * 8).into())
        .map_err(|err| Error::Token { op: "gcm params", rv: err.to_string() })?;
    s.decrypt(&Mechanism::AesGcm(params), e.handle, &r.ciphertext)
        .map(Zeroizing::new)
        .map_err(ck_verify("binding open"))
}

impl Hsm {
    /// The blind index of an encoded phone number.
    pub async fn blind_index(&self, index_key: &Arc<KeyEntry>, input: Zeroizing<Vec<u8>>) -> Result<[u8; INDEX_LEN]> {
        let key = Arc::clone(index_key);
        self.call(move |s, cat| index(s, cat, &key, &input)).await
    }

    /// Computes the blind index, then seals `record` with the associated data
    /// `aad_of(index)`, in one token job. Returns (index, IV, ciphertext || tag).
    pub async fn seal_binding(
        &self,
        index_key: &Arc<KeyEntry>,
        seal_key: &Arc<KeyEntry>,
        index_input: Zeroizing<Vec<u8>>,
        aad_of: fn(&[u8; INDEX_LEN]) -> Vec<u8>,
        record: Zeroizing<Vec<u8>>,
    ) -> Result<([u8; INDEX_LEN], [u8; GCM_IV_LEN], Vec<u8>)> {
        let (ik, sk) = (Arc::clone(index_key), Arc::clone(seal_key));
        let this = self.clone();
        self.call(move |s, cat| {
            let idx = index(s, cat, &ik, &index_input)?;
            let (iv, ct) = seal(&this, s, cat, &sk, &aad_of(&idx), &record)?;
            Ok((idx, iv, ct))
        })
        .await
    }

    /// Opens one sealed record; a tag mismatch is [`Error::VerifyFailed`].
    pub async fn open_binding(&self, record: Resealable) -> Result<Zeroizing<Vec<u8>>> {
        self.call(move |s, cat| open(s, cat, &record)).await
    }

    /// Opens each record and seals it again under `new_key` with the same associated
    /// data, in one token job. `Ok(Err(i))`: record `i` does not open, and nothing is
    /// returned for any record.
    pub async fn reseal_bindings(
        &self,
        records: Vec<Resealable>,
        new_key: &Arc<KeyEntry>,
    ) -> Result<std::result::Result<Vec<([u8; GCM_IV_LEN], Vec<u8>)>, usize>> {
        let nk = Arc::clone(new_key);
        let this = self.clone();
        self.call(move |s, cat| {
            let mut out = Vec::with_capacity(records.len());
            for (i, r) in records.iter().enumerate() {
                let clear = match open(s, cat, r) {
                    Ok(c) => c,
                    Err(Error::VerifyFailed) => return Ok(Err(i)),
                    Err(e) => return Err(e),
                };
                out.push(seal(&this, s, cat, &nk, &r.aad, &clear)?);
            }
            Ok(Ok(out))
        })
        .await
    }
}
