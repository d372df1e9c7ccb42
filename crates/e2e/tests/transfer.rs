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
