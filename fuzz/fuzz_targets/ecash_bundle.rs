//! Trust bundles (src/ecash/bundle.rs): `TrustBundle::verify` (strict decoding, the
//! root lookup, the root signature, the version floor, each key's parsing) under the
//! fixture root, and `Terminal::update_bundle` (src/ecash/offline.rs). A bundle that
//! decodes is also re-signed with a root key of this process, so the fuzzer reaches
//! what follows the signature check.
//!
//! Invariants: a verified bundle keeps its exact bytes; every key it lists is found
//! by (role, version) inside its validity window and not outside it; the version
//! floor refuses exactly the older bundles; a terminal installs a bundle once and
//! takes the same bundle again as a refresh.
#![no_main]

use std::sync::OnceLock;

use keyward::ecash::{EcashError, KeySource, Signed, SigningKey, Terminal, TrustBundle, VerifiedBundle};
use keyward_fuzz::ecash_kit;
use libfuzzer_sys::fuzz_target;

fn fixture_roots() -> &'static [(u32, keyward::ecash::PublicKey)] {
    static R: OnceLock<Vec<(u32, keyward::ecash::PublicKey)>> = OnceLock::new();
    R.get_or_init(|| ecash_kit::read_fixture().map(|(_, root)| ecash_kit::roots(&root)).unwrap_or_default())
}

fn local_root() -> Option<&'static SigningKey> {
    static K: OnceLock<Option<SigningKey>> = OnceLock::new();
    K.get_or_init(|| SigningKey::generate().ok()).as_ref()
}

fn check_lookups(v: &VerifiedBundle) {
    for k in &v.bundle().keys {
        assert!(v.key(k.role, k.version, k.not_before).is_some(), "listed key not found");
        assert!(v.key(k.role, k.version, k.not_after).is_some(), "listed key not found at its end");
        if k.not_before > 0 {
            assert!(v.key(k.role, k.version, k.not_before - 1).is_none(), "key found before its window");
        }
        if let Some(after) = k.not_after.checked_add(1) {
            assert!(v.key(k.role, k.version, after).is_none(), "key found after its window");
        }
    }
}

fuzz_target!(init: {
    keyward_fuzz::write_seeds_if_asked(seeds);
}, |data: &[u8]| {
    if let Ok(v) = TrustBundle::verify(data, fixture_roots(), 0) {
        assert_eq!(v.encoded(), data);
        check_lookups(&v);
    }
    let Ok(signed) = Signed::<TrustBundle>::decode(data) else { return };
    let Some(root) = local_root() else { return };
    let body = signed.body;
    let version = body.bundle_version;
    let resigned = Signed::sign(body.clone(), root).unwrap_or_else(|e| panic!("a decoded bundle does not sign: {e}"));
    let enc = resigned.encode();
    let roots = vec![(body.root_key_version, root.public_key())];
    let v = TrustBundle::verify(&enc, &roots, version).unwrap_or_else(|e| panic!("re-signed bundle refused: {e}"));
    assert_eq!(v.bundle(), &body);
    check_lookups(&v);
    if let Some(next) = version.checked_add(1) {
        assert!(matches!(TrustBundle::verify(&enc, &roots, next), Err(EcashError::OlderBundle { .. })));
    }
    let other = vec![(body.root_key_version.wrapping_add(1), root.public_key())];
    assert!(matches!(TrustBundle::verify(&enc, &other, 0), Err(EcashError::UnknownRoot(_))));
    if let Ok(mut t) = Terminal::new(ecash_kit::TERMINAL, ecash_kit::MERCHANT, roots) {
        assert_eq!(t.update_bundle(&enc).ok(), Some(version));
        assert_eq!(t.update_bundle(&enc).ok(), Some(version), "refresh with the same bundle");
    }
});

/// The fixture bundle (written by the ecash_presented seeds) and bundles of a fresh kit.
fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if let Some((b, _)) = ecash_kit::read_fixture() {
        out.push(b);
    }
    if let Ok(k) = ecash_kit::build() {
        out.push(k.bundle.encode());
    }
    out
}
