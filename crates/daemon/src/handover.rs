//! Hand-over from a stopping vsocketd to the next one, so that a planned
//! upgrade (SIGTERM, then the new binary) costs no connect and no
//! connection.
//!
//! On SIGTERM a daemon with anything attached keeps serving and offers,
//! for up to [`OFFER_FOR`], a hand-over socket in its run directory (mode
//! 0600: root's). A daemon that starts and finds it is given, in order:
//! the next id; each guest's control socket, still bound and listening, so
//! that processes attaching meanwhile wait in its backlog for the new
//! daemon rather than fail; the listeners registered, which the new daemon
//! expects back (their processes register them again when the old
//! daemon's channels close) and holds connects to for
//! [`LISTENERS_EXPECTED_FOR`]; and each established connection between
//! guests of this host, with its segment files and lifelines, so that
//! metering, quotas, the reaper and the flow log go on as if nothing
//! happened. Before it sends anything the old daemon stops taking
//! requests (a request it had read and not answered meets a closed channel,
//! and the library sends it again); it exits once the new daemon says it
//! has everything.
//!
//! Connections the fabric relay carries are not handed over: the relay is
//! their far end, and they are reset with the old daemon's links.

use crate::connections::{Carrier, ConnectionRecord, Memory as RecordMemory};
use crate::daemon::Daemon;
use crate::ids::{ChannelId, ConnectionId, ListenerId, Pair};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use vsocket_abi::layout::Endpoint;
use vsocket_ring::{Segment, SegmentFiles};

/// The hand-over's wire version: a daemon takes its own and older ones
/// (version 3 added kits' pieces of chunks, `piece`).
const VERSION: u32 = 3;
/// The oldest wire version a daemon still takes: version 1 sent two
/// lifelines with each connection (one per end), and no count.
const OLDEST_VERSION: u32 = 1;
/// How long a stopping daemon waits for a successor.
pub const OFFER_FOR: Duration = Duration::from_secs(5);
/// How long each side waits for the other's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connects to a listener the old daemon had wait for its
/// process to register it again.
pub const LISTENERS_EXPECTED_FOR: Duration = Duration::from_secs(2);
/// The largest message (one part).
const MAX_PART: usize = 4096;
/// The successor's last word: it has everything.
const TAKEN: &[u8] = b"taken";

/// One message of the hand-over.
#[derive(Debug, Serialize, Deserialize)]
enum Part {
    /// First: the wire version and the next id to hand out.
    Hello { version: u32, next_id: u64 },
    /// Guest `name`'s control socket (one descriptor).
    Guest { name: String },
    /// A listener registered by a process of `guest`.
    Listener { guest: String, local: SocketAddrV4 },
    /// An established connection between guests of this host. Its
    /// descriptors: both halves read-write (client's, server's), both
    /// read-only, then its `lifelines` read ends.
    Connection(ConnectionPart),
    /// Last.
    End,
}

/// What a connection record is, without its descriptors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionPart {
    pub id: u64,
    pub client: String,
    pub client_addr: SocketAddrV4,
    pub server: String,
    pub server_addr: SocketAddrV4,
    pub opened_ms: u64,
    pub ring_size: u32,
    pub channel: u64,
    pub listener: u64,
    pub reset: bool,
    /// How many lifelines follow the halves (version 1: always two).
    #[serde(default = "per_end")]
    pub lifelines: usize,
    /// A kit's connection: its halves are this piece of the files that
    /// come (a chunk's, ARCHITECTURE §3c); none for a segment's own files.
    #[serde(default)]
    pub piece: Option<u8>,
}

/// Version 1's lifelines: one per end.
fn per_end() -> usize {
    2
}

/// A connection handed over, with its descriptors.
pub struct InheritedConnection {
    pub part: ConnectionPart,
    pub files: SegmentFiles,
    pub lifelines: Vec<OwnedFd>,
}

/// Everything a successor was handed.
pub struct Inherited {
    pub next_id: u64,
    /// Each guest's control socket, by guest name.
    pub guests: HashMap<String, OwnedFd>,
    /// Listeners the old daemon had: (guest, address).
    pub listeners: Vec<(String, SocketAddrV4)>,
    pub connections: Vec<InheritedConnection>,
    /// The hand-over socket, to say it is done.
    giver: OwnedFd,
    /// The old daemon's process, if its pid file named it.
    predecessor: Option<u32>,
}

/// Why a hand-over failed.
#[derive(Debug)]
pub enum HandoverError {
    /// The hand-over socket failed.
    Io(io::Error),
    /// The other daemon speaks another version of the hand-over.
    Version(u32),
    /// A message that is not a part, or a part out of turn.
    Malformed(String),
}

impl fmt::Display for HandoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandoverError::Io(e) => write!(f, "hand-over socket: {e}"),
            HandoverError::Version(v) => write!(f, "the other daemon hands over version {v}, this one takes {VERSION}"),
            HandoverError::Malformed(what) => write!(f, "malformed hand-over: {what}"),
        }
    }
}

impl From<io::Error> for HandoverError {
    fn from(e: io::Error) -> Self {
        HandoverError::Io(e)
    }
}

/// Where a daemon offers its hand-over.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("handover.sock")
}

/// How an offer ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// A successor took everything: exit now.
    Taken,
    /// Nobody came within the time.
    NoTaker,
}

/// Offers the hand-over for up to `wait`. Once a successor connects, the
/// daemon serves no more requests, whatever the outcome: the caller exits.
pub fn offer(daemon: &Daemon, run_dir: &Path, wait: Duration) -> Result<Offered, HandoverError> {
    let path = socket_path(run_dir);
    let listener = vsocket_sys::seqpacket_listen(&path, 1)?;
    vsocket_sys::chmod(&path, 0o600)?;
    vsocket_sys::set_recv_timeout(listener.as_fd(), wait)?;
    let taker = match vsocket_sys::accept(listener.as_fd()) {
        Ok(taker) => taker,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let _ = std::fs::remove_file(&path);
            return Ok(Offered::NoTaker);
        }
        Err(e) => return Err(e.into()),
    };
    let _ = std::fs::remove_file(&path);
    daemon.stop_serving();
    // The successor knows no grant: every kit not yet taken is revoked,
    // and those taken are announced, so they go over as connections.
    crate::kits::end_all(daemon);
    let given = give(daemon, taker.as_fd());
    given?;
    vsocket_sys::set_recv_timeout(taker.as_fd(), STEP_TIMEOUT)?;
    let mut buf = [0u8; 16];
    let (n, _) = vsocket_sys::recv_with_fds(taker.as_fd(), &mut buf)?;
    if &buf[..n] != TAKEN {
        return Err(HandoverError::Malformed("the successor did not say it took everything".into()));
    }
    // Closed only with the process: the successor waits for that.
    std::mem::forget(taker);
    Ok(Offered::Taken)
}

/// Sends everything to the successor on `to`.
fn give(daemon: &Daemon, to: BorrowedFd<'_>) -> Result<(), HandoverError> {
    send(to, &Part::Hello { version: VERSION, next_id: daemon.ids.turn() }, &[])?;
    let policy = daemon.policy();
    for slot in policy.slots().iter().filter(|s| s.local) {
        if let Some(socket) = slot.handle(crate::guest::Handle::Control) {
            send(to, &Part::Guest { name: slot.name.clone() }, &[socket.as_fd()])?;
        }
    }
    for l in daemon.listeners.all() {
        send(to, &Part::Listener { guest: l.guest.name.clone(), local: l.local }, &[])?;
    }
    let mut failed = None;
    daemon.connections.each(|c| {
        if failed.is_some() {
            return;
        }
        let Some(mut part) = connection_part(c) else { return };
        let files = match &c.memory {
            RecordMemory::Files { files, .. } => files,
            RecordMemory::Piece { piece, .. } => {
                part.piece = Some(piece.index);
                piece.chunk.files()
            }
            RecordMemory::Placed(_) => return,
        };
        let read_only = match [Endpoint::Client, Endpoint::Server].map(|end| files.read_only(end)) {
            [Ok(client), Ok(server)] => [client, server],
            [Err(e), _] | [_, Err(e)] => {
                // This one stays behind (its ends keep their memory; the
                // successor never hears of it): the rest go on.
                tracing::warn!(connection = c.id.0, error = %e, "connection not handed over: its files cannot be opened");
                return;
            }
        };
        let mut fds = vec![files.rw[0].as_fd(), files.rw[1].as_fd(), read_only[0].as_fd(), read_only[1].as_fd()];
        fds.extend(c.lifelines.iter().map(|l| l.as_fd()));
        if let Err(e) = send(to, &Part::Connection(part), &fds) {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    send(to, &Part::End, &[])
}

/// The part for record `c`, if it is handed over (not one the relay carries).
fn connection_part(c: &ConnectionRecord) -> Option<ConnectionPart> {
    let Carrier::Shared(pair) = c.carrier else { return None };
    Some(ConnectionPart {
        id: c.id.0,
        client: c.client.name.clone(),
        client_addr: c.client_addr,
        server: c.server.name.clone(),
        server_addr: c.server_addr,
        opened_ms: c.opened.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        ring_size: c.memory.segment().ring_size(),
        channel: pair.channel.0,
        listener: pair.listener.0,
        reset: !c.open(),
        lifelines: c.lifelines.len(),
        piece: None,
    })
}

fn send(to: BorrowedFd<'_>, part: &Part, fds: &[BorrowedFd<'_>]) -> Result<(), HandoverError> {
    let bytes = serde_json::to_vec(part).map_err(|e| HandoverError::Malformed(e.to_string()))?;
    vsocket_sys::send_with_fds(to, &bytes, fds)?;
    Ok(())
}

/// A handed-over segment's files, keeping only what the daemon keeps of a
/// connection whose ends have their descriptors.
fn without_read_only(mut files: SegmentFiles) -> SegmentFiles {
    files.let_go_of_read_only();
    files
}

/// Where a daemon writes its process id.
pub fn pid_path(run_dir: &Path) -> PathBuf {
    run_dir.join("vsocketd.pid")
}

/// Records this process as `run_dir`'s daemon, for its successor.
pub fn write_pid(run_dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(run_dir)?;
    std::fs::write(pid_path(run_dir), format!("{}\n", std::process::id()))
}

/// The daemon recorded in `run_dir`, if it is another vsocketd process
/// still running.
fn predecessor(run_dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_path(run_dir)).ok()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (pid != std::process::id() && comm.trim() == "vsocketd").then_some(pid)
}

/// How long a starting daemon waits for a predecessor that still runs to
/// offer its hand-over (it was just told to stop).
const AWAIT_OFFER: Duration = Duration::from_secs(3);

/// Takes the hand-over a stopping daemon offers in `run_dir`, if one does.
/// While the daemon recorded there still runs, waits up to [`AWAIT_OFFER`]
/// for its offer (a successor is often started the moment its
/// predecessor is told to stop).
pub fn take(run_dir: &Path) -> Result<Option<Inherited>, HandoverError> {
    let deadline = std::time::Instant::now() + AWAIT_OFFER;
    let predecessor = predecessor(run_dir);
    let giver = loop {
        match vsocket_sys::seqpacket_connect(&socket_path(run_dir)) {
            Ok(giver) => break giver,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) => {
                if self::predecessor(run_dir).is_none() || std::time::Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    };
    vsocket_sys::set_recv_timeout(giver.as_fd(), STEP_TIMEOUT)?;
    let mut inherited = Inherited {
        next_id: 0,
        guests: HashMap::new(),
        listeners: Vec::new(),
        connections: Vec::new(),
        giver,
        predecessor,
    };
    let mut buf = vec![0u8; MAX_PART];
    let mut first = true;
    loop {
        let (n, fds) = vsocket_sys::recv_with_fds(inherited.giver.as_fd(), &mut buf)?;
        if n == 0 {
            return Err(HandoverError::Malformed("the old daemon went away before the end".into()));
        }
        let part: Part = serde_json::from_slice(&buf[..n]).map_err(|e| HandoverError::Malformed(e.to_string()))?;
        let expected = match &part {
            Part::Guest { .. } => 1,
            Part::Connection(c) if (1..=2).contains(&c.lifelines) => 4 + c.lifelines,
            Part::Connection(c) => return Err(HandoverError::Malformed(format!("{} lifelines", c.lifelines))),
            _ => 0,
        };
        if fds.len() != expected {
            return Err(HandoverError::Malformed(format!("{} descriptors with {part:?}", fds.len())));
        }
        if first != matches!(part, Part::Hello { .. }) {
            return Err(HandoverError::Malformed(format!("{part:?} out of turn")));
        }
        first = false;
        let mut fds = fds.into_iter();
        let mut fd = || fds.next().ok_or_else(|| HandoverError::Malformed("descriptors missing".into()));
        match part {
            Part::Hello { version, next_id } => {
                if !(OLDEST_VERSION..=VERSION).contains(&version) {
                    return Err(HandoverError::Version(version));
                }
                inherited.next_id = next_id;
            }
            Part::Guest { name } => {
                inherited.guests.insert(name, fd()?);
            }
            Part::Listener { guest, local } => inherited.listeners.push((guest, local)),
            Part::Connection(part) => {
                // The read-only pair is the connection's ends' (they have
                // theirs): it goes at once, so that taking thousands of
                // connections needs three descriptors each, as holding them
                // does.
                let files = without_read_only(SegmentFiles::new([fd()?, fd()?], [fd()?, fd()?]));
                let lifelines = (0..part.lifelines).map(|_| fd()).collect::<Result<Vec<_>, _>>()?;
                inherited.connections.push(InheritedConnection { part, files, lifelines });
            }
            Part::End => return Ok(Some(inherited)),
        }
    }
}

impl Inherited {
    /// Makes what was handed over `daemon`'s: the ids go on from where the
    /// predecessor's stopped, every connection is adopted (see [`adopt`]),
    /// every listener is expected back for [`LISTENERS_EXPECTED_FOR`].
    /// Returns the guests' control sockets, for their attachments.
    pub fn apply(&mut self, daemon: &Daemon) -> HashMap<String, OwnedFd> {
        daemon.ids.resume_from(self.next_id);
        let mut adopted = 0;
        for connection in std::mem::take(&mut self.connections) {
            let id = connection.part.id;
            match adopt(daemon, connection) {
                Ok(()) => adopted += 1,
                Err(why) => tracing::warn!(id, %why, "handed-over connection not adopted (it goes on unmetered)"),
            }
        }
        let until = std::time::Instant::now() + LISTENERS_EXPECTED_FOR;
        let policy = daemon.policy();
        for (guest, local) in &self.listeners {
            if let Some(slot) = policy.slot_by_name(guest) {
                daemon.listeners.expect(slot, *local, until);
            }
        }
        tracing::info!(
            connections = adopted,
            listeners = self.listeners.len(),
            guests = self.guests.len(),
            "taken over from the previous vsocketd"
        );
        std::mem::take(&mut self.guests)
    }

    /// Tells the old daemon that everything was taken, and waits (at most
    /// [`STEP_TIMEOUT`]) until it has exited: its descriptors, the ports it
    /// listens on among them, are closed then.
    pub fn done(self) {
        if let Err(e) = vsocket_sys::send_with_fds(self.giver.as_fd(), TAKEN, &[]) {
            tracing::warn!(error = %e, "could not tell the old daemon the hand-over is done");
            return;
        }
        let mut buf = [0u8; 16];
        match vsocket_sys::recv_with_fds(self.giver.as_fd(), &mut buf) {
            Ok((0, _)) => {}
            Ok(_) => tracing::warn!("the old daemon said more after the hand-over"),
            Err(e) => tracing::warn!(error = %e, "the old daemon did not exit after the hand-over"),
        }
        // The socket closes while the exiting process closes its
        // descriptors, in number order: wait until they are all closed
        // (the process is gone, or a zombie).
        if let Some(pid) = self.predecessor {
            let deadline = std::time::Instant::now() + STEP_TIMEOUT;
            while running(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Does process `pid` still hold its descriptors? It does until it is gone
/// or a zombie whose other threads have all exited too (the last thread to
/// exit closes them; a zombie leader may still have threads exiting).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses.
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']));
    !zombie || std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|threads| threads.count() > 1)
}

/// Why an inherited connection was not adopted.
#[derive(Debug)]
pub enum NotAdopted {
    /// One of its guests is not in this daemon's policy.
    GuestGone(String),
    /// Its segment cannot be mapped.
    Segment(io::Error),
    /// A guest is at a quota this daemon's policy sets lower.
    Quota(crate::charge::Exceeded),
}

impl fmt::Display for NotAdopted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotAdopted::GuestGone(name) => write!(f, "guest {name} is not in the policy"),
            NotAdopted::Segment(e) => write!(f, "segment: {e}"),
            NotAdopted::Quota(e) => {
                write!(f, "guest {} is at its {} quota ({})", e.guest.name, e.quota.name(), e.limit)
            }
        }
    }
}

/// Makes an inherited connection one of `daemon`'s, charged to its guests
/// once (as the old daemon had it charged).
pub fn adopt(daemon: &Daemon, c: InheritedConnection) -> Result<(), NotAdopted> {
    let policy = daemon.policy();
    let part = &c.part;
    let slot = |name: &str| policy.slot_by_name(name).cloned().ok_or_else(|| NotAdopted::GuestGone(name.into()));
    let (client, server) = (slot(&part.client)?, slot(&part.server)?);
    let memory = match part.piece {
        None => {
            let segment = Segment::adopt(&c.files, part.ring_size).map_err(NotAdopted::Segment)?;
            RecordMemory::Files { segment, files: c.files }
        }
        Some(index) => {
            let chunk = Arc::new(crate::pool::KitChunk::handed(c.files, part.ring_size));
            let piece = crate::pool::Piece { chunk, index };
            RecordMemory::Piece { segment: piece.segment().map_err(NotAdopted::Segment)?, piece }
        }
    };
    let bytes = vsocket_abi::layout::segment_size(part.ring_size) as u64;
    let charge = daemon.charge(&policy, &client, &server, bytes).map_err(NotAdopted::Quota)?;
    daemon.connections.add(ConnectionRecord {
        id: ConnectionId(part.id),
        client,
        client_addr: part.client_addr,
        server,
        server_addr: part.server_addr,
        opened: UNIX_EPOCH + Duration::from_millis(part.opened_ms),
        memory,
        carrier: Carrier::Shared(Pair { channel: ChannelId(part.channel), listener: ListenerId(part.listener) }),
        lifelines: c.lifelines.into_iter().map(Arc::new).collect(),
        reset: AtomicBool::new(part.reset),
        quiet: Default::default(),
        charge,
        kit: None,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run directory of its own for one test.
    fn run_dir(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vsocketd-handover-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Offers a scripted hand-over in `dir`: sends `parts` (each with
    /// `fds` pipe ends), then, if the last was `End`, returns what the
    /// taker answered; otherwise goes away.
    fn fake_giver(dir: &Path, parts: Vec<(String, usize)>) -> std::thread::JoinHandle<Vec<u8>> {
        let listener = vsocket_sys::seqpacket_listen(&socket_path(dir), 1).unwrap();
        std::thread::spawn(move || {
            let taker = vsocket_sys::accept(listener.as_fd()).unwrap();
            let (keep, _other) = vsocket_sys::pipe().unwrap();
            let ends = parts.last().is_some_and(|(json, _)| json.contains("End"));
            for (json, fds) in parts {
                let with: Vec<BorrowedFd<'_>> = (0..fds).map(|_| keep.as_fd()).collect();
                if vsocket_sys::send_with_fds(taker.as_fd(), json.as_bytes(), &with).is_err() {
                    return Vec::new();
                }
            }
            if !ends {
                // A giver that stops short goes away.
                return Vec::new();
            }
            vsocket_sys::set_recv_timeout(taker.as_fd(), Duration::from_secs(5)).unwrap();
            let mut buf = [0u8; 16];
            let n = vsocket_sys::recv_with_fds(taker.as_fd(), &mut buf).map_or(0, |(n, _)| n);
            buf[..n].to_vec()
        })
    }

    fn json(part: &Part) -> String {
        serde_json::to_string(part).unwrap()
    }

    #[test]
    fn without_an_offer_nothing_is_taken() {
        let dir = run_dir("none");
        assert!(take(&dir).unwrap().is_none());
    }

    #[test]
    fn the_parts_are_taken_in_order_and_the_giver_is_told() {
        let dir = run_dir("whole");
        let connection = ConnectionPart {
            id: 41,
            client: "a".into(),
            client_addr: "10.0.0.2:5000".parse().unwrap(),
            server: "b".into(),
            server_addr: "10.0.0.3:80".parse().unwrap(),
            opened_ms: 1,
            ring_size: 1 << 16,
            channel: 7,
            listener: 8,
            reset: false,
            lifelines: 1,
            piece: None,
        };
        // A connection from a version-1 daemon: no count, a lifeline per end.
        let older = json(&Part::Connection(ConnectionPart { id: 40, lifelines: 2, ..connection.clone() }))
            .replace(",\"lifelines\":2", "");
        assert!(!older.contains("lifelines"), "{older}");
        let giver = fake_giver(
            &dir,
            vec![
                (json(&Part::Hello { version: VERSION, next_id: 42 }), 0),
                (json(&Part::Guest { name: "a".into() }), 1),
                (json(&Part::Listener { guest: "b".into(), local: "0.0.0.0:80".parse().unwrap() }), 0),
                (json(&Part::Connection(connection)), 5),
                (older, 6),
                (json(&Part::End), 0),
            ],
        );
        let inherited = take(&dir).unwrap().unwrap();
        assert_eq!(inherited.next_id, 42);
        assert!(inherited.guests.contains_key("a"));
        assert_eq!(inherited.listeners, vec![("b".to_string(), "0.0.0.0:80".parse().unwrap())]);
        assert_eq!(inherited.connections.len(), 2);
        assert_eq!(inherited.connections[0].part.id, 41);
        assert_eq!(inherited.connections[0].lifelines.len(), 1);
        assert_eq!(inherited.connections[1].part.id, 40);
        assert_eq!(inherited.connections[1].lifelines.len(), 2);
        inherited.done();
        assert_eq!(giver.join().unwrap(), TAKEN);
    }

    #[test]
    fn another_version_is_refused() {
        let dir = run_dir("version");
        let _giver = fake_giver(&dir, vec![(json(&Part::Hello { version: VERSION + 1, next_id: 1 }), 0)]);
        assert!(matches!(take(&dir), Err(HandoverError::Version(v)) if v == VERSION + 1));
    }

    #[test]
    fn a_part_out_of_turn_or_with_the_wrong_descriptors_ends_the_take() {
        let dir = run_dir("turn");
        let _giver = fake_giver(&dir, vec![(json(&Part::End), 0)]);
        assert!(matches!(take(&dir), Err(HandoverError::Malformed(_))), "a part before Hello");

        let dir = run_dir("fds");
        let hello = json(&Part::Hello { version: VERSION, next_id: 1 });
        let _giver = fake_giver(&dir, vec![(hello, 0), (json(&Part::Guest { name: "a".into() }), 0)]);
        assert!(matches!(take(&dir), Err(HandoverError::Malformed(_))), "a guest without its socket");

        let dir = run_dir("garbage");
        let _giver = fake_giver(&dir, vec![("{\"Hello\":".into(), 0)]);
        assert!(matches!(take(&dir), Err(HandoverError::Malformed(_))), "not a part");

        let dir = run_dir("early-end");
        let _giver = fake_giver(&dir, vec![(json(&Part::Hello { version: VERSION, next_id: 1 }), 0)]);
        assert!(matches!(take(&dir), Err(HandoverError::Malformed(_))), "the giver went away");
    }
}
