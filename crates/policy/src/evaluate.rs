//! The policy evaluator: may this client open this connection to this server?
//!
//! Pure and cheap: no I/O, no clock, no state. The daemon calls [`evaluate`]
//! once when a connection is set up; security groups are stateful, so the
//! replies of an allowed connection need no further decision.
//!
//! The semantics are the cloud defaults (AWS, OpenStack):
//!
//! 1. Both guests must be in the flow's VPC, else [`Decider::DifferentVpc`].
//! 2. **Egress**, the client's side. If none of the client's groups has any
//!    egress rule, egress is allowed ([`Decider::DefaultEgressAllow`]; this
//!    includes a client with no groups). Otherwise some egress rule of some
//!    client group must match the server, else
//!    [`Decider::DefaultEgressDeny`].
//! 3. **Ingress**, the server's side. Some ingress rule of some server group
//!    must match the client, else [`Decider::DefaultIngressDeny`]; so a server
//!    with no groups accepts nothing.
//!
//! A rule matches when its protocol filter accepts the flow's protocol, its
//! port range holds the flow's (destination) port, and its peer is the other
//! end: a [`Peer::Cidr`] holding the other end's address, or a
//! [`Peer::Group`] the other guest is a member of. Rules only allow, so their
//! order never changes a verdict; it only chooses which rule is reported: the
//! first match, taking the guest's groups in its order and each group's rules
//! in file order.

use std::fmt;
use std::net::Ipv4Addr;

use crate::model::{Config, Direction, GroupId, Guest, GuestId, Peer, Protocol, VpcId};

/// A connection being set up, as the daemon resolved it.
///
/// The addresses are trusted: the daemon takes the client's from the guest it
/// is attached to and the server's from the connect call, resolved to
/// `server` with [`Config::guest_owning`]. The evaluator does not re-check
/// that each address belongs to its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The transport protocol.
    pub protocol: Protocol,
    /// The VPC the connection is in; both guests must belong to it.
    pub vpc: VpcId,
    /// The guest that connects.
    pub client: GuestId,
    /// The client's source address.
    pub client_addr: Ipv4Addr,
    /// The guest that accepts.
    pub server: GuestId,
    /// The address the client connects to.
    pub server_addr: Ipv4Addr,
    /// The destination port (0 for protocols without ports).
    pub port: u16,
}

/// The outcome for one [`Flow`], with what decided it for the flow log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Both sides allow the connection.
    Allow {
        /// What allowed it on the client's side.
        egress: Decider,
        /// What allowed it on the server's side.
        ingress: Decider,
    },
    /// One side denies it. Egress is decided first, so when both sides would
    /// deny, the egress side is reported.
    Deny {
        /// The side that denied; [`Direction::Egress`] for
        /// [`Decider::DifferentVpc`].
        side: Direction,
        /// Why.
        reason: Decider,
    },
}

impl Verdict {
    /// Whether the connection may go ahead.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }

    /// A one-line account for the flow log, with names from `config`, like
    /// `allowed by default: egress allowed, security_group "redis" ingress[0]`.
    pub fn describe(&self, config: &Config) -> String {
        match self {
            Self::Allow { egress, ingress } => {
                format!("allowed by {}, {}", egress.describe(config), ingress.describe(config))
            }
            Self::Deny { side, reason } => {
                format!("denied on {side} by {}", reason.describe(config))
            }
        }
    }
}

/// What decided one side of a [`Verdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider {
    /// A rule matched: rule `index` of `group`'s `direction` rules.
    Rule {
        /// The security group holding the rule.
        group: GroupId,
        /// Whether it is one of the group's ingress or egress rules.
        direction: Direction,
        /// Its position among them, in file order.
        index: usize,
    },
    /// The client's groups restrict no egress, so egress is allowed.
    DefaultEgressAllow,
    /// No ingress rule of the server's groups matched.
    DefaultIngressDeny,
    /// The client's groups have egress rules, but none matched.
    DefaultEgressDeny,
    /// The client or the server is not in the flow's VPC.
    DifferentVpc,
}

impl Decider {
    /// A human description using the names in `config`, like
    /// `security_group "redis" ingress[0]` or `default: ingress denied`.
    /// Panics if a group id came from another `Config`.
    pub fn describe(&self, config: &Config) -> String {
        match self {
            Self::Rule { group, direction, index } => {
                format!("security_group \"{}\" {direction}[{index}]", config.security_group(*group).name)
            }
            _ => self.to_string(),
        }
    }
}

impl fmt::Display for Decider {
    /// Like [`Decider::describe`], but names a group by its position, like
    /// `security_group #2 ingress[0]`, since it has no config to look it up in.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Rule { group, direction, index } => {
                write!(f, "security_group #{} {direction}[{index}]", group.index())
            }
            Self::DefaultEgressAllow => f.write_str("default: egress allowed"),
            Self::DefaultIngressDeny => f.write_str("default: ingress denied"),
            Self::DefaultEgressDeny => f.write_str("default: egress denied (no egress rule matched)"),
            Self::DifferentVpc => f.write_str("client and server not both in the flow's VPC"),
        }
    }
}

/// Decides `flow` under `config`. See the [module docs](self) for the rules.
///
/// Panics if an id in `flow` came from another `Config`.
pub fn evaluate(config: &Config, flow: &Flow) -> Verdict {
    let client = config.guest(flow.client);
    let server = config.guest(flow.server);
    if client.vpc != flow.vpc || server.vpc != flow.vpc {
        return Verdict::Deny { side: Direction::Egress, reason: Decider::DifferentVpc };
    }

    let restricts_egress = client.groups.iter().any(|group| !config.security_group(*group).egress.is_empty());
    let egress = if restricts_egress {
        match first_match(config, flow, client, server, Direction::Egress) {
            Some(rule) => rule,
            None => return Verdict::Deny { side: Direction::Egress, reason: Decider::DefaultEgressDeny },
        }
    } else {
        Decider::DefaultEgressAllow
    };

    match first_match(config, flow, server, client, Direction::Ingress) {
        Some(ingress) => Verdict::Allow { egress, ingress },
        None => Verdict::Deny { side: Direction::Ingress, reason: Decider::DefaultIngressDeny },
    }
}

/// The first rule of `owner`'s groups in `direction` that lets `flow` through
/// to or from `peer`, the guest at the other end.
fn first_match(config: &Config, flow: &Flow, owner: &Guest, peer: &Guest, direction: Direction) -> Option<Decider> {
    let peer_addr = match direction {
        Direction::Egress => flow.server_addr,
        Direction::Ingress => flow.client_addr,
    };
    owner.groups.iter().find_map(|&group| {
        config
            .security_group(group)
            .rules(direction)
            .iter()
            .position(|rule| {
                rule.protocol.matches(flow.protocol)
                    && rule.ports.contains(flow.port)
                    && match rule.peer {
                        Peer::Cidr(cidr) => cidr.contains(peer_addr),
                        Peer::Group(peer_group) => peer.is_member(peer_group),
                    }
            })
            .map(|index| Decider::Rule { group, direction, index })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use std::path::Path;

    const CONFIG: &str = r#"
        [host]
        name = "host1"

        [[vpc]]
        name = "blue"
        cidr = "10.10.0.0/24"

        [[vpc]]
        name = "green"
        cidr = "10.10.0.0/24"

        [[security_group]]
        name = "web"
        [[security_group.ingress]]
        protocol = "tcp"
        ports = "80-443"
        cidr = "10.10.0.0/25"
        [[security_group.ingress]]
        protocol = "udp"
        ports = 53
        group = "clients"

        [[security_group]]
        name = "clients"
        [[security_group.egress]]
        protocol = "tcp"
        ports = "443"
        group = "web"
        [[security_group.egress]]
        protocol = "all"
        cidr = "10.10.0.100/32"
        [[security_group.egress]]
        protocol = "udp"
        ports = "53"
        cidr = "10.10.0.0/24"

        [[security_group]]
        name = "ssh"
        [[security_group.ingress]]
        protocol = "all"
        group = "ssh"

        [[security_group]]
        name = "labels-only"

        [[guest]]
        name = "web"
        vpc = "blue"
        addresses = ["10.10.0.10", "10.10.0.11"]
        security_groups = ["web", "ssh"]

        [[guest]]
        name = "client"
        vpc = "blue"
        addresses = ["10.10.0.20", "10.10.0.130"]
        security_groups = ["clients", "ssh"]

        [[guest]]
        name = "bare"
        vpc = "blue"
        addresses = ["10.10.0.30"]

        [[guest]]
        name = "far"
        vpc = "blue"
        addresses = ["10.10.0.140"]

        [[guest]]
        name = "sink"
        vpc = "blue"
        addresses = ["10.10.0.100"]
        security_groups = ["labels-only"]

        [[guest]]
        name = "green-web"
        vpc = "green"
        addresses = ["10.10.0.10"]
        security_groups = ["web"]
    "#;

    struct Fixture {
        config: Config,
    }

    impl Fixture {
        fn new() -> Self {
            Self { config: parse(CONFIG, Path::new("test.toml")).expect("fixture parses") }
        }

        fn guest(&self, name: &str) -> GuestId {
            self.config.guest_by_name(name).expect("fixture guest")
        }

        /// A flow between the named guests' first addresses, in the client's VPC.
        fn flow(&self, protocol: Protocol, client: &str, server: &str, port: u16) -> Flow {
            let (client, server) = (self.guest(client), self.guest(server));
            Flow {
                protocol,
                vpc: self.config.guest(client).vpc,
                client,
                client_addr: self.config.guest(client).addresses[0],
                server,
                server_addr: self.config.guest(server).addresses[0],
                port,
            }
        }

        fn rule(&self, group: &str, direction: Direction, index: usize) -> Decider {
            Decider::Rule { group: self.config.security_group_by_name(group).expect("fixture group"), direction, index }
        }

        fn evaluate(&self, flow: &Flow) -> Verdict {
            evaluate(&self.config, flow)
        }
    }

    fn deny(side: Direction, reason: Decider) -> Verdict {
        Verdict::Deny { side, reason }
    }

    #[test]
    fn server_without_groups_denies_ingress() {
        let fx = Fixture::new();
        // "web" has no egress rules: egress is allowed by default, then "bare" has no groups.
        let verdict = fx.evaluate(&fx.flow(Protocol::Tcp, "web", "bare", 80));
        assert_eq!(verdict, deny(Direction::Ingress, Decider::DefaultIngressDeny));
        assert_eq!(verdict.describe(&fx.config), "denied on ingress by default: ingress denied");
    }

    #[test]
    fn groups_without_egress_rules_allow_egress() {
        let fx = Fixture::new();
        // "bare" has no groups at all; "web" allows tcp 80-443 from 10.10.0.0/25.
        let verdict = fx.evaluate(&fx.flow(Protocol::Tcp, "bare", "web", 80));
        assert_eq!(
            verdict,
            Verdict::Allow { egress: Decider::DefaultEgressAllow, ingress: fx.rule("web", Direction::Ingress, 0) }
        );
        assert_eq!(
            verdict.describe(&fx.config),
            "allowed by default: egress allowed, security_group \"web\" ingress[0]"
        );

        // A group with no rules at all restricts nothing either.
        let sink_to_web = fx.evaluate(&fx.flow(Protocol::Tcp, "sink", "web", 443));
        assert!(matches!(sink_to_web, Verdict::Allow { egress: Decider::DefaultEgressAllow, .. }));
    }

    #[test]
    fn egress_rules_restrict_the_client() {
        let fx = Fixture::new();
        // tcp 443 to a member of "web": egress rule 0 of "clients".
        assert_eq!(
            fx.evaluate(&fx.flow(Protocol::Tcp, "client", "web", 443)),
            Verdict::Allow {
                egress: fx.rule("clients", Direction::Egress, 0),
                ingress: fx.rule("web", Direction::Ingress, 0),
            }
        );
        // tcp 80 is allowed in by "web" but not out by "clients".
        let verdict = fx.evaluate(&fx.flow(Protocol::Tcp, "client", "web", 80));
        assert_eq!(verdict, deny(Direction::Egress, Decider::DefaultEgressDeny));
        assert_eq!(verdict.describe(&fx.config), "denied on egress by default: egress denied (no egress rule matched)");
    }

    #[test]
    fn group_peers_match_membership_not_addresses() {
        let fx = Fixture::new();
        // web's ingress rule 1 admits udp 53 from members of "clients" only,
        // and is reported before ssh's rule because "web" is web's first group.
        assert_eq!(
            fx.evaluate(&fx.flow(Protocol::Udp, "client", "web", 53)),
            Verdict::Allow {
                egress: fx.rule("clients", Direction::Egress, 2),
                ingress: fx.rule("web", Direction::Ingress, 1),
            }
        );
        assert_eq!(
            fx.evaluate(&fx.flow(Protocol::Udp, "bare", "web", 53)),
            deny(Direction::Ingress, Decider::DefaultIngressDeny),
            "bare is not in clients"
        );
        // clients' egress rule 0 reaches members of "web" only.
        assert_eq!(
            fx.evaluate(&fx.flow(Protocol::Tcp, "client", "far", 443)),
            deny(Direction::Egress, Decider::DefaultEgressDeny)
        );
        // "ssh" admits everything from its own members.
        assert_eq!(
            fx.evaluate(&fx.flow(Protocol::Icmp, "web", "client", 0)),
            Verdict::Allow { egress: Decider::DefaultEgressAllow, ingress: fx.rule("ssh", Direction::Ingress, 0) }
        );
    }

    #[test]
    fn cidr_peers_use_the_flow_address() {
        let fx = Fixture::new();
        // web allows tcp 80-443 from 10.10.0.0/25: "bare" is inside, "far" is not.
        assert!(fx.evaluate(&fx.flow(Protocol::Tcp, "bare", "web", 443)).is_allowed());
        assert_eq!(
            fx.evaluate(&fx.flow(Protocol::Tcp, "far", "web", 443)),
            deny(Direction::Ingress, Decider::DefaultIngressDeny)
        );
        // An egress CIDR peer is matched against the server's address. Egress
        // is decided first, so an ingress denial shows egress passed.
        for (protocol, port) in [(Protocol::Tcp, 1), (Protocol::Udp, 65535), (Protocol::Icmp, 0)] {
            assert_eq!(
                fx.evaluate(&fx.flow(protocol, "client", "sink", port)),
                deny(Direction::Ingress, Decider::DefaultIngressDeny),
                "{protocol}"
            );
        }
    }

    #[test]
    fn port_range_edges() {
        let fx = Fixture::new();
        for (port, allowed) in [(79, false), (80, true), (81, true), (443, true), (444, false)] {
            let verdict = fx.evaluate(&fx.flow(Protocol::Tcp, "bare", "web", port));
            assert_eq!(verdict.is_allowed(), allowed, "port {port}: {verdict:?}");
        }
    }

    #[test]
    fn protocol_must_match_unless_rule_is_all() {
        let fx = Fixture::new();
        // web's ingress rule 0 is tcp only.
        for protocol in [Protocol::Udp, Protocol::Icmp] {
            assert_eq!(
                fx.evaluate(&fx.flow(protocol, "bare", "web", 80)),
                deny(Direction::Ingress, Decider::DefaultIngressDeny),
                "{protocol}"
            );
        }
        // ssh's ingress rule is "all": tcp, udp and icmp, any port.
        for (protocol, port) in [(Protocol::Tcp, 22), (Protocol::Udp, 1), (Protocol::Icmp, 0)] {
            assert_eq!(
                fx.evaluate(&fx.flow(protocol, "web", "client", port)),
                Verdict::Allow { egress: Decider::DefaultEgressAllow, ingress: fx.rule("ssh", Direction::Ingress, 0) },
                "{protocol}"
            );
        }
    }

    #[test]
    fn guests_must_share_the_flow_vpc() {
        let fx = Fixture::new();
        // Same address, same group, other VPC: never reachable.
        let mut flow = fx.flow(Protocol::Tcp, "bare", "green-web", 80);
        assert_eq!(fx.evaluate(&flow), deny(Direction::Egress, Decider::DifferentVpc));
        flow.vpc = fx.config.guest(flow.server).vpc;
        assert_eq!(fx.evaluate(&flow), deny(Direction::Egress, Decider::DifferentVpc));
        assert_eq!(Decider::DifferentVpc.describe(&fx.config), "client and server not both in the flow's VPC");
    }

    #[test]
    fn deciders_display_without_config() {
        let fx = Fixture::new();
        let rule = fx.rule("clients", Direction::Egress, 1);
        assert_eq!(rule.to_string(), "security_group #1 egress[1]");
        assert_eq!(rule.describe(&fx.config), "security_group \"clients\" egress[1]");
        assert_eq!(Decider::DefaultIngressDeny.to_string(), "default: ingress denied");
    }
}
