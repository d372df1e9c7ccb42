//! Raw system calls for the library's own use.
//!
//! The library interposes libc's socket functions, so it must never call
//! them for its own work (that would re-enter the hooks): everything here
//! goes straight to the kernel with `syscall(2)`. Each wrapper returns
//! `Result<_, Errno>`; none allocates. The helpers the daemon needs too
//! (pipes, doorbells, receiving descriptors) are `vsocket_sys::raw`'s,
//! made the same way, and only wrapped here.

use std::os::fd::RawFd;

/// A positive errno value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

pub type SysResult<T> = Result<T, Errno>;

/// The calling thread's errno, as left by the last failed call.
pub fn last_errno() -> Errno {
    // SAFETY: reading the calling thread's errno slot.
    Errno(unsafe { *libc::__errno_location() })
}

/// Sets the calling thread's errno.
pub fn set_errno(e: Errno) {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e.0 };
}

fn check(ret: libc::c_long) -> SysResult<usize> {
    if ret < 0 {
        // SAFETY: reading the calling thread's errno after a failed call.
        Err(Errno(unsafe { *libc::__errno_location() }))
    } else {
        Ok(ret as usize)
    }
}

macro_rules! raw {
    ($nr:expr $(, $arg:expr)*) => {
        // SAFETY: every caller passes arguments valid for this syscall
        // (live buffers of the stated lengths, descriptors it holds).
        check(unsafe { libc::syscall($nr $(, $arg)*) })
    };
}

/// Sleeps while `word` (this process's memory: a private futex) holds
/// `expected`, at most `timeout_ms`, or until a [`futex_wake`].
pub fn futex_wait(word: &std::sync::atomic::AtomicU32, expected: u32, timeout_ms: i64) {
    let ts = libc::timespec { tv_sec: timeout_ms / 1000, tv_nsec: (timeout_ms % 1000) * 1_000_000 };
    let op = libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG;
    let _ = raw!(libc::SYS_futex, word.as_ptr(), op, expected, &ts as *const libc::timespec);
}

/// Wakes up to `n` threads of this process sleeping in [`futex_wait`] on
/// `word`.
pub fn futex_wake(word: &std::sync::atomic::AtomicU32, n: i32) {
    let _ = raw!(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, n);
}

/// Is there no process `pid` (as far as this process can see), or only
/// what is left of one that died (a zombie its parent has not reaped yet,
/// which `kill` still finds)? A number no process can have (0 or below)
/// says none.
pub fn process_gone(pid: i32) -> bool {
    pid <= 0
        || raw!(libc::SYS_kill, pid, 0) == Err(Errno(libc::ESRCH))
        || vsocket_sys::process_running(pid as u32) == Some(false)
}

pub fn close(fd: RawFd) -> SysResult<()> {
    raw!(libc::SYS_close, fd).map(drop)
}

pub fn socket(domain: i32, ty: i32, proto: i32) -> SysResult<RawFd> {
    raw!(libc::SYS_socket, domain, ty, proto).map(|fd| fd as RawFd)
}

pub fn fcntl(fd: RawFd, cmd: i32, arg: libc::c_long) -> SysResult<usize> {
    raw!(libc::SYS_fcntl, fd, cmd, arg)
}

/// Moves `fd` to the lowest free number at or above `min`, close-on-exec,
/// and closes the original: the library's own descriptors stay out of the
/// range programs use and expect to be dense.
fn relocate(fd: RawFd, min: RawFd) -> RawFd {
    match fcntl(fd, libc::F_DUPFD_CLOEXEC, min as libc::c_long) {
        Ok(high) => {
            let _ = close(fd);
            high as RawFd
        }
        // No room up there (a low RLIMIT_NOFILE): keep it where it is.
        Err(_) => fd,
    }
}

/// Fails with EMFILE (or ENFILE) unless `count` more descriptors can be had
/// now, probing with copies of `fd` that it closes again.
pub fn probe_free_descriptors(fd: RawFd, count: usize) -> SysResult<()> {
    let mut copies: [RawFd; 8] = [-1; 8];
    let mut result = Ok(());
    for copy in copies.iter_mut().take(count) {
        match fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) {
            Ok(c) => *copy = c as RawFd,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    for copy in copies.into_iter().filter(|&c| c >= 0) {
        let _ = close(copy);
    }
    result
}

pub fn getsockopt_int(fd: RawFd, level: i32, name: i32) -> SysResult<i32> {
    let mut v: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    raw!(libc::SYS_getsockopt, fd, level, name, &mut v as *mut i32, &mut len as *mut libc::socklen_t)?;
    Ok(v)
}

pub fn setsockopt_int(fd: RawFd, level: i32, name: i32, v: i32) -> SysResult<()> {
    raw!(libc::SYS_setsockopt, fd, level, name, &v as *const i32, std::mem::size_of::<i32>()).map(drop)
}

/// Sets SO_LINGER.
pub fn setsockopt_linger(fd: RawFd, on: bool, seconds: i32) -> SysResult<()> {
    let l = libc::linger { l_onoff: on as i32, l_linger: seconds };
    raw!(
        libc::SYS_setsockopt,
        fd,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &l as *const libc::linger,
        std::mem::size_of::<libc::linger>()
    )
    .map(drop)
}

/// Sets a socket timeout option (SO_RCVTIMEO / SO_SNDTIMEO) in milliseconds.
pub fn setsockopt_timeout_ms(fd: RawFd, name: i32, ms: i64) -> SysResult<()> {
    let tv = libc::timeval { tv_sec: ms / 1000, tv_usec: (ms % 1000) * 1000 };
    raw!(
        libc::SYS_setsockopt,
        fd,
        libc::SOL_SOCKET,
        name,
        &tv as *const libc::timeval,
        std::mem::size_of::<libc::timeval>()
    )
    .map(drop)
}

/// SO_LINGER: (on, seconds).
pub fn getsockopt_linger(fd: RawFd) -> SysResult<(bool, i32)> {
    let mut l = libc::linger { l_onoff: 0, l_linger: 0 };
    let mut len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    raw!(
        libc::SYS_getsockopt,
        fd,
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &mut l as *mut libc::linger,
        &mut len as *mut libc::socklen_t
    )?;
    Ok((l.l_onoff != 0, l.l_linger))
}

/// A socket timeout option (SO_RCVTIMEO / SO_SNDTIMEO) in milliseconds.
pub fn getsockopt_timeout_ms(fd: RawFd, name: i32) -> SysResult<i64> {
    let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    raw!(
        libc::SYS_getsockopt,
        fd,
        libc::SOL_SOCKET,
        name,
        &mut tv as *mut libc::timeval,
        &mut len as *mut libc::socklen_t
    )?;
    Ok(tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000)
}

/// The socket's local address, as bytes of a sockaddr (see `addr`).
pub fn getsockname(fd: RawFd, out: &mut [u8; crate::addr::STORAGE]) -> SysResult<usize> {
    let mut len = out.len() as libc::socklen_t;
    raw!(libc::SYS_getsockname, fd, out.as_mut_ptr(), &mut len as *mut libc::socklen_t)?;
    Ok((len as usize).min(out.len()))
}

/// Binds to the address in `sa` (bytes of a sockaddr, see `addr`).
pub fn bind(fd: RawFd, sa: &[u8]) -> SysResult<()> {
    raw!(libc::SYS_bind, fd, sa.as_ptr(), sa.len()).map(drop)
}

pub fn connect_unix_seqpacket(path: &[u8]) -> SysResult<RawFd> {
    // SAFETY: sockaddr_un is plain data.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path.len() >= sa.sun_path.len() {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sa.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let fd = socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0)?;
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len() + 1;
    if let Err(e) = raw!(libc::SYS_connect, fd, &sa as *const libc::sockaddr_un, len) {
        let _ = close(fd);
        return Err(e);
    }
    Ok(fd)
}

/// A stream socket connected to vsock `port` of context `cid` (the host is
/// 2), close-on-exec.
pub fn connect_vsock(cid: u32, port: u32) -> SysResult<RawFd> {
    // SAFETY: sockaddr_vm is plain data.
    let mut sa: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = cid;
    sa.svm_port = port;
    let fd = socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)?;
    let len = std::mem::size_of::<libc::sockaddr_vm>();
    loop {
        match raw!(libc::SYS_connect, fd, &sa as *const libc::sockaddr_vm, len) {
            Ok(_) => return Ok(fd),
            Err(Errno(libc::EINTR)) => continue,
            Err(e) => {
                let _ = close(fd);
                return Err(e);
            }
        }
    }
}

/// Opens `path` (NUL-terminated) read-write, close-on-exec.
pub fn open_rw(path: &std::ffi::CStr) -> SysResult<RawFd> {
    raw!(libc::SYS_openat, libc::AT_FDCWD, path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC).map(|fd| fd as RawFd)
}

/// recv(2) into `buf`.
pub fn recv(fd: RawFd, buf: &mut [u8], flags: i32) -> SysResult<usize> {
    raw!(libc::SYS_recvfrom, fd, buf.as_mut_ptr(), buf.len(), flags, 0usize, 0usize)
}

/// Takes (`exclusive`) or gives back this process's POSIX record lock
/// over all of `fd`'s file, waiting while another process holds it (a
/// process's locks go when it exits). Threads of one process do not
/// exclude each other with it.
pub fn record_lock(fd: RawFd, exclusive: bool) -> SysResult<()> {
    let lock = libc::flock {
        l_type: if exclusive { libc::F_WRLCK } else { libc::F_UNLCK } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    loop {
        match raw!(libc::SYS_fcntl, fd, libc::F_SETLKW, &lock as *const libc::flock) {
            Err(Errno(libc::EINTR)) => {}
            r => return r.map(drop),
        }
    }
}

/// Sends all of `bytes` on the stream socket `fd`, resuming after a
/// signal.
pub fn send_all(fd: RawFd, mut bytes: &[u8]) -> SysResult<()> {
    while !bytes.is_empty() {
        match send(fd, bytes, 0) {
            Ok(n) => bytes = &bytes[n..],
            Err(Errno(libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends one datagram (no descriptors).
pub fn send(fd: RawFd, bytes: &[u8], flags: i32) -> SysResult<usize> {
    raw!(libc::SYS_sendto, fd, bytes.as_ptr(), bytes.len(), flags | libc::MSG_NOSIGNAL, 0usize, 0usize)
}

/// Receives one datagram with up to `fds.len()` descriptors (close-on-exec;
/// any beyond are closed); returns the length and how many descriptors
/// arrived.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut [RawFd], flags: i32) -> SysResult<(usize, usize)> {
    let mut count = 0;
    let received = vsocket_sys::raw::recv_with_fds(fd, buf, flags, |got| {
        if count < fds.len() {
            fds[count] = got;
            count += 1;
        } else {
            vsocket_sys::raw::close(got);
        }
    })
    .map_err(errno)?;
    Ok((received.len, count))
}

/// Reads and discards what is queued on a doorbell (a bounded amount: a
/// peer that floods its doorbell must not keep the caller here). Returns
/// `true` if the other end is gone (see `vsocket_sys::raw::drain_bounded`).
pub fn drain(fd: RawFd) -> bool {
    vsocket_sys::raw::drain_bounded(fd)
}

/// poll(2), as ppoll without a signal mask.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> SysResult<usize> {
    ppoll(fds, timeout_ms, std::ptr::null())
}

/// ppoll(2) with a timeout in milliseconds (negative: none) and an optional
/// signal mask (NULL: keep the thread's).
pub fn ppoll(fds: &mut [libc::pollfd], timeout_ms: i32, sigmask: *const libc::sigset_t) -> SysResult<usize> {
    let ts = libc::timespec {
        tv_sec: (timeout_ms.max(0) / 1000) as libc::time_t,
        tv_nsec: (timeout_ms.max(0) % 1000) as libc::c_long * 1_000_000,
    };
    let tsp: *const libc::timespec = if timeout_ms < 0 { std::ptr::null() } else { &ts };
    raw!(libc::SYS_ppoll, fds.as_mut_ptr(), fds.len(), tsp, sigmask, 8usize)
}

/// A new close-on-exec epoll instance.
pub fn epoll_create() -> SysResult<RawFd> {
    raw!(libc::SYS_epoll_create1, libc::EPOLL_CLOEXEC).map(|fd| fd as RawFd)
}

pub fn epoll_ctl(epfd: RawFd, op: i32, fd: RawFd, events: u32, data: u64) -> SysResult<()> {
    let mut ev = libc::epoll_event { events, u64: data };
    raw!(libc::SYS_epoll_ctl, epfd, op, fd, &mut ev as *mut libc::epoll_event).map(drop)
}

pub fn epoll_pwait(
    epfd: RawFd,
    out: &mut [libc::epoll_event],
    timeout_ms: i32,
    sigmask: *const libc::sigset_t,
) -> SysResult<usize> {
    raw!(libc::SYS_epoll_pwait, epfd, out.as_mut_ptr(), out.len() as i32, timeout_ms, sigmask, 8usize)
}

static PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The calling process's id, cached (it is read on every control request);
/// a fork handler of its own clears the cache in the child.
pub fn getpid() -> i32 {
    use std::sync::atomic::Ordering;
    static FORGET_IN_CHILD: std::sync::Once = std::sync::Once::new();
    FORGET_IN_CHILD.call_once(|| {
        extern "C" fn child() {
            forget_pid();
        }
        // SAFETY: registers a plain function that stores to an atomic.
        unsafe { libc::pthread_atfork(None, None, Some(child)) };
    });
    let cached = PID.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    let pid = process_id();
    // Not in a vfork child, which runs on its parent's memory: the cache
    // is its parent's.
    if memory_is_of(pid) {
        PID.store(pid, Ordering::Relaxed);
    }
    pid
}

/// The calling process's id from the kernel, never cached: right in a
/// vfork child too, where the cache still holds its parent's.
pub fn process_id() -> i32 {
    raw!(libc::SYS_getpid).unwrap_or(0) as i32
}

/// The process whose memory this is (0: not known yet).
static OWNER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Notes that this memory is the calling process's own (at load, and in a
/// fork child).
pub fn claim_memory() {
    OWNER.store(process_id(), std::sync::atomic::Ordering::Relaxed);
}

/// Is this memory the calling process's own? Not in a vfork child, which
/// runs on its parent's memory (its side table, its epoll sets, its
/// signal dispositions) until it execs or exits, with descriptors and
/// signal handlers of its own: it must leave the library's state alone.
pub fn memory_is_ours() -> bool {
    memory_is_of(process_id())
}

/// Is this memory process `pid`'s own (or not known to be another's)?
fn memory_is_of(pid: i32) -> bool {
    let owner = OWNER.load(std::sync::atomic::Ordering::Relaxed);
    owner == 0 || owner == pid
}

/// Forgets the cached process id, and claims the memory (in a fork child).
pub fn forget_pid() {
    PID.store(0, std::sync::atomic::Ordering::Relaxed);
    claim_memory();
}

/// Runs `prepare` in the parent before every fork(3), and `child` in the
/// child after it.
pub fn on_fork(prepare: extern "C" fn(), parent: extern "C" fn(), child: extern "C" fn()) {
    // SAFETY: registers plain functions.
    unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
}

/// Sends SIGPIPE to the calling thread, as a write on a broken kernel
/// socket does.
pub fn raise_sigpipe() {
    let tid = raw!(libc::SYS_gettid).unwrap_or(0);
    let _ = raw!(libc::SYS_tgkill, getpid(), tid, libc::SIGPIPE);
}

/// Held while the library moves one of its descriptors above the
/// program's limit (see [`relocate_internal`]), and across fork, so that
/// a child never starts with it held.
static LIMIT_HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn hold_limit() {
    use std::sync::atomic::Ordering;
    while LIMIT_HELD.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        std::thread::yield_now();
    }
}

fn release_limit() {
    LIMIT_HELD.store(false, std::sync::atomic::Ordering::Release);
}

/// Runs `f` with no fork and no relocation of another thread under way
/// (the lock `with_limit_raised` holds, without raising the limit): the
/// program's limit is its own for `f`'s calls.
pub fn with_fork_held<T>(f: impl FnOnce() -> T) -> T {
    hold_limit();
    let result = f();
    release_limit();
    result
}

/// Before fork: no relocation is half done in the child.
pub fn limit_before_fork() {
    hold_limit();
}

/// After fork, in the parent and in the child.
pub fn limit_after_fork() {
    release_limit();
}

pub fn nofile() -> SysResult<libc::rlimit> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    raw!(libc::SYS_prlimit64, 0, libc::RLIMIT_NOFILE, 0usize, &mut rl as *mut libc::rlimit)?;
    Ok(rl)
}

fn set_nofile(rl: &libc::rlimit) -> SysResult<()> {
    raw!(libc::SYS_prlimit64, 0, libc::RLIMIT_NOFILE, rl as *const libc::rlimit, 0usize).map(drop)
}

/// Moves the library's own descriptors `fds` out of the program's way, to
/// numbers at or above the program's soft `RLIMIT_NOFILE`, where none of
/// the program's descriptors can be: the program runs out of descriptors
/// (`EMFILE`) exactly where it would without the library. The kernel
/// checks the limit only when it hands out a number, so the soft limit is
/// raised to the hard one for the `fcntl`s (once for all of `fds`) and put
/// back. With no room above it (soft and hard equal), each goes as high as
/// it can below it (`fallback_floor` and up), as before; one that cannot
/// move stays where it is.
pub fn relocate_internal(fds: &mut [RawFd], fallback_floor: RawFd) {
    with_limit_raised(|raised| relocate_raised(fds, raised, fallback_floor))
}

/// [`relocate_internal`]'s moves, inside [`with_limit_raised`] (`raised`
/// is what it was told).
pub fn relocate_raised(fds: &mut [RawFd], raised: Option<u64>, fallback_floor: RawFd) {
    let floor = raised.map_or(fallback_floor, |soft| soft as RawFd);
    for fd in fds.iter_mut() {
        *fd = relocate(*fd, floor);
    }
}

/// Can this soft `RLIMIT_NOFILE` be raised to the hard one?
fn rises(rl: &libc::rlimit) -> bool {
    rl.rlim_cur < rl.rlim_max && rl.rlim_cur < (1 << 30)
}

/// Can the soft `RLIMIT_NOFILE` be raised (is it below the hard one)?
pub fn limit_rises() -> bool {
    nofile().is_ok_and(|rl| rises(&rl))
}

/// Runs `f` with the soft `RLIMIT_NOFILE` raised to the hard one, and puts
/// it back: descriptors the kernel hands out meanwhile (a message's, or
/// copies) may go above the program's limit, where the library's own
/// belong. `f` is told the soft limit it raised (`None`: it could not,
/// soft and hard being equal). `f` must not block: another thread of the
/// program that opens a descriptor meanwhile may get a number above its
/// limit. One thread at a time, and never across fork.
pub fn with_limit_raised<T>(f: impl FnOnce(Option<u64>) -> T) -> T {
    hold_limit();
    let raised = nofile()
        .ok()
        .filter(|rl| rises(rl) && set_nofile(&libc::rlimit { rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max }).is_ok());
    let result = f(raised.map(|rl| rl.rlim_cur));
    if let Some(rl) = raised {
        // Put back at once (a failure here would leave the program a higher
        // limit than it set; nothing to do).
        let _ = set_nofile(&rl);
    }
    release_limit();
    result
}

pub fn getrlimit_nofile() -> u64 {
    // SAFETY: rlimit is plain data.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    match raw!(libc::SYS_getrlimit, libc::RLIMIT_NOFILE, &mut rl as *mut libc::rlimit) {
        Ok(_) => rl.rlim_cur,
        Err(_) => 1024,
    }
}

/// Monotonic nanoseconds.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime (vDSO) writes into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Monotonic milliseconds, for timeouts.
pub fn now_ms() -> i64 {
    (now_ns() / 1_000_000) as i64
}

/// Bits per word of an `fd_set`.
pub const FD_WORD_BITS: usize = 8 * std::mem::size_of::<libc::c_ulong>();

/// The words of an `fd_set`.
pub fn fd_set_words(set: &libc::fd_set) -> &[libc::c_ulong] {
    // SAFETY: fd_set is exactly FD_SETSIZE bits stored as c_ulong words.
    unsafe {
        std::slice::from_raw_parts(set as *const libc::fd_set as *const libc::c_ulong, libc::FD_SETSIZE / FD_WORD_BITS)
    }
}

/// The words of an `fd_set`, mutably.
pub fn fd_set_words_mut(set: &mut libc::fd_set) -> &mut [libc::c_ulong] {
    // SAFETY: as in `fd_set_words`, through the only reference.
    unsafe {
        std::slice::from_raw_parts_mut(set as *mut libc::fd_set as *mut libc::c_ulong, libc::FD_SETSIZE / FD_WORD_BITS)
    }
}

/// Runs `f` with a borrowed view of `fd`, which the caller keeps open for
/// the duration.
pub fn with_borrowed<R>(fd: RawFd, f: impl FnOnce(std::os::fd::BorrowedFd<'_>) -> R) -> R {
    // SAFETY: the caller holds `fd` open across this call, and the borrow
    // cannot escape `f`.
    f(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })
}

/// read(2) into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    raw!(libc::SYS_read, fd, buf.as_mut_ptr(), buf.len())
}

/// write(2) from `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> SysResult<usize> {
    raw!(libc::SYS_write, fd, buf.as_ptr(), buf.len())
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> SysResult<(RawFd, RawFd)> {
    vsocket_sys::raw::pipe().map_err(errno)
}

/// Is `fd` a pipe (or FIFO)?
pub fn is_pipe(fd: RawFd) -> SysResult<bool> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    raw!(libc::SYS_fstat, fd, &mut st as *mut libc::stat)?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFIFO)
}

/// tee(2): copies up to `len` bytes from pipe `from` to pipe `to` without
/// consuming them.
pub fn tee(from: RawFd, to: RawFd, len: usize, flags: u32) -> SysResult<usize> {
    raw!(libc::SYS_tee, from, to, len, flags)
}

/// splice(2) between two descriptors at their file positions.
pub fn splice(from: RawFd, to: RawFd, len: usize, flags: u32) -> SysResult<usize> {
    raw!(libc::SYS_splice, from, 0usize, to, 0usize, len, flags)
}

/// The errno of a `vsocket_sys` error.
fn errno(e: std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

/// A connected pair of Unix SOCK_SEQPACKET sockets, close-on-exec: the
/// first for the library's side of a channel, the second, owned, for the
/// daemon's (tests).
#[cfg(test)]
pub fn seqpacket_pair() -> SysResult<(RawFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as RawFd; 2];
    raw!(libc::SYS_socketpair, libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())?;
    // SAFETY: socketpair just made fds[1], and nothing else owns it.
    let daemon = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
    Ok((fds[0], daemon))
}

/// Held by every fork a test makes ([`fork_running`]), so that a test
/// holding it sees no fork by another test running at the same time in
/// this process: the fork gate's test (`forksafe`, whose gate the fork
/// handlers open), and tests of what a fork changes (a kit's doorbell is
/// parked only if the process has not forked since the kit came,
/// `bells::forks`; a child holds a copy of every descriptor until it
/// exits, so a peer sees no hang-up meanwhile; a fork ends every socket's
/// note, `fresh`, as those tests' `forget_all` does).
#[cfg(test)]
pub fn no_fork_meanwhile() -> std::sync::MutexGuard<'static, ()> {
    static FORKS_OF_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    FORKS_OF_TESTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Forks through libc, so that the fork handlers run (tests): the child
/// runs `child` and exits with what it returns; the parent gets its pid,
/// and [`wait_exit`] its status.
#[cfg(test)]
pub fn fork_running(child: impl FnOnce() -> i32) -> SysResult<i32> {
    // The fork handlers open the process-wide fork gate: not while the
    // gate's own test has it closed.
    let _gate = no_fork_meanwhile();
    // SAFETY: fork has no memory effects on the parent; the child has only
    // this thread, runs `child` (which takes only the library's own locks,
    // made safe across fork by the handlers under test) and leaves below.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = child();
        // SAFETY: ends the child at once, running no destructor or atexit
        // handler of its copy of the test harness.
        unsafe { libc::_exit(code) }
    }
    if pid < 0 {
        return Err(last_errno());
    }
    Ok(pid)
}

/// The exit status of child `pid` (tests): `None` if it is still running
/// after `timeout_ms` (it is killed then).
#[cfg(test)]
pub fn wait_exit(pid: i32, timeout_ms: i64) -> Option<i32> {
    let deadline = now_ms() + timeout_ms;
    loop {
        let mut status = 0i32;
        let done = raw!(libc::SYS_wait4, pid, &mut status as *mut i32, libc::WNOHANG, 0usize).unwrap_or(0);
        if done == pid as usize {
            return Some(if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 });
        }
        if now_ms() > deadline {
            let _ = raw!(libc::SYS_kill, pid, libc::SIGKILL);
            let _ = raw!(libc::SYS_wait4, pid, &mut status as *mut i32, 0, 0usize);
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// pread(2) into `buf` from `offset`.
pub fn pread(fd: RawFd, buf: &mut [u8], offset: i64) -> SysResult<usize> {
    raw!(libc::SYS_pread64, fd, buf.as_mut_ptr(), buf.len(), offset)
}

/// lseek(2): moves the file offset; returns the new one.
pub fn lseek(fd: RawFd, offset: i64, whence: i32) -> SysResult<usize> {
    raw!(libc::SYS_lseek, fd, offset, whence)
}

/// close_range(2).
pub fn close_range(first: u32, last: u32, flags: u32) -> SysResult<()> {
    raw!(libc::SYS_close_range, first, last, flags).map(drop)
}

/// Which socket a descriptor or path names: its device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketIdentity {
    dev: u64,
    ino: u64,
}

fn socket_identity(st: &libc::stat) -> Option<SocketIdentity> {
    (st.st_mode & libc::S_IFMT == libc::S_IFSOCK).then_some(SocketIdentity { dev: st.st_dev, ino: st.st_ino })
}

/// The socket `fd` names (None: not a socket).
pub fn socket_of_fd(fd: RawFd) -> Option<SocketIdentity> {
    // SAFETY: struct stat is plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    raw!(libc::SYS_fstat, fd, &mut st as *mut libc::stat).ok()?;
    socket_identity(&st)
}

/// The socket `path` (NUL-terminated; a `/proc/PID/fd/N` link is
/// followed) names.
pub fn socket_at(path: &[u8]) -> Option<SocketIdentity> {
    if path.last() != Some(&0) {
        return None;
    }
    // SAFETY: struct stat is plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    raw!(libc::SYS_newfstatat, libc::AT_FDCWD, path.as_ptr(), &mut st as *mut libc::stat, 0).ok()?;
    socket_identity(&st)
}

/// The process whose memory this is, if known (see `memory_is_ours`).
pub fn memory_owner() -> i32 {
    OWNER.load(std::sync::atomic::Ordering::Relaxed)
}

/// Calls `f` with each descriptor open in the calling process (from
/// `/proc/self/fd`), allocating nothing.
pub fn each_open_fd(mut f: impl FnMut(RawFd)) -> SysResult<()> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    let dir = raw!(libc::SYS_openat, libc::AT_FDCWD, c"/proc/self/fd".as_ptr(), flags)? as RawFd;
    let mut buf = [0u8; 4096];
    let result = loop {
        let n = match raw!(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        for name in dirent_names(&buf[..n]) {
            match std::str::from_utf8(name).ok().and_then(|s| s.parse::<RawFd>().ok()) {
                Some(fd) if fd != dir => f(fd),
                _ => {}
            }
        }
    };
    let _ = close(dir);
    result
}

/// The names in a buffer of `linux_dirent64` records (inode, offset,
/// record length, type, NUL-terminated name).
fn dirent_names(records: &[u8]) -> impl Iterator<Item = &[u8]> {
    const NAME: usize = 8 + 8 + 2 + 1;
    let mut rest = records;
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*rest.get(16)?, *rest.get(17)?]));
        if len < NAME || len > rest.len() {
            return None;
        }
        let (record, after) = rest.split_at(len);
        rest = after;
        let name = &record[NAME..];
        Some(&name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_descriptors_and_their_sockets_are_listed() {
        let (ours, daemon) = seqpacket_pair().unwrap();
        let mut seen = Vec::new();
        each_open_fd(|fd| seen.push(fd)).unwrap();
        assert!(seen.contains(&ours), "{seen:?}");
        let socket = socket_of_fd(ours).unwrap();
        let path = format!("/proc/{}/fd/{ours}\0", process_id());
        assert_eq!(socket_at(path.as_bytes()), Some(socket));
        assert_ne!(socket_of_fd(std::os::fd::AsRawFd::as_raw_fd(&daemon)), Some(socket));
        let (r, w) = pipe().unwrap();
        assert_eq!(socket_of_fd(r), None);
        for fd in [ours, r, w] {
            close(fd).unwrap();
        }
    }

    #[test]
    fn a_process_that_died_is_gone_before_and_after_it_is_reaped() {
        assert!(!process_gone(process_id()), "this process");
        assert!(process_gone(0) && process_gone(-5), "no process has these");
        let child = fork_running(|| 0).unwrap();
        // Dead and not reaped (a zombie, which kill still finds).
        let deadline = now_ms() + 5_000;
        while vsocket_sys::process_running(child as u32) != Some(false) && now_ms() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(vsocket_sys::process_running(child as u32), Some(false), "a zombie");
        assert!(process_gone(child));
        assert_eq!(wait_exit(child, 5_000), Some(0));
        assert!(process_gone(child), "reaped");
    }

    #[test]
    fn damaged_directory_records_end_the_listing() {
        let mut record = vec![0u8; 24];
        record[16..18].copy_from_slice(&24u16.to_ne_bytes());
        record[19..21].copy_from_slice(b"17");
        let mut two = record.clone();
        two.extend_from_slice(&record);
        assert_eq!(dirent_names(&two).collect::<Vec<_>>(), vec![b"17", b"17"]);
        two[16..18].copy_from_slice(&200u16.to_ne_bytes());
        assert_eq!(dirent_names(&two).count(), 0);
        assert_eq!(dirent_names(&record[..10]).count(), 0);
    }
}
