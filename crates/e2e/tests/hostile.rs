//! Hostile guests: a program that scribbles over its own connection's shared
//! segment, and one that sends garbage on its guest's control socket, break
//! only what is theirs. Their peers see a reset or end of stream (never
//! bytes that were not sent), other connections carry on, vsocketd stays up
//! and keeps brokering, and the daemon holds nothing for them afterwards.

use serde_json::Value;
use std::collections::HashSet;
use std::process::{Child, Stdio};
use std::time::Duration;
use vsocket_e2e::{asset, compile, wait_until, Lab, Via, TWO_GUESTS};

/// Four guests in one VPC, all open to each other: `a` is the hostile one,
/// `b` its peer, `c` and `d` a bystander pair.
fn four() -> String {
    vsocket_e2e::four_guests()
}

/// Every way the scribbler damages its segment (see assets/scribbler.c).
const SCENARIOS: &[&str] = &["tail_ahead", "head_ahead", "huge", "flags", "random", "holders", "header", "peer"];

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

/// Starts `hostile_peer.py serve` in `guest` on `addr`, port 7000 (its
/// reports go to `peer-<guest>.log`), and waits until it listens.
fn serve_peer(lab: &mut Lab, guest: &str, addr: &str) {
    let peer = asset("hostile_peer.py");
    let log = format!("peer-{guest}.log");
    lab.spawn(guest, Via::Vsocket, "python3", &[peer.to_str().unwrap(), "serve", addr, "7000"], &log).unwrap();
    lab.wait_listening(guest, 7000).unwrap();
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
    let lab = Lab::start("thost", &four()).unwrap();
    scribbles_break_only_their_connection(&mut [lab]);
}

/// The same across hosts: the scribbler's segment is shared with its own
/// host's relay, which must reset that stream alone (the peer on the other
/// host sees the reset come over the link) and keep the link, and every
/// other stream on it, going.
fn scribbling_on_a_relayed_segment_breaks_only_that_connection(kind: &str, name: &str) {
    let body = four();
    let (near, far) = Lab::start_pair(name, [&body, &body], ["", ""], kind, &["b", "d"]).unwrap();
    let mut labs = [near, far];
    scribbles_break_only_their_connection(&mut labs);
    let peers = labs[0].ctl("peers").unwrap();
    assert_eq!(peers[0]["state"], "up", "{peers}");
    assert!(peers[0]["corrupt"].as_u64().unwrap() >= 1, "the relay saw no corrupt ring: {peers}");
    assert_eq!(peers[0]["links_up"], 1, "the link was made again: {peers}");
}

#[test]
fn scribbling_across_hosts_tcp() {
    scribbling_on_a_relayed_segment_breaks_only_that_connection("tcp", "fhs1");
}

#[test]
fn scribbling_across_hosts_ucx() {
    scribbling_on_a_relayed_segment_breaks_only_that_connection("ucx", "fhs2");
}

/// Each end of a connection writes only its own half of the connection's
/// memory, and each direction is metered by the larger of its two indices
/// (across hosts, by the relays' own counts). A guest that moves its own
/// indices back by whole rings (trying to be metered for less than it
/// moved) breaks its connection, which its peer sees as a reset after
/// every byte sent before, and is still metered, on each host, for every
/// byte it moved.
/// Guest `a` is on the first lab's host, `b` on the last lab's (which may
/// be the same).
fn rewound_indices_do_not_lower_the_meter(labs: &mut [Lab]) {
    serve_peer(labs.last_mut().unwrap(), "b", "10.10.0.3");
    let (a, b) = (&labs[0], &labs[labs.len() - 1]);
    let scribbler = compile("scribbler.c", &a.dir).unwrap();
    let out = a.run_ok("a", Via::Vsocket, scribbler.to_str().unwrap(), &["10.10.0.3", "7000", "echo", "rewind", "0"]);
    let out = out.unwrap();
    let field = |key: &str| -> &str {
        out.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {out}"))
    };
    let number = |key: &str| -> u64 { field(key).parse().unwrap() };
    let (port, sent, rewound) = (number("port=") as u16, number("sent="), number("rewound="));
    // Each index went back by all but less than a ring, after more than
    // two rings each way.
    assert!(rewound >= sent, "the indices were not moved back: {out}");
    assert_ne!(field("after_rewind="), "ok", "the peer took the rewound indices: {out}");
    // The echo server got every byte sent before the rewind, in order,
    // then the reset.
    assert!(wait_until(Duration::from_secs(10), || report(b, "peer-b.log", port).is_some()), "no report: {out}");
    let seen = report(b, "peer-b.log", port).unwrap();
    assert_eq!(
        (seen["prefix"].as_bool(), seen["received"].as_u64(), seen["end"].as_str()),
        (Some(true), Some(sent), Some("reset")),
        "{out}"
    );
    // Once the connection is retired, each guest's totals are the bytes
    // moved, not the rewound indices.
    let retired = |lab: &Lab| lab.ctl("connections").unwrap().as_array().unwrap().is_empty();
    assert!(wait_until(Duration::from_secs(10), || retired(a) && retired(b)), "connection not retired");
    for (lab, guest) in [(a, "a"), (b, "b")] {
        assert_eq!(
            (lab.counter(guest, "bytes_sent"), lab.counter(guest, "bytes_received")),
            (sent, sent),
            "{guest}'s meter after {sent} bytes each way ({rewound} rewound)"
        );
    }
}

#[test]
fn rewound_indices_on_one_host() {
    let lab = Lab::start("thrw", TWO_GUESTS).unwrap();
    rewound_indices_do_not_lower_the_meter(&mut [lab]);
}

fn rewound_indices_across_hosts(kind: &str, name: &str) {
    let (a, b) = Lab::start_pair(name, [TWO_GUESTS, TWO_GUESTS], ["", ""], kind, &["b"]).unwrap();
    rewound_indices_do_not_lower_the_meter(&mut [a, b]);
}

#[test]
fn rewound_indices_across_hosts_tcp() {
    rewound_indices_across_hosts("tcp", "fhr1");
}

#[test]
fn rewound_indices_across_hosts_ucx() {
    rewound_indices_across_hosts("ucx", "fhr2");
}

/// Guest `a` (on the first lab's host) scribbles over a connection to `b`
/// (on the last lab's, which may be the same) in every way it can, while
/// `a` to `b` and `c` to `d` carry checked bytes beside it.
fn scribbles_break_only_their_connection(labs: &mut [Lab]) {
    let far = labs.last_mut().unwrap();
    serve_peer(far, "b", "10.10.0.3");
    serve_peer(far, "d", "10.10.0.5");
    let (near, far) = (&labs[0], &labs[labs.len() - 1]);
    let scribbler = compile("scribbler.c", &near.dir).unwrap();
    let scribbler = scribbler.to_str().unwrap();

    // Bystanders: another connection between the same two guests, and one
    // between two other guests, checking every byte throughout.
    let stop = near.dir.join("stop");
    let mut same_guests = steady(near, "a", "10.10.0.3", "7000", &stop);
    let mut other_guests = steady(near, "c", "10.10.0.5", "7000", &stop);
    assert!(wait_until(Duration::from_secs(10), || live_client_ports(near).len() == 2), "bystanders connected");
    let bystanders = live_client_ports(near);

    let mut hostile_ports = Vec::new();
    for scenario in SCENARIOS {
        let out = near.run_ok("a", Via::Vsocket, scribbler, &["10.10.0.3", "7000", "echo", scenario, "1500"]).unwrap();
        let port: u16 = out.lines().find_map(|l| l.strip_prefix("port=")).unwrap().parse().unwrap();
        hostile_ports.push(port);
        if *scenario == "peer" {
            assert!(out.contains("peer_write=refused"), "the peer's half could be written: {out}");
        }
        assert!(
            wait_until(Duration::from_secs(10), || report(far, "peer-b.log", port).is_some()),
            "{scenario}: the peer never saw the connection end (a hang); scribbler said {out}"
        );
        let seen = report(far, "peer-b.log", port).unwrap();
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
    let drained = wait_until(Duration::from_secs(5), || live_client_ports(near).is_disjoint(&hostile));
    assert!(drained, "broken connections still on record: {:?}", near.ctl("connections").unwrap());
    assert_eq!(live_client_ports(near), bystanders, "the bystanders' connections are untouched");

    // The bystanders carried checked traffic throughout.
    std::fs::write(&stop, b"").unwrap();
    finish_steady(same_guests, "a to b, beside the scribbler");
    finish_steady(other_guests, "c to d");

    // The daemon is up and brokers new connections.
    let _ = std::fs::remove_file(&stop);
    let again = steady(near, "a", "10.10.0.3", "7000", &stop);
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, b"").unwrap();
    finish_steady(again, "a to b, after the scribbles");
    for lab in labs.iter_mut() {
        assert!(!lab.daemon_log().contains("panicked"), "{}", lab.daemon_log());
        assert!(lab.ctl("status").is_ok());
        lab.stop_background();
    }
}

#[test]
fn redis_drops_a_client_that_scribbles_and_serves_the_rest() {
    let mut lab = Lab::start("thred", &four()).unwrap();
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

/// One case of `hostile_control.py malformed`: what the daemon did.
fn control_case(out: &str, case: &str) -> Vec<String> {
    let line = out.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| v["case"] == case);
    let line = line.unwrap_or_else(|| panic!("no result for {case} in {out}"));
    line["result"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect()
}

/// The daemon's open descriptors: (segment memfds, everything else).
/// Memfds belong to the segment pool, which keeps up to 32 segments ready
/// and refills only when it falls to 16, so their number after a burst
/// differs from the baseline by design (connections keep mappings, never
/// memfds). Everything else (sockets, lifelines, the log) must come back.
fn daemon_fds(lab: &Lab) -> (usize, usize) {
    let pid = lab.daemon_pid().unwrap();
    let (mut memfds, mut other) = (0, 0);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        match std::fs::read_link(entry.path()) {
            Ok(target) if target.to_string_lossy().starts_with("/memfd:vsocket-conn") => memfds += 1,
            _ => other += 1,
        }
    }
    (memfds, other)
}

/// The segment pool's size (`crates/daemon/src/pool.rs`, `TARGET`).
const POOL_TARGET: usize = 32;

/// Descriptors per segment: each end's half, read-write and read-only
/// (`vsocket_ring::SegmentFiles`).
const FDS_PER_SEGMENT: usize = 4;

/// Segments the daemon may rightly hold beyond its pool: one per connection
/// on record, and the released ones it keeps for reuse by their pairs.
fn segments_in_use(lab: &Lab) -> usize {
    let status = lab.ctl("status").unwrap();
    (status["connections"].as_u64().unwrap() + status["segments_kept"].as_u64().unwrap()) as usize
}

/// Descriptors other than memfds the daemon may hold above its baseline:
/// the two of a `vsocketctl` admin connection (the stream and its clone)
/// whose thread has not yet seen the end of it.
const FD_SLACK: usize = 2;

#[test]
fn hostile_control_messages_close_only_their_channel() {
    let mut lab = Lab::start("thctl", &four()).unwrap();
    let hostile = asset("hostile_control.py");
    let hostile = hostile.to_str().unwrap();
    let sock = |guest: &str| lab.run_dir.join("guests").join(format!("{guest}.sock")).to_str().unwrap().to_string();
    let (sock_a, sock_b) = (sock("a"), sock("b"));
    serve_peer(&mut lab, "b", "10.10.0.3");
    serve_peer(&mut lab, "d", "10.10.0.5");
    let stop = lab.dir.join("stop");
    let mut same_guest = steady(&lab, "a", "10.10.0.3", "7000", &stop);
    let mut other_guests = steady(&lab, "c", "10.10.0.5", "7000", &stop);
    assert!(wait_until(Duration::from_secs(10), || live_client_ports(&lab).len() == 2), "bystanders connected");
    let bystanders = live_client_ports(&lab);
    std::thread::sleep(Duration::from_millis(500));
    let (_, baseline) = daemon_fds(&lab);

    // Malformed messages, each on its own channel.
    let out =
        lab.run_ok("a", Via::Kernel, "python3", &[hostile, "malformed", &sock_a, "10.10.0.2", "10.10.0.3"]).unwrap();
    for case in [
        "empty",
        "truncated",
        "oversized",
        "unknown_kind",
        "daemon_kind_connected",
        "daemon_kind_listen_ok",
        "listen_wrong_length",
        "descriptor_attached",
        "many_descriptors",
    ] {
        assert_eq!(control_case(&out, case), ["closed"], "{case}");
    }
    // Refused{EADDRNOTAVAIL} and Refused{EINVAL}, then the channel closes.
    assert_eq!(control_case(&out, "listen_foreign_address"), ["reply 0463000000", "closed"]);
    assert_eq!(control_case(&out, "listen_outside_vpc"), ["reply 0463000000", "closed"]);
    assert_eq!(control_case(&out, "listen_port_zero"), ["reply 0416000000", "closed"]);
    // Fallback to a good request, then closed for the garbage.
    assert_eq!(control_case(&out, "garbage_after_a_good_request"), ["reply 03", "closed"]);

    // Asking for the memory of connections (another guest's, this guest's
    // own, one that does not exist) with a pipe of its own in place of the
    // end's lifeline gets nothing; without a descriptor, the channel closes.
    let conns = lab.ctl("connections").unwrap();
    let mut ids: Vec<String> = conns.as_array().unwrap().iter().map(|c| c["id"].to_string()).collect();
    assert_eq!(ids.len(), 2, "{conns}");
    ids.push("999999".into());
    let mut args = vec![hostile, "reattach", &sock_a];
    args.extend(ids.iter().map(String::as_str));
    let out = lab.run_ok("a", Via::Kernel, "python3", &args).unwrap();
    let replies: Vec<Value> =
        out.lines().filter_map(|l| serde_json::from_str(l).ok()).filter(|v: &Value| v["id"].is_u64()).collect();
    assert_eq!(replies.len(), 6, "{out}");
    for reply in &replies {
        assert_eq!(reply["fds"], 0, "{reply}");
        // Refused{EPERM}, or Refused{ENOENT} for the connection that is not.
        let expected = if reply["id"] == 999999 { "0402000000" } else { "0401000000" };
        assert_eq!(reply["reply"], expected, "{reply}");
    }
    assert_eq!(control_case(&out, "reattach_without_lifeline"), ["closed"]);

    // A flood of connects whose replies are never read.
    let out =
        lab.run_ok("a", Via::Kernel, "python3", &[hostile, "flood", &sock_a, "10.10.0.3", "7000", "2000"]).unwrap();
    let sent: u32 = out.trim().strip_prefix("sent=").unwrap().parse().unwrap();
    assert!(sent > 50, "{out}");

    // A listener that never reads its Incoming: connects to it are queued
    // until its channel is full, then refused after the 5 s send timeout.
    let deaf_stop = lab.dir.join("deaf-stop");
    lab.spawn(
        "a",
        Via::Kernel,
        "python3",
        &[hostile, "deaf-listener", &sock_a, "10.10.0.2", "7200", deaf_stop.to_str().unwrap()],
        "deaf.log",
    )
    .unwrap();
    let deaf_registered = || {
        let listeners = lab.ctl("listeners").unwrap();
        listeners.as_array().unwrap().iter().any(|l| l["address"] == "10.10.0.2:7200")
    };
    assert!(wait_until(Duration::from_secs(10), deaf_registered), "{}", lab.daemon_log());
    let out = lab
        .run_ok("b", Via::Kernel, "python3", &[hostile, "connect-until-refused", &sock_b, "10.10.0.2", "7200", "5000"])
        .unwrap();
    let result: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(result["last"], "046f000000", "ECONNREFUSED once the deaf listener's queue is full: {result}");
    assert!(result["connected"].as_u64().unwrap() > 10, "{result}");
    assert!(result["seconds"].as_f64().unwrap() >= 4.5, "{result}");
    std::fs::write(&deaf_stop, b"").unwrap();
    assert!(wait_until(Duration::from_secs(5), || !deaf_registered()), "the deaf listener is unregistered");

    // Meanwhile the bystanders kept going; nothing hostile stays on record.
    for (child, what) in [(&mut same_guest, "a to b"), (&mut other_guests, "c to d")] {
        assert!(child.try_wait().unwrap().is_none(), "the bystander {what} stopped");
    }
    let drained = wait_until(Duration::from_secs(10), || live_client_ports(&lab) == bystanders);
    assert!(drained, "connections still on record: {:?}", lab.ctl("connections").unwrap());
    let (mut memfds, mut fds) = (0, 0);
    let settled = wait_until(Duration::from_secs(10), || {
        (memfds, fds) = daemon_fds(&lab);
        fds <= baseline + FD_SLACK && memfds <= FDS_PER_SEGMENT * (POOL_TARGET + segments_in_use(&lab))
    });
    assert!(settled, "the daemon holds {fds} descriptors and {memfds} memfds; {baseline} before the hostile channels");
    eprintln!("daemon descriptors besides the pool's memfds: {baseline} before, {fds} after ({memfds} memfds); flood sent {sent}; deaf listener: {result}");

    std::fs::write(&stop, b"").unwrap();
    finish_steady(same_guest, "a to b, beside the hostile channels");
    finish_steady(other_guests, "c to d");
    let _ = std::fs::remove_file(&stop);
    let again = steady(&lab, "a", "10.10.0.3", "7000", &stop);
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, b"").unwrap();
    finish_steady(again, "a to b, afterwards");
    assert!(!lab.daemon_log().contains("panicked"), "{}", lab.daemon_log());
    lab.stop_background();
}
