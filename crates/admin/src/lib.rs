//! vsocketd's admin protocol, shared by the daemon and `vsocketctl`.
//!
//! - [`client`]: [`Client`], which sends a request and reads its reply as
//!   the request's type;
//! - [`paths`]: where the daemon's sockets are under its `run_dir`, and
//!   where the guests' network namespaces are bound;
//! - [`protocol`]: the [`Request`]s the operator's socket takes and the
//!   [`Reply`] it gives, one JSON line each;
//! - [`report`]: the typed replies: [`StatusReport`], [`GuestReport`],
//!   [`ListenerReport`], [`ConnectionReport`], [`PeerStatus`], [`Applied`].
#![forbid(unsafe_code)]

pub mod client;
pub mod paths;
pub mod protocol;
pub mod report;

pub use client::{Client, ClientError};
pub use paths::{admin_socket_path, guest_socket_path, netns_path};
pub use protocol::{decode_reply, encode, Refusal, Reply, Request};
pub use report::{
    Applied, ConnectionReport, GuestReport, LinkState, ListenerReport, PeerStatus, StatusReport, StoreStatus,
};
