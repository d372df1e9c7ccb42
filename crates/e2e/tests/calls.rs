//! One focused check per intercepted call (assets/calls.c), run first over
//! the kernel path (so the checks themselves are known to describe Linux
//! TCP) and then over vSocket.

use std::process::Command;
use vsocket_e2e::{asset, Lab, Via, TWO_GUESTS};

/// Every check calls.c makes; each must print "ok NAME" on both paths.
pub const CHECKS: &[&str] = &[
    "connect_nonblocking",
    "ppoll_writable_after_connect",
    "so_error",
    "getpeername",
    "getsockname",
    "so_type",
    "tcp_nodelay",
    "so_keepalive",
    "so_rcvbuf",
    "accept4_flags",
    "accept_inherits_listener_options",
    "writev",
    "readv",
    "send",
    "fionread",
    "recv_peek",
    "recv_waitall",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "recv_dontwait_empty",
    "fcntl_nonblock",
    "write_after_reset",
    "so_rcvtimeo_before_connect",
    "fcntl_nonblock_before_connect",
    "fionbio_before_connect",
    "fcntl_nonblock_cleared_before_connect",
    "fionbio_cleared_before_connect",
    "nonblock_through_dup_before_connect",
    "sock_nonblock_connect",
    "select_timeout",
    "pselect_readable",
    "poll_readable_writable",
    "epoll_level",
    "epoll_level_drained",
    "epoll_edge",
    "epoll_edge_new_data",
    "epoll_oneshot",
    "epoll_pwait_writable",
    "epoll_pwait2",
    "epoll_del",
    "eof_after_shutdown_wr",
    "epoll_rdhup",
    "half_close_data_then_eof",
    "write_after_peer_half_close",
    "eof_on_peer_close",
    "epipe_nosignal",
    "sigpipe",
    "econnreset",
    "waitall_paced",
    "epoll_shutdown_rd_with_others",
    "shutdown_rd",
    "so_linger_zero_resets",
    "msg_more",
    "tcp_cork",
    "sendmmsg",
    "recvmmsg",
    "recvmmsg_waitforone",
    "recvmmsg_empty",
    "splice_pipe_to_socket",
    "splice_empty_pipe_nonblock",
    "splice_socket_to_pipe",
    "splice_socket_to_full_pipe",
    "splice_offset_on_socket",
    "epoll_two_sets",
    "epoll_nested",
    "epoll_exclusive",
    "high_fd_70000",
    "high_fd_150000",
    "threads_write_records",
    "threads_blocked_readers",
];

/// Checks that may be skipped when the machine cannot run them (the line
/// says why); every other check must pass.
const SKIPPABLE: &[(&str, &str)] = &[("high_fd_70000", "high_fd"), ("high_fd_150000", "high_fd")];

#[test]
fn every_intercepted_call_behaves_as_linux_tcp() {
    let mut lab = Lab::start("tcalls", TWO_GUESTS).unwrap();
    let program = lab.dir.join("calls");
    // Fortified, with 64-bit file offsets: the program calls __read_chk,
    // __recv_chk, __recvfrom_chk, __poll_chk and fcntl64, as distribution
    // builds of real programs do.
    let status = Command::new("cc")
        .args(["-O2", "-D_FORTIFY_SOURCE=2", "-D_FILE_OFFSET_BITS=64", "-Wall", "-Wno-unused-result", "-pthread", "-o"])
        .arg(&program)
        .arg(asset("calls.c"))
        .status()
        .unwrap();
    assert!(status.success(), "cannot compile calls.c");
    let symbols = Command::new("nm").arg("-D").arg(&program).output().unwrap();
    let symbols = String::from_utf8_lossy(&symbols.stdout);
    for symbol in ["__read_chk", "__recv_chk", "__recvfrom_chk", "__poll_chk", "fcntl64"] {
        assert!(symbols.contains(symbol), "calls does not use {symbol}");
    }
    let program = program.to_str().unwrap().to_string();
    for (via, port) in [(Via::Kernel, "7001"), (Via::Vsocket, "7002")] {
        lab.spawn("b", via, &program, &["server", "10.10.0.3", port], &format!("server-{port}.log")).unwrap();
        lab.wait_listening("b", port.parse().unwrap()).unwrap();
        let out = lab.run("a", via, &program, &["client", "10.10.0.3", port]).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        for check in CHECKS {
            let skipped = SKIPPABLE
                .iter()
                .any(|(c, group)| c == check && stdout.lines().any(|l| l.starts_with(&format!("skip {group}: "))));
            assert!(
                skipped || stdout.lines().any(|l| l == format!("ok {check}")),
                "{via:?}: check {check} did not pass:\n{stdout}"
            );
        }
        assert!(out.status.success() && stdout.contains("0 failed"), "{via:?}:\n{stdout}");
    }
    // The vSocket run used vSocket for all its connections.
    assert_eq!(lab.counter("a", "connections_out"), 19);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}
