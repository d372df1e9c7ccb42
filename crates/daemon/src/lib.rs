//! vsocketd: the trusted host daemon.
//!
//! - [`state`]: the daemon's view of the host: the tenant model (from the
//!   config), the listener registry, live connections and counters;
//! - [`attach`]: one control socket per guest, and the check that every
//!   process attaching to it lives in that guest's network namespace;
//! - [`broker`]: listen and connect requests: policy, then shared memory;
//! - [`pool`]: connection segments made ahead of time;
//! - [`quota`]: per-guest limits on connections, shared memory and
//!   control channels;
//! - [`admin`]: the operator's socket, read by `vsocketctl`;
//! - [`live`]: policy changes while the daemon runs (rules, memberships,
//!   guests, reload) and what they do to established connections;
//! - [`flowlog`]: one JSON line per connection attempt and close, written
//!   and rotated by its own thread;
//! - [`metrics`]: the Prometheus endpoint, a small HTTP/1.1 responder;
//! - [`fabric`]: connections to guests on other hosts, relayed over a
//!   link between the two hosts' daemons (TCP or UCX).
//!
//! The daemon is on the control path only: once it has brokered a
//! connection between two guests on this host, their bytes move through a
//! segment shared directly between them. It maps each segment too, to
//! meter bytes and to retire closed connections; it writes to a segment
//! only to reset a connection a policy change denies (`on_policy_change =
//! "reset"`).
#![forbid(unsafe_code)]

pub mod admin;
pub mod attach;
pub mod broker;
pub mod fabric;
pub mod flowlog;
pub mod live;
pub mod metrics;
pub mod pool;
pub mod quota;
pub mod state;

pub use state::Daemon;

use std::path::{Path, PathBuf};

/// Where the control socket of guest `name` lives under `run_dir`.
pub fn guest_socket_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("guests").join(format!("{name}.sock"))
}

/// Where the operator's socket lives under `run_dir`.
pub fn admin_socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("vsocketd.sock")
}

/// Where a network namespace named by the config is bound.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new("/run/netns").join(netns)
}
