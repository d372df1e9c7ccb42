//! `vsocketd --config FILE`: the host daemon.
#![forbid(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;

/// vSocket's trusted host daemon: attaches guests, enforces VPC isolation
/// and security groups, and brokers shared-memory connections.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The host's configuration (TOML).
    #[arg(long, short)]
    config: PathBuf,
}

fn main() {
    let args = Args::parse();
    // UCX reads its settings from the environment; the operator's own
    // values win. Set before any thread exists:
    // - a daemon restarted at once must get its fabric address back
    //   although the links of the one before linger in TIME_WAIT (std's
    //   listener sets SO_REUSEADDR for the tcp fabric);
    // - UCX's TCP transport sends and receives a frame (up to 256 KiB and
    //   headers) as one segment rather than in 8 KiB pieces, which more
    //   than doubles a stream's bandwidth over it (RDMA transports ignore
    //   these).
    let ucx_defaults = [
        ("UCX_TCP_CM_REUSEADDR", "y"),
        ("UCX_RDMA_CM_REUSEADDR", "y"),
        ("UCX_TCP_TX_SEG_SIZE", "320K"),
        ("UCX_TCP_RX_SEG_SIZE", "320K"),
    ];
    for (name, value) in ucx_defaults {
        if std::env::var_os(name).is_none() {
            std::env::set_var(name, value);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VSOCKET_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let daemon = match vsocketd::start(&args.config) {
        Ok(daemon) => daemon,
        Err(e) => {
            eprintln!("vsocketd: {e}");
            std::process::exit(e.exit_code());
        }
    };
    loop {
        std::thread::sleep(vsocketd::REAP_EVERY);
        daemon.reap();
    }
}
