//! A connection's shared-memory segment: a sealed memfd holding the header
//! page and two rings (layout in `vsocket_abi::layout`).
//!
//! `vsocketd` creates the segment, seals its size (so no holder can shrink
//! it under another's mapping and turn reads into SIGBUS), and passes the
//! memfd to both ends, which map it with [`Segment::map`] after checking the
//! size and the seals.

use crate::ring::{Consumer, Producer, RingControl};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use vsocket_abi::layout::{self, SEGMENT_MAGIC, SEGMENT_VERSION};

const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Which file a segment descriptor names (see [`Segment::identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

/// One mapping of a connection segment.
#[derive(Debug)]
pub struct Segment {
    base: NonNull<u8>,
    len: usize,
    ring_size: u32,
}

// SAFETY: the mapping is plain shared memory; all concurrent access goes
// through atomics (control lines) or the ring protocol (data areas).
unsafe impl Send for Segment {}
// SAFETY: as above; `&Segment` only hands out views that are safe to share.
unsafe impl Sync for Segment {}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Segment {
    /// Creates a zeroed, sealed segment with rings of `ring_size` bytes and
    /// maps it. Returns the mapping and the memfd to hand to both ends.
    pub fn create(ring_size: u32) -> io::Result<(Segment, OwnedFd)> {
        if !layout::ring_size_valid(ring_size) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "invalid ring size"));
        }
        // SAFETY: the name is a NUL-terminated literal; flags are valid.
        let fd = check(unsafe {
            libc::memfd_create(c"vsocket-conn".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        })?;
        // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = layout::segment_size(ring_size);
        // SAFETY: plain syscalls on a descriptor we own.
        unsafe {
            check(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t))?;
            check(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, REQUIRED_SEALS))?;
        }
        let segment = Self::map_unchecked(fd.as_raw_fd(), len, ring_size)?;
        let header = segment.base.as_ptr() as *mut u64;
        let mut nonce = [0u8; 16];
        // SAFETY: getrandom fills at most 16 bytes of `nonce`.
        if unsafe { libc::getrandom(nonce.as_mut_ptr() as *mut libc::c_void, 16, 0) } != 16 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the header page is 4096 bytes, freshly zeroed, and no
        // other process has the memfd yet; every write is inside it.
        unsafe {
            header.write(SEGMENT_MAGIC);
            (header.add(1) as *mut u32).write(SEGMENT_VERSION);
            (header.add(1) as *mut u32).add(1).write(ring_size);
            std::ptr::copy_nonoverlapping(nonce.as_ptr(), segment.base.as_ptr().add(layout::HEADER_NONCE), 16);
        }
        Ok((segment, fd))
    }

    /// Maps a segment received from the daemon, after checking that it is a
    /// sealed memfd of exactly the size `ring_size` implies.
    pub fn map(fd: BorrowedFd<'_>, ring_size: u32) -> io::Result<Segment> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("connection segment: {what}"));
        if !layout::ring_size_valid(ring_size) {
            return Err(bad("invalid ring size"));
        }
        let len = layout::segment_size(ring_size);
        // SAFETY: fstat writes into the zeroed struct we pass.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a pointer to a stat buffer.
        check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        if st.st_size as usize != len {
            return Err(bad("wrong size"));
        }
        // SAFETY: F_GET_SEALS takes no argument.
        let seals = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })?;
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(bad("not sealed"));
        }
        let segment = Self::map_unchecked(fd.as_raw_fd(), len, ring_size)?;
        let header = segment.base.as_ptr() as *const u64;
        // SAFETY: the mapping is `len` > 16 bytes; plain loads of the header.
        let (magic, version) = unsafe { (header.read_volatile(), (header.add(1) as *const u32).read_volatile()) };
        if magic != SEGMENT_MAGIC || version != SEGMENT_VERSION {
            return Err(bad("bad magic or version"));
        }
        Ok(segment)
    }

    fn map_unchecked(fd: libc::c_int, len: usize, ring_size: u32) -> io::Result<Segment> {
        // SAFETY: a fresh shared mapping of a descriptor whose size is at
        // least `len` (checked or set by the callers, and sealed).
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr as *mut u8).expect("mmap does not return NULL on success");
        Ok(Segment { base, len, ring_size })
    }

    /// Bytes per ring.
    pub fn ring_size(&self) -> u32 {
        self.ring_size
    }

    fn control(&self, ring: usize) -> &RingControl {
        assert!(ring < 2);
        // The producer line is inside the header page, 128-byte aligned (the
        // mapping is page aligned), and outlives `&self`.
        // SAFETY: RingControl is plain atomics, valid for any bit pattern.
        unsafe { &*(self.base.as_ptr().add(layout::producer_line(ring)) as *const RingControl) }
    }

    fn data(&self, ring: usize) -> *mut u8 {
        // SAFETY: ring_data(ring) + ring_size <= len for ring < 2.
        unsafe { self.base.as_ptr().add(layout::ring_data(ring, self.ring_size)) }
    }

    /// The producer view of ring `ring` (0 or 1).
    pub fn producer(&self, ring: usize) -> Producer<'_> {
        // SAFETY: the data area is `ring_size` bytes of this mapping, alive
        // while `&self` is, and only reached through ring views.
        unsafe { Producer::new(self.control(ring), self.data(ring), self.ring_size) }
    }

    /// The consumer view of ring `ring` (0 or 1).
    pub fn consumer(&self, ring: usize) -> Consumer<'_> {
        // SAFETY: as in `producer`.
        unsafe { Consumer::new(self.control(ring), self.data(ring), self.ring_size) }
    }
}

impl Segment {
    /// The count of processes holding endpoint `end` (0 client, 1 server).
    /// Maintained by the holders themselves: a hostile peer can only
    /// confuse the close of its own connection.
    pub fn holders(&self, end: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(end < 2);
        // SAFETY: the endpoint line is inside the header page, 4-byte
        // aligned, and AtomicU32 is valid for any bit pattern; it lives as
        // long as the mapping `&self` keeps alive.
        unsafe { &*(self.base.as_ptr().add(layout::ENDPOINT_LINE + 4 * end) as *const std::sync::atomic::AtomicU32) }
    }

    /// The connection the daemon last handed this segment to (header).
    pub fn connection_id(&self) -> &std::sync::atomic::AtomicU64 {
        // SAFETY: 8-byte aligned word inside the header page (offset 16);
        // AtomicU64 is valid for any bit pattern and lives as long as the
        // mapping.
        unsafe { &*(self.base.as_ptr().add(layout::HEADER_CONNECTION_ID) as *const std::sync::atomic::AtomicU64) }
    }

    /// Endpoint `end`'s "released" word (see `layout::RELEASED`).
    pub fn released(&self, end: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(end < 2);
        // SAFETY: as in `holders`: inside the header page, 4-byte aligned,
        // any bit pattern valid, alive as long as the mapping.
        unsafe {
            &*(self.base.as_ptr().add(layout::ENDPOINT_LINE + layout::RELEASED + 4 * end)
                as *const std::sync::atomic::AtomicU32)
        }
    }

    /// May the segment be reset for another connection? Both directions
    /// are closed and both ends have released it. (A guest can forge this
    /// for its own connections; the daemon hands a reset segment only to
    /// the same two processes, so that confuses only their connections.)
    pub fn reusable(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.fully_closed() && (0..2).all(|end| self.released(end).load(Ordering::Acquire) == 1)
    }

    /// Puts every control word back to zero, as in a fresh segment, for a
    /// new connection. Only for a segment nobody else uses (`reusable`);
    /// the data areas keep old bytes, which the new connection's indices
    /// never expose.
    pub fn reset(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        for r in 0..2 {
            let c = self.control(r);
            c.producer.tail.store(0, Relaxed);
            c.producer.flags.store(0, Relaxed);
            c.producer.waiting.store(0, Relaxed);
            c.consumer.head.store(0, Relaxed);
            c.consumer.flags.store(0, Relaxed);
            c.consumer.waiting.store(0, Relaxed);
        }
        for end in 0..2 {
            self.holders(end).store(0, Relaxed);
            self.released(end).store(0, Relaxed);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    }

    /// The file behind a segment descriptor (device, inode). Inode numbers
    /// can come back for a later file, so a kept mapping is only taken for
    /// the same file when its nonce matches too (see [`Segment::nonce`]).
    pub fn identity(fd: BorrowedFd<'_>) -> io::Result<FileIdentity> {
        // SAFETY: fstat writes into the zeroed struct we pass.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a pointer to a stat buffer.
        check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        Ok(FileIdentity { dev: st.st_dev, ino: st.st_ino })
    }

    /// The nonce the daemon wrote into this segment's header.
    pub fn nonce(&self) -> u128 {
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            // SAFETY: the nonce lies inside the header page of this mapping.
            *b = unsafe { self.base.as_ptr().add(layout::HEADER_NONCE + i).read_volatile() };
        }
        u128::from_le_bytes(bytes)
    }

    /// The nonce in the header of the segment behind `fd`, read without
    /// mapping it.
    pub fn read_nonce(fd: BorrowedFd<'_>) -> io::Result<u128> {
        let mut bytes = [0u8; 16];
        // SAFETY: reads at most 16 bytes into `bytes`.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                bytes.as_mut_ptr() as *mut libc::c_void,
                16,
                layout::HEADER_NONCE as libc::off_t,
            )
        };
        if n != 16 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "connection segment: short header"));
        }
        Ok(u128::from_le_bytes(bytes))
    }

    /// Overwrites ring `ring`'s published tail, as a hostile producer can
    /// (tests and fuzzing only).
    #[doc(hidden)]
    pub fn forge_for_tests(&self, ring: usize, tail: u64) {
        self.control(ring).producer.tail.store(tail, std::sync::atomic::Ordering::Relaxed);
    }

    /// Have both ends closed both directions (each producer finished and
    /// each consumer closed)? Read by the daemon to retire a connection.
    pub fn fully_closed(&self) -> bool {
        (0..2).all(|r| self.producer(r).finished() && self.consumer(r).closed())
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `map_unchecked`; no
        // view can outlive `&self`.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RxState;
    use std::os::fd::AsFd;

    #[test]
    fn two_mappings_of_one_segment_see_each_other() {
        let (daemon, fd) = Segment::create(4096).unwrap();
        let client = Segment::map(fd.as_fd(), 4096).unwrap();
        let server = Segment::map(fd.as_fd(), 4096).unwrap();
        client.producer(0).write(&[b"ping"]).unwrap();
        assert_eq!(server.consumer(0).state().unwrap(), RxState::Data(4));
        assert_eq!(daemon.producer(0).total(), 4);
        let mut buf = [0u8; 8];
        assert_eq!(server.consumer(0).read(&mut [&mut buf[..]], false).unwrap().0, 4);
        assert_eq!(&buf[..4], b"ping");
    }

    #[test]
    fn a_reset_segment_is_a_fresh_one() {
        use std::sync::atomic::Ordering;
        let (daemon, fd) = Segment::create(4096).unwrap();
        let client = Segment::map(fd.as_fd(), 4096).unwrap();
        let server = Segment::map(fd.as_fd(), 4096).unwrap();
        client.producer(0).write(&[b"old bytes"]).unwrap();
        assert!(!daemon.reusable());
        for (seg, end) in [(&client, 0), (&server, 1)] {
            seg.holders(end).store(1, Ordering::Relaxed);
            seg.producer(end).finish();
            seg.consumer(1 - end).close();
        }
        assert!(daemon.fully_closed() && !daemon.reusable(), "closed but not released");
        client.released(0).store(1, Ordering::Release);
        server.released(1).store(1, Ordering::Release);
        assert!(daemon.reusable());
        daemon.reset();
        assert!(!daemon.fully_closed());
        for r in 0..2 {
            assert_eq!(server.consumer(r).state().unwrap(), RxState::Empty, "no old bytes show");
            assert_eq!(daemon.producer(r).total(), 0);
        }
        assert_eq!(client.holders(0).load(Ordering::Relaxed), 0);
        client.producer(0).write(&[b"new"]).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(server.consumer(0).read(&mut [&mut buf[..]], false).unwrap().0, 3);
        assert_eq!(&buf[..3], b"new");
        assert_eq!(Segment::identity(fd.as_fd()).unwrap(), Segment::identity(fd.as_fd()).unwrap());
        assert_eq!(Segment::read_nonce(fd.as_fd()).unwrap(), client.nonce());
        assert_ne!(client.nonce(), 0);
        let (_other, other_fd) = Segment::create(4096).unwrap();
        assert_ne!(Segment::read_nonce(other_fd.as_fd()).unwrap(), client.nonce());
    }

    #[test]
    fn a_segment_of_the_wrong_size_or_unsealed_is_refused() {
        let (_daemon, fd) = Segment::create(4096).unwrap();
        assert!(Segment::map(fd.as_fd(), 8192).is_err());
        // SAFETY: a plain memfd without seals.
        let raw = unsafe { libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: just created, owned here.
        let plain = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our descriptor.
        unsafe { libc::ftruncate(plain.as_raw_fd(), layout::segment_size(4096) as libc::off_t) };
        assert!(Segment::map(plain.as_fd(), 4096).is_err());
    }
}
