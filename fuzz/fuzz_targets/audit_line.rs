//! The audit trail verifier (src/appliance/audit.rs): its line parser (`parse_line`,
//! through `fuzz_parse_line`) on every line of the input, then `verify_dir` on the
//! input laid out as a trail: the bytes before the first form feed (0x0C) are the
//! first day's file, the bytes after it the second day's, and the bytes after a
//! second form feed the shipped checkpoint copy (`checkpoints.jsonl`).
//!
//! The token is a software stand-in: the chain MAC is SHA-256 (no key), the
//! checkpoint key a fixed P-256 key, so the seeds (written by the real `AuditTrail`
//! writer) verify. Invariants: no panic; a trail that verifies has as many lines as
//! it reports, and each of them parses.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use keyward::appliance::audit::{
    fuzz_parse_line, verify_dir, AuditError, AuditEvent, AuditKeys, AuditOptions, AuditTrail, EventKind,
    CHECKPOINTS_FILE,
};
use libfuzzer_sys::fuzz_target;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};

const DAY1: &str = "audit.2026-01-01.jsonl";
const DAY2: &str = "audit.2026-01-02.jsonl";
const N_HEX: &str = "FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551";

struct FuzzKeys {
    ec: EcKey<Private>,
    der: Vec<u8>,
}

fn keys() -> &'static FuzzKeys {
    static K: OnceLock<FuzzKeys> = OnceLock::new();
    K.get_or_init(|| make_keys().unwrap_or_else(|e| panic!("fixed P-256 key: {e}")))
}

fn make_keys() -> Result<FuzzKeys, openssl::error::ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let d = BigNum::from_hex_str("C9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721")?;
    let mut ctx = BigNumContext::new()?;
    let mut q = EcPoint::new(&group)?;
    q.mul_generator2(&group, &d, &mut ctx)?;
    let ec = EcKey::from_private_components(&group, &d, &q)?;
    let der = PKey::from_ec_key(ec.clone())?.public_key_to_der()?;
    Ok(FuzzKeys { ec, der })
}

fn sign_low_s(ec: &EcKey<Private>, data: &[u8]) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let digest = openssl::sha::sha256(data);
    let sig = EcdsaSig::sign(&digest, ec)?;
    let n = BigNum::from_hex_str(N_HEX)?;
    let mut half = BigNum::new()?;
    half.rshift1(&n)?;
    let mut s = sig.s().to_owned()?;
    if s.ucmp(&half) == std::cmp::Ordering::Greater {
        let mut low = BigNum::new()?;
        low.checked_sub(&n, &s)?;
        s = low;
    }
    let mut raw = sig.r().to_vec_padded(32)?;
    raw.extend(s.to_vec_padded(32)?);
    Ok(raw)
}

struct Soft;

impl AuditKeys for Soft {
    fn chain_mac(&self, data: &[u8]) -> Result<[u8; 32], AuditError> {
        Ok(openssl::sha::sha256(data))
    }
    fn checkpoint_sign(&self, data: &[u8]) -> Result<Vec<u8>, AuditError> {
        sign_low_s(&keys().ec, data).map_err(|e| AuditError::Token(e.to_string()))
    }
    fn checkpoint_public_key(&self) -> Result<(Vec<u8>, String), AuditError> {
        Ok((keys().der.clone(), "audit.sign/v1".into()))
    }
    fn chain_key_label(&self) -> String {
        "audit/v1".into()
    }
}

fn work_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| std::env::temp_dir().join(format!("keyward-fuzz-audit-{}", std::process::id())))
}

fn put(dir: &std::path::Path, name: &str, part: Option<&[u8]>) {
    let path = dir.join(name);
    match part {
        Some(b) => std::fs::write(&path, b).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        None => {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fuzz_target!(init: {
    keyward_fuzz::write_seeds_if_asked(seeds);
    let _ = std::fs::create_dir_all(work_dir());
}, |data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.split(['\n', '\x0C']) {
            if let Ok((_, _, _)) = fuzz_parse_line(line) {
                assert!(line.ends_with("\"}"));
            }
        }
    }
    let mut parts = data.splitn(3, |&b| b == 0x0C);
    let (day1, day2, shipped) = (parts.next(), parts.next(), parts.next());
    let dir = work_dir();
    put(dir, DAY1, day1);
    put(dir, DAY2, day2);
    put(dir, CHECKPOINTS_FILE, shipped);
    if let Ok(report) = verify_dir(dir, &Soft, None, None) {
        let complete = |p: Option<&[u8]>| p.map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count() as u64);
        assert_eq!(report.lines, complete(day1) + complete(day2), "lines counted");
    }
});

/// Trails written by the real writer with the stand-in keys: one file, the same
/// split over two days, and with its checkpoints as the shipped copy.
fn seeds() -> Vec<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("keyward-fuzz-audit-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = AuditOptions { checkpoint_every: 3, max_batch: 8, writer_name: "fuzz".into(), ..AuditOptions::default() };
    let Ok(trail) = AuditTrail::open(&dir, Arc::new(Soft), opts) else { return Vec::new() };
    for i in 0..7u64 {
        let ev = AuditEvent::new(EventKind::Rpc, format!("keyward.v1.Data/Encrypt#{i}"))
            .with_client("client-1", "operator")
            .with_outcome("ok", "OK")
            .with_latency_us(100 + i)
            .with_key("data/v1");
        let _ = trail.record_blocking(ev);
    }
    let _ = trail.shutdown();
    let mut text = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        for n in names.iter().filter(|n| n.extension().is_some_and(|e| e == "jsonl")) {
            text.extend(std::fs::read(n).unwrap_or_default());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
    let half = lines.len() / 2;
    let mut split = lines[..half].concat();
    split.push(0x0C);
    split.extend(lines[half..].concat());
    const CP: &[u8] = b"\"kind\":\"checkpoint\"";
    let mut shipped = text.clone();
    shipped.push(0x0C);
    shipped.push(0x0C);
    for l in &lines {
        if l.windows(CP.len()).any(|w| w == CP) {
            shipped.extend_from_slice(l);
        }
    }
    vec![text, split, shipped]
}
