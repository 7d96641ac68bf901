//! BindingService against a real SoftHSM token over mTLS: seal/open round trips of
//! every field (phone numbers normalised to E.164, resident IDs canonical), blind
//! indexes independent of how a number is written, the masked view of customer
//! service, refusal of altered records and of records moved to another row, retired
//! key versions, rotation of `binding` with RewrapBindings (indexes unchanged, batches
//! all-or-nothing and bounded), field-named validation before any token call, roles
//! (full, masked-only, index-only; masked view and blind index never together), the
//! per-client rate limits of BlindIndex and OpenBinding, and no phone number, account
//! number, ID number or name in the audit trail.

// TOKEN_WRITE and KEY_VERSIONS (std locks) are held across awaits on purpose: they
// serialise token writes and key rotations between tests, each on its own runtime, so
// no runtime can deadlock on them.
#![allow(clippy::await_holding_lock)]

mod common;

use std::path::Path;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use common::*;
use keyward::client::Clients;
use keyward::config::{Config, RateLimit, Role};
use keyward::proto::{
    open_binding_response::View, AccountState, Binding, BlindIndexRequest, BlindIndexResponse, Identity, KeyRef,
    MaskedBinding, OpenBindingRequest, OpenBindingResponse, ReloadKeysRequest, RewrapBindingsRequest,
    RewrapBindingsResponse, SealBindingRequest, SealBindingResponse, SealedBinding, Sex,
};
use prost::Message;
use tonic::{Code, Response, Status};

// ---------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------

const PHONE_E164: &str = "+8613812345678";
const PHONE_BARE: &str = "13812345678";
const PHONE_SPACED: &str = "138 1234 5678";
const ACCOUNT: &str = "6222021234567890123";
const BANK: &str = "ICBC";
const NAME: &str = "王秀英";
const ADDRESS: &str = "北京市朝阳区建国路88号";
const OFFICE: &str = "北京市公安局朝阳分局";
/// Female, born 1949-12-31.
const FEMALE_ID: &str = "11010519491231002X";
const FEMALE_BIRTH: &str = "1949-12-31";
/// Male, born 1980-05-15.
const MALE_ID: &str = "110105198005150032";

/// Values that must never appear in an error message or in the audit directory.
fn secrets() -> Vec<String> {
    vec![
        PHONE_E164.into(),
        "8613812345678".into(),
        PHONE_BARE.into(),
        PHONE_SPACED.into(),
        hex::encode(PHONE_BARE),
        ACCOUNT.into(),
        "622202123456".into(),
        FEMALE_ID.into(),
        FEMALE_ID.to_lowercase(),
        "11010519491231002".into(),
        MALE_ID.into(),
        NAME.into(),
        "秀英".into(),
        ADDRESS.into(),
        "建国路".into(),
        OFFICE.into(),
    ]
}

fn assert_clean(text: &str, what: &str) {
    for s in secrets() {
        assert!(!text.contains(&s), "{what}: {s:?} appears in {text:?}");
    }
}

const SEAL_RPC: &str = "keyward.v1.BindingService/SealBinding";
const INDEX_RPC: &str = "keyward.v1.BindingService/BlindIndex";
const OPEN_RPC: &str = "keyward.v1.BindingService/OpenBinding";
const REWRAP_RPC: &str = "keyward.v1.BindingService/RewrapBindings";

/// The ISO 7064 MOD 11-2 check character of 17 digits (computed here independently).
fn check_char(first17: &str) -> char {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    assert_eq!(first17.len(), 17);
    let sum: u32 = first17.bytes().zip(W).map(|(d, w)| u32::from(d - b'0') * w).sum();
    char::from(b"10X98765432"[(sum % 11) as usize])
}

/// A resident ID with a correct check character.
fn resident_id(first17: &str) -> String {
    format!("{first17}{}", check_char(first17))
}

/// A binding of the female test person, phone written nationally with spaces, card
/// without expiry.
fn person() -> Binding {
    Binding {
        phone: PHONE_SPACED.into(),
        bank_code: BANK.into(),
        account_number: ACCOUNT.into(),
        account_state: AccountState::Normal as i32,
        identity: Some(Identity {
            name: NAME.into(),
            sex: Sex::Female as i32,
            birth_date: FEMALE_BIRTH.into(),
            address: ADDRESS.into(),
            resident_id: FEMALE_ID.into(),
            id_valid_until: "long-term".into(),
            issuing_office: OFFICE.into(),
        }),
    }
}

/// [`person`] changed by `f`.
fn person_with(f: impl FnOnce(&mut Binding)) -> Binding {
    let mut b = person();
    f(&mut b);
    b
}

/// [`person`] changed in its identity by `f`.
fn identity_with(f: impl FnOnce(&mut Identity)) -> Binding {
    person_with(|b| f(b.identity.as_mut().expect("identity")))
}

/// [`person`] bound to another phone number.
fn person_at(phone: &str) -> Binding {
    person_with(|b| b.phone = phone.into())
}

/// What a full OpenBinding of [`person_at`] returns: the phone in E.164.
fn person_full(e164: &str) -> Binding {
    person_with(|b| b.phone = e164.into())
}

/// `name/vN` of a key reference.
fn key_str(k: &Option<KeyRef>) -> String {
    k.as_ref().map(|k| format!("{}/v{}", k.name, k.version)).unwrap_or_else(|| "(none)".into())
}

/// The key version in a sealed record's header (bytes 1..5, big-endian).
fn header_version(sealed: &[u8]) -> u32 {
    u32::from_be_bytes(sealed[1..5].try_into().expect("a 5-byte header"))
}

fn flip(v: &[u8], byte: usize, bit: u8) -> Vec<u8> {
    let mut out = v.to_vec();
    out[byte] ^= 1 << bit;
    out
}

/// Replaces a role of the config by a modified copy.
fn edit_role(config: &mut Config, name: &str, f: impl FnOnce(&mut Role)) {
    let mut role = Role::clone(config.roles.get(name).unwrap_or_else(|| panic!("role {name} in the config")));
    f(&mut role);
    config.roles.insert(name.to_string(), Arc::new(role));
}


/// The rpc lines of one RPC.
fn lines_of(dir: &Path, rpc: &str) -> Vec<serde_json::Value> {
    rpc_lines(dir).into_iter().filter(|l| l["action"].as_str().unwrap_or_default().trim_start_matches('/') == rpc).collect()
}

// ---------------------------------------------------------------------------
// Key versions: tests that rotate or retire `binding` run alone
// ---------------------------------------------------------------------------

/// Tests that rotate or retire `binding` hold it for writing; every other test holds
/// it for reading, so no key version changes under a running test.
static KEY_VERSIONS: RwLock<()> = RwLock::new(());

fn stable_keys() -> RwLockReadGuard<'static, ()> {
    KEY_VERSIONS.read().unwrap_or_else(|p| p.into_inner())
}

fn changing_keys() -> RwLockWriteGuard<'static, ()> {
    KEY_VERSIONS.write().unwrap_or_else(|p| p.into_inner())
}

/// Rotates `binding` with the ceremony, then has the appliance reload its catalogue
/// (as admin); returns the new version.
async fn rotate_binding(admin: &Clients) -> u32 {
    let m = {
        let _g = token_write();
        let c = ceremony();
        let m = c.rotate("binding").expect("rotate binding");
        c.close().expect("close the ceremony");
        m
    };
    reload(admin).await;
    m.version
}

/// Retires a version of `binding`, then reloads the appliance's catalogue.
async fn retire_binding(admin: &Clients, version: u32) {
    {
        let _g = token_write();
        let c = ceremony();
        c.retire("binding", version).expect("retire a binding version");
        c.close().expect("close the ceremony");
    }
    reload(admin).await;
}

async fn reload(admin: &Clients) {
    // The reload copies keys into session objects: a token write.
    let _g = token_write();
    admin.admin.clone().reload_keys(ReloadKeysRequest {}).await.expect("ReloadKeys");
}

// ---------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------

async fn seal(c: &Clients, b: Binding) -> Result<Response<SealBindingResponse>, Status> {
    c.binding.clone().seal_binding(SealBindingRequest { binding: Some(b) }).await
}

async fn seal_ok(c: &Clients, b: Binding, what: &str) -> SealBindingResponse {
    seal(c, b).await.unwrap_or_else(|s| panic!("{what}: SealBinding {:?} {:?}", s.code(), s.message())).into_inner()
}

async fn index(c: &Clients, phone: &str) -> Result<Response<BlindIndexResponse>, Status> {
    c.binding.clone().blind_index(BlindIndexRequest { phone: phone.into() }).await
}

async fn index_ok(c: &Clients, phone: &str) -> Vec<u8> {
    let r = index(c, phone).await.unwrap_or_else(|s| panic!("BlindIndex {:?} {:?}", s.code(), s.message())).into_inner();
    assert_eq!(r.key.as_ref().map(|k| k.name.as_str()), Some("binding.index"));
    assert_eq!(r.blind_index.len(), 32);
    r.blind_index
}

async fn open(c: &Clients, sealed: &[u8], blind_index: &[u8]) -> Result<Response<OpenBindingResponse>, Status> {
    c.binding.clone().open_binding(OpenBindingRequest { sealed: sealed.to_vec(), blind_index: blind_index.to_vec() }).await
}

/// Opens in the full view; returns the binding and the key version that opened it.
async fn open_full(c: &Clients, sealed: &[u8], blind_index: &[u8], what: &str) -> (Binding, u32) {
    let r = open(c, sealed, blind_index)
        .await
        .unwrap_or_else(|s| panic!("{what}: OpenBinding {:?} {:?}", s.code(), s.message()))
        .into_inner();
    let key = r.key.clone().expect("OpenBinding names its key");
    assert_eq!(key.name, "binding", "{what}");
    match r.view {
        Some(View::Full(b)) => (b, key.version),
        other => panic!("{what}: expected the full view, got {other:?}"),
    }
}

async fn open_masked(c: &Clients, sealed: &[u8], blind_index: &[u8], what: &str) -> (MaskedBinding, OpenBindingResponse) {
    let r = open(c, sealed, blind_index)
        .await
        .unwrap_or_else(|s| panic!("{what}: OpenBinding {:?} {:?}", s.code(), s.message()))
        .into_inner();
    match &r.view {
        Some(View::Masked(m)) => (m.clone(), r),
        other => panic!("{what}: expected the masked view, got {other:?}"),
    }
}

fn record(s: &SealBindingResponse) -> SealedBinding {
    SealedBinding { sealed: s.sealed.clone(), blind_index: s.blind_index.clone() }
}

async fn rewrap(c: &Clients, records: Vec<SealedBinding>) -> Result<Response<RewrapBindingsResponse>, Status> {
    c.binding.clone().rewrap_bindings(RewrapBindingsRequest { records }).await
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The test data is what it claims: valid IDs of the stated sex and birth date.
#[test]
fn test_resident_ids_are_valid() {
    assert_eq!(resident_id("11010519491231002"), FEMALE_ID);
    assert_eq!(resident_id("11010519800515003"), MALE_ID);
    // 17th digit: even female, odd male.
    assert_eq!((FEMALE_ID.as_bytes()[16] - b'0') % 2, 0);
    assert_eq!((MALE_ID.as_bytes()[16] - b'0') % 2, 1);
}

/// Every field comes back from a full open exactly as sealed (phone in E.164, the
/// resident ID's `x` as `X`); the response names the key; the blind index is the same
/// however the number is written, and differs for another number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seal_open_round_trip_of_every_field() {
    let _k = stable_keys();
    let srv = start("roundtrip").await;
    let (hub, lookup) = (srv.clients("hub").await, srv.clients("lookup").await);

    let cases: Vec<(Binding, Binding)> = vec![
        (
            // Lower-case x, frozen account, long-term card.
            identity_with(|i| i.resident_id = FEMALE_ID.to_lowercase()),
            person_with(|b| b.phone = PHONE_E164.into()),
        ),
        (
            Binding {
                phone: "+44 7911 123456".into(),
                bank_code: "BOC0042".into(),
                account_number: "622848123456".into(),
                account_state: AccountState::Lost as i32,
                identity: Some(Identity {
                    name: "张三丰".into(),
                    sex: Sex::Male as i32,
                    birth_date: "1980-05-15".into(),
                    address: "上海市浦东新区世纪大道100号 Room 5".into(),
                    resident_id: MALE_ID.into(),
                    id_valid_until: "2035-07-01".into(),
                    issuing_office: "上海市公安局浦东分局".into(),
                }),
            },
            Binding {
                phone: "+447911123456".into(),
                bank_code: "BOC0042".into(),
                account_number: "622848123456".into(),
                account_state: AccountState::Lost as i32,
                identity: Some(Identity {
                    name: "张三丰".into(),
                    sex: Sex::Male as i32,
                    birth_date: "1980-05-15".into(),
                    address: "上海市浦东新区世纪大道100号 Room 5".into(),
                    resident_id: MALE_ID.into(),
                    id_valid_until: "2035-07-01".into(),
                    issuing_office: "上海市公安局浦东分局".into(),
                }),
            },
        ),
        (
            person_with(|b| {
                b.phone = "0086 139-0000-0001".into();
                b.account_state = AccountState::Frozen as i32;
            }),
            person_with(|b| {
                b.phone = "+8613900000001".into();
                b.account_state = AccountState::Frozen as i32;
            }),
        ),
        (
            person_with(|b| b.account_state = AccountState::Closed as i32),
            person_with(|b| {
                b.phone = PHONE_E164.into();
                b.account_state = AccountState::Closed as i32;
            }),
        ),
    ];
    for (i, (input, expected)) in cases.into_iter().enumerate() {
        let what = format!("case {i}");
        let s = seal_ok(&hub, input, &what).await;
        let k = s.key.clone().expect("SealBinding names its key");
        assert_eq!(k.name, "binding", "{what}");
        assert!(k.version >= 1, "{what}");
        assert_eq!(s.sealed[0], 1, "{what}: format byte");
        assert_eq!(header_version(&s.sealed), k.version, "{what}: the header names binding/v{}", k.version);
        assert!(s.sealed.len() > 1 + 4 + 12 + 16, "{what}");
        assert_eq!(s.blind_index.len(), 32, "{what}");
        let (back, v) = open_full(&hub, &s.sealed, &s.blind_index, &what).await;
        assert_eq!(back, expected, "{what}");
        assert_eq!(v, k.version, "{what}: opened under the version that sealed it");
        assert_eq!(s.blind_index, index_ok(&hub, &expected.phone).await, "{what}: index of the E.164 form");
    }

    // The same number written differently: one index, for the hub and the lookup role.
    let s = seal_ok(&hub, person(), "person").await;
    for form in [PHONE_E164, "0086 138 1234 5678", "008613812345678", PHONE_BARE, PHONE_SPACED, "+86 (138) 1234-5678", "138-1234-5678"] {
        assert_eq!(index_ok(&hub, form).await, s.blind_index, "hub: index of {form:?}");
        assert_eq!(index_ok(&lookup, form).await, s.blind_index, "lookup: index of {form:?}");
    }
    assert_ne!(index_ok(&hub, "13812345679").await, s.blind_index, "another number, another index");
    assert_ne!(index_ok(&hub, "+447911123456").await, s.blind_index);

    // Sealing again: the same index, a fresh IV, both open.
    let again = seal_ok(&hub, person(), "person again").await;
    assert_eq!(again.blind_index, s.blind_index);
    assert_ne!(again.sealed, s.sealed, "a fresh IV per seal");
    assert_ne!(again.sealed[5..17], s.sealed[5..17], "a fresh IV per seal");
    for r in [&s, &again] {
        let (b, _) = open_full(&hub, &r.sealed, &r.blind_index, "person").await;
        assert_eq!(b, person_full(PHONE_E164));
    }
    srv.stop().await;
}

/// Customer service gets exactly the masks, the bank code and the state, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_view_shows_masks_only() {
    let _k = stable_keys();
    let srv = start("masked").await;
    let (hub, service) = (srv.clients("hub").await, srv.clients("service").await);

    let s = seal_ok(&hub, person_with(|b| b.account_state = AccountState::Frozen as i32), "person").await;
    let (m, resp) = open_masked(&service, &s.sealed, &s.blind_index, "service").await;
    assert_eq!(
        m,
        MaskedBinding {
            phone: "138****5678".into(),
            bank_code: BANK.into(),
            account_number: "****0123".into(),
            account_state: AccountState::Frozen as i32,
            name: "王**".into(),
        }
    );
    assert_eq!(key_str(&resp.key), key_str(&s.key), "the masked response names the key");
    let bytes = resp.encode_to_vec();
    let holds = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    let clear = [PHONE_E164, PHONE_BARE, "1381234", ACCOUNT, "622202", FEMALE_ID, "11010519491231002", ADDRESS, OFFICE];
    for needle in clear.into_iter().chain([NAME, "秀英", FEMALE_BIRTH, "long-term"]) {
        assert!(!holds(needle), "the masked response holds {needle:?}");
    }

    // Other shapes: a foreign number, a one-character and a four-character name, the
    // shortest account number.
    let other = Binding {
        phone: "+44 7911 123456".into(),
        account_number: "622848123456".into(),
        ..person_with(|b| b.identity.as_mut().expect("identity").name = "李".into())
    };
    let s2 = seal_ok(&hub, other, "foreign").await;
    let (m2, _) = open_masked(&service, &s2.sealed, &s2.blind_index, "foreign").await;
    assert_eq!((m2.phone.as_str(), m2.account_number.as_str(), m2.name.as_str()), ("+44******3456", "****3456", "李"));
    let s3 = seal_ok(&hub, identity_with(|i| i.name = "欧阳娜娜".into()), "four characters").await;
    let (m3, _) = open_masked(&service, &s3.sealed, &s3.blind_index, "four characters").await;
    assert_eq!(m3.name, "欧***");

    // The hub (binding.open-full) gets the full view of the same record.
    let (full, _) = open_full(&hub, &s.sealed, &s.blind_index, "hub").await;
    assert_eq!(full.account_number, ACCOUNT);
    srv.stop().await;
}

/// Any altered byte, another row's index, or a malformed record is refused, and no
/// refusal quotes the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_or_moved_records_do_not_open() {
    let _k = stable_keys();
    let srv = start("tamper").await;
    let hub = srv.clients("hub").await;
    let s = seal_ok(&hub, person(), "person").await;
    let n = s.sealed.len();
    let version = header_version(&s.sealed);
    let mut messages = Vec::new();

    // IV, body and tag: the tag does not verify.
    for (byte, bit) in [(5, 0), (10, 3), (16, 7), (17, 0), (17 + (n - 33) / 2, 5), (n - 17, 1), (n - 16, 0), (n - 9, 4), (n - 1, 7)] {
        let what = format!("bit {bit} of byte {byte}");
        let st = expect_code(open(&hub, &flip(&s.sealed, byte, bit), &s.blind_index).await, Code::InvalidArgument, &["sealed", "does not open"], &what);
        messages.push(st.message().to_string());
    }
    // The format byte.
    let st = expect_code(open(&hub, &flip(&s.sealed, 0, 1), &s.blind_index).await, Code::InvalidArgument, &["sealed", "format"], "format byte");
    messages.push(st.message().to_string());
    // A version byte naming no key.
    let st = expect_code(
        open(&hub, &flip(&s.sealed, 1, 7), &s.blind_index).await,
        Code::NotFound,
        &["sealed", &format!("binding/v{}", version | 0x8000_0000)],
        "high version byte",
    );
    messages.push(st.message().to_string());
    // The low version byte: another version (absent, retired, or present but the wrong
    // key), or version 0.
    for bit in 0..8u8 {
        let other = version ^ (1 << bit);
        let r = open(&hub, &flip(&s.sealed, 4, bit), &s.blind_index).await;
        let st = err_of(r, &format!("version {other}"));
        let ok = match st.code() {
            Code::InvalidArgument => st.message().contains("does not open") || (other == 0 && st.message().contains("key version 0")),
            Code::NotFound => st.message().contains(&format!("binding/v{other}")),
            Code::FailedPrecondition => st.message().contains("retired"),
            _ => false,
        };
        assert!(ok, "version {other}: {:?} {:?}", st.code(), st.message());
        messages.push(st.message().to_string());
    }
    // One bit of the blind index, and another phone's real index.
    for byte in [0, 31] {
        let st = expect_code(open(&hub, &s.sealed, &flip(&s.blind_index, byte, 0)).await, Code::InvalidArgument, &["does not open"], "index bit");
        messages.push(st.message().to_string());
    }
    let other_index = index_ok(&hub, "13900000009").await;
    let st = expect_code(open(&hub, &s.sealed, &other_index).await, Code::InvalidArgument, &["sealed", "does not open"], "another phone's index");
    messages.push(st.message().to_string());
    let other = seal_ok(&hub, person_at("13900000009"), "other row").await;
    let st = expect_code(open(&hub, &other.sealed, &s.blind_index).await, Code::InvalidArgument, &["does not open"], "another row's record");
    messages.push(st.message().to_string());
    // Malformed.
    for (sealed, index, needle) in [
        (s.sealed[..n - 1].to_vec(), s.blind_index.clone(), "sealed"),
        (s.sealed[..33].to_vec(), s.blind_index.clone(), "sealed: shorter"),
        (Vec::new(), s.blind_index.clone(), "sealed: empty"),
        (s.sealed.clone(), s.blind_index[..31].to_vec(), "blind_index: must be exactly 32 bytes"),
        (s.sealed.clone(), Vec::new(), "blind_index"),
    ] {
        let st = expect_code(open(&hub, &sealed, &index).await, Code::InvalidArgument, &[needle], needle);
        messages.push(st.message().to_string());
    }
    for m in &messages {
        assert_clean(m, "refusal");
    }
    // The original still opens.
    let (b, _) = open_full(&hub, &s.sealed, &s.blind_index, "original").await;
    assert_eq!(b, person_full(PHONE_E164));
    srv.stop().await;
}

/// A record sealed under a version that is then retired no longer opens
/// (FAILED_PRECONDITION, naming the version); it opened while that version was only
/// superseded. Records sealed under the new version open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retired_version_refuses_its_records() {
    let _k = changing_keys();
    let srv = start("retire").await;
    let (hub, admin) = (srv.clients("hub").await, srv.clients("admin").await);
    let old = seal_ok(&hub, person(), "before rotation").await;
    let v_old = header_version(&old.sealed);

    let v_new = rotate_binding(&admin).await;
    assert!(v_new > v_old, "v{v_new} after v{v_old}");
    let new = seal_ok(&hub, person(), "after rotation").await;
    assert_eq!((header_version(&new.sealed), new.key.as_ref().map(|k| k.version)), (v_new, Some(v_new)));
    let (_, v) = open_full(&hub, &old.sealed, &old.blind_index, "superseded version").await;
    assert_eq!(v, v_old, "a superseded version still opens its records");

    retire_binding(&admin, v_old).await;
    let st = expect_code(
        open(&hub, &old.sealed, &old.blind_index).await,
        Code::FailedPrecondition,
        &["sealed", &format!("binding/v{v_old}"), "retired"],
        "retired version",
    );
    assert_clean(st.message(), "retired version");
    let service = srv.clients("service").await;
    expect_code(open(&service, &old.sealed, &old.blind_index).await, Code::FailedPrecondition, &["retired"], "retired (masked)");
    // Nor can it be re-wrapped: the batch fails, naming the item.
    let st = expect_code(
        rewrap(&hub, vec![record(&new), record(&old)]).await,
        Code::FailedPrecondition,
        &["item 1", &format!("binding/v{v_old}"), "retired"],
        "rewrap of a retired record",
    );
    assert_clean(st.message(), "rewrap of a retired record");
    let (b, v) = open_full(&hub, &new.sealed, &new.blind_index, "new version").await;
    assert_eq!((b, v), (person_full(PHONE_E164), v_new));
    assert_eq!(index_ok(&hub, PHONE_E164).await, old.blind_index, "the index does not depend on `binding`");
    srv.stop().await;
}

/// Rotating `binding` and re-wrapping: every record ends under the new version and
/// opens to the same binding, records already current come back unchanged, blind
/// indexes stay the same, and a batch with one bad record fails as a whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_rewrap_keep_records_and_indexes() {
    let _k = changing_keys();
    let srv = start("rewrap").await;
    let (hub, admin) = (srv.clients("hub").await, srv.clients("admin").await);

    let phones = [("13900000001", "+8613900000001"), ("+86 139 0000 0002", "+8613900000002"), ("0086 13900000003", "+8613900000003")];
    let mut before = Vec::new();
    let mut indexes = Vec::new();
    for (input, e164) in phones {
        before.push(seal_ok(&hub, person_at(input), e164).await);
        indexes.push(index_ok(&hub, e164).await);
    }
    let v_old = header_version(&before[0].sealed);
    for (s, idx) in before.iter().zip(&indexes) {
        assert_eq!(header_version(&s.sealed), v_old);
        assert_eq!(&s.blind_index, idx);
    }
    // Nothing to do before the rotation: all current.
    let r = rewrap(&hub, before.iter().map(record).collect()).await.expect("rewrap before rotation").into_inner();
    assert_eq!((r.already_current, key_str(&r.key)), (3, format!("binding/v{v_old}")));
    assert_eq!(r.sealed, before.iter().map(|s| s.sealed.clone()).collect::<Vec<_>>());

    let v_new = rotate_binding(&admin).await;
    assert!(v_new > v_old);
    let after = seal_ok(&hub, person_at("13900000004"), "after rotation").await;
    assert_eq!(header_version(&after.sealed), v_new);

    let batch = vec![record(&before[0]), record(&before[1]), record(&after), record(&before[2])];
    let expected_phones = ["+8613900000001", "+8613900000002", "+8613900000004", "+8613900000003"];
    let r = rewrap(&hub, batch.clone()).await.expect("RewrapBindings").into_inner();
    assert_eq!(key_str(&r.key), format!("binding/v{v_new}"));
    assert_eq!(r.sealed.len(), 4);
    assert_eq!(r.already_current, 1, "only the record sealed after the rotation was current");
    assert_eq!(r.sealed[2], after.sealed, "a current record comes back unchanged");
    for (i, (sealed, rec)) in r.sealed.iter().zip(&batch).enumerate() {
        assert_eq!(header_version(sealed), v_new, "item {i} names the new version");
        let (b, v) = open_full(&hub, sealed, &rec.blind_index, &format!("item {i}")).await;
        assert_eq!((b, v), (person_full(expected_phones[i]), v_new), "item {i}");
        if i != 2 {
            assert_ne!(sealed, &rec.sealed, "item {i} re-sealed");
        }
    }
    // Again: everything current, nothing changes.
    let again = rewrap(&hub, r.sealed.iter().zip(&batch).map(|(s, rec)| SealedBinding { sealed: s.clone(), blind_index: rec.blind_index.clone() }).collect())
        .await
        .expect("second rewrap")
        .into_inner();
    assert_eq!((again.already_current, &again.sealed), (4, &r.sealed));
    // Blind indexes are unchanged by the rotation.
    for ((_, e164), idx) in phones.iter().zip(&indexes) {
        assert_eq!(&index_ok(&hub, e164).await, idx, "{e164}");
    }

    // One tampered record (tag, IV or another row's index) fails the whole batch.
    let tampered = [
        SealedBinding { sealed: flip(&before[1].sealed, before[1].sealed.len() - 1, 0), blind_index: before[1].blind_index.clone() },
        SealedBinding { sealed: flip(&before[1].sealed, 6, 2), blind_index: before[1].blind_index.clone() },
        SealedBinding { sealed: before[1].sealed.clone(), blind_index: before[2].blind_index.clone() },
    ];
    for (t, bad) in tampered.into_iter().enumerate() {
        let st = expect_code(
            rewrap(&hub, vec![record(&before[0]), bad, record(&before[2])]).await,
            Code::InvalidArgument,
            &["records", "item 1", "nothing was re-sealed"],
            &format!("tampered batch {t}"),
        );
        assert_clean(st.message(), "tampered batch");
    }
    // A malformed item is named too.
    let short = SealedBinding { sealed: before[2].sealed[..20].to_vec(), blind_index: before[2].blind_index.clone() };
    expect_code(rewrap(&hub, vec![record(&before[0]), record(&after), short]).await, Code::InvalidArgument, &["records", "item 2"], "short item");
    let no_index = SealedBinding { sealed: before[0].sealed.clone(), blind_index: vec![0; 31] };
    expect_code(rewrap(&hub, vec![no_index]).await, Code::InvalidArgument, &["records", "item 0", "blind_index"], "bad index");
    // The originals still re-wrap afterwards.
    let r2 = rewrap(&hub, vec![record(&before[0])]).await.expect("rewrap after refusals").into_inner();
    assert_eq!((r2.already_current, header_version(&r2.sealed[0])), (0, v_new));

    let audit = srv.audit_dir.clone();
    srv.stop().await;
    let lines = lines_of(&audit, REWRAP_RPC);
    let four = lines
        .iter()
        .find(|l| l["code"] == "OK" && l["detail"] == "records=4 already_current=1")
        .unwrap_or_else(|| panic!("no audit line of the 4-record rewrap in {lines:?}"));
    let keys: Vec<&str> = four["keys"].as_array().expect("keys").iter().filter_map(|k| k.as_str()).collect();
    assert!(keys.contains(&format!("binding/v{v_new}").as_str()) && keys.contains(&format!("binding/v{v_old}").as_str()), "{keys:?}");
    assert_eq!(lines.iter().filter(|l| l["code"] == "INVALID_ARGUMENT").count(), 5);
}

/// RewrapBindings refuses an empty batch and one above `binding.max_batch`, and takes
/// a batch of exactly the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_batch_is_bounded() {
    let _k = stable_keys();
    let srv = start_with("rewrap-limit", |c| c.binding.max_batch = 3).await;
    let hub = srv.clients("hub").await;
    let s = seal_ok(&hub, person(), "person").await;
    expect_code(rewrap(&hub, Vec::new()).await, Code::InvalidArgument, &["records", "at least one"], "empty batch");
    let st = expect_code(rewrap(&hub, vec![record(&s); 4]).await, Code::InvalidArgument, &["records", "4", "limit of 3"], "4 > 3");
    assert_clean(st.message(), "batch limit");
    let r = rewrap(&hub, vec![record(&s); 3]).await.expect("a batch of exactly the limit").into_inner();
    assert_eq!((r.sealed.len(), r.already_current), (3, 3));
    srv.stop().await;
}

/// A batch item whose header names a key version that does not exist is refused, and
/// the refusal names the item (as it does for every other per-item refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_names_the_item_with_an_unknown_key_version() {
    let _k = stable_keys();
    let srv = start("rewrap-unknown").await;
    let hub = srv.clients("hub").await;
    let a = seal_ok(&hub, person(), "a").await;
    let b = seal_ok(&hub, person_at("13900000005"), "b").await;
    let unknown = SealedBinding { sealed: flip(&b.sealed, 1, 7), blind_index: b.blind_index.clone() };
    let st = err_of(rewrap(&hub, vec![record(&a), unknown]).await, "unknown key version");
    assert_eq!(st.code(), Code::NotFound, "{:?}", st.message());
    assert!(st.message().contains("records"), "{:?}", st.message());
    assert!(st.message().contains("item 1"), "the refusal does not name the item: {:?}", st.message());
    srv.stop().await;
}

/// Invalid input is refused with INVALID_ARGUMENT naming the field, before any token
/// call: the audit lines of those calls list no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_names_the_field_and_never_reaches_the_token() {
    let _k = stable_keys();
    let srv = start("validation").await;
    let (hub, lookup) = (srv.clients("hub").await, srv.clients("lookup").await);

    let feb30 = resident_id("11010519900230002");
    let future = resident_id("11010520990101002");
    let before_1900 = resident_id("11010518991231002");
    let wrong_check = format!("{}1", &FEMALE_ID[..17]);
    let phone = |p: &'static str| person_with(move |b| b.phone = p.into());
    let account = |a: &'static str| person_with(move |b| b.account_number = a.into());
    let cases: Vec<(&str, Binding, &str)> = vec![
        ("10-digit CN", phone("1381234567"), "phone"),
        ("12-digit CN", phone("138123456789"), "phone"),
        ("+86 10 digits", phone("+86 1381234567"), "phone"),
        ("+86 12 digits", phone("+86 138123456789"), "phone"),
        ("+86 starting with 2", phone("+86 23812345678"), "phone"),
        ("+86 starting with 12", phone("+86 12012345678"), "phone"),
        ("bare 120", phone("12012345678"), "phone"),
        ("letters", phone("138abcd5678"), "phone"),
        ("letter after +86", phone("+86 138 1234 567a"), "phone"),
        ("16-digit E.164", phone("+4412345678901234"), "phone"),
        ("7-digit E.164", phone("+4412345"), "phone"),
        ("country code 0", phone("+0 415 555 2671"), "phone"),
        ("empty phone", phone(""), "phone"),
        ("bank code", person_with(|b| b.bank_code = "icbc".into()), "bank_code"),
        ("11-digit account", account("62220212345"), "account_number"),
        ("20-digit account", account("62220212345678901234"), "account_number"),
        ("letter in account", account("62220212345678901a"), "account_number"),
        ("state 0", person_with(|b| b.account_state = 0), "account_state"),
        ("state 99", person_with(|b| b.account_state = 99), "account_state"),
        ("state -1", person_with(|b| b.account_state = -1), "account_state"),
        ("no identity", person_with(|b| b.identity = None), "identity"),
        ("empty name", identity_with(|i| i.name = String::new()), "identity.name"),
        ("control in name", identity_with(|i| i.name = format!("{NAME}\n")), "identity.name"),
        ("sex 0", identity_with(|i| i.sex = 0), "identity.sex"),
        ("sex 7", identity_with(|i| i.sex = 7), "identity.sex"),
        ("Feb 30 birth date", identity_with(|i| i.birth_date = "1949-02-30".into()), "identity.birth_date"),
        ("slashed birth date", identity_with(|i| i.birth_date = "1949/12/31".into()), "identity.birth_date"),
        ("empty address", identity_with(|i| i.address = String::new()), "identity.address"),
        ("wrong check character", identity_with(|i| i.resident_id = wrong_check.clone()), "identity.resident_id"),
        ("Feb 30 in the ID", identity_with(|i| i.resident_id = feb30.clone()), "identity.resident_id"),
        ("future birth in the ID", identity_with(|i| i.resident_id = future.clone()), "identity.resident_id"),
        ("birth before 1900", identity_with(|i| i.resident_id = before_1900.clone()), "identity.resident_id"),
        ("17-character ID", identity_with(|i| i.resident_id = FEMALE_ID[..17].into()), "identity.resident_id"),
        ("sex not the ID's", identity_with(|i| i.sex = Sex::Male as i32), "identity.sex"),
        ("birth date not the ID's", identity_with(|i| i.birth_date = "1949-12-30".into()), "identity.birth_date"),
        ("month 13", identity_with(|i| i.id_valid_until = "2035-13-01".into()), "identity.id_valid_until"),
        ("forever", identity_with(|i| i.id_valid_until = "forever".into()), "identity.id_valid_until"),
        ("valid until before birth", identity_with(|i| i.id_valid_until = "1949-12-30".into()), "identity.id_valid_until"),
        ("empty office", identity_with(|i| i.issuing_office = String::new()), "identity.issuing_office"),
    ];
    let mut refused = 0;
    for (what, b, field) in cases {
        let st = expect_code(seal(&hub, b).await, Code::InvalidArgument, &[], what);
        assert!(st.message().starts_with(&format!("{field}: ")), "{what}: message {:?} does not name {field}", st.message());
        assert_clean(st.message(), what);
        refused += 1;
    }
    let st = expect_code(hub.binding.clone().seal_binding(SealBindingRequest { binding: None }).await, Code::InvalidArgument, &["binding"], "no binding");
    assert!(st.message().starts_with("binding: "), "{:?}", st.message());
    refused += 1;
    for p in ["1381234567", "138123456789", "+86 23812345678", "138abcd5678", "+4412345678901234", "", "x".repeat(65).as_str()] {
        for c in [&hub, &lookup] {
            let st = expect_code(index(c, p).await, Code::InvalidArgument, &[], &format!("BlindIndex {p:?}"));
            assert!(st.message().starts_with("phone: "), "BlindIndex {p:?}: {:?}", st.message());
            refused += 1;
        }
    }
    // A valid call uses both keys (the control).
    let ok = seal_ok(&hub, person(), "valid").await;
    let audit = srv.audit_dir.clone();
    srv.stop().await;

    let lines: Vec<_> = rpc_lines(&audit)
        .into_iter()
        .filter(|l| {
            let a = l["action"].as_str().unwrap_or_default().trim_start_matches('/');
            a == SEAL_RPC || a == INDEX_RPC
        })
        .collect();
    let bad: Vec<_> = lines.iter().filter(|l| l["code"] == "INVALID_ARGUMENT").collect();
    assert_eq!(bad.len(), refused, "one audit line per refused call");
    for l in &bad {
        assert_eq!(l["keys"], serde_json::json!([]), "a refused call used a key: {l}");
        assert_eq!(l["subjects"], serde_json::json!([]), "{l}");
        assert_eq!(l["outcome"], "error", "{l}");
    }
    let good: Vec<_> = lines.iter().filter(|l| l["code"] == "OK").collect();
    assert_eq!(good.len(), 1);
    assert_eq!(good[0]["keys"], serde_json::json!(["binding.index/v1", key_str(&ok.key)]));
    assert_eq!(good[0]["subjects"], serde_json::json!([hex::encode(&ok.blind_index)]));
}

/// lookup: BlindIndex only. service: masked OpenBinding only, never BlindIndex. A role
/// reaching both through a wildcard without `binding.open-full` is refused BlindIndex
/// at runtime; with the permission it gets both, in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_separate_lookup_masked_and_full() {
    let _k = stable_keys();
    let srv = start("roles").await;
    let (hub, lookup, service, admin) =
        (srv.clients("hub").await, srv.clients("lookup").await, srv.clients("service").await, srv.clients("admin").await);
    let s = seal_ok(&hub, person(), "person").await;

    // lookup
    assert_eq!(index_ok(&lookup, PHONE_E164).await, s.blind_index);
    expect_code(open(&lookup, &s.sealed, &s.blind_index).await, Code::PermissionDenied, &["lookup", "OpenBinding"], "lookup -> OpenBinding");
    expect_code(seal(&lookup, person()).await, Code::PermissionDenied, &["lookup", "SealBinding"], "lookup -> SealBinding");
    expect_code(rewrap(&lookup, vec![record(&s)]).await, Code::PermissionDenied, &["lookup"], "lookup -> RewrapBindings");

    // service
    let (m, _) = open_masked(&service, &s.sealed, &s.blind_index, "service").await;
    assert_eq!(m.phone, "138****5678");
    let st = expect_code(index(&service, PHONE_E164).await, Code::PermissionDenied, &["service"], "service -> BlindIndex");
    assert_clean(st.message(), "service -> BlindIndex");
    expect_code(seal(&service, person()).await, Code::PermissionDenied, &["service"], "service -> SealBinding");
    expect_code(rewrap(&service, vec![record(&s)]).await, Code::PermissionDenied, &["service"], "service -> RewrapBindings");

    // admin: rpcs "*" without binding.open-full: masked view, and so no blind index.
    let (m, _) = open_masked(&admin, &s.sealed, &s.blind_index, "admin").await;
    assert_eq!(m.account_number, "****0123");
    expect_code(index(&admin, PHONE_E164).await, Code::PermissionDenied, &["role admin", "masked", "blind index"], "admin -> BlindIndex");
    let audit = srv.audit_dir.clone();
    srv.stop().await;
    let idx = lines_of(&audit, INDEX_RPC);
    let denied: Vec<_> = idx.iter().filter(|l| l["code"] == "PERMISSION_DENIED").collect();
    assert_eq!(denied.len(), 2, "{idx:?}");
    for l in denied {
        assert_eq!((&l["outcome"], &l["keys"]), (&serde_json::json!("denied"), &serde_json::json!([])), "{l}");
    }

    // The same refusal for a masked-only role given the whole service by pattern (a
    // config the parser refuses, edited in after parsing): defence in depth.
    let srv = start_with("roles-pattern", |c| {
        edit_role(c, "lookup", |r| {
            r.rpcs = vec!["keyward.v1.BindingService/*".into()];
            r.keys = vec!["binding*".into()];
        })
    })
    .await;
    let (hub, lookup) = (srv.clients("hub").await, srv.clients("lookup").await);
    let s = seal_ok(&hub, person(), "person").await;
    expect_code(index(&lookup, PHONE_E164).await, Code::PermissionDenied, &["masked"], "BindingService/* -> BlindIndex");
    let (m, _) = open_masked(&lookup, &s.sealed, &s.blind_index, "BindingService/*").await;
    assert_eq!(m.name, "王**");
    srv.stop().await;

    // With binding.open-full, "*" gets the index and the full view.
    let srv = start_with("roles-full", |c| edit_role(c, "admin", |r| r.permissions.push("binding.open-full".into()))).await;
    let admin = srv.clients("admin").await;
    let s = seal_ok(&admin, person(), "admin seal").await;
    assert_eq!(index_ok(&admin, PHONE_BARE).await, s.blind_index);
    let (b, _) = open_full(&admin, &s.sealed, &s.blind_index, "admin with open-full").await;
    assert_eq!(b, person_full(PHONE_E164));
    srv.stop().await;
}

/// The config parser refuses a masked-only role that lists both OpenBinding and
/// BlindIndex or SealBinding (by name or by the service pattern), naming the role; it
/// accepts the same role with `binding.open-full`.
#[test]
fn config_refuses_masked_role_with_blind_index() {
    let path = &fixture().prepared.config;
    let text = std::fs::read_to_string(path).expect("read the prepared config");
    let base = path.parent().expect("the config's directory");
    assert!(Config::parse(&text, base).is_ok(), "the prepared config parses");
    let with_role = |rpcs: &str, permissions: &str| {
        format!("{text}\n[roles.peeker]\nrpcs = {rpcs}\nkeys = [\"binding\", \"binding.index\"]\npermissions = {permissions}\n")
    };
    let both = format!("[\"{INDEX_RPC}\", \"{OPEN_RPC}\"]");
    for rpcs in [both.as_str(), "[\"keyward.v1.BindingService/*\"]", &format!("[\"/{OPEN_RPC}\", \"keyward.v1.BindingService/*\"]")] {
        let errs = Config::parse(&with_role(rpcs, "[]"), base).err().unwrap_or_else(|| panic!("{rpcs}: accepted")).0;
        assert!(
            errs.iter().any(|e| e.starts_with("roles.peeker") && e.contains("BlindIndex") && e.contains("binding.open-full")),
            "{rpcs}: {errs:?}"
        );
        assert!(errs.iter().all(|e| e.starts_with("roles.peeker")), "{errs:?}");
        let c = Config::parse(&with_role(rpcs, "[\"binding.open-full\"]"), base).unwrap_or_else(|e| panic!("{rpcs} with open-full: {e}"));
        assert!(!c.roles["peeker"].sees_masked_bindings_only());
    }
    // SealBinding answers an index too.
    let seal_and_open = format!("[\"keyward.v1.BindingService/SealBinding\", \"{OPEN_RPC}\"]");
    let errs = Config::parse(&with_role(&seal_and_open, "[]"), base).err().map(|e| e.0).unwrap_or_default();
    assert!(errs.iter().any(|e| e.starts_with("roles.peeker") && e.contains("SealBinding")), "{errs:?}");
    // One of the two alone is fine.
    for rpcs in [format!("[\"{INDEX_RPC}\"]"), format!("[\"{OPEN_RPC}\"]")] {
        Config::parse(&with_role(&rpcs, "[]"), base).unwrap_or_else(|e| panic!("{rpcs}: {e}"));
    }
}

/// A client hammering a limited RPC costs at most a couple of audit lines per second:
/// the first refusal of each second has its own line, the rest one line with their
/// count, and the counts add up to every refusal the client got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_refusals_share_one_audit_line_per_second() {
    let _k = stable_keys();
    let limit = RateLimit { per_minute: 1, burst: 1 };
    let srv = start_with("rate-agg", |c| {
        edit_role(c, "lookup", |r| {
            r.rate_limits.insert(INDEX_RPC.into(), limit);
        });
    })
    .await;
    let lookup = srv.clients("lookup").await;
    index_ok(&lookup, PHONE_E164).await;
    let mut refused = 0u64;
    for _ in 0..300 {
        let st = index(&lookup, PHONE_E164).await.expect_err("over the limit");
        assert_eq!(st.code(), Code::ResourceExhausted, "{:?}", st.message());
        refused += 1;
    }
    let audit = srv.audit_dir.clone();
    srv.stop().await;
    let lines: Vec<_> = lines_of(&audit, INDEX_RPC).into_iter().filter(|l| l["code"] == "RESOURCE_EXHAUSTED").collect();
    let mut own = 0u64;
    let mut aggregated = 0u64;
    let mut agg_lines = 0u64;
    for l in &lines {
        assert_eq!(l["outcome"], "denied", "{l}");
        assert!(l["client"].as_str().unwrap_or_default().ends_with("/lookup"), "{l}");
        match l["detail"].as_str() {
            Some(d) => {
                let n: u64 = d.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("count in {d:?}"));
                assert!(d.contains("aggregated"), "{d}");
                aggregated += n;
                agg_lines += 1;
            }
            None => own += 1,
        }
    }
    assert_eq!(own + aggregated, refused, "every refusal is counted once: {lines:?}");
    assert!(agg_lines >= 1, "no aggregated line");
    assert!(own + agg_lines < refused / 4, "{} lines for {refused} refusals", own + agg_lines);
}

/// Per-client limits: the call after the burst is RESOURCE_EXHAUSTED and audited as
/// such; another client is unaffected. Unconfigured roles get the default limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_index_and_open_are_rate_limited_per_client() {
    let _k = stable_keys();
    // One call per minute refills the bucket: nothing comes back during the test.
    let limit = RateLimit { per_minute: 1, burst: 3 };
    let srv = start_with("rate", |c| {
        edit_role(c, "lookup", |r| {
            r.rate_limits.insert(INDEX_RPC.into(), limit);
        });
        edit_role(c, "service", |r| {
            r.rate_limits.insert(OPEN_RPC.into(), limit);
        });
    })
    .await;
    let (hub, lookup, service, admin) =
        (srv.clients("hub").await, srv.clients("lookup").await, srv.clients("service").await, srv.clients("admin").await);
    let s = seal_ok(&hub, person(), "person").await;

    for i in 0..3 {
        assert_eq!(index_ok(&lookup, PHONE_E164).await, s.blind_index, "lookup call {i}");
    }
    let st = expect_code(index(&lookup, PHONE_E164).await, Code::ResourceExhausted, &["lookup", "BlindIndex"], "4th BlindIndex");
    assert_clean(st.message(), "rate limit");
    expect_code(index(&lookup, "+8613900000001").await, Code::ResourceExhausted, &[], "5th BlindIndex, another number");
    for i in 0..10 {
        assert_eq!(index_ok(&hub, PHONE_E164).await, s.blind_index, "hub call {i} after lookup's refusal");
    }

    for i in 0..3 {
        open_masked(&service, &s.sealed, &s.blind_index, &format!("service call {i}")).await;
    }
    expect_code(open(&service, &s.sealed, &s.blind_index).await, Code::ResourceExhausted, &["service", "OpenBinding"], "4th OpenBinding");
    for i in 0..10 {
        open_full(&hub, &s.sealed, &s.blind_index, &format!("hub open {i}")).await;
    }

    // admin ("*", no rate_limits entry): the default burst of 10 applies.
    for i in 0..10 {
        open_masked(&admin, &s.sealed, &s.blind_index, &format!("admin open {i}")).await;
    }
    let mut admin_refused = false;
    for _ in 0..20 {
        if let Err(st) = open(&admin, &s.sealed, &s.blind_index).await {
            assert_eq!(st.code(), Code::ResourceExhausted, "{:?}", st.message());
            admin_refused = true;
            break;
        }
    }
    assert!(admin_refused, "OpenBinding is limited for a role without a rate_limits entry");

    let audit = srv.audit_dir.clone();
    srv.stop().await;
    for (rpc, who, n) in [(INDEX_RPC, "lookup", 2), (OPEN_RPC, "service", 1), (OPEN_RPC, "admin", 1)] {
        let lines = lines_of(&audit, rpc);
        let by = |l: &serde_json::Value, who: &str| l["client"].as_str().unwrap_or_default().ends_with(&format!("/{who}"));
        let exhausted: Vec<_> = lines.iter().filter(|l| l["code"] == "RESOURCE_EXHAUSTED" && by(l, who)).collect();
        assert_eq!(exhausted.len(), n, "{who} {rpc}: {lines:?}");
        for l in exhausted {
            assert_eq!((&l["outcome"], &l["keys"]), (&serde_json::json!("denied"), &serde_json::json!([])), "{l}");
        }
        assert!(!lines.iter().any(|l| l["code"] == "RESOURCE_EXHAUSTED" && by(l, "hub")), "the hub was never limited");
    }
}

/// After seals, index look-ups, full and masked opens and refusals, no phone number (in
/// any form), account number, ID number or name is anywhere in the audit directory;
/// the trail names records by blind index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_trail_holds_no_clear_text() {
    let _k = stable_keys();
    let srv = start("clear-text").await;
    let (hub, lookup, service) = (srv.clients("hub").await, srv.clients("lookup").await, srv.clients("service").await);
    let hsm = srv.hsm.clone();

    let s = seal_ok(&hub, person(), "person").await;
    let s2 = seal_ok(&hub, identity_with(|i| i.resident_id = FEMALE_ID.to_lowercase()), "lower-case x").await;
    for form in [PHONE_E164, PHONE_BARE, PHONE_SPACED, "0086 138 1234 5678"] {
        assert_eq!(index_ok(&lookup, form).await, s.blind_index);
    }
    open_full(&hub, &s.sealed, &s.blind_index, "full").await;
    open_masked(&service, &s2.sealed, &s2.blind_index, "masked").await;
    // Refusals carrying the same clear text.
    expect_code(seal(&hub, identity_with(|i| i.resident_id = format!("{}1", &FEMALE_ID[..17]))).await, Code::InvalidArgument, &[], "bad ID");
    expect_code(seal(&hub, person_with(|b| b.account_number.push('9'))).await, Code::InvalidArgument, &[], "long account");
    expect_code(seal(&hub, identity_with(|i| i.sex = Sex::Male as i32)).await, Code::InvalidArgument, &[], "sex");
    expect_code(index(&service, PHONE_E164).await, Code::PermissionDenied, &[], "service index");
    expect_code(index(&lookup, &format!("{PHONE_BARE}0")).await, Code::InvalidArgument, &[], "12 digits");
    expect_code(open(&hub, &flip(&s.sealed, 20, 0), &s.blind_index).await, Code::InvalidArgument, &[], "tampered");
    expect_code(open(&hub, &s.sealed, &s2.blind_index[..31]).await, Code::InvalidArgument, &[], "short index");
    expect_code(open(&lookup, &s.sealed, &s.blind_index).await, Code::PermissionDenied, &[], "lookup open");
    rewrap(&hub, vec![record(&s), record(&s2)]).await.expect("rewrap");

    let audit = srv.audit_dir.clone();
    srv.stop().await;
    verify_trail(&audit, &hsm);
    let text = all_files_text(&audit);
    assert!(text.contains("BindingService/OpenBinding"), "the trail holds the calls");
    assert_clean(&text, "audit directory");
    for l in audit_lines(&audit) {
        assert_clean(&l.to_string(), "audit line (unescaped)");
    }

    let hex_index = hex::encode(&s.blind_index);
    let opens = lines_of(&audit, OPEN_RPC);
    let ok: Vec<_> = opens.iter().filter(|l| l["code"] == "OK").collect();
    assert_eq!(ok.len(), 2, "{opens:?}");
    for l in &ok {
        assert_eq!(l["subjects"], serde_json::json!([hex_index]), "OpenBinding names the record by blind index: {l}");
    }
    let details: Vec<_> = ok.iter().map(|l| l["detail"].as_str().unwrap_or_default()).collect();
    assert_eq!(details, ["view=full", "view=masked"]);
    let tampered = opens.iter().find(|l| l["code"] == "INVALID_ARGUMENT" && l["keys"] != serde_json::json!([])).expect("the tampered open");
    assert_eq!(tampered["subjects"], serde_json::json!([hex_index]));
    for l in lines_of(&audit, SEAL_RPC).iter().chain(&lines_of(&audit, INDEX_RPC)).filter(|l| l["code"] == "OK") {
        assert_eq!(l["subjects"], serde_json::json!([hex_index]), "{l}");
    }
}

/// A masked-view role may not compute blind indexes by any RPC: SealBinding answers the
/// blind index of a phone of the caller's choosing, so a masked-view role that may
/// also seal (admin: rpcs "*", no `binding.open-full`) could unmask `138****5678` in
/// 10^4 seals by comparing indexes with the row's. Such a seal must be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_role_gets_no_blind_index_from_seal_binding() {
    let _k = stable_keys();
    let srv = start("seal-oracle").await;
    let (hub, admin) = (srv.clients("hub").await, srv.clients("admin").await);
    let row = seal_ok(&hub, person(), "the hub's row").await;
    let (m, _) = open_masked(&admin, &row.sealed, &row.blind_index, "admin").await;
    assert_eq!(m.phone, "138****5678", "admin sees the masked view");
    expect_code(index(&admin, PHONE_E164).await, Code::PermissionDenied, &["masked"], "admin -> BlindIndex");
    // One candidate of the 10^4 the mask leaves open, in a made-up binding.
    let candidate = person_at(&format!("138{}5678", "1234"));
    match seal(&admin, candidate).await {
        Err(st) => assert_eq!(st.code(), Code::PermissionDenied, "{:?}", st.message()),
        Ok(r) => panic!(
            "SealBinding gave role admin (masked view only) the blind index of a phone of its choosing \
             (equal to the row's: {}): a blind-index oracle that unmasks the number",
            r.into_inner().blind_index == row.blind_index
        ),
    }
    srv.stop().await;
}

/// A batch larger than one token job (100 records) is re-sealed in several jobs and
/// still all or nothing: a bad record in the second job names its own position and
/// no record comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrap_of_more_than_one_token_job() {
    let _k = changing_keys();
    let srv = start("rewrap-jobs").await;
    let (hub, admin) = (srv.clients("hub").await, srv.clients("admin").await);
    let mut sealed = Vec::new();
    for i in 0..150u32 {
        sealed.push(seal_ok(&hub, person_at(&format!("+86139100{i:05}")), "seal").await);
    }
    let v_new = rotate_binding(&admin).await;
    let mut batch: Vec<SealedBinding> = sealed.iter().map(record).collect();
    let good = batch.clone();
    batch[120].blind_index = flip(&batch[120].blind_index, 0, 0);
    let st = rewrap(&hub, batch).await.expect_err("a bad record fails the batch");
    assert_eq!(st.code(), Code::InvalidArgument, "{:?}", st.message());
    assert!(st.message().contains("item 120"), "{:?}", st.message());
    let r = rewrap(&hub, good.clone()).await.expect("RewrapBindings").into_inner();
    assert_eq!((r.sealed.len(), r.already_current), (150, 0));
    for (i, (s, rec)) in r.sealed.iter().zip(&good).enumerate().step_by(37) {
        assert_eq!(header_version(s), v_new, "item {i}");
        open_full(&hub, s, &rec.blind_index, &format!("item {i}")).await;
    }
    srv.stop().await;
}
