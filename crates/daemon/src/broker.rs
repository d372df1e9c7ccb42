//! The connection broker: what a guest may listen on and connect to.
//!
//! A connect to (VPC, address, port) is carried over vSocket only if a
//! vSocket listener serves that address in the client's VPC and the
//! security groups of both ends allow it (egress of the client's, ingress
//! of the server's). No listener: the library falls back to the kernel.
//! Denied: the connect fails as behind the cloud's firewall (a silent drop,
//! or ECONNREFUSED where the operator configured `reject`). Allowed, but a
//! guest at one of its quotas: the connect fails with the errno
//! [`Exceeded::errno`] chooses.
//!
//! Each connect is decided with the policy snapshot in force when it
//! arrives (`Daemon::policy`), so a live change applies from the next
//! connect on (quota limits included). A guest removed by a change is no
//! longer served: its connects (until its channels close) fall back to the
//! kernel, and a listener of a removed guest is not found.

use crate::flowlog::{FlowEvent, FlowRecord, FlowVerdict};
use crate::quota::{Charge, Exceeded};
use crate::state::{ConnectionRecord, Daemon, GuestSlot, ListenerRecord};
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;
use vsocket_abi::control::{ConnectionInfo, Message, MAX_MESSAGE};
use vsocket_abi::layout::Endpoint;
use vsocket_policy::{evaluate, DenyAction, Flow, Protocol, Verdict};

/// How long a connection may wait for room in a listener's channel.
const LISTENER_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A reply and the descriptors to attach to it.
pub struct Reply {
    pub message: Message,
    pub fds: Vec<OwnedFd>,
}

impl Reply {
    fn plain(message: Message) -> Reply {
        Reply { message, fds: Vec::new() }
    }
}

/// Checks a `Listen` request. On success returns the record to register.
pub fn listen(
    daemon: &Daemon,
    guest: &Arc<GuestSlot>,
    local: SocketAddrV4,
    channel: OwnedFd,
) -> Result<Arc<ListenerRecord>, i32> {
    if local.port() == 0 {
        return Err(libc::EINVAL);
    }
    if !local.ip().is_unspecified() && !local.ip().is_loopback() && !guest.addresses.contains(local.ip()) {
        // A guest may only listen on its own addresses (loopback ones are
        // reachable from inside the guest only).
        return Err(libc::EADDRNOTAVAIL);
    }
    // A listener that stops accepting must not hold a connecting client
    // (and its channel thread) forever: its backlog is full, the connect
    // is refused.
    if vsocket_sys::set_send_timeout(channel.as_fd(), LISTENER_SEND_TIMEOUT).is_err() {
        return Err(libc::ENOBUFS);
    }
    Ok(Arc::new(ListenerRecord {
        id: daemon.next_id(),
        guest: guest.clone(),
        local,
        channel,
        accepted: Default::default(),
    }))
}

/// Decides a `Connect` request from `guest`, and records the decision in
/// the flow log. `channel` identifies the client's request channel (its
/// process).
pub fn connect(
    daemon: &Daemon,
    guest: &Arc<GuestSlot>,
    channel: u64,
    local: SocketAddrV4,
    remote: SocketAddrV4,
) -> Reply {
    let policy = daemon.policy();
    let config = &policy.config;
    let g = guest;
    let counters = &guest.counters;
    // The source address the guest's kernel would pick: the loopback
    // address for loopback, the destination itself when a guest connects to
    // one of its own addresses, else the address the socket is bound to
    // (the guest's word about it is not trusted) or the guest's first.
    let client_ip = if remote.ip().is_loopback() {
        std::net::Ipv4Addr::LOCALHOST
    } else if g.addresses.contains(remote.ip()) {
        *remote.ip()
    } else if g.addresses.contains(local.ip()) {
        *local.ip()
    } else {
        g.addresses[0]
    };
    let client_addr = SocketAddrV4::new(client_ip, local.port());
    let attempt = Attempt { daemon, guest, client_addr, remote };
    let fallback = |why: &str| {
        counters.fallbacks.fetch_add(1, Ordering::Relaxed);
        attempt.log(None, &Reply::plain(Message::Fallback), || why.into());
        Reply::plain(Message::Fallback)
    };
    let Some(client) = policy.guest_id(guest) else {
        // Removed by a live change; its channels are being closed.
        return fallback("guest removed: kernel path");
    };
    let Some(listener) = daemon.find_listener(guest, remote) else {
        if let Some(reply) = connect_remote(daemon, &policy, guest, client, &attempt) {
            return reply;
        }
        return fallback("no vSocket listener: kernel path");
    };
    if Arc::ptr_eq(&listener.guest, guest) {
        // Inside one guest: the traffic never reaches the cloud's network,
        // so security groups do not apply (as on a VM's own loopback).
        let charge = match daemon.charge(&policy, guest, guest, config.host().segment_size()) {
            Ok(charge) => charge,
            Err(exceeded) => return over_quota(&attempt, guest, exceeded),
        };
        let ring_size = config.host().ring_size;
        let reply = match open(daemon, guest, channel, client_addr, &listener, remote, ring_size, charge) {
            Ok(reply) => reply,
            Err(e) => undelivered(guest, remote, e),
        };
        attempt.log(Some(guest), &reply, || "within one guest: security groups do not apply".into());
        return reply;
    }
    let Some(server) = policy.guest_id(&listener.guest) else {
        return fallback("listener's guest removed: kernel path");
    };
    let verdict = verdict_of(config, client, client_ip, server, remote);
    let server_name = &listener.guest.name;
    if let Verdict::Deny { .. } = verdict {
        return deny(&attempt, &listener.guest, config, &verdict);
    }
    let charge = match daemon.charge(&policy, guest, &listener.guest, config.host().segment_size()) {
        Ok(charge) => charge,
        Err(exceeded) => return over_quota(&attempt, &listener.guest, exceeded),
    };
    match open(daemon, guest, channel, client_addr, &listener, remote, config.host().ring_size, charge) {
        Ok(reply) => {
            tracing::debug!(client = %g.name, from = %client_addr, server = %server_name, to = %remote,
                decided_by = %verdict.describe(config), "connect allowed");
            attempt.log(Some(&listener.guest), &reply, || verdict.describe(config));
            reply
        }
        Err(e) => {
            let reply = undelivered(guest, remote, e);
            attempt.log(Some(&listener.guest), &reply, || match reply.message {
                Message::Refused { .. } => "listener backlog full".into(),
                _ => "listener gone: kernel path".into(),
            });
            reply
        }
    }
}

/// A connect to an address placed on another host: egress is decided
/// here, the rest by the server's host (see [`crate::fabric`]). `None` if
/// the address is not on another host or there is no fabric (the caller
/// falls back to the kernel path).
fn connect_remote(
    daemon: &Daemon,
    policy: &crate::state::Policy,
    guest: &Arc<GuestSlot>,
    client: vsocket_policy::GuestId,
    attempt: &Attempt<'_>,
) -> Option<Reply> {
    let config = &policy.config;
    let remote = attempt.remote;
    let vpc = config.guest(client).vpc;
    let server = config.guest_owning(vpc, *remote.ip()).filter(|s| !config.is_local(*s))?;
    let fabric = daemon.fabric.get()?;
    let host = config.guest(server).host.clone();
    let server_slot = policy.slot(server).clone();
    let verdict = verdict_of(config, client, *attempt.client_addr.ip(), server, remote);
    if let Verdict::Deny { side: vsocket_policy::Direction::Egress, .. } = verdict {
        return Some(deny(attempt, &server_slot, config, &verdict));
    }
    let rings = config.fabric()?;
    let charge = match daemon.charge(policy, guest, guest, rings.segment_size()) {
        Ok(charge) => charge,
        Err(exceeded) => return Some(over_quota(attempt, &server_slot, exceeded)),
    };
    let Some(ends) = relayed(daemon, rings.ring_size, Endpoint::Server) else {
        return Some(Reply::plain(Message::Refused { errno: libc::ENOBUFS }));
    };
    let (id, ring_size) = (ends.id, ends.ring_size);
    let request = crate::fabric::OpenRequest {
        vpc: guest.vpc.to_string(),
        guest: guest.name.clone(),
        client: attempt.client_addr,
        server: remote,
        window: ring_size,
    };
    let here = verdict.describe(config);
    let outcome = fabric.open(&host, id, request, ends.conn);
    use crate::fabric::OpenOutcome;
    use vsocket_abi::fabric::Refusal;
    let (reply, why) = match outcome {
        OpenOutcome::Accepted => {
            guest.counters.connections_out.fetch_add(1, Ordering::Relaxed);
            daemon.add_connection(ConnectionRecord {
                id,
                client: guest.clone(),
                client_addr: attempt.client_addr,
                server: server_slot.clone(),
                server_addr: remote,
                opened: SystemTime::now(),
                segment: ends.segment,
                files: ends.files,
                pair: (0, id),
                lifelines: [ends.guest_lifeline, ends.my_lifeline],
                reset: Default::default(),
                charge,
                relayed: Some((ends.meter, Endpoint::Server)),
            });
            let connected =
                Message::Connected(ConnectionInfo { id, local: attempt.client_addr, peer: remote, ring_size });
            let [own, peer] = ends.guest_halves;
            let reply = Reply { message: connected, fds: vec![own, ends.guest_bell, ends.guest_holds, peer] };
            (reply, format!("{here}; accepted by host {host}"))
        }
        OpenOutcome::Refused(Refusal::Errno(errno)) => {
            (Reply::plain(Message::Refused { errno }), format!("refused by host {host} (errno {errno})"))
        }
        OpenOutcome::Refused(Refusal::Dropped) => {
            guest.counters.denied.fetch_add(1, Ordering::Relaxed);
            (Reply::plain(Message::Dropped), format!("denied by host {host}"))
        }
        OpenOutcome::Refused(Refusal::Fallback) => {
            guest.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
            (Reply::plain(Message::Fallback), format!("no vSocket listener on host {host}: kernel path"))
        }
        OpenOutcome::Unreachable(why) => {
            tracing::warn!(client = %guest.name, to = %remote, %host, %why, "fabric peer unreachable; kernel path");
            guest.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
            (Reply::plain(Message::Fallback), format!("host {host} unreachable ({why}): kernel path"))
        }
    };
    attempt.log(Some(&server_slot), &reply, || why);
    Some(reply)
}

/// The server's host's side of a cross-host connect from a guest of host
/// `peer`: the claim is checked against this host's own config (the peer
/// speaks only for guests placed on it), policy is decided again here, and
/// the connection is handed to the listener with the daemon as its client.
pub fn accept_remote(
    daemon: &Daemon,
    peer: &str,
    request: &crate::fabric::OpenRequest,
) -> Result<crate::fabric::NewConn, vsocket_abi::fabric::Refusal> {
    use vsocket_abi::fabric::Refusal;
    let policy = daemon.policy();
    let config = &policy.config;
    let refused = Refusal::Errno(libc::ECONNREFUSED);
    let claimed = config.guest_by_name(&request.guest).filter(|&g| {
        let guest = config.guest(g);
        guest.host == peer && config.vpc(guest.vpc).name == request.vpc && guest.addresses.contains(request.client.ip())
    });
    let Some(client) = claimed else {
        tracing::warn!(%peer, guest = %request.guest, vpc = %request.vpc, from = %request.client,
            "fabric peer asked for a connection from a guest it does not host; refused");
        return Err(refused);
    };
    let client_slot = policy.slot(client).clone();
    let vpc = config.guest(client).vpc;
    let attempt = Attempt { daemon, guest: &client_slot, client_addr: request.client, remote: request.server };
    let server = config.guest_owning(vpc, *request.server.ip()).filter(|s| config.is_local(*s));
    let listener = server.and_then(|_| daemon.find_listener(&client_slot, request.server));
    let (Some(server), Some(listener)) = (server, listener) else {
        attempt.log(None, &Reply::plain(Message::Fallback), || "no vSocket listener: kernel path".into());
        return Err(Refusal::Fallback);
    };
    let verdict = verdict_of(config, client, *request.client.ip(), server, request.server);
    if let Verdict::Deny { .. } = verdict {
        let reply = deny(&attempt, &listener.guest, config, &verdict);
        return Err(match reply.message {
            Message::Dropped => Refusal::Dropped,
            _ => refused,
        });
    }
    let server_slot = listener.guest.clone();
    let rings = config.fabric().ok_or(refused)?;
    let charge = match daemon.charge(&policy, &server_slot, &server_slot, rings.segment_size()) {
        Ok(charge) => charge,
        Err(exceeded) => {
            let exceeded = crate::quota::Exceeded { server: true, ..exceeded };
            over_quota(&attempt, &server_slot, exceeded);
            return Err(refused);
        }
    };
    let Some(ends) = relayed(daemon, rings.ring_size, Endpoint::Client) else {
        return Err(Refusal::Errno(libc::ENOBUFS));
    };
    let (id, ring_size) = (ends.id, ends.ring_size);
    let incoming = Message::Incoming(ConnectionInfo { id, local: request.server, peer: request.client, ring_size });
    let mut buf = [0u8; MAX_MESSAGE];
    let bytes = incoming.encode(&mut buf);
    let [guest_half, daemon_half] = &ends.guest_halves;
    let server_fds = [guest_half.as_fd(), ends.guest_bell.as_fd(), ends.guest_holds.as_fd(), daemon_half.as_fd()];
    if let Err(e) = vsocket_sys::send_with_fds(listener.channel.as_fd(), bytes, &server_fds) {
        let reply = undelivered(&client_slot, request.server, e);
        let refusal = match reply.message {
            Message::Refused { errno } => Refusal::Errno(errno),
            _ => {
                daemon.remove_listener(&listener);
                Refusal::Fallback
            }
        };
        attempt.log(Some(&server_slot), &reply, || "listener unavailable".into());
        return Err(refusal);
    }
    listener.accepted.fetch_add(1, Ordering::Relaxed);
    server_slot.counters.connections_in.fetch_add(1, Ordering::Relaxed);
    daemon.add_connection(ConnectionRecord {
        id,
        client: client_slot.clone(),
        client_addr: request.client,
        server: server_slot.clone(),
        server_addr: request.server,
        opened: SystemTime::now(),
        segment: ends.segment,
        files: ends.files,
        pair: (0, id),
        lifelines: [ends.my_lifeline, ends.guest_lifeline],
        reset: Default::default(),
        charge,
        relayed: Some((ends.meter, Endpoint::Client)),
    });
    let connected = Message::Connected(ConnectionInfo { id, local: request.client, peer: request.server, ring_size });
    attempt.log(Some(&server_slot), &Reply::plain(connected), || {
        format!("{} (from host {peer})", verdict.describe(config))
    });
    Ok(ends.conn)
}

/// Both ends of a new relayed connection's segment: the guest's
/// descriptors (to hand over), the record's (metering mapping, files,
/// lifeline read ends) and the relay's (`conn`, the daemon as `mine`).
struct Relayed {
    id: u64,
    ring_size: u32,
    segment: vsocket_ring::Segment,
    files: vsocket_ring::SegmentFiles,
    /// The guest's half (read-write) and the daemon's (read-only).
    guest_halves: [OwnedFd; 2],
    guest_bell: OwnedFd,
    guest_lifeline: OwnedFd,
    guest_holds: OwnedFd,
    my_lifeline: OwnedFd,
    meter: Arc<crate::fabric::Meter>,
    conn: crate::fabric::NewConn,
}

/// A fresh segment (rings of `ring_size`, the fabric's) for a connection
/// the relay carries, named with a new connection id; `None` (logged) if
/// the host is out of descriptors or memory. Not pooled: a cross-host
/// connect waits for the other host anyway.
fn relayed(daemon: &Daemon, ring_size: u32, mine: Endpoint) -> Option<Relayed> {
    let made = (|| -> std::io::Result<Relayed> {
        let (segment, files) = vsocket_ring::Segment::create(ring_size)?;
        daemon.segments.created.fetch_add(1, Ordering::Relaxed);
        let [own, peer] = files.for_end(mine);
        let relay_view = vsocket_ring::Segment::map(own, peer, ring_size, mine)?;
        let (guest_bell, bell) = vsocket_sys::stream_pair()?;
        let (guest_lifeline, guest_holds) = vsocket_sys::pipe()?;
        let (my_lifeline, holds) = vsocket_sys::pipe()?;
        let id = daemon.next_id();
        segment.set_connection_id(id);
        let meter = Arc::new(crate::fabric::Meter::default());
        Ok(Relayed {
            id,
            ring_size,
            guest_halves: files.clone_for(mine.peer())?,
            files,
            segment,
            guest_bell,
            guest_lifeline,
            guest_holds,
            my_lifeline,
            conn: crate::fabric::NewConn { segment: relay_view, mine, bell, holds, meter: meter.clone() },
            meter,
        })
    })();
    made.inspect_err(|e| tracing::warn!(error = %e, "cannot make a segment for a cross-host connection")).ok()
}

/// Policy's verdict on a TCP connect from guest `client` at `client_ip`
/// to guest `server` at `to`, in the client's VPC.
fn verdict_of(
    config: &vsocket_policy::Config,
    client: vsocket_policy::GuestId,
    client_ip: std::net::Ipv4Addr,
    server: vsocket_policy::GuestId,
    to: SocketAddrV4,
) -> Verdict {
    let flow = Flow {
        protocol: Protocol::Tcp,
        vpc: config.guest(client).vpc,
        client,
        client_addr: client_ip,
        server,
        server_addr: *to.ip(),
        port: to.port(),
    };
    evaluate(config, &flow)
}

/// The reply to a connect that `verdict` denies, counted and logged.
fn deny(attempt: &Attempt<'_>, server: &GuestSlot, config: &vsocket_policy::Config, verdict: &Verdict) -> Reply {
    attempt.guest.counters.denied.fetch_add(1, Ordering::Relaxed);
    let action = config.host().deny_action;
    tracing::info!(client = %attempt.guest.name, from = %attempt.client_addr, server = %server.name,
        to = %attempt.remote, decided_by = %verdict.describe(config), ?action, "connect denied");
    let reply = Reply::plain(match action {
        DenyAction::Reject => Message::Refused { errno: libc::ECONNREFUSED },
        DenyAction::Drop => Message::Dropped,
    });
    attempt.log(Some(server), &reply, || verdict.describe(config));
    reply
}

/// A connect being decided, for its flow record.
struct Attempt<'a> {
    daemon: &'a Daemon,
    guest: &'a GuestSlot,
    client_addr: SocketAddrV4,
    remote: SocketAddrV4,
}

impl Attempt<'_> {
    /// Records the attempt as `reply` ends it; `server` is the guest whose
    /// listener was found, `decided_by` says why (made only if logged).
    fn log(&self, server: Option<&GuestSlot>, reply: &Reply, decided_by: impl FnOnce() -> String) {
        self.daemon.log_flow(|| {
            let (verdict, id) = match reply.message {
                Message::Connected(info) => (FlowVerdict::Accepted, Some(info.id)),
                Message::Dropped => (FlowVerdict::Dropped, None),
                Message::Refused { .. } => (FlowVerdict::Rejected, None),
                _ => (FlowVerdict::Fallback, None),
            };
            FlowRecord {
                time: SystemTime::now(),
                event: FlowEvent::Attempt,
                id,
                vpc: self.guest.vpc.to_string(),
                client_guest: self.guest.name.clone(),
                server_guest: server.map(|s| s.name.clone()),
                protocol: "tcp",
                client: self.client_addr,
                server: self.remote,
                verdict,
                decided_by: Some(decided_by()),
                bytes_client_to_server: None,
                bytes_server_to_client: None,
                duration_ms: None,
            }
        });
    }
}

/// The reply when an allowed connect would take a guest past a quota:
/// counted against that guest (the server's, if it is the one over) and
/// logged, rate-limited.
fn over_quota(attempt: &Attempt<'_>, server: &GuestSlot, exceeded: Exceeded) -> Reply {
    let quota = exceeded.quota;
    let over = &exceeded.guest;
    let detail = if exceeded.server {
        format!("connect from {} to {} refused", attempt.guest.name, attempt.remote)
    } else {
        format!("connect to {} refused", attempt.remote)
    };
    attempt.daemon.note_exceeded(over, quota, exceeded.limit, &detail);
    let reply = Reply::plain(Message::Refused { errno: exceeded.errno() });
    attempt.log(Some(server), &reply, || {
        let side = if exceeded.server { "server" } else { "client" };
        format!("quota: {side} guest {} max_{} ({})", over.name, quota.name(), exceeded.limit)
    });
    reply
}

/// The reply when a connection could not be handed to its listener.
fn undelivered(guest: &GuestSlot, remote: SocketAddrV4, e: std::io::Error) -> Reply {
    let name = &guest.name;
    if e.kind() == std::io::ErrorKind::WouldBlock {
        tracing::warn!(client = %name, to = %remote, "listener backlog full; connect refused");
        return Reply::plain(Message::Refused { errno: libc::ECONNREFUSED });
    }
    tracing::warn!(client = %name, to = %remote, error = %e, "could not deliver connection to listener; kernel path");
    guest.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
    Reply::plain(Message::Fallback)
}

/// Creates the shared segment and doorbell, hands the server end to the
/// listener and returns the client end. `charge` (what the connection
/// holds of its guests' quotas) goes into its record, or is given back if
/// the connection is not made.
#[allow(clippy::too_many_arguments)]
fn open(
    daemon: &Daemon,
    client: &Arc<GuestSlot>,
    channel: u64,
    client_addr: SocketAddrV4,
    listener: &Arc<ListenerRecord>,
    remote: SocketAddrV4,
    ring_size: u32,
    charge: Charge,
) -> std::io::Result<Reply> {
    let pair = (channel, listener.id);
    // A segment this pair has used and released, or a fresh one.
    let (segment, files) = match daemon.reclaim(pair) {
        Some((segment, files)) => {
            segment.reset();
            daemon.segments.reused.fetch_add(1, Ordering::Relaxed);
            (segment, files)
        }
        None => daemon.segments.take_for(pair)?,
    };
    let (client_bell, server_bell) = vsocket_sys::stream_pair()?;
    let (client_lifeline, client_holds) = vsocket_sys::pipe()?;
    let (server_lifeline, server_holds) = vsocket_sys::pipe()?;
    let id = daemon.next_id();
    // Names the connection in the segment, so that a process holding an
    // old mapping of it knows it is this connection's (see `segcache`).
    segment.set_connection_id(id);
    let incoming = Message::Incoming(ConnectionInfo { id, local: remote, peer: client_addr, ring_size });
    let mut buf = [0u8; MAX_MESSAGE];
    let bytes = incoming.encode(&mut buf);
    let [own, peer] = files.for_end(Endpoint::Server);
    let server_fds = [own, server_bell.as_fd(), server_holds.as_fd(), peer];
    let client_halves = files.clone_for(Endpoint::Client)?;
    if let Err(e) = vsocket_sys::send_with_fds(listener.channel.as_fd(), bytes, &server_fds) {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            // The listener is gone (its process exited): forget it.
            daemon.remove_listener(listener);
        }
        return Err(e);
    }
    drop(server_bell);
    drop(server_holds);
    listener.accepted.fetch_add(1, Ordering::Relaxed);
    client.counters.connections_out.fetch_add(1, Ordering::Relaxed);
    listener.guest.counters.connections_in.fetch_add(1, Ordering::Relaxed);
    daemon.add_connection(ConnectionRecord {
        id,
        client: client.clone(),
        client_addr,
        server: listener.guest.clone(),
        server_addr: remote,
        opened: SystemTime::now(),
        segment,
        files,
        pair,
        lifelines: [client_lifeline, server_lifeline],
        reset: Default::default(),
        charge,
        relayed: None,
    });
    let connected = Message::Connected(ConnectionInfo { id, local: client_addr, peer: remote, ring_size });
    let [own, peer] = client_halves;
    Ok(Reply { message: connected, fds: vec![own, client_bell, client_holds, peer] })
}
