//! ISO 9564-1 PIN blocks, formats 0, 1, 3 and 4: `pin::decipher` (decode and check of
//! the clear PIN field) and `pin::recipher` (same-format re-encipherment), with an
//! identity "cipher" so the fuzzer drives the clear block directly; the account from
//! `Account::from_pan`/`from_phone`.
//!
//! Input: `format selector | account length selector | 19 account bytes | block`.
//! Invariants: a block that deciphers re-enciphers (with the same fill) to the same
//! bytes and deciphers to the same PIN; `recipher` accepts every block `decipher`
//! accepts and returns it unchanged.
#![no_main]

use keyward::crypto::pin::{self, Account, Pin, PinError, PinFormat};
use libfuzzer_sys::fuzz_target;

const FORMATS: [PinFormat; 4] = [PinFormat::Iso0, PinFormat::Iso1, PinFormat::Iso3, PinFormat::Iso4];
const HEADER: usize = 2 + 19;

fn id(_: &mut [u8]) -> Result<(), PinError> {
    Ok(())
}

fn account_of(sel: u8, raw: &[u8]) -> Option<Account> {
    let digits: String = raw.iter().map(|b| char::from(b'0' + b % 10)).collect();
    let len = 12 + usize::from(sel % 8); // 12..=19
    if sel & 0x80 != 0 {
        // A phone account: 11 digits starting with 1.
        let phone = format!("1{}", &digits[..10]);
        Account::from_phone(&phone).ok()
    } else {
        Account::from_pan(&digits[..len]).ok()
    }
}

/// The fill of a decoded clear field, replayed as the `random` input of `encipher`
/// so that re-encoding reproduces the block exactly.
fn replay_random(format: PinFormat, clear: &[u8]) -> Vec<u8> {
    let nib = |i: usize| if i % 2 == 0 { clear[i / 2] >> 4 } else { clear[i / 2] & 0x0F };
    let mut r = vec![0u8; 16];
    match format {
        PinFormat::Iso1 => (0..16).for_each(|i| r[i] = nib(i)),
        PinFormat::Iso3 => (0..16).for_each(|i| r[i] = nib(i).wrapping_sub(0x0A)),
        PinFormat::Iso4 => r[..8].copy_from_slice(&clear[8..16]),
        PinFormat::Iso0 => {}
    }
    r
}

fuzz_target!(init: {
    keyward_fuzz::write_seeds_if_asked(seeds);
}, |data: &[u8]| {
    // Free-text account parsers.
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Account::from_pan(s);
        let _ = Account::from_phone(s);
        let _ = Pin::from_digits(s);
    }
    let _ = PinFormat::from_number(keyward_fuzz::u32_at(data, 0));
    if data.len() < HEADER {
        return;
    }
    let format = FORMATS[usize::from(data[0] % 4)];
    let Some(account) = account_of(data[1], &data[2..HEADER]) else {
        return;
    };
    let block = &data[HEADER..];

    let decoded = pin::decipher(format, block, Some(&account), id);
    if format != PinFormat::Iso4 {
        let re = pin::recipher(format, block, id, id);
        if decoded.is_ok() {
            assert_eq!(re.as_deref().ok(), Some(block), "recipher refused or changed a block decipher accepts");
        }
        if let Ok(out) = &re {
            assert_eq!(out.as_slice(), block, "identity recipher changed the block");
        }
    }
    if let Ok(p) = decoded {
        assert!((4..=12).contains(&p.len()));
        assert!(p.digits().iter().all(|d| *d <= 9));
        // The clear PIN field, as decipher saw it, gives the fill to replay.
        let mut clear = block.to_vec();
        match format {
            PinFormat::Iso0 | PinFormat::Iso3 => {
                for (c, a) in clear.iter_mut().zip(account.format0_field()) {
                    *c ^= a;
                }
            }
            PinFormat::Iso4 => {
                for (c, a) in clear.iter_mut().zip(account.format4_field()) {
                    *c ^= a;
                }
            }
            PinFormat::Iso1 => {}
        }
        let random = replay_random(format, &clear);
        let again = pin::encipher(format, &p, Some(&account), &random, id);
        let again = again.unwrap_or_else(|e| panic!("a decoded PIN does not re-encode: {e}"));
        assert_eq!(again.as_slice(), block, "decode(encode) round trip");
        let p2 = pin::decipher(format, &again, Some(&account), id).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p2.digits(), p.digits());
    }
});

/// Valid clear blocks of every format for a few PINs and accounts.
fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let accounts = [("4111111111111111", 4u8), ("5500000000000004", 4), ("400000000000000002", 6), ("123456789012", 0)];
    let pins = ["1234", "000000", "987654321098"];
    for (fi, format) in FORMATS.iter().enumerate() {
        for (pan, sel) in accounts {
            let Ok(account) = Account::from_pan(pan) else { continue };
            for digits in pins {
                let Ok(p) = Pin::from_digits(digits) else { continue };
                let random: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();
                let Ok(block) = pin::encipher(*format, &p, Some(&account), &random, id) else { continue };
                let mut raw: Vec<u8> = pan.bytes().map(|c| c - b'0').collect();
                raw.resize(19, 0);
                let mut seed = vec![fi as u8, sel];
                seed.extend_from_slice(&raw);
                seed.extend_from_slice(&block);
                out.push(seed);
            }
        }
    }
    out
}
