//! sockperf server and clients, unmodified, between two guests.

use vsocket_e2e::{sockperf_ping_pong, Lab, Via, TWO_GUESTS};

#[test]
fn sockperf_ping_pong_and_throughput_over_vsocket() {
    let mut lab = Lab::start("tsock", TWO_GUESTS).unwrap();
    lab.spawn(
        "b",
        Via::Vsocket,
        "sockperf",
        &["server", "--tcp", "-i", "10.10.0.3", "-p", "11111", "-m", "65536"],
        "server.log",
    )
    .unwrap();
    lab.wait_listening("b", 11111).unwrap();

    let (out, lat) = sockperf_ping_pong(&lab, "a", Via::Vsocket).unwrap();
    assert!(lat.p50 > 0.0 && lat.p50 <= lat.p99, "{lat:?}");
    assert!(out.contains("# dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0"), "{out}");
    let after_pingpong = lab.counter("a", "bytes_sent");
    assert!(after_pingpong > 64 * 1000, "ping-pong bytes went elsewhere: {after_pingpong}");

    let out = lab
        .run_ok(
            "a",
            Via::Vsocket,
            "sockperf",
            &["throughput", "--tcp", "-i", "10.10.0.3", "-p", "11111", "-t", "2", "-m", "65536"],
        )
        .unwrap();
    let rate_line = out.lines().find(|l| l.contains("Summary: Message Rate is")).unwrap_or_else(|| panic!("{out}"));
    let rate: f64 =
        rate_line.split("Message Rate is").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(rate > 0.0);
    let sent = lab.counter("a", "bytes_sent") - after_pingpong;
    // At least the messages sockperf counted went through the rings.
    assert!(sent as f64 >= rate * 65536.0, "sent {sent} bytes, sockperf reports {rate} msg/s of 64 KiB");
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}
