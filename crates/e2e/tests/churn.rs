//! Connection churn: thousands of short connections, each one's bytes
//! checked, from two client processes at once. Released segments are
//! reused between the same two processes (never across pairs), so this is
//! also the test that a reused segment starts clean and that two pairs
//! never share one.

use std::process::Stdio;
use std::time::Duration;
use vsocket_e2e::{asset, wait_until, Lab, Via, TWO_GUESTS};

#[test]
fn thousands_of_short_connections_arrive_intact() {
    let mut lab = Lab::start("tchurn", TWO_GUESTS).unwrap();
    let churn = asset("churn.py");
    let churn = churn.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[churn, "serve", "10.10.0.3", "7500"], "server.log").unwrap();
    lab.wait_listening("b", 7500).unwrap();
    // Two clients at once: two pairs of processes, each reusing its own
    // segments.
    let other = lab
        .command("a", Via::Vsocket, "python3", &[churn, "run", "10.10.0.3", "7500", "1500", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[churn, "run", "10.10.0.3", "7500", "1500", "1"]).unwrap();
    assert!(out.starts_with("churn ok 1500 "), "{out}");
    let other = other.wait_with_output().unwrap();
    let other_out = String::from_utf8_lossy(&other.stdout);
    assert!(other.status.success() && other_out.starts_with("churn ok 1500 "), "{other_out}");
    assert_eq!(lab.counter("a", "connections_out"), 3000);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
    let status = lab.ctl("status").unwrap();
    let reused = status["segments_reused"].as_u64().unwrap();
    let created = status["segments_created"].as_u64().unwrap();
    assert!(reused > 2000, "only {reused} of 3000 connections reused a segment ({created} created)");
}

/// Segments kept for reuse between two processes are dropped when either
/// is gone: a server that outlives many short-lived client processes (a
/// client per request, as cron jobs, CGI or `redis-cli` make) must not
/// collect segments for pairs that will never connect again.
#[test]
fn client_processes_that_exited_leave_no_segments_kept() {
    let mut lab = Lab::start("tchurnexit", TWO_GUESTS).unwrap();
    let churn = asset("churn.py");
    let churn = churn.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[churn, "serve", "10.10.0.3", "7500"], "server.log").unwrap();
    lab.wait_listening("b", 7500).unwrap();
    let clients = 10;
    for seed in 0..clients {
        let out =
            lab.run_ok("a", Via::Vsocket, "python3", &[churn, "run", "10.10.0.3", "7500", "3", &seed.to_string()]);
        assert!(out.unwrap().starts_with("churn ok 3 "));
    }
    assert_eq!(lab.counter("a", "connections_out"), 3 * clients);
    // The reaper retires a finished connection within a few of its rounds.
    let mut kept = u64::MAX;
    let gone = wait_until(Duration::from_secs(5), || {
        kept = lab.ctl("status").unwrap()["segments_kept"].as_u64().unwrap();
        kept == 0
    });
    assert!(gone, "{kept} segments are kept for the {clients} client processes that exited");
}
