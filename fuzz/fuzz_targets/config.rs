//! The appliance config (src/config.rs): `Config::parse`, TOML text to a validated
//! `Config` (the TOML parser, `${VAR}`/`${VAR:-default}` expansion, the user PIN
//! source, every section's checks), with relative paths resolved against a scratch
//! directory that holds the files the example config names.
//!
//! Inputs that could make the parser read outside that directory (absolute paths,
//! `..`, escapes that could spell them, device and proc paths) are skipped: a PIN
//! `file` there could be a device that never ends. Invariant: parsing is
//! deterministic (the same text gives the same verdict twice).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use keyward::config::Config;
use libfuzzer_sys::fuzz_target;

fn base() -> &'static PathBuf {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("keyward-fuzz-config-{}", std::process::id()));
        let files = ["module.so", "state/user.pin", "state/pki/server.crt", "state/pki/server.key", "state/pki/ca.crt", "state/pki/ca.crl"];
        for f in files {
            let p = dir.join(f);
            if let Some(parent) = p.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(&p, b"1234\n");
        }
        let _ = std::fs::create_dir_all(dir.join("state/audit"));
        dir
    })
}

fn stays_inside(text: &str) -> bool {
    const OUT: [&str; 8] = ["\"/", "'/", ":-/", "\\", "..", "/dev", "/proc", "/sys"];
    !OUT.iter().any(|p| text.contains(p))
}

fuzz_target!(init: {
    keyward_fuzz::write_seeds_if_asked(seeds);
    let _ = base();
}, |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if !stays_inside(text) {
        return;
    }
    let dir: &Path = base();
    let first = Config::parse(text, dir);
    let second = Config::parse(text, dir);
    assert_eq!(first.is_ok(), second.is_ok());
    if let (Err(a), Err(b)) = (&first, &second) {
        assert_eq!(a.0, b.0);
    }
});

/// The example config with its paths made relative to the scratch directory, and a
/// few variants.
fn seeds() -> Vec<Vec<u8>> {
    let example = include_str!("../../pkcs11-config/appliance.toml")
        .replace("${KEYWARD_PKCS11_MODULE:-/usr/lib/softhsm/libsofthsm2.so}", "module.so")
        .replace("${KEYWARD_STATE}", "state");
    let env_pin = example.replace("user_pin = { file = \"state/user.pin\" }", "user_pin = { env = \"KEYWARD_FUZZ_NO_SUCH_PIN\" }");
    let inline = example.replace("user_pin = { file = \"state/user.pin\" }", "user_pin = { dev_inline = \"1234\" }");
    let minimal = "[hsm]\nmodule = \"module.so\"\ntoken_label = \"keyward\"\nuser_pin = { dev_inline = \"1234\" }\n\n[server]\nlisten = \"127.0.0.1:50051\"\ntls_cert = \"state/pki/server.crt\"\ntls_key = \"state/pki/server.key\"\nclient_ca = \"state/pki/ca.crt\"\n\n[audit]\ndir = \"state/audit\"\n".to_string();
    vec![example.into_bytes(), env_pin.into_bytes(), inline.into_bytes(), minimal.into_bytes()]
}
