//! fork: connections shared by a parent and its child.

use vsocket_e2e::{asset, Lab, Via, TWO_GUESTS};

#[test]
fn a_child_serves_the_connection_its_parent_closed() {
    let mut lab = Lab::start("tfork", TWO_GUESTS).unwrap();
    let script = asset("forkserve.py");
    let script = script.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", "7400", "3"], "server.log").unwrap();
    lab.wait_listening("b", 7400).unwrap();
    for _ in 0..3 {
        // The parent's close must not end the stream the child still serves.
        let reply = lab.run_ok("a", Via::Vsocket, "python3", &[script, "client", "10.10.0.3", "7400"]).unwrap();
        assert_eq!(reply.trim(), "child:hello");
    }
    assert_eq!(lab.counter("b", "connections_in"), 3);
}

#[test]
fn parent_and_child_use_one_connection_in_turn() {
    let mut lab = Lab::start("tforkturns", TWO_GUESTS).unwrap();
    let echo = asset("kernel_echo.py");
    lab.spawn("b", Via::Vsocket, "python3", &[echo.to_str().unwrap(), "10.10.0.3", "7410"], "echo.log").unwrap();
    lab.wait_listening("b", 7410).unwrap();
    let turns = asset("forkturns.py");
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[turns.to_str().unwrap(), "10.10.0.3", "7410"]).unwrap();
    assert_eq!(out.trim(), "turns ok");
    assert_eq!(lab.counter("a", "connections_out"), 3);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

#[test]
fn a_child_forked_while_another_thread_connects_can_connect() {
    // The thread that connects holds the process's request channel while
    // it waits for the daemon's reply; a child forked then must not find
    // it locked for ever (its first connect hung, in about half the forks).
    let mut lab = Lab::start("tforkconn", TWO_GUESTS).unwrap();
    let echo = asset("selectors_echo.py");
    lab.spawn("b", Via::Vsocket, "python3", &[echo.to_str().unwrap(), "serve", "10.10.0.3", "7420"], "echo.log")
        .unwrap();
    lab.wait_listening("b", 7420).unwrap();
    let script = asset("fork_while_connecting.py");
    let args = ["-W", "ignore", script.to_str().unwrap(), "10.10.0.3", "7420", "40"];
    let out = lab.run_ok("a", Via::Vsocket, "python3", &args).unwrap();
    assert_eq!(out.trim(), r#"{"forks": 40, "hung": 0, "failed": 0}"#);
    assert!(lab.counter("a", "connections_out") >= 40);
}
