//! The host daemon's TOML config file, parsed into a validated [`Config`].
//!
//! Parsing happens in two steps. Serde reads the text into private raw
//! structs that mirror the file (and reject unknown fields); validation then
//! resolves names to ids and checks every rule below, producing a [`Config`]
//! that cannot hold a dangling reference or an out-of-range value. The first
//! problem found is reported as a [`ConfigError`] naming the file, the field
//! and the problem:
//!
//! ```text
//! /etc/vsocket/lab.toml: guest[1].vpc: unknown VPC "red"
//! ```
//!
//! Fields are named by their place in the file: `guest[1]` is the second
//! `[[guest]]` table, and a security group is named by its name once that is
//! known to be valid and unique, as in `security_group "web".ingress[0].ports`.
//!
//! # The file
//!
//! ```toml
//! [host]
//! name = "host1"                 # required; a host name (letters, digits, '.', '-')
//! run_dir = "/run/vsocket"       # absolute; default "/run/vsocket"
//! deny_action = "drop"           # "drop" (default) or "reject"
//! on_policy_change = "keep"      # what a live policy change does to established
//!                                # connections it no longer allows: "keep" them
//!                                # (default, as cloud security groups do) or "reset"
//! vsock_backend = "vhost-device-vsock"  # what serves VM guests' vsock devices:
//!                                # a path, or a name looked up in PATH (the default)
//! ring_size = 262144             # bytes per direction, a power of two,
//!                                # 4096..=67108864 (64 MiB); default 262144
//! flow_log = "/var/log/vsocket/flow.log"  # absolute; one JSON line per connection
//!                                # attempt and per close; default: no flow log
//! flow_log_max_bytes = 67108864  # rotate before the file passes this size;
//!                                # at least 4096; default 67108864 (64 MiB)
//! flow_log_keep = 5              # rotated files kept (flow.log.1 ..= .5);
//!                                # 1..=1000; default 5
//! metrics = "127.0.0.1:9464"     # Prometheus endpoint (GET /metrics), an
//!                                # IP address and a port; default: none
//! default_max_connections = 16384 # per-guest quotas for guests that set none
//! default_max_shared_memory = "9GiB"  # (see [[guest]] below); these are the
//! default_max_channels = 1024    # defaults; with deny_action and
//!                                # on_policy_change, the only [host] settings a
//!                                # `vsocketctl reload` may change
//!
//! [fabric]                       # only with guests on other hosts
//! kind = "tcp"                   # "tcp" (default) or "ucx": how this host's
//!                                # vsocketd carries connections to other hosts
//! ring_size = 1048576            # bytes per direction of such a connection's
//!                                # segment, a power of two as host.ring_size:
//!                                # each stream's window between the hosts, so it
//!                                # should cover bandwidth x round trip
//! busy_poll_us = 50              # after moving anything, the relay keeps polling
//!                                # this long before it sleeps (0-10000; 0: never):
//!                                # a core's time after each burst, for latency
//! key_file = "/etc/vsocket/fabric.key"  # absolute; optional. Every host holds
//!                                # the same secret (16 bytes or more, mode 0600)
//!                                # and proves it when a link comes up; a peer
//!                                # without it is refused
//! [[fabric.host]]                # every host of the fabric, this one included
//! name = "host1"                 # a host name; one entry must be host.name
//! address = "10.99.0.1:7470"     # where that host's vsocketd takes fabric links
//! [[fabric.host]]
//! name = "host2"
//! address = "10.99.0.2:7470"
//!
//! [[vpc]]
//! name = "blue"
//! cidr = "10.10.0.0/24"          # the VPC's address range; VPCs may overlap
//!
//! [[security_group]]
//! name = "redis"
//! [[security_group.ingress]]     # who may connect to members
//! protocol = "tcp"               # "tcp" | "udp" | "icmp" | "all"
//! ports = "6379"                 # 6379, "6379", "1000-2000" or "all"; default "all"
//!                                # (icmp and "all" rules allow only "all")
//! cidr = "10.10.0.0/24"          # exactly one of cidr / group
//! [[security_group.ingress]]
//! protocol = "tcp"
//! ports = "6379"
//! group = "clients"              # peer: members of this security group
//! [[security_group.egress]]      # whom members may connect to
//! protocol = "tcp"
//! ports = "all"
//! cidr = "0.0.0.0/0"
//!
//! [[security_group]]
//! name = "clients"               # a group without rules just labels its members
//!
//! [[guest]]
//! name = "a"                     # at most 15 characters: it names an interface
//! vpc = "blue"
//! addresses = ["10.10.0.2"]      # one or more, inside the VPC cidr, unique in the VPC
//! security_groups = ["redis"]    # default []
//! netns = "vs-a"                 # network namespace; default "vs-<name>", unique
//! host = "host2"                 # the host it runs on (placement of its
//!                                # addresses): host.name or a fabric.host;
//!                                # default host.name
//! max_connections = 100          # live vSocket connections, as client or server;
//!                                # at least 1; default host.default_max_connections
//! max_shared_memory = "64MiB"    # bytes of those connections' segments (each
//!                                # 2 * (4096 + ring_size)): bytes, or a number with
//!                                # KiB, MiB, GiB or TiB; at least one segment
//!                                # (with a [fabric], one at fabric.ring_size);
//!                                # default host.default_max_shared_memory
//! max_channels = 64              # control channels open at once (one per process,
//!                                # one per listening socket); at least 1;
//!                                # default host.default_max_channels
//! [guest.vm]                     # only for a guest that is a virtual machine
//!                                # (its QEMU runs in its netns)
//! cid = 3                        # its vsock context id: 3 or more, unique
//! region = "16MiB"               # its memory region for connections: at least one
//!                                # segment, at most max_shared_memory, whole pages
//! memory = "512MiB"              # its RAM: at least 128MiB, whole MiB; default 512MiB
//!
//! [[guest]]
//! name = "b"
//! vpc = "blue"
//! addresses = ["10.10.0.3"]
//! security_groups = ["clients"]
//! ```
//!
//! # Rules checked
//!
//! - Names of VPCs, security groups and guests are non-empty, use only
//!   `a-z`, `0-9` and `-`, do not start with `-`, and are unique per kind;
//!   guest names are at most 15 characters.
//! - A CIDR is `a.b.c.d/len` or a bare address (meaning `/32`) with no host
//!   bits set: `10.0.0.5/24` is rejected as a likely typo.
//! - Every guest's VPC and security groups exist; its addresses parse, lie
//!   inside its VPC's CIDR and belong to no other guest of that VPC (another
//!   VPC may reuse them); its network namespace is unique.
//! - Every rule has exactly one of `cidr` and `group`, and the group exists;
//!   port ranges satisfy `1 <= lo <= hi <= 65535`.
//! - `fabric.host` names are unique host names, one of them `host.name`,
//!   each with an IP address and a nonzero port; a guest's `host` is
//!   `host.name` or one of them.
//! - `ring_size` is a power of two within 4096..=64 MiB, and `run_dir` is an
//!   absolute path.
//! - `flow_log` is an absolute path; `flow_log_max_bytes` is at least 4096
//!   and `flow_log_keep` within 1..=1000, and both are set only with
//!   `flow_log`. `metrics` is an IP address and a nonzero port.
//! - Quotas (`max_connections`, `max_channels` and their `default_`
//!   versions in `[host]`) are at least 1; a `max_shared_memory` holds at
//!   least one connection's segment at the host's `ring_size`, and is bytes
//!   (an integer) or a string like `"64MiB"` (units KiB, MiB, GiB, TiB, or
//!   B; powers of 1024; `"64MB"` is rejected as ambiguous).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::cidr::{CidrError, Ipv4Cidr};
use crate::model::{
    Config, DenyAction, FabricConfig, FabricHost, FabricKind, FlowLogConfig, GroupId, Guest, HostConfig, Peer,
    PolicyChangeAction, PortRange, Protocol, ProtocolFilter, Quotas, Rule, SecurityGroup, StoreConfig, VmGuest, Vpc,
    VpcId,
};

/// The longest guest name: it becomes a Linux interface name (IFNAMSIZ - 1).
pub const MAX_GUEST_NAME_LEN: usize = 15;

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_document(path).map(|(_, config)| config)
}

/// The run directory a config file names (`host.run_dir`, or the default),
/// read without validating anything else: tools that only need to find
/// the daemon (`vsocketctl reload` of a file that is now invalid) use it.
/// `None` if the file cannot be read or is not TOML.
pub fn run_dir_of(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    match table.get("host").and_then(|host| host.get("run_dir")) {
        None => Some(PathBuf::from(HostConfig::DEFAULT_RUN_DIR)),
        Some(dir) => dir.as_str().map(PathBuf::from),
    }
}

/// Parses and validates config text; `origin` names its file in errors.
pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
    parse_document(text, origin).map(|(_, config)| config)
}

/// Reads and validates the config file at `path`, keeping the file's
/// content as a [`Document`] that live changes edit.
pub fn load_document(path: &Path) -> Result<(Document, Config), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.to_owned(), source })?;
    parse_document(&text, path)
}

/// As [`parse`], also returning the text's content as a [`Document`].
pub fn parse_document(text: &str, origin: &Path) -> Result<(Document, Config), ConfigError> {
    let raw: RawConfig = toml::from_str(text)
        .map_err(|err| ConfigError::Toml { file: origin.to_owned(), message: err.to_string().trim_end().to_owned() })?;
    let document = Document::from_raw(raw);
    let config = document.validate(origin)?;
    Ok((document, config))
}

/// Whom a rule allows: addresses in a block, or members of a group.
#[derive(Debug, Clone)]
pub enum RulePeerSpec {
    /// `cidr`, as written (like `"10.10.0.0/24"`).
    Cidr(String),
    /// `group`: a security group's name.
    Group(String),
}

/// The content of a config file as written, which live changes edit
/// (see [`crate::edit`]).
#[derive(Clone)]
pub struct Document {
    pub(crate) raw: RawConfig,
}

impl fmt::Debug for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Document")
            .field("security_groups", &self.raw.security_group.len())
            .field("guests", &self.raw.guest.len())
            .finish()
    }
}

impl Document {
    fn from_raw(raw: RawConfig) -> Self {
        Self { raw }
    }

    /// Validates the whole document as [`crate::parse`] validates a file;
    /// `origin` names it in errors.
    pub fn validate(&self, origin: &Path) -> Result<Config, ConfigError> {
        Validator { file: origin }.config(self.raw.clone())
    }
}

/// Why a config file could not be loaded.
#[derive(Debug)]
pub enum ConfigError {
    /// `cannot read {file}`; the I/O error is the [source](std::error::Error::source).
    Read {
        /// The file that could not be read.
        file: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// `{file}: {message}`: TOML syntax, a value of the wrong type, a missing
    /// or unknown field. The message is toml's and includes line and column.
    Toml {
        /// The file the text came from.
        file: PathBuf,
        /// toml's description of the problem and where it is.
        message: String,
    },
    /// `{file}: {field}: {problem}`: well-formed TOML whose content breaks a
    /// rule of the model.
    Invalid {
        /// The file the text came from.
        file: PathBuf,
        /// Where in the file, like `guest[1].security_groups[0]`.
        field: String,
        /// What is wrong there.
        problem: Problem,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { file, .. } => write!(f, "cannot read {}", file.display()),
            Self::Toml { file, message } => write!(f, "{}: {message}", file.display()),
            Self::Invalid { file, field, problem } => write!(f, "{}: {field}: {problem}", file.display()),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::Toml { .. } | Self::Invalid { .. } => None,
        }
    }
}

/// What is wrong with one field of an otherwise well-formed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `must not be empty`
    Empty,
    /// `"{0}" may use only a-z, 0-9 and '-', and may not start with '-'`
    BadName(String),
    /// `"{name}" is longer than {max} characters`
    NameTooLong {
        /// The name as written.
        name: String,
        /// The limit for this kind of name.
        max: usize,
    },
    /// `"{0}" is not a host name (letters, digits, '.' and '-')`
    BadHostName(String),
    /// `"{0}" is not a usable network namespace name (letters, digits, '.',
    /// '_' and '-'; not "." or "..")`
    BadNetns(String),
    /// `"{value}" duplicates {first}`
    Duplicate {
        /// The repeated value.
        value: String,
        /// The field that has it first.
        first: String,
    },
    /// `"{0}" is not an absolute path`
    RelativePath(PathBuf),
    /// `{0} is not a power of two from 4096 to 67108864`
    BadRingSize(u64),
    /// `{0} is below the minimum of 4096 bytes`
    FlowLogTooSmall(u64),
    /// `{0} is not within 1-1000`
    BadFlowLogKeep(i64),
    /// `only takes effect with host.flow_log, which is not set`
    NeedsFlowLog,
    /// `{0} is not within 0-10000 (microseconds)`
    BadBusyPoll(i64),
    /// `"{0}" is not a size: a number of bytes, or a number with KiB, MiB,
    /// GiB or TiB like "64MiB"`
    BadSize(String),
    /// `{0} is below the minimum of 1`
    QuotaBelowOne(i64),
    /// `{size} bytes do not hold one connection's segment ({segment} bytes
    /// with host.ring_size = {ring_size})`
    SharedMemoryBelowSegment {
        /// The quota as given, in bytes.
        size: u64,
        /// One segment's size.
        segment: u64,
        /// The host's ring size, which decides the segment's.
        ring_size: u32,
    },
    /// A guest's shared-memory quota is smaller than one cross-host
    /// connection's segment (`fabric.ring_size`).
    SharedMemoryBelowFabricSegment {
        /// The guest's quota, in bytes.
        size: u64,
        /// One relayed connection's segment size.
        segment: u64,
        /// The fabric's ring size, which decides the segment's.
        ring_size: u32,
    },
    /// A VM guest's vsock context id is outside 3..=4294967294.
    BadCid(i64),
    /// A VM guest's region is smaller than one segment, larger than its
    /// shared-memory quota, or not whole pages.
    BadRegion {
        /// The region as given, in bytes.
        size: u64,
        /// One segment's size.
        segment: u64,
        /// The guest's `max_shared_memory`.
        quota: u64,
    },
    /// A VM guest's RAM is under 128 MiB or not whole MiB.
    BadVmMemory(u64),
    /// `"{0}" is not an IP address and port like "127.0.0.1:9464"`
    BadListenAddress(String),
    /// The CIDR's own message.
    BadCidr(CidrError),
    /// `"{0}" is not an IPv4 address`
    BadAddress(String),
    /// `{addr} is outside VPC "{vpc}" ({cidr})`
    AddressOutsideVpc {
        /// The guest's address.
        addr: Ipv4Addr,
        /// The guest's VPC.
        vpc: String,
        /// The VPC's range.
        cidr: Ipv4Cidr,
    },
    /// `{addr} in VPC "{vpc}" duplicates {first}`
    DuplicateAddress {
        /// The address used twice.
        addr: Ipv4Addr,
        /// The VPC in which it must be unique.
        vpc: String,
        /// The field that has it first.
        first: String,
    },
    /// `a guest needs at least one address`
    NoAddresses,
    /// `unknown VPC "{0}"`
    UnknownVpc(String),
    /// `unknown security group "{0}"`
    UnknownSecurityGroup(String),
    /// `"{0}" is not a port, a range like "1000-2000", or "all"`
    BadPorts(String),
    /// `port {0} is outside 1-65535`
    PortOutOfRange(String),
    /// `port range {lo}-{hi} ends before it starts`
    BackwardPortRange {
        /// The first port as written.
        lo: u16,
        /// The last port as written.
        hi: u16,
    },
    /// `ports apply only to tcp and udp; a {0} rule takes ports = "all"`
    PortsNotApplicable(ProtocolFilter),
    /// `a rule needs one of cidr or group`
    MissingPeer,
    /// `a rule takes only one of cidr or group, not both`
    BothPeers,
    /// `unknown host "{0}" (not host.name or a fabric.host)`
    UnknownHost(String),
    /// `no entry for this host "{0}" (host.name)`
    FabricWithoutThisHost(String),
    /// `{0}`: an object of the store (`PREFIX/KIND/NAME`) that does not
    /// read, or does not fit the host's own file.
    Store(String),
    /// `"{0}" is not http://HOST:PORT`
    BadStoreEndpoint(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("must not be empty"),
            Self::Store(what) => f.write_str(what),
            Self::BadStoreEndpoint(url) => write!(f, "\"{url}\" is not http://HOST:PORT"),
            Self::BadName(name) => write!(f, "\"{name}\" may use only a-z, 0-9 and '-', and may not start with '-'"),
            Self::NameTooLong { name, max } => {
                write!(f, "\"{name}\" is longer than {max} characters")
            }
            Self::BadHostName(name) => {
                write!(f, "\"{name}\" is not a host name (letters, digits, '.' and '-')")
            }
            Self::BadNetns(name) => write!(
                f,
                "\"{name}\" is not a usable network namespace name \
                 (letters, digits, '.', '_' and '-'; not \".\" or \"..\")"
            ),
            Self::Duplicate { value, first } => write!(f, "\"{value}\" duplicates {first}"),
            Self::RelativePath(path) => write!(f, "\"{}\" is not an absolute path", path.display()),
            Self::BadRingSize(size) => write!(
                f,
                "{size} is not a power of two from {} to {}",
                HostConfig::MIN_RING_SIZE,
                HostConfig::MAX_RING_SIZE
            ),
            Self::FlowLogTooSmall(size) => {
                write!(f, "{size} is below the minimum of {} bytes", FlowLogConfig::MIN_MAX_BYTES)
            }
            Self::BadFlowLogKeep(keep) => write!(f, "{keep} is not within 1-{}", FlowLogConfig::MAX_KEEP),
            Self::NeedsFlowLog => f.write_str("only takes effect with host.flow_log, which is not set"),
            Self::BadBusyPoll(us) => {
                write!(f, "{us} is not within 0-{} (microseconds)", FabricConfig::MAX_BUSY_POLL_US)
            }
            Self::BadSize(text) => write!(
                f,
                "\"{text}\" is not a size: a number of bytes, or a number with KiB, MiB, GiB or TiB like \"64MiB\""
            ),
            Self::QuotaBelowOne(value) => write!(f, "{value} is below the minimum of 1"),
            Self::SharedMemoryBelowSegment { size, segment, ring_size } => write!(
                f,
                "{size} bytes do not hold one connection's segment ({segment} bytes with host.ring_size = {ring_size})"
            ),
            Self::SharedMemoryBelowFabricSegment { size, segment, ring_size } => write!(
                f,
                "{size} bytes do not hold one cross-host connection's segment ({segment} bytes with \
                 fabric.ring_size = {ring_size}): raise it or lower fabric.ring_size"
            ),
            Self::BadCid(cid) => {
                write!(f, "{cid} is not a guest's vsock context id (3 to 4294967294; 0-2 are reserved)")
            }
            Self::BadRegion { size, segment, quota } => write!(
                f,
                "a region of {size} bytes must hold one segment ({segment} bytes), fit the guest's \
                 max_shared_memory ({quota} bytes) and be whole 4096-byte pages"
            ),
            Self::BadVmMemory(bytes) => write!(f, "{bytes} bytes of RAM: a VM needs at least 128MiB, in whole MiB"),
            Self::BadListenAddress(text) => {
                write!(f, "\"{text}\" is not an IP address and port like \"127.0.0.1:9464\"")
            }
            Self::BadCidr(err) => err.fmt(f),
            Self::BadAddress(text) => write!(f, "\"{text}\" is not an IPv4 address"),
            Self::AddressOutsideVpc { addr, vpc, cidr } => {
                write!(f, "{addr} is outside VPC \"{vpc}\" ({cidr})")
            }
            Self::DuplicateAddress { addr, vpc, first } => {
                write!(f, "{addr} in VPC \"{vpc}\" duplicates {first}")
            }
            Self::NoAddresses => f.write_str("a guest needs at least one address"),
            Self::UnknownVpc(name) => write!(f, "unknown VPC \"{name}\""),
            Self::UnknownSecurityGroup(name) => write!(f, "unknown security group \"{name}\""),
            Self::BadPorts(text) => write!(f, "\"{text}\" is not a port, a range like \"1000-2000\", or \"all\""),
            Self::PortOutOfRange(port) => write!(f, "port {port} is outside 1-65535"),
            Self::BackwardPortRange { lo, hi } => {
                write!(f, "port range {lo}-{hi} ends before it starts")
            }
            Self::PortsNotApplicable(protocol) => {
                write!(f, "ports apply only to tcp and udp; a {protocol} rule takes ports = \"all\"")
            }
            Self::MissingPeer => f.write_str("a rule needs one of cidr or group"),
            Self::BothPeers => f.write_str("a rule takes only one of cidr or group, not both"),
            Self::UnknownHost(name) => write!(f, "unknown host \"{name}\" (not host.name or a fabric.host)"),
            Self::FabricWithoutThisHost(name) => write!(f, "no entry for this host \"{name}\" (host.name)"),
        }
    }
}

// The raw structs mirror the file exactly; nothing outside this module sees them.

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    host: RawHost,
    pub(crate) fabric: Option<RawFabric>,
    #[serde(default)]
    pub(crate) vpc: Vec<RawVpc>,
    #[serde(default)]
    pub(crate) security_group: Vec<RawSecurityGroup>,
    #[serde(default)]
    pub(crate) guest: Vec<RawGuest>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHost {
    name: String,
    run_dir: Option<PathBuf>,
    #[serde(default)]
    deny_action: RawDenyAction,
    #[serde(default)]
    on_policy_change: RawPolicyChangeAction,
    ring_size: Option<u64>,
    flow_log: Option<PathBuf>,
    flow_log_max_bytes: Option<u64>,
    flow_log_keep: Option<i64>,
    metrics: Option<String>,
    default_max_connections: Option<i64>,
    default_max_shared_memory: Option<RawSize>,
    default_max_channels: Option<i64>,
    vsock_backend: Option<PathBuf>,
    store: Option<RawStore>,
}

/// `[host.store]`.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawStore {
    etcd: Vec<String>,
    prefix: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "lowercase")]
enum RawDenyAction {
    #[default]
    Drop,
    Reject,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "lowercase")]
enum RawPolicyChangeAction {
    #[default]
    Keep,
    Reset,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFabric {
    #[serde(default)]
    kind: RawFabricKind,
    ring_size: Option<u64>,
    key_file: Option<PathBuf>,
    busy_poll_us: Option<i64>,
    #[serde(default)]
    pub(crate) host: Vec<RawFabricHost>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(rename_all = "lowercase")]
enum RawFabricKind {
    #[default]
    Tcp,
    Ucx,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFabricHost {
    pub(crate) name: String,
    pub(crate) address: String,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVpc {
    pub(crate) name: String,
    cidr: String,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSecurityGroup {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) ingress: Vec<RawRule>,
    #[serde(default)]
    pub(crate) egress: Vec<RawRule>,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    protocol: RawProtocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    ports: Option<RawPorts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cidr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
}

impl RawRule {
    /// A rule as a command line spells it: `ports` as text, and its peer.
    pub(crate) fn new(protocol: ProtocolFilter, ports: Option<String>, peer: RulePeerSpec) -> RawRule {
        let protocol = match protocol {
            ProtocolFilter::All => RawProtocol::All,
            ProtocolFilter::Only(Protocol::Tcp) => RawProtocol::Tcp,
            ProtocolFilter::Only(Protocol::Udp) => RawProtocol::Udp,
            ProtocolFilter::Only(Protocol::Icmp) => RawProtocol::Icmp,
        };
        let (cidr, group) = match peer {
            RulePeerSpec::Cidr(cidr) => (Some(cidr), None),
            RulePeerSpec::Group(group) => (None, Some(group)),
        };
        RawRule { protocol, ports: ports.map(RawPorts::Text), cidr, group }
    }
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(rename_all = "lowercase")]
enum RawProtocol {
    Tcp,
    Udp,
    Icmp,
    All,
}

/// `ports` as written: a string (`"6379"`, `"1000-2000"`, `"all"`) or, since
/// that is what people type, a bare integer.
#[derive(Serialize, Clone)]
#[serde(untagged)]
enum RawPorts {
    Text(String),
    Number(i64),
}

impl<'de> Deserialize<'de> for RawPorts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortsVisitor;

        impl Visitor<'_> for PortsVisitor {
            type Value = RawPorts;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number, a range like \"1000-2000\", or \"all\"")
            }

            fn visit_i64<E: de::Error>(self, port: i64) -> Result<RawPorts, E> {
                Ok(RawPorts::Number(port))
            }

            // JSON (the admin socket) hands non-negative integers over as u64.
            fn visit_u64<E: de::Error>(self, port: u64) -> Result<RawPorts, E> {
                Ok(RawPorts::Number(i64::try_from(port).unwrap_or(i64::MAX)))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<RawPorts, E> {
                Ok(RawPorts::Text(text.to_owned()))
            }
        }

        deserializer.deserialize_any(PortsVisitor)
    }
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGuest {
    pub(crate) name: String,
    vpc: String,
    addresses: Vec<String>,
    #[serde(default)]
    pub(crate) security_groups: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) netns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_connections: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_shared_memory: Option<RawSize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_channels: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vm: Option<Box<RawVm>>,
}

/// `[guest.vm]`: the guest is a virtual machine.
#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawVm {
    cid: i64,
    region: RawSize,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<RawSize>,
}

impl RawGuest {
    /// A guest in `vpc` with `addresses` and no settings of its own.
    pub(crate) fn new(name: String, vpc: String, addresses: Vec<String>, security_groups: Vec<String>) -> RawGuest {
        RawGuest {
            name,
            vpc,
            addresses,
            security_groups,
            netns: None,
            host: None,
            max_connections: None,
            max_shared_memory: None,
            max_channels: None,
            vm: None,
        }
    }

    /// Sets `max_shared_memory` from text: digits are bytes, as in the file;
    /// anything else is a size like `"64MiB"`, validated with the guest.
    pub(crate) fn set_max_shared_memory(&mut self, size: &str) {
        self.max_shared_memory = Some(match size.parse::<i64>() {
            Ok(bytes) => RawSize::Number(bytes),
            Err(_) => RawSize::Text(size.to_owned()),
        });
    }
}

/// The page size a VM's region is made of.
const PAGE: u64 = 4096;

/// A size as written: bytes as an integer, or a string like `"64MiB"`.
#[derive(Serialize, Clone)]
#[serde(untagged)]
enum RawSize {
    Text(String),
    Number(i64),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes or a size like \"64MiB\"")
            }

            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<RawSize, E> {
                Ok(RawSize::Number(bytes))
            }

            // JSON (a live `add_guest`) gives positive numbers as u64.
            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<RawSize, E> {
                Ok(i64::try_from(bytes).map_or_else(|_| RawSize::Text(bytes.to_string()), RawSize::Number))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(text.to_owned()))
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Turns raw structs into the model, failing on the first problem.
pub(crate) struct Validator<'a> {
    pub(crate) file: &'a Path,
}

impl Validator<'_> {
    fn invalid(&self, field: impl Into<String>, problem: Problem) -> ConfigError {
        ConfigError::Invalid { file: self.file.to_owned(), field: field.into(), problem }
    }

    pub(crate) fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let host = self.host(raw.host)?;
        let fabric = raw.fabric.map(|fabric| self.fabric(fabric, &host)).transpose()?;
        let vpcs = self.vpcs(raw.vpc)?;
        let security_groups = self.security_groups(raw.security_group)?;
        let guests = self.guests(raw.guest, &vpcs, &security_groups, &host, fabric.as_ref())?;
        Ok(Config::from_validated(host, fabric, vpcs, guests, security_groups))
    }

    fn fabric(&self, raw: RawFabric, host: &HostConfig) -> Result<FabricConfig, ConfigError> {
        let kind = match raw.kind {
            RawFabricKind::Tcp => FabricKind::Tcp,
            RawFabricKind::Ucx => FabricKind::Ucx,
        };
        let mut first_by_name = HashMap::new();
        let mut hosts = Vec::with_capacity(raw.host.len());
        for (i, entry) in raw.host.into_iter().enumerate() {
            let name_field = format!("fabric.host[{i}].name");
            check_host_name(&entry.name).map_err(|p| self.invalid(&name_field, p))?;
            self.check_unique(&mut first_by_name, &entry.name, name_field)?;
            let address = match entry.address.parse::<SocketAddr>() {
                Ok(addr) if addr.port() != 0 => addr,
                _ => {
                    return Err(
                        self.invalid(format!("fabric.host[{i}].address"), Problem::BadListenAddress(entry.address))
                    )
                }
            };
            hosts.push(FabricHost { name: entry.name, address });
        }
        if !hosts.iter().any(|h| h.name == host.name) {
            return Err(self.invalid("fabric.host", Problem::FabricWithoutThisHost(host.name.clone())));
        }
        let ring_size = self.ring_size("fabric.ring_size", raw.ring_size, FabricConfig::DEFAULT_RING_SIZE)?;
        if let Some(path) = raw.key_file.as_ref().filter(|p| !p.is_absolute()) {
            return Err(self.invalid("fabric.key_file", Problem::RelativePath(path.clone())));
        }
        let busy_poll_us = match raw.busy_poll_us {
            None => FabricConfig::DEFAULT_BUSY_POLL_US,
            Some(us) => u32::try_from(us)
                .ok()
                .filter(|us| *us <= FabricConfig::MAX_BUSY_POLL_US)
                .ok_or_else(|| self.invalid("fabric.busy_poll_us", Problem::BadBusyPoll(us)))?,
        };
        Ok(FabricConfig { kind, ring_size, hosts, key_file: raw.key_file, busy_poll_us })
    }

    /// A ring size setting: a power of two within the ring limits.
    fn ring_size(&self, field: &str, raw: Option<u64>, default: u32) -> Result<u32, ConfigError> {
        match raw {
            None => Ok(default),
            Some(size) => u32::try_from(size)
                .ok()
                .filter(|size| {
                    size.is_power_of_two() && (HostConfig::MIN_RING_SIZE..=HostConfig::MAX_RING_SIZE).contains(size)
                })
                .ok_or_else(|| self.invalid(field, Problem::BadRingSize(size))),
        }
    }

    fn host(&self, raw: RawHost) -> Result<HostConfig, ConfigError> {
        check_host_name(&raw.name).map_err(|p| self.invalid("host.name", p))?;

        let run_dir = raw.run_dir.unwrap_or_else(|| PathBuf::from(HostConfig::DEFAULT_RUN_DIR));
        if !run_dir.is_absolute() {
            return Err(self.invalid("host.run_dir", Problem::RelativePath(run_dir)));
        }

        let ring_size = self.ring_size("host.ring_size", raw.ring_size, HostConfig::DEFAULT_RING_SIZE)?;

        let deny_action = match raw.deny_action {
            RawDenyAction::Drop => DenyAction::Drop,
            RawDenyAction::Reject => DenyAction::Reject,
        };
        let on_policy_change = match raw.on_policy_change {
            RawPolicyChangeAction::Keep => PolicyChangeAction::Keep,
            RawPolicyChangeAction::Reset => PolicyChangeAction::Reset,
        };

        let flow_log = self.flow_log(raw.flow_log, raw.flow_log_max_bytes, raw.flow_log_keep)?;

        let metrics = match raw.metrics {
            None => None,
            Some(text) => match text.parse::<SocketAddr>() {
                Ok(addr) if addr.port() != 0 => Some(addr),
                _ => return Err(self.invalid("host.metrics", Problem::BadListenAddress(text))),
            },
        };

        let mut host = HostConfig {
            name: raw.name,
            run_dir,
            deny_action,
            on_policy_change,
            ring_size,
            flow_log,
            metrics,
            default_quotas: Quotas::DEFAULT,
            vsock_backend: raw.vsock_backend.unwrap_or_else(|| HostConfig::DEFAULT_VSOCK_BACKEND.into()),
            store: raw.store.map(|store| self.store(store)).transpose()?,
        };
        host.default_quotas = self.quotas(
            "host.default_max_",
            (raw.default_max_connections, raw.default_max_shared_memory, raw.default_max_channels),
            Quotas::DEFAULT,
            (host.segment_size(), ring_size),
        )?;
        Ok(host)
    }

    fn store(&self, raw: RawStore) -> Result<StoreConfig, ConfigError> {
        if raw.etcd.is_empty() {
            return Err(self.invalid("host.store.etcd", Problem::Empty));
        }
        for (i, url) in raw.etcd.iter().enumerate() {
            let port = url.strip_prefix("http://").and_then(|rest| rest.trim_end_matches('/').rsplit_once(':'));
            if !port.is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)) {
                return Err(self.invalid(format!("host.store.etcd[{i}]"), Problem::BadStoreEndpoint(url.clone())));
            }
        }
        let mut prefix = raw.prefix.unwrap_or_else(|| StoreConfig::DEFAULT_PREFIX.to_owned());
        if !prefix.starts_with('/') {
            return Err(
                self.invalid("host.store.prefix", Problem::Store(format!("{prefix:?} does not start with '/'")))
            );
        }
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(StoreConfig { endpoints: raw.etcd, prefix })
    }

    /// Quotas from the fields `{prefix}connections`, `{prefix}shared_memory`
    /// and `{prefix}channels`, each falling back to `defaults`. `segment` is
    /// one connection's segment size at the host's ring size.
    fn quotas(
        &self,
        prefix: &str,
        (connections, shared_memory, channels): (Option<i64>, Option<RawSize>, Option<i64>),
        defaults: Quotas,
        (segment, ring_size): (u64, u32),
    ) -> Result<Quotas, ConfigError> {
        let count = |value: Option<i64>, name: &str, default: u64| match value {
            None => Ok(default),
            Some(n) => u64::try_from(n)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| self.invalid(format!("{prefix}{name}"), Problem::QuotaBelowOne(n))),
        };
        let max_connections = count(connections, "connections", defaults.max_connections)?;
        let max_channels = count(channels, "channels", defaults.max_channels)?;
        let max_shared_memory = match shared_memory {
            None => defaults.max_shared_memory,
            Some(raw) => {
                let field = format!("{prefix}shared_memory");
                let size = parse_size(&raw).map_err(|p| self.invalid(&field, p))?;
                if size < segment {
                    return Err(self.invalid(field, Problem::SharedMemoryBelowSegment { size, segment, ring_size }));
                }
                size
            }
        };
        Ok(Quotas { max_connections, max_shared_memory, max_channels })
    }

    fn flow_log(
        &self,
        path: Option<PathBuf>,
        max_bytes: Option<u64>,
        keep: Option<i64>,
    ) -> Result<Option<FlowLogConfig>, ConfigError> {
        let Some(path) = path else {
            // Rotation settings without a log are a mistake worth pointing at.
            if max_bytes.is_some() {
                return Err(self.invalid("host.flow_log_max_bytes", Problem::NeedsFlowLog));
            }
            if keep.is_some() {
                return Err(self.invalid("host.flow_log_keep", Problem::NeedsFlowLog));
            }
            return Ok(None);
        };
        if !path.is_absolute() {
            return Err(self.invalid("host.flow_log", Problem::RelativePath(path)));
        }
        let max_bytes = max_bytes.unwrap_or(FlowLogConfig::DEFAULT_MAX_BYTES);
        if max_bytes < FlowLogConfig::MIN_MAX_BYTES {
            return Err(self.invalid("host.flow_log_max_bytes", Problem::FlowLogTooSmall(max_bytes)));
        }
        let keep = match keep {
            None => FlowLogConfig::DEFAULT_KEEP,
            Some(keep) => u32::try_from(keep)
                .ok()
                .filter(|keep| (1..=FlowLogConfig::MAX_KEEP).contains(keep))
                .ok_or_else(|| self.invalid("host.flow_log_keep", Problem::BadFlowLogKeep(keep)))?,
        };
        Ok(Some(FlowLogConfig { path, max_bytes, keep }))
    }

    fn vpcs(&self, raw: Vec<RawVpc>) -> Result<Vec<Vpc>, ConfigError> {
        let mut first_by_name = HashMap::new();
        let mut vpcs = Vec::with_capacity(raw.len());
        for (i, vpc) in raw.into_iter().enumerate() {
            let name_field = format!("vpc[{i}].name");
            check_name(&vpc.name, None).map_err(|p| self.invalid(&name_field, p))?;
            self.check_unique(&mut first_by_name, &vpc.name, name_field)?;
            let cidr = vpc.cidr.parse().map_err(|err| self.invalid(format!("vpc[{i}].cidr"), Problem::BadCidr(err)))?;
            vpcs.push(Vpc { name: vpc.name, cidr });
        }
        Ok(vpcs)
    }

    fn security_groups(&self, raw: Vec<RawSecurityGroup>) -> Result<Vec<SecurityGroup>, ConfigError> {
        // Names first: rules may name any group, including later ones.
        let mut ids_by_name = HashMap::new();
        let mut first_by_name = HashMap::new();
        for (i, group) in raw.iter().enumerate() {
            let name_field = format!("security_group[{i}].name");
            check_name(&group.name, None).map_err(|p| self.invalid(&name_field, p))?;
            self.check_unique(&mut first_by_name, &group.name, name_field)?;
            ids_by_name.insert(group.name.clone(), GroupId(i));
        }

        raw.into_iter()
            .map(|group| {
                let field = format!("security_group \"{}\"", group.name);
                let rules = |direction: &str, raw_rules: Vec<RawRule>| {
                    raw_rules
                        .into_iter()
                        .enumerate()
                        .map(|(j, rule)| self.rule(&format!("{field}.{direction}[{j}]"), rule, &ids_by_name))
                        .collect::<Result<Vec<_>, _>>()
                };
                Ok(SecurityGroup {
                    ingress: rules("ingress", group.ingress)?,
                    egress: rules("egress", group.egress)?,
                    name: group.name,
                })
            })
            .collect()
    }

    pub(crate) fn rule(
        &self,
        field: &str,
        raw: RawRule,
        groups_by_name: &HashMap<String, GroupId>,
    ) -> Result<Rule, ConfigError> {
        let protocol = match raw.protocol {
            RawProtocol::Tcp => ProtocolFilter::Only(Protocol::Tcp),
            RawProtocol::Udp => ProtocolFilter::Only(Protocol::Udp),
            RawProtocol::Icmp => ProtocolFilter::Only(Protocol::Icmp),
            RawProtocol::All => ProtocolFilter::All,
        };

        let ports_field = || format!("{field}.ports");
        let ports = match raw.ports {
            None => PortRange::ALL,
            Some(ports) => parse_ports(&ports).map_err(|p| self.invalid(ports_field(), p))?,
        };
        let has_ports = matches!(protocol, ProtocolFilter::Only(Protocol::Tcp | Protocol::Udp));
        if !has_ports && ports != PortRange::ALL {
            return Err(self.invalid(ports_field(), Problem::PortsNotApplicable(protocol)));
        }

        let peer = match (raw.cidr, raw.group) {
            (Some(cidr), None) => {
                Peer::Cidr(cidr.parse().map_err(|err| self.invalid(format!("{field}.cidr"), Problem::BadCidr(err)))?)
            }
            (None, Some(group)) => match groups_by_name.get(&group) {
                Some(id) => Peer::Group(*id),
                None => return Err(self.invalid(format!("{field}.group"), Problem::UnknownSecurityGroup(group))),
            },
            (None, None) => return Err(self.invalid(field, Problem::MissingPeer)),
            (Some(_), Some(_)) => return Err(self.invalid(field, Problem::BothPeers)),
        };

        Ok(Rule { protocol, ports, peer })
    }

    fn guests(
        &self,
        raw: Vec<RawGuest>,
        vpcs: &[Vpc],
        security_groups: &[SecurityGroup],
        host: &HostConfig,
        fabric: Option<&FabricConfig>,
    ) -> Result<Vec<Guest>, ConfigError> {
        let mut first_by_name = HashMap::new();
        let mut first_by_netns = HashMap::new();
        let mut first_by_cid = HashMap::new();
        let mut first_by_address: HashMap<(VpcId, Ipv4Addr), String> = HashMap::new();
        let mut guests = Vec::with_capacity(raw.len());

        for (i, guest) in raw.into_iter().enumerate() {
            let at = |rest: &str| format!("guest[{i}].{rest}");

            check_name(&guest.name, Some(MAX_GUEST_NAME_LEN)).map_err(|p| self.invalid(at("name"), p))?;
            self.check_unique(&mut first_by_name, &guest.name, at("name"))?;

            let (vpc_index, vpc) = vpcs
                .iter()
                .enumerate()
                .find(|(_, vpc)| vpc.name == guest.vpc)
                .ok_or_else(|| self.invalid(at("vpc"), Problem::UnknownVpc(guest.vpc.clone())))?;
            let vpc_id = VpcId(vpc_index);

            if guest.addresses.is_empty() {
                return Err(self.invalid(at("addresses"), Problem::NoAddresses));
            }
            let mut addresses = Vec::with_capacity(guest.addresses.len());
            for (k, text) in guest.addresses.iter().enumerate() {
                let field = at(&format!("addresses[{k}]"));
                let addr: Ipv4Addr =
                    text.parse().map_err(|_| self.invalid(&field, Problem::BadAddress(text.clone())))?;
                if !vpc.cidr.contains(addr) {
                    return Err(
                        self.invalid(field, Problem::AddressOutsideVpc { addr, vpc: vpc.name.clone(), cidr: vpc.cidr })
                    );
                }
                if let Some(first) = first_by_address.get(&(vpc_id, addr)) {
                    return Err(self.invalid(
                        field,
                        Problem::DuplicateAddress { addr, vpc: vpc.name.clone(), first: first.clone() },
                    ));
                }
                first_by_address.insert((vpc_id, addr), field);
                addresses.push(addr);
            }

            let mut groups = Vec::with_capacity(guest.security_groups.len());
            let mut first_by_group = HashMap::new();
            for (k, name) in guest.security_groups.iter().enumerate() {
                let field = at(&format!("security_groups[{k}]"));
                let id = security_groups
                    .iter()
                    .position(|group| group.name == *name)
                    .map(GroupId)
                    .ok_or_else(|| self.invalid(&field, Problem::UnknownSecurityGroup(name.clone())))?;
                self.check_unique(&mut first_by_group, name, field)?;
                groups.push(id);
            }

            let netns = guest.netns.unwrap_or_else(|| format!("vs-{}", guest.name));
            check_netns(&netns).map_err(|p| self.invalid(at("netns"), p))?;
            self.check_unique(&mut first_by_netns, &netns, at("netns"))?;

            let given_shared_memory = guest.max_shared_memory.is_some();
            let quotas = self.quotas(
                &at("max_"),
                (guest.max_connections, guest.max_shared_memory, guest.max_channels),
                host.default_quotas,
                (host.segment_size(), host.ring_size),
            )?;
            // A guest that cannot hold one relayed segment could never
            // connect across hosts (ENOBUFS on every try).
            if let Some(f) = fabric.filter(|f| quotas.max_shared_memory < f.segment_size()) {
                let field =
                    if given_shared_memory { at("max_shared_memory") } else { "host.default_max_shared_memory".into() };
                let problem = Problem::SharedMemoryBelowFabricSegment {
                    size: quotas.max_shared_memory,
                    segment: f.segment_size(),
                    ring_size: f.ring_size,
                };
                return Err(self.invalid(field, problem));
            }

            let placed_on = match guest.host {
                None => host.name.clone(),
                Some(name) => {
                    let known = name == host.name || fabric.is_some_and(|f| f.hosts.iter().any(|h| h.name == name));
                    if !known {
                        return Err(self.invalid(at("host"), Problem::UnknownHost(name)));
                    }
                    name
                }
            };

            let vm = match guest.vm {
                None => None,
                Some(raw) => Some(self.vm(&at("vm."), *raw, &quotas, host.segment_size(), &mut first_by_cid)?),
            };

            guests.push(Guest { name: guest.name, vpc: vpc_id, addresses, groups, netns, host: placed_on, quotas, vm });
        }
        Ok(guests)
    }

    /// A guest's `[guest.vm]`, its fields under `prefix`.
    fn vm(
        &self,
        prefix: &str,
        raw: RawVm,
        quotas: &Quotas,
        segment: u64,
        first_by_cid: &mut HashMap<String, String>,
    ) -> Result<VmGuest, ConfigError> {
        let field = |name: &str| format!("{prefix}{name}");
        let cid = u32::try_from(raw.cid)
            .ok()
            .filter(|cid| (VmGuest::MIN_CID..u32::MAX).contains(cid))
            .ok_or_else(|| self.invalid(field("cid"), Problem::BadCid(raw.cid)))?;
        self.check_unique(first_by_cid, &cid.to_string(), field("cid"))?;
        let region = parse_size(&raw.region).map_err(|p| self.invalid(field("region"), p))?;
        if region < segment || region > quotas.max_shared_memory || region % PAGE != 0 {
            let problem = Problem::BadRegion { size: region, segment, quota: quotas.max_shared_memory };
            return Err(self.invalid(field("region"), problem));
        }
        let memory = match raw.memory {
            None => VmGuest::DEFAULT_MEMORY,
            Some(raw) => parse_size(&raw).map_err(|p| self.invalid(field("memory"), p))?,
        };
        if memory < VmGuest::MIN_MEMORY || memory % (1 << 20) != 0 {
            return Err(self.invalid(field("memory"), Problem::BadVmMemory(memory)));
        }
        Ok(VmGuest { cid, region, memory })
    }

    /// Records that `field` holds `value`, or fails if an earlier field did.
    fn check_unique(
        &self,
        first_by_value: &mut HashMap<String, String>,
        value: &str,
        field: String,
    ) -> Result<(), ConfigError> {
        if let Some(first) = first_by_value.get(value) {
            return Err(self.invalid(field, Problem::Duplicate { value: value.to_owned(), first: first.clone() }));
        }
        first_by_value.insert(value.to_owned(), field);
        Ok(())
    }
}

/// Checks a VPC, security group or guest name.
fn check_name(name: &str, max_len: Option<usize>) -> Result<(), Problem> {
    if name.is_empty() {
        return Err(Problem::Empty);
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if !name.chars().all(allowed) || name.starts_with('-') {
        return Err(Problem::BadName(name.to_owned()));
    }
    match max_len {
        Some(max) if name.len() > max => Err(Problem::NameTooLong { name: name.to_owned(), max }),
        _ => Ok(()),
    }
}

/// Checks the host's name: an RFC 1123 host name, possibly qualified.
fn check_host_name(name: &str) -> Result<(), Problem> {
    const MAX_LEN: usize = 253;
    if name.is_empty() {
        return Err(Problem::Empty);
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.len() > MAX_LEN || !name.split('.').all(label_ok) {
        return Err(Problem::BadHostName(name.to_owned()));
    }
    Ok(())
}

/// Checks a network namespace name: `ip netns` keeps namespaces as files
/// under /run/netns, so it must be a plain, reasonable file name.
fn check_netns(name: &str) -> Result<(), Problem> {
    // NAME_MAX on Linux.
    const MAX_LEN: usize = 255;
    if name.is_empty() {
        return Err(Problem::Empty);
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name == "." || name == ".." || name.len() > MAX_LEN || !name.chars().all(allowed) {
        return Err(Problem::BadNetns(name.to_owned()));
    }
    Ok(())
}

/// Parses a size: an integer number of bytes, or a string of digits, an
/// optional space and a unit (B, KiB, MiB, GiB, TiB: powers of 1024). SI
/// units (`MB`) are refused rather than guessed at.
fn parse_size(raw: &RawSize) -> Result<u64, Problem> {
    let text = match raw {
        RawSize::Number(n) => return u64::try_from(*n).map_err(|_| Problem::BadSize(n.to_string())),
        RawSize::Text(text) => text.as_str(),
    };
    let bad = || Problem::BadSize(text.to_owned());
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let shift = match unit.strip_prefix(' ').unwrap_or(unit) {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return Err(bad()),
    };
    let number: u64 = number.parse().map_err(|_| bad())?;
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// Parses `ports`: `all`, a port, or `lo-hi`, each port within 1..=65535.
fn parse_ports(raw: &RawPorts) -> Result<PortRange, Problem> {
    let text = match raw {
        RawPorts::Number(port) => {
            let port = u16::try_from(*port).map_err(|_| Problem::PortOutOfRange(port.to_string()))?;
            return port_range(port, port);
        }
        RawPorts::Text(text) => text.as_str(),
    };
    if text == "all" {
        return Ok(PortRange::ALL);
    }
    let parse_port = |part: &str| -> Result<u16, Problem> {
        // Digits only: u16::from_str would also take a '+'.
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Problem::BadPorts(text.to_owned()));
        }
        part.parse().map_err(|_| Problem::PortOutOfRange(part.to_owned()))
    };
    match text.split_once('-') {
        Some((lo, hi)) => port_range(parse_port(lo)?, parse_port(hi)?),
        None => {
            let port = parse_port(text)?;
            port_range(port, port)
        }
    }
}

/// The range `lo..=hi`, explaining why it is not one.
fn port_range(lo: u16, hi: u16) -> Result<PortRange, Problem> {
    if lo == 0 {
        return Err(Problem::PortOutOfRange("0".to_owned()));
    }
    PortRange::new(lo, hi).ok_or(Problem::BackwardPortRange { lo, hi })
}
