//! vsocketd restarted under running programs: established connections keep
//! flowing, and a running server takes vSocket connections again by itself.

use std::time::{Duration, Instant};
use vsocket_e2e::{redis_benchmark_rates, wait_until, Lab, Via, TWO_GUESTS};

const SERVER: &[&str] =
    &["--port", "6379", "--bind", "10.10.0.3", "--save", "", "--appendonly", "no", "--protected-mode", "no"];

fn cli(lab: &Lab, args: &[&str]) -> String {
    let mut full = vec!["-h", "10.10.0.3", "-p", "6379"];
    full.extend_from_slice(args);
    lab.run_ok("a", Via::Vsocket, "redis-cli", &full).unwrap().trim().to_string()
}

/// The first guest's vSocket connections so far, or 0 while the daemon is
/// not answering.
fn brokered(lab: &Lab) -> u64 {
    lab.guest("b").ok().and_then(|b| b["connections_in"].as_u64()).unwrap_or(0)
}

#[test]
fn a_server_takes_vsocket_connections_again_after_a_daemon_crash() {
    let mut lab = Lab::start("trestart", TWO_GUESTS).unwrap();
    lab.spawn("b", Via::Vsocket, "redis-server", SERVER, "redis.log").unwrap();
    lab.wait_listening("b", 6379).unwrap();
    assert_eq!(cli(&lab, &["set", "k", "before"]), "OK");
    assert_eq!(brokered(&lab), 1);

    // One connection established before the crash and used across it:
    // 60 INCRs, one every 50 ms, on one connection.
    let mut steady = lab
        .command("a", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "-r", "60", "-i", "0.05", "incr", "steady"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    lab.kill_daemon();
    std::thread::sleep(Duration::from_millis(300));
    lab.start_daemon().unwrap();
    let restarted = Instant::now();

    // The server is back on the fast path within a bounded time, with no
    // help from it: a client's connect is brokered again.
    let back = wait_until(Duration::from_secs(5), || cli(&lab, &["get", "k"]) == "before" && brokered(&lab) >= 1);
    let took = restarted.elapsed();
    assert!(back, "no connection was brokered after the restart; daemon log:\n{}", lab.daemon_log());
    eprintln!("re-attached {} ms after the daemon restarted", took.as_millis());

    assert!(steady.wait().unwrap().success(), "the established connection broke");
    assert_eq!(cli(&lab, &["get", "steady"]), "60", "every INCR on the established connection landed once");

    let fallbacks_before = lab.counter("a", "fallbacks");
    let out = lab
        .run_ok("a", Via::Vsocket, "redis-benchmark", &["-h", "10.10.0.3", "-t", "get", "-n", "5000", "-c", "10", "-q"])
        .unwrap();
    assert_eq!(redis_benchmark_rates(&out).len(), 1, "benchmark output: {out}");
    assert!(brokered(&lab) >= 10, "the benchmark's clients were brokered: {}", lab.guest("b").unwrap());
    assert_eq!(lab.counter("a", "fallbacks"), fallbacks_before, "no client fell back to the kernel");
}

/// Every flow record written so far (by every daemon of the lab).
fn flow_records(lab: &Lab) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(lab.dir.join("flow.log")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).expect(l)).collect()
}

/// redis-server's count of the connections it accepted (this query's own
/// included).
fn accepted_by_redis(lab: &Lab) -> u64 {
    let info = cli(lab, &["info", "stats"]);
    let line = info.lines().find(|l| l.starts_with("total_connections_received:")).unwrap();
    line.trim().split(':').nth(1).unwrap().parse().unwrap()
}

#[test]
fn an_upgrade_costs_no_connect_and_no_connection() {
    // (The metrics port is one the successor can only bind once the old
    // daemon is gone.)
    let host = "flow_log = \"{dir}/flow.log\"\nmetrics = \"127.0.0.1:19477\"";
    let mut lab = Lab::start_host("tupgrade", TWO_GUESTS, host).unwrap();
    lab.spawn("b", Via::Vsocket, "redis-server", SERVER, "redis.log").unwrap();
    lab.wait_listening("b", 6379).unwrap();
    assert_eq!(cli(&lab, &["ping"]), "PONG");

    // One connection made before the upgrade and used across it...
    let mut steady = lab
        .command("a", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "-r", "60", "-i", "0.05", "incr", "steady"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // ...and a new connection for every request, made all through it.
    let churn = lab
        .command(
            "a",
            Via::Vsocket,
            "redis-benchmark",
            &["-h", "10.10.0.3", "-t", "ping", "-n", "3000", "-c", "2", "-k", "0", "-q"],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    lab.upgrade_daemon().unwrap();

    let churned = churn.wait_with_output().unwrap();
    assert!(churned.status.success(), "{churned:?}");
    assert!(steady.wait().unwrap().success(), "the established connection broke");
    assert_eq!(cli(&lab, &["get", "steady"]), "60", "every INCR on the established connection landed once");
    let log = lab.daemon_log();
    assert!(log.contains("handed over to the next vsocketd"), "{log}");
    assert!(log.contains("taken over from the previous vsocketd"), "{log}");
    let metrics = std::process::Command::new("curl").args(["-sSf", "http://127.0.0.1:19477/metrics"]).output().unwrap();
    assert!(metrics.status.success(), "the new daemon serves metrics: {log}");

    // Every connection redis-server ever accepted was brokered by one
    // daemon or the other (none took the kernel path), and none fell back.
    let accepted = accepted_by_redis(&lab);
    let attempts = |records: &[serde_json::Value], verdict: &str| {
        records
            .iter()
            .filter(|r| r["event"] == "attempt" && r["server"] == "10.10.0.3:6379" && r["verdict"] == verdict)
            .count() as u64
    };
    // (The flow log is written a moment after each connect.)
    wait_until(Duration::from_secs(5), || attempts(&flow_records(&lab), "accepted") >= accepted);
    let records = flow_records(&lab);
    assert_eq!(attempts(&records, "fallback"), 0, "connects fell back to the kernel path");
    assert!(accepted > 1000, "the benchmark's connections: {accepted}");
    assert_eq!(attempts(&records, "accepted"), accepted, "every connection redis-server accepted was brokered");

    // The established connection is metered whole, once: 60 INCRs of 26
    // bytes, and 60 replies (":1\r\n" to ":9\r\n", then two digits).
    let steady = |records: &[serde_json::Value]| -> Vec<serde_json::Value> {
        records.iter().filter(|r| r["event"] == "close" && r["bytes_client_to_server"] == 60 * 26).cloned().collect()
    };
    wait_until(Duration::from_secs(5), || !steady(&flow_records(&lab)).is_empty());
    let steady_closes = steady(&flow_records(&lab));
    assert_eq!(steady_closes.len(), 1, "{steady_closes:#?}");
    assert_eq!(steady_closes[0]["bytes_server_to_client"], 9 * 4 + 51 * 5, "{:#?}", steady_closes[0]);
}

#[test]
fn a_stopped_daemon_costs_a_connect_its_reply_timeout_not_a_hang() {
    let mut lab = Lab::start("tstopped", TWO_GUESTS).unwrap();
    lab.spawn("b", Via::Vsocket, "redis-server", SERVER, "redis.log").unwrap();
    lab.wait_listening("b", 6379).unwrap();
    assert_eq!(cli(&lab, &["ping"]), "PONG");
    assert_eq!(brokered(&lab), 1);

    // A daemon that stops answering (SIGSTOP: as if wedged).
    let pid = lab.daemon_pid().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let probe = "import socket,sys\ns=socket.create_connection(('10.10.0.3', 6379), timeout=60)\ns.sendall(b'PING\\r\\n')\nprint(s.recv(16).decode().strip())\n";
    let started = Instant::now();
    let out = lab.run("a", Via::Vsocket, "python3", &["-c", probe]);
    let took = started.elapsed();
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    let out = out.unwrap();
    // The connect waited for the reply its timeout (15 s), then took the
    // kernel path, and the program did not notice but for the wait.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "+PONG", "{out:?}");
    assert!(took >= Duration::from_secs(14) && took < Duration::from_secs(40), "the connect took {took:?}");

    // The daemon, going again, brokers the next connect.
    assert_eq!(cli(&lab, &["ping"]), "PONG");
    assert_eq!(brokered(&lab), 2);
}
