//! The C ABI: the functions `libvsocket.so` exports in place of libc's.
//!
//! Each hook is declared once, with [`hook!`]: the macro makes the exported
//! function and `forward`, a call of the next definition of the same
//! symbol (libc's, resolved once with `dlsym(RTLD_NEXT)`) with the hook's
//! own arguments, unchanged. A hook looks the descriptor up in the side
//! table; a descriptor the library does not manage is forwarded. Managed
//! ones are served by the safe modules. This is the only place that turns
//! C pointers into Rust references and slices; no panic unwinds out of it
//! (the crate aborts on panic).

use crate::accept::{self, Client};
use crate::addr::{self, Family};
use crate::conn::{Blocking, Connection};
use crate::mmsg::{self, Deadline, Sent};
use crate::splice::{self, Offsets, OtherSide};
use crate::sys::{self, Errno, SysResult};
use crate::table::{self, Entry};
use crate::{attach, connect, fresh, poll, sendfile, signals, socket};
use libc::{c_int, c_ulong, c_void, size_t, sockaddr, socklen_t, ssize_t};
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Declares a hook: the exported C function, whose body may call
/// `$forward()` to run the next definition of the symbol with the hook's
/// own arguments. `as TYPE` gives that definition's C type where it is not
/// the hook's own (a variadic function); `|$forward, unsafe $next|` also
/// hands the body the next definition itself, for the one hook that
/// calls it with other arguments.
macro_rules! hook {
    (
        $(#[$meta:meta])*
        fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $(as $real:ty)?;
        |$forward:ident $(, unsafe $next:ident)?| $body:block
    ) => {
        $(#[$meta])*
        #[no_mangle]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            let next = || {
                static ADDR: AtomicUsize = AtomicUsize::new(0);
                let addr = resolve(concat!(stringify!($name), "\0").as_bytes(), &ADDR);
                // SAFETY: `addr` is the next definition of the C function
                // this hook stands in for (dlsym found it under the same
                // name), whose type is the hook's own or the one it names.
                unsafe { std::mem::transmute::<usize, next_type!($($real)?; unsafe extern "C" fn($($ty),*) -> $ret)>(addr) }
            };
            #[allow(unused_variables)]
            let $forward = move || -> $ret {
                // SAFETY: the function the program meant to call, its arguments
                // unchanged: what the caller promised of them (valid pointers,
                // sizes), it promised to that function.
                unsafe { next()($($arg),*) }
            };
            $(let $next = next();)?
            $body
        }
    };
}

/// The C type of a hook's next definition: the one named, else the hook's.
macro_rules! next_type {
    ($real:ty; $own:ty) => {
        $real
    };
    (; $own:ty) => {
        $own
    };
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

fn ret_fd(r: SysResult<RawFd>) -> c_int {
    ret(r.map(|fd| fd as usize)) as c_int
}

/// A connection, or a connect that policy dropped: the calls of a
/// connected socket answer for it.
fn conn_of(fd: RawFd) -> Option<Arc<Entry>> {
    table::get(fd).filter(|e| e.is_connection())
}

fn with_conn<R>(entry: &Entry, f: impl FnOnce(&Connection) -> SysResult<R>) -> SysResult<R> {
    match entry.connection() {
        Some(c) => f(c),
        None => Err(Errno(libc::ENOTCONN)),
    }
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

/// Vectored calls with up to this many buffers keep their slices on the
/// stack; more (up to IOV_MAX, 1024) take one allocation.
const INLINE_IOVECS: usize = 64;

/// Runs `f` with the caller's iovecs, each made a `T` by `make`: on the
/// stack for up to [`INLINE_IOVECS`], so that a vectored call allocates
/// nothing. EINVAL for a count outside 0..=IOV_MAX.
///
/// # Safety
/// `iov` must point to `cnt` valid iovecs (when `cnt` > 0).
unsafe fn with_iovecs<T: Default, R>(
    iov: *const libc::iovec,
    cnt: c_int,
    make: impl Fn(&libc::iovec) -> T,
    f: impl FnOnce(&mut [T]) -> SysResult<R>,
) -> SysResult<R> {
    if !(0..=libc::UIO_MAXIOV).contains(&cnt) {
        return Err(Errno(libc::EINVAL));
    }
    let iovs = if cnt == 0 || iov.is_null() {
        &[]
    } else {
        // SAFETY: per this function's contract.
        unsafe { std::slice::from_raw_parts(iov, cnt as usize) }
    };
    if iovs.len() <= INLINE_IOVECS {
        let mut inline: [T; INLINE_IOVECS] = std::array::from_fn(|_| T::default());
        for (slot, v) in inline.iter_mut().zip(iovs) {
            *slot = make(v);
        }
        f(&mut inline[..iovs.len()])
    } else {
        let mut heap: Vec<T> = iovs.iter().map(make).collect();
        f(&mut heap)
    }
}

/// The caller's iovecs as buffers to fill.
///
/// # Safety
/// `iov` must point to `cnt` valid iovecs whose buffers are valid for
/// writes for the duration of the call.
unsafe fn with_read_buffers<R>(
    iov: *const libc::iovec,
    cnt: c_int,
    f: impl FnOnce(&mut [&mut [u8]]) -> SysResult<R>,
) -> SysResult<R> {
    // SAFETY: per this function's contract; each iovec describes a buffer
    // valid for writes for the call.
    unsafe { with_iovecs(iov, cnt, |v| slice_mut(v.iov_base, v.iov_len), f) }
}

/// The caller's iovecs as buffers to send.
///
/// # Safety
/// `iov` must point to `cnt` valid iovecs whose buffers are valid for the
/// duration of the call.
unsafe fn with_write_buffers<R>(
    iov: *const libc::iovec,
    cnt: c_int,
    f: impl FnOnce(&[&[u8]]) -> SysResult<R>,
) -> SysResult<R> {
    // SAFETY: per this function's contract; each iovec describes a buffer
    // valid for the call.
    unsafe { with_iovecs(iov, cnt, |v| slice(v.iov_base, v.iov_len), |b| f(b)) }
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

/// The C result of a kernel call made by `forward`, as a `SysResult`.
fn kernel_fd(r: c_int) -> SysResult<RawFd> {
    if r < 0 {
        Err(sys::last_errno())
    } else {
        Ok(r)
    }
}

// ---- reading and writing ------------------------------------------------

hook! {
    fn read(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: the caller passes a buffer valid for `count` bytes.
            let b = unsafe { slice_mut(buf, count) };
            return ret(with_conn(&e, |c| c.recv(&mut [b], 0)));
        }
        forward()
    }
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

hook! {
    fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: the caller passes a buffer valid for `count` bytes.
            let b = unsafe { slice(buf, count) };
            return ret(with_conn(&e, |c| c.send(&[b], 0)));
        }
        forward()
    }
}

hook! {
    fn readv(fd: c_int, iov: *const libc::iovec, cnt: c_int) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: the caller passes `cnt` valid iovecs.
            return ret(unsafe { with_read_buffers(iov, cnt, |b| with_conn(&e, |c| c.recv(b, 0))) });
        }
        forward()
    }
}

hook! {
    fn writev(fd: c_int, iov: *const libc::iovec, cnt: c_int) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: the caller passes `cnt` valid iovecs.
            return ret(unsafe { with_write_buffers(iov, cnt, |b| with_conn(&e, |c| c.send(b, 0))) });
        }
        forward()
    }
}

hook! {
    fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: the caller passes a buffer valid for `len` bytes.
            let b = unsafe { slice_mut(buf, len) };
            return ret(with_conn(&e, |c| c.recv(&mut [b], flags)));
        }
        forward()
    }
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

hook! {
    fn send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: the caller passes a buffer valid for `len` bytes.
            let b = unsafe { slice(buf, len) };
            return ret(with_conn(&e, |c| c.send(&[b], flags)));
        }
        forward()
    }
}

hook! {
    fn recvfrom(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        flags: c_int,
        addr: *mut sockaddr,
        alen: *mut socklen_t,
    ) -> ssize_t;
    |forward| {
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
        forward()
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

hook! {
    fn sendto(
        fd: c_int,
        buf: *const c_void,
        len: size_t,
        flags: c_int,
        addr: *const sockaddr,
        alen: socklen_t,
    ) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: the caller passes a buffer valid for `len` bytes.
            let b = unsafe { slice(buf, len) };
            // A connected stream socket ignores the destination, as TCP does.
            return ret(with_conn(&e, |c| c.send(&[b], flags)));
        }
        forward()
    }
}

/// recvmsg on a managed descriptor.
///
/// # Safety
/// `msg` is NULL or points to a valid msghdr with valid iovecs.
unsafe fn recv_msg(entry: &Entry, msg: *mut libc::msghdr, flags: c_int) -> SysResult<usize> {
    // SAFETY: per this function's contract.
    let Some(m) = (unsafe { msg.as_mut() }) else {
        return Err(Errno(libc::EFAULT));
    };
    m.msg_namelen = 0;
    m.msg_controllen = 0;
    m.msg_flags = 0;
    // SAFETY: per this function's contract.
    unsafe { with_read_buffers(m.msg_iov, m.msg_iovlen as c_int, |b| with_conn(entry, |c| c.recv(b, flags))) }
}

/// sendmsg on a managed descriptor.
///
/// # Safety
/// `msg` is NULL or points to a valid msghdr with valid iovecs.
unsafe fn send_msg(entry: &Entry, msg: *const libc::msghdr, flags: c_int) -> SysResult<usize> {
    // SAFETY: per this function's contract.
    let Some(m) = (unsafe { msg.as_ref() }) else {
        return Err(Errno(libc::EFAULT));
    };
    // SAFETY: per this function's contract.
    unsafe { with_write_buffers(m.msg_iov, m.msg_iovlen as c_int, |b| with_conn(entry, |c| c.send(b, flags))) }
}

hook! {
    fn recvmsg(fd: c_int, msg: *mut libc::msghdr, flags: c_int) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: the caller passes a valid msghdr with valid iovecs.
            return ret(unsafe { recv_msg(&e, msg, flags) });
        }
        let r = forward();
        // Descriptors came in, at numbers a note may name (see `fresh`).
        // SAFETY: the kernel accepted `msg` as a valid msghdr and wrote its
        // control messages.
        if r >= 0 && unsafe { carries_descriptors(msg) } {
            fresh::forget_all();
        }
        r
    }
}

hook! {
    fn sendmsg(fd: c_int, msg: *const libc::msghdr, flags: c_int) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: the caller passes a valid msghdr with valid iovecs.
            return ret(unsafe { send_msg(&e, msg, flags) });
        }
        // Descriptors sent to another process may be changed there.
        // SAFETY: the caller passes a valid msghdr (or NULL).
        if unsafe { carries_descriptors(msg) } {
            fresh::forget_all();
        }
        forward()
    }
}

/// Does the message carry descriptors (`SCM_RIGHTS`)?
///
/// # Safety
/// `msg` must be NULL or point to a valid msghdr whose control buffer, if
/// any, holds `msg_controllen` bytes.
unsafe fn carries_descriptors(msg: *const libc::msghdr) -> bool {
    if msg.is_null() {
        return false;
    }
    // SAFETY: per this function's contract; CMSG_FIRSTHDR and CMSG_NXTHDR
    // stay inside `msg_control[..msg_controllen]` (NULL past its end).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                return true;
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    false
}

/// Does any of the first `n` messages carry descriptors?
///
/// # Safety
/// `msgs` must be NULL or point to at least `n` valid mmsghdrs (see
/// [`carries_descriptors`]).
unsafe fn any_carries_descriptors(msgs: *const libc::mmsghdr, n: usize) -> bool {
    // SAFETY: per this function's contract.
    !msgs.is_null() && (0..n).any(|i| unsafe { carries_descriptors(&(*msgs.add(i)).msg_hdr) })
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

hook! {
    /// sendmmsg on a stream socket: see `mmsg::send_each`.
    fn sendmmsg(fd: c_int, msgs: *mut libc::mmsghdr, vlen: libc::c_uint, flags: c_int) -> c_int;
    |forward| {
        if let Some(e) = conn_of(fd) {
            let vlen = vlen.min(libc::UIO_MAXIOV as libc::c_uint) as usize;
            if vlen > 0 && msgs.is_null() {
                return ret_int(Err(Errno(libc::EFAULT)));
            }
            let sent = mmsg::send_each(vlen, |i| {
                // SAFETY: the caller passes `vlen` valid mmsghdrs.
                let m = unsafe { &mut *msgs.add(i) };
                // SAFETY: a valid msghdr with valid iovecs, as above.
                let bytes = unsafe { send_msg(&e, &m.msg_hdr, flags) }?;
                m.msg_len = bytes as libc::c_uint;
                // SAFETY: as above.
                Ok(Sent { bytes, of: unsafe { msg_bytes(&m.msg_hdr) } })
            });
            return ret(sent) as c_int;
        }
        // (Descriptors sent to another process: see sendmsg.)
        // SAFETY: the caller passes `vlen` valid mmsghdrs (or NULL).
        if unsafe { any_carries_descriptors(msgs, vlen as usize) } {
            fresh::forget_all();
        }
        forward()
    }
}

hook! {
    /// recvmmsg on a stream socket: see `mmsg::recv_each`.
    fn recvmmsg(
        fd: c_int,
        msgs: *mut libc::mmsghdr,
        vlen: libc::c_uint,
        flags: c_int,
        timeout: *mut libc::timespec,
    ) -> c_int;
    |forward| {
        if let Some(e) = conn_of(fd) {
            // SAFETY: a non-NULL timeout points to the caller's timespec.
            let deadline = match unsafe { timeout.as_ref() }.copied().map(Deadline::after).transpose() {
                Ok(d) => d,
                Err(e) => return ret_int(Err(e)),
            };
            let vlen = vlen.min(libc::UIO_MAXIOV as libc::c_uint) as usize;
            if vlen > 0 && msgs.is_null() {
                return ret_int(Err(Errno(libc::EFAULT)));
            }
            let got = mmsg::recv_each(
                vlen,
                flags,
                deadline,
                |i, flags| {
                    // SAFETY: the caller passes `vlen` valid mmsghdrs.
                    let m = unsafe { &mut *msgs.add(i) };
                    // SAFETY: a valid msghdr with valid iovecs, as above.
                    let bytes = unsafe { recv_msg(&e, &mut m.msg_hdr, flags) }?;
                    m.msg_len = bytes as libc::c_uint;
                    Ok(bytes)
                },
                // SAFETY: there is a deadline only for a non-NULL timeout.
                |left| unsafe { *timeout = left },
            );
            return ret(got) as c_int;
        }
        let r = forward();
        // (Descriptors came in: see recvmsg.)
        // SAFETY: the kernel filled the first `r` of the caller's mmsghdrs.
        if r > 0 && unsafe { any_carries_descriptors(msgs, r as usize) } {
            fresh::forget_all();
        }
        r
    }
}

hook! {
    /// splice(2) with a vSocket connection on one side: the bytes go
    /// through a buffer here (see `splice.rs`).
    fn splice(
        fd_in: c_int,
        off_in: *mut libc::loff_t,
        fd_out: c_int,
        off_out: *mut libc::loff_t,
        len: size_t,
        flags: libc::c_uint,
    ) -> ssize_t;
    |forward| {
        let (from, to) = (conn_of(fd_in), conn_of(fd_out));
        if from.is_none() && to.is_none() {
            return forward();
        }
        if len == 0 {
            return 0;
        }
        let r = match (&from, &to) {
            (Some(conn), _) => {
                let other = if to.is_some() { OtherSide::Connection } else { OtherSide::Descriptor(fd_out) };
                let offsets = Offsets { conn: !off_in.is_null(), other: !off_out.is_null() };
                splice::check(other, offsets, flags)
                    .and_then(|()| with_conn(conn, |c| splice::conn_to_pipe(c, fd_out, len, flags)))
            }
            (None, Some(conn)) => {
                let offsets = Offsets { conn: !off_out.is_null(), other: !off_in.is_null() };
                splice::check(OtherSide::Descriptor(fd_in), offsets, flags)
                    .and_then(|()| with_conn(conn, |c| splice::pipe_to_conn(fd_in, c, len, flags)))
            }
            (None, None) => Err(Errno(libc::EBADF)),
        };
        ret(r)
    }
}

hook! {
    /// sendfile(2) into a vSocket connection: see `sendfile`.
    fn sendfile(out_fd: c_int, in_fd: c_int, offset: *mut libc::off_t, count: size_t) -> ssize_t;
    |forward| {
        if let Some(e) = conn_of(out_fd) {
            // SAFETY: a non-NULL offset points to the caller's off_t.
            let offset = unsafe { offset.as_mut() };
            return ret(with_conn(&e, |c| sendfile::sendfile(c, in_fd, offset, count)));
        }
        forward()
    }
}

#[no_mangle]
pub unsafe extern "C" fn sendfile64(out_fd: c_int, in_fd: c_int, offset: *mut libc::off_t, count: size_t) -> ssize_t {
    // SAFETY: on 64-bit Linux sendfile64 and sendfile are the same call.
    unsafe { sendfile(out_fd, in_fd, offset, count) }
}

// ---- connection set-up --------------------------------------------------

hook! {
    fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int;
    |forward| {
        let epoch = fresh::epoch();
        let fd = forward();
        fresh::made(epoch, fd, domain, ty, protocol);
        fd
    }
}

hook! {
    fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int;
    |forward| {
        if let Some(e) = connect::already(fd) {
            return ret_int(Err(e));
        }
        if let Some((remote, family)) = read_sockaddr(addr, len) {
            if let Some(r) = connect::connect(fd, remote, family) {
                return ret_int(r);
            }
        }
        forward()
    }
}

hook! {
    fn listen(fd: c_int, backlog: c_int) -> c_int;
    |forward| {
        // A listening socket is not one to connect.
        fresh::forget(fd);
        let r = forward();
        if r == 0 {
            accept::listen(fd, backlog);
        }
        r
    }
}

hook! {
    fn accept4(fd: c_int, addr: *mut sockaddr, alen: *mut socklen_t, flags: c_int) -> c_int;
    |forward| {
        if let Some(e) = table::get(fd) {
            if let Entry::Listener(l) = &*e {
                let client = accept::accept(fd, l, flags, || kernel_fd(forward())).and_then(|client| match client {
                    Client::Vsocket { fd, peer } => write_sockaddr(peer, l.family, addr, alen).map(|()| fd),
                    Client::Kernel(fd) => Ok(fd),
                });
                if let Ok(fd) = client {
                    fresh::forget(fd);
                }
                return ret_fd(client);
            }
        }
        let fd = forward();
        fresh::forget(fd);
        fd
    }
}

#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, alen: *mut socklen_t) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { accept4(fd, addr, alen, 0) }
}

// ---- descriptors ----------------------------------------------------------

hook! {
    fn close(fd: c_int) -> c_int;
    |forward| {
        fresh::forget(fd);
        table::release(fd);
        forward()
    }
}

hook! {
    fn close_range(first: libc::c_uint, last: libc::c_uint, flags: c_int) -> c_int;
    |forward| {
        if !attach::enabled() {
            return forward();
        }
        // CLOSE_RANGE_CLOEXEC only marks descriptors; otherwise the managed
        // ones in the range are closed as close() would.
        if flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
            fresh::forget_all();
            let clamp = |fd: libc::c_uint| fd.min(RawFd::MAX as libc::c_uint) as RawFd;
            table::release_range(clamp(first), clamp(last));
        }
        ret_int(close_sparing_ours(first, last, flags as u32))
    }
}

hook! {
    /// glibc's closefrom closes through an internal close_range.
    fn closefrom(lowfd: c_int) -> ();
    |forward| {
        if !attach::enabled() || lowfd < 0 {
            return forward();
        }
        fresh::forget_all();
        table::release_range(lowfd, RawFd::MAX);
        if close_sparing_ours(lowfd as u32, u32::MAX, 0).is_err() {
            forward();
        }
    }
}

/// The most library descriptors a close_range spares.
const MAX_SPARED: usize = 4096;

/// Closes (or marks, per `flags`) `first..=last` but for the library's own
/// descriptors: a program that closes everything from 3 up (before exec,
/// or to daemonise) closes its own descriptors, and keeps the connections
/// it still names working. Allocates nothing (vfork children call it).
fn close_sparing_ours(first: u32, last: u32, flags: u32) -> SysResult<()> {
    let mut spared = [0u32; MAX_SPARED];
    let mut count = 0;
    let mut spare = |fd: RawFd| {
        let fd = fd as u32;
        if count < MAX_SPARED && (first..=last).contains(&fd) {
            spared[count] = fd;
            count += 1;
        }
    };
    // The parked doorbells first (at most 512): past MAX_SPARED the rest
    // close, and a parked one closed would leave the table a number
    // another file may take.
    crate::bells::each_fd(&mut spare);
    table::internal_fds(&mut spare);
    let spared = &mut spared[..count];
    spared.sort_unstable();
    let result = table::ranges_around(first, last, spared).try_for_each(|(from, to)| sys::close_range(from, to, flags));
    result
}

hook! {
    fn dup(oldfd: c_int) -> c_int;
    |forward| {
        fresh::forget(oldfd);
        let r = forward();
        fresh::forget(r);
        if r >= 0 {
            table::share(oldfd, r);
        }
        r
    }
}

hook! {
    fn dup2(oldfd: c_int, newfd: c_int) -> c_int;
    |forward| {
        fresh::forget(oldfd);
        if oldfd != newfd {
            table::release(newfd);
        }
        let r = forward();
        // (Another thread's socket may have taken the number meanwhile.)
        fresh::forget(newfd);
        if r >= 0 && oldfd != newfd {
            table::share(oldfd, r);
        }
        r
    }
}

hook! {
    fn dup3(oldfd: c_int, newfd: c_int, flags: c_int) -> c_int;
    |forward| {
        fresh::forget(oldfd);
        if oldfd != newfd {
            table::release(newfd);
        }
        let r = forward();
        fresh::forget(newfd);
        if r >= 0 {
            table::share(oldfd, r);
        }
        r
    }
}

hook! {
    fn shutdown(fd: c_int, how: c_int) -> c_int;
    |forward| {
        if let Some(e) = conn_of(fd) {
            return ret_int(with_conn(&e, |c| c.shutdown(how)));
        }
        forward()
    }
}

hook! {
    fn getsockname(fd: c_int, addr: *mut sockaddr, alen: *mut socklen_t) -> c_int;
    |forward| {
        if let Some(e) = table::get(fd) {
            if let Entry::Conn(c) = &*e {
                return ret_int(write_sockaddr(c.local(), c.family, addr, alen));
            }
        }
        forward()
    }
}

hook! {
    fn getpeername(fd: c_int, addr: *mut sockaddr, alen: *mut socklen_t) -> c_int;
    |forward| {
        if let Some(e) = conn_of(fd) {
            return ret_int(with_conn(&e, |c| write_sockaddr(c.peer(), c.family, addr, alen)));
        }
        forward()
    }
}

hook! {
    fn getsockopt(fd: c_int, level: c_int, name: c_int, val: *mut c_void, len: *mut socklen_t) -> c_int;
    |forward| {
        if level == libc::SOL_SOCKET && name == libc::SO_ERROR {
            if let Some(e) = conn_of(fd) {
                let err = e.take_error();
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
        forward()
    }
}

hook! {
    fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int;
    |forward| {
        // The kernel socket keeps every option, so getsockopt reports them
        // truthfully; the library follows the ones it acts on.
        let r = forward();
        if r == 0 {
            fresh::option_set(fd, level, name);
            socket::option_set(fd, level, name);
        }
        r
    }
}

hook! {
    /// fcntl is variadic in C; its one optional argument arrives in the
    /// same register whether or not the caller passed it, so it is taken
    /// as a word and passed on unchanged.
    fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int as unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    |forward| {
        let note = socket::before_fcntl(fd, cmd, arg);
        socket::after_fcntl(fd, cmd, arg, note, forward())
    }
}

hook! {
    fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int as unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    |forward| {
        let note = socket::before_fcntl(fd, cmd, arg);
        socket::after_fcntl(fd, cmd, arg, note, forward())
    }
}

hook! {
    fn ioctl(fd: c_int, request: c_ulong, arg: *mut c_void) -> c_int as unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int;
    |forward| {
        // FIONBIO: a fresh socket's note (see `fresh`) as it was before.
        let note = (request == libc::FIONBIO).then(|| fresh::mark(fd));
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
                    let on = unsafe { *(arg as *const c_int) } != 0;
                    c.set_blocking(if on { Blocking::NonBlocking } else { Blocking::Blocking });
                }
            }
        }
        let r = forward();
        if let Some(note) = note.filter(|_| r == 0) {
            // SAFETY: FIONBIO's argument is a pointer to an int, which the
            // kernel has just read (the call succeeded).
            let on = unsafe { *(arg as *const c_int) } != 0;
            fresh::blocking_set(fd, note, on);
        }
        r
    }
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

hook! {
    fn poll(fds: *mut libc::pollfd, nfds: libc::nfds_t, timeout: c_int) -> c_int;
    |forward| {
        if fds.is_null() || nfds == 0 {
            return forward();
        }
        // SAFETY: the caller passes `nfds` valid pollfds.
        let slice = unsafe { std::slice::from_raw_parts_mut(fds, nfds as usize) };
        ret(poll::poll(slice, timeout, std::ptr::null())) as c_int
    }
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

hook! {
    fn ppoll(
        fds: *mut libc::pollfd,
        nfds: libc::nfds_t,
        ts: *const libc::timespec,
        sigmask: *const libc::sigset_t,
    ) -> c_int;
    |forward| {
        if fds.is_null() || nfds == 0 {
            return forward();
        }
        // SAFETY: the caller passes `nfds` valid pollfds.
        let slice = unsafe { std::slice::from_raw_parts_mut(fds, nfds as usize) };
        ret(poll::poll(slice, timespec_ms(ts), sigmask)) as c_int
    }
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

hook! {
    fn select(
        nfds: c_int,
        r: *mut libc::fd_set,
        w: *mut libc::fd_set,
        e: *mut libc::fd_set,
        tv: *mut libc::timeval,
    ) -> c_int;
    |forward| {
        // SAFETY: the caller passes NULL or valid fd_sets.
        let s = unsafe { sets(r, w, e) };
        if !poll::select_touches_managed(nfds, &s) {
            return forward();
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
}

hook! {
    fn pselect(
        nfds: c_int,
        r: *mut libc::fd_set,
        w: *mut libc::fd_set,
        e: *mut libc::fd_set,
        ts: *const libc::timespec,
        sigmask: *const libc::sigset_t,
    ) -> c_int;
    |forward| {
        // SAFETY: the caller passes NULL or valid fd_sets.
        let s = unsafe { sets(r, w, e) };
        if !poll::select_touches_managed(nfds, &s) {
            return forward();
        }
        ret(poll::select(nfds, s, timespec_ms(ts), sigmask)) as c_int
    }
}

hook! {
    fn epoll_create(size: c_int) -> c_int;
    |forward| {
        let fd = forward();
        if fd >= 0 && attach::enabled() {
            table::track_epoll(fd);
        }
        fd
    }
}

hook! {
    fn epoll_create1(flags: c_int) -> c_int;
    |forward| {
        let fd = forward();
        if fd >= 0 && attach::enabled() {
            table::track_epoll(fd);
        }
        fd
    }
}

hook! {
    fn epoll_ctl(epfd: c_int, op: c_int, fd: c_int, event: *mut libc::epoll_event) -> c_int;
    |forward| {
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
        forward()
    }
}

hook! {
    fn epoll_pwait(
        epfd: c_int,
        events: *mut libc::epoll_event,
        max: c_int,
        timeout: c_int,
        sigmask: *const libc::sigset_t,
    ) -> c_int;
    |forward| {
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
        forward()
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

hook! {
    fn sigaction(sig: c_int, act: *const libc::sigaction, old: *mut libc::sigaction) -> c_int;
    |forward, unsafe real| {
        // A vfork child's dispositions are its own; the record of the
        // program's handlers is its parent's.
        if !attach::enabled() || sig <= 0 || sig as usize >= signals::NSIG || !sys::memory_is_ours() {
            return forward();
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

hook! {
    /// BSD semantics, as glibc's `signal`: the handler stays, calls restart.
    fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t;
    |forward| {
        if !attach::enabled() {
            return forward();
        }
        install_handler(sig, handler, libc::SA_RESTART)
    }
}

#[no_mangle]
pub unsafe extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    // SAFETY: same contract as `signal`.
    unsafe { signal(sig, handler) }
}

hook! {
    /// System V semantics: one-shot, not blocked while it runs, no restart.
    fn sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t;
    |forward| {
        if !attach::enabled() {
            return forward();
        }
        install_handler(sig, handler, libc::SA_RESETHAND | libc::SA_NODEFER)
    }
}

// exec: connections whose descriptors cross it keep working in the new
// image (see `exec`). Each hook runs the same exec with the environment
// `exec_carrying` gives it.

extern "C" {
    /// The process's environment (glibc's `environ`).
    static environ: *const *const libc::c_char;
}

/// The most environment entries an exec may have for connections to cross
/// it (the new list lives on the stack: vfork children run these hooks).
const MAX_ENV: usize = 4096;

/// Runs `exec` with the environment `envp`, plus the description of the
/// connections that cross it, if any do and the new image loads the
/// library. If the exec returns (it failed), the connections are as
/// before, and errno is the exec's.
///
/// # Safety
/// `envp` is NULL or a NULL-terminated array of NUL-terminated strings,
/// as exec requires.
unsafe fn exec_carrying(
    envp: *const *const libc::c_char,
    exec: impl FnOnce(*const *const libc::c_char) -> c_int,
) -> c_int {
    // Whatever image comes, it will not know them.
    crate::bells::before_exec();
    // The new program may change the sockets it inherits (and a vfork
    // child's notes are its parent's memory).
    fresh::forget_all();
    if !attach::enabled() || envp.is_null() {
        return exec(envp);
    }
    let mut count = 0;
    // SAFETY: `envp` is NULL-terminated (the caller's promise); reading
    // stops at its NULL or at MAX_ENV.
    while count < MAX_ENV && !unsafe { *envp.add(count) }.is_null() {
        count += 1;
    }
    // SAFETY: each of the first `count` entries is a NUL-terminated string.
    let entry = |i: usize| unsafe { std::ffi::CStr::from_ptr(*envp.add(i)) }.to_bytes();
    if count + 2 > MAX_ENV || !crate::exec::image_loads_library((0..count).map(entry)) {
        return exec(envp);
    }
    let Some(carry) = crate::exec::prepare() else {
        return exec(envp);
    };
    let mut list = [std::ptr::null::<libc::c_char>(); MAX_ENV];
    let mut n = 0;
    for i in (0..count).filter(|&i| !crate::exec::is_carry_entry(entry(i))) {
        // SAFETY: `i < count`, an entry of the caller's array.
        list[n] = unsafe { *envp.add(i) };
        n += 1;
    }
    list[n] = carry.entry().as_ptr() as *const libc::c_char;
    let r = exec(list.as_ptr());
    let errno = sys::last_errno();
    carry.undo();
    sys::set_errno(errno);
    r
}

/// An exec of libc's that takes a name, arguments and an environment.
type ExecWithEnvironment =
    unsafe extern "C" fn(*const libc::c_char, *const *const libc::c_char, *const *const libc::c_char) -> c_int;

/// libc's `name` (execve or execvpe, NUL-terminated): execv and execvp are
/// these with the process's environment.
fn libc_exec(name: &[u8], cache: &AtomicUsize) -> ExecWithEnvironment {
    let addr = resolve(name, cache);
    // SAFETY: dlsym found libc's definition of `name`, one of the two
    // execs whose C type this is.
    unsafe { std::mem::transmute::<usize, ExecWithEnvironment>(addr) }
}

/// The process's environment now.
fn environment() -> *const *const libc::c_char {
    // SAFETY: reads the pointer glibc keeps; exec reads the array it names,
    // as execv itself would.
    unsafe { environ }
}

hook! {
    fn execve(path: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int;
    |forward, unsafe next| {
        // SAFETY: `envp` is what the program gave exec; the same call runs.
        unsafe { exec_carrying(envp, |envp| next(path, argv, envp)) }
    }
}

hook! {
    fn execv(path: *const libc::c_char, argv: *const *const libc::c_char) -> c_int;
    |forward| {
        static EXECVE: AtomicUsize = AtomicUsize::new(0);
        let execve = libc_exec(b"execve\0", &EXECVE);
        // SAFETY: glibc's `environ` is NULL-terminated; the same exec runs.
        unsafe { exec_carrying(environment(), |envp| execve(path, argv, envp)) }
    }
}

hook! {
    fn execvpe(file: *const libc::c_char, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int;
    |forward, unsafe next| {
        // SAFETY: `envp` is what the program gave exec; the same call runs.
        unsafe { exec_carrying(envp, |envp| next(file, argv, envp)) }
    }
}

hook! {
    fn execvp(file: *const libc::c_char, argv: *const *const libc::c_char) -> c_int;
    |forward| {
        static EXECVPE: AtomicUsize = AtomicUsize::new(0);
        let execvpe = libc_exec(b"execvpe\0", &EXECVPE);
        // SAFETY: glibc's `environ` is NULL-terminated; the same exec runs.
        unsafe { exec_carrying(environment(), |envp| execvpe(file, argv, envp)) }
    }
}

hook! {
    fn fexecve(fd: c_int, argv: *const *const libc::c_char, envp: *const *const libc::c_char) -> c_int;
    |forward, unsafe next| {
        // SAFETY: `envp` is what the program gave exec; the same call runs.
        unsafe { exec_carrying(envp, |envp| next(fd, argv, envp)) }
    }
}

hook! {
    fn execveat(
        dirfd: c_int,
        path: *const libc::c_char,
        argv: *const *const libc::c_char,
        envp: *const *const libc::c_char,
        flags: c_int,
    ) -> c_int;
    |forward, unsafe next| {
        // SAFETY: `envp` is what the program gave exec; the same call runs.
        unsafe { exec_carrying(envp, |envp| next(dirfd, path, argv, envp, flags)) }
    }
}

// posix_spawn, system and popen run a new program in a child made without
// the fork handlers: it may change the sockets it inherits (see `fresh`).

/// A spawn of libc's (`posix_spawn`, or `posix_spawnp`, which takes a file
/// to look up in `PATH` where the other takes a path).
macro_rules! spawn_hook {
    ($name:ident, $program:ident) => {
        hook! {
            fn $name(
                pid: *mut libc::pid_t,
                $program: *const libc::c_char,
                actions: *const libc::posix_spawn_file_actions_t,
                attr: *const libc::posix_spawnattr_t,
                argv: *const *mut libc::c_char,
                envp: *const *mut libc::c_char,
            ) -> c_int;
            |forward| {
                fresh::forget_all();
                forward()
            }
        }
    };
}

spawn_hook!(posix_spawn, path);
spawn_hook!(posix_spawnp, file);

hook! {
    fn system(command: *const libc::c_char) -> c_int;
    |forward| {
        fresh::forget_all();
        forward()
    }
}

hook! {
    fn popen(command: *const libc::c_char, mode: *const libc::c_char) -> *mut libc::FILE;
    |forward| {
        fresh::forget_all();
        forward()
    }
}

/// Run by the dynamic loader when the library is loaded, before the
/// program's `main`: notes whose memory this is, and takes up the
/// connections that crossed an exec.
#[used]
#[link_section = ".init_array"]
static AFTER_EXEC: extern "C" fn() = after_exec;

extern "C" fn after_exec() {
    if attach::enabled() {
        sys::claim_memory();
        crate::fork::watch();
        crate::exec::adopt();
    }
}

// execl, execlp and execle: their variadic arguments are gathered in C
// (src/execl.c), which then calls the hooks above. The exported symbols
// jump there with every register and the stack as the caller left them,
// which is what a variadic callee reads its arguments from.

extern "C" {
    fn vsocket_execl();
    fn vsocket_execlp();
    fn vsocket_execle();
}

/// `int execl(const char *path, const char *arg, ... /*, NULL */)`
#[unsafe(naked)]
#[no_mangle]
pub extern "C" fn execl() {
    // A tail jump: the C function returns to our caller.
    core::arch::naked_asm!("jmp {}", sym vsocket_execl)
}

/// `int execlp(const char *file, const char *arg, ... /*, NULL */)`
#[unsafe(naked)]
#[no_mangle]
pub extern "C" fn execlp() {
    core::arch::naked_asm!("jmp {}", sym vsocket_execlp)
}

/// `int execle(const char *path, const char *arg, ... /*, NULL, char *const envp[] */)`
#[unsafe(naked)]
#[no_mangle]
pub extern "C" fn execle() {
    core::arch::naked_asm!("jmp {}", sym vsocket_execle)
}
