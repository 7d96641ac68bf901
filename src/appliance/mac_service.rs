//! MacService: interbank message MACs. The key's class decides the algorithm (M1
//! TDES CBC-MAC, M3 retail MAC from a pair of single-DES halves, M6 AES-CMAC, M7
//! HMAC); lengths are checked against each algorithm's limits and verification
//! compares in constant time. The audit keys are never reachable from here.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{AppState, Caller, Error, Note};
use crate::crypto::mac::{ct_eq, Padding};
use crate::hsm::{self, Algorithm, KeyClass, KeyEntry, MacAlgorithm, MacKey, LEFT_SUFFIX, RIGHT_SUFFIX};
use crate::proto::mac_service_server::MacService;
use crate::proto::{GenerateMacRequest, GenerateMacResponse, KeyRef, MacPadding, VerifyMacRequest, VerifyMacResponse};

/// Largest message MacService accepts.
pub const MAX_MAC_DATA: usize = 64 * 1024;
const MAC_CLASSES: [KeyClass; 4] = [KeyClass::M1, KeyClass::M3, KeyClass::M6, KeyClass::M7];

pub struct MacSvc {
    pub state: Arc<AppState>,
}

/// A resolved MAC key: algorithm, token key(s), the reference reported back.
struct Resolved {
    alg: MacAlgorithm,
    key: MacKey,
    entry: Arc<KeyEntry>,
    reference: KeyRef,
}

/// Allowed MAC lengths (bytes) per algorithm.
fn length_range(alg: MacAlgorithm, full: usize) -> (usize, usize) {
    match alg {
        // ISO 9797-1: 32 to 64 bits for the DES-based algorithms.
        MacAlgorithm::CbcMacTdes | MacAlgorithm::RetailMac => (4, 8),
        // NIST SP 800-38B: at least 64 bits.
        MacAlgorithm::AesCmac => (8, 16),
        // RFC 2104: at least half the hash output.
        MacAlgorithm::Hmac => (full / 2, full),
    }
}

impl MacSvc {
    fn resolve(&self, caller: &Caller, note: &mut Note, name: &str, version: u32, new: bool) -> Result<Resolved, Error> {
        if name.is_empty() {
            return Err(Error::invalid("key_name", "required"));
        }
        hsm::validate_name(name).map_err(|m| Error::invalid("key_name", m))?;
        if name == "audit" || name.starts_with("audit.") {
            return Err(Error::PermissionDenied(format!("key {name} is reserved for the audit trail")));
        }
        if name.ends_with(LEFT_SUFFIX) || name.ends_with(RIGHT_SUFFIX) {
            return Err(Error::invalid("key_name", "name the retail-MAC key, not one of its halves"));
        }
        caller.may_use_key(name)?;
        let cat = self.state.hsm.catalogue();
        let get = |n: &str| if new { cat.for_new(n, &MAC_CLASSES) } else { cat.for_existing(n, version, &MAC_CLASSES) };
        let left_name = format!("{name}{LEFT_SUFFIX}");
        if cat.versions_exist(&left_name) {
            let left = get(&left_name)?;
            let right = cat.for_existing(&format!("{name}{RIGHT_SUFFIX}"), left.meta.version, &[KeyClass::M3])?;
            if left.meta.class != KeyClass::M3 || left.meta.algorithm != Algorithm::Des {
                return Err(Error::FailedPrecondition(format!("key {}: not a retail-MAC half", left.key_ref())));
            }
            note.keys.push(left.key_ref());
            note.keys.push(right.key_ref());
            let reference = KeyRef { name: name.to_string(), version: left.meta.version };
            return Ok(Resolved { alg: MacAlgorithm::RetailMac, key: MacKey::Pair { left: Arc::clone(&left), right }, entry: left, reference });
        }
        let e = get(name)?;
        note.keys.push(e.key_ref());
        let alg = match (e.meta.class, e.meta.algorithm) {
            (KeyClass::M1, Algorithm::Tdes2 | Algorithm::Tdes3) => MacAlgorithm::CbcMacTdes,
            (KeyClass::M6, Algorithm::Aes128 | Algorithm::Aes192 | Algorithm::Aes256) => MacAlgorithm::AesCmac,
            (KeyClass::M7, _) => MacAlgorithm::Hmac,
            (class, alg) => {
                return Err(Error::Unimplemented(format!("{class} {alg} MACs are not available through this token")));
            }
        };
        let reference = KeyRef { name: name.to_string(), version: e.meta.version };
        Ok(Resolved { alg, key: MacKey::Single(Arc::clone(&e)), entry: e, reference })
    }

    fn padding(alg: MacAlgorithm, p: i32) -> Result<Padding, Error> {
        let p = MacPadding::try_from(p).map_err(|_| Error::invalid("padding", format!("unknown padding {p}")))?;
        match (alg.padded(), p) {
            (true, MacPadding::Unspecified | MacPadding::Method1) => Ok(Padding::Method1),
            (true, MacPadding::Method2) => Ok(Padding::Method2),
            (false, MacPadding::Unspecified) => Ok(Padding::Method1),
            (false, _) => Err(Error::invalid("padding", "CMAC and HMAC take no padding method")),
        }
    }

    fn check_data(data: &[u8]) -> Result<(), Error> {
        if data.len() > MAX_MAC_DATA {
            return Err(Error::invalid("data", format!("{} bytes exceeds the limit of {MAX_MAC_DATA}", data.len())));
        }
        Ok(())
    }

    async fn generate_inner(&self, caller: &Caller, note: &mut Note, r: GenerateMacRequest) -> Result<GenerateMacResponse, Error> {
        Self::check_data(&r.data)?;
        let k = self.resolve(caller, note, &r.key_name, 0, true)?;
        let padding = Self::padding(k.alg, r.padding)?;
        let full = k.alg.full_len(&k.entry);
        let (min, max) = length_range(k.alg, full);
        let len = if r.mac_length == 0 { full } else { r.mac_length as usize };
        if !(min..=max).contains(&len) {
            return Err(Error::invalid("mac_length", format!("must be {min}-{max} bytes for this key (or 0 for {full})")));
        }
        let mut mac = self.state.hsm.mac(k.alg, k.key, padding, r.data).await?;
        mac.truncate(len);
        Ok(GenerateMacResponse { mac, key: Some(k.reference) })
    }

    async fn verify_inner(&self, caller: &Caller, note: &mut Note, r: VerifyMacRequest) -> Result<VerifyMacResponse, Error> {
        Self::check_data(&r.data)?;
        let k = self.resolve(caller, note, &r.key_name, r.version, false)?;
        let padding = Self::padding(k.alg, r.padding)?;
        let full = k.alg.full_len(&k.entry);
        let (min, max) = length_range(k.alg, full);
        if !(min..=max).contains(&r.mac.len()) {
            return Err(Error::invalid("mac", format!("must be {min}-{max} bytes for this key, got {}", r.mac.len())));
        }
        let computed = self.state.hsm.mac(k.alg, k.key, padding, r.data).await?;
        let valid = ct_eq(&computed[..r.mac.len().min(computed.len())], &r.mac);
        Ok(VerifyMacResponse { valid, key: Some(k.reference) })
    }
}

#[tonic::async_trait]
impl MacService for MacSvc {
    async fn generate_mac(&self, req: Request<GenerateMacRequest>) -> Result<Response<GenerateMacResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.generate_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn verify_mac(&self, req: Request<VerifyMacRequest>) -> Result<Response<VerifyMacResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.verify_inner(&caller, &mut note, req.into_inner())).await;
        if let Ok(v) = &r {
            note.detail = Some(format!("valid={}", v.valid));
        }
        self.state.finish(&caller, note, r).await
    }
}
