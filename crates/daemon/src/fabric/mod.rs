//! The fabric: connections between guests on different hosts.
//!
//! Each host's daemon keeps one link to every other host of its
//! `[fabric]` (the host with the smaller name dials; the other accepts and
//! checks that the caller is a configured host at its configured address).
//! A connect to a guest placed on another host is decided in two steps:
//! the client's host checks egress (and everything else it knows), then
//! sends `Open`; the server's host decides again with its own policy
//! (ingress is decided there), finds the listener, and answers `Accept` or
//! `Refuse`. Once accepted, each daemon is the far end of its own guest's
//! segment and the [`relay`] carries the bytes between segment and link.
//!
//! Two transports carry the frames: [`tcp`] (kernel TCP) and [`ucx`] (UCX
//! active messages, RDMA where present), as the config chooses.

pub mod auth;
pub mod link;
pub mod local;
pub mod relay;
pub mod stream;
pub mod table;
pub mod tcp;
#[cfg(feature = "ucx")]
pub mod ucx;

use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use vsocket_abi::fabric::{Frame, Origin, Refusal};
pub use vsocket_admin::PeerStatus;
use vsocket_policy::{Config, FabricConfig, FabricKind};
use vsocket_sys::Epoll;

/// How long a connect waits for the server's host to answer.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A transport's name for one link.
pub type LinkId = u64;

/// The token `Transport::ready` gets when the relay polls it because
/// `before_sleep` said it must not sleep yet.
pub const TOKEN_POLL: u64 = 15;

/// What a transport reports to the relay.
pub enum LinkEvent<'a> {
    /// A new link, dialed by this host (to `peer`) or accepted (from it).
    Up { link: LinkId, peer: SocketAddr, dialed: bool },
    /// A dial to `peer` failed.
    DialFailed { peer: SocketAddr, error: std::io::Error },
    /// A frame arrived on `link`, in order. A transport may report a
    /// `Data` frame before all of its payload is in: the rest follows as
    /// `Payload` and `Received` events before anything else from `link`.
    Frame(LinkId, Frame<'a>),
    /// More of the payload of the `Data` frame last reported on `link`.
    Payload { link: LinkId, origin: Origin, id: u64, bytes: &'a [u8] },
    /// The transport wrote `len` more bytes of that payload straight into
    /// the ring [`Events::data_ring`] gave it; `wake`: the guest must be
    /// woken.
    Received { link: LinkId, origin: Origin, id: u64, len: usize, wake: bool },
    /// The link is gone (closed, failed, or sent something malformed).
    Down { link: LinkId, why: LinkFailure },
}

/// The relay, as a transport sees it while it reports what happened.
pub trait Events {
    /// Something happened on a link.
    fn event(&mut self, event: LinkEvent<'_>);
    /// The receive ring for the payload of stream `(origin, id)`'s `Data`
    /// frame, if that payload may be written into it in place (the stream
    /// is established and still takes bytes); the transport reports what it
    /// wrote there with [`LinkEvent::Received`].
    fn data_ring(&mut self, link: LinkId, origin: Origin, id: u64) -> Option<vsocket_ring::Producer<'_>>;
}

/// Moves frames between daemons. Driven by the relay's thread only.
pub trait Transport: Send {
    /// Starts connecting to the daemon at `address`; the outcome comes as
    /// `Up` or `DialFailed`.
    fn dial(&mut self, address: SocketAddr, epoll: &Epoll);
    /// Something the transport registered in `epoll` under `token` is
    /// ready (`events`); report what happened.
    fn ready(&mut self, token: u64, events: u32, epoll: &Epoll, on: &mut dyn Events);
    /// Queues `frame` on `link`, after every frame queued before.
    fn send(&mut self, link: LinkId, frame: &Frame<'_>);
    /// As `send`, for a frame already encoded.
    fn send_encoded(&mut self, link: LinkId, bytes: &[u8]);
    /// Sends a `Data` frame of the next `len` bytes of `ring` (which holds
    /// at least that many) and consumes them. Returns whether the ring's
    /// producer must be woken. Transports that can send from the ring in
    /// place do; this default copies the bytes out first.
    fn send_ring(
        &mut self,
        link: LinkId,
        origin: Origin,
        id: u64,
        ring: &vsocket_ring::Consumer<'_>,
        len: usize,
    ) -> Result<bool, vsocket_ring::RingError> {
        let mut bytes = vec![0u8; len];
        let (got, wake) = ring.read(&mut [&mut bytes[..]], false)?;
        self.send(link, &Frame::Data { origin, id, bytes: &bytes[..got] });
        Ok(wake)
    }
    /// Bytes queued on `link` and not yet taken by the network.
    fn backlog(&self, link: LinkId) -> usize;
    /// Pushes queued frames out as far as the network takes them.
    fn flush(&mut self, epoll: &Epoll, on: &mut dyn Events);
    /// Closes `link` (no event follows).
    fn close(&mut self, link: LinkId, epoll: &Epoll);
    /// Called before the relay sleeps; false if it must poll again first
    /// (the relay then calls `ready` with [`TOKEN_POLL`]).
    fn before_sleep(&mut self) -> bool;
    /// Called a few times a second: a chance to start what had to wait
    /// (the default does nothing).
    fn maintain(&mut self, _epoll: &Epoll) {}
    /// Which kind of fabric this transport carries.
    fn describe(&self) -> FabricKind;
}

/// What the client's host asks of the server's host.
#[derive(Debug, Clone)]
pub struct OpenRequest {
    pub vpc: String,
    pub guest: String,
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    pub window: u32,
}

/// How an `Open` ended, for the connect waiting on it.
#[derive(Debug, Clone)]
pub enum OpenOutcome {
    Accepted,
    Refused(Refusal),
    /// The server's host could not be asked, or went away meanwhile.
    Unreachable(Unreachable),
}

/// Why a link ended or could not be made: what the relay logs and
/// `vsocketctl peers` shows as the peer's last error.
#[derive(Debug)]
pub enum LinkFailure {
    /// Dialing the peer failed.
    Dial(std::io::Error),
    /// The tcp transport lost the link.
    Tcp(tcp::LinkError),
    /// The UCX transport lost the link.
    #[cfg(feature = "ucx")]
    Ucx(ucx::LinkError),
    /// Nothing was heard on the link for [`relay::LINK_TIMEOUT`].
    Silent,
    /// The peer came back on a new link before the old one was found dead.
    Replaced,
    /// The peer sent an `Open` that breaks the protocol.
    BadOpen,
    /// The host left the fabric (the policy no longer names it).
    Left,
    /// The host's fabric address changed.
    Moved,
}

impl std::fmt::Display for LinkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkFailure::Dial(e) => write!(f, "{e}"),
            LinkFailure::Tcp(e) => write!(f, "{e}"),
            #[cfg(feature = "ucx")]
            LinkFailure::Ucx(e) => write!(f, "{e}"),
            LinkFailure::Silent => write!(f, "nothing heard for {} s", relay::LINK_TIMEOUT.as_secs()),
            LinkFailure::Replaced => f.write_str("replaced by a new link"),
            LinkFailure::BadOpen => f.write_str("peer broke the protocol: bad Open"),
            LinkFailure::Left => f.write_str("the host left the fabric"),
            LinkFailure::Moved => f.write_str("the host's fabric address changed"),
        }
    }
}

/// Why the server's host of a connection could not be asked.
#[derive(Debug, Clone)]
pub enum Unreachable {
    /// This host runs no fabric.
    NoFabric,
    /// The host named is not one of the fabric's.
    NotAHost(String),
    /// No link to the host is up; why the last one failed, if one did.
    NoLink(Option<Arc<LinkFailure>>),
    /// The link went down while the connection was opening.
    LinkDown(Arc<LinkFailure>),
    /// The host did not answer within [`OPEN_TIMEOUT`].
    NoAnswer(String),
    /// The connect stopped waiting for the answer.
    GaveUp,
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreachable::NoFabric => f.write_str("no fabric"),
            Unreachable::NotAHost(host) => write!(f, "{host} is not a fabric host"),
            Unreachable::NoLink(Some(why)) | Unreachable::LinkDown(why) => write!(f, "{why}"),
            Unreachable::NoLink(None) => f.write_str("link down"),
            Unreachable::NoAnswer(host) => write!(f, "no answer from {host} in {} s", OPEN_TIMEOUT.as_secs()),
            Unreachable::GaveUp => f.write_str("timed out"),
        }
    }
}

/// The relay's end of a connection it carries, and its meter.
pub struct NewConn {
    /// The guest's rings and wake-ups, as the relay sees them.
    pub end: Box<dyn local::LocalEnd>,
    /// Shared with the connection's record.
    pub meter: Arc<crate::meter::Meter>,
}

pub(crate) enum Command {
    Open {
        peer: String,
        id: u64,
        request: OpenRequest,
        conn: NewConn,
        reply: mpsc::Sender<OpenOutcome>,
    },
    Cancel {
        peer: String,
        id: u64,
    },
    Accepted {
        peer: usize,
        id: u64,
        conn: NewConn,
        window: u32,
    },
    Refused {
        peer: usize,
        id: u64,
        refusal: Refusal,
    },
    /// The fabric's hosts are now these (this host's peers).
    Hosts(Vec<(String, SocketAddr)>),
}

/// What the fabric asks of the daemon: whether to take a connection that
/// a peer host opens to one of this host's guests.
pub trait RemoteOpens: Send + Sync {
    /// The server's host's side of an `Open` from host `peer`: the
    /// connection's end for the relay to carry, or the refusal to send back.
    fn accept_remote(&self, peer: &str, request: &OpenRequest) -> Result<NewConn, Refusal>;
}

/// The relay's command queue, and the eventfd that wakes it.
pub(crate) struct Commands {
    queue: Mutex<mpsc::Sender<Command>>,
    bell: OwnedFd,
}

impl Commands {
    fn send(&self, command: Command) {
        let _ = crate::sync::lock(&self.queue).send(command);
        vsocket_sys::eventfd_signal(self.bell.as_fd());
    }
}

/// Why the fabric could not start.
#[derive(Debug)]
pub enum FabricError {
    /// The transport cannot listen on this host's fabric address.
    Listen { kind: FabricKind, address: SocketAddr, error: std::io::Error },
    /// The config asks for a transport this build does not have.
    NotBuilt(FabricKind),
    /// The relay's epoll set, command bell or thread cannot be made.
    Relay(std::io::Error),
}

impl std::fmt::Display for FabricError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FabricError::Listen { kind: FabricKind::Tcp, address, error } => {
                write!(f, "fabric listen on {address}: {error}")
            }
            FabricError::Listen { kind, address, error } => write!(f, "fabric ({kind}) listen on {address}: {error}"),
            FabricError::NotBuilt(kind) => write!(f, "fabric.kind \"{kind}\" is not built into this vsocketd"),
            FabricError::Relay(error) => write!(f, "fabric relay: {error}"),
        }
    }
}

/// The daemon's handle on its relay.
pub struct Fabric {
    commands: Arc<Commands>,
    status: Arc<Mutex<Vec<PeerStatus>>>,
    pub kind: FabricKind,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric").field("kind", &self.kind).finish_non_exhaustive()
    }
}

impl Fabric {
    /// Starts the relay for `config`'s `[fabric]`, if it has one with
    /// other hosts, with the fabric key read from its `key_file`; `Open`s
    /// from peers are put to `opens`.
    pub fn start(
        config: &Config,
        key: Option<vsocket_policy::FabricKey>,
        opens: Arc<dyn RemoteOpens>,
    ) -> Result<Option<Fabric>, FabricError> {
        let Some(fabric) = config.fabric() else { return Ok(None) };
        let this = config.host().name.clone();
        let Some(me) = fabric.host(&this) else { return Ok(None) };
        // A fabric of this host alone still starts: hosts may join it
        // later (see `set_hosts`).
        let peers = fabric.peers(&this);
        let keyed = key.is_some();
        let epoll = Epoll::new().map_err(FabricError::Relay)?;
        let listen = |error| FabricError::Listen { kind: fabric.kind, address: me.address, error };
        let transport: Box<dyn Transport> = match fabric.kind {
            FabricKind::Tcp => Box::new(tcp::TcpTransport::new(me.address, &epoll).map_err(listen)?),
            #[cfg(feature = "ucx")]
            FabricKind::Ucx => Box::new(ucx::UcxTransport::new(me.address, &epoll).map_err(listen)?),
            #[cfg(not(feature = "ucx"))]
            FabricKind::Ucx => return Err(FabricError::NotBuilt(fabric.kind)),
        };
        let (tx, rx) = mpsc::channel();
        let bell = vsocket_sys::eventfd().map_err(FabricError::Relay)?;
        let status = Arc::new(Mutex::new(Vec::new()));
        let commands =
            Arc::new(Commands { queue: Mutex::new(tx), bell: bell.try_clone().map_err(FabricError::Relay)? });
        let relay = relay::Relay::new(
            opens,
            commands.clone(),
            epoll,
            transport,
            this,
            key,
            std::time::Duration::from_micros(fabric.busy_poll_us.into()),
            peers,
            rx,
            bell,
            status.clone(),
        )
        .map_err(FabricError::Relay)?;
        std::thread::Builder::new()
            .name("fabric-relay".into())
            .spawn(move || relay.run())
            .map_err(FabricError::Relay)?;
        tracing::info!(kind = %fabric.kind, listen = %me.address, keyed, "fabric started");
        Ok(Some(Fabric { commands, status, kind: fabric.kind }))
    }

    fn command(&self, command: Command) {
        self.commands.send(command);
    }

    /// Asks host `peer` to accept connection `id` and waits for the answer
    /// (at most [`OPEN_TIMEOUT`]). On `Accepted` the relay carries `conn`.
    pub fn open(&self, peer: &str, id: u64, request: OpenRequest, conn: NewConn) -> OpenOutcome {
        let (reply, answer) = mpsc::channel();
        self.command(Command::Open { peer: peer.into(), id, request, conn, reply });
        match answer.recv_timeout(OPEN_TIMEOUT) {
            Ok(outcome) => outcome,
            Err(_) => {
                self.command(Command::Cancel { peer: peer.into(), id });
                OpenOutcome::Unreachable(Unreachable::NoAnswer(peer.into()))
            }
        }
    }

    /// The fabric's hosts are now those of `fabric` (which differs from
    /// the one in force only in hosts other than this one, `this`): hosts
    /// that left lose their links and connections, hosts that joined are
    /// linked with.
    pub fn set_hosts(&self, fabric: &FabricConfig, this: &str) {
        self.command(Command::Hosts(fabric.peers(this)));
    }

    /// Every peer's state and traffic.
    pub fn status(&self) -> Vec<PeerStatus> {
        crate::sync::lock(&self.status).clone()
    }
}

/// The server's side of an `Open` from peer `peer` (index `p`): decided on
/// a thread of its own, since reaching the listener may wait.
pub(crate) fn remote_open(
    opens: &Arc<dyn RemoteOpens>,
    commands: &Arc<Commands>,
    peer: String,
    p: usize,
    id: u64,
    request: OpenRequest,
) {
    let (opens, commands) = (opens.clone(), commands.clone());
    let spawned = std::thread::Builder::new().name("fabric-open".into()).spawn(move || {
        let command = match opens.accept_remote(&peer, &request) {
            Ok(conn) => Command::Accepted { peer: p, id, conn, window: request.window },
            Err(refusal) => Command::Refused { peer: p, id, refusal },
        };
        commands.send(command);
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a thread for a fabric open");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsocket_admin::LinkState;

    /// A host that accepts nothing from its peers.
    struct RefuseAll;

    impl RemoteOpens for RefuseAll {
        fn accept_remote(&self, _: &str, _: &OpenRequest) -> Result<NewConn, Refusal> {
            Err(Refusal::Errno(libc::ECONNREFUSED))
        }
    }

    #[test]
    fn a_started_fabric_shows_every_configured_peer_before_any_link_is_made() {
        // A free port of loopback to listen on; the peer's address answers
        // nothing, so its link cannot come up.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let text = format!(
            "[host]\nname = \"h1\"\n[fabric]\nkind = \"tcp\"\n[[fabric.host]]\nname = \"h1\"\n\
             address = \"127.0.0.1:{port}\"\n[[fabric.host]]\nname = \"h2\"\naddress = \"127.0.0.1:1\"\n"
        );
        let config = vsocket_policy::parse(&text, std::path::Path::new("h1.toml")).unwrap();
        let fabric = Fabric::start(&config, None, Arc::new(RefuseAll)).unwrap().expect("a fabric with a peer");
        // At once, without waiting for the relay's thread.
        let status = fabric.status();
        assert_eq!(status.len(), 1, "{status:?}");
        assert_eq!(status[0].name, "h2");
        assert_eq!(status[0].state, LinkState::Down);
        assert_eq!(status[0].links_up, 0);
    }
}
