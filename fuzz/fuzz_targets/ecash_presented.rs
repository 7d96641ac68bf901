//! What a wallet hands a terminal (src/ecash/format.rs `Presented::decode`) and its
//! judgement: `check_payment` (src/ecash/verify.rs) against a verified trust bundle
//! (src/ecash/bundle.rs), the same with every signature taken as verified (a
//! `SignatureMemo` that has seen them all, so the fuzzer reaches the payment and
//! chain rules), and `Terminal::verify_offline` (src/ecash/offline.rs) with the
//! challenge the payment claims to answer.
//!
//! The bundle and its root come from `fuzz/fixtures/` (written with the seeds, so
//! the seeds' signatures verify). Invariants: encode(decode(b)) == b; a verdict other
//! than BadSignature is the same with signatures skipped; the terminal's verdict is
//! `check_payment`'s for a payment of this terminal and merchant, else WrongChallenge.
#![no_main]

use std::sync::OnceLock;

use keyward::ecash::{
    check_payment, check_payment_memo, Challenge, Presented, SignatureMemo, Terminal, TrustBundle, Verdict,
    VerifiedBundle,
};
use keyward_fuzz::ecash_kit;
use libfuzzer_sys::fuzz_target;

struct SeenAll;

impl SignatureMemo for SeenAll {
    fn seen(&self, _: &[u8; 32]) -> bool {
        true
    }
    fn remember(&self, _: [u8; 32]) {}
}

struct World {
    bundle: VerifiedBundle,
    terminal: Terminal,
}

fn world() -> Option<&'static World> {
    static W: OnceLock<Option<World>> = OnceLock::new();
    W.get_or_init(|| {
        let (encoded, root) = ecash_kit::read_fixture()?;
        let roots = ecash_kit::roots(&root);
        let bundle = TrustBundle::verify(&encoded, &roots, 0).ok()?;
        let mut terminal = Terminal::new(ecash_kit::TERMINAL, ecash_kit::MERCHANT, roots).ok()?;
        terminal.update_bundle(&encoded).ok()?;
        Some(World { bundle, terminal })
    })
    .as_ref()
}

fuzz_target!(init: {
    keyward_fuzz::write_seeds_if_asked(seeds);
    if world().is_none() {
        eprintln!("fuzz/fixtures/ecash-*: missing or invalid; signatures will not verify");
    }
}, |data: &[u8]| {
    let Ok(p) = Presented::decode(data) else { return };
    assert_eq!(p.encode(), data, "presented round trip");
    let Some(w) = world() else { return };
    let now = p.payment.body.terminal_time;
    let real = check_payment(&w.bundle, &p, now);
    let skipped = check_payment_memo(&w.bundle, &p, now, &SeenAll);
    if real != Verdict::BadSignature {
        assert_eq!(real, skipped, "skipping signature checks changed a verdict");
    }
    let pay = &p.payment.body;
    let ch = Challenge { bytes: pay.challenge, terminal_time: pay.terminal_time };
    let offline = w.terminal.verify_with_held_bundle(&ch, pay.amount, &p);
    let ours = pay.terminal_id == ecash_kit::TERMINAL && pay.merchant_id == ecash_kit::MERCHANT;
    let expected = match (ours, real) {
        (false, _) => Err(Verdict::WrongChallenge),
        (true, Verdict::Valid) => Ok(()),
        (true, v) => Err(v),
    };
    assert_eq!(offline, expected);
});

/// Writes the fixture (bundle and root) and returns the kit's presented payments.
fn seeds() -> Vec<Vec<u8>> {
    let Ok(k) = ecash_kit::build() else { return Vec::new() };
    if let Err(e) = ecash_kit::write_fixture(&k) {
        eprintln!("cannot write the e-cash fixture: {e}");
        return Vec::new();
    }
    k.payments.iter().map(|(_, p)| p.encode()).collect()
}
