#![forbid(unsafe_code)]
//! The `keyward` command: appliance server, key ceremony, audit verification,
//! development PKI, load generator and the end-to-end demo.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyward::ceremony::{CeremonyCmd, TokenArgs};

/// mimalloc: the request path allocates and frees small buffers across threads (h2
/// frames, audit events handed to the sequencer), where glibc's allocator spends a
/// tenth of the workers' time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "keyward", version, about = "Payment security appliance: every key in a PKCS#11 token, served over mutual-TLS gRPC")]
struct Cli {
    /// Log filter for operational logs (tracing env-filter syntax).
    #[arg(long, env = "KEYWARD_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the appliance (mTLS gRPC) with a config file.
    Serve {
        #[arg(long, default_value = "pkcs11-config/appliance.toml")]
        config: PathBuf,
    },
    /// Key ceremony: create, import, rotate, retire, list and export keys on the token.
    Ceremony {
        #[command(flatten)]
        token: TokenArgs,
        #[command(subcommand)]
        cmd: CeremonyCmd,
    },
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Write a development CA, a server certificate and client certificates.
    DevPki {
        /// Output directory.
        dir: PathBuf,
        /// Client names (certificate CN; SAN URI spiffe://keyward/client/NAME).
        #[arg(long, num_args = 1.., required = true)]
        clients: Vec<String>,
        /// Server DNS names / IP addresses (default: localhost 127.0.0.1).
        #[arg(long, num_args = 1..)]
        server_names: Vec<String>,
    },
    /// Load generator against a running appliance (or --raw: straight on the token).
    Bench(Box<keyward::bench::BenchArgs>),
    /// From nothing to a running appliance and its flows, in a fresh state directory.
    Demo(keyward::demo::DemoArgs),
    /// The bench's echo baseline server (started by `keyward bench --op echo-baseline`).
    #[command(hide = true)]
    BenchEcho {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Verify the hash chain and checkpoint signatures. Exit 0: intact; 1: tampered (first bad line named); 2: could not check.
    Verify {
        dir: PathBuf,
        /// PEM public key of audit.sign (default: read from the token).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Checkpoint copy kept elsewhere (default: DIR/checkpoints.jsonl).
        #[arg(long)]
        checkpoints: Option<PathBuf>,
        /// A chain head seen earlier, as SEQ:HASH (AdminService.GetStatus, or the log):
        /// the trail must still hold that line, so lines after the last checkpoint
        /// cannot be dropped unnoticed.
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Option<String>,
        /// Accept a directory without any audit line (refused by default: an empty
        /// directory is more likely a wrong path or a deleted trail).
        #[arg(long)]
        allow_empty: bool,
        #[command(flatten)]
        token: TokenArgs,
    },
}

fn init_logs(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(&cli.log);
    match cli.cmd {
        Cmd::Serve { config } => {
            let config = match keyward::config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            // PKCS#11 calls run on the blocking pool, bounded by hsm.sessions permits;
            // a small cap keeps the pool from growing threads it cannot use.
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(64).build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let r = rt.block_on(keyward::appliance::server::serve(config, keyward::shutdown_signal()));
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keyward serve: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Ceremony { token, cmd } => match keyward::ceremony::run(&token, cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keyward ceremony: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Audit { cmd: AuditCmd::Verify { dir, public_key, checkpoints, expect_head, allow_empty, token } } => {
            keyward::audit_verify(&dir, public_key.as_deref(), checkpoints.as_deref(), expect_head.as_deref(), allow_empty, &token)
        }
        Cmd::DevPki { dir, clients, server_names } => {
            let mut opts = keyward::pki::DevPkiOptions::default();
            if !server_names.is_empty() {
                opts.server_names = server_names;
            }
            match keyward::pki::write_dev_pki(&dir, &clients, &opts) {
                Ok(p) => {
                    println!("CA          {}", p.ca_cert.display());
                    println!("server      {} {}", p.server_cert.display(), p.server_key.display());
                    for (name, cert, key) in &p.clients {
                        println!("client {name:<5} {} {}", cert.display(), key.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keyward dev-pki: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Bench(args) => keyward::bench::main(*args),
        Cmd::Demo(args) => keyward::demo::main(args),
        Cmd::BenchEcho { config, listen } => {
            let config = match keyward::config::Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let r = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start runtime: {e}"))
                .and_then(|rt| rt.block_on(keyward::bench::echo::serve(&config, listen, keyward::shutdown_signal())));
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("keyward bench-echo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
