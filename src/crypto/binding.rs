//! Phone-to-account bindings: validation, the record encoding, masking and the sealed format.
//!
//! A binding ties a mobile number (the "mobile financial account") to a bank account
//! after the bank has verified the holder's identity. This module is pure: it
//! validates what arrives over gRPC, encodes the record that the appliance seals with
//! AES-GCM in the token, frames the sealed blob and builds the blind index's HMAC
//! input. Phone numbers, account numbers, ID numbers, names and addresses live in
//! zeroizing memory and never appear in an error message or Debug output: errors name
//! the field and the rule broken, never the value.

use std::fmt::{self, Write as _};

use time::{Date, Month};
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::encoding::domain_separated;

/// Domain tag of the blind index's HMAC input.
const TAG_BLIND_INDEX: &str = "keyward/v1/blind-index";
/// Domain tag of the canonical record encoding (the AES-GCM plaintext).
const TAG_RECORD: &str = "keyward/v1/binding-record";
/// Domain tag of the seal's AES-GCM associated data.
const TAG_SEAL: &str = "keyward/v1/binding";

/// Format byte of a sealed binding.
pub const SEALED_FORMAT_V1: u8 = 1;
/// Record kind bound into the seal's associated data.
pub const RECORD_KIND_BINDING: &str = "binding";
/// Length of a blind index (HMAC-SHA-256).
pub const BLIND_INDEX_LEN: usize = 32;
/// AES-GCM IV and tag lengths of a sealed binding.
const IV_LEN: usize = 12;
const GCM_TAG_LEN: usize = 16;
/// Shortest sealed binding: format, key version, IV, tag and one ciphertext byte (the
/// record encoding is never empty).
pub const MIN_SEALED_LEN: usize = 1 + 4 + IV_LEN + GCM_TAG_LEN + 1;
/// Longest sealed binding. The largest valid record encodes to about 2 KiB.
pub const MAX_SEALED_LEN: usize = 8 * 1024;

/// Version field of the record encoding.
const RECORD_VERSION: u8 = 1;
/// Fields of the record encoding, the version included.
const RECORD_FIELDS: usize = 12;

/// Longest phone input before separators are stripped.
const MAX_PHONE_INPUT: usize = 64;
/// Digits after the `+` of an E.164 number (this appliance's rule: 8..=15).
const MIN_E164_DIGITS: usize = 8;
const MAX_E164_DIGITS: usize = 15;
/// Chinese country calling code and mobile-number length.
const CN_CODE: &str = "86";
const CN_MOBILE_LEN: usize = 11;

const MIN_ACCOUNT_LEN: usize = 12;
const MAX_ACCOUNT_LEN: usize = 19;
const MIN_BANK_CODE_LEN: usize = 3;
const MAX_BANK_CODE_LEN: usize = 12;
/// Text limits, in characters (Unicode scalar values).
const MAX_NAME: usize = 64;
const MAX_ADDRESS: usize = 256;
const MAX_OFFICE: usize = 128;

/// Length of a resident ID (GB 11643-1999 citizen identity number).
const RESIDENT_ID_LEN: usize = 18;
/// ISO 7064 MOD 11-2 weights of the first 17 characters of a resident ID.
const RESIDENT_ID_WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
/// Check character of each weighted-sum remainder 0..=10.
const RESIDENT_ID_CHECK: [u8; 11] = *b"10X98765432";
/// Earliest birth date accepted in a resident ID.
pub const EARLIEST_BIRTH_DATE: Date = match Date::from_calendar_date(1900, Month::January, 1) {
    Ok(d) => d,
    Err(_) => Date::MIN,
};

/// The `id_valid_until` text of an ID card without expiry.
const LONG_TERM: &str = "long-term";

const F_PHONE: &str = "phone";
const F_BANK_CODE: &str = "bank_code";
const F_ACCOUNT: &str = "account_number";
const F_STATE: &str = "account_state";
const F_NAME: &str = "identity.name";
const F_SEX: &str = "identity.sex";
const F_BIRTH: &str = "identity.birth_date";
const F_ADDRESS: &str = "identity.address";
const F_RESIDENT_ID: &str = "identity.resident_id";
const F_VALID_UNTIL: &str = "identity.id_valid_until";
const F_OFFICE: &str = "identity.issuing_office";
const F_RECORD: &str = "record";
const F_SEALED: &str = "sealed";
const F_BLIND_INDEX: &str = "blind_index";

/// What is wrong with a binding input: the gRPC field path and the rule broken, never
/// the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> FieldError {
    FieldError {
        field,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------------
// Phone numbers
// ---------------------------------------------------------------------------------

/// A normalised E.164 phone number, `+` included. Wiped on drop; Debug shows the
/// country code and the national digit count only.
#[derive(Clone, PartialEq, Eq)]
pub struct Phone {
    e164: Zeroizing<String>,
    /// Digits of the country calling code (1..=3).
    cc_len: usize,
}

/// Length of the ITU-T E.164 country calling code that `digits` starts with: 1 for
/// zone 1 and 7, 2 for the assigned two-digit codes, 3 for everything else (the
/// remaining codes are all three digits long, assigned or not).
fn country_code_len(digits: &[u8]) -> usize {
    match digits {
        [b'1' | b'7', ..] => 1,
        [a, b, ..] => {
            let two = u32::from(a.wrapping_sub(b'0')) * 10 + u32::from(b.wrapping_sub(b'0'));
            let is_two_digit = matches!(
                two,
                20 | 27 | 30..=34 | 36 | 39 | 40 | 41 | 43..=49 | 51..=58 | 60..=66 | 81 | 82 | 84 | 86 | 90..=95 | 98
            );
            if is_two_digit {
                2
            } else {
                3
            }
        }
        _ => 1,
    }
}

/// Normalises a phone number to E.164. ASCII spaces, `-`, `(` and `)` are ignored; a
/// leading `+` or `00` is the international prefix; a bare 11-digit number starting
/// with `1` is a Chinese mobile number (+86). A +86 number must be a mobile number:
/// 11 digits starting with 13-19. Other numbers follow E.164: digits only, a country
/// code not starting with 0, 8 to 15 digits after the `+`.
pub fn normalise_phone(input: &str) -> Result<Phone, FieldError> {
    if input.len() > MAX_PHONE_INPUT {
        return Err(err(F_PHONE, format!("must be at most {MAX_PHONE_INPUT} bytes")));
    }
    let mut compact = Zeroizing::new(String::with_capacity(input.len()));
    compact.extend(input.chars().filter(|c| !matches!(c, ' ' | '-' | '(' | ')')));
    if compact.is_empty() {
        return Err(err(F_PHONE, "required"));
    }
    let (implied_cn, digits): (bool, &str) = if let Some(rest) = compact.strip_prefix('+') {
        (false, rest)
    } else if let Some(rest) = compact.strip_prefix("00") {
        (false, rest)
    } else if compact.len() == CN_MOBILE_LEN && compact.starts_with('1') && compact.bytes().all(|b| b.is_ascii_digit())
    {
        (true, compact.as_str())
    } else {
        return Err(err(
            F_PHONE,
            "must start with + or 00, or be an 11-digit Chinese mobile number",
        ));
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(
            F_PHONE,
            "must contain only digits after the international prefix (spaces, '-', '(' and ')' are ignored)",
        ));
    }
    let national_cn = if implied_cn {
        Some(digits)
    } else {
        digits.strip_prefix(CN_CODE)
    };
    if let Some(national) = national_cn {
        let b = national.as_bytes();
        let ok = b.len() == CN_MOBILE_LEN && b.first() == Some(&b'1') && matches!(b.get(1), Some(b'3'..=b'9'));
        if !ok {
            return Err(err(
                F_PHONE,
                "not a valid Chinese mobile number (11 digits starting with 13-19)",
            ));
        }
    } else {
        if digits.starts_with('0') {
            return Err(err(F_PHONE, "country code must not start with 0"));
        }
        if !(MIN_E164_DIGITS..=MAX_E164_DIGITS).contains(&digits.len()) {
            return Err(err(
                F_PHONE,
                format!("must have {MIN_E164_DIGITS} to {MAX_E164_DIGITS} digits after the + (E.164)"),
            ));
        }
    }
    let cc_len = if implied_cn {
        CN_CODE.len()
    } else {
        country_code_len(digits.as_bytes())
    };
    // Sized once: no reallocation leaves a copy of the number behind.
    let mut e164 = Zeroizing::new(String::with_capacity(1 + CN_CODE.len() + digits.len()));
    e164.push('+');
    if implied_cn {
        e164.push_str(CN_CODE);
    }
    e164.push_str(digits);
    Ok(Phone { e164, cc_len })
}

impl Phone {
    /// The E.164 form with the `+`, e.g. `+8613812345678`.
    pub fn as_e164(&self) -> &str {
        &self.e164
    }

    /// The country calling code without the `+`, e.g. `86`.
    pub fn country_code(&self) -> &str {
        self.e164.get(1..1 + self.cc_len).unwrap_or_default()
    }

    /// The digits after the country code (for +86 the 11-digit mobile number).
    pub fn national(&self) -> &str {
        self.e164.get(1 + self.cc_len..).unwrap_or_default()
    }

    /// Whether this is a Chinese (+86) mobile number.
    pub fn is_cn(&self) -> bool {
        self.country_code() == CN_CODE
    }

    /// Display mask: `138****5678` for +86 (first 3, four `*`, last 4); otherwise `+`,
    /// the country code, one `*` per middle digit and the last 4 digits, e.g.
    /// `+44******3456`.
    pub fn masked(&self) -> String {
        let national = self.national();
        let n = national.len();
        let last4 = national.get(n.saturating_sub(4)..).unwrap_or_default();
        if self.is_cn() {
            let first3 = national.get(..3).unwrap_or_default();
            format!("{first3}****{last4}")
        } else {
            let stars = "*".repeat(n.saturating_sub(4));
            format!("+{}{stars}{last4}", self.country_code())
        }
    }

    /// HMAC input of the blind index: `domain_separated("keyward/v1/blind-index",
    /// [E.164 with +])`.
    pub fn index_input(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(domain_separated(TAG_BLIND_INDEX, &[self.e164.as_bytes()]))
    }
}

/// `Phone(+86, 11 digits)`: never the number.
impl fmt::Debug for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Phone(+{}, {} digits)", self.country_code(), self.national().len())
    }
}

// ---------------------------------------------------------------------------------
// Accounts and banks
// ---------------------------------------------------------------------------------

/// A bank account number: 12 to 19 ASCII digits.
pub fn validate_account_number(s: &str) -> Result<(), FieldError> {
    let ok = (MIN_ACCOUNT_LEN..=MAX_ACCOUNT_LEN).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    if !ok {
        return Err(err(
            F_ACCOUNT,
            format!("must be {MIN_ACCOUNT_LEN} to {MAX_ACCOUNT_LEN} digits"),
        ));
    }
    Ok(())
}

/// `****` and the last 4 characters of an account number. An input shorter than the
/// shortest account number shows no character at all.
pub fn mask_account(s: &str) -> String {
    let n = s.chars().count();
    if n < MIN_ACCOUNT_LEN {
        return "****".to_owned();
    }
    let mut out = String::from("****");
    out.extend(s.chars().skip(n - 4));
    out
}

/// A bank code: 3 to 12 characters of ASCII upper-case letters and digits.
pub fn validate_bank_code(s: &str) -> Result<(), FieldError> {
    let ok = (MIN_BANK_CODE_LEN..=MAX_BANK_CODE_LEN).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit());
    if !ok {
        return Err(err(
            F_BANK_CODE,
            format!("must be {MIN_BANK_CODE_LEN} to {MAX_BANK_CODE_LEN} characters of A-Z 0-9"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Enumerations
// ---------------------------------------------------------------------------------

/// Sex as recorded on the ID card (and in the 17th digit of the resident ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Sex {
    Male = 1,
    Female = 2,
}

impl Sex {
    /// The sex of a wire/encoding value; `None` for any other byte.
    pub fn from_u8(v: u8) -> Option<Sex> {
        match v {
            1 => Some(Sex::Male),
            2 => Some(Sex::Female),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// `male` or `female`.
    pub fn as_str(self) -> &'static str {
        match self {
            Sex::Male => "male",
            Sex::Female => "female",
        }
    }
}

/// State of the bound bank account. Only `Normal` accounts transact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AccountState {
    Normal = 1,
    Frozen = 2,
    Closed = 3,
    Lost = 4,
}

impl AccountState {
    /// The state of a wire/encoding value; `None` for any other byte.
    pub fn from_u8(v: u8) -> Option<AccountState> {
        match v {
            1 => Some(AccountState::Normal),
            2 => Some(AccountState::Frozen),
            3 => Some(AccountState::Closed),
            4 => Some(AccountState::Lost),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// `normal`, `frozen`, `closed` or `lost`.
    pub fn as_str(self) -> &'static str {
        match self {
            AccountState::Normal => "normal",
            AccountState::Frozen => "frozen",
            AccountState::Closed => "closed",
            AccountState::Lost => "lost",
        }
    }
}

/// A gRPC enum value: 0 (unset) is "required", anything unknown "unknown value N".
fn enum_from_wire<T>(field: &'static str, v: i32, from_u8: fn(u8) -> Option<T>) -> Result<T, FieldError> {
    if v == 0 {
        return Err(err(field, "required"));
    }
    u8::try_from(v)
        .ok()
        .and_then(from_u8)
        .ok_or_else(|| err(field, format!("unknown value {v}")))
}

// ---------------------------------------------------------------------------------
// Dates and the resident ID
// ---------------------------------------------------------------------------------

/// Value of a run of ASCII digits (callers check that they are digits).
fn digits_value(b: &[u8]) -> u32 {
    b.iter().fold(0u32, |acc, d| acc * 10 + u32::from(d.wrapping_sub(b'0')))
}

fn calendar_date(year: u32, month: u32, day: u32) -> Option<Date> {
    let year = i32::try_from(year).ok()?;
    let month = Month::try_from(u8::try_from(month).ok()?).ok()?;
    Date::from_calendar_date(year, month, u8::try_from(day).ok()?).ok()
}

/// A strict `YYYY-MM-DD` calendar date.
pub fn parse_date(field: &'static str, s: &str) -> Result<Date, FieldError> {
    let b = s.as_bytes();
    let &[y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1] = b else {
        return Err(err(field, "must be a date as YYYY-MM-DD"));
    };
    let digits = [y0, y1, y2, y3, m0, m1, d0, d1];
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(err(field, "must be a date as YYYY-MM-DD"));
    }
    calendar_date(
        digits_value(&[y0, y1, y2, y3]),
        digits_value(&[m0, m1]),
        digits_value(&[d0, d1]),
    )
    .ok_or_else(|| err(field, "is not a real calendar date"))
}

/// `YYYY-MM-DD`, the form [`parse_date`] reads.
fn date_text(d: Date) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(10));
    // Writing to a String cannot fail.
    let _ = write!(s, "{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day());
    s
}

/// What a valid resident ID says about its holder.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ResidentIdInfo {
    pub birth_date: Date,
    pub sex: Sex,
}

/// Shows the sex only: the birth date is part of the ID number.
impl fmt::Debug for ResidentIdInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResidentIdInfo")
            .field("sex", &self.sex)
            .finish_non_exhaustive()
    }
}

/// The ISO 7064 MOD 11-2 check character (`0`-`9` or `X`) of the first 17 characters
/// of a resident ID; `None` unless `first17` is exactly 17 ASCII digits.
pub fn resident_id_check_character(first17: &str) -> Option<char> {
    let b = first17.as_bytes();
    if b.len() != RESIDENT_ID_WEIGHTS.len() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let sum: u32 = b
        .iter()
        .zip(RESIDENT_ID_WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    let idx = usize::try_from(sum % 11).ok()?;
    RESIDENT_ID_CHECK.get(idx).map(|&c| char::from(c))
}

/// The canonical form of a resident ID: a trailing lower-case `x` becomes `X`; nothing
/// else changes.
pub fn normalise_resident_id(s: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(s.to_owned());
    normalise_resident_id_in_place(&mut out);
    out
}

fn normalise_resident_id_in_place(s: &mut String) {
    if s.ends_with('x') {
        s.pop();
        s.push('X');
    }
}

/// Validates an 18-character Chinese resident ID (GB 11643-1999): 17 digits, the
/// first 1-9, then a digit or `X` (`x` is accepted; [`normalise_resident_id`] makes it
/// `X`); the birth date at characters 7-14 a real date between 1900-01-01 and `today`;
/// the ISO 7064 MOD 11-2 check character. The 17th digit gives the sex (odd male,
/// even female).
pub fn validate_resident_id(s: &str, today: Date) -> Result<ResidentIdInfo, FieldError> {
    let b = s.as_bytes();
    if b.len() != RESIDENT_ID_LEN {
        return Err(err(
            F_RESIDENT_ID,
            "must be exactly 18 characters: 17 digits then a digit or X",
        ));
    }
    let (body, check) = b.split_at(RESIDENT_ID_LEN - 1);
    if !body.iter().all(u8::is_ascii_digit) {
        return Err(err(F_RESIDENT_ID, "the first 17 characters must be digits"));
    }
    let check = match check {
        [c @ (b'0'..=b'9' | b'X')] => *c,
        [b'x'] => b'X',
        _ => return Err(err(F_RESIDENT_ID, "the last character must be a digit or X")),
    };
    if body.first() == Some(&b'0') {
        return Err(err(F_RESIDENT_ID, "must not start with 0 (region code)"));
    }
    let birth = body
        .get(6..14)
        .and_then(|d| {
            calendar_date(
                digits_value(d.get(..4)?),
                digits_value(d.get(4..6)?),
                digits_value(d.get(6..)?),
            )
        })
        .ok_or_else(|| {
            err(
                F_RESIDENT_ID,
                "birth date (characters 7-14) is not a real calendar date",
            )
        })?;
    if birth > today {
        return Err(err(F_RESIDENT_ID, "birth date (characters 7-14) is in the future"));
    }
    if birth < EARLIEST_BIRTH_DATE {
        return Err(err(F_RESIDENT_ID, "birth date (characters 7-14) is before 1900-01-01"));
    }
    let expected = s
        .get(..RESIDENT_ID_LEN - 1)
        .and_then(resident_id_check_character)
        .ok_or_else(|| err(F_RESIDENT_ID, "the first 17 characters must be digits"))?;
    if char::from(check) != expected {
        return Err(err(F_RESIDENT_ID, "check character does not match (ISO 7064 MOD 11-2)"));
    }
    let sex_digit = body.get(16).map_or(0, |d| d.wrapping_sub(b'0'));
    let sex = if sex_digit % 2 == 1 { Sex::Male } else { Sex::Female };
    Ok(ResidentIdInfo { birth_date: birth, sex })
}

/// Expiry of an ID card: a date, or `long-term` (no expiry).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IdValidUntil {
    Date(Date),
    LongTerm,
}

impl IdValidUntil {
    /// `long-term` or a strict `YYYY-MM-DD` date (field `identity.id_valid_until`).
    pub fn parse(s: &str) -> Result<IdValidUntil, FieldError> {
        if s == LONG_TERM {
            return Ok(IdValidUntil::LongTerm);
        }
        parse_date(F_VALID_UNTIL, s)
            .map(IdValidUntil::Date)
            .map_err(|e| err(F_VALID_UNTIL, format!("{} or long-term", e.reason)))
    }

    /// `YYYY-MM-DD` or `long-term`, the form [`IdValidUntil::parse`] reads.
    pub fn to_text(&self) -> Zeroizing<String> {
        match self {
            IdValidUntil::Date(d) => date_text(*d),
            IdValidUntil::LongTerm => Zeroizing::new(LONG_TERM.to_owned()),
        }
    }
}

/// Shows whether the card expires, not when.
impl fmt::Debug for IdValidUntil {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdValidUntil::Date(_) => f.write_str("IdValidUntil::Date(..)"),
            IdValidUntil::LongTerm => f.write_str("IdValidUntil::LongTerm"),
        }
    }
}

/// Free text (name, address, issuing office): 1 to `max` characters, no control
/// characters.
fn validate_text(field: &'static str, s: &str, max: usize) -> Result<(), FieldError> {
    let n = s.chars().count();
    if !(1..=max).contains(&n) {
        return Err(err(field, format!("must be 1 to {max} characters")));
    }
    if s.chars().any(char::is_control) {
        return Err(err(field, "must not contain control characters"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// The record
// ---------------------------------------------------------------------------------

/// The identity the bank verified against the national citizen-identity check. Text
/// fields are wiped on drop; Debug shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub sex: Sex,
    pub birth_date: Date,
    pub address: String,
    /// Canonical form: 17 digits then a digit or upper-case `X`.
    pub resident_id: String,
    pub id_valid_until: IdValidUntil,
    pub issuing_office: String,
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.name.zeroize();
        self.address.zeroize();
        self.resident_id.zeroize();
        self.issuing_office.zeroize();
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Identity { .. }")
    }
}

/// A validated phone-to-account binding. Obtain one from [`BindingRecord::validate`] or
/// [`BindingRecord::decode`]. Text fields are wiped on drop; Debug shows the phone's
/// country code and length, the bank code and the account state only.
#[derive(Clone, PartialEq, Eq)]
pub struct BindingRecord {
    pub phone: Phone,
    pub bank_code: String,
    pub account_number: String,
    pub account_state: AccountState,
    pub identity: Identity,
}

impl Drop for BindingRecord {
    fn drop(&mut self) {
        self.bank_code.zeroize();
        self.account_number.zeroize();
    }
}

impl fmt::Debug for BindingRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BindingRecord")
            .field("phone", &self.phone)
            .field("bank_code", &self.bank_code)
            .field("account_state", &self.account_state)
            .finish_non_exhaustive()
    }
}

/// A binding exactly as received over gRPC, unvalidated. Wiped on drop; Debug shows
/// nothing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RawRecord {
    pub phone: String,
    pub bank_code: String,
    pub account_number: String,
    pub account_state: i32,
    pub name: String,
    pub sex: i32,
    pub birth_date: String,
    pub address: String,
    pub resident_id: String,
    pub id_valid_until: String,
    pub issuing_office: String,
}

impl Drop for RawRecord {
    fn drop(&mut self) {
        self.phone.zeroize();
        self.bank_code.zeroize();
        self.account_number.zeroize();
        self.name.zeroize();
        self.birth_date.zeroize();
        self.address.zeroize();
        self.resident_id.zeroize();
        self.id_valid_until.zeroize();
        self.issuing_office.zeroize();
    }
}

impl fmt::Debug for RawRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RawRecord { .. }")
    }
}

/// What a binding may show to an operator or a client: masks, the bank and the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskedRecord {
    /// E.g. `138****5678`.
    pub phone: String,
    pub bank_code: String,
    /// E.g. `****1234`.
    pub account_number: String,
    pub account_state: AccountState,
    /// The first character, then one `*` per remaining character, e.g. `张**`.
    pub name: String,
}

/// The first character of a name, then one `*` per remaining character.
fn mask_name(name: &str) -> String {
    let mut chars = name.chars();
    let mut out = String::new();
    if let Some(first) = chars.next() {
        out.push(first);
    }
    out.extend(chars.map(|_| '*'));
    out
}

impl BindingRecord {
    /// Validates a record as received. Fields are checked in wire order (phone,
    /// bank_code, account_number, account_state, identity.name, identity.sex,
    /// identity.birth_date, identity.address, identity.resident_id,
    /// identity.id_valid_until, identity.issuing_office); the resident ID's
    /// cross-checks (sex, then birth date) run right after the resident ID itself.
    /// The first error is returned. The phone is normalised to E.164 and a trailing
    /// `x` of the resident ID to `X`. The ID's expiry is not compared with `today`:
    /// a stored binding must stay decodable after the card expires.
    pub fn validate(mut raw: RawRecord, today: Date) -> Result<BindingRecord, FieldError> {
        let phone = normalise_phone(&raw.phone)?;
        validate_bank_code(&raw.bank_code)?;
        validate_account_number(&raw.account_number)?;
        let account_state = enum_from_wire(F_STATE, raw.account_state, AccountState::from_u8)?;
        validate_text(F_NAME, &raw.name, MAX_NAME)?;
        let sex = enum_from_wire(F_SEX, raw.sex, Sex::from_u8)?;
        let birth_date = parse_date(F_BIRTH, &raw.birth_date)?;
        validate_text(F_ADDRESS, &raw.address, MAX_ADDRESS)?;
        normalise_resident_id_in_place(&mut raw.resident_id);
        let info = validate_resident_id(&raw.resident_id, today)?;
        if info.sex != sex {
            return Err(err(F_SEX, "does not match the resident ID"));
        }
        if info.birth_date != birth_date {
            return Err(err(F_BIRTH, "does not match the resident ID"));
        }
        let id_valid_until = IdValidUntil::parse(&raw.id_valid_until)?;
        if let IdValidUntil::Date(d) = id_valid_until {
            if d < birth_date {
                return Err(err(F_VALID_UNTIL, "must not be before the birth date"));
            }
        }
        validate_text(F_OFFICE, &raw.issuing_office, MAX_OFFICE)?;
        Ok(BindingRecord {
            phone,
            bank_code: std::mem::take(&mut raw.bank_code),
            account_number: std::mem::take(&mut raw.account_number),
            account_state,
            identity: Identity {
                name: std::mem::take(&mut raw.name),
                sex,
                birth_date,
                address: std::mem::take(&mut raw.address),
                resident_id: std::mem::take(&mut raw.resident_id),
                id_valid_until,
                issuing_office: std::mem::take(&mut raw.issuing_office),
            },
        })
    }

    /// The canonical encoding (the plaintext the appliance seals):
    /// `domain_separated("keyward/v1/binding-record", [[1], phone E.164, bank_code,
    /// account_number, [state], name, [sex], birth date YYYY-MM-DD, address,
    /// resident_id, valid-until (YYYY-MM-DD or long-term), issuing_office])`.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let id = &self.identity;
        let birth = date_text(id.birth_date);
        let until = id.id_valid_until.to_text();
        Zeroizing::new(domain_separated(
            TAG_RECORD,
            &[
                &[RECORD_VERSION],
                self.phone.as_e164().as_bytes(),
                self.bank_code.as_bytes(),
                self.account_number.as_bytes(),
                &[self.account_state.as_u8()],
                id.name.as_bytes(),
                &[id.sex.as_u8()],
                birth.as_bytes(),
                id.address.as_bytes(),
                id.resident_id.as_bytes(),
                until.as_bytes(),
                id.issuing_office.as_bytes(),
            ],
        ))
    }

    /// Strict inverse of [`BindingRecord::encode`]: the domain tag, 12 length-prefixed
    /// fields and nothing after them, version 1, every field re-validated (against
    /// `today`), and the bytes in canonical form (re-encoding gives them back
    /// exactly). Errors name the field `record` and never carry content.
    pub fn decode(b: &[u8], today: Date) -> Result<BindingRecord, FieldError> {
        let mut rest = b
            .strip_prefix(TAG_RECORD.as_bytes())
            .and_then(|r| r.strip_prefix(&[0u8]))
            .ok_or_else(|| err(F_RECORD, "wrong domain tag"))?;
        let mut fields: [&[u8]; RECORD_FIELDS] = [&[]; RECORD_FIELDS];
        for slot in fields.iter_mut() {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| err(F_RECORD, "truncated: fewer than 12 fields"))?;
            let len =
                usize::try_from(u32::from_be_bytes(*len)).map_err(|_| err(F_RECORD, "field length out of range"))?;
            let (field, tail) = tail
                .split_at_checked(len)
                .ok_or_else(|| err(F_RECORD, "truncated: a field is shorter than its length"))?;
            *slot = field;
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(err(F_RECORD, "trailing bytes after the 12th field"));
        }
        let [version, phone, bank_code, account, state, name, sex, birth, address, resident_id, until, office] = fields;
        if version != [RECORD_VERSION] {
            return Err(err(F_RECORD, "unsupported version"));
        }
        let (&[state], &[sex]) = (state, sex) else {
            return Err(err(F_RECORD, "an enumeration field is not one byte"));
        };
        let text = |f: &[u8]| -> Result<String, FieldError> {
            std::str::from_utf8(f)
                .map(str::to_owned)
                .map_err(|_| err(F_RECORD, "a text field is not UTF-8"))
        };
        // Filled field by field so that an early return wipes what was copied so far.
        let mut raw = RawRecord::default();
        raw.account_state = i32::from(state);
        raw.sex = i32::from(sex);
        raw.phone = text(phone)?;
        raw.bank_code = text(bank_code)?;
        raw.account_number = text(account)?;
        raw.name = text(name)?;
        raw.birth_date = text(birth)?;
        raw.address = text(address)?;
        raw.resident_id = text(resident_id)?;
        raw.id_valid_until = text(until)?;
        raw.issuing_office = text(office)?;
        let record = BindingRecord::validate(raw, today)
            .map_err(|e| err(F_RECORD, format!("stored {} fails validation", e.field)))?;
        if record.encode().as_slice() != b {
            return Err(err(F_RECORD, "not in canonical form"));
        }
        Ok(record)
    }

    /// The display view: masked phone and account, bank code, state, masked name.
    /// Nothing else of the identity.
    pub fn masked(&self) -> MaskedRecord {
        MaskedRecord {
            phone: self.phone.masked(),
            bank_code: self.bank_code.clone(),
            account_number: mask_account(&self.account_number),
            account_state: self.account_state,
            name: mask_name(&self.identity.name),
        }
    }
}

// ---------------------------------------------------------------------------------
// The sealed form
// ---------------------------------------------------------------------------------

/// AES-GCM associated data of a sealed binding: `domain_separated(
/// "keyward/v1/binding", [blind index, "binding", [SEALED_FORMAT_V1]])`. A sealed
/// record moved to another phone's index fails to open.
pub fn seal_aad(blind_index: &[u8; BLIND_INDEX_LEN]) -> Vec<u8> {
    domain_separated(
        TAG_SEAL,
        &[blind_index, RECORD_KIND_BINDING.as_bytes(), &[SEALED_FORMAT_V1]],
    )
}

/// The clear header of a sealed binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedHeader {
    /// Version of the binding key that sealed the record (never 0).
    pub key_version: u32,
    pub iv: [u8; IV_LEN],
}

/// `0x01 | key_version u32 BE | 12-byte IV | ciphertext || tag`.
pub fn frame_sealed(key_version: u32, iv: &[u8; IV_LEN], ct_and_tag: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 4 + IV_LEN + ct_and_tag.len());
    out.push(SEALED_FORMAT_V1);
    out.extend_from_slice(&key_version.to_be_bytes());
    out.extend_from_slice(iv);
    out.extend_from_slice(ct_and_tag);
    out
}

/// Splits a sealed binding into its header and ciphertext||tag. Refuses an unknown
/// format byte, anything shorter than [`MIN_SEALED_LEN`] or longer than
/// [`MAX_SEALED_LEN`], and key version 0.
pub fn parse_sealed(b: &[u8]) -> Result<(SealedHeader, &[u8]), FieldError> {
    let (&format, rest) = b.split_first().ok_or_else(|| err(F_SEALED, "empty"))?;
    if format != SEALED_FORMAT_V1 {
        return Err(err(
            F_SEALED,
            format!("unknown format {format} (expected {SEALED_FORMAT_V1})"),
        ));
    }
    if b.len() < MIN_SEALED_LEN {
        return Err(err(
            F_SEALED,
            format!(
                "shorter than {MIN_SEALED_LEN} bytes (format, key version, {IV_LEN}-byte IV, at least one ciphertext byte, {GCM_TAG_LEN}-byte tag)"
            ),
        ));
    }
    if b.len() > MAX_SEALED_LEN {
        return Err(err(F_SEALED, format!("longer than {MAX_SEALED_LEN} bytes")));
    }
    let (version, rest) = rest
        .split_first_chunk::<4>()
        .ok_or_else(|| err(F_SEALED, "truncated key version"))?;
    let key_version = u32::from_be_bytes(*version);
    if key_version == 0 {
        return Err(err(F_SEALED, "key version 0 is not valid"));
    }
    let (iv, ct_and_tag) = rest
        .split_first_chunk::<IV_LEN>()
        .ok_or_else(|| err(F_SEALED, "truncated IV"))?;
    Ok((SealedHeader { key_version, iv: *iv }, ct_and_tag))
}

/// A blind index as received: exactly 32 bytes.
pub fn parse_blind_index(b: &[u8]) -> Result<[u8; BLIND_INDEX_LEN], FieldError> {
    <[u8; BLIND_INDEX_LEN]>::try_from(b)
        .map_err(|_| err(F_BLIND_INDEX, format!("must be exactly {BLIND_INDEX_LEN} bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CN_PHONE: &str = "13812345678";
    const ACCOUNT: &str = "6222021234567890123";
    const MALE_ID: &str = "110105198005150032";
    const FEMALE_ID: &str = "11010519491231002X";
    const NAME: &str = "张三丰";
    const ADDRESS: &str = "北京市朝阳区建国路88号";
    const OFFICE: &str = "北京市公安局朝阳分局";

    /// Values that must never occur in an error message or Debug output.
    const SECRETS: &[&str] = &[
        CN_PHONE,
        "12345678",
        "+8613812345678",
        "4155552671",
        "7911123456",
        ACCOUNT,
        "622202123456",
        MALE_ID,
        FEMALE_ID,
        "11010519491231002",
        "440524188001010014",
        "110105200002290021",
        "110105199002300028",
        "110105203001010028",
        "11010519800515",
        NAME,
        "三丰",
        ADDRESS,
        "建国路",
        OFFICE,
    ];

    fn today() -> Date {
        Date::from_calendar_date(2025, Month::June, 1).unwrap()
    }

    fn date(y: i32, m: u8, d: u8) -> Date {
        Date::from_calendar_date(y, Month::try_from(m).unwrap(), d).unwrap()
    }

    fn raw() -> RawRecord {
        RawRecord {
            phone: format!("+86 {CN_PHONE}"),
            bank_code: "ICBC".into(),
            account_number: ACCOUNT.into(),
            account_state: 1,
            name: NAME.into(),
            sex: 1,
            birth_date: "1980-05-15".into(),
            address: ADDRESS.into(),
            resident_id: MALE_ID.into(),
            id_valid_until: "2035-07-01".into(),
            issuing_office: OFFICE.into(),
        }
    }

    fn record() -> BindingRecord {
        BindingRecord::validate(raw(), today()).unwrap()
    }

    fn raw_with(f: impl FnOnce(&mut RawRecord)) -> RawRecord {
        let mut r = raw();
        f(&mut r);
        r
    }

    fn reject_phone(input: &str) -> FieldError {
        let e = normalise_phone(input).unwrap_err();
        assert_eq!(e.field, "phone", "{input:?}");
        e
    }

    /// Every error and Debug output the tests produce, for the clear-text check.
    fn outputs() -> Vec<String> {
        let mut errors: Vec<FieldError> = Vec::new();
        for p in [
            "1381234567",
            "138123456789",
            "+86 1381234567",
            "+861381234567",
            "12012345678",
            "+86 12012345678",
            "+86 138 1234 567a",
            "+44 79II 123456",
            "+0 415 555 2671",
            "0004155552671",
            "+4412345678901234",
            "",
            "4155552671",
        ] {
            errors.push(normalise_phone(p).unwrap_err());
        }
        for a in ["62220212345", "62220212345678901234", "62220212345678901a"] {
            errors.push(validate_account_number(a).unwrap_err());
        }
        errors.push(validate_bank_code("icbc").unwrap_err());
        for id in [
            "110105198005150033",
            "110105199002300028",
            "110105203001010028",
            "110105199902290021",
            "11010519800515003",
            "1101051980051A0032",
            "440524188001010014",
            "010105198005150032",
        ] {
            errors.push(validate_resident_id(id, today()).unwrap_err());
        }
        let today = today();
        let bad_records: Vec<RawRecord> = vec![
            raw_with(|r| r.phone = "+86 12012345678".into()),
            raw_with(|r| r.account_number.push('9')),
            raw_with(|r| r.sex = 2),
            raw_with(|r| r.birth_date = "1980-05-16".into()),
            raw_with(|r| r.resident_id = "110105198005150033".into()),
            raw_with(|r| r.name = format!("{NAME}\n")),
            raw_with(|r| r.address = format!("{ADDRESS}\u{7}")),
            raw_with(|r| r.id_valid_until = "1970-01-01".into()),
            raw_with(|r| r.issuing_office = String::new()),
        ];
        for r in bad_records {
            errors.push(BindingRecord::validate(r, today).unwrap_err());
        }
        let enc = record().encode();
        let mut trailing = enc.to_vec();
        trailing.push(0);
        errors.push(BindingRecord::decode(&trailing, today).unwrap_err());
        errors.push(BindingRecord::decode(&enc[..enc.len() - 1], today).unwrap_err());
        errors.push(BindingRecord::decode(&enc, date(1980, 5, 14)).unwrap_err());
        errors.push(parse_sealed(&[1, 0, 0]).unwrap_err());
        errors.push(parse_blind_index(&[0; 31]).unwrap_err());

        let mut out: Vec<String> = errors.iter().flat_map(|e| [e.to_string(), format!("{e:?}")]).collect();
        let rec = record();
        out.push(format!("{rec:?}"));
        out.push(format!("{:#?}", rec));
        out.push(format!("{:?}", rec.identity));
        out.push(format!("{:?}", rec.phone));
        out.push(format!("{:?}", rec.masked()));
        out.push(format!("{:?}", raw()));
        out.push(format!("{:?}", rec.identity.id_valid_until));
        out.push(format!("{:?}", validate_resident_id(MALE_ID, today).unwrap()));
        out.push(format!("{:?}", normalise_phone("+1 415 555 2671").unwrap()));
        out.push(format!("{:?}", normalise_phone("+44 7911 123456").unwrap()));
        out.push(format!(
            "{:?}",
            parse_sealed(&frame_sealed(1, &[0; 12], &[0; 17])).unwrap()
        ));
        out
    }

    #[test]
    fn no_clear_text_in_errors_or_debug() {
        let out = outputs();
        assert!(out.len() > 60);
        for s in &out {
            for secret in SECRETS {
                assert!(!s.contains(secret), "{secret:?} leaked into {s:?}");
            }
        }
    }

    #[test]
    fn cn_phone_forms() {
        for input in [
            "13812345678",
            "+8613812345678",
            "+86 138 1234 5678",
            "008613812345678",
            "0086 138-1234-5678",
            "(+86) 138 1234 5678",
            " 138 1234 5678 ",
        ] {
            let p = normalise_phone(input).unwrap();
            assert_eq!(p.as_e164(), "+8613812345678", "{input:?}");
            assert_eq!(p.national(), CN_PHONE);
            assert_eq!(p.country_code(), "86");
            assert!(p.is_cn());
        }
        for second in b'3'..=b'9' {
            let n = format!("1{}012345678", char::from(second));
            assert!(normalise_phone(&n).is_ok());
        }
    }

    #[test]
    fn cn_phone_refusals() {
        let cn = "not a valid Chinese mobile number (11 digits starting with 13-19)";
        for input in [
            "+86 1381234567",
            "+86 138123456789",
            "+86 12012345678",
            "+86 10012345678",
            "+86 23812345678",
            "008612012345678",
            "12012345678",
            "11012345678",
        ] {
            assert_eq!(reject_phone(input).reason, cn, "{input:?}");
        }
        let bare = "must start with + or 00, or be an 11-digit Chinese mobile number";
        for input in [
            "1381234567",
            "138123456789",
            "23812345678",
            "4155552671",
            "138 1234 567a",
        ] {
            assert_eq!(reject_phone(input).reason, bare, "{input:?}");
        }
    }

    #[test]
    fn other_countries() {
        let us = normalise_phone("+1 (415) 555-2671").unwrap();
        assert_eq!(us.as_e164(), "+14155552671");
        assert_eq!(us.country_code(), "1");
        assert_eq!(us.national(), "4155552671");
        assert_eq!(us.masked(), "+1******2671");
        assert_eq!(format!("{us:?}"), "Phone(+1, 10 digits)");

        let uk = normalise_phone("0044 7911 123456").unwrap();
        assert_eq!(uk.as_e164(), "+447911123456");
        assert_eq!(uk.country_code(), "44");
        assert_eq!(uk.masked(), "+44******3456");
        assert!(!uk.is_cn());

        let hk = normalise_phone("+852 9123 4567").unwrap();
        assert_eq!(hk.country_code(), "852");
        assert_eq!(hk.national(), "91234567");
        assert_eq!(hk.masked(), "+852****4567");

        let ru = normalise_phone("+7 912 345 6789").unwrap();
        assert_eq!(ru.country_code(), "7");
        // Shortest allowed: 8 digits after the +; longest 15.
        assert!(normalise_phone("+49123456").is_ok());
        assert!(normalise_phone("+441234567890123").is_ok());
    }

    #[test]
    fn phone_refusals() {
        let digits = "must contain only digits after the international prefix (spaces, '-', '(' and ')' are ignored)";
        assert_eq!(reject_phone("+44 79II 123456").reason, digits);
        assert_eq!(reject_phone("+44.7911.123456").reason, digits);
        assert_eq!(reject_phone("+４４7911123456").reason, digits);
        assert_eq!(reject_phone("++447911123456").reason, digits);
        let cc0 = "country code must not start with 0";
        assert_eq!(reject_phone("+0 415 555 2671").reason, cc0);
        assert_eq!(reject_phone("000 415 555 2671").reason, cc0);
        let len = "must have 8 to 15 digits after the + (E.164)";
        assert_eq!(reject_phone("+4412345678901234").reason, len);
        assert_eq!(reject_phone("+4412345").reason, len);
        assert_eq!(reject_phone("+").reason, len);
        assert_eq!(reject_phone("").reason, "required");
        assert_eq!(reject_phone(" - ").reason, "required");
        assert_eq!(reject_phone(&"1".repeat(65)).reason, "must be at most 64 bytes");
    }

    #[test]
    fn phone_masks_and_index_input() {
        let p = normalise_phone(CN_PHONE).unwrap();
        assert_eq!(p.masked(), "138****5678");
        assert_eq!(format!("{p:?}"), "Phone(+86, 11 digits)");
        assert_eq!(
            p.index_input().as_slice(),
            domain_separated("keyward/v1/blind-index", &[b"+8613812345678"]).as_slice()
        );
        assert_ne!(p.index_input(), normalise_phone("13812345679").unwrap().index_input());
    }

    #[test]
    fn country_code_split() {
        for (digits, n) in [
            ("1415", 1),
            ("7912", 1),
            ("2012", 2),
            ("2712", 2),
            ("2121", 3),
            ("3312", 2),
            ("3531", 3),
            ("4201", 3),
            ("4412", 2),
            ("5512", 2),
            ("5912", 3),
            ("6512", 2),
            ("6712", 3),
            ("8123", 2),
            ("8612", 2),
            ("8529", 3),
            ("8869", 3),
            ("9123", 2),
            ("9712", 3),
            ("9812", 2),
        ] {
            assert_eq!(country_code_len(digits.as_bytes()), n, "{digits}");
        }
    }

    #[test]
    fn account_numbers() {
        assert!(validate_account_number("622202123456").is_ok());
        assert!(validate_account_number(ACCOUNT).is_ok());
        for bad in [
            "62220212345",
            "62220212345678901234",
            "62220212345678901a",
            "",
            "６２２２０２１２３４５６",
        ] {
            let e = validate_account_number(bad).unwrap_err();
            assert_eq!(e.field, "account_number");
            assert_eq!(e.reason, "must be 12 to 19 digits");
        }
        assert_eq!(mask_account(ACCOUNT), "****0123");
        assert_eq!(mask_account("622202123456"), "****3456");
        assert_eq!(mask_account("12345"), "****");
    }

    #[test]
    fn bank_codes() {
        for ok in ["ICB", "ICBC", "CMB01", "ABCDEFGHIJ12"] {
            assert!(validate_bank_code(ok).is_ok(), "{ok}");
        }
        for bad in ["IC", "ABCDEFGHIJ123", "icbc", "IC-BC", "IC BC", "", "ÉCB"] {
            let e = validate_bank_code(bad).unwrap_err();
            assert_eq!(e.to_string(), "bank_code: must be 3 to 12 characters of A-Z 0-9");
        }
    }

    #[test]
    fn enumerations() {
        for s in [Sex::Male, Sex::Female] {
            assert_eq!(Sex::from_u8(s.as_u8()), Some(s));
        }
        assert_eq!(Sex::Male.as_u8(), 1);
        assert_eq!(Sex::Female.as_str(), "female");
        assert_eq!(Sex::from_u8(0), None);
        assert_eq!(Sex::from_u8(3), None);
        for s in [
            AccountState::Normal,
            AccountState::Frozen,
            AccountState::Closed,
            AccountState::Lost,
        ] {
            assert_eq!(AccountState::from_u8(s.as_u8()), Some(s));
        }
        assert_eq!(AccountState::Lost.as_u8(), 4);
        assert_eq!(AccountState::Frozen.as_str(), "frozen");
        assert_eq!(AccountState::from_u8(5), None);
    }

    #[test]
    fn known_resident_ids() {
        let info = validate_resident_id(FEMALE_ID, today()).unwrap();
        assert_eq!(info.birth_date, date(1949, 12, 31));
        assert_eq!(info.sex, Sex::Female);
        let info = validate_resident_id(MALE_ID, today()).unwrap();
        assert_eq!(info.birth_date, date(1980, 5, 15));
        assert_eq!(info.sex, Sex::Male);
        // The GB 11643 example: its check character is right, but its 1880 birth
        // date is before the earliest accepted one.
        assert_eq!(resident_id_check_character("44052418800101001"), Some('4'));
        assert_eq!(resident_id_check_character("11010519491231002"), Some('X'));
        assert_eq!(resident_id_check_character("1101051949123100"), None);
        assert_eq!(resident_id_check_character("1101051949123100A"), None);
        assert_eq!(
            validate_resident_id("440524188001010014", today()).unwrap_err().reason,
            "birth date (characters 7-14) is before 1900-01-01"
        );
        assert!(validate_resident_id("440524190001010017", today()).is_ok());
    }

    #[test]
    fn lower_case_x() {
        let lower = "11010519491231002x";
        assert_eq!(validate_resident_id(lower, today()).unwrap().sex, Sex::Female);
        assert_eq!(normalise_resident_id(lower).as_str(), FEMALE_ID);
        assert_eq!(normalise_resident_id(FEMALE_ID).as_str(), FEMALE_ID);
        assert_eq!(normalise_resident_id(MALE_ID).as_str(), MALE_ID);
        let rec = BindingRecord::validate(
            raw_with(|r| {
                r.resident_id = lower.into();
                r.sex = 2;
                r.birth_date = "1949-12-31".into();
            }),
            today(),
        )
        .unwrap();
        assert_eq!(rec.identity.resident_id, FEMALE_ID);
    }

    #[test]
    fn resident_id_refusals() {
        let reason = |id: &str| {
            let e = validate_resident_id(id, today()).unwrap_err();
            assert_eq!(e.field, "identity.resident_id");
            e.reason
        };
        assert_eq!(
            reason("110105198005150033"),
            "check character does not match (ISO 7064 MOD 11-2)"
        );
        assert_eq!(
            reason("110105194912310021"),
            "check character does not match (ISO 7064 MOD 11-2)"
        );
        assert_eq!(
            validate_resident_id("110105198005150033", today())
                .unwrap_err()
                .to_string(),
            "identity.resident_id: check character does not match (ISO 7064 MOD 11-2)"
        );
        // Feb 30, Feb 29 of a non-leap year, month 13 (check characters correct).
        let not_a_date = "birth date (characters 7-14) is not a real calendar date";
        assert_eq!(reason("110105199002300028"), not_a_date);
        assert_eq!(reason("110105199902290021"), not_a_date);
        let month13 = format!("1101051990130100{}", '1');
        let month13 = format!(
            "{}{}",
            &month13[..17],
            resident_id_check_character(&month13[..17]).unwrap()
        );
        assert_eq!(reason(&month13), not_a_date);
        // Feb 29 of a leap year is a date.
        let leap = validate_resident_id("110105200002290021", today()).unwrap();
        assert_eq!(leap.birth_date, date(2000, 2, 29));
        assert_eq!(leap.sex, Sex::Female);
        assert_eq!(
            reason("110105203001010028"),
            "birth date (characters 7-14) is in the future"
        );
        // Born today is fine, tomorrow is not.
        let first17 = "11010520250601001";
        let born_today = format!("{first17}{}", resident_id_check_character(first17).unwrap());
        assert!(validate_resident_id(&born_today, today()).is_ok());
        assert!(validate_resident_id(&born_today, date(2025, 5, 31)).is_err());
        let shape = "must be exactly 18 characters: 17 digits then a digit or X";
        assert_eq!(reason("11010519800515003"), shape);
        assert_eq!(reason("1101051980051500321"), shape);
        assert_eq!(reason(""), shape);
        assert_eq!(reason("1101051980051A0032"), "the first 17 characters must be digits");
        assert_eq!(reason("11010519800515003Y"), "the last character must be a digit or X");
        assert_eq!(
            reason("11010519800515003\u{0}"),
            "the last character must be a digit or X"
        );
        assert_eq!(reason("010105198005150032"), "must not start with 0 (region code)");
        assert_eq!(reason("１10105198005150"), shape);
    }

    #[test]
    fn dates() {
        assert_eq!(
            parse_date("identity.birth_date", "2000-02-29").unwrap(),
            date(2000, 2, 29)
        );
        for bad in [
            "2000-2-29",
            "2000/02/29",
            "20000229",
            "2000-02-29 ",
            "+200-02-29",
            "２000-02-29",
            "",
        ] {
            let e = parse_date("identity.birth_date", bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                "identity.birth_date: must be a date as YYYY-MM-DD",
                "{bad:?}"
            );
        }
        for bad in ["1999-02-29", "2000-02-30", "2000-13-01", "2000-00-10", "2000-04-31"] {
            let e = parse_date("identity.birth_date", bad).unwrap_err();
            assert_eq!(e.reason, "is not a real calendar date", "{bad:?}");
        }
        assert_eq!(IdValidUntil::parse("long-term").unwrap(), IdValidUntil::LongTerm);
        assert_eq!(
            IdValidUntil::parse("2035-07-01").unwrap(),
            IdValidUntil::Date(date(2035, 7, 1))
        );
        assert_eq!(
            IdValidUntil::parse("2035-07-01").unwrap().to_text().as_str(),
            "2035-07-01"
        );
        assert_eq!(IdValidUntil::LongTerm.to_text().as_str(), "long-term");
        let e = IdValidUntil::parse("Long-Term").unwrap_err();
        assert_eq!(e.field, "identity.id_valid_until");
        assert_eq!(e.reason, "must be a date as YYYY-MM-DD or long-term");
        assert_eq!(date_text(date(1900, 1, 1)).as_str(), "1900-01-01");
        assert_eq!(
            format!("{:?}", IdValidUntil::Date(date(2035, 7, 1))),
            "IdValidUntil::Date(..)"
        );
    }

    #[test]
    fn validate_record() {
        let rec = record();
        assert_eq!(rec.phone.as_e164(), "+8613812345678");
        assert_eq!(rec.account_state, AccountState::Normal);
        assert_eq!(rec.identity.sex, Sex::Male);
        assert_eq!(rec.identity.birth_date, date(1980, 5, 15));
        assert_eq!(rec.identity.id_valid_until, IdValidUntil::Date(date(2035, 7, 1)));
        let long = BindingRecord::validate(raw_with(|r| r.id_valid_until = "long-term".into()), today()).unwrap();
        assert_eq!(long.identity.id_valid_until, IdValidUntil::LongTerm);
        // An expired card still validates (stored bindings must stay decodable).
        assert!(BindingRecord::validate(raw_with(|r| r.id_valid_until = "2000-01-01".into()), today()).is_ok());
        // Valid-until on the birth date itself is allowed.
        assert!(BindingRecord::validate(raw_with(|r| r.id_valid_until = "1980-05-15".into()), today()).is_ok());
        // 64-character names with Unicode.
        assert!(BindingRecord::validate(raw_with(|r| r.name = "张".repeat(64)), today()).is_ok());
    }

    #[test]
    fn record_refusals() {
        let check = |f: &dyn Fn(&mut RawRecord), field: &str, reason: &str| {
            let e = BindingRecord::validate(raw_with(f), today()).unwrap_err();
            assert_eq!((e.field, e.reason.as_str()), (field, reason));
        };
        check(&|r| r.sex = 2, "identity.sex", "does not match the resident ID");
        check(
            &|r| r.birth_date = "1980-05-16".into(),
            "identity.birth_date",
            "does not match the resident ID",
        );
        check(&|r| r.sex = 0, "identity.sex", "required");
        check(&|r| r.sex = 3, "identity.sex", "unknown value 3");
        check(&|r| r.sex = -1, "identity.sex", "unknown value -1");
        check(&|r| r.sex = 257, "identity.sex", "unknown value 257");
        check(&|r| r.account_state = 0, "account_state", "required");
        check(&|r| r.account_state = 5, "account_state", "unknown value 5");
        check(
            &|r| r.name = String::new(),
            "identity.name",
            "must be 1 to 64 characters",
        );
        check(
            &|r| r.name = "张".repeat(65),
            "identity.name",
            "must be 1 to 64 characters",
        );
        check(
            &|r| r.name = "张\u{0}三".into(),
            "identity.name",
            "must not contain control characters",
        );
        check(
            &|r| r.address = "a".repeat(257),
            "identity.address",
            "must be 1 to 256 characters",
        );
        check(
            &|r| r.address = "路\r\n".into(),
            "identity.address",
            "must not contain control characters",
        );
        check(
            &|r| r.issuing_office = "局".repeat(129),
            "identity.issuing_office",
            "must be 1 to 128 characters",
        );
        check(
            &|r| r.birth_date = "1980-5-15".into(),
            "identity.birth_date",
            "must be a date as YYYY-MM-DD",
        );
        check(
            &|r| r.id_valid_until = "1980-05-14".into(),
            "identity.id_valid_until",
            "must not be before the birth date",
        );
        check(
            &|r| r.id_valid_until = "never".into(),
            "identity.id_valid_until",
            "must be a date as YYYY-MM-DD or long-term",
        );
        check(
            &|r| r.bank_code = "icbc".into(),
            "bank_code",
            "must be 3 to 12 characters of A-Z 0-9",
        );
        check(
            &|r| r.account_number = "1234".into(),
            "account_number",
            "must be 12 to 19 digits",
        );
        check(
            &|r| r.resident_id = "110105198005150033".into(),
            "identity.resident_id",
            "check character does not match (ISO 7064 MOD 11-2)",
        );
        // First error in wire order wins.
        let e = BindingRecord::validate(
            raw_with(|r| {
                r.phone = "12".into();
                r.bank_code = "x".into();
                r.sex = 9;
            }),
            today(),
        )
        .unwrap_err();
        assert_eq!(e.field, "phone");
        let e = BindingRecord::validate(
            raw_with(|r| {
                r.account_state = 9;
                r.name = String::new();
            }),
            today(),
        )
        .unwrap_err();
        assert_eq!(e.field, "account_state");
        let e = BindingRecord::validate(
            raw_with(|r| {
                r.address = String::new();
                r.resident_id = "1".into();
            }),
            today(),
        )
        .unwrap_err();
        assert_eq!(e.field, "identity.address");
    }

    #[test]
    fn encode_layout() {
        let rec = record();
        let enc = rec.encode();
        let expected = domain_separated(
            "keyward/v1/binding-record",
            &[
                &[1],
                b"+8613812345678",
                b"ICBC",
                ACCOUNT.as_bytes(),
                &[1],
                NAME.as_bytes(),
                &[1],
                b"1980-05-15",
                ADDRESS.as_bytes(),
                MALE_ID.as_bytes(),
                b"2035-07-01",
                OFFICE.as_bytes(),
            ],
        );
        assert_eq!(enc.as_slice(), expected.as_slice());
    }

    #[test]
    fn round_trip_is_byte_identical() {
        for r in [
            raw(),
            raw_with(|r| r.id_valid_until = "long-term".into()),
            raw_with(|r| {
                r.phone = "+44 7911 123456".into();
                r.account_state = 4;
                r.resident_id = "11010519491231002x".into();
                r.sex = 2;
                r.birth_date = "1949-12-31".into();
            }),
        ] {
            let rec = BindingRecord::validate(r, today()).unwrap();
            let enc = rec.encode();
            let back = BindingRecord::decode(&enc, today()).unwrap();
            assert_eq!(back, rec);
            assert_eq!(back.encode().as_slice(), enc.as_slice());
            assert_eq!(back.identity.name, NAME);
        }
    }

    #[test]
    fn largest_record_fits_the_sealed_bound() {
        let rec = BindingRecord::validate(
            raw_with(|r| {
                r.phone = "+441234567890123".into();
                r.bank_code = "A".repeat(12);
                r.name = "𠀀".repeat(64);
                r.address = "𠀀".repeat(256);
                r.issuing_office = "𠀀".repeat(128);
            }),
            today(),
        )
        .unwrap();
        let enc = rec.encode();
        assert!(1 + 4 + 12 + enc.len() + 16 <= MAX_SEALED_LEN, "{}", enc.len());
        assert_eq!(BindingRecord::decode(&enc, today()).unwrap(), rec);
    }

    #[test]
    fn decode_refusals() {
        let enc = record().encode();
        let reason = |b: &[u8]| {
            let e = BindingRecord::decode(b, today()).unwrap_err();
            assert_eq!(e.field, "record");
            e.reason
        };
        let mut trailing = enc.to_vec();
        trailing.push(0);
        assert_eq!(reason(&trailing), "trailing bytes after the 12th field");
        let mut extra_field = enc.to_vec();
        extra_field.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(reason(&extra_field), "trailing bytes after the 12th field");
        assert_eq!(
            reason(&enc[..enc.len() - 1]),
            "truncated: a field is shorter than its length"
        );
        assert_eq!(reason(&enc[..31]), "truncated: fewer than 12 fields");
        assert_eq!(reason(&[]), "wrong domain tag");
        let tag_len = "keyward/v1/binding-record".len() + 1;
        // The version field is the byte after the tag and its 4-byte length.
        let mut version = enc.to_vec();
        version[tag_len + 4] = 2;
        assert_eq!(reason(&version), "unsupported version");
        let mut version0 = enc.to_vec();
        version0[tag_len + 4] = 0;
        assert_eq!(reason(&version0), "unsupported version");
        let mut tag = enc.to_vec();
        tag[0] ^= 1;
        assert_eq!(reason(&tag), "wrong domain tag");
        // A bit flip inside the resident ID.
        let id_at = enc
            .windows(MALE_ID.len())
            .position(|w| w == MALE_ID.as_bytes())
            .unwrap();
        let mut id = enc.to_vec();
        id[id_at + 16] ^= 1;
        assert_eq!(reason(&id), "stored identity.resident_id fails validation");
        // Non-canonical (but valid) forms are refused: spaced phone, lower-case x.
        let mut r = raw();
        r.phone = "+86 138 1234 5678".into();
        let spaced = domain_separated(
            "keyward/v1/binding-record",
            &[
                &[1],
                r.phone.as_bytes(),
                b"ICBC",
                ACCOUNT.as_bytes(),
                &[1],
                NAME.as_bytes(),
                &[1],
                b"1980-05-15",
                ADDRESS.as_bytes(),
                MALE_ID.as_bytes(),
                b"2035-07-01",
                OFFICE.as_bytes(),
            ],
        );
        assert_eq!(reason(&spaced), "not in canonical form");
        let bad_utf8 = domain_separated(
            "keyward/v1/binding-record",
            &[
                &[1],
                b"+8613812345678",
                b"ICBC",
                ACCOUNT.as_bytes(),
                &[1],
                &[0xff, 0xfe],
                &[1],
                b"1980-05-15",
                ADDRESS.as_bytes(),
                MALE_ID.as_bytes(),
                b"2035-07-01",
                OFFICE.as_bytes(),
            ],
        );
        assert_eq!(reason(&bad_utf8), "a text field is not UTF-8");
        let wide_state = domain_separated(
            "keyward/v1/binding-record",
            &[
                &[1],
                b"+8613812345678",
                b"ICBC",
                ACCOUNT.as_bytes(),
                &[0, 1],
                NAME.as_bytes(),
                &[1],
                b"1980-05-15",
                ADDRESS.as_bytes(),
                MALE_ID.as_bytes(),
                b"2035-07-01",
                OFFICE.as_bytes(),
            ],
        );
        assert_eq!(reason(&wide_state), "an enumeration field is not one byte");
        // Re-validated against today: a birth date after `today` fails.
        assert_eq!(
            BindingRecord::decode(&enc, date(1980, 5, 14)).unwrap_err().reason,
            "stored identity.resident_id fails validation"
        );
    }

    #[test]
    fn masked_view() {
        let rec = record();
        let m = rec.masked();
        assert_eq!(
            m,
            MaskedRecord {
                phone: "138****5678".into(),
                bank_code: "ICBC".into(),
                account_number: "****0123".into(),
                account_state: AccountState::Normal,
                name: "张**".into(),
            }
        );
        let shown = format!("{m:?}");
        // Nothing of the ID number: none of its digits appear at all.
        let without_masks = shown.replace("138****5678", "").replace("****0123", "");
        for d in MALE_ID.chars().filter(char::is_ascii_digit) {
            assert!(!without_masks.contains(d), "digit {d} in {shown}");
        }
        assert!(!shown.contains("1980"));
        assert!(!shown.contains("Male"));
        assert!(!shown.contains(ADDRESS));
        assert!(!shown.contains(OFFICE));
        assert_eq!(mask_name("李"), "李");
        assert_eq!(mask_name("欧阳娜娜"), "欧***");
        assert_eq!(mask_name(""), "");
    }

    #[test]
    fn debug_is_redacted() {
        let rec = record();
        assert_eq!(
            format!("{rec:?}"),
            "BindingRecord { phone: Phone(+86, 11 digits), bank_code: \"ICBC\", account_state: Normal, .. }"
        );
        assert_eq!(format!("{:?}", rec.identity), "Identity { .. }");
        assert_eq!(format!("{:?}", raw()), "RawRecord { .. }");
        assert_eq!(
            format!("{:?}", validate_resident_id(MALE_ID, today()).unwrap()),
            "ResidentIdInfo { sex: Male, .. }"
        );
    }

    #[test]
    fn sealed_framing() {
        let iv = [7u8; 12];
        let ct = [0xabu8; 40];
        let framed = frame_sealed(0x0102_0304, &iv, &ct);
        assert_eq!(framed.len(), 1 + 4 + 12 + 40);
        assert_eq!(&framed[..5], &[1, 1, 2, 3, 4]);
        let (h, body) = parse_sealed(&framed).unwrap();
        assert_eq!(
            h,
            SealedHeader {
                key_version: 0x0102_0304,
                iv
            }
        );
        assert_eq!(body, &ct[..]);

        let min = frame_sealed(1, &iv, &[0; 17]);
        assert_eq!(min.len(), MIN_SEALED_LEN);
        assert!(parse_sealed(&min).is_ok());
        let max = frame_sealed(1, &iv, &vec![0; MAX_SEALED_LEN - 17]);
        assert!(parse_sealed(&max).is_ok());
    }

    #[test]
    fn sealed_refusals() {
        let iv = [7u8; 12];
        let reason = |b: &[u8]| {
            let e = parse_sealed(b).unwrap_err();
            assert_eq!(e.field, "sealed");
            e.reason
        };
        assert_eq!(reason(&[]), "empty");
        let mut fmt2 = frame_sealed(1, &iv, &[0; 17]);
        fmt2[0] = 2;
        assert_eq!(reason(&fmt2), "unknown format 2 (expected 1)");
        let mut fmt0 = frame_sealed(1, &iv, &[0; 17]);
        fmt0[0] = 0;
        assert_eq!(reason(&fmt0), "unknown format 0 (expected 1)");
        assert!(reason(&frame_sealed(1, &iv, &[0; 16])).starts_with("shorter than 34 bytes"));
        assert!(reason(&[1]).starts_with("shorter than 34 bytes"));
        assert_eq!(
            reason(&frame_sealed(1, &iv, &vec![0; MAX_SEALED_LEN - 16])),
            "longer than 8192 bytes"
        );
        assert_eq!(reason(&frame_sealed(0, &iv, &[0; 17])), "key version 0 is not valid");
    }

    #[test]
    fn aad_and_blind_index() {
        let a = seal_aad(&[1; 32]);
        let b = seal_aad(&[2; 32]);
        assert_ne!(a, b);
        assert_eq!(a, domain_separated("keyward/v1/binding", &[&[1; 32], b"binding", &[1]]));
        assert_eq!(parse_blind_index(&[9; 32]).unwrap(), [9; 32]);
        for n in [0usize, 31, 33] {
            let e = parse_blind_index(&vec![0; n]).unwrap_err();
            assert_eq!(e.to_string(), "blind_index: must be exactly 32 bytes");
        }
    }
}
