//! Appliance configuration: TOML -> a validated [`Config`]. Every problem is
//! reported at once, each with its path; secrets are held as `SecretString`.
//!
//! String values may use `${VAR}` and `${VAR:-default}` to take a value from the
//! environment; relative paths are resolved against the config file's directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

/// Every problem found in a config file, one per line, each with its path.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration error(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hsm: RawHsm,
    server: RawServer,
    #[serde(default)]
    limits: RawLimits,
    audit: RawAudit,
    #[serde(default)]
    otp: RawOtp,
    #[serde(default)]
    ecash: RawEcash,
    #[serde(default)]
    binding: RawBinding,
    #[serde(default)]
    pin: RawPin,
    #[serde(default)]
    clients: BTreeMap<String, String>,
    #[serde(default)]
    roles: BTreeMap<String, RawRole>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHsm {
    module: String,
    token_label: String,
    user_pin: PinSource,
    #[serde(default = "default_sessions")]
    sessions: usize,
    #[serde(default)]
    recycle_after_objects: Option<u64>,
}

fn default_sessions() -> usize {
    8
}

/// Where the token's user PIN comes from. Never inline unless marked development.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PinSource {
    /// Name of an environment variable holding the PIN.
    pub env: Option<String>,
    /// Path of a file holding the PIN (first line; should be mode 0600).
    pub file: Option<String>,
    /// The PIN itself: development only, refused unless the key is spelled `dev_inline`.
    pub dev_inline: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: String,
    tls_cert: String,
    tls_key: String,
    client_ca: Option<String>,
    /// PEM CRL(s) of the client CA: revoked client certificates are refused at the
    /// handshake and, after a reload, on connections already open.
    #[serde(default)]
    client_crl: Option<String>,
    /// Refuse TLS 1.2: only TLS 1.3 handshakes.
    #[serde(default)]
    tls13_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_max_message")]
    max_message_bytes: usize,
    #[serde(default = "default_deadline")]
    deadline_ms: u64,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    #[serde(default = "default_handshake_timeout")]
    handshake_timeout_ms: u64,
    #[serde(default = "default_max_pending")]
    max_pending_handshakes: usize,
    #[serde(default = "default_max_pending_per_source")]
    max_pending_handshakes_per_source: usize,
}

fn default_max_message() -> usize {
    1 << 20
}
fn default_deadline() -> u64 {
    5_000
}
fn default_concurrency() -> usize {
    512
}
fn default_handshake_timeout() -> u64 {
    5_000
}
fn default_max_pending() -> usize {
    256
}
fn default_max_pending_per_source() -> usize {
    32
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_message_bytes: default_max_message(),
            deadline_ms: default_deadline(),
            concurrency: default_concurrency(),
            handshake_timeout_ms: default_handshake_timeout(),
            max_pending_handshakes: default_max_pending(),
            max_pending_handshakes_per_source: default_max_pending_per_source(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOtp {
    #[serde(default = "default_otp_attempts")]
    max_attempts: u8,
    #[serde(default = "default_otp_challenges")]
    max_open_challenges: usize,
    /// Default: a quarter of `max_open_challenges` (at least 1).
    #[serde(default)]
    challenge_quota_per_client: Option<usize>,
    #[serde(default = "default_totp_failures")]
    totp_max_failures: u32,
    #[serde(default = "default_totp_lockout")]
    totp_lockout_secs: u64,
}

fn default_otp_attempts() -> u8 {
    5
}
fn default_otp_challenges() -> usize {
    100_000
}
fn default_totp_failures() -> u32 {
    5
}
fn default_totp_lockout() -> u64 {
    900
}

impl Default for RawOtp {
    fn default() -> Self {
        RawOtp {
            max_attempts: default_otp_attempts(),
            max_open_challenges: default_otp_challenges(),
            challenge_quota_per_client: None,
            totp_max_failures: default_totp_failures(),
            totp_lockout_secs: default_totp_lockout(),
        }
    }
}

/// Dynamic-code settings.
#[derive(Debug, Clone)]
pub struct OtpConfig {
    /// Attempts per challenge (1-10; default 5).
    pub max_attempts: u8,
    /// Challenges whose attempt state is kept; beyond, IssueCode is refused.
    pub max_open_challenges: usize,
    /// Open challenges one client identity may hold (1 to `max_open_challenges`;
    /// default a quarter of it); beyond, that client's IssueCode is refused.
    pub challenge_quota_per_client: usize,
    /// Consecutive wrong TOTP/HOTP codes that lock a seed (1-100; default 5).
    pub totp_max_failures: u32,
    /// How long a locked seed is refused, and how long failures are remembered after
    /// the last one (1 s - 1 day; default 15 min).
    pub totp_lockout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawEcash {
    max_batch: usize,
    certificate_days: u64,
    max_certificate_days: u64,
    voucher_days: u64,
    max_voucher_days: u64,
}

impl Default for RawEcash {
    fn default() -> Self {
        RawEcash { max_batch: 1000, certificate_days: 365, max_certificate_days: 1095, voucher_days: 30, max_voucher_days: 365 }
    }
}

/// E-cash settings.
#[derive(Debug, Clone)]
pub struct EcashConfig {
    /// Most payments one VerifyPayments call may carry (1-10000; default 1000).
    pub max_batch: usize,
    /// Device certificate validity when the request gives none, and its ceiling.
    pub certificate_validity: Duration,
    pub max_certificate_validity: Duration,
    /// Voucher validity when the request gives none, and its ceiling.
    pub voucher_validity: Duration,
    pub max_voucher_validity: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBinding {
    max_batch: usize,
}

impl Default for RawBinding {
    fn default() -> Self {
        RawBinding { max_batch: 1000 }
    }
}

/// Binding settings.
#[derive(Debug, Clone)]
pub struct BindingConfig {
    /// Most records one RewrapBindings call may carry (1-10000; default 1000).
    pub max_batch: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPin {
    max_decode_failures: u32,
    failure_window_secs: u64,
    lockout_secs: u64,
}

impl Default for RawPin {
    fn default() -> Self {
        RawPin { max_decode_failures: 3, failure_window_secs: 900, lockout_secs: 900 }
    }
}

/// PIN translation settings: the lock against PIN-block oracles.
#[derive(Debug, Clone)]
pub struct PinConfig {
    /// TranslatePin blocks that fail to decode after an account-dependent step, per
    /// client within `failure_window`, that lock the client (1-1000; default 3).
    pub max_decode_failures: u32,
    /// Window the failures are counted in (1 s - 1 day; default 15 min).
    pub failure_window: Duration,
    /// How long a locked client's TranslatePin calls are refused (1 s - 1 day; default 15 min).
    pub lockout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    dir: String,
    #[serde(default = "default_checkpoint")]
    checkpoint_every: u64,
    #[serde(default = "default_checkpoint_seconds")]
    checkpoint_seconds: u64,
}

fn default_checkpoint_seconds() -> u64 {
    10
}

fn default_checkpoint() -> u64 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    /// RPCs: "keyward.v1.DataService/Encrypt", "keyward.v1.DataService/*" or "*".
    rpcs: Vec<String>,
    /// Key names: exact, or a prefix ending in '*'.
    #[serde(default)]
    keys: Vec<String>,
    /// Named permissions beyond RPCs and keys (see [`PERMISSIONS`]).
    #[serde(default)]
    permissions: Vec<String>,
    /// Per-client call rates by RPC path (exact "package.Service/Method").
    #[serde(default)]
    rate_limits: BTreeMap<String, RawRate>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_minute: u32,
    #[serde(default)]
    burst: Option<u32>,
}

/// A per-client call rate: a token bucket refilled at `per_minute`, holding `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_minute: u32,
    pub burst: u32,
}

/// RPCs that are always rate-limited per client: each one answers a blind index
/// (BlindIndex, SealBinding) or reads a binding. A role allowed one without a
/// `rate_limits` entry gets [`DEFAULT_RATE`].
pub const RATE_LIMITED_RPCS: &[&str] = &[
    "keyward.v1.BindingService/BlindIndex",
    "keyward.v1.BindingService/SealBinding",
    "keyward.v1.BindingService/OpenBinding",
];

/// The bucket an RPC's calls are counted in: BlindIndex and SealBinding share one
/// (both answer a blind index), every other RPC has its own.
pub fn rate_bucket(rpc: &str) -> &str {
    match rpc.trim_start_matches('/') {
        "keyward.v1.BindingService/BlindIndex" | "keyward.v1.BindingService/SealBinding" => "blind-index",
        other => other,
    }
}

/// The rate of an always-limited RPC a role's config does not set.
pub const DEFAULT_RATE: RateLimit = RateLimit { per_minute: 60, burst: 10 };

/// Permissions a role may be granted besides RPCs and keys: (name, what it allows).
pub const PERMISSIONS: &[(&str, &str)] = &[
    (
        "pin.change-account",
        "PinService.TranslatePin may give the destination block another account field than the source's",
    ),
    ("otp.clear-code", "OtpService.IssueCode may return the code in clear (else only sealed for an operator)"),
    ("otp.import-seed", "OtpService.ImportOtpSeed may import a TOTP/HOTP seed wrapped under a transport KEK"),
    (
        "binding.open-full",
        "BindingService.OpenBinding returns every field (else the masked view; a masked-view role may not call BlindIndex)",
    ),
];

/// Token settings.
#[derive(Debug, Clone)]
pub struct HsmConfig {
    pub module: PathBuf,
    pub token_label: String,
    pub user_pin: SecretString,
    pub sessions: usize,
    /// Session objects after which the PKCS#11 module is re-initialised to free their
    /// memory (0: never; unset: 50,000 on SoftHSM below 2.7, else never).
    pub recycle_after_objects: Option<u64>,
}

/// TLS listener settings. mTLS is mandatory: there is no way to omit the client CA.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub client_ca: PathBuf,
    /// PEM file of CRLs issued by the client CA; reloaded with the clients.
    pub client_crl: Option<PathBuf>,
    /// Only TLS 1.3 is offered.
    pub tls13_only: bool,
}

/// Request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub deadline: Duration,
    pub concurrency: usize,
    /// A connection that has not finished its TLS handshake by then is closed.
    pub handshake_timeout: Duration,
    /// Connections in their TLS handshake at once; at the cap the oldest is closed.
    pub max_pending_handshakes: usize,
    /// The same from one source address.
    pub max_pending_handshakes_per_source: usize,
}

/// Audit trail settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    pub checkpoint_every: u64,
    /// A checkpoint at most this long after a line no checkpoint covers yet (1 s - 1 h).
    pub checkpoint_interval: Duration,
}

/// What one role may call, and with which keys.
#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub rpcs: Vec<String>,
    pub keys: Vec<String>,
    /// Named permissions, each one of [`PERMISSIONS`]; never implied by '*'.
    pub permissions: Vec<String>,
    /// Per-client call rates by RPC path.
    pub rate_limits: BTreeMap<String, RateLimit>,
}

impl Role {
    /// Whether the role holds a named permission (exact match only).
    pub fn has_permission(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }

    /// `path` is the gRPC path without the leading '/': "keyward.v1.DataService/Encrypt".
    pub fn allows_rpc(&self, path: &str) -> bool {
        let path = path.trim_start_matches('/');
        self.rpcs.iter().any(|p| {
            p == "*" || p == path || (p.ends_with("/*") && path.starts_with(&p[..p.len() - 1]))
        })
    }

    /// The per-client rate of an RPC: the configured one, else [`DEFAULT_RATE`] for the
    /// always-limited RPCs, else none.
    pub fn rate_limit(&self, path: &str) -> Option<RateLimit> {
        let path = path.trim_start_matches('/');
        self.rate_limits
            .get(path)
            .copied()
            .or_else(|| RATE_LIMITED_RPCS.contains(&path).then_some(DEFAULT_RATE))
    }

    /// Whether OpenBinding gives this role only the masked view.
    pub fn sees_masked_bindings_only(&self) -> bool {
        !self.has_permission("binding.open-full")
    }

    pub fn allows_key(&self, name: &str) -> bool {
        self.keys.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub hsm: HsmConfig,
    pub server: ServerConfig,
    pub limits: Limits,
    pub audit: AuditConfig,
    pub otp: OtpConfig,
    pub ecash: EcashConfig,
    pub binding: BindingConfig,
    pub pin: PinConfig,
    /// Client identity (first SAN URI, else subject CN) -> role name.
    pub clients: BTreeMap<String, String>,
    pub roles: BTreeMap<String, Arc<Role>>,
    /// The file this config was read from (SIGHUP and ReloadKeys read it again).
    pub source: Option<PathBuf>,
}

/// Expands `${VAR}` and `${VAR:-default}`.
pub fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        match (std::env::var(name), default) {
            (Ok(v), _) if !v.is_empty() => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            _ => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

struct Checker {
    base: PathBuf,
    errors: Vec<String>,
}

impl Checker {
    fn string(&mut self, path: &str, v: &str) -> Option<String> {
        match expand_env(v) {
            Ok(s) => Some(s),
            Err(e) => {
                self.errors.push(format!("{path}: {e}"));
                None
            }
        }
    }

    fn file(&mut self, path: &str, v: &str) -> Option<PathBuf> {
        let s = self.string(path, v)?;
        let p = Path::new(&s);
        let p = if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) };
        if !p.is_file() {
            self.errors.push(format!("{path}: file {} does not exist", p.display()));
            return None;
        }
        Some(p)
    }

    fn dir(&mut self, path: &str, v: &str) -> Option<PathBuf> {
        let s = self.string(path, v)?;
        let p = Path::new(&s);
        Some(if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) })
    }
}

/// Reads the PIN from its source.
pub fn read_pin(src: &PinSource, base: &Path) -> Result<SecretString, String> {
    match (&src.env, &src.file, &src.dev_inline) {
        (Some(var), None, None) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(SecretString::from(v)),
            _ => Err(format!("environment variable {var} is not set")),
        },
        (None, Some(file), None) => {
            let f = expand_env(file)?;
            let p = Path::new(&f);
            let p = if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
            let text = std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            let pin = text.lines().next().unwrap_or("").trim().to_string();
            if pin.is_empty() {
                return Err(format!("{} is empty", p.display()));
            }
            Ok(SecretString::from(pin))
        }
        (None, None, Some(pin)) => {
            tracing::warn!("user PIN inline in the config (dev_inline): development only");
            Ok(SecretString::from(pin.clone()))
        }
        _ => Err("set exactly one of env, file, dev_inline".into()),
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut config = Config::parse(&text, &base)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates config text; relative paths resolve against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigErrors> {
        // The parser's own message quotes the offending line, which may hold a
        // dev_inline PIN: report its position and reason only.
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|sp| text[..sp.start.min(text.len())].lines().count().max(1));
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            ConfigErrors(vec![format!("{at}{}", e.message())])
        })?;
        let mut c = Checker { base: base.to_path_buf(), errors: Vec::new() };

        let module = c.string("hsm.module", &raw.hsm.module).map(PathBuf::from);
        if let Some(m) = &module {
            if !m.is_file() {
                c.errors.push(format!("hsm.module: {} does not exist", m.display()));
            }
        }
        let token_label = c.string("hsm.token_label", &raw.hsm.token_label);
        if token_label.as_deref().is_some_and(|l| l.is_empty() || l.len() > 32) {
            c.errors.push("hsm.token_label: must be 1-32 characters".into());
        }
        let pin = match read_pin(&raw.hsm.user_pin, base) {
            Ok(p) => Some(p),
            Err(e) => {
                c.errors.push(format!("hsm.user_pin: {e}"));
                None
            }
        };
        if raw.hsm.sessions == 0 || raw.hsm.sessions > 256 {
            c.errors.push("hsm.sessions: must be 1-256".into());
        }

        let listen = c.string("server.listen", &raw.server.listen).and_then(|s| match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(e) => {
                c.errors.push(format!("server.listen: {s:?} is not an address:port ({e})"));
                None
            }
        });
        let tls_cert = c.file("server.tls_cert", &raw.server.tls_cert);
        let tls_key = c.file("server.tls_key", &raw.server.tls_key);
        let client_ca = match &raw.server.client_ca {
            Some(ca) => c.file("server.client_ca", ca),
            None => {
                c.errors.push("server.client_ca: required: mutual TLS is mandatory".into());
                None
            }
        };
        let client_crl = raw.server.client_crl.as_ref().map(|f| c.file("server.client_crl", f));

        if !(1..=10).contains(&raw.otp.max_attempts) {
            c.errors.push("otp.max_attempts: must be 1-10".into());
        }
        if !(1..=10_000_000).contains(&raw.otp.max_open_challenges) {
            c.errors.push("otp.max_open_challenges: must be 1-10000000".into());
        }
        let challenge_quota = raw.otp.challenge_quota_per_client.unwrap_or((raw.otp.max_open_challenges / 4).max(1));
        if challenge_quota == 0 || challenge_quota > raw.otp.max_open_challenges {
            c.errors.push("otp.challenge_quota_per_client: must be 1 to otp.max_open_challenges".into());
        }
        if !(1..=100).contains(&raw.otp.totp_max_failures) {
            c.errors.push("otp.totp_max_failures: must be 1-100".into());
        }
        if !(1..=86_400).contains(&raw.otp.totp_lockout_secs) {
            c.errors.push("otp.totp_lockout_secs: must be 1-86400".into());
        }
        let e = &raw.ecash;
        if !(1..=10_000).contains(&e.max_batch) {
            c.errors.push("ecash.max_batch: must be 1-10000".into());
        }
        for (path, days, max_path, max) in [
            ("ecash.certificate_days", e.certificate_days, "ecash.max_certificate_days", e.max_certificate_days),
            ("ecash.voucher_days", e.voucher_days, "ecash.max_voucher_days", e.max_voucher_days),
        ] {
            if days == 0 || days > max {
                c.errors.push(format!("{path}: must be 1 to {max_path} ({max})"));
            }
            if max > 36_500 {
                c.errors.push(format!("{max_path}: must be at most 36500 days"));
            }
        }
        if !(1..=10_000).contains(&raw.binding.max_batch) {
            c.errors.push("binding.max_batch: must be 1-10000".into());
        }
        if !(1..=1000).contains(&raw.pin.max_decode_failures) {
            c.errors.push("pin.max_decode_failures: must be 1-1000".into());
        }
        for (path, secs) in [("pin.failure_window_secs", raw.pin.failure_window_secs), ("pin.lockout_secs", raw.pin.lockout_secs)] {
            if !(1..=86_400).contains(&secs) {
                c.errors.push(format!("{path}: must be 1-86400"));
            }
        }
        let l = &raw.limits;
        if l.max_message_bytes < 1024 || l.max_message_bytes > 64 << 20 {
            c.errors.push("limits.max_message_bytes: must be 1 KiB - 64 MiB".into());
        }
        if l.deadline_ms == 0 || l.deadline_ms > 600_000 {
            c.errors.push("limits.deadline_ms: must be 1-600000".into());
        }
        if l.concurrency == 0 || l.concurrency > 100_000 {
            c.errors.push("limits.concurrency: must be 1-100000".into());
        }
        if l.handshake_timeout_ms < 100 || l.handshake_timeout_ms > 60_000 {
            c.errors.push("limits.handshake_timeout_ms: must be 100-60000".into());
        }
        if l.max_pending_handshakes == 0 || l.max_pending_handshakes > 65_536 {
            c.errors.push("limits.max_pending_handshakes: must be 1-65536".into());
        }
        if l.max_pending_handshakes_per_source == 0 || l.max_pending_handshakes_per_source > l.max_pending_handshakes {
            c.errors.push("limits.max_pending_handshakes_per_source: must be 1 to limits.max_pending_handshakes".into());
        }

        let audit_dir = c.dir("audit.dir", &raw.audit.dir);
        if raw.audit.checkpoint_every == 0 {
            c.errors.push("audit.checkpoint_every: must be at least 1".into());
        }
        if !(1..=3600).contains(&raw.audit.checkpoint_seconds) {
            c.errors.push("audit.checkpoint_seconds: must be 1 to 3600".into());
        }

        let mut roles = BTreeMap::new();
        for (name, r) in &raw.roles {
            if r.rpcs.is_empty() {
                c.errors.push(format!("roles.{name}.rpcs: empty: a role must allow at least one RPC"));
            }
            for (i, p) in r.rpcs.iter().enumerate() {
                let p = p.trim_start_matches('/');
                let ok = p == "*"
                    || p.split_once('/').is_some_and(|(svc, m)| {
                        svc.starts_with("keyward.v1.") || svc.starts_with("grpc.")
                    } && !m.is_empty() && (m == "*" || !m.contains('*')));
                if !ok {
                    c.errors.push(format!(
                        "roles.{name}.rpcs[{i}]: {p:?} is not \"*\", \"package.Service/*\" or \"package.Service/Method\""
                    ));
                }
            }
            for (i, k) in r.keys.iter().enumerate() {
                let stem = k.strip_suffix('*').unwrap_or(k);
                if stem.contains('*') {
                    c.errors.push(format!("roles.{name}.keys[{i}]: '*' only at the end"));
                }
            }
            for (i, p) in r.permissions.iter().enumerate() {
                if !PERMISSIONS.iter().any(|(known, _)| known == p) {
                    let known: Vec<&str> = PERMISSIONS.iter().map(|(k, _)| *k).collect();
                    c.errors.push(format!(
                        "roles.{name}.permissions[{i}]: unknown permission {p:?} (known: {})",
                        known.join(", ")
                    ));
                }
            }
            let mut rate_limits = BTreeMap::new();
            for (rpc, rate) in &r.rate_limits {
                let rpc = rpc.trim_start_matches('/');
                let exact = rpc.split_once('/').is_some_and(|(svc, m)| svc.starts_with("keyward.v1.") && !m.is_empty() && !m.contains('*'));
                if !exact {
                    c.errors.push(format!("roles.{name}.rate_limits.{rpc:?}: must be an exact \"keyward.v1.Service/Method\""));
                }
                let burst = rate.burst.unwrap_or(rate.per_minute.div_ceil(6).max(1));
                if rate.per_minute == 0 || burst == 0 {
                    c.errors.push(format!("roles.{name}.rate_limits.{rpc:?}: per_minute and burst must be at least 1"));
                }
                rate_limits.insert(rpc.to_string(), RateLimit { per_minute: rate.per_minute, burst });
            }
            let role = Role {
                name: name.clone(),
                rpcs: r.rpcs.iter().map(|p| p.trim_start_matches('/').to_string()).collect(),
                keys: r.keys.clone(),
                permissions: r.permissions.clone(),
                rate_limits,
            };
            // Masked view plus index lookups would unmask a number in 10^4 tries.
            let explicit = |m: &str| {
                role.rpcs.iter().any(|p| p == "keyward.v1.BindingService/*" || p == &format!("keyward.v1.BindingService/{m}"))
            };
            for index_rpc in ["BlindIndex", "SealBinding"] {
                if explicit(index_rpc) && explicit("OpenBinding") && role.sees_masked_bindings_only() {
                    c.errors.push(format!(
                        "roles.{name}: may call OpenBinding with the masked view only, so it may not call {index_rpc}, \
                         which answers a blind index (grant \"binding.open-full\" or remove one of the two)"
                    ));
                }
            }
            roles.insert(name.clone(), Arc::new(role));
        }
        for (client, role) in &raw.clients {
            if !roles.contains_key(role) {
                c.errors.push(format!("clients.{client:?}: role {role:?} is not defined under [roles]"));
            }
            if client.is_empty() {
                c.errors.push("clients: empty client identity".into());
            }
        }

        if !c.errors.is_empty() {
            return Err(ConfigErrors(c.errors));
        }
        let client_crl = match client_crl {
            None => None,
            Some(Some(p)) => Some(p),
            Some(None) => return Err(ConfigErrors(vec!["configuration incomplete".into()])),
        };
        match (module, token_label, pin, listen, tls_cert, tls_key, client_ca, audit_dir) {
            (Some(module), Some(token_label), Some(user_pin), Some(listen), Some(tls_cert), Some(tls_key), Some(client_ca), Some(dir)) => {
                Ok(Config {
                    hsm: HsmConfig {
                        module,
                        token_label,
                        user_pin,
                        sessions: raw.hsm.sessions,
                        recycle_after_objects: raw.hsm.recycle_after_objects,
                    },
                    server: ServerConfig { listen, tls_cert, tls_key, client_ca, client_crl, tls13_only: raw.server.tls13_only },
                    limits: Limits {
                        max_message_bytes: l.max_message_bytes,
                        deadline: Duration::from_millis(l.deadline_ms),
                        concurrency: l.concurrency,
                        handshake_timeout: Duration::from_millis(l.handshake_timeout_ms),
                        max_pending_handshakes: l.max_pending_handshakes,
                        max_pending_handshakes_per_source: l.max_pending_handshakes_per_source,
                    },
                    audit: AuditConfig {
                        dir,
                        checkpoint_every: raw.audit.checkpoint_every,
                        checkpoint_interval: Duration::from_secs(raw.audit.checkpoint_seconds),
                    },
                    otp: OtpConfig {
                        max_attempts: raw.otp.max_attempts,
                        max_open_challenges: raw.otp.max_open_challenges,
                        challenge_quota_per_client: challenge_quota,
                        totp_max_failures: raw.otp.totp_max_failures,
                        totp_lockout: Duration::from_secs(raw.otp.totp_lockout_secs),
                    },
                    ecash: EcashConfig {
                        max_batch: e.max_batch,
                        certificate_validity: Duration::from_secs(e.certificate_days * 86_400),
                        max_certificate_validity: Duration::from_secs(e.max_certificate_days * 86_400),
                        voucher_validity: Duration::from_secs(e.voucher_days * 86_400),
                        max_voucher_validity: Duration::from_secs(e.max_voucher_days * 86_400),
                    },
                    binding: BindingConfig { max_batch: raw.binding.max_batch },
                    pin: PinConfig {
                        max_decode_failures: raw.pin.max_decode_failures,
                        failure_window: Duration::from_secs(raw.pin.failure_window_secs),
                        lockout: Duration::from_secs(raw.pin.lockout_secs),
                    },
                    clients: raw.clients,
                    roles,
                    source: None,
                })
            }
            _ => Err(ConfigErrors(vec!["configuration incomplete".into()])),
        }
    }

    /// The role of a client identity, if the config names it.
    pub fn role_of(&self, identity: &str) -> Option<&Arc<Role>> {
        self.clients.get(identity).and_then(|r| self.roles.get(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_error_with_its_path() {
        let text = r#"
[hsm]
module = "/nonexistent/module.so"
token_label = "keyward"
user_pin = { env = "KEYWARD_TEST_UNSET_PIN_VAR" }
[server]
listen = "not-an-address"
tls_cert = "missing.crt"
tls_key = "missing.key"
[audit]
dir = "audit"
[clients]
"alice" = "nobody"
[roles.ops]
rpcs = ["Bad*Pattern"]
permissions = ["pin.anything"]
[roles.ops.rate_limits]
"keyward.v1.BindingService/*" = { per_minute = 10 }
"keyward.v1.BindingService/OpenBinding" = { per_minute = 0 }
[roles.desk]
rpcs = ["keyward.v1.BindingService/*"]
[roles.full]
rpcs = ["keyward.v1.BindingService/*"]
permissions = ["binding.open-full"]
[ecash]
max_batch = 0
voucher_days = 400
[limits]
handshake_timeout_ms = 10
max_pending_handshakes = 8
max_pending_handshakes_per_source = 9
[pin]
max_decode_failures = 0
lockout_secs = 0
[otp]
max_open_challenges = 10
challenge_quota_per_client = 11
totp_max_failures = 0
totp_lockout_secs = 0
"#;
        let err = Config::parse(text, Path::new("/tmp")).err().map(|e| e.0).unwrap_or_default();
        let joined = err.join("\n");
        for needle in [
            "hsm.module",
            "hsm.user_pin",
            "server.listen",
            "server.tls_cert",
            "server.tls_key",
            "server.client_ca",
            "clients.\"alice\"",
            "roles.ops.rpcs[0]",
            "roles.ops.permissions[0]: unknown permission",
            "roles.ops.rate_limits.\"keyward.v1.BindingService/*\": must be an exact",
            "roles.ops.rate_limits.\"keyward.v1.BindingService/OpenBinding\": per_minute and burst must be at least 1",
            "roles.desk: may call OpenBinding with the masked view only, so it may not call BlindIndex",
            "ecash.max_batch",
            "ecash.voucher_days",
            "limits.handshake_timeout_ms: must be 100-60000",
            "limits.max_pending_handshakes_per_source: must be 1 to limits.max_pending_handshakes",
            "pin.max_decode_failures",
            "pin.lockout_secs",
            "otp.challenge_quota_per_client: must be 1 to otp.max_open_challenges",
            "otp.totp_max_failures",
            "otp.totp_lockout_secs",
        ] {
            assert!(joined.contains(needle), "missing {needle} in:\n{joined}");
        }
        assert!(!joined.contains("roles.full"), "a full-view role may call both:\n{joined}");
    }

    #[test]
    fn role_patterns() {
        let r = Role {
            name: "r".into(),
            rpcs: vec!["keyward.v1.DataService/*".into(), "keyward.v1.KeyService/ListKeys".into()],
            keys: vec!["data".into(), "binding*".into()],
            permissions: vec!["pin.change-account".into()],
            rate_limits: BTreeMap::new(),
        };
        assert_eq!(r.rate_limit("/keyward.v1.BindingService/BlindIndex"), Some(DEFAULT_RATE));
        assert_eq!(r.rate_limit("keyward.v1.DataService/Encrypt"), None);
        assert!(r.sees_masked_bindings_only());
        assert!(r.has_permission("pin.change-account"));
        assert!(!r.has_permission("pin"));
        assert!(r.allows_rpc("/keyward.v1.DataService/Encrypt"));
        assert!(r.allows_rpc("keyward.v1.KeyService/ListKeys"));
        assert!(!r.allows_rpc("/keyward.v1.KeyService/GetKey"));
        assert!(!r.allows_rpc("/keyward.v1.DataServiceX/Encrypt"));
        assert!(r.allows_key("data"));
        assert!(r.allows_key("binding.index"));
        assert!(!r.allows_key("data2"));
    }

    #[test]
    fn env_expansion() {
        assert_eq!(expand_env("${KEYWARD_TEST_UNSET_X:-/a/b}/c").ok().as_deref(), Some("/a/b/c"));
        assert!(expand_env("${KEYWARD_TEST_UNSET_X}").is_err());
    }
}
