//! Signals interrupting blocking calls (EINTR, SA_RESTART) and sockets
//! that outlive exec (assets/signals.c), run first over the kernel path, so
//! each check is known to describe Linux, then over vSocket.

use vsocket_e2e::{compile, Lab, Via, TWO_GUESTS};

/// Checks made before the exec, on both paths.
const CHECKS: &[&str] = &[
    "eintr_without_sa_restart",
    "sa_restart_read",
    "sa_restart_siginfo_handler",
    "sa_restart_with_rcvtimeo_gives_eintr",
    "signal_restarts",
    "sigaction_reports_the_program_s_handler",
    "signal_returns_the_previous_handler",
    "sa_resethand",
    "sa_restart_accept",
    "jdk_dup2_wakes_a_blocked_reader",
];

#[test]
fn signals_and_exec_behave_as_on_linux() {
    let mut lab = Lab::start("tsig", TWO_GUESTS).unwrap();
    let program = compile("signals.c", &lab.dir).unwrap();
    let program = program.to_str().unwrap().to_string();
    for (via, port) in [(Via::Kernel, "7011"), (Via::Vsocket, "7013")] {
        lab.spawn("b", via, &program, &["server", "10.10.0.3", port], &format!("server-{port}.log")).unwrap();
        lab.wait_listening("b", port.parse().unwrap()).unwrap();
        let out = lab.run("a", via, &program, &["client", "10.10.0.3", port]).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        for check in CHECKS {
            assert!(stdout.lines().any(|l| l == format!("ok {check}")), "{via:?}: {check} did not pass:\n{stdout}");
        }
        // The connection crosses exec (execl) and keeps working, as on Linux.
        assert!(stdout.contains("exec_state=works"), "{via:?}:\n{stdout}");
        assert!(out.status.success() && stdout.contains("0 failed"), "{via:?}:\n{stdout}");
    }
    // Over vSocket: six connections to the server for the signal checks,
    // the loopback one for accept, the JDK-style close and its query, the
    // one that crosses exec and its query.
    assert_eq!(lab.counter("a", "connections_out"), 11);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}
