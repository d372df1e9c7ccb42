//! The daemon's replies: what `vsocketctl` shows of guests, listeners,
//! connections, fabric peers, the host's counters and a live change.
//!
//! Closed sets are enums here (a link is [`LinkState::Up`], not `"up"`); on
//! the wire they are the same lowercase words the daemon always sent.

use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::SystemTime;
use vsocket_policy::{DenyAction, FabricKind, PolicyChangeAction};

/// The reply to `status`: the host, how much it serves, and its counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// `host.name`.
    pub host: String,
    /// Guests in the policy in force.
    pub guests: usize,
    pub listeners: usize,
    /// Open connections.
    pub connections: usize,
    /// The flow log's file, if the host writes one.
    pub flow_log: Option<String>,
    /// Flow-log records lost because its writer fell behind.
    pub flow_log_dropped: u64,
    /// Where the Prometheus endpoint listens, if it does.
    pub metrics: Option<SocketAddr>,
    /// Connection segments made, taken from the pool, and waiting in it.
    pub segments_created: u64,
    pub segments_reused: u64,
    pub segments_kept: usize,
    /// Kits' chunks made, and their pieces free for the pairs' next kits
    /// (ARCHITECTURE §3c).
    #[serde(default)]
    pub kit_chunks: u64,
    #[serde(default)]
    pub kit_pieces_kept: usize,
    /// Kits made without a doorbell pair: their piece's two processes
    /// kept the one of the connection retired there (ARCHITECTURE §3c,
    /// stage 6).
    #[serde(default)]
    pub doorbells_reused: u64,
    /// Idle rings whose data pages went back to the host (ARCHITECTURE
    /// §3c, stage 5).
    #[serde(default)]
    pub rings_trimmed: u64,
    pub deny_action: DenyAction,
    pub on_policy_change: PolicyChangeAction,
    /// Live changes applied, and connections they reset.
    pub policy_changes: u64,
    pub policy_resets: u64,
    /// Refusals for each quota, summed over the guests.
    pub quota_exceeded_connections: u64,
    pub quota_exceeded_shared_memory: u64,
    pub quota_exceeded_channels: u64,
    /// The fabric's kind, if this host is linked to others.
    pub fabric: Option<FabricKind>,
    /// Peers whose link is up, if this host is linked to others.
    pub fabric_peers_up: Option<usize>,
    /// The etcd store the policy comes from, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreStatus>,
}

/// How the etcd store looks from one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// A watch on the store is established.
    pub connected: bool,
    /// The generation of the policy in force.
    pub generation: u64,
    /// Seconds since the watch last heard from the store.
    pub last_heard_s: u64,
}

/// One guest, for `vsocketctl guests`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestReport {
    pub name: String,
    pub vpc: String,
    pub addresses: Vec<Ipv4Addr>,
    pub security_groups: Vec<String>,
    pub netns: String,
    pub channels: u64,
    /// Live connections as the quota counts them (one inside the guest
    /// counts once, unlike `connections_open`), and their segment bytes.
    pub connections_live: u64,
    pub shared_memory: u64,
    pub max_connections: u64,
    pub max_shared_memory: u64,
    pub max_channels: u64,
    /// Refusals for each quota: connects (as client or server) and channels.
    pub exceeded_connections: u64,
    pub exceeded_shared_memory: u64,
    pub exceeded_channels: u64,
    pub refused_attachments: u64,
    pub connections_open: u64,
    pub connections_out: u64,
    pub connections_in: u64,
    pub denied: u64,
    pub fallbacks: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// A VM guest's region: its size and the bytes its connections use
    /// (both 0 for a namespace guest).
    #[serde(default)]
    pub region_size: u64,
    #[serde(default)]
    pub region_used: u64,
}

/// One vSocket listener, for `vsocketctl listeners`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerReport {
    pub id: u64,
    pub guest: String,
    pub vpc: String,
    pub address: SocketAddrV4,
    pub accepted: u64,
    /// Grants in force for it: client processes that connect without the
    /// daemon, taking connections made ahead (ARCHITECTURE §3b). (Absent
    /// from an older daemon's report.)
    #[serde(default)]
    pub grants: u64,
}

/// One open connection, for `vsocketctl connections`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionReport {
    pub id: u64,
    pub vpc: String,
    pub client_guest: String,
    pub client: SocketAddrV4,
    pub server_guest: String,
    pub server: SocketAddrV4,
    pub bytes_client_to_server: u64,
    pub bytes_server_to_client: u64,
    pub age_seconds: f64,
}

/// Whether a fabric peer's link is established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkState {
    #[serde(rename = "up")]
    Up,
    #[serde(rename = "down")]
    Down,
}

/// One fabric peer, for `vsocketctl peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub address: SocketAddr,
    pub transport: FabricKind,
    pub state: LinkState,
    /// When the state last changed; seconds since the epoch on the wire.
    #[serde(with = "epoch_seconds")]
    pub since: Option<SystemTime>,
    pub links_up: u64,
    pub connections: u64,
    /// Connections this host opened to the peer, and accepted from it.
    pub opened: u64,
    pub accepted: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    /// Stream bytes (data frames' payloads).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Connections reset because their guest's ring was corrupt.
    pub corrupt: u64,
    pub last_error: Option<String>,
}

impl PeerStatus {
    /// A peer not linked yet, with nothing counted.
    pub fn new(name: &str, address: SocketAddr, transport: FabricKind) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            address,
            transport,
            state: LinkState::Down,
            since: None,
            links_up: 0,
            connections: 0,
            opened: 0,
            accepted: 0,
            frames_sent: 0,
            frames_received: 0,
            bytes_sent: 0,
            bytes_received: 0,
            corrupt: 0,
            last_error: None,
        }
    }
}

/// What a live change (or a reload) did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Guests that appeared (control socket made).
    pub guests_added: Vec<String>,
    /// Guests that went (control socket and channels closed).
    pub guests_removed: Vec<String>,
    /// What the change did to established connections it denies.
    pub on_policy_change: PolicyChangeAction,
    /// Established connections reset because the new policy denies them.
    pub connections_reset: usize,
    /// What failed after the new policy was in force (a replaced guest's
    /// control socket could not be made).
    pub errors: Vec<String>,
}

/// A time as whole seconds since the epoch (`null` for none, or for a time
/// before the epoch).
mod epoch_seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::{Duration, SystemTime};

    pub fn serialize<S: Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match time.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()) {
            Some(since_epoch) => s.serialize_some(&since_epoch.as_secs()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        let seconds = Option::<u64>::deserialize(d)?;
        Ok(seconds.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)))
    }
}
