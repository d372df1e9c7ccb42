//! The daemon's state: the tenant model, listeners, connections, counters.
//!
//! The policy in force is a [`Policy`] snapshot behind an [`ArcSwap`]: a
//! connect loads the current one (no lock, never waits for a change) and
//! decides with it; a live change builds a whole new snapshot and swaps it
//! in (see [`crate::live`]). What outlives snapshots is the [`GuestSlot`]:
//! one per attached guest, made when the guest appears and kept by every
//! listener, connection and channel of that guest, with the guest's
//! counters. `GuestId`s are indexes into one snapshot's `Config` only;
//! records hold slots, and a snapshot maps a slot to its `GuestId` there (or
//! to none once the guest is removed).

use arc_swap::ArcSwap;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;
use vsocket_policy::{evaluate, Config, Document, Flow, GuestId, Protocol, Quotas, Verdict};
use vsocket_ring::Segment;

use crate::flowlog::{FlowEvent, FlowLog, FlowRecord, FlowVerdict};
use crate::quota::{Charge, Exceeded, Quota, QuotaUsage};

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

/// A guest as the daemon tracks it across policy changes.
///
/// A slot is made when a guest appears (at start, or added live) and never
/// reused: a guest removed and added again gets a new slot, with counters
/// from zero. Its identity (VPC, addresses, network namespace) is fixed; a
/// change to any of them replaces the guest (a new slot). Its security
/// groups are read from the current [`Policy`].
#[derive(Debug)]
pub struct GuestSlot {
    /// Unique for the daemon's lifetime (from `Daemon::next_id`).
    pub id: u64,
    pub name: String,
    pub vpc: Arc<str>,
    pub addresses: Vec<Ipv4Addr>,
    pub netns: String,
    /// The host it runs on (placement); this host's name for local guests.
    pub host: String,
    /// Whether it runs on this host (has a control socket here).
    pub local: bool,
    pub counters: GuestCounters,
    removed: AtomicBool,
    /// Duplicates of the guest's control socket (key 0) and open channels,
    /// shut down when the guest is removed.
    handles: Mutex<HashMap<u64, OwnedFd>>,
}

impl GuestSlot {
    /// The key of the control socket among [`GuestSlot::hold`]'s handles.
    pub const CONTROL: u64 = 0;

    /// A slot for guest `guest` of `config`.
    pub fn new(id: u64, config: &Config, guest: GuestId) -> GuestSlot {
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

    /// Keeps a duplicate of `socket` under `key`, to shut it down if the
    /// guest is removed. Returns false (keeping nothing) if it already was.
    pub fn hold(&self, key: u64, socket: &OwnedFd) -> bool {
        let mut handles = lock(&self.handles);
        if self.removed() {
            return false;
        }
        if let Ok(dup) = socket.try_clone() {
            handles.insert(key, dup);
        }
        true
    }

    /// Forgets the socket kept under `key` (its channel ended).
    pub fn release(&self, key: u64) {
        lock(&self.handles).remove(&key);
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

/// The policy in force: a validated config and the guests' slots in it.
#[derive(Debug)]
pub struct Policy {
    pub config: Config,
    /// By `GuestId` index of `config`.
    slots: Vec<Arc<GuestSlot>>,
    ids: HashMap<u64, GuestId>,
}

impl Policy {
    /// A snapshot of `config`, whose guests have `slots` (in its order).
    pub fn new(config: Config, slots: Vec<Arc<GuestSlot>>) -> Policy {
        assert_eq!(slots.len(), config.guests().len(), "one slot per guest");
        let ids = config.guests().map(|(id, _)| (slots[id.index()].id, id)).collect();
        Policy { config, slots, ids }
    }

    /// The guest's id in this snapshot; none if it is not in it (removed).
    pub fn guest_id(&self, slot: &GuestSlot) -> Option<GuestId> {
        self.ids.get(&slot.id).copied()
    }

    /// The slot of guest `id` of this snapshot's config.
    pub fn slot(&self, id: GuestId) -> &Arc<GuestSlot> {
        &self.slots[id.index()]
    }

    /// The slot of the guest named `name`, if it is in this snapshot.
    pub fn slot_by_name(&self, name: &str) -> Option<&Arc<GuestSlot>> {
        self.config.guest_by_name(name).map(|id| self.slot(id))
    }

    /// The quotas of `slot`'s guest in this snapshot; for a guest no longer
    /// in it (removed), the `[host]` defaults.
    pub fn quotas(&self, slot: &GuestSlot) -> Quotas {
        match self.guest_id(slot) {
            Some(id) => self.config.guest(id).quotas,
            None => self.config.host().default_quotas,
        }
    }

    /// Every guest's slot, in config order.
    pub fn slots(&self) -> &[Arc<GuestSlot>] {
        &self.slots
    }

    /// Whether this policy allows connection `c`, which is still open; if
    /// not, why (as the flow log says it).
    pub fn allows(&self, c: &ConnectionRecord) -> Result<(), String> {
        let (Some(client), Some(server)) = (self.guest_id(&c.client), self.guest_id(&c.server)) else {
            return Err("guest removed".into());
        };
        if client == server {
            return Ok(());
        }
        let flow = Flow {
            protocol: Protocol::Tcp,
            vpc: self.config.guest(client).vpc,
            client,
            client_addr: *c.client_addr.ip(),
            server,
            server_addr: *c.server_addr.ip(),
            port: c.server_addr.port(),
        };
        match evaluate(&self.config, &flow) {
            verdict @ Verdict::Deny { .. } => Err(verdict.describe(&self.config)),
            Verdict::Allow { .. } => Ok(()),
        }
    }
}

/// A listening socket registered by a guest.
#[derive(Debug)]
pub struct ListenerRecord {
    pub id: u64,
    pub guest: Arc<GuestSlot>,
    /// The address the program bound (may be 0.0.0.0).
    pub local: SocketAddrV4,
    /// The listener channel: `Incoming` messages go here.
    pub channel: OwnedFd,
    pub accepted: AtomicU64,
}

/// The two processes a connection joins, as the daemon knows them: the
/// client's request channel and the listener. A released segment is reset
/// and reused only between the same two (see `pool`).
pub type Pair = (u64, u64);

/// A live connection brokered by this daemon.
#[derive(Debug)]
pub struct ConnectionRecord {
    pub id: u64,
    pub client: Arc<GuestSlot>,
    pub client_addr: SocketAddrV4,
    pub server: Arc<GuestSlot>,
    pub server_addr: SocketAddrV4,
    pub opened: SystemTime,
    /// The daemon's mapping of the segment, for metering.
    pub segment: Segment,
    /// The segment's files, kept to hand the segment over again.
    pub files: vsocket_ring::SegmentFiles,
    pub pair: Pair,
    /// Read ends of the client's and the server's lifelines: each hangs up
    /// when no process holds that end of the connection any more.
    pub lifelines: [OwnedFd; 2],
    /// Reset by a policy change (`on_policy_change = "reset"`).
    pub reset: AtomicBool,
    /// What the connection holds of its guests' quotas (their slots), given
    /// back once when it is retired, whatever changed meanwhile.
    pub charge: Charge,
    /// For a connection the fabric relay carries: the relay's count of what
    /// it moved, and which end of the segment is the daemon's.
    pub relayed: Option<(Arc<crate::fabric::Meter>, vsocket_abi::layout::Endpoint)>,
}

impl ConnectionRecord {
    /// Bytes the client has sent: the larger of its ring's two indices, or
    /// for a relayed connection what the relay moved (which the guest
    /// cannot rewrite).
    pub fn bytes_client_to_server(&self) -> u64 {
        self.bytes_from(vsocket_abi::layout::Endpoint::Client)
    }
    /// Bytes the server has sent.
    pub fn bytes_server_to_client(&self) -> u64 {
        self.bytes_from(vsocket_abi::layout::Endpoint::Server)
    }

    fn bytes_from(&self, end: vsocket_abi::layout::Endpoint) -> u64 {
        match &self.relayed {
            // The daemon's own end sent what the relay gave its guest.
            Some((meter, mine)) if *mine == end => meter.given.load(std::sync::atomic::Ordering::Relaxed),
            Some((meter, _)) => meter.taken.load(std::sync::atomic::Ordering::Relaxed),
            // Each end writes only its own half: the sender its ring's
            // tail, the receiver its head. The larger of the two is what
            // the sender sent (the receiver's head never passes an honest
            // tail), and neither end alone can bring it below what its
            // peer counted; raising it raises the liar's own bill alike.
            None => {
                let ring = end.tx_ring();
                self.segment.producer(ring).total().max(self.segment.consumer(ring).total())
            }
        }
    }

    /// The close flags count only where both ends are guests': a guest
    /// could set the daemon's end's flag on a relayed connection and stop
    /// its metering early, so those end with their lifelines alone.
    fn closed_by_flags(&self) -> bool {
        self.relayed.is_none() && self.segment.fully_closed()
    }

    /// Is the connection over? Either both ends closed it as the protocol
    /// says (the segment's flags, which the guests write), or no process
    /// holds either end any more (the lifelines, which no guest can forge:
    /// this retires connections whose flags a guest scribbled over, whose
    /// processes died without closing, or that were never accepted).
    pub fn finished(&self) -> bool {
        self.closed_by_flags() || self.lifelines.iter().all(|l| vsocket_sys::hung_up(l.as_fd()))
    }
}

/// The connections that are over (see [`ConnectionRecord::finished`]),
/// asking the kernel about every live connection's lifelines in one `poll`
/// rather than one per connection.
fn finished_connections(conns: &HashMap<u64, ConnectionRecord>) -> Vec<u64> {
    let mut done = Vec::new();
    let mut live = Vec::new();
    for c in conns.values() {
        if c.closed_by_flags() {
            done.push(c.id);
        } else {
            live.push(c);
        }
    }
    let fds: Vec<_> = live.iter().flat_map(|c| c.lifelines.iter().map(|l| l.as_fd())).collect();
    let hung = vsocket_sys::hung_up_all(&fds);
    for (c, ends) in live.iter().zip(hung.chunks(2)) {
        if ends.iter().all(|&h| h) {
            done.push(c.id);
        }
    }
    done
}

/// Where a listener's address is reachable from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    /// From the VPC (by name): the guest's own (VPC) addresses.
    Vpc(Arc<str>),
    /// From inside the guest (by slot id) only: loopback addresses
    /// (127.0.0.0/8), and the wildcard, stored as 0.0.0.0 and matching any
    /// of them.
    Guest(u64),
}

type ListenerKey = (Scope, Ipv4Addr, u16);

/// Everything the daemon knows; shared by all its threads.
#[derive(Debug)]
pub struct Daemon {
    policy: ArcSwap<Policy>,
    /// What live changes edit, and where `reload` reads; its lock puts
    /// changes in order.
    pub(crate) source: Mutex<Source>,
    /// Connections reset because a policy change denied them.
    pub policy_resets: AtomicU64,
    /// Policy changes applied (vsocketctl edits and reloads).
    pub policy_changes: AtomicU64,
    listeners: Mutex<HashMap<ListenerKey, Vec<Arc<ListenerRecord>>>>,
    connections: Mutex<HashMap<u64, ConnectionRecord>>,
    /// Live connection ids per pair, oldest first (see `reclaim`).
    by_pair: Mutex<HashMap<Pair, VecDeque<u64>>>,
    next_id: AtomicU64,
    /// Segments made ahead of the connects that need them.
    pub segments: crate::pool::SegmentPool,
    flow_log: Option<FlowLog>,
    /// The relay to other hosts, once started (none without a `[fabric]`).
    pub fabric: std::sync::OnceLock<crate::fabric::Fabric>,
}

/// The source of the policy in force.
#[derive(Debug)]
pub struct Source {
    /// The config file (`vsocketctl reload` reads it again).
    pub path: PathBuf,
    /// The policy in force as a document, with every live change made.
    pub document: Document,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// The daemon for `config`, which is `document`, read from `path`.
    pub fn new(config: Config, document: Document, path: PathBuf) -> Daemon {
        let ring_size = config.host().ring_size;
        let next_id = AtomicU64::new(1);
        let slots = config
            .guests()
            .map(|(id, _)| Arc::new(GuestSlot::new(next_id.fetch_add(1, Ordering::Relaxed), &config, id)))
            .collect();
        Daemon {
            policy: ArcSwap::from_pointee(Policy::new(config, slots)),
            source: Mutex::new(Source { path, document }),
            policy_resets: AtomicU64::new(0),
            policy_changes: AtomicU64::new(0),
            listeners: Mutex::default(),
            connections: Mutex::default(),
            by_pair: Mutex::default(),
            next_id,
            segments: crate::pool::SegmentPool::new(ring_size),
            flow_log: None,
            fabric: std::sync::OnceLock::new(),
        }
    }

    /// The daemon, recording connection attempts and closes in `log`.
    pub fn with_flow_log(self, log: FlowLog) -> Daemon {
        Daemon { flow_log: Some(log), ..self }
    }

    /// Queues a flow record, made only if there is a flow log. Never waits.
    pub fn log_flow(&self, make: impl FnOnce() -> FlowRecord) {
        if let Some(log) = &self.flow_log {
            log.record(make());
        }
    }

    /// Flow records not written (0 without a flow log).
    pub fn flow_log_dropped(&self) -> u64 {
        self.flow_log.as_ref().map_or(0, FlowLog::dropped)
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The policy in force now. Connects hold it for one decision; a change
    /// made meanwhile applies from the next.
    pub fn policy(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// Puts `policy` in force. Only `live` calls this, holding `source`.
    pub(crate) fn publish(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// Resets every open connection `policy` does not allow (both rings
    /// get RST and are closed, so each program sees `ECONNRESET`), logging,
    /// counting and flow-logging each. Returns how many were reset.
    pub fn enforce(&self, policy: &Policy) -> usize {
        let mut records = Vec::new();
        let mut count = 0;
        {
            let conns = lock(&self.connections);
            let mut ids: Vec<u64> = conns.keys().copied().collect();
            ids.sort_unstable();
            for c in ids.iter().filter_map(|id| conns.get(id)) {
                if c.reset.load(Ordering::Relaxed) || c.finished() {
                    continue;
                }
                let Err(why) = policy.allows(c) else { continue };
                for ring in 0..2 {
                    c.segment.producer(ring).reset();
                    c.segment.consumer(ring).close();
                }
                c.reset.store(true, Ordering::Relaxed);
                count += 1;
                tracing::info!(id = c.id, client = %c.client_addr, server = %c.server_addr, decided_by = %why,
                    "connection reset by a policy change");
                if self.flow_log.is_some() {
                    let mut record = self.close_record(c, 0, 0);
                    record.event = FlowEvent::Reset;
                    record.verdict = FlowVerdict::Reset;
                    record.decided_by = Some(format!("policy change: {why}"));
                    (record.bytes_client_to_server, record.bytes_server_to_client, record.duration_ms) =
                        (None, None, None);
                    records.push(record);
                }
            }
        }
        self.policy_resets.fetch_add(count as u64, Ordering::Relaxed);
        if let Some(log) = &self.flow_log {
            log.record_waiting(records, crate::flowlog::CLOSE_PATIENCE);
        }
        count
    }

    /// The keys under which a listener bound to `local` in `guest` is found.
    fn listener_keys(guest: &GuestSlot, local: SocketAddrV4) -> Vec<ListenerKey> {
        let port = local.port();
        if local.ip().is_loopback() {
            vec![(Scope::Guest(guest.id), *local.ip(), port)]
        } else if local.ip().is_unspecified() {
            let mut keys: Vec<ListenerKey> =
                guest.addresses.iter().map(|ip| (Scope::Vpc(guest.vpc.clone()), *ip, port)).collect();
            keys.push((Scope::Guest(guest.id), Ipv4Addr::UNSPECIFIED, port));
            keys
        } else {
            vec![(Scope::Vpc(guest.vpc.clone()), *local.ip(), port)]
        }
    }

    /// Registers a listener; the caller checked that `guest` owns the address.
    pub fn add_listener(&self, listener: Arc<ListenerRecord>) {
        let mut map = lock(&self.listeners);
        for key in Self::listener_keys(&listener.guest, listener.local) {
            map.entry(key).or_default().push(listener.clone());
        }
    }

    pub fn remove_listener(&self, listener: &Arc<ListenerRecord>) {
        let mut map = lock(&self.listeners);
        for key in Self::listener_keys(&listener.guest, listener.local) {
            if let Some(list) = map.get_mut(&key) {
                list.retain(|l| l.id != listener.id);
                if list.is_empty() {
                    map.remove(&key);
                }
            }
        }
    }

    /// The listener a connect from `client` to `addr` reaches, if any:
    /// loopback addresses reach the client's own guest only; other
    /// addresses are looked up in its VPC. Several listeners on one address
    /// (SO_REUSEPORT, forked workers) take turns.
    pub fn find_listener(&self, client: &GuestSlot, addr: SocketAddrV4) -> Option<Arc<ListenerRecord>> {
        let map = lock(&self.listeners);
        let list = if addr.ip().is_loopback() {
            let scope = Scope::Guest(client.id);
            map.get(&(scope.clone(), *addr.ip(), addr.port()))
                .or_else(|| map.get(&(scope, Ipv4Addr::UNSPECIFIED, addr.port())))?
        } else {
            map.get(&(Scope::Vpc(client.vpc.clone()), *addr.ip(), addr.port()))?
        };
        let turn = self.next_id.load(Ordering::Relaxed) as usize % list.len();
        Some(list[turn].clone())
    }

    /// Takes a new connection between `client` and `server` (guests) from
    /// their quotas. A guest at a limit may still hold connections that
    /// have closed but are not yet retired (the reaper runs four times a
    /// second): those are retired first (at most every
    /// [`REAP_INTERVAL`](crate::quota::REAP_INTERVAL) per guest), so a
    /// program that closes a connection can open another at once.
    ///
    /// The limits are those of `policy` (the snapshot the connect is decided
    /// with); the charge holds the slots, so it is given back to them even
    /// if later snapshots move or drop the guests.
    pub fn charge(
        &self,
        policy: &Policy,
        client: &Arc<GuestSlot>,
        server: &Arc<GuestSlot>,
        bytes: u64,
    ) -> Result<Charge, Exceeded> {
        let attempt = || crate::quota::charge(|slot| policy.quotas(slot), client, server, bytes);
        match attempt() {
            Ok(charge) => Ok(charge),
            Err(over) if over.guest.counters.quota.reap_due(crate::quota::now_ms()) && self.reap_now() > 0 => attempt(),
            Err(exceeded) => Err(exceeded),
        }
    }

    /// Counts against `guest` and (at most once a second per guest and
    /// quota) logs a refusal for `quota`, whose limit was `limit`.
    pub fn note_exceeded(&self, guest: &GuestSlot, quota: Quota, limit: u64, detail: &str) {
        if let Some(unlogged) = guest.counters.quota.note_exceeded(quota, crate::quota::now_ms()) {
            tracing::warn!(guest = %guest.name, vpc = %guest.vpc, quota = quota.name(), limit, unlogged,
                "{detail}: quota exceeded");
        }
    }

    pub fn add_connection(&self, record: ConnectionRecord) {
        let mut conns = lock(&self.connections);
        lock(&self.by_pair).entry(record.pair).or_default().push_back(record.id);
        conns.insert(record.id, record);
    }

    /// Takes back, for a new connection, the segment of a connection
    /// between the same `pair` that both ends have closed and released,
    /// retiring that connection. Only the oldest few are looked at: a
    /// client that opens connection after connection finds its previous
    /// ones there.
    pub fn reclaim(&self, pair: Pair) -> Option<(Segment, vsocket_ring::SegmentFiles)> {
        const LOOK: usize = 8;
        let mut conns = lock(&self.connections);
        let mut pairs = lock(&self.by_pair);
        let queue = pairs.get_mut(&pair)?;
        let mut found = None;
        let mut i = 0;
        while i < queue.len().min(LOOK) {
            match conns.get(&queue[i]) {
                None => {
                    queue.remove(i);
                }
                Some(c) if c.segment.reusable() => {
                    let id = queue.remove(i).expect("index checked");
                    let mut c = conns.remove(&id).expect("present");
                    if let (Some(close), Some(log)) = (self.retire(&mut c), &self.flow_log) {
                        // On the connect path: never wait for the log.
                        log.record(close);
                    }
                    found = Some((c.segment, c.files));
                    break;
                }
                Some(_) => i += 1,
            }
        }
        if queue.is_empty() {
            pairs.remove(&pair);
        }
        found
    }

    /// Retires connections whose both ends have closed, folding their bytes
    /// into the guests' counters and writing their close records; released
    /// segments go back to the pool for their pair. Returns how many were
    /// retired.
    pub fn reap(&self) -> usize {
        self.reap_within(crate::flowlog::CLOSE_PATIENCE)
    }

    /// As [`reap`](Self::reap), for the connect path: never waits for room
    /// in the flow log.
    fn reap_now(&self) -> usize {
        self.reap_within(std::time::Duration::ZERO)
    }

    fn reap_within(&self, patience: std::time::Duration) -> usize {
        let mut closes = Vec::new();
        let retired = {
            let mut conns = lock(&self.connections);
            let mut done = finished_connections(&conns);
            done.sort_unstable();
            for id in &done {
                if let Some(mut c) = conns.remove(id) {
                    closes.extend(self.retire(&mut c));
                    if c.segment.reusable() {
                        self.segments.recycle(c.pair, c.segment, c.files);
                    }
                }
            }
            if !done.is_empty() {
                let mut pairs = lock(&self.by_pair);
                pairs.retain(|_, queue| {
                    queue.retain(|id| conns.contains_key(id));
                    !queue.is_empty()
                });
            }
            done.len()
        };
        // Outside the lock: waiting for room must not hold up connects.
        if let Some(log) = &self.flow_log {
            log.record_waiting(closes, patience);
        }
        retired
    }

    /// One of a pair's processes is gone (its request channel or its
    /// listener closed): nothing of that pair can be reused.
    pub fn forget_pairs(&self, gone: impl Fn(Pair) -> bool) {
        self.segments.forget(&gone);
    }

    /// Folds a closed connection's bytes into the counters, gives back its
    /// quota, logs it, and returns its close record if there is a flow log.
    /// Called exactly once per connection: by whoever removed its record
    /// from `connections`. The totals are read once: the counters and the
    /// flow log must agree to the byte.
    fn retire(&self, c: &mut ConnectionRecord) -> Option<FlowRecord> {
        let (up, down) = (c.bytes_client_to_server(), c.bytes_server_to_client());
        self.fold_bytes(c, up, down);
        c.charge.give_back();
        tracing::debug!(id = c.id, client = %c.client_addr, server = %c.server_addr,
            sent = up, received = down, "connection closed");
        self.flow_log.is_some().then(|| self.close_record(c, up, down))
    }
    fn close_record(&self, c: &ConnectionRecord, up: u64, down: u64) -> FlowRecord {
        let now = SystemTime::now();
        FlowRecord {
            time: now,
            event: FlowEvent::Close,
            id: Some(c.id),
            vpc: c.client.vpc.to_string(),
            client_guest: c.client.name.clone(),
            server_guest: Some(c.server.name.clone()),
            protocol: "tcp",
            client: c.client_addr,
            server: c.server_addr,
            verdict: FlowVerdict::Accepted,
            decided_by: None,
            bytes_client_to_server: Some(up),
            bytes_server_to_client: Some(down),
            duration_ms: Some(now.duration_since(c.opened).map_or(0, |d| d.as_millis() as u64)),
        }
    }

    fn fold_bytes(&self, c: &ConnectionRecord, up: u64, down: u64) {
        let client = &c.client.counters;
        let server = &c.server.counters;
        client.closed_bytes_sent.fetch_add(up, Ordering::Relaxed);
        client.closed_bytes_received.fetch_add(down, Ordering::Relaxed);
        server.closed_bytes_sent.fetch_add(down, Ordering::Relaxed);
        server.closed_bytes_received.fetch_add(up, Ordering::Relaxed);
    }

    /// A snapshot of every guest, for `vsocketctl guests`.
    pub fn guest_reports(&self) -> Vec<GuestReport> {
        let policy = self.policy();
        let config = &policy.config;
        let conns = lock(&self.connections);
        config
            .guests()
            .map(|(id, g)| {
                let slot = policy.slot(id);
                let c = &slot.counters;
                let mut sent = c.closed_bytes_sent.load(Ordering::Relaxed);
                let mut received = c.closed_bytes_received.load(Ordering::Relaxed);
                let mut open = 0;
                for conn in conns.values() {
                    if Arc::ptr_eq(&conn.client, slot) {
                        sent += conn.bytes_client_to_server();
                        received += conn.bytes_server_to_client();
                        open += 1;
                    }
                    if Arc::ptr_eq(&conn.server, slot) {
                        sent += conn.bytes_server_to_client();
                        received += conn.bytes_client_to_server();
                        open += 1;
                    }
                }
                GuestReport {
                    name: g.name.clone(),
                    vpc: config.vpc(g.vpc).name.clone(),
                    addresses: g.addresses.clone(),
                    security_groups: g.groups.iter().map(|&group| config.security_group(group).name.clone()).collect(),
                    netns: g.netns.clone(),
                    channels: c.quota.channels(),
                    connections_live: c.quota.connections(),
                    shared_memory: c.quota.shared_memory(),
                    max_connections: g.quotas.max_connections,
                    max_shared_memory: g.quotas.max_shared_memory,
                    max_channels: g.quotas.max_channels,
                    exceeded_connections: c.quota.exceeded(Quota::Connections),
                    exceeded_shared_memory: c.quota.exceeded(Quota::SharedMemory),
                    exceeded_channels: c.quota.exceeded(Quota::Channels),
                    refused_attachments: c.refused_attachments.load(Ordering::Relaxed),
                    connections_open: open,
                    connections_out: c.connections_out.load(Ordering::Relaxed),
                    connections_in: c.connections_in.load(Ordering::Relaxed),
                    denied: c.denied.load(Ordering::Relaxed),
                    fallbacks: c.fallbacks.load(Ordering::Relaxed),
                    bytes_sent: sent,
                    bytes_received: received,
                }
            })
            .collect()
    }

    pub fn listener_reports(&self) -> Vec<ListenerReport> {
        let map = lock(&self.listeners);
        let mut seen = std::collections::BTreeMap::new();
        for list in map.values() {
            for l in list {
                seen.entry(l.id).or_insert_with(|| ListenerReport {
                    id: l.id,
                    guest: l.guest.name.clone(),
                    vpc: l.guest.vpc.to_string(),
                    address: l.local,
                    accepted: l.accepted.load(Ordering::Relaxed),
                });
            }
        }
        seen.into_values().collect()
    }

    pub fn connection_reports(&self) -> Vec<ConnectionReport> {
        let conns = lock(&self.connections);
        let mut out: Vec<ConnectionReport> = conns
            .values()
            .map(|c| ConnectionReport {
                id: c.id,
                vpc: c.client.vpc.to_string(),
                client_guest: c.client.name.clone(),
                client: c.client_addr,
                server_guest: c.server.name.clone(),
                server: c.server_addr,
                bytes_client_to_server: c.bytes_client_to_server(),
                bytes_server_to_client: c.bytes_server_to_client(),
                age_seconds: c.opened.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0),
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }
}

#[derive(Debug, Serialize)]
pub struct GuestReport {
    pub name: String,
    pub vpc: String,
    pub addresses: Vec<Ipv4Addr>,
    pub security_groups: Vec<String>,
    pub netns: String,
    pub channels: u64,
    /// Live connections as the quota counts them (one inside the guest
    /// counts once, unlike `connections_open`), and their segment bytes.
    pub connections_live: u64,
    pub shared_memory: u64,
    pub max_connections: u64,
    pub max_shared_memory: u64,
    pub max_channels: u64,
    /// Refusals for each quota: connects (as client or server) and channels.
    pub exceeded_connections: u64,
    pub exceeded_shared_memory: u64,
    pub exceeded_channels: u64,
    pub refused_attachments: u64,
    pub connections_open: u64,
    pub connections_out: u64,
    pub connections_in: u64,
    pub denied: u64,
    pub fallbacks: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Debug, Serialize)]
pub struct ListenerReport {
    pub id: u64,
    pub guest: String,
    pub vpc: String,
    pub address: SocketAddrV4,
    pub accepted: u64,
}

#[derive(Debug, Serialize)]
pub struct ConnectionReport {
    pub id: u64,
    pub vpc: String,
    pub client_guest: String,
    pub client: SocketAddrV4,
    pub server_guest: String,
    pub server: SocketAddrV4,
    pub bytes_client_to_server: u64,
    pub bytes_server_to_client: u64,
    pub age_seconds: f64,
}
