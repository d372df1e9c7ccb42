//! The `tcp` fabric: kernel TCP between daemons, one connection per host
//! pair, frames back to back on it.
//!
//! Sockets are non-blocking and driven by the relay's epoll set. Data goes
//! from a guest's ring straight to the socket; what a link cannot take at
//! once waits in its outbound buffer (the relay stops
//! reading guests' rings while that buffer is past [`Transport::backlog`]'s
//! limit). Inbound, small frames are read through a buffer and parsed as
//! they arrive; a `Data` frame is reported as soon as its header is in, and
//! the rest of its payload is read from the socket straight into its
//! stream's receive ring, with the next frame's start in the same call.
//! Dialing blocks, so it happens on a short-lived thread that hands the
//! connected socket over.

use super::{Events, LinkEvent, LinkFailure, LinkId, Transport};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;
use vsocket_abi::fabric::{DataStart, Frame, Origin, HEADER, MAX_CONTROL};
use vsocket_policy::FabricKind;
use vsocket_sys::Epoll;

/// Why a tcp link ended.
#[derive(Debug)]
pub enum LinkError {
    /// The other host closed the link.
    Closed,
    /// Reading the link failed.
    Read(io::Error),
    /// Writing the link failed.
    Write(io::Error),
    /// The other host sent a frame that does not decode.
    Malformed { peer: SocketAddr, error: vsocket_abi::fabric::FrameError },
    /// The link could not be watched.
    Epoll(io::Error),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Closed => f.write_str("the other host closed the link"),
            LinkError::Read(e) => write!(f, "link read: {e}"),
            LinkError::Write(e) => write!(f, "link write: {e}"),
            LinkError::Malformed { peer, error } => write!(f, "malformed frame from {peer}: {error}"),
            LinkError::Epoll(e) => write!(f, "epoll: {e}"),
        }
    }
}

/// How long a dial may take before it counts as failed.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Inbound bytes read through the buffer per system call.
const READ_CHUNK: usize = 64 * 1024;
/// Each link's receive buffer: a read and the rest of a largest frame
/// other than `Data` (whose payload never waits in the buffer whole).
const INBOUND: usize = READ_CHUNK + HEADER + MAX_CONTROL;
/// Read after a payload received in place: the next frame's start.
const SPILL: usize = 4096;
/// Payload rests shorter than this are read through the buffer (as cheap
/// as a read of their own).
const DIRECT_MIN: usize = 8192;
/// Bytes taken from one link per readiness report, so that credit and the
/// other links are served while a busy link still has more.
const READ_BUDGET: usize = 1 << 20;

const TOKEN_LISTENER: u64 = 1;
const TOKEN_DIALED: u64 = 2;
const TOKEN_LINKS: u64 = 16;

struct Link {
    stream: TcpStream,
    peer: SocketAddr,
    /// Received bytes are `inbound[parsed..filled]`; the buffer's length
    /// never changes (so it is never cleared or zeroed again).
    inbound: Vec<u8>,
    /// Bytes of `inbound` already parsed into frames.
    parsed: usize,
    filled: usize,
    /// The `Data` frame whose payload is still arriving: its stream and
    /// the bytes still to come.
    payload: Option<DataStart>,
    outbound: Vec<u8>,
    /// Bytes of `outbound` already written.
    written: usize,
    /// EPOLLOUT is being watched.
    want_out: bool,
}

impl Link {
    fn new(stream: TcpStream, peer: SocketAddr) -> Link {
        Link {
            stream,
            peer,
            inbound: vec![0; INBOUND],
            parsed: 0,
            filled: 0,
            payload: None,
            outbound: Vec::new(),
            written: 0,
            want_out: false,
        }
    }
}

/// Kernel TCP links, listening on this host's fabric address.
pub struct TcpTransport {
    listener: TcpListener,
    links: HashMap<LinkId, Link>,
    next: LinkId,
    dialed_tx: mpsc::Sender<(SocketAddr, io::Result<TcpStream>)>,
    dialed_rx: mpsc::Receiver<(SocketAddr, io::Result<TcpStream>)>,
    dialed_bell: OwnedFd,
}

impl TcpTransport {
    /// Listens on `address` and registers with `epoll`.
    pub fn new(address: SocketAddr, epoll: &Epoll) -> io::Result<TcpTransport> {
        let listener = TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let dialed_bell = vsocket_sys::eventfd()?;
        epoll.add(listener.as_fd(), libc::EPOLLIN as u32, TOKEN_LISTENER)?;
        epoll.add(dialed_bell.as_fd(), libc::EPOLLIN as u32, TOKEN_DIALED)?;
        let (dialed_tx, dialed_rx) = mpsc::channel();
        Ok(TcpTransport { listener, links: HashMap::new(), next: TOKEN_LINKS, dialed_tx, dialed_rx, dialed_bell })
    }

    fn adopt(&mut self, stream: TcpStream, peer: SocketAddr, epoll: &Epoll) -> io::Result<LinkId> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let id = self.next;
        self.next += 1;
        epoll.add(stream.as_fd(), libc::EPOLLIN as u32, id)?;
        self.links.insert(id, Link::new(stream, peer));
        Ok(id)
    }

    /// Reads what the socket has (up to [`READ_BUDGET`]) and reports it.
    /// Returns an error when the link is finished (end of stream, a socket
    /// error or a malformed frame).
    fn read(link: &mut Link, id: LinkId, on: &mut dyn Events) -> Result<(), LinkError> {
        let mut budget = READ_BUDGET;
        loop {
            Self::parse(link, id, on)?;
            if budget == 0 {
                // Level-triggered: epoll reports the rest at once.
                return Ok(());
            }
            // The buffer holds at most an unfinished header or frame now;
            // a payload in progress finds it empty.
            let in_place = match link.payload.filter(|p| p.len >= DIRECT_MIN) {
                Some(p) => Self::read_in_place(link, id, p, on)?,
                None => None,
            };
            let (n, drained) = match in_place {
                Some(read) => read,
                None => Self::read_buffered(link)?,
            };
            budget = budget.saturating_sub(n);
            if drained {
                // A short read took all there was: epoll says when more comes.
                Self::parse(link, id, on)?;
                return Ok(());
            }
        }
    }

    /// Reads into the buffer: the bytes read and whether that emptied the
    /// socket.
    fn read_buffered(link: &mut Link) -> Result<(usize, bool), LinkError> {
        if link.parsed == link.filled {
            link.parsed = 0;
            link.filled = 0;
        } else if INBOUND - link.filled < READ_CHUNK {
            // The unparsed rest (less than a frame other than Data) moves
            // to the front.
            link.inbound.copy_within(link.parsed..link.filled, 0);
            link.filled -= link.parsed;
            link.parsed = 0;
        }
        let want = READ_CHUNK.min(INBOUND - link.filled);
        loop {
            return match link.stream.read(&mut link.inbound[link.filled..link.filled + want]) {
                Ok(0) => Err(LinkError::Closed),
                Ok(n) => {
                    link.filled += n;
                    Ok((n, n < want))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((0, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(LinkError::Read(e)),
            };
        }
    }

    /// Reads the rest of payload `p` straight into its stream's ring, and
    /// what follows into the (empty) buffer. `None` if the stream has no
    /// ring to take it (the bytes then go through the buffer, and the relay
    /// deals with them as it would with any), else as `read_buffered`.
    fn read_in_place(
        link: &mut Link,
        id: LinkId,
        p: DataStart,
        on: &mut dyn Events,
    ) -> Result<Option<(usize, bool)>, LinkError> {
        let Some(ring) = on.data_ring(id, p.origin, p.id) else { return Ok(None) };
        debug_assert_eq!(link.parsed, link.filled);
        link.parsed = 0;
        link.filled = 0;
        let got = loop {
            match ring.recv_from(link.stream.as_fd(), p.len, &mut link.inbound[..SPILL]) {
                Ok(got) => break got,
                Err(vsocket_ring::SocketError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(vsocket_ring::SocketError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Some((0, true)))
                }
                Err(vsocket_ring::SocketError::Io(e)) => return Err(LinkError::Read(e)),
                // A ring the guest closed or broke: the buffered path hands
                // the bytes to the relay, which resets the stream.
                Err(vsocket_ring::SocketError::Ring(_)) => return Ok(None),
            }
        };
        if got.ring + got.spill == 0 {
            return Err(LinkError::Closed);
        }
        link.filled = got.spill;
        if got.ring > 0 {
            link.payload = p.after(got.ring);
            on.event(LinkEvent::Received { link: id, origin: p.origin, id: p.id, len: got.ring, wake: got.wake });
        }
        // The spill fills only once the ring part is complete.
        Ok(Some((got.ring + got.spill, got.spill < SPILL)))
    }

    /// Reports what the buffer holds: the rest of a payload in progress,
    /// whole frames, and the start of a `Data` frame (its payload then
    /// arrives in progress).
    fn parse(link: &mut Link, id: LinkId, on: &mut dyn Events) -> Result<(), LinkError> {
        while link.parsed < link.filled {
            let buf = &link.inbound[link.parsed..link.filled];
            if let Some(p) = link.payload {
                let k = p.len.min(buf.len());
                on.event(LinkEvent::Payload { link: id, origin: p.origin, id: p.id, bytes: &buf[..k] });
                link.parsed += k;
                link.payload = p.after(k);
                continue;
            }
            let malformed = |error| LinkError::Malformed { peer: link.peer, error };
            if let Some(d) = DataStart::parse(buf).map_err(malformed)? {
                let have = d.len.min(buf.len() - HEADER);
                let frame = Frame::Data { origin: d.origin, id: d.id, bytes: &buf[HEADER..HEADER + have] };
                on.event(LinkEvent::Frame(id, frame));
                link.parsed += HEADER + have;
                link.payload = d.after(have);
                continue;
            }
            match Frame::decode(buf).map_err(malformed)? {
                Some((frame, used)) => {
                    on.event(LinkEvent::Frame(id, frame));
                    link.parsed += used;
                }
                None => break,
            }
        }
        if link.parsed == link.filled {
            link.parsed = 0;
            link.filled = 0;
        }
        Ok(())
    }

    /// Writes what the socket takes; watches EPOLLOUT while bytes remain.
    fn write(link: &mut Link, id: LinkId, epoll: &Epoll) -> Result<(), LinkError> {
        while link.written < link.outbound.len() {
            match link.stream.write(&link.outbound[link.written..]) {
                Ok(n) => link.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(LinkError::Write(e)),
            }
        }
        if link.written == link.outbound.len() {
            link.outbound.clear();
            link.written = 0;
        }
        let want_out = !link.outbound.is_empty();
        if want_out != link.want_out {
            let events = libc::EPOLLIN as u32 | if want_out { libc::EPOLLOUT as u32 } else { 0 };
            epoll.modify(link.stream.as_fd(), events, id).map_err(LinkError::Epoll)?;
            link.want_out = want_out;
        }
        Ok(())
    }
}

impl Transport for TcpTransport {
    fn dial(&mut self, address: SocketAddr, _epoll: &Epoll) {
        let tx = self.dialed_tx.clone();
        let bell = match self.dialed_bell.try_clone() {
            Ok(bell) => bell,
            Err(_) => return,
        };
        let _ = std::thread::Builder::new().name("fabric-dial".into()).spawn(move || {
            let result = TcpStream::connect_timeout(&address, DIAL_TIMEOUT);
            let _ = tx.send((address, result));
            vsocket_sys::eventfd_signal(bell.as_fd());
        });
    }

    fn ready(&mut self, token: u64, events: u32, epoll: &Epoll, on: &mut dyn Events) {
        match token {
            TOKEN_LISTENER => loop {
                match self.listener.accept() {
                    Ok((stream, peer)) => match self.adopt(stream, peer, epoll) {
                        Ok(id) => on.event(LinkEvent::Up { link: id, peer, dialed: false }),
                        Err(e) => tracing::warn!(%peer, error = %e, "cannot take a fabric link"),
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "fabric accept");
                        break;
                    }
                }
            },
            TOKEN_DIALED => {
                vsocket_sys::drain(self.dialed_bell.as_fd());
                while let Ok((address, result)) = self.dialed_rx.try_recv() {
                    match result.and_then(|stream| self.adopt(stream, address, epoll)) {
                        Ok(id) => on.event(LinkEvent::Up { link: id, peer: address, dialed: true }),
                        Err(e) => on.event(LinkEvent::DialFailed { peer: address, error: e }),
                    }
                }
            }
            id => {
                let Some(link) = self.links.get_mut(&id) else { return };
                let mut result = Ok(());
                if events & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                    result = Self::read(link, id, on);
                }
                if result.is_ok() && events & libc::EPOLLOUT as u32 != 0 {
                    result = Self::write(link, id, epoll);
                }
                if let Err(why) = result {
                    self.close(id, epoll);
                    on.event(LinkEvent::Down { link: id, why: LinkFailure::Tcp(why) });
                }
            }
        }
    }

    fn send(&mut self, link: LinkId, frame: &Frame<'_>) {
        if let Some(l) = self.links.get_mut(&link) {
            frame.encode(&mut l.outbound);
        }
    }

    fn send_encoded(&mut self, link: LinkId, bytes: &[u8]) {
        if let Some(l) = self.links.get_mut(&link) {
            l.outbound.extend_from_slice(bytes);
        }
    }

    fn send_ring(
        &mut self,
        link: LinkId,
        origin: Origin,
        id: u64,
        ring: &vsocket_ring::Consumer<'_>,
        len: usize,
    ) -> Result<bool, vsocket_ring::RingError> {
        let Some(l) = self.links.get_mut(&link) else { return Ok(false) };
        let header = Frame::data_header(origin, id, len);
        let mut wake = false;
        let mut sent = 0;
        if l.outbound.is_empty() {
            // Straight from the ring to the socket; an error shows at the
            // next read or flush, and the frame goes to the queue.
            match ring.send_to(l.stream.as_fd(), &header, len) {
                Ok((n, w)) => (sent, wake) = (n, w),
                Err(vsocket_ring::SocketError::Ring(e)) => return Err(e),
                Err(vsocket_ring::SocketError::Io(_)) => {}
            }
        }
        if sent == header.len() + len {
            return Ok(wake);
        }
        // The rest of the frame waits in the queue, before anything else.
        if sent < header.len() {
            l.outbound.extend_from_slice(&header[sent..]);
        }
        let rest = len - sent.saturating_sub(header.len());
        let start = l.outbound.len();
        l.outbound.resize(start + rest, 0);
        let (got, w) = ring.read(&mut [&mut l.outbound[start..]], false)?;
        if got != rest {
            return Err(vsocket_ring::RingError::Corrupt);
        }
        Ok(wake || w)
    }

    fn backlog(&self, link: LinkId) -> usize {
        self.links.get(&link).map_or(0, |l| l.outbound.len() - l.written)
    }

    fn flush(&mut self, epoll: &Epoll, on: &mut dyn Events) {
        let mut failed = Vec::new();
        for (&id, link) in &mut self.links {
            if link.outbound.len() > link.written {
                if let Err(why) = Self::write(link, id, epoll) {
                    failed.push((id, why));
                }
            }
        }
        for (id, why) in failed {
            self.close(id, epoll);
            on.event(LinkEvent::Down { link: id, why: LinkFailure::Tcp(why) });
        }
    }

    fn close(&mut self, link: LinkId, epoll: &Epoll) {
        if let Some(l) = self.links.remove(&link) {
            let _ = epoll.delete(l.stream.as_fd());
            // Frames queued before the close (a refusal's proof, resets)
            // still go out, as far as the socket takes them now.
            if l.outbound.len() > l.written {
                let _ = (&l.stream).write(&l.outbound[l.written..]);
            }
            let _ = l.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn before_sleep(&mut self) -> bool {
        true
    }

    fn describe(&self) -> FabricKind {
        FabricKind::Tcp
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        for link in self.links.values() {
            let _ = link.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use vsocket_ring::Segment;

    /// The relay's part, for one link: streams with a ring (whose bytes
    /// it takes out of the ring as soon as they are reported, as a reading
    /// guest would) and streams without; everything delivered, per stream.
    struct Relay {
        rings: BTreeMap<u64, Segment>,
        got: BTreeMap<u64, Vec<u8>>,
        /// Payload bytes that went through the ring in place.
        in_place: usize,
        controls: usize,
    }

    impl Events for Relay {
        fn event(&mut self, event: LinkEvent<'_>) {
            match event {
                LinkEvent::Frame(_, Frame::Data { id, bytes, .. }) | LinkEvent::Payload { id, bytes, .. } => {
                    self.got.entry(id).or_default().extend_from_slice(bytes)
                }
                LinkEvent::Frame(..) => self.controls += 1,
                LinkEvent::Received { id, len, .. } => {
                    let ring = self.rings[&id].consumer(0);
                    let mut bytes = vec![0u8; len];
                    assert_eq!(ring.read(&mut [&mut bytes[..]], false).unwrap().0, len);
                    self.got.entry(id).or_default().extend_from_slice(&bytes);
                    self.in_place += len;
                }
                LinkEvent::Up { .. } | LinkEvent::DialFailed { .. } | LinkEvent::Down { .. } => {
                    panic!("unexpected link event")
                }
            }
        }

        fn data_ring(&mut self, _link: LinkId, _origin: Origin, id: u64) -> Option<vsocket_ring::Producer<'_>> {
            self.rings.get(&id).map(|s| s.producer(0))
        }
    }

    #[test]
    fn frames_split_anywhere_reach_their_streams_whole_and_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut link = Link::new(stream, peer);
        // Streams 1 and 2 have rings; stream 3 has none, so its payloads
        // always come through the buffer.
        let mut relay = Relay { rings: BTreeMap::new(), got: BTreeMap::new(), in_place: 0, controls: 0 };
        for id in [1, 2] {
            relay.rings.insert(id, Segment::create(1 << 20).unwrap().0);
        }
        // A seeded linear congruential sequence: the same run every time.
        let mut state = 0x5eed_f00d_cafe_0001u64;
        let mut next = move || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        };
        let mut wire = Vec::new();
        let mut sent: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut controls = 0;
        for n in 0..400 {
            let id = 1 + next() % 3;
            // Mostly small, some up to a whole frame.
            let len = match next() % 4 {
                0 => (next() % vsocket_abi::fabric::MAX_PAYLOAD as u64) as usize + 1,
                1 => (next() % 20_000) as usize,
                _ => (next() % 300) as usize,
            };
            let bytes: Vec<u8> = (0..len).map(|i| (n * 7 + i) as u8 ^ id as u8).collect();
            sent.entry(id).or_default().extend_from_slice(&bytes);
            wire.extend_from_slice(&Frame::data_header(Origin::Sender, id, len));
            wire.extend_from_slice(&bytes);
            if next().is_multiple_of(3) {
                Frame::Credit { origin: Origin::Receiver, id, bytes: 4096 }.encode(&mut wire);
                controls += 1;
            }
        }
        // Written in pieces of every size (a header split anywhere, many
        // frames at once), read as the relay would: whenever there is some.
        let mut at = 0;
        while at < wire.len() {
            let piece = match next() % 3 {
                0 => 1 + (next() % 17) as usize,
                1 => 1 + (next() % 5000) as usize,
                _ => 1 + (next() % 300_000) as usize,
            }
            .min(wire.len() - at);
            writer.write_all(&wire[at..at + piece]).unwrap();
            at += piece;
            TcpTransport::read(&mut link, 16, &mut relay).unwrap();
        }
        drop(writer);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match TcpTransport::read(&mut link, 16, &mut relay) {
                Ok(()) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Ok(()) => panic!("the end of the stream never came"),
                Err(why) => {
                    assert_eq!(why.to_string(), "the other host closed the link");
                    break;
                }
            }
        }
        assert_eq!(relay.controls, controls);
        for (id, bytes) in &sent {
            let got = relay.got.get(id).map_or(&[][..], Vec::as_slice);
            assert!(got == bytes.as_slice(), "stream {id}: {} bytes sent, {} received", bytes.len(), got.len());
        }
        // The streams with rings took most of their payload bytes in place.
        assert!(relay.in_place > (sent[&1].len() + sent[&2].len()) / 2, "{} in place", relay.in_place);
    }
}
