//! `vsocket lab`: the kernel network a config describes, built with iproute2.
//!
//! vSocket carries guests' TCP over shared memory, but guests still need an
//! ordinary network: it is the baseline vSocket is measured against, and the
//! path for whatever the library leaves to the kernel. [`up`] builds it:
//!
//! ```text
//!  netns vsw-<host>: the switch          netns of guest 0
//! +-----------------------------+       +----------------------+
//! | vbr0: bridge of VPC 0       |       | lo                   |
//! |   +-- vp0 ==================|=veth==|== eth0 10.10.0.2/24  |
//! |   +-- vp1 ==================|=veth. +----------------------+
//! |                             |      '== eth0 of guest 1 ...
//! | vbr1: bridge of VPC 1       |
//! |   +-- vp2 ==================|=veth==== eth0 of guest 2 ...
//! +-----------------------------+
//! ```
//!
//! One bridge per VPC is what keeps VPCs apart: two VPCs may use the same
//! addresses, and since their guests share no layer-2 segment, an ARP
//! request or a packet from one never reaches the other. Bridge `vbr<i>`
//! serves the VPC with index `i`, and port `vp<j>` leads to the guest with
//! index `j`, in config file order. Guests get no default route: the lab is
//! one flat subnet per VPC.
//!
//! Only the namespaces the config names (each guest's, and the switch
//! `vsw-<host name>`) are ever created, changed or deleted. Every `ip`
//! command runs inside one of them (`ip -n`); each veth pair is created in
//! the switch with its peer placed straight into the guest, so nothing ever
//! appears in the host's own namespace.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use vsocket_policy::{Config, Guest, GuestId, VpcId};

/// The interface through which every guest reaches its VPC.
pub const GUEST_INTERFACE: &str = "eth0";

/// How long [`up`] waits for every guest's interface to become usable.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often [`up`] looks while it waits.
const READY_POLL: Duration = Duration::from_millis(20);

/// Why the lab could not be built, torn down or inspected.
#[derive(Debug)]
pub enum LabError {
    /// `guest "{guest}" uses network namespace "{netns}", which is the lab
    /// switch's name`
    NameClash {
        /// The guest whose namespace clashes.
        guest: String,
        /// The namespace name both want.
        netns: String,
    },
    /// `network namespace "{netns}" of guest "{guest}" starts with '-', which
    /// ip would read as an option`
    OptionLikeName {
        /// The guest whose namespace it is.
        guest: String,
        /// The namespace name.
        netns: String,
    },
    /// `` cannot run `{command}` ``; the I/O error is the source.
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not be started.
        source: io::Error,
    },
    /// `` `{command}` failed ({status}): {stderr} ``
    Failed {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it printed on stderr, trimmed.
        stderr: String,
    },
    /// `` unexpected output from `{command}`: {problem} ``
    Output {
        /// The command line.
        command: String,
        /// What was wrong with it.
        problem: String,
    },
    /// `{interface} of guest "{guest}" is not usable after {timeout:?}: {reason}`
    NotReady {
        /// The guest.
        guest: String,
        /// How long `up` waited.
        timeout: Duration,
        /// The last thing found missing, like `eth0 is DOWN`.
        reason: String,
    },
}

impl fmt::Display for LabError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NameClash { guest, netns } => write!(
                f,
                "guest \"{guest}\" uses network namespace \"{netns}\", which is the lab switch's \
                 name"
            ),
            Self::OptionLikeName { guest, netns } => write!(
                f,
                "network namespace \"{netns}\" of guest \"{guest}\" starts with '-', which ip \
                 would read as an option"
            ),
            Self::Spawn { command, .. } => write!(f, "cannot run `{command}`"),
            Self::Failed { command, status, stderr } => {
                write!(f, "`{command}` failed ({status})")?;
                if stderr.is_empty() {
                    Ok(())
                } else {
                    write!(f, ": {stderr}")
                }
            }
            Self::Output { command, problem } => {
                write!(f, "unexpected output from `{command}`: {problem}")
            }
            Self::NotReady { guest, timeout, reason } => {
                write!(f, "{GUEST_INTERFACE} of guest \"{guest}\" is not usable after {timeout:?}: {reason}")
            }
        }
    }
}

impl std::error::Error for LabError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Spawn { source, .. } => Some(source),
            Self::NameClash { .. }
            | Self::OptionLikeName { .. }
            | Self::Failed { .. }
            | Self::Output { .. }
            | Self::NotReady { .. } => None,
        }
    }
}

/// The name of the namespace holding the lab's bridges: `vsw-<host name>`.
pub fn switch_netns(config: &Config) -> String {
    format!("vsw-{}", config.host().name)
}

/// The name of the bridge, in the switch namespace, that serves `vpc`.
pub fn bridge_name(vpc: VpcId) -> String {
    format!("vbr{}", vpc.index())
}

/// The name of the switch's end of the veth pair that leads to `guest`.
pub fn port_name(guest: GuestId) -> String {
    format!("vp{}", guest.index())
}

/// Builds the lab: the switch namespace with one bridge per VPC, and each
/// guest's namespace with `lo` up and `eth0` wired to its VPC's bridge and
/// carrying its addresses. Returns once every guest's `eth0` is usable.
///
/// Whatever an earlier run left behind is removed first (as by [`down`]).
/// If building fails midway, what was built is removed again, so the lab is
/// either complete or absent.
pub fn up(config: &Config) -> Result<(), LabError> {
    let switch = checked_switch_netns(config)?;
    // Best effort: anything that could not be removed makes an `add` below
    // fail, with a message that says what is in the way.
    let _ = down(config);
    build(config, &switch).inspect_err(|_| {
        let _ = down(config);
    })
}

/// The switch's namespace name, once every namespace name of the lab is
/// known to be one that `ip` takes literally and that belongs to one role
/// only. The config's own rules admit a guest namespace named like the
/// switch, or like an option.
fn checked_switch_netns(config: &Config) -> Result<String, LabError> {
    let switch = switch_netns(config);
    for (_, guest) in config.guests() {
        if guest.netns == switch {
            return Err(LabError::NameClash { guest: guest.name.clone(), netns: switch });
        }
        if guest.netns.starts_with('-') {
            return Err(LabError::OptionLikeName { guest: guest.name.clone(), netns: guest.netns.clone() });
        }
    }
    Ok(switch)
}

fn build(config: &Config, switch: &str) -> Result<(), LabError> {
    ip(&format!("netns add {switch}"))?;
    for (vpc_id, _) in config.vpcs() {
        let bridge = bridge_name(vpc_id);
        ip(&format!("-n {switch} link add {bridge} type bridge"))?;
        ip(&format!("-n {switch} link set {bridge} up"))?;
    }
    for (guest_id, guest) in config.guests().filter(|(id, _)| config.is_local(*id)) {
        let netns = &guest.netns;
        let port = port_name(guest_id);
        let bridge = bridge_name(guest.vpc);
        let prefix_len = config.vpc(guest.vpc).cidr.prefix_len();
        ip(&format!("netns add {netns}"))?;
        ip(&format!("-n {switch} link add {port} type veth peer name {GUEST_INTERFACE} netns {netns}"))?;
        ip(&format!("-n {switch} link set {port} master {bridge} up"))?;
        ip(&format!("-n {netns} link set lo up"))?;
        for addr in &guest.addresses {
            ip(&format!("-n {netns} addr add {addr}/{prefix_len} dev {GUEST_INTERFACE}"))?;
        }
        ip(&format!("-n {netns} link set {GUEST_INTERFACE} up"))?;
    }
    if let Some(fabric) = fabric_netns(config) {
        wire_fabric(config, switch, &fabric)?;
    }
    wait_until_ready(config, switch)
}

/// The namespace that stands for the network between a fabric's hosts:
/// `vsf-<smallest host name>`, shared by every host of the fabric. `None`
/// without a fabric of two or more hosts.
pub fn fabric_netns(config: &Config) -> Option<String> {
    let fabric = config.fabric().filter(|f| f.hosts.len() > 1)?;
    fabric.hosts.iter().map(|h| h.name.as_str()).min().map(|first| format!("vsf-{first}"))
}

/// Joins this host's switch to the network between hosts (made by the
/// first host to come up): `fab0` in the switch carries this host's fabric
/// address on bridge `fbr` there, and each VPC's bridge is joined to that
/// VPC's bridge `fv<i>` there, so the kernel path between guests on two
/// hosts is one layer-2 segment per VPC, as within a host.
fn wire_fabric(config: &Config, switch: &str, fabric_ns: &str) -> Result<(), LabError> {
    let fabric = config.fabric().expect("a fabric namespace implies a fabric");
    let this = &config.host().name;
    let k = fabric.hosts.iter().position(|h| &h.name == this).expect("the config lists this host");
    if !netns_exists(fabric_ns) {
        ip(&format!("netns add {fabric_ns}"))?;
        ip(&format!("-n {fabric_ns} link set lo up"))?;
    }
    let bridges = json("ip", &format!("-j -n {fabric_ns} link show"))?;
    let mut bridge_names: Vec<String> = config.vpcs().map(|(vpc, _)| format!("fv{}", vpc.index())).collect();
    bridge_names.push("fbr".into());
    for bridge in bridge_names {
        if find_interface(&bridges, &bridge).is_none() {
            ip(&format!("-n {fabric_ns} link add {bridge} type bridge"))?;
            keep_address(fabric_ns, &bridge)?;
            ip(&format!("-n {fabric_ns} link set {bridge} up"))?;
        }
    }
    let me = &fabric.hosts[k];
    ip(&format!("-n {switch} link set lo up"))?;
    ip(&format!("-n {switch} link add fab0 type veth peer name h{k} netns {fabric_ns}"))?;
    ip(&format!("-n {fabric_ns} link set h{k} master fbr up"))?;
    ip(&format!("-n {switch} addr add {}/24 dev fab0", me.address.ip()))?;
    ip(&format!("-n {switch} link set fab0 up"))?;
    for (vpc, _) in config.vpcs() {
        let i = vpc.index();
        ip(&format!("-n {switch} link add up{i} type veth peer name h{k}v{i} netns {fabric_ns}"))?;
        ip(&format!("-n {switch} link set up{i} master {} up", bridge_name(vpc)))?;
        ip(&format!("-n {fabric_ns} link set h{k}v{i} master fv{i} up"))?;
    }
    Ok(())
}

/// Fixes bridge `bridge`'s MAC address (in namespace `netns`) at the one
/// it was made with. Left to itself a bridge takes the lowest of its
/// ports' addresses, so each host that joins may change it, and a
/// neighbour that cached the old one (an address on the bridge, or one it
/// answered ARP for) then sends frames the bridge no longer takes as its
/// own: IP drops them until that cache entry fails.
fn keep_address(netns: &str, bridge: &str) -> Result<(), LabError> {
    let links = json("ip", &format!("-j -n {netns} link show {bridge}"))?;
    match find_interface(&links, bridge).and_then(|link| link["address"].as_str()) {
        Some(address) => ip(&format!("-n {netns} link set {bridge} address {address}")).map(drop),
        None => Ok(()),
    }
}

/// Waits until each guest's bridge port forwards and its `eth0` is up with
/// all its addresses. IPv4 has no duplicate address detection, so this is
/// normally true at once; the wait covers a kernel that is slower to bring
/// the veth's carrier up.
fn wait_until_ready(config: &Config, switch: &str) -> Result<(), LabError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for (guest_id, guest) in config.guests().filter(|(id, _)| config.is_local(*id)) {
        while let Some(reason) = unready_reason(config, switch, guest_id, guest)? {
            if Instant::now() >= deadline {
                return Err(LabError::NotReady { guest: guest.name.clone(), timeout: READY_TIMEOUT, reason });
            }
            thread::sleep(READY_POLL);
        }
    }
    Ok(())
}

/// What still keeps `guest` from using its network, if anything.
fn unready_reason(config: &Config, switch: &str, guest_id: GuestId, guest: &Guest) -> Result<Option<String>, LabError> {
    let port = port_name(guest_id);
    let ports = json("bridge", &format!("-j -n {switch} link show"))?;
    let port_state = find_interface(&ports, &port).and_then(|link| link["state"].as_str());
    if port_state != Some("forwarding") {
        return Ok(Some(format!("bridge port {port} is {}", port_state.unwrap_or("missing"))));
    }
    let Some(eth0) = interface_status(&guest.netns)? else {
        return Ok(Some(format!("there is no {GUEST_INTERFACE}")));
    };
    if eth0.state != "UP" {
        return Ok(Some(format!("{GUEST_INTERFACE} is {}", eth0.state)));
    }
    let prefix_len = config.vpc(guest.vpc).cidr.prefix_len();
    if let Some(addr) = guest.addresses.iter().find(|addr| !eth0.ipv4.contains(&(**addr, prefix_len))) {
        return Ok(Some(format!("{addr}/{prefix_len} is not assigned yet")));
    }
    Ok(None)
}

/// Removes the lab: every guest's namespace and the switch's, which takes
/// the bridges and veth pairs with them. Namespaces that do not exist are
/// skipped, so this may run any number of times.
///
/// Tries every namespace even after a failure, and reports the first one.
/// A namespace whose processes are still running disappears from
/// `/run/netns` at once but lives on until they exit; its `eth0` does not,
/// since removing the switch destroys the other end of each veth.
pub fn down(config: &Config) -> Result<(), LabError> {
    let switch = checked_switch_netns(config)?;
    let namespaces = config
        .guests()
        .filter(|(id, _)| config.is_local(*id))
        .map(|(_, guest)| guest.netns.as_str())
        .chain([switch.as_str()]);
    let mut first_error = None;
    for netns in namespaces {
        if !netns_exists(netns) {
            continue;
        }
        // Someone else may have deleted it in the meantime; that is no error.
        if let Err(err) = ip(&format!("netns delete {netns}")) {
            if netns_exists(netns) && first_error.is_none() {
                first_error = Some(err);
            }
        }
    }
    // The network between hosts goes with the last host's switch, unless
    // it carries more than the lab made (see `holds_more_than_the_lab`).
    if let (Some(fabric_ns), Some(fabric)) = (fabric_netns(config), config.fabric()) {
        let others_up = fabric.hosts.iter().any(|h| netns_exists(&format!("vsw-{}", h.name)));
        if !others_up && netns_exists(&fabric_ns) && !holds_more_than_the_lab(&fabric_ns) {
            if let Err(err) = ip(&format!("netns delete {fabric_ns}")) {
                first_error.get_or_insert(err);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Does the fabric's namespace `fabric_ns` hold an interface the lab did
/// not make (it makes `lo`, the bridges `fbr` and `fv<i>`, and the hosts'
/// ends `h<k>` and `h<k>v<i>`)? Such a namespace serves more than the lab
/// (the hosts' management network, with a fleet's store on it, made
/// before the hosts came up) and outlives the lab's hosts.
fn holds_more_than_the_lab(fabric_ns: &str) -> bool {
    let Ok(links) = json("ip", &format!("-j -n {fabric_ns} link show")) else { return false };
    let made_by_the_lab = |name: &str| {
        let digits_then = |rest: &str| rest.chars().next().is_some_and(|c| c.is_ascii_digit());
        name == "lo"
            || name == "fbr"
            || name.strip_prefix("fv").is_some_and(digits_then)
            || name.strip_prefix('h').is_some_and(digits_then)
    };
    links.as_array().into_iter().flatten().any(|link| link["ifname"].as_str().is_some_and(|n| !made_by_the_lab(n)))
}

/// One namespace of the lab as it is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceStatus {
    /// The namespace's name.
    pub netns: String,
    /// The guest it belongs to, or `None` for the switch.
    pub guest: Option<String>,
    /// Whether `/run/netns/<netns>` exists.
    pub exists: bool,
    /// The guest's `eth0`, if the namespace exists and has one.
    pub interface: Option<InterfaceStatus>,
}

/// A guest's `eth0` as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceStatus {
    /// The operational state, like `UP`, `DOWN` or `LOWERLAYERDOWN`.
    pub state: String,
    /// Its IPv4 addresses with their prefix lengths, in the kernel's order.
    pub ipv4: Vec<(Ipv4Addr, u8)>,
}

impl fmt::Display for NamespaceStatus {
    /// One line: `vs-a  guest a  present  eth0 UP 10.10.0.2/24`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = match &self.guest {
            Some(guest) => format!("guest {guest}"),
            None => "switch".to_owned(),
        };
        let presence = if self.exists { "present" } else { "absent" };
        write!(f, "{:<20} {role:<22} {presence}", self.netns)?;
        match &self.interface {
            Some(interface) => {
                write!(f, "  {GUEST_INTERFACE} {}", interface.state)?;
                for (addr, prefix_len) in &interface.ipv4 {
                    write!(f, " {addr}/{prefix_len}")?;
                }
                Ok(())
            }
            None if self.exists && self.guest.is_some() => write!(f, "  no {GUEST_INTERFACE}"),
            None => Ok(()),
        }
    }
}

/// Reports the switch namespace, then each of this host's guests', in
/// config order.
pub fn status(config: &Config) -> Result<Vec<NamespaceStatus>, LabError> {
    let switch = checked_switch_netns(config)?;
    let mut report =
        vec![NamespaceStatus { exists: netns_exists(&switch), netns: switch, guest: None, interface: None }];
    for (_, guest) in config.guests().filter(|(id, _)| config.is_local(*id)) {
        let exists = netns_exists(&guest.netns);
        report.push(NamespaceStatus {
            netns: guest.netns.clone(),
            guest: Some(guest.name.clone()),
            exists,
            interface: if exists { interface_status(&guest.netns)? } else { None },
        });
    }
    Ok(report)
}

fn netns_exists(netns: &str) -> bool {
    vsocket_admin::netns_path(netns).exists()
}

/// The `eth0` of namespace `netns`, or `None` if it has none.
fn interface_status(netns: &str) -> Result<Option<InterfaceStatus>, LabError> {
    // All interfaces rather than `dev eth0`, which fails when it is missing.
    let links = json("ip", &format!("-j -n {netns} addr show"))?;
    let Some(eth0) = find_interface(&links, GUEST_INTERFACE) else {
        return Ok(None);
    };
    let ipv4 = eth0["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|info| info["family"] == "inet" && info.get("tentative").is_none())
        .filter_map(|info| {
            let addr = info["local"].as_str()?.parse().ok()?;
            let prefix_len = u8::try_from(info["prefixlen"].as_u64()?).ok()?;
            Some((addr, prefix_len))
        })
        .collect();
    Ok(Some(InterfaceStatus { state: eth0["operstate"].as_str().unwrap_or("UNKNOWN").to_owned(), ipv4 }))
}

/// The entry named `name` in the JSON list of interfaces `ip -j` or
/// `bridge -j` printed.
fn find_interface<'a>(links: &'a Value, name: &str) -> Option<&'a Value> {
    links.as_array()?.iter().find(|link| link["ifname"] == name)
}

/// Runs `ip` with `args`, a command line as one would type it.
fn ip(args: &str) -> Result<String, LabError> {
    run("ip", args)
}

/// Runs an iproute2 command that was given `-j` and parses what it prints.
fn json(program: &str, args: &str) -> Result<Value, LabError> {
    let text = run(program, args)?;
    // `bridge -j` prints nothing at all when there is nothing to list.
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text)
        .map_err(|err| LabError::Output { command: format!("{program} {args}"), problem: err.to_string() })
}

/// Runs `program` to completion and returns its stdout, or an error naming
/// the command and carrying its stderr if it did not exit successfully.
///
/// `args` is split at whitespace. Every name in it comes from the config,
/// whose rules admit no whitespace in names, so the split is unambiguous and
/// error messages can show the command exactly as it ran.
fn run(program: &str, args: &str) -> Result<String, LabError> {
    let command = || format!("{program} {args}");
    let output = Command::new(program)
        .args(args.split_whitespace())
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn { command: command(), source })?;
    if !output.status.success() {
        return Err(LabError::Failed {
            command: command(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    String::from_utf8(output.stdout)
        .map_err(|_| LabError::Output { command: command(), problem: "it is not UTF-8".to_owned() })
}
