//! Control messages on a byte stream, for attachments that carry no
//! datagrams (a VM's vsock stream): each frame is the message's length as
//! one byte, then the message as [`Message::encode`] writes it. A reader
//! takes bytes as they come ([`Deframer::extend`]) and yields whole
//! messages; a frame that is empty, longer than [`MAX_MESSAGE`] or not a
//! valid message is an error, after which the stream is not to be read
//! further (its sender is broken or hostile).

use crate::control::{DecodeError, Message, MAX_MESSAGE};
use std::fmt;

/// The vsock port a VM guest's processes open their control streams to,
/// on the host (CID 2).
pub const CONTROL_PORT: u32 = 7471;

/// The vsock port a VM guest's library opens one *bell stream* to for
/// each of its connections: its first 9 bytes name the connection (its
/// id, little-endian, as `ConnectedAt` or `IncomingAt` gave it) and the
/// library's end of it (0 client, 1 server); after
/// them, each byte either side writes is a wake-up, as on a namespace
/// guest's doorbell, and the end of the stream says every process holding
/// that side let go.
pub const BELL_PORT: u32 = 7472;

/// The file in a VM guest that names its attachment (`vsock`, as
/// `VSOCKET_CONTROL` would), for programs started without that variable:
/// the guest's agent writes it at boot in the VM's own `/run`. Absent on
/// hosts and in namespace guests.
pub const ATTACHMENT_FILE: &str = "/run/vsocket-guest";

/// The longest frame: the length byte and the longest message.
pub const MAX_FRAME: usize = 1 + MAX_MESSAGE;

/// Writes `msg` as one frame into `buf`; returns the frame.
pub fn frame<'a>(msg: &Message, buf: &'a mut [u8; MAX_FRAME]) -> &'a [u8] {
    let mut body = [0u8; MAX_MESSAGE];
    let len = msg.encode(&mut body).len();
    buf[0] = len as u8;
    buf[1..=len].copy_from_slice(&body[..len]);
    &buf[..=len]
}

/// Why a stream's frames cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A frame says it is {0} bytes long: none, or more than a message.
    BadLength(usize),
    /// A frame does not hold a valid message.
    Message(DecodeError),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadLength(len) => {
                write!(f, "a control frame of {len} bytes (1 to {MAX_MESSAGE} allowed)")
            }
            FrameError::Message(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for FrameError {}

/// Reads frames out of the bytes of a stream, whatever pieces they come in.
#[derive(Debug, Default)]
pub struct Deframer {
    /// Bytes received and not yet taken: at most one frame's.
    pending: Vec<u8>,
}

impl Deframer {
    pub fn new() -> Deframer {
        Deframer { pending: Vec::with_capacity(MAX_FRAME) }
    }

    /// Takes bytes of the stream; returns how many it took (it takes at most
    /// what completes the frame in progress: give the rest after
    /// [`next_message`](Self::next_message)).
    pub fn extend(&mut self, bytes: &[u8]) -> usize {
        let wanted = match self.pending.first() {
            None => 1,
            Some(&len) => 1 + usize::from(len),
        };
        let take = wanted.saturating_sub(self.pending.len()).min(bytes.len());
        self.pending.extend_from_slice(&bytes[..take]);
        take
    }

    /// The message of the frame in progress, once it is whole.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        let Some(&len) = self.pending.first() else { return Ok(None) };
        let len = usize::from(len);
        if len == 0 || len > MAX_MESSAGE {
            return Err(FrameError::BadLength(len));
        }
        if self.pending.len() < 1 + len {
            return Ok(None);
        }
        let message = Message::decode(&self.pending[1..]).map_err(FrameError::Message);
        self.pending.clear();
        message.map(Some)
    }

    /// Takes all of `bytes` and returns every whole message in them.
    pub fn messages(&mut self, mut bytes: &[u8]) -> Result<Vec<Message>, FrameError> {
        let mut out = Vec::new();
        loop {
            let took = self.extend(bytes);
            bytes = &bytes[took..];
            match self.next_message()? {
                Some(message) => out.push(message),
                None if bytes.is_empty() => return Ok(out),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ConnectionInfo;

    fn a(s: &str) -> std::net::SocketAddrV4 {
        s.parse().unwrap()
    }

    fn messages() -> Vec<Message> {
        let info = ConnectionInfo { id: 9, local: a("10.0.0.2:6379"), peer: a("10.0.0.3:40000"), ring_size: 1 << 16 };
        vec![
            Message::Connect { local: a("10.0.0.3:40000"), remote: a("10.0.0.2:6379") },
            Message::Connected(info),
            Message::Fallback,
            Message::Refused { errno: 111 },
            Message::Listen { local: a("0.0.0.0:80"), backlog: 511 },
            Message::Incoming(info),
        ]
    }

    fn stream() -> Vec<u8> {
        let mut bytes = Vec::new();
        for m in messages() {
            let mut buf = [0; MAX_FRAME];
            bytes.extend_from_slice(frame(&m, &mut buf));
        }
        bytes
    }

    #[test]
    fn frames_come_out_whole_however_the_stream_is_cut() {
        let bytes = stream();
        // All at once, a byte at a time, and in cuts of every size.
        assert_eq!(Deframer::new().messages(&bytes), Ok(messages()));
        for cut in 1..=bytes.len() {
            let mut deframer = Deframer::new();
            let mut got = Vec::new();
            for piece in bytes.chunks(cut) {
                got.extend(deframer.messages(piece).unwrap());
            }
            assert_eq!(got, messages(), "cut {cut}");
        }
        // A frame cut short waits for the rest.
        let mut deframer = Deframer::new();
        assert_eq!(deframer.messages(&bytes[..5]), Ok(vec![]));
        assert_eq!(deframer.messages(&bytes[5..]), Ok(messages()));
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(Deframer::new().messages(&[0]), Err(FrameError::BadLength(0)));
        assert_eq!(
            Deframer::new().messages(&[MAX_MESSAGE as u8 + 1, 1, 2]),
            Err(FrameError::BadLength(MAX_MESSAGE + 1))
        );
        assert_eq!(Deframer::new().messages(&[1, 200]), Err(FrameError::Message(DecodeError::UnknownKind(200))));
        // Arbitrary bytes never panic.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let bytes: Vec<u8> = (0..(state % 200) as usize).map(|i| (state >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            let _ = Deframer::new().messages(&bytes);
        }
    }
}
