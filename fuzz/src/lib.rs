#![forbid(unsafe_code)]
//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! Seeds: every target writes its own valid inputs, built with the keyward lib's own
//! encoders, when run with `KEYWARD_FUZZ_SEEDS=DIR` (it then writes them into DIR and
//! exits before fuzzing). `fuzz/corpus/<target>/` was seeded that way, then fuzzed
//! and minimised with `cargo fuzz cmin`.

use std::path::{Path, PathBuf};

/// When `KEYWARD_FUZZ_SEEDS` names a directory, writes the inputs `make` returns
/// into it (`seed-000`, `seed-001`, ...) and exits the process; otherwise does nothing.
pub fn write_seeds_if_asked(make: impl FnOnce() -> Vec<Vec<u8>>) {
    let Some(dir) = std::env::var_os("KEYWARD_FUZZ_SEEDS") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let code = match write_seeds(&dir, &make()) {
        Ok(n) => {
            eprintln!("wrote {n} seed(s) to {}", dir.display());
            0
        }
        Err(e) => {
            eprintln!("cannot write seeds to {}: {e}", dir.display());
            1
        }
    };
    std::process::exit(code);
}

fn write_seeds(dir: &Path, seeds: &[Vec<u8>]) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s)?;
    }
    Ok(seeds.len())
}

/// `fuzz/fixtures/`: key material that seeds and targets must share across processes
/// (the e-cash trust bundle and its root key).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Big-endian u32 from up to 4 bytes of `b` at `at` (missing bytes are zero).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    for (i, x) in a.iter_mut().enumerate() {
        *x = b.get(at + i).copied().unwrap_or(0);
    }
    u32::from_be_bytes(a)
}

/// A small e-cash world built with the lib's own API (keys from openssl's CSPRNG):
/// a root, a device CA and a voucher issuer, the signed trust bundle, a certified
/// wallet holding a voucher, a terminal trusting the bundle, and a chain of payments.
pub mod ecash_kit {
    use keyward::ecash::{
        CertificationRequest, DeviceCertificate, KeyRole, OfflineLimits, Presented, PublicKey, Signed, SigningKey,
        Terminal, TrustBundle, TrustedKey, Voucher, Wallet,
    };
    use keyward::ecash::{Challenge, KeyAlgorithm};

    pub const T0: u64 = 1_700_000_000;
    pub const DAY: u64 = 86_400;
    pub const MERCHANT: &str = "M-shop-42";
    pub const TERMINAL: &str = "T-0001";
    pub const LIMITS: OfflineLimits =
        OfflineLimits { max_balance: 50_000, max_single_payment: 5_000, max_consecutive_offline: 5 };

    pub struct Kit {
        pub root: SigningKey,
        pub bundle: Signed<TrustBundle>,
        pub request: Signed<CertificationRequest>,
        pub certificate: Signed<DeviceCertificate>,
        pub voucher: Signed<Voucher>,
        /// Three payments of the voucher, each with its challenge.
        pub payments: Vec<(Challenge, Presented)>,
        pub terminal: Terminal,
    }

    fn s<E: std::fmt::Debug>(e: E) -> String {
        format!("{e:?}")
    }

    pub fn roots(root: &PublicKey) -> Vec<(u32, PublicKey)> {
        vec![(1, root.clone())]
    }

    pub fn build() -> Result<Kit, String> {
        let root = SigningKey::generate().map_err(s)?;
        let ca = SigningKey::generate().map_err(s)?;
        let issuer = SigningKey::generate().map_err(s)?;
        let body = TrustBundle {
            bundle_version: 5,
            issued_at: T0 - DAY,
            root_key_version: 1,
            keys: vec![
                TrustedKey {
                    role: KeyRole::DeviceCa,
                    algorithm: KeyAlgorithm::P256,
                    version: 1,
                    public_key: ca.sec1().to_vec(),
                    not_before: T0 - 10 * DAY,
                    not_after: u64::MAX,
                },
                TrustedKey {
                    role: KeyRole::VoucherIssuer,
                    algorithm: KeyAlgorithm::P256,
                    version: 1,
                    public_key: issuer.sec1().to_vec(),
                    not_before: 0,
                    not_after: u64::MAX,
                },
            ],
        };
        let bundle = Signed::sign(body, &root).map_err(s)?;
        let mut wallet = Wallet::new().map_err(s)?;
        let request = wallet.certification_request(b"acct-ref-1", T0 - DAY).map_err(s)?;
        let certificate = Signed::sign(
            DeviceCertificate {
                device_id: request.body.device_id,
                device_public_key: request.body.device_public_key,
                account_ref: request.body.account_ref.clone(),
                limits: LIMITS,
                not_before: T0 - DAY,
                not_after: T0 + 365 * DAY,
                ca_key_version: 1,
            },
            &ca,
        )
        .map_err(s)?;
        wallet.install_certificate(certificate.clone()).map_err(s)?;
        let voucher = Signed::sign(
            Voucher {
                voucher_id: [0x56; 16],
                device_id: wallet.device_id(),
                currency: *b"CNY",
                balance: 10_000,
                counter_at_issue: 0,
                issued_at: T0,
                expires_at: T0 + 30 * DAY,
                issuer_key_version: 1,
            },
            &issuer,
        )
        .map_err(s)?;
        wallet.load_voucher(voucher.clone()).map_err(s)?;
        let mut terminal = Terminal::new(TERMINAL, MERCHANT, roots(&root.public_key())).map_err(s)?;
        terminal.update_bundle(&bundle.encode()).map_err(s)?;
        let mut payments = Vec::new();
        for (i, amount) in [100u64, 2_500, 1].into_iter().enumerate() {
            let ch = terminal.challenge(T0 + 60 * (i as u64 + 1)).map_err(s)?;
            let p = wallet.pay(&ch, amount, MERCHANT, TERMINAL).map_err(s)?;
            payments.push((ch, p));
        }
        Ok(Kit { root, bundle, request, certificate, voucher, payments, terminal })
    }

    /// The fixture files the e-cash targets share: `ecash-bundle.bin` (a signed trust
    /// bundle) and `ecash-root.sec1` (the root public key it verifies under).
    pub fn write_fixture(k: &Kit) -> std::io::Result<()> {
        let dir = super::fixtures_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("ecash-bundle.bin"), k.bundle.encode())?;
        std::fs::write(dir.join("ecash-root.sec1"), k.root.sec1())
    }

    /// The fixture's bundle bytes and root key, if written and well-formed.
    pub fn read_fixture() -> Option<(Vec<u8>, PublicKey)> {
        let dir = super::fixtures_dir();
        let bundle = std::fs::read(dir.join("ecash-bundle.bin")).ok()?;
        let root = std::fs::read(dir.join("ecash-root.sec1")).ok()?;
        let sec1: [u8; 65] = root.as_slice().try_into().ok()?;
        Some((bundle, PublicKey::from_sec1(&sec1).ok()?))
    }
}
