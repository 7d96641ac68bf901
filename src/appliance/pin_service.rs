//! PinService: PIN block translation between zones (with the account change from
//! phone number to bank account as a separate permission), DUKPT terminal sources,
//! the lock against PIN-block oracles (decode failures counted per client),
//! transaction-password verification data and checks, and terminal key export.
//! Requests are decoded into typed values here; the clear PIN exists only inside
//! the token job in `hsm::pin`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use super::{key_ref, AppState, Caller, Error, Note};
use crate::crypto::dukpt::{AesKsn, TdesKsn};
use crate::config::PinConfig;
use crate::crypto::pin::{Account, PinError, PinFormat};
use crate::hsm::{self, Algorithm, DukptCache, KeyClass, KeyEntry, PinInput, PinSourceKey, PvMethod, VARIANT_SUFFIX};
use crate::proto::pin_service_server::PinService;
use crate::proto::{
    account, pin_source, Account as AccountMsg, ChangePinRequest, ChangePinResponse, EncryptedPin,
    ExportTerminalKeyRequest, ExportTerminalKeyResponse, GeneratePinVerificationDataRequest,
    GeneratePinVerificationDataResponse, KeyRef, PinBlockFormat, PinVerificationMethod, TranslatePinRequest,
    TranslatePinResponse, VerifyPinRequest, VerifyPinResponse,
};

/// Role permission needed to give a translated block another account field.
pub const CHANGE_ACCOUNT: &str = "pin.change-account";
/// Prefix of every verification-data string.
pub const PVD_PREFIX: &str = "kwpvd1";
/// Terminals whose AES DUKPT derivation path is cached.
pub const DUKPT_CACHE_TERMINALS: usize = 4096;

/// The one answer for every PIN block that does not decode.
fn bad_block() -> Error {
    Error::invalid("pin.block", hsm::Error::BadPinBlock.to_string())
}

/// Clients whose decode failures are remembered before idle ones are dropped.
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// TranslatePin decode failures per client identity: a block that fails to decode
/// after an account-dependent step may answer a PIN-block oracle's question, so
/// `max_decode_failures` of them within `failure_window` lock the client out of
/// TranslatePin for `lockout`.
pub struct DecodeGuard {
    config: PinConfig,
    clients: Mutex<HashMap<String, Failures>>,
}

#[derive(Default)]
struct Failures {
    at: VecDeque<Instant>,
    locked_until: Option<Instant>,
}

/// What one recorded failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Failures within the window, this one included.
    pub failures: u32,
    /// Whether this failure locked the client.
    pub locked: bool,
}

impl DecodeGuard {
    pub fn new(config: PinConfig) -> DecodeGuard {
        DecodeGuard { config, clients: Mutex::new(HashMap::new()) }
    }

    fn lock_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failures>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The time left of `client`'s lock-out, if it is locked at `now`.
    pub fn locked_at(&self, client: &str, now: Instant) -> Option<Duration> {
        let mut m = self.lock_map();
        let f = m.get_mut(client)?;
        match f.locked_until {
            Some(until) if until > now => Some(until - now),
            Some(_) => {
                // The cool-down is over: the client starts afresh.
                m.remove(client);
                None
            }
            None => None,
        }
    }

    /// Counts one decode failure of `client` at `now`.
    pub fn record_at(&self, client: &str, now: Instant) -> Recorded {
        let mut m = self.lock_map();
        if m.len() >= MAX_TRACKED_CLIENTS && !m.contains_key(client) {
            let window = self.config.failure_window;
            m.retain(|_, f| {
                f.locked_until.is_some_and(|u| u > now) || f.at.back().is_some_and(|t| now.saturating_duration_since(*t) < window)
            });
        }
        let f = m.entry(client.to_string()).or_default();
        while f.at.front().is_some_and(|t| now.saturating_duration_since(*t) >= self.config.failure_window) {
            f.at.pop_front();
        }
        f.at.push_back(now);
        let failures = u32::try_from(f.at.len()).unwrap_or(u32::MAX);
        let locked = f.locked_until.is_none() && failures >= self.config.max_decode_failures;
        if locked {
            f.locked_until = Some(now + self.config.lockout);
        }
        Recorded { failures, locked }
    }

    /// The audit detail of a client's failure count.
    fn detail(&self, failures: u32, locked: bool) -> String {
        if locked {
            format!("pin-format-failures={failures} locked")
        } else {
            format!("pin-format-failures={failures}")
        }
    }
}


fn format_of(field: &'static str, v: i32) -> Result<PinFormat, Error> {
    match PinBlockFormat::try_from(v) {
        Ok(PinBlockFormat::Iso0) => Ok(PinFormat::Iso0),
        Ok(PinBlockFormat::Iso1) => Ok(PinFormat::Iso1),
        Ok(PinBlockFormat::Iso3) => Ok(PinFormat::Iso3),
        Ok(PinBlockFormat::Iso4) => Ok(PinFormat::Iso4),
        Ok(PinBlockFormat::Unspecified) => Err(Error::invalid(field, "required (ISO_0, ISO_1, ISO_3 or ISO_4)")),
        Err(_) => Err(Error::invalid(field, format!("unknown format {v}"))),
    }
}

fn wire_format(f: PinFormat) -> PinBlockFormat {
    match f {
        PinFormat::Iso0 => PinBlockFormat::Iso0,
        PinFormat::Iso1 => PinBlockFormat::Iso1,
        PinFormat::Iso3 => PinBlockFormat::Iso3,
        PinFormat::Iso4 => PinBlockFormat::Iso4,
    }
}

fn account_of(field: &'static str, a: &Option<AccountMsg>) -> Result<Option<Account>, Error> {
    let parsed = match a.as_ref().and_then(|a| a.kind.as_ref()) {
        None => return Ok(None),
        Some(account::Kind::Pan(p)) => Account::from_pan(p),
        Some(account::Kind::Phone(p)) => Account::from_phone(p),
    };
    parsed.map(Some).map_err(|e| match e {
        PinError::Invalid(m) => Error::invalid(field, m),
        PinError::BadBlock => Error::invalid(field, "not a valid account"),
    })
}

fn key_name(field: &'static str, name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    hsm::validate_name(name).map_err(|m| Error::invalid(field, m))
}

/// The verification data string: "kwpvd1:<method>:<key>:<version>:<value>".
struct Pvd {
    method: PvMethod,
    key: String,
    version: u32,
    value: String,
}

impl Pvd {
    fn method_name(m: PvMethod) -> &'static str {
        match m {
            PvMethod::KeywardHmac => "hmac",
            PvMethod::Ibm3624 => "ibm3624",
            PvMethod::VisaPvv { .. } => "pvv",
        }
    }

    fn class_of(m: PvMethod) -> KeyClass {
        match m {
            PvMethod::KeywardHmac => KeyClass::V0,
            PvMethod::Ibm3624 => KeyClass::V1,
            PvMethod::VisaPvv { .. } => KeyClass::V2,
        }
    }

    fn encode(&self) -> String {
        format!("{PVD_PREFIX}:{}:{}:{}:{}", Self::method_name(self.method), self.key, self.version, self.value)
    }

    /// Parses stored verification data; the message never echoes the value.
    fn parse(s: &str) -> Result<Pvd, Error> {
        const FIELD: &str = "verification_data";
        let bad = |what: &str| Error::invalid(FIELD, format!("not keyward verification data ({what})"));
        let parts: Vec<&str> = s.split(':').collect();
        let [prefix, method, key, version, value] = parts.as_slice() else {
            return Err(bad("expected 5 fields"));
        };
        if *prefix != PVD_PREFIX {
            return Err(bad("unknown prefix"));
        }
        hsm::validate_name(key).map_err(|_| bad("key name"))?;
        let version: u32 = version.parse().ok().filter(|v| *v > 0).ok_or_else(|| bad("key version"))?;
        let digits = |v: &str| v.bytes().all(|b| b.is_ascii_digit());
        let method = match *method {
            // Written upper-case, as generated; any other spelling could never match.
            "hmac" if value.len() == 32 && value.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)) => {
                PvMethod::KeywardHmac
            }
            "ibm3624" if (4..=12).contains(&value.len()) && digits(value) => PvMethod::Ibm3624,
            "pvv" if value.len() == 5 && digits(value) && value.as_bytes()[0] <= b'6' => {
                PvMethod::VisaPvv { pvki: value.as_bytes()[0] - b'0' }
            }
            "hmac" | "ibm3624" | "pvv" => return Err(bad("value")),
            _ => return Err(bad("unknown method")),
        };
        Ok(Pvd { method, key: key.to_string(), version, value: value.to_string() })
    }
}

pub struct PinSvc {
    pub state: Arc<AppState>,
    pub cache: Arc<DukptCache>,
    pub guard: Arc<DecodeGuard>,
}

/// How a translation ran: whether its decode depended on the stated account.
#[derive(Default)]
struct Path {
    account_dependent: bool,
}

impl PinSvc {
    pub fn new(state: Arc<AppState>) -> PinSvc {
        let guard = Arc::new(DecodeGuard::new(state.config.pin.clone()));
        PinSvc { state, cache: Arc::new(DukptCache::new(DUKPT_CACHE_TERMINALS)), guard }
    }

    /// Decodes an encrypted PIN into a typed input: format, account, source key
    /// (class-checked and allowed for the caller), block length.
    fn pin_input(&self, caller: &Caller, note: &mut Note, field: &'static str, p: Option<EncryptedPin>) -> Result<PinInput, Error> {
        let p = p.ok_or_else(|| Error::invalid(field, "required"))?;
        let format = format_of("pin.format", p.format)?;
        let account = account_of("pin.account", &p.account)?;
        if format.pan_bound() && account.is_none() {
            return Err(Error::invalid("pin.account", "required for formats 0, 3 and 4"));
        }
        let cat = self.state.hsm.catalogue();
        let source = match p.source.and_then(|s| s.kind) {
            None => return Err(Error::invalid("pin.source", "required: a zone key or a DUKPT BDK and KSN")),
            Some(pin_source::Kind::Zone(z)) => {
                key_name("pin.source.zone.key_name", &z.key_name)?;
                caller.may_use_key(&z.key_name)?;
                let k = cat.for_existing(&z.key_name, z.version, &[KeyClass::P0])?;
                if !hsm::pin_format_matches(format, k.meta.algorithm) {
                    return Err(Error::invalid(
                        "pin.format",
                        format!("format {} does not go with {} ({})", format.number(), k.key_ref(), k.meta.algorithm),
                    ));
                }
                PinSourceKey::Zone(k)
            }
            Some(pin_source::Kind::Dukpt(d)) => {
                key_name("pin.source.dukpt.bdk_name", &d.bdk_name)?;
                if d.bdk_name.ends_with(VARIANT_SUFFIX) {
                    return Err(Error::invalid("pin.source.dukpt.bdk_name", "name the BDK, not its variant companion"));
                }
                caller.may_use_key(&d.bdk_name)?;
                let bdk = cat.for_existing(&d.bdk_name, d.bdk_version, &[KeyClass::B0])?;
                match bdk.meta.algorithm {
                    Algorithm::Aes128 | Algorithm::Aes256 => {
                        if format != PinFormat::Iso4 {
                            return Err(Error::invalid("pin.format", "AES DUKPT terminals send format 4 blocks"));
                        }
                        let ksn = AesKsn::parse(&d.ksn).map_err(|e| Error::invalid("pin.source.dukpt.ksn", e.to_string()))?;
                        PinSourceKey::AesDukpt { bdk, ksn }
                    }
                    Algorithm::Tdes2 => {
                        if format == PinFormat::Iso4 {
                            return Err(Error::invalid("pin.format", "TDES DUKPT terminals send 8-byte blocks (format 0, 1 or 3)"));
                        }
                        let ksn = TdesKsn::parse(&d.ksn).map_err(|e| Error::invalid("pin.source.dukpt.ksn", e.to_string()))?;
                        let variant = cat.for_existing(
                            &format!("{}{VARIANT_SUFFIX}", d.bdk_name),
                            bdk.meta.version,
                            &[KeyClass::B0],
                        )?;
                        PinSourceKey::TdesDukpt { bdk, variant, ksn }
                    }
                    other => {
                        return Err(Error::FailedPrecondition(format!("key {}: {other} is not a DUKPT BDK", bdk.key_ref())));
                    }
                }
            }
        };
        note.keys.push(source.key().key_ref());
        if p.block.len() != format.block_len() {
            return Err(bad_block());
        }
        Ok(PinInput { block: p.block, format, account, source })
    }

    fn source_ref(input: &PinInput) -> KeyRef {
        key_ref(input.source.key())
    }

    async fn translate_inner(
        &self,
        caller: &Caller,
        note: &mut Note,
        path: &mut Path,
        r: TranslatePinRequest,
    ) -> Result<TranslatePinResponse, Error> {
        let input = self.pin_input(caller, note, "pin", r.pin)?;
        let dest_format = format_of("destination_format", r.destination_format)?;
        if input.format.pan_bound() && !dest_format.pan_bound() {
            return Err(Error::invalid(
                "destination_format",
                "a PAN-bound block (format 0, 3 or 4) cannot be translated to format 1 (PCI PIN)",
            ));
        }
        let may_change = caller.role.has_permission(CHANGE_ACCOUNT);
        // A format 1 block carries no account and a format 3 block's random fill does not
        // pin the stated account: in another format the PIN would be bound to an account
        // the caller chooses. The same format is re-enciphered as it is (below).
        if matches!(input.format, PinFormat::Iso1 | PinFormat::Iso3) && dest_format != input.format && !may_change {
            return Err(Error::PermissionDenied(format!(
                "role {} may not translate a format {} block to another format (permission {CHANGE_ACCOUNT}): {}",
                caller.role.name,
                input.format.number(),
                if input.format == PinFormat::Iso1 {
                    "it carries no account, so the destination's would be the caller's choice"
                } else {
                    "its random fill does not pin the stated account, so the destination's would be the caller's choice"
                }
            )));
        }
        key_name("destination_key", &r.destination_key)?;
        caller.may_use_key(&r.destination_key)?;
        let dest = self.state.hsm.catalogue().for_new(&r.destination_key, &[KeyClass::P0])?;
        note.keys.push(dest.key_ref());
        if !hsm::pin_format_matches(dest_format, dest.meta.algorithm) {
            return Err(Error::invalid(
                "destination_format",
                format!("format {} does not go with {} ({})", dest_format.number(), dest.key_ref(), dest.meta.algorithm),
            ));
        }
        let requested = account_of("destination_account", &r.destination_account)?;
        let (dest_account, changed) = if dest_format.pan_bound() {
            match (requested, &input.account) {
                (Some(d), Some(s)) => {
                    let changed = input.format.pan_bound() && d.digits() != s.digits();
                    (Some(d), changed)
                }
                (Some(d), None) => (Some(d), false),
                // A format 1 block carries no account: its `account` (used by PIN
                // verification) is never taken as the destination's.
                (None, Some(s)) if input.format.pan_bound() => (Some(s.clone()), false),
                (None, _) => {
                    return Err(Error::invalid(
                        "destination_account",
                        "required: a format 1 source block carries no account",
                    ));
                }
            }
        } else {
            (None, false)
        };
        if changed && !may_change {
            return Err(Error::PermissionDenied(format!(
                "role {} may not change the account field (permission {CHANGE_ACCOUNT})",
                caller.role.name
            )));
        }
        let source_key = Self::source_ref(&input);
        let dest_key = key_ref(&dest);
        // Same format, same account, not format 4: the clear block is re-enciphered as it
        // was, so the stated account can neither change nor probe anything.
        let block = if dest_format == input.format && input.format != PinFormat::Iso4 && !changed {
            self.state.hsm.recipher_pin(&self.cache, input, dest).await.map_err(pin_error)?
        } else {
            path.account_dependent = true;
            self.state
                .hsm
                .translate_pin(&self.cache, input, dest, dest_format, dest_account)
                .await
                .map_err(pin_error)?
        };
        Ok(TranslatePinResponse {
            block,
            format: wire_format(dest_format) as i32,
            source_key: Some(source_key),
            destination_key: Some(dest_key),
            account_changed: changed,
        })
    }

    /// TranslatePin behind the lock: a locked client is refused; a block that fails to
    /// decode after an account-dependent step is counted, and the failure that reaches
    /// the limit locks the client and raises the alarm.
    async fn translate_guarded(&self, caller: &Caller, note: &mut Note, r: TranslatePinRequest) -> Result<TranslatePinResponse, Error> {
        let limit = self.state.config.pin.max_decode_failures;
        if let Some(left) = self.guard.locked_at(&caller.identity, Instant::now()) {
            note.error_detail = Some(self.guard.detail(limit, true));
            return Err(Error::ResourceExhausted(format!(
                "TranslatePin refused to this client for {} more seconds: {limit} PIN blocks did not decode within {} seconds",
                left.as_secs().max(1),
                self.state.config.pin.failure_window.as_secs()
            )));
        }
        let mut path = Path::default();
        let r = self.translate_inner(caller, note, &mut path, r).await;
        if path.account_dependent {
            if let Err(Error::InvalidArgument { field: "pin.block", .. }) = &r {
                let rec = self.guard.record_at(&caller.identity, Instant::now());
                note.error_detail = Some(self.guard.detail(rec.failures, rec.locked));
                if rec.locked {
                    tracing::error!(
                        client = %caller.identity,
                        role = %caller.role.name,
                        failures = rec.failures,
                        lockout_secs = self.state.config.pin.lockout.as_secs(),
                        "PIN blocks failing to decode after account-dependent steps (a PIN-block oracle probe?): TranslatePin locked for this client"
                    );
                }
            }
        }
        r
    }

    fn method_of(m: i32, pvki: u32) -> Result<PvMethod, Error> {
        let method = match PinVerificationMethod::try_from(m) {
            Ok(PinVerificationMethod::Unspecified | PinVerificationMethod::KeywardHmac) => PvMethod::KeywardHmac,
            Ok(PinVerificationMethod::Ibm3624) => PvMethod::Ibm3624,
            Ok(PinVerificationMethod::VisaPvv) => {
                if pvki > 6 {
                    return Err(Error::invalid("pvki", "must be 0-6"));
                }
                return Ok(PvMethod::VisaPvv { pvki: pvki as u8 });
            }
            Err(_) => return Err(Error::invalid("method", format!("unknown method {m}"))),
        };
        if pvki != 0 {
            return Err(Error::invalid("pvki", "only for the Visa PVV method"));
        }
        Ok(method)
    }

    fn verification_account(input: &PinInput) -> Result<Account, Error> {
        input.account.clone().ok_or_else(|| Error::invalid("pin.account", "required for PIN verification"))
    }

    async fn generate_inner(
        &self,
        caller: &Caller,
        note: &mut Note,
        r: GeneratePinVerificationDataRequest,
    ) -> Result<GeneratePinVerificationDataResponse, Error> {
        let method = Self::method_of(r.method, r.pvki)?;
        let input = self.pin_input(caller, note, "pin", r.pin)?;
        let account = Self::verification_account(&input)?;
        key_name("pvk_name", &r.pvk_name)?;
        caller.may_use_key(&r.pvk_name)?;
        let pvk = self.state.hsm.catalogue().for_new(&r.pvk_name, &[Pvd::class_of(method)])?;
        note.keys.push(pvk.key_ref());
        let key = key_ref(&pvk);
        let value = self
            .state
            .hsm
            .pin_verification_value(&self.cache, input, account, method, pvk)
            .await
            .map_err(pin_error)?;
        let pvd = Pvd { method, key: key.name.clone(), version: key.version, value };
        Ok(GeneratePinVerificationDataResponse { verification_data: pvd.encode(), key: Some(key) })
    }

    /// Checks a PIN against stored verification data: (match, key used).
    /// The verification key named by stored verification data, allowed for the caller.
    fn stored_pvk(&self, caller: &Caller, note: &mut Note, pvd: &Pvd) -> Result<Arc<KeyEntry>, Error> {
        caller.may_use_key(&pvd.key)?;
        let pvk = self.state.hsm.catalogue().for_existing(&pvd.key, pvd.version, &[Pvd::class_of(pvd.method)])?;
        note.keys.push(pvk.key_ref());
        Ok(pvk)
    }

    async fn check(&self, input: PinInput, pvd: &Pvd, pvk: Arc<KeyEntry>) -> Result<(bool, KeyRef), Error> {
        let account = Self::verification_account(&input)?;
        let key = key_ref(&pvk);
        let matched = self
            .state
            .hsm
            .verify_pin(&self.cache, input, account, pvd.method, pvk, pvd.value.clone())
            .await
            .map_err(pin_error)?;
        Ok((matched, key))
    }

    /// A malformed block presented for verification is a mismatch, not an error.
    fn input_or_mismatch(r: Result<PinInput, Error>) -> Result<Option<PinInput>, Error> {
        match r {
            Ok(i) => Ok(Some(i)),
            Err(Error::InvalidArgument { field: "pin.block", .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn verify_inner(&self, caller: &Caller, note: &mut Note, r: VerifyPinRequest) -> Result<VerifyPinResponse, Error> {
        let pvd = Pvd::parse(&r.verification_data)?;
        let pvk = self.stored_pvk(caller, note, &pvd)?;
        let Some(input) = Self::input_or_mismatch(self.pin_input(caller, note, "pin", r.pin))? else {
            return Ok(VerifyPinResponse { matched: false, key: Some(key_ref(&pvk)) });
        };
        let (matched, key) = self.check(input, &pvd, pvk).await?;
        Ok(VerifyPinResponse { matched, key: Some(key) })
    }

    async fn change_inner(&self, caller: &Caller, note: &mut Note, r: ChangePinRequest) -> Result<ChangePinResponse, Error> {
        let pvd = Pvd::parse(&r.verification_data)?;
        let new = self.pin_input(caller, note, "new_pin", r.new_pin)?;
        let old = Self::input_or_mismatch(self.pin_input(caller, note, "old_pin", r.old_pin))?;
        let new_account = Self::verification_account(&new)?;
        let Some(old) = old else {
            return Ok(ChangePinResponse { matched: false, verification_data: String::new(), key: None });
        };
        if Self::verification_account(&old)?.digits() != new_account.digits() {
            return Err(Error::invalid("new_pin.account", "must be the account of the old PIN"));
        }
        let old_pvk = self.stored_pvk(caller, note, &pvd)?;
        let (matched, _) = self.check(old, &pvd, old_pvk).await?;
        if !matched {
            return Ok(ChangePinResponse { matched: false, verification_data: String::new(), key: None });
        }
        let pvk = self.state.hsm.catalogue().for_new(&pvd.key, &[Pvd::class_of(pvd.method)])?;
        note.keys.push(pvk.key_ref());
        let key = key_ref(&pvk);
        let value = self
            .state
            .hsm
            .pin_verification_value(&self.cache, new, new_account, pvd.method, pvk)
            .await
            .map_err(pin_error)?;
        let out = Pvd { method: pvd.method, key: key.name.clone(), version: key.version, value };
        Ok(ChangePinResponse { matched: true, verification_data: out.encode(), key: Some(key) })
    }

    async fn export_inner(
        &self,
        caller: &Caller,
        note: &mut Note,
        r: ExportTerminalKeyRequest,
    ) -> Result<ExportTerminalKeyResponse, Error> {
        key_name("bdk_name", &r.bdk_name)?;
        if r.bdk_name.ends_with(VARIANT_SUFFIX) {
            return Err(Error::invalid("bdk_name", "name the BDK, not its variant companion"));
        }
        key_name("kek_name", &r.kek_name)?;
        caller.may_use_key(&r.bdk_name)?;
        caller.may_use_key(&r.kek_name)?;
        let cat = self.state.hsm.catalogue();
        let bdk = cat.for_new(&r.bdk_name, &[KeyClass::B0])?;
        let kek = cat.for_new(&r.kek_name, &[KeyClass::K0])?;
        note.keys.push(bdk.key_ref());
        note.keys.push(kek.key_ref());
        let (id, variant) = match bdk.meta.algorithm {
            Algorithm::Aes128 | Algorithm::Aes256 => {
                let ksn = AesKsn::parse_initial(&r.initial_ksn).map_err(|e| Error::invalid("initial_ksn", e.to_string()))?;
                if ksn.counter() != 0 {
                    return Err(Error::invalid("initial_ksn", "the counter of an initial KSN must be zero"));
                }
                (ksn.initial_key_id(), None)
            }
            Algorithm::Tdes2 => {
                let ksn = TdesKsn::parse_initial(&r.initial_ksn).map_err(|e| Error::invalid("initial_ksn", e.to_string()))?;
                if ksn.counter() != 0 {
                    return Err(Error::invalid("initial_ksn", "the counter of an initial KSN must be zero"));
                }
                let v = cat.for_existing(&format!("{}{VARIANT_SUFFIX}", r.bdk_name), bdk.meta.version, &[KeyClass::B0])?;
                (ksn.ipek_data(), Some(v))
            }
            other => return Err(Error::FailedPrecondition(format!("key {}: {other} is not a DUKPT BDK", bdk.key_ref()))),
        };
        drop(cat);
        let (bdk_ref, kek_ref) = (key_ref(&bdk), key_ref(&kek));
        let (wrapped_key, kcv) = self.state.hsm.export_terminal_key(bdk, variant, id, kek).await?;
        Ok(ExportTerminalKeyResponse { wrapped_key, kcv, bdk: Some(bdk_ref), kek: Some(kek_ref) })
    }
}

/// Token errors of PIN operations: a block that does not decode gets the uniform answer.
fn pin_error(e: hsm::Error) -> Error {
    match e {
        hsm::Error::BadPinBlock => bad_block(),
        other => other.into(),
    }
}

#[tonic::async_trait]
impl PinService for PinSvc {
    async fn translate_pin(&self, req: Request<TranslatePinRequest>) -> Result<Response<TranslatePinResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.translate_guarded(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn generate_pin_verification_data(
        &self,
        req: Request<GeneratePinVerificationDataRequest>,
    ) -> Result<Response<GeneratePinVerificationDataResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.generate_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }

    async fn verify_pin(&self, req: Request<VerifyPinRequest>) -> Result<Response<VerifyPinResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.verify_inner(&caller, &mut note, req.into_inner())).await;
        if let Ok(v) = &r {
            note.detail = Some(format!("matched={}", v.matched));
        }
        self.state.finish(&caller, note, r).await
    }

    async fn change_pin(&self, req: Request<ChangePinRequest>) -> Result<Response<ChangePinResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.change_inner(&caller, &mut note, req.into_inner())).await;
        if let Ok(v) = &r {
            note.detail = Some(format!("matched={}", v.matched));
        }
        self.state.finish(&caller, note, r).await
    }

    async fn export_terminal_key(
        &self,
        req: Request<ExportTerminalKeyRequest>,
    ) -> Result<Response<ExportTerminalKeyResponse>, Status> {
        let caller = Caller::of(&req)?;
        let mut note = Note::default();
        let r = self.state.within_deadline(&caller, self.export_inner(&caller, &mut note, req.into_inner())).await;
        self.state.finish(&caller, note, r).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max: u32) -> DecodeGuard {
        DecodeGuard::new(PinConfig {
            max_decode_failures: max,
            failure_window: Duration::from_secs(900),
            lockout: Duration::from_secs(600),
        })
    }

    #[test]
    fn decode_failures_lock_a_client_within_the_window() {
        let g = guard(3);
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(g.record_at("a", t0), Recorded { failures: 1, locked: false });
        assert_eq!(g.record_at("a", t0 + s(10)), Recorded { failures: 2, locked: false });
        // Another client is counted apart.
        assert_eq!(g.record_at("b", t0 + s(10)), Recorded { failures: 1, locked: false });
        assert_eq!(g.locked_at("a", t0 + s(20)), None);
        assert_eq!(g.record_at("a", t0 + s(20)), Recorded { failures: 3, locked: true });
        assert_eq!(g.locked_at("a", t0 + s(20)), Some(s(600)));
        assert_eq!(g.locked_at("a", t0 + s(619)), Some(s(1)));
        assert_eq!(g.locked_at("b", t0 + s(20)), None);
        // After the cool-down the client starts afresh.
        assert_eq!(g.locked_at("a", t0 + s(620)), None);
        assert_eq!(g.record_at("a", t0 + s(621)), Recorded { failures: 1, locked: false });
        // Failures older than the window no longer count.
        let g = guard(3);
        g.record_at("c", t0);
        g.record_at("c", t0 + s(100));
        assert_eq!(g.record_at("c", t0 + s(900)), Recorded { failures: 2, locked: false });
        assert_eq!(g.record_at("c", t0 + s(901)), Recorded { failures: 3, locked: true });
        assert_eq!(g.detail(3, true), "pin-format-failures=3 locked");
        assert_eq!(g.detail(1, false), "pin-format-failures=1");
    }

    #[test]
    fn account_debug_is_redacted() {
        let a = AccountMsg { kind: Some(account::Kind::Phone("+8613812345678".into())) };
        let d = format!("{a:?} {:?}", EncryptedPin { account: Some(a.clone()), ..Default::default() });
        assert!(!d.contains("1381234"), "{d}");
        assert!(d.contains("phone, 14 characters") && d.contains("EncryptedPin { .. }"), "{d}");
    }

    #[test]
    fn verification_data_round_trip_and_refusals() {
        let p = Pvd { method: PvMethod::VisaPvv { pvki: 1 }, key: "pvk.visa".into(), version: 2, value: "15678".into() };
        let s = p.encode();
        assert_eq!(s, "kwpvd1:pvv:pvk.visa:2:15678");
        let back = Pvd::parse(&s).map_err(|e| e.to_string());
        assert!(matches!(back, Ok(Pvd { method: PvMethod::VisaPvv { pvki: 1 }, version: 2, .. })));
        for bad in [
            "",
            "kwpvd1:pvv:pvk.visa:2",
            "kwpvd2:pvv:pvk.visa:2:15678",
            "kwpvd1:pvv:pvk.visa:0:15678",
            "kwpvd1:pvv:pvk.visa:2:75678",
            "kwpvd1:hmac:pvk.hub:1:00",
            "kwpvd1:ibm3624:pvk.ibm:1:12a4",
            "kwpvd1:md5:pvk:1:00",
            "kwpvd1:hmac:PVK:1:00112233445566778899AABBCCDDEEFF",
            "kwpvd1:hmac:pvk.hub:1:00112233445566778899aabbccddeeff",
        ] {
            let e = Pvd::parse(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.starts_with("verification_data: "), "{bad:?} -> {e:?}");
            assert!(!e.contains("15678"), "{e}");
        }
    }
}
