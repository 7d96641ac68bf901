//! Demo step: e-cash. A wallet's device key is certified, a voucher of 500.00 issued,
//! three offline payments made at a merchant terminal that checks each one with
//! nothing but the trust bundle, a fourth refused by the wallet, then the three
//! uploaded and verified in one VerifyPayments call.

use crate::unix_now as now;

use super::{step, DemoError, Prepared};
use crate::client::{self, ClientTls, Clients};
use crate::ecash::{DeviceCertificate, PublicKey, Signed, Terminal, Voucher, Wallet, WalletError};
use crate::proto::{
    CertifyDeviceRequest, IssueVoucherRequest, OfflineLimits, PaymentVerdict, TrustBundleRequest, VerifyPaymentsRequest,
};


fn yuan(minor: u64) -> String {
    format!("{}.{:02}", minor / 100, minor % 100)
}

fn err(what: &str, e: impl std::fmt::Display) -> DemoError {
    DemoError::Step(format!("{what}: {e}"))
}

/// The `ecash.root` public key as the terminal vendor receives it: the PEM that
/// `keyward ceremony export-public ecash.root` prints.
fn root_key(p: &Prepared) -> Result<(u32, PublicKey), DemoError> {
    let c = super::open_ceremony(p)?;
    let version = c
        .list()
        .iter()
        .filter(|m| m.name == "ecash.root" && m.state == crate::hsm::KeyState::Active)
        .map(|m| m.version)
        .max()
        .ok_or_else(|| DemoError::Step("no active ecash.root key".into()))?;
    let pem = c.export_public("ecash.root", version)?;
    c.close()?;
    Ok((version, PublicKey::from_pem(pem.as_bytes()).map_err(|e| err("ecash.root PEM", e))?))
}

pub(super) async fn ecash_flows(addr: &str, p: &Prepared) -> Result<(), DemoError> {
    step(9, "e-cash: device certificate, voucher, offline payments at a terminal, batch verification");
    let ecash = Clients::new(client::connect(addr, &ClientTls::dev(&p.pki, "ecash")).await?);

    let mut wallet = Wallet::new().map_err(|e| err("wallet", e))?;
    let request = wallet.certification_request(b"hub-account-0042", now()).map_err(|e| err("wallet", e))?;
    let cert = ecash
        .voucher
        .clone()
        .certify_device(CertifyDeviceRequest {
            certification_request: request.encode(),
            limits: Some(OfflineLimits { max_balance: 100_000, max_single_payment: 30_000, max_consecutive_offline: 5 }),
            validity_seconds: 0,
        })
        .await?
        .into_inner();
    let certificate = Signed::<DeviceCertificate>::decode(&cert.certificate).map_err(|e| err("certificate", e))?;
    wallet.install_certificate(certificate).map_err(|e| err("wallet", e))?;
    let k = cert.key.unwrap_or_default();
    println!(
        "CertifyDevice: device {} certified by {}/v{} (proof of possession checked), {} bytes, limits: balance 1000.00, single 300.00, 5 offline",
        hex::encode(&wallet.device_id()[..4]),
        k.name,
        k.version,
        cert.certificate.len()
    );

    let v = ecash
        .voucher
        .clone()
        .issue_voucher(IssueVoucherRequest {
            certificate: cert.certificate.clone(),
            currency: "CNY".into(),
            balance: 50_000,
            counter_at_issue: wallet.counter(),
            validity_seconds: 0,
        })
        .await?
        .into_inner();
    let voucher = Signed::<Voucher>::decode(&v.voucher).map_err(|e| err("voucher", e))?;
    wallet.load_voucher(voucher).map_err(|e| err("wallet", e))?;
    let k = v.key.unwrap_or_default();
    println!("IssueVoucher: CNY {} signed by {}/v{}, loaded into the wallet", yuan(wallet.balance()), k.name, k.version);

    let bundle = ecash.voucher.clone().trust_bundle(TrustBundleRequest {}).await?.into_inner();
    let mut terminal = Terminal::new("T-0001", "M-COFFEE-17", vec![root_key(p)?]).map_err(|e| err("terminal", e))?;
    let version = terminal.update_bundle(&bundle.bundle).map_err(|e| err("trust bundle", e))?;
    println!(
        "TrustBundle: version {version}, {} bytes, verified by the terminal offline with the exported ecash.root key",
        bundle.bundle.len()
    );

    let mut uploads = Vec::new();
    for amount in [12_000u64, 8_050, 19_950] {
        let challenge = terminal.challenge(now()).map_err(|e| err("terminal", e))?;
        let presented = wallet
            .pay(&challenge, amount, terminal.merchant_id(), terminal.terminal_id())
            .map_err(|e| err("wallet", e))?;
        terminal
            .verify_with_held_bundle(&challenge, amount, &presented)
            .map_err(|v| err("terminal refused a good payment", v))?;
        println!(
            "offline payment {}: CNY {} at {} (challenge {}…), verified offline; wallet balance CNY {}",
            presented.payment.body.counter,
            yuan(amount),
            terminal.merchant_id(),
            hex::encode(&challenge.bytes[..4]),
            yuan(wallet.balance())
        );
        uploads.push(presented.encode());
    }
    let challenge = terminal.challenge(now()).map_err(|e| err("terminal", e))?;
    match wallet.pay(&challenge, 15_000, terminal.merchant_id(), terminal.terminal_id()) {
        Err(WalletError::InsufficientBalance) => {
            println!("fourth payment of CNY 150.00: refused by the wallet (balance CNY {})", yuan(wallet.balance()))
        }
        other => return Err(DemoError::Step(format!("a payment beyond the balance was not refused: {other:?}"))),
    }

    let r = ecash.voucher.clone().verify_payments(VerifyPaymentsRequest { payments: uploads }).await?.into_inner();
    let names: Vec<&str> = r
        .verdicts
        .iter()
        .map(|v| PaymentVerdict::try_from(*v).map(|v| v.as_str_name().trim_start_matches("PAYMENT_VERDICT_")).unwrap_or("?"))
        .collect();
    println!("VerifyPayments (the uploaded log, one call): {}", names.join(", "));
    if r.valid != 3 {
        return Err(DemoError::Step(format!("VerifyPayments: {} of 3 valid", r.valid)));
    }
    Ok(())
}
