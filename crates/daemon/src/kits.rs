//! Kits: connection setup off the daemon's path (ARCHITECTURE §3b).
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
//! no longer allows, or whose client or listener is gone, or which the
//! daemon hands over, ends: every kit no client took is ended through its
//! take word (which a client must move from free to take it), and every
//! kit a client took and no server accepted is kept for its server (the
//! client went, or a hand-over) or revoked through its claim word (which
//! the server's library must move from waiting to accept it) and reset.

use crate::daemon::Daemon;
use crate::grants::{batch_fds, Batch, GrantKey, GrantRecord, State};
use crate::guest::GuestSlot;
use crate::ids::{ChannelId, ConnectionId, ListenerId};
use crate::listeners::ListenerRecord;
use crate::policy::Policy;
use crate::pool::KitChunk;
use crate::sync::lock;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vsocket_abi::control::{Grant, Message, Place, MAX_CHUNKS, MAX_KITS};
use vsocket_abi::grant::SLOTS;
use vsocket_abi::layout::Endpoint;
use vsocket_abi::layout::{taken_port, KIT_ACCEPTED, KIT_FREE, KIT_GONE, KIT_REVOKED, KIT_WAITING};
use vsocket_ring::ConnectQueue;

/// Kits for the client of a connect just made from `channel` to
/// `listener`, under `policy`: a batch if the pair has a grant (made now
/// on its second connect) and the listener takes kits. The server's ends
/// are on the listener channel before this returns.
pub fn for_connect(
    daemon: &Daemon,
    client: &Arc<GuestSlot>,
    channel: ChannelId,
    listener: &Arc<ListenerRecord>,
    client_addr: Ipv4Addr,
    server: SocketAddrV4,
) -> Option<Batch> {
    let bell = listener.bell.as_ref()?;
    let kit_channel = listener.kit_channel.as_ref()?;
    if listener.kits_off.load(Ordering::Acquire) {
        return None;
    }
    let key = GrantKey { channel, listener: listener.id, client: client_addr, server };
    let grant = daemon.grants.get_or_make(key, || {
        let id = daemon.ids.grant();
        let (queue, client_page, server_page) = ConnectQueue::create(id)?;
        Ok(GrantRecord {
            id,
            key,
            listener: listener.clone(),
            client: client.clone(),
            queue,
            client_page,
            server_page,
            state: Mutex::new(State::default()),
            decided_by: Mutex::new(String::new()),
        })
    })?;
    let mut state = lock(&grant.state);
    if state.over {
        return None;
    }
    // The policy in force now, not the one the connect was decided with:
    // a change published since then has its `enforce` see this grant (it
    // is in the table), or is the policy read here.
    let policy = &daemon.policy();
    let decided = crate::connections::flow_decided(policy, client, client_addr, &listener.guest, server);
    *lock(&grant.decided_by) = decided.ok()?;
    // The kits taken since the last batch are announced before the queue
    // can wrap (a batch is half its slots). Kits accepted (or retired)
    // since are no longer the grant's to revoke.
    daemon.announce_taken(&grant, &mut state);
    state.unaccepted.retain(|&id| {
        daemon.connections.with(id, |c| c.memory.segment().claim().load(Ordering::Acquire) == KIT_WAITING) == Some(true)
    });
    // A server that falls behind its clients by more than the queue
    // holds would miss their slots: no more kits until it catches up
    // (connects go through the daemon meanwhile).
    // Kits retired without being announced (their processes went) wait
    // for nothing.
    state.waiting.retain(|_, id| daemon.connections.with(*id, |_| ()).is_some());
    let taken_waiting = state.unaccepted.len().saturating_sub(state.waiting.len());
    if taken_waiting + MAX_KITS as usize > SLOTS {
        return None;
    }
    // A client asks again only when its kits are used up: one that asks
    // while it holds a batch (a hostile one, charging the server's guest
    // for kits it never takes) gets no more.
    if state.waiting.len() >= MAX_KITS as usize {
        return None;
    }
    let first = state.next;
    let mut made = Vec::new();
    let mut batch = Grant::in_one_chunk(grant.id, first, 1);
    let mut chunks: Vec<Arc<KitChunk>> = Vec::new();
    // One lifeline for the batch: both processes hold its write end while
    // they hold any of its kits or the connections made from them.
    let (lifeline, holds) = vsocket_sys::pipe().ok()?;
    let lifeline = Arc::new(lifeline);
    for sequence in first..first.saturating_add(batch_size(policy, client, &listener.guest)) {
        let Some(kit) = crate::connect::make_kit(daemon, policy, &grant, sequence, &lifeline) else { break };
        let chunk = match chunks.iter().position(|c| Arc::ptr_eq(c, &kit.piece.chunk)) {
            Some(at) => at,
            // A kit in one chunk too many waits for the next batch: this
            // one is ended (its lifeline is the batch's, which the batch's
            // processes will hold), and the reaper retires it.
            None if chunks.len() == MAX_CHUNKS as usize => {
                daemon.connections.with(kit.id, |c| {
                    c.memory.segment().take().store(KIT_GONE, Ordering::Release);
                    c.reset();
                });
                kit.give_back_bells();
                break;
            }
            None => {
                chunks.push(kit.piece.chunk.clone());
                chunks.len() - 1
            }
        };
        batch.places[made.len()] = Place { chunk: chunk as u8, piece: kit.piece.index };
        if kit.client.bell.is_none() {
            batch.kept |= 1 << made.len();
        }
        made.push((sequence, kit));
    }
    if made.is_empty() {
        return None;
    }
    batch.count = made.len() as u8;
    batch.chunks = chunks.len() as u8;
    let mut fds = vec![grant.server_page.as_fd()];
    fds.extend(batch_fds(&holds, &chunks, made.iter().map(|(_, kit)| &kit.server), Endpoint::Server).ok()?);
    let kits = Message::Kits { grant: batch, client: client_addr, server };
    let mut buf = [0u8; vsocket_abi::control::MAX_MESSAGE];
    if let Err(e) = vsocket_sys::send_with_fds(kit_channel.as_fd(), kits.encode(&mut buf), &fds) {
        // Nobody holds these kits: once `made` and `holds` are dropped,
        // their lifeline hangs up and the reaper retires them without a
        // trace. A listener whose kit channel is gone takes none any more.
        tracing::debug!(grant = grant.id, error = %e, "kits not taken by the listener");
        if e.kind() != std::io::ErrorKind::WouldBlock {
            listener.kits_off.store(true, Ordering::Release);
        }
        made.iter().for_each(|(_, kit)| kit.give_back_bells());
        return None;
    }
    state.next = first + made.len() as u32;
    let mut client_ends = Vec::with_capacity(made.len());
    for (sequence, kit) in made {
        state.waiting.insert(sequence, kit.id);
        state.unaccepted.push(kit.id);
        client_ends.push(kit.client);
    }
    drop(state);
    Some(Batch {
        grant: batch,
        page: grant.client_page.try_clone().ok()?,
        bell: bell.try_clone().ok()?,
        holds,
        chunks,
        kits: client_ends,
    })
}

/// How many kits a batch for a pair of guests has: at most [`MAX_KITS`],
/// and at most a quarter of what either guest's quotas still allow, so
/// that kits one process holds never take a guest's last connections
/// from its other processes.
fn batch_size(policy: &Policy, client: &GuestSlot, server: &GuestSlot) -> u32 {
    let segment = policy.config.host().segment_size().max(1);
    let room = |slot: &GuestSlot| {
        let quotas = policy.quotas(slot);
        let usage = &slot.counters.quota;
        let connections = quotas.max_connections.saturating_sub(usage.connections());
        let memory = quotas.max_shared_memory.saturating_sub(usage.shared_memory()) / segment;
        connections.min(memory) / 4
    };
    (MAX_KITS as u64).min(room(client)).min(room(server)) as u32
}

/// What ending a grant does with the kits its clients took and no server
/// accepted yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// They are connections made: the server accepts them from the queue
    /// as before. (The client process went, as a kernel client may go
    /// with its connection still in the backlog; the daemon hands over.)
    /// One whose slot is not in the queue yet is waited for until `until`
    /// (one deadline for every grant ended together), and reset if it
    /// does not come.
    Keep { until: Instant },
    /// They are reset (the listener went, or the flow is denied).
    Reset,
}

/// How long a hand-over waits for the slots of kits taken as it began:
/// a client writes its slot right after it takes its kit.
const SLOTS_AT_HANDOVER: Duration = Duration::from_millis(200);

/// A kit a client took that no server had accepted when its grant ended:
/// its record, sequence number and the port its client took it with.
type Took = (ConnectionId, u32, u16);

/// Ends the grants `which` picks, for `why`; returns how many.
///
/// Every kit no client took is ended through its take word, in every
/// grant first, so that none can be taken from then on; those taken are
/// announced (they are connections), and kept or reset as `taken` says.
/// Where they are kept, one wait serves every grant. Each listener is
/// then told to let its grant go (`Revoke`): it keeps only the kits whose
/// slots it finds in the queue, which by then are all the kept ones.
fn end_where(daemon: &Daemon, which: impl Fn(&GrantKey) -> bool, why: &str, taken: Taken) -> usize {
    let ended = daemon.grants.take(which);
    let endings: Vec<(&GrantRecord, Vec<Took>)> = ended.iter().map(|g| (&**g, end_free_kits(daemon, g))).collect();
    // A kit taken has its slot written right after: it is waited for
    // where the kit is to be kept.
    if let Taken::Keep { until } = taken {
        while Instant::now() < until && endings.iter().any(|(g, took)| slot_unread(daemon, g, took)) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for (grant, took) in &endings {
        finish(daemon, grant, took, why, taken);
    }
    ended.len()
}

/// Ends `grant`'s kits no client took; returns those taken and not yet
/// accepted.
fn end_free_kits(daemon: &Daemon, grant: &GrantRecord) -> Vec<Took> {
    let mut state = lock(&grant.state);
    state.over = true;
    daemon.announce_taken(grant, &mut state);
    // Each kit no server accepted: ended if no client took it (the take
    // word decides, once, between a client and the daemon), else taken.
    let mut took = Vec::new();
    for id in std::mem::take(&mut state.unaccepted) {
        daemon.connections.with(id, |c| {
            let segment = c.memory.segment();
            if segment.claim().load(Ordering::Acquire) == KIT_ACCEPTED {
                // Accepted since last looked at: a connection like any.
                return;
            }
            match segment.take().compare_exchange(KIT_FREE, KIT_GONE, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let _ =
                        segment.claim().compare_exchange(KIT_WAITING, KIT_REVOKED, Ordering::AcqRel, Ordering::Acquire);
                    c.reset();
                }
                Err(word) => {
                    let sequence = c.kit.as_ref().map_or(0, |k| k.sequence);
                    took.push((id, sequence, taken_port(word).unwrap_or(0)));
                }
            }
        });
    }
    took
}

/// Is the slot of one of `took`, kits of `grant`, not in its queue yet?
fn slot_unread(daemon: &Daemon, grant: &GrantRecord, took: &[Took]) -> bool {
    let mut state = lock(&grant.state);
    daemon.announce_taken(grant, &mut state);
    took.iter().any(|(_, sequence, _)| state.waiting.contains_key(sequence))
}

/// Ends `grant`, whose free kits [`end_free_kits`] ended: the kits taken
/// (`took`) are announced, and kept or reset; the listener is told.
fn finish(daemon: &Daemon, grant: &GrantRecord, took: &[Took], why: &str, taken: Taken) {
    let mut state = lock(&grant.state);
    daemon.announce_taken(grant, &mut state);
    let decided_by = lock(&grant.decided_by).clone();
    let mut reset = 0;
    for &(id, sequence, port) in took {
        // Taken with no slot read: a connection all the same, which no
        // server will find.
        let unpublished = state.waiting.remove(&sequence).is_some();
        daemon.announce(grant, id, port, &decided_by);
        if taken == Taken::Reset || unpublished {
            daemon.connections.with(id, |c| {
                let claim = c.memory.segment().claim();
                if claim.compare_exchange(KIT_WAITING, KIT_REVOKED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    c.reset();
                    reset += 1;
                }
            });
        }
    }
    state.waiting.clear();
    drop(state);
    if reset > 0 {
        tracing::info!(grant = grant.id, reset, %why, "connections made ahead and not yet accepted reset");
    }
    if let Some(kit_channel) = &grant.listener.kit_channel {
        let mut buf = [0u8; vsocket_abi::control::MAX_MESSAGE];
        let _ =
            vsocket_sys::send_with_fds(kit_channel.as_fd(), Message::Revoke { grant: grant.id }.encode(&mut buf), &[]);
    }
    tracing::debug!(grant = grant.id, %why, kept = took.len() - reset, "grant ended");
}

/// The client process of `channel` is gone (or exec'd): its grants end.
pub fn channel_closed(daemon: &Daemon, channel: ChannelId) {
    end_where(daemon, |k| k.channel == channel, "client process gone", Taken::Keep { until: Instant::now() });
}

/// The library of listener `listener` takes no more kits: its grants end
/// and it gets no more.
pub fn listener_takes_no_kits(daemon: &Daemon, listener: &ListenerRecord) {
    listener.kits_off.store(true, Ordering::Release);
    listener_closed(daemon, listener.id);
}

/// Listener `listener` is gone: its grants end.
pub fn listener_closed(daemon: &Daemon, listener: ListenerId) {
    end_where(daemon, |k| k.listener == listener, "listener gone", Taken::Reset);
}

/// Every grant ends (the daemon hands over to a successor, which knows
/// none). The kits taken go over as connections, for their servers to
/// accept.
pub fn end_all(daemon: &Daemon) {
    end_where(daemon, |_| true, "daemon handing over", Taken::Keep { until: Instant::now() + SLOTS_AT_HANDOVER });
}

/// Applies a policy change to the grants, before it is reported applied:
/// a grant whose flow `policy` no longer allows ends (its connections
/// already made are the connection table's, which `Daemon::enforce`
/// treats as any other). Returns how many ended.
pub fn enforce(daemon: &Daemon, policy: &Policy) -> usize {
    let denied: HashSet<GrantKey> = daemon
        .grants
        .all()
        .iter()
        .filter(|g| {
            crate::connections::flow_allowed(policy, &g.client, g.key.client, &g.listener.guest, g.key.server).is_err()
        })
        .map(|g| g.key)
        .collect();
    if denied.is_empty() {
        return 0;
    }
    end_where(daemon, |k| denied.contains(k), "denied by a policy change", Taken::Reset)
}
