//! The tamper-evident audit trail: hash-chained JSON lines, signed checkpoints, the sequencer
//! thread that writes them, and the verifier behind `keyward audit verify DIR`.
//!
//! # Line format
//!
//! Every event is one compact JSON line in a daily file `DIR/audit.YYYY-MM-DD.jsonl`
//! (UTC). Fields appear in this order:
//!
//! `v, ts, seq, prev_hash, kind, client, role, action, keys, outcome, code, latency_us,
//! request_id, subjects, [detail], [head, sig, sig_key], chain_key, hash, [seal]`
//!
//! `v` is the line format (2); `detail` is left out when absent; `head`, `sig` and
//! `sig_key` appear on checkpoint lines only; `chain_key` is the `audit/vN` label of the
//! token's HMAC key that seals the chain. `seq` starts at 1 and grows by one per line
//! across files, processes and restarts; `prev_hash` is the previous line's `hash` (64
//! zeros before the first line). The line without its `,"hash":"…"` (and `,"seal":"…"`)
//! suffix, but with the closing brace, is the *body*, and
//!
//! `hash = hex(SHA-256("keyward/v2/audit" || 0x00 || u32be(len(body)) || body))`.
//!
//! The hashes chain every line to all lines before it; the token seals the chain once
//! per group commit: the last line each batch writes carries
//!
//! `seal = hex(HMAC-SHA256(audit key, "keyward/v2/audit-seal" || 0x00 || u64be(seq) || hash))`
//!
//! over its own seq and hash, so one token MAC authenticates the batch and everything
//! before it. A caller is answered only after the sealed batch is synced, so every
//! acknowledged line is covered by a seal; lines after the last seal were never
//! acknowledged (a batch cut off mid-write) or were written without the token. The
//! verifier refuses such an unsealed tail; a writer that finds one drops it (and says so
//! in its next line) after checking the seal it continues from.
//!
//! Format 1 lines (no `v` field; written by earlier versions) carry no seal: their
//! `hash` is `HMAC-SHA256(audit key, "keyward/v1/audit" || 0x00 || u32be(len(body)) ||
//! body)`, so each authenticates itself and the chain before it. A trail may hold format 1
//! lines followed by format 2 lines; the verifier reads both.
//!
//! A checkpoint line (`kind` = `checkpoint`) signs the chain head it follows: `head` is
//! the previous line's hash, `sig` is hex of a raw low-S ECDSA P-256 signature r||s by the
//! `audit.sign` key over SHA-256 of
//! `"keyward/v1/audit-checkpoint" || 0x00 || u64be(seq) || head` where `seq` is the
//! checkpoint line's own `seq`. Checkpoints are written every
//! [`AuditOptions::checkpoint_every`] lines, at most [`AuditOptions::checkpoint_interval`]
//! after any line that no checkpoint covers yet, as the first line of each new day and at
//! shutdown, and each is also appended to `DIR/checkpoints.jsonl`, the copy to ship
//! elsewhere: the sealed chain stops edits by anyone without the token, the shipped
//! checkpoints stop truncation and rewriting by a holder of the user PIN. Lines after
//! the last checkpoint are anchored by the chain head ([`AuditTrail::head`]) a monitor
//! keeps and hands back to the verifier ([`VerifyOptions::expect_head`]).
//!
//! The directory is made 0700 and every file in it 0600.
//!
//! # Writing
//!
//! [`AuditTrail`] owns a sequencer thread. Callers hand it events and are answered only
//! after their line is written and synced (group commit: one `fsync` per batch). Writers in
//! several processes (the appliance and the ceremony CLI) share a directory: each batch
//! is written under an exclusive lock on `DIR/.lock`, and a writer that finds the newest
//! file changed since its last batch re-reads the chain head from the files first. When a
//! write fails, the batch's callers get an error and [`AuditTrail::healthy`] turns false
//! until a later batch succeeds: the appliance fails closed.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public};
use serde::{Deserialize, Serialize};
use tracing_appender::rolling::{RollingFileAppender, Rotation};

/// Domain tag of the format 1 line HMAC input.
pub const CHAIN_TAG: &[u8] = b"keyward/v1/audit";
/// Domain tag of the format 2 line hash input.
pub const CHAIN_TAG_V2: &[u8] = b"keyward/v2/audit";
/// Domain tag of the format 2 seal HMAC input.
pub const SEAL_TAG: &[u8] = b"keyward/v2/audit-seal";
/// The line format this version writes.
pub const LINE_FORMAT: u64 = 2;
/// Domain tag of the checkpoint signature input.
pub const CHECKPOINT_TAG: &[u8] = b"keyward/v1/audit-checkpoint";
/// `prev_hash` of the very first line.
pub const GENESIS_HASH: [u8; 32] = [0; 32];
/// Name of the checkpoint copy inside the audit directory.
pub const CHECKPOINTS_FILE: &str = "checkpoints.jsonl";
/// Name of the lock file that serialises writers.
pub const LOCK_FILE: &str = ".lock";

/// `,"hash":"` + 64 hex digits + `"}` (the end of an unsealed line).
#[cfg(test)]
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;
/// `,"hash":"` (or `,"seal":"`) + 64 hex digits + `"`.
const FIELD_SUFFIX_LEN: usize = 9 + 64 + 1;
/// Longest `detail` kept (bytes); longer text is cut at a character boundary.
const MAX_DETAIL: usize = 512;
/// Longest line body the writer accepts.
const MAX_BODY: usize = 64 * 1024;
/// How far back the writer looks for the last complete line of a file.
const MAX_TAIL_SCAN: u64 = 16 * 1024 * 1024;
/// How many lines past a bad line the verifier reads to name the damage.
const CLASSIFY_LOOKAHEAD: usize = 100_000;

// ---------------------------------------------------------------------------------------
// Errors and the token interface
// ---------------------------------------------------------------------------------------

/// What went wrong while writing the trail. Messages name files and operations, never
/// key material or event content.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file-system operation failed.
    #[error("audit I/O failed while {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The token refused or failed an operation.
    #[error("audit token operation failed: {0}")]
    Token(String),
    /// The files on disk cannot be continued (unreadable chain head).
    #[error("audit trail is corrupt: {0}")]
    Corrupt(String),
    /// The caller's event cannot be written.
    #[error("invalid audit event: {0}")]
    Invalid(String),
    /// The trail was shut down (or its thread is gone).
    #[error("audit trail is closed")]
    Closed,
}

impl AuditError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        AuditError::Io { context: context.into(), source }
    }

    /// A copy for each caller of a failed batch (io::Error is not Clone).
    fn duplicate(&self) -> Self {
        match self {
            AuditError::Io { context, source } => {
                AuditError::Io { context: context.clone(), source: io::Error::new(source.kind(), source.to_string()) }
            }
            AuditError::Token(s) => AuditError::Token(s.clone()),
            AuditError::Corrupt(s) => AuditError::Corrupt(s.clone()),
            AuditError::Invalid(s) => AuditError::Invalid(s.clone()),
            AuditError::Closed => AuditError::Closed,
        }
    }
}

/// Token operations the audit trail needs. Implemented by the hsm layer; calls are blocking.
pub trait AuditKeys: Send + Sync + 'static {
    /// HMAC-SHA256 under the token's `audit` key.
    fn chain_mac(&self, data: &[u8]) -> Result<[u8; 32], AuditError>;
    /// ECDSA P-256 over SHA-256(data) under `audit.sign`; raw r||s, 64 bytes, low-S.
    fn checkpoint_sign(&self, data: &[u8]) -> Result<Vec<u8>, AuditError>;
    /// DER SubjectPublicKeyInfo of the `audit.sign` key used by checkpoint_sign, and its "name/vN" label.
    fn checkpoint_public_key(&self) -> Result<(Vec<u8>, String), AuditError>;
    /// "audit/vN" of the HMAC key, written into each line.
    fn chain_key_label(&self) -> String;
}

/// The bytes a format 1 line's HMAC covers for its body:
/// `"keyward/v1/audit" || 0x00 || u32be(len(body)) || body`.
pub fn chain_mac_input(body: &[u8]) -> Vec<u8> {
    // The writer caps bodies at MAX_BODY, so the length always fits.
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut v = Vec::with_capacity(CHAIN_TAG.len() + 5 + body.len());
    v.extend_from_slice(CHAIN_TAG);
    v.push(0);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A format 2 line's hash: `SHA-256("keyward/v2/audit" || 0x00 || u32be(len(body)) || body)`.
pub fn line_hash(body: &[u8]) -> [u8; 32] {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    // The streaming hasher: the one-shot helper fetches the digest anew on every call.
    let mut h = openssl::sha::Sha256::new();
    h.update(CHAIN_TAG_V2);
    h.update(&[0]);
    h.update(&len.to_be_bytes());
    h.update(body);
    h.finish()
}

/// The bytes a seal's HMAC covers: `"keyward/v2/audit-seal" || 0x00 || u64be(seq) || hash`.
pub fn seal_input(seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(SEAL_TAG.len() + 1 + 8 + 32);
    v.extend_from_slice(SEAL_TAG);
    v.push(0);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(hash);
    v
}

/// The bytes a checkpoint signature covers (before SHA-256):
/// `"keyward/v1/audit-checkpoint" || 0x00 || u64be(seq) || head`, where `seq` is the
/// checkpoint line's own seq and `head` the hash of the line before it.
pub fn checkpoint_message(seq: u64, head: &[u8; 32]) -> Vec<u8> {
    let mut v = Vec::with_capacity(CHECKPOINT_TAG.len() + 1 + 8 + 32);
    v.extend_from_slice(CHECKPOINT_TAG);
    v.push(0);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(head);
    v
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

/// What kind of line an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// One gRPC call.
    Rpc,
    /// One key-ceremony action.
    Ceremony,
    /// A signed checkpoint; written by the trail itself, refused from callers.
    Checkpoint,
    /// A writer opened the trail.
    Start,
    /// A writer shut the trail down.
    Stop,
}

/// One audited event. Serialises (in this field order) into the middle of a line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub kind: EventKind,
    /// Authenticated caller identity (certificate SAN URI or CN), or the operator.
    pub client: String,
    /// Role the caller acted in.
    pub role: String,
    /// RPC path or ceremony action, e.g. `/keyward.v1.DataService/Encrypt`, `ceremony.rotate`.
    pub action: String,
    /// Keys used, `name/vN`.
    pub keys: Vec<String>,
    /// `ok`, `error` or `denied`.
    pub outcome: String,
    /// gRPC code name, e.g. `OK`, `INVALID_ARGUMENT`.
    pub code: String,
    pub latency_us: u64,
    pub request_id: String,
    /// Already-HMAC'd subject identifiers; never clear-text identifiers.
    pub subjects: Vec<String>,
    /// Short non-secret text; cut to 512 bytes when written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl EventKind {
    /// The name written into a line's `kind` field.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Rpc => "rpc",
            EventKind::Ceremony => "ceremony",
            EventKind::Checkpoint => "checkpoint",
            EventKind::Start => "start",
            EventKind::Stop => "stop",
        }
    }
}

impl AuditEvent {
    /// An event with outcome `ok`, code `OK` and everything else empty; complete it with
    /// the `with_*` methods.
    pub fn new(kind: EventKind, action: impl Into<String>) -> Self {
        AuditEvent {
            kind,
            client: String::new(),
            role: String::new(),
            action: action.into(),
            keys: Vec::new(),
            outcome: "ok".to_string(),
            code: "OK".to_string(),
            latency_us: 0,
            request_id: String::new(),
            subjects: Vec::new(),
            detail: None,
        }
    }

    /// A complete `rpc` event in one call (what the request path uses).
    #[allow(clippy::too_many_arguments)]
    pub fn rpc(
        client: &str,
        role: &str,
        action: &str,
        keys: Vec<String>,
        outcome: &str,
        code: &str,
        latency_us: u64,
        request_id: &str,
        subjects: Vec<String>,
    ) -> Self {
        AuditEvent {
            kind: EventKind::Rpc,
            client: client.to_string(),
            role: role.to_string(),
            action: action.to_string(),
            keys,
            outcome: outcome.to_string(),
            code: code.to_string(),
            latency_us,
            request_id: request_id.to_string(),
            subjects,
            detail: None,
        }
    }

    /// A `ceremony` event for `action` (e.g. `ceremony.rotate`), outcome `ok`.
    pub fn ceremony(action: impl Into<String>) -> Self {
        Self::new(EventKind::Ceremony, action)
    }

    pub fn with_client(mut self, client: impl Into<String>, role: impl Into<String>) -> Self {
        self.client = client.into();
        self.role = role.into();
        self
    }

    /// Adds one key, `name/vN`.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    pub fn with_outcome(mut self, outcome: impl Into<String>, code: impl Into<String>) -> Self {
        self.outcome = outcome.into();
        self.code = code.into();
        self
    }

    pub fn with_latency_us(mut self, latency_us: u64) -> Self {
        self.latency_us = latency_us;
        self
    }

    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = request_id.into();
        self
    }

    /// Adds one already-HMAC'd subject identifier.
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subjects.push(subject.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    fn check(&self) -> Result<(), AuditError> {
        if self.kind == EventKind::Checkpoint {
            return Err(AuditError::Invalid("checkpoint lines are written by the trail itself".into()));
        }
        if !matches!(self.outcome.as_str(), "ok" | "error" | "denied") {
            return Err(AuditError::Invalid("outcome must be ok, error or denied".into()));
        }
        Ok(())
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn clip(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The extra fields of a checkpoint line.
#[derive(Debug, Serialize)]
struct CheckpointFields {
    head: String,
    sig: String,
    sig_key: String,
}

/// Appends `s` as a JSON string, escaped exactly as `serde_json` escapes it.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if esc.is_empty() {
            out.push_str("\\u00");
            push_hex(out, &[b]);
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends `,"name":` and `value` as a JSON string.
fn push_str_field(out: &mut String, name: &str, value: &str) {
    out.push_str(",\"");
    out.push_str(name);
    out.push_str("\":");
    push_json_str(out, value);
}

/// Appends a JSON array of strings.
fn push_str_array(out: &mut String, items: &[String]) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, item);
    }
    out.push(']');
}

/// Appends the lower-case hex digits of `bytes`.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

/// Writes a format 2 line body (with its closing brace) into `out`, fields in the
/// documented order. Built by hand: this runs once per audited call.
fn write_body(
    out: &mut String,
    ts: &str,
    seq: u64,
    prev_hash: &[u8; 32],
    ev: &AuditEvent,
    checkpoint: Option<&CheckpointFields>,
    chain_key: &str,
) {
    use std::fmt::Write as _;
    // Writing into a String cannot fail.
    let _ = write!(out, "{{\"v\":{LINE_FORMAT},\"ts\":");
    push_json_str(out, ts);
    let _ = write!(out, ",\"seq\":{seq},\"prev_hash\":\"");
    push_hex(out, prev_hash);
    out.push('"');
    for (name, value) in [("kind", ev.kind.as_str()), ("client", &ev.client), ("role", &ev.role), ("action", &ev.action)] {
        push_str_field(out, name, value);
    }
    out.push_str(",\"keys\":");
    push_str_array(out, &ev.keys);
    push_str_field(out, "outcome", &ev.outcome);
    push_str_field(out, "code", &ev.code);
    let _ = write!(out, ",\"latency_us\":{}", ev.latency_us);
    push_str_field(out, "request_id", &ev.request_id);
    out.push_str(",\"subjects\":");
    push_str_array(out, &ev.subjects);
    if let Some(detail) = &ev.detail {
        push_str_field(out, "detail", detail);
    }
    if let Some(cp) = checkpoint {
        for (name, value) in [("head", &cp.head), ("sig", &cp.sig), ("sig_key", &cp.sig_key)] {
            push_str_field(out, name, value);
        }
    }
    push_str_field(out, "chain_key", chain_key);
    out.push('}');
}

/// Now as (`2026-11-23T14:05:09.123456Z`, `2026-11-23`).
fn utc_stamp() -> (String, String) {
    let now = time::OffsetDateTime::now_utc();
    let day = format!("{:04}-{:02}-{:02}", now.year(), u8::from(now.month()), now.day());
    let ts = format!("{day}T{:02}:{:02}:{:02}.{:06}Z", now.hour(), now.minute(), now.second(), now.microsecond());
    (ts, day)
}

// ---------------------------------------------------------------------------------------
// Parsing lines (shared by the writer's tail reading and the verifier)
// ---------------------------------------------------------------------------------------

/// A line split into body, hash and seal, with its chain fields.
#[derive(Debug)]
struct ParsedLine {
    body: String,
    hash: [u8; 32],
    /// The token's seal (format 2 lines that end a batch).
    seal: Option<[u8; 32]>,
    /// Line format: 1 (no `v` field, a keyed hash per line) or 2.
    format: u64,
    seq: u64,
    prev_hash: [u8; 32],
    fields: serde_json::Map<String, serde_json::Value>,
}

impl ParsedLine {
    fn str_field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).and_then(|v| v.as_str())
    }

    /// Whether the token authenticates the chain up to and including this line by
    /// itself: a format 1 line (keyed hash) or a sealed format 2 line.
    fn authenticates(&self) -> bool {
        self.format == 1 || self.seal.is_some()
    }
}

/// 64 lower-case hex digits to 32 bytes.
fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Splits `rest` (a line without its closing brace) at a trailing `,"NAME":"<64 hex>"`.
fn split_hex_field<'a>(rest: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    if rest.len() < FIELD_SUFFIX_LEN || !rest.is_char_boundary(rest.len() - FIELD_SUFFIX_LEN) {
        return None;
    }
    let (open, field) = rest.split_at(rest.len() - FIELD_SUFFIX_LEN);
    let hex = field.strip_prefix(prefix)?.strip_suffix('"')?;
    Some((open, hex))
}

/// Splits a line (without newline) into body, hash and seal and reads its chain fields.
fn parse_line(line: &str) -> Result<ParsedLine, String> {
    let rest = line.strip_suffix('}').ok_or("not an audit line (no closing brace)")?;
    let (rest, seal) = match split_hex_field(rest, ",\"seal\":\"") {
        Some((open, hex)) => (open, Some(parse_hex32(hex).ok_or("seal is not 64 lower-case hex digits")?)),
        None => (rest, None),
    };
    let (open, hash_hex) = split_hex_field(rest, ",\"hash\":\"").ok_or("line does not end with its hash field")?;
    if open.len() < 2 {
        return Err("not an audit line (too short)".into());
    }
    let hash = parse_hex32(hash_hex).ok_or("hash is not 64 lower-case hex digits")?;
    let body = format!("{open}}}");
    let value: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("not JSON: {e}"))?;
    let serde_json::Value::Object(fields) = value else {
        return Err("not a JSON object".into());
    };
    let format = match fields.get("v") {
        None => 1,
        Some(v) if v.as_u64() == Some(LINE_FORMAT) => LINE_FORMAT,
        Some(v) => return Err(format!("unknown line format {v}")),
    };
    if format == 1 && seal.is_some() {
        return Err("a format 1 line carries no seal".into());
    }
    let seq = fields.get("seq").and_then(|v| v.as_u64()).ok_or("no seq")?;
    let prev_hash =
        fields.get("prev_hash").and_then(|v| v.as_str()).and_then(parse_hex32).ok_or("no valid prev_hash")?;
    Ok(ParsedLine { body, hash, seal, format, seq, prev_hash, fields })
}

/// Whether `p`'s hash matches its body (format 1: through the token's HMAC).
fn hash_matches(p: &ParsedLine, keys: &dyn AuditKeys) -> Result<bool, AuditError> {
    let computed = match p.format {
        1 => keys.chain_mac(&chain_mac_input(p.body.as_bytes()))?,
        _ => line_hash(p.body.as_bytes()),
    };
    Ok(openssl::memcmp::eq(&computed, &p.hash))
}

/// Whether `p`'s seal (if any) verifies under the token's key.
fn seal_matches(p: &ParsedLine, keys: &dyn AuditKeys) -> Result<bool, AuditError> {
    match &p.seal {
        None => Ok(true),
        Some(seal) => Ok(openssl::memcmp::eq(&keys.chain_mac(&seal_input(p.seq, &p.hash))?, seal)),
    }
}

/// [`parse_line`] for the fuzz targets (`fuzz/`): the line's seq, prev_hash and hash.
#[doc(hidden)]
pub fn fuzz_parse_line(line: &str) -> Result<(u64, [u8; 32], [u8; 32]), String> {
    parse_line(line).map(|p| (p.seq, p.prev_hash, p.hash))
}

/// Whether `name` is one of the trail's daily files (`audit.*.jsonl`).
fn is_audit_file_name(name: &str) -> bool {
    name.len() > "audit..jsonl".len() && name.starts_with("audit.") && name.ends_with(".jsonl")
}

/// The trail's files, sorted by name (= by day).
fn list_audit_files(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        if is_audit_file_name(&name) && entry.file_type()?.is_file() {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// `2026-11-23` from `audit.2026-11-23.jsonl`.
fn day_of_file(name: &str) -> Option<String> {
    name.strip_prefix("audit.")?.strip_suffix(".jsonl").map(str::to_string)
}

/// The end of a daily file as a writer continues it.
struct FileTail {
    /// The last line that authenticates the chain (format 1, or sealed), if any.
    line: Option<String>,
    /// Length the file keeps: the end of that line (0 when the file has none).
    keep: u64,
    /// Complete format 2 lines after it that carry no seal.
    unsealed: usize,
    /// Bytes of an incomplete last line (no newline).
    torn: u64,
}

/// Reads backwards from the end of `path` to its last authenticating line, reading at
/// most [`MAX_TAIL_SCAN`] bytes.
fn read_file_tail(path: &Path) -> io::Result<FileTail> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut want = len.min(64 * 1024);
    loop {
        let start = len - want;
        let mut buf = vec![0u8; want as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf)?;
        let complete = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let torn = (buf.len() - complete) as u64;
        let mut end = complete;
        let mut unsealed = 0usize;
        // Walk the complete lines from the newest; the first (partial when `start > 0`)
        // segment of the buffer is only used once the buffer reaches the file's start.
        while end > 0 {
            let line_end = end - 1;
            let line_start = buf[..line_end].iter().rposition(|&b| b == b'\n').map(|i| i + 1);
            let line_start = match line_start {
                Some(i) => i,
                None if start == 0 => 0,
                None => break,
            };
            let text = std::str::from_utf8(&buf[line_start..line_end])
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "audit line is not UTF-8"))?;
            let p = parse_line(text).map_err(|why| io::Error::new(io::ErrorKind::InvalidData, why))?;
            if p.authenticates() {
                return Ok(FileTail { line: Some(text.to_string()), keep: start + end as u64, unsealed, torn });
            }
            unsealed += 1;
            end = line_start;
        }
        if start == 0 {
            return Ok(FileTail { line: None, keep: 0, unsealed, torn });
        }
        if want >= MAX_TAIL_SCAN {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "no sealed line near the end of the file"));
        }
        want = len.min(want.saturating_mul(4)).min(MAX_TAIL_SCAN);
    }
}

/// The chain head found on disk.
struct Tail {
    seq: u64,
    hash: [u8; 32],
    day: Option<String>,
    /// What was repaired on the way (torn fragments and unsealed lines dropped).
    notes: Vec<String>,
}

/// Reads the chain head from the newest file holding an authenticating line and checks
/// it with the token (its hash, and its seal or keyed hash): a writer never seals over
/// lines it cannot authenticate. An incomplete last line (a write that never completed)
/// and complete lines after the last seal (a batch that was never acknowledged, or lines
/// written without the token) are cut off, since the next batch's seal would otherwise
/// vouch for them; the cut is reported in `notes`.
fn read_chain_tail(dir: &Path, keys: &dyn AuditKeys) -> Result<Tail, AuditError> {
    let files = list_audit_files(dir).map_err(|e| AuditError::io("listing the audit directory", e))?;
    let mut notes = Vec::new();
    for (name, path) in files.iter().rev() {
        let tail = read_file_tail(path).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => AuditError::Corrupt(format!("the end of {name} is unreadable: {e}")),
            _ => AuditError::io(format!("reading the end of {name}"), e),
        })?;
        if tail.torn > 0 || tail.unsealed > 0 {
            let cut = || -> io::Result<()> {
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(tail.keep)?;
                f.sync_data()
            };
            cut().map_err(|e| AuditError::io(format!("dropping unacknowledged lines from {name}"), e))?;
            if tail.torn > 0 {
                tracing::warn!(file = %name, bytes = tail.torn, "audit: dropped an incomplete last line");
                notes.push(format!("dropped an incomplete last line ({} bytes) from {name}", tail.torn));
            }
            if tail.unsealed > 0 {
                tracing::warn!(file = %name, lines = tail.unsealed, "audit: dropped unsealed lines");
                notes.push(format!("dropped {} unsealed line(s) from the end of {name}", tail.unsealed));
            }
        }
        if let Some(line) = tail.line {
            let p = parse_line(&line)
                .map_err(|why| AuditError::Corrupt(format!("last line of {name} is unreadable: {why}")))?;
            if !hash_matches(&p, keys)? || !seal_matches(&p, keys)? {
                let label = keys.chain_key_label();
                let hint = match p.str_field("chain_key") {
                    Some(l) if l != label => format!(" (it names chain key {l}, the token's is {label})"),
                    _ => String::new(),
                };
                return Err(AuditError::Corrupt(format!(
                    "the last sealed line of {name} (seq {}) does not verify{hint}: the trail was altered; \
                     `keyward audit verify` names the damage",
                    p.seq
                )));
            }
            return Ok(Tail { seq: p.seq, hash: p.hash, day: day_of_file(name), notes });
        }
    }
    Ok(Tail { seq: 0, hash: GENESIS_HASH, day: None, notes })
}

// ---------------------------------------------------------------------------------------
// P-256 helpers
// ---------------------------------------------------------------------------------------

/// The P-256 group order n and n/2.
fn p256_order() -> Result<(BigNum, BigNum), openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let mut ctx = BigNumContext::new()?;
    let mut order = BigNum::new()?;
    group.order(&mut order, &mut ctx)?;
    let mut half = BigNum::new()?;
    half.rshift1(&order)?;
    Ok((order, half))
}

/// Checks a raw r||s signature's length and returns it low-S (s replaced by n-s when
/// s > n/2). The token promises low-S already; this keeps the trail canonical anyway.
fn normalise_low_s(raw: &[u8]) -> Result<[u8; 64], AuditError> {
    if raw.len() != 64 {
        return Err(AuditError::Token(format!("checkpoint signature of {} bytes, expected 64", raw.len())));
    }
    let err = |e: openssl::error::ErrorStack| AuditError::Token(format!("low-S normalisation: {e}"));
    let mut out = [0u8; 64];
    out.copy_from_slice(raw);
    let s = BigNum::from_slice(&raw[32..]).map_err(err)?;
    let (order, half) = p256_order().map_err(err)?;
    if s.ucmp(&half) == CmpOrdering::Greater {
        let mut low = BigNum::new().map_err(err)?;
        low.checked_sub(&order, &s).map_err(err)?;
        out[32..].copy_from_slice(&low.to_vec_padded(32).map_err(err)?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------

/// How an [`AuditTrail`] writes.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// A checkpoint after this many lines (default 1000).
    pub checkpoint_every: u64,
    /// A checkpoint at most this long after a line no checkpoint covers (default 10 s).
    pub checkpoint_interval: Duration,
    /// Most events written per group commit (default 512).
    pub max_batch: usize,
    /// Who writes, e.g. `appliance` or `ceremony`; the `client` of start, stop and
    /// checkpoint lines.
    pub writer_name: String,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            max_batch: 512,
            writer_name: "appliance".to_string(),
        }
    }
}

/// Where a caller's answer goes.
enum Reply {
    Async(tokio::sync::oneshot::Sender<Result<u64, AuditError>>),
    Blocking(mpsc::SyncSender<Result<u64, AuditError>>),
}

impl Reply {
    fn send(self, r: Result<u64, AuditError>) {
        // A caller that went away no longer needs its answer; its line stays written.
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

// Shutdown is sent once per trail; boxing every event to shrink it is not worth it.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Event(AuditEvent, Reply),
    Shutdown(mpsc::SyncSender<Result<(), AuditError>>),
}

/// State shared between the handle and the sequencer thread.
struct Shared {
    healthy: AtomicBool,
    closed: AtomicBool,
    /// The chain head after the last good batch.
    head: Mutex<ChainHead>,
}

/// The newest line of the chain as written: a monitor that keeps it can later prove,
/// with `keyward audit verify --expect-head SEQ:HASH`, that the trail still holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// Seq of the newest line (0 before the first).
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
    /// Seq of the newest checkpoint line (0 if none written by this writer yet).
    pub checkpoint_seq: u64,
}

impl ChainHead {
    /// `SEQ:HASH`, the form `--expect-head` takes.
    pub fn to_arg(&self) -> String {
        format!("{}:{}", self.seq, hex::encode(self.hash))
    }
}

/// Parses `SEQ:HASH` (decimal seq, 64 hex digits).
pub fn parse_head_arg(s: &str) -> Result<(u64, [u8; 32]), String> {
    let (seq, hash) = s.split_once(':').ok_or("expected SEQ:HASH (e.g. 1234:9f86d0...)")?;
    let seq: u64 = seq.parse().map_err(|_| format!("seq {seq:?} is not a decimal number"))?;
    if seq == 0 {
        return Err("seq must be at least 1".into());
    }
    let hash = parse_hex32(hash).ok_or("hash must be 64 hex digits")?;
    Ok((seq, hash))
}

/// Sets `path`'s mode (the audit directory 0700, its files 0600).
fn restrict(path: &Path, mode: u32) -> Result<(), AuditError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| AuditError::io(format!("setting mode {mode:o} on {}", path.display()), e))
}

/// The audit trail writer: a handle to the sequencer thread. Share it with `Arc`.
///
/// Dropping the last handle shuts the trail down like [`AuditTrail::shutdown`] (blocking
/// until the final checkpoint is written).
pub struct AuditTrail {
    tx: mpsc::Sender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    dir: PathBuf,
}

impl fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditTrail").field("dir", &self.dir).field("healthy", &self.healthy()).finish()
    }
}

impl AuditTrail {
    /// Opens (creating `dir` if missing) the trail, continues the chain from the newest
    /// file and writes a `start` line, whose detail notes any incomplete last line that
    /// had to be dropped. Fails when that first line cannot be written.
    pub fn open(dir: &Path, keys: Arc<dyn AuditKeys>, opts: AuditOptions) -> Result<AuditTrail, AuditError> {
        if opts.checkpoint_every == 0 || opts.max_batch == 0 {
            return Err(AuditError::Invalid("checkpoint_every and max_batch must be at least 1".into()));
        }
        fs::create_dir_all(dir).map_err(|e| AuditError::io("creating the audit directory", e))?;
        restrict(dir, 0o700)?;
        for (_, path) in list_audit_files(dir).map_err(|e| AuditError::io("listing the audit directory", e))? {
            restrict(&path, 0o600)?;
        }
        if dir.join(CHECKPOINTS_FILE).is_file() {
            restrict(&dir.join(CHECKPOINTS_FILE), 0o600)?;
        }
        let shared = Arc::new(Shared {
            healthy: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            head: Mutex::new(ChainHead { seq: 0, hash: GENESIS_HASH, checkpoint_seq: 0 }),
        });
        let sequencer = Sequencer {
            dir: dir.to_path_buf(),
            keys,
            opts,
            shared: Arc::clone(&shared),
            appender: None,
            state: ChainState { seq: 0, hash: GENESIS_HASH, day: None, since_checkpoint: 0, checkpoint_seq: 0 },
            synced: None,
            last_checkpoint: Instant::now(),
        };
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("keyward-audit".into())
            .spawn(move || sequencer.run(rx, ready_tx))
            .map_err(|e| AuditError::io("starting the audit thread", e))?;
        let ready = ready_rx.recv().unwrap_or(Err(AuditError::Closed));
        if let Err(e) = ready {
            let _ = thread.join();
            return Err(e);
        }
        Ok(AuditTrail { tx, thread: Mutex::new(Some(thread)), shared, dir: dir.to_path_buf() })
    }

    /// The directory this trail writes.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// False after a failed write until a later write succeeds, and after shutdown. The
    /// appliance reports NOT_SERVING and refuses calls while this is false.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    /// The chain head after the last batch written.
    pub fn head(&self) -> ChainHead {
        *self.shared.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&self, mut ev: AuditEvent, reply: Reply) -> Result<(), AuditError> {
        ev.check()?;
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(AuditError::Closed);
        }
        ev.detail = ev.detail.map(|d| clip(d, MAX_DETAIL));
        self.tx.send(Msg::Event(ev, reply)).map_err(|_| AuditError::Closed)
    }

    /// Appends `ev` and resolves with its seq once the line is written and synced to disk.
    /// Dropping the future does not withdraw an event already handed over.
    pub async fn record(&self, ev: AuditEvent) -> Result<u64, AuditError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(ev, Reply::Async(tx))?;
        rx.await.unwrap_or(Err(AuditError::Closed))
    }

    /// [`AuditTrail::record`] for code without a runtime (the CLI). Blocks the thread; it
    /// works inside a runtime too but then stalls a worker.
    pub fn record_blocking(&self, ev: AuditEvent) -> Result<u64, AuditError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(ev, Reply::Blocking(tx))?;
        rx.recv().unwrap_or(Err(AuditError::Closed))
    }

    /// Writes everything queued, a `stop` line and a final checkpoint, then ends the
    /// sequencer thread. Blocking. Later calls return `Ok(())`; later records get
    /// [`AuditError::Closed`].
    pub fn shutdown(&self) -> Result<(), AuditError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let result = match self.tx.send(Msg::Shutdown(tx)) {
            Ok(()) => rx.recv().unwrap_or(Err(AuditError::Closed)),
            Err(_) => Err(AuditError::Closed),
        };
        if let Ok(mut slot) = self.thread.lock() {
            if let Some(handle) = slot.take() {
                let _ = handle.join();
            }
        }
        result
    }
}

impl Drop for AuditTrail {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "audit: shutdown failed");
        }
    }
}

/// The chain as the writer sees it.
#[derive(Clone, Debug)]
struct ChainState {
    seq: u64,
    hash: [u8; 32],
    /// Day (UTC, `YYYY-MM-DD`) of the last line.
    day: Option<String>,
    /// Lines this writer wrote since its last checkpoint.
    since_checkpoint: u64,
    /// Seq of this writer's last checkpoint.
    checkpoint_seq: u64,
}

/// The newest daily file and its length.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileMark {
    path: PathBuf,
    len: u64,
}

/// A line built but not yet written: its text up to (not including) the closing brace.
struct Pending {
    open: String,
    seq: u64,
    hash: [u8; 32],
    checkpoint: bool,
}

/// What one batch wrote.
#[derive(Default)]
struct BatchOut {
    chain_key: String,
    /// Lines built since the last write, sealed and written together.
    pending: Vec<Pending>,
    last_line: String,
    checkpoints: Vec<String>,
}

/// The sequencer thread's state: it alone writes the files.
struct Sequencer {
    dir: PathBuf,
    keys: Arc<dyn AuditKeys>,
    opts: AuditOptions,
    shared: Arc<Shared>,
    /// Dropped after a failure and rebuilt before the next batch.
    appender: Option<RollingFileAppender>,
    state: ChainState,
    /// The newest file as this writer left it after its last good batch; any other state
    /// found under the lock means the chain head must be re-read.
    synced: Option<FileMark>,
    /// When this writer last wrote a checkpoint (or started).
    last_checkpoint: Instant,
}

impl Sequencer {
    fn run(mut self, rx: mpsc::Receiver<Msg>, ready: mpsc::SyncSender<Result<(), AuditError>>) {
        /// Marks the trail unhealthy however the thread ends, a panic included.
        struct Unhealthy(Arc<Shared>);
        impl Drop for Unhealthy {
            fn drop(&mut self) {
                self.0.healthy.store(false, Ordering::Release);
            }
        }
        let _unhealthy_on_exit = Unhealthy(Arc::clone(&self.shared));
        let mut start = vec![AuditEvent::new(EventKind::Start, "audit.open")
            .with_client(self.opts.writer_name.clone(), "system")
            .with_detail(format!("pid {}", std::process::id()))];
        let opened = self.commit(&mut start, true, false).map(|_| ());
        let failed = opened.is_err();
        self.shared.healthy.store(!failed, Ordering::Release);
        let _ = ready.send(opened);
        if failed {
            return;
        }
        loop {
            // With lines no checkpoint covers, wait no longer than until one is due.
            let received = if self.state.since_checkpoint > 0 {
                let due = self.opts.checkpoint_interval.saturating_sub(self.last_checkpoint.elapsed());
                rx.recv_timeout(due)
            } else {
                rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
            };
            let first = match received {
                Ok(m) => m,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Idle with uncovered lines: the timed checkpoint (try_commit adds it).
                    if self.commit(&mut [], false, false).is_err() {
                        // Retry one interval later, not in a loop.
                        self.last_checkpoint = Instant::now();
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Every handle is gone without a shutdown: close the trail anyway.
                    let _ = self.close();
                    break;
                }
            };
            let mut events = Vec::new();
            let mut replies = Vec::new();
            let mut shutdown = None;
            let mut next = Some(first);
            // Group commit: take whatever else is already queued, up to max_batch.
            while let Some(m) = next.take() {
                match m {
                    Msg::Event(ev, reply) => {
                        events.push(ev);
                        replies.push(reply);
                    }
                    Msg::Shutdown(reply) => {
                        shutdown = Some(reply);
                        break;
                    }
                }
                if events.len() < self.opts.max_batch {
                    next = rx.try_recv().ok();
                }
            }
            if !events.is_empty() {
                match self.commit(&mut events, false, false) {
                    Ok(seqs) => {
                        for (reply, seq) in replies.into_iter().zip(seqs) {
                            reply.send(Ok(seq));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            reply.send(Err(e.duplicate()));
                        }
                    }
                }
            }
            if let Some(reply) = shutdown {
                let _ = reply.send(self.close());
                break;
            }
        }
        // Events still queued are answered Closed when `rx` drops their reply senders.
    }

    /// Writes the `stop` line and the final checkpoint.
    fn close(&mut self) -> Result<(), AuditError> {
        let mut stop = vec![AuditEvent::new(EventKind::Stop, "audit.close")
            .with_client(self.opts.writer_name.clone(), "system")
            .with_detail(format!("pid {}", std::process::id()))];
        self.commit(&mut stop, false, true).map(|_| ())
    }

    /// Writes one batch under the directory lock and syncs it. On success the chain state
    /// advances and the trail is healthy; on failure nothing advances, the appender is
    /// rebuilt and the head re-read from disk before the next batch, and the trail is
    /// unhealthy.
    fn commit(
        &mut self,
        events: &mut [AuditEvent],
        notes_into_first: bool,
        final_checkpoint: bool,
    ) -> Result<Vec<u64>, AuditError> {
        let result = self.try_commit(events, notes_into_first, final_checkpoint);
        match &result {
            Ok(_) => {
                *self.shared.head.lock().unwrap_or_else(|p| p.into_inner()) = ChainHead {
                    seq: self.state.seq,
                    hash: self.state.hash,
                    checkpoint_seq: self.state.checkpoint_seq,
                };
                self.shared.healthy.store(true, Ordering::Release)
            }
            Err(e) => {
                tracing::error!(error = %e, "audit: batch failed; the trail is unhealthy");
                self.shared.healthy.store(false, Ordering::Release);
                self.appender = None;
                self.synced = None;
            }
        }
        result
    }

    fn try_commit(
        &mut self,
        events: &mut [AuditEvent],
        notes_into_first: bool,
        final_checkpoint: bool,
    ) -> Result<Vec<u64>, AuditError> {
        let _lock = self.lock_dir()?;
        if self.appender.is_none() {
            self.appender = Some(build_appender(&self.dir)?);
        }
        let mut st = self.state.clone();
        let mut notes = Vec::new();
        let mut before = newest_file(&self.dir)?;
        if before != self.synced {
            // Another writer appended, a day began, or we are recovering: re-read the head.
            let tail = read_chain_tail(&self.dir, self.keys.as_ref())?;
            st.seq = tail.seq;
            st.hash = tail.hash;
            st.day = tail.day;
            notes = tail.notes;
            if !notes.is_empty() {
                before = newest_file(&self.dir)?;
            }
        }
        let mut out = BatchOut { chain_key: self.keys.chain_key_label(), ..BatchOut::default() };
        if !notes.is_empty() {
            let note = notes.join("; ");
            match events.first_mut() {
                Some(first) if notes_into_first => {
                    let detail = match first.detail.take() {
                        Some(d) => format!("{d}; {note}"),
                        None => note,
                    };
                    first.detail = Some(clip(detail, MAX_DETAIL));
                }
                _ => {
                    let repair = AuditEvent::new(EventKind::Start, "audit.repair")
                        .with_client(self.opts.writer_name.clone(), "system")
                        .with_detail(clip(note, MAX_DETAIL));
                    self.append_event(&mut st, &mut out, &repair)?;
                }
            }
        }
        let mut seqs = Vec::with_capacity(events.len());
        for ev in events.iter() {
            seqs.push(self.append_event(&mut st, &mut out, ev)?);
        }
        let timed = st.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.opts.checkpoint_interval;
        if final_checkpoint || timed {
            let (ts, day) = utc_stamp();
            self.append_checkpoint(&mut st, &mut out, &ts, &day)?;
        }
        self.write_pending(&mut out)?;
        let after = self.sync_batch(before.as_ref(), &out)?;
        self.state = st;
        self.synced = Some(after);
        Ok(seqs)
    }

    /// Opens `DIR/.lock` and takes the exclusive lock; released when the file drops. The
    /// lock file is opened per batch so a replaced directory is noticed (and never
    /// silently re-created: the batch fails instead).
    fn lock_dir(&self) -> Result<File, AuditError> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.dir.join(LOCK_FILE))
            .map_err(|e| AuditError::io("opening the audit lock file", e))?;
        f.lock().map_err(|e| AuditError::io("locking the audit directory", e))?;
        Ok(f)
    }

    /// Writes one event line, preceded by a day-change checkpoint when the day changed
    /// since the last line and followed by a periodic checkpoint when one is due.
    fn append_event(&mut self, st: &mut ChainState, out: &mut BatchOut, ev: &AuditEvent) -> Result<u64, AuditError> {
        let (ts, day) = utc_stamp();
        if st.seq > 0 && st.day.as_deref() != Some(day.as_str()) {
            // First line of a new day: the old day's lines are sealed and written first,
            // then the appender rolls to the new file, which the checkpoint of the
            // previous day's head opens.
            self.write_pending(out)?;
            self.append_checkpoint(st, out, &ts, &day)?;
        }
        let seq = self.append_line(st, out, &ts, &day, ev, None)?;
        st.since_checkpoint += 1;
        if st.since_checkpoint >= self.opts.checkpoint_every {
            self.append_checkpoint(st, out, &ts, &day)?;
        }
        Ok(seq)
    }

    /// Writes a checkpoint line signing the current head.
    fn append_checkpoint(
        &mut self,
        st: &mut ChainState,
        out: &mut BatchOut,
        ts: &str,
        day: &str,
    ) -> Result<u64, AuditError> {
        let seq = st.seq + 1;
        let raw = self.keys.checkpoint_sign(&checkpoint_message(seq, &st.hash))?;
        let sig = normalise_low_s(&raw)?;
        let (_, sig_key) = self.keys.checkpoint_public_key()?;
        let fields = CheckpointFields { head: hex::encode(st.hash), sig: hex::encode(sig), sig_key: sig_key.clone() };
        let ev = AuditEvent::new(EventKind::Checkpoint, "audit.checkpoint")
            .with_client(self.opts.writer_name.clone(), "system")
            .with_key(sig_key);
        let written = self.append_line(st, out, ts, day, &ev, Some(&fields))?;
        st.since_checkpoint = 0;
        st.checkpoint_seq = written;
        self.last_checkpoint = Instant::now();
        Ok(written)
    }

    /// Builds and hashes one line (written, sealed, by the next [`Sequencer::write_pending`]).
    fn append_line(
        &mut self,
        st: &mut ChainState,
        out: &mut BatchOut,
        ts: &str,
        day: &str,
        ev: &AuditEvent,
        checkpoint: Option<&CheckpointFields>,
    ) -> Result<u64, AuditError> {
        let seq = st.seq.checked_add(1).ok_or_else(|| AuditError::Corrupt("seq overflow".into()))?;
        // Room for the hash and seal suffixes too.
        let mut body = String::with_capacity(512);
        write_body(&mut body, ts, seq, &st.hash, ev, checkpoint, &out.chain_key);
        if body.len() > MAX_BODY {
            return Err(AuditError::Invalid(format!("line of {} bytes is too long", body.len())));
        }
        let hash = line_hash(body.as_bytes());
        body.pop();
        body.push_str(",\"hash\":\"");
        push_hex(&mut body, &hash);
        body.push('"');
        out.pending.push(Pending { open: body, seq, hash, checkpoint: checkpoint.is_some() });
        st.seq = seq;
        st.hash = hash;
        if st.day.as_deref() != Some(day) {
            st.day = Some(day.to_string());
        }
        Ok(seq)
    }

    /// Seals the last pending line with one token MAC and writes all pending lines in
    /// one write.
    fn write_pending(&mut self, out: &mut BatchOut) -> Result<(), AuditError> {
        let Some(last) = out.pending.last_mut() else { return Ok(()) };
        let seal = self.keys.chain_mac(&seal_input(last.seq, &last.hash))?;
        last.open.push_str(",\"seal\":\"");
        push_hex(&mut last.open, &seal);
        last.open.push('"');
        let mut buf = String::with_capacity(out.pending.iter().map(|p| p.open.len() + 2).sum());
        let mut last_start = 0;
        for p in &out.pending {
            last_start = buf.len();
            buf.push_str(&p.open);
            buf.push_str("}\n");
            if p.checkpoint {
                out.checkpoints.push(buf[last_start..].to_string());
            }
        }
        out.pending.clear();
        let appender = self.appender.as_mut().ok_or(AuditError::Closed)?;
        appender.write_all(buf.as_bytes()).map_err(|e| AuditError::io("writing audit lines", e))?;
        out.last_line = buf.split_off(last_start);
        Ok(())
    }

    /// Flushes the batch, `sync_data`s the file it went to (and the previous file when
    /// the day rolled over mid-batch), checks that the last line really is at the end of
    /// the newest file (the appender keeps writing to an unlinked file if the directory
    /// was replaced), then appends the batch's checkpoints to the checkpoint copy.
    ///
    /// `RollingFileAppender` has no fsync of its own, so the file is reopened by path for
    /// `sync_data`; the end-of-file check makes sure that path is the file written.
    fn sync_batch(&mut self, before: Option<&FileMark>, out: &BatchOut) -> Result<FileMark, AuditError> {
        let appender = self.appender.as_mut().ok_or(AuditError::Closed)?;
        appender.flush().map_err(|e| AuditError::io("flushing the audit file", e))?;
        let after = newest_file(&self.dir)?
            .ok_or_else(|| AuditError::io("syncing", io::Error::new(io::ErrorKind::NotFound, "no audit file")))?;
        let name = after.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&after.path)
            .map_err(|e| AuditError::io(format!("opening {name} to sync it"), e))?;
        file.sync_data().map_err(|e| AuditError::io(format!("syncing {name}"), e))?;
        let new_file = before.map(|b| &b.path) != Some(&after.path) || self.synced.is_none();
        if let Some(old) = before.filter(|b| b.path != after.path) {
            if let Ok(f) = OpenOptions::new().append(true).open(&old.path) {
                f.sync_data().map_err(|e| AuditError::io("syncing the previous audit file", e))?;
            }
        }
        if new_file {
            // The appender creates files with the process umask.
            restrict(&after.path, 0o600)?;
            sync_dir(&self.dir)?;
        }
        if !out.last_line.is_empty() && !file_ends_with(&mut file, after.len, out.last_line.as_bytes())? {
            return Err(AuditError::io(
                format!("checking {name}"),
                io::Error::other("the written lines are not at the end of the newest audit file"),
            ));
        }
        if !out.checkpoints.is_empty() {
            let path = self.dir.join(CHECKPOINTS_FILE);
            let write = || -> io::Result<()> {
                let mut f = OpenOptions::new().create(true).append(true).mode(0o600).open(&path)?;
                for line in &out.checkpoints {
                    f.write_all(line.as_bytes())?;
                }
                f.sync_data()
            };
            write().map_err(|e| AuditError::io("appending to the checkpoint copy", e))?;
            sync_dir(&self.dir)?;
        }
        Ok(after)
    }
}

fn build_appender(dir: &Path) -> Result<RollingFileAppender, AuditError> {
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix("audit")
        .filename_suffix("jsonl")
        .build(dir)
        .map_err(|e| AuditError::io("opening the daily audit file", io::Error::other(e.to_string())))
}

fn newest_file(dir: &Path) -> Result<Option<FileMark>, AuditError> {
    let files = list_audit_files(dir).map_err(|e| AuditError::io("listing the audit directory", e))?;
    let Some((name, path)) = files.into_iter().next_back() else { return Ok(None) };
    let len = fs::metadata(&path).map_err(|e| AuditError::io(format!("reading the size of {name}"), e))?.len();
    Ok(Some(FileMark { path, len }))
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| AuditError::io("syncing the audit directory", e))
}

fn file_ends_with(file: &mut File, len: u64, tail: &[u8]) -> Result<bool, AuditError> {
    let n = tail.len() as u64;
    if len < n {
        return Ok(false);
    }
    let mut buf = vec![0u8; tail.len()];
    file.seek(SeekFrom::Start(len - n))
        .and_then(|_| file.read_exact(&mut buf))
        .map_err(|e| AuditError::io("reading back the audit file", e))?;
    Ok(buf == tail)
}

// ---------------------------------------------------------------------------------------
// The verifier
// ---------------------------------------------------------------------------------------

/// What a successful verification saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Daily files read, in order.
    pub files: Vec<String>,
    /// Lines verified.
    pub lines: u64,
    /// Checkpoint lines whose signature verified.
    pub checkpoints: u64,
    /// Checkpoints in the shipped copy, all found identical in the trail.
    pub shipped_checkpoints: u64,
    /// Seq of the last line (0 for an empty trail).
    pub last_seq: u64,
    /// Hash of the last line, hex.
    pub head: String,
    /// The last file ends with an incomplete line (a write that never completed; the
    /// writer drops it when it next opens). Not counted as a line.
    pub torn_tail: Option<String>,
}

/// The kind of damage the verifier found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Not an audit line at all.
    Malformed,
    /// A line's content does not match its hash, or differs from the shipped checkpoint.
    Edited,
    /// One or more lines are missing.
    Removed,
    /// A line that does not belong there (a copy, or a line from another chain).
    Inserted,
    /// Lines out of order.
    Reordered,
    /// A checkpoint's signature is missing, high-S or does not verify.
    BadCheckpoint,
    /// The trail ends before a checkpoint listed in the shipped copy, or before the
    /// expected head.
    Truncated,
    /// The trail ends in lines no seal covers: never acknowledged, or written without
    /// the token.
    Unsealed,
    /// No audit line at all (refused unless [`VerifyOptions::allow_empty`]).
    Empty,
    /// A file, the token or the public key could not be used.
    Unreadable,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Malformed => "malformed",
            FailureKind::Edited => "edited",
            FailureKind::Removed => "removed",
            FailureKind::Inserted => "inserted",
            FailureKind::Reordered => "reordered",
            FailureKind::BadCheckpoint => "bad checkpoint signature",
            FailureKind::Truncated => "truncated",
            FailureKind::Unsealed => "unsealed",
            FailureKind::Empty => "empty",
            FailureKind::Unreadable => "unreadable",
        })
    }
}

/// The first bad line: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct VerifyFailure {
    /// File name (not path) of the bad line.
    pub file: Option<String>,
    /// 1-based line number within `file`.
    pub line: Option<u64>,
    /// Seq of the bad line, when it could be read.
    pub seq: Option<u64>,
    pub kind: FailureKind,
    pub detail: String,
}

impl VerifyFailure {
    fn describe(&self) -> String {
        let mut s = String::new();
        if let Some(file) = &self.file {
            s.push_str(file);
            if let Some(line) = self.line {
                s.push_str(&format!(" line {line}"));
            }
            if let Some(seq) = self.seq {
                s.push_str(&format!(" (seq {seq})"));
            }
            s.push_str(": ");
        }
        s.push_str(&format!("{}: {}", self.kind, self.detail));
        s
    }

    fn unreadable(file: Option<String>, detail: String) -> Self {
        VerifyFailure { file, line: None, seq: None, kind: FailureKind::Unreadable, detail }
    }
}

/// One line read from the trail.
struct RawLine {
    file: usize,
    lineno: u64,
    text: String,
}

/// Reads the daily files' lines in order, across files.
struct LineSource {
    files: Vec<(String, PathBuf)>,
    next_file: usize,
    current: Option<(usize, BufReader<File>, u64)>,
    torn: Option<String>,
}

impl LineSource {
    fn next(&mut self) -> Result<Option<RawLine>, VerifyFailure> {
        loop {
            if self.current.is_none() {
                let Some((name, path)) = self.files.get(self.next_file) else { return Ok(None) };
                let f = File::open(path).map_err(|e| VerifyFailure::unreadable(Some(name.clone()), e.to_string()))?;
                self.current = Some((self.next_file, BufReader::new(f), 0));
                self.next_file += 1;
            }
            let Some((idx, reader, lineno)) = self.current.as_mut() else { continue };
            let name = &self.files[*idx].0;
            let mut buf = Vec::new();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| VerifyFailure::unreadable(Some(name.clone()), e.to_string()))?;
            if n == 0 {
                self.current = None;
                continue;
            }
            *lineno += 1;
            let at = |detail: &str| VerifyFailure {
                file: Some(name.clone()),
                line: Some(*lineno),
                seq: None,
                kind: FailureKind::Malformed,
                detail: detail.to_string(),
            };
            if buf.pop() != Some(b'\n') {
                if *idx + 1 == self.files.len() {
                    self.torn = Some(name.clone());
                    self.current = None;
                    continue;
                }
                return Err(at("incomplete line (no newline) before the end of the trail"));
            }
            let text = String::from_utf8(buf).map_err(|_| at("line is not UTF-8"))?;
            return Ok(Some(RawLine { file: *idx, lineno: *lineno, text }));
        }
    }
}

/// The checkpoint public key, loaded on first use.
struct CheckpointKey<'a> {
    keys: &'a dyn AuditKeys,
    given: Option<&'a [u8]>,
    loaded: Option<(EcKey<Public>, Option<String>)>,
    half_order: Option<BigNum>,
}

impl CheckpointKey<'_> {
    fn load(&mut self) -> Result<(), String> {
        if self.loaded.is_some() {
            return Ok(());
        }
        let (der, label) = match self.given {
            Some(der) => (der.to_vec(), None),
            None => {
                let (der, label) = self.keys.checkpoint_public_key().map_err(|e| e.to_string())?;
                (der, Some(label))
            }
        };
        let ec = PKey::public_key_from_der(&der)
            .and_then(|k| k.ec_key())
            .map_err(|e| format!("checkpoint public key is not an EC key: {e}"))?;
        if ec.group().curve_name() != Some(Nid::X9_62_PRIME256V1) {
            return Err("checkpoint public key is not on P-256".into());
        }
        let (_, half) = p256_order().map_err(|e| e.to_string())?;
        self.half_order = Some(half);
        self.loaded = Some((ec, label));
        Ok(())
    }

    /// Checks a checkpoint line whose chain fields already verified.
    fn check(&mut self, p: &ParsedLine) -> Result<(), (FailureKind, String)> {
        let bad = |s: &str| (FailureKind::BadCheckpoint, s.to_string());
        let head = p.str_field("head").and_then(parse_hex32).ok_or_else(|| bad("no valid head"))?;
        if head != p.prev_hash {
            return Err(bad("head is not the previous line's hash"));
        }
        let sig_key = p.str_field("sig_key").ok_or_else(|| bad("no sig_key"))?.to_string();
        let sig = p
            .str_field("sig")
            .and_then(|s| hex::decode(s).ok())
            .filter(|s| s.len() == 64)
            .ok_or_else(|| bad("sig is not 64 bytes of hex"))?;
        self.load().map_err(|e| (FailureKind::Unreadable, e))?;
        let (Some((ec, label)), Some(half)) = (&self.loaded, &self.half_order) else {
            return Err((FailureKind::Unreadable, "checkpoint public key unavailable".into()));
        };
        let num = |b: &[u8]| BigNum::from_slice(b).map_err(|e| bad(&e.to_string()));
        let (r, s) = (num(&sig[..32])?, num(&sig[32..])?);
        if s.ucmp(half) == CmpOrdering::Greater {
            return Err(bad("high-S signature refused"));
        }
        let digest = crate::crypto::sha256(&checkpoint_message(p.seq, &head));
        let ok = EcdsaSig::from_private_components(r, s)
            .and_then(|sig| sig.verify(&digest, ec))
            .map_err(|e| bad(&e.to_string()))?;
        if !ok {
            let hint = match label {
                Some(l) if *l != sig_key => format!(" (signed by {sig_key}, verifying key is {l})"),
                _ => String::new(),
            };
            return Err(bad(&format!("signature does not verify{hint}")));
        }
        Ok(())
    }
}

/// Loads the shipped checkpoint copy: seq -> exact line.
fn load_shipped(path: &Path) -> Result<BTreeMap<u64, String>, VerifyFailure> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let text = fs::read(path).map_err(|e| VerifyFailure::unreadable(name.clone(), e.to_string()))?;
    let mut map = BTreeMap::new();
    // Only complete lines count: an incomplete last line was never fully shipped.
    for (i, raw) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        let Some(raw) = raw.strip_suffix(b"\n") else { break };
        let at = |detail: String| VerifyFailure {
            file: name.clone(),
            line: Some(i as u64 + 1),
            seq: None,
            kind: FailureKind::Malformed,
            detail,
        };
        let line = std::str::from_utf8(raw).map_err(|_| at("line is not UTF-8".into()))?;
        let p = parse_line(line).map_err(at)?;
        map.insert(p.seq, line.to_string());
    }
    Ok(map)
}

/// Names the damage at the first bad line, reading ahead in the trail. `expected` and
/// `head` are the seq and hash the line should have continued from.
fn classify(
    bad: &ParsedLine,
    mac_ok: bool,
    expected: u64,
    head: &[u8; 32],
    src: &mut LineSource,
) -> (FailureKind, String) {
    // (seq, prev_hash, hash) of the lines after the bad one.
    let mut ahead: Vec<(u64, [u8; 32], [u8; 32])> = Vec::new();
    while ahead.len() < CLASSIFY_LOOKAHEAD {
        match src.next() {
            Ok(Some(raw)) => {
                if let Ok(p) = parse_line(&raw.text) {
                    ahead.push((p.seq, p.prev_hash, p.hash));
                }
            }
            _ => break,
        }
    }
    let next_continues = ahead.first().is_some_and(|a| a.0 == expected && &a.1 == head);
    if mac_ok && next_continues && ahead.first().is_some_and(|a| bad.seq == a.0 + 1 && bad.prev_hash == a.2) {
        return (FailureKind::Reordered, format!("seq {} comes before seq {expected}: lines swapped", bad.seq));
    }
    let second_continues = match (ahead.first(), ahead.get(1)) {
        (Some(a), Some(b)) => b.0 == a.0 + 1 && b.1 == a.2,
        _ => true,
    };
    if next_continues && second_continues {
        return (FailureKind::Inserted, "the chain continues without this line".into());
    }
    if !mac_ok {
        return (FailureKind::Edited, "hash does not match the line's content".into());
    }
    if bad.seq < expected {
        return (FailureKind::Inserted, format!("repeats seq {} (expected {expected})", bad.seq));
    }
    if bad.seq == expected {
        return (FailureKind::Inserted, "prev_hash does not link to the previous line".into());
    }
    if ahead.iter().any(|a| a.0 == expected) {
        if ahead.iter().any(|a| a.0 == bad.seq) {
            return (FailureKind::Inserted, format!("seq {} appears twice", bad.seq));
        }
        return (FailureKind::Reordered, format!("seq {} comes before seq {expected}", bad.seq));
    }
    (
        FailureKind::Removed,
        format!("seq jumps from {} to {}: {} line(s) missing", expected - 1, bad.seq, bad.seq - expected),
    )
}

/// What [`verify_dir_with`] checks beyond the chain itself.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions<'a> {
    /// DER SubjectPublicKeyInfo of the checkpoint key (default: the token's).
    pub public_key_der: Option<&'a [u8]>,
    /// The shipped checkpoint copy (default: `DIR/checkpoints.jsonl` when present).
    pub checkpoints_file: Option<&'a Path>,
    /// A chain head seen earlier (seq, hash): the trail must still hold that line.
    pub expect_head: Option<(u64, [u8; 32])>,
    /// Accept a directory without any audit line (a trail never started).
    pub allow_empty: bool,
}

/// [`verify_dir_with`] with the given key and checkpoint copy, refusing an empty trail.
pub fn verify_dir(
    dir: &Path,
    keys: &dyn AuditKeys,
    public_key_der: Option<&[u8]>,
    checkpoints_file: Option<&Path>,
) -> Result<VerifyReport, VerifyFailure> {
    verify_dir_with(dir, keys, &VerifyOptions { public_key_der, checkpoints_file, ..VerifyOptions::default() })
}

/// Verifies the trail in `dir`: every `audit.*.jsonl` in name order, every line's
/// seq, link and hash (through `keys.chain_mac`), every checkpoint signature (with
/// `public_key_der`, a DER SubjectPublicKeyInfo, or else the token's key), that every
/// checkpoint of the shipped copy (`checkpoints_file`, else `DIR/checkpoints.jsonl` when
/// present) appears identically in the trail, and that the expected head, if given, is
/// in it. A trail without any line is refused unless `allow_empty`. Returns the first
/// bad line.
pub fn verify_dir_with(dir: &Path, keys: &dyn AuditKeys, opts: &VerifyOptions<'_>) -> Result<VerifyReport, VerifyFailure> {
    let (public_key_der, checkpoints_file) = (opts.public_key_der, opts.checkpoints_file);
    if !dir.is_dir() {
        return Err(VerifyFailure::unreadable(None, format!("{} is not a directory", dir.display())));
    }
    let files = list_audit_files(dir).map_err(|e| VerifyFailure::unreadable(None, e.to_string()))?;
    let default_copy = dir.join(CHECKPOINTS_FILE);
    let copy_path = match checkpoints_file {
        Some(p) => Some(p.to_path_buf()),
        None => default_copy.is_file().then_some(default_copy),
    };
    let mut shipped = match &copy_path {
        Some(p) => load_shipped(p)?,
        None => BTreeMap::new(),
    };
    let shipped_count = shipped.len() as u64;
    let mut cp_key = CheckpointKey { keys, given: public_key_der, loaded: None, half_order: None };
    let token_label = keys.chain_key_label();
    let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    let mut src = LineSource { files, next_file: 0, current: None, torn: None };
    let (mut expected, mut head) = (1u64, GENESIS_HASH);
    let (mut lines, mut checkpoints) = (0u64, 0u64);
    let mut last_pos: Option<(usize, u64)> = None;
    // The first line after the last seal (file, line number, seq).
    let mut unsealed_from: Option<(usize, u64, u64)> = None;

    while let Some(raw) = src.next()? {
        let at = |kind: FailureKind, detail: String, seq: Option<u64>| VerifyFailure {
            file: Some(names[raw.file].clone()),
            line: Some(raw.lineno),
            seq,
            kind,
            detail,
        };
        let p = parse_line(&raw.text).map_err(|why| at(FailureKind::Malformed, why, None))?;
        let mac_ok = hash_matches(&p, keys).map_err(|e| at(FailureKind::Unreadable, e.to_string(), Some(p.seq)))?;
        if !mac_ok || p.seq != expected || p.prev_hash != head {
            let (kind, mut detail) = classify(&p, mac_ok, expected, &head, &mut src);
            if let Some(label) = p.str_field("chain_key").filter(|l| !mac_ok && *l != token_label) {
                detail.push_str(&format!(" (line names chain key {label}, the token's is {token_label})"));
            }
            return Err(at(kind, detail, Some(p.seq)));
        }
        if !seal_matches(&p, keys).map_err(|e| at(FailureKind::Unreadable, e.to_string(), Some(p.seq)))? {
            let mut detail = "the seal does not verify: this line or one before it since the last seal was \
                              rewritten"
                .to_string();
            if let Some(label) = p.str_field("chain_key").filter(|l| *l != token_label) {
                detail.push_str(&format!(" (line names chain key {label}, the token's is {token_label})"));
            }
            return Err(at(FailureKind::Edited, detail, Some(p.seq)));
        }
        if p.authenticates() {
            unsealed_from = None;
        } else if unsealed_from.is_none() {
            unsealed_from = Some((raw.file, raw.lineno, p.seq));
        }
        if p.str_field("kind") == Some("checkpoint") {
            cp_key.check(&p).map_err(|(kind, why)| at(kind, why, Some(p.seq)))?;
            checkpoints += 1;
        }
        if let Some((seq, hash)) = opts.expect_head.filter(|(seq, _)| *seq == p.seq) {
            if !openssl::memcmp::eq(&hash, &p.hash) {
                return Err(at(
                    FailureKind::Edited,
                    format!("seq {seq} is not the expected head {}: the trail was rewritten", hex::encode(hash)),
                    Some(p.seq),
                ));
            }
        }
        if let Some(copy) = shipped.remove(&p.seq) {
            if copy != raw.text {
                return Err(at(
                    FailureKind::Edited,
                    format!("differs from the checkpoint seq {} in the shipped copy", p.seq),
                    Some(p.seq),
                ));
            }
        }
        head = p.hash;
        expected = p.seq + 1;
        lines += 1;
        last_pos = Some((raw.file, raw.lineno));
    }
    if let Some((&seq, _)) = shipped.iter().next() {
        return Err(VerifyFailure {
            file: last_pos.map(|(f, _)| names[f].clone()).or_else(|| names.last().cloned()),
            line: Some(last_pos.map_or(1, |(_, l)| l + 1)),
            seq: Some(seq),
            kind: FailureKind::Truncated,
            detail: format!("checkpoint seq {seq} missing"),
        });
    }
    if let Some((seq, _)) = opts.expect_head.filter(|(seq, _)| *seq >= expected) {
        return Err(VerifyFailure {
            file: last_pos.map(|(f, _)| names[f].clone()).or_else(|| names.last().cloned()),
            line: Some(last_pos.map_or(1, |(_, l)| l + 1)),
            seq: Some(seq),
            kind: FailureKind::Truncated,
            detail: format!("the trail ends at seq {} before the expected head seq {seq}", expected - 1),
        });
    }
    if let Some((file, line, seq)) = unsealed_from {
        return Err(VerifyFailure {
            file: Some(names[file].clone()),
            line: Some(line),
            seq: Some(seq),
            kind: FailureKind::Unsealed,
            detail: format!(
                "no seal covers seq {seq} to {}: lines never acknowledged (a batch cut off) or written \
                 without the token; a writer drops them when it next opens the trail",
                expected - 1
            ),
        });
    }
    if lines == 0 && !opts.allow_empty {
        return Err(VerifyFailure {
            file: None,
            line: None,
            seq: None,
            kind: FailureKind::Empty,
            detail: format!("no audit line in {} (a trail that never started is accepted only when asked)", dir.display()),
        });
    }
    Ok(VerifyReport {
        files: names,
        lines,
        checkpoints,
        shipped_checkpoints: shipped_count,
        last_seq: expected - 1,
        head: hex::encode(head),
        torn_tail: src.torn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ec::EcKey;
    use openssl::hash::MessageDigest;
    use openssl::pkey::Private;
    use openssl::sign::Signer;

    /// A software stand-in for the token: HMAC-SHA256 under a fixed key and a P-256 key
    /// made for the test; signatures are raw r||s, low-S.
    struct SoftKeys {
        mac_key: Vec<u8>,
        ec: EcKey<Private>,
    }

    impl SoftKeys {
        fn new() -> Arc<SoftKeys> {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
            Arc::new(SoftKeys { mac_key: vec![0x42; 32], ec: EcKey::generate(&group).unwrap() })
        }

        fn mac(&self, data: &[u8]) -> [u8; 32] {
            let key = PKey::hmac(&self.mac_key).unwrap();
            let mut signer = Signer::new(MessageDigest::sha256(), &key).unwrap();
            signer.update(data).unwrap();
            signer.sign_to_vec().unwrap().try_into().unwrap()
        }

        fn public_der(&self) -> Vec<u8> {
            PKey::from_ec_key(self.ec.clone()).unwrap().public_key_to_der().unwrap()
        }
    }

    impl AuditKeys for SoftKeys {
        fn chain_mac(&self, data: &[u8]) -> Result<[u8; 32], AuditError> {
            Ok(self.mac(data))
        }

        fn checkpoint_sign(&self, data: &[u8]) -> Result<Vec<u8>, AuditError> {
            let digest = crate::crypto::sha256(data);
            let sig = EcdsaSig::sign(&digest, &self.ec).unwrap();
            let (order, half) = p256_order().unwrap();
            let mut s = sig.s().to_owned().unwrap();
            if s.ucmp(&half) == CmpOrdering::Greater {
                let mut low = BigNum::new().unwrap();
                low.checked_sub(&order, &s).unwrap();
                s = low;
            }
            let mut raw = sig.r().to_vec_padded(32).unwrap();
            raw.extend(s.to_vec_padded(32).unwrap());
            Ok(raw)
        }

        fn checkpoint_public_key(&self) -> Result<(Vec<u8>, String), AuditError> {
            Ok((self.public_der(), "audit.sign/v1".into()))
        }

        fn chain_key_label(&self) -> String {
            "audit/v1".into()
        }
    }

    fn opts(every: u64) -> AuditOptions {
        AuditOptions { checkpoint_every: every, ..AuditOptions::default() }
    }

    fn event(i: usize) -> AuditEvent {
        AuditEvent::rpc(
            "spiffe://platform/app-1",
            "data",
            "/keyward.v1.DataService/Encrypt",
            vec!["data/v1".into()],
            "ok",
            "OK",
            42,
            &format!("req-{i}"),
            vec!["c0ffee".into()],
        )
    }

    /// Writes `n` events in a fresh trail (start + n + stop + final checkpoint).
    fn write_trail(dir: &Path, keys: &Arc<SoftKeys>, every: u64, n: usize) {
        let trail = AuditTrail::open(dir, keys.clone(), opts(every)).unwrap();
        for i in 0..n {
            trail.record_blocking(event(i)).unwrap();
        }
        trail.shutdown().unwrap();
    }

    fn audit_files(dir: &Path) -> Vec<PathBuf> {
        list_audit_files(dir)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .filter(|p| fs::metadata(p).unwrap().len() > 0)
            .collect()
    }

    fn only_file(dir: &Path) -> PathBuf {
        let files = audit_files(dir);
        assert_eq!(files.len(), 1, "{files:?}");
        files[0].clone()
    }

    fn read_lines(path: &Path) -> Vec<String> {
        fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        fs::write(path, text).unwrap();
    }

    fn verify(dir: &Path, keys: &SoftKeys) -> Result<VerifyReport, VerifyFailure> {
        verify_dir(dir, keys, None, None)
    }

    /// Seq of a line.
    fn seq_of(line: &str) -> u64 {
        parse_line(line).unwrap().seq
    }

    #[test]
    fn line_format_is_exact_and_hash_recomputes() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        write_trail(dir.path(), &keys, 1000, 1);
        let file = only_file(dir.path());
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let (_, today) = utc_stamp();
        assert_eq!(name, format!("audit.{today}.jsonl"));
        let lines = read_lines(&file);
        assert_eq!(lines.len(), 4, "start, event, stop, checkpoint");
        let first = &lines[0];
        assert!(first.starts_with(&format!("{{\"v\":2,\"ts\":\"{today}T")), "{first}");
        assert!(first.contains(&format!(",\"seq\":1,\"prev_hash\":\"{}\",\"kind\":\"start\"", "0".repeat(64))));
        let ts = &first[13..40];
        assert_eq!(ts.len(), 27);
        assert!(ts.ends_with('Z') && ts.as_bytes()[19] == b'.', "{ts}");

        let ev = &lines[1];
        let order = [
            "\"ts\":",
            "\"seq\":2,",
            "\"prev_hash\":",
            "\"kind\":\"rpc\"",
            "\"client\":",
            "\"role\":\"data\"",
            "\"action\":\"/keyward.v1.DataService/Encrypt\"",
            "\"keys\":[\"data/v1\"]",
            "\"outcome\":\"ok\"",
            "\"code\":\"OK\"",
            "\"latency_us\":42",
            "\"request_id\":\"req-0\"",
            "\"subjects\":[\"c0ffee\"]",
            "\"chain_key\":\"audit/v1\"",
            "\"hash\":",
        ];
        let positions: Vec<usize> = order.iter().map(|f| ev.find(f).unwrap_or_else(|| panic!("{f} in {ev}"))).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{ev}");
        assert!(!ev.contains("\"detail\""), "absent detail is skipped");

        // hash = SHA-256(tag || 0 || u32be(len) || body), body = line minus the hash (and
        // seal) suffix; each batch's last line is sealed: start, the event, stop +
        // checkpoint were three batches.
        for (i, line) in lines.iter().enumerate() {
            let sealed = i != 2;
            let cut = HASH_SUFFIX_LEN + if sealed { FIELD_SUFFIX_LEN } else { 0 };
            let body = format!("{}}}", &line[..line.len() - cut]);
            let mut input = b"keyward/v2/audit\0".to_vec();
            input.extend((body.len() as u32).to_be_bytes());
            input.extend(body.as_bytes());
            let hash: [u8; 32] = crate::crypto::sha256(&input);
            let mut expect = format!("{},\"hash\":\"{}\"", &body[..body.len() - 1], hex::encode(hash));
            if sealed {
                let mut seal_in = b"keyward/v2/audit-seal\0".to_vec();
                seal_in.extend((i as u64 + 1).to_be_bytes());
                seal_in.extend(hash);
                expect.push_str(&format!(",\"seal\":\"{}\"", hex::encode(keys.mac(&seal_in))));
            }
            expect.push('}');
            assert_eq!(*line, expect, "line {i}");
            assert_eq!(parse_line(line).unwrap().seal.is_some(), sealed, "line {i}");
            if i > 0 {
                assert_eq!(parse_line(line).unwrap().prev_hash, parse_line(&lines[i - 1]).unwrap().hash);
            }
        }
        let cp = parse_line(&lines[3]).unwrap();
        assert_eq!(cp.str_field("kind"), Some("checkpoint"));
        assert_eq!(cp.str_field("head"), Some(hex::encode(parse_line(&lines[2]).unwrap().hash).as_str()));
        assert_eq!(cp.str_field("sig_key"), Some("audit.sign/v1"));
        assert!(lines[3].find("\"sig_key\"").unwrap() < lines[3].find("\"chain_key\"").unwrap());
        assert_eq!(read_lines(&dir.path().join(CHECKPOINTS_FILE)), vec![lines[3].clone()]);

        let report = verify(dir.path(), &keys).unwrap();
        assert_eq!((report.lines, report.checkpoints, report.last_seq, report.shipped_checkpoints), (4, 1, 4, 1));
        assert_eq!(report.head, hex::encode(parse_line(&lines[3]).unwrap().hash));
    }

    #[test]
    fn chain_continues_across_reopen_and_records_after_shutdown_fail() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        let trail = AuditTrail::open(dir.path(), keys.clone(), opts(1000)).unwrap();
        assert!(trail.healthy());
        assert_eq!(trail.record_blocking(event(0)).unwrap(), 2);
        assert_eq!(trail.record_blocking(event(1)).unwrap(), 3);
        trail.shutdown().unwrap();
        assert!(!trail.healthy());
        assert!(matches!(trail.record_blocking(event(2)), Err(AuditError::Closed)));
        trail.shutdown().unwrap();
        drop(trail);

        let trail = AuditTrail::open(dir.path(), keys.clone(), opts(1000)).unwrap();
        // 3 lines + stop + checkpoint before, then the new start line.
        assert_eq!(trail.record_blocking(event(3)).unwrap(), 7);
        drop(trail); // Drop shuts down too.
        let report = verify(dir.path(), &keys).unwrap();
        assert_eq!((report.lines, report.last_seq, report.checkpoints), (9, 9, 2));
    }

    #[test]
    fn refuses_caller_checkpoints_and_bad_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let trail = AuditTrail::open(dir.path(), SoftKeys::new(), opts(1000)).unwrap();
        let fake = AuditEvent::new(EventKind::Checkpoint, "audit.checkpoint");
        assert!(matches!(trail.record_blocking(fake), Err(AuditError::Invalid(_))));
        let odd = AuditEvent::ceremony("ceremony.rotate").with_outcome("maybe", "OK");
        assert!(matches!(trail.record_blocking(odd), Err(AuditError::Invalid(_))));
        let long = AuditEvent::ceremony("ceremony.rotate")
            .with_client("operator-1", "custodian")
            .with_key("pin.pvk/v2")
            .with_detail("é".repeat(1000));
        assert_eq!(trail.record_blocking(long).unwrap(), 2);
        trail.shutdown().unwrap();
        let line = &read_lines(&only_file(dir.path()))[1];
        let detail = parse_line(line).unwrap().str_field("detail").unwrap().to_string();
        assert_eq!(detail.len(), MAX_DETAIL);
    }

    #[test]
    fn periodic_checkpoints_and_their_copy() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        write_trail(dir.path(), &keys, 5, 12);
        let lines = read_lines(&only_file(dir.path()));
        let cps: Vec<String> = lines.iter().filter(|l| l.contains("\"kind\":\"checkpoint\"")).cloned().collect();
        // 14 non-checkpoint lines (start, 12 events, stop): after lines 5 and 10, plus the final one.
        assert_eq!(cps.len(), 3);
        assert_eq!(read_lines(&dir.path().join(CHECKPOINTS_FILE)), cps);
        let report = verify(dir.path(), &keys).unwrap();
        assert_eq!((report.checkpoints, report.shipped_checkpoints, report.lines), (3, 3, 17));
        // An explicit public key works the same.
        verify_dir(dir.path(), keys.as_ref(), Some(&keys.public_der()), None).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn burst_of_5000_concurrent_records_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        let trail = Arc::new(AuditTrail::open(dir.path(), keys.clone(), AuditOptions::default()).unwrap());
        let mut tasks = Vec::new();
        for i in 0..5000 {
            let trail = trail.clone();
            tasks.push(tokio::spawn(async move { trail.record(event(i)).await }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 5000);
        trail.shutdown().unwrap();

        let lines: Vec<String> = audit_files(dir.path()).iter().flat_map(|f| read_lines(f)).collect();
        let rpc = lines.iter().filter(|l| l.contains("\"kind\":\"rpc\"")).count();
        assert_eq!(rpc, 5000);
        let all: Vec<u64> = lines.iter().map(|l| seq_of(l)).collect();
        assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
        let report = verify(dir.path(), &keys).unwrap();
        // start + 5000 + stop = 5002 lines: checkpoints after 1000..5000 and the final one.
        assert_eq!((report.lines, report.checkpoints), (5008, 6));
    }

    #[test]
    fn two_writers_share_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        let appliance = AuditTrail::open(dir.path(), keys.clone(), opts(7)).unwrap();
        let ceremony = AuditTrail::open(
            dir.path(),
            keys.clone(),
            AuditOptions { checkpoint_every: 7, writer_name: "ceremony".into(), ..AuditOptions::default() },
        )
        .unwrap();
        let mut last = 2;
        for i in 0..20 {
            let seq = if i % 3 == 0 {
                ceremony.record_blocking(AuditEvent::ceremony("ceremony.rotate").with_client("op", "custodian"))
            } else {
                appliance.record_blocking(event(i))
            }
            .unwrap();
            assert!(seq > last);
            last = seq;
        }
        ceremony.shutdown().unwrap();
        appliance.record_blocking(event(99)).unwrap();
        appliance.shutdown().unwrap();
        let lines = read_lines(&only_file(dir.path()));
        assert_eq!(lines.iter().filter(|l| l.contains("\"kind\":\"start\"")).count(), 2);
        verify(dir.path(), &keys).unwrap();
    }

    #[test]
    fn torn_last_line_is_dropped_and_noted() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        write_trail(dir.path(), &keys, 1000, 2);
        let file = only_file(dir.path());
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(b"{\"ts\":\"2026-").unwrap();
        drop(f);
        let report = verify(dir.path(), &keys).unwrap();
        assert!(report.torn_tail.is_some());

        let trail = AuditTrail::open(dir.path(), keys.clone(), opts(1000)).unwrap();
        trail.shutdown().unwrap();
        let lines = read_lines(&file);
        let start = parse_line(&lines[lines.len() - 3]).unwrap();
        assert_eq!(start.str_field("kind"), Some("start"));
        assert!(start.str_field("detail").unwrap().contains("incomplete last line (12 bytes)"));
        let report = verify(dir.path(), &keys).unwrap();
        assert_eq!(report.torn_tail, None);
    }

    #[test]
    fn torn_line_from_another_writer_is_repaired_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        let trail = AuditTrail::open(dir.path(), keys.clone(), opts(1000)).unwrap();
        trail.record_blocking(event(0)).unwrap();
        // Another process died half-way through a line.
        let file = only_file(dir.path());
        OpenOptions::new().append(true).open(&file).unwrap().write_all(b"{\"ts\"").unwrap();
        assert_eq!(trail.record_blocking(event(1)).unwrap(), 4, "a repair line comes first");
        trail.shutdown().unwrap();
        let repair = parse_line(&read_lines(&file)[2]).unwrap();
        assert_eq!(repair.str_field("action"), Some("audit.repair"));
        assert!(repair.str_field("detail").unwrap().contains("(5 bytes)"));
        verify(dir.path(), &keys).unwrap();
    }

    #[test]
    fn a_new_day_opens_with_a_checkpoint_of_the_old_head() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        write_trail(dir.path(), &keys, 1000, 1);
        let old = dir.path().join("audit.2000-01-01.jsonl");
        fs::rename(only_file(dir.path()), &old).unwrap();
        let old_head = parse_line(read_lines(&old).last().unwrap()).unwrap().hash;

        write_trail(dir.path(), &keys, 1000, 1);
        let files = audit_files(dir.path());
        assert_eq!(files.len(), 2);
        let new = read_lines(&files[1]);
        let first = parse_line(&new[0]).unwrap();
        assert_eq!(first.str_field("kind"), Some("checkpoint"));
        assert_eq!(first.seq, 5);
        assert_eq!(first.str_field("head"), Some(hex::encode(old_head).as_str()));
        let report = verify(dir.path(), &keys).unwrap();
        assert_eq!(report.files.len(), 2);
        assert_eq!(report.checkpoints, 3);
    }

    #[test]
    fn failed_write_turns_unhealthy_and_recovers() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("audit");
        let moved = parent.path().join("audit.moved");
        let keys = SoftKeys::new();
        let trail = AuditTrail::open(&dir, keys.clone(), opts(1000)).unwrap();
        assert_eq!(trail.record_blocking(event(0)).unwrap(), 2);

        // Tests run as root, where permissions do not stop writes: put a file where the
        // directory was instead.
        fs::rename(&dir, &moved).unwrap();
        fs::write(&dir, b"not a directory").unwrap();
        let err = trail.record_blocking(event(1)).unwrap_err();
        assert!(matches!(err, AuditError::Io { .. }), "{err}");
        assert!(!trail.healthy());
        assert!(trail.record_blocking(event(2)).is_err());

        fs::remove_file(&dir).unwrap();
        fs::rename(&moved, &dir).unwrap();
        // The failed lines consumed no seq.
        assert_eq!(trail.record_blocking(event(3)).unwrap(), 3);
        assert!(trail.healthy());
        trail.shutdown().unwrap();
        let report = verify(&dir, &keys).unwrap();
        assert_eq!(report.last_seq, 5);
    }

    #[test]
    fn writes_into_a_replaced_directory_are_not_acknowledged() {
        // The appender keeps its file open: after the directory is swapped for an empty
        // one, its writes go to the old file, and the end-of-file check must notice.
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("audit");
        let keys = SoftKeys::new();
        let trail = AuditTrail::open(&dir, keys.clone(), opts(1000)).unwrap();
        fs::rename(&dir, parent.path().join("old")).unwrap();
        fs::create_dir(&dir).unwrap();
        assert!(trail.record_blocking(event(0)).is_err());
        assert!(!trail.healthy());
        // The next batch starts over from what the new directory holds.
        assert!(trail.record_blocking(event(1)).is_ok());
        assert!(trail.healthy());
        trail.shutdown().unwrap();
    }

    /// A sealed format 2 line for `body`, as someone holding the chain key could write it.
    fn reseal(keys: &SoftKeys, body: &str, seq: u64) -> String {
        let hash = line_hash(body.as_bytes());
        let seal = keys.mac(&seal_input(seq, &hash));
        format!("{},\"hash\":\"{}\",\"seal\":\"{}\"}}", &body[..body.len() - 1], hex::encode(hash), hex::encode(seal))
    }

    /// A verified trail of 10 events (lines 1..=13: start, events, stop, checkpoint).
    fn damaged_fixture(every: u64) -> (tempfile::TempDir, Arc<SoftKeys>, PathBuf, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        write_trail(dir.path(), &keys, every, 10);
        let file = only_file(dir.path());
        let lines = read_lines(&file);
        verify(dir.path(), &keys).unwrap();
        (dir, keys, file, lines)
    }

    fn expect_failure(dir: &Path, keys: &SoftKeys, kind: FailureKind, line: u64, seq: Option<u64>) -> VerifyFailure {
        let f = verify(dir, keys).unwrap_err();
        assert_eq!((f.kind, f.line, f.seq), (kind, Some(line), seq), "{f}");
        assert!(f.file.as_deref().is_some_and(|n| n.starts_with("audit.")), "{f}");
        f
    }

    #[test]
    fn detects_an_edited_field() {
        let (dir, keys, file, mut lines) = damaged_fixture(1000);
        lines[4] = lines[4].replace("\"latency_us\":42", "\"latency_us\":43");
        write_lines(&file, &lines);
        let f = expect_failure(dir.path(), &keys, FailureKind::Edited, 5, Some(5));
        assert!(f.to_string().contains("line 5 (seq 5): edited"), "{f}");
    }

    #[test]
    fn detects_a_removed_line() {
        let (dir, keys, file, mut lines) = damaged_fixture(1000);
        lines.remove(4);
        write_lines(&file, &lines);
        expect_failure(dir.path(), &keys, FailureKind::Removed, 5, Some(6));
    }

    #[test]
    fn detects_an_inserted_copy() {
        let (dir, keys, file, mut lines) = damaged_fixture(1000);
        let copy = lines[2].clone();
        lines.insert(6, copy);
        write_lines(&file, &lines);
        expect_failure(dir.path(), &keys, FailureKind::Inserted, 7, Some(3));
    }

    #[test]
    fn detects_a_well_formed_line_from_another_trail() {
        let (dir, keys, file, mut lines) = damaged_fixture(1000);
        // Another appliance with the same keys: its seq 5 is well formed and MAC-valid.
        let other = tempfile::tempdir().unwrap();
        write_trail(other.path(), &keys, 1000, 10);
        let foreign = read_lines(&only_file(other.path()))[4].clone();
        lines.insert(4, foreign);
        write_lines(&file, &lines);
        expect_failure(dir.path(), &keys, FailureKind::Inserted, 5, Some(5));
    }

    #[test]
    fn detects_swapped_lines() {
        let (dir, keys, file, mut lines) = damaged_fixture(1000);
        lines.swap(5, 6);
        write_lines(&file, &lines);
        expect_failure(dir.path(), &keys, FailureKind::Reordered, 6, Some(7));
    }

    #[test]
    fn detects_lines_moved_far() {
        let (dir, keys, file, mut lines) = damaged_fixture(1000);
        let moved = lines.remove(3);
        lines.insert(8, moved);
        write_lines(&file, &lines);
        expect_failure(dir.path(), &keys, FailureKind::Reordered, 4, Some(5));
    }

    #[test]
    fn detects_truncation_before_a_shipped_checkpoint() {
        let (dir, keys, file, lines) = damaged_fixture(4);
        let cps: Vec<u64> = read_lines(&dir.path().join(CHECKPOINTS_FILE)).iter().map(|l| seq_of(l)).collect();
        assert_eq!(cps.len(), 4);
        // Cut the file at a batch boundary (a sealed line) before the last checkpoint but
        // one: the line just before a periodic checkpoint shares its batch, so two back.
        let keep = (cps[2] - 2) as usize;
        write_lines(&file, &lines[..keep]);
        let f = expect_failure(dir.path(), &keys, FailureKind::Truncated, keep as u64 + 1, Some(cps[2]));
        assert!(f.to_string().contains(&format!("truncated: checkpoint seq {} missing", cps[2])), "{f}");
        // Without the shipped copy the shortened chain is consistent: that is what the copy is for.
        fs::rename(dir.path().join(CHECKPOINTS_FILE), dir.path().join("elsewhere.jsonl")).unwrap();
        verify(dir.path(), &keys).unwrap();
        let copy = dir.path().join("elsewhere.jsonl");
        assert_eq!(verify_dir(dir.path(), keys.as_ref(), None, Some(&copy)).unwrap_err().kind, FailureKind::Truncated);
    }

    #[test]
    fn detects_a_rewritten_checkpoint_against_the_copy() {
        let (dir, keys, file, lines) = damaged_fixture(4);
        // Rewrite the tail with the keys (a user-PIN holder can): the chain is valid again
        // but the checkpoint at that seq differs from the shipped copy.
        let cut = seq_of(read_lines(&dir.path().join(CHECKPOINTS_FILE)).last().unwrap()) - 3;
        write_lines(&file, &lines[..cut as usize]);
        let trail = AuditTrail::open(dir.path(), keys.clone(), opts(4)).unwrap();
        trail.shutdown().unwrap();
        let f = verify(dir.path(), &keys).unwrap_err();
        assert_eq!(f.kind, FailureKind::Edited, "{f}");
        assert!(f.detail.contains("shipped copy"), "{f}");
    }

    #[test]
    fn refuses_high_s_and_foreign_checkpoint_signatures() {
        let (dir, keys, file, mut lines) = damaged_fixture(1000);
        let last = lines.len() - 1;
        let cp = parse_line(&lines[last]).unwrap();
        let sig = hex::decode(cp.str_field("sig").unwrap()).unwrap();
        let (order, _) = p256_order().unwrap();
        let mut high = BigNum::new().unwrap();
        high.checked_sub(&order, &BigNum::from_slice(&sig[32..]).unwrap()).unwrap();
        let mut flipped = sig[..32].to_vec();
        flipped.extend(high.to_vec_padded(32).unwrap());
        // Re-MAC the edited line as someone holding the chain key could.
        let body = cp.body.replace(&hex::encode(&sig), &hex::encode(&flipped));
        lines[last] = reseal(&keys, &body, cp.seq);
        write_lines(&file, &lines);
        fs::remove_file(dir.path().join(CHECKPOINTS_FILE)).unwrap();
        let f = expect_failure(dir.path(), &keys, FailureKind::BadCheckpoint, 13, Some(13));
        assert!(f.detail.contains("high-S"), "{f}");

        // The original signature, checked against some other key.
        let (dir, keys, _, _) = damaged_fixture(1000);
        let other = SoftKeys::new();
        let f = verify_dir(dir.path(), keys.as_ref(), Some(&other.public_der()), None).unwrap_err();
        assert_eq!((f.kind, f.line), (FailureKind::BadCheckpoint, Some(13)), "{f}");
    }

    #[test]
    fn detects_a_line_under_another_chain_key() {
        let (dir, _, _, _) = damaged_fixture(1000);
        let mut other = SoftKeys::new();
        Arc::get_mut(&mut other).unwrap().mac_key = vec![7; 32];
        let f = verify(dir.path(), &other).unwrap_err();
        assert_eq!((f.kind, f.line), (FailureKind::Edited, Some(1)), "{f}");
    }

    #[test]
    fn json_strings_are_escaped_as_serde_json_escapes_them() {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é€𝄞\u{7f}\u{2028}");
        for s in [all.as_str(), "", "plain", "\"\\", "a\u{0}b"] {
            let mut ours = String::new();
            push_json_str(&mut ours, s);
            assert_eq!(ours, serde_json::to_string(s).unwrap());
        }
        // A whole body parses back to the event.
        let ev = event(3).with_detail("quote \" and \n newline");
        let mut body = String::new();
        write_body(&mut body, "2026-12-07T00:00:00.000000Z", 9, &[7; 32], &ev, None, "audit/v1");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["detail"], "quote \" and \n newline");
        assert_eq!(v["keys"], serde_json::json!(["data/v1"]));
        assert_eq!(v["prev_hash"], hex::encode([7; 32]));
    }

    /// A format 2 line after `prev` (seq, hash) without a seal, as anyone could write it.
    fn forged_line(prev: &str, seal: Option<[u8; 32]>) -> String {
        let p = parse_line(prev).unwrap();
        let mut body = String::new();
        write_body(&mut body, "2026-12-07T00:00:00.000000Z", p.seq + 1, &p.hash, &event(99), None, "audit/v1");
        let hash = line_hash(body.as_bytes());
        let mut line = format!("{},\"hash\":\"{}\"", &body[..body.len() - 1], hex::encode(hash));
        if let Some(seal) = seal {
            line.push_str(&format!(",\"seal\":\"{}\"", hex::encode(seal)));
        }
        line.push('}');
        line
    }

    #[test]
    fn an_unsealed_tail_is_refused_and_the_next_writer_drops_it() {
        let (dir, keys, file, mut lines) = damaged_fixture(1000);
        let forged = forged_line(lines.last().unwrap(), None);
        lines.push(forged.clone());
        lines.push(forged_line(&forged, None));
        write_lines(&file, &lines);
        let f = expect_failure(dir.path(), &keys, FailureKind::Unsealed, 14, Some(14));
        assert!(f.detail.contains("seq 14 to 15"), "{f}");
        // A writer continues from the last sealed line, not from the forged ones.
        let trail = AuditTrail::open(dir.path(), keys.clone(), opts(1000)).unwrap();
        trail.shutdown().unwrap();
        let after = read_lines(&file);
        assert!(!after.contains(&forged));
        let start = parse_line(&after[13]).unwrap();
        assert_eq!((start.seq, start.str_field("kind")), (14, Some("start")));
        assert!(start.str_field("detail").unwrap().contains("dropped 2 unsealed line(s)"), "{:?}", start.fields);
        verify(dir.path(), &keys).unwrap();
    }

    #[test]
    fn a_forged_seal_stops_the_writer_and_the_verifier() {
        let (dir, keys, file, mut lines) = damaged_fixture(1000);
        lines.push(forged_line(lines.last().unwrap(), Some([0x5a; 32])));
        write_lines(&file, &lines);
        let f = expect_failure(dir.path(), &keys, FailureKind::Edited, 14, Some(14));
        assert!(f.detail.contains("seal does not verify"), "{f}");
        match AuditTrail::open(dir.path(), keys.clone(), opts(1000)) {
            Err(AuditError::Corrupt(why)) => assert!(why.contains("does not verify"), "{why}"),
            other => panic!("a writer sealed over a forged line: {other:?}"),
        }
        // Lines rewritten and re-hashed up to a seal: caught at the seal.
        let (dir, keys, file, mut lines) = damaged_fixture(4);
        let inner = (1..lines.len()).find(|&i| parse_line(&lines[i]).unwrap().seal.is_none()).unwrap();
        let sealed_after = (inner..lines.len()).find(|&i| parse_line(&lines[i]).unwrap().seal.is_some()).unwrap();
        let p = parse_line(&lines[inner]).unwrap();
        let edited = p.body.replace("\"outcome\":\"ok\"", "\"outcome\":\"denied\"");
        assert_ne!(edited, p.body);
        let hash = line_hash(edited.as_bytes());
        lines[inner] = format!("{},\"hash\":\"{}\"}}", &edited[..edited.len() - 1], hex::encode(hash));
        let mut prev = hash;
        for line in &mut lines[inner + 1..=sealed_after] {
            let q = parse_line(line).unwrap();
            let body = q.body.replace(&hex::encode(q.prev_hash), &hex::encode(prev));
            let h = line_hash(body.as_bytes());
            let seal = q.seal.map(|s| format!(",\"seal\":\"{}\"", hex::encode(s))).unwrap_or_default();
            *line = format!("{},\"hash\":\"{}\"{seal}}}", &body[..body.len() - 1], hex::encode(h));
            prev = h;
        }
        write_lines(&file, &lines);
        fs::remove_file(dir.path().join(CHECKPOINTS_FILE)).unwrap();
        let f = verify(dir.path(), &keys).unwrap_err();
        assert_eq!((f.kind, f.line), (FailureKind::Edited, Some(sealed_after as u64 + 1)), "{f}");
    }

    #[test]
    fn format_1_lines_continue_into_format_2() {
        let dir = tempfile::tempdir().unwrap();
        let keys = SoftKeys::new();
        let (ts, today) = utc_stamp();
        // Two lines as the format 1 writer wrote them: a keyed hash per line, no `v`.
        let mut prev = GENESIS_HASH;
        let mut v1 = Vec::new();
        for seq in 1..=2u64 {
            let body = format!(
                "{{\"ts\":\"{ts}\",\"seq\":{seq},\"prev_hash\":\"{}\",\"kind\":\"rpc\",\"client\":\"c\",\"role\":\"r\",\
                 \"action\":\"a\",\"keys\":[],\"outcome\":\"ok\",\"code\":\"OK\",\"latency_us\":1,\"request_id\":\"x\",\
                 \"subjects\":[],\"chain_key\":\"audit/v1\"}}",
                hex::encode(prev)
            );
            let mac = keys.mac(&chain_mac_input(body.as_bytes()));
            v1.push(format!("{},\"hash\":\"{}\"}}", &body[..body.len() - 1], hex::encode(mac)));
            prev = mac;
        }
        let file = dir.path().join(format!("audit.{today}.jsonl"));
        write_lines(&file, &v1);
        assert_eq!(verify(dir.path(), &keys).unwrap().lines, 2);
        write_trail(dir.path(), &keys, 1000, 3);
        let report = verify(dir.path(), &keys).unwrap();
        assert_eq!((report.lines, report.last_seq), (2 + 1 + 3 + 2, 8));
        let lines = read_lines(&file);
        assert_eq!(parse_line(&lines[2]).unwrap().format, 2);
        assert_eq!(parse_line(&lines[2]).unwrap().prev_hash, prev);
        // A format 1 line edited: its keyed hash no longer matches.
        let mut bad = lines.clone();
        bad[1] = bad[1].replace("\"client\":\"c\"", "\"client\":\"d\"");
        write_lines(&file, &bad);
        fs::remove_file(dir.path().join(CHECKPOINTS_FILE)).unwrap();
        assert_eq!(verify(dir.path(), &keys).unwrap_err().kind, FailureKind::Edited);
    }

    #[test]
    fn normalise_low_s_flips_high_s_only() {
        let keys = SoftKeys::new();
        let low = keys.checkpoint_sign(b"x").unwrap();
        assert_eq!(normalise_low_s(&low).unwrap().to_vec(), low);
        let (order, _) = p256_order().unwrap();
        let mut high = BigNum::new().unwrap();
        high.checked_sub(&order, &BigNum::from_slice(&low[32..]).unwrap()).unwrap();
        let mut raw = low[..32].to_vec();
        raw.extend(high.to_vec_padded(32).unwrap());
        assert_eq!(normalise_low_s(&raw).unwrap().to_vec(), low);
        assert!(matches!(normalise_low_s(&low[..63]), Err(AuditError::Token(_))));
    }
}
