//! vsocketctl and vsocket: the operator's and the tenant-launcher's CLIs.
//!
//! The binaries are thin; what they do lives here so tests and other tools
//! can reuse it:
//!
//! - [`run`]: `vsocket run`, which starts an unmodified program inside a
//!   guest's network namespace with the preload library attached to the
//!   guest's control socket (or, with `--no-preload`, on the kernel's path).
//! - [`lab`]: `vsocket lab`, which builds the ordinary kernel network a config
//!   describes (one namespace per guest, one bridge per VPC), so guests exist
//!   before the daemon attaches them and traffic vSocket does not carry still
//!   flows.
//! - [`rates`]: `vsocketctl rates`, bytes per second from two samples of
//!   the daemon's counters.
//! - [`vm`]: what virtual-machine guests boot (QEMU under TCG, a guest
//!   kernel and an initramfs that runs the host's programs), fetched into
//!   a cache of its own.

#![forbid(unsafe_code)]

pub mod lab;
pub mod rates;
pub mod run;
pub mod store;
pub mod table;
pub mod vm;

use std::path::PathBuf;

/// The environment variable that names the config file when no `--config`
/// is given.
pub const CONFIG_ENV: &str = "VSOCKET_CONFIG";

/// The config file used when neither `--config` nor [`CONFIG_ENV`] names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vsocket/vsocket.toml";

/// The config file to read: `explicit` if given, else `$VSOCKET_CONFIG` if
/// set and non-empty, else [`DEFAULT_CONFIG_PATH`].
pub fn config_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os(CONFIG_ENV).filter(|path| !path.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}
