//! Messages on a guest's control socket.
//!
//! The control socket is a Unix `SOCK_SEQPACKET` socket served by `vsocketd`,
//! one per guest: the kernel keeps message boundaries and carries file
//! descriptors (`SCM_RIGHTS`) beside them, so a message is exactly one
//! datagram and needs no framing. Every message starts with a one-byte kind;
//! fields are little-endian and fixed-size, so each kind has one exact length
//! and [`Message::decode`] rejects anything else.
//!
//! Conversations:
//! - a process's *request channel*: `Connect` → `Connected` (with the segment
//!   memfd and the doorbell), `Fallback`, `Refused` or `Dropped`;
//! - a *listener channel*, one per listening socket: the first message is
//!   `Listen` → `ListenOk` or `Refused`; afterwards the daemon pushes one
//!   `Incoming` (with memfd and doorbell) per connection brokered to it.
//!   Closing the channel unregisters the listener.
//! - on a request channel, after exec: `Reattach` (with the lifeline,
//!   which proves the process holds that end) → `Reattached` (with the
//!   end's two segment halves) or `Refused`. A process keeps no segment
//!   descriptor once it has mapped the halves; a new program image, which
//!   has the connection's descriptors but not its mapping, asks for them.
//! - kits (`grant`, ARCHITECTURE §3b): a library that takes them asks with
//!   `ListenKits` (→ `ListenOkKits`, with the listener's bell) and
//!   `ConnectKits` (→ `ConnectedKits`, with the connection, the grant's
//!   queue page and bell, and a batch of kits; or any reply `Connect`
//!   gets). The daemon pushes the server's kits on the listener's kit
//!   channel (`Kits`, before the client gets its own) and `Revoke` when a
//!   grant ends; the library sends `NoKits` there when its listener can take no
//!   more (it forked). A daemon that does not know these kinds closes the
//!   channel. (`ConnectKitsV1` and `ListenKitsV1` are those of a library
//!   that does not set a kit's take word, `ConnectKitsV2` and
//!   `ListenKitsV2` those of one that takes a kit's memory as two memfds
//!   of its own rather than a piece of a chunk, `ConnectKitsV3` and
//!   `ListenKitsV3` those of one that does not keep a kit's doorbell for
//!   the next kit in its piece: the daemon answers them as `Connect` and
//!   `Listen`, so such a library gets no kits.)
//! - a kit's memory is a piece of a *chunk* (`layout::CHUNK_PIECES`
//!   connections' halves in two files, ARCHITECTURE §3c): a batch brings
//!   the files of each chunk its kits are in (this end's read-write, the
//!   peer's read-only) and names each kit's place; after exec, a kit's end
//!   gets `ReattachedAt` (the chunk's files, and which piece).

use crate::layout::Endpoint;
use std::net::{Ipv4Addr, SocketAddrV4};

/// Largest encoded message; receivers use a buffer of this size.
pub const MAX_MESSAGE: usize = 128;

/// File descriptors that travel with `Connected` and `Incoming`, in order.
pub const CONNECTION_FDS: usize = 4;
/// Index of this end's half of the segment (a memfd, read-write) among a
/// connection's descriptors.
pub const FD_SEGMENT: usize = 0;
/// Index of the doorbell (this end of a Unix stream pair) among them.
pub const FD_DOORBELL: usize = 1;
/// Index of the lifeline: a write end of a pipe whose read end the daemon
/// keeps (both ends of a connection get one of the same pipe). Each process
/// holding an end of the connection keeps it open and writes nothing; when
/// the last one closes it (or exits), the daemon sees the pipe hang up and
/// knows the connection is gone, whatever the segment says.
pub const FD_LIFELINE: usize = 2;
/// Index of the peer's half of the segment: a read-only descriptor of the
/// peer's memfd.
pub const FD_PEER_SEGMENT: usize = 3;

/// Descriptors that travel with `Reattached`: this end's half of the
/// segment (read-write), then the peer's (read-only).
pub const HALVES_FDS: usize = 2;

/// One control message, in either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Library → daemon: open a connection from `local` to `remote`.
    /// `local` is what the program's socket is bound to; the daemon replaces
    /// an address the guest does not own with the guest's own address.
    Connect { local: SocketAddrV4, remote: SocketAddrV4 },
    /// Daemon → library: the connection is established; the segment and the
    /// doorbell are attached.
    Connected(ConnectionInfo),
    /// Daemon → library: no vSocket listener there; use the kernel path.
    Fallback,
    /// Daemon → library: refused at once; the call fails with `errno`.
    Refused { errno: i32 },
    /// Daemon → library: denied by a policy that drops silently; the call
    /// behaves as a connect to a firewalled port (it never completes).
    Dropped,
    /// Library → daemon, first message of a listener channel.
    Listen { local: SocketAddrV4, backlog: u32 },
    /// Daemon → library: the listener is registered.
    ListenOk,
    /// Daemon → library on a listener channel: a new connection to accept.
    Incoming(ConnectionInfo),
    /// Daemon → a VM guest's library: the connection is established; its
    /// memory is the piece of the VM's region at byte `offset` (see
    /// `layout`, "Placed in a region"). No descriptors travel.
    ConnectedAt { info: ConnectionInfo, offset: u64 },
    /// Daemon → a VM guest's library, on a listener stream: a new
    /// connection to accept, placed at `offset` of the VM's region.
    IncomingAt { info: ConnectionInfo, offset: u64 },
    /// Library → daemon, with the write end of end `end`'s lifeline: send
    /// this end's segment halves again (a new program image after exec).
    Reattach { id: u64, end: Endpoint },
    /// Daemon → library: the halves, as [`HALVES_FDS`] says.
    Reattached,
    /// Daemon → library: a kit's end, whose halves are piece `piece` of
    /// the chunk whose files come with it (this end's, then the peer's).
    ReattachedAt { piece: u8 },
    /// Library → daemon: as `Connect`, from a library that takes kits.
    ConnectKits { local: SocketAddrV4, remote: SocketAddrV4 },
    /// Library → daemon: as `Listen`, from a library that takes kits.
    ListenKits { local: SocketAddrV4, backlog: u32 },
    /// Library → daemon: `ConnectKits` of a library that does not set a
    /// kit's take word (`layout::TAKE`; before it, kinds 13 and 14 were
    /// `ConnectKits` and `ListenKits`). The daemon takes it as `Connect`:
    /// a listener of today would never accept such a library's kits.
    ConnectKitsV1 { local: SocketAddrV4, remote: SocketAddrV4 },
    /// Library → daemon: `ListenKits` of a library that does not keep a
    /// kit taken across a `Revoke`. The daemon takes it as `Listen`.
    ListenKitsV1 { local: SocketAddrV4, backlog: u32 },
    /// Library → daemon: `ConnectKits` of a library whose kits each came
    /// with their own two memfds (kind 20, before chunks). The daemon takes
    /// it as `Connect`.
    ConnectKitsV2 { local: SocketAddrV4, remote: SocketAddrV4 },
    /// Library → daemon: `ListenKits` of such a library (kind 21). The
    /// daemon takes it as `Listen`.
    ListenKitsV2 { local: SocketAddrV4, backlog: u32 },
    /// Library → daemon: `ConnectKits` of a library whose every kit came
    /// with a doorbell of its own (kind 22, before [`Grant::kept`]). The
    /// daemon takes it as `Connect`.
    ConnectKitsV3 { local: SocketAddrV4, remote: SocketAddrV4 },
    /// Library → daemon: `ListenKits` of such a library (kind 23). The
    /// daemon takes it as `Listen`.
    ListenKitsV3 { local: SocketAddrV4, backlog: u32 },
    /// Daemon → library: the listener is registered; its bell's read end
    /// and its kit channel (the library's end) come with it.
    ListenOkKits,
    /// Daemon → library: the connection is established, as `Connected`
    /// (its [`CONNECTION_FDS`] descriptors first), and `grant` comes with
    /// it: the queue page (read-write), a write end of the listener's bell,
    /// then the batch's own ([`Grant::fds`]): the batch's lifeline (a
    /// write end of the pipe whose read end the daemon keeps for all its
    /// kits), the files of each chunk the batch's kits are in (this end's
    /// read-write, then the peer's read-only), then [`KIT_FDS`] per kit
    /// not in [`Grant::kept`].
    ConnectedKits { info: ConnectionInfo, grant: Grant },
    /// Daemon → library on a listener's kit channel (which no wait
    /// watches: kits never make a listener look readable): the server's
    /// ends of a batch of kits of `grant`, whose clients are at `client` (any port)
    /// and dial `server`: the queue page (read-only), then the batch's own
    /// (as in `ConnectedKits`).
    Kits { grant: Grant, client: std::net::Ipv4Addr, server: SocketAddrV4 },
    /// Daemon → library on a listener's kit channel: grant `grant` is
    /// over; its kits not yet accepted are let go.
    Revoke { grant: u64 },
    /// Library → daemon on a listener channel: no more kits for this
    /// listener (its process forked, so more than one process may read the
    /// channel; or a batch could not be taken). The grants end.
    NoKits,
}

/// A batch of kits of one grant: kits `first .. first + count` of grant
/// `id` (sequence numbers in the grant's queue, see `grant`), in `chunks`
/// chunks whose files come with it; kit `first + i` is at `places[i]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub id: u64,
    pub first: u32,
    pub count: u8,
    pub chunks: u8,
    /// Bit `i` set: kit `first + i` comes without a doorbell; its
    /// connection uses the one each end kept from the connection before
    /// it in the same piece (`layout::BELL_KEPT`, ARCHITECTURE §3c
    /// stage 6).
    pub kept: u32,
    pub places: [Place; MAX_KITS as usize],
}

impl Grant {
    /// A batch of `count` kits from `first`, all in one chunk at pieces
    /// `0 .. count` (what a test, or a fresh chunk, makes).
    pub fn in_one_chunk(id: u64, first: u32, count: u8) -> Grant {
        let mut places = [Place::default(); MAX_KITS as usize];
        for (i, p) in places.iter_mut().enumerate().take(count as usize) {
            *p = Place { chunk: 0, piece: i as u8 };
        }
        Grant { id, first, count, chunks: 1, kept: 0, places }
    }

    /// The descriptors of the batch itself: its lifeline, each chunk's two
    /// files, then [`KIT_FDS`] per kit that does not use a kept doorbell.
    pub fn fds(&self) -> usize {
        1 + 2 * self.chunks as usize + KIT_FDS * (self.count as usize - self.kept.count_ones() as usize)
    }

    /// Does kit `first + i` use the doorbell its piece's ends kept?
    pub fn uses_kept_bell(&self, i: usize) -> bool {
        i < 32 && self.kept & (1 << i) != 0
    }

    /// The places of the batch's kits, in order.
    pub fn kit_places(&self) -> &[Place] {
        &self.places[..self.count as usize]
    }
}

/// Where a kit's memory is: piece `piece` of the batch's chunk number
/// `chunk` (counting the chunks whose files came with the batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Place {
    pub chunk: u8,
    pub piece: u8,
}

/// Descriptors per kit: its doorbell; its memory is a piece of a chunk
/// whose files come once per batch, and its lifeline is the batch's
/// (ARCHITECTURE §3c).
pub const KIT_FDS: usize = 1;
/// Most kits in one batch.
pub const MAX_KITS: u8 = 32;
/// Most chunks one batch's kits are in (a place names its chunk in three
/// bits).
pub const MAX_CHUNKS: u8 = 8;

/// What each end learns about a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Daemon-wide connection id (for `vsocketctl` and logs).
    pub id: u64,
    /// This end's address, as getsockname reports it.
    pub local: SocketAddrV4,
    /// The other end's address, as getpeername reports it.
    pub peer: SocketAddrV4,
    /// Bytes per ring; the segment must be exactly `layout::segment_size`.
    pub ring_size: u32,
}

/// Why a datagram is not a valid message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Empty datagram.
    Empty,
    /// Unknown message kind {0}.
    UnknownKind(u8),
    /// A message of this kind has a different length.
    BadLength { kind: u8, expected: usize, actual: usize },
    /// A field holds an impossible value.
    BadField(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Empty => write!(f, "empty control message"),
            DecodeError::UnknownKind(k) => write!(f, "unknown control message kind {k}"),
            DecodeError::BadLength { kind, expected, actual } => {
                write!(f, "control message kind {kind} must be {expected} bytes, got {actual}")
            }
            DecodeError::BadField(name) => write!(f, "control message field {name} is invalid"),
        }
    }
}

impl std::error::Error for DecodeError {}

mod kind {
    pub const CONNECT: u8 = 1;
    pub const CONNECTED: u8 = 2;
    pub const FALLBACK: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const DROPPED: u8 = 5;
    pub const LISTEN: u8 = 6;
    pub const LISTEN_OK: u8 = 7;
    pub const INCOMING: u8 = 8;
    pub const CONNECTED_AT: u8 = 9;
    pub const INCOMING_AT: u8 = 10;
    pub const REATTACH: u8 = 11;
    pub const REATTACHED: u8 = 12;
    pub const CONNECT_KITS_V1: u8 = 13;
    pub const LISTEN_KITS_V1: u8 = 14;
    pub const LISTEN_OK_KITS: u8 = 15;
    pub const CONNECTED_KITS: u8 = 16;
    pub const KITS: u8 = 17;
    pub const REVOKE: u8 = 18;
    pub const NO_KITS: u8 = 19;
    pub const CONNECT_KITS_V2: u8 = 20;
    pub const LISTEN_KITS_V2: u8 = 21;
    pub const CONNECT_KITS_V3: u8 = 22;
    pub const LISTEN_KITS_V3: u8 = 23;
    pub const REATTACHED_AT: u8 = 24;
    pub const CONNECT_KITS: u8 = 25;
    pub const LISTEN_KITS: u8 = 26;
}

const ADDR_LEN: usize = 6;
const INFO_LEN: usize = 8 + 2 * ADDR_LEN + 4;
const GRANT_LEN: usize = 8 + 4 + 1 + 1 + 4 + MAX_KITS as usize;

impl Message {
    /// Encodes into `buf` and returns the used prefix.
    pub fn encode<'a>(&self, buf: &'a mut [u8; MAX_MESSAGE]) -> &'a [u8] {
        let mut w = Writer { buf, len: 0 };
        match *self {
            Message::Connect { local, remote } => {
                w.u8(kind::CONNECT);
                w.addr(local);
                w.addr(remote);
            }
            Message::Connected(info) => {
                w.u8(kind::CONNECTED);
                w.info(info);
            }
            Message::Fallback => w.u8(kind::FALLBACK),
            Message::Refused { errno } => {
                w.u8(kind::REFUSED);
                w.bytes(&errno.to_le_bytes());
            }
            Message::Dropped => w.u8(kind::DROPPED),
            Message::Listen { local, backlog } => {
                w.u8(kind::LISTEN);
                w.addr(local);
                w.bytes(&backlog.to_le_bytes());
            }
            Message::ListenOk => w.u8(kind::LISTEN_OK),
            Message::Incoming(info) => {
                w.u8(kind::INCOMING);
                w.info(info);
            }
            Message::ConnectedAt { info, offset } => {
                w.u8(kind::CONNECTED_AT);
                w.info(info);
                w.bytes(&offset.to_le_bytes());
            }
            Message::IncomingAt { info, offset } => {
                w.u8(kind::INCOMING_AT);
                w.info(info);
                w.bytes(&offset.to_le_bytes());
            }
            Message::Reattach { id, end } => {
                w.u8(kind::REATTACH);
                w.bytes(&id.to_le_bytes());
                w.u8(end.index() as u8);
            }
            Message::Reattached => w.u8(kind::REATTACHED),
            Message::ReattachedAt { piece } => {
                w.u8(kind::REATTACHED_AT);
                w.u8(piece);
            }
            Message::ConnectKits { local, remote }
            | Message::ConnectKitsV1 { local, remote }
            | Message::ConnectKitsV2 { local, remote }
            | Message::ConnectKitsV3 { local, remote } => {
                w.u8(match self {
                    Message::ConnectKitsV1 { .. } => kind::CONNECT_KITS_V1,
                    Message::ConnectKitsV2 { .. } => kind::CONNECT_KITS_V2,
                    Message::ConnectKitsV3 { .. } => kind::CONNECT_KITS_V3,
                    _ => kind::CONNECT_KITS,
                });
                w.addr(local);
                w.addr(remote);
            }
            Message::ListenKits { local, backlog }
            | Message::ListenKitsV1 { local, backlog }
            | Message::ListenKitsV2 { local, backlog }
            | Message::ListenKitsV3 { local, backlog } => {
                w.u8(match self {
                    Message::ListenKitsV1 { .. } => kind::LISTEN_KITS_V1,
                    Message::ListenKitsV2 { .. } => kind::LISTEN_KITS_V2,
                    Message::ListenKitsV3 { .. } => kind::LISTEN_KITS_V3,
                    _ => kind::LISTEN_KITS,
                });
                w.addr(local);
                w.bytes(&backlog.to_le_bytes());
            }
            Message::ListenOkKits => w.u8(kind::LISTEN_OK_KITS),
            Message::ConnectedKits { info, grant } => {
                w.u8(kind::CONNECTED_KITS);
                w.info(info);
                w.grant(grant);
            }
            Message::Kits { grant, client, server } => {
                w.u8(kind::KITS);
                w.grant(grant);
                w.bytes(&client.octets());
                w.addr(server);
            }
            Message::Revoke { grant } => {
                w.u8(kind::REVOKE);
                w.bytes(&grant.to_le_bytes());
            }
            Message::NoKits => w.u8(kind::NO_KITS),
        }
        let len = w.len;
        &w.buf[..len]
    }

    /// Parses one datagram received from the other side.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let (&k, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        let expected = match k {
            kind::CONNECT => 2 * ADDR_LEN,
            kind::CONNECTED | kind::INCOMING => INFO_LEN,
            kind::CONNECTED_AT | kind::INCOMING_AT => INFO_LEN + 8,
            kind::FALLBACK
            | kind::DROPPED
            | kind::LISTEN_OK
            | kind::REATTACHED
            | kind::LISTEN_OK_KITS
            | kind::NO_KITS => 0,
            kind::REATTACH => 9,
            kind::REATTACHED_AT => 1,
            kind::REFUSED => 4,
            kind::LISTEN => ADDR_LEN + 4,
            kind::CONNECT_KITS | kind::CONNECT_KITS_V1 | kind::CONNECT_KITS_V2 | kind::CONNECT_KITS_V3 => 2 * ADDR_LEN,
            kind::LISTEN_KITS | kind::LISTEN_KITS_V1 | kind::LISTEN_KITS_V2 | kind::LISTEN_KITS_V3 => ADDR_LEN + 4,
            kind::CONNECTED_KITS => INFO_LEN + GRANT_LEN,
            kind::KITS => GRANT_LEN + 4 + ADDR_LEN,
            kind::REVOKE => 8,
            other => return Err(DecodeError::UnknownKind(other)),
        };
        if body.len() != expected {
            return Err(DecodeError::BadLength { kind: k, expected: expected + 1, actual: bytes.len() });
        }
        let mut r = Reader { buf: body };
        Ok(match k {
            kind::CONNECT => Message::Connect { local: r.addr(), remote: r.addr() },
            kind::CONNECTED => Message::Connected(r.info()?),
            kind::INCOMING => Message::Incoming(r.info()?),
            kind::CONNECTED_AT => Message::ConnectedAt { info: r.info()?, offset: r.offset()? },
            kind::INCOMING_AT => Message::IncomingAt { info: r.info()?, offset: r.offset()? },
            kind::FALLBACK => Message::Fallback,
            kind::DROPPED => Message::Dropped,
            kind::LISTEN_OK => Message::ListenOk,
            kind::REATTACHED => Message::Reattached,
            kind::REATTACHED_AT => {
                let piece = r.take::<1>()[0];
                if piece as usize >= crate::layout::CHUNK_PIECES {
                    return Err(DecodeError::BadField("piece"));
                }
                Message::ReattachedAt { piece }
            }
            kind::REATTACH => {
                let id = u64::from_le_bytes(r.take());
                let end = match r.take::<1>()[0] {
                    0 => Endpoint::Client,
                    1 => Endpoint::Server,
                    _ => return Err(DecodeError::BadField("end")),
                };
                Message::Reattach { id, end }
            }
            kind::REFUSED => {
                let errno = r.i32();
                if errno <= 0 || errno > 4095 {
                    return Err(DecodeError::BadField("errno"));
                }
                Message::Refused { errno }
            }
            kind::LISTEN => Message::Listen { local: r.addr(), backlog: r.u32() },
            kind::CONNECT_KITS_V1 => Message::ConnectKitsV1 { local: r.addr(), remote: r.addr() },
            kind::LISTEN_KITS_V1 => Message::ListenKitsV1 { local: r.addr(), backlog: r.u32() },
            kind::CONNECT_KITS_V2 => Message::ConnectKitsV2 { local: r.addr(), remote: r.addr() },
            kind::LISTEN_KITS_V2 => Message::ListenKitsV2 { local: r.addr(), backlog: r.u32() },
            kind::CONNECT_KITS_V3 => Message::ConnectKitsV3 { local: r.addr(), remote: r.addr() },
            kind::LISTEN_KITS_V3 => Message::ListenKitsV3 { local: r.addr(), backlog: r.u32() },
            kind::CONNECT_KITS => Message::ConnectKits { local: r.addr(), remote: r.addr() },
            kind::LISTEN_KITS => Message::ListenKits { local: r.addr(), backlog: r.u32() },
            kind::LISTEN_OK_KITS => Message::ListenOkKits,
            kind::CONNECTED_KITS => Message::ConnectedKits { info: r.info()?, grant: r.grant()? },
            kind::KITS => {
                let grant = r.grant()?;
                Message::Kits { grant, client: Ipv4Addr::from(r.take::<4>()), server: r.addr() }
            }
            kind::REVOKE => Message::Revoke { grant: u64::from_le_bytes(r.take()) },
            kind::NO_KITS => Message::NoKits,
            _ => unreachable!("kinds were matched above"),
        })
    }

    /// How many descriptors travel with this message.
    pub fn fd_count(&self) -> usize {
        match self {
            Message::Connected(_) | Message::Incoming(_) => CONNECTION_FDS,
            Message::Reattach { .. } => 1,
            Message::Reattached | Message::ReattachedAt { .. } => HALVES_FDS,
            Message::ListenOkKits => 2,
            Message::ConnectedKits { grant, .. } => CONNECTION_FDS + 2 + grant.fds(),
            Message::Kits { grant, .. } => 1 + grant.fds(),
            _ => 0,
        }
    }
}

struct Writer<'a> {
    buf: &'a mut [u8; MAX_MESSAGE],
    len: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn addr(&mut self, a: SocketAddrV4) {
        self.bytes(&a.ip().octets());
        self.bytes(&a.port().to_le_bytes());
    }
    fn info(&mut self, i: ConnectionInfo) {
        self.bytes(&i.id.to_le_bytes());
        self.addr(i.local);
        self.addr(i.peer);
        self.bytes(&i.ring_size.to_le_bytes());
    }
    fn grant(&mut self, g: Grant) {
        self.bytes(&g.id.to_le_bytes());
        self.bytes(&g.first.to_le_bytes());
        self.u8(g.count);
        self.u8(g.chunks);
        self.bytes(&g.kept.to_le_bytes());
        for p in g.places {
            self.u8(p.chunk << 5 | p.piece);
        }
    }
}

/// Reads fixed-size fields; callers checked the total length first.
struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.buf.split_at(N);
        self.buf = rest;
        head.try_into().expect("split_at returned N bytes")
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.take())
    }
    fn addr(&mut self) -> SocketAddrV4 {
        let ip = Ipv4Addr::from(self.take::<4>());
        SocketAddrV4::new(ip, u16::from_le_bytes(self.take()))
    }
    /// A piece's offset in a region: whole pages.
    fn offset(&mut self) -> Result<u64, DecodeError> {
        let offset = u64::from_le_bytes(self.take());
        if !offset.is_multiple_of(crate::layout::PAGE as u64) {
            return Err(DecodeError::BadField("offset"));
        }
        Ok(offset)
    }
    fn info(&mut self) -> Result<ConnectionInfo, DecodeError> {
        let id = u64::from_le_bytes(self.take());
        let local = self.addr();
        let peer = self.addr();
        let ring_size = self.u32();
        if !crate::layout::ring_size_valid(ring_size) {
            return Err(DecodeError::BadField("ring_size"));
        }
        Ok(ConnectionInfo { id, local, peer, ring_size })
    }
    /// A batch of 1 to [`MAX_KITS`] kits in 1 to [`MAX_CHUNKS`] chunks,
    /// each kit's place in one of them, kept doorbells only for its kits.
    fn grant(&mut self) -> Result<Grant, DecodeError> {
        let id = u64::from_le_bytes(self.take());
        let first = self.u32();
        let count = self.take::<1>()[0];
        if count == 0 || count > MAX_KITS {
            return Err(DecodeError::BadField("count"));
        }
        let chunks = self.take::<1>()[0];
        if chunks == 0 || chunks > MAX_CHUNKS {
            return Err(DecodeError::BadField("chunks"));
        }
        let kept = self.u32();
        if count < 32 && kept >> count != 0 {
            return Err(DecodeError::BadField("kept"));
        }
        let bytes = self.take::<{ MAX_KITS as usize }>();
        let places = bytes.map(|b| Place { chunk: b >> 5, piece: b & 31 });
        if places[..count as usize].iter().any(|p| p.chunk >= chunks) {
            return Err(DecodeError::BadField("places"));
        }
        Ok(Grant { id, first, count, chunks, kept, places })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// A batch of 32 kits in all eight chunks a batch may use.
    fn spread() -> Grant {
        let mut grant = Grant::in_one_chunk(3, 64, MAX_KITS);
        grant.chunks = MAX_CHUNKS;
        for (i, p) in grant.places.iter_mut().enumerate() {
            *p = Place { chunk: (i % 8) as u8, piece: 31 - i as u8 };
        }
        // Every third kit's doorbell kept.
        grant.kept = 0x4924_9249;
        grant
    }

    fn all_kinds() -> Vec<Message> {
        let info = ConnectionInfo { id: 7, local: a("10.0.0.2:6379"), peer: a("10.0.0.3:40000"), ring_size: 1 << 16 };
        vec![
            Message::Connect { local: a("10.0.0.3:40000"), remote: a("10.0.0.2:6379") },
            Message::Connected(info),
            Message::Fallback,
            Message::Refused { errno: 111 },
            Message::Dropped,
            Message::Listen { local: a("0.0.0.0:80"), backlog: 511 },
            Message::ListenOk,
            Message::Incoming(info),
            Message::ConnectedAt { info, offset: 1 << 20 },
            Message::IncomingAt { info, offset: 0 },
            Message::Reattach { id: 7, end: Endpoint::Server },
            Message::Reattached,
            Message::ReattachedAt { piece: 3 },
            Message::ConnectKits { local: a("0.0.0.0:40000"), remote: a("10.0.0.2:6379") },
            Message::ListenKits { local: a("0.0.0.0:80"), backlog: 4096 },
            Message::ConnectKitsV1 { local: a("0.0.0.0:40000"), remote: a("10.0.0.2:6379") },
            Message::ListenKitsV1 { local: a("0.0.0.0:80"), backlog: 4096 },
            Message::ConnectKitsV2 { local: a("0.0.0.0:40000"), remote: a("10.0.0.2:6379") },
            Message::ListenKitsV2 { local: a("0.0.0.0:80"), backlog: 4096 },
            Message::ConnectKitsV3 { local: a("0.0.0.0:40000"), remote: a("10.0.0.2:6379") },
            Message::ListenKitsV3 { local: a("0.0.0.0:80"), backlog: 4096 },
            Message::ListenOkKits,
            Message::ConnectedKits { info, grant: Grant::in_one_chunk(3, 64, MAX_KITS) },
            Message::ConnectedKits { info, grant: spread() },
            Message::Kits {
                grant: Grant::in_one_chunk(3, 64, 1),
                client: "10.0.0.3".parse().unwrap(),
                server: a("10.0.0.2:6379"),
            },
            Message::Revoke { grant: u64::MAX },
            Message::NoKits,
        ]
    }

    #[test]
    fn a_library_from_before_the_take_word_is_told_apart() {
        // What it sent for `ConnectKits` and `ListenKits`.
        // (the same fields as today's, under kinds 13 and 14).
        let (local, remote) = (a("0.0.0.0:40000"), a("10.0.0.2:6379"));
        let mut buf = [0; MAX_MESSAGE];
        let mut connect = Message::ConnectKits { local, remote }.encode(&mut buf).to_vec();
        assert_ne!(connect[0], 13);
        connect[0] = 13;
        assert_eq!(Message::decode(&connect), Ok(Message::ConnectKitsV1 { local, remote }));
        let mut listen = Message::ListenKits { local, backlog: 511 }.encode(&mut buf).to_vec();
        assert_ne!(listen[0], 14);
        listen[0] = 14;
        assert_eq!(Message::decode(&listen), Ok(Message::ListenKitsV1 { local, backlog: 511 }));
        // And one from before chunks, under kinds 20 and 21.
        connect[0] = 20;
        assert_eq!(Message::decode(&connect), Ok(Message::ConnectKitsV2 { local, remote }));
        listen[0] = 21;
        assert_eq!(Message::decode(&listen), Ok(Message::ListenKitsV2 { local, backlog: 511 }));
        // And one from before kept doorbells, under kinds 22 and 23.
        connect[0] = 22;
        assert_eq!(Message::decode(&connect), Ok(Message::ConnectKitsV3 { local, remote }));
        listen[0] = 23;
        assert_eq!(Message::decode(&listen), Ok(Message::ListenKitsV3 { local, backlog: 511 }));
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_kinds() {
            let mut buf = [0; MAX_MESSAGE];
            let bytes = m.encode(&mut buf).to_vec();
            assert_eq!(Message::decode(&bytes), Ok(m), "{m:?}");
        }
    }

    #[test]
    fn wrong_lengths_are_rejected() {
        for m in all_kinds() {
            let mut buf = [0; MAX_MESSAGE];
            let bytes = m.encode(&mut buf).to_vec();
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(matches!(Message::decode(&longer), Err(DecodeError::BadLength { .. })));
            if bytes.len() > 1 {
                assert!(matches!(Message::decode(&bytes[..bytes.len() - 1]), Err(DecodeError::BadLength { .. })));
            }
        }
    }

    #[test]
    fn invalid_fields_are_rejected() {
        assert_eq!(Message::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(Message::decode(&[0]), Err(DecodeError::UnknownKind(0)));
        assert_eq!(Message::decode(&[200]), Err(DecodeError::UnknownKind(200)));
        let mut refused = vec![kind::REFUSED];
        refused.extend_from_slice(&(-5i32).to_le_bytes());
        assert_eq!(Message::decode(&refused), Err(DecodeError::BadField("errno")));
        let info = ConnectionInfo { id: 1, local: a("1.2.3.4:5"), peer: a("1.2.3.4:6"), ring_size: 1 << 16 };
        let mut buf = [0; MAX_MESSAGE];
        let mut bytes = Message::Connected(info).encode(&mut buf).to_vec();
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(Message::decode(&bytes), Err(DecodeError::BadField("ring_size")));
        let mut placed = Message::ConnectedAt { info, offset: 4096 }.encode(&mut buf).to_vec();
        let n = placed.len();
        placed[n - 8..].copy_from_slice(&4097u64.to_le_bytes());
        assert_eq!(Message::decode(&placed), Err(DecodeError::BadField("offset")));
        // A batch of no kits, or of more than one message can carry; in no
        // chunk or too many; with a kit in a chunk that did not come.
        let batch = |count: u8, chunks: u8, place: u8| {
            let mut kits = vec![kind::KITS];
            kits.extend_from_slice(&5u64.to_le_bytes());
            kits.extend_from_slice(&0u32.to_le_bytes());
            kits.push(count);
            kits.push(chunks);
            kits.extend_from_slice(&0u32.to_le_bytes());
            kits.extend_from_slice(&[place; MAX_KITS as usize]);
            kits.extend_from_slice(&[10, 0, 0, 3, 10, 0, 0, 2, 0x50, 0]);
            Message::decode(&kits)
        };
        for count in [0, MAX_KITS + 1, u8::MAX] {
            assert_eq!(batch(count, 1, 0), Err(DecodeError::BadField("count")), "{count}");
        }
        for chunks in [0, MAX_CHUNKS + 1] {
            assert_eq!(batch(1, chunks, 0), Err(DecodeError::BadField("chunks")), "{chunks}");
        }
        assert_eq!(batch(1, 2, 2 << 5), Err(DecodeError::BadField("places")));
        assert!(batch(1, 3, 2 << 5 | 31).is_ok());
        // A kept doorbell named for a kit past the batch.
        let kits = |kept: u32| {
            let grant = Grant { kept, ..Grant::in_one_chunk(5, 0, 3) };
            let message = Message::Kits { grant, client: Ipv4Addr::LOCALHOST, server: a("10.0.0.2:80") };
            Message::decode(message.encode(&mut [0; MAX_MESSAGE]))
        };
        assert!(kits(0b111).is_ok());
        assert_eq!(kits(0b1000), Err(DecodeError::BadField("kept")));
        assert!(Grant { kept: u32::MAX, ..Grant::in_one_chunk(5, 0, MAX_KITS) }.uses_kept_bell(31));
        let mut at = Message::ReattachedAt { piece: 31 }.encode(&mut buf).to_vec();
        at[1] = 32;
        assert_eq!(Message::decode(&at), Err(DecodeError::BadField("piece")));
    }

    #[test]
    fn a_batch_carries_its_kits_descriptors_within_one_message() {
        let grant = spread();
        let info = ConnectionInfo { id: 1, local: a("1.2.3.4:5"), peer: a("1.2.3.4:6"), ring_size: 1 << 16 };
        let most = Message::ConnectedKits { info, grant }.fd_count();
        assert_eq!(most, 4 + 2 + 1 + 2 * 8 + 32 - 11);
        let fresh = Message::ConnectedKits { info, grant: Grant { kept: 0, ..grant } };
        assert_eq!(fresh.fd_count(), 4 + 2 + 1 + 2 * 8 + 32);
        // SCM_MAX_FD in Linux.
        assert!(most <= 253);
        let server = Message::Kits { grant, client: Ipv4Addr::LOCALHOST, server: a("1.2.3.4:5") };
        assert_eq!(server.fd_count(), 1 + 1 + 2 * 8 + 32 - 11);
        assert_eq!(Message::ListenOkKits.fd_count(), 2);
        assert_eq!(Grant::in_one_chunk(1, 0, 3).fds(), 1 + 2 + 3);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A deterministic sweep over short datagrams of every kind byte.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % (MAX_MESSAGE as u64 + 1)) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            let _ = Message::decode(&bytes);
        }
    }
}
