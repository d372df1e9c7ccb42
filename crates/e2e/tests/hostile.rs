//! Hostile guests: a program that scribbles over its own connection's shared
//! segment, and one that sends garbage on its guest's control socket, break
//! only what is theirs. Their peers see a reset or end of stream (never
//! bytes that were not sent), other connections carry on, vsocketd stays up
//! and keeps brokering, and the daemon holds nothing for them afterwards.

use serde_json::Value;
use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::time::Duration;
use vsocket_e2e::{asset, compile, wait_until, Lab, Via};

/// Four guests in one VPC, all open to each other: `a` is the hostile one,
/// `b` its peer, `c` and `d` a bystander pair.
const FOUR_GUESTS: &str = r#"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[security_group]]
name = "open"
[[security_group.ingress]]
protocol = "tcp"
ports = "all"
cidr = "10.10.0.0/24"

[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]
security_groups = ["open"]

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["open"]

[[guest]]
name = "c"
vpc = "blue"
addresses = ["10.10.0.4"]
security_groups = ["open"]

[[guest]]
name = "d"
vpc = "blue"
addresses = ["10.10.0.5"]
security_groups = ["open"]
"#;

/// Every way the scribbler damages its segment (see assets/scribbler.c).
const SCENARIOS: &[&str] = &["tail_ahead", "head_ahead", "huge", "flags", "random", "holders", "header"];

/// Scenarios that leave indices or flags the peer must refuse: its next
/// read is ECONNRESET while the scribbler still holds the connection open.
const RESETS: &[&str] = &["tail_ahead", "head_ahead", "huge", "flags", "random"];

/// A checking client that runs until `stop` exists (hostile_peer.py steady).
fn steady(lab: &Lab, guest: &str, server: &str, port: &str, stop: &std::path::Path) -> Child {
    let peer = asset("hostile_peer.py");
    lab.command(
        guest,
        Via::Vsocket,
        "python3",
        &[peer.to_str().unwrap(), "steady", server, port, stop.to_str().unwrap()],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap()
}

/// The peer server's report on the connection from client port `port`.
fn report(lab: &Lab, log: &str, port: u16) -> Option<Value> {
    let text = std::fs::read_to_string(lab.dir.join(log)).ok()?;
    text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| v["port"] == port)
}

/// Client ports of the connections the daemon still has on record.
fn live_client_ports(lab: &Lab) -> HashSet<u16> {
    let conns = lab.ctl("connections").unwrap();
    conns
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

fn finish_steady(child: Child, what: &str) {
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ok bytes="),
        "{what}: {} {stdout} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn scribbling_on_a_segment_breaks_only_that_connection() {
    let mut lab = Lab::start("thost", FOUR_GUESTS).unwrap();
    let peer = asset("hostile_peer.py");
    let peer = peer.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[peer, "serve", "10.10.0.3", "7000"], "peer-b.log").unwrap();
    lab.spawn("d", Via::Vsocket, "python3", &[peer, "serve", "10.10.0.5", "7000"], "peer-d.log").unwrap();
    lab.wait_listening("b", 7000).unwrap();
    lab.wait_listening("d", 7000).unwrap();
    let scribbler = compile("scribbler.c", &lab.dir).unwrap();
    let scribbler = scribbler.to_str().unwrap();

    // Bystanders: another connection between the same two guests, and one
    // between two other guests, checking every byte throughout.
    let stop = lab.dir.join("stop");
    let mut same_guests = steady(&lab, "a", "10.10.0.3", "7000", &stop);
    let mut other_guests = steady(&lab, "c", "10.10.0.5", "7000", &stop);
    assert!(wait_until(Duration::from_secs(10), || live_client_ports(&lab).len() == 2), "bystanders connected");
    let bystanders = live_client_ports(&lab);

    let mut hostile_ports = Vec::new();
    for scenario in SCENARIOS {
        let out = lab.run_ok("a", Via::Vsocket, scribbler, &["10.10.0.3", "7000", "echo", scenario, "1500"]).unwrap();
        let port: u16 = out.lines().find_map(|l| l.strip_prefix("port=")).unwrap().parse().unwrap();
        hostile_ports.push(port);
        assert!(
            wait_until(Duration::from_secs(10), || report(&lab, "peer-b.log", port).is_some()),
            "{scenario}: the peer never saw the connection end (a hang); scribbler said {out}"
        );
        let seen = report(&lab, "peer-b.log", port).unwrap();
        assert_eq!(seen["prefix"], true, "{scenario}: the peer received bytes that were not sent: {seen}");
        assert!(seen["received"].as_u64().unwrap() >= 16_000, "{scenario}: the exchange before the scribble: {seen}");
        let end = seen["end"].as_str().unwrap();
        if RESETS.contains(scenario) {
            assert_eq!(end, "reset", "{scenario}: {seen}");
        } else {
            assert!(["reset", "eof"].contains(&end), "{scenario}: {seen}");
        }
        for (child, what) in [(&mut same_guests, "a to b"), (&mut other_guests, "c to d")] {
            assert!(child.try_wait().unwrap().is_none(), "{scenario}: the bystander {what} stopped");
        }
        eprintln!("{scenario}: peer saw {end} after {} bytes; scribbler: {}", seen["received"], out.replace('\n', " "));
    }

    // The broken connections are retired; the bystanders are not.
    let hostile: HashSet<u16> = hostile_ports.iter().copied().collect();
    let drained = wait_until(Duration::from_secs(5), || live_client_ports(&lab).is_disjoint(&hostile));
    assert!(drained, "broken connections still on record: {:?}", lab.ctl("connections").unwrap());
    assert_eq!(live_client_ports(&lab), bystanders, "the bystanders' connections are untouched");

    // The bystanders carried checked traffic throughout.
    std::fs::write(&stop, b"").unwrap();
    finish_steady(same_guests, "a to b, beside the scribbler");
    finish_steady(other_guests, "c to d");

    // The daemon is up and brokers new connections.
    let _ = std::fs::remove_file(&stop);
    let again = steady(&lab, "a", "10.10.0.3", "7000", &stop);
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, b"").unwrap();
    finish_steady(again, "a to b, after the scribbles");
    assert!(!lab.daemon_log().contains("panicked"), "{}", lab.daemon_log());
    assert!(lab.ctl("status").is_ok());
    lab.stop_background();
}

#[test]
fn redis_drops_a_client_that_scribbles_and_serves_the_rest() {
    let mut lab = Lab::start("thred", FOUR_GUESTS).unwrap();
    let args = vsocket_e2e::redis_server_args(6390, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn("b", Via::Vsocket, "redis-server", &args, "redis.log").unwrap();
    lab.wait_listening("b", 6390).unwrap();
    let scribbler = compile("scribbler.c", &lab.dir).unwrap();
    let out = lab
        .run_ok("a", Via::Vsocket, scribbler.to_str().unwrap(), &["10.10.0.3", "6390", "redis", "tail_ahead", "1500"])
        .unwrap();
    let port: u16 = out.lines().find_map(|l| l.strip_prefix("port=")).unwrap().parse().unwrap();
    // Its own library noticed too: the send after the scribble failed.
    assert!(out.contains("after_send=Connection reset by peer"), "{out}");
    let cli = |cmd: &[&str]| {
        let mut args = vec!["-h", "10.10.0.3", "-p", "6390"];
        args.extend_from_slice(cmd);
        lab.run_ok("a", Via::Vsocket, "redis-cli", &args).unwrap()
    };
    // Exactly the ten SETs made before the scribble were executed; redis
    // serves a new client, which is its only one.
    assert_eq!(cli(&["DBSIZE"]).trim(), "10");
    assert_eq!(cli(&["EXISTS", "hostile:9"]).trim(), "1");
    let clients = cli(&["INFO", "clients"]);
    assert!(clients.contains("connected_clients:1"), "{clients}");
    assert!(
        wait_until(Duration::from_secs(5), || !live_client_ports(&lab).contains(&port)),
        "{:?}",
        lab.ctl("connections")
    );
    lab.stop_background();
}
