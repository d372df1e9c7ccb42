//! Per-guest quotas: live connections, their shared memory, and control
//! channels.
//!
//! Every guest has its own [`QuotaUsage`], in the counters of its
//! [`GuestSlot`] (which outlives policy changes), and its own limits
//! (`Guest::quotas` in the policy in force, read at each take, so a change
//! of limits applies to the next connect or channel), so a guest that
//! reaches a limit is refused on its own account and never takes from
//! another's share. What is held is taken before the thing exists and
//! given back exactly once, to the slots it was taken from (never looked up
//! again by `GuestId`, which a policy change may move or end):
//!
//! - a connection takes one connection and one segment's bytes from each
//!   guest it joins (once when both ends are in one guest), as a [`Charge`]
//!   (holding those guests' slots) stored in its `ConnectionRecord`; the
//!   charge is given back when the record is retired (`Daemon::reap` or
//!   `Daemon::reclaim`) or, failing that, when it is dropped, so whatever
//!   policy changes, resets or guest removals happen meanwhile; a charge
//!   never stored (the connection never came to be) is given back when
//!   dropped;
//! - a control channel takes one channel for as long as its thread runs
//!   (`attach::ChannelSlot`, holding the slot).
//!
//! Segments the pool keeps for reuse between two processes are not live
//! connections and are not counted (see docs/ARCHITECTURE.md §3, *Quotas*).

use crate::state::GuestSlot;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vsocket_policy::Quotas;

/// The quotas a guest can exceed, as named in metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    Connections,
    SharedMemory,
    Channels,
}

impl Quota {
    pub const ALL: [Quota; 3] = [Quota::Connections, Quota::SharedMemory, Quota::Channels];

    /// The name in metrics labels, reports and logs.
    pub fn name(self) -> &'static str {
        match self {
            Quota::Connections => "connections",
            Quota::SharedMemory => "shared_memory",
            Quota::Channels => "channels",
        }
    }

    /// The limit of this kind in `quotas`.
    pub fn limit(self, quotas: &Quotas) -> u64 {
        match self {
            Quota::Connections => quotas.max_connections,
            Quota::SharedMemory => quotas.max_shared_memory,
            Quota::Channels => quotas.max_channels,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How often at most a guest's refusals of one kind are logged: a program
/// retrying a refused connect in a loop must not flood the log.
pub const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// How often at most a guest at a connection quota makes the daemon look
/// for closed connections to retire before refusing it (each look scans
/// every connection on the host, under the lock other guests' connects
/// take).
pub const REAP_INTERVAL: Duration = Duration::from_millis(10);

/// What one guest holds now, and how often it was refused.
#[derive(Debug, Default)]
pub struct QuotaUsage {
    /// Connections and their segment bytes, changed together.
    held: Mutex<Held>,
    channels: AtomicU64,
    exceeded: [AtomicU64; 3],
    /// When a refusal of each kind was last logged (ms since the daemon's
    /// start, 0 = never), and refusals since then not logged.
    last_warned_ms: [AtomicU64; 3],
    unlogged: [AtomicU64; 3],
    /// When this guest last had the daemon reap on its behalf (as above).
    last_reap_ms: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Held {
    connections: u64,
    shared_memory: u64,
}

impl QuotaUsage {
    /// Takes one connection with a segment of `bytes`, if both fit.
    pub fn take_connection(&self, limits: &Quotas, bytes: u64) -> Result<(), Quota> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.connections >= limits.max_connections {
            return Err(Quota::Connections);
        }
        if held.shared_memory.saturating_add(bytes) > limits.max_shared_memory {
            return Err(Quota::SharedMemory);
        }
        held.connections += 1;
        held.shared_memory += bytes;
        Ok(())
    }

    /// Gives back what [`take_connection`](Self::take_connection) took.
    pub fn give_back_connection(&self, bytes: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert!(held.connections >= 1 && held.shared_memory >= bytes, "quota given back twice");
        held.connections = held.connections.saturating_sub(1);
        held.shared_memory = held.shared_memory.saturating_sub(bytes);
    }

    /// Takes one control channel, if it fits.
    pub fn take_channel(&self, limits: &Quotas) -> Result<(), Quota> {
        self.channels
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limits.max_channels).then_some(n + 1))
            .map(|_| ())
            .map_err(|_| Quota::Channels)
    }

    pub fn give_back_channel(&self) {
        let _ = self.channels.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Live connections held now.
    pub fn connections(&self) -> u64 {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).connections
    }

    /// Segment bytes of live connections held now.
    pub fn shared_memory(&self) -> u64 {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).shared_memory
    }

    /// Control channels open now.
    pub fn channels(&self) -> u64 {
        self.channels.load(Ordering::Relaxed)
    }

    /// Refusals of this kind so far.
    pub fn exceeded(&self, quota: Quota) -> u64 {
        self.exceeded[quota.index()].load(Ordering::Relaxed)
    }

    /// May this guest, at a limit at `now_ms`, have the daemon reap now?
    /// At most once per [`REAP_INTERVAL`].
    pub fn reap_due(&self, now_ms: u64) -> bool {
        let now = now_ms.max(1);
        let last = self.last_reap_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= REAP_INTERVAL.as_millis() as u64)
            && self.last_reap_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
    }

    /// Counts a refusal at `now_ms` (ms since the daemon started). Returns
    /// `Some(unlogged)` when this refusal should be logged, `unlogged` being
    /// how many before it were not (at most one log line per
    /// [`WARN_INTERVAL`] per guest and kind).
    pub fn note_exceeded(&self, quota: Quota, now_ms: u64) -> Option<u64> {
        let i = quota.index();
        self.exceeded[i].fetch_add(1, Ordering::Relaxed);
        // 0 means never: a refusal in the daemon's first millisecond still logs.
        let now = now_ms.max(1);
        let last = self.last_warned_ms[i].load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= WARN_INTERVAL.as_millis() as u64;
        if due && self.last_warned_ms[i].compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            Some(self.unlogged[i].swap(0, Ordering::Relaxed))
        } else {
            self.unlogged[i].fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Milliseconds since the daemon first asked (its start, in practice).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What one live connection holds of its guests' quotas: one connection
/// and `bytes` of shared memory from the client's guest, and from the
/// server's if that is another guest. It holds the guests' slots, so it
/// gives back to exactly the guests it took from, whatever policy changes
/// happen while the connection lives (a removed guest's slot, no longer in
/// any snapshot, still gets its share back). Given back once: by
/// [`Charge::give_back`], or when dropped if it was not.
#[derive(Debug)]
#[must_use]
pub struct Charge {
    client: Arc<GuestSlot>,
    server: Option<Arc<GuestSlot>>,
    bytes: u64,
    given_back: bool,
}

impl Charge {
    /// The guests charged: one or two.
    pub fn guests(&self) -> impl Iterator<Item = &Arc<GuestSlot>> + '_ {
        std::iter::once(&self.client).chain(self.server.as_ref())
    }

    /// Segment bytes taken from each guest charged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back what the charge holds; later calls (and the drop) do
    /// nothing.
    pub fn give_back(&mut self) {
        if std::mem::replace(&mut self.given_back, true) {
            return;
        }
        for slot in std::iter::once(&self.client).chain(self.server.as_ref()) {
            slot.counters.quota.give_back_connection(self.bytes);
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// Which end's guest a connect exceeded, and its quota.
#[derive(Debug, Clone)]
pub struct Exceeded {
    /// The guest over its quota.
    pub guest: Arc<GuestSlot>,
    pub quota: Quota,
    /// Its limit, as the policy in force set it.
    pub limit: u64,
    /// The server's guest (not the client's) is over its quota.
    pub server: bool,
}

impl PartialEq for Exceeded {
    fn eq(&self, other: &Exceeded) -> bool {
        Arc::ptr_eq(&self.guest, &other.guest)
            && (self.quota, self.limit, self.server) == (other.quota, other.limit, other.server)
    }
}

impl Exceeded {
    /// The errno the connecting program gets (see docs/ARCHITECTURE.md §3, *Quotas*).
    ///
    /// - the client's guest has as many connections as it may:
    ///   `EADDRNOTAVAIL`, what Linux's connect gives when the host cannot
    ///   have another outgoing connection (its ephemeral ports are used
    ///   up); it clears when a connection closes. Not `EAGAIN`: asyncio
    ///   and others take `EAGAIN` from a non-blocking connect for "in
    ///   progress", wait for writability and then believe it connected;
    /// - the client's guest has no room for another segment: `ENOBUFS`,
    ///   "No buffer space available", what Linux gives when socket buffer
    ///   memory runs out;
    /// - the server's guest is over either quota: `ECONNREFUSED`, as when a
    ///   listener's backlog is full (vSocket refuses those too); the
    ///   client cannot tell it from the server being busy, and nothing of
    ///   the server's quota is told to another tenant.
    pub fn errno(&self) -> i32 {
        errno(self.server, self.quota)
    }
}

fn errno(server: bool, quota: Quota) -> i32 {
    match (server, quota) {
        (true, _) => libc::ECONNREFUSED,
        (false, Quota::Connections | Quota::Channels) => libc::EADDRNOTAVAIL,
        (false, Quota::SharedMemory) => libc::ENOBUFS,
    }
}

/// Takes a connection from `client` and, if it is another guest, from
/// `server`; `limits` gives a guest's quotas in the policy in force. All or
/// nothing: if the server's guest is over, the client's is given back.
pub fn charge(
    limits: impl Fn(&GuestSlot) -> Quotas,
    client: &Arc<GuestSlot>,
    server: &Arc<GuestSlot>,
    bytes: u64,
) -> Result<Charge, Exceeded> {
    let over = |slot: &Arc<GuestSlot>, quotas: &Quotas, quota: Quota, server| Exceeded {
        guest: slot.clone(),
        quota,
        limit: quota.limit(quotas),
        server,
    };
    let client_limits = limits(client);
    client.counters.quota.take_connection(&client_limits, bytes).map_err(|q| over(client, &client_limits, q, false))?;
    let mut charge = Charge { client: client.clone(), server: None, bytes, given_back: false };
    if Arc::ptr_eq(client, server) {
        return Ok(charge);
    }
    let server_limits = limits(server);
    // On an error `charge` (the client's share alone) is dropped: given back.
    server.counters.quota.take_connection(&server_limits, bytes).map_err(|q| over(server, &server_limits, q, true))?;
    charge.server = Some(server.clone());
    Ok(charge)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: u64, shared_memory: u64) -> Quotas {
        Quotas { max_connections: connections, max_shared_memory: shared_memory, max_channels: 2 }
    }

    /// Three guests' slots (from a real config: slots are made from one).
    fn guests() -> [Arc<GuestSlot>; 3] {
        let text = r#"
            [host]
            name = "h"
            [[vpc]]
            name = "v"
            cidr = "10.0.0.0/24"
            [[guest]]
            name = "a"
            vpc = "v"
            addresses = ["10.0.0.2"]
            [[guest]]
            name = "b"
            vpc = "v"
            addresses = ["10.0.0.3"]
            [[guest]]
            name = "c"
            vpc = "v"
            addresses = ["10.0.0.4"]
        "#;
        let config = vsocket_policy::parse(text, std::path::Path::new("t.toml")).unwrap();
        let slots: Vec<Arc<GuestSlot>> =
            config.guests().map(|(id, _)| Arc::new(GuestSlot::new(id.index() as u64 + 1, &config, id))).collect();
        [slots[0].clone(), slots[1].clone(), slots[2].clone()]
    }

    fn held(slot: &GuestSlot) -> (u64, u64) {
        (slot.counters.quota.connections(), slot.counters.quota.shared_memory())
    }

    fn over(guest: &Arc<GuestSlot>, quota: Quota, limit: u64, server: bool) -> Option<Exceeded> {
        Some(Exceeded { guest: guest.clone(), quota, limit, server })
    }

    #[test]
    fn a_connection_is_charged_the_memory_its_segment_takes() {
        for ring_size in [4096u32, 1 << 18, 1 << 20] {
            let text = format!("[host]\nname = \"h\"\nring_size = {ring_size}\n");
            let config = vsocket_policy::parse(&text, std::path::Path::new("t.toml")).unwrap();
            let (_view, files) = vsocket_ring::Segment::create(ring_size).unwrap();
            let bytes: u64 =
                files.rw.iter().map(|f| std::fs::File::from(f.try_clone().unwrap()).metadata().unwrap().len()).sum();
            assert_eq!(config.host().segment_size(), bytes, "rings of {ring_size}");
            assert_eq!(bytes, vsocket_abi::layout::segment_size(ring_size) as u64);
        }
    }

    #[test]
    fn connections_are_limited_per_guest_and_given_back() {
        let [a, b, c] = guests();
        // a may hold 2, b 3, c plenty.
        let lim = |g: &GuestSlot| match g.name.as_str() {
            "a" => limits(2, 1000),
            "b" => limits(3, 1000),
            _ => limits(100, 1000),
        };
        let mut first = charge(lim, &a, &b, 10).unwrap();
        let second = charge(lim, &a, &b, 10).unwrap();
        assert_eq!(second.guests().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(second.bytes(), 10);
        assert_eq!(charge(lim, &a, &b, 10).err(), over(&a, Quota::Connections, 2, false));
        assert_eq!(held(&a), (2, 20));
        assert_eq!(held(&b).0, 2, "a's refusal took nothing from b");
        // c is not affected by a being full, but b fills up with c's.
        let third = charge(lim, &c, &b, 10).unwrap();
        assert_eq!(charge(lim, &c, &b, 10).err(), over(&b, Quota::Connections, 3, true));
        assert_eq!(held(&c).0, 1, "c's side was given back when b's was over");
        first.give_back();
        assert_eq!((held(&a).0, held(&b).0), (1, 2));
        first.give_back();
        drop(first);
        assert_eq!((held(&a).0, held(&b).0), (1, 2), "given back once only");
        let fourth = charge(lim, &a, &c, 10).unwrap();
        drop(second);
        assert_eq!((held(&a), held(&b).1), ((1, 10), 10));
        drop((third, fourth));
        assert_eq!((held(&a), held(&b), held(&c)), ((0, 0), (0, 0), (0, 0)));
    }

    #[test]
    fn a_connection_inside_one_guest_counts_once() {
        let [a, ..] = guests();
        let lim = |_: &GuestSlot| limits(1, 1000);
        let mut inside = charge(lim, &a, &a, 100).unwrap();
        assert_eq!(inside.guests().count(), 1);
        assert_eq!(held(&a), (1, 100));
        inside.give_back();
        assert_eq!(held(&a), (0, 0));
    }

    #[test]
    fn shared_memory_is_limited_in_bytes() {
        let [a, b, _] = guests();
        let lim = |g: &GuestSlot| if g.name == "a" { limits(100, 250) } else { limits(100, 1000) };
        let _one = charge(lim, &a, &b, 100).unwrap();
        let _two = charge(lim, &a, &b, 100).unwrap();
        let third = charge(lim, &a, &b, 100).err().unwrap();
        assert_eq!(Some(third.clone()), over(&a, Quota::SharedMemory, 250, false));
        assert_eq!(third.errno(), libc::ENOBUFS);
        let lim = |g: &GuestSlot| if g.name == "b" { limits(100, 150) } else { limits(100, 1000) };
        let full_server = charge(lim, &a, &b, 100).err().unwrap();
        assert_eq!(full_server.errno(), libc::ECONNREFUSED);
        assert_eq!(held(&a).1, 200, "the client's bytes were given back");
    }

    #[test]
    fn errnos_are_those_documented() {
        assert_eq!(errno(false, Quota::Connections), libc::EADDRNOTAVAIL);
        assert_eq!(errno(false, Quota::SharedMemory), libc::ENOBUFS);
        assert_eq!(errno(true, Quota::Connections), libc::ECONNREFUSED);
        assert_eq!(errno(true, Quota::SharedMemory), libc::ECONNREFUSED);
    }

    #[test]
    fn a_charge_is_given_back_once_to_its_own_slots() {
        let [a, b, _] = guests();
        let lim = |_: &GuestSlot| limits(5, 1000);
        let dropped = charge(lim, &a, &b, 7).unwrap();
        assert_eq!(held(&b).0, 1);
        drop(dropped);
        assert_eq!((held(&a).0, held(&b)), (0, (0, 0)));
        let mut kept = charge(lim, &a, &b, 7).unwrap();
        assert_eq!((held(&a).0, held(&b).0), (1, 1), "kept: still held");
        // The guest is removed from the policy: its slot still gets it back.
        b.remove();
        kept.give_back();
        kept.give_back();
        drop(kept);
        assert_eq!((held(&a).0, held(&b).0), (0, 0));
    }

    #[test]
    fn channels_are_limited_and_given_back() {
        let usage = QuotaUsage::default();
        let lim = limits(1, 1);
        usage.take_channel(&lim).unwrap();
        usage.take_channel(&lim).unwrap();
        assert_eq!(usage.take_channel(&lim), Err(Quota::Channels));
        assert_eq!(usage.channels(), 2);
        usage.give_back_channel();
        assert_eq!(usage.channels(), 1);
        usage.take_channel(&lim).unwrap();
        usage.give_back_channel();
        usage.give_back_channel();
        assert_eq!(usage.channels(), 0);
        usage.give_back_channel();
        assert_eq!(usage.channels(), 0, "never below zero");
    }

    #[test]
    fn refusals_are_all_counted_but_logged_once_a_second() {
        let usage = QuotaUsage::default();
        assert_eq!(usage.note_exceeded(Quota::Connections, 0), Some(0), "the first is logged");
        assert_eq!(usage.note_exceeded(Quota::Connections, 10), None);
        assert_eq!(usage.note_exceeded(Quota::Connections, 999), None);
        assert_eq!(usage.note_exceeded(Quota::Channels, 999), Some(0), "each kind on its own");
        assert_eq!(usage.note_exceeded(Quota::Connections, 1001), Some(2), "two went unlogged");
        assert_eq!(usage.note_exceeded(Quota::Connections, 1500), None);
        assert_eq!(usage.exceeded(Quota::Connections), 5);
        assert_eq!(usage.exceeded(Quota::Channels), 1);
        assert_eq!(usage.exceeded(Quota::SharedMemory), 0);
    }

    #[test]
    fn reaping_on_a_guests_behalf_is_throttled() {
        let usage = QuotaUsage::default();
        assert!(usage.reap_due(0));
        assert!(!usage.reap_due(5));
        assert!(usage.reap_due(11));
        assert!(!usage.reap_due(20));
        assert!(usage.reap_due(21));
    }
}
