//! exec: a connected vSocket descriptor that crosses exec (one the program
//! left without FD_CLOEXEC, as inetd-style servers, `socat EXEC:` and
//! shells do with a child's stdin and stdout) keeps working in the new
//! program image, without that program's cooperation.
//!
//! exec keeps descriptors and drops memory: the program's socket survives,
//! the mapping and the side table do not. Just before the exec
//! ([`prepare`], called by the exec hooks) the library makes each such
//! connection's own descriptors (doorbell, lifeline) inheritable, and
//! describes the connection in one environment entry, `VSOCKET_INHERIT`,
//! added to the new image's environment. The new image's library
//! ([`adopt`], run by its constructor before the program's `main`) removes
//! the entry from its environment, has the daemon send the segment's
//! halves again (the process keeps no descriptor of them once mapped; the
//! lifeline proves it holds the end, see `attach::reattach`), maps them,
//! puts the connection back in the side table under every descriptor that
//! crossed, and makes its own descriptors close-on-exec again. If the exec
//! fails, [`Carry::undo`] puts everything back as it was.
//!
//! The process is the same one across exec, so it stays counted among the
//! end's holders (see `fork`); a vfork child, which no fork handler
//! counted, is counted just before its exec (and uncounted if the exec
//! fails), before its parent runs again and may close its own copy.
//! Nothing crosses into an image that will not load the library (its
//! LD_PRELOAD does not name `libvsocket`, or VSOCKET_CONTROL is unset):
//! there the descriptors close as before, and the peer sees the end of the
//! stream once the last holder is gone.
//!
//! [`prepare`] runs in vfork children too, on their parent's memory: it
//! allocates nothing, only reads the side table and makes system calls,
//! and writes into buffers of fixed size. The one lock it takes is a
//! connection's receive lock as it counts a vfork child among the end's
//! holders, taken as the parent (whose threads hold it only while they
//! copy): a read the parent made alone finishes first.

use crate::addr::Family;
use crate::attach::{self, Delivery, Given, Remap};
use crate::conn::{Connection, Internal, Resumed};
use crate::fork;
use crate::sys;
use crate::table::{self, Entry};
use std::fmt::{self, Write};
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::Arc;
use vsocket_abi::control::ConnectionInfo;
use vsocket_abi::layout::Endpoint;

/// The environment variable that describes the connections crossing an
/// exec.
pub const VAR: &str = "VSOCKET_INHERIT";
/// Its version: the first field of its value. Version 1 (written by an
/// older library, whose image may exec one with this one) carried the
/// segment's halves too, after the lifeline; it is still taken.
const FORMAT: u32 = 2;
const FORMAT_WITH_HALVES: u32 = 1;
/// At most this many connections cross one exec (the rest end there, as
/// without the library)...
const MAX_CONNECTIONS: usize = 64;
/// ...each under at most this many of the program's descriptors.
const MAX_FDS: usize = 8;
/// The longest entry: room for `MAX_CONNECTIONS` records.
const ENTRY_CAP: usize = 16 * 1024;

/// Does the environment entry `entry` (`NAME=value`) describe connections
/// crossing an exec?
pub fn is_carry_entry(entry: &[u8]) -> bool {
    entry.strip_prefix(VAR.as_bytes()).is_some_and(|rest| rest.first() == Some(&b'='))
}

/// Will a program image started with environment `entries` load the
/// library and attach (so that connections may cross into it)?
pub fn image_loads_library<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> bool {
    let (mut preloads, mut attaches) = (false, false);
    for entry in entries {
        if let Some(list) = entry.strip_prefix(b"LD_PRELOAD=") {
            preloads = list.windows(b"libvsocket".len()).any(|w| w == b"libvsocket");
        } else if let Some(path) = entry.strip_prefix(b"VSOCKET_CONTROL=") {
            attaches = !path.is_empty();
        }
    }
    preloads && attaches
}

/// The connections crossing one exec, and the environment entry
/// (`VSOCKET_INHERIT=...`, NUL-terminated) that describes them.
pub struct Carry {
    entry: Fixed<ENTRY_CAP>,
    carried: [Option<Arc<Entry>>; MAX_CONNECTIONS],
    /// Whether this process was counted among the holders before (else it
    /// is a vfork child, counted by `prepare`).
    counted: bool,
}

impl Carry {
    /// The environment entry, NUL-terminated.
    pub fn entry(&self) -> &[u8] {
        self.entry.as_bytes()
    }

    /// The exec failed: the connections' descriptors are close-on-exec
    /// again, and a vfork child is no longer counted as a holder.
    pub fn undo(self) {
        for entry in self.carried.iter().flatten() {
            if let Entry::Conn(conn) = &**entry {
                for fd in conn.internal().open_fds() {
                    let _ = sys::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC as libc::c_long);
                }
                if !self.counted {
                    conn.remove_holder();
                }
            }
        }
    }
}

/// One connection the program lets cross, under some of its descriptors.
struct Crossing {
    entry: Option<Arc<Entry>>,
    fds: [RawFd; MAX_FDS],
    count: usize,
}

impl Crossing {
    const NONE: Crossing = Crossing { entry: None, fds: [-1; MAX_FDS], count: 0 };

    fn is(&self, entry: &Entry) -> bool {
        self.entry.as_ref().is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), entry))
    }

    fn add(&mut self, fd: RawFd) {
        if self.count < MAX_FDS {
            self.fds[self.count] = fd;
            self.count += 1;
        }
    }
}

/// Does descriptor `fd` stay open across exec?
fn crosses_exec(fd: RawFd) -> bool {
    sys::fcntl(fd, libc::F_GETFD, 0).is_ok_and(|flags| flags as i32 & libc::FD_CLOEXEC == 0)
}

/// The connections found so far that cross the coming exec.
struct Crossings {
    list: [Crossing; MAX_CONNECTIONS],
    found: usize,
}

impl Crossings {
    /// Notes that this process's descriptor `fd` names `entry`, found in
    /// the table under `table_fd`.
    fn note(&mut self, entry: &Entry, table_fd: RawFd, fd: RawFd) {
        if let Some(known) = self.list[..self.found].iter_mut().find(|c| c.is(entry)) {
            known.add(fd);
        } else if self.found < MAX_CONNECTIONS {
            if let Some(arc) = table::get(table_fd) {
                self.list[self.found] = Crossing { entry: Some(arc), ..Crossing::NONE };
                self.list[self.found].add(fd);
                self.found += 1;
            }
        }
    }
}

/// The process's connections under descriptors that cross exec, as its
/// own table says.
fn crossing_by_table(crossings: &mut Crossings) {
    table::managed_in(0, RawFd::MAX, |fd, entry| {
        if matches!(entry, Entry::Conn(_)) && crosses_exec(fd) {
            crossings.note(entry, fd, fd);
        }
    });
}

/// The most sockets of a vfork child that are looked at.
const MAX_CHILD_SOCKETS: usize = 64;

/// In a vfork child, the table is its parent's, and the child's
/// descriptors are its own (it may have moved a connection onto its stdin
/// and closed the rest): a descriptor of the child crosses with a
/// connection of the parent's table if both name the same socket, as the
/// kernel tells (`/proc/PARENT/fd/N`).
fn crossing_in_vfork_child(crossings: &mut Crossings) {
    let mut sockets = [(-1, None); MAX_CHILD_SOCKETS];
    let mut count = 0;
    let _ = sys::each_open_fd(|fd| {
        if count < MAX_CHILD_SOCKETS && crosses_exec(fd) {
            if let Some(socket) = sys::socket_of_fd(fd) {
                sockets[count] = (fd, Some(socket));
                count += 1;
            }
        }
    });
    if count == 0 {
        return;
    }
    let parent = sys::memory_owner();
    table::managed_in(0, RawFd::MAX, |table_fd, entry| {
        if !matches!(entry, Entry::Conn(_)) {
            return;
        }
        let mut path = Fixed::<48>::new();
        if write!(path, "/proc/{parent}/fd/{table_fd}\0").is_err() {
            return;
        }
        let Some(socket) = sys::socket_at(path.as_bytes()) else { return };
        for &(fd, child_socket) in &sockets[..count] {
            if child_socket == Some(socket) {
                crossings.note(entry, table_fd, fd);
            }
        }
    });
}

/// Prepares the connections whose descriptors cross the coming exec (into
/// an image that loads the library): `None` if there are none.
pub fn prepare() -> Option<Carry> {
    let counted = sys::memory_is_ours();
    let mut crossings = Crossings { list: [Crossing::NONE; MAX_CONNECTIONS], found: 0 };
    if counted {
        crossing_by_table(&mut crossings);
    } else {
        crossing_in_vfork_child(&mut crossings);
    }
    let Crossings { list: mut crossing, found } = crossings;
    if found == 0 {
        return None;
    }
    let mut carry = Carry { entry: Fixed::<ENTRY_CAP>::new(), carried: [const { None }; MAX_CONNECTIONS], counted };
    write!(carry.entry, "{VAR}={FORMAT};{}", sys::process_id()).ok()?;
    let mut carried = 0;
    for c in &mut crossing[..found] {
        let Some(Entry::Conn(conn)) = c.entry.as_deref() else { continue };
        let (resumed, internal) = conn.for_exec();
        if internal.remap == Remap::Never {
            // A VM guest's connection is a piece of the region, with no
            // descriptor to carry it: it ends at the exec.
            continue;
        }
        let mark = carry.entry.len;
        if write_record(&mut carry.entry, &c.fds[..c.count], &internal, &resumed).is_err() {
            // No room: this one ends at the exec, as without the library.
            carry.entry.len = mark;
            continue;
        }
        for fd in internal.open_fds() {
            let _ = sys::fcntl(fd, libc::F_SETFD, 0);
        }
        if !counted {
            conn.add_holder();
        }
        carry.carried[carried] = c.entry.take();
        carried += 1;
    }
    if carried == 0 || carry.entry.write_str("\0").is_err() {
        carry.undo();
        return None;
    }
    Some(carry)
}

/// In a new program image: takes up the connections its previous image
/// let cross (see the module's doc). Run once, before the program's code.
pub fn adopt() {
    let Some(value) = std::env::var_os(VAR) else { return };
    // The program's own children must not see it.
    std::env::remove_var(VAR);
    let Some(records) = value.to_str().and_then(|v| parse(v, sys::process_id()).ok()) else { return };
    fork::watch();
    // A lifeline may serve several connections (a kits' batch's): each
    // that crossed takes a share of it, and one no connection took up is
    // closed when these go.
    let mut lifelines = std::collections::HashMap::new();
    for record in records {
        let lifeline = lifelines.entry(record.internal.lifeline).or_insert_with_key(|&fd| attach::Lifeline::take(fd));
        let lifeline = lifeline.clone();
        resume(record, lifeline);
    }
}

fn resume(record: Record, lifeline: Option<Arc<attach::Lifeline>>) {
    let Record { fds, internal, resumed, halves } = record;
    for fd in internal.open_fds().chain(halves.into_iter().flatten()) {
        let _ = sys::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC as libc::c_long);
    }
    // Without the halves (the daemon refused, or is not there) the
    // connection cannot be mapped: its doorbell is closed (its lifeline
    // with its last share) and the program's socket is left unconnected,
    // as where nothing crosses.
    let halves = match halves {
        Some(halves) => Ok((halves, None)),
        None => attach::reattach(resumed.info.id, resumed.endpoint, internal.lifeline).map_err(drop),
    };
    let Ok(([own, peer], at)) = halves else {
        let _ = sys::close(internal.doorbell);
        return;
    };
    let memory = match at {
        Some(piece) => Given::ChunkFiles { own, peer, piece },
        None => Given::Halves { own, peer },
    };
    let delivery = Delivery::of(memory, internal.doorbell, lifeline);
    // On failure the descriptors go with `delivery`: the program's socket
    // is left unconnected, as where nothing crosses.
    let Ok(conn) = Connection::resume(resumed, delivery) else { return };
    let entry = Arc::new(Entry::Conn(conn));
    for fd in fds {
        let stream = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE) == Ok(libc::SOCK_STREAM);
        if stream && table::get(fd).is_none() {
            table::set(fd, entry.clone());
        }
    }
}

/// One connection as `VSOCKET_INHERIT` describes it.
#[derive(Debug, PartialEq, Eq)]
pub struct Record {
    /// The program's descriptors that name it.
    pub fds: Vec<RawFd>,
    pub internal: Internal,
    pub resumed: Resumed,
    /// The segment's halves (own, peer), in a version-1 entry only; a
    /// version-2 entry's new image asks the daemon for them.
    pub halves: Option<[RawFd; 2]>,
}

/// Why `VSOCKET_INHERIT` was not taken up.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not a version this library writes.
    Format,
    /// Written by another process (inherited from an ancestor, not by
    /// exec): its descriptor numbers mean nothing here.
    OtherProcess,
    /// A field is missing or holds an impossible value.
    Field(&'static str),
}

/// Writes one record (`;` and its fields, `,`-separated).
fn write_record(w: &mut impl Write, fds: &[RawFd], internal: &Internal, r: &Resumed) -> fmt::Result {
    w.write_char(';')?;
    for (i, fd) in fds.iter().enumerate() {
        if i > 0 {
            w.write_char('+')?;
        }
        write!(w, "{fd}")?;
    }
    let end = match r.endpoint {
        Endpoint::Client => 'c',
        Endpoint::Server => 's',
    };
    let family = match r.family {
        Family::V4 => 4,
        Family::V6 => 6,
    };
    let ConnectionInfo { id, local, peer, ring_size } = r.info;
    write!(
        w,
        ",{},{},{end},{id},{local},{peer},{ring_size},{family},{},{},{}",
        internal.doorbell, internal.lifeline, r.flags, r.recv_timeout_ms, r.send_timeout_ms
    )
}

/// Parses `VSOCKET_INHERIT`'s value, written for process `pid`.
pub fn parse(value: &str, pid: i32) -> Result<Vec<Record>, ParseError> {
    let mut parts = value.split(';');
    let format = match parts.next().and_then(|f| f.parse::<u32>().ok()) {
        Some(f @ (FORMAT | FORMAT_WITH_HALVES)) => f,
        _ => return Err(ParseError::Format),
    };
    let writer: i32 = parts.next().and_then(|p| p.parse().ok()).ok_or(ParseError::Field("pid"))?;
    if writer != pid {
        return Err(ParseError::OtherProcess);
    }
    parts.map(|record| parse_record(record, format)).collect()
}

fn parse_record(text: &str, format: u32) -> Result<Record, ParseError> {
    let mut fields = text.split(',');
    let mut next = |name: &'static str| fields.next().ok_or(ParseError::Field(name));
    let descriptor = |name: &'static str, text: &str| -> Result<RawFd, ParseError> {
        text.parse::<RawFd>().ok().filter(|&fd| fd >= 0).ok_or(ParseError::Field(name))
    };
    let fds = next("fds")?.split('+').map(|f| descriptor("fds", f)).collect::<Result<Vec<_>, _>>()?;
    if fds.len() > MAX_FDS {
        return Err(ParseError::Field("fds"));
    }
    let doorbell = descriptor("doorbell", next("doorbell")?)?;
    let lifeline = match next("lifeline")? {
        "-1" => -1,
        other => descriptor("lifeline", other)?,
    };
    let halves = if format == FORMAT_WITH_HALVES {
        Some([descriptor("own half", next("own half")?)?, descriptor("peer half", next("peer half")?)?])
    } else {
        None
    };
    let endpoint = match next("end")? {
        "c" => Endpoint::Client,
        "s" => Endpoint::Server,
        _ => return Err(ParseError::Field("end")),
    };
    let id = field(next("id")?, "id")?;
    let local: SocketAddrV4 = field(next("local")?, "local")?;
    let peer: SocketAddrV4 = field(next("peer")?, "peer")?;
    let ring_size = field(next("ring size")?, "ring size")?;
    if !vsocket_abi::layout::ring_size_valid(ring_size) {
        return Err(ParseError::Field("ring size"));
    }
    let family = match next("family")? {
        "4" => Family::V4,
        "6" => Family::V6,
        _ => return Err(ParseError::Field("family")),
    };
    let flags = field(next("flags")?, "flags")?;
    let recv_timeout_ms = field(next("receive timeout")?, "receive timeout")?;
    let send_timeout_ms = field(next("send timeout")?, "send timeout")?;
    if fields.next().is_some() {
        return Err(ParseError::Field("record"));
    }
    Ok(Record {
        fds,
        internal: Internal { doorbell, lifeline, remap: Remap::FromDaemon },
        halves,
        resumed: Resumed {
            info: ConnectionInfo { id, local, peer, ring_size },
            endpoint,
            family,
            flags,
            recv_timeout_ms,
            send_timeout_ms,
        },
    })
}

/// Field `name`, parsed (a number, an address: anything `FromStr` reads).
fn field<T: std::str::FromStr>(text: &str, name: &'static str) -> Result<T, ParseError> {
    text.parse().map_err(|_| ParseError::Field(name))
}

/// Text written into a buffer of `N` bytes: no allocation.
struct Fixed<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Fixed<N> {
    fn new() -> Fixed<N> {
        Fixed { buf: [0; N], len: 0 }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Write for Fixed<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).filter(|&end| end <= N).ok_or(fmt::Error)?;
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resumed() -> Resumed {
        Resumed {
            info: ConnectionInfo {
                id: 42,
                local: "10.10.0.2:40000".parse().unwrap(),
                peer: "10.10.0.3:7013".parse().unwrap(),
                ring_size: 1 << 16,
            },
            endpoint: Endpoint::Server,
            family: Family::V6,
            flags: 0b101,
            recv_timeout_ms: 1500,
            send_timeout_ms: 0,
        }
    }

    fn internal() -> Internal {
        Internal { doorbell: 1030, lifeline: 1031, remap: Remap::FromDaemon }
    }

    fn entry(records: &[(&[RawFd], Internal, Resumed)], pid: i32) -> String {
        let mut w = Fixed::<ENTRY_CAP>::new();
        write!(w, "{VAR}={FORMAT};{pid}").unwrap();
        for (fds, internal, resumed) in records {
            write_record(&mut w, fds, internal, resumed).unwrap();
        }
        String::from_utf8(w.as_bytes().to_vec()).unwrap()
    }

    fn value(entry: &str) -> &str {
        entry.strip_prefix("VSOCKET_INHERIT=").unwrap()
    }

    #[test]
    fn records_round_trip() {
        let second = Resumed { endpoint: Endpoint::Client, family: Family::V4, ..resumed() };
        let no_lifeline = Internal { lifeline: -1, ..internal() };
        let text = entry(&[(&[0, 1, 5], internal(), resumed()), (&[7], no_lifeline, second)], 77);
        assert!(is_carry_entry(text.as_bytes()));
        let records = parse(value(&text), 77).unwrap();
        assert_eq!(
            records,
            vec![
                Record { fds: vec![0, 1, 5], internal: internal(), resumed: resumed(), halves: None },
                Record { fds: vec![7], internal: no_lifeline, resumed: second, halves: None },
            ]
        );
    }

    #[test]
    fn an_older_library_s_entry_brings_the_halves() {
        // Version 1: the halves follow the lifeline.
        let text = "1;77;3,1030,1031,1032,1033,s,42,10.10.0.2:40000,10.10.0.3:7013,65536,6,5,1500,0";
        let records = parse(text, 77).unwrap();
        assert_eq!(
            records,
            vec![Record { fds: vec![3], internal: internal(), resumed: resumed(), halves: Some([1032, 1033]) }]
        );
        // Version 2 has no halves: the same fields would be one too many.
        assert_eq!(parse(&text.replacen("1;", "2;", 1), 77), Err(ParseError::Field("end")));
    }

    #[test]
    fn another_process_s_entry_is_ignored() {
        let text = entry(&[(&[3], internal(), resumed())], 77);
        assert_eq!(parse(value(&text), 78), Err(ParseError::OtherProcess));
        assert_eq!(parse("3;77", 77), Err(ParseError::Format));
        assert_eq!(parse("", 77), Err(ParseError::Format));
        assert_eq!(parse("2;x", 77), Err(ParseError::Field("pid")));
    }

    #[test]
    fn damaged_records_are_refused_whole() {
        let text = entry(&[(&[3], internal(), resumed())], 9);
        let good = value(&text).to_string();
        assert!(parse(&good, 9).is_ok());
        let cases = [
            (good.replace(";3,", ";-3,"), "fds"),
            (good.replace(";3,", ";3+1+2+3+4+5+6+7+8,"), "fds"),
            (good.replace(",s,", ",x,"), "end"),
            (good.replace("65536", "1000"), "ring size"),
            (good.replace("10.10.0.3:7013", "10.10.0.3"), "peer"),
            (good.replace(",6,", ",5,"), "family"),
            (good.clone() + ",1", "record"),
            (good.rsplit_once(',').unwrap().0.to_string(), "send timeout"),
        ];
        for (damaged, field) in cases {
            assert_eq!(parse(&damaged, 9), Err(ParseError::Field(field)), "{damaged}");
        }
    }

    #[test]
    fn a_full_entry_refuses_more() {
        let mut w = Fixed::<ENTRY_CAP>::new();
        let mut written = 0;
        while write_record(&mut w, &[3, 4], &internal(), &resumed()).is_ok() {
            written += 1;
        }
        assert!(written >= MAX_CONNECTIONS, "{written} records fit");
        assert!(w.len <= ENTRY_CAP);
    }

    #[test]
    fn the_new_image_must_preload_the_library_and_attach() {
        let yes: [&[u8]; 3] =
            [b"PATH=/bin", b"LD_PRELOAD=/opt/x/libvsocket.so", b"VSOCKET_CONTROL=/run/vsocket/a.sock"];
        assert!(image_loads_library(yes));
        let no_preload: [&[u8]; 2] = [b"LD_PRELOAD=/lib/other.so", b"VSOCKET_CONTROL=/run/a"];
        assert!(!image_loads_library(no_preload));
        let no_control: [&[u8]; 2] = [b"LD_PRELOAD=libvsocket.so", b"VSOCKET_CONTROL="];
        assert!(!image_loads_library(no_control));
        assert!(is_carry_entry(b"VSOCKET_INHERIT="));
        assert!(!is_carry_entry(b"VSOCKET_INHERITED=1"));
    }
}
