//! `libvsocket.so`: loaded with `LD_PRELOAD` into an unmodified, dynamically
//! linked program in a guest, it carries the program's TCP/IPv4 connections
//! over shared memory instead of the kernel network stack.
//!
//! From the C edge down (each module imports only those after it):
//! - [`hooks`]: the exported C functions, each declared once with
//!   `hook!` (the only place that handles C pointers);
//! - [`connect`], [`accept`], [`sendfile`], [`mmsg`], [`socket`],
//!   [`splice`]: what the calls do for managed descriptors, in safe code;
//! - [`poll`]: poll and select over any mix of kernel and vSocket
//!   descriptors;
//! - [`exec`]: connections that cross exec into a new program image;
//! - [`fork`]: connections shared with children;
//! - [`table`]: which descriptors are managed, looked up without locks;
//! - [`epoll`]: epoll sets, which see their members through one seam
//!   ([`epoll::Waitable`]);
//! - [`listener`]: listening sockets that accept kernel and vSocket clients;
//! - [`conn`]: one end of a connection, with TCP's semantics;
//! - [`attach`]: how the process reaches `vsocketd` and how a connection's
//!   memory and wake-ups reach it;
//! - leaves: [`bells`] (kits' doorbells kept for the next connection in
//!   their piece), [`readiness`] (readiness and interest), [`signals`] (`SA_RESTART`
//!   for blocking calls, through the program's handlers), [`sys`] (raw
//!   system calls, so the library never re-enters its own hooks), [`addr`]
//!   (socket addresses of both families), [`forksafe`] (mutexes fork waits
//!   for, so a child never finds one held), [`scratch`] (a buffer per thread
//!   for the bytes sendfile and splice pass through); adaptive spinning before a sleep
//!   is `vsocket_ring::spin`, shared with the daemon's fabric relay.
//!
//! The library is inside the tenant's trust domain: it enforces nothing for
//! the cloud. Everything it receives from the peer through shared memory is
//! validated, because the peer may be hostile to it.
#![deny(unsafe_code)]

mod accept;
mod addr;
mod attach;
mod bells;
mod conn;
mod connect;
mod epoll;
mod exec;
mod fdhash;
mod fork;
mod forksafe;
mod fresh;
#[allow(unsafe_code)]
mod hooks;
mod kits;
mod listener;
mod mmsg;
mod poll;
mod readiness;
mod scratch;
mod sendfile;
mod signals;
mod socket;
mod splice;
#[allow(unsafe_code)]
mod sys;
mod table;
