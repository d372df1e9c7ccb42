//! Every admin message against the exact line the socket carried before the
//! protocol had types: `vsocketctl` built its requests with `json!` and the
//! daemon its replies with `json!` or through a `serde_json::Value`, so
//! every object's keys are in sorted order.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::net::SocketAddrV4;
use std::time::{Duration, SystemTime};
use vsocket_admin::{
    encode, Applied, ConnectionReport, GuestReport, LinkState, ListenerReport, PeerStatus, Refusal, Reply, Request,
    StatusReport, StoreStatus,
};
use vsocket_policy::{
    Change, DenyAction, Direction, FabricKind, GuestSpec, PolicyChangeAction, Protocol, ProtocolFilter, RulePeerSpec,
    RuleSpec,
};

/// `message` encodes to exactly `line`, and `line` decodes to a message
/// that encodes to it again.
fn same_line<T: Serialize + DeserializeOwned>(message: &T, line: &str) -> T {
    assert_eq!(encode(message).unwrap(), line);
    let decoded: T = serde_json::from_str(line).unwrap();
    assert_eq!(encode(&decoded).unwrap(), line);
    decoded
}

/// As [`same_line`], and the decoded message equals `message`.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(message: &T, line: &str) {
    assert_eq!(&same_line(message, line), message);
}

#[test]
fn queries_are_their_command_alone() {
    for (request, command) in [
        (Request::Status, "status"),
        (Request::Guests, "guests"),
        (Request::Listeners, "listeners"),
        (Request::Connections, "connections"),
        (Request::Peers, "peers"),
        (Request::Reload, "reload"),
    ] {
        same_line(&request, &format!("{{\"command\":\"{command}\"}}"));
    }
}

fn change(change: Change) -> Request {
    Request::Change { change: Box::new(change) }
}

#[test]
fn rule_changes_carry_the_rule_as_the_file_writes_it() {
    let rule = RuleSpec::new(
        ProtocolFilter::Only(Protocol::Tcp),
        Some("7000".into()),
        RulePeerSpec::Cidr("10.10.0.0/24".into()),
    );
    same_line(
        &change(Change::AddRule { group: "svc".into(), direction: Direction::Ingress, rule }),
        "{\"change\":{\"direction\":\"ingress\",\"group\":\"svc\",\"op\":\"add_rule\",\
         \"rule\":{\"cidr\":\"10.10.0.0/24\",\"ports\":\"7000\",\"protocol\":\"tcp\"}},\"command\":\"change\"}",
    );
    // No ports given: none sent (the file's default, all).
    let rule = RuleSpec::new(ProtocolFilter::All, None, RulePeerSpec::Group("web".into()));
    same_line(
        &change(Change::RemoveRule { group: "db".into(), direction: Direction::Egress, rule }),
        "{\"change\":{\"direction\":\"egress\",\"group\":\"db\",\"op\":\"remove_rule\",\
         \"rule\":{\"group\":\"web\",\"protocol\":\"all\"}},\"command\":\"change\"}",
    );
    for (protocol, word) in [(Protocol::Udp, "udp"), (Protocol::Icmp, "icmp")] {
        let rule = RuleSpec::new(ProtocolFilter::Only(protocol), None, RulePeerSpec::Cidr("0.0.0.0/0".into()));
        let line = encode(&change(Change::AddRule { group: "g".into(), direction: Direction::Ingress, rule })).unwrap();
        assert!(line.contains(&format!("\"protocol\":\"{word}\"")), "{line}");
    }
}

#[test]
fn membership_changes() {
    same_line(
        &change(Change::AddMembership { guest: "b".into(), group: "svc".into() }),
        "{\"change\":{\"group\":\"svc\",\"guest\":\"b\",\"op\":\"add_membership\"},\"command\":\"change\"}",
    );
    same_line(
        &change(Change::RemoveMembership { guest: "b".into(), group: "svc".into() }),
        "{\"change\":{\"group\":\"svc\",\"guest\":\"b\",\"op\":\"remove_membership\"},\"command\":\"change\"}",
    );
}

#[test]
fn guest_changes_send_only_what_was_given() {
    let guest = GuestSpec::new("c".into(), "blue".into(), vec!["10.10.0.4".into()], vec![]);
    same_line(
        &change(Change::AddGuest { guest: guest.clone() }),
        "{\"change\":{\"guest\":{\"addresses\":[\"10.10.0.4\"],\"name\":\"c\",\"security_groups\":[],\
         \"vpc\":\"blue\"},\"op\":\"add_guest\"},\"command\":\"change\"}",
    );
    let full =
        GuestSpec::new("c".into(), "blue".into(), vec!["10.10.0.4".into(), "10.10.0.5".into()], vec!["svc".into()])
            .with_netns("tlgs-c".into())
            .with_max_connections(3)
            .with_max_shared_memory("64MiB")
            .with_max_channels(2);
    same_line(
        &change(Change::AddGuest { guest: full }),
        "{\"change\":{\"guest\":{\"addresses\":[\"10.10.0.4\",\"10.10.0.5\"],\"max_channels\":2,\
         \"max_connections\":3,\"max_shared_memory\":\"64MiB\",\"name\":\"c\",\"netns\":\"tlgs-c\",\
         \"security_groups\":[\"svc\"],\"vpc\":\"blue\"},\"op\":\"add_guest\"},\"command\":\"change\"}",
    );
    // A plain number is bytes, sent as a number as the file writes it.
    let bytes = guest.with_max_shared_memory("1048576");
    let line = encode(&change(Change::AddGuest { guest: bytes })).unwrap();
    assert!(line.contains("\"max_shared_memory\":1048576,"), "{line}");
    same_line(
        &change(Change::RemoveGuest { name: "c".into() }),
        "{\"change\":{\"name\":\"c\",\"op\":\"remove_guest\"},\"command\":\"change\"}",
    );
}

fn status(fabric: bool) -> StatusReport {
    StatusReport {
        host: "h1".into(),
        guests: 2,
        listeners: 1,
        connections: 3,
        flow_log: fabric.then(|| "/run/vsocket/flow.log".into()),
        flow_log_dropped: 4,
        metrics: fabric.then(|| "127.0.0.1:9100".parse().unwrap()),
        segments_created: 5,
        segments_reused: 6,
        segments_kept: 7,
        kit_chunks: 15,
        kit_pieces_kept: 16,
        doorbells_reused: 18,
        rings_trimmed: 17,
        deny_action: if fabric { DenyAction::Reject } else { DenyAction::Drop },
        on_policy_change: if fabric { PolicyChangeAction::Reset } else { PolicyChangeAction::Keep },
        policy_changes: 8,
        policy_resets: 9,
        quota_exceeded_connections: 10,
        quota_exceeded_shared_memory: 11,
        quota_exceeded_channels: 12,
        fabric: fabric.then_some(FabricKind::Ucx),
        fabric_peers_up: fabric.then_some(1),
        store: fabric.then_some(StoreStatus { connected: true, generation: 13, last_heard_s: 14 }),
    }
}

#[test]
fn status_reply() {
    round_trip(
        &status(true),
        "{\"connections\":3,\"deny_action\":\"reject\",\"doorbells_reused\":18,\"fabric\":\"ucx\",\"fabric_peers_up\":1,\
         \"flow_log\":\"/run/vsocket/flow.log\",\"flow_log_dropped\":4,\"guests\":2,\"host\":\"h1\",\
         \"kit_chunks\":15,\"kit_pieces_kept\":16,\
         \"listeners\":1,\"metrics\":\"127.0.0.1:9100\",\"on_policy_change\":\"reset\",\"policy_changes\":8,\
         \"policy_resets\":9,\"quota_exceeded_channels\":12,\"quota_exceeded_connections\":10,\
         \"quota_exceeded_shared_memory\":11,\"rings_trimmed\":17,\"segments_created\":5,\"segments_kept\":7,\"segments_reused\":6,\
         \"store\":{\"connected\":true,\"generation\":13,\"last_heard_s\":14}}",
    );
    round_trip(
        &status(false),
        "{\"connections\":3,\"deny_action\":\"drop\",\"doorbells_reused\":18,\"fabric\":null,\"fabric_peers_up\":null,\
         \"flow_log\":null,\"flow_log_dropped\":4,\"guests\":2,\"host\":\"h1\",\
         \"kit_chunks\":15,\"kit_pieces_kept\":16,\
         \"listeners\":1,\"metrics\":null,\"on_policy_change\":\"keep\",\"policy_changes\":8,\
         \"policy_resets\":9,\"quota_exceeded_channels\":12,\"quota_exceeded_connections\":10,\
         \"quota_exceeded_shared_memory\":11,\"rings_trimmed\":17,\"segments_created\":5,\"segments_kept\":7,\"segments_reused\":6}",
    );
    assert_eq!(encode(&Reply::Status(status(false))).unwrap(), encode(&status(false)).unwrap());
}

#[test]
fn guests_reply() {
    let guest = GuestReport {
        name: "a".into(),
        vpc: "blue".into(),
        addresses: vec!["10.10.0.2".parse().unwrap(), "10.10.0.12".parse().unwrap()],
        security_groups: vec!["web".into()],
        netns: "vs-a".into(),
        channels: 1,
        connections_live: 2,
        shared_memory: 3,
        max_connections: 4,
        max_shared_memory: 5,
        max_channels: 6,
        exceeded_connections: 7,
        exceeded_shared_memory: 8,
        exceeded_channels: 9,
        refused_attachments: 10,
        connections_open: 11,
        connections_out: 12,
        connections_in: 13,
        denied: 14,
        fallbacks: 15,
        bytes_sent: 16,
        bytes_received: 17,
        region_size: 0,
        region_used: 0,
    };
    round_trip(
        &vec![guest.clone()],
        "[{\"addresses\":[\"10.10.0.2\",\"10.10.0.12\"],\"bytes_received\":17,\"bytes_sent\":16,\"channels\":1,\
         \"connections_in\":13,\"connections_live\":2,\"connections_open\":11,\"connections_out\":12,\
         \"denied\":14,\"exceeded_channels\":9,\"exceeded_connections\":7,\"exceeded_shared_memory\":8,\
         \"fallbacks\":15,\"max_channels\":6,\"max_connections\":4,\"max_shared_memory\":5,\"name\":\"a\",\
         \"netns\":\"vs-a\",\"refused_attachments\":10,\"region_size\":0,\"region_used\":0,\
         \"security_groups\":[\"web\"],\"shared_memory\":3,\"vpc\":\"blue\"}]",
    );
    round_trip(&Vec::<GuestReport>::new(), "[]");
    assert_eq!(encode(&Reply::Guests(vec![guest.clone()])).unwrap(), encode(&vec![guest]).unwrap());
}

#[test]
fn listeners_reply() {
    let listener = ListenerReport {
        id: 3,
        guest: "b".into(),
        vpc: "blue".into(),
        address: "10.10.0.3:6379".parse().unwrap(),
        accepted: 2,
        grants: 1,
    };
    round_trip(
        &vec![listener.clone()],
        "[{\"accepted\":2,\"address\":\"10.10.0.3:6379\",\"grants\":1,\"guest\":\"b\",\"id\":3,\"vpc\":\"blue\"}]",
    );
    // An older daemon's report has no grants.
    let old: Vec<ListenerReport> = serde_json::from_str(
        "[{\"accepted\":2,\"address\":\"10.10.0.3:6379\",\"guest\":\"b\",\"id\":3,\"vpc\":\"blue\"}]",
    )
    .unwrap();
    assert_eq!(old, vec![ListenerReport { grants: 0, ..listener }]);
}

#[test]
fn connections_reply() {
    let connection = |age_seconds| ConnectionReport {
        id: 7,
        vpc: "blue".into(),
        client_guest: "a".into(),
        client: "10.10.0.2:40312".parse::<SocketAddrV4>().unwrap(),
        server_guest: "b".into(),
        server: "10.10.0.3:6379".parse().unwrap(),
        bytes_client_to_server: 100,
        bytes_server_to_client: 2000,
        age_seconds,
    };
    round_trip(
        &vec![connection(1.5)],
        "[{\"age_seconds\":1.5,\"bytes_client_to_server\":100,\"bytes_server_to_client\":2000,\
         \"client\":\"10.10.0.2:40312\",\"client_guest\":\"a\",\"id\":7,\"server\":\"10.10.0.3:6379\",\
         \"server_guest\":\"b\",\"vpc\":\"blue\"}]",
    );
    // A whole number of seconds is still a float.
    round_trip(&vec![connection(0.0)], &encode(&vec![connection(0.0)]).unwrap());
    assert!(encode(&vec![connection(0.0)]).unwrap().starts_with("[{\"age_seconds\":0.0,"));
}

#[test]
fn peers_reply() {
    let mut peer = PeerStatus::new("h2", "192.0.2.2:7700".parse().unwrap(), FabricKind::Tcp);
    round_trip(
        &vec![peer.clone()],
        "[{\"accepted\":0,\"address\":\"192.0.2.2:7700\",\"bytes_received\":0,\"bytes_sent\":0,\
         \"connections\":0,\"corrupt\":0,\"frames_received\":0,\"frames_sent\":0,\"last_error\":null,\
         \"links_up\":0,\"name\":\"h2\",\"opened\":0,\"since\":null,\"state\":\"down\",\"transport\":\"tcp\"}]",
    );
    peer.transport = FabricKind::Ucx;
    peer.state = LinkState::Up;
    peer.since = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    peer.links_up = 1;
    peer.connections = 2;
    peer.opened = 3;
    peer.accepted = 4;
    peer.frames_sent = 5;
    peer.frames_received = 6;
    peer.bytes_sent = 7;
    peer.bytes_received = 8;
    peer.corrupt = 9;
    peer.last_error = Some("link down".into());
    round_trip(
        &vec![peer.clone()],
        "[{\"accepted\":4,\"address\":\"192.0.2.2:7700\",\"bytes_received\":8,\"bytes_sent\":7,\
         \"connections\":2,\"corrupt\":9,\"frames_received\":6,\"frames_sent\":5,\"last_error\":\"link down\",\
         \"links_up\":1,\"name\":\"h2\",\"opened\":3,\"since\":1700000000,\"state\":\"up\",\"transport\":\"ucx\"}]",
    );
    // The wire has whole seconds.
    peer.since = Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_900));
    assert!(encode(&peer).unwrap().contains("\"since\":1700000000,"));
}

#[test]
fn change_replies() {
    let applied = Applied {
        guests_added: vec!["c".into()],
        guests_removed: vec![],
        on_policy_change: PolicyChangeAction::Reset,
        connections_reset: 1,
        errors: vec!["guest \"d\": cannot bind".into()],
    };
    round_trip(
        &applied,
        "{\"connections_reset\":1,\"errors\":[\"guest \\\"d\\\": cannot bind\"],\"guests_added\":[\"c\"],\
         \"guests_removed\":[],\"on_policy_change\":\"reset\"}",
    );
    assert_eq!(encode(&Reply::Applied(applied.clone())).unwrap(), encode(&applied).unwrap());
    let refusal = Refusal { error: "security group \"svc\" has no such ingress rule; nothing changed".into() };
    round_trip(&refusal, "{\"error\":\"security group \\\"svc\\\" has no such ingress rule; nothing changed\"}");
    assert_eq!(
        encode(&Reply::refused("bad request: expected value")).unwrap(),
        "{\"error\":\"bad request: expected value\"}"
    );
}
