//! The "ucx" fabric: frames between two hosts' daemons over UCX active
//! messages, through a thin, hand-written binding to UCX 1.13's UCP API.
//!
//! - [`sys`]: the raw C declarations, checked at build time against the
//!   installed headers (sizes, offsets, constants).
//! - [`reorder`]: a pure reorder buffer putting each endpoint's frames back
//!   in send order.
//! - [`worker`]: the safe [`Worker`], where every call into UCX and every
//!   callback lives.
//!
//! One [`Worker`] serves one thread. A daemon listens, connects to its
//! peers, sends frames, and runs this loop with the event fd in its own
//! epoll set:
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! let mut worker = vsocket_ucx::Worker::new()?;
//! worker.listen("0.0.0.0:13337".parse().unwrap())?;
//! loop {
//!     worker.progress();
//!     while let Some(event) = worker.poll_event() {
//!         println!("{event:?}");
//!     }
//!     if worker.arm()? {
//!         // sleep in epoll/poll on worker.event_fd() (and other fds)
//!     }
//! }
//! # }
//! ```
//!
//! # Frames and order
//!
//! Each [`Worker::send`] (or [`Worker::send_buffer`], which sends from a
//! buffer taken from [`Worker::buffer`] without copying it; completed
//! sends' buffers are kept for reuse) is one active message (id 0) whose
//! 8-byte header is the frame's sequence number on its endpoint. Small
//! frames go eager, large ones by rendezvous (above UCX's threshold for
//! the transport and its segment size), whose data the
//! receiver fetches into a `Vec` with `ucp_am_recv_data_nbx`. UCX may hand
//! over a later frame before an earlier fragmented or rendezvous one is
//! complete, so the receiver holds frames back until every earlier one has
//! arrived: [`Event::Frame`]s come out in send order per endpoint, or not at
//! all once the endpoint has [`Event::Failed`]. Frames are at most
//! [`MAX_FRAME_LEN`] bytes.
//!
//! # Failure detection
//!
//! Every endpoint uses `UCP_ERR_HANDLING_MODE_PEER`: a broken endpoint is
//! reported once as [`Event::Failed`] and sends to it fail. How fast depends
//! on how the peer went away, over the TCP transport:
//!
//! - peer process exits or is killed, or its worker is dropped, or it
//!   closes the endpoint: its kernel closes the sockets and the failure is
//!   reported as soon as the next progress sees it (milliseconds);
//! - connect to an address nobody listens on: refused at once;
//! - host or link gone silently: only TCP keepalive notices it, after
//!   `UCX_TCP_KEEPIDLE` + `UCX_TCP_KEEPCNT` x `UCX_TCP_KEEPINTVL` of silence
//!   (UCX defaults 10 s + `auto` (the kernel's 9) x 2 s); frames still
//!   unacknowledged wait for TCP's retransmission timeout instead, which is
//!   far longer. UCP's own keepalive (`UCX_KEEPALIVE_INTERVAL`, default
//!   20 s) probes endpoints that are idle. A daemon that needs a tighter
//!   bound sends its own heartbeats.
//!
//! # Environment
//!
//! UCX reads `UCX_*` variables as usual; [`Config`] sets the same options
//! per worker. Between hosts without RDMA, `UCX_TLS=tcp` (or leaving the
//! default) selects TCP; `UCX_NET_DEVICES` restricts the interfaces.
//! RDMA transports are used where present. On a machine without an RDMA
//! device the crate sends every frame by copy (`ZCOPY_THRESH` and
//! `RNDV_THRESH` of `inf`, unless the environment sets them): UCX 1.13's
//! TCP zero-copy and rendezvous paths abort the process when a peer goes
//! away mid-send, and copying costs nothing measurable over TCP.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod reorder;
pub mod sys;
pub mod worker;

pub use worker::{CloseMode, Config, EpId, Event, UcxError, Worker, MAX_FRAME_LEN};
