//! `keyward bench`: a load generator that drives the appliance over mTLS gRPC (Ping,
//! DataService Encrypt/Decrypt, PinService translation and verification, MacService,
//! OtpService)
//! or, for the ceiling, the same AES-GCM operations in-process straight on the token;
//! prints throughput and latency percentiles.
//!
//! Every operation runs `--concurrency` tokio tasks, each with its own histogram
//! (microseconds), for `--warmup` (not measured) then `--duration` seconds; the
//! histograms are merged at the end. With `--spawn` the bench prepares a fresh state
//! directory exactly like `keyward demo`, starts `keyward serve` as a child process on a
//! free loopback port, measures, and stops it again.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use zeroize::Zeroizing;
use tonic::transport::Channel;

use crate::appliance::admin_service::MAX_PING_PAYLOAD;
use crate::client::{self, ClientTls};
use crate::config::Config;
use crate::hsm::{Hsm, KeyClass, KeyEntry};
pub mod echo;
mod setup;
mod soak;

use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::binding_service_client::BindingServiceClient;
use crate::proto::voucher_service_client::VoucherServiceClient;
use crate::proto::data_service_client::DataServiceClient;
use crate::proto::mac_service_client::MacServiceClient;
use crate::proto::otp_service_client::OtpServiceClient;
use crate::proto::pin_service_client::PinServiceClient;
use crate::proto::{
    account, pin_source, Account as AccountMsg, DecryptRequest, Dukpt, EncryptRequest, EncryptedPin,
    ExportTerminalKeyRequest, GenerateMacRequest, GeneratePinVerificationDataRequest, PinBlockFormat, PinSource,
    PinVerificationMethod, PingRequest, TranslatePinRequest, VerifyPinRequest, ZoneKey, CodeVerdict, EnrollTotpRequest,
    IssueCodeRequest, TransactionContext, VerifyCodeRequest, VerifyTotpRequest, IssueVoucherRequest,
    VerifyPaymentsRequest, SealBindingRequest, OpenBindingRequest, BlindIndexRequest, RewrapBindingsRequest,
};
use crate::sim::terminal::Terminal;

/// Largest `--payload`.
const MAX_PAYLOAD: usize = 1 << 20;
/// Largest `--concurrency`.
const MAX_CONCURRENCY: usize = 10_000;
/// Largest `--connections`.
const MAX_CONNECTIONS: usize = 1_000;
/// Longest `--duration` / `--warmup` (seconds).
const MAX_DURATION_S: f64 = 86_400.0;
const MAX_WARMUP_S: f64 = 3_600.0;
/// Histogram range: 1 µs .. 60 s (the client's own request timeout is 30 s).
const HIST_MAX_US: u64 = 60_000_000;
/// How long `--spawn` waits for the appliance to accept TLS connections.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a SIGTERM'd appliance gets to stop before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Associated data of every benchmark encryption.
const BENCH_AAD: &[u8] = b"keyward-bench/aad";

const EXAMPLES: &str = "\
Examples:
  # One command on a laptop/CI: fresh token + PKI, appliance as a child process,
  # the three headline rows (network ping, network encrypt, in-process ceiling):
  keyward bench --spawn --op ping,encrypt,raw-encrypt --concurrency 64 --duration 10

  # Against a running appliance (dev-pki layout, client certificate `bench`):
  keyward bench --addr 127.0.0.1:50051 --pki state/pki --op encrypt,decrypt --payload 1024

  # Explicit certificates, JSON rows:
  keyward bench --addr 10.0.0.5:50051 --ca ca.crt --cert bench.crt --key-file bench.key --json

  # PIN and MAC services (need --spawn: the bench keys its simulated DUKPT terminals
  # with a transport key it imports through the ceremony):
  keyward bench --spawn --op ping,translate-zone,translate-dukpt,verify-pin,mac --concurrency 64

  # Dynamic codes (otp-verify issues its challenges first, unmeasured):
  keyward bench --spawn --op ping,otp-issue,otp-verify,totp-verify --concurrency 64

  # E-cash and bindings (verify-payments and rewrap send batches of 100; rewrap needs
  # --spawn: it rotates `binding` once through the ceremony first):
  keyward bench --spawn --op ping,voucher-issue,verify-payments --concurrency 64
  keyward bench --spawn --op ping,seal,open,blind-index,rewrap --concurrency 64

  # Straight on the token (SOFTHSM2_CONF as for `keyward serve`):
  keyward bench --raw --config state/appliance.toml --op encrypt,decrypt

Ordering with --spawn: network operations run while the child appliance runs; raw
operations run in-process against the same token files AFTER the child has stopped
(never two processes on the token at once). Rows are printed in --op order.

Columns: requests = OK responses in the measured window; errors = non-OK statuses
(the first one is printed to stderr); req/s = OK responses per second; latencies are
per request, client-side, over OK responses. Exit status: 0 done with no failed request,
1 failure (including any failed request: the table is printed first), 2 usage.";

/// One operation the bench can drive.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// AdminService.Ping with a --payload byte echo (mTLS, auth, audit; no token).
    Ping,
    /// The same Ping against a bare tonic server on the same TLS front door and limits,
    /// without authorisation, audit or token: what gRPC over mTLS costs (needs --spawn;
    /// run after the appliance has stopped).
    EchoBaseline,
    /// DataService.Encrypt of --payload bytes under --key.
    Encrypt,
    /// DataService.Decrypt of one ciphertext of --payload bytes (encrypted once first).
    Decrypt,
    /// PinService.TranslatePin zone to zone: one TDES format-0 block (zpk.switch) to
    /// AES format 4 (zpk.bank-a), same account.
    TranslateZone,
    /// PinService.TranslatePin from AES DUKPT terminals (one per worker, a new KSN each
    /// call, format 4) to zpk.bank-a with the account changed from phone to bank account.
    TranslateDukpt,
    /// PinService.VerifyPin of a zpk.bank-a block against keyward-HMAC verification data.
    VerifyPin,
    /// MacService.GenerateMac, AES-CMAC under mac.switch over --payload bytes.
    Mac,
    /// OtpService.IssueCode, a payment code bound to a transaction, in clear.
    OtpIssue,
    /// OtpService.VerifyCode of codes issued beforehand (not timed), each verified once
    /// (past 150,000 a request issues its own challenge first).
    OtpVerify,
    /// OtpService.VerifyTotp with the current code of an enrolled seed (unwrapped seed cached in the token).
    TotpVerify,
    /// VoucherService.IssueVoucher for one certified device (signed in the token).
    VoucherIssue,
    /// VoucherService.VerifyPayments, batches of 100 offline payments (one device's
    /// chain each, made beforehand by simulated wallets, not timed).
    VerifyPayments,
    /// BindingService.SealBinding of one phone-to-account binding.
    Seal,
    /// BindingService.OpenBinding of a sealed binding (full view).
    Open,
    /// BindingService.BlindIndex of a phone number.
    BlindIndex,
    /// BindingService.RewrapBindings, batches of 100 records under the previous
    /// `binding` version (needs --spawn: the bench rotates `binding` once first).
    Rewrap,
    /// AES-GCM encryption in-process on the token: no gRPC, TLS or audit (the ceiling).
    RawEncrypt,
    /// AES-GCM decryption in-process on the token.
    RawDecrypt,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::EchoBaseline => "echo-baseline",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::TranslateZone => "translate-zone",
            Op::TranslateDukpt => "translate-dukpt",
            Op::VerifyPin => "verify-pin",
            Op::Mac => "mac",
            Op::OtpIssue => "otp-issue",
            Op::OtpVerify => "otp-verify",
            Op::TotpVerify => "totp-verify",
            Op::VoucherIssue => "voucher-issue",
            Op::VerifyPayments => "verify-payments",
            Op::Seal => "seal",
            Op::Open => "open",
            Op::BlindIndex => "blind-index",
            Op::Rewrap => "rewrap",
            Op::RawEncrypt => "raw-encrypt",
            Op::RawDecrypt => "raw-decrypt",
        }
    }

    /// Operations that need the bench's own terminal transport key (--spawn).
    fn is_pin(self) -> bool {
        matches!(self, Op::TranslateZone | Op::TranslateDukpt | Op::VerifyPin)
    }

    fn is_raw(self) -> bool {
        matches!(self, Op::RawEncrypt | Op::RawDecrypt)
    }

    /// `--raw`: the in-process variant of an operation.
    fn to_raw(self) -> Result<Op, BenchError> {
        match self {
            Op::Ping => Err(BenchError::Usage(
                "--raw ping: there is no in-process ping (ping measures the network path only); drop --raw or the ping op"
                    .into(),
            )),
            Op::Encrypt | Op::RawEncrypt => Ok(Op::RawEncrypt),
            Op::Decrypt | Op::RawDecrypt => Ok(Op::RawDecrypt),
            other => Err(BenchError::Usage(format!("--raw {}: only encrypt and decrypt have in-process variants", other.name()))),
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(after_help = EXAMPLES)]
pub struct BenchArgs {
    /// Operation(s), comma-separated, run one after the other; one table row each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ping", help_heading = "Workload")]
    pub op: Vec<Op>,
    /// Requests in flight (tokio tasks, each issuing one request after the other), 1-10000.
    #[arg(long, default_value_t = 64, help_heading = "Workload")]
    pub concurrency: usize,
    /// HTTP/2 connections (channels) to the appliance; the workers are spread over them.
    #[arg(long, default_value_t = 2, help_heading = "Workload")]
    pub connections: usize,
    /// Measured seconds per operation (fractions allowed, e.g. 2.5).
    #[arg(long, default_value_t = 10.0, help_heading = "Workload")]
    pub duration: f64,
    /// Seconds of load before measuring starts (not counted), per operation.
    #[arg(long, default_value_t = 1.0, help_heading = "Workload")]
    pub warmup: f64,
    /// Plaintext bytes for encrypt/decrypt, echo bytes for ping (at most 1 MiB; ping 64 KiB).
    #[arg(long, default_value_t = 64, help_heading = "Workload")]
    pub payload: usize,
    /// Key name for encrypt/decrypt (an active class D0 AES key the client may use).
    #[arg(long, default_value = "data", help_heading = "Workload")]
    pub key: String,
    /// Print one JSON object per row on stdout instead of the table.
    #[arg(long, help_heading = "Workload")]
    pub json: bool,
    /// Soak instead of a benchmark: every network operation in one mix for this long
    /// ("10m", "90s", "1h"), at --rate requests/s in all, the appliance's RSS, open
    /// descriptors and threads sampled every --sample-every seconds, its audit trail
    /// verified at the end; fails on any failed request. Needs --spawn.
    #[arg(long, requires = "spawn", help_heading = "Soak")]
    pub soak: Option<String>,
    /// Requests per second offered in all during a soak (use about half of the
    /// measured maximum).
    #[arg(long, default_value_t = 1000, requires = "soak", help_heading = "Soak")]
    pub rate: u32,
    /// Seconds between samples of the appliance process during a soak.
    #[arg(long, default_value_t = 10, requires = "soak", help_heading = "Soak")]
    pub sample_every: u64,

    /// Appliance address HOST:PORT (a running appliance; not with --spawn).
    #[arg(long, conflicts_with = "spawn", help_heading = "Target")]
    pub addr: Option<String>,
    /// CA certificate (PEM) that signed the server certificate.
    #[arg(long, requires_all = ["cert", "key_file"], conflicts_with_all = ["pki", "spawn"], help_heading = "Target")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, requires_all = ["ca", "key_file"], help_heading = "Target")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires_all = ["ca", "cert"], help_heading = "Target")]
    pub key_file: Option<PathBuf>,
    /// dev-pki directory (DIR/ca.crt, DIR/clients/NAME.{crt,key}) instead of --ca/--cert/--key-file.
    #[arg(long, conflicts_with = "spawn", help_heading = "Target")]
    pub pki: Option<PathBuf>,
    /// Client name in the dev-pki directory (with --pki or --spawn).
    #[arg(long, default_value = "bench", help_heading = "Target")]
    pub client: String,
    /// Name the server certificate must carry.
    #[arg(long, default_value = "localhost", help_heading = "Target")]
    pub server_name: String,

    /// Prepare a fresh state directory like `keyward demo` (token, PKI, `ceremony init`)
    /// and run the appliance as a child process on a free loopback port for the network
    /// ops; raw ops then run in-process after the child stopped.
    #[arg(long, help_heading = "Spawned appliance")]
    pub spawn: bool,
    /// State directory for --spawn; wiped first (default: $TMPDIR/keyward-bench).
    #[arg(long, requires = "spawn", help_heading = "Spawned appliance")]
    pub state: Option<PathBuf>,
    /// Sets `hsm.recycle_after_objects` of the spawned appliance: the session objects
    /// after which it re-initialises the PKCS#11 module (default: the appliance's own).
    /// The child logs at warn; KEYWARD_LOG=info shows each re-initialisation.
    #[arg(long, requires = "spawn", value_name = "N", help_heading = "Spawned appliance")]
    pub recycle_after: Option<u64>,
    /// Appliance config template for --spawn.
    #[arg(long, default_value = "pkcs11-config/appliance.toml", help_heading = "Spawned appliance")]
    pub config_template: PathBuf,
    /// Key profile for --spawn's `ceremony init`.
    #[arg(long, default_value = "pkcs11-config/key-profile.toml", help_heading = "Spawned appliance")]
    pub profile: PathBuf,

    /// Run the operations in-process straight on the token (encrypt -> raw-encrypt,
    /// decrypt -> raw-decrypt): no gRPC, TLS or audit.
    #[arg(long, help_heading = "In-process (raw)")]
    pub raw: bool,
    /// Appliance config whose [hsm] section opens the token for raw ops (not with
    /// --spawn). SOFTHSM2_CONF is taken from the environment, else from
    /// softhsm2.conf next to the config.
    #[arg(long, conflicts_with = "spawn", help_heading = "In-process (raw)")]
    pub config: Option<PathBuf>,
}

#[derive(Debug)]
enum BenchError {
    /// Bad arguments: exit 2.
    Usage(String),
    /// Anything that went wrong while running: exit 1.
    Failed(String),
}

fn failed(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |e| BenchError::Failed(format!("{what}: {e}"))
}

/// Validated workload settings.
#[derive(Debug, Clone)]
struct Plan {
    ops: Vec<Op>,
    concurrency: usize,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    payload: usize,
    key: String,
    json: bool,
}

fn secs(name: &str, v: f64, min_exclusive: bool, max: f64) -> Result<Duration, BenchError> {
    let ok = v.is_finite() && (if min_exclusive { v > 0.0 } else { v >= 0.0 }) && v <= max;
    if !ok {
        let lower = if min_exclusive { "> 0" } else { ">= 0" };
        return Err(BenchError::Usage(format!("--{name} {v}: must be {lower} and at most {max} seconds")));
    }
    Duration::try_from_secs_f64(v).map_err(|e| BenchError::Usage(format!("--{name} {v}: {e}")))
}

fn plan(args: &BenchArgs) -> Result<Plan, BenchError> {
    if args.op.is_empty() {
        return Err(BenchError::Usage("--op: name at least one operation".into()));
    }
    let ops = if args.raw {
        args.op.iter().map(|o| o.to_raw()).collect::<Result<Vec<_>, _>>()?
    } else {
        args.op.clone()
    };
    if !(1..=MAX_CONCURRENCY).contains(&args.concurrency) {
        return Err(BenchError::Usage(format!("--concurrency {}: must be 1-{MAX_CONCURRENCY}", args.concurrency)));
    }
    if !(1..=MAX_CONNECTIONS).contains(&args.connections) {
        return Err(BenchError::Usage(format!("--connections {}: must be 1-{MAX_CONNECTIONS}", args.connections)));
    }
    let duration = secs("duration", args.duration, true, MAX_DURATION_S)?;
    let warmup = secs("warmup", args.warmup, false, MAX_WARMUP_S)?;
    if args.payload > MAX_PAYLOAD {
        return Err(BenchError::Usage(format!("--payload {}: at most {MAX_PAYLOAD} bytes (1 MiB)", args.payload)));
    }
    if ops.contains(&Op::EchoBaseline) && !args.spawn {
        return Err(BenchError::Usage("--op echo-baseline needs --spawn (the bench starts the echo server itself)".into()));
    }
    if (ops.contains(&Op::Ping) || ops.contains(&Op::EchoBaseline)) && args.payload > MAX_PING_PAYLOAD {
        return Err(BenchError::Usage(format!(
            "--payload {}: the appliance echoes at most {MAX_PING_PAYLOAD} bytes in a ping; run ping with a smaller payload",
            args.payload
        )));
    }
    if ops.iter().any(|o| !matches!(o, Op::Ping | Op::EchoBaseline)) {
        crate::hsm::validate_name(&args.key).map_err(|m| BenchError::Usage(format!("--key {:?}: {m}", args.key)))?;
    }
    let network = ops.iter().any(|o| !o.is_raw());
    let raw = ops.iter().any(|o| o.is_raw());
    if network && !args.spawn {
        if args.addr.is_none() {
            return Err(BenchError::Usage(
                "network operations need a target: --addr HOST:PORT with --pki DIR or --ca/--cert/--key-file, or --spawn".into(),
            ));
        }
        if args.pki.is_none() && args.ca.is_none() {
            return Err(BenchError::Usage(
                "--addr needs client credentials: --pki DIR [--client NAME], or --ca, --cert and --key-file".into(),
            ));
        }
    }
    if let Some(op) = ops.iter().find(|o| o.is_pin()) {
        if !args.spawn {
            return Err(BenchError::Usage(format!(
                "{}: PIN operations need --spawn (the bench keys its simulated terminals with a transport key it imports itself)",
                op.name()
            )));
        }
    }
    if raw && !args.spawn && args.config.is_none() {
        return Err(BenchError::Usage("raw operations need the token: --config FILE (an appliance config), or --spawn".into()));
    }
    Ok(Plan {
        ops,
        concurrency: args.concurrency,
        connections: args.connections.min(args.concurrency),
        warmup,
        duration,
        payload: args.payload,
        key: args.key.clone(),
        json: args.json,
    })
}

/// `keyward bench`.
pub fn main(args: BenchArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(BenchError::Usage(m)) => {
            eprintln!("keyward bench: {m}");
            ExitCode::from(2)
        }
        Err(BenchError::Failed(m)) => {
            eprintln!("keyward bench: {m}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: BenchArgs) -> Result<(), BenchError> {
    let plan = plan(&args)?;
    if let Some(d) = &args.soak {
        return run_soak(&args, &plan, d);
    }
    let network: Vec<(usize, Op)> = plan.ops.iter().copied().enumerate().filter(|(_, o)| !o.is_raw()).collect();
    let raw: Vec<(usize, Op)> = plan.ops.iter().copied().enumerate().filter(|(_, o)| o.is_raw()).collect();

    // Everything that touches the process environment (prepare() sets SOFTHSM2_CONF)
    // happens before the runtime's threads exist.
    let spawned = if args.spawn { Some(prepare_state(&args)?) } else { None };
    let raw_config = match (&spawned, &args.config) {
        (Some((p, _, _)), _) => Some(p.config.clone()),
        (None, Some(c)) => {
            default_softhsm_conf(c);
            Some(c.clone())
        }
        (None, None) => None,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Failed(format!("cannot start the runtime: {e}")))?;
    let mut rows: Vec<Option<Row>> = plan.ops.iter().map(|_| None).collect();

    if !network.is_empty() {
        let results = match &spawned {
            Some((p, listen, tmk)) => {
                let mut child = start_child(p)?;
                let addr = listen.clone();
                let tls = ClientTls::dev(&p.pki, &args.client);
                let pin = PinSetup { tmk: tmk.clone(), pki: p.pki.clone(), state: p.clone() };
                let r = rt.block_on(async {
                    wait_ready(&addr, &tls, &mut child).await?;
                    run_network(&plan, &network, &addr, &tls, Some(&pin)).await
                });
                let stopping = Instant::now();
                let stopped = child.stop();
                let mut results = r?;
                match stopped {
                    Ok(status) if status.success() => {
                        eprintln!("bench: appliance stopped {:.2} s after SIGTERM", stopping.elapsed().as_secs_f64())
                    }
                    Ok(status) => eprintln!("bench: note: the appliance exited with {status}"),
                    Err(e) => eprintln!("bench: note: {e}"),
                }
                // The echo baseline runs alone, after the appliance has gone.
                if let Some(i) = plan.ops.iter().position(|o| *o == Op::EchoBaseline) {
                    results.push((i, rt.block_on(run_echo(&plan, p, &tls))?));
                }
                results
            }
            None => {
                let addr = args.addr.clone().ok_or_else(|| BenchError::Usage("--addr is required".into()))?;
                let tls = match (&args.pki, &args.ca) {
                    (Some(pki), _) => {
                        let mut t = ClientTls::dev(pki, &args.client);
                        t.server_name = args.server_name.clone();
                        t
                    }
                    (None, Some(ca)) => ClientTls {
                        ca: ca.clone(),
                        cert: args.cert.clone(),
                        key: args.key_file.clone(),
                        server_name: args.server_name.clone(),
                    },
                    (None, None) => return Err(BenchError::Usage("--addr needs --pki or --ca/--cert/--key-file".into())),
                };
                rt.block_on(run_network(&plan, &network, &addr, &tls, None))?
            }
        };
        for (i, row) in results {
            rows[i] = Some(row);
        }
    }

    if !raw.is_empty() {
        let path = raw_config.ok_or_else(|| BenchError::Usage("raw operations need --config FILE or --spawn".into()))?;
        let config = Config::load(&path).map_err(|e| BenchError::Usage(format!("{}: {e}", path.display())))?;
        eprintln!("bench: opening the token {:?} in-process for {}", config.hsm.token_label, names(&raw));
        let hsm = crate::appliance::server::open_hsm(&config).map_err(|e| BenchError::Failed(format!("token: {e}")))?;
        let sessions = config.hsm.sessions;
        for (i, op) in raw {
            let row = rt.block_on(run_raw(&plan, op, &hsm, sessions))?;
            rows[i] = Some(row);
        }
    }

    let rows: Vec<Row> = rows.into_iter().flatten().collect();
    let mut out = std::io::stdout().lock();
    report(&rows, plan.json, &mut out).map_err(|e| BenchError::Failed(format!("writing the report: {e}")))?;
    let errors: u64 = rows.iter().map(|r| r.errors).sum();
    if errors > 0 {
        return Err(BenchError::Failed(format!("{errors} request(s) failed (first error above)")));
    }
    Ok(())
}

/// `--soak`: the mix against a spawned appliance, then the trail verified.
fn run_soak(args: &BenchArgs, plan: &Plan, duration: &str) -> Result<(), BenchError> {
    let duration = soak::parse_duration(duration).map_err(|e| BenchError::Usage(format!("--soak {e}")))?;
    if !(1..=1_000_000).contains(&args.rate) {
        return Err(BenchError::Usage(format!("--rate {}: must be 1-1000000", args.rate)));
    }
    if !(1..=3600).contains(&args.sample_every) {
        return Err(BenchError::Usage(format!("--sample-every {}: must be 1-3600", args.sample_every)));
    }
    let (p, addr, tmk) = prepare_state(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BenchError::Failed(format!("cannot start the runtime: {e}")))?;
    let mut child = start_child(&p)?;
    let pid = child.child.as_ref().map(std::process::Child::id).unwrap_or(0);
    let tls = ClientTls::dev(&p.pki, &args.client);
    let pin = PinSetup { tmk, pki: p.pki.clone(), state: p.clone() };
    eprintln!(
        "bench: soak: {} operations mixed, {} req/s for {:.0} s, sampling every {} s",
        soak::SOAK_OPS.len(),
        args.rate,
        duration.as_secs_f64(),
        args.sample_every
    );
    let report = rt.block_on(async {
        wait_ready(&addr, &tls, &mut child).await?;
        let settings = soak::SoakSettings { duration, rate: args.rate, every: Duration::from_secs(args.sample_every) };
        soak::run(plan, &addr, &tls, Some(&pin), pid, settings).await
    });
    let stopped = child.stop();
    let report = report?;
    let mut out = std::io::stdout().lock();
    report.print(&mut out).map_err(|e| BenchError::Failed(format!("writing the report: {e}")))?;
    match stopped {
        Ok(status) if status.success() => {}
        Ok(status) => return Err(BenchError::Failed(format!("the appliance exited with {status}"))),
        Err(e) => return Err(BenchError::Failed(e)),
    }
    // The trail the soak wrote must verify, with the token's keys.
    let exe = std::env::current_exe().map_err(|e| BenchError::Failed(format!("locating the keyward binary: {e}")))?;
    let audit_dir = Config::load(&p.config).map_err(|e| BenchError::Failed(e.to_string()))?.audit.dir;
    let verified = Command::new(&exe)
        .args(["audit", "verify"])
        .arg(&audit_dir)
        .arg("--config")
        .arg(&p.config)
        .envs(&p.exports)
        .env("KEYWARD_LOG", child_log())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BenchError::Failed(format!("keyward audit verify: {e}")))?;
    let said = String::from_utf8_lossy(&verified.stdout);
    let _ = std::io::Write::write_fmt(&mut out, format_args!("audit verify: {}\n", said.lines().last().unwrap_or("").trim()));
    if !verified.status.success() {
        return Err(BenchError::Failed(format!("the audit trail does not verify: {}", String::from_utf8_lossy(&verified.stderr).trim())));
    }
    if report.errors() > 0 {
        return Err(BenchError::Failed(format!("{} request(s) failed during the soak (first error above)", report.errors())));
    }
    Ok(())
}

/// An error with its sources ("connect: transport error: tcp connect error: Connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

fn names(ops: &[(usize, Op)]) -> String {
    ops.iter().map(|(_, o)| o.name()).collect::<Vec<_>>().join(",")
}

/// For `--config` without SOFTHSM2_CONF: the demo/bench layout keeps softhsm2.conf
/// next to appliance.toml.
fn default_softhsm_conf(config: &Path) {
    if std::env::var_os("SOFTHSM2_CONF").is_some() {
        return;
    }
    let candidate = config.parent().unwrap_or_else(|| Path::new(".")).join("softhsm2.conf");
    if candidate.is_file() {
        eprintln!("bench: SOFTHSM2_CONF not set; using {}", candidate.display());
        std::env::set_var("SOFTHSM2_CONF", &candidate);
    }
}

// ------------------------------------------------------------------ spawned appliance

/// Fresh state directory (same safety check as the demo) with the appliance config
/// listening on a free loopback port; returns it with that address.
fn prepare_state(args: &BenchArgs) -> Result<(crate::demo::Prepared, String, Zeroizing<Vec<u8>>), BenchError> {
    let dir = args.state.clone().unwrap_or_else(|| std::env::temp_dir().join("keyward-bench"));
    if dir.exists() {
        let io = |e: std::io::Error| BenchError::Failed(format!("{}: {e}", dir.display()));
        if !dir.is_dir() {
            return Err(BenchError::Usage(format!("--state {}: exists and is not a directory", dir.display())));
        }
        if !dir.join("appliance.toml").exists() && std::fs::read_dir(&dir).map_err(io)?.next().is_some() {
            return Err(BenchError::Usage(format!(
                "{} exists and is not a keyward state directory: not wiping it",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(&dir).map_err(io)?;
    }
    // The config of prepare() would listen on port 0; pick the port here so the child's
    // address is known. (Another process could take it in between: then the child
    // fails to bind and the bench says so.)
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Failed(format!("finding a free loopback port: {e}")))?;
    let listen = format!("127.0.0.1:{port}");
    eprintln!("bench: preparing {} (token, PKI, ceremony init)", dir.display());
    let p = crate::demo::prepare(&dir, &args.config_template, &listen).map_err(|e| BenchError::Failed(format!("prepare: {e}")))?;
    crate::demo::ceremony_init(&p, &args.profile).map_err(|e| BenchError::Failed(format!("ceremony init: {e}")))?;
    // otp-verify issues its challenges before measuring: a bigger attempt store.
    let io = |e: std::io::Error| BenchError::Failed(format!("{}: {e}", p.config.display()));
    let text = std::fs::read_to_string(&p.config).map_err(io)?;
    let text = text
        .lines()
        .map(|l| if l.trim_start().starts_with("max_open_challenges") { format!("max_open_challenges = {BENCH_OPEN_CHALLENGES}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    let text = match args.recycle_after {
        Some(n) => text.replacen("[hsm]\n", &format!("[hsm]\nrecycle_after_objects = {n}\n"), 1),
        None => text,
    };
    std::fs::write(&p.config, text + "\n").map_err(io)?;
    let tmk = crate::demo::load_transport_key(&p, "tmk.terminals")
        .map_err(|e| BenchError::Failed(format!("terminal transport key: {e}")))?;
    Ok((p, listen, tmk))
}

/// The log filter of child processes: KEYWARD_LOG when set, else warn.
fn child_log() -> String {
    std::env::var("KEYWARD_LOG").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| "warn".into())
}

/// The appliance child process; killed on drop if still running.
struct ChildGuard {
    child: Option<Child>,
}

fn start_child(p: &crate::demo::Prepared) -> Result<ChildGuard, BenchError> {
    let exe = std::env::current_exe().map_err(|e| BenchError::Failed(format!("locating the keyward binary: {e}")))?;
    let mut cmd = Command::new(&exe);
    cmd.arg("serve")
        .arg("--config")
        .arg(&p.config)
        .envs(&p.exports)
        .env("KEYWARD_LOG", child_log())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().map_err(|e| BenchError::Failed(format!("starting {} serve: {e}", exe.display())))?;
    eprintln!("bench: appliance started (pid {})", child.id());
    Ok(ChildGuard { child: Some(child) })
}

impl ChildGuard {
    fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(e.to_string()),
            _ => None,
        }
    }

    /// SIGTERM (graceful: in-flight calls finish, final audit checkpoint), then up to
    /// STOP_TIMEOUT for the child to exit; killed after that.
    fn stop(&mut self) -> Result<ExitStatus, String> {
        let Some(mut child) = self.child.take() else {
            return Err("the appliance was already stopped".into());
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status);
        }
        let pid = child.id().to_string();
        let sent = Command::new("kill").arg("-TERM").arg(&pid).stdout(Stdio::null()).stderr(Stdio::null()).status();
        if !matches!(sent, Ok(s) if s.success()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("could not send SIGTERM to the appliance (pid {pid}); killed it"));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("the appliance (pid {pid}) did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed it"));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("waiting for the appliance (pid {pid}): {e}; killed it"));
                }
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the echo baseline server as a child on a free port and drives Ping at it.
async fn run_echo(plan: &Plan, p: &crate::demo::Prepared, tls: &ClientTls) -> Result<Row, BenchError> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Failed(format!("finding a free loopback port: {e}")))?;
    let addr = format!("127.0.0.1:{port}");
    let exe = std::env::current_exe().map_err(|e| BenchError::Failed(format!("locating the keyward binary: {e}")))?;
    let child = Command::new(&exe)
        .arg("bench-echo")
        .arg("--config")
        .arg(&p.config)
        .arg("--listen")
        .arg(&addr)
        .envs(&p.exports)
        .env("KEYWARD_LOG", child_log())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::Failed(format!("starting {} bench-echo: {e}", exe.display())))?;
    eprintln!("bench: echo baseline server started (pid {})", child.id());
    let mut child = ChildGuard { child: Some(child) };
    wait_ready(&addr, tls, &mut child).await?;
    let channels = connect_all(plan, &addr, tls).await?;
    // The same targets as ping's, at another address.
    let (targets, _) = targets_for(plan, Op::Ping, &channels, &addr, None).await?;
    let row = drive(plan, Op::EchoBaseline, targets, Some(channels.len()), None).await;
    if let Err(e) = child.stop() {
        eprintln!("bench: note: echo baseline server: {e}");
    }
    row
}

/// Retries a TLS connection until the child accepts one (or exits, or READY_TIMEOUT).
async fn wait_ready(addr: &str, tls: &ClientTls, child: &mut ChildGuard) -> Result<(), BenchError> {
    let started = Instant::now();
    let mut last: String;
    loop {
        if let Some(status) = child.exited() {
            return Err(BenchError::Failed(format!("the appliance exited during start-up ({status})")));
        }
        match tokio::time::timeout(Duration::from_secs(2), client::connect(addr, tls)).await {
            Ok(Ok(_channel)) => {
                eprintln!("bench: server accepting mTLS on {addr} after {:.1} s", started.elapsed().as_secs_f64());
                return Ok(());
            }
            Ok(Err(e)) => last = chain(&e),
            Err(_) => last = "TLS connect timed out".into(),
        }
        if started.elapsed() >= READY_TIMEOUT {
            return Err(BenchError::Failed(format!(
                "the appliance did not accept TLS connections on {addr} within {READY_TIMEOUT:?} (last: {last})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ the load

/// What one worker calls, over and over.
enum Target {
    Ping { client: AdminServiceClient<Channel>, req: PingRequest },
    Encrypt { client: DataServiceClient<Channel>, req: EncryptRequest },
    Decrypt { client: DataServiceClient<Channel>, req: DecryptRequest },
    Translate { client: PinServiceClient<Channel>, req: TranslatePinRequest },
    TranslateDukpt { client: PinServiceClient<Channel>, terminal: Box<Terminal> },
    VerifyPin { client: PinServiceClient<Channel>, req: VerifyPinRequest },
    Mac { client: MacServiceClient<Channel>, req: GenerateMacRequest },
    OtpIssue { client: OtpServiceClient<Channel>, req: IssueCodeRequest },
    OtpVerify { client: OtpServiceClient<Channel>, issued: Vec<(Vec<u8>, String)> },
    TotpVerify { client: OtpServiceClient<Channel>, seed: Zeroizing<Vec<u8>>, blob: Vec<u8> },
    RawEncrypt { hsm: Hsm, key: Arc<KeyEntry>, plaintext: Vec<u8> },
    RawDecrypt { hsm: Hsm, key: Arc<KeyEntry>, iv: [u8; 12], ciphertext: Vec<u8> },
    VoucherIssue { client: VoucherServiceClient<Channel>, req: IssueVoucherRequest },
    VerifyPayments { client: VoucherServiceClient<Channel>, batches: Arc<setup::Batches> },
    Seal { client: BindingServiceClient<Channel>, req: SealBindingRequest },
    Open { client: BindingServiceClient<Channel>, req: OpenBindingRequest },
    BlindIndex { client: BindingServiceClient<Channel>, req: BlindIndexRequest },
    Rewrap { client: BindingServiceClient<Channel>, req: RewrapBindingsRequest },
}

fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Target {
    async fn call(&mut self) -> Result<(), String> {
        match self {
            Target::Ping { client, req } => client.ping(req.clone()).await.map(drop).map_err(status_text),
            Target::Encrypt { client, req } => client.encrypt(req.clone()).await.map(drop).map_err(status_text),
            Target::Decrypt { client, req } => client.decrypt(req.clone()).await.map(drop).map_err(status_text),
            Target::Translate { client, req } => client.translate_pin(req.clone()).await.map(drop).map_err(status_text),
            Target::TranslateDukpt { client, terminal } => {
                let req = dukpt_translation(terminal).map_err(|e| e.to_string())?;
                client.translate_pin(req).await.map(drop).map_err(status_text)
            }
            Target::VerifyPin { client, req } => match client.verify_pin(req.clone()).await {
                Ok(r) if r.get_ref().matched => Ok(()),
                Ok(_) => Err("the right PIN did not verify".into()),
                Err(s) => Err(status_text(s)),
            },
            Target::Mac { client, req } => client.generate_mac(req.clone()).await.map(drop).map_err(status_text),
            Target::OtpIssue { client, req } => client.issue_code(req.clone()).await.map(drop).map_err(status_text),
            Target::OtpVerify { client, issued } => {
                let (challenge, code) = match issued.pop() {
                    Some(c) => c,
                    // Out of pre-issued challenges: this request issues its own (timed).
                    None => {
                        let r = client.issue_code(otp_issue_request(2)).await.map_err(status_text)?.into_inner();
                        (r.challenge, r.code)
                    }
                };
                let r = client.verify_code(otp_verify_request(challenge, code)).await.map_err(status_text)?;
                if r.get_ref().verdict == CodeVerdict::Valid as i32 {
                    Ok(())
                } else {
                    Err(format!("verdict {} for a fresh code", r.get_ref().verdict))
                }
            }
            Target::TotpVerify { client, seed, blob } => {
                let now = crate::unix_now();
                let code = totp_now(seed, now)?;
                let req = VerifyTotpRequest {
                    seed_blob: blob.clone(),
                    subject: BENCH_SUBJECT.into(),
                    code: code.to_string(),
                    last_step: 0,
                    time: now,
                    window: 1,
                };
                match client.verify_totp(req).await {
                    Ok(r) if r.get_ref().valid => Ok(()),
                    Ok(_) => Err("the current TOTP code did not verify".into()),
                    Err(s) => Err(status_text(s)),
                }
            }
            Target::VoucherIssue { client, req } => client.issue_voucher(req.clone()).await.map(drop).map_err(status_text),
            Target::VerifyPayments { client, batches } => {
                let (payments, expected) = batches.next();
                match client.verify_payments(VerifyPaymentsRequest { payments }).await {
                    Ok(r) if r.get_ref().valid as usize == expected => Ok(()),
                    Ok(r) => Err(format!("{} of {expected} payments valid", r.get_ref().valid)),
                    Err(s) => Err(status_text(s)),
                }
            }
            Target::Seal { client, req } => client.seal_binding(req.clone()).await.map(drop).map_err(status_text),
            Target::Open { client, req } => client.open_binding(req.clone()).await.map(drop).map_err(status_text),
            Target::BlindIndex { client, req } => client.blind_index(req.clone()).await.map(drop).map_err(status_text),
            Target::Rewrap { client, req } => match client.rewrap_bindings(req.clone()).await {
                Ok(r) if r.get_ref().already_current == 0 => Ok(()),
                Ok(_) => Err("records came back as already current".into()),
                Err(s) => Err(status_text(s)),
            },
            Target::RawEncrypt { hsm, key, plaintext } => hsm
                .gcm_encrypt(key, BENCH_AAD.to_vec(), plaintext.clone())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Target::RawDecrypt { hsm, key, iv, ciphertext } => hsm
                .gcm_decrypt(key, *iv, BENCH_AAD.to_vec(), ciphertext.clone())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        }
    }
}

/// What one worker measured.
struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    /// Completion of the last measured request.
    last: Option<Instant>,
}

fn new_hist() -> Result<Histogram<u64>, String> {
    Histogram::<u64>::new_with_bounds(1, HIST_MAX_US, 3).map_err(|e| format!("histogram: {e}"))
}

/// Issues requests until `until`; records those started at or after `measure_from`.
async fn worker(
    mut target: Target,
    measure_from: Instant,
    until: Instant,
    first_error: Arc<AtomicBool>,
    op: Op,
) -> Result<Tally, String> {
    let mut t = Tally { hist: new_hist()?, ok: 0, errors: 0, last: None };
    loop {
        let start = Instant::now();
        if start >= until {
            break;
        }
        let r = target.call().await;
        let done = Instant::now();
        if start >= measure_from {
            match &r {
                Ok(()) => {
                    let us = u64::try_from(done.duration_since(start).as_micros()).unwrap_or(u64::MAX);
                    t.hist.saturating_record(us.max(1));
                    t.ok += 1;
                }
                Err(_) => t.errors += 1,
            }
            t.last = Some(done);
        }
        if let Err(e) = r {
            if !first_error.swap(true, Ordering::Relaxed) {
                eprintln!("bench: {}: first error: {e}", op.name());
            }
        }
    }
    Ok(t)
}

/// One table row.
struct Row {
    op: Op,
    concurrency: usize,
    /// `None` for raw ops.
    connections: Option<usize>,
    /// Token sessions bounding raw ops (the config's hsm.sessions).
    sessions: Option<usize>,
    payload: usize,
    requests: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

impl Row {
    fn rps(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.requests as f64 / s
        } else {
            0.0
        }
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }

    /// A latency cell: "-" when nothing succeeded.
    fn cell(&self, us: u64) -> String {
        pad(&if self.hist.is_empty() { "-".to_string() } else { fmt_latency(us) }, 8)
    }
}

/// Runs `concurrency` workers made by `make(i)` for warmup + duration; merges.
async fn drive(
    plan: &Plan,
    op: Op,
    targets: Vec<Target>,
    connections: Option<usize>,
    sessions: Option<usize>,
) -> Result<Row, BenchError> {
    let via = match (connections, sessions) {
        (Some(c), _) => format!("on {c} connection(s)"),
        (None, Some(s)) => format!("in-process, {s} token session(s)"),
        (None, None) => "in-process".into(),
    };
    eprintln!(
        "bench: {}: {} workers {via}, payload {} B, warmup {:.1} s, measuring {:.1} s",
        op.name(),
        plan.concurrency,
        plan.payload,
        plan.warmup.as_secs_f64(),
        plan.duration.as_secs_f64()
    );
    let started = Instant::now();
    let measure_from = started + plan.warmup;
    let until = measure_from + plan.duration;
    let first_error = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(plan.concurrency);
    for target in targets {
        tasks.push(tokio::spawn(worker(target, measure_from, until, Arc::clone(&first_error), op)));
    }
    let mut hist = new_hist().map_err(BenchError::Failed)?;
    let (mut ok, mut errors, mut last) = (0u64, 0u64, None::<Instant>);
    for task in tasks {
        let t = task
            .await
            .map_err(|e| BenchError::Failed(format!("{}: worker task: {e}", op.name())))?
            .map_err(BenchError::Failed)?;
        hist.add(&t.hist).map_err(|e| BenchError::Failed(format!("merging histograms: {e:?}")))?;
        ok += t.ok;
        errors += t.errors;
        last = last.max(t.last);
    }
    // The window runs from the end of the warmup to the last measured completion
    // (requests in flight at the deadline finish; none start after it).
    let elapsed = last.map(|l| l.saturating_duration_since(measure_from)).filter(|d| !d.is_zero()).unwrap_or(plan.duration);
    Ok(Row { op, concurrency: plan.concurrency, connections, sessions, payload: plan.payload, requests: ok, errors, elapsed, hist })
}

fn payload_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

const BENCH_SUBJECT: &str = "acct-bench-0001";

fn otp_context() -> TransactionContext {
    TransactionContext { amount_minor: 10_000, currency: "CNY".into(), payee_id: "merchant-42".into(), reference: "T-bench".into() }
}

/// `lifetime`: otp-issue's challenges are never verified and live 1 s, so the
/// appliance's store can evict them; otp-verify's must outlive the run.
fn otp_issue_request(lifetime: u32) -> IssueCodeRequest {
    IssueCodeRequest {
        subject: BENCH_SUBJECT.into(),
        purpose: "payment".into(),
        context: Some(otp_context()),
        lifetime_seconds: lifetime,
        digits: 6,
        sealed_for: String::new(),
    }
}

fn otp_verify_request(challenge: Vec<u8>, code: String) -> VerifyCodeRequest {
    VerifyCodeRequest { challenge, code, subject: BENCH_SUBJECT.into(), purpose: "payment".into(), context: Some(otp_context()) }
}

/// The TOTP code (SHA-1, 6 digits, 30 s) of a seed at `unix`, as an authenticator computes it.
fn totp_now(seed: &[u8], unix: u64) -> Result<Zeroizing<String>, String> {
    let key = openssl::pkey::PKey::hmac(seed).map_err(|e| e.to_string())?;
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha1(), &key).map_err(|e| e.to_string())?;
    let mac = Zeroizing::new(
        signer
            .sign_oneshot_to_vec(&crate::crypto::otp::counter_bytes(crate::crypto::otp::totp_step(unix, 30)))
            .map_err(|e| e.to_string())?,
    );
    crate::crypto::otp::truncate(&mac, 6).map_err(|e| e.to_string())
}

/// Challenges issued before otp-verify is measured; a worker that runs out issues its
/// next challenge inside the timed request. The spawned appliance keeps up to
/// [`BENCH_OPEN_CHALLENGES`] (the example config: 100,000).
const OTP_ISSUED_TOTAL: usize = 150_000;
const BENCH_OPEN_CHALLENGES: usize = 400_000;

/// What the PIN operations need from a spawned appliance's state.
struct PinSetup {
    /// The clear terminal transport key (imported into the token from components).
    tmk: Zeroizing<Vec<u8>>,
    /// The dev PKI, for the set-up calls of the `kif` and `activation` clients.
    pki: PathBuf,
    /// The spawned appliance's state (ceremony access for rewrap's key rotation).
    state: crate::demo::Prepared,
}

const BENCH_PIN: &str = "1234";
const BENCH_PHONE: &str = "+8613812345678";
const BENCH_BANK_ACCOUNT: &str = "6222020200112233445";

fn phone_account() -> Option<AccountMsg> {
    Some(AccountMsg { kind: Some(account::Kind::Phone(BENCH_PHONE.into())) })
}

fn bank_account() -> Option<AccountMsg> {
    Some(AccountMsg { kind: Some(account::Kind::Pan(BENCH_BANK_ACCOUNT.into())) })
}

/// The next transaction of a simulated terminal, translated to bank A's zone with
/// the account changed from the phone number to the bank account.
fn dukpt_translation(terminal: &mut Terminal) -> Result<TranslatePinRequest, crate::sim::terminal::TerminalError> {
    let account = crate::crypto::pin::Account::from_phone(BENCH_PHONE)?;
    let (ksn, block) = terminal.pin_block(BENCH_PIN, &account)?;
    Ok(TranslatePinRequest {
        pin: Some(EncryptedPin {
            block,
            format: PinBlockFormat::Iso4 as i32,
            account: phone_account(),
            source: Some(PinSource {
                kind: Some(pin_source::Kind::Dukpt(Dukpt { bdk_name: "bdk.pos".into(), bdk_version: 0, ksn: ksn.to_vec() })),
            }),
        }),
        destination_key: "zpk.bank-a".into(),
        destination_format: PinBlockFormat::Iso4 as i32,
        destination_account: bank_account(),
    })
}

/// Keys `n` simulated terminals (distinct initial key IDs) through ExportTerminalKey.
async fn terminals(addr: &str, setup: &PinSetup, n: usize) -> Result<Vec<Terminal>, BenchError> {
    let kif = client::connect(addr, &ClientTls::dev(&setup.pki, "kif"))
        .await
        .map_err(|e| BenchError::Failed(format!("kif client: {}", chain(&e))))?;
    let mut kif = PinServiceClient::new(kif);
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut ksn = [0u8; 12];
        ksn[..4].copy_from_slice(&0xB0B0_0001u32.to_be_bytes());
        ksn[4..8].copy_from_slice(&(i as u32).to_be_bytes());
        let e = kif
            .export_terminal_key(ExportTerminalKeyRequest {
                bdk_name: "bdk.pos".into(),
                initial_ksn: ksn.to_vec(),
                kek_name: "tmk.terminals".into(),
            })
            .await
            .map_err(|s| BenchError::Failed(format!("terminal set-up: ExportTerminalKey: {}", status_text(s))))?
            .into_inner();
        out.push(
            Terminal::inject(&setup.tmk, &e.wrapped_key, &e.kcv, &ksn)
                .map_err(|err| BenchError::Failed(format!("terminal set-up: {err}")))?,
        );
    }
    Ok(out)
}

/// One block under `zone` (format `format`) with the bank account, made by
/// translating a terminal transaction.
async fn zone_block(
    pin: &mut PinServiceClient<Channel>,
    terminal: &mut Terminal,
    zone: &str,
    format: PinBlockFormat,
) -> Result<EncryptedPin, BenchError> {
    let mut req = dukpt_translation(terminal).map_err(|e| BenchError::Failed(format!("PIN set-up: {e}")))?;
    req.destination_key = zone.into();
    req.destination_format = format as i32;
    let t = pin
        .translate_pin(req)
        .await
        .map_err(|s| BenchError::Failed(format!("PIN set-up: TranslatePin: {}", status_text(s))))?
        .into_inner();
    Ok(EncryptedPin {
        block: t.block,
        format: format as i32,
        account: bank_account(),
        source: Some(PinSource { kind: Some(pin_source::Kind::Zone(ZoneKey { key_name: zone.into(), version: 0 })) }),
    })
}

async fn run_network(
    plan: &Plan,
    ops: &[(usize, Op)],
    addr: &str,
    tls: &ClientTls,
    pin_setup: Option<&PinSetup>,
) -> Result<Vec<(usize, Row)>, BenchError> {
    let channels = connect_all(plan, addr, tls).await?;
    let mut rows = Vec::with_capacity(ops.len());
    for &(i, op) in ops {
        if matches!(op, Op::RawEncrypt | Op::RawDecrypt | Op::EchoBaseline) {
            continue;
        }
        let (targets, supply) = targets_for(plan, op, &channels, addr, pin_setup).await?;
        let row = drive(plan, op, targets, Some(channels.len()), None).await?;
        if let Some(batches) = supply {
            batches.report_reuse();
        }
        rows.push((i, row));
    }
    Ok(rows)
}

/// The bench's HTTP/2 connections to `addr`.
async fn connect_all(plan: &Plan, addr: &str, tls: &ClientTls) -> Result<Vec<Channel>, BenchError> {
    let mut channels = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        channels.push(client::connect(addr, tls).await.map_err(|e| BenchError::Failed(format!("{addr}: {}", chain(&e))))?);
    }
    Ok(channels)
}

/// The workers' targets for one operation (one per worker), after its set-up (not
/// measured), and the payment supply when the operation verifies payments.
async fn targets_for(
    plan: &Plan,
    op: Op,
    channels: &[Channel],
    addr: &str,
    pin_setup: Option<&PinSetup>,
) -> Result<(Vec<Target>, Option<Arc<setup::Batches>>), BenchError> {
    let plaintext = payload_bytes(plan.payload);
    let ch = |w: usize| channels[w % channels.len()].clone();
    let mut supply = None;
    let targets = match op {
        Op::Ping => {
            let req = PingRequest { payload: plaintext.clone() };
            (0..plan.concurrency).map(|w| Target::Ping { client: AdminServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::Encrypt => {
            let req = EncryptRequest { key_name: plan.key.clone(), plaintext: plaintext.clone(), aad: BENCH_AAD.to_vec() };
            (0..plan.concurrency).map(|w| Target::Encrypt { client: DataServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::Decrypt => {
            let mut c = DataServiceClient::new(ch(0));
            let enc = c
                .encrypt(EncryptRequest { key_name: plan.key.clone(), plaintext: plaintext.clone(), aad: BENCH_AAD.to_vec() })
                .await
                .map_err(|s| BenchError::Failed(format!("decrypt set-up: encrypt: {}", status_text(s))))?
                .into_inner();
            let req = DecryptRequest { key_name: plan.key.clone(), ciphertext: enc.ciphertext, aad: BENCH_AAD.to_vec() };
            let back = c
                .decrypt(req.clone())
                .await
                .map_err(|s| BenchError::Failed(format!("decrypt set-up: decrypt: {}", status_text(s))))?
                .into_inner();
            if back.plaintext != plaintext {
                return Err(BenchError::Failed("decrypt set-up: the appliance returned other data".into()));
            }
            (0..plan.concurrency).map(|w| Target::Decrypt { client: DataServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::TranslateZone | Op::TranslateDukpt | Op::VerifyPin => {
            let setup = pin_setup.ok_or_else(|| BenchError::Usage(format!("{}: needs --spawn", op.name())))?;
            let n = if op == Op::TranslateDukpt { plan.concurrency } else { 1 };
            let mut terms = terminals(addr, setup, n).await?;
            let mut pin = PinServiceClient::new(ch(0));
            match op {
                Op::TranslateZone => {
                    let first = terms.first_mut().ok_or_else(|| BenchError::Failed("no terminal".into()))?;
                    let source = zone_block(&mut pin, first, "zpk.switch", PinBlockFormat::Iso0).await?;
                    let req = TranslatePinRequest {
                        pin: Some(source),
                        destination_key: "zpk.bank-a".into(),
                        destination_format: PinBlockFormat::Iso4 as i32,
                        destination_account: None,
                    };
                    (0..plan.concurrency).map(|w| Target::Translate { client: PinServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
                }
                Op::VerifyPin => {
                    let first = terms.first_mut().ok_or_else(|| BenchError::Failed("no terminal".into()))?;
                    let block = zone_block(&mut pin, first, "zpk.bank-a", PinBlockFormat::Iso4).await?;
                    let activation = client::connect(addr, &ClientTls::dev(&setup.pki, "activation"))
                        .await
                        .map_err(|e| BenchError::Failed(format!("activation client: {}", chain(&e))))?;
                    let pvd = PinServiceClient::new(activation)
                        .generate_pin_verification_data(GeneratePinVerificationDataRequest {
                            pin: Some(block.clone()),
                            method: PinVerificationMethod::KeywardHmac as i32,
                            pvk_name: "pvk.hub".into(),
                            pvki: 0,
                        })
                        .await
                        .map_err(|s| BenchError::Failed(format!("PIN set-up: GeneratePinVerificationData: {}", status_text(s))))?
                        .into_inner();
                    let req = VerifyPinRequest { pin: Some(block), verification_data: pvd.verification_data };
                    (0..plan.concurrency).map(|w| Target::VerifyPin { client: PinServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
                }
                _ => {
                    // One terminal per worker (terminals() made exactly that many).
                    let mut terms = terms.into_iter().map(Box::new);
                    (0..plan.concurrency).map(|w| match terms.next() {
                            Some(terminal) => Target::TranslateDukpt { client: PinServiceClient::new(ch(w)), terminal },
                            // Not reached; an empty request fails visibly if it were.
                            None => Target::Translate { client: PinServiceClient::new(ch(w)), req: TranslatePinRequest::default() },
                        }).collect::<Vec<_>>()
                }
            }
        }
        Op::OtpIssue => {
            let req = otp_issue_request(1);
            (0..plan.concurrency).map(|w| Target::OtpIssue { client: OtpServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::OtpVerify => {
            let per_worker = OTP_ISSUED_TOTAL.div_ceil(plan.concurrency);
            eprintln!("bench: otp-verify: issuing {} challenges first (not measured)", per_worker * plan.concurrency);
            let mut tasks = Vec::with_capacity(plan.concurrency);
            for w in 0..plan.concurrency {
                let mut c = OtpServiceClient::new(ch(w));
                tasks.push(tokio::spawn(async move {
                    let mut issued = Vec::with_capacity(per_worker);
                    for _ in 0..per_worker {
                        let r = c.issue_code(otp_issue_request(600)).await.map_err(status_text)?.into_inner();
                        issued.push((r.challenge, r.code));
                    }
                    Ok::<_, String>(issued)
                }));
            }
            let mut batches = Vec::with_capacity(plan.concurrency);
            for t in tasks {
                batches.push(
                    t.await
                        .map_err(|e| BenchError::Failed(format!("otp set-up: {e}")))?
                        .map_err(|e| BenchError::Failed(format!("otp set-up: IssueCode: {e}")))?,
                );
            }
            let mut batches = batches.into_iter();
            (0..plan.concurrency).map(|w| Target::OtpVerify { client: OtpServiceClient::new(ch(w)), issued: batches.next().unwrap_or_default() }).collect::<Vec<_>>()
        }
        Op::TotpVerify => {
            let mut c = OtpServiceClient::new(ch(0));
            let e = c
                .enroll_totp(EnrollTotpRequest {
                    subject: BENCH_SUBJECT.into(),
                    issuer: "keyward bench".into(),
                    account_label: BENCH_SUBJECT.into(),
                    algorithm: 0,
                    digits: 6,
                    period: 30,
                })
                .await
                .map_err(|s| BenchError::Failed(format!("totp set-up: EnrollTotp: {}", status_text(s))))?
                .into_inner();
            let secret = e
                .provisioning_uri
                .split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("secret="))
                .ok_or_else(|| BenchError::Failed("totp set-up: no secret in the URI".into()))?;
            let seed = Zeroizing::new(
                data_encoding::BASE32_NOPAD
                    .decode(secret.as_bytes())
                    .map_err(|_| BenchError::Failed("totp set-up: secret not base32".into()))?,
            );
            (0..plan.concurrency).map(|w| Target::TotpVerify { client: OtpServiceClient::new(ch(w)), seed: seed.clone(), blob: e.seed_blob.clone() }).collect::<Vec<_>>()
        }
        Op::Mac => {
            let req = GenerateMacRequest { key_name: "mac.switch".into(), data: plaintext.clone(), padding: 0, mac_length: 0 };
            (0..plan.concurrency).map(|w| Target::Mac { client: MacServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::VoucherIssue => {
            let req = setup::voucher_request(VoucherServiceClient::new(ch(0))).await?;
            (0..plan.concurrency).map(|w| Target::VoucherIssue { client: VoucherServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::VerifyPayments => {
            let batches = Arc::new(setup::payment_batches(VoucherServiceClient::new(ch(0)), plan).await?);
            let targets = (0..plan.concurrency)
                .map(|w| Target::VerifyPayments { client: VoucherServiceClient::new(ch(w)), batches: Arc::clone(&batches) })
                .collect::<Vec<_>>();
            supply = Some(batches);
            targets
        }
        Op::Seal => {
            let req = SealBindingRequest { binding: Some(setup::bench_binding()) };
            (0..plan.concurrency).map(|w| Target::Seal { client: BindingServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::Open => {
            let req = setup::open_request(BindingServiceClient::new(ch(0))).await?;
            (0..plan.concurrency).map(|w| Target::Open { client: BindingServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::BlindIndex => {
            let req = BlindIndexRequest { phone: BENCH_PHONE.into() };
            (0..plan.concurrency).map(|w| Target::BlindIndex { client: BindingServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::Rewrap => {
            let setup = pin_setup.ok_or_else(|| BenchError::Usage(format!("{}: needs --spawn", op.name())))?;
            let req = setup::rewrap_request(BindingServiceClient::new(ch(0)), addr, &setup.state).await?;
            (0..plan.concurrency).map(|w| Target::Rewrap { client: BindingServiceClient::new(ch(w)), req: req.clone() }).collect::<Vec<_>>()
        }
        Op::RawEncrypt | Op::RawDecrypt | Op::EchoBaseline => {
            return Err(BenchError::Failed(format!("{} is not driven over the appliance's network", op.name())))
        }
    };
    Ok((targets, supply))
}

async fn run_raw(plan: &Plan, op: Op, hsm: &Hsm, sessions: usize) -> Result<Row, BenchError> {
    let key = hsm
        .catalogue()
        .for_new(&plan.key, &[KeyClass::D0])
        .map_err(|e| BenchError::Failed(format!("--key {}: {e}", plan.key)))?;
    let plaintext = payload_bytes(plan.payload);
    match op {
        Op::RawEncrypt => {
            let targets = (0..plan.concurrency)
                .map(|_| Target::RawEncrypt { hsm: hsm.clone(), key: Arc::clone(&key), plaintext: plaintext.clone() })
                .collect();
            drive(plan, op, targets, None, Some(sessions)).await
        }
        Op::RawDecrypt => {
            let (iv, ciphertext) = hsm
                .gcm_encrypt(&key, BENCH_AAD.to_vec(), plaintext.clone())
                .await
                .map_err(|e| failed("raw-decrypt set-up: encrypt")(e.to_string()))?;
            let back = hsm
                .gcm_decrypt(&key, iv, BENCH_AAD.to_vec(), ciphertext.clone())
                .await
                .map_err(|e| failed("raw-decrypt set-up: decrypt")(e.to_string()))?;
            if back.as_slice() != plaintext.as_slice() {
                return Err(BenchError::Failed("raw-decrypt set-up: the token returned other data".into()));
            }
            let targets = (0..plan.concurrency)
                .map(|_| Target::RawDecrypt { hsm: hsm.clone(), key: Arc::clone(&key), iv, ciphertext: ciphertext.clone() })
                .collect();
            drive(plan, op, targets, None, Some(sessions)).await
        }
        other => Err(BenchError::Failed(format!("{} is not an in-process operation", other.name()))),
    }
}

// ------------------------------------------------------------------ report

/// Microseconds as "850 µs", "3.9 ms", "21 ms", "1.2 s".
fn fmt_latency(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 100_000 {
        format!("{:.1} ms", us as f64 / 1_000.0)
    } else if us < 1_000_000 {
        format!("{:.0} ms", us as f64 / 1_000.0)
    } else {
        format!("{:.2} s", us as f64 / 1_000_000.0)
    }
}

/// Right-aligns `s` in `width` characters (µ counts as one).
fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    format!("{}{s}", " ".repeat(width.saturating_sub(n)))
}

/// One `--json` line (fields in this order).
#[derive(serde::Serialize)]
struct JsonRow {
    op: &'static str,
    concurrency: usize,
    /// `null` for raw ops.
    connections: Option<usize>,
    /// Token sessions bounding raw ops; `null` for network ops.
    token_sessions: Option<usize>,
    payload: usize,
    requests: u64,
    errors: u64,
    seconds: f64,
    rps: f64,
    p50_us: Option<u64>,
    p90_us: Option<u64>,
    p99_us: Option<u64>,
    max_us: Option<u64>,
    mean_us: Option<f64>,
}

fn report(rows: &[Row], json: bool, out: &mut impl std::io::Write) -> std::io::Result<()> {
    if json {
        for r in rows {
            // Latencies are null when no request succeeded.
            let some = !r.hist.is_empty();
            let v = JsonRow {
                op: r.op.name(),
                concurrency: r.concurrency,
                connections: r.connections,
                token_sessions: r.sessions,
                payload: r.payload,
                requests: r.requests,
                errors: r.errors,
                seconds: (r.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
                rps: (r.rps() * 10.0).round() / 10.0,
                p50_us: some.then(|| r.quantile(0.50)),
                p90_us: some.then(|| r.quantile(0.90)),
                p99_us: some.then(|| r.quantile(0.99)),
                max_us: some.then(|| r.hist.max()),
                mean_us: some.then(|| (r.hist.mean() * 10.0).round() / 10.0),
            };
            let v = serde_json::to_string(&v).map_err(std::io::Error::other)?;
            writeln!(out, "{v}")?;
        }
    } else {
        writeln!(
            out,
            "{:<15} {:>5} {:>6} {:>8} {:>9} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}",
            "op", "conc", "conns", "payload", "requests", "errors", "req/s", "p50", "p90", "p99", "max"
        )?;
        for r in rows {
            let conns = r.connections.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
            writeln!(
                out,
                "{:<15} {:>5} {:>6} {:>8} {:>9} {:>7} {:>9.1} {} {} {} {}",
                r.op.name(),
                r.concurrency,
                conns,
                r.payload,
                r.requests,
                r.errors,
                r.rps(),
                r.cell(r.quantile(0.50)),
                r.cell(r.quantile(0.90)),
                r.cell(r.quantile(0.99)),
                r.cell(r.hist.max()),
            )?;
        }
    }
    // Ratios: on stdout under the table, on stderr with --json (stdout stays JSON lines).
    let ratios = ratios(rows);
    if !ratios.is_empty() {
        if json {
            for l in &ratios {
                eprintln!("bench: {l}");
            }
        } else {
            writeln!(out)?;
            for l in &ratios {
                writeln!(out, "{l}")?;
            }
        }
    }
    Ok(())
}

fn ratios(rows: &[Row]) -> Vec<String> {
    let rps = |op: Op| rows.iter().find(|r| r.op == op).map(Row::rps).filter(|v| *v > 0.0);
    let mut lines = Vec::new();
    for op in [Op::VerifyPayments, Op::Rewrap] {
        if let Some(x) = rps(op) {
            lines.push(format!("{} = {:.0} items/s ({} per request)", op.name(), x * setup::BATCH as f64, setup::BATCH));
        }
    }
    for (a, b) in [
        (Op::Ping, Op::EchoBaseline),
        (Op::Encrypt, Op::Ping),
        (Op::Decrypt, Op::Ping),
        (Op::TranslateZone, Op::Ping),
        (Op::TranslateDukpt, Op::Ping),
        (Op::VerifyPin, Op::Ping),
        (Op::Mac, Op::Ping),
        (Op::OtpIssue, Op::Ping),
        (Op::OtpVerify, Op::Ping),
        (Op::TotpVerify, Op::Ping),
        (Op::VoucherIssue, Op::Ping),
        (Op::VerifyPayments, Op::Ping),
        (Op::Seal, Op::Ping),
        (Op::Open, Op::Ping),
        (Op::BlindIndex, Op::Ping),
        (Op::Rewrap, Op::Ping),
        (Op::Encrypt, Op::RawEncrypt),
        (Op::Decrypt, Op::RawDecrypt),
    ] {
        if let (Some(x), Some(y)) = (rps(a), rps(b)) {
            lines.push(format!("{} = {:.0}% of {} throughput", a.name(), 100.0 * x / y, b.name()));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        b: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        let mut v = vec!["bench"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).map(|c| c.b)
    }

    #[test]
    fn op_list_and_raw_mapping() {
        let a = parse(&["--spawn", "--op", "ping,encrypt,raw-encrypt"]).unwrap();
        assert_eq!(plan(&a).unwrap().ops, vec![Op::Ping, Op::Encrypt, Op::RawEncrypt]);
        let a = parse(&["--raw", "--config", "x.toml", "--op", "encrypt,decrypt"]).unwrap();
        assert_eq!(plan(&a).unwrap().ops, vec![Op::RawEncrypt, Op::RawDecrypt]);
        let a = parse(&["--raw", "--config", "x.toml", "--op", "ping"]).unwrap();
        assert!(matches!(plan(&a), Err(BenchError::Usage(_))));
        let a = parse(&["--spawn", "--op", "ping,echo-baseline"]).unwrap();
        assert_eq!(plan(&a).unwrap().ops, vec![Op::Ping, Op::EchoBaseline]);
    }

    #[test]
    fn validation() {
        for bad in [
            vec!["--spawn", "--concurrency", "0"],
            vec!["--spawn", "--concurrency", "10001"],
            vec!["--spawn", "--duration", "0"],
            vec!["--spawn", "--duration", "NaN"],
            vec!["--spawn", "--warmup=-1"],
            vec!["--spawn", "--op", "encrypt", "--payload", "1048577"],
            vec!["--spawn", "--op", "ping", "--payload", "70000"],
            vec!["--op", "ping"],
            vec!["--addr", "127.0.0.1:1", "--op", "ping"],
            vec!["--op", "raw-encrypt"],
            vec!["--addr", "127.0.0.1:1", "--pki", "pki", "--op", "echo-baseline"],
        ] {
            let a = parse(&bad).unwrap();
            assert!(matches!(plan(&a), Err(BenchError::Usage(_))), "{bad:?}");
        }
        let a = parse(&["--spawn", "--duration", "2.5", "--concurrency", "1"]).unwrap();
        let p = plan(&a).unwrap();
        assert_eq!(p.duration, Duration::from_millis(2500));
        assert_eq!(p.connections, 1);
        assert!(parse(&["--spawn", "--addr", "x:1"]).is_err());
        assert!(parse(&["--addr", "x:1", "--ca", "ca.crt"]).is_err());
        assert!(parse(&["--op", "nope"]).is_err());
    }

    #[test]
    fn latency_format() {
        assert_eq!(fmt_latency(850), "850 µs");
        assert_eq!(fmt_latency(3_912), "3.9 ms");
        assert_eq!(fmt_latency(210_000), "210 ms");
        assert_eq!(fmt_latency(1_500_000), "1.50 s");
        assert_eq!(pad("850 µs", 8), "  850 µs");
    }
}
