//! How the etcd store the policy comes from looks from this host
//! (`crate::store` keeps it up to date; `vsocketctl status` shows it).

use crate::quota::now_ms;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// What the store looks like from here, for `vsocketctl status` and the
/// metrics.
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// A watch is established.
    pub connected: AtomicBool,
    /// The last call that needs the cluster's quorum (a lease keep-alive)
    /// succeeded: a watch can stay open on a member cut off from the rest.
    pub reachable: AtomicBool,
    /// The generation of the policy in force (0: none from the store yet).
    pub generation: AtomicU64,
    /// When the watch last heard from the store (`quota::now_ms`, the
    /// daemon's monotonic clock).
    pub last_heard_ms: AtomicU64,
    /// The store revision the policy in force was read at.
    pub(crate) revision: AtomicI64,
    /// The cluster that answered that read.
    pub(crate) cluster_id: AtomicU64,
}

impl StoreHealth {
    /// As `vsocketctl status` shows it.
    pub fn status(&self) -> vsocket_admin::StoreStatus {
        let heard = self.last_heard_ms.load(Ordering::Relaxed);
        vsocket_admin::StoreStatus {
            connected: self.connected.load(Ordering::Relaxed) && self.reachable.load(Ordering::Relaxed),
            generation: self.generation.load(Ordering::Relaxed),
            last_heard_s: now_ms().saturating_sub(heard) / 1000,
        }
    }

    pub(crate) fn heard(&self) {
        self.last_heard_ms.store(now_ms(), Ordering::Relaxed);
    }
}
