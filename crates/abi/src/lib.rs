//! The contract between `libvsocket.so` (untrusted, inside a guest) and
//! `vsocketd` (trusted, on the host).
//!
//! Two things cross that boundary:
//! - [`layout`]: the shape of a connection's shared-memory segment, which
//!   both ends of a connection and the daemon map;
//! - [`control`]: the messages on a guest's control socket, and
//!   [`stream`]: the same messages framed on a byte stream (a VM's vsock).
//!
//! [`grant`] is the page of a grant's connect queue (ARCHITECTURE §3b).
//!
//! [`fabric`] holds the frames between two hosts' daemons.
//!
//! Everything here is plain data with explicit validation: whoever receives a
//! value from the other side parses it with a `*_checked`/`decode` function and
//! acts only on the result, so an illegal value cannot reach the code that acts.
#![forbid(unsafe_code)]

pub mod control;
pub mod fabric;
pub mod grant;
pub mod layout;
pub mod stream;
