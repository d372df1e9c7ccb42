//! Servers and their own load generators and clients, unmodified, between
//! two guests over vSocket: memcached, Redis replication, nginx under wrk,
//! and a Python `selectors` event loop.

use std::time::Duration;
use vsocket_e2e::{asset, nginx_config, redis_server_args, redis_server_args_at, wait_until, Lab, Via, TWO_GUESTS};

fn script(name: &str) -> String {
    asset(name).to_str().unwrap().to_string()
}

/// The client guest's connections all went over vSocket: some were brokered
/// and none fell back to the kernel.
fn assert_over_vsocket(lab: &Lab, guest: &str) {
    let counters = lab.guest(guest).unwrap();
    assert!(counters["connections_out"].as_u64().unwrap() > 0, "{counters}");
    assert_eq!(counters["fallbacks"], 0, "{counters}");
}

/// `len` printable bytes that neither repeat nor compress much.
fn letters(len: usize, seed: u64) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 94) as u8)
        })
        .collect()
}

/// The numeric value of `name: N` in memaslap's summary.
fn memaslap_stat(out: &str, name: &str) -> u64 {
    let prefix = format!("{name}: ");
    out.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in memaslap output:\n{out}"))
}

/// Debian 12's libmemcached-tools installs memaslap as `memcaslap`; older
/// releases as `memaslap`.
fn memaslap() -> &'static str {
    let on_path = |name: &str| {
        std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).exists()))
    };
    ["memcaslap", "memaslap"].into_iter().find(|name| on_path(name)).expect("memaslap (libmemcached-tools) installed")
}

fn start_memcached(lab: &mut Lab, port: u16) {
    let port_s = port.to_string();
    lab.spawn(
        "b",
        Via::Vsocket,
        "memcached",
        &["-u", "root", "-l", "10.10.0.3", "-p", &port_s, "-U", "0", "-m", "256", "-t", "2"],
        "memcached.log",
    )
    .unwrap();
    lab.wait_listening("b", port).unwrap();
}

#[test]
fn memcached_with_memaslap() {
    let mut lab = Lab::start("tmslap", TWO_GUESTS).unwrap();
    start_memcached(&mut lab, 11211);
    // A fixed number of operations (never filling the 256 MiB, so nothing
    // is evicted), 10% of gets verified.
    let out = lab
        .run_ok(
            "a",
            Via::Vsocket,
            memaslap(),
            &["-s", "10.10.0.3:11211", "-T", "2", "-c", "16", "-x", "200000", "-v", "0.1"],
        )
        .unwrap();
    assert!(memaslap_stat(&out, "cmd_set") > 0, "{out}");
    assert!(memaslap_stat(&out, "cmd_get") > 0, "{out}");
    assert_eq!(memaslap_stat(&out, "get_misses"), 0, "{out}");
    assert_eq!(memaslap_stat(&out, "verify_misses"), 0, "{out}");
    assert_eq!(memaslap_stat(&out, "verify_failed"), 0, "{out}");
    assert_over_vsocket(&lab, "a");
    assert!(lab.counter("a", "connections_out") >= 16);
    assert!(lab.counter("a", "bytes_sent") >= memaslap_stat(&out, "written_bytes"));
    assert!(lab.counter("b", "bytes_sent") >= memaslap_stat(&out, "read_bytes"));
}

#[test]
fn memcached_text_protocol_from_python() {
    let mut lab = Lab::start("tmemc", TWO_GUESTS).unwrap();
    start_memcached(&mut lab, 11212);
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[&script("memcached_check.py"), "10.10.0.3", "11212"]).unwrap();
    let words: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(words[..3], ["memcached", "ok", "300"], "{out}");
    let value_bytes: u64 = words[3].parse().unwrap();
    assert!(value_bytes > 1_000_000, "{out}");
    assert_over_vsocket(&lab, "a");
    assert_eq!(lab.counter("a", "connections_out"), 2);
    // Every value went to the server once and came back twice.
    assert!(lab.counter("a", "bytes_sent") >= value_bytes);
    assert!(lab.counter("b", "bytes_sent") >= 2 * value_bytes);
}

// Clients of the master run in a, clients of the replica in b, so every
// connection crosses between the guests.
fn master(lab: &Lab, args: &[&str]) -> String {
    let full = [&["-h", "10.10.0.3", "-p", "6390"], args].concat();
    lab.run_ok("a", Via::Vsocket, "redis-cli", &full).unwrap().trim_end().to_string()
}

fn replica(lab: &Lab, args: &[&str]) -> String {
    let full = [&["-h", "10.10.0.2", "-p", "6391"], args].concat();
    lab.run_ok("b", Via::Vsocket, "redis-cli", &full).unwrap().trim_end().to_string()
}

fn set_big(lab: &Lab, key: &str, value: &str) {
    let args = ["-h", "10.10.0.3", "-p", "6390", "-x", "set", key];
    let out = lab.run_input("a", Via::Vsocket, "redis-cli", &args, value.as_bytes()).unwrap();
    assert_eq!(out.trim(), "OK");
}

#[test]
fn redis_replica_in_another_guest_follows_its_master() {
    let mut lab = Lab::start("trepl", TWO_GUESTS).unwrap();
    let master_dir = lab.dir.join("master");
    let replica_dir = lab.dir.join("replica");
    std::fs::create_dir_all(&master_dir).unwrap();
    std::fs::create_dir_all(&replica_dir).unwrap();
    let master_args =
        redis_server_args(6390, &["--dir", master_dir.to_str().unwrap(), "--repl-diskless-sync-delay", "0"]);
    let master_args: Vec<&str> = master_args.iter().map(String::as_str).collect();
    lab.spawn("b", Via::Vsocket, "redis-server", &master_args, "master.log").unwrap();
    lab.wait_listening("b", 6390).unwrap();
    // Written before the replica exists: it gets these by the full sync.
    let before: Vec<(String, String)> =
        (0..100).map(|i| (format!("before:{i}"), letters(10 + i * 37, i as u64))).collect();
    let mset: Vec<&str> =
        ["mset"].into_iter().chain(before.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()])).collect();
    assert_eq!(master(&lab, &mset), "OK");
    let big_before = letters(300_000, 7);
    set_big(&lab, "big:before", &big_before);

    let replica_args = redis_server_args_at(
        "10.10.0.2",
        6391,
        &["--dir", replica_dir.to_str().unwrap(), "--replicaof", "10.10.0.3", "6390"],
    );
    let replica_args: Vec<&str> = replica_args.iter().map(String::as_str).collect();
    lab.spawn("a", Via::Vsocket, "redis-server", &replica_args, "replica.log").unwrap();
    lab.wait_listening("a", 6391).unwrap();
    let link_up = wait_until(Duration::from_secs(30), || {
        replica(&lab, &["info", "replication"]).contains("master_link_status:up")
    });
    assert!(
        link_up,
        "the replica's link never came up:\n{}\n{}",
        replica(&lab, &["info", "replication"]),
        std::fs::read_to_string(lab.dir.join("replica.log")).unwrap_or_default()
    );

    // Written after the link is up: these travel in the replication stream.
    let big_after = letters(500_000, 11);
    set_big(&lab, "big:after", &big_after);
    let after: Vec<(String, String)> =
        (0..100).map(|i| (format!("after:{i}"), letters(5 + i * 53, 1000 + i as u64))).collect();
    let mset: Vec<&str> =
        ["mset"].into_iter().chain(after.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()])).collect();
    assert_eq!(master(&lab, &mset), "OK");
    for _ in 0..5 {
        master(&lab, &["incr", "counter"]);
    }
    // WAIT returns once the replica has acknowledged every write so far.
    assert_eq!(master(&lab, &["wait", "1", "10000"]), "1");

    let master_info = master(&lab, &["info", "replication"]);
    assert!(master_info.contains("connected_slaves:1"), "{master_info}");
    assert!(master_info.contains("state=online"), "{master_info}");
    let replica_info = replica(&lab, &["info", "replication"]);
    assert!(replica_info.contains("role:slave"), "{replica_info}");
    assert_eq!(replica(&lab, &["dbsize"]), master(&lab, &["dbsize"]));
    assert_eq!(replica(&lab, &["dbsize"]), "203");
    assert_eq!(replica(&lab, &["get", "big:before"]), big_before);
    assert_eq!(replica(&lab, &["get", "big:after"]), big_after);
    assert_eq!(replica(&lab, &["get", "counter"]), "5");
    for pairs in [&before, &after] {
        let keys: Vec<&str> = ["mget"].into_iter().chain(pairs.iter().map(|(k, _)| k.as_str())).collect();
        let values: Vec<&str> = pairs.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(replica(&lab, &keys), values.join("\n"));
    }

    // The replica's link to the master and the clients of each went over
    // vSocket, both ways; the master's stream carried the late big value.
    assert_over_vsocket(&lab, "a");
    assert_over_vsocket(&lab, "b");
    assert!(lab.counter("a", "bytes_received") >= big_after.len() as u64);
}

#[test]
fn wrk_against_nginx_master_and_workers() {
    let mut lab = Lab::start("twrk", TWO_GUESTS).unwrap();
    let conf_path = nginx_config(&lab.dir, "10.10.0.3:8081", "on").unwrap();
    let page: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i.wrapping_mul(2654435761) >> 27) as u8).collect();
    std::fs::write(lab.dir.join("www").join("page.html"), &page).unwrap();
    lab.spawn("b", Via::Vsocket, "nginx", &["-c", conf_path.to_str().unwrap()], "nginx.log").unwrap();
    lab.wait_listening("b", 8081).unwrap();
    let url = "http://10.10.0.3:8081/page.html";
    let out = lab.run_ok("a", Via::Vsocket, "wrk", &["-t2", "-c20", "-d3s", url]).unwrap();
    // wrk prints these lines only when a count is nonzero.
    assert!(!out.contains("Socket errors"), "{out}");
    assert!(!out.contains("Non-2xx"), "{out}");
    let requests: u64 = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk output:\n{out}"));
    assert!(requests > 0, "{out}");
    // And the page itself arrives intact.
    let got = lab.dir.join("got-page.html");
    lab.run_ok("a", Via::Vsocket, "curl", &["-sf", "-o", got.to_str().unwrap(), url]).unwrap();
    assert!(std::fs::read(&got).unwrap() == page, "the page differs");
    assert_over_vsocket(&lab, "a");
    assert!(lab.counter("a", "connections_out") >= 21);
    assert!(lab.counter("b", "bytes_sent") >= requests * page.len() as u64);
}

#[test]
fn python_selectors_echo_server_with_several_clients() {
    let mut lab = Lab::start("tsel", TWO_GUESTS).unwrap();
    let s = script("selectors_echo.py");
    lab.spawn("b", Via::Vsocket, "python3", &[&s, "serve", "10.10.0.3", "8300"], "server.log").unwrap();
    lab.wait_listening("b", 8300).unwrap();
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[&s, "client", "10.10.0.3", "8300"]).unwrap();
    assert_eq!(out.trim(), "selectors ok 8 4594024");
    let log = lab.dir.join("server.log");
    let served = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("served 8 connections, at most 8 at once")
    });
    assert!(served, "server log: {}", std::fs::read_to_string(&log).unwrap_or_default());
    assert_over_vsocket(&lab, "a");
    assert_eq!(lab.counter("a", "connections_out"), 8);
    assert!(lab.counter("a", "bytes_sent") >= 4_594_024);
    assert!(lab.counter("a", "bytes_received") >= 4_594_024);
}

/// The same echo with poll on one side and select on the other: each
/// waits on all its connections at once, and must find every echo.
#[test]
fn python_poll_and_select_echo_with_several_clients() {
    let mut lab = Lab::start("tpoll", TWO_GUESTS).unwrap();
    let s = script("selectors_echo.py");
    for (port, server, client) in [("8320", "poll", "select"), ("8321", "select", "poll")] {
        let log = format!("server-{server}.log");
        lab.spawn("b", Via::Vsocket, "python3", &[&s, "serve", "10.10.0.3", port, server], &log).unwrap();
        lab.wait_listening("b", port.parse().unwrap()).unwrap();
        let out = lab.run_ok("a", Via::Vsocket, "python3", &[&s, "client", "10.10.0.3", port, client]).unwrap();
        assert_eq!(out.trim(), "selectors ok 8 4594024", "{server} server, {client} client");
        let log = lab.dir.join(log);
        let served = wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).unwrap_or_default().contains("served 8 connections, at most 8 at once")
        });
        assert!(served, "server log: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert_over_vsocket(&lab, "a");
    assert_eq!(lab.counter("a", "connections_out"), 16);
}

#[test]
fn many_idle_connections_and_a_few_busy_on_one_epoll_set_lose_nothing() {
    // Most of the 400 connections idle at any time (cold in both ends'
    // epoll sets); the few that speak must be found, each time, on both.
    let mut lab = Lab::start("tidle", TWO_GUESTS).unwrap();
    let server = script("selectors_echo.py");
    lab.spawn("b", Via::Vsocket, "python3", &[&server, "serve", "10.10.0.3", "8310"], "server.log").unwrap();
    lab.wait_listening("b", 8310).unwrap();
    let client = script("idle_busy.py");
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[&client, "10.10.0.3", "8310", "400", "600"]).unwrap();
    assert_eq!(out.trim(), "idle_busy ok 400 600");
    assert_over_vsocket(&lab, "a");
    assert_eq!(lab.counter("a", "connections_out"), 400);
}
