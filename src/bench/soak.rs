//! The soak: every network operation in one mix at a fixed total rate for a long time,
//! the spawned appliance's resident memory, open descriptors and threads sampled as it
//! runs, and its audit trail verified at the end. Passes only with zero failed requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{connect_all, targets_for, BenchError, Op, PinSetup, Plan, Target};
use crate::client::ClientTls;
use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::otp_service_client::OtpServiceClient;
use crate::proto::GetStatusRequest;
use tonic::transport::Channel;

/// Every operation the soak mixes (all the appliance's network operations).
pub const SOAK_OPS: [Op; 16] = [
    Op::Ping,
    Op::Encrypt,
    Op::Decrypt,
    Op::TranslateZone,
    Op::TranslateDukpt,
    Op::VerifyPin,
    Op::Mac,
    Op::OtpIssue,
    Op::OtpVerify,
    Op::TotpVerify,
    Op::VoucherIssue,
    Op::VerifyPayments,
    Op::Seal,
    Op::Open,
    Op::BlindIndex,
    Op::Rewrap,
];

/// Parses "90s", "10m", "1h" or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit() && *c != '.') {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: expected a number with s, m or h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    if !(secs.is_finite() && (1.0..=7.0 * 86_400.0).contains(&secs)) {
        return Err(format!("{s:?}: must be 1 s to 7 days"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// One sample of the appliance process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Duration,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    pub requests: u64,
    /// Module re-initialisations so far (GetStatus `token_recycles`; `None`: not asked).
    pub recycles: Option<u64>,
}

/// Reads VmRSS and Threads from /proc/PID/status and counts /proc/PID/fd.
fn sample(pid: u32, at: Duration, requests: u64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample { at, rss_kib: field("VmRSS:")?, fds, threads: field("Threads:")?, requests, recycles: None })
}

/// The token module's re-initialisations so far, from GetStatus.
async fn recycles(status: &Option<AdminServiceClient<Channel>>) -> Option<u64> {
    let mut c = status.clone()?;
    c.get_status(GetStatusRequest {}).await.ok().map(|r| r.into_inner().token_recycles)
}

/// What the soak measured.
pub struct SoakReport {
    pub duration: Duration,
    pub rate: u32,
    /// Per operation: (ok, errors).
    pub per_op: Vec<(Op, u64, u64)>,
    pub samples: Vec<Sample>,
}

impl SoakReport {
    pub fn errors(&self) -> u64 {
        self.per_op.iter().map(|(_, _, e)| e).sum()
    }

    pub fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let ok: u64 = self.per_op.iter().map(|(_, o, _)| o).sum();
        writeln!(
            out,
            "soak: {:.0} s at {} req/s offered: {ok} OK, {} failed ({:.0} req/s achieved)",
            self.duration.as_secs_f64(),
            self.rate,
            self.errors(),
            ok as f64 / self.duration.as_secs_f64().max(1e-9)
        )?;
        writeln!(out, "{:<16} {:>10} {:>7}", "op", "ok", "errors")?;
        for (op, ok, err) in &self.per_op {
            writeln!(out, "{:<16} {:>10} {:>7}", op.name(), ok, err)?;
        }
        writeln!(out, "{:>7} {:>10} {:>6} {:>8} {:>10} {:>9}", "t (s)", "RSS (MiB)", "fds", "threads", "requests", "recycles")?;
        for s in &self.samples {
            writeln!(
                out,
                "{:>7.0} {:>10.1} {:>6} {:>8} {:>10} {:>9}",
                s.at.as_secs_f64(),
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.threads,
                s.requests,
                s.recycles.map_or_else(|| "-".to_string(), |n| n.to_string())
            )?;
        }
        if let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) {
            let peak = self.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
            writeln!(
                out,
                "RSS {:.1} -> {:.1} MiB (peak {:.1}); fds {} -> {}; threads {} -> {}",
                first.rss_kib as f64 / 1024.0,
                last.rss_kib as f64 / 1024.0,
                peak as f64 / 1024.0,
                first.fds,
                last.fds,
                first.threads,
                last.threads
            )?;
        }
        Ok(())
    }
}

/// How long, how fast, how often sampled.
#[derive(Debug, Clone, Copy)]
pub struct SoakSettings {
    pub duration: Duration,
    /// Requests per second offered in all.
    pub rate: u32,
    pub every: Duration,
}

/// Runs the mix against the appliance at `addr` (process `pid`).
pub async fn run(
    plan: &Plan,
    addr: &str,
    tls: &ClientTls,
    pin_setup: Option<&PinSetup>,
    pid: u32,
    settings: SoakSettings,
) -> Result<SoakReport, BenchError> {
    let SoakSettings { duration, rate, every } = settings;
    let channels = connect_all(plan, addr, tls).await?;
    // Set-up sized for a short run: the payment supply and rewrap batches are reused.
    let setup_plan = Plan { duration: Duration::from_secs(10), warmup: Duration::ZERO, ..plan.clone() };
    let mut per_op_targets = Vec::with_capacity(SOAK_OPS.len());
    for op in SOAK_OPS {
        let targets = if op == Op::OtpVerify {
            // Each call issues its own challenge and verifies it: nothing expires during a long run.
            (0..plan.concurrency)
                .map(|w| Target::OtpVerify {
                    client: OtpServiceClient::new(channels[w % channels.len()].clone()),
                    issued: Vec::new(),
                })
                .collect()
        } else {
            targets_for(&setup_plan, op, &channels, addr, pin_setup).await?.0
        };
        per_op_targets.push(targets.into_iter());
    }
    let mut workers: Vec<Vec<Target>> = (0..plan.concurrency).map(|_| Vec::with_capacity(SOAK_OPS.len())).collect();
    for targets in per_op_targets.iter_mut() {
        for w in workers.iter_mut() {
            if let Some(t) = targets.next() {
                w.push(t);
            }
        }
    }

    let counts: Arc<Vec<(AtomicU64, AtomicU64)>> = Arc::new(SOAK_OPS.iter().map(|_| (AtomicU64::new(0), AtomicU64::new(0))).collect());
    let started = Instant::now();
    let until = started + duration;
    // Each worker paces itself to its share of the rate, starting staggered.
    let interval = Duration::from_secs_f64(plan.concurrency as f64 / f64::from(rate.max(1)));
    let first_error = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(workers.len());
    for (w, mut targets) in workers.into_iter().enumerate() {
        let counts = Arc::clone(&counts);
        let first_error = Arc::clone(&first_error);
        let offset = interval.mul_f64(w as f64 / plan.concurrency as f64);
        tasks.push(tokio::spawn(async move {
            let mut next = started + offset;
            let mut k = w % targets.len().max(1);
            while next < until && !targets.is_empty() {
                tokio::time::sleep_until(next.into()).await;
                let i = k % targets.len();
                let r = targets[i].call().await;
                let (ok, err) = &counts[i];
                match r {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        if !first_error.swap(true, Ordering::Relaxed) {
                            eprintln!("bench: soak: {}: first error: {e}", SOAK_OPS[i].name());
                        }
                        err.fetch_add(1, Ordering::Relaxed)
                    }
                };
                k += 1;
                next += interval;
            }
        }));
    }

    let mut samples = Vec::new();
    let total = |c: &[(AtomicU64, AtomicU64)]| c.iter().map(|(o, e)| o.load(Ordering::Relaxed) + e.load(Ordering::Relaxed)).sum();
    // The token's module re-initialisations, from GetStatus as the admin client (the
    // spawned appliance's dev PKI has one).
    let status = match pin_setup {
        Some(p) => crate::client::connect(addr, &ClientTls::dev(&p.pki, "admin")).await.ok().map(AdminServiceClient::new),
        None => None,
    };
    loop {
        let at = started.elapsed();
        if let Some(mut s) = sample(pid, at, total(&counts)) {
            s.recycles = recycles(&status).await;
            eprintln!(
                "bench: soak: t={:>5.0} s  RSS {:>7.1} MiB  fds {:>4}  threads {:>3}  requests {}  recycles {}",
                at.as_secs_f64(),
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.threads,
                s.requests,
                s.recycles.map_or_else(|| "-".to_string(), |n| n.to_string())
            );
            samples.push(s);
        }
        if Instant::now() >= until {
            break;
        }
        tokio::time::sleep(every.min(until.saturating_duration_since(Instant::now())).max(Duration::from_millis(10))).await;
    }
    for t in tasks {
        t.await.map_err(|e| BenchError::Failed(format!("soak worker: {e}")))?;
    }
    if let Some(mut s) = sample(pid, started.elapsed(), total(&counts)) {
        s.recycles = recycles(&status).await;
        samples.push(s);
    }
    let per_op = SOAK_OPS
        .iter()
        .zip(counts.iter())
        .map(|(op, (ok, err))| (*op, ok.load(Ordering::Relaxed), err.load(Ordering::Relaxed)))
        .collect();
    Ok(SoakReport { duration: started.elapsed(), rate, per_op, samples })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("8d").is_err());
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id(), Duration::ZERO, 0).expect("a sample of this process");
        assert!(s.rss_kib > 0 && s.fds > 0 && s.threads > 0, "{s:?}");
    }
}
