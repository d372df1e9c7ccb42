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
//! - [`ids`], [`sync`]: identifiers, and locking;
//! - [`quota`]: per-guest limits and what each guest holds;
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
//! - [`reports`], [`admin`], [`metrics`]: what the operator sees.
#![forbid(unsafe_code)]

pub mod admin;
pub mod attach;
pub mod channel;
pub mod charge;
pub mod connect;
pub mod connections;
pub mod daemon;
pub mod decide;
pub mod fabric;
pub mod flowlog;
pub mod guest;
pub mod ids;
pub mod listeners;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod pool;
pub mod quota;
pub mod reports;
pub mod sync;

pub use daemon::Daemon;

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
