//! `keyward demo`: from nothing to a working appliance on an embedded default — a
//! fresh state directory (SoftHSM token via softhsm-setup, development PKI, the keys
//! `ceremony init` makes), the appliance on a free loopback port, the flows a client
//! runs, a refused call, the audit trail verified, a clean shutdown. The set-up
//! helpers here are also what the integration tests and `keyward bench` use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use tonic::Code;

use crate::appliance::server;
use crate::ceremony::{self, Ceremony, TokenArgs};
use crate::client::{self, ClientTls, Clients};
use crate::config::Config;
use crate::crypto::pin::Account;
use crate::hsm::{Algorithm, KeyClass};
use crate::proto::{
    account, pin_source, Account as AccountMsg, DecryptRequest, Dukpt, EncryptRequest, EncryptedPin,
    ExportTerminalKeyRequest, GenerateMacRequest, GeneratePinVerificationDataRequest, GetKeyRequest, ListKeysRequest,
    PinBlockFormat, PinSource, PinVerificationMethod, PingRequest, TranslatePinRequest, VerifyMacRequest,
    VerifyPinRequest, ZoneKey, CodeVerdict, EnrollTotpRequest, IssueCodeRequest, TransactionContext, VerifyCodeRequest,
    VerifyTotpRequest,
};
use crate::sim::terminal::Terminal;
use zeroize::Zeroizing;

pub(crate) mod binding;
mod ecash;

/// Clients the demo PKI issues; the example config gives each a role.
pub const DEMO_CLIENTS: [&str; 10] =
    ["admin", "hub", "auditor", "bench", "switch", "activation", "kif", "ecash", "service", "lookup"];

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// State directory; wiped and made anew (default: $TMPDIR/keyward-demo).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Example appliance config the demo instantiates.
    #[arg(long, default_value = "pkcs11-config/appliance.toml")]
    pub config_template: PathBuf,
    /// Key profile for `ceremony init`.
    #[arg(long, default_value = "pkcs11-config/key-profile.toml")]
    pub profile: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Step(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Ceremony(#[from] ceremony::CeremonyError),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error("unexpected answer: {0}")]
    Status(#[from] tonic::Status),
    #[error("terminal: {0}")]
    Terminal(#[from] crate::sim::terminal::TerminalError),
}

/// A prepared state directory.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub dir: PathBuf,
    pub pki: PathBuf,
    /// The instantiated appliance config.
    pub config: PathBuf,
    /// What softhsm-setup exported (SOFTHSM2_CONF, KEYWARD_PKCS11_MODULE, ...).
    pub exports: BTreeMap<String, String>,
}

/// Finds a repository file from the current directory or the crate's source directory.
pub fn repo_file(rel: &Path) -> PathBuf {
    if rel.is_absolute() || rel.exists() {
        return rel.to_path_buf();
    }
    let from_src = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if from_src.exists() {
        from_src
    } else {
        rel.to_path_buf()
    }
}

/// Runs `softhsm-setup/setup.sh DIR` (installs what is missing, makes the token) and
/// returns its exports.
pub fn setup_token(dir: &Path) -> Result<BTreeMap<String, String>, DemoError> {
    let script = repo_file(Path::new("softhsm-setup/setup.sh"));
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| DemoError::Step(format!("{}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(DemoError::Step(format!("{} failed ({})", script.display(), out.status)));
    }
    let mut exports = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((k, v)) = line.strip_prefix("export ").and_then(|l| l.split_once('=')) {
            exports.insert(k.to_string(), unquote(v));
        }
    }
    if !exports.contains_key("SOFTHSM2_CONF") {
        return Err(DemoError::Step("softhsm-setup printed no SOFTHSM2_CONF".into()));
    }
    Ok(exports)
}

/// Undoes bash `printf %q` quoting for the plain paths setup.sh prints.
fn unquote(v: &str) -> String {
    let v = v.trim();
    if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return inner.to_string();
    }
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Makes a state directory ready: token, PKI and an instantiated config listening on
/// `listen`. Sets SOFTHSM2_CONF for this process: call it before any token is opened.
pub fn prepare(dir: &Path, template: &Path, listen: &str) -> Result<Prepared, DemoError> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let exports = setup_token(&dir)?;
    if let Some(conf) = exports.get("SOFTHSM2_CONF") {
        std::env::set_var("SOFTHSM2_CONF", conf);
    }
    let pki = dir.join("pki");
    if !pki.join("ca.crt").exists() {
        let names: Vec<String> = DEMO_CLIENTS.iter().map(|s| s.to_string()).collect();
        crate::pki::write_dev_pki(&pki, &names, &crate::pki::DevPkiOptions::default())
            .map_err(|e| DemoError::Step(format!("dev-pki: {e}")))?;
    }
    let template = repo_file(template);
    let text = std::fs::read_to_string(&template)
        .map_err(|e| DemoError::Step(format!("{}: {e}", template.display())))?;
    let module = exports.get("KEYWARD_PKCS11_MODULE").cloned().unwrap_or_else(|| "/usr/lib/softhsm/libsofthsm2.so".into());
    let label = exports.get("KEYWARD_TOKEN_LABEL").cloned().unwrap_or_else(|| "keyward".into());
    let text = text
        .replace("${KEYWARD_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}", &module)
        .replace("${KEYWARD_TOKEN_LABEL:-keyward}", &label)
        .replace("${KEYWARD_LISTEN:-127.0.0.1:50051}", listen)
        .replace("${KEYWARD_STATE}", &dir.display().to_string());
    let config = dir.join("appliance.toml");
    std::fs::write(&config, text)?;
    Ok(Prepared { dir, pki, config, exports })
}

/// `ceremony init` with `profile` against the prepared token; prints the table.
pub fn ceremony_init(p: &Prepared, profile: &Path) -> Result<Vec<crate::hsm::KeyMeta>, DemoError> {
    let args = TokenArgs {
        config: Some(p.config.clone()),
        module: PathBuf::new(),
        token_label: String::new(),
        audit_dir: None,
    };
    let mut c = Ceremony::open(&args)?;
    let profile = ceremony::read_profile(&repo_file(profile))?;
    c.init(&profile)?;
    let keys = c.list();
    c.close()?;
    Ok(keys)
}

/// A ceremony on the prepared token (its config gives the token and audit settings).
pub fn open_ceremony(p: &Prepared) -> Result<Ceremony, DemoError> {
    let args = TokenArgs { config: Some(p.config.clone()), module: PathBuf::new(), token_label: String::new(), audit_dir: None };
    Ok(Ceremony::open(&args)?)
}

/// The key-injection facility's transport key for terminals: two random custodian
/// components imported into the token as a new version of `name` (class K0,
/// AES-256) with `ceremony import-components`; the same clear value is what a
/// terminal gets keyed with at the facility. Returns that value.
pub fn load_transport_key(p: &Prepared, name: &str) -> Result<Zeroizing<Vec<u8>>, DemoError> {
    load_shared_key(p, name, KeyClass::K0)
}

/// A key shared with a counterparty (AES-256, class `class`): two random custodian
/// components imported as a new version of `name`; returns the clear value the
/// counterparty is given.
pub fn load_shared_key(p: &Prepared, name: &str, class: KeyClass) -> Result<Zeroizing<Vec<u8>>, DemoError> {
    let c = open_ceremony(p)?;
    let mut parts = Vec::new();
    let mut combined = Zeroizing::new(vec![0u8; 32]);
    for _ in 0..2 {
        let mut part = Zeroizing::new(vec![0u8; 32]);
        openssl::rand::rand_bytes(&mut part).map_err(|e| DemoError::Step(format!("random component: {e}")))?;
        for (a, b) in combined.iter_mut().zip(part.iter()) {
            *a ^= b;
        }
        parts.push(part);
    }
    let meta = c.import_components(name, class, Algorithm::Aes256, &parts, None)?;
    println!("imported {} from 2 components, KCV {}", meta.key_ref(), meta.kcv);
    c.close()?;
    Ok(combined)
}

fn phone(p: &str) -> Option<AccountMsg> {
    Some(AccountMsg { kind: Some(account::Kind::Phone(p.into())) })
}

fn pan(p: &str) -> Option<AccountMsg> {
    Some(AccountMsg { kind: Some(account::Kind::Pan(p.into())) })
}

/// The demo's phone-number account, its bank account and the terminal's initial KSN.
const DEMO_PHONE: &str = "+8613812345678";
const DEMO_BANK_ACCOUNT: &str = "6222020200112233445";
const DEMO_INITIAL_KSN: [u8; 12] = [0x12, 0x34, 0x56, 0x78, 0x90, 0x12, 0x34, 0x56, 0, 0, 0, 0];

/// A terminal PIN block (AES DUKPT, format 4, the phone's virtual PAN) as an `EncryptedPin`.
fn terminal_pin(t: &mut Terminal, pin: &str) -> Result<EncryptedPin, DemoError> {
    let account = Account::from_phone(DEMO_PHONE).map_err(|e| DemoError::Step(e.to_string()))?;
    let (ksn, block) = t.pin_block(pin, &account)?;
    Ok(EncryptedPin {
        block,
        format: PinBlockFormat::Iso4 as i32,
        account: phone(DEMO_PHONE),
        source: Some(PinSource {
            kind: Some(pin_source::Kind::Dukpt(Dukpt { bdk_name: "bdk.pos".into(), bdk_version: 0, ksn: ksn.to_vec() })),
        }),
    })
}

/// Translates a terminal block into bank A's zone (format 4) with the bank account.
async fn to_bank_zone(hub: &Clients, pin: EncryptedPin) -> Result<EncryptedPin, DemoError> {
    let t = hub
        .pin
        .clone()
        .translate_pin(TranslatePinRequest {
            pin: Some(pin),
            destination_key: "zpk.bank-a".into(),
            destination_format: PinBlockFormat::Iso4 as i32,
            destination_account: pan(DEMO_BANK_ACCOUNT),
        })
        .await?
        .into_inner();
    let (s, d) = (t.source_key.unwrap_or_default(), t.destination_key.unwrap_or_default());
    println!(
        "  TranslatePin {}/v{} (DUKPT) -> {}/v{} format 4, account changed: {}",
        s.name, s.version, d.name, d.version, t.account_changed
    );
    Ok(EncryptedPin {
        block: t.block,
        format: t.format,
        account: pan(DEMO_BANK_ACCOUNT),
        source: Some(PinSource { kind: Some(pin_source::Kind::Zone(ZoneKey { key_name: "zpk.bank-a".into(), version: d.version })) }),
    })
}

/// Step 7: terminal -> hub -> bank with the transaction password, and an interbank MAC.
async fn pin_flows(addr: &str, p: &Prepared, tmk: &[u8]) -> Result<(), DemoError> {
    step(7, "terminal to bank: DUKPT PIN pad, translation with account change, transaction password");
    let hub = Clients::new(client::connect(addr, &ClientTls::dev(&p.pki, "hub")).await?);
    let kif = Clients::new(client::connect(addr, &ClientTls::dev(&p.pki, "kif")).await?);
    let activation = Clients::new(client::connect(addr, &ClientTls::dev(&p.pki, "activation")).await?);
    let switch = Clients::new(client::connect(addr, &ClientTls::dev(&p.pki, "switch")).await?);

    let export = kif
        .pin
        .clone()
        .export_terminal_key(ExportTerminalKeyRequest {
            bdk_name: "bdk.pos".into(),
            initial_ksn: DEMO_INITIAL_KSN.to_vec(),
            kek_name: "tmk.terminals".into(),
        })
        .await?
        .into_inner();
    let mut terminal = Terminal::inject(tmk, &export.wrapped_key, &export.kcv, &DEMO_INITIAL_KSN)?;
    println!(
        "key injection: initial key of terminal 1234567890123456 derived from bdk.pos, {} bytes wrapped under tmk.terminals, KCV {} checked by the terminal",
        export.wrapped_key.len(),
        export.kcv
    );

    println!("activation: the user sets transaction password 1234 on the terminal");
    let block = terminal_pin(&mut terminal, "1234")?;
    let bank_block = to_bank_zone(&hub, block).await?;
    let pvd = activation
        .pin
        .clone()
        .generate_pin_verification_data(GeneratePinVerificationDataRequest {
            pin: Some(bank_block),
            method: PinVerificationMethod::KeywardHmac as i32,
            pvk_name: "pvk.hub".into(),
            pvki: 0,
        })
        .await?
        .into_inner();
    let stored = pvd.verification_data;
    println!("  GeneratePinVerificationData (activation client) -> verification data of {} characters stored by the bank", stored.len());

    for (pin, expect) in [("1234", true), ("9999", false)] {
        println!("payment: the user types phone number and password {}", if expect { "(right)" } else { "(wrong)" });
        let block = terminal_pin(&mut terminal, pin)?;
        let bank_block = to_bank_zone(&hub, block).await?;
        let v = hub
            .pin
            .clone()
            .verify_pin(VerifyPinRequest { pin: Some(bank_block), verification_data: stored.clone() })
            .await?
            .into_inner();
        println!("  VerifyPin at the bank -> {}", if v.matched { "match: authorised" } else { "mismatch: refused" });
        if v.matched != expect {
            return Err(DemoError::Step(format!("VerifyPin answered {} for the {} password", v.matched, if expect { "right" } else { "wrong" })));
        }
    }
    let block = terminal_pin(&mut terminal, "1234")?;
    expect_refused(
        switch
            .pin
            .clone()
            .translate_pin(TranslatePinRequest {
                pin: Some(block),
                destination_key: "zpk.bank-a".into(),
                destination_format: PinBlockFormat::Iso4 as i32,
                destination_account: pan(DEMO_BANK_ACCOUNT),
            })
            .await,
        Code::PermissionDenied,
        "switch -> TranslatePin with a DUKPT key it may not use",
    )?;

    let msg = b"0200|6222020200112233445|000000010000|156|20261123".to_vec();
    let mac = hub
        .mac
        .clone()
        .generate_mac(GenerateMacRequest { key_name: "mac.bank-a".into(), data: msg.clone(), padding: 0, mac_length: 8 })
        .await?
        .into_inner();
    let check = |data: Vec<u8>| VerifyMacRequest { key_name: "mac.bank-a".into(), version: 0, data, padding: 0, mac: mac.mac.clone() };
    let ok = switch.mac.clone().verify_mac(check(msg.clone())).await?.into_inner().valid;
    let mut altered = msg.clone();
    altered[30] ^= 1;
    let bad = switch.mac.clone().verify_mac(check(altered)).await?.into_inner().valid;
    println!("interbank MAC: retail MAC (ISO 9797-1 alg 3) by the hub {}; the switch verifies: {ok}; one bit changed: {bad}", hex::encode_upper(&mac.mac));
    if !ok || bad {
        return Err(DemoError::Step("MAC verification answered wrongly".into()));
    }
    Ok(())
}

/// What the simulated SMS operator does with a sealed code: AES-256-GCM open with its
/// copy of the delivery key, the challenge id as associated data.
fn operator_open(zek: &[u8], challenge_id: &[u8], sealed: &[u8]) -> Result<Zeroizing<String>, DemoError> {
    if sealed.len() < 12 + 16 {
        return Err(DemoError::Step("sealed code too short".into()));
    }
    let (iv, rest) = sealed.split_at(12);
    let (ct, tag) = rest.split_at(rest.len() - 16);
    let code = openssl::symm::decrypt_aead(openssl::symm::Cipher::aes_256_gcm(), zek, Some(iv), challenge_id, ct, tag)
        .map_err(|_| DemoError::Step("the operator cannot open the sealed code".into()))?;
    Ok(Zeroizing::new(String::from_utf8_lossy(&code).into_owned()))
}

/// What an authenticator app shows now for the `otpauth://` URI (SHA-1, 6 digits, 30 s).
fn authenticator_code(uri: &str, unix: u64) -> Result<Zeroizing<String>, DemoError> {
    let secret = uri
        .split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("secret="))
        .ok_or_else(|| DemoError::Step("no secret in the provisioning URI".into()))?;
    let seed = Zeroizing::new(
        data_encoding::BASE32_NOPAD
            .decode(secret.as_bytes())
            .map_err(|_| DemoError::Step("provisioning URI secret is not base32".into()))?,
    );
    let key = openssl::pkey::PKey::hmac(&seed).map_err(|e| DemoError::Step(e.to_string()))?;
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha1(), &key).map_err(|e| DemoError::Step(e.to_string()))?;
    let step = crate::crypto::otp::totp_step(unix, 30);
    let mac = Zeroizing::new(
        signer.sign_oneshot_to_vec(&crate::crypto::otp::counter_bytes(step)).map_err(|e| DemoError::Step(e.to_string()))?,
    );
    crate::crypto::otp::truncate(&mac, 6).map_err(|e| DemoError::Step(e.to_string()))
}

/// Step 8: a payment code bound to amount and payee, delivered sealed through the
/// operator; a TOTP authenticator.
async fn otp_flows(addr: &str, p: &Prepared, zek: &[u8]) -> Result<(), DemoError> {
    step(8, "dynamic codes: a payment code bound to the transaction, and a TOTP authenticator");
    let hub = Clients::new(client::connect(addr, &ClientTls::dev(&p.pki, "hub")).await?);
    let activation = Clients::new(client::connect(addr, &ClientTls::dev(&p.pki, "activation")).await?);
    let tx = |amount: i64| TransactionContext {
        amount_minor: amount,
        currency: "CNY".into(),
        payee_id: "merchant-42".into(),
        reference: "T-20261123-0001".into(),
    };
    let issue = |amount: i64| IssueCodeRequest {
        subject: "acct-7f3a9c".into(),
        purpose: "payment".into(),
        context: Some(tx(amount)),
        lifetime_seconds: 0,
        digits: 6,
        sealed_for: "zek.operator-demo".into(),
    };
    let verify = |challenge: &[u8], code: &str, amount: i64| VerifyCodeRequest {
        challenge: challenge.to_vec(),
        code: code.to_string(),
        subject: "acct-7f3a9c".into(),
        purpose: "payment".into(),
        context: Some(tx(amount)),
    };
    let verdict = |v: i32| CodeVerdict::try_from(v).map(|v| v.as_str_name()).unwrap_or("?");
    let issued = hub.otp.clone().issue_code(issue(10_000)).await?.into_inner();
    println!(
        "IssueCode (hub) for 100.00 CNY to merchant-42: challenge of {} bytes, code sealed for the operator ({} bytes; the hub never sees it)",
        issued.challenge.len(),
        issued.sealed_code.len()
    );
    let code = operator_open(zek, &issued.challenge_id, &issued.sealed_code)?;
    println!("the operator opens it and sends the SMS; the user types the code");
    let first = hub.otp.clone().verify_code(verify(&issued.challenge, &code, 10_000)).await?.into_inner();
    let again = hub.otp.clone().verify_code(verify(&issued.challenge, &code, 10_000)).await?.into_inner();
    println!("VerifyCode -> {}; the same code again -> {}", verdict(first.verdict), verdict(again.verdict));
    let other = hub.otp.clone().issue_code(issue(10_000)).await?.into_inner();
    let other_code = operator_open(zek, &other.challenge_id, &other.sealed_code)?;
    let changed = hub.otp.clone().verify_code(verify(&other.challenge, &other_code, 10_001)).await?.into_inner();
    println!("a new code presented for 100.01 CNY instead of 100.00 -> {}", verdict(changed.verdict));
    if first.verdict != CodeVerdict::Valid as i32
        || again.verdict != CodeVerdict::AlreadyUsed as i32
        || changed.verdict != CodeVerdict::Invalid as i32
    {
        return Err(DemoError::Step("dynamic code verdicts are not VALID, ALREADY_USED, INVALID".into()));
    }
    let mut clear = issue(10_000);
    clear.sealed_for = String::new();
    expect_refused(hub.otp.clone().issue_code(clear).await, Code::PermissionDenied, "hub -> IssueCode with the code in clear")?;

    let enrolled = activation
        .otp
        .clone()
        .enroll_totp(EnrollTotpRequest {
            subject: "acct-7f3a9c".into(),
            issuer: "Keyward Demo Bank".into(),
            account_label: "acct-7f3a9c".into(),
            algorithm: 0,
            digits: 6,
            period: 30,
        })
        .await?
        .into_inner();
    println!(
        "EnrollTotp (activation): provisioning URI shown once to the authenticator app; seed blob of {} bytes stored with the account",
        enrolled.seed_blob.len()
    );
    let now = crate::unix_now();
    let app_code = authenticator_code(&enrolled.provisioning_uri, now)?;
    let v = hub
        .otp
        .clone()
        .verify_totp(VerifyTotpRequest {
            seed_blob: enrolled.seed_blob.clone(),
            subject: "acct-7f3a9c".into(),
            code: app_code.to_string(),
            last_step: 0,
            time: now,
            window: 1,
        })
        .await?
        .into_inner();
    let replay = hub
        .otp
        .clone()
        .verify_totp(VerifyTotpRequest {
            seed_blob: enrolled.seed_blob,
            subject: "acct-7f3a9c".into(),
            code: app_code.to_string(),
            last_step: v.step,
            time: now,
            window: 1,
        })
        .await?
        .into_inner();
    println!("VerifyTotp with the app's current code -> valid: {} (step {}); the same code again -> valid: {}", v.valid, v.step, replay.valid);
    if !v.valid || replay.valid {
        return Err(DemoError::Step("TOTP verification answered wrongly".into()));
    }
    Ok(())
}

/// Prints a refusal the demo expects, or fails the demo if the call was not refused with `code`.
pub(crate) fn expect_refused<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>, code: Code, what: &str) -> Result<(), DemoError> {
    match r {
        Err(s) if s.code() == code => {
            println!("{what}: {:?}: {}", s.code(), s.message());
            Ok(())
        }
        other => Err(DemoError::Step(format!("{what}: expected {code:?}, got {other:?}"))),
    }
}

pub(crate) fn step(n: u32, what: &str) {
    println!("\n== {n}. {what}");
}

/// `keyward demo`.
pub fn main(args: DemoArgs) -> ExitCode {
    match run(args) {
        Ok(()) => {
            println!("\ndemo finished: every step behaved as expected");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\ndemo FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: DemoArgs) -> Result<(), DemoError> {
    let started = Instant::now();
    let dir = args.state.clone().unwrap_or_else(|| std::env::temp_dir().join("keyward-demo"));
    if dir.exists() {
        if !dir.join("appliance.toml").exists() && std::fs::read_dir(&dir)?.next().is_some() {
            return Err(DemoError::Step(format!(
                "{} exists and is not a keyward demo state directory: not wiping it",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(&dir)?;
    }

    step(1, "fresh state: SoftHSM token (softhsm-setup), development PKI");
    let p = prepare(&dir, &args.config_template, "127.0.0.1:0")?;
    println!("state directory {}", p.dir.display());
    println!("token {:?} in {}", p.exports.get("KEYWARD_TOKEN_LABEL").map(String::as_str).unwrap_or("keyward"), p.dir.join("tokens").display());

    step(2, "key ceremony: `ceremony init` creates the profile's keys inside the token");
    let keys = ceremony_init(&p, &args.profile)?;
    ceremony::print_table(&keys, &mut std::io::stdout())?;

    println!("\nkey-injection facility: terminal transport key from two custodian components");
    let tmk = load_transport_key(&p, "tmk.terminals")?;
    println!("SMS operator: code delivery key from two custodian components");
    let zek = load_shared_key(&p, "zek.operator-demo", KeyClass::Otp)?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(flows(&p, &tmk, &zek))?;

    step(11, "audit trail: `keyward audit verify`");
    let hsm = ceremony::open_token_only(&TokenArgs {
        config: Some(p.config.clone()),
        module: PathBuf::new(),
        token_label: String::new(),
        audit_dir: None,
    })?;
    let keys = crate::appliance::audit_keys::TokenAuditKeys::new(hsm);
    match crate::appliance::audit::verify_dir(&p.dir.join("audit"), &keys, None, None) {
        Ok(r) => println!(
            "intact: {} lines, {} signed checkpoints, last seq {}",
            r.lines, r.checkpoints, r.last_seq
        ),
        Err(f) => return Err(DemoError::Step(format!("audit trail does not verify: {f}"))),
    }
    println!("\n(total {:.1} s; state kept in {})", started.elapsed().as_secs_f64(), p.dir.display());
    Ok(())
}

async fn flows(p: &Prepared, tmk: &[u8], zek: &[u8]) -> Result<(), DemoError> {
    step(3, "the appliance: mTLS gRPC on a free loopback port");
    let config = Config::load(&p.config)?;
    let running = server::start(config).await?;
    let addr = running.addr.to_string();
    println!("listening on {addr}; client certificate required");

    let admin = Clients::new(client::connect(&addr, &ClientTls::dev(&p.pki, "admin")).await?);
    let hub = Clients::new(client::connect(&addr, &ClientTls::dev(&p.pki, "hub")).await?);
    let auditor = Clients::new(client::connect(&addr, &ClientTls::dev(&p.pki, "auditor")).await?);

    step(4, "KeyService.ListKeys as the admin client (metadata and KCVs, never key material)");
    let list = admin.keys.clone().list_keys(ListKeysRequest::default()).await?.into_inner();
    for k in &list.keys {
        println!("  {:<20} v{}  {:<5} {:<12} KCV {}", k.name, k.version, k.class, k.algorithm, k.kcv);
    }
    let ping = admin.admin.clone().ping(PingRequest { payload: b"hello".to_vec() }).await?.into_inner();
    println!("Ping: boot epoch {}", ping.boot_epoch);

    step(5, "DataService as the hub: AES-256-GCM with associated data");
    let aad = b"hub/customer-record/42".to_vec();
    let enc = hub
        .data
        .clone()
        .encrypt(EncryptRequest { key_name: "data".into(), plaintext: b"account 6222 0000 0000 0042".to_vec(), aad: aad.clone() })
        .await?
        .into_inner();
    let kr = enc.key.clone().unwrap_or_default();
    println!("Encrypt -> {} bytes under {}/v{}", enc.ciphertext.len(), kr.name, kr.version);
    let dec = hub
        .data
        .clone()
        .decrypt(DecryptRequest { key_name: "data".into(), ciphertext: enc.ciphertext.clone(), aad: aad.clone() })
        .await?
        .into_inner();
    if dec.plaintext != b"account 6222 0000 0000 0042" {
        return Err(DemoError::Step("decrypt returned other data".into()));
    }
    println!("Decrypt -> the same {} bytes", dec.plaintext.len());
    let wrong_aad = DecryptRequest { key_name: "data".into(), ciphertext: enc.ciphertext.clone(), aad: b"another record".to_vec() };
    expect_refused(hub.data.clone().decrypt(wrong_aad).await, Code::InvalidArgument, "hub -> Decrypt with other aad")?;
    let info = hub.keys.clone().get_key(GetKeyRequest { name: "data".into(), version: 0 }).await?.into_inner();
    println!("GetKey data -> v{} class {} KCV {}", info.version, info.class, info.kcv);

    step(6, "refused calls (deny by default)");
    let enc_req = |key: &str| EncryptRequest { key_name: key.into(), plaintext: b"x".to_vec(), aad: b"y".to_vec() };
    expect_refused(auditor.data.clone().encrypt(enc_req("data")).await, Code::PermissionDenied, "auditor -> DataService.Encrypt")?;
    expect_refused(hub.data.clone().encrypt(enc_req("voucher.issuer")).await, Code::PermissionDenied, "hub -> Encrypt with key `voucher.issuer`")?;
    expect_refused(
        admin.data.clone().encrypt(enc_req("zpk.switch")).await,
        Code::FailedPrecondition,
        "admin -> Encrypt with PIN key `zpk.switch`",
    )?;
    drop((admin, hub, auditor));
    pin_flows(&addr, p, tmk).await?;
    otp_flows(&addr, p, zek).await?;
    ecash::ecash_flows(&addr, p).await?;
    binding::binding_flows(&addr, p).await?;
    running.shutdown().await?;
    println!("appliance stopped cleanly (final audit checkpoint written)");
    Ok(())
}
