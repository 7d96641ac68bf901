//! OtpService: transaction-bound dynamic codes (IssueCode / VerifyCode) and
//! TOTP/HOTP for authenticator apps. Codes are HMACs in the token under the `otp`
//! key over the challenge nonce, subject, purpose and the transaction's digest;
//! challenges are sealed with `otp.seal` (AES-GCM) and carry this appliance's boot
//! identity; attempts and single use are counted in a bounded per-appliance store.
//! Seeds leave the appliance only wrapped under `otp.kek` (and once inside the
//! enrolment URI).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::otp_store::{Admission, AttemptStore, FailureStore, Refused, SeedAdmission};
use crate::unix_now as now;
use super::{key_ref, AppState, Caller, Error, Note};
use crate::crypto::mac::ct_eq;
use crate::crypto::otp::{self, Challenge, OtpError, OtpHash, SeedBlob, TxContext};
use crate::hsm::{self, Algorithm, KeyClass, KeyEntry, SeedCache, SeedHash};
use crate::proto::otp_service_server::OtpService;
use crate::proto::{
    CodeVerdict, EnrollHotpRequest, EnrollHotpResponse, EnrollTotpRequest, EnrollTotpResponse, ImportOtpSeedRequest,
    ImportOtpSeedResponse, IssueCodeRequest, IssueCodeResponse, KeyRef, OtpHashAlgorithm,
    TransactionContext, VerifyCodeRequest, VerifyCodeResponse, VerifyHotpRequest, VerifyHotpResponse, VerifyTotpRequest,
    VerifyTotpResponse,
};

/// Role permission needed to receive codes in clear.
pub const CLEAR_CODE: &str = "otp.clear-code";
/// Role permission needed to import a seed made elsewhere (ImportOtpSeed).
pub const IMPORT_SEED: &str = "otp.import-seed";
/// Names of the transport KEKs ImportOtpSeed unwraps seeds with.
pub const TRANSPORT_PREFIX: &str = "otp.transport.";
/// The shortest seed ImportOtpSeed takes (RFC 4226: at least 128 bits).
pub const MIN_IMPORTED_SEED: usize = 16;
/// Key names of the service.
pub const CODE_KEY: &str = "otp";
pub const SEAL_KEY: &str = "otp.seal";
pub const SEED_KEK: &str = "otp.kek";
const DEFAULT_LIFETIME: u32 = 300;
const MAX_LIFETIME: u32 = 600;
/// Unwrapped seeds kept in the token.
pub const SEED_CACHE: usize = 4096;
/// Seeds whose TOTP/HOTP failures are remembered at once.
pub const MAX_TRACKED_SEEDS: usize = 100_000;


impl From<OtpError> for Error {
    fn from(e: OtpError) -> Self {
        match e {
            OtpError::Invalid { field, msg } => Error::invalid(field, msg),
        }
    }
}


fn context(c: Option<TransactionContext>) -> Result<TxContext, Error> {
    let c = c.ok_or_else(|| Error::invalid("context", "required: amount, currency, payee and reference"))?;
    let tx = TxContext { amount_minor: c.amount_minor, currency: c.currency, payee_id: c.payee_id, reference: c.reference };
    tx.validate()?;
    Ok(tx)
}

fn digits_of(field: &'static str, d: u32) -> Result<u8, Error> {
    match d {
        0 => Ok(6),
        6..=8 => Ok(d as u8),
        _ => Err(Error::invalid(field, "must be 6-8 (or 0 for 6)")),
    }
}

/// A typed code: 6-8 ASCII digits, else simply not a match.
fn code_shape_ok(code: &str, digits: u8) -> bool {
    code.len() == digits as usize && code.bytes().all(|b| b.is_ascii_digit())
}

fn seed_hash(h: OtpHash) -> SeedHash {
    match h {
        OtpHash::Sha1 => SeedHash::Sha1,
        OtpHash::Sha256 => SeedHash::Sha256,
        OtpHash::Sha512 => SeedHash::Sha512,
    }
}

/// Wraps a seed under the active `otp.kek` and binds the blob to `subject` with the
/// active `otp` key: (encoded blob, KEK used, keys used). What EnrollTotp does with a
/// new seed, and how existing seeds (such as published test vectors) are imported.
pub async fn seed_blob(
    hsm: &hsm::Hsm,
    subject: &str,
    seed: Zeroizing<Vec<u8>>,
    params: (OtpHash, u8, u32),
) -> Result<(Vec<u8>, KeyRef, Vec<String>), Error> {
    let (hash, digits, period) = params;
    otp::validate_subject(subject)?;
    if !(6..=8).contains(&digits) || !(1..=300).contains(&period) {
        return Err(Error::invalid("seed", "digits must be 6-8 and the period 1-300 seconds"));
    }
    let seed = otp::pad_seed(&seed, hash)?;
    let cat = hsm.catalogue();
    let kek = cat.for_new(SEED_KEK, &[KeyClass::K0])?;
    let mac_key = cat.for_new(CODE_KEY, &[KeyClass::Otp])?;
    drop(cat);
    let wrapped = hsm.wrap_seed(Arc::clone(&kek), seed).await?;
    bind_blob(hsm, subject, &kek, &mac_key, wrapped, params).await
}

/// The blob of a seed wrapped under `kek`, bound to `subject` by an HMAC under
/// `mac_key`: (encoded blob, KEK used, keys used).
async fn bind_blob(
    hsm: &hsm::Hsm,
    subject: &str,
    kek: &Arc<KeyEntry>,
    mac_key: &Arc<KeyEntry>,
    wrapped: Vec<u8>,
    params: (OtpHash, u8, u32),
) -> Result<(Vec<u8>, KeyRef, Vec<String>), Error> {
    let (hash, digits, period) = params;
    let keys = vec![kek.key_ref(), mac_key.key_ref()];
    let mut blob =
        SeedBlob { kek_version: kek.meta.version, mac_key_version: mac_key.meta.version, hash, digits, period, wrapped, mac: Vec::new() };
    blob.mac = hsm.hmac(mac_key, blob.mac_input(subject)).await?;
    Ok((blob.encode(), key_ref(kek), keys))
}

/// A decoded seed blob with the keys to check and use it.
struct OpenedBlob {
    /// The seed's key in the failure store: a hash of the subject and the blob.
    failure_key: [u8; 32],
    blob: SeedBlob,
    kek: Arc<KeyEntry>,
    mac_key: Arc<KeyEntry>,
    mac_input: Vec<u8>,
}

/// The failure-store key of a seed blob presented for `subject`: SHA-256 over a
/// label, the subject's length and bytes, and the blob (no secret: the seed inside
/// is wrapped).
fn failure_key(subject: &str, blob: &[u8]) -> [u8; 32] {
    let mut h = openssl::sha::Sha256::new();
    h.update(b"keyward otp seed failures\0");
    h.update(&(subject.len() as u64).to_be_bytes());
    h.update(subject.as_bytes());
    h.update(blob);
    h.finish()
}

/// The audit detail of a TOTP/HOTP answer: the verdict and the seed's failure count.
fn verify_detail(valid: bool, failures: Option<String>) -> String {
    match failures {
        Some(f) => format!("valid={valid} {f}"),
        None => format!("valid={valid}"),
    }
}

fn blob_refused() -> Error {
    Error::VerificationFailed("seed_blob: not a valid seed blob for this subject".into())
}

pub struct OtpSvc {
    pub state: Arc<AppState>,
    store: AttemptStore,
    /// TOTP/HOTP failures per seed.
    failures: FailureStore,
    seeds: Arc<SeedCache>,
    /// This process's boot identity, sealed into every challenge it issues.
    boot: [u8; 16],
}

impl OtpSvc {
    pub fn new(state: Arc<AppState>) -> Result<OtpSvc, Error> {
        let mut boot = [0u8; 16];
        boot[..8].copy_from_slice(&state.boot_epoch.to_be_bytes());
        openssl::rand::rand_bytes(&mut boot[8..]).map_err(|e| Error::Internal(format!("os rng: {e}")))?;
        let o = &state.config.otp;
        let store = AttemptStore::new(o.max_open_challenges, o.challenge_quota_per_client);
        let failures = FailureStore::new(o.totp_max_failures, o.totp_lockout.as_secs(), MAX_TRACKED_SEEDS);
        Ok(OtpSvc { state, store, failures, seeds: Arc::new(SeedCache::new(SEED_CACHE)), boot })
    }

    async fn code_of(&self, otp_key: &Arc<KeyEntry>, ch: &Challenge, subject: &str, purpose: &str, tx: &TxContext) -> Result<Zeroizing<String>, Error> {
        let input = otp::code_input(&ch.nonce, subject, purpose, &tx.digest());
        let mac = Zeroizing::new(self.state.hsm.hmac(otp_key, input).await?);
        Ok(otp::truncate(&mac, u32::from(ch.digits))?)
    }

    async fn issue_inner(&self, caller: &Caller, note: &mut Note, r: IssueCodeRequest) -> Result<IssueCodeResponse, Error> {
        otp::validate_subject(&r.subject)?;
        otp::validate_purpose(&r.purpose)?;
        let tx = context(r.context)?;
        let lifetime = match r.lifetime_seconds {
            0 => DEFAULT_LIFETIME,
            l if l <= MAX_LIFETIME => l,
            _ => return Err(Error::invalid("lifetime_seconds", format!("at most {MAX_LIFETIME}"))),
        };
        let digits = digits_of("digits", r.digits)?;
        let delivery = if r.sealed_for.is_empty() {
            if !caller.role.has_permission(CLEAR_CODE) {
                return Err(Error::PermissionDenied(format!(
                    "role {} may not receive codes in clear (permission {CLEAR_CODE}): name an operator key in sealed_for",
                    caller.role.name
                )));
            }
            None
        } else {
            hsm::validate_name(&r.sealed_for).map_err(|m| Error::invalid("sealed_for", m))?;
            if [CODE_KEY, SEAL_KEY].contains(&r.sealed_for.as_str()) {
                return Err(Error::invalid("sealed_for", "name an operator's delivery key"));
            }
            caller.may_use_key(&r.sealed_for)?;
            Some(self.state.hsm.catalogue().for_new(&r.sealed_for, &[KeyClass::Otp])?)
        };
        if let Some(d) = &delivery {
            if d.meta.algorithm.secret_len() != Some(32) || d.meta.algorithm.hmac_mechanism().is_some() {
                return Err(Error::FailedPrecondition(format!("key {}: not an AES-256 delivery key", d.key_ref())));
            }
        }
        caller.may_use_key(CODE_KEY)?;
        caller.may_use_key(SEAL_KEY)?;
        let cat = self.state.hsm.catalogue();
        let otp_key = cat.for_new(CODE_KEY, &[KeyClass::Otp])?;
        let seal = cat.for_new(SEAL_KEY, &[KeyClass::Otp])?;
        drop(cat);
        note.keys.push(otp_key.key_ref());
        note.keys.push(seal.key_ref());
        let mut id = [0u8; 16];
        let mut nonce = [0u8; 16];
        openssl::rand::rand_bytes(&mut id).map_err(|e| Error::Internal(format!("os rng: {e}")))?;
        openssl::rand::rand_bytes(&mut nonce).map_err(|e| Error::Internal(format!("os rng: {e}")))?;
        let issued_at = now();
        let ch = Challenge {
            id,
            nonce,
            otp_key_version: otp_key.meta.version,
            issued_at,
            expires_at: issued_at + u64::from(lifetime),
            digits,
            boot: self.boot,
            max_attempts: self.state.config.otp.max_attempts,
        };
        let code = self.code_of(&otp_key, &ch, &r.subject, &r.purpose, &tx).await?;
        let aad = otp::seal_aad(SEAL_KEY, seal.meta.version);
        let (iv, ct) = self.state.hsm.gcm_encrypt(&seal, aad, ch.encode().to_vec()).await?;
        let challenge = otp::frame_token(seal.meta.version, &iv, &ct);
        let (clear, sealed_code, delivery_key) = match delivery {
            None => (code.to_string(), Vec::new(), None),
            Some(d) => {
                note.keys.push(d.key_ref());
                let (iv, ct) = self.state.hsm.gcm_encrypt(&d, id.to_vec(), code.as_bytes().to_vec()).await?;
                let mut sealed = iv.to_vec();
                sealed.extend_from_slice(&ct);
                (String::new(), sealed, Some(key_ref(&d)))
            }
        };
        // Registered last: a challenge that was never handed out holds no slot. Each
        // client identity holds at most its quota, so one client cannot fill the store.
        self.store.register(id, &caller.identity, ch.expires_at, ch.max_attempts, issued_at).map_err(|e| match e {
            Refused::Quota(_) => {
                note.error_detail = Some("otp-client-quota".into());
                Error::ResourceExhausted(format!("{e} (otp.challenge_quota_per_client)"))
            }
            Refused::Full(_) => Error::ResourceExhausted(e.to_string()),
        })?;
        Ok(IssueCodeResponse {
            challenge,
            challenge_id: id.to_vec(),
            code: clear,
            sealed_code,
            expires_at: ch.expires_at,
            key: Some(key_ref(&otp_key)),
            delivery_key,
        })
    }

    /// The verdict for one presented code.
    async fn verify_inner(&self, caller: &Caller, note: &mut Note, r: VerifyCodeRequest) -> Result<VerifyCodeResponse, Error> {
        caller.may_use_key(CODE_KEY)?;
        caller.may_use_key(SEAL_KEY)?;
        otp::validate_subject(&r.subject)?;
        otp::validate_purpose(&r.purpose)?;
        let tx = context(r.context)?;
        let invalid = |left: u32| Ok(VerifyCodeResponse { verdict: CodeVerdict::Invalid as i32, attempts_left: left });
        let verdict = |v: CodeVerdict| Ok(VerifyCodeResponse { verdict: v as i32, attempts_left: 0 });
        let Some((seal_version, iv, ct)) = otp::parse_token(&r.challenge) else {
            return invalid(0);
        };
        let seal = match self.state.hsm.catalogue().for_existing(SEAL_KEY, seal_version, &[KeyClass::Otp]) {
            Ok(k) => k,
            Err(hsm::Error::KeyNotFound(_) | hsm::Error::KeyUsage { .. }) => return invalid(0),
            Err(e) => return Err(e.into()),
        };
        note.keys.push(seal.key_ref());
        let plain = match self.state.hsm.gcm_decrypt(&seal, iv, otp::seal_aad(SEAL_KEY, seal_version), ct.to_vec()).await {
            Ok(p) => p,
            Err(hsm::Error::VerifyFailed | hsm::Error::InvalidInput(_)) => return invalid(0),
            Err(e) => return Err(e.into()),
        };
        let Some(ch) = Challenge::decode(&plain) else {
            return invalid(0);
        };
        // Issued by another appliance, or before this one restarted: its attempt state
        // is not here, so it is refused rather than given fresh attempts.
        if !ct_eq(&ch.boot, &self.boot) {
            return invalid(0);
        }
        let t = now();
        // The expiry is inside the authenticated challenge: EXPIRED even once the store
        // has let the entry go.
        if t > ch.expires_at {
            return verdict(CodeVerdict::Expired);
        }
        let attempt = match self.store.admit(&ch.id, t) {
            Admission::Counted { remaining, .. } => remaining,
            Admission::AlreadyUsed => return verdict(CodeVerdict::AlreadyUsed),
            Admission::Locked => return verdict(CodeVerdict::Locked),
            Admission::Expired => return verdict(CodeVerdict::Expired),
            Admission::Unknown => return invalid(0),
        };
        let otp_key = match self.state.hsm.catalogue().for_existing(CODE_KEY, ch.otp_key_version, &[KeyClass::Otp]) {
            Ok(k) => k,
            Err(hsm::Error::KeyNotFound(_) | hsm::Error::KeyUsage { .. }) => return invalid(u32::from(attempt)),
            Err(e) => return Err(e.into()),
        };
        note.keys.push(otp_key.key_ref());
        let expected = self.code_of(&otp_key, &ch, &r.subject, &r.purpose, &tx).await?;
        let typed = Zeroizing::new(r.code);
        if code_shape_ok(&typed, ch.digits) && ct_eq(expected.as_bytes(), typed.as_bytes()) {
            // Exactly one of two concurrent right answers wins.
            return if self.store.claim_use(&ch.id) { verdict(CodeVerdict::Valid) } else { verdict(CodeVerdict::AlreadyUsed) };
        }
        invalid(u32::from(attempt))
    }

    fn seed_params(alg: i32, digits: u32, period: u32) -> Result<(OtpHash, u8, u32), Error> {
        let hash = match OtpHashAlgorithm::try_from(alg) {
            Ok(OtpHashAlgorithm::Unspecified | OtpHashAlgorithm::Sha1) => OtpHash::Sha1,
            Ok(OtpHashAlgorithm::Sha256) => OtpHash::Sha256,
            Ok(OtpHashAlgorithm::Sha512) => OtpHash::Sha512,
            Err(_) => return Err(Error::invalid("algorithm", format!("unknown algorithm {alg}"))),
        };
        let period = match period {
            0 => 30,
            p @ 1..=300 => p,
            _ => return Err(Error::invalid("period", "must be 1-300 seconds (or 0 for 30)")),
        };
        Ok((hash, digits_of("digits", digits)?, period))
    }

    /// Wraps `seed` and binds the blob to `subject`: the encoded blob.
    async fn seal_seed(
        &self,
        caller: &Caller,
        note: &mut Note,
        subject: &str,
        seed: Zeroizing<Vec<u8>>,
        params: (OtpHash, u8, u32),
    ) -> Result<(Vec<u8>, KeyRef), Error> {
        caller.may_use_key(SEED_KEK)?;
        caller.may_use_key(CODE_KEY)?;
        let (blob, kek, keys) = seed_blob(&self.state.hsm, subject, seed, params).await?;
        note.keys.extend(keys);
        Ok((blob, kek))
    }

    async fn enroll_inner(&self, caller: &Caller, note: &mut Note, r: EnrollTotpRequest) -> Result<EnrollTotpResponse, Error> {
        otp::validate_subject(&r.subject)?;
        Self::labels(&r.issuer, &r.account_label)?;
        let (hash, digits, period) = Self::seed_params(r.algorithm, r.digits, r.period)?;
        let seed = self.state.hsm.random_async(hash.digest_len()).await?;
        let uri = otp::otpauth_uri(&r.issuer, &r.account_label, &seed, hash, digits, period);
        let (blob, kek) = self.seal_seed(caller, note, &r.subject, seed, (hash, digits, period)).await?;
        Ok(EnrollTotpResponse { provisioning_uri: uri.to_string(), seed_blob: blob, kek: Some(kek) })
    }

    /// The issuer and account label shown in the authenticator app.
    fn labels(issuer: &str, account_label: &str) -> Result<(), Error> {
        let label_ok = |s: &str| !s.is_empty() && s.chars().count() <= 64 && !s.contains(':') && !s.chars().any(char::is_control);
        if !label_ok(issuer) {
            return Err(Error::invalid("issuer", "1-64 characters, no ':' or control characters"));
        }
        if !label_ok(account_label) {
            return Err(Error::invalid("account_label", "1-64 characters, no ':' or control characters"));
        }
        Ok(())
    }

    async fn enroll_hotp_inner(&self, caller: &Caller, note: &mut Note, r: EnrollHotpRequest) -> Result<EnrollHotpResponse, Error> {
        otp::validate_subject(&r.subject)?;
        Self::labels(&r.issuer, &r.account_label)?;
        // The period is not used by HOTP; the blob carries the default.
        let (hash, digits, period) = Self::seed_params(r.algorithm, r.digits, 0)?;
        if r.counter == u64::MAX {
            return Err(Error::invalid("counter", "must be below 2^64 - 1"));
        }
        let seed = self.state.hsm.random_async(hash.digest_len()).await?;
        let uri = otp::otpauth_hotp_uri(&r.issuer, &r.account_label, &seed, hash, digits, r.counter);
        let (blob, kek) = self.seal_seed(caller, note, &r.subject, seed, (hash, digits, period)).await?;
        Ok(EnrollHotpResponse { provisioning_uri: uri.to_string(), seed_blob: blob, kek: Some(kek) })
    }

    /// ImportOtpSeed: the seed is unwrapped under the named transport KEK and wrapped
    /// under `otp.kek` in one token job, then bound to the subject as EnrollTotp does.
    async fn import_inner(&self, caller: &Caller, note: &mut Note, r: ImportOtpSeedRequest) -> Result<ImportOtpSeedResponse, Error> {
        if !caller.role.has_permission(IMPORT_SEED) {
            return Err(Error::PermissionDenied(format!(
                "role {} may not import OTP seeds (permission {IMPORT_SEED})",
                caller.role.name
            )));
        }
        otp::validate_subject(&r.subject)?;
        let (hash, digits, period) = Self::seed_params(r.algorithm, r.digits, r.period)?;
        hsm::validate_name(&r.transport_kek).map_err(|m| Error::invalid("transport_kek", m))?;
        if !r.transport_kek.starts_with(TRANSPORT_PREFIX) || r.transport_kek.len() == TRANSPORT_PREFIX.len() {
            return Err(Error::invalid("transport_kek", format!("must name a transport KEK \"{TRANSPORT_PREFIX}<name>\"")));
        }
        // RFC 4226 asks for a secret of at least 128 bits; the wrap pads to 8 bytes and
        // adds 8, so a wrap of 16 bytes can only hold a seed of 8 bytes or fewer.
        let max = hash.digest_len();
        let max_wrapped = max.div_ceil(8) * 8 + 8;
        let n = r.wrapped_seed.len();
        if !(24..=max_wrapped).contains(&n) || !n.is_multiple_of(8) {
            return Err(Error::invalid(
                "wrapped_seed",
                format!(
                    "must be 24-{max_wrapped} bytes, a multiple of 8 (AES key wrap with padding of a seed of \
                     {MIN_IMPORTED_SEED}-{max} bytes)"
                ),
            ));
        }
        caller.may_use_key(&r.transport_kek)?;
        caller.may_use_key(SEED_KEK)?;
        caller.may_use_key(CODE_KEY)?;
        let cat = self.state.hsm.catalogue();
        let transport = match r.transport_kek_version {
            0 => cat.for_new(&r.transport_kek, &[KeyClass::K0])?,
            v => cat.for_existing(&r.transport_kek, v, &[KeyClass::K0])?,
        };
        let kek = cat.for_new(SEED_KEK, &[KeyClass::K0])?;
        let mac_key = cat.for_new(CODE_KEY, &[KeyClass::Otp])?;
        drop(cat);
        if !matches!(transport.meta.algorithm, Algorithm::Aes128 | Algorithm::Aes192 | Algorithm::Aes256) {
            return Err(Error::FailedPrecondition(format!("key {}: not an AES transport KEK", transport.key_ref())));
        }
        note.keys.push(transport.key_ref());
        let wrapped =
            self.state.hsm.rewrap_seed(Arc::clone(&transport), r.wrapped_seed, Arc::clone(&kek), (MIN_IMPORTED_SEED, max)).await.map_err(|e| match e {
                hsm::Error::VerifyFailed => Error::invalid(
                    "wrapped_seed",
                    format!("does not unwrap under {} to a seed of {MIN_IMPORTED_SEED}-{max} bytes", transport.key_ref()),
                ),
                other => other.into(),
            })?;
        let (blob, kek_ref, keys) = bind_blob(&self.state.hsm, &r.subject, &kek, &mac_key, wrapped, (hash, digits, period)).await?;
        note.keys.extend(keys);
        Ok(ImportOtpSeedResponse { seed_blob: blob, kek: Some(kek_ref), transport_kek: Some(key_ref(&transport)) })
    }

    /// The blob of a verification request and its keys; its MAC (binding it to
    /// `subject`) is checked in the same token job as the HMACs, in `first_match`.
    fn open_blob(&self, caller: &Caller, note: &mut Note, blob: &[u8], subject: &str) -> Result<OpenedBlob, Error> {
        otp::validate_subject(subject)?;
        caller.may_use_key(SEED_KEK)?;
        caller.may_use_key(CODE_KEY)?;
        let b = SeedBlob::decode(blob).ok_or_else(blob_refused)?;
        let cat = self.state.hsm.catalogue();
        let mac_key = cat.for_existing(CODE_KEY, b.mac_key_version, &[KeyClass::Otp]).map_err(|_| blob_refused())?;
        let kek = cat.for_existing(SEED_KEK, b.kek_version, &[KeyClass::K0]).map_err(|_| blob_refused())?;
        drop(cat);
        note.keys.push(kek.key_ref());
        let mac_input = b.mac_input(subject);
        Ok(OpenedBlob { failure_key: failure_key(subject, blob), blob: b, kek, mac_key, mac_input })
    }

    /// The counters among `candidates` whose code is `code` (at most the first). A
    /// locked seed is refused before the token is asked; once the blob is found
    /// authentic the attempt is counted as a failure, and only then is the code
    /// compared; a match clears the seed's failures.
    async fn first_match(&self, note: &mut Note, o: OpenedBlob, code: &str, candidates: Vec<u64>) -> Result<Option<u64>, Error> {
        let max = self.state.config.otp.totp_max_failures;
        let locked = |note: &mut Note, secs: u64| {
            note.error_detail = Some(format!("otp-seed-failures={max} locked"));
            Error::ResourceExhausted(format!(
                "seed_blob: locked for {} more seconds after {max} wrong codes",
                secs.max(1)
            ))
        };
        if let Some(secs) = self.failures.locked(&o.failure_key, now()) {
            return Err(locked(note, secs));
        }
        let b = &o.blob;
        let messages: Vec<[u8; 8]> = candidates.iter().map(|c| otp::counter_bytes(*c)).collect();
        let check = (o.mac_key, o.mac_input, b.mac.clone());
        // The blob is checked even when the code cannot match, so a swapped blob is
        // always refused.
        let macs = self
            .state
            .hsm
            .seed_hmacs(&self.seeds, check, o.kek, b.wrapped.clone(), seed_hash(b.hash), messages)
            .await
            .map_err(|e| match e {
                hsm::Error::VerifyFailed => blob_refused(),
                other => other.into(),
            })?;
        let (failures, locks) = match self.failures.admit(&o.failure_key, now()) {
            SeedAdmission::Counted { failures, locks } => (failures, locks),
            SeedAdmission::Locked { secs } => return Err(locked(note, secs)),
            SeedAdmission::Full(n) => {
                return Err(Error::ResourceExhausted(format!("too many seeds with recent wrong codes ({n}); retry later")))
            }
        };
        let mut found = None;
        if code_shape_ok(code, b.digits) {
            for (c, mac) in candidates.iter().zip(macs.iter()) {
                let expected = otp::truncate(mac, u32::from(b.digits))?;
                // Every candidate is compared, so timing does not tell which matched.
                if ct_eq(expected.as_bytes(), code.as_bytes()) && found.is_none() {
                    found = Some(*c);
                }
            }
        }
        if found.is_some() {
            self.failures.succeeded(&o.failure_key);
        } else {
            note.detail = Some(if locks {
                tracing::warn!(failures, "wrong TOTP/HOTP codes: seed locked");
                format!("otp-seed-failures={failures} locked")
            } else {
                format!("otp-seed-failures={failures}")
            });
        }
        Ok(found)
    }

    async fn totp_inner(&self, caller: &Caller, note: &mut Note, r: VerifyTotpRequest) -> Result<VerifyTotpResponse, Error> {
        let window = match r.window {
            0 => 1,
            w @ 1..=3 => u64::from(w),
            _ => return Err(Error::invalid("window", "must be 1-3 steps (or 0 for 1)")),
        };
        let o = self.open_blob(caller, note, &r.seed_blob, &r.subject)?;
        let t = if r.time == 0 { now() } else { r.time };
        let step = otp::totp_step(t, o.blob.period);
        // Only steps newer than the last accepted one: no code is accepted twice.
        let candidates: Vec<u64> =
            (step.saturating_sub(window)..=step.saturating_add(window)).filter(|s| r.last_step == 0 || *s > r.last_step).collect();
        let code = Zeroizing::new(r.code);
        match self.first_match(note, o, &code, candidates).await? {
            Some(s) => Ok(VerifyTotpResponse { valid: true, step: s }),
            None => Ok(VerifyTotpResponse { valid: false, step: 0 }),
        }
    }

    async fn hotp_inner(&self, caller: &Caller, note: &mut Note, r: VerifyHotpRequest) -> Result<VerifyHotpResponse, Error> {
        let look_ahead = match r.look_ahead {
            0 => 10,
            l @ 1..=100 => u64::from(l),
            _ => return Err(Error::invalid("look_ahead", "must be 1-100 (or 0 for 10)")),
        };
        let o = self.open_blob(caller, note, &r.seed_blob, &r.subject)?;
        // The last counter is never a candidate: nothing could come after it.
        let candidates: Vec<u64> = (0..look_ahead).filter_map(|i| r.counter.checked_add(i)).filter(|c| *c < u64::MAX).collect();
        let code = Zeroizing::new(r.code);
        match self.first_match(note, o, &code, candidates).await? {
            Some(c) => Ok(VerifyHotpResponse { valid: true, next_counter: c + 1 }),
            None => Ok(VerifyHotpResponse { valid: false, next_counter: r.counter }),
        }
    }
}

#[tonic::async_trait]
impl OtpService for OtpSvc {
    async fn issue_code(&self, req: Request<IssueCodeRequest>) -> Result<Response<IssueCodeResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.issue_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn verify_code(&self, req: Request<VerifyCodeRequest>) -> Result<Response<VerifyCodeResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.verify_inner(&caller, &mut note, req.into_inner())).await;
        if let Ok(v) = &r {
            let name = CodeVerdict::try_from(v.verdict).map(|c| c.as_str_name()).unwrap_or("?");
            note.detail = Some(format!("verdict={} attempts_left={}", name.trim_start_matches("CODE_VERDICT_"), v.attempts_left));
        }
        self.state.finish(&caller, note, r).await
    }

    async fn enroll_totp(&self, req: Request<EnrollTotpRequest>) -> Result<Response<EnrollTotpResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.enroll_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn enroll_hotp(&self, req: Request<EnrollHotpRequest>) -> Result<Response<EnrollHotpResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.enroll_hotp_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn import_otp_seed(&self, req: Request<ImportOtpSeedRequest>) -> Result<Response<ImportOtpSeedResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.import_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn verify_totp(&self, req: Request<VerifyTotpRequest>) -> Result<Response<VerifyTotpResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.totp_inner(&caller, &mut note, req.into_inner())).await;
        if let Ok(v) = &r {
            note.detail = Some(verify_detail(v.valid, note.detail.take()));
        }
        self.state.finish(&caller, note, r).await
    }

    async fn verify_hotp(&self, req: Request<VerifyHotpRequest>) -> Result<Response<VerifyHotpResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.hotp_inner(&caller, &mut note, req.into_inner())).await;
        if let Ok(v) = &r {
            note.detail = Some(verify_detail(v.valid, note.detail.take()));
        }
        self.state.finish(&caller, note, r).await
    }
}
