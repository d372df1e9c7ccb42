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
    // SIGTERM and SIGINT are taken by the main loop below, not by their
    // default action: blocked here, before any thread starts, they stay
    // blocked in every thread.
    if let Err(e) = vsocket_sys::block_signals(&[libc::SIGTERM, libc::SIGINT]) {
        eprintln!("vsocketd: cannot block SIGTERM and SIGINT: {e}");
        std::process::exit(1);
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
        match vsocket_sys::wait_signal(&[libc::SIGTERM, libc::SIGINT], vsocketd::REAP_EVERY) {
            Ok(None) => {
                daemon.reap();
                daemon.trim_idle();
            }
            Ok(Some(libc::SIGTERM)) => stop(&daemon),
            Ok(Some(_)) => {
                tracing::info!("vsocketd stopped (SIGINT)");
                std::process::exit(0);
            }
            Err(e) => {
                tracing::error!(error = %e, "waiting for signals");
                std::thread::sleep(vsocketd::REAP_EVERY);
            }
        }
    }
}

/// SIGTERM: hands over to a successor if anything is attached (for up to
/// `OFFER_FOR`), then exits.
fn stop(daemon: &vsocketd::daemon::Daemon) -> ! {
    if daemon.anything_attached() {
        let run_dir = daemon.policy().config.host().run_dir.clone();
        tracing::info!(
            wait_s = vsocketd::handover::OFFER_FOR.as_secs(),
            "stopping: offering a hand-over to the next vsocketd"
        );
        match vsocketd::handover::offer(daemon, &run_dir, vsocketd::handover::OFFER_FOR) {
            Ok(vsocketd::handover::Offered::Taken) => tracing::info!("handed over to the next vsocketd"),
            Ok(vsocketd::handover::Offered::NoTaker) => tracing::info!("no vsocketd took over"),
            Err(e) => tracing::error!(error = %e, "hand-over failed"),
        }
    }
    tracing::info!("vsocketd stopped (SIGTERM)");
    std::process::exit(0)
}
