//! Grants: the table of connections made ahead (ARCHITECTURE §3b; what
//! the daemon does with them is `kits`).
//!
//! When a process connects again to a listener it connected to before,
//! the daemon makes a batch of connections ahead (*kits*) for the pair,
//! charges and records each, sends the server's ends to the listener
//! channel and the client's with the reply. The client then connects by
//! taking a kit and writing its sequence number and port to the grant's
//! connect queue; the server accepts by reading that queue. No daemon
//! thread runs and no descriptor moves per connection.
//!
//! The daemon stays the authority: it reads each queue at every reap and
//! *announces* the kits taken (from then on they are connections: counted,
//! listed, flow-logged); a kit never taken is retired without a trace
//! but its quota charge going back; and a grant whose flow a policy change
//! no longer allows, or whose client or listener is gone, ends (see
//! `kits::end_where`).

use crate::channel::KitEnds;
use crate::guest::GuestSlot;
use crate::ids::{ChannelId, ConnectionId, ListenerId};
use crate::listeners::ListenerRecord;
use crate::pool::KitChunk;
use crate::sync::lock;
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use vsocket_abi::control::Grant;
use vsocket_abi::grant::Cursor;
use vsocket_abi::layout::Endpoint;
use vsocket_ring::ConnectQueue;

/// Most grants one listener, and one client process, has at once.
const PER_LISTENER: usize = 32;
const PER_CHANNEL: usize = 64;

/// What a connect's decision depends on: a grant is for exactly this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GrantKey {
    /// The client process's request channel.
    pub channel: ChannelId,
    pub listener: ListenerId,
    /// The client's address (its port is not part of any decision).
    pub client: Ipv4Addr,
    /// The address the client dials.
    pub server: SocketAddrV4,
}

/// One grant.
#[derive(Debug)]
pub struct GrantRecord {
    pub id: u64,
    pub key: GrantKey,
    pub listener: Arc<ListenerRecord>,
    pub client: Arc<GuestSlot>,
    /// The daemon's view of the connect queue, and what each end gets.
    pub(crate) queue: ConnectQueue,
    pub(crate) client_page: OwnedFd,
    pub(crate) server_page: OwnedFd,
    pub(crate) state: Mutex<State>,
    /// Why the policy allows the grant's flow, as the flow log says it
    /// (decided again at each batch). Its own lock, held for nothing
    /// else: it is read where the grant's state may be locked.
    pub(crate) decided_by: Mutex<String>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// How far the daemon has read the queue.
    pub(crate) cursor: Cursor,
    /// The next kit's sequence number.
    pub(crate) next: u32,
    /// Kits made and not yet announced, by sequence number.
    pub(crate) waiting: HashMap<u32, ConnectionId>,
    /// Kits made that no server had accepted when last looked at (taken
    /// or not): what ending the grant revokes.
    pub(crate) unaccepted: Vec<ConnectionId>,
    /// The grant has ended: no more kits.
    pub(crate) over: bool,
}

/// Every grant, and the pairs that have connected once (the second
/// connect gets a grant).
#[derive(Debug, Default)]
pub struct Grants {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_key: HashMap<GrantKey, Arc<GrantRecord>>,
    seen: HashSet<GrantKey>,
}

/// A batch made for a client: what goes with its `ConnectedKits`.
pub struct Batch {
    pub grant: Grant,
    pub page: OwnedFd,
    pub bell: OwnedFd,
    /// The write end of the batch's lifeline (the daemon keeps none once
    /// the batch is sent).
    pub holds: OwnedFd,
    /// The chunks the batch's kits are in, in the order the grant's places
    /// count them.
    pub chunks: Vec<Arc<KitChunk>>,
    pub kits: Vec<KitEnds>,
}

impl Batch {
    /// The descriptors after the connection's own, in the order the
    /// message says: the queue page, the bell, then the batch's own
    /// ([`batch_fds`]).
    pub fn fds(&self) -> std::io::Result<Vec<BorrowedFd<'_>>> {
        let mut fds = vec![self.page.as_fd(), self.bell.as_fd()];
        fds.extend(batch_fds(&self.holds, &self.chunks, &self.kits, Endpoint::Client)?);
        Ok(fds)
    }
}

/// A batch's own descriptors for end `end`, in the order `Grant::fds`
/// counts them: its lifeline (`holds`), each chunk's files, each kit's
/// (`kits`, that end's).
pub fn batch_fds<'a>(
    holds: &'a OwnedFd,
    chunks: &'a [Arc<KitChunk>],
    kits: impl IntoIterator<Item = &'a KitEnds>,
    end: Endpoint,
) -> std::io::Result<Vec<BorrowedFd<'a>>> {
    let mut fds = vec![holds.as_fd()];
    for chunk in chunks {
        fds.extend(chunk.files_for(end)?);
    }
    fds.extend(kits.into_iter().flat_map(KitEnds::fds));
    Ok(fds)
}

impl Grants {
    /// The grant for `key`, made now if this is the pair's second connect
    /// there; `None` on its first, or past the limits.
    pub(crate) fn get_or_make(
        &self,
        key: GrantKey,
        make: impl FnOnce() -> std::io::Result<GrantRecord>,
    ) -> Option<Arc<GrantRecord>> {
        let mut inner = lock(&self.inner);
        if let Some(grant) = inner.by_key.get(&key) {
            return Some(grant.clone());
        }
        if inner.seen.insert(key) {
            return None;
        }
        let listener_has = inner.by_key.keys().filter(|k| k.listener == key.listener).count();
        let channel_has = inner.by_key.keys().filter(|k| k.channel == key.channel).count();
        if listener_has >= PER_LISTENER || channel_has >= PER_CHANNEL {
            return None;
        }
        let grant = Arc::new(make().ok()?);
        inner.by_key.insert(key, grant.clone());
        Some(grant)
    }

    /// Every grant now.
    pub(crate) fn all(&self) -> Vec<Arc<GrantRecord>> {
        lock(&self.inner).by_key.values().cloned().collect()
    }

    /// The grants of the client process whose request channel is
    /// `channel`.
    pub(crate) fn of_channel(&self, channel: ChannelId) -> Vec<Arc<GrantRecord>> {
        lock(&self.inner).by_key.iter().filter(|(k, _)| k.channel == channel).map(|(_, g)| g.clone()).collect()
    }

    /// Takes out the grants `which` picks (and forgets the pairs it picks
    /// that connected once).
    pub(crate) fn take(&self, which: impl Fn(&GrantKey) -> bool) -> Vec<Arc<GrantRecord>> {
        let mut inner = lock(&self.inner);
        inner.seen.retain(|k| !which(k));
        let keys: Vec<GrantKey> = inner.by_key.keys().filter(|k| which(k)).copied().collect();
        keys.iter().filter_map(|k| inner.by_key.remove(k)).collect()
    }
}

impl Grants {
    /// Grant `id`, while it lasts.
    pub(crate) fn by_id(&self, id: u64) -> Option<Arc<GrantRecord>> {
        lock(&self.inner).by_key.values().find(|g| g.id == id).cloned()
    }
}
