//! Guests as the daemon tracks them across policy changes.
//!
//! A [`GuestSlot`] is made when a guest appears (at start, or added live)
//! and kept by every listener, connection and channel of that guest, with
//! the guest's counters. `GuestId`s are indexes into one snapshot's
//! `Config` only; records hold slots, and a snapshot maps a slot to its
//! `GuestId` there (or to none once the guest is removed; see
//! [`crate::policy`]).

use crate::ids::{ChannelId, SlotId};
use crate::quota::QuotaUsage;
use crate::sync::lock;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use vsocket_policy::{Config, GuestId};

/// Counters of one guest. Bytes of live connections are added when read.
#[derive(Debug, Default)]
pub struct GuestCounters {
    /// What the guest holds of its quotas (control channels open now among
    /// them), and how often it was refused.
    pub quota: QuotaUsage,
    /// Processes refused at this guest's control socket.
    pub refused_attachments: AtomicU64,
    /// Connections this guest opened over vSocket.
    pub connections_out: AtomicU64,
    /// Connections this guest accepted over vSocket.
    pub connections_in: AtomicU64,
    /// Connects denied by policy.
    pub denied: AtomicU64,
    /// Connects sent to the kernel path (no vSocket listener there).
    pub fallbacks: AtomicU64,
    /// Bytes sent and received over connections that have closed.
    pub closed_bytes_sent: AtomicU64,
    pub closed_bytes_received: AtomicU64,
}

/// What a guest's slot keeps open on its behalf, to shut down when the
/// guest is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handle {
    /// The guest's control socket, where its processes attach.
    Control,
    /// One process's channel.
    Channel(ChannelId),
}

/// A guest as the daemon tracks it across policy changes.
///
/// A slot is never reused: a guest removed and added again gets a new
/// slot, with counters from zero. Its identity (VPC, addresses, network
/// namespace) is fixed; a change to any of them replaces the guest (a new
/// slot). Its security groups are read from the current
/// [`Policy`](crate::policy::Policy).
#[derive(Debug)]
pub struct GuestSlot {
    pub id: SlotId,
    pub name: String,
    pub vpc: Arc<str>,
    pub addresses: Vec<Ipv4Addr>,
    pub netns: String,
    /// The host it runs on (placement); this host's name for local guests.
    pub host: String,
    /// Whether it runs on this host (has a control socket here).
    pub local: bool,
    pub counters: GuestCounters,
    /// A VM guest's region, once its attachment made it.
    pub vm_memory: std::sync::OnceLock<Arc<crate::placed::VmMemory>>,
    removed: AtomicBool,
    /// Duplicates of the guest's control socket and open channels.
    handles: Mutex<HashMap<Handle, OwnedFd>>,
}

impl GuestSlot {
    /// A slot for guest `guest` of `config`.
    pub fn new(id: SlotId, config: &Config, guest: GuestId) -> GuestSlot {
        let g = config.guest(guest);
        GuestSlot {
            id,
            name: g.name.clone(),
            vpc: config.vpc(g.vpc).name.as_str().into(),
            addresses: g.addresses.clone(),
            netns: g.netns.clone(),
            host: g.host.clone(),
            local: config.is_local(guest),
            counters: GuestCounters::default(),
            vm_memory: std::sync::OnceLock::new(),
            removed: AtomicBool::new(false),
            handles: Mutex::default(),
        }
    }

    /// Whether guest `guest` of `config` is this guest: same name, VPC,
    /// addresses, namespace and host (security groups may differ).
    pub fn is(&self, config: &Config, guest: GuestId) -> bool {
        let g = config.guest(guest);
        g.name == self.name
            && *config.vpc(g.vpc).name == *self.vpc
            && g.addresses == self.addresses
            && g.netns == self.netns
            && g.host == self.host
    }

    /// Has the guest been removed from the policy?
    pub fn removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Keeps a duplicate of `socket` as `handle`, to shut it down if the
    /// guest is removed. Returns false (keeping nothing) if it already was.
    pub fn hold(&self, handle: Handle, socket: &OwnedFd) -> bool {
        let mut handles = lock(&self.handles);
        if self.removed() {
            return false;
        }
        if let Ok(dup) = socket.try_clone() {
            handles.insert(handle, dup);
        }
        true
    }

    /// A copy of the socket kept as `handle`, if it is kept.
    pub fn handle(&self, handle: Handle) -> Option<OwnedFd> {
        lock(&self.handles).get(&handle).and_then(|fd| fd.try_clone().ok())
    }

    /// Forgets the socket kept as `handle` (its channel ended).
    pub fn release(&self, handle: Handle) {
        lock(&self.handles).remove(&handle);
    }

    /// Marks the guest removed and shuts down its control socket and every
    /// channel: their threads see end of stream (or `EINVAL` in `accept`)
    /// and end; the guest's processes see their channels close.
    pub fn remove(&self) {
        let handles = {
            let mut handles = lock(&self.handles);
            self.removed.store(true, Ordering::Release);
            std::mem::take(&mut *handles)
        };
        for socket in handles.values() {
            let _ = vsocket_sys::shutdown(socket.as_fd());
        }
    }
}
