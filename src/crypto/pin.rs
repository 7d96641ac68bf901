//! ISO 9564-1 PIN blocks (formats 0, 1, 3, 4), the account numbers they bind to
//! (card PANs and the phone-number virtual PAN), clear PINs in
//! zeroizing memory, and the pure parts of PIN verification (IBM 3624 offset, Visa
//! PVV, keyward's HMAC input). Every encipherment is a caller-supplied closure: the
//! keys live in the token.

use std::fmt;

use zeroize::Zeroizing;

use crate::crypto::encoding::domain_separated;
use crate::crypto::mac::ct_eq;

/// Shortest and longest PIN ISO 9564-1 allows.
const MIN_PIN: usize = 4;
const MAX_PIN: usize = 12;
/// Shortest and longest account number.
const MIN_ACCOUNT: usize = 12;
const MAX_ACCOUNT: usize = 19;
/// Fresh randomness every PIN-block construction must be given (formats 1, 3, 4).
const RANDOM_LEN: usize = 16;

/// The ISO 9564-1 PIN block formats keyward handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinFormat {
    Iso0,
    Iso1,
    Iso3,
    Iso4,
}

impl PinFormat {
    /// Block length in bytes: 8 for the TDES formats 0, 1, 3; 16 for the AES format 4.
    pub fn block_len(self) -> usize {
        match self {
            PinFormat::Iso4 => 16,
            PinFormat::Iso0 | PinFormat::Iso1 | PinFormat::Iso3 => 8,
        }
    }

    /// Whether the block binds the account number (formats 0, 3, 4).
    pub fn pan_bound(self) -> bool {
        !matches!(self, PinFormat::Iso1)
    }

    /// The format of ISO number `n`, if keyward handles it.
    pub fn from_number(n: u32) -> Option<Self> {
        match n {
            0 => Some(PinFormat::Iso0),
            1 => Some(PinFormat::Iso1),
            3 => Some(PinFormat::Iso3),
            4 => Some(PinFormat::Iso4),
            _ => None,
        }
    }

    /// The ISO format number, which is also the block's control nibble.
    pub fn number(self) -> u32 {
        match self {
            PinFormat::Iso0 => 0,
            PinFormat::Iso1 => 1,
            PinFormat::Iso3 => 3,
            PinFormat::Iso4 => 4,
        }
    }

    fn control(self) -> u8 {
        match self {
            PinFormat::Iso0 => 0,
            PinFormat::Iso1 => 1,
            PinFormat::Iso3 => 3,
            PinFormat::Iso4 => 4,
        }
    }
}

/// What can go wrong with PIN blocks and PIN verification inputs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PinError {
    /// One uniform answer for every block that does not decode (control nibble,
    /// length, digits, fill, block length): no detail.
    #[error("PIN block does not contain valid values")]
    BadBlock,
    /// Caller input that is not a PIN block (account number, PIN text, parameters);
    /// the message names the field, never echoes the value.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: &str) -> PinError {
    PinError::Invalid(msg.to_string())
}

/// An account number used as PIN-block account field and PIN-verification input:
/// 12-19 ASCII digits, the last being the check digit. Debug prints only the length.
#[derive(Clone, PartialEq, Eq)]
pub struct Account {
    digits: Zeroizing<String>,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Account({} digits)", self.digits.len())
    }
}

impl Account {
    /// A card account number: 12-19 ASCII digits. The check digit is not verified
    /// (issuers' test and private-label PANs do not always carry a valid one).
    pub fn from_pan(digits: &str) -> Result<Account, PinError> {
        let b = digits.as_bytes();
        if !(MIN_ACCOUNT..=MAX_ACCOUNT).contains(&b.len()) || !b.iter().all(u8::is_ascii_digit) {
            return Err(invalid("account number must be 12-19 digits"));
        }
        Ok(Account {
            digits: Zeroizing::new(digits.to_string()),
        })
    }

    /// The virtual PAN of a phone-number account a Chinese mobile number, given as `+86` and 11 digits or as
    /// the bare 11 digits, the first digit 1; the national 11 digits followed by their
    /// Luhn check digit. "13812345678" -> "138123456780". Other country codes, and the
    /// ambiguous "86" without `+`, are refused.
    pub fn from_phone(phone: &str) -> Result<Account, PinError> {
        let national = match phone.strip_prefix("+86") {
            Some(rest) => rest,
            None if phone.starts_with('+') => {
                return Err(invalid(
                    "phone number account: only Chinese mobile numbers (+86) are supported",
                ))
            }
            None => phone,
        };
        let b = national.as_bytes();
        if b.len() != 11 || b[0] != b'1' || !b.iter().all(u8::is_ascii_digit) {
            return Err(invalid(
                "phone number must be a Chinese mobile number: 11 digits starting with 1, optionally after +86",
            ));
        }
        let check = luhn_check_digit(national).ok_or_else(|| invalid("phone number must be digits"))?;
        let mut digits = Zeroizing::new(String::with_capacity(12));
        digits.push_str(national);
        digits.push(char::from(b'0' + check));
        Ok(Account { digits })
    }

    /// The account number's ASCII digits.
    pub fn digits(&self) -> &str {
        &self.digits
    }

    /// The values of the `n` rightmost digits before the check digit, left-padded
    /// with zeros.
    fn rightmost_body(&self, n: usize) -> Zeroizing<Vec<u8>> {
        let b = self.digits.as_bytes();
        let body = &b[..b.len().saturating_sub(1)];
        let take = body.len().min(n);
        let mut out = Zeroizing::new(Vec::with_capacity(n));
        out.resize(n - take, 0);
        out.extend(body[body.len() - take..].iter().map(|c| c - b'0'));
        out
    }

    /// The format 0/3 account field: 0000 then the 12 rightmost digits excluding the
    /// check digit (left-padded with zeros when there are fewer).
    pub fn format0_field(&self) -> [u8; 8] {
        let mut nibbles = [0u8; 16];
        nibbles[4..].copy_from_slice(&self.rightmost_body(12));
        let mut out = [0u8; 8];
        pack(&nibbles, &mut out);
        out
    }

    /// The format 4 account field (ISO 9564-1:2017): nibble 0 = length - 12, then
    /// every digit, then zero fill to 16 bytes.
    pub fn format4_field(&self) -> [u8; 16] {
        let b = self.digits.as_bytes();
        let mut nibbles = [0u8; 32];
        nibbles[0] = (b.len().saturating_sub(MIN_ACCOUNT) & 0x0F) as u8;
        for (n, c) in nibbles[1..].iter_mut().zip(b) {
            *n = c - b'0';
        }
        let mut out = [0u8; 16];
        pack(&nibbles, &mut out);
        out
    }
}

/// The Luhn check digit to append to `digits`; None unless `digits` is non-empty
/// ASCII digits.
pub fn luhn_check_digit(digits: &str) -> Option<u8> {
    let b = digits.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let sum: u32 = b
        .iter()
        .rev()
        .enumerate()
        .map(|(i, c)| {
            let d = u32::from(c - b'0');
            if i.is_multiple_of(2) {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    Some(((10 - sum % 10) % 10) as u8)
}

/// A clear PIN of 4-12 digits in zeroizing memory. Not `Clone` (a clear PIN is never
/// cloned); Debug prints only the length.
pub struct Pin {
    /// Digit values 0..=9; capacity fixed at [`MAX_PIN`] so pushes never reallocate.
    digits: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pin({} digits)", self.digits.len())
    }
}

impl Pin {
    /// A PIN from 4-12 ASCII digits.
    pub fn from_digits(s: &str) -> Result<Pin, PinError> {
        let b = s.as_bytes();
        if !(MIN_PIN..=MAX_PIN).contains(&b.len()) || !b.iter().all(u8::is_ascii_digit) {
            return Err(invalid("PIN must be 4-12 digits"));
        }
        let mut digits = Zeroizing::new(Vec::with_capacity(MAX_PIN));
        digits.extend(b.iter().map(|c| c - b'0'));
        Ok(Pin { digits })
    }

    /// Number of digits.
    pub fn len(&self) -> usize {
        self.digits.len()
    }

    /// Always false: a PIN has at least 4 digits.
    pub fn is_empty(&self) -> bool {
        self.digits.is_empty()
    }

    /// Digit values 0-9.
    pub fn digits(&self) -> &[u8] {
        &self.digits
    }

    /// The digits as ASCII, in zeroizing memory.
    fn ascii(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(self.digits.len()));
        out.extend(self.digits.iter().map(|d| b'0' + d));
        out
    }
}

// ---------------------------------------------------------------------------
// PIN blocks
// ---------------------------------------------------------------------------

/// Packs nibbles (values 0-15) two to a byte, high nibble first, filling `out`.
fn pack(nibbles: &[u8], out: &mut [u8]) {
    for (o, pair) in out.iter_mut().zip(nibbles.chunks_exact(2)) {
        *o = (pair[0] << 4) | (pair[1] & 0x0F);
    }
}

/// Nibble `i` of `block`, high nibble first.
fn nibble(block: &[u8], i: usize) -> u8 {
    let b = block[i / 2];
    if i.is_multiple_of(2) {
        b >> 4
    } else {
        b & 0x0F
    }
}

fn xor_in_place(a: &mut [u8], b: &[u8]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

fn require_account(format: PinFormat, account: Option<&Account>) -> Result<Option<&Account>, PinError> {
    match (format.pan_bound(), account) {
        (true, None) => Err(PinError::Invalid(format!(
            "PIN block format {} needs an account number",
            format.number()
        ))),
        (true, Some(a)) => Ok(Some(a)),
        (false, _) => Ok(None),
    }
}

/// The plaintext PIN field: control nibble, length nibble, PIN digits, then the
/// format's fill (0: F; 1: random nibbles; 3: random A-F; 4: A, then `random[0..8]`
/// as bytes 8..16).
fn pin_field(format: PinFormat, pin: &Pin, random: &[u8]) -> Result<Zeroizing<Vec<u8>>, PinError> {
    if format != PinFormat::Iso0 && random.len() < RANDOM_LEN {
        return Err(invalid("PIN block randomness must be at least 16 bytes"));
    }
    let n = pin.len();
    let mut nibbles = Zeroizing::new([0u8; 16]);
    nibbles[0] = format.control();
    nibbles[1] = (n & 0x0F) as u8;
    nibbles[2..2 + n].copy_from_slice(pin.digits());
    for (i, nib) in nibbles.iter_mut().enumerate().skip(2 + n) {
        *nib = match format {
            PinFormat::Iso0 => 0x0F,
            PinFormat::Iso1 => random[i] & 0x0F,
            // Six values from a byte: the bias (4 of 256) is immaterial for fill.
            PinFormat::Iso3 => 0x0A + random[i] % 6,
            PinFormat::Iso4 => 0x0A,
        };
    }
    let mut field = Zeroizing::new(vec![0u8; format.block_len()]);
    pack(&nibbles[..], &mut field[..8]);
    if format == PinFormat::Iso4 {
        field[8..].copy_from_slice(&random[..8]);
    }
    Ok(field)
}

/// The clear block before encryption: for formats 0 and 3 the PIN field xor the
/// account field, for format 1 the PIN field; for format 4 the plaintext PIN field
/// (the input of the first encipherment; the account field enters between the two).
/// `random`: at least 16 bytes of fresh randomness for formats 1, 3 and 4 (format 0
/// ignores it). Formats 0, 3, 4 need `account`.
pub fn clear_block(
    format: PinFormat,
    pin: &Pin,
    account: Option<&Account>,
    random: &[u8],
) -> Result<Zeroizing<Vec<u8>>, PinError> {
    let account = require_account(format, account)?;
    let mut field = pin_field(format, pin, random)?;
    if let (PinFormat::Iso0 | PinFormat::Iso3, Some(a)) = (format, account) {
        xor_in_place(&mut field, &a.format0_field());
    }
    Ok(field)
}

/// Builds and enciphers a block. `random`: at least 16 bytes of fresh randomness
/// (format 1 fill, format 3 fill nibbles A-F, format 4 bytes 8..16 of the PIN field
/// from `random[0..8]`). Formats 0/3/4 need `account` (else [`PinError::Invalid`]),
/// format 1 ignores it. 0: E(PIN field xor account field); 1: E(PIN field); 3: as 0
/// with random A-F fill; 4: E(E(PIN field) xor account field). `encrypt` enciphers one
/// block in place.
pub fn encipher<E: From<PinError>>(
    format: PinFormat,
    pin: &Pin,
    account: Option<&Account>,
    random: &[u8],
    mut encrypt: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    let mut block = clear_block(format, pin, account, random)?;
    encrypt(&mut block[..])?;
    if let (PinFormat::Iso4, Some(a)) = (format, account) {
        xor_in_place(&mut block, &a.format4_field());
        encrypt(&mut block[..])?;
    }
    Ok(block.to_vec())
}

/// Deciphers and checks a block: block length, control nibble, PIN length 4-12,
/// digits only, fill (0: F; 3: A-F; 1: any, ISO's transaction-unique fill; 4: A up
/// to nibble 15, bytes 8..16 anything). Every decoding failure is the same
/// [`PinError::BadBlock`]; a missing account for formats 0/3/4 is
/// [`PinError::Invalid`]. `decrypt` deciphers one block in place. Intermediate clear
/// data lives only in zeroizing buffers.
pub fn decipher<E: From<PinError>>(
    format: PinFormat,
    block: &[u8],
    account: Option<&Account>,
    mut decrypt: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<Pin, E> {
    let account = require_account(format, account)?;
    if block.len() != format.block_len() {
        return Err(PinError::BadBlock.into());
    }
    let mut buf = Zeroizing::new(block.to_vec());
    decrypt(&mut buf[..])?;
    match (format, account) {
        (PinFormat::Iso0 | PinFormat::Iso3, Some(a)) => xor_in_place(&mut buf, &a.format0_field()),
        (PinFormat::Iso4, Some(a)) => {
            xor_in_place(&mut buf, &a.format4_field());
            decrypt(&mut buf[..])?;
        }
        _ => {}
    }
    parse_pin_field(format, &buf).map_err(E::from)
}

/// Checks a plaintext PIN field without returning early on the first fault, so
/// every malformed field takes the same path to the same error.
fn parse_pin_field(format: PinFormat, field: &[u8]) -> Result<Pin, PinError> {
    if field.len() != format.block_len() {
        return Err(PinError::BadBlock);
    }
    let n = usize::from(nibble(field, 1));
    let n_ok = (MIN_PIN..=MAX_PIN).contains(&n);
    let n_eff = if n_ok { n } else { MAX_PIN };
    let mut bad = nibble(field, 0) != format.control();
    bad |= !n_ok;
    let mut digits = Zeroizing::new(Vec::with_capacity(MAX_PIN));
    for i in 2..16 {
        let v = nibble(field, i);
        if i < 2 + n_eff {
            bad |= v > 9;
            digits.push(v);
        } else {
            bad |= !match format {
                PinFormat::Iso0 => v == 0x0F,
                PinFormat::Iso1 => true,
                PinFormat::Iso3 => v >= 0x0A,
                PinFormat::Iso4 => v == 0x0A,
            };
        }
    }
    if bad {
        return Err(PinError::BadBlock);
    }
    Ok(Pin { digits })
}

/// A same-format translation that does not need the account (formats 0, 1 and 3):
/// deciphers `block` with `decrypt`, checks only the fields that do not depend on the
/// account, and enciphers the clear block exactly as it was with `encrypt`. Formats 0
/// and 3: the account field's first four nibbles are zero, so the control nibble, the
/// PIN length (4-12) and the first two PIN digits are checked; the rest stays bound to
/// the block's own account, whatever account the caller states. Format 1 carries no
/// account: every field is checked. The answer (a block or [`PinError::BadBlock`]) is
/// the same whatever account a caller states. Format 4 needs the account to decipher
/// and is [`PinError::Invalid`]. The clear block lives only in a zeroizing buffer.
pub fn recipher<E: From<PinError>>(
    format: PinFormat,
    block: &[u8],
    mut decrypt: impl FnMut(&mut [u8]) -> Result<(), E>,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<Vec<u8>, E> {
    if format == PinFormat::Iso4 {
        return Err(invalid("a format 4 block cannot be re-enciphered without its account").into());
    }
    if block.len() != format.block_len() {
        return Err(PinError::BadBlock.into());
    }
    let mut buf = Zeroizing::new(block.to_vec());
    decrypt(&mut buf[..])?;
    match format {
        PinFormat::Iso1 => drop(parse_pin_field(format, &buf)?),
        _ => check_account_free_fields(format, &buf)?,
    }
    encrypt(&mut buf[..])?;
    Ok(buf.to_vec())
}

/// Format 0/3 clear block (PIN field xor account field): the nibbles the account
/// field leaves alone (control, length, first two PIN digits), checked without
/// returning early.
fn check_account_free_fields(format: PinFormat, clear: &[u8]) -> Result<(), PinError> {
    let n = usize::from(nibble(clear, 1));
    let mut bad = nibble(clear, 0) != format.control();
    bad |= !(MIN_PIN..=MAX_PIN).contains(&n);
    bad |= nibble(clear, 2) > 9;
    bad |= nibble(clear, 3) > 9;
    if bad {
        Err(PinError::BadBlock)
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// PIN verification methods
// ---------------------------------------------------------------------------

/// The IBM 3624 decimalisation table keyward uses.
const IBM3624_TABLE: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5];

/// IBM 3624 validation data: the account's 12 format-0 digits (rightmost 12
/// excluding the check digit, zero-left-padded) followed by FFFF.
fn ibm3624_validation_data(account: &Account) -> [u8; 8] {
    let f0 = account.format0_field();
    let mut v = [0xFF; 8];
    v[..6].copy_from_slice(&f0[2..]);
    v
}

/// The first `len` digits of the natural PIN: the enciphered validation data,
/// decimalised with `table`.
fn ibm3624_natural<E>(
    validation: &[u8; 8],
    table: &[u8; 16],
    len: usize,
    encrypt: &mut impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<Zeroizing<Vec<u8>>, E> {
    let mut buf = Zeroizing::new(*validation);
    encrypt(&mut buf[..])?;
    let mut natural = Zeroizing::new(Vec::with_capacity(16));
    for i in 0..len.min(16) {
        natural.push(table[usize::from(nibble(&buf[..], i))]);
    }
    Ok(natural)
}

/// Offset digits `(pin - natural) mod 10`, as ASCII.
fn offset_of(pin: &[u8], natural: &[u8]) -> String {
    pin.iter()
        .zip(natural)
        .map(|(p, n)| char::from(b'0' + (p + 10 - n) % 10))
        .collect()
}

/// IBM 3624 PIN offset of `pin` for `account` (same length as the PIN). `encrypt`
/// enciphers one 8-byte block with the PVK (TDES-ECB in the token).
pub fn ibm3624_offset<E>(
    account: &Account,
    pin: &Pin,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<String, E> {
    let natural = ibm3624_natural(
        &ibm3624_validation_data(account),
        &IBM3624_TABLE,
        pin.len(),
        &mut encrypt,
    )?;
    Ok(offset_of(pin.digits(), &natural))
}

/// Verifies `pin` against an IBM 3624 `offset` (4-12 digits, else
/// [`PinError::Invalid`]). False when the PIN length differs from the offset length.
/// The comparison runs in constant time.
pub fn ibm3624_verify<E: From<PinError>>(
    account: &Account,
    pin: &Pin,
    offset: &str,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<bool, E> {
    let off = offset.as_bytes();
    if !(MIN_PIN..=MAX_PIN).contains(&off.len()) || !off.iter().all(u8::is_ascii_digit) {
        return Err(invalid("PIN offset must be 4-12 digits").into());
    }
    if off.len() != pin.len() {
        return Ok(false);
    }
    let natural = ibm3624_natural(
        &ibm3624_validation_data(account),
        &IBM3624_TABLE,
        pin.len(),
        &mut encrypt,
    )?;
    let mut diff = 0u8;
    for ((n, o), p) in natural.iter().zip(off).zip(pin.digits()) {
        diff |= ((n + (o - b'0')) % 10) ^ p;
    }
    Ok(diff == 0)
}

/// Visa PVV of `pin`: TSP = the 11 rightmost account digits excluding the check
/// digit, the PVKI (0-6, else [`PinError::Invalid`]) and the 4 leftmost PIN digits,
/// enciphered with the PVK (`encrypt`: one 8-byte block, double-length TDES in the
/// token); the first 4 decimal nibbles, left to right, then if needed the A-F
/// nibbles as 0-5.
pub fn visa_pvv<E: From<PinError>>(
    account: &Account,
    pvki: u8,
    pin: &Pin,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<String, E> {
    let pvv = visa_pvv_digits(account, pvki, pin, &mut encrypt)?;
    Ok(pvv.iter().map(|d| char::from(b'0' + d)).collect())
}

/// Verifies `pin` against a stored 4-digit `pvv` (else [`PinError::Invalid`]) in
/// constant time.
pub fn visa_pvv_verify<E: From<PinError>>(
    account: &Account,
    pvki: u8,
    pin: &Pin,
    pvv: &str,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<bool, E> {
    let stored = pvv.as_bytes();
    if stored.len() != 4 || !stored.iter().all(u8::is_ascii_digit) {
        return Err(invalid("PVV must be 4 digits").into());
    }
    let computed = visa_pvv_digits(account, pvki, pin, &mut encrypt)?;
    let mut ascii = Zeroizing::new([0u8; 4]);
    for (a, d) in ascii.iter_mut().zip(computed.iter()) {
        *a = b'0' + d;
    }
    Ok(ct_eq(&ascii[..], stored))
}

fn visa_pvv_digits<E: From<PinError>>(
    account: &Account,
    pvki: u8,
    pin: &Pin,
    encrypt: &mut impl FnMut(&mut [u8]) -> Result<(), E>,
) -> Result<Zeroizing<Vec<u8>>, E> {
    if pvki > 6 {
        return Err(invalid("PVKI must be 0-6").into());
    }
    let mut nibbles = Zeroizing::new([0u8; 16]);
    nibbles[..11].copy_from_slice(&account.rightmost_body(11));
    nibbles[11] = pvki;
    nibbles[12..].copy_from_slice(&pin.digits()[..4]);
    let mut tsp = Zeroizing::new([0u8; 8]);
    pack(&nibbles[..], &mut tsp[..]);
    encrypt(&mut tsp[..])?;
    let mut pvv = Zeroizing::new(Vec::with_capacity(4));
    for i in 0..16 {
        let v = nibble(&tsp[..], i);
        if v <= 9 && pvv.len() < 4 {
            pvv.push(v);
        }
    }
    for i in 0..16 {
        let v = nibble(&tsp[..], i);
        if v > 9 && pvv.len() < 4 {
            pvv.push(v - 10);
        }
    }
    Ok(pvv)
}

/// The input of keyward's own PIN verification (an HMAC in the token with the
/// `pvk` key): `domain_separated("keyward/v1/pvd", [account digits, PIN digits])`,
/// both as ASCII.
pub fn keyward_pvd_input(account: &Account, pin: &Pin) -> Zeroizing<Vec<u8>> {
    let pin_ascii = pin.ascii();
    // domain_separated allocates its exact length once, so no stray copy remains.
    Zeroizing::new(domain_separated(
        "keyward/v1/pvd",
        &[account.digits().as_bytes(), &pin_ascii[..]],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::symm::{Cipher, Crypter, Mode};

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// A test-only error type for the generic closures.
    #[derive(Debug, PartialEq, Eq)]
    enum TestError {
        Pin(PinError),
        Cipher,
    }
    impl From<PinError> for TestError {
        fn from(e: PinError) -> Self {
            TestError::Pin(e)
        }
    }

    fn ecb(cipher: Cipher, key: &[u8], mode: Mode) -> impl FnMut(&mut [u8]) -> Result<(), TestError> + '_ {
        move |b: &mut [u8]| {
            let mut c = Crypter::new(cipher, mode, key, None).map_err(|_| TestError::Cipher)?;
            c.pad(false);
            let mut out = vec![0u8; b.len() + 16];
            let n = c.update(b, &mut out).map_err(|_| TestError::Cipher)?;
            b.copy_from_slice(&out[..n]);
            Ok(())
        }
    }

    fn tdes_key() -> Vec<u8> {
        // 0123456789ABCDEF FEDCBA9876543210 as K1 K2 K1.
        h("0123456789ABCDEFFEDCBA98765432100123456789ABCDEF")
    }

    fn aes_key() -> Vec<u8> {
        h("000102030405060708090A0B0C0D0E0F")
    }

    fn key_for(format: PinFormat) -> (Cipher, Vec<u8>) {
        match format {
            PinFormat::Iso4 => (Cipher::aes_128_ecb(), aes_key()),
            _ => (Cipher::des_ede3_ecb(), tdes_key()),
        }
    }

    fn pan() -> Account {
        Account::from_pan("4111111111111111").unwrap()
    }

    fn phone() -> Account {
        Account::from_phone("13812345678").unwrap()
    }

    const RANDOM: [u8; 16] = [
        0x2F, 0x69, 0xAD, 0xDE, 0x2E, 0x9E, 0x7A, 0xCE, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
    ];

    const ALL: [PinFormat; 4] = [PinFormat::Iso0, PinFormat::Iso1, PinFormat::Iso3, PinFormat::Iso4];

    // ---- formats, accounts, PINs ----

    #[test]
    fn format_properties() {
        assert_eq!(ALL.map(|f| f.block_len()), [8, 8, 8, 16]);
        assert_eq!(ALL.map(|f| f.pan_bound()), [true, false, true, true]);
        for f in ALL {
            assert_eq!(PinFormat::from_number(f.number()), Some(f));
        }
        assert_eq!(PinFormat::from_number(2), None);
        assert_eq!(PinFormat::from_number(5), None);
    }

    #[test]
    fn accounts_from_pan() {
        assert_eq!(Account::from_pan("123456789012").unwrap().digits(), "123456789012");
        assert!(Account::from_pan("1234567890123456789").is_ok());
        for bad in [
            "12345678901",
            "12345678901234567890",
            "41111111111111a1",
            "",
            "４１１１１１１１１１１１",
        ] {
            assert_eq!(
                Account::from_pan(bad).unwrap_err(),
                PinError::Invalid("account number must be 12-19 digits".into())
            );
        }
    }

    #[test]
    fn accounts_from_phone() {
        assert_eq!(Account::from_phone("13812345678").unwrap().digits(), "138123456780");
        assert_eq!(Account::from_phone("+8613812345678").unwrap().digits(), "138123456780");
        assert_eq!(Account::from_phone("+8613812345678").unwrap(), phone());
        for bad in [
            "8613812345678",   // ambiguous without +
            "+85213812345678", // other country code
            "+14155550100",
            "23812345678", // not a mobile number
            "1381234567",  // 10 digits
            "138123456789",
            "+86 13812345678",
            "1381234567x",
            "",
        ] {
            match Account::from_phone(bad) {
                Err(PinError::Invalid(m)) => assert!(!m.contains("1381234"), "message echoes input: {m}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn luhn() {
        assert_eq!(luhn_check_digit("13812345678"), Some(0));
        assert_eq!(luhn_check_digit("411111111111111"), Some(1));
        assert_eq!(luhn_check_digit("7992739871"), Some(3));
        assert_eq!(luhn_check_digit("0"), Some(0));
        assert_eq!(luhn_check_digit(""), None);
        assert_eq!(luhn_check_digit("12a"), None);
    }

    #[test]
    fn account_fields() {
        assert_eq!(pan().format0_field().to_vec(), h("0000111111111111"));
        assert_eq!(phone().format0_field().to_vec(), h("0000013812345678"));
        // 19 digits: the 12 rightmost before the check digit.
        let long = Account::from_pan("1234567890123456789").unwrap();
        assert_eq!(long.format0_field().to_vec(), h("0000789012345678"));
        assert_eq!(pan().format4_field().to_vec(), h("44111111111111111000000000000000"));
        assert_eq!(phone().format4_field().to_vec(), h("01381234567800000000000000000000"));
        assert_eq!(long.format4_field().to_vec(), h("71234567890123456789000000000000"));
    }

    #[test]
    fn debug_never_shows_digits() {
        assert_eq!(format!("{:?}", pan()), "Account(16 digits)");
        assert_eq!(format!("{:?}", Pin::from_digits("123456").unwrap()), "Pin(6 digits)");
        let e = decipher::<TestError>(PinFormat::Iso0, &[0u8; 8], Some(&pan()), |_| Ok(())).unwrap_err();
        assert_eq!(format!("{e:?}"), "Pin(BadBlock)");
    }

    #[test]
    fn pins() {
        let p = Pin::from_digits("0912").unwrap();
        assert_eq!(p.digits(), &[0, 9, 1, 2]);
        assert_eq!(p.len(), 4);
        assert!(!p.is_empty());
        assert_eq!(Pin::from_digits("123456789012").unwrap().len(), 12);
        for bad in ["123", "1234567890123", "12a4", "", "１２３４", " 1234"] {
            assert_eq!(
                Pin::from_digits(bad).unwrap_err(),
                PinError::Invalid("PIN must be 4-12 digits".into())
            );
        }
    }

    // ---- clear blocks and known answers ----

    /// vectors.md: format 0 with a PAN and with a phone-number account.
    #[test]
    fn format0_clear_block_vectors() {
        let pin = Pin::from_digits("1234").unwrap();
        let b = clear_block(PinFormat::Iso0, &pin, Some(&pan()), &[]).unwrap();
        assert_eq!(b.to_vec(), h("041225EEEEEEEEEE"));
        let b = clear_block(PinFormat::Iso0, &pin, Some(&phone()), &[]).unwrap();
        assert_eq!(b.to_vec(), h("041235C7EDCBA987"));
    }

    #[test]
    fn format1_and_3_clear_blocks() {
        let pin = Pin::from_digits("1234").unwrap();
        let b = clear_block(PinFormat::Iso1, &pin, None, &RANDOM).unwrap();
        // Fill nibbles: low nibble of random[6..16].
        assert_eq!(b.to_vec(), h("141234AE01234567"));
        let b = clear_block(PinFormat::Iso3, &pin, Some(&pan()), &RANDOM).unwrap();
        let mut field = b.to_vec();
        xor_in_place(&mut field, &pan().format0_field());
        assert_eq!(field[..3].to_vec(), h("341234"));
        for i in 6..16 {
            assert!(nibble(&field, i) >= 0x0A, "format 3 fill nibble {i}");
        }
    }

    /// vectors.md: format 4 PIN field with the fixed random part.
    #[test]
    fn format4_pin_field() {
        let pin = Pin::from_digits("1234").unwrap();
        let b = clear_block(PinFormat::Iso4, &pin, Some(&pan()), &RANDOM).unwrap();
        assert_eq!(b.to_vec(), h("441234AAAAAAAAAA2F69ADDE2E9E7ACE"));
    }

    /// vectors.md: format 4 known answers under K = 000102..0F for a PAN and for a
    /// phone-number account, and the round trip.
    #[test]
    fn format4_known_answers() {
        let pin = Pin::from_digits("1234").unwrap();
        let key = aes_key();
        for (account, expected) in [
            (pan(), "4EB686DCB6D4C515052CE434DF8A1F71"),
            (phone(), "910EFE2D76A9525ABF8E6CB5FB5761C8"),
        ] {
            let block = encipher(
                PinFormat::Iso4,
                &pin,
                Some(&account),
                &RANDOM,
                ecb(Cipher::aes_128_ecb(), &key, Mode::Encrypt),
            )
            .unwrap();
            assert_eq!(block, h(expected));
            let back = decipher(
                PinFormat::Iso4,
                &block,
                Some(&account),
                ecb(Cipher::aes_128_ecb(), &key, Mode::Decrypt),
            )
            .unwrap();
            assert_eq!(back.digits(), &[1, 2, 3, 4]);
        }
    }

    /// Format 0 through TDES, checked against encrypting the published clear block.
    #[test]
    fn format0_enciphered() {
        let pin = Pin::from_digits("1234").unwrap();
        let key = tdes_key();
        let block = encipher(
            PinFormat::Iso0,
            &pin,
            Some(&pan()),
            &RANDOM,
            ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt),
        )
        .unwrap();
        let expected = openssl::symm::encrypt(Cipher::des_ede3_ecb(), &key, None, &h("041225EEEEEEEEEE")).unwrap();
        assert_eq!(block, expected[..8].to_vec());
    }

    #[test]
    fn every_format_and_length_round_trips() {
        for format in ALL {
            let (cipher, key) = key_for(format);
            for len in MIN_PIN..=MAX_PIN {
                let text: String = "9876543210987".chars().take(len).collect();
                let pin = Pin::from_digits(&text).unwrap();
                for account in [pan(), phone()] {
                    let block =
                        encipher(format, &pin, Some(&account), &RANDOM, ecb(cipher, &key, Mode::Encrypt)).unwrap();
                    assert_eq!(block.len(), format.block_len());
                    let back = decipher(format, &block, Some(&account), ecb(cipher, &key, Mode::Decrypt)).unwrap();
                    assert_eq!(back.digits(), pin.digits(), "{format:?} length {len}");
                }
            }
        }
    }

    /// A block bound to one account does not decode under another (here it happens
    /// to fail the checks) or gives a different PIN; format 1 ignores the account.
    #[test]
    fn account_binding() {
        let pin = Pin::from_digits("1234").unwrap();
        let key = aes_key();
        let block = encipher(
            PinFormat::Iso4,
            &pin,
            Some(&pan()),
            &RANDOM,
            ecb(Cipher::aes_128_ecb(), &key, Mode::Encrypt),
        )
        .unwrap();
        let other = decipher(
            PinFormat::Iso4,
            &block,
            Some(&phone()),
            ecb(Cipher::aes_128_ecb(), &key, Mode::Decrypt),
        );
        assert!(other.map(|p| p.digits() != pin.digits()).unwrap_or(true));
        let tkey = tdes_key();
        let b1 = encipher(
            PinFormat::Iso1,
            &pin,
            Some(&pan()),
            &RANDOM,
            ecb(Cipher::des_ede3_ecb(), &tkey, Mode::Encrypt),
        )
        .unwrap();
        let b2 = encipher(
            PinFormat::Iso1,
            &pin,
            None,
            &RANDOM,
            ecb(Cipher::des_ede3_ecb(), &tkey, Mode::Encrypt),
        )
        .unwrap();
        assert_eq!(b1, b2);
    }

    /// A same-format re-encipherment keeps the block bound to its own account and checks
    /// only what the account does not touch.
    #[test]
    fn recipher_keeps_the_clear_block_and_checks_account_free_fields() {
        let key = tdes_key();
        let dest = h("89ABCDEF0123456776543210FEDCBA9889ABCDEF01234567");
        let pin = Pin::from_digits("482193").unwrap();
        for format in [PinFormat::Iso0, PinFormat::Iso1, PinFormat::Iso3] {
            let block = encipher(format, &pin, Some(&pan()), &RANDOM, ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt)).unwrap();
            let out = recipher(
                format,
                &block,
                ecb(Cipher::des_ede3_ecb(), &key, Mode::Decrypt),
                ecb(Cipher::des_ede3_ecb(), &dest, Mode::Encrypt),
            )
            .unwrap();
            let back = decipher(format, &out, Some(&pan()), ecb(Cipher::des_ede3_ecb(), &dest, Mode::Decrypt)).unwrap();
            assert_eq!(back.digits(), pin.digits(), "{format:?}");
            if format != PinFormat::Iso1 {
                // Still bound to the block's own account: another one does not give the PIN.
                let other = decipher(format, &out, Some(&phone()), ecb(Cipher::des_ede3_ecb(), &dest, Mode::Decrypt));
                assert!(other.map(|p| p.digits() != pin.digits()).unwrap_or(true), "{format:?}");
            }
        }
        let identity = |b: &mut [u8]| -> Result<(), TestError> {
            let _ = b;
            Ok(())
        };
        let field = |hex: &str| xor_in_place_copy(&h(hex), &pan().format0_field());
        let bad = TestError::Pin(PinError::BadBlock);
        for (format, hex, what) in [
            (PinFormat::Iso0, "141234FFFFFFFFFF", "control 1"),
            (PinFormat::Iso0, "03123FFFFFFFFFFF", "length 3"),
            (PinFormat::Iso0, "0D1234567890123F", "length 13"),
            (PinFormat::Iso0, "04A234FFFFFFFFFF", "first digit A"),
            (PinFormat::Iso0, "041F34FFFFFFFFFF", "second digit F"),
            (PinFormat::Iso3, "041234ABCDEFABCD", "control 0 in format 3"),
        ] {
            assert_eq!(recipher(format, &field(hex), identity, identity).unwrap_err(), bad, "{what}");
        }
        assert_eq!(recipher(PinFormat::Iso1, &h("041234FFFFFFFFFF"), identity, identity).unwrap_err(), bad);
        assert_eq!(recipher(PinFormat::Iso1, &h("14123F0123456789"), identity, identity).unwrap_err(), bad);
        assert_eq!(recipher(PinFormat::Iso0, &h("041234FFFFFFFF"), identity, identity).unwrap_err(), bad);
        // What depends on the account is left to the destination: it passes unchanged.
        let loose = field("04123AFFFFFFFFFE");
        assert_eq!(recipher(PinFormat::Iso0, &loose, identity, identity).unwrap(), loose);
        assert!(matches!(
            recipher(PinFormat::Iso4, &[0u8; 16], identity, identity),
            Err(TestError::Pin(PinError::Invalid(_)))
        ));
    }

    fn xor_in_place_copy(a: &[u8], b: &[u8]) -> Vec<u8> {
        let mut v = a.to_vec();
        xor_in_place(&mut v, b);
        v
    }

    #[test]
    fn caller_errors_are_invalid() {
        let pin = Pin::from_digits("1234").unwrap();
        for format in [PinFormat::Iso0, PinFormat::Iso3, PinFormat::Iso4] {
            let e = encipher::<TestError>(format, &pin, None, &RANDOM, |_| Ok(())).unwrap_err();
            assert!(matches!(e, TestError::Pin(PinError::Invalid(_))), "{format:?}");
            let e = decipher::<TestError>(format, &vec![0u8; format.block_len()], None, |_| Ok(())).unwrap_err();
            assert!(matches!(e, TestError::Pin(PinError::Invalid(_))), "{format:?}");
        }
        for format in [PinFormat::Iso1, PinFormat::Iso3, PinFormat::Iso4] {
            let e = encipher::<TestError>(format, &pin, Some(&pan()), &RANDOM[..15], |_| Ok(())).unwrap_err();
            assert!(matches!(e, TestError::Pin(PinError::Invalid(_))), "{format:?}");
        }
        // Format 0 needs no randomness.
        assert!(encipher::<TestError>(PinFormat::Iso0, &pin, Some(&pan()), &[], |_| Ok(())).is_ok());
    }

    #[test]
    fn cipher_errors_pass_through() {
        let pin = Pin::from_digits("1234").unwrap();
        let e = encipher(PinFormat::Iso1, &pin, None, &RANDOM, |_| Err(TestError::Cipher)).unwrap_err();
        assert_eq!(e, TestError::Cipher);
        let e = decipher(PinFormat::Iso1, &[0u8; 8], None, |_| Err(TestError::Cipher)).unwrap_err();
        assert_eq!(e, TestError::Cipher);
    }

    // ---- malformed blocks ----

    /// Turns a plaintext PIN field into the block that deciphers to it under the
    /// identity "cipher", then deciphers it.
    fn decode_field(format: PinFormat, field_hex: &str) -> Result<Pin, TestError> {
        let account = pan();
        let mut block = h(field_hex);
        if block.len() == format.block_len() {
            match format {
                PinFormat::Iso0 | PinFormat::Iso3 => xor_in_place(&mut block, &account.format0_field()),
                PinFormat::Iso4 => xor_in_place(&mut block, &account.format4_field()),
                PinFormat::Iso1 => {}
            }
        }
        decipher(format, &block, Some(&account), |_| Ok(()))
    }

    #[test]
    fn identity_decoding_accepts_good_fields() {
        assert_eq!(
            decode_field(PinFormat::Iso0, "041234FFFFFFFFFF").unwrap().digits(),
            &[1, 2, 3, 4]
        );
        assert_eq!(
            decode_field(PinFormat::Iso1, "1412340123456789").unwrap().digits(),
            &[1, 2, 3, 4]
        );
        assert_eq!(
            decode_field(PinFormat::Iso3, "341234ABCDEFABCD").unwrap().digits(),
            &[1, 2, 3, 4]
        );
        assert_eq!(
            decode_field(PinFormat::Iso4, "441234AAAAAAAAAA0123456789ABCDEF")
                .unwrap()
                .digits(),
            &[1, 2, 3, 4]
        );
        assert_eq!(decode_field(PinFormat::Iso0, "0C123456789012FF").unwrap().len(), 12);
    }

    #[test]
    fn malformed_blocks_are_all_bad_block() {
        let bad = TestError::Pin(PinError::BadBlock);
        let cases: &[(PinFormat, &str, &str)] = &[
            // wrong control nibble
            (PinFormat::Iso0, "141234FFFFFFFFFF", "control 1 in format 0"),
            (PinFormat::Iso1, "041234FFFFFFFFFF", "control 0 in format 1"),
            (PinFormat::Iso3, "041234FFFFFFFFFF", "control 0 in format 3"),
            (
                PinFormat::Iso4,
                "341234AAAAAAAAAA0123456789ABCDEF",
                "control 3 in format 4",
            ),
            (PinFormat::Iso0, "241234FFFFFFFFFF", "format 2 control"),
            // PIN length
            (PinFormat::Iso0, "03123FFFFFFFFFFF", "length 3"),
            (PinFormat::Iso0, "0D1234567890123F", "length 13"),
            (PinFormat::Iso1, "1D12345678901230", "length 13 format 1"),
            (PinFormat::Iso3, "33123AAAAAAAAAAA", "length 3 format 3"),
            (
                PinFormat::Iso4,
                "4D1234567890123A0123456789ABCDEF",
                "length 13 format 4",
            ),
            (PinFormat::Iso0, "00FFFFFFFFFFFFFF", "length 0"),
            (PinFormat::Iso0, "0FFFFFFFFFFFFFFF", "length 15"),
            // non-digit PIN nibble
            (PinFormat::Iso0, "04123AFFFFFFFFFF", "A in PIN"),
            (PinFormat::Iso1, "14F2340123456789", "F in PIN"),
            (PinFormat::Iso3, "3412B4ABCDEFABCD", "B in PIN"),
            (PinFormat::Iso4, "44123FAAAAAAAAAA0123456789ABCDEF", "F in PIN"),
            // fill
            (PinFormat::Iso0, "041234FFFFFFFFFE", "format 0 fill E"),
            (PinFormat::Iso0, "0412340FFFFFFFFF", "format 0 fill 0"),
            (PinFormat::Iso3, "341234ABCDEFABC9", "format 3 fill 9"),
            (PinFormat::Iso3, "3412340BCDEFABCD", "format 3 fill 0"),
            (PinFormat::Iso4, "441234AAAAAAAAAB0123456789ABCDEF", "format 4 fill B"),
            (PinFormat::Iso4, "441234FAAAAAAAAA0123456789ABCDEF", "format 4 fill F"),
            // block length
            (PinFormat::Iso0, "041234FFFFFFFF", "7 bytes"),
            (PinFormat::Iso0, "041234FFFFFFFFFFFF", "9 bytes"),
            (
                PinFormat::Iso0,
                "041234FFFFFFFFFF041234FFFFFFFFFF",
                "16 bytes for format 0",
            ),
            (PinFormat::Iso4, "441234AAAAAAAAAA", "8 bytes for format 4"),
            (PinFormat::Iso1, "", "empty"),
        ];
        for (format, field, what) in cases {
            assert_eq!(decode_field(*format, field).unwrap_err(), bad, "{what}");
        }
    }

    /// Garbage under a real key: every block that fails, fails the same way.
    #[test]
    fn random_blocks_fail_uniformly() {
        let key = tdes_key();
        let mut seen_bad = 0;
        for i in 0..64u8 {
            let block = [i, i.wrapping_mul(7), 3, 4, 5, 6, 7, i];
            match decipher(
                PinFormat::Iso0,
                &block,
                Some(&pan()),
                ecb(Cipher::des_ede3_ecb(), &key, Mode::Decrypt),
            ) {
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e, TestError::Pin(PinError::BadBlock));
                    seen_bad += 1;
                }
            }
        }
        assert!(seen_bad > 60);
    }

    // ---- PIN verification ----

    fn pvk() -> Vec<u8> {
        tdes_key()
    }

    /// The natural-PIN core with a configurable table, against the public examples of
    /// the psec library (PVK 0123456789ABCDEFFEDCBA9876543210, table
    /// 1234567890123456).
    #[test]
    fn ibm3624_core_matches_published_examples() {
        let key = pvk();
        let table = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6];
        let mut enc = ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt);
        let v: [u8; 8] = h("1122334455667788").try_into().unwrap();
        let natural = ibm3624_natural(&v, &table, 4, &mut enc).unwrap();
        assert_eq!(natural.to_vec(), vec![4, 5, 2, 4]);
        assert_eq!(offset_of(&[1, 2, 3, 4], &natural), "7710");
        assert_eq!(offset_of(&[0, 0, 0, 0], &natural), "6586");
        assert_eq!(offset_of(&[1, 1, 1, 1], &natural), "7697");
        let v: [u8; 8] = h("11223344556677FF").try_into().unwrap();
        assert_eq!(
            ibm3624_natural(&v, &table, 4, &mut enc).unwrap().to_vec(),
            vec![5, 5, 1, 8]
        );
    }

    /// keyward's layout (12 format-0 digits + FFFF, table 0123456789012345) against an
    /// independent computation (values computed with Python's `cryptography`), and
    /// against the same steps written out here with hex strings.
    #[test]
    fn ibm3624_offsets_and_verification() {
        let key = pvk();
        let pin = Pin::from_digits("1234").unwrap();
        let off = ibm3624_offset(&pan(), &pin, ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt)).unwrap();
        assert_eq!(off, "3104");
        // The same steps, written differently.
        let enc = openssl::symm::encrypt(Cipher::des_ede3_ecb(), &key, None, &h("111111111111FFFF")).unwrap();
        let natural: Vec<u8> = hex::encode_upper(&enc[..8])
            .chars()
            .map(|c| (c.to_digit(16).unwrap() % 10) as u8)
            .take(4)
            .collect();
        let manual: String = [1u8, 2, 3, 4]
            .iter()
            .zip(&natural)
            .map(|(p, n)| char::from_digit(u32::from((10 + p - n) % 10), 10).unwrap())
            .collect();
        assert_eq!(off, manual);

        let six = Pin::from_digits("123456").unwrap();
        let off6 = ibm3624_offset(&phone(), &six, ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt)).unwrap();
        assert_eq!(off6, "890439");

        let verify = |account: &Account, pin: &str, offset: &str| {
            ibm3624_verify(
                account,
                &Pin::from_digits(pin).unwrap(),
                offset,
                ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt),
            )
        };
        assert_eq!(verify(&pan(), "1234", "3104"), Ok(true));
        assert_eq!(verify(&pan(), "1235", "3104"), Ok(false));
        assert_eq!(verify(&pan(), "1234", "3105"), Ok(false));
        assert_eq!(verify(&phone(), "1234", "3104"), Ok(false));
        assert_eq!(verify(&phone(), "123456", "890439"), Ok(true));
        assert_eq!(verify(&phone(), "12345", "890439"), Ok(false)); // length differs
        assert_eq!(verify(&phone(), "1234567", "890439"), Ok(false));
        for bad in ["310", "31a4", "", "3104567890123"] {
            assert!(matches!(
                verify(&pan(), "1234", bad),
                Err(TestError::Pin(PinError::Invalid(_)))
            ));
        }
        // Every PIN has exactly one offset, and it verifies.
        for text in ["0000", "9999", "5555555", "012345678901"] {
            let p = Pin::from_digits(text).unwrap();
            let o = ibm3624_offset(&pan(), &p, ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt)).unwrap();
            assert_eq!(o.len(), text.len());
            assert_eq!(verify(&pan(), text, &o), Ok(true));
        }
    }

    /// Published examples of the psec library (PVK 0123456789ABCDEFFEDCBA9876543210),
    /// including ones that need the second (A-F) scan; cross-checked with Python's
    /// `cryptography` TDES.
    #[test]
    fn visa_pvv_published_examples() {
        let key = pvk();
        for (pan, pvki, pin, expected) in [
            ("1122334455667788", 1, "4524", "8523"),
            ("1122334455667788", 2, "1912", "3244"),
            ("1122334455667718", 1, "0570", "3144"),
            ("1122334455667708", 1, "8299", "4422"),
            ("1122334455667788", 3, "4524", "4021"),
        ] {
            let account = Account::from_pan(pan).unwrap();
            let pin = Pin::from_digits(pin).unwrap();
            let pvv = visa_pvv(&account, pvki, &pin, ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt)).unwrap();
            assert_eq!(pvv, expected);
            assert_eq!(
                visa_pvv_verify(
                    &account,
                    pvki,
                    &pin,
                    expected,
                    ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt)
                ),
                Ok(true)
            );
        }
    }

    #[test]
    fn visa_pvv_rules() {
        let key = pvk();
        let enc = || ecb(Cipher::des_ede3_ecb(), &key, Mode::Encrypt);
        let account = Account::from_pan("1122334455667788").unwrap();
        // Only the 4 leftmost PIN digits count.
        let long = Pin::from_digits("452499").unwrap();
        assert_eq!(visa_pvv(&account, 1, &long, enc()).unwrap(), "8523");
        // The TSP the closure sees: 11 digits before the check digit, PVKI, PIN.
        let mut seen = Vec::new();
        let pin = Pin::from_digits("4524").unwrap();
        let _ = visa_pvv::<TestError>(&account, 1, &pin, |b| {
            seen = b.to_vec();
            Ok(())
        });
        assert_eq!(seen, h("3344556677814524"));
        // Phone account: the 11 national digits.
        let _ = visa_pvv::<TestError>(&phone(), 0, &pin, |b| {
            seen = b.to_vec();
            Ok(())
        });
        assert_eq!(seen, h("1381234567804524"));
        assert!(matches!(
            visa_pvv(&account, 7, &pin, enc()),
            Err(TestError::Pin(PinError::Invalid(_)))
        ));
        assert_eq!(visa_pvv_verify(&account, 1, &pin, "8524", enc()), Ok(false));
        assert_eq!(visa_pvv_verify(&account, 2, &pin, "8523", enc()), Ok(false));
        for bad in ["852", "85233", "85a3"] {
            assert!(matches!(
                visa_pvv_verify(&account, 1, &pin, bad, enc()),
                Err(TestError::Pin(PinError::Invalid(_)))
            ));
        }
        // All-letter ciphertext takes every digit from the second scan.
        let pvv = visa_pvv::<TestError>(&account, 1, &pin, |b| {
            b.copy_from_slice(&h("ABCDEFABCDEFABCD"));
            Ok(())
        })
        .unwrap();
        assert_eq!(pvv, "0123");
        let pvv = visa_pvv::<TestError>(&account, 1, &pin, |b| {
            b.copy_from_slice(&h("A9BCDEF8ABCDEF7A"));
            Ok(())
        })
        .unwrap();
        assert_eq!(pvv, "9870");
    }

    #[test]
    fn pvd_input_layout() {
        let pin = Pin::from_digits("1234").unwrap();
        let input = keyward_pvd_input(&phone(), &pin);
        let mut expected = b"keyward/v1/pvd\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 12]);
        expected.extend_from_slice(b"138123456780");
        expected.extend_from_slice(&[0, 0, 0, 4]);
        expected.extend_from_slice(b"1234");
        assert_eq!(input.to_vec(), expected);
        assert_eq!(
            input.to_vec(),
            domain_separated("keyward/v1/pvd", &[b"138123456780".as_slice(), b"1234".as_slice()])
        );
    }
}
