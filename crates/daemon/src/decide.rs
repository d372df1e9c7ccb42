//! The connect decision: what to do with a connect, from the request, the
//! policy snapshot and the listener it reaches. Pure: it reads, counts
//! nothing, logs nothing and makes nothing; [`crate::connect`] carries a
//! decision out.
//!
//! A connect to (VPC, address, port) is carried over vSocket only if a
//! vSocket listener serves that address in the client's VPC (or the
//! address is placed on another host of the fabric) and the security
//! groups of both ends allow it (egress of the client's, ingress of the
//! server's). No listener: the library falls back to the kernel. Denied:
//! the connect fails as behind the cloud's firewall (a silent drop, or
//! ECONNREFUSED where the operator configured `reject`). Inside one guest
//! security groups do not apply (as on a VM's own loopback).

use crate::guest::GuestSlot;
use crate::policy::Policy;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use vsocket_policy::{evaluate, Config, DenyAction, Direction, Flow, GuestId, Protocol, Verdict};

/// A listener as the decision needs it: whose it is.
pub trait Listening {
    fn guest(&self) -> &Arc<GuestSlot>;
}

impl Listening for Arc<crate::listeners::ListenerRecord> {
    fn guest(&self) -> &Arc<GuestSlot> {
        &self.guest
    }
}

/// Whether this daemon has links to other hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fabric {
    Running,
    Absent,
}

/// A `Connect` from a process of guest `client`: the address its socket is
/// bound to (the guest's word, not trusted) and the one it connects to.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub client: Arc<GuestSlot>,
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
}

/// What to do with a connect.
#[derive(Debug)]
pub enum Decision<L> {
    /// A listener of the client's own guest: security groups do not apply.
    WithinGuest { listener: L },
    /// A listener of another guest on this host, and policy allows.
    Local { listener: L, verdict: Verdict },
    /// A guest placed on host `host`, and this host's egress allows: that
    /// host decides the rest.
    Remote { host: String, server: Arc<GuestSlot>, verdict: Verdict },
    /// Policy denies it; the program sees what `action` says.
    Deny { server: Arc<GuestSlot>, verdict: Verdict, action: DenyAction },
    /// The kernel path.
    Fallback(Fallback),
}

/// Why a connect takes the kernel path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The client's guest was removed by a live change.
    GuestRemoved,
    /// No vSocket listener serves the address.
    NoListener,
    /// The listener's guest was removed by a live change.
    ListenerGuestRemoved,
}

impl Fallback {
    /// As the flow log says it.
    pub fn describe(self) -> &'static str {
        match self {
            Fallback::GuestRemoved => "guest removed: kernel path",
            Fallback::NoListener => "no vSocket listener: kernel path",
            Fallback::ListenerGuestRemoved => "listener's guest removed: kernel path",
        }
    }
}

/// A decision and the client's address as the server will see it.
#[derive(Debug)]
pub struct Decided<L> {
    pub client_addr: SocketAddrV4,
    pub decision: Decision<L>,
}

/// The source address the guest's kernel would pick: the loopback address
/// for loopback, the destination itself when a guest connects to one of its
/// own addresses, else the address the socket is bound to if it is the
/// guest's, or the guest's first.
pub fn source_address(client: &GuestSlot, local: SocketAddrV4, remote: SocketAddrV4) -> SocketAddrV4 {
    let ip = if remote.ip().is_loopback() {
        Ipv4Addr::LOCALHOST
    } else if client.addresses.contains(remote.ip()) {
        *remote.ip()
    } else if client.addresses.contains(local.ip()) {
        *local.ip()
    } else {
        client.addresses[0]
    };
    SocketAddrV4::new(ip, local.port())
}

/// Decides `request` with `policy`; `find` looks up the listener the
/// remote address reaches from the client's guest.
pub fn decide<L: Listening>(
    policy: &Policy,
    fabric: Fabric,
    request: &ConnectRequest,
    find: impl FnOnce(&GuestSlot, SocketAddrV4) -> Option<L>,
) -> Decided<L> {
    let guest = &request.client;
    let remote = request.remote;
    let client_addr = source_address(guest, request.local, remote);
    let decided = |decision| Decided { client_addr, decision };
    let Some(client) = policy.guest_id(guest) else {
        return decided(Decision::Fallback(Fallback::GuestRemoved));
    };
    let config = &policy.config;
    let Some(listener) = find(guest, remote) else {
        return decided(remote_decision(policy, fabric, client, client_addr, remote));
    };
    if Arc::ptr_eq(listener.guest(), guest) {
        return decided(Decision::WithinGuest { listener });
    }
    let Some(server) = policy.guest_id(listener.guest()) else {
        return decided(Decision::Fallback(Fallback::ListenerGuestRemoved));
    };
    let verdict = verdict_of(config, client, *client_addr.ip(), server, remote);
    decided(match verdict {
        Verdict::Deny { .. } => {
            Decision::Deny { server: listener.guest().clone(), verdict, action: config.host().deny_action }
        }
        Verdict::Allow { .. } => Decision::Local { listener, verdict },
    })
}

/// No listener here: a guest of another host, or the kernel path.
fn remote_decision<L>(
    policy: &Policy,
    fabric: Fabric,
    client: GuestId,
    client_addr: SocketAddrV4,
    remote: SocketAddrV4,
) -> Decision<L> {
    let config = &policy.config;
    let vpc = config.guest(client).vpc;
    let placed_elsewhere = config.guest_owning(vpc, *remote.ip()).filter(|s| !config.is_local(*s));
    let (Some(server), Fabric::Running, Some(_)) = (placed_elsewhere, fabric, config.fabric()) else {
        return Decision::Fallback(Fallback::NoListener);
    };
    let slot = policy.slot(server).clone();
    let verdict = verdict_of(config, client, *client_addr.ip(), server, remote);
    match verdict {
        // Ingress is the server's host's to decide, with its own policy.
        Verdict::Deny { side: Direction::Egress, .. } => {
            Decision::Deny { server: slot, verdict, action: config.host().deny_action }
        }
        _ => Decision::Remote { host: config.guest(server).host.clone(), server: slot, verdict },
    }
}

/// What a fabric peer claims of a connection it asks this host to accept.
#[derive(Debug, Clone)]
pub struct Claim<'a> {
    /// The peer host, as its link proved.
    pub peer: &'a str,
    pub vpc: &'a str,
    pub guest: &'a str,
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
}

/// The peer spoke for a guest it does not host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotHosted;

/// The server's host's decision on a connect from another host: the claim
/// is checked against this host's own config (a peer speaks only for guests
/// placed on it), then policy is decided again here. The decision is
/// `Local`, `Deny` or `Fallback`; with it, the client's slot here.
pub fn decide_incoming<L: Listening>(
    policy: &Policy,
    claim: &Claim<'_>,
    find: impl FnOnce(&GuestSlot, SocketAddrV4) -> Option<L>,
) -> Result<(Arc<GuestSlot>, Decision<L>), NotHosted> {
    let config = &policy.config;
    let client = config
        .guest_by_name(claim.guest)
        .filter(|&g| {
            let guest = config.guest(g);
            guest.host == claim.peer
                && config.vpc(guest.vpc).name == claim.vpc
                && guest.addresses.contains(claim.client.ip())
        })
        .ok_or(NotHosted)?;
    let slot = policy.slot(client).clone();
    let vpc = config.guest(client).vpc;
    let server = config.guest_owning(vpc, *claim.server.ip()).filter(|s| config.is_local(*s));
    let listener = server.and_then(|_| find(&slot, claim.server));
    let (Some(server), Some(listener)) = (server, listener) else {
        return Ok((slot, Decision::Fallback(Fallback::NoListener)));
    };
    let verdict = verdict_of(config, client, *claim.client.ip(), server, claim.server);
    let decision = match verdict {
        Verdict::Deny { .. } => {
            Decision::Deny { server: listener.guest().clone(), verdict, action: config.host().deny_action }
        }
        Verdict::Allow { .. } => Decision::Local { listener, verdict },
    };
    Ok((slot, decision))
}

/// Policy's verdict on a TCP connect from guest `client` at `client_ip`
/// to guest `server` at `to`, in the client's VPC.
fn verdict_of(config: &Config, client: GuestId, client_ip: Ipv4Addr, server: GuestId, to: SocketAddrV4) -> Verdict {
    let flow = Flow {
        protocol: Protocol::Tcp,
        vpc: config.guest(client).vpc,
        client,
        client_addr: client_ip,
        server,
        server_addr: *to.ip(),
        port: to.port(),
    };
    evaluate(config, &flow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SlotId;
    use std::path::Path;
    use vsocket_policy::Decider;

    /// Guests a, b (web server: port 80 from the VPC) and d (may connect
    /// only to port 443) here; c (web server) on host2.
    fn policy(deny_action: &str) -> Policy {
        policy_of("host1", deny_action)
    }

    /// The same tenant model as host `this` sees it.
    fn policy_of(this: &str, deny_action: &str) -> Policy {
        let text = format!(
            r#"
            [host]
            name = "{this}"
            deny_action = "{deny_action}"
            [fabric]
            kind = "tcp"
            [[fabric.host]]
            name = "host1"
            address = "10.99.0.1:7470"
            [[fabric.host]]
            name = "host2"
            address = "10.99.0.2:7470"
            [[vpc]]
            name = "blue"
            cidr = "10.10.0.0/24"
            [[security_group]]
            name = "web"
            [[security_group.ingress]]
            protocol = "tcp"
            ports = "80"
            cidr = "10.10.0.0/24"
            [[security_group]]
            name = "tls-only"
            [[security_group.egress]]
            protocol = "tcp"
            ports = "443"
            cidr = "0.0.0.0/0"
            [[guest]]
            name = "a"
            vpc = "blue"
            host = "host1"
            addresses = ["10.10.0.2", "10.10.0.12"]
            [[guest]]
            name = "b"
            vpc = "blue"
            host = "host1"
            addresses = ["10.10.0.3"]
            security_groups = ["web"]
            [[guest]]
            name = "c"
            vpc = "blue"
            addresses = ["10.10.0.4"]
            security_groups = ["web"]
            host = "host2"
            [[guest]]
            name = "d"
            vpc = "blue"
            host = "host1"
            addresses = ["10.10.0.5"]
            security_groups = ["tls-only"]
        "#
        );
        let config = vsocket_policy::parse(&text, Path::new("t.toml")).unwrap();
        let slots = config
            .guests()
            .map(|(id, _)| Arc::new(GuestSlot::new(SlotId(id.index() as u64 + 1), &config, id)))
            .collect();
        Policy::new(config, slots)
    }

    /// A listener of a guest, as the registry would find it.
    #[derive(Debug, Clone)]
    struct Listener(Arc<GuestSlot>);

    impl Listening for Listener {
        fn guest(&self) -> &Arc<GuestSlot> {
            &self.0
        }
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn guest(policy: &Policy, name: &str) -> Arc<GuestSlot> {
        policy.slot_by_name(name).unwrap().clone()
    }

    /// A slot no snapshot holds: a guest a live change removed.
    fn removed(policy: &Policy, name: &str) -> Arc<GuestSlot> {
        let config = &policy.config;
        Arc::new(GuestSlot::new(SlotId(999), config, config.guest_by_name(name).unwrap()))
    }

    /// What a decision is, in a word and the server's guest, for the table.
    fn summary(d: &Decision<Listener>) -> (&'static str, Option<String>) {
        match d {
            Decision::WithinGuest { listener } => ("within", Some(listener.0.name.clone())),
            Decision::Local { listener, .. } => ("local", Some(listener.0.name.clone())),
            Decision::Remote { host, server, .. } => ("remote", Some(format!("{}@{host}", server.name))),
            Decision::Deny { server, action: DenyAction::Drop, .. } => ("drop", Some(server.name.clone())),
            Decision::Deny { server, action: DenyAction::Reject, .. } => ("reject", Some(server.name.clone())),
            Decision::Fallback(Fallback::GuestRemoved) => ("fallback: guest removed", None),
            Decision::Fallback(Fallback::NoListener) => ("fallback: no listener", None),
            Decision::Fallback(Fallback::ListenerGuestRemoved) => ("fallback: listener's guest removed", None),
        }
    }

    #[test]
    fn every_kind_of_connect_is_decided_as_the_policy_says() {
        let p = policy("drop");
        let reject = policy("reject");
        let (a, b, d) = (guest(&p, "a"), guest(&p, "b"), guest(&p, "d"));
        let gone_b = removed(&p, "b");
        // (case, policy, client, remote, listener found, fabric, expected)
        type Case<'a> =
            (&'a str, &'a Policy, Arc<GuestSlot>, &'a str, Option<Arc<GuestSlot>>, Fabric, (&'a str, Option<&'a str>));
        let cases: Vec<Case<'_>> = vec![
            (
                "inside one guest",
                &p,
                a.clone(),
                "127.0.0.1:80",
                Some(a.clone()),
                Fabric::Running,
                ("within", Some("a")),
            ),
            ("allowed here", &p, a.clone(), "10.10.0.3:80", Some(b.clone()), Fabric::Running, ("local", Some("b"))),
            ("ingress denies", &p, a.clone(), "10.10.0.3:81", Some(b.clone()), Fabric::Running, ("drop", Some("b"))),
            (
                "reject configured",
                &reject,
                guest(&reject, "a"),
                "10.10.0.3:81",
                Some(guest(&reject, "b")),
                Fabric::Running,
                ("reject", Some("b")),
            ),
            ("egress denies", &p, d.clone(), "10.10.0.3:80", Some(b.clone()), Fabric::Running, ("drop", Some("b"))),
            ("no listener", &p, a.clone(), "10.10.0.3:80", None, Fabric::Running, ("fallback: no listener", None)),
            (
                "not a guest's address",
                &p,
                a.clone(),
                "10.10.0.77:80",
                None,
                Fabric::Running,
                ("fallback: no listener", None),
            ),
            (
                "client removed",
                &p,
                removed(&p, "a"),
                "10.10.0.3:80",
                Some(b.clone()),
                Fabric::Running,
                ("fallback: guest removed", None),
            ),
            (
                "listener's guest removed",
                &p,
                a.clone(),
                "10.10.0.3:80",
                Some(gone_b),
                Fabric::Running,
                ("fallback: listener's guest removed", None),
            ),
            ("other host", &p, a.clone(), "10.10.0.4:80", None, Fabric::Running, ("remote", Some("c@host2"))),
            // Ingress is the other host's to decide.
            (
                "other host, its ingress would deny",
                &p,
                a.clone(),
                "10.10.0.4:81",
                None,
                Fabric::Running,
                ("remote", Some("c@host2")),
            ),
            ("other host, egress denies", &p, d.clone(), "10.10.0.4:80", None, Fabric::Running, ("drop", Some("c"))),
            (
                "other host, no fabric",
                &p,
                a.clone(),
                "10.10.0.4:80",
                None,
                Fabric::Absent,
                ("fallback: no listener", None),
            ),
        ];
        for (case, policy, client, remote, found, fabric, (kind, server)) in cases {
            let request = ConnectRequest { client, local: addr("0.0.0.0:40000"), remote: addr(remote) };
            let decided = decide(policy, fabric, &request, |_, to| {
                assert_eq!(to, request.remote, "{case}: looked up the address connected to");
                found.map(Listener)
            });
            assert_eq!(summary(&decided.decision), (kind, server.map(String::from)), "{case}");
        }
    }

    #[test]
    fn a_denial_and_an_allowance_carry_what_decided_them() {
        let p = policy("drop");
        let request = ConnectRequest { client: guest(&p, "a"), local: addr("0.0.0.0:1"), remote: addr("10.10.0.3:81") };
        let decided = decide(&p, Fabric::Running, &request, |_, _| Some(Listener(guest(&p, "b"))));
        let Decision::Deny { verdict, .. } = decided.decision else { panic!("{:?}", decided.decision) };
        assert_eq!(verdict, Verdict::Deny { side: Direction::Ingress, reason: Decider::DefaultIngressDeny });
        let request = ConnectRequest { remote: addr("10.10.0.3:80"), ..request };
        let decided = decide(&p, Fabric::Running, &request, |_, _| Some(Listener(guest(&p, "b"))));
        let Decision::Local { verdict, .. } = decided.decision else { panic!("{:?}", decided.decision) };
        assert!(verdict.is_allowed());
    }

    #[test]
    fn the_client_address_is_the_one_its_kernel_would_pick() {
        let p = policy("drop");
        let a = guest(&p, "a");
        let cases = [
            ("0.0.0.0:5000", "127.0.0.1:80", "127.0.0.1:5000"),
            ("0.0.0.0:5000", "10.10.0.12:80", "10.10.0.12:5000"),
            ("10.10.0.12:5000", "10.10.0.3:80", "10.10.0.12:5000"),
            ("0.0.0.0:5000", "10.10.0.3:80", "10.10.0.2:5000"),
            // A bound address that is not the guest's is not believed.
            ("10.10.0.99:5000", "10.10.0.3:80", "10.10.0.2:5000"),
        ];
        for (local, remote, expected) in cases {
            assert_eq!(source_address(&a, addr(local), addr(remote)), addr(expected), "{local} -> {remote}");
            let request = ConnectRequest { client: a.clone(), local: addr(local), remote: addr(remote) };
            let decided = decide(&p, Fabric::Running, &request, |_, _| None::<Listener>);
            assert_eq!(decided.client_addr, addr(expected));
        }
    }

    #[test]
    fn a_peer_host_speaks_only_for_its_own_guests() {
        // Host2, where c listens; a and b are host1's.
        let p = policy_of("host2", "reject");
        let c = guest(&p, "c");
        let claim = |peer, vpc, guest, client: &str, server: &str| (peer, vpc, guest, addr(client), addr(server));
        let cases = [
            ("as claimed", claim("host1", "blue", "a", "10.10.0.2:4000", "10.10.0.4:80"), Ok(("local", Some("c")))),
            (
                "ingress denies",
                claim("host1", "blue", "a", "10.10.0.2:4000", "10.10.0.4:81"),
                Ok(("reject", Some("c"))),
            ),
            (
                "no listener",
                claim("host1", "blue", "a", "10.10.0.2:4000", "10.10.0.9:80"),
                Ok(("fallback: no listener", None)),
            ),
            ("a guest of another host", claim("host3", "blue", "a", "10.10.0.2:4000", "10.10.0.4:80"), Err(NotHosted)),
            ("a guest placed here", claim("host1", "blue", "c", "10.10.0.4:4000", "10.10.0.4:80"), Err(NotHosted)),
            ("another VPC", claim("host1", "red", "a", "10.10.0.2:4000", "10.10.0.4:80"), Err(NotHosted)),
            ("not the guest's address", claim("host1", "blue", "a", "10.10.0.3:4000", "10.10.0.4:80"), Err(NotHosted)),
            ("an unknown guest", claim("host1", "blue", "zz", "10.10.0.2:4000", "10.10.0.4:80"), Err(NotHosted)),
        ];
        for (case, (peer, vpc, guest_name, client, server), expected) in cases {
            let claim = Claim { peer, vpc, guest: guest_name, client, server };
            let decided = decide_incoming(&p, &claim, |from, to| {
                assert_eq!(from.name, "a", "{case}: looked up from the client's guest");
                (to == addr("10.10.0.4:80") || to == addr("10.10.0.4:81")).then(|| Listener(c.clone()))
            });
            let got = decided.map(|(client, d)| {
                assert_eq!(client.name, guest_name, "{case}");
                summary(&d)
            });
            let expected = expected.map(|(kind, server): (&str, Option<&str>)| (kind, server.map(String::from)));
            assert_eq!(got, expected, "{case}");
        }
    }
}
