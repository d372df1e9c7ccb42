//! `libvsocket.so`: loaded with `LD_PRELOAD` into an unmodified, dynamically
//! linked program in a guest, it carries the program's TCP/IPv4 connections
//! over shared memory instead of the kernel network stack.
//!
//! - [`addr`]: socket addresses of both families, as vSocket carries them;
//! - [`hooks`]: the exported C functions (the only place that handles C
//!   pointers);
//! - [`table`]: which descriptors are managed, looked up without locks;
//! - [`control`]: requests to `vsocketd` over the guest's control socket;
//! - [`conn`]: one end of a connection, with TCP's semantics;
//! - [`listener`]: listening sockets that accept kernel and vSocket clients;
//! - [`spin`]: adaptive spinning before a sleep, knowing nothing of the
//!   library;
//! - [`poll`], [`epoll`]: readiness over any mix of kernel and vSocket
//!   descriptors, seen through one seam ([`epoll::Waitable`]);
//! - [`fork`]: connections shared with children;
//! - [`segcache`]: mappings of closed connections' segments, kept for reuse;
//! - [`signals`]: `SA_RESTART` for blocking calls, through the program's
//!   handlers;
//! - [`splice`]: splice(2) between a pipe and a connection;
//! - [`sys`]: raw system calls, so the library never re-enters its own hooks.
//!
//! The library is inside the tenant's trust domain: it enforces nothing for
//! the cloud. Everything it receives from the peer through shared memory is
//! validated, because the peer may be hostile to it.
#![deny(unsafe_code)]

mod accept;
mod addr;
mod attach;
mod conn;
mod connect;
mod epoll;
mod fork;
#[allow(unsafe_code)]
mod hooks;
mod listener;
mod mmsg;
mod poll;
mod readiness;
mod sendfile;
mod signals;
mod socket;
mod spin;
mod splice;
#[allow(unsafe_code)]
mod sys;
mod table;
