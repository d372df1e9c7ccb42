//! Carrying out connect decisions ([`crate::decide`]): the one path that
//! charges quotas, makes a connection's memory, hands each end to whoever
//! holds it, records the connection, counts and logs.
//!
//! A connection has two ends. The client's is a process of a guest here
//! (its request channel gets the reply) or, for a connect from another
//! host, this daemon's relay. The server's is a listener of a guest here
//! (its channel gets `Incoming`) or, for a connect to another host, that
//! host (the fabric carries `Open` and waits for its answer). Where both
//! ends are processes here, they share the segment directly; where one is
//! the relay, the relay maps the other half and carries the bytes.
//!
//! Each connect is decided with the policy snapshot in force when it
//! arrives, so a live change applies from the next connect on (quota
//! limits included). A guest removed by a change is no longer served: its
//! connects (until its channels close) fall back to the kernel, and a
//! listener of a removed guest is not found.

use crate::bridge::BridgeEnd;
use crate::channel::{Channel, EndFiles, Handover, KitEnds};
use crate::charge::Exceeded;
use crate::connections::{Carrier, ConnectionRecord, Memory as RecordMemory};
use crate::daemon::Daemon;
use crate::decide::{decide, decide_incoming, Claim, ConnectRequest, Decided, Decision, Fabric as Reach, Fallback};
use crate::fabric::local::SegmentEnd;
use crate::fabric::{Fabric, NewConn, OpenOutcome, OpenRequest, Unreachable};
use crate::flowlog::{FlowEvent, FlowRecord, FlowVerdict};
use crate::guest::GuestSlot;
use crate::ids::{ChannelId, ConnectionId, Pair};
use crate::listeners::ListenerRecord;
use crate::meter::Meter;
use crate::placed::{Placed, VmMemory};
use crate::policy::Policy;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use vsocket_abi::control::{ConnectionInfo, Message};
use vsocket_abi::fabric::Refusal;
use vsocket_abi::layout::Endpoint;
use vsocket_policy::{DenyAction, Verdict};
use vsocket_ring::Segment;

/// How long a connection may wait for room in a listener's channel.
pub const LISTENER_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A reply to a process, and the connection end it hands over.
#[derive(Debug)]
pub struct Reply {
    pub message: Message,
    pub handover: Option<EndFiles>,
    /// The listener a connection between two processes here was made
    /// with (for the grant a later connect of the pair may get).
    pub listener: Option<Arc<ListenerRecord>>,
}

impl Reply {
    fn plain(message: Message) -> Reply {
        Reply { message, handover: None, listener: None }
    }
}

/// Why a `Listen` request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenError {
    /// Port 0: the library binds a port before it registers.
    NoPort,
    /// The address is not the guest's.
    NotOwnAddress,
    /// The channel cannot be given a send timeout.
    Channel,
}

impl ListenError {
    /// The errno the program's `listen` gets.
    pub fn errno(self) -> i32 {
        match self {
            ListenError::NoPort => libc::EINVAL,
            ListenError::NotOwnAddress => libc::EADDRNOTAVAIL,
            ListenError::Channel => libc::ENOBUFS,
        }
    }
}

/// Checks a `Listen` request of `guest` on `local`. On success returns the
/// record to register, with `channel` (which the caller has given
/// [`LISTENER_SEND_TIMEOUT`]).
pub fn listen(
    daemon: &Daemon,
    guest: &Arc<GuestSlot>,
    local: SocketAddrV4,
    channel: Box<dyn Channel>,
    vm: Option<Arc<VmMemory>>,
    kits: Option<(OwnedFd, OwnedFd)>,
) -> Result<Arc<ListenerRecord>, ListenError> {
    if local.port() == 0 {
        return Err(ListenError::NoPort);
    }
    if !local.ip().is_unspecified() && !local.ip().is_loopback() && !guest.addresses.contains(local.ip()) {
        // A guest may only listen on its own addresses (loopback ones are
        // reachable from inside the guest only).
        return Err(ListenError::NotOwnAddress);
    }
    Ok(Arc::new(ListenerRecord {
        id: daemon.ids.listener(),
        guest: guest.clone(),
        local,
        channel,
        vm,
        accepted: Default::default(),
        bell: kits.as_ref().map(|(bell, _)| bell.try_clone()).transpose().ok().flatten(),
        kit_channel: kits.map(|(_, channel)| channel),
        kits_off: Default::default(),
    }))
}

/// The decision on `request` under `policy`, with this daemon's listeners
/// and fabric as they stand.
fn decide_here(daemon: &Daemon, policy: &Policy, request: &ConnectRequest) -> Decided<Arc<ListenerRecord>> {
    let reach = if daemon.fabric.get().is_some() { Reach::Running } else { Reach::Absent };
    decide(policy, reach, request, |g, a| daemon.find_listener(g, a))
}

/// Decides a `Connect` request from a process of `guest` (`client`: its
/// request channel, or its VM's region), carries the decision out, and
/// records it in the flow log.
pub fn connect(
    daemon: &Daemon,
    guest: &Arc<GuestSlot>,
    client: ClientEnd<'_>,
    local: SocketAddrV4,
    remote: SocketAddrV4,
) -> Reply {
    let policy = daemon.policy();
    let request = ConnectRequest { client: guest.clone(), local, remote };
    let mut decided = decide_here(daemon, &policy, &request);
    if matches!(decided.decision, Decision::Fallback(Fallback::NoListener)) {
        if let Some(until) = daemon.listeners.awaited(guest, remote) {
            // A predecessor daemon had a listener there, and its process
            // registers it again within moments: the connect waits for it
            // rather than take the kernel path.
            while Instant::now() < until {
                std::thread::sleep(AWAIT_LISTENER_EVERY);
                decided = decide_here(daemon, &policy, &request);
                if !matches!(decided.decision, Decision::Fallback(Fallback::NoListener)) {
                    break;
                }
            }
        }
    }
    let attempt = Attempt { daemon, guest, client_addr: decided.client_addr, remote };
    match decided.decision {
        Decision::Fallback(why) => Reply::plain(attempt.fall_back(why.describe().into())),
        Decision::Deny { server, verdict, action } => deny(&attempt, &server, &policy, &verdict, action),
        Decision::WithinGuest { listener } => {
            let end = ServerEnd::Listener(&listener);
            let made = establish(&attempt, &policy, client, end);
            let reply: Reply =
                attempt.reply(&listener.guest, made, || "within one guest: security groups do not apply".into()).into();
            reply.with_listener(listener)
        }
        Decision::Local { listener, verdict } => {
            let made = establish(&attempt, &policy, client, ServerEnd::Listener(&listener));
            let why = match &made {
                Ok(_) => {
                    let why = verdict.describe(&policy.config);
                    tracing::debug!(client = %guest.name, from = %attempt.client_addr, server = %listener.guest.name,
                        to = %remote, decided_by = %why, "connect allowed");
                    why
                }
                Err(Failed::Undelivered(e)) if e.kind() == io::ErrorKind::WouldBlock => "listener backlog full".into(),
                Err(Failed::Undelivered(_)) => "listener gone: kernel path".into(),
                Err(_) => String::new(),
            };
            let reply: Reply = attempt.reply(&listener.guest, made, || why).into();
            reply.with_listener(listener)
        }
        Decision::Remote { host, server, verdict } => {
            // Present: the decision is Remote only with a running fabric.
            let Some(fabric) = daemon.fabric.get() else {
                return attempt.reply(&server, Err(Failed::Unreachable(Unreachable::NoFabric)), String::new).into();
            };
            let end = ServerEnd::Host { name: &host, server: &server, fabric };
            let made = establish(&attempt, &policy, client, end);
            let here = verdict.describe(&policy.config);
            let why = match &made {
                Ok(_) => format!("{here}; accepted by host {host}"),
                Err(Failed::Refused(Refusal::Errno(errno))) => format!("refused by host {host} (errno {errno})"),
                Err(Failed::Refused(Refusal::Dropped)) => format!("denied by host {host}"),
                Err(Failed::Refused(Refusal::Fallback)) => {
                    format!("no vSocket listener on host {host}: kernel path")
                }
                Err(Failed::Unreachable(why)) => {
                    tracing::warn!(client = %guest.name, to = %remote, %host, %why,
                        "fabric peer unreachable; kernel path");
                    format!("host {host} unreachable ({why}): kernel path")
                }
                Err(_) => String::new(),
            };
            attempt.reply(&server, made, || why).into()
        }
    }
}

/// The server's host's side of a cross-host connect from a guest of host
/// `peer`: decided again here ([`decide_incoming`]), then the connection
/// is handed to the listener with this daemon's relay as its client.
pub fn accept_remote(daemon: &Daemon, peer: &str, request: &OpenRequest) -> Result<NewConn, Refusal> {
    let policy = daemon.policy();
    let claim =
        Claim { peer, vpc: &request.vpc, guest: &request.guest, client: request.client, server: request.server };
    let refused = Refusal::Errno(libc::ECONNREFUSED);
    let Ok((client, decision)) = decide_incoming(&policy, &claim, |g, a| daemon.find_listener(g, a)) else {
        tracing::warn!(%peer, guest = %request.guest, vpc = %request.vpc, from = %request.client,
            "fabric peer asked for a connection from a guest it does not host; refused");
        return Err(refused);
    };
    let attempt = Attempt { daemon, guest: &client, client_addr: request.client, remote: request.server };
    match decision {
        Decision::Local { listener, verdict } => {
            let made = establish(&attempt, &policy, ClientEnd::Relay, ServerEnd::Listener(&listener));
            let refusal = match &made {
                Ok(_) => None,
                Err(Failed::Undelivered(e)) if e.kind() == io::ErrorKind::WouldBlock => Some(refused),
                Err(Failed::Undelivered(_)) => Some(Refusal::Fallback),
                Err(Failed::Quota(_)) => Some(refused),
                Err(Failed::NoMemory) => Some(Refusal::Errno(libc::ENOBUFS)),
                Err(Failed::Refused(r)) => Some(*r),
                Err(Failed::Unreachable(_)) => Some(refused),
            };
            let why = match made {
                Ok(_) => format!("{} (from host {peer})", verdict.describe(&policy.config)),
                Err(Failed::Undelivered(_)) => "listener unavailable".into(),
                Err(_) => String::new(),
            };
            let outcome = attempt.reply(&listener.guest, made, || why);
            match (refusal, outcome.relay) {
                (None, Some(conn)) => Ok(conn),
                (Some(refusal), _) => Err(refusal),
                (None, None) => Err(refused),
            }
        }
        Decision::Deny { server, verdict, action } => {
            deny(&attempt, &server, &policy, &verdict, action);
            Err(match action {
                DenyAction::Drop => Refusal::Dropped,
                DenyAction::Reject => refused,
            })
        }
        Decision::Fallback(why) => {
            attempt.log(None, &Message::Fallback, || why.describe().into());
            Err(Refusal::Fallback)
        }
        Decision::WithinGuest { .. } | Decision::Remote { .. } => Err(refused),
    }
}

impl crate::fabric::RemoteOpens for Daemon {
    fn accept_remote(&self, peer: &str, request: &OpenRequest) -> Result<NewConn, Refusal> {
        let _serving = self.serving();
        accept_remote(self, peer, request)
    }
}

/// How often a connect waiting for an expected listener looks again.
const AWAIT_LISTENER_EVERY: Duration = Duration::from_millis(5);

/// Who holds the client's end.
#[derive(Debug, Clone, Copy)]
pub enum ClientEnd<'a> {
    /// A process here, by its request channel.
    Process(ChannelId),
    /// This daemon's relay, for a client on another host.
    Relay,
    /// A process in a VM here, whose end is placed in its region `vm` (the
    /// bridge carries the connection).
    Vm(&'a Arc<VmMemory>),
}

/// Who holds the server's end.
#[derive(Clone, Copy)]
enum ServerEnd<'a> {
    /// A listener of a guest here (a VM's, if it has a `vm`).
    Listener(&'a Arc<ListenerRecord>),
    /// Host `name`, where guest `server` is placed, over the fabric.
    Host { name: &'a str, server: &'a Arc<GuestSlot>, fabric: &'a Fabric },
}

impl ServerEnd<'_> {
    fn guest(&self) -> &Arc<GuestSlot> {
        match self {
            ServerEnd::Listener(l) => &l.guest,
            ServerEnd::Host { server, .. } => server,
        }
    }

    /// The server's VM region, if its end is placed in one.
    fn vm(&self) -> Option<&Arc<VmMemory>> {
        match self {
            ServerEnd::Listener(l) => l.vm.as_ref(),
            ServerEnd::Host { .. } => None,
        }
    }
}

/// Why a connection could not be made.
#[derive(Debug)]
enum Failed {
    /// A guest is at one of its quotas.
    Quota(Exceeded),
    /// The host is out of descriptors or memory for the connection.
    NoMemory,
    /// The listener's channel did not take it: full (`WouldBlock`) or gone.
    Undelivered(io::Error),
    /// The server's host refused it.
    Refused(Refusal),
    /// The server's host could not be asked.
    Unreachable(Unreachable),
}

/// A connection made: what goes back to its client.
struct Made {
    info: ConnectionInfo,
    client: ClientKit,
}

/// What the holder of the client's end gets.
enum ClientKit {
    Process(EndFiles),
    Relay(NewConn),
    /// A VM's process: where its piece of the region is.
    Placed(u64),
}

/// A new connection's memory and wake-ups: what its record keeps (the
/// daemon's view, and the files where there are some), its lifeline's read
/// end, and what each end's holder gets.
struct Memory {
    id: ConnectionId,
    ring_size: u32,
    kept: RecordMemory,
    /// One pipe for both ends: the daemon needs to know only when no
    /// process holds either (each end's holders hold a write end).
    lifeline: OwnedFd,
    /// The write ends of the lifeline for ends the bridge holds as pieces
    /// of VM regions (client, server), where both are.
    holds: [Option<OwnedFd>; 2],
    client: ClientKit,
    server: ServerKit,
    carrier: Carrier,
}

/// What the holder of the server's end gets.
enum ServerKit {
    /// For a listener: its doorbell and lifeline ends, and the segment's
    /// halves: its own copies, or (`None`) the segment's files themselves,
    /// which stay in the connection's record.
    Process {
        halves: Option<[OwnedFd; 2]>,
        bell: OwnedFd,
        holds: OwnedFd,
    },
    Relay(NewConn),
    /// A VM's listener: where its piece of the region is.
    Placed(u64),
}

/// Places a connection with rings of `ring_size` in `vm`'s region.
fn place(vm: &Arc<VmMemory>, ring_size: u32) -> Result<Arc<Placed>, Failed> {
    vm.place(ring_size).map(Arc::new).map_err(|e| {
        tracing::warn!(error = %e, "no room for a VM's connection");
        Failed::NoMemory
    })
}

/// Carries out a connect between `client` and `server`: charge, memory,
/// hand the server's end over, record, count. Every kind of connection
/// takes this path.
fn establish(attempt: &Attempt<'_>, policy: &Policy, client: ClientEnd, server: ServerEnd<'_>) -> Result<Made, Failed> {
    let daemon = attempt.daemon;
    let (client_guest, server_guest) = (attempt.guest, server.guest());
    let host = policy.config.host();
    // Each guest with a process at an end is charged; the relay is no guest.
    let (pair, ring_size, bytes, charged) = match (client, server) {
        (ClientEnd::Process(channel), ServerEnd::Listener(l)) if l.vm.is_none() => {
            let pair = Pair { channel, listener: l.id };
            (Some(pair), host.ring_size, host.segment_size(), (client_guest, server_guest))
        }
        // A VM at either end: the bridge is the other's far end.
        (ClientEnd::Process(_) | ClientEnd::Vm(_), ServerEnd::Listener(_)) => {
            (None, host.ring_size, host.segment_size(), (client_guest, server_guest))
        }
        (ClientEnd::Process(_) | ClientEnd::Vm(_), ServerEnd::Host { .. })
        | (ClientEnd::Relay, ServerEnd::Listener(_)) => {
            let Some(rings) = policy.config.fabric() else {
                return Err(Failed::Refused(Refusal::Errno(libc::ECONNREFUSED)));
            };
            let guest = if let ClientEnd::Relay = client { server_guest } else { client_guest };
            (None, rings.ring_size, rings.segment_size(), (guest, guest))
        }
        (ClientEnd::Relay, ServerEnd::Host { .. }) => unreachable!("a relay never connects to another host"),
    };
    let charge = daemon.charge(policy, charged.0, charged.1, bytes).map_err(|exceeded| match client {
        // The server's host: whichever guest is over, it is the server's.
        ClientEnd::Relay => Failed::Quota(Exceeded { side: Endpoint::Server, ..exceeded }),
        ClientEnd::Process(_) | ClientEnd::Vm(_) => Failed::Quota(exceeded),
    })?;
    // A VM's end is a piece of its region, placed before anything is
    // handed over (a full region refuses the connect).
    let client_piece = match client {
        ClientEnd::Vm(vm) => Some((vm, place(vm, ring_size)?)),
        _ => None,
    };
    let server_piece = match server.vm() {
        Some(vm) => Some((vm, place(vm, ring_size)?)),
        None => None,
    };
    let no_memory = |e: io::Error| {
        tracing::warn!(error = %e, "cannot make a connection's memory");
        Failed::NoMemory
    };
    let memory = match (pair, &client_piece, &server_piece) {
        (Some(pair), _, _) => shared_memory(daemon, pair, ring_size).map_err(Failed::Undelivered)?,
        (None, Some((_, client)), Some((_, server))) => placed_memory(daemon, client, server).map_err(no_memory)?,
        // From a VM to another host: the relay is the server's end of a
        // segment whose client's end the bridge holds, beside the VM's piece.
        (None, Some(_), None) if matches!(server, ServerEnd::Host { .. }) => {
            relayed_memory(daemon, ring_size, Endpoint::Server).map_err(no_memory)?
        }
        (None, Some(_), None) => relayed_memory(daemon, ring_size, Endpoint::Client).map_err(no_memory)?,
        (None, None, _) => {
            let mine = match client {
                ClientEnd::Relay => Endpoint::Client,
                ClientEnd::Process(_) | ClientEnd::Vm(_) => Endpoint::Server,
            };
            relayed_memory(daemon, ring_size, mine).map_err(no_memory)?
        }
    };
    let Memory { id, ring_size, kept, lifeline, holds, client: mut client_kit, server: mut server_kit, carrier } =
        memory;
    let server_addr = attempt.remote;
    // The bridge learns of a VM's connection before the VM can name it
    // (before its `IncomingAt` or `ConnectedAt` goes out).
    let vm_ends = client_piece.is_some() || server_piece.is_some();
    // A piece names its connection, so that a VM's library that maps a
    // piece it was told of too late (placed again since) knows it.
    for (_, placed) in client_piece.iter().chain(&server_piece) {
        placed.segment().set_connection_id(id.0);
    }
    let backlog = match server {
        ServerEnd::Listener(listener) => Some(listener.id),
        ServerEnd::Host { .. } => None,
    };
    let pieces = Pieces { client: client_piece, server: server_piece, backlog };
    let bridged = bridge_ends(pieces, holds, &mut client_kit, &mut server_kit, &carrier, ring_size);
    let bridge = daemon.bridge.get();
    match (bridged, bridge) {
        (Some((ends, meter)), Some(bridge)) => bridge.carry(id.0, ends, meter),
        (None, _) if !vm_ends => {}
        _ => return Err(Failed::NoMemory),
    }
    let cancel = || {
        if let Some(bridge) = bridge {
            bridge.cancel(id.0);
        }
    };
    match (server, server_kit) {
        (ServerEnd::Listener(listener), kit @ (ServerKit::Process { .. } | ServerKit::Placed(_))) => {
            let info = ConnectionInfo { id: id.0, local: server_addr, peer: attempt.client_addr, ring_size };
            let sent = match &kit {
                ServerKit::Process { halves, bell, holds } => {
                    let peer_read_only;
                    let [own_half, peer_half] = match halves {
                        Some([own, peer]) => [own.as_fd(), peer.as_fd()],
                        None => {
                            let RecordMemory::Files { files, .. } = &kept else {
                                unreachable!("a listener's segment has files")
                            };
                            peer_read_only = match files.read_only(Endpoint::Client) {
                                Ok(fd) => fd,
                                Err(e) => {
                                    cancel();
                                    return Err(Failed::Undelivered(e));
                                }
                            };
                            [files.rw[Endpoint::Server.index()].as_fd(), peer_read_only.as_fd()]
                        }
                    };
                    let handover = Handover { own_half, bell: bell.as_fd(), holds: holds.as_fd(), peer_half };
                    listener.channel.send(&Message::Incoming(info), Some(handover))
                }
                ServerKit::Placed(offset) => {
                    listener.channel.send(&Message::IncomingAt { info, offset: *offset }, None)
                }
                ServerKit::Relay(_) => unreachable!("matched above"),
            };
            if let Err(e) = sent {
                cancel();
                if e.kind() != io::ErrorKind::WouldBlock {
                    // The listener is gone (its process exited): forget it.
                    daemon.listeners.remove(listener);
                }
                return Err(Failed::Undelivered(e));
            }
            listener.accepted.fetch_add(1, Ordering::Relaxed);
            listener.guest.counters.connections_in.fetch_add(1, Ordering::Relaxed);
        }
        (ServerEnd::Host { name, fabric, .. }, ServerKit::Relay(conn)) => {
            let request = OpenRequest {
                vpc: client_guest.vpc.to_string(),
                guest: client_guest.name.clone(),
                client: attempt.client_addr,
                server: server_addr,
                window: ring_size,
            };
            match fabric.open(name, id.0, request, conn) {
                OpenOutcome::Accepted => {}
                OpenOutcome::Refused(refusal) => {
                    cancel();
                    return Err(Failed::Refused(refusal));
                }
                OpenOutcome::Unreachable(why) => {
                    cancel();
                    return Err(Failed::Unreachable(why));
                }
            }
        }
        _ => unreachable!("memory is made for the server end it is given to"),
    }
    if let ClientEnd::Process(_) | ClientEnd::Vm(_) = client {
        client_guest.counters.connections_out.fetch_add(1, Ordering::Relaxed);
    }
    daemon.connections.add(ConnectionRecord {
        id,
        client: client_guest.clone(),
        client_addr: attempt.client_addr,
        server: server_guest.clone(),
        server_addr,
        opened: SystemTime::now(),
        memory: kept,
        carrier,
        lifelines: vec![Arc::new(lifeline)],
        reset: Default::default(),
        quiet: Default::default(),
        charge,
        kit: None,
    });
    let info = ConnectionInfo { id: id.0, local: attempt.client_addr, peer: server_addr, ring_size };
    Ok(Made { info, client: client_kit })
}

/// The VMs' pieces of a connection, and the listener (if the server is
/// one) whose backlog the server's waits in.
struct Pieces<'a> {
    client: Option<(&'a Arc<VmMemory>, Arc<Placed>)>,
    server: Option<(&'a Arc<VmMemory>, Arc<Placed>)>,
    backlog: Option<crate::ids::ListenerId>,
}

/// What the bridge carries for a connection with a VM at one end or both:
/// the VMs' pieces, waiting for their bells, and the daemon's end of the
/// other's segment (taken out of its kit, which then names the piece), with
/// the connection's meter. End 1 is the one metered: the client where the
/// record's carrier says the daemon is the server, and so on.
fn bridge_ends(
    pieces: Pieces<'_>,
    holds: [Option<OwnedFd>; 2],
    client_kit: &mut ClientKit,
    server_kit: &mut ServerKit,
    carrier: &Carrier,
    ring_size: u32,
) -> Option<([BridgeEnd; 2], Arc<Meter>)> {
    let Carrier::Relayed { meter, .. } = carrier else { return None };
    let Pieces { client: client_piece, server: server_piece, backlog } = pieces;
    // The daemon's end is the peer of the VM's: a server's piece (the
    // daemon its client) waits in its listener's backlog.
    let awaiting = |(vm, placed): (&Arc<VmMemory>, Arc<Placed>), mine: Endpoint, holds| BridgeEnd::Awaiting {
        vm: vm.clone(),
        placed,
        mine,
        holds,
        backlog: if mine == Endpoint::Client { backlog } else { None },
    };
    let [client_holds, server_holds] = holds;
    let ends = match (client_piece, server_piece) {
        // Between two VMs: the record's carrier has the daemon as the
        // server, so the client's piece is end 1.
        (Some(client), Some(server)) => {
            [awaiting(server, Endpoint::Client, server_holds), awaiting(client, Endpoint::Server, client_holds)]
        }
        (Some(client), None) => {
            let offset = client.1.offset();
            match std::mem::replace(client_kit, ClientKit::Placed(offset)) {
                ClientKit::Relay(conn) => [awaiting(client, Endpoint::Server, None), BridgeEnd::Ready(conn.end)],
                // To another host: the bridge holds the client's end of the
                // segment whose server's end is the relay, which meters it;
                // what the bridge counts of it is not the record's.
                ClientKit::Process(files) => {
                    let segment =
                        Segment::map(files.own_half.as_fd(), files.peer_half.as_fd(), ring_size, Endpoint::Client)
                            .map_err(|e| tracing::warn!(error = %e, "cannot map a VM's segment to another host"))
                            .ok()?;
                    let end = SegmentEnd::new(segment, Endpoint::Client, files.bell, files.holds);
                    let ends = [awaiting(client, Endpoint::Server, None), BridgeEnd::Ready(Box::new(end))];
                    return Some((ends, Arc::new(Meter::default())));
                }
                ClientKit::Placed(_) => return None,
            }
        }
        (None, Some(server)) => {
            let offset = server.1.offset();
            match std::mem::replace(server_kit, ServerKit::Placed(offset)) {
                ServerKit::Relay(conn) => [awaiting(server, Endpoint::Client, None), BridgeEnd::Ready(conn.end)],
                // From another host: the bridge holds the server's end of
                // the segment whose client's end is the relay, which meters
                // it.
                ServerKit::Process { halves: Some([own, peer]), bell, holds } => {
                    let segment = Segment::map(own.as_fd(), peer.as_fd(), ring_size, Endpoint::Server)
                        .map_err(|e| tracing::warn!(error = %e, "cannot map a VM's segment from another host"))
                        .ok()?;
                    let end = SegmentEnd::new(segment, Endpoint::Server, bell, holds);
                    let ends = [awaiting(server, Endpoint::Client, None), BridgeEnd::Ready(Box::new(end))];
                    return Some((ends, Arc::new(Meter::default())));
                }
                ServerKit::Process { halves: None, .. } | ServerKit::Placed(_) => return None,
            }
        }
        (None, None) => return None,
    };
    Some((ends, meter.clone()))
}

/// Memory for a connection between two processes here: a segment this
/// pair has used and released, or one from the pool; a doorbell; a
/// lifeline for each end.
fn shared_memory(daemon: &Daemon, pair: Pair, ring_size: u32) -> io::Result<Memory> {
    let (segment, files) = match daemon.reclaim(pair) {
        Some((segment, files)) => {
            segment.reset();
            daemon.segments.reused.fetch_add(1, Ordering::Relaxed);
            (segment, files)
        }
        None => daemon.segments.take_for(pair)?,
    };
    let (client_bell, server_bell) = vsocket_sys::stream_pair()?;
    let (lifeline, client_holds) = vsocket_sys::pipe()?;
    let server_holds = client_holds.try_clone()?;
    let id = daemon.ids.connection();
    // Names the connection in the segment, so that a process holding an
    // old mapping of it knows it is this connection's (see `segcache`).
    segment.set_connection_id(id.0);
    let [client_own, client_peer] = files.clone_for(Endpoint::Client)?;
    Ok(Memory {
        id,
        ring_size,
        kept: RecordMemory::Files { segment, files },
        lifeline,
        holds: [None, None],
        client: ClientKit::Process(EndFiles {
            own_half: client_own,
            bell: client_bell,
            holds: client_holds,
            peer_half: client_peer,
        }),
        server: ServerKit::Process { halves: None, bell: server_bell, holds: server_holds },
        carrier: Carrier::Shared(pair),
    })
}

/// A kit made: its connection's id, its piece of a chunk, and each end's
/// descriptors.
pub struct Kit {
    pub id: ConnectionId,
    pub piece: crate::pool::Piece,
    /// The words its piece's ends left for it (given back if the kit is
    /// not sent).
    pub bells: crate::pool::TakenBells,
    pub client: KitEnds,
    pub server: KitEnds,
}

impl Kit {
    /// The kit will not be sent: its piece's ends may let their doorbells
    /// go again (see `pool::give_back`).
    pub fn give_back_bells(&self) {
        if let Ok(segment) = self.piece.segment() {
            crate::pool::give_back(&segment, self.bells);
        }
    }
}

/// Makes kit `sequence` of `grant` under `policy`: a connection between
/// the grant's two processes, charged to both guests and recorded as a
/// kit not yet taken, in a piece of one of the pair's chunks (one of a
/// kit retired since, or a free one). `None` when a quota or the host
/// refuses one more.
/// `lifeline` is the read end of its batch's lifeline.
pub fn make_kit(
    daemon: &Daemon,
    policy: &Policy,
    grant: &crate::grants::GrantRecord,
    sequence: u32,
    lifeline: &Arc<OwnedFd>,
) -> Option<Kit> {
    let host = policy.config.host();
    let listener = &grant.listener;
    // Without the reap `Daemon::charge` may make at a limit: the grant's
    // lock is held here, and a reap announces kits under it.
    let charge =
        crate::charge::charge(|slot| policy.quotas(slot), &grant.client, &listener.guest, host.segment_size()).ok()?;
    let pair = Pair { channel: grant.key.channel, listener: listener.id };
    let free = match daemon.reclaim_piece(pair) {
        Some(free) => free,
        None => daemon.segments.take_piece(pair).ok()?,
    };
    let piece = free.piece;
    let segment = piece.segment().ok()?;
    let bells = crate::pool::take_bells(&segment, free.retired);
    let (client_bell, server_bell) = if bells.kept {
        daemon.segments.bells_reused.fetch_add(1, Ordering::Relaxed);
        (None, None)
    } else {
        match vsocket_sys::stream_pair() {
            Ok((client, server)) => (Some(client), Some(server)),
            Err(_) => {
                crate::pool::give_back(&segment, bells);
                return None;
            }
        }
    };
    let id = daemon.ids.connection();
    // Names the connection in the piece's headers: a library reads a kit's
    // id there.
    segment.set_connection_id(id.0);
    daemon.connections.add(ConnectionRecord {
        id,
        client: grant.client.clone(),
        client_addr: SocketAddrV4::new(grant.key.client, 0),
        server: listener.guest.clone(),
        server_addr: grant.key.server,
        opened: SystemTime::now(),
        memory: RecordMemory::Piece { segment, piece: piece.clone() },
        carrier: Carrier::Shared(pair),
        lifelines: vec![lifeline.clone()],
        reset: Default::default(),
        quiet: Default::default(),
        charge,
        kit: Some(crate::connections::KitMark { grant: grant.id, sequence, announced: false }),
    });
    Some(Kit { id, piece, bells, client: KitEnds { bell: client_bell }, server: KitEnds { bell: server_bell } })
}

/// Memory for a connection the relay carries as end `mine`: a fresh
/// segment (rings of `ring_size`, the fabric's), not pooled (a cross-host
/// connect waits for the other host anyway).
fn relayed_memory(daemon: &Daemon, ring_size: u32, mine: Endpoint) -> io::Result<Memory> {
    let (segment, files) = Segment::create(ring_size)?;
    daemon.segments.created.fetch_add(1, Ordering::Relaxed);
    // The relay's own view: the peer's half mapped read-only from its
    // read-write file (the daemon's own descriptor, never handed out).
    let relay_view =
        Segment::map(files.rw[mine.index()].as_fd(), files.rw[mine.peer().index()].as_fd(), ring_size, mine)?;
    let (guest_bell, bell) = vsocket_sys::stream_pair()?;
    let (lifeline, guest_holds) = vsocket_sys::pipe()?;
    let holds = guest_holds.try_clone()?;
    let id = daemon.ids.connection();
    segment.set_connection_id(id.0);
    let meter = Arc::new(Meter::default());
    let [guest_own, guest_peer] = files.clone_for(mine.peer())?;
    let relay = NewConn { end: Box::new(SegmentEnd::new(relay_view, mine, bell, holds)), meter: meter.clone() };
    let (client, server) = match mine {
        Endpoint::Server => {
            let guest = EndFiles { own_half: guest_own, bell: guest_bell, holds: guest_holds, peer_half: guest_peer };
            (ClientKit::Process(guest), ServerKit::Relay(relay))
        }
        Endpoint::Client => {
            let guest =
                ServerKit::Process { halves: Some([guest_own, guest_peer]), bell: guest_bell, holds: guest_holds };
            (ClientKit::Relay(relay), guest)
        }
    };
    Ok(Memory {
        id,
        ring_size,
        kept: RecordMemory::Files { segment, files },
        lifeline,
        holds: [None, None],
        client,
        server,
        carrier: Carrier::Relayed { meter, mine },
    })
}

/// Memory for a connection between two VMs' processes here: their pieces
/// (`client`'s and `server`'s), which the bridge carries between, with a
/// lifeline for each that the bridge's end holds. The record keeps the
/// client's piece (to reset it), and the bridge's count is its metering.
fn placed_memory(daemon: &Daemon, client: &Arc<Placed>, server: &Arc<Placed>) -> io::Result<Memory> {
    let (lifeline, client_holds) = vsocket_sys::pipe()?;
    let server_holds = client_holds.try_clone()?;
    let id = daemon.ids.connection();
    Ok(Memory {
        id,
        ring_size: client.segment().ring_size(),
        kept: RecordMemory::Placed(client.clone()),
        lifeline,
        holds: [Some(client_holds), Some(server_holds)],
        client: ClientKit::Placed(client.offset()),
        server: ServerKit::Placed(server.offset()),
        carrier: Carrier::Relayed { meter: Arc::new(Meter::default()), mine: Endpoint::Server },
    })
}

/// The reply to a connect that `verdict` denies, counted and logged.
fn deny(attempt: &Attempt<'_>, server: &GuestSlot, policy: &Policy, verdict: &Verdict, action: DenyAction) -> Reply {
    let config = &policy.config;
    attempt.guest.counters.denied.fetch_add(1, Ordering::Relaxed);
    tracing::info!(client = %attempt.guest.name, from = %attempt.client_addr, server = %server.name,
        to = %attempt.remote, decided_by = %verdict.describe(config), ?action, "connect denied");
    let reply = Reply::plain(match action {
        DenyAction::Reject => Message::Refused { errno: libc::ECONNREFUSED },
        DenyAction::Drop => Message::Dropped,
    });
    attempt.log(Some(server), &reply.message, || verdict.describe(config));
    reply
}

/// What a connect ended as, for its client.
struct Outcome {
    message: Message,
    handover: Option<EndFiles>,
    relay: Option<NewConn>,
}

impl From<Outcome> for Reply {
    fn from(outcome: Outcome) -> Reply {
        Reply { message: outcome.message, handover: outcome.handover, listener: None }
    }
}

impl Reply {
    /// Notes `listener` as the one a connection between two processes was
    /// made with (nothing for any other reply).
    fn with_listener(mut self, listener: Arc<ListenerRecord>) -> Reply {
        if matches!(self.message, Message::Connected(_)) && self.handover.is_some() && listener.vm.is_none() {
            self.listener = Some(listener);
        }
        self
    }
}

/// A connect being decided, for its counters and flow record.
struct Attempt<'a> {
    daemon: &'a Daemon,
    guest: &'a Arc<GuestSlot>,
    client_addr: SocketAddrV4,
    remote: SocketAddrV4,
}

impl Attempt<'_> {
    /// Turns what [`establish`] did into the client's reply, counting and
    /// logging a failure as its kind says; `server` is the guest the
    /// connect was for, `decided_by` says why (made only if logged).
    fn reply(&self, server: &GuestSlot, made: Result<Made, Failed>, decided_by: impl FnOnce() -> String) -> Outcome {
        let counters = &self.guest.counters;
        let outcome = match made {
            Ok(Made { info, client }) => {
                let message = Message::Connected(info);
                match client {
                    ClientKit::Process(handover) => Outcome { message, handover: Some(handover), relay: None },
                    ClientKit::Relay(conn) => Outcome { message, handover: None, relay: Some(conn) },
                    ClientKit::Placed(offset) => plain(Message::ConnectedAt { info, offset }),
                }
            }
            Err(Failed::Quota(exceeded)) => return self.over_quota(server, exceeded),
            Err(Failed::NoMemory) => plain(Message::Refused { errno: libc::ENOBUFS }),
            Err(Failed::Undelivered(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                tracing::warn!(client = %self.guest.name, to = %self.remote, "listener backlog full; connect refused");
                plain(Message::Refused { errno: libc::ECONNREFUSED })
            }
            Err(Failed::Undelivered(e)) => {
                tracing::warn!(client = %self.guest.name, to = %self.remote, error = %e,
                    "could not deliver connection to listener; kernel path");
                counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                plain(Message::Fallback)
            }
            Err(Failed::Refused(Refusal::Errno(errno))) => plain(Message::Refused { errno }),
            Err(Failed::Refused(Refusal::Dropped)) => {
                counters.denied.fetch_add(1, Ordering::Relaxed);
                plain(Message::Dropped)
            }
            Err(Failed::Refused(Refusal::Fallback) | Failed::Unreachable(_)) => {
                counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                plain(Message::Fallback)
            }
        };
        self.log(Some(server), &outcome.message, decided_by);
        outcome
    }

    /// The reply when an allowed connect would take a guest past a quota:
    /// counted against that guest (the server's, if it is the one over) and
    /// logged, rate-limited.
    fn over_quota(&self, server: &GuestSlot, exceeded: Exceeded) -> Outcome {
        let quota = exceeded.quota;
        let over = &exceeded.guest;
        let detail = match exceeded.side {
            Endpoint::Server => format!("connect from {} to {} refused", self.guest.name, self.remote),
            Endpoint::Client => format!("connect to {} refused", self.remote),
        };
        self.daemon.note_exceeded(over, quota, exceeded.limit, &detail);
        let message = Message::Refused { errno: exceeded.errno() };
        self.log(Some(server), &message, || {
            let side = match exceeded.side {
                Endpoint::Server => "server",
                Endpoint::Client => "client",
            };
            format!("quota: {side} guest {} max_{} ({})", over.name, quota.name(), exceeded.limit)
        });
        plain(message)
    }

    /// Records the attempt as `message` (the client's reply) ends it;
    /// `server` is the guest whose listener was found, `decided_by` says why
    /// (made only if logged).
    /// The connect takes the kernel path, `why`: counted and logged.
    fn fall_back(&self, why: String) -> Message {
        self.guest.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
        self.log(None, &Message::Fallback, || why);
        Message::Fallback
    }

    fn log(&self, server: Option<&GuestSlot>, message: &Message, decided_by: impl FnOnce() -> String) {
        self.daemon.log_flow(|| {
            let (verdict, id) = match message {
                Message::Connected(info) | Message::ConnectedAt { info, .. } => (FlowVerdict::Accepted, Some(info.id)),
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

fn plain(message: Message) -> Outcome {
    Outcome { message, handover: None, relay: None }
}
