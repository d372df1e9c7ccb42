//! The validated tenant network model: VPCs, guests and security groups.
//!
//! A [`Config`] can only be built by [`crate::config::parse`], which checks
//! every cross-reference, so holders of a `Config` never re-validate: every
//! [`VpcId`], [`GuestId`] and [`GroupId`] it hands out indexes its own tables,
//! every guest address lies inside its VPC and is unique there, and every
//! rule's peer group exists.
//!
//! Ids are plain indexes and are only meaningful for the `Config` that issued
//! them. Looking one up in another `Config` (say, after a reload) is a logic
//! error: it may panic or return an unrelated item. Re-resolve by name after a
//! reload.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::cidr::Ipv4Cidr;

/// Identifies a [`Vpc`] within one [`Config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VpcId(pub(crate) usize);

/// Identifies a [`Guest`] within one [`Config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuestId(pub(crate) usize);

/// Identifies a [`SecurityGroup`] within one [`Config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub(crate) usize);

macro_rules! impl_id {
    ($($id:ident),*) => {$(
        impl $id {
            /// The position of the item in its table, in config file order.
            pub const fn index(self) -> usize {
                self.0
            }
        }
    )*};
}
impl_id!(VpcId, GuestId, GroupId);

/// The whole validated host configuration. See the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    host: HostConfig,
    fabric: Option<FabricConfig>,
    vpcs: Vec<Vpc>,
    guests: Vec<Guest>,
    security_groups: Vec<SecurityGroup>,
    guests_by_name: HashMap<String, GuestId>,
    guests_by_address: HashMap<(VpcId, Ipv4Addr), GuestId>,
}

impl Config {
    /// Assembles a config from tables that `config::parse` has already
    /// validated, and builds the lookup indexes.
    pub(crate) fn from_validated(
        host: HostConfig,
        fabric: Option<FabricConfig>,
        vpcs: Vec<Vpc>,
        guests: Vec<Guest>,
        security_groups: Vec<SecurityGroup>,
    ) -> Self {
        let guests_by_name = guests.iter().enumerate().map(|(i, guest)| (guest.name.clone(), GuestId(i))).collect();
        let guests_by_address = guests
            .iter()
            .enumerate()
            .flat_map(|(i, guest)| guest.addresses.iter().map(move |addr| ((guest.vpc, *addr), GuestId(i))))
            .collect();
        Self { host, fabric, vpcs, guests, security_groups, guests_by_name, guests_by_address }
    }

    /// Settings of the daemon on this host.
    pub fn host(&self) -> &HostConfig {
        &self.host
    }

    /// The hosts this one carries connections to, if any.
    pub fn fabric(&self) -> Option<&FabricConfig> {
        self.fabric.as_ref()
    }

    /// Whether `guest` runs on this host.
    pub fn is_local(&self, guest: GuestId) -> bool {
        self.guest(guest).host == self.host.name
    }

    /// All VPCs, in file order.
    pub fn vpcs(&self) -> impl ExactSizeIterator<Item = (VpcId, &Vpc)> {
        self.vpcs.iter().enumerate().map(|(i, vpc)| (VpcId(i), vpc))
    }

    /// All guests, in file order.
    pub fn guests(&self) -> impl ExactSizeIterator<Item = (GuestId, &Guest)> {
        self.guests.iter().enumerate().map(|(i, guest)| (GuestId(i), guest))
    }

    /// All security groups, in file order.
    pub fn security_groups(&self) -> impl ExactSizeIterator<Item = (GroupId, &SecurityGroup)> {
        self.security_groups.iter().enumerate().map(|(i, group)| (GroupId(i), group))
    }

    /// The VPC `id` names. Panics if `id` came from another `Config`.
    pub fn vpc(&self, id: VpcId) -> &Vpc {
        &self.vpcs[id.0]
    }

    /// The guest `id` names. Panics if `id` came from another `Config`.
    pub fn guest(&self, id: GuestId) -> &Guest {
        &self.guests[id.0]
    }

    /// The security group `id` names. Panics if `id` came from another `Config`.
    pub fn security_group(&self, id: GroupId) -> &SecurityGroup {
        &self.security_groups[id.0]
    }

    /// The VPC called `name`.
    pub fn vpc_by_name(&self, name: &str) -> Option<VpcId> {
        self.vpcs().find(|(_, vpc)| vpc.name == name).map(|(id, _)| id)
    }

    /// The guest called `name`.
    pub fn guest_by_name(&self, name: &str) -> Option<GuestId> {
        self.guests_by_name.get(name).copied()
    }

    /// The security group called `name`.
    pub fn security_group_by_name(&self, name: &str) -> Option<GroupId> {
        self.security_groups().find(|(_, group)| group.name == name).map(|(id, _)| id)
    }

    /// The guest that has address `addr` in VPC `vpc`, if any. An address
    /// alone is ambiguous: VPCs may reuse each other's addresses.
    pub fn guest_owning(&self, vpc: VpcId, addr: Ipv4Addr) -> Option<GuestId> {
        self.guests_by_address.get(&(vpc, addr)).copied()
    }
}

/// Settings of the daemon itself, the `[host]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// This host's name, as other hosts and the flow log know it.
    pub name: String,
    /// Where the daemon keeps its control socket and shared-memory files.
    pub run_dir: PathBuf,
    /// What a guest sees when policy denies its connect.
    pub deny_action: DenyAction,
    /// What a live policy change does to established connections it no
    /// longer allows.
    pub on_policy_change: PolicyChangeAction,
    /// Bytes of each direction's data ring: a power of two within
    /// [`MIN_RING_SIZE`](Self::MIN_RING_SIZE)..=[`MAX_RING_SIZE`](Self::MAX_RING_SIZE).
    pub ring_size: u32,
    /// Where connection attempts are logged, one JSON line each; `None`
    /// (the default) keeps no flow log.
    pub flow_log: Option<FlowLogConfig>,
    /// Where the daemon serves Prometheus metrics over HTTP; `None` (the
    /// default) serves none.
    pub metrics: Option<SocketAddr>,
    /// The limits of a guest that sets none of its own, from `[host]`
    /// `default_max_connections`, `default_max_shared_memory` and
    /// `default_max_channels`.
    pub default_quotas: Quotas,
    /// The program that serves each VM guest's vsock device
    /// (vhost-device-vsock): a path, or a name looked up in PATH.
    pub vsock_backend: PathBuf,
    /// Where the tenant model comes from: `None`, this file (one host);
    /// an etcd store (`[host.store]`, a fleet).
    pub store: Option<StoreConfig>,
}

/// `[host.store]`: the fleet's tenant model lives in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The store's members, `http://HOST:PORT` each.
    pub endpoints: Vec<String>,
    /// The prefix the model's keys live under (see [`crate::store`]),
    /// ending with `/`.
    pub prefix: String,
}

impl StoreConfig {
    /// Where the tenant model lives unless the config names another prefix.
    pub const DEFAULT_PREFIX: &'static str = "/vsocket/";

    /// The store as errors and logs name it: `etcd ENDPOINTS PREFIX`.
    pub fn origin(&self) -> std::path::PathBuf {
        format!("etcd {}{}", self.endpoints.join(","), self.prefix).into()
    }
}

/// The hosts of a fabric and how this one reaches them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricConfig {
    /// How connections are carried between hosts.
    pub kind: FabricKind,
    /// Ring bytes per direction of a connection carried between hosts: its
    /// window on the fabric.
    pub ring_size: u32,
    /// Every host of the fabric, this one included, with unique names.
    pub hosts: Vec<FabricHost>,
    /// The file holding the key every host proves it holds when a link
    /// comes up (absolute); `None`: links are not authenticated.
    pub key_file: Option<std::path::PathBuf>,
    /// How long the relay keeps polling its links and guests after the
    /// last thing it moved before it sleeps, in microseconds (0: never
    /// polls). Polling spends that much of a core after each burst of
    /// traffic and saves the wake-ups of a relay that slept.
    pub busy_poll_us: u32,
}

impl FabricConfig {
    /// The hosts of the fabric other than `this`, with their addresses.
    pub fn peers(&self, this: &str) -> Vec<(String, SocketAddr)> {
        self.hosts.iter().filter(|h| h.name != this).map(|h| (h.name.clone(), h.address)).collect()
    }

    /// Does `self` differ from `other` only in the hosts other than
    /// `this` (this host's own entry and every setting the same)?
    pub fn same_but_peers(&self, other: &FabricConfig, this: &str) -> bool {
        let own = |f: &FabricConfig| f.hosts.iter().find(|h| h.name == this).cloned();
        let settings = |f: &FabricConfig| (f.kind, f.ring_size, f.key_file.clone(), f.busy_poll_us);
        own(self) == own(other) && settings(self) == settings(other)
    }
}

/// A fabric key, read from `fabric.key_file`.
#[derive(Clone, PartialEq, Eq)]
pub struct FabricKey(Vec<u8>);

impl std::fmt::Debug for FabricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FabricKey(..)")
    }
}

impl FabricKey {
    /// Fewest bytes a key may have.
    pub const MIN_LEN: usize = 16;

    /// The secret bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl FabricConfig {
    /// Enough for the bandwidth of one stream over a round trip of a few
    /// hundred microseconds at 10 to 25 Gbit/s.
    pub const DEFAULT_RING_SIZE: u32 = 1 << 20;
    /// A request and its answer crossing a pair of hosts take about 20 to
    /// 40 us here: polling this long catches the next one.
    pub const DEFAULT_BUSY_POLL_US: u32 = 50;
    /// The most a relay may poll after traffic.
    pub const MAX_BUSY_POLL_US: u32 = 10_000;

    /// Bytes of a cross-host connection's segment (both ends' halves, each
    /// a header page and a ring), as `HostConfig::segment_size`.
    pub fn segment_size(&self) -> u64 {
        2 * (4096 + u64::from(self.ring_size))
    }

    /// The entry named `name`.
    pub fn host(&self, name: &str) -> Option<&FabricHost> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// Reads the key from `key_file`, if one is set: the bytes of a
    /// regular file that only its owner may read or write, without
    /// trailing whitespace (space, tab, line and form feeds, carriage
    /// return, vertical tab), at least [`FabricKey::MIN_LEN`] of them.
    /// The error says what is wrong with the file, for
    /// `fabric.key_file: {error}`.
    pub fn load_key(&self) -> Result<Option<FabricKey>, KeyError> {
        use std::io::Read;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let Some(path) = &self.key_file else { return Ok(None) };
        let cannot = |error: std::io::Error| KeyError::Unreadable { path: path.clone(), error };
        // Non-blocking, so that a FIFO there cannot hold the daemon up;
        // the checks are on the file opened, not on the path again.
        let mut file =
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(cannot)?;
        let meta = file.metadata().map_err(cannot)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile(path.clone()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: path.clone(), mode });
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(cannot)?;
        while bytes.last().is_some_and(|b| b" \t\n\r\x0b\x0c".contains(b)) {
            bytes.pop();
        }
        if bytes.len() < FabricKey::MIN_LEN {
            return Err(KeyError::TooShort { path: path.clone(), len: bytes.len() });
        }
        Ok(Some(FabricKey(bytes)))
    }
}

/// What is wrong with a fabric key file.
#[derive(Debug)]
pub enum KeyError {
    /// The file cannot be opened or read.
    Unreadable {
        /// The key file.
        path: PathBuf,
        /// What the system said.
        error: std::io::Error,
    },
    /// The path is not a regular file (a directory, a FIFO, a device).
    NotAFile(PathBuf),
    /// Others than its owner may read or write it.
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It holds fewer than [`FabricKey::MIN_LEN`] bytes of key.
    TooShort {
        /// The key file.
        path: PathBuf,
        /// Bytes of key it holds.
        len: usize,
    },
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Unreadable { path, error } => write!(f, "cannot read {}: {error}", path.display()),
            KeyError::NotAFile(path) => write!(f, "{} is not a regular file", path.display()),
            KeyError::Exposed { path, mode } => {
                write!(f, "{} may be read or written by others (mode {mode:03o}); make it 0600 or 0400", path.display())
            }
            KeyError::TooShort { path, len } => write!(
                f,
                "{} holds {len} bytes of key; at least {} are needed (for example: head -c 32 /dev/urandom | base64)",
                path.display(),
                FabricKey::MIN_LEN
            ),
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyError::Unreadable { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// How two hosts' daemons carry connections to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FabricKind {
    /// Kernel TCP between the daemons.
    Tcp,
    /// UCX active messages (RDMA where the hosts have it).
    Ucx,
}

impl fmt::Display for FabricKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Ucx => "ucx",
        })
    }
}

/// One host of a fabric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricHost {
    /// Its `host.name`.
    pub name: String,
    /// Where its daemon takes fabric links.
    pub address: SocketAddr,
}

/// What one guest may hold at once on this host, so that a guest that runs
/// out of its share never takes from another's. Every guest has all three:
/// each is the guest's own `max_*` or else the host's `default_max_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Live vSocket connections the guest is an end of (as client or server;
    /// a connection inside the guest counts once). At least 1.
    pub max_connections: u64,
    /// Bytes of the shared-memory segments of those connections (each
    /// `2 * (4096 + ring_size)`). At least one segment.
    pub max_shared_memory: u64,
    /// Control channels open at once (each process's request channel and
    /// each listening socket's channel; the daemon runs a thread for each).
    /// At least 1.
    pub max_channels: u64,
}

impl Quotas {
    /// The limits when neither the guest nor `[host]` sets them: room for
    /// ten thousand connections and more (with the default ring size,
    /// 16384 connections take about 8 GiB of segments, most of which no
    /// idle connection ever touches) and a thousand processes and
    /// listeners, while a runaway guest still stops well short of the
    /// host's memory and thread limits.
    pub const DEFAULT: Quotas =
        Quotas { max_connections: 16384, max_shared_memory: 9 * 1024 * 1024 * 1024, max_channels: 1024 };
}

/// The flow log's file and rotation, from `[host]` `flow_log`,
/// `flow_log_max_bytes` and `flow_log_keep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowLogConfig {
    /// The live file (absolute). Rotated files are `<path>.1` (the newest)
    /// to `<path>.<keep>`.
    pub path: PathBuf,
    /// The live file is rotated before a record would take it past this
    /// size, so no file exceeds it (unless one record alone does).
    pub max_bytes: u64,
    /// How many rotated files are kept besides the live one.
    pub keep: u32,
}

impl FlowLogConfig {
    /// `flow_log_max_bytes` when the file does not set it: 64 MiB.
    pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
    /// The smallest allowed `flow_log_max_bytes`: a page, some ten records.
    pub const MIN_MAX_BYTES: u64 = 4096;
    /// `flow_log_keep` when the file does not set it.
    pub const DEFAULT_KEEP: u32 = 5;
    /// The largest allowed `flow_log_keep`.
    pub const MAX_KEEP: u32 = 1000;
}

impl HostConfig {
    /// `vsock_backend` when the config names none.
    pub const DEFAULT_VSOCK_BACKEND: &'static str = "vhost-device-vsock";

    /// `run_dir` when the file does not set it.
    pub const DEFAULT_RUN_DIR: &'static str = "/run/vsocket";
    /// `ring_size` when the file does not set it: 256 KiB.
    pub const DEFAULT_RING_SIZE: u32 = 256 * 1024;
    /// The smallest allowed `ring_size`: one page.
    pub const MIN_RING_SIZE: u32 = 4096;
    /// The largest allowed `ring_size`: 64 MiB.
    pub const MAX_RING_SIZE: u32 = 64 * 1024 * 1024;

    /// Bytes of one connection's segment: each end's half, a 4096-byte
    /// header page and the ring it writes (`vsocket_abi::layout::segment_size`).
    pub fn segment_size(&self) -> u64 {
        2 * (4096 + u64::from(self.ring_size))
    }
}

/// How a connect denied by policy fails, as seen by the guest's program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DenyAction {
    /// Silently drop, like a cloud firewall: the connect never completes and
    /// the program eventually sees `ETIMEDOUT` (or gives up first).
    #[default]
    Drop,
    /// Refuse at once: the program sees `ECONNREFUSED`.
    Reject,
}

impl fmt::Display for DenyAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Drop => "drop",
            Self::Reject => "reject",
        })
    }
}

/// What a live policy change (`vsocketctl`, `vsocketctl reload`) does to
/// established connections that the new policy would not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyChangeAction {
    /// Leave them be, as cloud security groups leave tracked connections:
    /// only new connections follow the new rules.
    #[default]
    Keep,
    /// Reset them: both programs see `ECONNRESET`.
    Reset,
}

impl fmt::Display for PolicyChangeAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Keep => "keep",
            Self::Reset => "reset",
        })
    }
}

/// A tenant's private address space. VPCs may overlap each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vpc {
    /// Unique among VPCs.
    pub name: String,
    /// Every guest address in this VPC lies inside it.
    pub cidr: Ipv4Cidr,
}

/// A network namespace (or VM) attached to vSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    /// Unique among guests; at most 15 bytes so it can name an interface.
    pub name: String,
    /// The VPC all of its addresses belong to.
    pub vpc: VpcId,
    /// At least one; each inside the VPC's CIDR and owned by no other guest
    /// of the same VPC.
    pub addresses: Vec<Ipv4Addr>,
    /// Its security groups, in the order the file lists them (which is the
    /// order the evaluator reports the first matching rule in).
    pub groups: Vec<GroupId>,
    /// The network namespace it runs in; unique among guests.
    pub netns: String,
    /// The host it runs on: this host's name or a fabric host's.
    pub host: String,
    /// Its limits: its own `max_*` fields, or the host's defaults.
    pub quotas: Quotas,
    /// Set if the guest is a virtual machine (its QEMU then runs in
    /// `netns`); a network namespace's processes otherwise.
    pub vm: Option<VmGuest>,
}

/// What makes a guest a virtual machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmGuest {
    /// Its vsock context id (3 or more, unique among guests): its
    /// attachment, which the hypervisor stamps on every packet.
    pub cid: u32,
    /// Bytes of its memory region, out of which its connections' memory is
    /// carved: at least one segment, at most its `max_shared_memory`, whole
    /// pages.
    pub region: u64,
    /// Its RAM, bytes (whole MiB, at least 128 MiB).
    pub memory: u64,
}

impl VmGuest {
    /// The lowest context id a guest may have (0 to 2 are the hypervisor's,
    /// the local loopback's and the host's).
    pub const MIN_CID: u32 = 3;
    /// The least RAM a guest boots with.
    pub const MIN_MEMORY: u64 = 128 << 20;
    /// RAM when the config names none.
    pub const DEFAULT_MEMORY: u64 = 512 << 20;
}

impl Guest {
    /// Whether this guest belongs to security group `group`.
    pub fn is_member(&self, group: GroupId) -> bool {
        self.groups.contains(&group)
    }
}

/// A named set of stateful allow rules. Rules only ever allow; what no rule
/// allows falls to the defaults (see [`crate::evaluate`](mod@crate::evaluate)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityGroup {
    /// Unique among security groups.
    pub name: String,
    /// Rules for connections accepted by members, in file order.
    pub ingress: Vec<Rule>,
    /// Rules for connections made by members, in file order.
    pub egress: Vec<Rule>,
}

impl SecurityGroup {
    /// The rules for `direction`.
    pub fn rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// Which end of a connection a rule (or a denial) applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The client's side: its groups' egress rules.
    Egress,
    /// The server's side: its groups' ingress rules.
    Ingress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Egress => "egress",
            Self::Ingress => "ingress",
        })
    }
}

/// One allow rule of a security group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Which protocols it allows.
    pub protocol: ProtocolFilter,
    /// Which destination ports it allows. Always [`PortRange::ALL`] unless
    /// `protocol` is TCP or UDP, the only protocols with ports.
    pub ports: PortRange,
    /// Who the other end may be.
    pub peer: Peer,
}

/// The other end a rule allows: the server for egress, the client for ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Any guest whose address (in the flow's VPC) lies in the block.
    Cidr(Ipv4Cidr),
    /// Any guest that is a member of the group.
    Group(GroupId),
}

/// A transport protocol a flow uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP; a flow's port is meaningless for it (use 0).
    Icmp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
        })
    }
}

/// The protocols a rule allows: one, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolFilter {
    /// Every protocol (`protocol = "all"`).
    All,
    /// Just this one.
    Only(Protocol),
}

impl ProtocolFilter {
    /// Whether a flow using `protocol` passes this filter.
    pub fn matches(self, protocol: Protocol) -> bool {
        match self {
            Self::All => true,
            Self::Only(only) => only == protocol,
        }
    }
}

impl fmt::Display for ProtocolFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Only(protocol) => protocol.fmt(f),
        }
    }
}

/// An inclusive range of destination ports.
///
/// A range from the config file lies within 1..=65535. [`PortRange::ALL`]
/// (`ports = "all"`) also includes 0, so that it matches flows of port-less
/// protocols such as ICMP, which carry port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

impl PortRange {
    /// Every port, 0..=65535.
    pub const ALL: Self = Self { lo: 0, hi: u16::MAX };

    /// The ports `lo..=hi`; `None` unless `1 <= lo <= hi`.
    pub const fn new(lo: u16, hi: u16) -> Option<Self> {
        if lo == 0 || lo > hi {
            None
        } else {
            Some(Self { lo, hi })
        }
    }

    /// The lowest port in the range.
    pub const fn lo(self) -> u16 {
        self.lo
    }

    /// The highest port in the range.
    pub const fn hi(self) -> u16 {
        self.hi
    }

    /// Whether `port` is in the range.
    pub const fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    /// Formats as the config file spells it: `all`, `6379` or `1000-2000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Self::ALL {
            f.write_str("all")
        } else if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}
