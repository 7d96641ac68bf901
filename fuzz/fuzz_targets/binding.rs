//! Sealed bindings (src/crypto/binding.rs): `parse_sealed` (the clear header of a
//! sealed record), `parse_blind_index`, `BindingRecord::decode` (the plaintext
//! record a sealed binding opens to, re-validated field by field) and, on the input
//! as text, the field parsers a record is validated with: `normalise_phone`,
//! `parse_date`, `IdValidUntil::parse`, `validate_resident_id`,
//! `validate_account_number`, `validate_bank_code`.
//!
//! Invariants: frame_sealed(parse_sealed(b)) == b; a decoded record re-encodes to
//! the same bytes and its masked view builds; parse then print of a valid-until date
//! gives the text back.
#![no_main]

use keyward::crypto::binding::{
    frame_sealed, normalise_phone, parse_blind_index, parse_date, parse_sealed, validate_account_number,
    validate_bank_code, validate_resident_id, BindingRecord, IdValidUntil, RawRecord, MAX_SEALED_LEN,
    MIN_SEALED_LEN,
};
use libfuzzer_sys::fuzz_target;
use time::{Date, Month};

fn today() -> Date {
    Date::from_calendar_date(2026, Month::June, 1).unwrap_or(Date::MIN)
}

fuzz_target!(init: {
    keyward_fuzz::write_seeds_if_asked(seeds);
}, |data: &[u8]| {
    if let Ok((h, ct)) = parse_sealed(data) {
        assert!((MIN_SEALED_LEN..=MAX_SEALED_LEN).contains(&data.len()));
        assert_ne!(h.key_version, 0);
        assert_eq!(frame_sealed(h.key_version, &h.iv, ct), data, "sealed round trip");
    }
    if let Ok(ix) = parse_blind_index(data) {
        assert_eq!(ix.as_slice(), data);
    }
    if let Ok(r) = BindingRecord::decode(data, today()) {
        assert_eq!(r.encode().as_slice(), data, "record round trip");
        let _ = r.masked();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(p) = normalise_phone(s) {
            let _ = (p.masked(), p.index_input(), p.country_code(), p.national(), p.is_cn());
            assert!(normalise_phone(p.as_e164()).is_ok(), "a normalised phone normalises again");
        }
        let _ = parse_date("fuzz", s);
        if let Ok(v) = IdValidUntil::parse(s) {
            assert_eq!(v.to_text().as_str(), s, "valid-until round trip");
        }
        let _ = validate_resident_id(s, today());
        let _ = validate_account_number(s);
        let _ = validate_bank_code(s);
    }
});

fn raw() -> RawRecord {
    RawRecord {
        phone: "+86 13812345678".into(),
        bank_code: "ICBC".into(),
        account_number: "6222021234567890123".into(),
        account_state: 1,
        name: "张三丰".into(),
        sex: 1,
        birth_date: "1980-05-15".into(),
        address: "北京市朝阳区建国路88号".into(),
        resident_id: "110105198005150032".into(),
        id_valid_until: "2035-07-01".into(),
        issuing_office: "北京市公安局朝阳分局".into(),
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut female = raw();
    female.sex = 2;
    female.birth_date = "1949-12-31".into();
    female.resident_id = "11010519491231002X".into();
    female.id_valid_until = "long-term".into();
    female.phone = "+1 415 555 2671".into();
    female.account_state = 2;
    for r in [raw(), female] {
        if let Ok(rec) = BindingRecord::validate(r, today()) {
            out.push(rec.encode().to_vec());
        }
    }
    out.push(frame_sealed(1, &[0x12; 12], &[0x34; 200]));
    out.push(frame_sealed(0x0102_0304, &[0; 12], &[0xEE; 17]));
    out.push(vec![0x42; 32]);
    for s in ["+86 138-1234-5678", "2035-07-01", "long-term", "110105198005150032", "6222021234567890123", "ICBC"] {
        out.push(s.as_bytes().to_vec());
    }
    out
}
