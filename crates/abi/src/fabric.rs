//! Frames between two hosts' daemons on a fabric link.
//!
//! A link carries many guest connections (streams) between two hosts. Each
//! frame is a 16-byte header and a payload:
//!
//! ```text
//! 0       4      5        6      8              16
//! | len   | kind | origin | zero | stream id    | payload (len bytes) ...
//! ```
//!
//! All integers are little-endian. `len` is the payload's length, at most
//! [`MAX_PAYLOAD`] for `Data` and [`MAX_CONTROL`] for the other kinds. A
//! stream is named by the id its opener chose and by `origin`: whether the
//! frame's sender ([`Origin::Sender`]) or its receiver
//! ([`Origin::Receiver`]) opened it, so both hosts may open streams without
//! coordinating ids.
//!
//! The other host is trusted only as far as its own guests go: a frame that
//! does not decode ends the link (every stream on it is reset), and the
//! receiver checks an `Open` against its own policy and placement.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Bytes of a frame header.
pub const HEADER: usize = 16;
/// The largest payload a `Data` frame may carry.
pub const MAX_PAYLOAD: usize = 256 * 1024;
/// The largest payload any other frame may carry (an `Open` with two
/// longest names is 528 bytes).
pub const MAX_CONTROL: usize = 1024;
/// The protocol version a `Hello` announces.
pub const VERSION: u32 = 2;
/// Bytes of the random nonce each side's `Hello` carries.
pub const NONCE: usize = 16;
/// Bytes of a `Proof` (an HMAC-SHA256).
pub const PROOF: usize = 32;
/// The longest name (host, VPC or guest) a frame carries.
pub const MAX_NAME: usize = 255;

/// Which host opened a stream, as seen by the frame's sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The host sending this frame opened the stream.
    Sender,
    /// The host receiving this frame opened it.
    Receiver,
}

/// Why the server's host did not accept an `Open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Fail the connect with this errno (ECONNREFUSED: denied with
    /// `reject`, a full backlog, or a quota).
    Errno(i32),
    /// Policy denied it with `drop`: the connect never completes.
    Dropped,
    /// No vSocket listener there: use the kernel path.
    Fallback,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// The first frame each way: who is speaking, and a fresh random
    /// nonce for the other side to prove its key over.
    Hello { version: u32, host: &'a str, nonce: [u8; NONCE] },
    /// With a fabric key, the second frame each way: the sender's proof
    /// that it holds the key, over both names and both nonces.
    Proof { mac: [u8; PROOF] },
    /// A guest of the sender's host connects from `client` to `server` in
    /// `vpc`; the sender may receive `window` bytes before crediting more.
    Open {
        origin: Origin,
        id: u64,
        vpc: &'a str,
        guest: &'a str,
        client: SocketAddrV4,
        server: SocketAddrV4,
        window: u32,
    },
    /// The server's host accepted the stream; it may receive `window` bytes.
    Accept { origin: Origin, id: u64, window: u32 },
    /// The server's host did not accept the stream.
    Refuse { origin: Origin, id: u64, refusal: Refusal },
    /// Stream bytes, within the receiver's credit.
    Data { origin: Origin, id: u64, bytes: &'a [u8] },
    /// The receiver's guest consumed this many more bytes: more may be sent.
    Credit { origin: Origin, id: u64, bytes: u32 },
    /// The sender's guest finished writing (after all its data).
    Fin { origin: Origin, id: u64 },
    /// The stream is aborted (ECONNRESET).
    Reset { origin: Origin, id: u64 },
    /// Keeps an idle link known to be alive.
    Ping,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The payload length is over [`MAX_PAYLOAD`] (for `Data`) or
    /// [`MAX_CONTROL`] (for any other kind).
    TooLong(u32),
    /// An unknown frame kind.
    UnknownKind(u8),
    /// An origin byte other than 0 or 1, or nonzero reserved bytes.
    BadHeader,
    /// The payload does not fit its kind.
    BadPayload(u8),
    /// A `Hello` of another protocol version (whose layout may differ).
    Version(u32),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLong(n) => write!(f, "frame payload of {n} bytes is over its kind's limit"),
            Self::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            Self::BadHeader => f.write_str("malformed frame header"),
            Self::BadPayload(k) => write!(f, "malformed payload for frame kind {k}"),
            Self::Version(v) => write!(f, "protocol version {v}; this host speaks version {VERSION}"),
        }
    }
}

impl std::error::Error for FrameError {}

const HELLO: u8 = 1;
const OPEN: u8 = 2;
const ACCEPT: u8 = 3;
const REFUSE: u8 = 4;
const DATA: u8 = 5;
const CREDIT: u8 = 6;
const FIN: u8 = 7;
const RESET: u8 = 8;
const PING: u8 = 9;
const PROOF_KIND: u8 = 10;

const REFUSE_ERRNO: u8 = 0;
const REFUSE_DROPPED: u8 = 1;
const REFUSE_FALLBACK: u8 = 2;

impl Frame<'_> {
    /// Appends the frame to `out`. Names longer than [`MAX_NAME`] and data
    /// longer than [`MAX_PAYLOAD`] are the caller's bug (panics).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let (kind, origin, id) = match *self {
            Frame::Hello { .. } => (HELLO, Origin::Sender, 0),
            Frame::Proof { .. } => (PROOF_KIND, Origin::Sender, 0),
            Frame::Open { origin, id, .. } => (OPEN, origin, id),
            Frame::Accept { origin, id, .. } => (ACCEPT, origin, id),
            Frame::Refuse { origin, id, .. } => (REFUSE, origin, id),
            Frame::Data { origin, id, .. } => (DATA, origin, id),
            Frame::Credit { origin, id, .. } => (CREDIT, origin, id),
            Frame::Fin { origin, id } => (FIN, origin, id),
            Frame::Reset { origin, id } => (RESET, origin, id),
            Frame::Ping => (PING, Origin::Sender, 0),
        };
        // The length is filled in once the payload is written.
        out.extend_from_slice(&header(kind, origin, id, 0));
        match *self {
            Frame::Hello { version, host, nonce } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&nonce);
                put_name(out, host);
            }
            Frame::Proof { mac } => out.extend_from_slice(&mac),
            Frame::Open { vpc, guest, client, server, window, .. } => {
                put_addr(out, client);
                put_addr(out, server);
                out.extend_from_slice(&window.to_le_bytes());
                put_name(out, vpc);
                put_name(out, guest);
            }
            Frame::Accept { window, .. } => out.extend_from_slice(&window.to_le_bytes()),
            Frame::Refuse { refusal, .. } => {
                let (how, errno) = match refusal {
                    Refusal::Errno(e) => (REFUSE_ERRNO, e),
                    Refusal::Dropped => (REFUSE_DROPPED, 0),
                    Refusal::Fallback => (REFUSE_FALLBACK, 0),
                };
                out.push(how);
                out.extend_from_slice(&errno.to_le_bytes());
            }
            Frame::Data { bytes, .. } => {
                assert!(bytes.len() <= MAX_PAYLOAD, "data frame over MAX_PAYLOAD");
                out.extend_from_slice(bytes);
            }
            Frame::Credit { bytes, .. } => out.extend_from_slice(&bytes.to_le_bytes()),
            Frame::Fin { .. } | Frame::Reset { .. } | Frame::Ping => {}
        }
        let len = (out.len() - start - HEADER) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// The header of a `Data` frame of `len` bytes, for a sender that
    /// writes the payload from where it already is.
    pub fn data_header(origin: Origin, id: u64, len: usize) -> [u8; HEADER] {
        assert!(len <= MAX_PAYLOAD, "data frame over MAX_PAYLOAD");
        header(DATA, origin, id, len as u32)
    }

    /// Decodes the frame at the start of `buf`: `Ok(None)` if `buf` does not
    /// hold all of it yet, else the frame and the bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
        let Some((len, kind, origin, id)) = parse_header(buf)? else { return Ok(None) };
        let total = HEADER + len as usize;
        if buf.len() < total {
            return Ok(None);
        }
        // Link-level frames name no stream.
        if matches!(kind, HELLO | PROOF_KIND | PING) && (id != 0 || origin != Origin::Sender) {
            return Err(FrameError::BadHeader);
        }
        let mut p = Payload { bytes: &buf[HEADER..total], kind };
        let frame = match kind {
            HELLO => {
                // The version comes first in every version's Hello.
                let version = p.u32()?;
                if version != VERSION {
                    return Err(FrameError::Version(version));
                }
                Frame::Hello { version, nonce: p.array()?, host: p.name()? }
            }
            PROOF_KIND => Frame::Proof { mac: p.array()? },
            OPEN => {
                let client = p.addr()?;
                let server = p.addr()?;
                let window = p.u32()?;
                Frame::Open { origin, id, vpc: p.name()?, guest: p.name()?, client, server, window }
            }
            ACCEPT => Frame::Accept { origin, id, window: p.u32()? },
            REFUSE => {
                let how = p.u8()?;
                let errno = p.u32()? as i32;
                let refusal = match how {
                    REFUSE_ERRNO if errno > 0 => Refusal::Errno(errno),
                    REFUSE_DROPPED if errno == 0 => Refusal::Dropped,
                    REFUSE_FALLBACK if errno == 0 => Refusal::Fallback,
                    _ => return Err(FrameError::BadPayload(kind)),
                };
                Frame::Refuse { origin, id, refusal }
            }
            DATA => Frame::Data { origin, id, bytes: std::mem::take(&mut p.bytes) },
            CREDIT => Frame::Credit { origin, id, bytes: p.u32()? },
            FIN => Frame::Fin { origin, id },
            RESET => Frame::Reset { origin, id },
            PING => Frame::Ping,
            other => return Err(FrameError::UnknownKind(other)),
        };
        if !p.bytes.is_empty() {
            return Err(FrameError::BadPayload(kind));
        }
        Ok(Some((frame, total)))
    }
}

/// The start of a `Data` frame whose payload need not have arrived yet,
/// for a receiver that places the payload where it belongs as it comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataStart {
    pub origin: Origin,
    pub id: u64,
    /// The payload's length (at most [`MAX_PAYLOAD`]).
    pub len: usize,
}

impl DataStart {
    /// What is still to come of this payload once `n` more bytes of it
    /// are in (`None`: all of it).
    pub fn after(self, n: usize) -> Option<DataStart> {
        (n < self.len).then_some(DataStart { len: self.len - n, ..self })
    }

    /// Reads the header at the start of `buf`: `Ok(Some)` for a `Data`
    /// frame, `Ok(None)` for another kind or fewer than [`HEADER`] bytes,
    /// and the error [`Frame::decode`] would give for a bad header.
    pub fn parse(buf: &[u8]) -> Result<Option<DataStart>, FrameError> {
        Ok(match parse_header(buf)? {
            Some((len, DATA, origin, id)) => Some(DataStart { origin, id, len: len as usize }),
            _ => None,
        })
    }
}

/// Checks the header at the start of `buf` (`Ok(None)` if incomplete):
/// payload length, kind, origin, stream id.
fn parse_header(buf: &[u8]) -> Result<Option<(u32, u8, Origin, u64)>, FrameError> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().unwrap_or_default());
    let kind = buf[4];
    let limit = if kind == DATA { MAX_PAYLOAD } else { MAX_CONTROL };
    if len as usize > limit {
        return Err(FrameError::TooLong(len));
    }
    let origin = match buf[5] {
        0 => Origin::Sender,
        1 => Origin::Receiver,
        _ => return Err(FrameError::BadHeader),
    };
    if buf[6] != 0 || buf[7] != 0 {
        return Err(FrameError::BadHeader);
    }
    let id = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
    Ok(Some((len, kind, origin, id)))
}

/// A frame header: payload length, kind, origin, two zero bytes, stream id.
fn header(kind: u8, origin: Origin, id: u64, len: u32) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4] = kind;
    h[5] = match origin {
        Origin::Sender => 0,
        Origin::Receiver => 1,
    };
    h[8..16].copy_from_slice(&id.to_le_bytes());
    h
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    assert!(name.len() <= MAX_NAME, "name over MAX_NAME");
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddrV4) {
    out.extend_from_slice(&addr.ip().octets());
    out.extend_from_slice(&addr.port().to_le_bytes());
}

/// The unread rest of a payload.
struct Payload<'a> {
    bytes: &'a [u8],
    kind: u8,
}

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.bytes.len() < n {
            return Err(FrameError::BadPayload(self.kind));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().unwrap_or([0; N]))
    }

    fn addr(&mut self) -> Result<SocketAddrV4, FrameError> {
        let b = self.take(6)?;
        Ok(SocketAddrV4::new(Ipv4Addr::new(b[0], b[1], b[2], b[3]), u16::from_le_bytes([b[4], b[5]])))
    }

    fn name(&mut self) -> Result<&'a str, FrameError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| FrameError::BadPayload(self.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame<'static>> {
        let client: SocketAddrV4 = "10.10.0.2:40000".parse().unwrap();
        let server: SocketAddrV4 = "10.10.0.3:6379".parse().unwrap();
        static DATA: [u8; 300] = [7; 300];
        vec![
            Frame::Hello { version: VERSION, host: "host-2.lab", nonce: [0x5a; NONCE] },
            Frame::Proof { mac: [0xc3; PROOF] },
            Frame::Open { origin: Origin::Sender, id: 1, vpc: "blue", guest: "a", client, server, window: 262_144 },
            Frame::Accept { origin: Origin::Receiver, id: u64::MAX, window: 4096 },
            Frame::Refuse { origin: Origin::Receiver, id: 3, refusal: Refusal::Errno(111) },
            Frame::Refuse { origin: Origin::Receiver, id: 3, refusal: Refusal::Dropped },
            Frame::Refuse { origin: Origin::Receiver, id: 3, refusal: Refusal::Fallback },
            Frame::Data { origin: Origin::Sender, id: 9, bytes: &DATA },
            Frame::Data { origin: Origin::Sender, id: 9, bytes: &[] },
            Frame::Credit { origin: Origin::Receiver, id: 9, bytes: 65_536 },
            Frame::Fin { origin: Origin::Sender, id: 9 },
            Frame::Reset { origin: Origin::Receiver, id: 9 },
            Frame::Ping,
        ]
    }

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut wire = Vec::new();
        for f in samples() {
            f.encode(&mut wire);
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((frame, used)) = Frame::decode(&wire[at..]).unwrap() {
            got.push(frame);
            at += used;
        }
        assert_eq!(at, wire.len());
        assert_eq!(got, samples());
    }

    #[test]
    fn a_data_header_is_the_encoded_frames_header() {
        let mut wire = Vec::new();
        Frame::Data { origin: Origin::Receiver, id: 77, bytes: b"payload" }.encode(&mut wire);
        assert_eq!(Frame::data_header(Origin::Receiver, 77, 7), wire[..HEADER]);
    }

    #[test]
    fn a_partial_frame_waits_for_the_rest() {
        let mut wire = Vec::new();
        Frame::Data { origin: Origin::Sender, id: 1, bytes: b"hello" }.encode(&mut wire);
        for cut in 0..wire.len() {
            assert_eq!(Frame::decode(&wire[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let mut wire = Vec::new();
        Frame::Credit { origin: Origin::Sender, id: 1, bytes: 5 }.encode(&mut wire);
        let mut bad = wire.clone();
        bad[4] = 99;
        assert_eq!(Frame::decode(&bad), Err(FrameError::UnknownKind(99)));
        let mut bad = wire.clone();
        bad[5] = 2;
        assert_eq!(Frame::decode(&bad), Err(FrameError::BadHeader));
        let mut bad = wire.clone();
        bad[0] = 3; // a credit with a 3-byte payload
        bad.truncate(HEADER + 3);
        assert_eq!(Frame::decode(&bad), Err(FrameError::BadPayload(CREDIT)));
        let mut v1 = Vec::new();
        Frame::Hello { version: VERSION, host: "h", nonce: [0; NONCE] }.encode(&mut v1);
        v1[HEADER..HEADER + 4].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(Frame::decode(&v1), Err(FrameError::Version(1)));
        let mut bad = wire.clone();
        bad[0..4].copy_from_slice(&(MAX_PAYLOAD as u32 + 1000).to_le_bytes());
        assert!(matches!(Frame::decode(&bad), Err(FrameError::TooLong(_))));
        // Every truncation and every single-byte change of every sample
        // decodes or fails cleanly.
        for f in samples() {
            let mut wire = Vec::new();
            f.encode(&mut wire);
            for i in 0..wire.len() {
                for v in [0u8, 1, 0x7f, 0xff] {
                    let mut w = wire.clone();
                    w[i] = v;
                    let _ = Frame::decode(&w);
                }
            }
        }
    }
}
