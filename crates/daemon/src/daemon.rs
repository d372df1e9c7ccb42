//! The daemon's state, shared by all its threads, and what ties its stores
//! together: retiring connections (metering, quotas, flow log), reaping,
//! and enforcing a policy change on established connections.

use crate::charge::{Charge, Exceeded};
use crate::connections::{Carrier, ConnectionRecord, Connections, Memory};
use crate::flowlog::{FlowEvent, FlowLog, FlowRecord, FlowVerdict};
use crate::grants::{GrantRecord, State as GrantState};
use crate::guest::GuestSlot;
use crate::ids::{ChannelId, ConnectionId, Ids, Pair};
use crate::listeners::{ListenerRecord, Listeners};
use crate::policy::{Policy, PolicySource};
use crate::pool::SegmentPool;
use crate::quota::Quota;
use crate::sync::lock;
use arc_swap::ArcSwap;
use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime};
use vsocket_policy::Config;
use vsocket_ring::{Segment, SegmentFiles};

/// Everything the daemon knows; shared by all its threads.
#[derive(Debug)]
pub struct Daemon {
    policy: ArcSwap<Policy>,
    /// What live changes edit, and where `reload` reads; its lock puts
    /// changes in order.
    pub(crate) source: Mutex<Box<dyn PolicySource>>,
    pub ids: Ids,
    pub listeners: Listeners,
    pub connections: Connections,
    /// Grants: connections made ahead for pairs that connect again.
    pub grants: crate::grants::Grants,
    /// Segments made ahead of the connects that need them.
    pub segments: SegmentPool,
    flow_log: Option<FlowLog>,
    /// The relay to other hosts, once started (none without a `[fabric]`).
    pub fabric: OnceLock<crate::fabric::Fabric>,
    /// What carries VM guests' connections, once started (none without
    /// a VM guest).
    pub bridge: OnceLock<Arc<crate::bridge::Bridge>>,
    /// How the etcd store looks from here, if the policy comes from one.
    pub store: OnceLock<Arc<crate::health::StoreHealth>>,
    /// Connections reset because a policy change denied them.
    pub policy_resets: AtomicU64,
    /// Policy changes applied (vsocketctl edits and reloads).
    pub policy_changes: AtomicU64,
    /// Rings whose data pages went back to the host while they were idle
    /// (ARCHITECTURE §3c, stage 5).
    pub rings_trimmed: AtomicU64,
    /// Held (shared) while a request is served; taken for good when the
    /// daemon hands over to its successor (see [`Daemon::stop_serving`]).
    serving: RwLock<()>,
}

/// How long a pass gives idle rings back for at most (each a system call
/// made holding the connection table, whose cost grows with the pages it
/// frees), so that connects never wait long behind it and a host whose
/// connections all fall quiet at once spreads the work over a few reaps.
pub const TRIM_FOR: Duration = Duration::from_millis(2);

impl Daemon {
    /// The daemon for `config`, read from `source`.
    pub fn new(config: Config, source: Box<dyn PolicySource>) -> Daemon {
        let ring_size = config.host().ring_size;
        let ids = Ids::default();
        let slots = config.guests().map(|(id, _)| Arc::new(GuestSlot::new(ids.slot(), &config, id))).collect();
        Daemon {
            policy: ArcSwap::from_pointee(Policy::new(config, slots)),
            source: Mutex::new(source),
            ids,
            listeners: Listeners::default(),
            connections: Connections::default(),
            grants: Default::default(),
            segments: SegmentPool::new(ring_size),
            flow_log: None,
            fabric: OnceLock::new(),
            bridge: OnceLock::new(),
            store: OnceLock::new(),
            policy_resets: AtomicU64::new(0),
            policy_changes: AtomicU64::new(0),
            rings_trimmed: AtomicU64::new(0),
            serving: RwLock::new(()),
        }
    }

    /// Held while a request (a connect, a listen, a peer host's open) is
    /// served: the daemon stops serving only between requests.
    pub fn serving(&self) -> RwLockReadGuard<'_, ()> {
        self.serving.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the requests being served and serves none after them (a
    /// request read later waits until the process exits): what the daemon
    /// has is now fixed, to be handed over.
    pub fn stop_serving(&self) {
        let held = self.serving.write().unwrap_or_else(|e| e.into_inner());
        std::mem::forget(held);
    }

    /// Does any process hold a channel, or any connection live here?
    pub fn anything_attached(&self) -> bool {
        let any_channel = self.policy().slots().iter().any(|s| s.counters.quota.channels() > 0);
        let mut any_connection = false;
        self.connections.each(|_| any_connection = true);
        any_channel || any_connection
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

    /// The policy in force now. Connects hold it for one decision; a change
    /// made meanwhile applies from the next.
    pub fn policy(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// Puts `policy` in force. Only `live` calls this, holding `source`.
    pub(crate) fn publish(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// The listener a connect from `client` to `addr` reaches, if any
    /// (see [`Listeners::find`]).
    pub fn find_listener(&self, client: &GuestSlot, addr: SocketAddrV4) -> Option<Arc<ListenerRecord>> {
        self.listeners.find(client, addr, self.ids.turn())
    }

    /// Resets every open connection `policy` does not allow (both rings
    /// get RST and are closed, so each program sees `ECONNRESET`), logging,
    /// counting and flow-logging each. Returns how many were reset.
    pub fn enforce(&self, policy: &Policy) -> usize {
        let mut records = Vec::new();
        let mut count = 0;
        self.connections.each(|c| {
            if !c.open() {
                return;
            }
            let Err(why) = c.allowed_by(policy) else { return };
            c.reset();
            // A VM's end is the bridge's to reset (the record holds only
            // one side of it), and the bridge wakes both ends; it ignores
            // a relayed connection it does not carry (another host's).
            if let (Carrier::Relayed { .. }, Some(bridge)) = (&c.carrier, self.bridge.get()) {
                bridge.reset(c.id.0);
            }
            count += 1;
            tracing::info!(id = %c.id, client = %c.client_addr, server = %c.server_addr, decided_by = %why,
                "connection reset by a policy change");
            if self.flow_log.is_some() {
                let mut record = close_record(c, 0, 0);
                record.event = FlowEvent::Reset;
                record.verdict = FlowVerdict::Reset;
                record.decided_by = Some(format!("policy change: {why}"));
                (record.bytes_client_to_server, record.bytes_server_to_client, record.duration_ms) = (None, None, None);
                records.push(record);
            }
        });
        self.policy_resets.fetch_add(count as u64, Ordering::Relaxed);
        if let Some(log) = &self.flow_log {
            log.record_waiting(records, crate::flowlog::CLOSE_PATIENCE);
        }
        count
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
        let attempt = || crate::charge::charge(|slot| policy.quotas(slot), client, server, bytes);
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

    /// Takes back, for a new connection, the segment of a connection
    /// between the same `pair` that both ends have closed and released,
    /// retiring that connection.
    pub fn reclaim(&self, pair: Pair) -> Option<(Segment, SegmentFiles)> {
        match self.reclaim_memory(pair, false)?.1 {
            Memory::Files { segment, files } => Some((segment, files)),
            // Only memfd segments are shared by a pair of processes.
            Memory::Placed(_) | Memory::Piece { .. } => None,
        }
    }

    /// Takes back, for a new kit, the piece of a kit connection between the
    /// same `pair` that both ends have closed and released, retiring that
    /// connection; the piece is reset (but for its `bell_kept` words, see
    /// `pool::take_bells`).
    pub fn reclaim_piece(&self, pair: Pair) -> Option<crate::pool::FreePiece> {
        match self.reclaim_memory(pair, true)? {
            (retired, Memory::Piece { segment, piece }) => {
                segment.reset();
                self.segments.reused.fetch_add(1, Ordering::Relaxed);
                Some(crate::pool::FreePiece { piece, retired: Some(retired) })
            }
            (_, Memory::Files { .. } | Memory::Placed(_)) => None,
        }
    }

    /// Retires a connection between `pair` that both ends closed and
    /// released (one whose memory is a kit's piece, if `pieces`), and
    /// returns its id and memory.
    fn reclaim_memory(&self, pair: Pair, pieces: bool) -> Option<(ConnectionId, Memory)> {
        let (mut c, bytes) = self.connections.reclaim(pair, pieces, fold)?;
        if let (Some(close), Some(log)) = (self.retire(&mut c, bytes), &self.flow_log) {
            // On the connect path: never wait for the log.
            log.record(close);
        }
        Some((c.id, c.memory))
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
        self.reap_within(Duration::ZERO)
    }

    fn reap_within(&self, patience: Duration) -> usize {
        self.announce_kits();
        let finished = self.connections.take_finished(fold);
        let retired = finished.len();
        let mut closes = Vec::new();
        for (mut c, bytes) in finished {
            closes.extend(self.retire(&mut c, bytes));
            match (&c.carrier, c.memory) {
                (Carrier::Shared(pair), Memory::Files { segment, files }) if segment.reusable() => {
                    self.segments.recycle(*pair, segment, files);
                }
                (Carrier::Shared(pair), Memory::Piece { segment, piece }) if segment.reusable() => {
                    self.segments.recycle_piece(*pair, c.id, segment, piece);
                }
                _ => {}
            }
        }
        // Waiting for room must not hold up connects: the table is not
        // locked here.
        if let Some(log) = &self.flow_log {
            log.record_waiting(closes, patience);
        }
        retired
    }

    /// Gives back the data pages of rings between two guests of this host
    /// whose tail has not moved since the last pass (ARCHITECTURE §3c,
    /// stage 5), for at most [`TRIM_FOR`] of punching; returns how many.
    /// Called by the main thread alone, after each reap: the table's lock
    /// keeps a ring's memory from being reset for another connection
    /// meanwhile (and is held no longer than that).
    pub fn trim_idle(&self) -> usize {
        let mut trimmed = 0;
        let started = Instant::now();
        self.connections.each(|c| {
            let segment = match (&c.carrier, &c.memory) {
                (Carrier::Shared(_), Memory::Files { segment, .. } | Memory::Piece { segment, .. }) => segment,
                _ => return,
            };
            for (ring, quiet) in c.quiet.iter().enumerate() {
                // (Past the budget, the tails are still noted: a ring left
                // for the next pass is due there.)
                if !quiet.due(segment.producer(ring).total()) || started.elapsed() > TRIM_FOR {
                    continue;
                }
                match segment.trim(ring) {
                    Ok(true) => {
                        quiet.done();
                        trimmed += 1;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        quiet.done();
                        tracing::warn!(connection = c.id.0, ring, error = %e, "cannot give back an idle ring's pages");
                    }
                }
            }
        });
        self.rings_trimmed.fetch_add(trimmed as u64, Ordering::Relaxed);
        trimmed
    }

    /// Reads every grant's queue and announces the kits taken since
    /// (ARCHITECTURE §3b): from then on they are connections.
    pub fn announce_kits(&self) {
        for grant in self.grants.all() {
            self.announce_taken(&grant, &mut lock(&grant.state));
        }
    }

    /// Announces the kits the client process whose request channel is
    /// `channel` took so far: before a connect it sends through the daemon
    /// is decided, so that the flow log's attempts follow the order of a
    /// client's connects (the kits it took, then this one), as they would
    /// if every connect came here.
    pub fn announce_kits_of(&self, channel: ChannelId) {
        for grant in self.grants.of_channel(channel) {
            self.announce_taken(&grant, &mut lock(&grant.state));
        }
    }

    /// Reads `grant`'s queue (its `state` held) and announces the kits
    /// taken since.
    pub(crate) fn announce_taken(&self, grant: &GrantRecord, state: &mut GrantState) {
        let slots: Vec<_> = grant.queue.read_new(&mut state.cursor).collect();
        for slot in slots {
            let Some(id) = state.waiting.remove(&slot.sequence) else { continue };
            self.announce(grant, id, slot.port, &lock(&grant.decided_by));
        }
    }

    /// Kit `id` of `grant` is a connection from now on.
    pub(crate) fn announce(&self, grant: &GrantRecord, id: ConnectionId, port: u16, decided_by: &str) {
        let record = self.connections.announce(id, port, |c| (c.client_addr, c.server_addr));
        let Some((client, server)) = record else { return };
        grant.client.counters.connections_out.fetch_add(1, Ordering::Relaxed);
        grant.listener.guest.counters.connections_in.fetch_add(1, Ordering::Relaxed);
        grant.listener.accepted.fetch_add(1, Ordering::Relaxed);
        self.log_flow(|| FlowRecord {
            time: SystemTime::now(),
            event: FlowEvent::Attempt,
            id: Some(id.0),
            vpc: grant.client.vpc.to_string(),
            client_guest: grant.client.name.clone(),
            server_guest: Some(grant.listener.guest.name.clone()),
            protocol: "tcp",
            client,
            server,
            verdict: FlowVerdict::Accepted,
            decided_by: Some(format!("{decided_by}; kit of grant {}", grant.id)),
            bytes_client_to_server: None,
            bytes_server_to_client: None,
            duration_ms: None,
        });
    }

    /// Gives back a closed connection's quota, logs it, and returns its
    /// close record if there is a flow log. Called exactly once per
    /// connection, by whoever took its record out of the table, with the
    /// bytes [`fold`] counted for it (`up` from the client, `down` to
    /// it): the counters and the flow log agree to the byte.
    fn retire(&self, c: &mut ConnectionRecord, (up, down): (u64, u64)) -> Option<FlowRecord> {
        c.charge.give_back();
        if c.kit.as_ref().is_some_and(|k| !k.announced) {
            if !c.kit_used() {
                // Made ahead and never taken: it was never a connection.
                return None;
            }
            // Taken (or accepted) and over before a reap read its slot, or
            // with no slot at all (a client that wrote none, or another
            // over it): a connection all the same, announced now, with the
            // port its client took it with (0 if its client wrote its take
            // word back).
            let port = c.kit_taken_port().unwrap_or(0);
            let kit = c.kit.as_ref().expect("checked above");
            let decided_by = self.grants.by_id(kit.grant).map(|g| lock(&g.decided_by).clone()).unwrap_or_default();
            c.client_addr.set_port(port);
            c.client.counters.connections_out.fetch_add(1, Ordering::Relaxed);
            c.server.counters.connections_in.fetch_add(1, Ordering::Relaxed);
            let mut attempt = close_record(c, 0, 0);
            attempt.event = FlowEvent::Attempt;
            attempt.decided_by = Some(format!("{decided_by}; kit of grant {}, announced as it closed", kit.grant));
            (attempt.bytes_client_to_server, attempt.bytes_server_to_client, attempt.duration_ms) = (None, None, None);
            self.log_flow(|| attempt);
        }
        tracing::debug!(id = %c.id, client = %c.client_addr, server = %c.server_addr,
            sent = up, received = down, "connection closed");
        self.flow_log.is_some().then(|| close_record(c, up, down))
    }
}

fn close_record(c: &ConnectionRecord, up: u64, down: u64) -> FlowRecord {
    let now = SystemTime::now();
    FlowRecord {
        time: now,
        event: FlowEvent::Close,
        id: Some(c.id.0),
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

/// Folds connection `c`'s bytes into its guests' counters as it leaves the
/// table (which is held meanwhile: a report sees it live or folded, never
/// both or neither). Returns them, client to server first: read once.
fn fold(c: &ConnectionRecord) -> (u64, u64) {
    let (up, down) = (c.bytes_client_to_server(), c.bytes_server_to_client());
    let (client, server) = (&c.client.counters, &c.server.counters);
    client.closed_bytes_sent.fetch_add(up, Ordering::Relaxed);
    client.closed_bytes_received.fetch_add(down, Ordering::Relaxed);
    server.closed_bytes_sent.fetch_add(down, Ordering::Relaxed);
    server.closed_bytes_received.fetch_add(up, Ordering::Relaxed);
    (up, down)
}
