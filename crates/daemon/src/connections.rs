//! The connection table: every live connection this daemon brokered.
//!
//! A connection is in the table from the moment its far end took it until
//! it is over ([`ConnectionRecord::finished`]); whoever takes a record out
//! retires it, exactly once (see `Daemon::retire`).

use crate::charge::Charge;
use crate::guest::GuestSlot;
use crate::ids::{ConnectionId, Pair};
use crate::policy::Policy;
use crate::sync::lock;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;
use vsocket_abi::layout::Endpoint;
use vsocket_policy::{evaluate, Flow, Protocol, Verdict};
use vsocket_ring::{Segment, SegmentFiles};

/// Who carries a connection's bytes.
#[derive(Debug)]
pub enum Carrier {
    /// Both ends are guests on this host, sharing the segment; it may be
    /// reused between the same two processes.
    Shared(Pair),
    /// The fabric relay is the end `mine`: the relay's count of what it
    /// moved is the connection's metering.
    Relayed { meter: Arc<crate::meter::Meter>, mine: Endpoint },
}

/// A connection's memory, as its record holds it.
#[derive(Debug)]
pub enum Memory {
    /// Two sealed memfds: the daemon's mapping (metering, resets) and the
    /// files (to hand the segment over again, or reuse it).
    Files { segment: Segment, files: SegmentFiles },
    /// A piece of a VM's region: where both ends are VMs, the client's
    /// (the other is the server VM's, in the bridge). Held until the record
    /// is retired, so a reset never reaches a later connection's piece.
    Placed(Arc<crate::placed::Placed>),
    /// A kit's piece of a chunk (ARCHITECTURE §3c): the daemon's view of
    /// it, and the piece (its chunk's files are sent again after exec and
    /// at a hand-over; the piece goes back to the pair when retired).
    Piece { segment: Segment, piece: crate::pool::Piece },
}

impl Memory {
    /// The daemon's view of the connection's rings.
    pub fn segment(&self) -> &Segment {
        match self {
            Memory::Files { segment, .. } | Memory::Piece { segment, .. } => segment,
            Memory::Placed(placed) => placed.segment(),
        }
    }
}

/// Whether `policy` allows a flow from `client` (a guest, at address
/// `client_addr`) to `server` (a guest) at `server_addr`.
pub fn flow_allowed(
    policy: &Policy,
    client: &GuestSlot,
    client_addr: std::net::Ipv4Addr,
    server: &GuestSlot,
    server_addr: SocketAddrV4,
) -> Result<(), Disallowed> {
    flow_decided(policy, client, client_addr, server, server_addr).map(drop)
}

/// As [`flow_allowed`], saying why it is allowed (as the flow log does).
pub fn flow_decided(
    policy: &Policy,
    client: &GuestSlot,
    client_addr: std::net::Ipv4Addr,
    server: &GuestSlot,
    server_addr: SocketAddrV4,
) -> Result<String, Disallowed> {
    let (Some(client), Some(server)) = (policy.guest_id(client), policy.guest_id(server)) else {
        return Err(Disallowed::GuestRemoved);
    };
    if client == server {
        return Ok("within one guest: security groups do not apply".into());
    }
    let config = &policy.config;
    let flow = Flow {
        protocol: Protocol::Tcp,
        vpc: config.guest(client).vpc,
        client,
        client_addr,
        server,
        server_addr: *server_addr.ip(),
        port: server_addr.port(),
    };
    match evaluate(config, &flow) {
        verdict @ Verdict::Deny { .. } => Err(Disallowed::Denied(verdict.describe(config))),
        verdict @ Verdict::Allow { .. } => Ok(verdict.describe(config)),
    }
}

/// A live connection brokered by this daemon.
#[derive(Debug)]
pub struct ConnectionRecord {
    pub id: ConnectionId,
    pub client: Arc<GuestSlot>,
    pub client_addr: SocketAddrV4,
    pub server: Arc<GuestSlot>,
    pub server_addr: SocketAddrV4,
    pub opened: SystemTime,
    /// The connection's memory, as the daemon holds it.
    pub memory: Memory,
    pub carrier: Carrier,
    /// Read end of the connection's lifeline, whose write end every process
    /// holding either end of the connection holds: it hangs up when no
    /// process holds the connection any more. (A connection handed over by
    /// a daemon that made one lifeline per end has both: over when all
    /// have hung up. A kit's is its batch's, which every kit of the batch
    /// and every connection made from one holds, ARCHITECTURE §3c: its
    /// connection is over by its flags, or when its processes are gone.)
    pub lifelines: Vec<Arc<OwnedFd>>,
    /// Reset by a policy change (`on_policy_change = "reset"`).
    pub reset: AtomicBool,
    /// What the connection holds of its guests' quotas (their slots), given
    /// back once when it is retired, whatever changed meanwhile.
    pub charge: Charge,
    /// A connection made ahead, as a kit of a grant (ARCHITECTURE §3b).
    pub kit: Option<KitMark>,
    /// What the daemon last saw of each ring, to give its data pages back
    /// once it stays empty (indexed by ring).
    pub quiet: [Quiet; 2],
}

/// What the daemon saw of one ring at its last pass over idle rings
/// (ARCHITECTURE §3c, stage 5; only the main thread's passes touch it).
#[derive(Debug, Default)]
pub struct Quiet {
    /// The ring's tail then.
    tail: AtomicU64,
    /// Its data pages were given back at that tail.
    trimmed: AtomicBool,
}

impl Quiet {
    /// Should the pages of a ring whose tail is now `tail` be given back?
    /// Only once the tail stayed where it was at the last pass (a ring in
    /// use keeps its pages), and once for each time it comes to rest.
    pub fn due(&self, tail: u64) -> bool {
        if self.tail.swap(tail, Ordering::Relaxed) != tail {
            self.trimmed.store(false, Ordering::Relaxed);
            return false;
        }
        tail != 0 && !self.trimmed.load(Ordering::Relaxed)
    }

    /// The pages were given back (or cannot be: not tried again until the
    /// ring moves).
    pub fn done(&self) {
        self.trimmed.store(true, Ordering::Relaxed);
    }
}

/// What a kit's record knows of it.
#[derive(Debug)]
pub struct KitMark {
    pub grant: u64,
    pub sequence: u32,
    /// The daemon knows the client took it (its slot in the grant's queue
    /// was read, or its take word was, see `unused_kit`): from then on it
    /// is a connection like any other. Until then it is not one
    /// ([`Connections::each`] passes it by, and it is retired without a
    /// flow log record); the table's lock guards the change.
    pub announced: bool,
}

impl ConnectionRecord {
    /// A kit no client has taken yet: not a connection. One its client
    /// took (its take word says so), or a server accepted (its claim word:
    /// a client may set its own take word back), is one, announced or not
    /// (its slot may not be read yet, or not written).
    pub fn unused_kit(&self) -> bool {
        self.kit.as_ref().is_some_and(|k| !k.announced) && !self.kit_used()
    }

    /// Was this kit taken by its client or accepted by its server?
    pub fn kit_used(&self) -> bool {
        let claim = self.memory.segment().claim().load(Ordering::Acquire);
        self.kit_taken_port().is_some()
            || claim == vsocket_abi::layout::KIT_ACCEPTED
            || claim == vsocket_abi::layout::KIT_DELIVERED
    }

    /// The port a kit's client took it with, if one did (see
    /// `layout::TAKE`).
    pub fn kit_taken_port(&self) -> Option<u16> {
        self.kit.as_ref()?;
        vsocket_abi::layout::taken_port(self.memory.segment().take().load(Ordering::Acquire))
    }
}

/// Whether a connection recorded beside `held` others keeps its segment's
/// read-only descriptors, under a descriptor limit of `limit`. Kept,
/// handing the segment over again (to the same pair, which reuses it
/// connection after connection) costs a copy; let go, it costs opening the
/// file again (two `open`s of `/proc/self/fd`, a tenth of a fast connect)
/// and each connection holds three of the daemon's descriptors instead of
/// five. They are kept while the connections on record would take at most
/// a third of the limit with them, so that a host with many connections
/// fits two thirds more.
pub fn keeps_read_only(held: usize, limit: usize) -> bool {
    (held + 1) * 5 <= limit / 3
}

/// The daemon's descriptor limit, as it stands at the first connection
/// (after the daemon raised it at start).
fn descriptor_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| vsocket_sys::nofile_limit().map_or(1024, |l| l as usize))
}

/// Why a policy no longer allows an open connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disallowed {
    /// One of its guests is no longer in the policy.
    GuestRemoved,
    /// Denied as the verdict says.
    Denied(String),
}

impl fmt::Display for Disallowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Disallowed::GuestRemoved => f.write_str("guest removed"),
            Disallowed::Denied(verdict) => f.write_str(verdict),
        }
    }
}

impl ConnectionRecord {
    /// Bytes the client has sent: the larger of its ring's two indices, or
    /// for a relayed connection what the relay moved (which the guest
    /// cannot rewrite).
    pub fn bytes_client_to_server(&self) -> u64 {
        self.bytes_from(Endpoint::Client)
    }
    /// Bytes the server has sent.
    pub fn bytes_server_to_client(&self) -> u64 {
        self.bytes_from(Endpoint::Server)
    }

    fn bytes_from(&self, end: Endpoint) -> u64 {
        match &self.carrier {
            // The daemon's own end sent what the relay gave its guest.
            Carrier::Relayed { meter, mine } if *mine == end => meter.given.load(Ordering::Relaxed),
            Carrier::Relayed { meter, .. } => meter.taken.load(Ordering::Relaxed),
            // Each end writes only its own half: the sender its ring's
            // tail, the receiver its head. The larger of the two is what
            // the sender sent (the receiver's head never passes an honest
            // tail), and neither end alone can bring it below what its
            // peer counted; raising it raises the liar's own bill alike.
            Carrier::Shared(_) => {
                let ring = end.tx_ring();
                let segment = self.memory.segment();
                segment.producer(ring).total().max(segment.consumer(ring).total())
            }
        }
    }

    /// The close flags count only where both ends are guests': a guest
    /// could set the daemon's end's flag on a relayed connection and stop
    /// its metering early, so those end with their lifelines alone.
    fn closed_by_flags(&self) -> bool {
        matches!(self.carrier, Carrier::Shared(_)) && self.memory.segment().fully_closed()
    }

    /// Is the connection over? Either both ends closed it as the protocol
    /// says (the segment's flags, which the guests write), or no process
    /// holds either end any more (the lifelines, which no guest can forge:
    /// this retires connections whose flags a guest scribbled over, whose
    /// processes died without closing, or that were never accepted).
    pub fn finished(&self) -> bool {
        self.closed_by_flags() || self.lifelines.iter().all(|l| vsocket_sys::hung_up(l.as_fd()))
    }

    /// Whether `policy` allows this connection, which is still open.
    pub fn allowed_by(&self, policy: &Policy) -> Result<(), Disallowed> {
        flow_allowed(policy, &self.client, *self.client_addr.ip(), &self.server, self.server_addr)
    }

    /// Neither reset by a policy change nor over.
    pub fn open(&self) -> bool {
        !self.reset.load(Ordering::Relaxed) && !self.finished()
    }

    /// Resets both rings and closes them, so each program sees
    /// `ECONNRESET`.
    pub fn reset(&self) {
        for ring in 0..2 {
            self.memory.segment().producer(ring).reset();
            self.memory.segment().consumer(ring).close();
        }
        self.reset.store(true, Ordering::Relaxed);
    }
}

/// The live connections, and which of them each pair of processes holds.
#[derive(Debug, Default)]
pub struct Connections {
    connections: Mutex<HashMap<ConnectionId, ConnectionRecord>>,
    /// Live connection ids per pair, oldest first (see `reclaim`).
    by_pair: Mutex<HashMap<Pair, VecDeque<ConnectionId>>>,
}

impl Connections {
    /// What `f` makes of connection `id`'s record, if it is in the table.
    pub fn with<T>(&self, id: ConnectionId, f: impl FnOnce(&ConnectionRecord) -> T) -> Option<T> {
        lock(&self.connections).get(&id).map(f)
    }

    /// Announces kit `id`: its client took it for a socket bound to
    /// `port`. Returns the record's copy for the flow log, or `None` if
    /// there is no such kit or it was announced already.
    pub fn announce<T>(&self, id: ConnectionId, port: u16, f: impl FnOnce(&ConnectionRecord) -> T) -> Option<T> {
        let mut conns = lock(&self.connections);
        let c = conns.get_mut(&id)?;
        let kit = c.kit.as_mut().filter(|k| !k.announced)?;
        kit.announced = true;
        c.client_addr.set_port(port);
        c.opened = SystemTime::now();
        Some(f(c))
    }

    /// Records a connection whose ends have their descriptors. Near the
    /// daemon's descriptor limit its segment's read-only ones go (see
    /// [`keeps_read_only`]).
    pub fn add(&self, mut record: ConnectionRecord) {
        let mut conns = lock(&self.connections);
        if let Memory::Files { files, .. } = &mut record.memory {
            // (A chunk's read-only files are shared by its pieces: kept.)
            if !keeps_read_only(conns.len(), descriptor_limit()) {
                files.let_go_of_read_only();
            }
        }
        if let Carrier::Shared(pair) = record.carrier {
            lock(&self.by_pair).entry(pair).or_default().push_back(record.id);
        }
        conns.insert(record.id, record);
    }

    /// Takes out, for a new connection, a connection between the same
    /// `pair` that both ends have closed and whose segment they released
    /// (the caller retires it and reuses the segment), with what `fold`
    /// returned for it, called as it leaves the table. Only the oldest few
    /// are looked at: a client that opens connection after connection
    /// finds its previous ones there. A kit no one announced yet is not
    /// taken (the reaper announces, then retires it).
    /// `pieces` says which memory the caller reuses: a kit's piece (true)
    /// or a segment's files (false).
    pub fn reclaim<T>(
        &self,
        pair: Pair,
        pieces: bool,
        fold: impl FnOnce(&ConnectionRecord) -> T,
    ) -> Option<(ConnectionRecord, T)> {
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
                // A kit not yet announced waits for the reaper, which
                // announces it first (its port is in its grant's queue).
                Some(c)
                    if matches!(c.memory, Memory::Piece { .. }) == pieces
                        && c.memory.segment().reusable()
                        && !c.unused_kit() =>
                {
                    let id = queue.remove(i).expect("index checked");
                    found = conns.remove(&id);
                    break;
                }
                Some(_) => i += 1,
            }
        }
        if queue.is_empty() {
            pairs.remove(&pair);
        }
        found.map(|c| {
            let folded = fold(&c);
            (c, folded)
        })
    }

    /// Takes out every connection that is over, in id order, with what
    /// `fold` returned for each, called as it leaves the table (so that
    /// [`snapshot`](Self::snapshot) sees it either in the table or folded,
    /// never both or neither). The kernel is asked about every live
    /// connection's lifelines in one `poll` rather than one per connection.
    pub fn take_finished<T>(&self, mut fold: impl FnMut(&ConnectionRecord) -> T) -> Vec<(ConnectionRecord, T)> {
        let mut conns = lock(&self.connections);
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
        let mut at = 0;
        for c in live {
            let ends = &hung[at..at + c.lifelines.len()];
            at += c.lifelines.len();
            if ends.iter().all(|&h| h) {
                done.push(c.id);
            }
        }
        done.sort_unstable();
        let taken: Vec<(ConnectionRecord, T)> = done
            .iter()
            .filter_map(|id| conns.remove(id))
            .map(|c| {
                let folded = fold(&c);
                (c, folded)
            })
            .collect();
        if !taken.is_empty() {
            let mut pairs = lock(&self.by_pair);
            pairs.retain(|_, queue| {
                queue.retain(|id| conns.contains_key(id));
                !queue.is_empty()
            });
        }
        taken
    }

    /// Calls `f` on every live connection, in id order, holding the table
    /// (kits no client has taken are not connections: they are passed by).
    pub fn each(&self, f: impl FnMut(&ConnectionRecord)) {
        self.snapshot(f, || ());
    }

    /// As [`each`](Self::each), then `then`, still holding the table: what
    /// `then` reads of the connections folded as they left it agrees with
    /// what `f` saw.
    pub fn snapshot<R>(&self, mut f: impl FnMut(&ConnectionRecord), then: impl FnOnce() -> R) -> R {
        let conns = lock(&self.connections);
        let mut ids: Vec<ConnectionId> = conns.keys().copied().collect();
        ids.sort_unstable();
        for c in ids.iter().filter_map(|id| conns.get(id)).filter(|c| !c.unused_kit()) {
            f(c);
        }
        then()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ChannelId, ListenerId, SlotId};
    use std::path::Path;

    const RING: u32 = 4096;

    fn guests() -> (Arc<GuestSlot>, Arc<GuestSlot>) {
        let text = "[host]\nname = \"h\"\n[[vpc]]\nname = \"v\"\ncidr = \"10.0.0.0/24\"\n\
                    [[guest]]\nname = \"a\"\nvpc = \"v\"\naddresses = [\"10.0.0.2\"]\n\
                    [[guest]]\nname = \"b\"\nvpc = \"v\"\naddresses = [\"10.0.0.3\"]\n";
        let config = vsocket_policy::parse(text, Path::new("t.toml")).unwrap();
        let slot = |i: usize| {
            let (id, _) = config.guests().nth(i).unwrap();
            Arc::new(GuestSlot::new(SlotId(i as u64 + 1), &config, id))
        };
        (slot(0), slot(1))
    }

    /// A connection as the broker records it, with the write ends of its
    /// lifeline that its two ends hold (dropping both is "no process holds
    /// it any more").
    fn record(id: u64, carrier: Carrier) -> (ConnectionRecord, [OwnedFd; 2]) {
        let (a, b) = guests();
        let (segment, files) = Segment::create(RING).unwrap();
        let (lifeline, client_holds) = vsocket_sys::pipe().unwrap();
        let server_holds = client_holds.try_clone().unwrap();
        let quotas = vsocket_policy::Quotas { max_connections: 10, max_shared_memory: 1 << 30, max_channels: 10 };
        let charge = crate::charge::charge(|_| quotas, &a, &b, 1).unwrap();
        let record = ConnectionRecord {
            id: ConnectionId(id),
            client: a,
            client_addr: "10.0.0.2:4000".parse().unwrap(),
            server: b,
            server_addr: "10.0.0.3:80".parse().unwrap(),
            opened: SystemTime::now(),
            memory: Memory::Files { segment, files },
            carrier,
            lifelines: vec![Arc::new(lifeline)],
            reset: AtomicBool::new(false),
            quiet: Default::default(),
            charge,
            kit: None,
        };
        (record, [client_holds, server_holds])
    }

    fn pair(n: u64) -> Pair {
        Pair { channel: ChannelId(n), listener: ListenerId(100 + n) }
    }

    /// Both ends close both directions, as the protocol says.
    fn close_by_flags(segment: &Segment) {
        for ring in 0..2 {
            segment.producer(ring).finish();
            segment.consumer(ring).close();
        }
    }

    fn ids(records: &[(ConnectionRecord, ())]) -> Vec<u64> {
        records.iter().map(|(c, ())| c.id.0).collect()
    }

    #[test]
    fn a_rings_pages_are_due_once_each_time_it_comes_to_rest() {
        let q = Quiet::default();
        assert!(!q.due(0) && !q.due(0), "never written: nothing to give back");
        assert!(!q.due(100), "moved since the last pass");
        assert!(q.due(100), "at rest a whole pass");
        assert!(q.due(100), "not given back yet (the ring was not empty): due again");
        q.done();
        assert!(!q.due(100), "given back at this tail");
        assert!(!q.due(228));
        assert!(q.due(228), "at rest again");
    }

    #[test]
    fn connections_are_over_when_closed_or_when_no_process_holds_them() {
        let table = Connections::default();
        let (gone, gone_holds) = record(3, Carrier::Shared(pair(1)));
        let (half, half_holds) = record(1, Carrier::Shared(pair(1)));
        let (closed, _closed_holds) = record(2, Carrier::Shared(pair(2)));
        close_by_flags(closed.memory.segment());
        table.add(gone);
        table.add(half);
        table.add(closed);
        assert!(table.take_finished(|_| ()).iter().map(|(c, ())| c.id.0).eq([2]), "closed by both ends' flags");
        drop(gone_holds);
        let [client_holds, _server_holds] = half_holds;
        drop(client_holds);
        assert_eq!(ids(&table.take_finished(|_| ())), [3], "no process holds either end");
        let mut open = 0;
        table.each(|c| {
            assert_eq!(c.id.0, 1, "one end still held");
            open += 1;
        });
        assert_eq!(open, 1);
    }

    #[test]
    fn read_only_descriptors_go_once_connections_would_take_a_third_of_the_limit() {
        // 20000 descriptors: a third is 6666, room for 1333 connections at
        // five each; the 1334th and later keep three.
        assert!(keeps_read_only(0, 20_000));
        assert!(keeps_read_only(1332, 20_000));
        assert!(!keeps_read_only(1333, 20_000));
        assert!(!keeps_read_only(5000, 20_000));
        // A tiny limit keeps none.
        assert!(!keeps_read_only(0, 12));
    }

    #[test]
    fn a_relayed_connection_ends_by_its_lifelines_alone() {
        let table = Connections::default();
        let meter = Arc::new(crate::meter::Meter::default());
        let (relayed, holds) = record(7, Carrier::Relayed { meter: meter.clone(), mine: Endpoint::Server });
        // A guest can set every flag of the segment, the daemon's end's
        // included: that must not end the relay's metering.
        close_by_flags(relayed.memory.segment());
        table.add(relayed);
        assert!(table.take_finished(|_| ()).is_empty());
        drop(holds);
        assert_eq!(ids(&table.take_finished(|_| ())), [7]);
    }

    #[test]
    fn metering_reads_the_larger_index_or_the_relays_count() {
        let (shared, _holds) = record(1, Carrier::Shared(pair(1)));
        let client_ring = Endpoint::Client.tx_ring();
        shared.memory.segment().producer(client_ring).write(&[b"hello"]).unwrap();
        assert_eq!((shared.bytes_client_to_server(), shared.bytes_server_to_client()), (5, 0));
        // A client rewinding its own tail cannot go below what the server
        // has taken.
        let mut buf = [0u8; 5];
        shared.memory.segment().consumer(client_ring).read(&mut [&mut buf[..]], false).unwrap();
        shared.memory.segment().forge_for_tests(client_ring, 0);
        assert_eq!(shared.bytes_client_to_server(), 5);

        let meter = Arc::new(crate::meter::Meter::default());
        let (relayed, _holds) = record(2, Carrier::Relayed { meter: meter.clone(), mine: Endpoint::Server });
        meter.taken.store(11, Ordering::Relaxed);
        meter.given.store(22, Ordering::Relaxed);
        relayed.memory.segment().producer(client_ring).write(&[b"ignored"]).unwrap();
        assert_eq!((relayed.bytes_client_to_server(), relayed.bytes_server_to_client()), (11, 22));
    }

    #[test]
    fn a_released_segment_is_reclaimed_by_its_own_pair_only() {
        let table = Connections::default();
        let (done, _holds) = record(1, Carrier::Shared(pair(1)));
        close_by_flags(done.memory.segment());
        for end in 0..2 {
            done.memory.segment().released(end).store(1, Ordering::Release);
        }
        let (busy, _busy_holds) = record(2, Carrier::Shared(pair(1)));
        table.add(busy);
        table.add(done);
        assert!(table.reclaim(pair(2), false, |_| ()).is_none(), "another pair");
        assert_eq!(table.reclaim(pair(1), false, |_| ()).map(|(c, ())| c.id.0), Some(1));
        assert!(table.reclaim(pair(1), false, |_| ()).is_none(), "taken once; the other is still in use");
    }
}
