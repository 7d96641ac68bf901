//! Demo step: bindings. The hub seals a phone-to-account binding, a lookup front end
//! finds its row by blind index, the hub opens it in full and customer service in the
//! masked view; `binding` is rotated and the record re-sealed, its index unchanged.
//! [`demo_binding`] is also the benchmark's record.

use tonic::Code;

use super::{expect_refused, step, DemoError, Prepared, DEMO_BANK_ACCOUNT, DEMO_PHONE};
use crate::client::{self, ClientTls, Clients};
use crate::proto::{
    open_binding_response::View, AccountState, Binding, BlindIndexRequest, Identity, OpenBindingRequest, ReloadKeysRequest,
    RewrapBindingsRequest, SealBindingRequest, SealedBinding, Sex,
};

pub(crate) fn demo_binding() -> Binding {
    Binding {
        phone: DEMO_PHONE.into(),
        bank_code: "BANKA001".into(),
        account_number: DEMO_BANK_ACCOUNT.into(),
        account_state: AccountState::Normal as i32,
        identity: Some(Identity {
            name: "王秀英".into(),
            sex: Sex::Female as i32,
            birth_date: "1949-12-31".into(),
            address: "北京市朝阳区建国路88号".into(),
            resident_id: "11010519491231002X".into(),
            id_valid_until: "long-term".into(),
            issuing_office: "北京市公安局朝阳分局".into(),
        }),
    }
}

pub(super) async fn binding_flows(addr: &str, p: &Prepared) -> Result<(), DemoError> {
    step(10, "bindings: phone number to bank account, sealed, found by blind index, opened full and masked, rewrapped");
    let connect = |who: &'static str| async move { client::connect(addr, &ClientTls::dev(&p.pki, who)).await.map(Clients::new) };
    let (hub, lookup, service, admin) = (connect("hub").await?, connect("lookup").await?, connect("service").await?, connect("admin").await?);

    let sealed = hub.binding.clone().seal_binding(SealBindingRequest { binding: Some(demo_binding()) }).await?.into_inner();
    let k = sealed.key.clone().unwrap_or_default();
    println!(
        "SealBinding (hub): {} bytes under {}/v{}, blind index {}…; the hub stores the row under the index, no phone number",
        sealed.sealed.len(),
        k.name,
        k.version,
        hex::encode(sealed.blind_index.get(..6).unwrap_or_default())
    );
    let found = lookup.binding.clone().blind_index(BlindIndexRequest { phone: "138 1234 5678".into() }).await?.into_inner();
    if found.blind_index != sealed.blind_index {
        return Err(DemoError::Step("BlindIndex of the same number (typed nationally) differs".into()));
    }
    println!("BlindIndex (lookup, number typed as \"138 1234 5678\"): the same index, row found");

    let open = |sealed: Vec<u8>, index: Vec<u8>| OpenBindingRequest { sealed, blind_index: index };
    let full = hub.binding.clone().open_binding(open(sealed.sealed.clone(), sealed.blind_index.clone())).await?.into_inner();
    match full.view {
        Some(View::Full(b)) if b.account_number == DEMO_BANK_ACCOUNT && b.phone == DEMO_PHONE => {
            println!("OpenBinding (hub, binding.open-full): every field back, account state {:?}", AccountState::try_from(b.account_state).unwrap_or_default());
        }
        _ => return Err(DemoError::Step("the hub's OpenBinding did not return the full record".into())),
    }
    let masked = service.binding.clone().open_binding(open(sealed.sealed.clone(), sealed.blind_index.clone())).await?.into_inner();
    match masked.view {
        Some(View::Masked(m)) => println!("OpenBinding (customer service): phone {}, account {}, name {}", m.phone, m.account_number, m.name),
        _ => return Err(DemoError::Step("customer service got more than the masked view".into())),
    }
    expect_refused(
        service.binding.clone().blind_index(BlindIndexRequest { phone: DEMO_PHONE.into() }).await,
        Code::PermissionDenied,
        "customer service -> BlindIndex",
    )?;
    expect_refused(
        lookup.binding.clone().open_binding(open(sealed.sealed.clone(), sealed.blind_index.clone())).await,
        Code::PermissionDenied,
        "lookup -> OpenBinding",
    )?;
    let mut other_row = sealed.blind_index.clone();
    other_row[0] ^= 1;
    expect_refused(
        hub.binding.clone().open_binding(open(sealed.sealed.clone(), other_row)).await,
        Code::InvalidArgument,
        "hub -> OpenBinding with another row's index",
    )?;

    let c = super::open_ceremony(p)?;
    let meta = c.rotate("binding")?;
    c.close()?;
    admin.admin.clone().reload_keys(ReloadKeysRequest {}).await?;
    println!("ceremony rotate binding -> {} active; the appliance reloads its catalogue", meta.key_ref());
    let rewrap = hub
        .binding
        .clone()
        .rewrap_bindings(RewrapBindingsRequest {
            records: vec![SealedBinding { sealed: sealed.sealed.clone(), blind_index: sealed.blind_index.clone() }],
        })
        .await?
        .into_inner();
    let k = rewrap.key.clone().unwrap_or_default();
    let resealed = rewrap.sealed.first().cloned().ok_or_else(|| DemoError::Step("RewrapBindings returned nothing".into()))?;
    println!("RewrapBindings (hub): 1 record re-sealed under {}/v{} inside the appliance ({} already current)", k.name, k.version, rewrap.already_current);
    let again = hub.binding.clone().open_binding(open(resealed, sealed.blind_index.clone())).await?.into_inner();
    let v = again.key.unwrap_or_default();
    if v.version != meta.version || !matches!(again.view, Some(View::Full(_))) {
        return Err(DemoError::Step("the re-sealed record does not open under the new version".into()));
    }
    println!("OpenBinding of the re-sealed record: opens under {}/v{}, blind index unchanged", v.name, v.version);
    Ok(())
}
