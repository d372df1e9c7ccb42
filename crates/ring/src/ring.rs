//! Producer and consumer views of one ring.
//!
//! Each side writes only its own control line (which lives in its own
//! half of the connection's memory), so the wake-up protocol never writes
//! the other side's words. A side about to sleep stores a fresh odd value
//! in its `waiting` word (an *arming*), then re-reads the other side's
//! index; the other side stores its index, then reads `waiting` and, only
//! if it holds an arming it has not answered yet (odd, and not the value
//! in its own `woken` word), records it in `woken` and reports that a
//! wake-up is due. A SeqCst fence sits between the store and the load on
//! both sides (model-checked in `tests/loom.rs`), so at least one side sees
//! the other: either the sleeper finds the new bytes (or space) and does
//! not sleep, or the writer sees the arming and wakes it. Nobody is woken
//! who is not asleep, and each arming is woken at most once.
//!
//! Every load of the peer's words is validated (see [`crate::index`]);
//! the ring size is held privately and never read from shared memory.

use crate::index::{self, Corrupt};
use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};
use vsocket_abi::layout::{CONSUMER_CLOSED, PRODUCER_FIN, PRODUCER_RST, WRITER_AWARE};

/// Words written by the producer (one 128-byte line in its half).
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub struct ProducerLine {
    /// Bytes written since the connection began.
    pub tail: AtomicU64,
    /// `PRODUCER_FIN` / `PRODUCER_RST`.
    pub flags: AtomicU32,
    /// Odd while the producer waits for space (a fresh value per arming).
    pub waiting: AtomicU64,
    /// The consumer's arming this producer last answered with a wake-up.
    pub woken: AtomicU64,
    /// `WRITER_AWARE` once a writer of this end has taken the write claim
    /// (see [`trim_idle`]).
    pub writing: AtomicU32,
    /// Non-zero while the daemon returns the data pages of an empty ring
    /// (see [`trim_idle`]).
    pub trim: AtomicU32,
    /// The process copying into the ring now, if any (see
    /// [`Producer::try_claim`]): 0 when none. The daemon returns the ring's
    /// pages only while it is 0 (see [`trim_idle`]).
    pub claim: AtomicU32,
}

/// Words written by the consumer (one 128-byte line in its half).
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub struct ConsumerLine {
    /// Bytes consumed since the connection began.
    pub head: AtomicU64,
    /// `CONSUMER_CLOSED`.
    pub flags: AtomicU32,
    /// Odd while the consumer waits for bytes (a fresh value per arming).
    pub waiting: AtomicU64,
    /// The producer's arming this consumer last answered with a wake-up.
    pub woken: AtomicU64,
    /// The process taking bytes from the ring now, if any (see
    /// [`Consumer::try_claim`]): 0 when none.
    pub claim: AtomicU32,
}

impl ProducerLine {
    /// Back to a fresh connection's values.
    pub fn clear(&self) {
        self.tail.store(0, Ordering::Relaxed);
        self.flags.store(0, Ordering::Relaxed);
        self.waiting.store(0, Ordering::Relaxed);
        self.woken.store(0, Ordering::Relaxed);
        self.writing.store(0, Ordering::Relaxed);
        self.trim.store(0, Ordering::Relaxed);
        self.claim.store(0, Ordering::Relaxed);
    }
}

impl ConsumerLine {
    /// Back to a fresh connection's values.
    pub fn clear(&self) {
        self.head.store(0, Ordering::Relaxed);
        self.flags.store(0, Ordering::Relaxed);
        self.waiting.store(0, Ordering::Relaxed);
        self.woken.store(0, Ordering::Relaxed);
        self.claim.store(0, Ordering::Relaxed);
    }
}

/// Both control lines of one ring in ordinary memory (tests, fuzzing and
/// model checking; a connection keeps them in the two ends' halves).
#[repr(C)]
#[derive(Debug, Default)]
pub struct RingControl {
    pub producer: ProducerLine,
    pub consumer: ConsumerLine,
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<ProducerLine>() == vsocket_abi::layout::LINE);
#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<ConsumerLine>() == vsocket_abi::layout::LINE);

/// A ring operation found the connection unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingError {
    /// The peer published an impossible index: the connection is broken.
    Corrupt,
    /// The consumer closed its end: writes fail with EPIPE.
    PeerClosed,
}

impl From<Corrupt> for RingError {
    fn from(_: Corrupt) -> Self {
        RingError::Corrupt
    }
}

/// Why [`Consumer::send_to`] or [`Producer::recv_from`] failed.
#[derive(Debug)]
pub enum SocketError {
    /// The ring's indices are impossible.
    Ring(RingError),
    /// The socket failed.
    Io(std::io::Error),
}

/// What one [`Producer::recv_from`] took from its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Bytes written into the ring (and published).
    pub ring: usize,
    /// Bytes written into the spill buffer, after those.
    pub spill: usize,
    /// The consumer must be woken.
    pub wake: bool,
}

/// What the consumer may expect from the ring right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// This many bytes can be read.
    Data(u32),
    /// Nothing to read yet.
    Empty,
    /// The producer finished: end of stream.
    Fin,
    /// The producer aborted: ECONNRESET.
    Reset,
}

/// The shared part of both views: both control lines, data area and size.
#[derive(Debug, Clone, Copy)]
struct Shared<'a> {
    prod: &'a ProducerLine,
    cons: &'a ConsumerLine,
    data: *mut u8,
    size: u32,
    /// Set (in this process's own memory) once the other side is known to
    /// be gone: the stream then reads as finished and writes as refused,
    /// without writing the other side's words.
    gone: Option<&'a std::sync::atomic::AtomicBool>,
}

impl<'a> Shared<'a> {
    /// # Safety
    /// `data` must point to `size` bytes that stay mapped for `'a` and that
    /// no Rust reference aliases; `size` must be a power of two.
    unsafe fn new(prod: &'a ProducerLine, cons: &'a ConsumerLine, data: *mut u8, size: u32) -> Self {
        assert!(size.is_power_of_two());
        Shared { prod, cons, data, size, gone: None }
    }

    fn other_side_gone(&self) -> bool {
        self.gone.is_some_and(|g| g.load(Ordering::Relaxed))
    }

    /// Called after publishing progress: is the other side's `waiting`
    /// an arming not yet answered? If so, records it in our own `woken`
    /// and says a wake-up is due. The fence pairs with the one in `arm`
    /// (store-fence-load on both sides, the fence form of Dekker's
    /// protocol), so one side always sees the other's store.
    fn take_waiter(waiting: &AtomicU64, woken: &AtomicU64) -> bool {
        fence(Ordering::SeqCst);
        let armed = waiting.load(Ordering::Relaxed);
        if armed & 1 == 0 || woken.load(Ordering::Relaxed) == armed {
            return false;
        }
        woken.store(armed, Ordering::Relaxed);
        true
    }

    /// Before the data area is touched, after the writer took the write
    /// claim (fence, load: the writer's half of [`trim_idle`]'s Dekker
    /// protocol, whose store is the claim): waits if the daemon is
    /// returning the ring's pages right now. A daemon that takes longer
    /// than [`TRIM_PATIENCE`] gets the write refused as a corrupt ring (the
    /// connection is reset): a write then might yet be punched, and a reset
    /// says so where lost bytes would not.
    fn begin_write(&self) -> Result<(), RingError> {
        fence(Ordering::SeqCst);
        if self.prod.trim.load(Ordering::Acquire) != 0 && !wait_untrimmed(&self.prod.trim) {
            return Err(RingError::Corrupt);
        }
        Ok(())
    }

    /// The producer, after publishing: must the consumer be woken?
    fn wake_consumer(&self) -> bool {
        Self::take_waiter(&self.cons.waiting, &self.prod.woken)
    }

    /// The consumer, after publishing: must the producer be woken?
    fn wake_producer(&self) -> bool {
        Self::take_waiter(&self.prod.waiting, &self.cons.woken)
    }

    /// Called before sleeping: announce a fresh arming (an odd value the
    /// other side has not answered), then fence (see `take_waiter`). The
    /// value moves by compare-and-swap, so that threads (or forked
    /// processes) of one side arming at once each leave a value newer than
    /// any the other side answered; the counter is 64 bits wide so that it
    /// never comes round to one.
    fn arm(waiting: &AtomicU64) {
        let _ = waiting.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
            Some(if w & 1 == 1 { w.wrapping_add(2) } else { w.wrapping_add(1) })
        });
        fence(Ordering::SeqCst);
    }

    /// Called by a waiter that woke for another reason and will check this
    /// ring before it sleeps again (re-arming first): the other side need
    /// not ring the doorbell any more.
    fn disarm(waiting: &AtomicU64) {
        let _ = waiting.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| (w & 1 == 1).then(|| w.wrapping_add(1)));
    }
}

/// How long a writer waits for the daemon to finish returning its ring's
/// pages before it gives up (see [`Shared::begin_write`]): the daemon
/// takes microseconds; only one stopped between its two stores (or killed
/// there) keeps a writer waiting this long.
#[cfg(not(loom))]
const TRIM_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until the daemon has returned the ring's pages (its `trim` word
/// back to zero), at most [`TRIM_PATIENCE`]; false if it did not.
fn wait_untrimmed(trim: &AtomicU32) -> bool {
    #[cfg(not(loom))]
    let mut backoff = crate::spin::Backoff::new();
    while trim.load(Ordering::Acquire) != 0 {
        #[cfg(loom)]
        loom::thread::yield_now();
        #[cfg(not(loom))]
        if !backoff.wait(TRIM_PATIENCE) {
            return false;
        }
    }
    true
}

/// The daemon's side of returning an empty ring's data pages to the host
/// (ARCHITECTURE §3c, stage 5): calls `punch` (which discards the data
/// area's pages) only if the ring is empty (the consumer took every byte
/// the producer published) and no write is under way, and keeps any write
/// from starting until `punch` returns. Returns what `punch` returned, or
/// `None` if the ring was not found empty and quiet, or its writer does not
/// keep the protocol (`WRITER_AWARE` unset: a library from before it).
/// (Only the daemon writes `trim`, and only here.)
///
/// Dekker's protocol, as the wake-up's: the daemon stores `trim`, fences,
/// then reads the write claim; a writer takes the claim
/// ([`Producer::try_claim`]), fences, then reads `trim` (`begin_write`),
/// and lets the claim go (Release) once its tail is published. At least
/// one sees the other: either the daemon
/// sees the write under way and punches nothing, or the writer sees
/// `trim` and waits until it is clear again, then writes into fresh zero
/// pages. The consumer reads only bytes before the tail and publishes its
/// head (Release) after copying them, so an empty ring's pages hold no
/// byte anyone will read. (A hostile end can only hurt its own stream: a
/// consumer that publishes a head it did not reach loses bytes sent to it,
/// a producer that writes without the claim loses its own.)
pub fn trim_idle<R>(prod: &ProducerLine, cons: &ConsumerLine, punch: impl FnOnce() -> R) -> Option<R> {
    let quiet = || {
        prod.writing.load(Ordering::Relaxed) & WRITER_AWARE != 0
            && prod.claim.load(Ordering::Acquire) == 0
            && cons.head.load(Ordering::Acquire) == prod.tail.load(Ordering::Acquire)
    };
    if !quiet() {
        return None;
    }
    prod.trim.store(1, Ordering::Relaxed);
    fence(Ordering::SeqCst);
    let punched = quiet().then(punch);
    prod.trim.store(0, Ordering::Release);
    punched
}

/// A message header over `iov` (no address, no control data).
fn msghdr(iov: &[libc::iovec]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    msg
}

/// The writing side of a ring.
#[derive(Debug, Clone, Copy)]
pub struct Producer<'a>(Shared<'a>);

/// The reading side of a ring.
#[derive(Debug, Clone, Copy)]
pub struct Consumer<'a>(Shared<'a>);

impl<'a> Producer<'a> {
    /// # Safety
    /// `data` must point to `size` writable bytes that stay mapped for `'a`
    /// and that no Rust reference aliases; `size` must be a power of two.
    pub unsafe fn new(producer: &'a ProducerLine, consumer: &'a ConsumerLine, data: *mut u8, size: u32) -> Self {
        // SAFETY: forwarded from this function's contract.
        Producer(unsafe { Shared::new(producer, consumer, data, size) })
    }

    /// This view, with writes refused (as if the consumer had closed) once
    /// `gone` is set: the caller's own record that the consumer is gone.
    pub fn or_gone(mut self, gone: &'a std::sync::atomic::AtomicBool) -> Self {
        self.0.gone = Some(gone);
        self
    }

    /// Free space, or why writing is impossible.
    pub fn space(&self) -> Result<u32, RingError> {
        let s = &self.0;
        let closed = s.cons.flags.load(Ordering::Acquire) & CONSUMER_CLOSED != 0 || s.other_side_gone();
        let tail = s.prod.tail.load(Ordering::Relaxed);
        let head = s.cons.head.load(Ordering::Acquire);
        // Indices that make no sense are reported first, closed or not:
        // whether the peer has closed by then must not decide whether this
        // side learns that its stream is corrupt.
        let space = index::writable(tail, head, s.size)?;
        if closed {
            return Err(RingError::PeerClosed);
        }
        Ok(space)
    }

    /// Copies as much of `bufs` as fits and publishes it. Returns the bytes
    /// written (0 when full) and whether the consumer must be woken.
    pub fn write(&self, bufs: &[&[u8]]) -> Result<(usize, bool), RingError> {
        let s = &self.0;
        let space = self.space()?;
        if space == 0 || bufs.iter().all(|b| b.is_empty()) {
            return Ok((0, false));
        }
        s.begin_write()?;
        let tail = s.prod.tail.load(Ordering::Relaxed);
        let mut pos = tail;
        let mut left = space;
        for buf in bufs {
            if left == 0 {
                break;
            }
            let n = (buf.len() as u64).min(u64::from(left)) as u32;
            let (offset, first, second) = index::split(pos, n, s.size);
            // The consumer reads only bytes before `tail`; these are after it.
            // SAFETY: `split` keeps both parts inside the `size`-byte data area
            // (constructor contract); `buf` holds at least `n` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(buf.as_ptr(), s.data.add(offset), first);
                std::ptr::copy_nonoverlapping(buf.as_ptr().add(first), s.data, second);
            }
            pos = pos.wrapping_add(u64::from(n));
            left -= n;
        }
        let written = (space - left) as usize;
        if written == 0 {
            return Ok((0, false));
        }
        s.prod.tail.store(pos, Ordering::Release);
        Ok((written, s.wake_consumer()))
    }

    /// Receives up to `len` bytes from the stream socket `fd` straight
    /// into the ring (as far as it has space) and publishes them; in the
    /// same call, whatever the socket has after them lands in `spill`.
    /// Nothing waits: a socket with nothing to read gives an `Io` error of
    /// kind `WouldBlock`, and end of stream gives a [`Received`] of zeros.
    pub fn recv_from(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        len: usize,
        spill: &mut [u8],
    ) -> Result<Received, SocketError> {
        use std::os::fd::AsRawFd;
        let s = &self.0;
        let space = self.space().map_err(SocketError::Ring)?;
        s.begin_write().map_err(SocketError::Ring)?;
        let tail = s.prod.tail.load(Ordering::Relaxed);
        let n = (len as u64).min(u64::from(space)) as u32;
        let (offset, first, second) = index::split(tail, n, s.size);
        // The consumer reads only bytes before `tail`; these are after it.
        // SAFETY: `split` keeps both parts inside the data area (constructor
        // contract), which the kernel writes; `spill` is borrowed mutably.
        let iov = unsafe {
            [
                libc::iovec { iov_base: s.data.add(offset).cast(), iov_len: first },
                libc::iovec { iov_base: s.data.cast(), iov_len: second },
                libc::iovec { iov_base: spill.as_mut_ptr().cast(), iov_len: spill.len() },
            ]
        };
        let mut msg = msghdr(&iov);
        // SAFETY: `msg` points at three live iovecs over writable memory.
        let got = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if got < 0 {
            return Err(SocketError::Io(std::io::Error::last_os_error()));
        }
        let got = got as usize;
        let ring = got.min(n as usize);
        if ring == 0 {
            return Ok(Received { ring: 0, spill: got, wake: false });
        }
        s.prod.tail.store(tail.wrapping_add(ring as u64), Ordering::Release);
        let wake = s.wake_consumer();
        Ok(Received { ring, spill: got - ring, wake })
    }

    /// Ends the stream (FIN). Returns whether the consumer must be woken.
    pub fn finish(&self) -> bool {
        self.0.prod.flags.fetch_or(PRODUCER_FIN, Ordering::Release);
        self.0.wake_consumer()
    }

    /// Aborts the stream (RST). Returns whether the consumer must be woken.
    pub fn reset(&self) -> bool {
        self.0.prod.flags.fetch_or(PRODUCER_RST | PRODUCER_FIN, Ordering::Release);
        self.0.wake_consumer()
    }

    /// Has this side already ended the stream?
    pub fn finished(&self) -> bool {
        self.0.prod.flags.load(Ordering::Relaxed) & PRODUCER_FIN != 0
    }

    /// Claims the ring for one write by process `me` (non-zero): the
    /// processes holding one end (after fork) take turns this way, so that
    /// two never copy at the tail they both read. `Err` names the holder.
    /// The claim is held while bytes are copied and published, never while
    /// waiting for room, and its Acquire pairs with the previous holder's
    /// Release (`release_claim`): this writer sees the tail it published.
    /// While it is held the daemon returns none of the ring's pages (see
    /// [`trim_idle`]), and a writer that takes it marks its end as one
    /// whose writers claim (`WRITER_AWARE`).
    pub fn try_claim(&self, me: u32) -> Result<(), u32> {
        self.take_claim(0, me)
    }

    /// Takes the claim from `holder` (0: nobody; else a process that is
    /// gone, which died while it held the claim); `Err` names the holder
    /// found instead.
    pub fn take_claim(&self, holder: u32, me: u32) -> Result<(), u32> {
        let prod = self.0.prod;
        take_claim(&prod.claim, holder, me)?;
        if prod.writing.load(Ordering::Relaxed) & WRITER_AWARE == 0 {
            prod.writing.fetch_or(WRITER_AWARE, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Lets go of `me`'s claim (if it is still its).
    pub fn release_claim(&self, me: u32) {
        release_claim(&self.0.prod.claim, me);
    }

    /// Has a writer of this side ended the stream without aborting it (a
    /// shutdown, here or in another process holding the same end)? An
    /// abort is the daemon's reset or a last close that lost bytes.
    pub fn shut(&self) -> bool {
        self.0.prod.flags.load(Ordering::Relaxed) & (PRODUCER_FIN | PRODUCER_RST) == PRODUCER_FIN
    }

    /// Announces that this side is about to sleep until space frees up.
    /// The caller must re-check [`Producer::space`] before sleeping.
    pub fn arm(&self) {
        Shared::arm(&self.0.prod.waiting);
    }

    /// Withdraws an `arm`; the caller checks [`Producer::space`] (and arms
    /// again) before it next sleeps.
    pub fn disarm(&self) {
        Shared::disarm(&self.0.prod.waiting);
    }

    /// The latest of this side's armings the consumer has answered with a
    /// wake-up: a new value means a new ring (the consumer may forge it).
    pub fn answered(&self) -> u64 {
        self.0.cons.woken.load(Ordering::Relaxed)
    }

    /// Bytes written so far (for metering; the peer may forge it).
    pub fn total(&self) -> u64 {
        self.0.prod.tail.load(Ordering::Relaxed)
    }
}

impl<'a> Consumer<'a> {
    /// # Safety
    /// `data` must point to `size` readable bytes that stay mapped for `'a`
    /// and that no Rust reference aliases; `size` must be a power of two.
    pub unsafe fn new(producer: &'a ProducerLine, consumer: &'a ConsumerLine, data: *mut u8, size: u32) -> Self {
        // SAFETY: forwarded from this function's contract.
        Consumer(unsafe { Shared::new(producer, consumer, data, size) })
    }

    /// This view, with the stream finished (after the bytes already in the
    /// ring, as if the producer had ended it) once `gone` is set: the
    /// caller's own record that the producer is gone.
    pub fn or_gone(mut self, gone: &'a std::sync::atomic::AtomicBool) -> Self {
        self.0.gone = Some(gone);
        self
    }

    /// The most bytes the ring can hold.
    pub fn capacity(&self) -> u32 {
        self.0.size
    }

    /// Asks the processor for what [`Consumer::state`] and
    /// [`Consumer::fin_received`] read (the first cache line of each
    /// control line, where `tail`, `flags` and `head` are), without
    /// waiting for it: a caller about to judge many rings asks for the
    /// next few first, so that their cache misses overlap instead of
    /// coming one after another.
    #[inline]
    pub fn prefetch(&self) {
        prefetch(self.0.prod);
        prefetch(self.0.cons);
    }

    /// What a read would find now.
    pub fn state(&self) -> Result<RxState, RingError> {
        let s = &self.0;
        // Flags first: bytes published before FIN/RST are then visible below.
        let flags = s.prod.flags.load(Ordering::Acquire) | if s.other_side_gone() { PRODUCER_FIN } else { 0 };
        let tail = s.prod.tail.load(Ordering::Acquire);
        let head = s.cons.head.load(Ordering::Relaxed);
        let n = index::readable(tail, head, s.size)?;
        Ok(if n > 0 {
            RxState::Data(n)
        } else if flags & PRODUCER_RST != 0 {
            RxState::Reset
        } else if flags & PRODUCER_FIN != 0 {
            RxState::Fin
        } else {
            RxState::Empty
        })
    }

    /// Claims the ring for one read by process `me` (non-zero), as
    /// [`Producer::try_claim`] does for a write: the processes holding one
    /// end (after fork) take bytes in turns, so that two never copy from
    /// the head they both read and each byte goes to one of them. Held
    /// while bytes are copied and the head published (and, for a read that
    /// peeks and then consumes what it used, across both), never while
    /// waiting for bytes; its Acquire pairs with the previous holder's
    /// Release (`release_claim`): this reader sees the head it published.
    pub fn try_claim(&self, me: u32) -> Result<(), u32> {
        self.take_claim(0, me)
    }

    /// Takes the read claim from `holder` (0: nobody; else a process that
    /// is gone); `Err` names the holder found instead.
    pub fn take_claim(&self, holder: u32, me: u32) -> Result<(), u32> {
        take_claim(&self.0.cons.claim, holder, me)
    }

    /// Lets go of `me`'s read claim (if it is still its).
    pub fn release_claim(&self, me: u32) {
        release_claim(&self.0.cons.claim, me);
    }

    /// Copies up to the readable bytes into `bufs`; unless `peek`, consumes
    /// them. Returns the bytes copied and whether the producer must be woken.
    pub fn read(&self, bufs: &mut [&mut [u8]], peek: bool) -> Result<(usize, bool), RingError> {
        let s = &self.0;
        let head = s.cons.head.load(Ordering::Relaxed);
        let tail = s.prod.tail.load(Ordering::Acquire);
        let avail = index::readable(tail, head, s.size)?;
        let mut pos = head;
        let mut left = avail;
        for buf in bufs.iter_mut() {
            if left == 0 {
                break;
            }
            let n = (buf.len() as u64).min(u64::from(left)) as u32;
            let (offset, first, second) = index::split(pos, n, s.size);
            // The untrusted producer may scribble on these bytes meanwhile: a
            // torn copy corrupts only its own stream, never our memory.
            // SAFETY: `split` keeps both parts inside the data area
            // (constructor contract); `buf` has room for `n` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(s.data.add(offset), buf.as_mut_ptr(), first);
                std::ptr::copy_nonoverlapping(s.data, buf.as_mut_ptr().add(first), second);
            }
            pos = pos.wrapping_add(u64::from(n));
            left -= n;
        }
        let read = (avail - left) as usize;
        if read == 0 || peek {
            return Ok((read, false));
        }
        s.cons.head.store(pos, Ordering::Release);
        Ok((read, s.wake_producer()))
    }

    /// Sends `header` and then up to `len` readable bytes straight from the
    /// ring to the stream socket `fd` (one `sendmsg`, non-blocking), and
    /// consumes the ring bytes the socket took. Returns the bytes sent in
    /// all (header included; possibly fewer than offered, even none) and
    /// whether the producer must be woken.
    pub fn send_to(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        header: &[u8],
        len: usize,
    ) -> Result<(usize, bool), SocketError> {
        use std::os::fd::AsRawFd;
        let s = &self.0;
        let head = s.cons.head.load(Ordering::Relaxed);
        let tail = s.prod.tail.load(Ordering::Acquire);
        let avail = index::readable(tail, head, s.size).map_err(|_| SocketError::Ring(RingError::Corrupt))?;
        let n = (len as u64).min(u64::from(avail)) as u32;
        let (offset, first, second) = index::split(head, n, s.size);
        // SAFETY: `split` keeps both parts inside the data area (constructor
        // contract). The kernel reads them; a producer scribbling meanwhile
        // corrupts only its own stream.
        let iov = unsafe {
            [
                libc::iovec { iov_base: header.as_ptr() as *mut libc::c_void, iov_len: header.len() },
                libc::iovec { iov_base: s.data.add(offset).cast(), iov_len: first },
                libc::iovec { iov_base: s.data.cast(), iov_len: second },
            ]
        };
        let msg = msghdr(&iov[..if second > 0 { 3 } else { 2 }]);
        // SAFETY: `msg` points at live iovecs over readable memory.
        let sent = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if sent < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok((0, false)),
                _ => Err(SocketError::Io(e)),
            };
        }
        let sent = sent as usize;
        let taken = sent.saturating_sub(header.len());
        if taken == 0 {
            return Ok((sent, false));
        }
        s.cons.head.store(head.wrapping_add(taken as u64), Ordering::Release);
        Ok((sent, s.wake_producer()))
    }

    /// Discards up to `n` readable bytes (used by shutdown(SHUT_RD) and
    /// close). Returns the bytes dropped and whether to wake the producer.
    pub fn discard(&self, n: usize) -> Result<(usize, bool), RingError> {
        let s = &self.0;
        let head = s.cons.head.load(Ordering::Relaxed);
        let tail = s.prod.tail.load(Ordering::Acquire);
        let avail = index::readable(tail, head, s.size)? as usize;
        let k = avail.min(n);
        if k == 0 {
            return Ok((0, false));
        }
        s.cons.head.store(head.wrapping_add(k as u64), Ordering::Release);
        Ok((k, s.wake_producer()))
    }

    /// Closes the reading side: the producer's writes fail from now on.
    /// Returns whether the producer must be woken.
    pub fn close(&self) -> bool {
        self.0.cons.flags.fetch_or(CONSUMER_CLOSED, Ordering::Release);
        self.0.wake_producer()
    }

    /// Announces that this side is about to sleep until bytes arrive.
    /// The caller must re-check [`Consumer::state`] before sleeping.
    pub fn arm(&self) {
        Shared::arm(&self.0.cons.waiting);
    }

    /// Withdraws an `arm`; the caller checks [`Consumer::state`] (and arms
    /// again) before it next sleeps.
    pub fn disarm(&self) {
        Shared::disarm(&self.0.cons.waiting);
    }

    /// The latest of this side's armings the producer has answered with a
    /// wake-up: a new value means a new ring (the producer may forge it).
    pub fn answered(&self) -> u64 {
        self.0.prod.woken.load(Ordering::Relaxed)
    }

    /// Has the producer ended the stream (FIN or RST), whether or not
    /// bytes remain to be read?
    pub fn fin_received(&self) -> bool {
        self.0.prod.flags.load(Ordering::Acquire) & (PRODUCER_FIN | PRODUCER_RST) != 0 || self.0.other_side_gone()
    }

    /// Has the consumer closed its end?
    pub fn closed(&self) -> bool {
        self.0.cons.flags.load(Ordering::Relaxed) & CONSUMER_CLOSED != 0
    }

    /// Bytes consumed so far (for metering; the peer may forge it).
    pub fn total(&self) -> u64 {
        self.0.cons.head.load(Ordering::Relaxed)
    }
}

/// Asks the processor to bring the line holding `what` into its caches.
/// Only a hint: nothing waits for it, and what is read later is read
/// afresh, so it cannot change what any load sees.
#[inline(always)]
fn prefetch<T>(what: &T) {
    prefetch_at((what as *const T).cast());
}

/// Asks for every line of `what` (see [`prefetch`]), for a caller about to
/// read fields of many objects in turn.
#[inline(always)]
pub fn prefetch_object<T>(what: &T) {
    let start = (what as *const T).cast::<u8>();
    for offset in (0..std::mem::size_of::<T>()).step_by(PREFETCH_STRIDE) {
        prefetch_at(start.wrapping_add(offset));
    }
}

/// A cache line's size, as far as prefetching is concerned (the control
/// lines of `layout::LINE` are two of them).
const PREFETCH_STRIDE: usize = 64;

/// SSE, which the prefetch instruction needs, is part of the x86-64
/// baseline.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_at(address: *const u8) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: a prefetch never faults nor changes memory or what a later
    // load returns, whatever the address (this one is in a live object).
    unsafe { _mm_prefetch::<_MM_HINT_T0>(address.cast()) }
}

/// Elsewhere the hint is not given: judging reads the same lines either way.
#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn prefetch_at(_address: *const u8) {}

/// Moves a claim word (a producer's or a consumer's) from `holder` to
/// `me`; `Err` names the holder found instead. Acquire: the new holder
/// sees what the last one published before it let go.
fn take_claim(word: &AtomicU32, holder: u32, me: u32) -> Result<(), u32> {
    word.compare_exchange(holder, me, Ordering::Acquire, Ordering::Relaxed).map(drop)
}

/// Lets go of `me`'s claim in `word`, if it is still its (Release).
fn release_claim(word: &AtomicU32, me: u32) {
    let _ = word.compare_exchange(me, 0, Ordering::Release, Ordering::Relaxed);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A ring in ordinary memory: the control block and a data area that
    /// only the views touch.
    struct TestRing {
        ctl: Box<RingControl>,
        data: *mut [u8],
    }

    impl TestRing {
        fn new(size: usize) -> Self {
            TestRing { ctl: Box::default(), data: Box::into_raw(vec![0u8; size].into_boxed_slice()) }
        }
        fn views(&self) -> (Producer<'_>, Consumer<'_>) {
            let size = self.data.len() as u32;
            let ptr = self.data as *mut u8;
            // SAFETY: `data` lives until drop and is only reached through views.
            unsafe {
                (
                    Producer::new(&self.ctl.producer, &self.ctl.consumer, ptr, size),
                    Consumer::new(&self.ctl.producer, &self.ctl.consumer, ptr, size),
                )
            }
        }
    }

    // SAFETY: the data area is only reached through ring views, which the
    // protocol keeps off each other's bytes (what the tests check).
    unsafe impl Sync for TestRing {}

    impl Drop for TestRing {
        fn drop(&mut self) {
            // SAFETY: `data` came from Box::into_raw in `new` and is freed once.
            drop(unsafe { Box::from_raw(self.data) });
        }
    }

    /// A punch that zeroes the test ring's data area, as returning its
    /// pages does.
    fn trim(ring: &TestRing) -> Option<()> {
        trim_idle(&ring.ctl.producer, &ring.ctl.consumer, || {
            // SAFETY: `data` lives until drop; no view is copying now.
            unsafe { (*ring.data).fill(0) }
        })
    }

    /// A write as a library makes it: under the write claim of process
    /// `me`.
    fn claimed_write(p: &Producer<'_>, me: u32, bytes: &[u8]) -> usize {
        p.try_claim(me).unwrap();
        let (n, _) = p.write(&[bytes]).unwrap();
        p.release_claim(me);
        n
    }

    #[test]
    fn only_an_empty_ring_whose_writer_keeps_the_protocol_is_trimmed() {
        let ring = TestRing::new(16);
        let (p, c) = ring.views();
        let mut buf = [0u8; 16];
        assert_eq!(trim(&ring), None, "no write yet: the writer may be a library from before");
        p.write(&[b"old"]).unwrap();
        c.read(&mut [&mut buf[..]], false).unwrap();
        assert_eq!(trim(&ring), None, "written without the claim: a library from before");
        claimed_write(&p, 7, b"abc");
        assert_eq!(trim(&ring), None, "bytes not read yet");
        c.read(&mut [&mut buf[..]], true).unwrap();
        assert_eq!(trim(&ring), None, "a peek takes nothing");
        c.read(&mut [&mut buf[..]], false).unwrap();
        p.try_claim(8).unwrap();
        assert_eq!(trim(&ring), None, "a write under way (another process's)");
        p.release_claim(8);
        assert_eq!(trim(&ring), Some(()), "empty and quiet");
        assert_eq!(ring.ctl.producer.trim.load(Ordering::Relaxed), 0, "the daemon's word is clear again");
        // The stream goes on across the returned pages, across the wrap.
        for round in 0..8u8 {
            let bytes = [round; 7];
            assert_eq!(claimed_write(&p, 7, &bytes), 7);
            let (n, _) = c.read(&mut [&mut buf[..]], false).unwrap();
            assert_eq!(&buf[..n], &bytes);
            assert_eq!(trim(&ring), Some(()));
        }
    }

    #[test]
    fn a_writer_waits_while_the_daemon_returns_the_pages() {
        let ring = TestRing::new(16);
        ring.ctl.producer.trim.store(1, Ordering::Relaxed);
        let wrote = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                claimed_write(&ring.views().0, 7, b"x");
                wrote.store(true, Ordering::Release);
            });
            // The writer took the claim, and waits.
            while ring.ctl.producer.claim.load(Ordering::Acquire) != 7 {
                std::thread::yield_now();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!wrote.load(Ordering::Acquire), "wrote while the pages were being returned");
            ring.ctl.producer.trim.store(0, Ordering::Release);
        });
        assert!(wrote.load(Ordering::Acquire));
        assert_eq!(ring.ctl.producer.writing.load(Ordering::Relaxed), WRITER_AWARE);
        assert_eq!(ring.ctl.producer.claim.load(Ordering::Relaxed), 0, "let go");
    }

    #[test]
    fn bytes_come_out_in_order_across_the_wrap() {
        let ring = TestRing::new(16);
        let (p, c) = ring.views();
        let mut expected = Vec::new();
        let mut got = Vec::new();
        let mut next = 0u8;
        for round in 0..200 {
            let chunk: Vec<u8> = (0..(round % 11 + 1))
                .map(|_| {
                    next = next.wrapping_add(1);
                    next
                })
                .collect();
            let (n, _) = p.write(&[&chunk]).unwrap();
            expected.extend_from_slice(&chunk[..n]);
            next = next.wrapping_sub((chunk.len() - n) as u8);
            let mut buf = [0u8; 7];
            let (m, _) = c.read(&mut [&mut buf[..]], false).unwrap();
            got.extend_from_slice(&buf[..m]);
        }
        let mut rest = [0u8; 16];
        let (m, _) = c.read(&mut [&mut rest[..]], false).unwrap();
        got.extend_from_slice(&rest[..m]);
        assert_eq!(got, expected);
    }

    #[test]
    fn send_to_sends_the_header_and_the_bytes_across_the_wrap_and_consumes_them() {
        use std::io::Read;
        use std::os::fd::AsFd;
        let ring = TestRing::new(16);
        let (p, c) = ring.views();
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        // Move the indices near the end so the bytes wrap.
        p.write(&[b"0123456789ab"]).unwrap();
        c.read(&mut [&mut [0u8; 12][..]], false).unwrap();
        p.write(&[b"wrapping-data"]).unwrap();
        let (sent, _) = c.send_to(theirs.as_fd(), b"HDR", 8).unwrap();
        assert_eq!(sent, 11);
        assert_eq!(c.state().unwrap(), RxState::Data(5));
        let mut got = [0u8; 11];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"HDRwrapping");
        // Asking for more than is there sends what is there.
        let (sent, _) = c.send_to(theirs.as_fd(), b"", 100).unwrap();
        assert_eq!(sent, 5);
        assert_eq!(c.state().unwrap(), RxState::Empty);
    }

    #[test]
    fn recv_from_fills_the_ring_across_the_wrap_then_the_spill() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let ring = TestRing::new(16);
        let (p, c) = ring.views();
        let (mut theirs, ours) = std::os::unix::net::UnixStream::pair().unwrap();
        // Move the indices near the end so the bytes wrap.
        p.write(&[b"0123456789ab"]).unwrap();
        c.read(&mut [&mut [0u8; 12][..]], false).unwrap();
        let mut spill = [0u8; 8];
        let e = p.recv_from(ours.as_fd(), 10, &mut spill).unwrap_err();
        assert!(matches!(e, SocketError::Io(ref e) if e.kind() == std::io::ErrorKind::WouldBlock));
        theirs.write_all(b"wrapping-dataNEXT").unwrap();
        let got = p.recv_from(ours.as_fd(), 13, &mut spill).unwrap();
        assert_eq!(got, Received { ring: 13, spill: 4, wake: false });
        assert_eq!(&spill[..4], b"NEXT");
        let mut out = [0u8; 16];
        assert_eq!(c.read(&mut [&mut out[..]], false).unwrap().0, 13);
        assert_eq!(&out[..13], b"wrapping-data");
        // A ring with less space than asked takes what fits; the rest spills.
        p.write(&[b"0123456789"]).unwrap();
        theirs.write_all(b"abcdefghij").unwrap();
        c.arm();
        let got = p.recv_from(ours.as_fd(), 10, &mut spill).unwrap();
        assert_eq!(got, Received { ring: 6, spill: 4, wake: true });
        assert_eq!(&spill[..4], b"ghij");
        // End of stream.
        drop(theirs);
        assert_eq!(p.recv_from(ours.as_fd(), 10, &mut spill).unwrap(), Received { ring: 0, spill: 0, wake: false });
    }

    #[test]
    fn full_ring_accepts_nothing_and_peek_consumes_nothing() {
        let ring = TestRing::new(8);
        let (p, c) = ring.views();
        assert_eq!(p.write(&[b"0123456789"]).unwrap().0, 8);
        assert_eq!(p.write(&[b"x"]).unwrap().0, 0);
        let mut buf = [0u8; 4];
        assert_eq!(c.read(&mut [&mut buf[..]], true).unwrap().0, 4);
        assert_eq!(c.state().unwrap(), RxState::Data(8));
        let mut a = [0u8; 3];
        let mut b = [0u8; 10];
        assert_eq!(c.read(&mut [&mut a[..], &mut b[..]], false).unwrap().0, 8);
        assert_eq!(&a, b"012");
        assert_eq!(&b[..5], b"34567");
    }

    #[test]
    fn fin_and_reset_follow_the_data() {
        let ring = TestRing::new(8);
        let (p, c) = ring.views();
        p.write(&[b"ab"]).unwrap();
        p.finish();
        assert_eq!(c.state().unwrap(), RxState::Data(2));
        c.discard(2).unwrap();
        assert_eq!(c.state().unwrap(), RxState::Fin);
        p.reset();
        assert_eq!(c.state().unwrap(), RxState::Reset);
    }

    #[test]
    fn closed_consumer_makes_writes_fail() {
        let ring = TestRing::new(8);
        let (p, c) = ring.views();
        c.close();
        assert_eq!(p.write(&[b"a"]), Err(RingError::PeerClosed));
    }

    #[test]
    fn a_corrupt_stream_is_reported_as_corrupt_even_once_the_peer_closed() {
        let ring = TestRing::new(8);
        let (p, c) = ring.views();
        // This side's own tail scribbled far ahead of the peer's head,
        // then the peer (which noticed) closes: the writer learns that its
        // stream is corrupt, not that the peer closed, whichever came first.
        ring.ctl.producer.tail.store(1 << 40, Ordering::Relaxed);
        c.close();
        assert_eq!(p.write(&[b"a"]), Err(RingError::Corrupt));
        assert_eq!(p.space(), Err(RingError::Corrupt));
    }

    #[test]
    fn wakeups_only_when_armed() {
        let ring = TestRing::new(8);
        let (p, c) = ring.views();
        assert_eq!(p.write(&[b"a"]).unwrap(), (1, false));
        c.arm();
        assert_eq!(p.write(&[b"b"]).unwrap(), (1, true));
        assert_eq!(p.write(&[b"c"]).unwrap(), (1, false), "one wake-up per arming");
        p.arm();
        let mut buf = [0u8; 1];
        assert_eq!(c.read(&mut [&mut buf[..]], false).unwrap(), (1, true));
        c.arm();
        assert!(p.finish());
    }

    #[test]
    fn a_side_known_gone_ends_the_stream_without_writing_shared_words() {
        let ring = TestRing::new(8);
        let gone = std::sync::atomic::AtomicBool::new(false);
        let (p, c) = ring.views();
        let (p, c) = (p.or_gone(&gone), c.or_gone(&gone));
        p.write(&[b"ab"]).unwrap();
        assert!(!c.fin_received());
        gone.store(true, Ordering::Relaxed);
        assert_eq!(c.state().unwrap(), RxState::Data(2), "bytes already sent still arrive");
        c.discard(2).unwrap();
        assert_eq!(c.state().unwrap(), RxState::Fin);
        assert!(c.fin_received());
        assert_eq!(p.write(&[b"x"]), Err(RingError::PeerClosed));
        assert_eq!(ring.ctl.producer.flags.load(Ordering::Relaxed), 0);
        assert_eq!(ring.ctl.consumer.flags.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn forged_indices_fail_the_connection_not_the_reader() {
        let ring = TestRing::new(8);
        let (p2, c2) = ring.views();
        ring.ctl.producer.tail.store(9, Ordering::Relaxed);
        let mut buf = [0u8; 16];
        assert_eq!(c2.read(&mut [&mut buf[..]], false), Err(RingError::Corrupt));
        assert_eq!(c2.state(), Err(RingError::Corrupt));
        ring.ctl.producer.tail.store(0, Ordering::Relaxed);
        ring.ctl.consumer.head.store(3, Ordering::Relaxed);
        assert_eq!(p2.write(&[b"x"]), Err(RingError::Corrupt));
    }
}
