//! exec: a connected vSocket descriptor that a program hands to a program
//! it execs (inetd-style servers, `socat EXEC:`, a shell giving a child
//! its stdin) keeps working there, over vSocket, without the new
//! program's cooperation.

use vsocket_e2e::{asset, Lab, Via, TWO_GUESTS};

const BYTES: &str = "3000000";

/// Checks an echo through the server at `port` of guest b, from guest a.
fn echo_checks(lab: &Lab, port: &str, seed: &str) {
    let script = asset("execserve.py");
    let out = lab
        .run_ok("a", Via::Vsocket, "python3", &[script.to_str().unwrap(), "check", "10.10.0.3", port, BYTES, seed])
        .unwrap();
    assert_eq!(out.trim(), format!("sent={BYTES} received={BYTES} match=yes"), "port {port}");
}

#[test]
fn socat_exec_serves_each_connection_from_the_program_it_runs() {
    let mut lab = Lab::start("texecsocat", TWO_GUESTS).unwrap();
    lab.spawn("b", Via::Vsocket, "socat", &["TCP-LISTEN:7501,reuseaddr,fork", "EXEC:/bin/cat"], "socat.log").unwrap();
    lab.wait_listening("b", 7501).unwrap();
    for seed in ["1", "2"] {
        echo_checks(&lab, "7501", seed);
    }
    // An exec that fails leaves the caller its connection as it was.
    let script = asset("execserve.py");
    let out =
        lab.run_ok("a", Via::Vsocket, "python3", &[script.to_str().unwrap(), "failexec", "10.10.0.3", "7501"]).unwrap();
    assert_eq!(out.trim(), "exec failed with errno 2; echo still here");
    assert_eq!(lab.counter("b", "connections_in"), 3);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

#[test]
fn an_inetd_style_server_hands_connections_to_programs_it_execs() {
    let mut lab = Lab::start("texecinetd", TWO_GUESTS).unwrap();
    let script = asset("execserve.py");
    let script = script.to_str().unwrap();
    // fork then execv; subprocess (vfork then execve); and a server that
    // keeps its connection while a vfork child closes every descriptor
    // from 3 up and execs.
    for (mode, port) in [("fork", "7511"), ("spawn", "7512"), ("keep", "7513")] {
        lab.spawn("b", Via::Vsocket, "python3", &[script, "serve", "10.10.0.3", port, mode, "/bin/cat"], "serve.log")
            .unwrap();
        lab.wait_listening("b", port.parse().unwrap()).unwrap();
        for seed in ["3", "4"] {
            echo_checks(&lab, port, seed);
        }
    }
    assert_eq!(lab.counter("b", "connections_in"), 6);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

#[test]
fn a_connection_made_ahead_crosses_exec_with_its_piece_of_a_chunk() {
    // The third connect of a process takes a kit, whose memory is a piece
    // of a chunk: the new program image gets the chunk's files and the
    // piece's offset from the daemon (`ReattachedAt`) and maps that piece.
    let mut lab = Lab::start("texeckit", TWO_GUESTS).unwrap();
    let echo = asset("selectors_echo.py");
    lab.spawn("b", Via::Vsocket, "python3", &[echo.to_str().unwrap(), "serve", "10.10.0.3", "7531"], "echo.log")
        .unwrap();
    lab.wait_listening("b", 7531).unwrap();
    let script = asset("execserve.py");
    let args = [script.to_str().unwrap(), "kitexec", "10.10.0.3", "7531", BYTES, "6"];
    let out = lab.run_ok("a", Via::Vsocket, "python3", &args).unwrap();
    assert_eq!(out.trim(), format!("sent={BYTES} received={BYTES} match=yes"));
    assert!(lab.ctl("status").unwrap()["kit_chunks"].as_u64().unwrap() >= 1, "kits were made");
    assert_eq!(lab.counter("a", "connections_out"), 3);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

#[test]
fn a_shell_gives_a_program_it_execs_its_connection_on_stdin() {
    let mut lab = Lab::start("texecsh", TWO_GUESTS).unwrap();
    let script = asset("execserve.py");
    let script = script.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[script, "give", "10.10.0.3", "7521", BYTES, "5"], "give.log").unwrap();
    lab.wait_listening("b", 7521).unwrap();
    let expected = lab.run_ok("a", Via::Kernel, "python3", &[script, "digest", BYTES, "5"]).unwrap();
    // bash connects (/dev/tcp) and runs cat with the socket as its stdin:
    // the bytes are read by the program bash execs. (cat reads with
    // read(2); a program reading through stdio would not be served, as
    // glibc's stdio reads with an internal call the library cannot see.)
    let command = "exec 3<>/dev/tcp/10.10.0.3/7521; cat <&3 | sha256sum";
    let out = lab.run_ok("a", Via::Vsocket, "bash", &["-c", command]).unwrap();
    assert_eq!(out.split_whitespace().next(), Some(expected.trim()), "{out}");
    assert_eq!(lab.counter("a", "connections_out"), 1);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}
