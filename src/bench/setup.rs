//! Set-up of the e-cash and binding benchmarks (not timed): certified simulated
//! wallets and their offline payments, sealed bindings, records under an older key.

use std::sync::atomic::{AtomicUsize, Ordering};
use crate::unix_now as now;

use tonic::transport::Channel;

use super::{status_text, BenchError, Plan};
use crate::client::{self, ClientTls, Clients};
use crate::ecash::{Challenge, Wallet};
use crate::proto::binding_service_client::BindingServiceClient;
use crate::proto::voucher_service_client::VoucherServiceClient;
use crate::proto::{
    Binding, CertifyDeviceRequest, IssueVoucherRequest, OfflineLimits, OpenBindingRequest, ReloadKeysRequest,
    RewrapBindingsRequest, SealBindingRequest, SealedBinding,
};

/// Items per VerifyPayments and RewrapBindings request.
pub const BATCH: usize = 100;
/// Payments per second the pre-made supply is sized for (about 1.1 KB each; at most
/// 4,000 devices, 440 MB): beyond it batches repeat, and the report says so.
const PAYMENTS_PER_SECOND: f64 = 30_000.0;

fn failed(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Failed(format!("{what}: {e}"))
}


/// The benchmark's binding record (the demo's).
pub fn bench_binding() -> Binding {
    crate::demo::binding::demo_binding()
}

/// A new simulated wallet, certified, with a voucher request ready for it.
async fn certified_wallet(client: &mut VoucherServiceClient<Channel>) -> Result<(Wallet, IssueVoucherRequest), BenchError> {
    let mut wallet = Wallet::new().map_err(|e| failed("wallet", e))?;
    let request = wallet.certification_request(b"bench-account", now()).map_err(|e| failed("wallet", e))?;
    let cert = client
        .certify_device(CertifyDeviceRequest {
            certification_request: request.encode(),
            limits: Some(OfflineLimits {
                max_balance: 1_000_000_000,
                max_single_payment: 1_000_000,
                max_consecutive_offline: BATCH as u32,
            }),
            validity_seconds: 0,
        })
        .await
        .map_err(|s| failed("CertifyDevice", status_text(s)))?
        .into_inner();
    let decoded = crate::ecash::Signed::decode(&cert.certificate).map_err(|e| failed("certificate", e))?;
    wallet.install_certificate(decoded).map_err(|e| failed("wallet", e))?;
    let req = IssueVoucherRequest {
        certificate: cert.certificate,
        currency: "CNY".into(),
        balance: 100_000_000,
        counter_at_issue: wallet.counter(),
        validity_seconds: 0,
    };
    Ok((wallet, req))
}

/// The request voucher-issue repeats: one certified device.
pub async fn voucher_request(mut client: VoucherServiceClient<Channel>) -> Result<IssueVoucherRequest, BenchError> {
    Ok(certified_wallet(&mut client).await?.1)
}

/// Pre-made VerifyPayments batches, each one device's chain of [`BATCH`] payments.
pub struct Batches {
    items: Vec<Vec<Vec<u8>>>,
    next: AtomicUsize,
}

impl Batches {
    /// The next batch and how many of its payments are valid (all).
    pub fn next(&self) -> (Vec<Vec<u8>>, usize) {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let b = self.items.get(i % self.items.len().max(1)).cloned().unwrap_or_default();
        let n = b.len();
        (b, n)
    }

    /// Says so when the supply ran out and batches were sent again (their signature
    /// checks then hit the appliance's memo, so the figure flatters).
    pub fn report_reuse(&self) {
        let sent = self.next.load(Ordering::Relaxed);
        if sent > self.items.len() {
            eprintln!(
                "bench: verify-payments: note: {} batches sent, {} made: {} were repeats",
                sent,
                self.items.len(),
                sent - self.items.len()
            );
        }
    }
}

/// Certifies devices, issues each a voucher and has each pay [`BATCH`] times offline,
/// enough for the planned run at about [`PAYMENTS_PER_SECOND`].
pub async fn payment_batches(mut client: VoucherServiceClient<Channel>, plan: &Plan) -> Result<Batches, BenchError> {
    let seconds = (plan.warmup + plan.duration).as_secs_f64();
    let devices = ((seconds * PAYMENTS_PER_SECOND / BATCH as f64).ceil() as usize).clamp(10, 4_000);
    eprintln!("bench: verify-payments: {devices} devices pay {BATCH} times each offline first (not measured)");
    let mut wallets = Vec::with_capacity(devices);
    for _ in 0..devices {
        let (mut wallet, req) = certified_wallet(&mut client).await?;
        let v = client.issue_voucher(req).await.map_err(|s| failed("IssueVoucher", status_text(s)))?.into_inner();
        let voucher = crate::ecash::Signed::decode(&v.voucher).map_err(|e| failed("voucher", e))?;
        wallet.load_voucher(voucher).map_err(|e| failed("wallet", e))?;
        wallets.push(wallet);
    }
    // The wallets' signing is CPU work: spread it over blocking threads.
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4);
    let per = wallets.len().div_ceil(threads);
    let mut tasks = Vec::new();
    while !wallets.is_empty() {
        let part: Vec<Wallet> = wallets.drain(..per.min(wallets.len())).collect();
        tasks.push(tokio::task::spawn_blocking(move || {
            let t = now();
            let mut out = Vec::with_capacity(part.len());
            for mut w in part {
                let mut batch = Vec::with_capacity(BATCH);
                for i in 0..BATCH {
                    let mut bytes = [0u8; 16];
                    openssl::rand::rand_bytes(&mut bytes).map_err(|e| e.to_string())?;
                    let challenge = Challenge { bytes, terminal_time: t };
                    let p = w
                        .pay(&challenge, 100 + i as u64, "M-BENCH", "T-BENCH")
                        .map_err(|e| e.to_string())?;
                    batch.push(p.encode());
                }
                out.push(batch);
            }
            Ok::<_, String>(out)
        }));
    }
    let mut items = Vec::with_capacity(devices);
    for t in tasks {
        items.extend(t.await.map_err(|e| failed("payments", e))?.map_err(|e| failed("payments", e))?);
    }
    Ok(Batches { items, next: AtomicUsize::new(0) })
}

/// One sealed binding and its index, to open over and over.
pub async fn open_request(mut client: BindingServiceClient<Channel>) -> Result<OpenBindingRequest, BenchError> {
    let s = client
        .seal_binding(SealBindingRequest { binding: Some(bench_binding()) })
        .await
        .map_err(|s| failed("SealBinding", status_text(s)))?
        .into_inner();
    Ok(OpenBindingRequest { sealed: s.sealed, blind_index: s.blind_index })
}

/// [`BATCH`] records sealed under the current `binding` version, which the ceremony
/// then rotates (and the appliance reloads): every rewrap re-seals all of them.
pub async fn rewrap_request(
    mut client: BindingServiceClient<Channel>,
    addr: &str,
    state: &crate::demo::Prepared,
) -> Result<RewrapBindingsRequest, BenchError> {
    let mut records = Vec::with_capacity(BATCH);
    for i in 0..BATCH {
        let mut b = bench_binding();
        b.phone = format!("+86138000{i:05}");
        let s = client
            .seal_binding(SealBindingRequest { binding: Some(b) })
            .await
            .map_err(|s| failed("SealBinding", status_text(s)))?
            .into_inner();
        records.push(SealedBinding { sealed: s.sealed, blind_index: s.blind_index });
    }
    let c = crate::demo::open_ceremony(state).map_err(|e| failed("ceremony", e))?;
    let meta = c.rotate("binding").map_err(|e| failed("ceremony rotate binding", e))?;
    c.close().map_err(|e| failed("ceremony", e))?;
    let admin = Clients::new(
        client::connect(addr, &ClientTls::dev(&state.pki, "admin")).await.map_err(|e| failed("connect as admin", e))?,
    );
    admin.admin.clone().reload_keys(ReloadKeysRequest {}).await.map_err(|s| failed("ReloadKeys", status_text(s)))?;
    eprintln!("bench: rewrap: {BATCH} records sealed, then `binding` rotated to {} (not measured)", meta.key_ref());
    Ok(RewrapBindingsRequest { records })
}
