//! A fabric link's protocol, without I/O: how a link becomes a peer's
//! (the handshake) and how it stays alive. The relay feeds it the frames a
//! link receives and the time, and carries out what it answers: which
//! frame to send, which peer the link now is, or why it is refused.
//!
//! ```text
//!   link up ──► Hello sent ──(peer's Hello: version, a configured host
//!                   │         at its address)──► no key: Up(peer)
//!                   │                          └─► key: Proof sent ──(peer's
//!                   │                                 Proof checks)──► Up(peer)
//!                   └──(anything else, or nothing within HELLO_TIMEOUT)──► closed
//! ```
//!
//! An identified link is dead after [`LINK_TIMEOUT`] without a frame, and
//! pings after [`PING_EVERY`] without sending one.

use super::auth;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use vsocket_abi::fabric::{NONCE, PROOF, VERSION};
use vsocket_policy::FabricKey;

/// A link with nothing received for this long is declared dead.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(3);
/// An idle link sends a ping this often.
pub const PING_EVERY: Duration = Duration::from_millis(500);
/// A link that has not said who it is within this time is closed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// This host and the hosts it may link with (by index, as the relay
/// numbers its peers), and the fabric key links must prove.
///
/// A peer keeps its index for as long as the relay runs: one that leaves
/// the fabric keeps its place (no link can become its while it is out) and
/// has it again if it joins again, so an index held anywhere never comes
/// to name another host.
#[derive(Debug)]
pub struct Hosts {
    pub this: String,
    peers: Vec<Member>,
    pub key: Option<FabricKey>,
}

/// One peer's place in [`Hosts`].
#[derive(Debug)]
struct Member {
    name: String,
    address: SocketAddr,
    /// A host of the fabric now (not left).
    present: bool,
}

impl Hosts {
    /// `this` host, its `peers` (numbered in this order) and the key.
    pub fn new(this: String, peers: Vec<(String, SocketAddr)>, key: Option<FabricKey>) -> Hosts {
        let peers = peers.into_iter().map(|(name, address)| Member { name, address, present: true }).collect();
        Hosts { this, peers, key }
    }

    /// The index of peer `name`, if it is a host of the fabric now.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.peers.iter().position(|m| m.present && m.name == name)
    }

    /// The index of the peer that takes fabric links at `address`, if it
    /// is a host of the fabric now.
    pub fn at(&self, address: SocketAddr) -> Option<usize> {
        self.peers.iter().position(|m| m.present && m.address == address)
    }

    /// The name and address of peer `peer`, if it is a host of the fabric.
    pub fn get(&self, peer: usize) -> Option<(&str, SocketAddr)> {
        self.peers.get(peer).filter(|m| m.present).map(|m| (m.name.as_str(), m.address))
    }

    /// How many places there are (present peers and those that left).
    pub fn places(&self) -> usize {
        self.peers.len()
    }

    /// Host `name` is a peer at `address` from now on: its index (its old
    /// one if it was a peer before).
    pub fn join(&mut self, name: &str, address: SocketAddr) -> usize {
        if let Some(p) = self.peers.iter().position(|m| m.name == name) {
            self.peers[p].address = address;
            self.peers[p].present = true;
            return p;
        }
        self.peers.push(Member { name: name.to_owned(), address, present: true });
        self.peers.len() - 1
    }

    /// Peer `peer` is no longer a host of the fabric.
    pub fn leave(&mut self, peer: usize) {
        if let Some(m) = self.peers.get_mut(peer) {
            m.present = false;
        }
    }
}

/// Where a link is in its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// This side's `Hello` (with `nonce`) is sent; the peer's is awaited.
    /// `dialed`: the peer this side dialed to reach, if it dialed.
    AwaitHello { dialed: Option<usize>, nonce: [u8; NONCE] },
    /// With a key: the peer's `Hello` passed and this side's `Proof` is
    /// sent; the peer's `Proof` is awaited.
    AwaitProof { peer: usize, nonce: [u8; NONCE], theirs: [u8; NONCE] },
    /// The link is `peer`'s.
    Up { peer: usize },
}

/// One link's protocol state.
#[derive(Debug)]
pub struct Link {
    state: State,
    /// Where the other end speaks from.
    address: SocketAddr,
    opened: Instant,
    last_rx: Instant,
    last_tx: Instant,
}

/// What a handshake frame leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// Nothing to do (a frame the state does not need).
    Nothing,
    /// Send this `Proof` and wait for the peer's.
    Prove([u8; PROOF]),
    /// The link is `peer`'s from now on.
    Up(usize),
}

/// Why a link is refused before it becomes a peer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The peer speaks another protocol version.
    Version(u32),
    /// The name it gave is not a configured fabric host.
    NotConfigured,
    /// It speaks from another address than its host's.
    WrongAddress { from: IpAddr, expected: IpAddr },
    /// It is not the host this side dialed.
    DialedAnother,
    /// It said hello twice.
    HelloTwice,
    /// With a key: it sent something other than its proof.
    NoProof,
    /// It sent a proof before its hello.
    ProofBeforeHello,
    /// It proves a key this host does not have.
    KeylessHost,
    /// Its proof does not check with this host's key.
    WrongKey,
    /// It sent another frame before its hello.
    SpokeFirst,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Version(v) => write!(f, "protocol version {v}, not {VERSION}"),
            Refused::NotConfigured => f.write_str("not a configured fabric host"),
            Refused::WrongAddress { from, expected } => write!(f, "from {from}, not the host's address {expected}"),
            Refused::DialedAnother => f.write_str("dialed another host"),
            Refused::HelloTwice => f.write_str("said hello twice"),
            Refused::NoProof => f.write_str("sent no proof of the fabric key"),
            Refused::ProofBeforeHello => f.write_str("sent a proof before its hello"),
            Refused::KeylessHost => f.write_str("proves a fabric key; this host has none"),
            Refused::WrongKey => f.write_str("wrong fabric key"),
            Refused::SpokeFirst => f.write_str("spoke before saying hello"),
        }
    }
}

/// What a link needs done because time passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    Nothing,
    /// Idle: send a `Ping`.
    Ping,
    /// Identified and silent for [`LINK_TIMEOUT`]: it is dead.
    Dead,
    /// Not identified within [`HELLO_TIMEOUT`]: close it.
    Unidentified,
}

impl Link {
    /// A link that came up at `now` from `address`, dialed by this side to
    /// reach `dialed` or accepted; this side's `Hello` carries `nonce`
    /// (the relay sends it).
    pub fn new(now: Instant, address: SocketAddr, dialed: Option<usize>, nonce: [u8; NONCE]) -> Link {
        Link { state: State::AwaitHello { dialed, nonce }, address, opened: now, last_rx: now, last_tx: now }
    }

    /// The peer this link is, once identified.
    pub fn peer(&self) -> Option<usize> {
        match self.state {
            State::Up { peer } => Some(peer),
            _ => None,
        }
    }

    /// The peer whose `Hello` this link passed, before its proof.
    pub fn claimed(&self) -> Option<usize> {
        match self.state {
            State::AwaitProof { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// The peer this side dialed the link to reach, while it is not yet
    /// identified.
    pub fn dialed(&self) -> Option<usize> {
        match self.state {
            State::AwaitHello { dialed, .. } => dialed,
            _ => None,
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// A frame arrived at `now`.
    pub fn received(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// A frame was sent at `now`.
    pub fn sent(&mut self, now: Instant) {
        self.last_tx = now;
    }

    /// The peer's `Hello`.
    pub fn hello(
        &mut self,
        hosts: &Hosts,
        version: u32,
        host: &str,
        theirs: [u8; NONCE],
    ) -> Result<Handshake, Refused> {
        let (dialed, nonce) = match self.state {
            State::AwaitHello { dialed, nonce } => (dialed, nonce),
            State::AwaitProof { .. } => return Err(Refused::HelloTwice),
            State::Up { .. } => return Ok(Handshake::Nothing),
        };
        if version != VERSION {
            return Err(Refused::Version(version));
        }
        let peer = hosts.find(host).ok_or(Refused::NotConfigured)?;
        let expected = hosts.peers[peer].address.ip();
        match dialed {
            // An accepted link must come from the host's own address.
            None if self.address.ip() != expected => {
                return Err(Refused::WrongAddress { from: self.address.ip(), expected })
            }
            Some(d) if d != peer => return Err(Refused::DialedAnother),
            _ => {}
        }
        match &hosts.key {
            Some(key) => {
                let mac = auth::prove(key, &hosts.this, host, &nonce, &theirs);
                self.state = State::AwaitProof { peer, nonce, theirs };
                Ok(Handshake::Prove(mac))
            }
            None => {
                self.state = State::Up { peer };
                Ok(Handshake::Up(peer))
            }
        }
    }

    /// The peer's `Proof` of the fabric key.
    pub fn proof(&mut self, hosts: &Hosts, mac: &[u8; PROOF]) -> Result<Handshake, Refused> {
        match (&self.state, &hosts.key) {
            (State::Up { .. }, _) => Ok(Handshake::Nothing),
            (State::AwaitHello { .. }, Some(_)) => Err(Refused::ProofBeforeHello),
            (State::AwaitHello { .. } | State::AwaitProof { .. }, None) => Err(Refused::KeylessHost),
            (&State::AwaitProof { peer, nonce, theirs }, Some(key)) => {
                // A host that left the fabric meanwhile is refused.
                let (name, _) = hosts.get(peer).ok_or(Refused::NotConfigured)?;
                if !auth::check(key, mac, name, &hosts.this, &theirs, &nonce) {
                    return Err(Refused::WrongKey);
                }
                self.state = State::Up { peer };
                Ok(Handshake::Up(peer))
            }
        }
    }

    /// Any other frame, which only an identified link may send.
    pub fn other(&self) -> Result<(), Refused> {
        match self.state {
            State::Up { .. } => Ok(()),
            State::AwaitProof { .. } => Err(Refused::NoProof),
            State::AwaitHello { .. } => Err(Refused::SpokeFirst),
        }
    }

    /// What is due at `now`.
    pub fn due(&self, now: Instant) -> Due {
        match self.state {
            State::Up { .. } if now.saturating_duration_since(self.last_rx) > LINK_TIMEOUT => Due::Dead,
            State::Up { .. } if now.saturating_duration_since(self.last_tx) >= PING_EVERY => Due::Ping,
            State::Up { .. } => Due::Nothing,
            _ if now.saturating_duration_since(self.opened) > HELLO_TIMEOUT => Due::Unidentified,
            _ => Due::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> FabricKey {
        // One file per call: tests run in parallel, some with the same key.
        static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vsocket-link-{}-{call}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let config = vsocket_policy::FabricConfig {
            kind: vsocket_policy::FabricKind::Tcp,
            ring_size: 1 << 20,
            hosts: Vec::new(),
            key_file: Some(path.clone()),
            busy_poll_us: 0,
        };
        let key = config.load_key().unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
        key
    }

    const ADDRESS_1: &str = "10.99.0.1:7470";
    const ADDRESS_2: &str = "10.99.0.2:7470";

    /// Host `this` of a fabric of host1 and host2, seeing the other as
    /// peer 0.
    fn hosts(this: &str, key: Option<FabricKey>) -> Hosts {
        let other = if this == "host1" { ("host2", ADDRESS_2) } else { ("host1", ADDRESS_1) };
        Hosts::new(this.into(), vec![(other.0.into(), other.1.parse().unwrap())], key)
    }

    /// What one side sends the other during the handshake.
    enum Sent {
        Hello(String, [u8; NONCE]),
        Proof([u8; PROOF]),
    }

    /// One side of a link, and what its handshake came to.
    struct Side {
        hosts: Hosts,
        link: Link,
        nonce: [u8; NONCE],
        outcome: Option<Result<usize, Refused>>,
    }

    impl Side {
        fn new(hosts: Hosts, now: Instant, from: &str, dialed: Option<usize>, nonce: u8) -> Side {
            let nonce = [nonce; NONCE];
            Side { link: Link::new(now, from.parse().unwrap(), dialed, nonce), hosts, nonce, outcome: None }
        }

        fn hello(&self) -> Sent {
            Sent::Hello(self.hosts.this.clone(), self.nonce)
        }

        /// Takes what the other side sent; returns what to send back.
        fn take(&mut self, sent: &Sent) -> Option<Sent> {
            let step = match sent {
                Sent::Hello(host, nonce) => self.link.hello(&self.hosts, VERSION, host, *nonce),
                Sent::Proof(mac) => self.link.proof(&self.hosts, mac),
            };
            match step {
                Ok(Handshake::Prove(mac)) => return Some(Sent::Proof(mac)),
                Ok(Handshake::Up(peer)) => self.outcome = Some(Ok(peer)),
                Ok(Handshake::Nothing) => {}
                Err(why) => self.outcome = Some(Err(why)),
            }
            None
        }
    }

    type Outcomes = (Option<Result<usize, Refused>>, Option<Result<usize, Refused>>);

    /// Runs a handshake between host1 (dialing) and host2 (accepting)
    /// with the keys given, to the end.
    fn handshake(key1: Option<FabricKey>, key2: Option<FabricKey>) -> Outcomes {
        let now = Instant::now();
        let mut one = Side::new(hosts("host1", key1), now, ADDRESS_2, Some(0), 1);
        let mut two = Side::new(hosts("host2", key2), now, ADDRESS_1, None, 2);
        let (hello1, hello2) = (one.hello(), two.hello());
        let proof2 = two.take(&hello1);
        let proof1 = one.take(&hello2);
        if let Some(proof) = proof1 {
            two.take(&proof);
        }
        if let Some(proof) = proof2 {
            one.take(&proof);
        }
        (one.outcome, two.outcome)
    }

    #[test]
    fn two_hosts_link_without_a_key_and_with_the_same_key() {
        assert_eq!(handshake(None, None), (Some(Ok(0)), Some(Ok(0))));
        let k = || Some(key("the-shared-fabric-key"));
        assert_eq!(handshake(k(), k()), (Some(Ok(0)), Some(Ok(0))));
    }

    #[test]
    fn a_wrong_key_or_no_key_is_refused_on_both_sides() {
        let (one, two) = handshake(Some(key("the-shared-fabric-key")), Some(key("another-fabric-key-entirely")));
        assert_eq!((one, two), (Some(Err(Refused::WrongKey)), Some(Err(Refused::WrongKey))));
        // A keyless host takes the link on the hello (and ignores the
        // proof, which the relay logs); the keyed side never gets a proof
        // and refuses the link at the keyless side's next frame.
        let now = Instant::now();
        let mut keyed = Side::new(hosts("host1", Some(key("the-shared-fabric-key"))), now, ADDRESS_2, Some(0), 1);
        let mut keyless = Side::new(hosts("host2", None), now, ADDRESS_1, None, 2);
        let proof = keyed.take(&keyless.hello());
        assert!(proof.is_some());
        assert!(keyless.take(&keyed.hello()).is_none());
        keyless.take(&proof.unwrap());
        assert_eq!(keyless.outcome, Some(Ok(0)));
        assert_eq!(keyed.outcome, None, "host1 has not taken the link");
        assert_eq!(keyed.link.other(), Err(Refused::NoProof), "the keyless side's first ping");
        // A keyless host before the hello: a proof it cannot check.
        let mut early = Link::new(now, ADDRESS_1.parse().unwrap(), None, [0; NONCE]);
        assert_eq!(early.proof(&hosts("host2", None), &[0; PROOF]), Err(Refused::KeylessHost));
    }

    #[test]
    fn a_hello_must_name_a_configured_host_at_its_address_in_this_version() {
        let now = Instant::now();
        let accept = |from: &str| Link::new(now, from.parse().unwrap(), None, [0; NONCE]);
        let h = hosts("host2", None);
        assert_eq!(accept(ADDRESS_1).hello(&h, VERSION + 1, "host1", [9; NONCE]), Err(Refused::Version(VERSION + 1)));
        assert_eq!(accept(ADDRESS_1).hello(&h, VERSION, "host3", [9; NONCE]), Err(Refused::NotConfigured));
        let from = "10.99.0.9:5000".parse::<SocketAddr>().unwrap().ip();
        let expected = ADDRESS_1.parse::<SocketAddr>().unwrap().ip();
        assert_eq!(
            accept("10.99.0.9:5000").hello(&h, VERSION, "host1", [9; NONCE]),
            Err(Refused::WrongAddress { from, expected })
        );
        // A dialed link may answer from anywhere, but must be the host dialed.
        let mut dialed = Link::new(now, "10.99.0.9:5000".parse().unwrap(), Some(0), [0; NONCE]);
        assert_eq!(dialed.hello(&h, VERSION, "host1", [9; NONCE]), Ok(Handshake::Up(0)));
        let mut two = hosts("host2", None);
        two.join("host3", "10.99.0.3:7470".parse().unwrap());
        let mut dialed_three = Link::new(now, "10.99.0.3:7470".parse().unwrap(), Some(1), [0; NONCE]);
        assert_eq!(dialed_three.hello(&two, VERSION, "host1", [9; NONCE]), Err(Refused::DialedAnother));
    }

    #[test]
    fn a_host_that_left_is_refused_and_has_its_place_again_when_it_joins() {
        let now = Instant::now();
        let mut h = hosts("host2", Some(key("the-shared-fabric-key")));
        let three: SocketAddr = "10.99.0.3:7470".parse().unwrap();
        assert_eq!(h.join("host3", three), 1);
        assert_eq!((h.find("host3"), h.at(three), h.places()), (Some(1), Some(1), 2));
        // host1 passes its hello, then leaves before its proof comes.
        let mut link = Link::new(now, ADDRESS_1.parse().unwrap(), None, [0; NONCE]);
        assert!(matches!(link.hello(&h, VERSION, "host1", [9; NONCE]), Ok(Handshake::Prove(_))));
        h.leave(0);
        assert_eq!(link.proof(&h, &[0; PROOF]), Err(Refused::NotConfigured));
        assert_eq!((h.find("host1"), h.get(0), h.at(ADDRESS_1.parse().unwrap())), (None, None, None));
        let mut again = Link::new(now, ADDRESS_1.parse().unwrap(), None, [0; NONCE]);
        assert_eq!(again.hello(&h, VERSION, "host1", [9; NONCE]), Err(Refused::NotConfigured));
        // Back, at another address: the same index, no new place.
        let moved: SocketAddr = "10.99.0.11:7470".parse().unwrap();
        assert_eq!(h.join("host1", moved), 0);
        assert_eq!((h.get(0), h.places()), (Some(("host1", moved)), 2));
        let mut old_address = Link::new(now, ADDRESS_1.parse().unwrap(), None, [0; NONCE]);
        let from = ADDRESS_1.parse::<SocketAddr>().unwrap().ip();
        assert_eq!(
            old_address.hello(&h, VERSION, "host1", [9; NONCE]),
            Err(Refused::WrongAddress { from, expected: moved.ip() })
        );
    }

    #[test]
    fn frames_out_of_turn_are_refused() {
        let now = Instant::now();
        let keyed = hosts("host2", Some(key("the-shared-fabric-key")));
        let mut link = Link::new(now, ADDRESS_1.parse().unwrap(), None, [0; NONCE]);
        assert_eq!(link.other(), Err(Refused::SpokeFirst));
        assert_eq!(link.proof(&keyed, &[0; PROOF]), Err(Refused::ProofBeforeHello));
        assert!(matches!(link.hello(&keyed, VERSION, "host1", [9; NONCE]), Ok(Handshake::Prove(_))));
        assert_eq!(link.claimed(), Some(0));
        assert_eq!(link.hello(&keyed, VERSION, "host1", [9; NONCE]), Err(Refused::HelloTwice));
        assert_eq!(link.other(), Err(Refused::NoProof), "data before the proof");
        assert_eq!(link.peer(), None, "not taken");
    }

    #[test]
    fn a_silent_link_is_dead_and_an_idle_one_pings() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let h = hosts("host2", None);
        let mut link = Link::new(t0, ADDRESS_1.parse().unwrap(), None, [0; NONCE]);
        assert_eq!(link.due(at(1_000)), Due::Nothing);
        assert_eq!(link.due(at(2_001)), Due::Unidentified, "no hello within HELLO_TIMEOUT");
        link.hello(&h, VERSION, "host1", [9; NONCE]).unwrap();
        link.received(at(2_100));
        link.sent(at(2_100));
        assert_eq!(link.due(at(2_500)), Due::Nothing);
        assert_eq!(link.due(at(2_600)), Due::Ping);
        link.sent(at(2_600));
        link.received(at(3_000));
        assert_eq!(link.due(at(3_000)), Due::Nothing);
        assert_eq!(link.due(at(6_000)), Due::Ping, "silent, but not for longer than LINK_TIMEOUT");
        assert_eq!(link.due(at(6_001)), Due::Dead);
    }
}
