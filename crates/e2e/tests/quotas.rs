//! Per-guest quotas: a guest at its limit of connections, shared memory or
//! control channels is refused on its own account, with the errno the docs
//! give (docs/ARCHITECTURE.md §3, *Quotas*), counted and logged, while other guests
//! carry on; what it held is given back when its connections close.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vsocket_e2e::{asset, wait_until, Lab, Via};

const EADDRNOTAVAIL: i32 = 99;
const ENOBUFS: i32 = 105;
const ECONNREFUSED: i32 = 111;

/// Four guests open to each other; `a_quota` and `d_quota` are lines for
/// guests `a` and `d` (their quotas).
fn body(a_quota: &str, d_quota: &str) -> String {
    vsocket_e2e::open_vpc(&[
        ("a", "10.10.0.2", a_quota),
        ("b", "10.10.0.3", ""),
        ("c", "10.10.0.4", ""),
        ("d", "10.10.0.5", d_quota),
    ])
}

/// Connects once and exchanges a byte; prints "connected" or "errno E".
const PROBE: &str = "import socket,sys\ns=socket.socket()\ntry:\n    s.connect((sys.argv[1], int(sys.argv[2])))\n    s.sendall(b'p')\n    assert s.recv(1) == b'p'\n    print('connected')\nexcept OSError as e:\n    print('errno', e.errno)\n";

fn script(name: &str) -> String {
    asset(name).display().to_string()
}

/// Starts the echo server in `guest` on `addr`:7000.
fn echo(lab: &mut Lab, guest: &str, addr: &str) {
    lab.spawn(guest, Via::Vsocket, "python3", &[&script("quota_echo.py"), addr, "7000"], &format!("echo-{guest}.log"))
        .unwrap();
    lab.wait_listening(guest, 7000).unwrap();
}

/// Waits until the background program's log has a line starting with
/// `word`; returns the whole log.
fn wait_log(lab: &Lab, log: &str, word: &str) -> String {
    let path = lab.dir.join(log);
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    let seen = wait_until(Duration::from_secs(60), || read().lines().any(|l| l.starts_with(word)));
    assert!(seen, "no '{word}' in {log}:\n{}\ndaemon:\n{}", read(), lab.daemon_log());
    read()
}

fn probe(lab: &Lab, guest: &str, addr: &str) -> String {
    lab.run_ok(guest, Via::Vsocket, "python3", &["-c", PROBE, addr, "7000"]).unwrap().trim().to_string()
}

/// The samples of the daemon's Prometheus exposition, by series.
fn scrape(port: u16) -> HashMap<String, u64> {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let out = Command::new("curl").args(["-sSf", &url]).output().unwrap();
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(s, v)| (s.to_string(), v.parse().unwrap())))
        .collect()
}

fn exceeded(metrics: &HashMap<String, u64>, guest: &str, quota: &str) -> u64 {
    metrics[&format!("vsocket_quota_exceeded_total{{guest=\"{guest}\",vpc=\"blue\",quota=\"{quota}\"}}")]
}

/// Waits until a guest holds nothing of its connection quotas.
fn wait_given_back(lab: &Lab, guest: &str) {
    let back = wait_until(Duration::from_secs(10), || {
        lab.counter(guest, "connections_live") == 0 && lab.counter(guest, "shared_memory") == 0
    });
    assert!(back, "{guest} still holds quota: {:?}", lab.guest(guest));
}

fn go(lab: &Lab) -> String {
    lab.dir.join("go").display().to_string()
}

/// Runs quota_hold.py in `guest`: it holds `count` connections to
/// `addr`:7000, tries one more (blocking and asyncio), then waits for the
/// `go_file`. Returns its log once both extra connects were tried.
fn hold(lab: &mut Lab, guest: &str, addr: &str, count: &str, go_file: &str, log: &str) -> String {
    lab.spawn(guest, Via::Vsocket, "python3", &[&script("quota_hold.py"), addr, "7000", count, go_file], log).unwrap();
    wait_log(lab, log, "extra_async")
}

fn release(lab: &Lab) {
    std::fs::write(Path::new(&go(lab)), b"").unwrap();
}

#[test]
fn connection_quota_fails_the_client_with_eaddrnotavail_and_spares_other_guests() {
    let mut lab = Lab::start_host("tqcon", &body("max_connections = 3", ""), "metrics = \"127.0.0.1:19471\"").unwrap();
    echo(&mut lab, "b", "10.10.0.3");
    let go = go(&lab);
    let log = hold(&mut lab, "a", "10.10.0.3", "3", &go, "hold.log");
    assert!(log.contains("held 3\n"), "{log}");
    assert!(log.contains(&format!("extra errno {EADDRNOTAVAIL}\n")), "the 4th connect fails: {log}");
    let refused_async = format!("extra_async errno {EADDRNOTAVAIL}\n");
    assert!(log.contains(&refused_async), "a non-blocking (asyncio) connect fails the same: {log}");

    // a is full; c's connects to b go on over vSocket, c's quota untouched.
    assert_eq!(probe(&lab, "c", "10.10.0.3"), "connected");
    assert_eq!(probe(&lab, "c", "10.10.0.3"), "connected");
    assert_eq!(lab.counter("c", "connections_out"), 2, "c's connects went over vSocket");
    assert_eq!(lab.counter("c", "exceeded_connections"), 0);
    assert_eq!(lab.counter("b", "exceeded_connections"), 0, "refused on a's account, not b's");
    let a = lab.guest("a").unwrap();
    assert_eq!(a["exceeded_connections"], 2);
    assert_eq!(a["connections_live"], 3);
    assert_eq!(a["max_connections"], 3);
    assert_eq!(a["shared_memory"], 3 * 2 * (4096 + 262_144));
    assert_eq!(a["fallbacks"], 0, "refused, not sent to the kernel path");
    let metrics = scrape(19471);
    assert_eq!(exceeded(&metrics, "a", "connections"), 2);
    assert_eq!(exceeded(&metrics, "c", "connections"), 0);
    assert_eq!(metrics["vsocket_quota_used{guest=\"a\",vpc=\"blue\",quota=\"connections\"}"], 3);
    assert_eq!(metrics["vsocket_quota_limit{guest=\"a\",vpc=\"blue\",quota=\"connections\"}"], 3);
    assert_eq!(lab.ctl("status").unwrap()["quota_exceeded_connections"], 2);
    assert!(lab.daemon_log().contains("quota exceeded"), "{}", lab.daemon_log());

    // a closes its 3: the count goes down and a connects again.
    release(&lab);
    let log = wait_log(&lab, "hold.log", "again");
    assert!(log.contains("again connected\n"), "{log}");
    wait_given_back(&lab, "a");
    wait_given_back(&lab, "c");
}

#[test]
fn server_quota_refuses_connects_with_econnrefused_counted_against_the_server() {
    let mut lab = Lab::start("tqsrv", &body("", "max_connections = 2")).unwrap();
    echo(&mut lab, "d", "10.10.0.5");
    echo(&mut lab, "b", "10.10.0.3");
    let go = go(&lab);
    let log = hold(&mut lab, "a", "10.10.0.5", "2", &go, "hold.log");
    assert!(log.contains("held 2\n"), "{log}");
    assert!(log.contains(&format!("extra errno {ECONNREFUSED}\n")), "d's backlog looks full: {log}");
    assert!(log.contains(&format!("extra_async errno {ECONNREFUSED}\n")), "{log}");
    assert_eq!(lab.counter("d", "exceeded_connections"), 2, "counted against the server's guest");
    assert_eq!(lab.counter("a", "exceeded_connections"), 0);
    assert_eq!(lab.counter("a", "connections_live"), 2);
    // c is refused by d too (d is full), but reaches b.
    assert_eq!(probe(&lab, "c", "10.10.0.5"), format!("errno {ECONNREFUSED}"));
    assert_eq!(probe(&lab, "c", "10.10.0.3"), "connected");
    assert_eq!(lab.counter("d", "exceeded_connections"), 3);
    assert_eq!(lab.counter("c", "exceeded_connections"), 0);

    release(&lab);
    let log = wait_log(&lab, "hold.log", "again");
    assert!(log.contains("again connected\n"), "{log}");
    wait_given_back(&lab, "a");
    wait_given_back(&lab, "d");
}

#[test]
fn shared_memory_quota_fails_the_client_with_enobufs() {
    // Segments of 2 * (4096 + 4096) bytes: 48 KiB holds three.
    let mut lab = Lab::start_host("tqshm", &body("max_shared_memory = \"48KiB\"", ""), "ring_size = 4096").unwrap();
    echo(&mut lab, "b", "10.10.0.3");
    let go = go(&lab);
    let log = hold(&mut lab, "a", "10.10.0.3", "3", &go, "hold.log");
    assert!(log.contains("held 3\n"), "{log}");
    assert!(log.contains(&format!("extra errno {ENOBUFS}\n")), "the 4th segment does not fit: {log}");
    assert!(log.contains(&format!("extra_async errno {ENOBUFS}\n")), "{log}");
    let a = lab.guest("a").unwrap();
    assert_eq!((a["shared_memory"].as_u64(), a["max_shared_memory"].as_u64()), (Some(49_152), Some(49_152)));
    assert_eq!((a["exceeded_shared_memory"].as_u64(), a["exceeded_connections"].as_u64()), (Some(2), Some(0)));
    assert_eq!(probe(&lab, "c", "10.10.0.3"), "connected");
    assert_eq!(lab.counter("c", "exceeded_shared_memory"), 0);

    release(&lab);
    let log = wait_log(&lab, "hold.log", "again");
    assert!(log.contains("again connected\n"), "{log}");
    wait_given_back(&lab, "a");
}

#[test]
fn channel_quota_closes_new_channels_and_the_program_falls_back_to_the_kernel() {
    let mut lab = Lab::start("tqchan", &body("max_channels = 2", "")).unwrap();
    echo(&mut lab, "b", "10.10.0.3");
    let go = go(&lab);
    // Three listening sockets (channels) and then a connect (a request
    // channel), with room for two channels.
    lab.spawn("a", Via::Vsocket, "python3", &[&script("quota_channels.py"), "10.10.0.3", "7000", "3", &go], "ch.log")
        .unwrap();
    let log = wait_log(&lab, "ch.log", "connected");
    assert!(log.contains("listening 3\n"), "the third listener listens on the kernel only: {log}");
    let a = lab.guest("a").unwrap();
    assert_eq!(a["channels"], 2);
    assert_eq!(a["exceeded_channels"], 2, "the third listener's channel and the request channel");
    assert_eq!(a["connections_out"], 0, "a's connect went over the kernel");
    assert_eq!(lab.counter("b", "connections_in"), 0);
    let listeners = lab.ctl("listeners").unwrap();
    let a_listeners = listeners.as_array().unwrap().iter().filter(|l| l["guest"] == "a").count();
    assert_eq!(a_listeners, 2);

    // Other guests attach and connect over vSocket as before.
    assert_eq!(probe(&lab, "c", "10.10.0.3"), "connected");
    assert_eq!(lab.counter("c", "connections_out"), 1);
    assert_eq!(lab.counter("c", "exceeded_channels"), 0);
    assert!(lab.daemon_log().contains("control channel closed: quota exceeded"), "{}", lab.daemon_log());

    release(&lab);
    assert!(wait_until(Duration::from_secs(10), || lab.counter("a", "channels") == 0), "{:?}", lab.guest("a"));
}

/// Deletes a network namespace the test made, also when it fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).stderr(std::process::Stdio::null()).status();
    }
}

/// `vsocketctl ARGS` must succeed; returns its stdout.
fn ctl_ok(lab: &Lab, args: &[&str]) -> String {
    let out = lab.ctl_output(args).unwrap();
    assert!(out.status.success(), "vsocketctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn quotas_follow_live_policy_changes_and_reset_connections_give_back_once() {
    let mut lab = Lab::start_host("tqlive", &body("max_connections = 2", ""), "on_policy_change = \"reset\"").unwrap();
    echo(&mut lab, "b", "10.10.0.3");
    let go_a = lab.dir.join("go-a").display().to_string();
    let log = hold(&mut lab, "a", "10.10.0.3", "2", &go_a, "hold-a.log");
    assert!(log.contains(&format!("extra errno {EADDRNOTAVAIL}\n")), "{log}");

    // A reload raises a's limit and lowers the [host] default (both live;
    // b, the server, gets room of its own).
    let text = std::fs::read_to_string(&lab.config).unwrap();
    assert!(text.contains("name = \"b\"\n"), "{text}");
    let text = text.replacen("max_connections = 2", "max_connections = 3", 1);
    let text = text.replacen("name = \"b\"\n", "name = \"b\"\nmax_connections = 100\n", 1);
    let text =
        text.replacen("on_policy_change = \"reset\"", "on_policy_change = \"reset\"\ndefault_max_connections = 1", 1);
    std::fs::write(&lab.config, text).unwrap();
    ctl_ok(&lab, &["reload"]);
    assert_eq!(lab.counter("a", "max_connections"), 3);
    assert_eq!(lab.counter("c", "max_connections"), 1, "the [host] default changed live");
    assert_eq!(lab.counter("b", "max_connections"), 100);
    assert_eq!(lab.counter("a", "connections_live"), 2, "kept across the change (same slot)");
    assert_eq!(probe(&lab, "a", "10.10.0.3"), "connected", "the new limit applies at once");

    // A guest added live gets its own quotas, or the [host] defaults.
    let netns = Netns("tqlive-e".into());
    let _ = Command::new("ip").args(["netns", "del", &netns.0]).stderr(std::process::Stdio::null()).status();
    assert!(Command::new("ip").args(["netns", "add", &netns.0]).status().unwrap().success());
    assert!(Command::new("ip").args(["-n", &netns.0, "link", "set", "lo", "up"]).status().unwrap().success());
    let add = [
        "guest",
        "add",
        "e",
        "--vpc",
        "blue",
        "--address",
        "10.10.0.6",
        "--security-group",
        "open",
        "--netns",
        "tqlive-e",
        "--max-shared-memory",
        "64MiB",
        "--max-channels",
        "8",
    ];
    ctl_ok(&lab, &add);
    let e = lab.guest("e").unwrap();
    assert_eq!(
        (e["max_connections"].as_u64(), e["max_shared_memory"].as_u64(), e["max_channels"].as_u64()),
        (Some(1), Some(64 << 20), Some(8))
    );
    let bad = lab.ctl_output(&["guest", "add", "f", "--vpc", "blue", "--address", "10.10.0.7", "--max-channels", "0"]);
    assert!(!bad.unwrap().status.success(), "quotas of a live guest are validated");
    let go_e = lab.dir.join("go-e").display().to_string();
    let log = hold(&mut lab, "e", "10.10.0.3", "1", &go_e, "hold-e.log");
    assert!(log.contains("held 1\n") && log.contains(&format!("extra errno {EADDRNOTAVAIL}\n")), "{log}");
    let three = wait_until(Duration::from_secs(10), || lab.counter("b", "connections_live") == 3);
    assert!(three, "b holds a's 2 and e's 1: {:?}", lab.guest("b"));

    // b leaves the group: every held connection to it is reset, and each
    // gives its charge back once, when the reaper retires it.
    let out = ctl_ok(&lab, &["member", "remove", "b", "open"]);
    assert!(out.contains("3 connection(s) reset"), "{out}");
    wait_given_back(&lab, "a");
    wait_given_back(&lab, "e");
    wait_given_back(&lab, "b");
    ctl_ok(&lab, &["member", "add", "b", "open"]);
    std::fs::write(&go_a, b"").unwrap();
    std::fs::write(&go_e, b"").unwrap();
    assert!(wait_log(&lab, "hold-a.log", "again").contains("again connected\n"));
    assert!(wait_log(&lab, "hold-e.log", "again").contains("again connected\n"));
    wait_given_back(&lab, "a");
    wait_given_back(&lab, "e");
    wait_given_back(&lab, "b");
    drop(netns);
}
