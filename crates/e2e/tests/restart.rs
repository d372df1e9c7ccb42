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
