//! `evaluate` agrees with a deliberately naive reference model on random
//! configs and flows.
//!
//! Each case is a small random network described by plain structs. The
//! structs are rendered to TOML and parsed by the crate (so the parser's
//! mapping of names to ids is under test too), while the reference model reads
//! the structs directly and applies the documented semantics with plain loops
//! and its own address arithmetic.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use proptest::prelude::*;
use vsocket_policy::{evaluate, parse, Config, Decider, Direction, Flow, Protocol, Verdict};

/// Both VPCs use this range, so guests of different VPCs share addresses.
const VPC_CIDR: &str = "10.0.0.0/24";
const VPC_NAMES: [&str; 2] = ["v0", "v1"];

/// Rule peers, chosen to cut across guest addresses (see [`guest_address`]).
const PEER_CIDRS: [(Ipv4Addr, u8); 8] = [
    (Ipv4Addr::new(0, 0, 0, 0), 0),
    (Ipv4Addr::new(10, 0, 0, 0), 24),
    (Ipv4Addr::new(10, 0, 0, 0), 28),
    (Ipv4Addr::new(10, 0, 0, 16), 28),
    (Ipv4Addr::new(10, 0, 0, 0), 27),
    (Ipv4Addr::new(10, 0, 0, 1), 32),
    (Ipv4Addr::new(10, 0, 0, 12), 32),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
];

/// Ports for rule bounds and flows: range edges and their neighbours.
const PORTS: [u16; 14] = [1, 2, 21, 22, 23, 79, 80, 81, 443, 1000, 6379, 65534, 65535, 0];

#[derive(Debug, Clone, Copy, PartialEq)]
enum ProtocolSpec {
    Tcp,
    Udp,
    Icmp,
    All,
}

#[derive(Debug, Clone)]
enum PeerSpec {
    Cidr(Ipv4Addr, u8),
    Group(usize),
}

#[derive(Debug, Clone)]
struct RuleSpec {
    protocol: ProtocolSpec,
    /// `None` is all ports, written as `"all"` or left out per `write_all`.
    ports: Option<(u16, u16)>,
    write_all: bool,
    peer: PeerSpec,
}

#[derive(Debug, Clone)]
struct GroupSpec {
    ingress: Vec<RuleSpec>,
    egress: Vec<RuleSpec>,
}

#[derive(Debug, Clone)]
struct GuestSpec {
    vpc: usize,
    addresses: Vec<Ipv4Addr>,
    groups: Vec<usize>,
}

#[derive(Debug, Clone)]
struct NetworkSpec {
    groups: Vec<GroupSpec>,
    guests: Vec<GuestSpec>,
}

#[derive(Debug, Clone)]
struct FlowSpec {
    protocol: Protocol,
    /// True: the flow claims the server's VPC rather than the client's.
    server_vpc: bool,
    client: usize,
    client_addr: usize,
    server: usize,
    server_addr: usize,
    port: u16,
}

/// What the reference model says, in terms of spec indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefDecider {
    Rule { group: usize, ingress: bool, index: usize },
    EgressAllow,
    EgressDeny,
    IngressDeny,
    DifferentVpc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefVerdict {
    Allow(RefDecider, RefDecider),
    Deny(RefDecider),
}

/// Address `k` of the `nth` guest of its VPC: .1, .2 for the first guest,
/// .11, .12 for the second, and so on, so guests of the two VPCs collide.
fn guest_address(nth: usize, k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, (1 + 10 * nth + k) as u8)
}

fn rule_strategy(group_count: usize) -> impl Strategy<Value = RuleSpec> {
    let protocol = prop_oneof![
        Just(ProtocolSpec::Tcp),
        Just(ProtocolSpec::Udp),
        Just(ProtocolSpec::Icmp),
        Just(ProtocolSpec::All),
    ];
    let bounds = (0..PORTS.len() - 1, 0..PORTS.len() - 1).prop_map(|(a, b)| {
        let (a, b) = (PORTS[a], PORTS[b]);
        (a.min(b), a.max(b))
    });
    let peer = prop_oneof![
        (0..PEER_CIDRS.len()).prop_map(|i| PeerSpec::Cidr(PEER_CIDRS[i].0, PEER_CIDRS[i].1)),
        (0..group_count).prop_map(PeerSpec::Group),
    ];
    (protocol, proptest::option::of(bounds), any::<bool>(), peer).prop_map(|(protocol, ports, write_all, peer)| {
        RuleSpec {
            // Only tcp and udp have ports.
            ports: ports.filter(|_| matches!(protocol, ProtocolSpec::Tcp | ProtocolSpec::Udp)),
            protocol,
            write_all,
            peer,
        }
    })
}

fn network_strategy() -> impl Strategy<Value = NetworkSpec> {
    (2..=4usize, 2..=4usize).prop_flat_map(|(group_count, guest_count)| {
        let group = (
            proptest::collection::vec(rule_strategy(group_count), 0..=3),
            proptest::collection::vec(rule_strategy(group_count), 0..=3),
        )
            .prop_map(|(ingress, egress)| GroupSpec { ingress, egress });
        let guest = (0..VPC_NAMES.len(), 1..=2usize, proptest::collection::vec(0..group_count, 0..=3));
        (proptest::collection::vec(group, group_count), proptest::collection::vec(guest, guest_count)).prop_map(
            |(groups, raw_guests)| {
                let mut per_vpc = [0usize; VPC_NAMES.len()];
                let guests = raw_guests
                    .into_iter()
                    .map(|(vpc, address_count, mut groups)| {
                        let nth = per_vpc[vpc];
                        per_vpc[vpc] += 1;
                        // A group listed twice is a config error; keep first mentions.
                        let mut seen = Vec::new();
                        groups.retain(|g| {
                            !seen.contains(g) && {
                                seen.push(*g);
                                true
                            }
                        });
                        GuestSpec {
                            vpc,
                            addresses: (0..address_count).map(|k| guest_address(nth, k)).collect(),
                            groups,
                        }
                    })
                    .collect();
                NetworkSpec { groups, guests }
            },
        )
    })
}

fn flow_strategy() -> impl Strategy<Value = FlowSpec> {
    let protocol = prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp), Just(Protocol::Icmp)];
    (
        protocol,
        proptest::bool::weighted(0.2),
        any::<usize>(),
        any::<usize>(),
        any::<usize>(),
        any::<usize>(),
        prop::sample::select(&PORTS[..]),
    )
        // Indexes are reduced against the network in `resolve`.
        .prop_map(|(protocol, server_vpc, client, client_addr, server, server_addr, port)| FlowSpec {
            protocol,
            server_vpc,
            client,
            client_addr,
            server,
            server_addr,
            port,
        })
}

fn render(network: &NetworkSpec) -> String {
    let mut toml = String::from("[host]\nname = \"prop\"\n\n");
    for name in VPC_NAMES {
        writeln!(toml, "[[vpc]]\nname = \"{name}\"\ncidr = \"{VPC_CIDR}\"\n").unwrap();
    }
    for (g, group) in network.groups.iter().enumerate() {
        writeln!(toml, "[[security_group]]\nname = \"g{g}\"").unwrap();
        for (direction, rules) in [("ingress", &group.ingress), ("egress", &group.egress)] {
            for rule in rules {
                writeln!(toml, "[[security_group.{direction}]]").unwrap();
                let protocol = match rule.protocol {
                    ProtocolSpec::Tcp => "tcp",
                    ProtocolSpec::Udp => "udp",
                    ProtocolSpec::Icmp => "icmp",
                    ProtocolSpec::All => "all",
                };
                writeln!(toml, "protocol = \"{protocol}\"").unwrap();
                match rule.ports {
                    Some((lo, hi)) if lo == hi => writeln!(toml, "ports = {lo}").unwrap(),
                    Some((lo, hi)) => writeln!(toml, "ports = \"{lo}-{hi}\"").unwrap(),
                    None if rule.write_all => writeln!(toml, "ports = \"all\"").unwrap(),
                    None => {}
                }
                match &rule.peer {
                    PeerSpec::Cidr(addr, len) => writeln!(toml, "cidr = \"{addr}/{len}\"").unwrap(),
                    PeerSpec::Group(peer) => writeln!(toml, "group = \"g{peer}\"").unwrap(),
                }
            }
        }
        toml.push('\n');
    }
    for (i, guest) in network.guests.iter().enumerate() {
        let addresses: Vec<String> = guest.addresses.iter().map(|a| format!("\"{a}\"")).collect();
        let groups: Vec<String> = guest.groups.iter().map(|g| format!("\"g{g}\"")).collect();
        writeln!(
            toml,
            "[[guest]]\nname = \"h{i}\"\nvpc = \"{}\"\naddresses = [{}]\nsecurity_groups = [{}]\n",
            VPC_NAMES[guest.vpc],
            addresses.join(", "),
            groups.join(", ")
        )
        .unwrap();
    }
    toml
}

/// The flow's concrete indexes and addresses within `network`.
struct ResolvedFlow {
    protocol: Protocol,
    vpc: usize,
    client: usize,
    client_addr: Ipv4Addr,
    server: usize,
    server_addr: Ipv4Addr,
    port: u16,
}

fn resolve(network: &NetworkSpec, flow: &FlowSpec) -> ResolvedFlow {
    let client = flow.client % network.guests.len();
    let server = flow.server % network.guests.len();
    let client_guest = &network.guests[client];
    let server_guest = &network.guests[server];
    ResolvedFlow {
        protocol: flow.protocol,
        vpc: if flow.server_vpc { server_guest.vpc } else { client_guest.vpc },
        client,
        client_addr: client_guest.addresses[flow.client_addr % client_guest.addresses.len()],
        server,
        server_addr: server_guest.addresses[flow.server_addr % server_guest.addresses.len()],
        port: flow.port,
    }
}

/// Whether `addr` is in `network/len`, by counting rather than masking.
fn naive_contains(network: Ipv4Addr, len: u8, addr: Ipv4Addr) -> bool {
    let first = u64::from(u32::from(network));
    let size = 1u64 << (32 - u32::from(len));
    let addr = u64::from(u32::from(addr));
    first <= addr && addr < first + size
}

fn naive_rule_matches(
    network: &NetworkSpec,
    rule: &RuleSpec,
    protocol: Protocol,
    port: u16,
    peer_guest: usize,
    peer_addr: Ipv4Addr,
) -> bool {
    let protocol_ok = matches!(
        (rule.protocol, protocol),
        (ProtocolSpec::All, _)
            | (ProtocolSpec::Tcp, Protocol::Tcp)
            | (ProtocolSpec::Udp, Protocol::Udp)
            | (ProtocolSpec::Icmp, Protocol::Icmp)
    );
    let port_ok = match rule.ports {
        None => true,
        Some((lo, hi)) => lo <= port && port <= hi,
    };
    let peer_ok = match rule.peer {
        PeerSpec::Cidr(net, len) => naive_contains(net, len, peer_addr),
        PeerSpec::Group(group) => network.guests[peer_guest].groups.contains(&group),
    };
    protocol_ok && port_ok && peer_ok
}

fn reference(network: &NetworkSpec, flow: &ResolvedFlow) -> RefVerdict {
    let client = &network.guests[flow.client];
    let server = &network.guests[flow.server];
    if client.vpc != flow.vpc || server.vpc != flow.vpc {
        return RefVerdict::Deny(RefDecider::DifferentVpc);
    }

    let mut egress_rule_count = 0;
    for &group in &client.groups {
        egress_rule_count += network.groups[group].egress.len();
    }
    let mut egress = None;
    if egress_rule_count == 0 {
        egress = Some(RefDecider::EgressAllow);
    } else {
        'groups: for &group in &client.groups {
            for (index, rule) in network.groups[group].egress.iter().enumerate() {
                if naive_rule_matches(network, rule, flow.protocol, flow.port, flow.server, flow.server_addr) {
                    egress = Some(RefDecider::Rule { group, ingress: false, index });
                    break 'groups;
                }
            }
        }
    }
    let Some(egress) = egress else {
        return RefVerdict::Deny(RefDecider::EgressDeny);
    };

    for &group in &server.groups {
        for (index, rule) in network.groups[group].ingress.iter().enumerate() {
            if naive_rule_matches(network, rule, flow.protocol, flow.port, flow.client, flow.client_addr) {
                return RefVerdict::Allow(egress, RefDecider::Rule { group, ingress: true, index });
            }
        }
    }
    RefVerdict::Deny(RefDecider::IngressDeny)
}

/// Translates the crate's verdict into spec indexes, through names only.
fn to_reference_terms(config: &Config, verdict: Verdict) -> RefVerdict {
    let decider = |decider: Decider| match decider {
        Decider::Rule { group, direction, index } => {
            let name = &config.security_group(group).name;
            RefDecider::Rule {
                group: name.trim_start_matches('g').parse().expect("group named gN"),
                ingress: direction == Direction::Ingress,
                index,
            }
        }
        Decider::DefaultEgressAllow => RefDecider::EgressAllow,
        Decider::DefaultEgressDeny => RefDecider::EgressDeny,
        Decider::DefaultIngressDeny => RefDecider::IngressDeny,
        Decider::DifferentVpc => RefDecider::DifferentVpc,
    };
    match verdict {
        Verdict::Allow { egress, ingress } => RefVerdict::Allow(decider(egress), decider(ingress)),
        Verdict::Deny { side, reason } => {
            let expected_side = match reason {
                Decider::DefaultIngressDeny => Direction::Ingress,
                _ => Direction::Egress,
            };
            assert_eq!(side, expected_side, "side of {reason:?}");
            RefVerdict::Deny(decider(reason))
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn evaluate_matches_the_reference_model(
        network in network_strategy(),
        flows in proptest::collection::vec(flow_strategy(), 64),
    ) {
        let text = render(&network);
        let config = parse(&text, Path::new("proptest.toml"))
            .map_err(|err| TestCaseError::fail(format!("{err}\n{text}")))?;

        for flow in &flows {
            let flow = resolve(&network, flow);
            let guest_id = |i: usize| config.guest_by_name(&format!("h{i}")).expect("guest hN");
            let crate_flow = Flow {
                protocol: flow.protocol,
                vpc: config.vpc_by_name(VPC_NAMES[flow.vpc]).expect("vpc"),
                client: guest_id(flow.client),
                client_addr: flow.client_addr,
                server: guest_id(flow.server),
                server_addr: flow.server_addr,
                port: flow.port,
            };
            // The address index must agree with the spec too.
            let owner = network
                .guests
                .iter()
                .position(|g| g.vpc == flow.vpc && g.addresses.contains(&flow.server_addr));
            prop_assert_eq!(
                config.guest_owning(crate_flow.vpc, flow.server_addr),
                owner.map(guest_id)
            );

            let verdict = evaluate(&config, &crate_flow);
            // Describing never panics and names what decided.
            let description = verdict.describe(&config);
            prop_assert!(!description.is_empty());

            prop_assert_eq!(
                to_reference_terms(&config, verdict),
                reference(&network, &flow),
                "flow {:?}\nconfig:\n{}", crate_flow, text
            );
        }
    }
}
