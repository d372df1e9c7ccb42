//! The shipped example configs, examples/lab.toml and examples/vm.toml, load and mean what they say.

use std::net::Ipv4Addr;
use std::path::Path;

use vsocket_policy::{
    evaluate, load, Decider, DenyAction, Direction, Flow, Peer, PortRange, Protocol, ProtocolFilter, Verdict,
};

fn lab() -> vsocket_policy::Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/lab.toml");
    load(&path).unwrap_or_else(|err| panic!("{err}"))
}

#[test]
fn lab_example_loads() {
    let config = lab();
    assert_eq!(config.host().name, "lab");
    assert_eq!(config.host().deny_action, DenyAction::Drop);

    let (blue, vpc) = config.vpcs().next().expect("one VPC");
    assert_eq!(config.vpcs().len(), 1);
    assert_eq!(vpc.name, "blue");
    assert_eq!(vpc.cidr.to_string(), "10.10.0.0/24");

    let open = config.security_group_by_name("open").expect("group open");
    let group = config.security_group(open);
    assert_eq!(group.ingress.len(), 1);
    assert!(group.egress.is_empty());
    let rule = &group.ingress[0];
    assert_eq!(rule.protocol, ProtocolFilter::Only(Protocol::Tcp));
    assert_eq!(rule.ports, PortRange::ALL);
    assert_eq!(rule.peer, Peer::Cidr(vpc.cidr));

    for (name, addr) in [("a", Ipv4Addr::new(10, 10, 0, 2)), ("b", Ipv4Addr::new(10, 10, 0, 3))] {
        let id = config.guest_by_name(name).expect(name);
        let guest = config.guest(id);
        assert_eq!(guest.vpc, blue);
        assert_eq!(guest.addresses, [addr]);
        assert_eq!(guest.groups, [open]);
        assert_eq!(guest.netns, format!("vs-{name}"));
        assert_eq!(config.guest_owning(blue, addr), Some(id));
    }
}

#[test]
fn lab_guests_reach_each_other_over_tcp_only() {
    let config = lab();
    let blue = config.vpc_by_name("blue").unwrap();
    let a = config.guest_by_name("a").unwrap();
    let b = config.guest_by_name("b").unwrap();
    let open = config.security_group_by_name("open").unwrap();
    let flow = |protocol, client, server, port| Flow {
        protocol,
        vpc: blue,
        client,
        client_addr: config.guest(client).addresses[0],
        server,
        server_addr: config.guest(server).addresses[0],
        port,
    };

    for (client, server) in [(a, b), (b, a)] {
        assert_eq!(
            evaluate(&config, &flow(Protocol::Tcp, client, server, 6379)),
            Verdict::Allow {
                egress: Decider::DefaultEgressAllow,
                ingress: Decider::Rule { group: open, direction: Direction::Ingress, index: 0 },
            }
        );
        assert_eq!(
            evaluate(&config, &flow(Protocol::Udp, client, server, 53)),
            Verdict::Deny { side: Direction::Ingress, reason: Decider::DefaultIngressDeny }
        );
    }
}

/// examples/vm.toml, the README's VM lab, loads with its VM guest.
#[test]
fn vm_example_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/vm.toml");
    let config = load(&path).unwrap_or_else(|err| panic!("{err}"));
    let v = config.guest(config.guest_by_name("v").expect("guest v"));
    let vm = v.vm.expect("v is a VM");
    assert_eq!((vm.cid, vm.region, vm.memory), (5, 16 << 20, 512 << 20));
    assert!(config.guest(config.guest_by_name("b").expect("guest b")).vm.is_none());
    assert_eq!(config.host().vsock_backend, Path::new("/var/cache/vsocket/vm/tools/bin/vhost-device-vsock"));
}
