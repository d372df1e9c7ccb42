//! Between hosts: two hosts, each a network namespace with its own vsocketd
//! and guests, joined by the fabric (each kind in turn). Guest `a` runs on
//! the first host and guest `b` on the second.

use std::process::Stdio;
use std::time::{Duration, Instant};
use vsocket_e2e::{asset, redis_server_args, wait_until, Lab, Via, FABRIC_ADDRESSES, TWO_GUESTS};

fn pair(name: &str, kind: &str) -> (Lab, Lab) {
    Lab::start_pair(name, [TWO_GUESTS, TWO_GUESTS], ["", ""], kind, &["b"]).unwrap()
}

/// A peer's counter as `vsocketctl peers` shows it on `lab`'s host.
fn peer(lab: &Lab, field: &str) -> u64 {
    let peers = lab.ctl("peers").unwrap();
    peers[0][field].as_u64().unwrap_or_else(|| panic!("no {field} in {peers}"))
}

/// Waits (the relay publishes its counters a few times a second) until
/// `ok` holds of the peer's counter `field` on `lab`'s host.
fn peer_reaches(lab: &Lab, field: &str, ok: impl Fn(u64) -> bool) {
    if !wait_until(Duration::from_secs(5), || ok(peer(lab, field))) {
        panic!("{field} on {}: {}\n{}", lab.name, lab.ctl("peers").unwrap(), lab.daemon_log());
    }
}

/// Waits until 50 MiB sent from the first host (`a`) reached the second
/// (`b`) over the fabric, within 10 s.
fn crossed_50_mib(a: &Lab, b: &Lab) {
    let traffic = wait_until(Duration::from_secs(10), || peer(b, "bytes_received") > 50 << 20);
    assert!(traffic, "no traffic:\n{}\n{}", a.daemon_log(), b.daemon_log());
}

/// Sets the second host's fabric interface `state` ("up" or "down").
fn second_hosts_fabric_link(name: &str, state: &str) {
    let ok = std::process::Command::new("ip")
        .args(["-n", &format!("vsw-{name}-2"), "link", "set", "fab0", state])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn programs_work_across_hosts(kind: &str, name: &str) {
    let (a, mut b) = pair(name, kind);
    // redis: values written from one host are read back from it, and the
    // benchmark's every request is answered.
    b.spawn(
        "b",
        Via::Vsocket,
        "redis-server",
        &redis_server_args(6379, &[]).iter().map(String::as_str).collect::<Vec<_>>(),
        "redis.log",
    )
    .unwrap();
    b.wait_listening("b", 6379).unwrap();
    let value = "x".repeat(100_000);
    a.run_ok("a", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "set", "big", &value]).unwrap();
    let got = a.run_ok("a", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "get", "big"]).unwrap();
    assert_eq!(got.trim(), value);
    let out = a
        .run_ok(
            "a",
            Via::Vsocket,
            "redis-benchmark",
            &["-h", "10.10.0.3", "-t", "set,get", "-n", "20000", "-c", "20", "-q"],
        )
        .unwrap();
    let rates = vsocket_e2e::redis_benchmark_rates(&out);
    assert_eq!(rates.len(), 2, "{out}");
    let dbsize = a.run_ok("a", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "dbsize"]).unwrap();
    assert!(dbsize.trim().parse::<u64>().unwrap() >= 2, "{dbsize}");
    // Every connection crossed the fabric: the first host opened them, the
    // second accepted them, and neither fell back to the kernel.
    peer_reaches(&a, "opened", |n| n >= 23);
    let opened = peer(&a, "opened");
    peer_reaches(&b, "accepted", |n| n == opened);
    assert_eq!(a.counter("a", "fallbacks"), 0);

    // sockperf ping-pong.
    b.spawn("b", Via::Vsocket, "sockperf", &["server", "--tcp", "-i", "10.10.0.3", "-p", "11111"], "sockperf.log")
        .unwrap();
    b.wait_listening("b", 11111).unwrap();
    let (_, latency) = vsocket_e2e::sockperf_ping_pong(&a, "a", Via::Vsocket).unwrap();
    assert!(latency.p50 > 0.0);

    // iperf3, carrying at least what it counted through the fabric.
    let before = peer(&b, "bytes_received");
    b.spawn("b", Via::Vsocket, "iperf3", &["-s", "-B", "10.10.0.3", "-p", "5201", "-1"], "iperf3.log").unwrap();
    b.wait_listening("b", 5201).unwrap();
    let out = a.run_ok("a", Via::Vsocket, "iperf3", &["-c", "10.10.0.3", "-p", "5201", "-t", "2", "-J"]).unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(report["error"].is_null(), "{}", report["error"]);
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap();
    assert!(received > 10 << 20, "only {received} bytes");
    peer_reaches(&b, "bytes_received", |n| n - before >= received);
    assert_eq!(a.counter("a", "fallbacks"), 0);
}

fn a_gibibyte_crosses_intact(kind: &str, name: &str) {
    const BYTES: u64 = 1 << 30;
    let (a, mut b) = pair(name, kind);
    let script = asset("transfer.py");
    let script = script.to_str().unwrap();
    b.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7000"], "server.log").unwrap();
    b.wait_listening("b", 7000).unwrap();
    let sent = a
        .run_ok("a", Via::Vsocket, "python3", &[script, "send", "10.10.0.3", "7000", &BYTES.to_string(), "4242"])
        .unwrap();
    b.stop_background();
    let received = std::fs::read_to_string(b.dir.join("server.log")).unwrap();
    assert!(sent.trim().starts_with(&format!("bytes={BYTES} sha256=")), "{sent}");
    assert_eq!(received.trim(), sent.trim(), "the server saw something else");
    peer_reaches(&a, "bytes_sent", |n| n >= BYTES);
    assert_eq!(a.counter("a", "fallbacks"), 0);
}

fn a_stalled_reader_stalls_only_its_own_connection(kind: &str, name: &str) {
    let (a, mut b) = pair(name, kind);
    let script = asset("stall.py");
    let script = script.to_str().unwrap();
    b.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7001"], "server.log").unwrap();
    b.wait_listening("b", 7001).unwrap();
    let out = a.run_ok("a", Via::Vsocket, "python3", &[script, "run", "10.10.0.3", "7001", "200000000"]).unwrap();
    assert!(out.contains("busy_ok"), "{out}");
    let filled: u64 = out.split("stalled_bytes=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(filled > 0, "{out}");
    assert!(out.contains(&format!("stalled_end {filled} intact")), "{out}");
    peer_reaches(&a, "opened", |n| n == 2);
}

fn the_other_daemon_dying_resets_its_connections(kind: &str, name: &str) {
    let (a, mut b) = pair(name, kind);
    let script = asset("transfer.py");
    let script = script.to_str().unwrap();
    b.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7002"], "server.log").unwrap();
    b.wait_listening("b", 7002).unwrap();
    // A transfer far too long to finish, killed under it.
    let mut sender = a
        .command("a", Via::Vsocket, "python3", &[script, "send", "10.10.0.3", "7002", "100000000000", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    crossed_50_mib(&a, &b);
    b.kill_daemon();
    let killed = Instant::now();
    let ended = wait_until(Duration::from_secs(15), || matches!(sender.try_wait(), Ok(Some(_))));
    if !ended {
        let _ = sender.kill();
    }
    let output = sender.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(ended, "the sender did not notice within 15 s");
    // Writing into a reset connection: ECONNRESET or EPIPE, as over TCP.
    assert!(
        stderr.contains("ConnectionResetError") || stderr.contains("BrokenPipeError"),
        "after {:?}: {stderr}",
        killed.elapsed()
    );
    peer_reaches(&a, "connections", |n| n == 0);
    let down = a.ctl("peers").unwrap();
    assert_eq!(down[0]["state"], "down", "{down}");

    // The host comes back: the link is made again and a new server there
    // is reached over the fabric.
    b.stop_background();
    b.start_daemon().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || a.ctl("peers").unwrap()[0]["state"] == "up"),
        "link not back:\n{}\n{}",
        a.daemon_log(),
        b.daemon_log()
    );
    b.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7003"], "server2.log").unwrap();
    b.wait_listening("b", 7003).unwrap();
    let opened = peer(&a, "opened");
    let sent = a.run_ok("a", Via::Vsocket, "python3", &[script, "send", "10.10.0.3", "7003", "10000000", "2"]).unwrap();
    b.stop_background();
    let received = std::fs::read_to_string(b.dir.join("server2.log")).unwrap();
    assert_eq!(received.trim(), sent.trim());
    peer_reaches(&a, "opened", |n| n == opened + 1);
    peer_reaches(&a, "links_up", |n| n >= 2);
}

fn a_cut_link_resets_its_connections_within_the_bound(kind: &str, name: &str) {
    // Guest c runs on the first host beside a: a connection between them
    // never touches the fabric.
    let body = vsocket_e2e::open_vpc(&[("a", "10.10.0.2", ""), ("b", "10.10.0.3", ""), ("c", "10.10.0.4", "")]);
    let (mut a, mut b) = Lab::start_pair(name, [&body, &body], ["", ""], kind, &["b"]).unwrap();
    let script = asset("transfer.py");
    let script = script.to_str().unwrap();
    b.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7005"], "server.log").unwrap();
    b.wait_listening("b", 7005).unwrap();
    a.spawn("c", Via::Vsocket, "python3", &[script, "serve", "10.10.0.4", "7006"], "local.log").unwrap();
    a.wait_listening("c", 7006).unwrap();
    let mut sender = a
        .command("a", Via::Vsocket, "python3", &[script, "send", "10.10.0.3", "7005", "100000000000", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    crossed_50_mib(&a, &b);
    // Cut the link: no FIN, no RST, just silence.
    let link = |state: &str| second_hosts_fabric_link(name, state);
    link("down");
    let cut = Instant::now();
    let ended = wait_until(Duration::from_secs(15), || matches!(sender.try_wait(), Ok(Some(_))));
    if !ended {
        let _ = sender.kill();
    }
    let output = sender.wait_with_output().unwrap();
    let noticed = cut.elapsed();
    assert!(ended, "the sender did not notice the cut within 15 s");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ConnectionResetError") || stderr.contains("BrokenPipeError"), "{stderr}");
    // The documented bound is 3 s of silence; allow for a loaded machine.
    assert!(noticed < Duration::from_secs(8), "noticed after {noticed:?}");
    // Meanwhile a connection within the first host carries on.
    let local =
        a.run_ok("a", Via::Vsocket, "python3", &[script, "send", "10.10.0.4", "7006", "20000000", "6"]).unwrap();
    assert!(local.contains("bytes=20000000"), "{local}");
    // The link comes back, and so do cross-host connections.
    link("up");
    assert!(wait_until(Duration::from_secs(20), || a.ctl("peers").unwrap()[0]["state"] == "up"), "link not back");
    b.stop_background();
    b.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7007"], "server2.log").unwrap();
    b.wait_listening("b", 7007).unwrap();
    let sent = a.run_ok("a", Via::Vsocket, "python3", &[script, "send", "10.10.0.3", "7007", "10000000", "7"]).unwrap();
    b.stop_background();
    a.stop_background();
    let received = std::fs::read_to_string(b.dir.join("server2.log")).unwrap();
    assert_eq!(received.trim(), sent.trim());
    assert_eq!(a.counter("a", "fallbacks"), 0);
}

/// The second host's daemon starts while its fabric interface is down (a
/// host whose network comes up after its services): once the interface is
/// up, the first host's dials get through and connections cross.
fn a_daemon_started_before_its_network_links_once_it_is_up(kind: &str, name: &str) {
    let (a, mut b) = pair(name, kind);
    let link = |state: &str| second_hosts_fabric_link(name, state);
    b.kill_daemon();
    assert!(wait_until(Duration::from_secs(10), || a.ctl("peers").unwrap()[0]["state"] == "down"), "link kept");
    link("down");
    b.start_daemon().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(a.ctl("peers").unwrap()[0]["state"], "down");
    link("up");
    assert!(
        wait_until(Duration::from_secs(15), || a.ctl("peers").unwrap()[0]["state"] == "up"),
        "no link after the interface came up:\n{}\n{}",
        a.daemon_log(),
        b.daemon_log()
    );
    let script = asset("transfer.py");
    let script = script.to_str().unwrap();
    b.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7009"], "server.log").unwrap();
    b.wait_listening("b", 7009).unwrap();
    let sent = a.run_ok("a", Via::Vsocket, "python3", &[script, "send", "10.10.0.3", "7009", "10000000", "3"]).unwrap();
    b.stop_background();
    let received = std::fs::read_to_string(b.dir.join("server.log")).unwrap();
    assert_eq!(received.trim(), sent.trim());
    assert_eq!(a.counter("a", "fallbacks"), 0);
}

fn a_misbehaving_peer_host_is_contained(kind: &str, name: &str) {
    let (mut a, mut b) = pair(name, kind);
    // A listener whose program never reads.
    let never_reads = "import socket, time\n\
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.bind(('10.10.0.3', 7008)); s.listen(); c = s.accept(); time.sleep(60)";
    b.spawn("b", Via::Vsocket, "python3", &["-c", never_reads], "never_reads.log").unwrap();
    b.wait_listening("b", 7008).unwrap();
    // The first host's daemon is replaced by something that speaks the
    // fabric from that host's address and breaks every rule it can.
    a.kill_daemon();
    peer_reaches(&b, "links_up", |n| n >= 1);
    assert!(wait_until(Duration::from_secs(10), || b.ctl("peers").unwrap()[0]["state"] == "down"), "link kept");
    let script = asset("fabric_peer.py");
    let host_ip = FABRIC_ADDRESSES[0].split(':').next().unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &format!("vsw-{name}-1"), "python3"])
        .arg(&script)
        .args([host_ip, FABRIC_ADDRESSES[1], &format!("{name}-1"), "blue", "10.10.0.3:7008"])
        .arg(Lab::fabric_key_file(name))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The window is the fabric's default ring size (1 MiB), not the host's.
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["refused", "accepted 1048576", "reset", "alive"],
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(b.daemon_log().contains("does not host"), "{}", b.daemon_log());
    // The daemon carries on: the real host comes back and is served.
    a.start_daemon().unwrap();
    assert!(wait_until(Duration::from_secs(15), || a.ctl("peers").unwrap()[0]["state"] == "up"), "link not back");
    let transfer = asset("transfer.py");
    let transfer = transfer.to_str().unwrap();
    b.spawn("b", Via::Vsocket, "python3", &[transfer, "serve", "10.10.0.3", "7009"], "server.log").unwrap();
    b.wait_listening("b", 7009).unwrap();
    let sent =
        a.run_ok("a", Via::Vsocket, "python3", &[transfer, "send", "10.10.0.3", "7009", "5000000", "8"]).unwrap();
    b.stop_background();
    assert_eq!(std::fs::read_to_string(b.dir.join("server.log")).unwrap().trim(), sent.trim());
}

fn the_servers_host_decides_ingress(kind: &str, name: &str) {
    // The first host's view lets the VPC in on every port; the second
    // host's (the server's) only on 6379, and it rejects the rest.
    let strict = TWO_GUESTS.replace("ports = \"all\"", "ports = \"6379\"");
    let flow_log = "flow_log = \"{dir}/flow.log\"";
    let (a, mut b) = Lab::start_pair(
        name,
        [TWO_GUESTS, &strict],
        [flow_log, &format!("{flow_log}\ndeny_action = \"reject\"")],
        kind,
        &["b"],
    )
    .unwrap();
    let script = asset("transfer.py");
    let script = script.to_str().unwrap();
    b.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7004"], "server.log").unwrap();
    b.wait_listening("b", 7004).unwrap();
    let out = a.run("a", Via::Vsocket, "python3", &[script, "send", "10.10.0.3", "7004", "1000", "3"]).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("ConnectionRefusedError"), "{stderr}");
    // Decided, counted and logged on the server's host.
    let logged = |lab: &Lab| std::fs::read_to_string(lab.dir.join("flow.log")).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(5), || logged(&b).contains("\"verdict\":\"rejected\"")), "{}", logged(&b));
    assert!(logged(&b).contains("default: ingress denied"), "{}", logged(&b));
    assert!(
        wait_until(Duration::from_secs(5), || logged(&a).contains(&format!("refused by host {name}-2"))),
        "{}",
        logged(&a)
    );
    peer_reaches(&b, "accepted", |n| n == 0);
}

/// A pair of hosts, and 10.99.0.9 on the network between them for a party
/// that is not a host: the namespace it speaks from, and the first host's
/// count of links so far.
fn pair_and_a_stranger(name: &str, kind: &str) -> (Lab, Lab, String, u64) {
    let (a, b) = pair(name, kind);
    let fabric_ns = format!("vsf-{name}-1");
    let added = std::process::Command::new("ip")
        .args(["-n", &fabric_ns, "addr", "add", "10.99.0.9/24", "dev", "fbr"])
        .status()
        .unwrap();
    assert!(added.success());
    let links = peer(&a, "links_up");
    (a, b, fabric_ns, links)
}

fn a_host_that_is_not_configured_is_refused(kind: &str, name: &str) {
    // Someone on the fabric's network who is not the first host claims to
    // be it, and someone else claims a name no config lists.
    let (a, b, fabric_ns, links) = pair_and_a_stranger(name, kind);
    let target = FABRIC_ADDRESSES[1];
    let script = asset("fabric_intruder.py");
    for claim in [format!("{name}-1"), "intruder".to_string()] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &fabric_ns, "python3"])
            .arg(&script)
            .args(["10.99.0.9", target, &claim])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("closed"), "claiming {claim}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(b.daemon_log().contains("fabric link refused"), "{}", b.daemon_log());
    // The real link was not disturbed.
    peer_reaches(&a, "links_up", |n| n == links);
    assert_eq!(a.ctl("peers").unwrap()[0]["state"], "up");
}

/// As `a_host_that_is_not_configured_is_refused`, with a vsocketd as the
/// intruder (so it speaks the fabric with the transport itself, UCX
/// included): one that claims a name no config lists, and one that claims
/// to be the first host from another address.
fn an_intruding_daemon_is_refused(kind: &str, name: &str) {
    let (a, b, fabric_ns, links) = pair_and_a_stranger(name, kind);
    // Both claimed names sort before the target's, so the intruder dials.
    for (claim, why) in
        [("a-intruder".to_string(), "not a configured fabric host"), (format!("{name}-1"), "not the host's address")]
    {
        let dir = std::env::temp_dir().join(format!("vsocket-intruder-{name}-{claim}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        let config = dir.join("intruder.toml");
        std::fs::write(
            &config,
            format!(
                "[host]\nname = \"{claim}\"\nrun_dir = \"{}\"\n[fabric]\nkind = \"{kind}\"\n\
                 [[fabric.host]]\nname = \"{claim}\"\naddress = \"10.99.0.9:7470\"\n\
                 [[fabric.host]]\nname = \"{name}-2\"\naddress = \"{}\"\n",
                dir.join("run").display(),
                FABRIC_ADDRESSES[1]
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("vsocketd.log")).unwrap();
        let mut intruder = std::process::Command::new("ip")
            .args(["netns", "exec", &fabric_ns])
            .arg(vsocket_e2e::bin("vsocketd"))
            .arg("--config")
            .arg(&config)
            .env("VSOCKET_LOG", "debug")
            .stderr(log)
            .spawn()
            .unwrap();
        let refusals = b.daemon_log().matches("fabric link refused").count();
        let ups = b.daemon_log().matches("fabric link up").count();
        let refused = wait_until(Duration::from_secs(10), || {
            let log = b.daemon_log();
            log.matches("fabric link refused").count() > refusals && log.contains(why)
        });
        // It keeps dialing; none of its links is ever taken on the target.
        std::thread::sleep(Duration::from_secs(2));
        let _ = intruder.kill();
        let _ = intruder.wait();
        let intruder_log = std::fs::read_to_string(dir.join("vsocketd.log")).unwrap_or_default();
        assert!(refused, "{claim} was not refused:\n{}\n{intruder_log}", b.daemon_log());
        // (The intruder heard the target's Hello, which goes first each way.)
        assert_eq!(b.daemon_log().matches("fabric link up").count(), ups, "{claim} got a link:\n{}", b.daemon_log());
    }
    // The real link was not disturbed.
    peer_reaches(&a, "links_up", |n| n == links);
    assert_eq!(a.ctl("peers").unwrap()[0]["state"], "up");
}

/// Both hosts hold the fabric key. With the second host's daemon down,
/// something at its address (a vsocketd with another key, then one with
/// none) answers the first host's dials: the first host refuses it for
/// the key (so a dialer is protected too, not only a listener), never
/// takes the link, and takes the real host's again when it returns.
fn a_host_without_the_key_is_refused(kind: &str, name: &str) {
    let (a, mut b) = pair(name, kind);
    let links = peer(&a, "links_up");
    b.kill_daemon();
    assert!(wait_until(Duration::from_secs(10), || a.ctl("peers").unwrap()[0]["state"] == "down"), "link kept");
    let config = std::fs::read_to_string(&b.config).unwrap();
    let real_key = Lab::fabric_key_file(name);
    let wrong_key = b.dir.join("wrong.key");
    vsocket_e2e::write_key(&wrong_key, "another-key-entirely-0123456789").unwrap();
    let keyed = format!("key_file = \"{}\"\n", real_key.display());
    for (key_line, why) in
        [(format!("key_file = \"{}\"\n", wrong_key.display()), "wrong fabric key"), (String::new(), "sent no proof")]
    {
        assert!(config.contains(&keyed), "{config}");
        let impostor_config = b.dir.join("impostor.toml");
        std::fs::write(&impostor_config, config.replace(&keyed, &key_line)).unwrap();
        let _ = std::fs::remove_file(b.run_dir.join("vsocketd.sock"));
        let log = std::fs::File::create(b.dir.join("impostor.log")).unwrap();
        let mut impostor = std::process::Command::new("ip")
            .args(["netns", "exec", &format!("vsw-{name}-2")])
            .arg(vsocket_e2e::bin("vsocketd"))
            .arg("--config")
            .arg(&impostor_config)
            .stderr(log)
            .spawn()
            .unwrap();
        let refusals = a.daemon_log().matches("fabric link refused").count();
        let refused = wait_until(Duration::from_secs(10), || {
            let log = a.daemon_log();
            log.matches("fabric link refused").count() > refusals && log.contains(why)
        });
        // It keeps answering dials; none of its links is ever taken.
        std::thread::sleep(Duration::from_secs(2));
        let state = a.ctl("peers").unwrap()[0]["state"].clone();
        let _ = impostor.kill();
        let _ = impostor.wait();
        let impostor_log = std::fs::read_to_string(b.dir.join("impostor.log")).unwrap_or_default();
        assert!(refused, "no refusal for \"{why}\":\n{}\n{impostor_log}", a.daemon_log());
        assert_eq!(state, "down", "the impostor got the link:\n{}\n{impostor_log}", a.daemon_log());
        assert_eq!(peer(&a, "links_up"), links, "{}", a.daemon_log());
    }
    // The real host, with the key, gets its link back.
    b.start_daemon().unwrap();
    peer_reaches(&a, "links_up", |n| n == links + 1);
    assert_eq!(a.ctl("peers").unwrap()[0]["state"], "up");
}

#[test]
fn keyless_host_refused_tcp() {
    a_host_without_the_key_is_refused("tcp", "fkt1");
}

#[test]
fn keyless_host_refused_ucx() {
    a_host_without_the_key_is_refused("ucx", "fku1");
}

#[test]
fn programs_tcp() {
    programs_work_across_hosts("tcp", "ftp1");
}

#[test]
fn gibibyte_tcp() {
    a_gibibyte_crosses_intact("tcp", "ftg1");
}

#[test]
fn stalled_reader_tcp() {
    a_stalled_reader_stalls_only_its_own_connection("tcp", "fts1");
}

#[test]
fn daemon_killed_tcp() {
    the_other_daemon_dying_resets_its_connections("tcp", "ftk1");
}

#[test]
fn link_cut_tcp() {
    a_cut_link_resets_its_connections_within_the_bound("tcp", "ftc1");
}

#[test]
fn network_up_late_tcp() {
    a_daemon_started_before_its_network_links_once_it_is_up("tcp", "ftn1");
}

#[test]
fn misbehaving_peer_tcp() {
    a_misbehaving_peer_host_is_contained("tcp", "ftm1");
}

#[test]
fn ingress_on_the_servers_host_tcp() {
    the_servers_host_decides_ingress("tcp", "fti1");
}

#[test]
fn unconfigured_host_tcp() {
    a_host_that_is_not_configured_is_refused("tcp", "ftu1");
}

#[test]
fn programs_ucx() {
    programs_work_across_hosts("ucx", "fup1");
}

#[test]
fn gibibyte_ucx() {
    a_gibibyte_crosses_intact("ucx", "fug1");
}

#[test]
fn stalled_reader_ucx() {
    a_stalled_reader_stalls_only_its_own_connection("ucx", "fus1");
}

#[test]
fn daemon_killed_ucx() {
    the_other_daemon_dying_resets_its_connections("ucx", "fuk1");
}

#[test]
fn link_cut_ucx() {
    a_cut_link_resets_its_connections_within_the_bound("ucx", "fuc1");
}

#[test]
fn intruder_ucx() {
    an_intruding_daemon_is_refused("ucx", "fuu1");
}

#[test]
fn network_up_late_ucx() {
    a_daemon_started_before_its_network_links_once_it_is_up("ucx", "fun1");
}

#[test]
fn ingress_on_the_servers_host_ucx() {
    the_servers_host_decides_ingress("ucx", "fui1");
}
