//! VoucherService: the e-cash signatures. Device certificates (`device.ca`), vouchers
//! (`voucher.issuer`) and the trust bundle (`ecash.root`) are signed inside the token
//! (ECDSA P-256 over SHA-256, low-S, or pure Ed25519 for keys the profile makes
//! Ed25519); uploaded offline payments are verified in
//! software with the public keys the token exports, by the same rules a terminal
//! applies offline ([`crate::ecash::check_payment`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use crate::unix_now as now;
use super::{key_ref, AppState, Caller, Error, Note};
use crate::ecash::{
    check_payment_memo, CertificationRequest, DeviceCertificate, EcashError, KeyRole, KeySource, OfflineLimits, Presented,
    PublicKey, Signable, SignatureMemo, Signed, TrustBundle, TrustedKey, Verdict, Voucher,
};
use crate::ecash::format::MAX_BUNDLE_KEYS;
use crate::hsm::{Catalogue, KeyClass, KeyEntry, KeyState};
use crate::proto::voucher_service_server::VoucherService;
use crate::proto::{
    CertifyDeviceRequest, CertifyDeviceResponse, IssueVoucherRequest, IssueVoucherResponse, PaymentVerdict,
    TrustBundleRequest, TrustBundleResponse, VerifyPaymentsRequest, VerifyPaymentsResponse,
};

/// Key names of the service.
pub const CA_KEY: &str = "device.ca";
pub const ISSUER_KEY: &str = "voucher.issuer";
pub const ROOT_KEY: &str = "ecash.root";
/// Oldest (and furthest in the future) a certification request's timestamp may be.
pub const PROOF_MAX_AGE: u64 = 300;
/// Largest presentation VerifyPayments decodes (certificate, voucher, two payments
/// take about 1.1 KiB); a larger item is MALFORMED.
const MAX_PRESENTED: usize = 4096;



fn malformed(field: &'static str, e: EcashError) -> Error {
    Error::invalid(field, e.to_string())
}

/// Unix seconds of a key's RFC 3339 creation time ("YYYY-MM-DDTHH:MM:SSZ").
fn created_at(rfc3339: &str) -> Option<u64> {
    let n = |r: std::ops::Range<usize>| rfc3339.get(r).and_then(|s| s.parse::<u32>().ok());
    let byte = |r: std::ops::Range<usize>| n(r).and_then(|v| u8::try_from(v).ok());
    let month = time::Month::try_from(byte(5..7)?).ok()?;
    let date = time::Date::from_calendar_date(i32::try_from(n(0..4)?).ok()?, month, byte(8..10)?).ok()?;
    let t = time::Time::from_hms(byte(11..13)?, byte(14..16)?, byte(17..19)?).ok()?;
    u64::try_from(time::PrimitiveDateTime::new(date, t).assume_utc().unix_timestamp()).ok()
}

fn wire_verdict(v: Verdict) -> PaymentVerdict {
    match v {
        Verdict::Valid => PaymentVerdict::Valid,
        Verdict::BadSignature => PaymentVerdict::BadSignature,
        Verdict::UnknownKeyVersion => PaymentVerdict::UnknownKeyVersion,
        Verdict::CertExpired => PaymentVerdict::CertExpired,
        Verdict::VoucherExpired => PaymentVerdict::VoucherExpired,
        Verdict::WrongDevice => PaymentVerdict::WrongDevice,
        Verdict::BalanceMismatch => PaymentVerdict::BalanceMismatch,
        Verdict::LimitExceeded => PaymentVerdict::LimitExceeded,
        Verdict::ChainBroken => PaymentVerdict::ChainBroken,
        // Terminal-only outcomes; the batch check never produces them.
        Verdict::WrongChallenge | Verdict::BundleInvalid => PaymentVerdict::Malformed,
    }
}

/// The non-retired public keys of `device.ca` and `voucher.issuer`, parsed once per
/// catalogue, and the trust bundle's content and version.
struct TrustSet {
    keys: HashMap<(KeyRole, u32), (PublicKey, u64)>,
    bundle_keys: Vec<TrustedKey>,
    /// Raised by every key created, rotated or retired (the sum of the metadata
    /// revisions + 1 over every version, retired ones included).
    bundle_version: u64,
}

impl KeySource for TrustSet {
    fn key(&self, role: KeyRole, version: u32, at: u64) -> Option<&PublicKey> {
        self.keys.get(&(role, version)).filter(|(_, not_before)| *not_before <= at).map(|(k, _)| k)
    }
}

impl TrustSet {
    fn build(cat: &Catalogue) -> Result<TrustSet, Error> {
        let mut keys = HashMap::new();
        let mut bundle_keys = Vec::new();
        let mut bundle_version = 0u64;
        for (name, role) in [(CA_KEY, Some(KeyRole::DeviceCa)), (ISSUER_KEY, Some(KeyRole::VoucherIssuer)), (ROOT_KEY, None)] {
            for e in cat.versions(name) {
                bundle_version += u64::from(e.meta.rev) + 1;
                let Some(role) = role else { continue };
                if e.meta.state == KeyState::Retired || e.meta.class != KeyClass::S0 {
                    continue;
                }
                let Some(der) = e.public_der.as_deref() else { continue };
                let pk = PublicKey::from_spki_der(der)
                    .map_err(|err| Error::Internal(format!("{}: public key: {err}", e.key_ref())))?;
                // Trusted from its creation: an unreadable time must not mean "since 1970".
                let not_before = created_at(&e.meta.created)
                    .ok_or_else(|| Error::Internal(format!("{}: unreadable creation time", e.key_ref())))?;
                bundle_keys.push(TrustedKey {
                    role,
                    algorithm: pk.algorithm(),
                    version: e.meta.version,
                    public_key: pk.raw().to_vec(),
                    not_before,
                    not_after: u64::MAX,
                });
                keys.insert((role, e.meta.version), (pk, not_before));
            }
        }
        bundle_keys.sort_by_key(|k| (k.role, k.version));
        Ok(TrustSet { keys, bundle_keys, bundle_version })
    }
}

/// Signature checks that succeeded (object and key, see [`SignatureMemo`]); forgotten
/// all at once when full. Key trust is still checked on every call.
#[derive(Default)]
struct Verified(Mutex<HashSet<[u8; 32]>>);

/// Entries kept in [`Verified`].
const VERIFIED_MAX: usize = 200_000;

impl SignatureMemo for Verified {
    fn seen(&self, id: &[u8; 32]) -> bool {
        self.0.lock().map(|s| s.contains(id)).unwrap_or(false)
    }
    fn remember(&self, id: [u8; 32]) {
        if let Ok(mut s) = self.0.lock() {
            if s.len() >= VERIFIED_MAX {
                s.clear();
            }
            s.insert(id);
        }
    }
}

pub struct VoucherSvc {
    state: Arc<AppState>,
    trust: Mutex<Option<(Arc<Catalogue>, Arc<TrustSet>)>>,
    verified: Arc<Verified>,
    /// The last signed bundle: (bundle version, root key version, bytes), answered
    /// again while neither changes.
    bundle: Mutex<Option<(u64, u32, Vec<u8>)>>,
}

impl VoucherSvc {
    pub fn new(state: Arc<AppState>) -> Self {
        VoucherSvc { state, trust: Mutex::new(None), verified: Arc::default(), bundle: Mutex::new(None) }
    }

    /// The trust set of the current catalogue (rebuilt after a reload or ceremony change).
    fn trust(&self) -> Result<Arc<TrustSet>, Error> {
        let cat = self.state.hsm.catalogue();
        let mut g = self.trust.lock().map_err(|_| Error::Internal("trust cache poisoned".into()))?;
        if let Some((c, t)) = g.as_ref() {
            if Arc::ptr_eq(c, &cat) {
                return Ok(Arc::clone(t));
            }
        }
        let t = Arc::new(TrustSet::build(&cat)?);
        *g = Some((cat, Arc::clone(&t)));
        Ok(t)
    }

    fn signing_key(&self, caller: &Caller, name: &str) -> Result<Arc<KeyEntry>, Error> {
        caller.may_use_key(name)?;
        Ok(self.state.hsm.catalogue().for_new(name, &[KeyClass::S0])?)
    }

    /// Signs `body` with `key` in the token.
    async fn sign<T: Signable>(&self, key: &Arc<KeyEntry>, body: T) -> Result<Signed<T>, Error> {
        body.validate().map_err(|e| Error::invalid("request", e.to_string()))?;
        let signature = self.state.hsm.sign(key, body.tbs()).await?;
        Ok(Signed { body, signature })
    }

    fn validity(field: &'static str, asked: u64, default: u64, max: u64) -> Result<u64, Error> {
        match asked {
            0 => Ok(default),
            s if s <= max => Ok(s),
            _ => Err(Error::invalid(field, format!("at most {max} seconds"))),
        }
    }

    async fn certify_inner(&self, caller: &Caller, note: &mut Note, r: CertifyDeviceRequest) -> Result<CertifyDeviceResponse, Error> {
        let l = r.limits.ok_or_else(|| Error::invalid("limits", "required"))?;
        if l.max_balance == 0 {
            return Err(Error::invalid("limits.max_balance", "must be at least 1"));
        }
        if l.max_single_payment == 0 || l.max_single_payment > l.max_balance {
            return Err(Error::invalid("limits.max_single_payment", "must be 1 to max_balance"));
        }
        if l.max_consecutive_offline == 0 {
            return Err(Error::invalid("limits.max_consecutive_offline", "must be at least 1"));
        }
        let req = Signed::<CertificationRequest>::decode(&r.certification_request)
            .map_err(|e| malformed("certification_request", e))?;
        let t = now();
        if req.body.timestamp.saturating_add(PROOF_MAX_AGE) < t || req.body.timestamp > t.saturating_add(PROOF_MAX_AGE) {
            return Err(Error::invalid(
                "certification_request",
                format!("timestamp must be within {PROOF_MAX_AGE} seconds of the appliance's clock"),
            ));
        }
        let device_key = PublicKey::from_sec1(&req.body.device_public_key)
            .map_err(|e| malformed("certification_request", e))?;
        req.verify(&device_key).map_err(|_| {
            Error::VerificationFailed(
                "certification_request: the device key's signature does not verify (no proof of possession)".into(),
            )
        })?;
        let cfg = &self.state.config.ecash;
        let validity = Self::validity(
            "validity_seconds",
            r.validity_seconds,
            cfg.certificate_validity.as_secs(),
            cfg.max_certificate_validity.as_secs(),
        )?;
        let key = self.signing_key(caller, CA_KEY)?;
        note.keys.push(key.key_ref());
        let body = DeviceCertificate {
            device_id: req.body.device_id,
            device_public_key: req.body.device_public_key,
            account_ref: req.body.account_ref.clone(),
            limits: OfflineLimits {
                max_balance: l.max_balance,
                max_single_payment: l.max_single_payment,
                max_consecutive_offline: l.max_consecutive_offline,
            },
            not_before: t,
            not_after: t + validity,
            ca_key_version: key.meta.version,
        };
        note.subjects.push(hex::encode(body.device_id));
        let cert = self.sign(&key, body).await?;
        Ok(CertifyDeviceResponse { certificate: cert.encode(), key: Some(key_ref(&key)), not_after: cert.body.not_after })
    }

    async fn issue_inner(&self, caller: &Caller, note: &mut Note, r: IssueVoucherRequest) -> Result<IssueVoucherResponse, Error> {
        let cert = Signed::<DeviceCertificate>::decode(&r.certificate).map_err(|e| malformed("certificate", e))?;
        let t = now();
        let trust = self.trust()?;
        let ca = trust.key(KeyRole::DeviceCa, cert.body.ca_key_version, cert.body.not_before).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "certificate: signed by {CA_KEY}/v{}, which is not a trusted version",
                cert.body.ca_key_version
            ))
        })?;
        cert.verify(ca)
            .map_err(|_| Error::VerificationFailed("certificate: the signature does not verify".into()))?;
        if t < cert.body.not_before || t > cert.body.not_after {
            return Err(Error::FailedPrecondition("certificate: not valid now".into()));
        }
        let currency: [u8; 3] = r
            .currency
            .as_bytes()
            .try_into()
            .ok()
            .filter(|c: &[u8; 3]| c.iter().all(u8::is_ascii_uppercase))
            .ok_or_else(|| Error::invalid("currency", "must be an ISO 4217 alphabetic code (three letters A-Z)"))?;
        if r.balance == 0 {
            return Err(Error::invalid("balance", "must be at least 1"));
        }
        if r.balance > cert.body.limits.max_balance {
            return Err(Error::invalid("balance", "exceeds the certificate's max_balance"));
        }
        let cfg = &self.state.config.ecash;
        let validity =
            Self::validity("validity_seconds", r.validity_seconds, cfg.voucher_validity.as_secs(), cfg.max_voucher_validity.as_secs())?;
        let key = self.signing_key(caller, ISSUER_KEY)?;
        note.keys.push(key.key_ref());
        let mut voucher_id = [0u8; 16];
        openssl::rand::rand_bytes(&mut voucher_id).map_err(|e| Error::Internal(format!("os rng: {e}")))?;
        let body = Voucher {
            voucher_id,
            device_id: cert.body.device_id,
            currency,
            balance: r.balance,
            counter_at_issue: r.counter_at_issue,
            issued_at: t,
            // A voucher never outlives its device's certificate.
            expires_at: (t + validity).min(cert.body.not_after),
            issuer_key_version: key.meta.version,
        };
        note.subjects.push(hex::encode(body.device_id));
        let v = self.sign(&key, body).await?;
        Ok(IssueVoucherResponse {
            voucher: v.encode(),
            voucher_id: voucher_id.to_vec(),
            key: Some(key_ref(&key)),
            expires_at: v.body.expires_at,
        })
    }

    async fn bundle_inner(&self, caller: &Caller, note: &mut Note) -> Result<TrustBundleResponse, Error> {
        let trust = self.trust()?;
        if trust.bundle_keys.is_empty() {
            return Err(Error::FailedPrecondition(format!("no usable {CA_KEY} or {ISSUER_KEY} key")));
        }
        if trust.bundle_keys.len() > MAX_BUNDLE_KEYS {
            return Err(Error::FailedPrecondition(format!(
                "{} usable {CA_KEY} and {ISSUER_KEY} versions exceed the bundle's {MAX_BUNDLE_KEYS}: retire old versions",
                trust.bundle_keys.len()
            )));
        }
        let key = self.signing_key(caller, ROOT_KEY)?;
        note.keys.push(key.key_ref());
        note.detail = Some(format!("bundle_version={}", trust.bundle_version));
        let cached = self
            .bundle
            .lock()
            .ok()
            .and_then(|g| g.as_ref().filter(|(v, r, _)| *v == trust.bundle_version && *r == key.meta.version).map(|(_, _, b)| b.clone()));
        if let Some(bundle) = cached {
            return Ok(TrustBundleResponse { bundle, bundle_version: trust.bundle_version, key: Some(key_ref(&key)) });
        }
        let body = TrustBundle {
            bundle_version: trust.bundle_version,
            issued_at: now(),
            root_key_version: key.meta.version,
            keys: trust.bundle_keys.clone(),
        };
        let bundle = self.sign(&key, body).await?.encode();
        if let Ok(mut g) = self.bundle.lock() {
            *g = Some((trust.bundle_version, key.meta.version, bundle.clone()));
        }
        Ok(TrustBundleResponse { bundle, bundle_version: trust.bundle_version, key: Some(key_ref(&key)) })
    }

    async fn verify_inner(&self, caller: &Caller, note: &mut Note, r: VerifyPaymentsRequest) -> Result<VerifyPaymentsResponse, Error> {
        let max = self.state.config.ecash.max_batch;
        if r.payments.is_empty() {
            return Err(Error::invalid("payments", "required: at least one payment"));
        }
        if r.payments.len() > max {
            return Err(Error::invalid("payments", format!("{} payments exceed the batch limit of {max}", r.payments.len())));
        }
        caller.may_use_key(CA_KEY)?;
        caller.may_use_key(ISSUER_KEY)?;
        let trust = self.trust()?;
        let t = now();
        // Signature checks are CPU work: split the batch over blocking threads.
        let total = r.payments.len();
        let parts = if total >= 16 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(4) } else { 1 };
        let mut items = r.payments.into_iter();
        let mut tasks = Vec::with_capacity(parts);
        for _ in 0..parts {
            let chunk: Vec<Vec<u8>> = items.by_ref().take(total.div_ceil(parts)).collect();
            let (trust, memo) = (Arc::clone(&trust), Arc::clone(&self.verified));
            tasks.push(tokio::task::spawn_blocking(move || {
                chunk
                    .iter()
                    .map(|b| match (b.len() <= MAX_PRESENTED).then(|| Presented::decode(b)) {
                        Some(Ok(pr)) => wire_verdict(check_payment_memo(trust.as_ref(), &pr, t, memo.as_ref())),
                        _ => PaymentVerdict::Malformed,
                    })
                    .collect::<Vec<_>>()
            }));
        }
        let mut verdicts = Vec::with_capacity(total);
        for task in tasks {
            let part = task.await.map_err(|e| Error::Internal(format!("verification task: {e}")))?;
            verdicts.extend(part.into_iter().map(i32::from));
        }
        let valid = verdicts.iter().filter(|v| **v == PaymentVerdict::Valid as i32).count() as u32;
        note.detail = Some(format!("payments={} valid={valid}", verdicts.len()));
        Ok(VerifyPaymentsResponse { verdicts, valid })
    }
}

#[tonic::async_trait]
impl VoucherService for VoucherSvc {
    async fn certify_device(&self, req: Request<CertifyDeviceRequest>) -> Result<Response<CertifyDeviceResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.certify_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn issue_voucher(&self, req: Request<IssueVoucherRequest>) -> Result<Response<IssueVoucherResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.issue_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn trust_bundle(&self, req: Request<TrustBundleRequest>) -> Result<Response<TrustBundleResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.bundle_inner(&caller, &mut note)).await;
        self.state.finish(&caller, note, r).await
    }

    async fn verify_payments(&self, req: Request<VerifyPaymentsRequest>) -> Result<Response<VerifyPaymentsResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.verify_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_time() {
        assert_eq!(created_at("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(created_at("2026-11-23T10:20:30Z"), Some(1_795_429_230));
        assert_eq!(created_at("garbage"), None);
        assert_eq!(created_at("2026-02-30T10:20:30Z"), None);
    }
}
