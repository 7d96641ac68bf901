#![forbid(unsafe_code)]
//! keyward: a payment security appliance whose keys live in a PKCS#11 token.
//!
//! Layers: [`hsm`] (the only cryptoki user) -> [`appliance`] (gRPC services, auth,
//! audit) -> the command-line tools ([`ceremony`], [`bench`], [`demo`]).

pub mod appliance;
pub mod bench;
pub mod ceremony;
pub mod client;
pub mod config;
pub mod crypto;
pub mod ecash;
pub mod demo;
pub mod hsm;
pub mod pki;
pub mod sim;

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
use std::process::ExitCode;

/// Generated gRPC types and services (`proto/keyward/v1`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("keyward.v1");
    /// Encoded descriptors for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keyward_descriptor");

    /// Debug of messages that carry a PIN block, code, seed, blob, identity data or an
    /// e-cash account reference: the type name only.
    macro_rules! redacted_debug {
        ($($t:ident),*) => {
            $(impl std::fmt::Debug for $t {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str(concat!(stringify!($t), " { .. }"))
                }
            })*
        };
    }
    redacted_debug!(
        EncryptedPin,
        TranslatePinResponse,
        IssueCodeResponse,
        VerifyCodeRequest,
        EnrollTotpResponse,
        EnrollHotpResponse,
        VerifyTotpRequest,
        VerifyHotpRequest,
        Binding,
        Identity,
        MaskedBinding,
        BlindIndexRequest,
        CertifyDeviceRequest,
        CertifyDeviceResponse,
        IssueVoucherRequest,
        VerifyPaymentsRequest
    );

    /// Never prints the account number or phone number.
    impl std::fmt::Debug for Account {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let kind = match &self.kind {
                Some(account::Kind::Pan(p)) => format!("pan, {} characters", p.chars().count()),
                Some(account::Kind::Phone(p)) => format!("phone, {} characters", p.chars().count()),
                None => "none".into(),
            };
            write!(f, "Account({kind})")
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// `keyward audit verify`: 0 intact, 1 tampered, 2 could not check.
pub fn audit_verify(
    dir: &Path,
    public_key: Option<&Path>,
    checkpoints: Option<&Path>,
    expect_head: Option<&str>,
    allow_empty: bool,
    token: &ceremony::TokenArgs,
) -> ExitCode {
    let expect_head = match expect_head.map(appliance::audit::parse_head_arg).transpose() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("--expect-head: {e}");
            return ExitCode::from(2);
        }
    };
    let pk_der = match public_key {
        Some(p) => match std::fs::read(p)
            .map_err(|e| e.to_string())
            .and_then(|pem| openssl::pkey::PKey::public_key_from_pem(&pem).map_err(|e| e.to_string()))
            .and_then(|k| k.public_key_to_der().map_err(|e| e.to_string()))
        {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("--public-key {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let mut args = token.clone();
    if args.audit_dir.is_none() {
        args.audit_dir = Some(dir.to_path_buf());
    }
    let hsm = match ceremony::open_token_only(&args) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("keyward audit verify: {e}");
            return ExitCode::from(2);
        }
    };
    let keys = appliance::audit_keys::TokenAuditKeys::new(hsm);
    let opts = appliance::audit::VerifyOptions {
        public_key_der: pk_der.as_deref(),
        checkpoints_file: checkpoints,
        expect_head,
        allow_empty,
    };
    match appliance::audit::verify_dir_with(dir, &keys, &opts) {
        Ok(report) => {
            println!(
                "intact: {} line(s) in {} file(s), {} signed checkpoint(s) ({} in the shipped copy), last seq {}, head {}",
                report.lines,
                report.files.len(),
                report.checkpoints,
                report.shipped_checkpoints,
                report.last_seq,
                report.head
            );
            if let Some((seq, _)) = expect_head {
                println!("expected head seq {seq} found");
            }
            if let Some(t) = report.torn_tail {
                println!("note: {t}");
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            match failure.kind {
                appliance::audit::FailureKind::Empty => println!("REFUSED: {failure} (--allow-empty accepts it)"),
                appliance::audit::FailureKind::Unreadable => {
                    println!("NOT CHECKED: {failure}");
                    return ExitCode::from(2);
                }
                appliance::audit::FailureKind::Unsealed => println!("UNSEALED: {failure}"),
                _ => println!("TAMPERED: {failure}"),
            }
            ExitCode::from(1)
        }
    }
}
