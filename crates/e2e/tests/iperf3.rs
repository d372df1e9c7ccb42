//! iperf3 (select, non-blocking sockets, a control and a data connection).

use vsocket_e2e::{Lab, Via, TWO_GUESTS};

#[test]
fn iperf3_over_vsocket() {
    let mut lab = Lab::start("tiperf", TWO_GUESTS).unwrap();
    lab.spawn("b", Via::Vsocket, "iperf3", &["-s", "-B", "10.10.0.3", "-p", "5201", "-1"], "server.log").unwrap();
    lab.wait_listening("b", 5201).unwrap();
    let out = lab.run_ok("a", Via::Vsocket, "iperf3", &["-c", "10.10.0.3", "-p", "5201", "-t", "2", "-J"]).unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap();
    assert!(received > 10 << 20, "only {received} bytes");
    assert!(report["error"].is_null(), "{}", report["error"]);
    // Control and data connections both went over vSocket, carrying at
    // least what iperf3 counted.
    assert!(lab.counter("a", "connections_out") >= 2);
    assert!(lab.counter("b", "bytes_received") >= received);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}
