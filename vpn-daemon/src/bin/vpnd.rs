//! `vpnd`: the vpn-gateway daemon.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use tracing_subscriber::EnvFilter;
use vpn_daemon::config::Config;

/// vpn-gateway daemon: an AnyConnect/OpenConnect-compatible VPN headend
/// with per-session policy in eBPF.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML; see examples/gateway.toml).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate FILE and exit: 0 if valid, 2 with the reason if not.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// (vpnd starts this itself) Hold the private key in KEY and sign
    /// for vpnd over stdin; `transport/key_signer.rs`.
    #[arg(long, value_name = "KEY", hide = true)]
    key_signer: Option<PathBuf>,
    /// (vpnd starts this itself) Set up and hold what takes privileges
    /// for the vpnd whose socket is stdin; `broker/mod.rs`.
    #[arg(long, value_name = "CONFIG", hide = true, conflicts_with_all = ["config", "key_signer"])]
    broker: Option<PathBuf>,
    /// With --key-signer: generate the key and a self-signed certificate
    /// here first when they do not exist.
    #[arg(long, value_name = "CERT", hide = true, requires = "key_signer")]
    generate_cert: Option<PathBuf>,
    /// With --generate-cert: a name (DNS name or address) of it.
    #[arg(
        long = "name",
        value_name = "NAME",
        hide = true,
        requires = "generate_cert"
    )]
    names: Vec<String>,
}

fn main() -> ExitCode {
    // Large transient buffers (argon2's 19 MiB per password check, the
    // JSON of `vpnctl sessions` with thousands of sessions) are mapped and
    // unmapped each time. glibc otherwise raises its mmap threshold after
    // the first such free and keeps them in the heap: resident for good,
    // a step of memory after each new high (+28 MiB over a 10,000-session
    // hold; +0.5 with this). argon2's memory would then be faulted in at
    // each check (60 logins/s instead of 87-90 on the bench); it is kept
    // between checks instead and let go after 30 quiet seconds
    // (`auth::users::release_argon2_memory`): 110 logins/s.
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(key) = &args.key_signer {
        let generate = args.generate_cert.as_deref().map(|c| (c, &args.names[..]));
        return match vpn_daemon::transport::key_signer::serve(key, generate) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vpnd key signer: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(config) = &args.broker {
        return match vpn_daemon::broker::serve(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("vpnd broker: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(path) = args.check_config {
        return match Config::load(&path) {
            Ok(_) => {
                println!("{}: configuration is valid", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        };
    }
    let Some(path) = args.config else {
        eprintln!(
            "vpnd: give --config FILE (or --check-config FILE); `cargo xtask run` starts a demo"
        );
        return ExitCode::from(2);
    };
    let settings = match Config::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(vpn_daemon::run(settings, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
