//! A gigabyte in random chunk sizes, both ends on epoll, checksummed.

use vsocket_e2e::{asset, Lab, Via, TWO_GUESTS};

#[test]
fn one_gibibyte_arrives_intact() {
    const BYTES: u64 = 1 << 30;
    let mut lab = Lab::start("txfer", TWO_GUESTS).unwrap();
    let script = asset("transfer.py");
    let script = script.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7000"], "server.log").unwrap();
    lab.wait_listening("b", 7000).unwrap();
    let sent = lab
        .run_ok("a", Via::Vsocket, "python3", &[script, "send", "10.10.0.3", "7000", &BYTES.to_string(), "12345"])
        .unwrap();
    lab.stop_background();
    let received = std::fs::read_to_string(lab.dir.join("server.log")).unwrap();
    assert_eq!(sent.trim(), format!("bytes={BYTES} sha256={}", digest_of(&sent)));
    assert_eq!(received.trim(), sent.trim(), "server saw something else");
    assert!(lab.counter("b", "bytes_received") >= BYTES);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

fn digest_of(line: &str) -> &str {
    line.trim().rsplit("sha256=").next().unwrap()
}

/// Connections that fall quiet have their rings' data pages given back
/// (ARCHITECTURE §3c, stage 5), and talk again without losing a byte:
/// twenty connections (all but the first made ahead, as kits), four
/// rounds of echoes up to 200 KB each (across the rings' wrap), a second
/// of quiet after each.
#[test]
fn quiet_connections_give_their_pages_back_and_lose_no_byte() {
    const CONNECTIONS: u64 = 20;
    let mut lab = Lab::start("tquiet", TWO_GUESTS).unwrap();
    let holder = asset("memhold.py");
    let holder = holder.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[holder, "server", "10.10.0.3", "7000", "idle"], "server.log").unwrap();
    lab.wait_listening("b", 7000).unwrap();
    let script = asset("idle_rounds.py");
    let out = lab
        .run_ok("a", Via::Vsocket, "python3", &[script.to_str().unwrap(), "10.10.0.3", "7000", "20", "4", "1.0"])
        .unwrap();
    assert!(out.trim_end().ends_with("{\"ok\": 4}"), "{out}");
    let trimmed = lab.ctl("status").unwrap()["rings_trimmed"].as_u64().unwrap();
    // Each ring at rest at least once in four quiet seconds (a pass every
    // quarter second gives a ring's pages back once it stayed empty a
    // whole pass).
    assert!(trimmed >= 2 * CONNECTIONS, "{trimmed} rings given back");
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}
