//! PostgreSQL's accept loop: a blocking listening socket, signals
//! unblocked only around select, SIGCHLD, a fork per connection. A
//! blocking accept must never become a sleep on the kernel socket alone
//! while vSocket clients wait.

use vsocket_e2e::{asset, compile, Lab, Via, TWO_GUESTS};

/// Clients at once, per wave: more than the server's descriptors hold.
const CLIENTS: &str = "24";
/// Each client's deadline for connect, send and reply, in seconds: a hung
/// accept fails the test instead of hanging it.
const CLIENT_TIMEOUT_S: &str = "10";

#[test]
fn a_postmaster_out_of_descriptors_serves_every_waiting_client() {
    let mut lab = Lab::start("tpostmaster", TWO_GUESTS).unwrap();
    let server = compile("postmaster.c", &lab.dir).unwrap();
    let server = server.to_str().unwrap();
    let burst = asset("burst.py");
    let burst = burst.to_str().unwrap();
    // RLIMIT_NOFILE 40 and children that hold their connection 300 ms: a
    // wave of 24 clients runs the parent out of descriptors, so accept
    // fails with EMFILE until children are reaped.
    for (via, port) in [(Via::Kernel, "7500"), (Via::Vsocket, "7501")] {
        lab.spawn("b", via, server, &["10.10.0.3", port, "40", "300"], &format!("postmaster-{port}.log")).unwrap();
        lab.wait_listening("b", port.parse().unwrap()).unwrap();
        let out = lab.run("a", via, "python3", &[burst, "10.10.0.3", port, "3", CLIENTS, CLIENT_TIMEOUT_S]).unwrap();
        let log = std::fs::read_to_string(lab.dir.join(format!("postmaster-{port}.log"))).unwrap_or_default();
        assert!(
            out.status.success(),
            "{via:?}: {}{}\nserver log:\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if via == Via::Vsocket {
            // The clients waited while accept failed for want of descriptors.
            assert!(log.contains("accept: Too many open files"), "the server never ran out:\n{log}");
        }
    }
    assert_eq!(lab.counter("a", "fallbacks"), 0);
    assert_eq!(lab.counter("b", "connections_in"), 72);
}
