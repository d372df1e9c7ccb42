//! A connection's shared memory: two sealed memfds, one *half* per end,
//! each holding that end's control words and the data of the ring it
//! produces (layout in `vsocket_abi::layout`).
//!
//! `vsocketd` creates both halves, seals their size (so no holder can
//! shrink one under another's mapping and turn reads into SIGBUS), and
//! passes each end its own half read-write and its peer's half through a
//! read-only descriptor. An end maps them with [`Segment::map`] after
//! checking their size, seals and headers; the daemon's own view (from
//! [`Segment::create`]) can write both.

use crate::ring::{Consumer, ConsumerLine, Producer, ProducerLine};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use vsocket_abi::grant;
use vsocket_abi::layout::{self, Endpoint, SEGMENT_MAGIC, SEGMENT_VERSION};

const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Which file a segment descriptor names (see [`Segment::identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

/// The descriptors of a connection's two halves, as the daemon keeps them
/// (indexed by [`Endpoint::index`]).
#[derive(Debug)]
pub struct SegmentFiles {
    /// Each end's half, read-write.
    pub rw: [OwnedFd; 2],
    /// The same files opened read-only (what each end's peer gets), while
    /// kept: the daemon lets them go once both ends have theirs (two
    /// descriptors fewer for each connection it holds), and they are
    /// opened again when the segment is handed over again.
    ro: Option<[OwnedFd; 2]>,
}

impl SegmentFiles {
    /// The files of a segment: both halves read-write, and read-only.
    pub fn new(rw: [OwnedFd; 2], ro: [OwnedFd; 2]) -> SegmentFiles {
        SegmentFiles { rw, ro: Some(ro) }
    }

    /// What end `end` is handed: its own half read-write, then its peer's
    /// half read-only (copies).
    pub fn clone_for(&self, end: Endpoint) -> io::Result<[OwnedFd; 2]> {
        let peer = match self.read_only(end.peer())? {
            ReadOnly::Kept(fd) => fd.try_clone_to_owned()?,
            ReadOnly::Opened(fd) => fd,
        };
        Ok([self.rw[end.index()].try_clone()?, peer])
    }

    /// A read-only descriptor of end `end`'s half: the kept one, or the
    /// file opened again.
    pub fn read_only(&self, end: Endpoint) -> io::Result<ReadOnly<'_>> {
        match &self.ro {
            Some(ro) => Ok(ReadOnly::Kept(ro[end.index()].as_fd())),
            None => reopen_read_only(self.rw[end.index()].as_fd()).map(ReadOnly::Opened),
        }
    }

    /// Lets the read-only descriptors go (both ends have theirs).
    pub fn let_go_of_read_only(&mut self) {
        self.ro = None;
    }
}

/// A half's read-only descriptor, as [`SegmentFiles::read_only`] has it.
#[derive(Debug)]
pub enum ReadOnly<'a> {
    /// The one the files keep.
    Kept(BorrowedFd<'a>),
    /// Opened again (the files let theirs go).
    Opened(OwnedFd),
}

impl AsFd for ReadOnly<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            ReadOnly::Kept(fd) => *fd,
            ReadOnly::Opened(fd) => fd.as_fd(),
        }
    }
}

/// One mapped half (or a whole chunk file, or a view of a piece of one).
#[derive(Debug)]
struct Half {
    /// Where the mapping starts; for a view, where its piece's lines do.
    base: NonNull<u8>,
    /// The mapping's length (for a view, its lines').
    len: usize,
    /// How many bytes from `base` [`word`](Half::word) may reach: a page
    /// for a mapping, a piece's lines for a view.
    words: usize,
    /// Where the ring data starts: [`layout::DATA`] into a mapped half; a
    /// view's piece's data, elsewhere in the chunk.
    data: NonNull<u8>,
    /// For a view of a piece of a larger mapping: that mapping, kept
    /// mapped while the view lives (the view unmaps nothing itself).
    whole: Option<Arc<Half>>,
}

// SAFETY: a mapping of shared memory; every type built on halves
// (segments, chunks, queues) reaches into it only through atomics (control
// lines, queue slots) or the ring protocol (data areas), and `&Segment`
// only hands out views that are safe to share; so they are Send and Sync
// through their halves.
unsafe impl Send for Half {}
// SAFETY: as above.
unsafe impl Sync for Half {}

/// One process's mapping of a connection's two halves.
#[derive(Debug)]
pub struct Segment {
    /// Half `i` belongs to the end whose [`Endpoint::index`] is `i`.
    halves: [Half; 2],
    ring_size: u32,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("connection segment: {what}"))
}

impl Half {
    /// Maps `len` bytes of `fd` from byte `offset` (a page multiple),
    /// writable or read-only.
    fn map(fd: BorrowedFd<'_>, offset: u64, len: usize, writable: bool) -> io::Result<Half> {
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        let offset = libc::off_t::try_from(offset).map_err(|_| bad("offset out of range"))?;
        // SAFETY: a fresh shared mapping of a descriptor whose size is at
        // least `offset + len` (checked or set by the callers: sealed for a
        // memfd, fixed for a region).
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr as *mut u8).expect("mmap does not return NULL on success");
        // A half's data starts after its header page (a queue page, or a
        // chunk's whole file, has none: its `data` is never used).
        let data = if len > layout::DATA {
            // SAFETY: inside the mapping just made (len > DATA).
            unsafe { NonNull::new_unchecked(base.as_ptr().add(layout::DATA)) }
        } else {
            base
        };
        Ok(Half { base, len, words: len.min(layout::PAGE), data, whole: None })
    }

    /// A view of one piece of a chunk mapped `whole`: its lines at byte
    /// `lines` (a line multiple) and its ring data of `ring_size` bytes at
    /// byte `data` (a page multiple), both inside `whole`, which stays
    /// mapped while the view lives.
    fn view(whole: &Arc<Half>, lines: usize, data: usize, ring_size: u32) -> Half {
        let inside = |at: usize, len: usize| at.checked_add(len).is_some_and(|end| end <= whole.len);
        assert!(lines.is_multiple_of(layout::LINE) && inside(lines, layout::PIECE_LINES));
        assert!(data.is_multiple_of(layout::PAGE) && inside(data, ring_size as usize));
        // SAFETY: both inside `whole`'s mapping (asserted), which the view
        // keeps.
        let (base, data) = unsafe {
            (
                NonNull::new_unchecked(whole.base.as_ptr().add(lines)),
                NonNull::new_unchecked(whole.base.as_ptr().add(data)),
            )
        };
        Half { base, len: layout::PIECE_LINES, words: layout::PIECE_LINES, data, whole: Some(whole.clone()) }
    }

    /// The word of type `T` at `offset` of the lines.
    fn word<T>(&self, offset: usize) -> &T {
        assert!(offset.is_multiple_of(std::mem::align_of::<T>()) && offset + std::mem::size_of::<T>() <= self.words);
        // Callers place only atomics and control lines here: any bit pattern
        // is a valid value of them.
        // SAFETY: inside the first `words` bytes from `base`, which this
        // mapping (or the whole a view keeps) holds, and aligned (asserted;
        // `base` is page or line aligned); it lives as long as `&self`.
        unsafe { &*(self.base.as_ptr().add(offset) as *const T) }
    }

    fn data(&self) -> *mut u8 {
        self.data.as_ptr()
    }

    /// Gives the pages of the data area (`len` bytes from `data`) back to
    /// the host: a hole punched in the file (`MADV_REMOVE`), which reads
    /// as zeros in every process that maps it, and takes pages again when
    /// written. Only through a writable mapping (the daemon's).
    fn discard_data(&self, len: usize) -> io::Result<()> {
        // The data area is reached only through raw pointers (ring views),
        // never a Rust reference, so changing its bytes breaks no borrow.
        // SAFETY: `len` page-aligned bytes inside this mapping (or its whole).
        check(unsafe { libc::madvise(self.data().cast(), len, libc::MADV_REMOVE) }).map(drop)
    }

    fn nonce(&self) -> u128 {
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            // SAFETY: the nonce lies inside the header page of this mapping.
            *b = unsafe { self.base.as_ptr().add(layout::HEADER_NONCE + i).read_volatile() };
        }
        u128::from_le_bytes(bytes)
    }
}

impl Drop for Half {
    fn drop(&mut self) {
        if self.whole.is_some() {
            // A view: the mapping is the whole's, unmapped with it.
            return;
        }
        // SAFETY: unmaps exactly the region mapped in `Half::map`; no view
        // can outlive the `&Segment` it came from, and a piece's view holds
        // its whole mapping (an `Arc`), so this runs after every view.
        unsafe { libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// Opens `fd`'s file again, read-only: a descriptor that cannot be mapped
/// writable nor written.
fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a path");
    // SAFETY: a NUL-terminated path and valid flags.
    let raw = check(unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })?;
    // SAFETY: open just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Creates a memfd of `len` zero bytes, sealed at that size, readable and
/// writable only by the daemon's user, and maps it writable.
fn create_sealed(name: &std::ffi::CStr, len: usize) -> io::Result<(Half, OwnedFd)> {
    // SAFETY: the name is NUL-terminated; flags are valid.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // A memfd is made with mode 0777: anyone holding a read-only
    // descriptor could open it again read-write through /proc/self/fd.
    // Mode 0400 leaves that to the file's owner (the daemon's user) alone;
    // descriptors already open keep their access.
    // SAFETY: plain syscalls on a descriptor we own.
    unsafe {
        check(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t))?;
        check(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, REQUIRED_SEALS))?;
        check(libc::fchmod(fd.as_raw_fd(), 0o400))?;
    }
    Ok((Half::map(fd.as_fd(), 0, len, true)?, fd))
}

/// Checks that `fd` is a sealed memfd of `len` bytes.
fn check_sealed(fd: BorrowedFd<'_>, len: usize) -> io::Result<()> {
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
    Ok(())
}

/// Creates end `end`'s half, zeroed, sealed and mapped, with its header.
fn create_half(ring_size: u32, end: usize) -> io::Result<(Half, OwnedFd)> {
    let (half, fd) = create_sealed(c"vsocket-conn", layout::half_size(ring_size))?;
    half.write_header(ring_size, end, random_nonce()?);
    Ok((half, fd))
}

/// 16 random bytes: a file's nonce, which a later file with the same
/// inode number does not share.
fn random_nonce() -> io::Result<[u8; 16]> {
    let mut nonce = [0u8; 16];
    // SAFETY: getrandom fills at most 16 bytes of `nonce`.
    if unsafe { libc::getrandom(nonce.as_mut_ptr() as *mut libc::c_void, 16, 0) } != 16 {
        return Err(io::Error::last_os_error());
    }
    Ok(nonce)
}

/// Checks that `fd` is a sealed memfd of a half's size whose header names
/// end `end`, and maps it (writable or not).
fn map_half(fd: BorrowedFd<'_>, ring_size: u32, end: usize, writable: bool) -> io::Result<Half> {
    let len = layout::half_size(ring_size);
    check_sealed(fd, len)?;
    let half = Half::map(fd, 0, len, writable)?;
    half.check_header(ring_size, end)?;
    Ok(half)
}

/// Checks that `file` holds the two halves of a connection with rings of
/// `ring_size` bytes from byte `offset` (page aligned), and returns the
/// size of one half.
fn check_placement(file: BorrowedFd<'_>, offset: u64, ring_size: u32) -> io::Result<usize> {
    if !layout::ring_size_valid(ring_size) {
        return Err(bad("invalid ring size"));
    }
    if !offset.is_multiple_of(layout::PAGE as u64) {
        return Err(bad("a piece off a page boundary"));
    }
    let half = layout::half_size(ring_size);
    // SAFETY: fstat writes into the zeroed struct we pass.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and a pointer to a stat buffer.
    check(unsafe { libc::fstat(file.as_raw_fd(), &mut st) })?;
    // A mapping past the end of the file would fault when touched.
    let end = offset.checked_add(2 * half as u64).ok_or_else(|| bad("a piece past the region"))?;
    if end > st.st_size as u64 {
        return Err(bad("a piece past the region"));
    }
    Ok(half)
}

/// One process's mapping of a grant's connect queue (layout in
/// `vsocket_abi::grant`): the daemon creates it, the client writes it,
/// the server and the daemon read it.
#[derive(Debug)]
pub struct ConnectQueue {
    page: Half,
}

impl ConnectQueue {
    /// Creates grant `grant`'s queue, empty and sealed, mapped writable
    /// (the daemon's view); returns it with a read-write and a read-only
    /// descriptor of it (for the client and the server).
    pub fn create(grant: u64) -> io::Result<(ConnectQueue, OwnedFd, OwnedFd)> {
        let (page, fd) = create_sealed(c"vsocket-grant", grant::QUEUE_SIZE)?;
        page.word::<AtomicU64>(grant::HEADER_GRANT).store(grant, Ordering::Relaxed);
        page.word::<AtomicU32>(grant::HEADER_VERSION).store(grant::QUEUE_VERSION, Ordering::Relaxed);
        page.word::<AtomicU64>(grant::HEADER).store(grant::QUEUE_MAGIC, Ordering::Release);
        let read_only = reopen_read_only(fd.as_fd())?;
        Ok((ConnectQueue { page }, fd, read_only))
    }

    /// Maps the queue of grant `grant` that came as `fd` (writable for the
    /// client), after checking that it is one.
    pub fn map(fd: BorrowedFd<'_>, grant: u64, writable: bool) -> io::Result<ConnectQueue> {
        check_sealed(fd, grant::QUEUE_SIZE)?;
        let page = Half::map(fd, 0, grant::QUEUE_SIZE, writable)?;
        let magic = page.word::<AtomicU64>(grant::HEADER).load(Ordering::Acquire);
        let version = page.word::<AtomicU32>(grant::HEADER_VERSION).load(Ordering::Relaxed);
        if magic != grant::QUEUE_MAGIC || version != grant::QUEUE_VERSION {
            return Err(bad("not a connect queue"));
        }
        if page.word::<AtomicU64>(grant::HEADER_GRANT).load(Ordering::Relaxed) != grant {
            return Err(bad("another grant's connect queue"));
        }
        Ok(ConnectQueue { page })
    }

    /// Slots written so far, as the client says.
    pub fn produced(&self) -> u64 {
        self.page.word::<AtomicU64>(grant::PRODUCED).load(Ordering::Acquire)
    }

    /// The slots written since `cursor` last read, as they read now, at
    /// most the queue's [`grant::SLOTS`] whatever the client says (see
    /// [`grant::Cursor`]); `cursor` moves past them.
    pub fn read_new(&self, cursor: &mut grant::Cursor) -> impl Iterator<Item = grant::Slot> + '_ {
        let due = cursor.next_slots(self.produced());
        (due.first..due.end).filter_map(|n| self.slot(n))
    }

    /// Slot number `n` (counting every slot written), as it reads now.
    pub fn slot(&self, n: u64) -> Option<grant::Slot> {
        grant::Slot::decode(self.page.word::<AtomicU64>(grant::slot_offset(n)).load(Ordering::Relaxed))
    }

    /// Writes `slot` and publishes it (the client, one writer at a time:
    /// its grant's lock). A read-only mapping faults here: only the
    /// client's is writable.
    pub fn publish(&self, slot: grant::Slot) {
        let produced = self.page.word::<AtomicU64>(grant::PRODUCED);
        let n = produced.load(Ordering::Relaxed);
        self.page.word::<AtomicU64>(grant::slot_offset(n)).store(slot.encode(), Ordering::Relaxed);
        produced.store(n.wrapping_add(1), Ordering::Release);
    }
}

impl Half {
    /// Writes a fresh header for end `end` of a connection with rings of
    /// `ring_size` bytes, with `nonce` (its bytes as they are; zero for a
    /// piece of a VM's region, which is never kept for reuse by file
    /// identity).
    fn write_header(&self, ring_size: u32, end: usize, nonce: [u8; 16]) {
        let (low, high) = nonce.split_at(8);
        let word = |bytes: &[u8]| u64::from_ne_bytes(bytes.try_into().expect("8 bytes"));
        self.word::<AtomicU64>(0).store(SEGMENT_MAGIC, Ordering::Relaxed);
        self.word::<AtomicU32>(8).store(SEGMENT_VERSION, Ordering::Relaxed);
        self.word::<AtomicU32>(12).store(ring_size, Ordering::Relaxed);
        self.word::<AtomicU64>(layout::HEADER_CONNECTION_ID).store(0, Ordering::Relaxed);
        self.word::<AtomicU64>(layout::HEADER_NONCE).store(word(low), Ordering::Relaxed);
        self.word::<AtomicU64>(layout::HEADER_NONCE + 8).store(word(high), Ordering::Relaxed);
        self.word::<AtomicU32>(layout::HEADER_END).store(end as u32, Ordering::Release);
    }

    /// Checks the header of end `end`'s half.
    fn check_header(&self, ring_size: u32, end: usize) -> io::Result<()> {
        let magic = self.word::<AtomicU64>(0).load(Ordering::Relaxed);
        let version = self.word::<AtomicU32>(8).load(Ordering::Relaxed);
        if magic != SEGMENT_MAGIC || version != SEGMENT_VERSION {
            return Err(bad("bad magic or version"));
        }
        if self.word::<AtomicU32>(12).load(Ordering::Relaxed) != ring_size {
            return Err(bad("a half of another ring size"));
        }
        if self.word::<AtomicU32>(layout::HEADER_END).load(Ordering::Acquire) != end as u32 {
            return Err(bad("a half of the wrong end"));
        }
        Ok(())
    }
}

impl Segment {
    /// Creates both halves of a connection with rings of `ring_size` bytes,
    /// zeroed and sealed, and maps both writable (the daemon's view).
    /// Returns the mapping and the descriptors to hand to the ends.
    pub fn create(ring_size: u32) -> io::Result<(Segment, SegmentFiles)> {
        if !layout::ring_size_valid(ring_size) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "invalid ring size"));
        }
        let (client, client_fd) = create_half(ring_size, 0)?;
        let (server, server_fd) = create_half(ring_size, 1)?;
        let ro = [reopen_read_only(client_fd.as_fd())?, reopen_read_only(server_fd.as_fd())?];
        Ok((Segment { halves: [client, server], ring_size }, SegmentFiles::new([client_fd, server_fd], ro)))
    }

    /// The daemon's view again, from the files another daemon made (a
    /// hand-over): both halves writable, after the checks `map` makes.
    pub fn adopt(files: &SegmentFiles, ring_size: u32) -> io::Result<Segment> {
        if !layout::ring_size_valid(ring_size) {
            return Err(bad("invalid ring size"));
        }
        let client = map_half(files.rw[0].as_fd(), ring_size, 0, true)?;
        let server = map_half(files.rw[1].as_fd(), ring_size, 1, true)?;
        Ok(Segment { halves: [client, server], ring_size })
    }

    /// Maps the halves the daemon sent to end `end`: `own` (its half)
    /// writable, `peer` (the other end's) read-only, after checking that
    /// each is a sealed memfd of the size `ring_size` implies whose header
    /// names the right end.
    pub fn map(own: BorrowedFd<'_>, peer: BorrowedFd<'_>, ring_size: u32, end: Endpoint) -> io::Result<Segment> {
        if !layout::ring_size_valid(ring_size) {
            return Err(bad("invalid ring size"));
        }
        let mine = map_half(own, ring_size, end.index(), true)?;
        let theirs = map_half(peer, ring_size, end.peer().index(), false)?;
        let halves = match end {
            Endpoint::Client => [mine, theirs],
            Endpoint::Server => [theirs, mine],
        };
        Ok(Segment { halves, ring_size })
    }

    /// The daemon's view of a connection whose memory is a piece of a VM's
    /// region `file` (see `layout`, "Placed in a region"): the client's
    /// half at `offset`, the server's right after it, both mapped
    /// writable, with fresh headers and every control word zero. What the
    /// VM wrote there before is overwritten; what it writes after is
    /// hostile input, as any end's is.
    pub fn place(file: BorrowedFd<'_>, offset: u64, ring_size: u32) -> io::Result<Segment> {
        let half = check_placement(file, offset, ring_size)?;
        let client = Half::map(file, offset, half, true)?;
        let server = Half::map(file, offset + half as u64, half, true)?;
        client.write_header(ring_size, Endpoint::Client.index(), [0; 16]);
        server.write_header(ring_size, Endpoint::Server.index(), [0; 16]);
        let segment = Segment { halves: [client, server], ring_size };
        segment.reset();
        Ok(segment)
    }

    /// End `end`'s view of a connection placed at `offset` of a region
    /// `file` this process maps (a VM's library, through its device): its
    /// own half writable, its peer's read-only, after checking both
    /// headers.
    pub fn map_placed(file: BorrowedFd<'_>, offset: u64, ring_size: u32, end: Endpoint) -> io::Result<Segment> {
        let half = check_placement(file, offset, ring_size)?;
        let at = |e: Endpoint| offset + (e.index() * half) as u64;
        let mine = Half::map(file, at(end), half, true)?;
        let theirs = Half::map(file, at(end.peer()), half, false)?;
        mine.check_header(ring_size, end.index())?;
        theirs.check_header(ring_size, end.peer().index())?;
        let halves = match end {
            Endpoint::Client => [mine, theirs],
            Endpoint::Server => [theirs, mine],
        };
        Ok(Segment { halves, ring_size })
    }

    /// End `end`'s view of the kit connection in piece `piece` of the chunk
    /// files `own` (writable) and `peer` (read-only): a new program image
    /// after exec, which the daemon gives the chunk's files again (see
    /// [`Chunk`]). The chunk is mapped whole, for this piece's view, which
    /// keeps it.
    pub fn map_piece(
        own: BorrowedFd<'_>,
        peer: BorrowedFd<'_>,
        piece: usize,
        ring_size: u32,
        end: Endpoint,
    ) -> io::Result<Segment> {
        Chunk::map(own, peer, ring_size, end)?.piece(piece)
    }

    /// The daemon's view again of a kit connection in piece `piece` of the
    /// chunk `files` another daemon made (a hand-over): both halves
    /// writable.
    pub fn adopt_piece(files: &SegmentFiles, piece: usize, ring_size: u32) -> io::Result<Segment> {
        Chunk::adopt(files, ring_size)?.piece(piece)
    }

    /// Bytes per ring.
    pub fn ring_size(&self) -> u32 {
        self.ring_size
    }

    /// Ring `ring`'s lines: the producer's in half `ring`, the consumer's
    /// in the other half.
    fn lines(&self, ring: usize) -> (&ProducerLine, &ConsumerLine) {
        assert!(ring < 2);
        (self.halves[ring].word(layout::PRODUCER_LINE), self.halves[1 - ring].word(layout::CONSUMER_LINE))
    }

    /// The producer view of ring `ring` (0 or 1). Only the end that
    /// produces it (or the daemon) may write through it.
    pub fn producer(&self, ring: usize) -> Producer<'_> {
        let (p, c) = self.lines(ring);
        // SAFETY: the data area is `ring_size` bytes of half `ring`, alive
        // while `&self` is, and only reached through ring views.
        unsafe { Producer::new(p, c, self.halves[ring].data(), self.ring_size) }
    }

    /// The consumer view of ring `ring` (0 or 1). Only the end that
    /// consumes it (or the daemon) may write through it.
    pub fn consumer(&self, ring: usize) -> Consumer<'_> {
        let (p, c) = self.lines(ring);
        // SAFETY: as in `producer`.
        unsafe { Consumer::new(p, c, self.halves[ring].data(), self.ring_size) }
    }

    /// Returns ring `ring`'s data pages to the host if the ring is empty
    /// and no write is under way, holding writes off meanwhile (the
    /// daemon's view, whose halves are mapped writable; see
    /// [`trim_idle`](crate::ring::trim_idle)). `Ok(false)`: not now.
    pub fn trim(&self, ring: usize) -> io::Result<bool> {
        let (p, c) = self.lines(ring);
        let half = &self.halves[ring];
        match crate::ring::trim_idle(p, c, || half.discard_data(self.ring_size as usize)) {
            None => Ok(false),
            Some(punched) => punched.map(|()| true),
        }
    }

    /// The count of processes holding endpoint `end` (0 client, 1 server).
    /// Maintained by the holders themselves, in their own half.
    pub fn holders(&self, end: usize) -> &AtomicU32 {
        self.halves[end].word(layout::ENDPOINT_LINE)
    }

    /// Endpoint `end`'s "sleepers" word (see `layout::SLEEPERS`).
    pub fn sleepers(&self, end: usize) -> &AtomicU32 {
        self.halves[end].word(layout::ENDPOINT_LINE + layout::SLEEPERS)
    }

    /// The kit's claim word, in the server's half (see `layout::CLAIM`):
    /// the server's library and the daemon write it, the client reads it.
    pub fn claim(&self) -> &AtomicU32 {
        self.halves[Endpoint::Server.index()].word(layout::ENDPOINT_LINE + layout::CLAIM)
    }

    /// The kit's take word, in the client's half (see `layout::TAKE`): the
    /// client's library and the daemon write it, the server reads it.
    pub fn take(&self) -> &AtomicU32 {
        self.halves[Endpoint::Client.index()].word(layout::ENDPOINT_LINE + layout::TAKE)
    }

    /// Endpoint `end`'s "released" word (see `layout::RELEASED`).
    pub fn released(&self, end: usize) -> &AtomicU32 {
        self.halves[end].word(layout::ENDPOINT_LINE + layout::RELEASED)
    }

    /// Endpoint `end`'s `bell_kept` word (see `layout::BELL_KEPT`).
    pub fn bell_kept(&self, end: usize) -> &AtomicU64 {
        self.halves[end].word(layout::ENDPOINT_LINE + layout::BELL_KEPT)
    }

    /// The connection the daemon last handed half `end` to (its header).
    pub fn connection_id(&self, end: usize) -> u64 {
        self.halves[end].word::<AtomicU64>(layout::HEADER_CONNECTION_ID).load(Ordering::Acquire)
    }

    /// Names connection `id` in both halves' headers (the daemon, before
    /// handing the segment over).
    pub fn set_connection_id(&self, id: u64) {
        for half in &self.halves {
            half.word::<AtomicU64>(layout::HEADER_CONNECTION_ID).store(id, Ordering::Release);
        }
    }

    /// May the segment be reset for another connection? Both directions
    /// are closed and both ends have released it. (A guest can forge this
    /// for its own connections; the daemon hands a reset segment only to
    /// the same two processes, so that confuses only their connections.)
    pub fn reusable(&self) -> bool {
        self.fully_closed() && (0..2).all(|end| self.released(end).load(Ordering::Acquire) == 1)
    }

    /// Puts every control word back to zero, as in a fresh segment, for a
    /// new connection, but the `bell_kept` words (which the daemon takes
    /// when it makes the next kit in a piece, ARCHITECTURE §3c stage 6).
    /// Only for a segment nobody else uses (`reusable`); the data areas
    /// keep old bytes, which the new connection's indices never expose.
    pub fn reset(&self) {
        for r in 0..2 {
            let (p, c) = self.lines(r);
            p.clear();
            c.clear();
        }
        for end in 0..2 {
            self.holders(end).store(0, Ordering::Relaxed);
            self.released(end).store(0, Ordering::Relaxed);
            self.sleepers(end).store(0, Ordering::Relaxed);
        }
        self.claim().store(layout::KIT_WAITING, Ordering::Relaxed);
        self.take().store(layout::KIT_FREE, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
    }

    /// The file behind a half's descriptor (device, inode). Inode numbers
    /// can come back for a later file, so a kept mapping is only taken for
    /// the same file when its nonce matches too (see [`Segment::nonce`]).
    pub fn identity(fd: BorrowedFd<'_>) -> io::Result<FileIdentity> {
        // SAFETY: fstat writes into the zeroed struct we pass.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a pointer to a stat buffer.
        check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        Ok(FileIdentity { dev: st.st_dev, ino: st.st_ino })
    }

    /// The nonce the daemon wrote into half `end`'s header.
    pub fn nonce(&self, end: usize) -> u128 {
        self.halves[end].nonce()
    }

    /// The nonce in the header of the half behind `fd`, read without
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
            return Err(bad("short header"));
        }
        Ok(u128::from_le_bytes(bytes))
    }

    /// Overwrites ring `ring`'s published tail, as a hostile producer can
    /// (tests and fuzzing only).
    #[doc(hidden)]
    pub fn forge_for_tests(&self, ring: usize, tail: u64) {
        self.lines(ring).0.tail.store(tail, Ordering::Relaxed);
    }

    /// Have both ends closed both directions (each producer finished and
    /// each consumer closed)? Read by the daemon to retire a connection.
    pub fn fully_closed(&self) -> bool {
        (0..2).all(|r| self.producer(r).finished() && self.consumer(r).closed())
    }
}

/// Piece `piece`'s half in a chunk file mapped `whole` (see
/// [`layout::chunk_size`]): its lines, then its data elsewhere.
fn piece_view(whole: &Arc<Half>, piece: usize, ring_size: u32) -> Half {
    Half::view(whole, layout::piece_lines(piece), layout::piece_data(ring_size, piece), ring_size)
}

/// A kits' *chunk* (ARCHITECTURE §3c, stages 1 and 2): the halves of
/// [`layout::CHUNK_PIECES`] connections in two sealed memfds, one per end,
/// each piece's control lines packed eight to a page at the start of the
/// file and its ring data after them (see [`layout::chunk_size`]), each
/// piece with its own header.
/// The daemon makes a chunk and maps both files writable; each end maps
/// the chunk once, its own file writable and its peer's read-only (as it
/// maps a segment's halves), and every kit of the chunk it is sent is a
/// [`Segment`] viewing one piece, which keeps the mappings alive. Both
/// files of a chunk go only to the two processes whose kits it holds.
#[derive(Debug)]
pub struct Chunk {
    /// Indexed by [`Endpoint::index`], as a segment's halves.
    files: [Arc<Half>; 2],
    ring_size: u32,
}

impl Chunk {
    /// Makes a chunk of pieces with rings of `ring_size` bytes, every
    /// piece's header written for its end, and maps both files writable
    /// (the daemon's view); returns it with its files (read-write and
    /// read-only).
    pub fn create(ring_size: u32) -> io::Result<(Chunk, SegmentFiles)> {
        if !layout::ring_size_valid(ring_size) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "invalid ring size"));
        }
        let file = |end: usize| -> io::Result<(Arc<Half>, OwnedFd)> {
            let (whole, fd) = create_sealed(c"vsocket-chunk", layout::chunk_size(ring_size))?;
            let whole = Arc::new(whole);
            let nonce = random_nonce()?;
            for piece in 0..layout::CHUNK_PIECES {
                piece_view(&whole, piece, ring_size).write_header(ring_size, end, nonce);
            }
            Ok((whole, fd))
        };
        let ((client, client_fd), (server, server_fd)) = (file(0)?, file(1)?);
        let ro = [reopen_read_only(client_fd.as_fd())?, reopen_read_only(server_fd.as_fd())?];
        Ok((Chunk { files: [client, server], ring_size }, SegmentFiles::new([client_fd, server_fd], ro)))
    }

    /// End `end`'s mapping of the chunk whose files the daemon sent: `own`
    /// writable, `peer` read-only, after checking that each is a sealed
    /// memfd of a chunk's size (each piece's header is checked when it is
    /// viewed).
    pub fn map(own: BorrowedFd<'_>, peer: BorrowedFd<'_>, ring_size: u32, end: Endpoint) -> io::Result<Chunk> {
        let files = match end {
            Endpoint::Client => [(own, true), (peer, false)],
            Endpoint::Server => [(peer, false), (own, true)],
        };
        Chunk::of_files(files, ring_size)
    }

    /// The daemon's view again of the chunk whose `files` another daemon
    /// made (a hand-over): both files writable, after the checks `map`
    /// makes.
    pub fn adopt(files: &SegmentFiles, ring_size: u32) -> io::Result<Chunk> {
        Chunk::of_files([(files.rw[0].as_fd(), true), (files.rw[1].as_fd(), true)], ring_size)
    }

    /// Maps each end's file (indexed by [`Endpoint::index`]), writable or
    /// not, after checking that it is a sealed memfd of a chunk's size.
    fn of_files(files: [(BorrowedFd<'_>, bool); 2], ring_size: u32) -> io::Result<Chunk> {
        if !layout::ring_size_valid(ring_size) {
            return Err(bad("invalid ring size"));
        }
        let len = layout::chunk_size(ring_size);
        let map = |(fd, writable): (BorrowedFd<'_>, bool)| -> io::Result<Arc<Half>> {
            check_sealed(fd, len)?;
            Ok(Arc::new(Half::map(fd, 0, len, writable)?))
        };
        Ok(Chunk { files: [map(files[0])?, map(files[1])?], ring_size })
    }

    /// Bytes per ring of the chunk's connections.
    pub fn ring_size(&self) -> u32 {
        self.ring_size
    }

    /// Piece `piece`'s connection, after checking both halves' headers
    /// (a peer may have written anything in its own file).
    pub fn piece(&self, piece: usize) -> io::Result<Segment> {
        if piece >= layout::CHUNK_PIECES {
            return Err(bad("a piece past the chunk"));
        }
        let halves = [0, 1].map(|end| piece_view(&self.files[end], piece, self.ring_size));
        for (end, h) in halves.iter().enumerate() {
            h.check_header(self.ring_size, end)?;
        }
        Ok(Segment { halves, ring_size: self.ring_size })
    }

    /// The nonce in end `end`'s file (every piece's header has it): a
    /// descriptor whose [`Segment::read_nonce`] differs names another file.
    pub fn nonce(&self, end: usize) -> u128 {
        self.files[end].nonce()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RxState;

    /// The daemon's view and both ends' mappings of a fresh segment.
    fn three_views(ring_size: u32) -> (Segment, SegmentFiles, Segment, Segment) {
        let (daemon, files) = Segment::create(ring_size).unwrap();
        let [own, peer] = files.clone_for(Endpoint::Client).unwrap();
        let client = Segment::map(own.as_fd(), peer.as_fd(), ring_size, Endpoint::Client).unwrap();
        let [own, peer] = files.clone_for(Endpoint::Server).unwrap();
        let server = Segment::map(own.as_fd(), peer.as_fd(), ring_size, Endpoint::Server).unwrap();
        (daemon, files, client, server)
    }

    /// A region file of `len` bytes (a plain memfd, as a VM's region is a
    /// plain shared file).
    fn region(len: usize) -> OwnedFd {
        // SAFETY: a NUL-terminated literal name and valid flags.
        let raw = unsafe { libc::memfd_create(c"region".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: memfd_create just returned it.
        let file = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: a descriptor we own.
        assert_eq!(unsafe { libc::ftruncate(file.as_raw_fd(), len as libc::off_t) }, 0);
        file
    }

    /// Bytes of `fd`'s file the host holds pages for.
    fn held(fd: BorrowedFd<'_>) -> u64 {
        // SAFETY: fstat writes into the zeroed struct we pass.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and a pointer to a stat buffer.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        st.st_blocks as u64 * 512
    }

    /// One exchange each way on `ends` (client, server), read to the end.
    fn exchange(ends: [&Segment; 2], bytes: &[u8]) {
        for (end, seg) in ends.iter().enumerate() {
            // As a library writes: under the write claim.
            let p = seg.producer(end);
            p.try_claim(7).unwrap();
            assert_eq!(p.write(&[bytes]).unwrap().0, bytes.len());
            p.release_claim(7);
            let mut buf = vec![0u8; bytes.len() + 1];
            let (n, _) = ends[1 - end].consumer(end).read(&mut [&mut buf[..]], false).unwrap();
            assert_eq!(&buf[..n], bytes);
        }
    }

    #[test]
    fn an_idle_rings_pages_go_back_to_the_host_and_the_stream_goes_on() {
        let ring_size = 1 << 16;
        let (daemon, files, client, server) = three_views(ring_size);
        let before = files.rw.each_ref().map(|f| held(f.as_fd()));
        exchange([&client, &server], &[7; 5000]);
        let touched = files.rw.each_ref().map(|f| held(f.as_fd()));
        for end in 0..2 {
            assert_eq!(touched[end], before[end] + 2 * layout::PAGE as u64, "two data pages written");
            assert!(daemon.trim(end).unwrap(), "ring {end} is empty and quiet");
        }
        assert_eq!(files.rw.each_ref().map(|f| held(f.as_fd())), before, "the data pages are back");
        // Not empty: nothing happens.
        client.producer(0).write(&[b"left"]).unwrap();
        assert!(!daemon.trim(0).unwrap());
        let mut buf = [0u8; 4];
        server.consumer(0).read(&mut [&mut buf[..]], false).unwrap();
        assert_eq!(&buf, b"left");
        exchange([&client, &server], b"after the pages went");
    }

    #[test]
    fn an_idle_pieces_pages_go_back_and_its_neighbours_keep_theirs() {
        let ring_size = 1 << 16;
        let (daemon, files) = Chunk::create(ring_size).unwrap();
        let [own, peer] = files.clone_for(Endpoint::Client).unwrap();
        let client = Chunk::map(own.as_fd(), peer.as_fd(), ring_size, Endpoint::Client).unwrap();
        let [own, peer] = files.clone_for(Endpoint::Server).unwrap();
        let server = Chunk::map(own.as_fd(), peer.as_fd(), ring_size, Endpoint::Server).unwrap();
        let pieces = |c: &Chunk| [c.piece(3).unwrap(), c.piece(4).unwrap()];
        let (d, c, s) = (pieces(&daemon), pieces(&client), pieces(&server));
        exchange([&c[0], &s[0]], b"three");
        exchange([&c[1], &s[1]], b"four");
        let touched = held(files.rw[0].as_fd());
        assert!(d[0].trim(0).unwrap());
        assert_eq!(held(files.rw[0].as_fd()), touched - layout::PAGE as u64, "piece 3's page only");
        exchange([&c[1], &s[1]], b"four again");
        exchange([&c[0], &s[0]], b"three again");
    }

    #[test]
    fn a_connection_placed_in_a_region_is_seen_by_its_end() {
        let ring_size = 4096;
        let file = region(1 << 20);
        let offset = 8 * layout::PAGE as u64;
        // Old bytes in the piece (a connection before, or the VM's
        // scribbles) are overwritten.
        let scribble = vec![0xa5u8; 4 * layout::PAGE];
        // SAFETY: a descriptor we own and a buffer of that length.
        unsafe { libc::pwrite(file.as_raw_fd(), scribble.as_ptr().cast(), scribble.len(), offset as libc::off_t) };
        let daemon = Segment::place(file.as_fd(), offset, ring_size).unwrap();
        let guest = Segment::map_placed(file.as_fd(), offset, ring_size, Endpoint::Server).unwrap();
        assert_eq!(daemon.producer(0).space().unwrap(), ring_size);
        daemon.producer(0).write(&[b"hello"]).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(guest.consumer(0).read(&mut [&mut buf[..]], false).unwrap().0, 5);
        assert_eq!(&buf[..5], b"hello");
        guest.producer(1).write(&[b"back"]).unwrap();
        assert_eq!(daemon.consumer(1).state().unwrap(), RxState::Data(4));
        // The other end's view checks that end's header.
        assert!(Segment::map_placed(file.as_fd(), offset + 1, ring_size, Endpoint::Client).is_err());
        assert!(Segment::map_placed(file.as_fd(), offset, 8192, Endpoint::Client).is_err());
        assert!(Segment::map_placed(file.as_fd(), 0, ring_size, Endpoint::Client).is_err(), "no header there");
        // A piece past the region's end is refused, not mapped.
        assert!(Segment::place(file.as_fd(), (1 << 20) - layout::PAGE as u64, ring_size).is_err());
        assert!(Segment::place(file.as_fd(), u64::MAX - 4095, ring_size).is_err());
    }

    #[test]
    fn a_chunks_pieces_are_connections_each_end_sees_and_outlive_the_chunk() {
        let ring_size = 4096;
        let (daemon, files) = Chunk::create(ring_size).unwrap();
        let [own, peer] = files.clone_for(Endpoint::Client).unwrap();
        let client = Chunk::map(own.as_fd(), peer.as_fd(), ring_size, Endpoint::Client).unwrap();
        assert_eq!(Segment::read_nonce(own.as_fd()).unwrap(), client.nonce(0));
        assert_ne!(client.nonce(0), client.nonce(1), "each file has its own");
        let [s_own, s_peer] = files.clone_for(Endpoint::Server).unwrap();
        let server = Chunk::map(s_own.as_fd(), s_peer.as_fd(), ring_size, Endpoint::Server).unwrap();
        // Piece 3 is one connection in all three views, and no other piece.
        let (d3, c3, s3) = (daemon.piece(3).unwrap(), client.piece(3).unwrap(), server.piece(3).unwrap());
        d3.set_connection_id(77);
        assert_eq!((c3.connection_id(0), s3.connection_id(1)), (77, 77));
        assert_eq!(client.piece(4).unwrap().connection_id(0), 0);
        c3.producer(0).write(&[b"to the server"]).unwrap();
        let mut buf = [0u8; 32];
        assert_eq!(s3.consumer(0).read(&mut [&mut buf[..]], false).unwrap().0, 13);
        assert_eq!(&buf[..13], b"to the server");
        assert_eq!(client.piece(4).unwrap().producer(0).total(), 0);
        // A piece's view keeps the mappings when the chunk goes.
        drop((client, d3));
        s3.producer(1).write(&[b"back"]).unwrap();
        assert_eq!(c3.consumer(1).state().unwrap(), RxState::Data(4));
        // The last piece fits; past it, none.
        assert!(server.piece(layout::CHUNK_PIECES - 1).is_ok());
        assert!(server.piece(layout::CHUNK_PIECES).is_err());
        // The file's layout: piece 3's lines among the others' at the
        // start (eight to a page), its data after all of them.
        let read = |at: usize, len: usize| {
            let mut buf = vec![0u8; len];
            // SAFETY: reads at most `len` bytes into `buf`.
            let n = unsafe { libc::pread(own.as_raw_fd(), buf.as_mut_ptr().cast(), len, at as libc::off_t) };
            assert_eq!(n, len as isize);
            buf
        };
        let id = read(layout::piece_lines(3) + layout::HEADER_CONNECTION_ID, 8);
        assert_eq!(u64::from_le_bytes(id.try_into().unwrap()), 77);
        assert_eq!(read(layout::piece_data(ring_size, 3), 13), b"to the server");
        assert_eq!(layout::piece_lines(8), layout::PAGE);
        // A new program image maps one piece from the files; a successor
        // daemon adopts one.
        let again = Segment::map_piece(own.as_fd(), peer.as_fd(), 3, ring_size, Endpoint::Client).unwrap();
        assert_eq!(again.connection_id(0), 77);
        assert_eq!(again.consumer(1).state().unwrap(), RxState::Data(4));
        assert!(Segment::map_piece(own.as_fd(), peer.as_fd(), 3, ring_size, Endpoint::Server).is_err());
        let past = layout::CHUNK_PIECES;
        assert!(Segment::map_piece(own.as_fd(), peer.as_fd(), past, ring_size, Endpoint::Client).is_err());
        let adopted = Segment::adopt_piece(&files, 3, ring_size).unwrap();
        assert_eq!(adopted.producer(0).total(), 13);
        // Files of another kind or size are refused; the peer's file cannot
        // be mapped writable.
        let (_segment, plain) = Segment::create(ring_size).unwrap();
        assert!(Chunk::map(plain.rw[0].as_fd(), plain.rw[1].as_fd(), ring_size, Endpoint::Client).is_err());
        assert!(Chunk::map(own.as_fd(), peer.as_fd(), 8192, Endpoint::Client).is_err());
        assert!(Chunk::map(peer.as_fd(), own.as_fd(), ring_size, Endpoint::Server).is_err());
    }

    #[test]
    fn a_connect_queue_carries_the_clients_slots_to_its_readers() {
        let (daemon, rw, ro) = ConnectQueue::create(7).unwrap();
        let client = ConnectQueue::map(rw.as_fd(), 7, true).unwrap();
        let server = ConnectQueue::map(ro.as_fd(), 7, false).unwrap();
        assert_eq!((server.produced(), server.slot(0)), (0, None));
        client.publish(grant::Slot { sequence: 3, port: 40000 });
        client.publish(grant::Slot { sequence: 4, port: 40001 });
        for reader in [&server, &daemon] {
            assert_eq!(reader.produced(), 2);
            assert_eq!(reader.slot(1), Some(grant::Slot { sequence: 4, port: 40001 }));
        }
        // Another grant's page, or a page of another kind, is refused.
        assert!(ConnectQueue::map(ro.as_fd(), 8, false).is_err());
        let (_segment, files) = Segment::create(4096).unwrap();
        assert!(ConnectQueue::map(files.rw[0].as_fd(), 7, false).is_err());
        // The server's descriptor cannot be mapped writable.
        assert!(ConnectQueue::map(ro.as_fd(), 7, true).is_err());
    }

    #[test]
    fn a_kits_claim_word_is_the_servers_and_reset_clears_it() {
        let (daemon, _files, client, server) = three_views(4096);
        assert_eq!(client.claim().load(Ordering::Relaxed), layout::KIT_WAITING);
        assert!(server
            .claim()
            .compare_exchange(layout::KIT_WAITING, layout::KIT_ACCEPTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok());
        assert!(daemon
            .claim()
            .compare_exchange(layout::KIT_WAITING, layout::KIT_REVOKED, Ordering::AcqRel, Ordering::Acquire)
            .is_err());
        assert_eq!(client.claim().load(Ordering::Relaxed), layout::KIT_ACCEPTED);
        daemon.reset();
        assert_eq!(server.claim().load(Ordering::Relaxed), layout::KIT_WAITING);
    }

    #[test]
    fn a_kits_take_word_is_the_clients_decided_once_and_reset_clears_it() {
        let (daemon, _files, client, server) = three_views(4096);
        let taken = layout::KIT_TAKEN | 41_000;
        assert!(client.take().compare_exchange(layout::KIT_FREE, taken, Ordering::AcqRel, Ordering::Acquire).is_ok());
        // The daemon ends only a kit no client took.
        assert_eq!(
            daemon.take().compare_exchange(layout::KIT_FREE, layout::KIT_GONE, Ordering::AcqRel, Ordering::Acquire),
            Err(taken)
        );
        assert_eq!(layout::taken_port(server.take().load(Ordering::Acquire)), Some(41_000));
        // It does not share the claim word's place.
        assert_eq!(server.claim().load(Ordering::Relaxed), layout::KIT_WAITING);
        daemon.reset();
        assert_eq!(client.take().load(Ordering::Relaxed), layout::KIT_FREE);
    }

    #[test]
    fn the_ends_and_the_daemon_see_each_other() {
        let (daemon, _files, client, server) = three_views(4096);
        client.producer(0).write(&[b"ping"]).unwrap();
        assert_eq!(server.consumer(0).state().unwrap(), RxState::Data(4));
        assert_eq!(daemon.producer(0).total(), 4);
        let mut buf = [0u8; 8];
        assert_eq!(server.consumer(0).read(&mut [&mut buf[..]], false).unwrap().0, 4);
        assert_eq!(&buf[..4], b"ping");
        assert_eq!(daemon.consumer(0).total(), 4);
        server.producer(1).write(&[b"pong!"]).unwrap();
        assert_eq!(client.consumer(1).read(&mut [&mut buf[..]], false).unwrap().0, 5);
        assert_eq!(&buf[..5], b"pong!");
        // Wake-ups cross without either end writing the other's half.
        client.consumer(1).arm();
        assert!(server.producer(1).write(&[b"x"]).unwrap().1);
        assert!(!server.producer(1).write(&[b"y"]).unwrap().1, "one wake-up per arming");
    }

    #[test]
    fn an_end_cannot_write_its_peers_half() {
        let (_daemon, files, _client, _server) = three_views(4096);
        // The descriptor of the peer's half refuses a writable mapping, a
        // write, and a later mprotect of a read-only mapping.
        let peer = files.read_only(Endpoint::Server).unwrap();
        let peer = peer.as_fd();
        let len = layout::half_size(4096);
        // SAFETY: a mapping attempt that must fail; nothing is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                peer.as_raw_fd(),
                0,
            )
        };
        assert_eq!(ptr, libc::MAP_FAILED);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::EACCES));
        // SAFETY: writes one byte from a local.
        let n = unsafe { libc::pwrite(peer.as_raw_fd(), b"x".as_ptr() as *const libc::c_void, 1, 0) };
        assert_eq!(n, -1);
        // SAFETY: a read-only shared mapping, unmapped below.
        let ro =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, peer.as_raw_fd(), 0) };
        assert_ne!(ro, libc::MAP_FAILED);
        // SAFETY: changes the protection of our own mapping (refused).
        assert_eq!(unsafe { libc::mprotect(ro, len, libc::PROT_READ | libc::PROT_WRITE) }, -1);
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(ro, len) };
        // Nor can a process of another user open the file again writable
        // through /proc/self/fd (as the daemon's user can).
        assert_eq!(reopen_as_nobody(peer, libc::O_RDWR), Err(libc::EACCES));
        // (The same reopen works for a file whose mode allows it.)
        let open_file = tempfile_0666();
        assert_eq!(reopen_as_nobody(open_file.as_fd(), libc::O_RDWR), Ok(()));
    }

    /// A file anyone may write, already unlinked.
    fn tempfile_0666() -> OwnedFd {
        let path = std::env::temp_dir().join(format!("vsocket-ring-test-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
        std::fs::remove_file(&path).unwrap();
        file.into()
    }

    /// Opens `/proc/self/fd/N` for `fd` with `flags` in a child process
    /// running as user and group 65534 (nobody): the errno it failed with.
    fn reopen_as_nobody(fd: BorrowedFd<'_>, flags: libc::c_int) -> Result<(), libc::c_int> {
        let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        // SAFETY: the child only makes async-signal-safe calls (setgroups,
        // setgid, setuid, prctl, open, _exit) on data prepared before fork.
        unsafe {
            let child = libc::fork();
            assert!(child >= 0);
            if child == 0 {
                let code = if libc::geteuid() == 0
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(65534) != 0
                        || libc::setuid(65534) != 0)
                {
                    255
                } else {
                    // A process that changed its user is not dumpable, which
                    // would close /proc/self to it for another reason.
                    libc::prctl(libc::PR_SET_DUMPABLE, 1);
                    if libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) >= 0 {
                        0
                    } else {
                        *libc::__errno_location()
                    }
                };
                libc::_exit(code);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(child, &mut status, 0), child);
            assert!(libc::WIFEXITED(status));
            match libc::WEXITSTATUS(status) {
                0 => Ok(()),
                255 => panic!("cannot become nobody"),
                errno => Err(errno),
            }
        }
    }

    #[test]
    fn a_reset_segment_is_a_fresh_one() {
        let (daemon, files, client, server) = three_views(4096);
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
        daemon.set_connection_id(77);
        assert_eq!((client.connection_id(0), client.connection_id(1)), (77, 77));
        let fd = files.rw[0].as_fd();
        assert_eq!(
            Segment::identity(fd).unwrap(),
            Segment::identity(files.read_only(Endpoint::Client).unwrap().as_fd()).unwrap()
        );
        assert_eq!(Segment::read_nonce(fd).unwrap(), client.nonce(0));
        let identity = Segment::identity(fd).unwrap();
        let mut files = files;
        files.let_go_of_read_only();
        let again = files.read_only(Endpoint::Client).unwrap();
        assert!(matches!(again, ReadOnly::Opened(_)), "opened again, not kept");
        assert_eq!(identity, Segment::identity(again.as_fd()).unwrap());
        // SAFETY: F_GETFL on a descriptor we own.
        let mode = unsafe { libc::fcntl(again.as_fd().as_raw_fd(), libc::F_GETFL) } & libc::O_ACCMODE;
        assert_eq!(mode, libc::O_RDONLY, "opened again read-only");
        assert_ne!(client.nonce(0), 0);
        assert_ne!(client.nonce(0), client.nonce(1));
        let (_other, other) = Segment::create(4096).unwrap();
        assert_ne!(Segment::read_nonce(other.rw[0].as_fd()).unwrap(), client.nonce(0));
    }

    #[test]
    fn halves_of_the_wrong_size_end_or_unsealed_are_refused() {
        let (_daemon, files) = Segment::create(4096).unwrap();
        let copies = files.clone_for(Endpoint::Client).unwrap();
        let [own, peer] = [copies[0].as_fd(), copies[1].as_fd()];
        assert!(Segment::map(own, peer, 8192, Endpoint::Client).is_err());
        // Halves swapped: each header names the other end.
        assert!(Segment::map(peer, own, 4096, Endpoint::Client).is_err());
        assert!(Segment::map(own, peer, 4096, Endpoint::Server).is_err());
        // SAFETY: a plain memfd without seals.
        let raw = unsafe { libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: just created, owned here.
        let plain = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: plain syscall on our descriptor.
        unsafe { libc::ftruncate(plain.as_raw_fd(), layout::half_size(4096) as libc::off_t) };
        assert!(Segment::map(plain.as_fd(), peer, 4096, Endpoint::Client).is_err());
    }
}
