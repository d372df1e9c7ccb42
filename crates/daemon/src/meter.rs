//! Metering of relayed connections.
//!
//! For a connection whose other end is on another host, the relay counts
//! what it moves in the daemon's own memory: that count is the
//! connection's metering, which no guest can forge (a guest can rewrite
//! every index in its segment, the daemon's included).

use std::sync::atomic::AtomicU64;

/// What the relay moved for one connection.
#[derive(Debug, Default)]
pub struct Meter {
    /// Bytes taken from the guest's ring and sent to the other host.
    pub taken: AtomicU64,
    /// Bytes from the other host written into the guest's ring.
    pub given: AtomicU64,
}
