//! `vsocketd --config FILE`: the host daemon.
#![forbid(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vsocketd::flowlog::FlowLog;
use vsocketd::{admin, attach, metrics, Daemon};

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
    let (document, config) = match vsocket_policy::load_document(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vsocketd: {e}");
            std::process::exit(2);
        }
    };
    // A bad fabric key stops the daemon before it serves anyone (the
    // relay reads it again when it starts).
    if let Some(Err(e)) = config.fabric().map(|f| f.load_key()) {
        eprintln!("vsocketd: {}: fabric.key_file: {e}", args.config.display());
        std::process::exit(2);
    }
    if let Err(e) = vsocket_sys::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the descriptor limit");
    }
    let host = config.host().clone();
    let source = vsocketd::policy::FileSource::new(args.config.clone(), document);
    let mut daemon = Daemon::new(config, Box::new(source));
    if let Some(flow_log) = host.flow_log.clone() {
        match FlowLog::open(&flow_log) {
            Ok(log) => daemon = daemon.with_flow_log(log),
            Err(e) => {
                eprintln!("vsocketd: flow log {}: {e}", flow_log.path.display());
                std::process::exit(1);
            }
        }
    }
    let daemon = Arc::new(daemon);
    if let Some(addr) = host.metrics {
        if let Err(e) = metrics::serve(&daemon, addr) {
            eprintln!("vsocketd: metrics on {addr}: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = attach::serve_guests(&daemon).and_then(|()| admin::serve(&daemon)) {
        eprintln!("vsocketd: {e}");
        std::process::exit(1);
    }
    match vsocketd::fabric::Fabric::start(&daemon) {
        Ok(Some(fabric)) => {
            let _ = daemon.fabric.set(fabric);
        }
        Ok(None) => {}
        Err(e) => {
            eprintln!("vsocketd: {e}");
            std::process::exit(1);
        }
    }
    let refiller = daemon.clone();
    if let Err(e) = std::thread::Builder::new().name("segments".into()).spawn(move || refiller.segments.refill()) {
        eprintln!("vsocketd: {e}");
        std::process::exit(1);
    }
    tracing::info!(host = %host.name, guests = daemon.policy().config.guests().len(), "vsocketd ready");
    loop {
        std::thread::sleep(Duration::from_millis(250));
        daemon.reap();
    }
}
