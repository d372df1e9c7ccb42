//! vsocketd: the trusted host daemon.
//!
//! The daemon is on the control path only: once it has brokered a
//! connection between two guests on this host, their bytes move through a
//! segment shared directly between them. It maps each segment too, to
//! meter bytes and to retire closed connections; it writes to a segment
//! only to reset a connection a policy change denies (`on_policy_change =
//! "reset"`).
//!
//! Modules, from the leaves up (each imports only those above it):
//!
//! - [`ids`], [`sync`], [`meter`]: identifiers, locking, and the relay's
//!   count of a relayed connection's bytes;
//! - [`quota`]: per-guest limits and what each guest holds;
//! - [`region`]: a VM guest's memory region, carved into its connections'
//!   pieces (arithmetic only, not yet used by the broker);
//! - [`guest`]: guests as tracked across policy changes, with counters;
//! - [`charge`]: what a connection holds of its guests' quotas;
//! - [`policy`]: the policy snapshot in force, and the policy-source seam
//!   (the config file today);
//! - [`channel`]: a process's channel, as the broker sees it, and what a
//!   connection's end hands over;
//! - stores: [`listeners`] (the listener registry), [`connections`] (the
//!   connection table), [`pool`] (connection segments made ahead);
//! - [`flowlog`]: one JSON line per connection attempt and close;
//! - [`fabric`]: connections to guests on other hosts, relayed over a link
//!   between the two hosts' daemons (TCP or UCX);
//! - [`daemon`]: the state all threads share, and retiring connections;
//! - [`decide`]: the connect decision, pure; [`connect`]: carrying it out;
//! - [`attach`]: how a guest's processes reach the daemon and prove who
//!   they are (one control socket per guest, checked by network namespace);
//! - [`live`]: policy changes while the daemon runs;
//! - [`reattach`]: an end's memory sent again to a new program image that
//!   proves it holds that end (after exec);
//! - [`reports`], [`admin`], [`metrics`]: what the operator sees.
#![forbid(unsafe_code)]

pub mod admin;
pub mod attach;
pub mod bridge;
pub mod channel;
pub mod charge;
pub mod connect;
pub mod connections;
pub mod daemon;
pub mod decide;
pub mod fabric;
pub mod flowlog;
pub mod grants;
pub mod guest;
pub mod handover;
pub mod health;
pub mod ids;
pub mod kits;
pub mod listeners;
pub mod live;
pub mod meter;
pub mod metrics;
pub mod placed;
pub mod policy;
pub mod pool;
pub mod quota;
pub mod reattach;
pub mod region;
pub mod reports;
pub mod store;
pub mod sync;

pub use daemon::Daemon;
pub use vsocket_admin::paths::{admin_socket_path, guest_socket_path, netns_path};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Why vsocketd could not start.
#[derive(Debug)]
pub enum StartError {
    /// The config file is invalid (the error names file, field and problem).
    Config(vsocket_policy::ConfigError),
    /// The fabric's key file in config `file` cannot be used.
    FabricKey { file: PathBuf, error: vsocket_policy::KeyError },
    /// Config `file` asks for a fabric this build does not have.
    FabricNotBuilt { file: PathBuf, kind: vsocket_policy::FabricKind },
    /// The flow log cannot be opened.
    FlowLog { path: PathBuf, error: std::io::Error },
    /// The metrics endpoint cannot listen.
    Metrics { address: SocketAddr, error: std::io::Error },
    /// The fabric cannot start.
    Fabric(fabric::FabricError),
    /// A guest's attachment or the admin socket cannot start.
    Serve(std::io::Error),
    /// The etcd store gave no policy.
    Store(store::OpenError),
}

impl StartError {
    /// The exit status: 2 for a config the operator must fix, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_)
            | StartError::FabricKey { .. }
            | StartError::FabricNotBuilt { .. }
            | StartError::Store(store::OpenError::Config(_)) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::FabricKey { file, error } => write!(f, "{}: fabric.key_file: {error}", file.display()),
            StartError::FabricNotBuilt { file, kind } => write!(
                f,
                "{}: fabric.kind: \"{kind}\" is not built into this vsocketd (built with: {})",
                file.display(),
                FABRICS_BUILT.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
            ),
            StartError::FlowLog { path, error } => write!(f, "flow log {}: {error}", path.display()),
            StartError::Metrics { address, error } => write!(f, "metrics on {address}: {error}"),
            StartError::Fabric(e) => write!(f, "{e}"),
            StartError::Store(e) => write!(f, "{e}"),
            StartError::Serve(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// The fabric kinds this build carries (`ucx` is a cargo feature, on by
/// default).
pub const FABRICS_BUILT: &[vsocket_policy::FabricKind] = &[
    vsocket_policy::FabricKind::Tcp,
    #[cfg(feature = "ucx")]
    vsocket_policy::FabricKind::Ucx,
];

/// Refuses a config (read from `file`) whose fabric kind is not among
/// `built`.
fn check_fabric_built(
    config: &vsocket_policy::Config,
    file: &Path,
    built: &[vsocket_policy::FabricKind],
) -> Result<(), StartError> {
    match config.fabric() {
        Some(fabric) if !built.contains(&fabric.kind) => {
            Err(StartError::FabricNotBuilt { file: file.to_owned(), kind: fabric.kind })
        }
        _ => Ok(()),
    }
}

/// Reads the config at `path` and starts serving it: the metrics endpoint,
/// every local guest's attachment, the admin socket, the fabric and the
/// segment pool's refill thread. Returns the running daemon; the caller
/// retires finished connections with [`Daemon::reap`].
pub fn start(path: &Path) -> Result<Arc<Daemon>, StartError> {
    let (document, config) = vsocket_policy::load_document(path).map_err(StartError::Config)?;
    // The tenant model comes from this file, or from the store it names.
    let store = config.host().store.clone();
    let (source, config, health): (Box<dyn policy::PolicySource>, _, _) = match &store {
        None => (Box::new(policy::FileSource::new(path.to_owned(), document)), config, None),
        Some(settings) => {
            let run_dir = config.host().run_dir.clone();
            let (source, config) =
                store::StoreSource::open(path, document, settings, &run_dir).map_err(StartError::Store)?;
            let health = source.health.clone();
            (Box::new(source), config, Some(health))
        }
    };
    check_fabric_built(&config, path, FABRICS_BUILT)?;
    // A bad fabric key stops the daemon before it serves anyone; the relay
    // gets the key read here.
    let key = match config.fabric().map(|f| f.load_key()) {
        Some(Err(error)) => return Err(StartError::FabricKey { file: path.to_owned(), error }),
        Some(Ok(key)) => key,
        None => None,
    };
    if let Err(e) = vsocket_sys::raise_nofile_limit() {
        tracing::warn!(error = %e, "cannot raise the descriptor limit");
    }
    let host = config.host().clone();
    // Its run directory is its own to make (systemd's RuntimeDirectory
    // makes it too; a daemon started by hand must not need it).
    std::fs::create_dir_all(&host.run_dir).map_err(|e| {
        StartError::Serve(std::io::Error::new(e.kind(), format!("run_dir {}: {e}", host.run_dir.display())))
    })?;
    // A predecessor stopping for an upgrade hands over what it has.
    let mut inherited = match handover::take(&host.run_dir) {
        Ok(inherited) => inherited,
        Err(e) => {
            tracing::warn!(error = %e, "hand-over from the previous vsocketd failed; starting afresh");
            None
        }
    };
    let mut daemon = Daemon::new(config, source);
    if let Some(flow_log) = &host.flow_log {
        let log = flowlog::FlowLog::open(flow_log)
            .map_err(|error| StartError::FlowLog { path: flow_log.path.clone(), error })?;
        daemon = daemon.with_flow_log(log);
    }
    let guests = inherited.as_mut().map(|i| i.apply(&daemon)).unwrap_or_default();
    let daemon = Arc::new(daemon);
    attach::serve_guests(&daemon, guests).and_then(|()| admin::serve(&daemon)).map_err(StartError::Serve)?;
    // Serving now: a predecessor may go, and with it the ports it holds
    // (metrics, fabric), which this daemon takes next; should one still be
    // closing, binding it is tried again for a moment.
    let mut ports_free_by = std::time::Instant::now();
    if let Some(inherited) = inherited {
        inherited.done();
        ports_free_by += PORTS_FREED_WITHIN;
    }
    if let Some(address) = host.metrics {
        retry_in_use(ports_free_by, || metrics::serve(&daemon, address), |e| e.kind() == std::io::ErrorKind::AddrInUse)
            .map_err(|error| StartError::Metrics { address, error })?;
    }
    let opens: Arc<dyn fabric::RemoteOpens> = daemon.clone();
    let in_use = |e: &fabric::FabricError| matches!(e, fabric::FabricError::Listen { error, .. } if error.kind() == std::io::ErrorKind::AddrInUse);
    let started = retry_in_use(
        ports_free_by,
        || fabric::Fabric::start(&daemon.policy().config, key.clone(), opens.clone()),
        in_use,
    )
    .map_err(|e| match e {
        fabric::FabricError::NotBuilt(kind) => StartError::FabricNotBuilt { file: path.to_owned(), kind },
        e => StartError::Fabric(e),
    })?;
    if let Some(fabric) = started {
        let _ = daemon.fabric.set(fabric);
    }
    if let (Some(settings), Some(health)) = (store, health) {
        let _ = daemon.store.set(health.clone());
        let watcher = daemon.clone();
        let (status_settings, status_health, name) = (settings.clone(), health.clone(), host.name.clone());
        std::thread::Builder::new()
            .name("store".into())
            .spawn(move || store::watch(watcher, &settings, health))
            .map_err(StartError::Serve)?;
        std::thread::Builder::new()
            .name("store-status".into())
            .spawn(move || store::publish_status(&status_settings, &name, status_health))
            .map_err(StartError::Serve)?;
    }
    let refiller = daemon.clone();
    std::thread::Builder::new()
        .name("segments".into())
        .spawn(move || refiller.segments.refill())
        .map_err(StartError::Serve)?;
    if let Err(e) = handover::write_pid(&host.run_dir) {
        tracing::warn!(error = %e, "cannot record the daemon's pid (a successor will not wait for a hand-over)");
    }
    tracing::info!(host = %host.name, guests = daemon.policy().config.guests().len(), "vsocketd ready");
    Ok(daemon)
}

/// How long a predecessor's ports may take to close after it exits.
const PORTS_FREED_WITHIN: Duration = Duration::from_secs(3);

/// Calls `bind` until it succeeds, fails otherwise than `in_use` says, or
/// `until` passes.
fn retry_in_use<T, E>(
    until: std::time::Instant,
    mut bind: impl FnMut() -> Result<T, E>,
    in_use: impl Fn(&E) -> bool,
) -> Result<T, E> {
    loop {
        match bind() {
            Err(e) if in_use(&e) && std::time::Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// How often the daemon retires finished connections.
pub const REAP_EVERY: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;
    use vsocket_policy::FabricKind;

    #[test]
    fn a_fabric_kind_not_built_in_is_refused_naming_file_and_field() {
        let text = "[host]\nname = \"h1\"\n[fabric]\nkind = \"ucx\"\n[[fabric.host]]\nname = \"h1\"\n\
                    address = \"10.99.0.1:7470\"\n[[fabric.host]]\nname = \"h2\"\naddress = \"10.99.0.2:7470\"\n";
        let file = Path::new("/etc/vsocket/h1.toml");
        let config = vsocket_policy::parse(text, file).unwrap();
        assert!(check_fabric_built(&config, file, &[FabricKind::Tcp, FabricKind::Ucx]).is_ok());
        let refused = check_fabric_built(&config, file, &[FabricKind::Tcp]).unwrap_err();
        assert_eq!(refused.exit_code(), 2);
        let message = refused.to_string();
        assert!(message.starts_with("/etc/vsocket/h1.toml: fabric.kind: \"ucx\" is not built"), "{message}");
        let tcp = vsocket_policy::parse(&text.replace("ucx", "tcp"), file).unwrap();
        assert!(check_fabric_built(&tcp, file, &[FabricKind::Tcp]).is_ok());
        assert_eq!(FABRICS_BUILT.contains(&FabricKind::Ucx), cfg!(feature = "ucx"));
    }
}
