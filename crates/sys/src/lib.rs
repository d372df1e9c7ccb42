//! The syscall edge of the daemon and the CLIs: every libc call they make
//! that std does not wrap, each turned into `io::Result` in one place.
//!
//! The helpers the preload library needs too (pipes, doorbells, receiving
//! descriptors) live in [`raw`], made by direct system calls, since the
//! library must never call the very functions it interposes; the versions
//! here wrap them.

pub mod raw;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Turns a -1 return into the thread's errno.
macro_rules! syscall {
    ($e:expr) => {{
        let ret = $e;
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }};
}

fn cstring(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn unix_addr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("socket path too long: {}", path.display())));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = syscall!(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket(2) returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds and listens on a Unix `SOCK_SEQPACKET` socket at `path`
/// (replacing a stale socket file).
pub fn seqpacket_listen(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = seqpacket_socket()?;
    let (addr, len) = unix_addr(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    syscall!(unsafe { libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len,) })?;
    // SAFETY: plain listen(2) on our socket.
    syscall!(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// Connects a Unix `SOCK_SEQPACKET` socket to `path`.
pub fn seqpacket_connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    let (addr, len) = unix_addr(path)?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    syscall!(unsafe { libc::connect(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len,) })?;
    Ok(fd)
}

/// Accepts one connection (blocking).
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: accept4 without an address buffer.
        match syscall!(unsafe {
            libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        }) {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Binds and listens on vsock `port` of any context id (in a VM: the
/// guest's own), for streams from the host.
pub fn vsock_listen(port: u32, backlog: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let raw = syscall!(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain data; all zeros is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    syscall!(unsafe { libc::bind(fd.as_raw_fd(), &addr as *const _ as *const libc::sockaddr, len) })?;
    // SAFETY: plain listen(2) on our socket.
    syscall!(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// The context id of the peer of the vsock stream `fd` (2: the host).
pub fn vsock_peer_cid(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: sockaddr_vm is plain data; all zeros is a valid start.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` has room for `len` bytes, which getpeername updates.
    syscall!(unsafe { libc::getpeername(fd.as_raw_fd(), &mut addr as *mut _ as *mut libc::sockaddr, &mut len) })?;
    if i32::from(addr.svm_family) != libc::AF_VSOCK {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a vsock stream"));
    }
    Ok(addr.svm_cid)
}

/// A connected pair of Unix stream sockets (a connection's doorbell).
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = raw::stream_pair()?;
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(b)) })
}

/// A pipe, both ends close-on-exec: (read end, write end). A connection's
/// lifeline: the daemon keeps the read end, a guest the write end.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = raw::pipe()?;
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(read), OwnedFd::from_raw_fd(write)) })
}

/// A connected pair of unix seqpacket sockets (a listener's kit channel):
/// the first, the daemon's, never blocks a send.
pub fn seqpacket_pair_nonblocking_first() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = raw::seqpacket_pair_nonblocking_first()?;
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(b)) })
}

/// Has every holder of the other end of this pipe or socket closed it
/// (POLLHUP, or POLLERR/POLLNVAL)? Does not wait.
pub fn hung_up(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: one valid pollfd, timeout 0.
    match syscall!(unsafe { libc::poll(&mut pfd, 1, 0) }) {
        Ok(_) => pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        Err(_) => false,
    }
}

/// For each descriptor, has its other end hung up? One `poll` for all of
/// them (the reaper asks this of every live connection's lifelines).
pub fn hung_up_all(fds: &[BorrowedFd<'_>]) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: 0, revents: 0 }).collect();
    if pfds.is_empty() {
        return Vec::new();
    }
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfds; timeout 0.
    match syscall!(unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) }) {
        Ok(_) => pfds.iter().map(|p| p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0).collect(),
        Err(_) => vec![false; pfds.len()],
    }
}

/// The process id behind a Unix socket (SO_PEERCRED), as the kernel recorded
/// it at connect time.
pub fn peer_pid(sock: BorrowedFd<'_>) -> io::Result<libc::pid_t> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    syscall!(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(cred.pid)
}

/// Sends one datagram with up to 8 descriptors attached (SCM_RIGHTS).
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut raw = [0 as RawFd; raw::MAX_SEND_FDS];
    let raw = raw.get_mut(..fds.len()).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    for (to, fd) in raw.iter_mut().zip(fds) {
        *to = fd.as_raw_fd();
    }
    raw::send_with_fds(sock.as_raw_fd(), bytes, raw)
}

/// Receives one datagram and any descriptors that came with it. Returns the
/// datagram length (0 at end of stream) and the descriptors, which are
/// close-on-exec and owned by the caller.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_with_fds_flags(sock, buf, 0)
}

/// As [`recv_with_fds`], with extra recvmsg flags (MSG_DONTWAIT).
pub fn recv_with_fds_flags(sock: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> io::Result<(usize, Vec<OwnedFd>)> {
    loop {
        let mut fds = Vec::new();
        // SAFETY: each descriptor received is new and handed to us alone.
        let received =
            raw::recv_with_fds(sock.as_raw_fd(), buf, flags, |fd| fds.push(unsafe { OwnedFd::from_raw_fd(fd) }));
        match received {
            // (Dropping `fds` closes what came.)
            Ok(r) if r.truncated => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "too many descriptors in one message"))
            }
            Ok(r) => return Ok((r.len, fds)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Shuts a socket down both ways (`shutdown(SHUT_RDWR)`): a thread blocked
/// reading it sees end of stream, one blocked in `accept` on a listening
/// Unix socket gets `EINVAL`, and the peer sees end of stream. Acts on the
/// socket, so every descriptor for it is affected.
pub fn shutdown(sock: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain shutdown(2) on a descriptor the caller holds.
    syscall!(unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) })?;
    Ok(())
}

/// Bounds how long a blocking send on `sock` may wait (SO_SNDTIMEO).
pub fn set_send_timeout(sock: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    set_timeout(sock, libc::SO_SNDTIMEO, timeout)
}

/// Bounds how long a receive (or an accept) on `sock` waits (`WouldBlock`
/// after `timeout`).
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    set_timeout(sock, libc::SO_RCVTIMEO, timeout)
}

fn set_timeout(sock: BorrowedFd<'_>, option: libc::c_int, timeout: std::time::Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads exactly size_of::<timeval>() bytes from `tv`.
    syscall!(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// The process's soft `RLIMIT_NOFILE`: how many descriptors it may hold.
pub fn nofile_limit() -> io::Result<u64> {
    // SAFETY: rlimit is plain data.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes into `rl`.
    syscall!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
    Ok(rl.rlim_cur)
}

/// Raises the soft limit on open descriptors to the hard limit (the daemon
/// holds a few per guest process and per connection). Returns the new limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: rlimit is plain data.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes into `rl`.
    syscall!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
    rl.rlim_cur = rl.rlim_max;
    // SAFETY: setrlimit reads `rl`.
    syscall!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) })?;
    Ok(rl.rlim_cur)
}

/// Identity of a network namespace: the (device, inode) of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

/// The identity of the namespace file at `path` (`/run/netns/NAME` or
/// `/proc/PID/ns/net`).
pub fn netns_id(path: &Path) -> io::Result<NetnsId> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    Ok(NetnsId { dev: meta.dev(), ino: meta.ino() })
}

/// The network namespace a process lives in.
pub fn process_netns(pid: libc::pid_t) -> io::Result<NetnsId> {
    netns_id(Path::new(&format!("/proc/{pid}/ns/net")))
}

/// The fields of `/proc/PID/stat` after the command's name (which may
/// hold spaces and parentheses), from the state on; `None` if there is no
/// such process (or no `/proc`).
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.split_whitespace().map(str::to_owned).collect())
}

/// Is process `pid` running: `Some(false)` once it exited, even before its
/// parent reaps it (a zombie, which `kill(pid, 0)` still finds); `None`
/// when no such process can be seen (or there is no `/proc`).
pub fn process_running(pid: u32) -> Option<bool> {
    let fields = stat_fields(pid)?;
    Some(!matches!(fields.first().map(String::as_str), Some("Z" | "X")))
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    // SAFETY: setns on a valid namespace descriptor.
    syscall!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(())
}

/// Makes the program `command` starts get SIGKILL when the thread that
/// starts it ends (the daemon exits), so that a helper the daemon runs
/// (a VM's vsock backend) never outlives it.
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec, and
    // calls only prctl, which is async-signal-safe and touches no memory
    // of ours.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `signal` to every process of process group `group` (a child
/// started with `process_group(0)`, which leads it). The caller must not
/// have reaped the leader: until then the group's id cannot be reused.
pub fn signal_group(group: u32, signal: i32) -> io::Result<()> {
    // Group 0 (or 1, -1 once negated) would be the caller's own or all.
    let group = libc::pid_t::try_from(group)
        .ok()
        .filter(|&g| g > 1)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill takes no pointers; a negative pid names a group.
    syscall!(unsafe { libc::kill(-group, signal) })?;
    Ok(())
}

/// Changes the file mode of `path`.
pub fn chmod(path: &Path, mode: u32) -> io::Result<()> {
    let c = cstring(path)?;
    // SAFETY: NUL-terminated path.
    syscall!(unsafe { libc::chmod(c.as_ptr(), mode) })?;
    Ok(())
}

/// An epoll set (the fabric relay waits on its link, doorbells and
/// lifelines at once). Each registered descriptor carries a `u64` token.
pub struct Epoll(OwnedFd);

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain epoll_create1(2).
        let fd = syscall!(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: a new descriptor owned by nobody else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call;
        // an fd that is not open only makes epoll_ctl fail.
        syscall!(unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    /// Watches `fd` for `events` (EPOLLIN, EPOLLOUT...), reported with `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        self.add_raw(fd.as_raw_fd(), events, token)
    }

    /// As [`Epoll::add`], for a descriptor another library owns (a closed
    /// or reused number only makes epoll report it wrongly or fail).
    pub fn add_raw(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd.as_raw_fd(), events, token)
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.delete_raw(fd.as_raw_fd())
    }

    /// Stops watching a descriptor added with [`Epoll::add_raw`].
    pub fn delete_raw(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout_ms` (-1: forever) and returns (token, events)
    /// of what is ready. EINTR reads as nothing ready.
    pub fn wait(&self, timeout_ms: i32, out: &mut Vec<(u64, u32)>) -> io::Result<()> {
        out.clear();
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 64];
        // SAFETY: `evs` has room for 64 events.
        match syscall!(unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), 64, timeout_ms) }) {
            Ok(n) => {
                out.extend(evs[..n as usize].iter().map(|e| (e.u64, e.events)));
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A non-blocking eventfd: one thread `signal`s, the thread that polls it
/// `drain`s.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain eventfd(2).
    let fd = syscall!(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: a new descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd (wakes its poller).
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer; a full counter is still a wake-up.
    let _ = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), 8) };
}

/// `N` random bytes from the kernel (getrandom).
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most `N - filled` bytes into the rest of `bytes`.
        let n = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(bytes)
}

/// Whether the network interface that holds `ip` is up and running:
/// `None` if no interface holds it.
pub fn interface_running(ip: std::net::IpAddr) -> io::Result<Option<bool>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list that freeifaddrs frees.
    syscall!(unsafe { libc::getifaddrs(&mut list) })?;
    let mut found = None;
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs made, freed below.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family
        // tells its real type; each is read only as that type.
        let holds = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    ip == std::net::IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    ip == std::net::IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => false,
            }
        };
        if holds {
            let flags = ifa.ifa_flags as i32;
            let running = flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0;
            found = Some(found.unwrap_or(false) || running);
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once; no reference
    // into it outlives this call.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// Reads a doorbell, eventfd or pipe until it is empty, without blocking.
/// Returns true if its other end has hung up (end of file); a hang-up
/// right behind a short read shows at the next call (epoll reports it
/// again). See [`raw::drain_until_empty`].
pub fn drain(fd: BorrowedFd<'_>) -> bool {
    raw::drain_until_empty(fd.as_raw_fd())
}

/// Takes what a guest's doorbell holds, at most 4 KiB: a guest that floods
/// its doorbell must not keep the daemon's thread reading it (a doorbell
/// still readable after this is reported again by the thread's epoll set).
/// Returns true if its other end is gone.
pub fn drain_bell(fd: BorrowedFd<'_>) -> bool {
    raw::drain_bounded(fd.as_raw_fd())
}

/// Rings a doorbell (one byte on a stream socket), never blocking: a full
/// doorbell already means a wake-up is pending.
pub fn ring(fd: BorrowedFd<'_>) {
    // SAFETY: sends one byte from a live buffer.
    let _ = unsafe { libc::send(fd.as_raw_fd(), [1u8].as_ptr().cast(), 1, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
}

/// A signal set of `signals`.
fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t; the signal numbers are checked by
    // sigaddset (an invalid one is skipped with EINVAL).
    unsafe {
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
    }
    set
}

/// Blocks `signals` in the calling thread and in the threads it starts
/// from now on, so that they wait for [`wait_signal`] instead of running
/// their default action.
pub fn block_signals(signals: &[i32]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: `set` is a live sigset_t; the old mask is not asked for.
    match unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Waits at most `timeout` for one of `signals` (blocked beforehand with
/// [`block_signals`]) and takes it; `None` when the time passed first.
pub fn wait_signal(signals: &[i32], timeout: std::time::Duration) -> io::Result<Option<i32>> {
    let set = sigset(signals);
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    loop {
        // SAFETY: `set` and `ts` are live; no siginfo is asked for.
        let got = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        if got >= 0 {
            return Ok(Some(got));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) => return Ok(None),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_running_and_an_address_nobody_holds_is_not_found() {
        let lo = std::net::IpAddr::from([127, 0, 0, 1]);
        assert_eq!(super::interface_running(lo).unwrap(), Some(true));
        let nobody = std::net::IpAddr::from([192, 0, 2, 254]);
        assert_eq!(super::interface_running(nobody).unwrap(), None);
    }

    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_travel_with_datagrams() {
        let dir = std::env::temp_dir().join(format!("vsocket-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let listener = seqpacket_listen(&path, 4).unwrap();
        let client = seqpacket_connect(&path).unwrap();
        let server = accept(listener.as_fd()).unwrap();
        assert_eq!(peer_pid(server.as_fd()).unwrap(), std::process::id() as i32);
        let (a, b) = stream_pair().unwrap();
        send_with_fds(client.as_fd(), b"hello", &[a.as_fd(), b.as_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(server.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        drop(client);
        let (n, fds) = recv_with_fds(server.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (0, 0));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn own_namespace_matches_itself() {
        let me = process_netns(std::process::id() as i32).unwrap();
        assert_eq!(me, netns_id(Path::new("/proc/self/ns/net")).unwrap());
    }
}
