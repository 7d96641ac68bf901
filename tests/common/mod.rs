//! Shared harness of the integration tests: one SoftHSM token per test binary (SoftHSM
//! reads SOFTHSM2_CONF once per process), made by `keyward::demo::prepare` and
//! `ceremony_init`, and one real appliance per test on 127.0.0.1:0 with its own audit
//! directory, reached over real mTLS with the development PKI.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use keyward::appliance::server::{self, Running};
use keyward::appliance::AppState;
use keyward::ceremony::{self, Ceremony, ProfileKey, TokenArgs};
use keyward::client::{self, ClientTls, Clients};
use keyward::config::Config;
use keyward::demo::Prepared;
use keyward::hsm::{Hsm, KeyMeta};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The token and PKI of this test binary.
pub struct Fixture {
    pub prepared: Prepared,
    /// The profile `ceremony init` ran with.
    pub profile: Vec<ProfileKey>,
    /// What `ceremony init` reported.
    pub init_keys: Vec<KeyMeta>,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// The key profile `ceremony init` runs with (the example one unless a test binary
/// chose another with [`use_profile`] before its first fixture use).
static PROFILE: OnceLock<PathBuf> = OnceLock::new();

/// Chooses this binary's key profile; must come before the first [`fixture`] call.
pub fn use_profile(path: PathBuf) {
    assert!(FIXTURE.get().is_none(), "use_profile after the fixture was made");
    let _ = PROFILE.set(path);
}

/// Serialises every test step that creates or changes token objects (and server
/// start-up, which copies keys into session objects): SoftHSM 2.6.1 races on object
/// creation and search across the several `Hsm` instances of one process.
pub static TOKEN_WRITE: Mutex<()> = Mutex::new(());

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Takes [`TOKEN_WRITE`] (a test that panicked while holding it does not poison the others).
pub fn token_write() -> MutexGuard<'static, ()> {
    TOKEN_WRITE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Name of this test binary without cargo's hash suffix ("keys", "api", ...).
fn binary_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .map(|s| s.split('-').next().unwrap_or("tests").to_string())
        .unwrap_or_else(|| "tests".into())
}

/// Removes state directories of earlier test processes that are gone.
fn remove_stale_state() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("keyward-test-") else { continue };
        let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The binary's token, PKI and config, made on first use.
pub fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        remove_stale_state();
        let dir = std::env::temp_dir().join(format!("keyward-test-{}-{}", binary_name(), std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("remove an old state directory");
        }
        let prepared = keyward::demo::prepare(&dir, Path::new("pkcs11-config/appliance.toml"), "127.0.0.1:0")
            .expect("demo::prepare (softhsm-setup, dev PKI, config)");
        let profile_path = PROFILE.get_or_init(|| PathBuf::from("pkcs11-config/key-profile.toml")).clone();
        let init_keys = keyward::demo::ceremony_init(&prepared, &profile_path).expect("ceremony init");
        let profile = ceremony::read_profile(&keyward::demo::repo_file(&profile_path)).expect("read the key profile");
        Fixture { prepared, profile, init_keys }
    })
}

/// A fresh, unique directory inside the state directory.
pub fn fresh_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let d = fixture().prepared.dir.join("t").join(format!("{tag}-{n}"));
    std::fs::create_dir_all(&d).expect("create a test directory");
    d
}

/// The instantiated config with a fresh audit directory of its own.
pub fn test_config(tag: &str) -> (Config, PathBuf) {
    let fx = fixture();
    let mut config = Config::load(&fx.prepared.config).expect("the prepared config loads");
    let audit_dir = fresh_dir(tag).join("audit");
    config.audit.dir = audit_dir.clone();
    (config, audit_dir)
}

/// One running appliance of one test.
pub struct TestServer {
    running: Option<Running>,
    pub addr: String,
    pub audit_dir: PathBuf,
    pub state: Arc<AppState>,
    pub hsm: Hsm,
}

/// Starts an appliance with the binary's config and a fresh audit directory.
pub async fn start(tag: &str) -> TestServer {
    start_with(tag, |_| {}).await
}

/// As [`start`], after `edit` changed the config.
pub async fn start_with(tag: &str, edit: impl FnOnce(&mut Config)) -> TestServer {
    let (mut config, _) = test_config(tag);
    edit(&mut config);
    start_config(config).await
}

/// Writes a copy of the binary's config file, its text changed by `edit`, beside it
/// as `<tag>.toml`; answers the path.
pub fn config_file(tag: &str, edit: impl FnOnce(String) -> String) -> PathBuf {
    let fx = fixture();
    let text = std::fs::read_to_string(&fx.prepared.config).expect("read the prepared config");
    let path = fx.prepared.config.with_file_name(format!("{tag}.toml"));
    std::fs::write(&path, edit(text)).expect("write a test config");
    path
}

/// Inserts `lines` right after the `[section]` header of a config text.
pub fn in_section(text: &str, section: &str, lines: &str) -> String {
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "the config has no [{section}]");
    text.replacen(&header, &format!("{header}{lines}\n"), 1)
}

/// Starts an appliance from a config file (reloads read that file again), with a fresh
/// audit directory.
pub async fn start_from_file(tag: &str, path: &Path) -> TestServer {
    let mut config = Config::load(path).expect("the test config loads");
    config.audit.dir = fresh_dir(tag).join("audit");
    start_config(config).await
}

/// Starts an appliance with this config.
pub async fn start_config(config: Config) -> TestServer {
    let audit_dir = config.audit.dir.clone();
    let running = {
        let _g = token_write();
        server::start(config).await.expect("the appliance starts")
    };
    TestServer {
        addr: running.addr.to_string(),
        audit_dir,
        state: Arc::clone(&running.state),
        hsm: running.state.hsm.clone(),
        running: Some(running),
    }
}

impl TestServer {
    /// A channel authenticated as one of the dev-PKI clients.
    pub async fn channel(&self, who: &str) -> Channel {
        client::connect(&self.addr, &ClientTls::dev(&fixture().prepared.pki, who))
            .await
            .unwrap_or_else(|e| panic!("connect as {who}: {e}"))
    }

    /// The three keyward clients as `who`.
    pub async fn clients(&self, who: &str) -> Clients {
        Clients::new(self.channel(who).await)
    }

    /// Graceful shutdown (final audit checkpoint); must succeed.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.expect("clean shutdown");
        }
    }
}

/// Opens a ceremony on the binary's token (hold [`TOKEN_WRITE`] while it writes).
pub fn ceremony() -> Ceremony {
    Ceremony::open(&token_args()).expect("Ceremony::open")
}

pub fn token_args() -> TokenArgs {
    TokenArgs {
        config: Some(fixture().prepared.config.clone()),
        module: PathBuf::new(),
        token_label: String::new(),
        audit_dir: None,
    }
}

/// The `keyward` binary with this binary's SOFTHSM2_CONF.
pub fn keyward_cli() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyward"));
    for (k, v) in &fixture().prepared.exports {
        if k == "SOFTHSM2_CONF" {
            cmd.env(k, v);
        }
    }
    cmd.env("KEYWARD_LOG", "warn");
    cmd
}

/// Runs the CLI with `stdin` as its standard input.
pub fn run_cli(mut cmd: Command, stdin: &[u8]) -> Output {
    use std::io::Write;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the keyward binary");
    if let Some(mut s) = child.stdin.take() {
        s.write_all(stdin).expect("write stdin");
    }
    child.wait_with_output().expect("wait for the keyward binary")
}

/// Every file of a directory tree, as text (to search the trail for clear text).
pub fn all_files_text(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read the audit directory").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push_str(&String::from_utf8_lossy(&std::fs::read(&p).expect("read an audit file")));
                out.push('\n');
            }
        }
    }
    out
}

/// The daily audit files of a directory, in name order.
pub fn audit_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    n.starts_with("audit.") && n.ends_with(".jsonl")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every line of the trail, parsed, in order.
pub fn audit_lines(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for f in audit_files(dir) {
        let text = std::fs::read_to_string(&f).expect("read an audit file");
        for line in text.lines().filter(|l| !l.is_empty()) {
            out.push(serde_json::from_str(line).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line}")));
        }
    }
    out
}

/// The `rpc` lines of the trail.
pub fn rpc_lines(dir: &Path) -> Vec<serde_json::Value> {
    audit_lines(dir).into_iter().filter(|l| l["kind"] == "rpc").collect()
}

/// Verifies a trail with the token's audit keys.
pub fn verify_trail(dir: &Path, hsm: &Hsm) -> keyward::appliance::audit::VerifyReport {
    let keys = keyward::appliance::audit_keys::TokenAuditKeys::new(hsm.clone());
    keyward::appliance::audit::verify_dir(dir, &keys, None, None)
        .unwrap_or_else(|f| panic!("audit trail {} does not verify: {f}", dir.display()))
}

/// The error of a call that must fail.
pub fn err_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>, what: &str) -> Status {
    match r {
        Ok(resp) => panic!("{what}: expected an error, got {:?}", resp.get_ref()),
        Err(s) => s,
    }
}

/// Asserts a call failed with `code` and a message containing each of `needles`.
pub fn expect_code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, Status>, code: Code, needles: &[&str], what: &str) -> Status {
    let s = err_of(r, what);
    assert_eq!(s.code(), code, "{what}: wrong code; message {:?}", s.message());
    for n in needles {
        assert!(s.message().contains(n), "{what}: message {:?} does not name {n:?}", s.message());
    }
    s
}

/// Polls `f` every 100 ms until it returns true or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// XOR of two equal-length byte strings.
pub fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x ^ y).collect()
}

/// A fixed, random-looking first component of `len` bytes (not secret: test data).
pub fn component1(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(0x9D).wrapping_add(0x3B) ^ 0xA5).collect()
}

/// Hex test data to bytes.
pub fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex test data")
}

/// Imports keys of known value (name, class, algorithm, hex) with the ceremony, each
/// split into two components, as version 1; returns what the ceremony reported.
/// Call before any server of the binary starts, never with TOKEN_WRITE held.
pub fn import_known_keys(keys: &[(&str, keyward::hsm::KeyClass, keyward::hsm::Algorithm, &str)]) -> Vec<KeyMeta> {
    let _g = token_write();
    let c = ceremony();
    let mut out = Vec::new();
    for &(name, class, alg, value) in keys {
        let key = h(value);
        let c1 = component1(key.len());
        let c2 = xor(&key, &c1);
        let m = c
            .import_components(name, class, alg, &[zeroize::Zeroizing::new(c1), zeroize::Zeroizing::new(c2)], None)
            .unwrap_or_else(|e| panic!("import {name}: {e}"));
        assert_eq!((m.version, m.class), (1, class), "{name}");
        out.push(m);
    }
    c.close().expect("close the ceremony");
    out
}
