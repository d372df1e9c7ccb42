//! The C ABI: the functions `libvsocket.so` exports in place of libc's.
//!
//! Each hook looks the descriptor up in the side table; a descriptor the
//! library does not manage goes to the real libc function (resolved once
//! with `dlsym(RTLD_NEXT)`), untouched. Managed ones are served by the
//! safe modules. This is the only place that turns C pointers into Rust
//! slices; no panic unwinds out of it (the crate aborts on panic).

use crate::addr::{self, Family};
use crate::conn::Connection;
use crate::listener::Listener;
use crate::sys::{self, Errno, SysResult};
use crate::table::{self, Dropped, Entry};
use crate::{control, poll, signals};
use libc::{c_int, c_ulong, c_void, size_t, sockaddr, socklen_t, ssize_t};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vsocket_abi::control::Message;
use vsocket_abi::layout::Endpoint;

/// Resolves (once) and returns the next definition of a libc function.
macro_rules! real {
    ($name:ident: $ty:ty) => {{
        static ADDR: AtomicUsize = AtomicUsize::new(0);
        let addr = resolve(concat!(stringify!($name), "\0").as_bytes(), &ADDR);
        #[allow(unused_unsafe)]
        // SAFETY: `addr` is the next definition of this libc symbol, whose C
        // type is `$ty`.
        let f = unsafe { std::mem::transmute::<usize, $ty>(addr) };
        f
    }};
}

/// The address of the definition of `name` (NUL-terminated) after ours.
fn resolve(name: &[u8], cache: &AtomicUsize) -> usize {
    let cached = cache.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT skips this library.
    let addr = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr() as *const libc::c_char) } as usize;
    if addr == 0 {
        // Without libc's definition there is nothing sane to do.
        std::process::abort();
    }
    cache.store(addr, Ordering::Relaxed);
    addr
}

/// Sets errno from `r` and returns the C result.
fn ret(r: SysResult<usize>) -> ssize_t {
    match r {
        Ok(n) => n as ssize_t,
        Err(e) => {
            sys::set_errno(e);
            -1
        }
    }
}

fn ret_int(r: SysResult<()>) -> c_int {
    ret(r.map(|()| 0)) as c_int
}

fn conn_of(fd: RawFd) -> Option<Arc<Entry>> {
    table::get(fd).filter(|e| e.is_connection())
}

/// A byte slice from a C buffer (NULL allowed when `len` is 0).
///
/// # Safety
/// `ptr` must be valid for `len` bytes for the duration of the call.
unsafe fn slice<'a>(ptr: *const c_void, len: usize) -> &'a [u8] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts(ptr as *const u8, len) }
    }
}

/// A mutable byte slice from a C buffer.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes for the duration of the call.
unsafe fn slice_mut<'a>(ptr: *mut c_void, len: usize) -> &'a mut [u8] {
    if len == 0 || ptr.is_null() {
        &mut []
    } else {
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) }
    }
}

/// # Safety
/// `iov` must point to `cnt` valid iovecs whose buffers are valid.
unsafe fn iovecs<'a>(iov: *const libc::iovec, cnt: c_int) -> SysResult<Vec<&'a mut [u8]>> {
    if !(0..=libc::UIO_MAXIOV).contains(&cnt) {
        return Err(Errno(libc::EINVAL));
    }
    if cnt == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: per this function's contract.
    let iovs = unsafe { std::slice::from_raw_parts(iov, cnt as usize) };
    // SAFETY: each iovec describes a buffer valid for the call.
    Ok(iovs.iter().map(|v| unsafe { slice_mut(v.iov_base, v.iov_len) }).collect())
}

fn with_conn<R>(entry: &Entry, f: impl FnOnce(&Connection) -> SysResult<R>) -> SysResult<R> {
    match entry {
        Entry::Conn(c) => f(c),
        _ => Err(Errno(libc::ENOTCONN)),
    }
}

/// The IPv4 endpoint a program's socket address names, if any (see `addr`).
fn read_sockaddr(addr: *const sockaddr, len: socklen_t) -> Option<(SocketAddrV4, Family)> {
    if addr.is_null() {
        return None;
    }
    let mut bytes = [0u8; addr::STORAGE];
    let n = (len as usize).min(bytes.len());
    // SAFETY: the caller's address holds `len` bytes; we copy at most that.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, bytes.as_mut_ptr(), n) };
    addr::parse(&bytes[..n])
}

/// Writes `a`, as an address of `family`, into a caller's (addr, len)
/// pair, truncating as the kernel does.
fn write_sockaddr(a: SocketAddrV4, family: Family, addr: *mut sockaddr, len: *mut socklen_t) -> SysResult<()> {
    if addr.is_null() || len.is_null() {
        return if addr.is_null() && len.is_null() { Ok(()) } else { Err(Errno(libc::EFAULT)) };
    }
    let (bytes, full) = addr::render(a, family);
    // SAFETY: `len` points to the caller's buffer length, and `addr` to at
    // least that many bytes; we copy no more than it says.
    unsafe {
        let room = (*len as usize).min(full);
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, room);
        *len = full as socklen_t;
    }
    Ok(())
}

/// The family of a TCP socket that vSocket may carry: AF_INET, or AF_INET6
/// that also speaks IPv4 (IPV6_V6ONLY off).
fn tcp_family(fd: RawFd) -> Option<Family> {
    let family = Family::from_domain(sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN).ok()?)?;
    if sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE).ok()? != libc::SOCK_STREAM {
        return None;
    }
    if family == Family::V6 && sys::getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY) != Ok(0) {
        return None;
    }
    Some(family)
}

/// The socket's local address, if it is an IPv4 one (or `::`).
fn local_v4(fd: RawFd) -> Option<SocketAddrV4> {
    let mut bytes = [0u8; addr::STORAGE];
    let n = sys::getsockname(fd, &mut bytes).ok()?;
    addr::parse(&bytes[..n]).map(|(a, _)| a)
}

// ---- reading and writing ------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        // SAFETY: the caller passes a buffer valid for `count` bytes.
        let b = unsafe { slice_mut(buf, count) };
        return ret(with_conn(&e, |c| c.recv(&mut [b], 0)));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(read: unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t)(fd, buf, count) }
}

#[no_mangle]
pub unsafe extern "C" fn __read_chk(fd: c_int, buf: *mut c_void, count: size_t, buflen: size_t) -> ssize_t {
    if count > buflen {
        // SAFETY: as glibc does on a detected overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: forwarded contract.
    unsafe { read(fd, buf, count) }
}

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        // SAFETY: the caller passes a buffer valid for `count` bytes.
        let b = unsafe { slice(buf, count) };
        return ret(with_conn(&e, |c| c.send(&[b], 0)));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(write: unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t)(fd, buf, count) }
}

#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const libc::iovec, cnt: c_int) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        // SAFETY: the caller passes `cnt` valid iovecs.
        let r = unsafe { iovecs(iov, cnt) }.and_then(|mut v| with_conn(&e, |c| c.recv(&mut v, 0)));
        return ret(r);
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(readv: unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> ssize_t)(fd, iov, cnt) }
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const libc::iovec, cnt: c_int) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        // SAFETY: the caller passes `cnt` valid iovecs.
        let r = unsafe { iovecs(iov, cnt) }.and_then(|v| {
            let v: Vec<&[u8]> = v.into_iter().map(|b| &*b).collect();
            with_conn(&e, |c| c.send(&v, 0))
        });
        return ret(r);
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(writev: unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> ssize_t)(fd, iov, cnt) }
}

#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        // SAFETY: the caller passes a buffer valid for `len` bytes.
        let b = unsafe { slice_mut(buf, len) };
        return ret(with_conn(&e, |c| c.recv(&mut [b], flags)));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(recv: unsafe extern "C" fn(c_int, *mut c_void, size_t, c_int) -> ssize_t)(fd, buf, len, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn __recv_chk(fd: c_int, buf: *mut c_void, len: size_t, buflen: size_t, flags: c_int) -> ssize_t {
    if len > buflen {
        // SAFETY: as glibc does on a detected overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: forwarded contract.
    unsafe { recv(fd, buf, len, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        // SAFETY: the caller passes a buffer valid for `len` bytes.
        let b = unsafe { slice(buf, len) };
        return ret(with_conn(&e, |c| c.send(&[b], flags)));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(send: unsafe extern "C" fn(c_int, *const c_void, size_t, c_int) -> ssize_t)(fd, buf, len, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        // SAFETY: the caller passes a buffer valid for `len` bytes.
        let b = unsafe { slice_mut(buf, len) };
        let r = with_conn(&e, |c| c.recv(&mut [b], flags));
        if r.is_ok() && !addr.is_null() && !alen.is_null() {
            // A connected stream socket reports no source address.
            // SAFETY: `alen` is the caller's valid length pointer.
            unsafe { *alen = 0 };
        }
        return ret(r);
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real!(recvfrom: unsafe extern "C" fn(c_int, *mut c_void, size_t, c_int, *mut sockaddr, *mut socklen_t) -> ssize_t)(
            fd, buf, len, flags, addr, alen,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    if len > buflen {
        // SAFETY: as glibc does on a detected overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: forwarded contract.
    unsafe { recvfrom(fd, buf, len, flags, addr, alen) }
}

#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    len: size_t,
    flags: c_int,
    addr: *const sockaddr,
    alen: socklen_t,
) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        // SAFETY: the caller passes a buffer valid for `len` bytes.
        let b = unsafe { slice(buf, len) };
        // A connected stream socket ignores the destination, as TCP does.
        return ret(with_conn(&e, |c| c.send(&[b], flags)));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real!(sendto: unsafe extern "C" fn(c_int, *const c_void, size_t, c_int, *const sockaddr, socklen_t) -> ssize_t)(
            fd, buf, len, flags, addr, alen,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        if msg.is_null() {
            return ret(Err(Errno(libc::EFAULT)));
        }
        // SAFETY: the caller passes a valid msghdr with valid iovecs.
        let r = unsafe {
            let m = &mut *msg;
            m.msg_namelen = 0;
            m.msg_controllen = 0;
            m.msg_flags = 0;
            iovecs(m.msg_iov, m.msg_iovlen as c_int)
        };
        return ret(r.and_then(|mut v| with_conn(&e, |c| c.recv(&mut v, flags))));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(recvmsg: unsafe extern "C" fn(c_int, *mut libc::msghdr, c_int) -> ssize_t)(fd, msg, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> ssize_t {
    if let Some(e) = conn_of(fd) {
        if msg.is_null() {
            return ret(Err(Errno(libc::EFAULT)));
        }
        // SAFETY: the caller passes a valid msghdr with valid iovecs.
        let r = unsafe { iovecs((*msg).msg_iov, (*msg).msg_iovlen as c_int) };
        return ret(r.and_then(|v| {
            let v: Vec<&[u8]> = v.into_iter().map(|b| &*b).collect();
            with_conn(&e, |c| c.send(&v, flags))
        }));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(sendmsg: unsafe extern "C" fn(c_int, *const libc::msghdr, c_int) -> ssize_t)(fd, msg, flags) }
}

/// The bytes a message's iovecs describe.
///
/// # Safety
/// `msg` must point to a valid msghdr.
unsafe fn msg_bytes(msg: *const libc::msghdr) -> usize {
    // SAFETY: per this function's contract; the iovec array is the caller's.
    unsafe {
        let m = &*msg;
        if m.msg_iov.is_null() {
            return 0;
        }
        std::slice::from_raw_parts(m.msg_iov, m.msg_iovlen).iter().map(|v| v.iov_len).sum()
    }
}

/// sendmmsg on a stream socket, as Linux does it: sendmsg per message
/// until one fails or is sent only in part; the count of messages sent, or
/// the first message's error.
#[no_mangle]
pub unsafe extern "C" fn sendmmsg(fd: c_int, msgs: *mut libc::mmsghdr, vlen: libc::c_uint, flags: c_int) -> c_int {
    if conn_of(fd).is_some() {
        let vlen = vlen.min(libc::UIO_MAXIOV as libc::c_uint) as usize;
        if vlen > 0 && msgs.is_null() {
            return ret_int(Err(Errno(libc::EFAULT)));
        }
        let mut sent = 0;
        while sent < vlen {
            // SAFETY: the caller passes `vlen` valid mmsghdrs.
            let m = unsafe { &mut *msgs.add(sent) };
            // SAFETY: forwarded contract (a valid msghdr); sendmsg sets errno.
            let r = unsafe { sendmsg(fd, &m.msg_hdr, flags) };
            if r < 0 {
                break;
            }
            m.msg_len = r as libc::c_uint;
            sent += 1;
            // SAFETY: as above.
            if (r as usize) < unsafe { msg_bytes(&m.msg_hdr) } {
                break;
            }
        }
        return if sent > 0 || vlen == 0 { sent as c_int } else { -1 };
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real!(sendmmsg: unsafe extern "C" fn(c_int, *mut libc::mmsghdr, libc::c_uint, c_int) -> c_int)(
            fd, msgs, vlen, flags,
        )
    }
}

/// recvmmsg on a stream socket, as Linux does it: recvmsg per message;
/// MSG_WAITFORONE makes every message after the first non-blocking; the
/// timeout is checked only after each message (the documented Linux
/// behaviour) and updated with the time left. An error after the first
/// message ends the batch.
#[no_mangle]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    msgs: *mut libc::mmsghdr,
    vlen: libc::c_uint,
    flags: c_int,
    timeout: *mut libc::timespec,
) -> c_int {
    if conn_of(fd).is_some() {
        // SAFETY: a non-NULL timeout points to the caller's timespec.
        let limit = unsafe { timeout.as_ref().copied() };
        if let Some(t) = limit {
            if t.tv_sec < 0 || !(0..1_000_000_000).contains(&t.tv_nsec) {
                return ret_int(Err(Errno(libc::EINVAL)));
            }
        }
        let deadline = limit.map(|t| sys::now_ns().saturating_add(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64));
        let vlen = vlen.min(libc::UIO_MAXIOV as libc::c_uint) as usize;
        if vlen > 0 && msgs.is_null() {
            return ret_int(Err(Errno(libc::EFAULT)));
        }
        let mut flags = flags;
        let mut got = 0;
        let mut err = None;
        while got < vlen {
            // SAFETY: the caller passes `vlen` valid mmsghdrs.
            let m = unsafe { &mut *msgs.add(got) };
            // SAFETY: forwarded contract (a valid msghdr); recvmsg sets errno.
            let r = unsafe { recvmsg(fd, &mut m.msg_hdr, flags & !libc::MSG_WAITFORONE) };
            if r < 0 {
                err = Some(sys::last_errno());
                break;
            }
            m.msg_len = r as libc::c_uint;
            got += 1;
            if flags & libc::MSG_WAITFORONE != 0 {
                flags |= libc::MSG_DONTWAIT;
            }
            if let Some(d) = deadline {
                let left = d.saturating_sub(sys::now_ns());
                // SAFETY: `deadline` is Some only for a non-NULL timeout.
                unsafe {
                    (*timeout).tv_sec = (left / 1_000_000_000) as libc::time_t;
                    (*timeout).tv_nsec = (left % 1_000_000_000) as libc::c_long;
                }
                if left == 0 {
                    break;
                }
            }
        }
        return match err {
            Some(e) if got == 0 => ret_int(Err(e)),
            _ => got as c_int,
        };
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real!(recvmmsg: unsafe extern "C" fn(c_int, *mut libc::mmsghdr, libc::c_uint, c_int, *mut libc::timespec) -> c_int)(
            fd, msgs, vlen, flags, timeout,
        )
    }
}

/// splice(2) with a vSocket connection on one side: the bytes go through
/// a buffer here (see `splice.rs`).
#[no_mangle]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut libc::loff_t,
    fd_out: c_int,
    off_out: *mut libc::loff_t,
    len: size_t,
    flags: libc::c_uint,
) -> ssize_t {
    let (from, to) = (conn_of(fd_in), conn_of(fd_out));
    if from.is_none() && to.is_none() {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe {
            real!(splice: unsafe extern "C" fn(c_int, *mut libc::loff_t, c_int, *mut libc::loff_t, size_t, libc::c_uint) -> ssize_t)(
                fd_in, off_in, fd_out, off_out, len, flags,
            )
        };
    }
    if len == 0 {
        return 0;
    }
    let r = match (&from, &to) {
        (Some(conn), _) => crate::splice::check(fd_out, to.is_some(), !off_in.is_null(), !off_out.is_null(), flags)
            .and_then(|()| with_conn(conn, |c| crate::splice::conn_to_pipe(c, fd_out, len, flags))),
        (None, Some(conn)) => crate::splice::check(fd_in, false, !off_out.is_null(), !off_in.is_null(), flags)
            .and_then(|()| with_conn(conn, |c| crate::splice::pipe_to_conn(fd_in, c, len, flags))),
        (None, None) => Err(Errno(libc::EBADF)),
    };
    ret(r)
}

/// sendfile(2) into a vSocket connection: the file's bytes are read here and
/// written to the ring (the kernel cannot splice into shared memory).
fn sendfile_to(conn: &Connection, in_fd: RawFd, offset: *mut libc::off_t, count: usize) -> SysResult<usize> {
    let mut buf = vec![0u8; count.min(1 << 16)];
    let mut total = 0usize;
    // SAFETY: a non-NULL offset points to the caller's off_t.
    let mut pos = unsafe { offset.as_ref().copied() };
    while total < count {
        let want = (count - total).min(buf.len());
        let got = match pos {
            // SAFETY: pread into our own buffer of `want` bytes.
            Some(p) => unsafe { libc::pread(in_fd, buf.as_mut_ptr() as *mut c_void, want, p) },
            // SAFETY: the real read (the input is not a vSocket) into our buffer.
            None => unsafe {
                real!(read: unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t)(
                    in_fd,
                    buf.as_mut_ptr() as *mut c_void,
                    want,
                )
            },
        };
        if got < 0 {
            if total > 0 {
                break;
            }
            return Err(sys::last_errno());
        }
        if got == 0 {
            break;
        }
        let got = got as usize;
        let sent = match conn.send(&[&buf[..got]], 0) {
            Ok(n) => n,
            Err(e) if total == 0 => return Err(e),
            Err(_) => 0,
        };
        total += sent;
        if let Some(p) = pos.as_mut() {
            *p += sent as libc::off_t;
        } else if sent < got {
            // Give back what the connection did not take.
            // SAFETY: lseek on the caller's file descriptor.
            unsafe { libc::lseek(in_fd, sent as libc::off_t - got as libc::off_t, libc::SEEK_CUR) };
        }
        if sent < got {
            break;
        }
    }
    if let (Some(p), false) = (pos, offset.is_null()) {
        // SAFETY: non-NULL offset, as above.
        unsafe { *offset = p };
    }
    Ok(total)
}

#[no_mangle]
pub unsafe extern "C" fn sendfile(out_fd: c_int, in_fd: c_int, offset: *mut libc::off_t, count: size_t) -> ssize_t {
    if let Some(e) = conn_of(out_fd) {
        return ret(with_conn(&e, |c| sendfile_to(c, in_fd, offset, count)));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real!(sendfile: unsafe extern "C" fn(c_int, c_int, *mut libc::off_t, size_t) -> ssize_t)(
            out_fd, in_fd, offset, count,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn sendfile64(out_fd: c_int, in_fd: c_int, offset: *mut libc::off_t, count: size_t) -> ssize_t {
    // SAFETY: on 64-bit Linux sendfile64 and sendfile are the same call.
    unsafe { sendfile(out_fd, in_fd, offset, count) }
}

// ---- connection set-up --------------------------------------------------

/// Ports the kernel would retry a dropped SYN for before ETIMEDOUT
/// (tcp_syn_retries = 6: about 127 s).
const SYN_TIMEOUT_MS: i64 = 127_000;

/// Tries to connect over vSocket. `None`: use the kernel.
fn vsocket_connect(fd: RawFd, remote: SocketAddrV4, family: Family) -> Option<SysResult<()>> {
    if !control::enabled() || remote.ip().is_unspecified() {
        return None;
    }
    if tcp_family(fd)? != family {
        return None;
    }
    // A real local port, from the kernel, so getsockname tells the truth and
    // two connections never share one.
    // Binding first costs one call less than asking first; EINVAL means the
    // program bound the socket itself.
    let (any, len) = addr::render(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), family);
    match sys::bind(fd, &any[..len]) {
        Ok(()) | Err(Errno(libc::EINVAL)) => {}
        Err(e) => return Some(Err(e)),
    }
    let local = local_v4(fd)?;
    let nonblocking = sys::fcntl(fd, libc::F_GETFL, 0).ok()? as c_int & libc::O_NONBLOCK != 0;
    // The daemon unreachable: the kernel path still works.
    let mut reply = control::request(&Message::Connect { local, remote }).ok()?;
    match reply.message {
        Message::Connected(info) => {
            let fds = crate::conn::ConnectionFds::take(&mut reply);
            crate::fork::watch();
            let conn = match Connection::new(info, Endpoint::Client, family, fds, nonblocking) {
                Ok(c) => c,
                Err(e) => return Some(Err(e)),
            };
            // Timeouts set before connect apply to the connection.
            for (receive, name) in [(true, libc::SO_RCVTIMEO), (false, libc::SO_SNDTIMEO)] {
                if let Ok(ms) = sys::getsockopt_timeout_ms(fd, name) {
                    conn.set_timeout(receive, ms);
                }
            }
            note_linger(fd, &conn);
            table::adopt(fd, Entry::Conn(conn));
            Some(if nonblocking { Err(Errno(libc::EINPROGRESS)) } else { Ok(()) })
        }
        Message::Fallback => None,
        Message::Refused { errno } => Some(Err(Errno(errno))),
        Message::Dropped => {
            let deadline_ms = sys::now_ms() + SYN_TIMEOUT_MS;
            table::adopt(fd, Entry::Dropped(Dropped { deadline_ms }));
            if nonblocking {
                return Some(Err(Errno(libc::EINPROGRESS)));
            }
            // Wait as a blocked connect would, interruptible by signals.
            loop {
                let left = deadline_ms - sys::now_ms();
                if left <= 0 {
                    return Some(Err(Errno(libc::ETIMEDOUT)));
                }
                if let Err(Errno(libc::EINTR)) = sys::poll(&mut [], left.min(i32::MAX as i64) as i32) {
                    return Some(Err(Errno(libc::EINTR)));
                }
            }
        }
        _ => Some(Err(Errno(libc::EPROTO))),
    }
}

#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    match table::get(fd).as_deref() {
        Some(Entry::Conn(_)) => return ret_int(Err(Errno(libc::EISCONN))),
        Some(Entry::Dropped(_)) => return ret_int(Err(Errno(libc::EALREADY))),
        _ => {}
    }
    if let Some((remote, family)) = read_sockaddr(addr, len) {
        if let Some(r) = vsocket_connect(fd, remote, family) {
            return ret_int(r);
        }
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(connect: unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int)(fd, addr, len) }
}

#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: forwarding the caller's arguments unchanged.
    let r = unsafe { real!(listen: unsafe extern "C" fn(c_int, c_int) -> c_int)(fd, backlog) };
    if r != 0 || !control::enabled() || table::get(fd).is_some() {
        return r;
    }
    // IPv4 listeners, and IPv6 ones that take IPv4 clients (bound to `::`
    // or to a mapped address), also take vSocket connections.
    let Some(family) = tcp_family(fd) else {
        return r;
    };
    let Some(local) = local_v4(fd) else {
        return r;
    };
    // If the daemon will not take the listener, it stays a kernel listener.
    if let Ok(listener) = Listener::register(local, family, backlog) {
        table::adopt(fd, Entry::Listener(listener));
    }
    r
}

fn accept_listener(
    fd: RawFd,
    l: &Listener,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
    flags: c_int,
) -> SysResult<RawFd> {
    let real_accept4 = real!(accept4: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int);
    let blocking = sys::fcntl(fd, libc::F_GETFL, 0)? as c_int & libc::O_NONBLOCK == 0;
    loop {
        crate::fork::watch();
        if let Some(accepted) = l.take_pending(fd, flags)? {
            table::set(accepted.fd, Arc::new(Entry::Conn(accepted.conn)));
            write_sockaddr(accepted.peer, l.family, addr, alen)?;
            return Ok(accepted.fd);
        }
        if !blocking {
            // SAFETY: the caller's address buffer is forwarded unchanged.
            let r = unsafe { real_accept4(fd, addr, alen, flags) };
            return if r < 0 { Err(sys::last_errno()) } else { Ok(r) };
        }
        let mut pfds = [
            libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: l.channel, events: libc::POLLIN, revents: 0 },
        ];
        let watched = if l.attached() { 2 } else { 1 };
        // Connections tend to come in bursts: look again for a while
        // before sleeping.
        if let Some(_sleeping) = l.spinner.spin(|| sys::poll(&mut pfds[..watched], 0).is_ok_and(|n| n > 0)) {
            loop {
                signals::before_sleep();
                match sys::poll(&mut pfds[..watched], -1) {
                    // A handler with SA_RESTART ran: accept goes on waiting.
                    Err(Errno(libc::EINTR)) if signals::restart_after_interrupt(false) => continue,
                    r => {
                        r?;
                        break;
                    }
                };
            }
        }
        if pfds[1].revents != 0 {
            continue;
        }
        if pfds[0].revents != 0 {
            // SAFETY: the caller's address buffer is forwarded unchanged.
            let r = unsafe { real_accept4(fd, addr, alen, flags) };
            return if r < 0 { Err(sys::last_errno()) } else { Ok(r) };
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn accept4(fd: c_int, addr: *mut sockaddr, alen: *mut socklen_t, flags: c_int) -> c_int {
    if let Some(e) = table::get(fd) {
        if let Entry::Listener(l) = &*e {
            return ret(accept_listener(fd, l, addr, alen, flags).map(|fd| fd as usize)) as c_int;
        }
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real!(accept4: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t, c_int) -> c_int)(
            fd, addr, alen, flags,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, alen: *mut socklen_t) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { accept4(fd, addr, alen, 0) }
}

// ---- descriptors ----------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    table::release(fd);
    // SAFETY: forwarding the caller's argument unchanged.
    unsafe { real!(close: unsafe extern "C" fn(c_int) -> c_int)(fd) }
}

#[no_mangle]
pub unsafe extern "C" fn close_range(first: libc::c_uint, last: libc::c_uint, flags: c_int) -> c_int {
    // CLOSE_RANGE_CLOEXEC only marks descriptors; otherwise the managed ones
    // in the range are closed as close() would.
    if flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
        let mut managed = Vec::new();
        let last = last.min(RawFd::MAX as libc::c_uint) as RawFd;
        table::managed_in(first.min(RawFd::MAX as libc::c_uint) as RawFd, last, |fd, _| managed.push(fd));
        for fd in managed {
            table::release(fd);
        }
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(close_range: unsafe extern "C" fn(libc::c_uint, libc::c_uint, c_int) -> c_int)(first, last, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn dup(oldfd: c_int) -> c_int {
    // SAFETY: forwarding the caller's argument unchanged.
    let r = unsafe { real!(dup: unsafe extern "C" fn(c_int) -> c_int)(oldfd) };
    if r >= 0 {
        table::share(oldfd, r);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn dup2(oldfd: c_int, newfd: c_int) -> c_int {
    if oldfd != newfd {
        table::release(newfd);
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    let r = unsafe { real!(dup2: unsafe extern "C" fn(c_int, c_int) -> c_int)(oldfd, newfd) };
    if r >= 0 && oldfd != newfd {
        table::share(oldfd, r);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn dup3(oldfd: c_int, newfd: c_int, flags: c_int) -> c_int {
    if oldfd != newfd {
        table::release(newfd);
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    let r = unsafe { real!(dup3: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int)(oldfd, newfd, flags) };
    if r >= 0 {
        table::share(oldfd, r);
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    if let Some(e) = conn_of(fd) {
        return ret_int(with_conn(&e, |c| c.shutdown(how)));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(shutdown: unsafe extern "C" fn(c_int, c_int) -> c_int)(fd, how) }
}

#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, addr: *mut sockaddr, alen: *mut socklen_t) -> c_int {
    if let Some(e) = table::get(fd) {
        if let Entry::Conn(c) = &*e {
            return ret_int(write_sockaddr(c.local(), c.family, addr, alen));
        }
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(getsockname: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int)(fd, addr, alen) }
}

#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, addr: *mut sockaddr, alen: *mut socklen_t) -> c_int {
    if let Some(e) = conn_of(fd) {
        return ret_int(with_conn(&e, |c| write_sockaddr(c.peer(), c.family, addr, alen)));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(getpeername: unsafe extern "C" fn(c_int, *mut sockaddr, *mut socklen_t) -> c_int)(fd, addr, alen) }
}

#[no_mangle]
pub unsafe extern "C" fn getsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *mut c_void,
    len: *mut socklen_t,
) -> c_int {
    if level == libc::SOL_SOCKET && name == libc::SO_ERROR {
        if let Some(e) = conn_of(fd) {
            let err = match &*e {
                Entry::Conn(c) => c.take_error(),
                Entry::Dropped(d) if sys::now_ms() >= d.deadline_ms => libc::ETIMEDOUT,
                _ => 0,
            };
            if val.is_null() || len.is_null() {
                return ret_int(Err(Errno(libc::EFAULT)));
            }
            // SAFETY: the caller passes a buffer of *len bytes; we write at most 4.
            unsafe {
                let bytes = err.to_ne_bytes();
                let n = (*len as usize).min(bytes.len());
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), val as *mut u8, n);
                *len = n as socklen_t;
            }
            return 0;
        }
    }
    // Everything else is what the program set on the kernel socket.
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real!(getsockopt: unsafe extern "C" fn(c_int, c_int, c_int, *mut c_void, *mut socklen_t) -> c_int)(
            fd, level, name, val, len,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int {
    // SAFETY: forwarding the caller's arguments unchanged; the kernel socket
    // keeps every option, so getsockopt reports them truthfully.
    let r = unsafe {
        real!(setsockopt: unsafe extern "C" fn(c_int, c_int, c_int, *const c_void, socklen_t) -> c_int)(
            fd, level, name, val, len,
        )
    };
    if r == 0 {
        if let Some(e) = table::get(fd) {
            if let Entry::Listener(l) = &*e {
                // Accepted sockets inherit the listener's options.
                l.options_changed();
            }
        }
    }
    if r == 0 && level == libc::SOL_SOCKET && (name == libc::SO_RCVTIMEO || name == libc::SO_SNDTIMEO) {
        if let Some(e) = table::get(fd) {
            if let Entry::Conn(c) = &*e {
                // The kernel accepted it, so it is a valid timeval; read the
                // normalised value back.
                if let Ok(ms) = sys::getsockopt_timeout_ms(fd, name) {
                    c.set_timeout(name == libc::SO_RCVTIMEO, ms);
                }
            }
        }
    }
    if r == 0 && level == libc::SOL_SOCKET && name == libc::SO_LINGER {
        if let Some(e) = table::get(fd) {
            if let Entry::Conn(c) = &*e {
                note_linger(fd, c);
            }
        }
    }
    r
}

/// Keeps the connection's close behaviour in step with SO_LINGER on the
/// kernel socket (read back, as the kernel normalised it).
fn note_linger(fd: RawFd, conn: &Connection) {
    if let Ok((on, seconds)) = sys::getsockopt_linger(fd) {
        conn.set_linger(on, seconds);
    }
}

fn note_flags(fd: RawFd, cmd: c_int, arg: c_ulong) {
    if cmd == libc::F_SETFL {
        if let Some(e) = table::get(fd) {
            if let Entry::Conn(c) = &*e {
                c.set_nonblocking(arg as c_int & libc::O_NONBLOCK != 0);
            }
        }
    }
}

/// fcntl is variadic in C; its one optional argument arrives in the same
/// register whether or not the caller passed it, so it is taken as a word
/// and passed on unchanged.
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    note_flags(fd, cmd, arg);
    // SAFETY: forwarding the caller's arguments unchanged.
    let r = unsafe { real!(fcntl: unsafe extern "C" fn(c_int, c_int, ...) -> c_int)(fd, cmd, arg) };
    note_dup(fd, cmd, r)
}

/// F_DUPFD and F_DUPFD_CLOEXEC make a new descriptor for the same socket.
fn note_dup(fd: RawFd, cmd: c_int, result: c_int) -> c_int {
    if result >= 0 && (cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC) {
        table::share(fd, result);
    }
    result
}

#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    note_flags(fd, cmd, arg);
    // SAFETY: forwarding the caller's arguments unchanged.
    let r = unsafe { real!(fcntl64: unsafe extern "C" fn(c_int, c_int, ...) -> c_int)(fd, cmd, arg) };
    note_dup(fd, cmd, r)
}

#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int {
    if let Some(e) = table::get(fd) {
        if let Entry::Conn(c) = &*e {
            if request == libc::FIONREAD {
                if arg.is_null() {
                    return ret_int(Err(Errno(libc::EFAULT)));
                }
                // SAFETY: FIONREAD's argument is a pointer to an int.
                unsafe { *(arg as *mut c_int) = c.readable_bytes().min(c_int::MAX as usize) as c_int };
                return 0;
            }
            if request == libc::FIONBIO && !arg.is_null() {
                // SAFETY: FIONBIO's argument is a pointer to an int.
                c.set_nonblocking(unsafe { *(arg as *const c_int) } != 0);
            }
        }
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe { real!(ioctl: unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int)(fd, request, arg) }
}

// ---- readiness ------------------------------------------------------------

fn timespec_ms(ts: *const libc::timespec) -> i32 {
    if ts.is_null() {
        return -1;
    }
    // SAFETY: the caller passes a valid timespec.
    let ts = unsafe { *ts };
    let ms = ts.tv_sec * 1000 + (ts.tv_nsec + 999_999) / 1_000_000;
    ms.clamp(0, i32::MAX as i64) as i32
}

#[no_mangle]
pub unsafe extern "C" fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int {
    if fds.is_null() || nfds == 0 {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe {
            real!(poll: unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, c_int) -> c_int)(fds, nfds, timeout)
        };
    }
    // SAFETY: the caller passes `nfds` valid pollfds.
    let slice = unsafe { std::slice::from_raw_parts_mut(fds, nfds as usize) };
    ret(poll::poll(slice, timeout, std::ptr::null())) as c_int
}

#[no_mangle]
pub unsafe extern "C" fn __poll_chk(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    timeout: c_int,
    fdslen: size_t,
) -> c_int {
    if (fdslen / std::mem::size_of::<libc::pollfd>()) < nfds as usize {
        // SAFETY: as glibc does on a detected overflow.
        unsafe { libc::abort() };
    }
    // SAFETY: forwarded contract.
    unsafe { poll(fds, nfds, timeout) }
}

#[no_mangle]
pub unsafe extern "C" fn ppoll(
    fds: *mut libc::pollfd,
    nfds: libc::nfds_t,
    ts: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    if fds.is_null() || nfds == 0 {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe {
            real!(ppoll: unsafe extern "C" fn(*mut libc::pollfd, libc::nfds_t, *const libc::timespec, *const libc::sigset_t) -> c_int)(
                fds, nfds, ts, sigmask,
            )
        };
    }
    // SAFETY: the caller passes `nfds` valid pollfds.
    let slice = unsafe { std::slice::from_raw_parts_mut(fds, nfds as usize) };
    ret(poll::poll(slice, timespec_ms(ts), sigmask)) as c_int
}

/// # Safety
/// The set pointers are NULL or valid fd_sets.
unsafe fn sets<'a>(
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
) -> [Option<&'a mut libc::fd_set>; 3] {
    // SAFETY: per this function's contract.
    unsafe { [r.as_mut(), w.as_mut(), e.as_mut()] }
}

#[no_mangle]
pub unsafe extern "C" fn select(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    tv: *mut libc::timeval,
) -> c_int {
    // SAFETY: the caller passes NULL or valid fd_sets.
    let s = unsafe { sets(r, w, e) };
    if !poll::select_touches_managed(nfds, &s) {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe {
            real!(select: unsafe extern "C" fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *mut libc::timeval) -> c_int)(
                nfds, r, w, e, tv,
            )
        };
    }
    let timeout = if tv.is_null() {
        -1
    } else {
        // SAFETY: the caller passes a valid timeval.
        let t = unsafe { *tv };
        (t.tv_sec * 1000 + (t.tv_usec + 999) / 1000).clamp(0, i32::MAX as i64) as i32
    };
    ret(poll::select(nfds, s, timeout, std::ptr::null())) as c_int
}

#[no_mangle]
pub unsafe extern "C" fn pselect(
    nfds: c_int,
    r: *mut libc::fd_set,
    w: *mut libc::fd_set,
    e: *mut libc::fd_set,
    ts: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: the caller passes NULL or valid fd_sets.
    let s = unsafe { sets(r, w, e) };
    if !poll::select_touches_managed(nfds, &s) {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe {
            real!(pselect: unsafe extern "C" fn(c_int, *mut libc::fd_set, *mut libc::fd_set, *mut libc::fd_set, *const libc::timespec, *const libc::sigset_t) -> c_int)(
                nfds, r, w, e, ts, sigmask,
            )
        };
    }
    ret(poll::select(nfds, s, timespec_ms(ts), sigmask)) as c_int
}

#[no_mangle]
pub unsafe extern "C" fn epoll_create(size: c_int) -> c_int {
    // SAFETY: forwarding the caller's argument unchanged.
    let fd = unsafe { real!(epoll_create: unsafe extern "C" fn(c_int) -> c_int)(size) };
    if fd >= 0 && control::enabled() {
        table::track_epoll(fd);
    }
    fd
}

#[no_mangle]
pub unsafe extern "C" fn epoll_create1(flags: c_int) -> c_int {
    // SAFETY: forwarding the caller's argument unchanged.
    let fd = unsafe { real!(epoll_create1: unsafe extern "C" fn(c_int) -> c_int)(flags) };
    if fd >= 0 && control::enabled() {
        table::track_epoll(fd);
    }
    fd
}

#[no_mangle]
pub unsafe extern "C" fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, event: *mut libc::epoll_event) -> c_int {
    if let Some(e) = table::get(epfd) {
        if let Entry::Epoll(set) = &*e {
            if op != libc::EPOLL_CTL_DEL && event.is_null() {
                return ret_int(Err(Errno(libc::EFAULT)));
            }
            // SAFETY: non-NULL events point to a valid epoll_event.
            let ev = unsafe { event.as_ref().copied() };
            return ret_int(set.ctl(op, fd, ev));
        }
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real!(epoll_ctl: unsafe extern "C" fn(c_int, c_int, c_int, *mut libc::epoll_event) -> c_int)(
            epfd, op, fd, event,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn epoll_pwait(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: c_int,
    sigmask: *const libc::sigset_t,
) -> c_int {
    if let Some(e) = table::get(epfd) {
        if let Entry::Epoll(set) = &*e {
            if events.is_null() || max <= 0 {
                return ret_int(Err(Errno(libc::EINVAL)));
            }
            // SAFETY: the caller passes room for `max` events.
            let out = unsafe { std::slice::from_raw_parts_mut(events, max as usize) };
            return ret(set.wait(out, timeout, sigmask)) as c_int;
        }
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    unsafe {
        real!(epoll_pwait: unsafe extern "C" fn(c_int, *mut libc::epoll_event, c_int, c_int, *const libc::sigset_t) -> c_int)(
            epfd, events, max, timeout, sigmask,
        )
    }
}

#[no_mangle]
pub unsafe extern "C" fn epoll_pwait2(
    epfd: c_int,
    events: *mut libc::epoll_event,
    max: c_int,
    timeout: *const libc::timespec,
    sigmask: *const libc::sigset_t,
) -> c_int {
    // SAFETY: forwarded contract; the timeout is converted to milliseconds,
    // rounded up, as epoll_pwait takes it.
    unsafe { epoll_pwait(epfd, events, max, timespec_ms(timeout), sigmask) }
}

#[no_mangle]
pub unsafe extern "C" fn epoll_wait(epfd: c_int, events: *mut libc::epoll_event, max: c_int, timeout: c_int) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { epoll_pwait(epfd, events, max, timeout, std::ptr::null()) }
}

// ---- signals ----------------------------------------------------------------

/// Stands in for the program's signal handlers (see `signals`): notes the
/// delivery for the interrupted thread, then runs the program's handler.
extern "C" fn trampoline(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let Some((handler, flags)) = signals::program_action(sig) else {
        return;
    };
    signals::delivered(sig, flags);
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the program installed `handler` as an `sa_sigaction`
        // (SA_SIGINFO), and the kernel passed us that handler's arguments.
        let f =
            unsafe { std::mem::transmute::<usize, extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void)>(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: the program installed `handler` as an `sa_handler`.
        let f = unsafe { std::mem::transmute::<usize, extern "C" fn(c_int)>(handler) };
        f(sig);
    }
}

#[no_mangle]
pub unsafe extern "C" fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int {
    let real = real!(sigaction: unsafe extern "C" fn(c_int, *const libc::sigaction, *mut libc::sigaction) -> c_int);
    if !control::enabled() || sig <= 0 || sig as usize >= signals::NSIG {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe { real(sig, act, old) };
    }
    let before = signals::program_action(sig);
    // SAFETY: struct sigaction is plain data.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    let r = if act.is_null() {
        // SAFETY: a query; `previous` is a valid out-pointer.
        unsafe { real(sig, std::ptr::null(), &mut previous) }
    } else {
        // SAFETY: the caller passes a valid struct sigaction.
        let mut ours = unsafe { std::ptr::read(act) };
        if ours.sa_sigaction == libc::SIG_DFL || ours.sa_sigaction == libc::SIG_IGN {
            signals::uninstall(sig);
        } else {
            signals::install(sig, ours.sa_sigaction, ours.sa_flags);
            ours.sa_sigaction = trampoline as *const () as usize;
            ours.sa_flags |= libc::SA_SIGINFO;
        }
        // SAFETY: a valid action and out-pointer.
        let r = unsafe { real(sig, &ours, &mut previous) };
        if r != 0 {
            match before {
                Some((handler, flags)) => signals::install(sig, handler, flags),
                None => signals::uninstall(sig),
            }
        }
        r
    };
    if r == 0 && !old.is_null() {
        // The program sees its own handler, never the trampoline.
        if previous.sa_sigaction == trampoline as *const () as usize {
            if let Some((handler, flags)) = before {
                previous.sa_sigaction = handler;
                previous.sa_flags = flags;
            }
        }
        // SAFETY: the caller's out-pointer is valid for a struct sigaction.
        unsafe { std::ptr::write(old, previous) };
    }
    r
}

/// `signal`-style installation through `sigaction`, with `flags`.
fn install_handler(sig: c_int, handler: libc::sighandler_t, flags: c_int) -> libc::sighandler_t {
    // SAFETY: struct sigaction and sigset_t are plain data; sigemptyset and
    // sigaddset write only into `act.sa_mask`.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler;
        act.sa_flags = flags;
        libc::sigemptyset(&mut act.sa_mask);
        if flags & libc::SA_NODEFER == 0 {
            libc::sigaddset(&mut act.sa_mask, sig);
        }
        let mut old: libc::sigaction = std::mem::zeroed();
        if sigaction(sig, &act, &mut old) < 0 {
            return libc::SIG_ERR;
        }
        old.sa_sigaction
    }
}

/// BSD semantics, as glibc's `signal`: the handler stays, calls restart.
#[no_mangle]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if !control::enabled() {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe {
            real!(signal: unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t)(sig, handler)
        };
    }
    install_handler(sig, handler, libc::SA_RESTART)
}

#[no_mangle]
pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: same contract as `signal`.
    unsafe { signal(sig, handler) }
}

/// System V semantics: one-shot, not blocked while it runs, no restart.
#[no_mangle]
pub unsafe extern "C" fn sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if !control::enabled() {
        // SAFETY: forwarding the caller's arguments unchanged.
        return unsafe {
            real!(sysv_signal: unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t)(sig, handler)
        };
    }
    install_handler(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER)
}
