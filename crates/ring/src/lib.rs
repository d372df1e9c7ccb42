//! A one-way byte ring shared by two processes that do not trust each other.
//!
//! - [`index`]: the pure arithmetic of free-running 64-bit indices and the
//!   validation of every index the other side publishes;
//! - [`ring`]: the producer and consumer views of one ring, including the
//!   wake-up protocol (a waiter arms a flag; the other side wakes it only if
//!   the flag is armed, so a busy connection makes no wake-up syscalls);
//! - [`segment`]: a connection's two sealed memfd halves, one per end, each holding the ring that end produces;
//! - [`spin`]: adaptive spinning before a sleep, for whoever waits on a ring.
//!
//! The other process may write anything, at any time, anywhere in the shared
//! segment. The consumer and producer therefore keep the ring size to
//! themselves (never re-read from shared memory), validate each index they
//! read, and reduce every offset modulo the ring size before touching
//! memory: a hostile peer can make its own connection fail
//! ([`RingError::Corrupt`]) but can never make the reader touch memory
//! outside the segment.
//!
//! Unsafe code lives only in `ring` (copying bytes in and out of the shared
//! data area, and the prefetch hint a wait over many rings asks with) and
//! `segment` (mmap, munmap and placing the control lines).
#![deny(unsafe_code)]

#[doc(hidden)]
#[allow(unsafe_code)]
pub mod hostile;
pub mod index;
#[allow(unsafe_code)]
pub mod ring;
#[cfg(not(loom))]
#[allow(unsafe_code)]
pub mod segment;
#[cfg(not(loom))]
pub mod spin;
mod sync;

pub use ring::{
    trim_idle, Consumer, ConsumerLine, Producer, ProducerLine, Received, RingControl, RingError, RxState, SocketError,
};
#[cfg(not(loom))]
pub use segment::{Chunk, ConnectQueue, FileIdentity, ReadOnly, Segment, SegmentFiles};
