//! Grants and kits (ARCHITECTURE §3b), as vsocketd hands them out: both
//! ends are spoken raw on the control socket (`kits_protocol.py`), so
//! what is checked is the daemon's side of the protocol.

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use vsocket_e2e::{asset, wait_until, Lab, Via, ONE_PORT};

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// Connections the flow log at `log` records as made from kits.
fn kit_attempts(log: &Path) -> usize {
    lines(log)
        .iter()
        .filter(|r| r["event"] == "attempt" && r["decided_by"].as_str().is_some_and(|d| d.contains("; kit of grant ")))
        .count()
}

fn connections(lab: &Lab) -> usize {
    lab.ctl("connections").unwrap().as_array().unwrap().len()
}

/// A listener in guest `b` on 10.10.0.3:7000 that takes kits, spoken raw
/// (`kits_protocol.py listen`), registered.
struct RawListener {
    script: std::path::PathBuf,
    /// Guest `a`'s control socket, for a raw client.
    sock_a: String,
    /// Where the listener writes what the daemon sends it.
    server_out: std::path::PathBuf,
    /// Made to stop it.
    stop: std::path::PathBuf,
}

impl RawListener {
    fn start(lab: &mut Lab) -> RawListener {
        let script = asset("kits_protocol.py");
        let sock = |guest: &str| lab.run_dir.join("guests").join(format!("{guest}.sock")).to_str().unwrap().to_string();
        let (sock_a, sock_b) = (sock("a"), sock("b"));
        let (server_out, stop) = (lab.dir.join("server.jsonl"), lab.dir.join("stop"));
        let args = [
            script.to_str().unwrap(),
            "listen",
            &sock_b,
            "10.10.0.3",
            "7000",
            server_out.to_str().unwrap(),
            stop.to_str().unwrap(),
        ];
        lab.spawn("b", Via::Kernel, "python3", &args, "server.log").unwrap();
        assert!(wait_until(Duration::from_secs(10), || !lines(&server_out).is_empty()), "listener registered");
        RawListener { script, sock_a, server_out, stop }
    }
}

#[test]
fn a_grant_is_announced_when_taken_and_revoked_when_its_flow_is_denied() {
    let mut lab = Lab::start_host("tkits", ONE_PORT, "flow_log = \"{dir}/flow.log\"").unwrap();
    let RawListener { script, sock_a, server_out, stop } = RawListener::start(&mut lab);
    let script = script.to_str().unwrap();
    let steps = lab.dir.join("steps");
    std::fs::create_dir_all(&steps).unwrap();
    // ListenOkKits, with the listener's bell and kit channel.
    assert_eq!(lines(&server_out)[0], serde_json::json!({"kind": "registered", "reply": 15, "fds": 2}));

    let client_args = [script, "connect", &sock_a, "10.10.0.3", "7000", steps.to_str().unwrap()];
    lab.spawn("a", Via::Kernel, "python3", &client_args, "client.log").unwrap();
    let client_log = lab.dir.join("client.log");
    assert!(wait_until(Duration::from_secs(10), || !lines(&client_log).is_empty()), "client connected");
    let taken = &lines(&client_log)[0];
    // The first connect is an ordinary one; the second brings a grant's
    // batch: the connection, the queue and the bell, the batch's lifeline,
    // one chunk's two files, and a doorbell per kit.
    assert_eq!(taken["replies"][0], serde_json::json!({"kind": 2, "fds": 4}), "{taken}");
    let count = taken["count"].as_u64().unwrap();
    assert_eq!(taken["replies"][1]["kind"], 16, "{taken}");
    assert_eq!(taken["chunks"], 1, "{taken}");
    assert_eq!(taken["replies"][1]["fds"].as_u64().unwrap(), 6 + 1 + 2 + count, "{taken}");
    assert_eq!(count, 32);
    assert!(taken["claims"].as_array().unwrap().iter().all(|c| c == 0), "{taken}");
    // The server's ends went to the listener first, all waiting (the raw
    // listener may write its lines after the client wrote its own).
    let incoming = |lines: &[Value]| lines.iter().filter(|l| l["kind"] == "incoming").count();
    let announced = || {
        let server = lines(&server_out);
        server.iter().any(|l| l["kind"] == "kits") && incoming(&server) >= 2
    };
    assert!(wait_until(Duration::from_secs(5), announced), "{:?}", lines(&server_out));
    let server = lines(&server_out);
    let kits = server.iter().find(|l| l["kind"] == "kits").unwrap_or_else(|| panic!("{server:?}"));
    assert_eq!((&kits["grant"], &kits["first"], &kits["count"]), (&taken["grant"], &taken["first"], &taken["count"]));
    assert_eq!(kits["fds"].as_u64().unwrap(), 1 + 1 + 2 + count);
    assert_eq!(kits["client"], "10.10.0.2");
    assert_eq!(incoming(&server), 2, "{server:?}");

    // The kit the client took is announced at the next reap: two
    // connections and the kit, not the 31 kits left.
    assert!(wait_until(Duration::from_secs(5), || connections(&lab) == 3), "{:?}", lab.ctl("connections"));
    let conns = lab.ctl("connections").unwrap();
    assert!(conns.as_array().unwrap().iter().any(|c| c["client"] == "10.10.0.2:41000"), "{conns}");
    let log = lab.dir.join("flow.log");
    let kit_attempt = |records: &[Value]| {
        records
            .iter()
            .any(|r| r["event"] == "attempt" && r["client"] == "10.10.0.2:41000" && r["verdict"] == "accepted")
    };
    assert!(wait_until(Duration::from_secs(5), || kit_attempt(&lines(&log))), "{:?}", lines(&log));
    let attempts = lines(&log).iter().filter(|r| r["event"] == "attempt").count();
    assert_eq!(attempts, 3, "two connects and one kit taken: {:?}", lines(&log));
    // Every kit is charged to both guests' quotas when it is made; only
    // the one taken counts as a connection made.
    let guests = lab.ctl("guests").unwrap();
    let guest = |name: &str| guests.as_array().unwrap().iter().find(|g| g["name"] == name).unwrap().clone();
    assert_eq!(guest("a")["connections_live"], 2 + count, "{guests}");
    assert_eq!(guest("b")["connections_live"], 2 + count, "{guests}");
    assert_eq!(guest("a")["connections_out"], 3, "{guests}");
    assert_eq!(guest("b")["connections_in"], 3, "{guests}");

    // Port 7000 no longer allowed: the grant ends before the change is
    // reported applied; every kit not taken is revoked, and the listener
    // is told.
    let out = lab.ctl_output(&["rule", "remove", "svc", "ingress", "tcp", "7000", "--cidr", "10.10.0.0/24"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(steps.join("check"), "").unwrap();
    assert!(wait_until(Duration::from_secs(5), || lines(&client_log).len() == 2), "client checked");
    let claims = lines(&client_log)[1]["claims"].clone();
    let claims: Vec<u64> = claims.as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).collect();
    // Every kit no server accepted is revoked (3): the one the client
    // took too (it is reset: no server will accept it now).
    assert!(claims.iter().all(|&c| c == 3), "{claims:?}");
    assert!(
        wait_until(Duration::from_secs(5), || lines(&server_out).iter().any(|l| l["kind"] == "revoke")),
        "{:?}",
        lines(&server_out)
    );

    // The client exits: its kits are retired, and only what was taken was
    // ever a connection (no flow log record for the 31 others).
    std::fs::write(steps.join("exit"), "").unwrap();
    std::fs::write(&stop, "").unwrap();
    assert!(wait_until(Duration::from_secs(10), || connections(&lab) == 0), "{:?}", lab.ctl("connections"));
    let settled = wait_until(Duration::from_secs(5), || {
        let guests = lab.ctl("guests").unwrap();
        guests.as_array().unwrap().iter().all(|g| g["connections_live"] == 0 && g["shared_memory"] == 0)
    });
    assert!(settled, "every kit's charge is back: {:?}", lab.ctl("guests"));
    let closes = || lines(&log).iter().filter(|r| r["event"] == "close").count();
    assert!(wait_until(Duration::from_secs(5), || closes() == 3), "{:?}", lines(&log));
    assert_eq!(lines(&log).iter().filter(|r| r["event"] == "attempt").count(), 3);
}

#[test]
fn a_connect_through_the_daemon_is_logged_after_the_kits_its_process_took_before_it() {
    let mut lab = Lab::start_host("tkitsorder", ONE_PORT, "flow_log = \"{dir}/flow.log\"").unwrap();
    let RawListener { script, sock_a, stop, .. } = RawListener::start(&mut lab);
    let script = script.to_str().unwrap();
    // Two connects (the second brings the batch), the batch's first kit
    // taken, and at once a third connect through the daemon: long before
    // a reap would read the kit's slot.
    let out = lab.run("a", Via::Kernel, "python3", &[script, "connect-again", &sock_a, "10.10.0.3", "7000"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let log = lab.dir.join("flow.log");
    let attempts = || lines(&log).into_iter().filter(|r| r["event"] == "attempt").collect::<Vec<Value>>();
    assert!(wait_until(Duration::from_secs(5), || attempts().len() == 4), "{:?}", lines(&log));
    // The flow log follows the client's connects: the kit (its port,
    // 41000) before the connect that came after it.
    let kit: Vec<bool> = attempts().iter().map(|r| r["client"] == "10.10.0.2:41000").collect();
    assert_eq!(kit, [false, false, true, false], "{:?}", attempts());
    std::fs::write(&stop, "").unwrap();
}

#[test]
fn a_library_from_before_the_take_word_chunks_or_kept_doorbells_gets_no_kits() {
    // A server from before the take word would never accept them (it
    // never sets the take word), one from before chunks would take a
    // kit's memory as two memfds of its own, and one from before kept
    // doorbells would read a batch's descriptors wrong: such a library
    // connects through the daemon, as a library without kits does.
    let mut lab = Lab::start_host("tkitsv1", ONE_PORT, "").unwrap();
    let RawListener { script, sock_a, server_out, stop } = RawListener::start(&mut lab);
    let script = script.to_str().unwrap();
    for (how, incoming) in [("connect-v1", 2), ("connect-v2", 4), ("connect-v3", 6)] {
        let out = lab.run("a", Via::Kernel, "python3", &[script, how, &sock_a, "10.10.0.3", "7000"]).unwrap();
        assert!(out.status.success(), "{out:?}");
        let said: Value = serde_json::from_slice(&out.stdout).unwrap();
        let plain = serde_json::json!({"kind": 2, "fds": 4});
        assert_eq!(said["replies"], serde_json::json!([plain, plain]), "{how}: {said}");
        assert!(wait_until(Duration::from_secs(5), || {
            lines(&server_out).iter().filter(|l| l["kind"] == "incoming").count() == incoming
        }));
    }
    assert!(!lines(&server_out).iter().any(|l| l["kind"] == "kits"), "{:?}", lines(&server_out));
    std::fs::write(&stop, "").unwrap();
}

#[test]
fn a_program_that_connects_again_and_again_takes_kits_and_every_connection_is_metered() {
    let host = "flow_log = \"{dir}/flow.log\"\ndeny_action = \"reject\"";
    let mut lab = Lab::start_host("tkitloop", ONE_PORT, host).unwrap();
    let connrate = vsocket_e2e::compile("connrate.c", &lab.dir).unwrap();
    let connrate = connrate.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, connrate, &["server", "10.10.0.3", "7000"], "server.log").unwrap();
    lab.wait_listening("b", 7000).unwrap();
    let script = asset("connect_loop.py");
    let step = lab.dir.join("step");
    let args = [script.to_str().unwrap(), "10.10.0.3", "7000", "300", step.to_str().unwrap(), "40"];
    lab.spawn("a", Via::Vsocket, "python3", &args, "client.log").unwrap();
    let client_log = lab.dir.join("client.log");
    assert!(wait_until(Duration::from_secs(60), || !lines(&client_log).is_empty()), "first phase done");
    assert_eq!(lines(&client_log)[0], serde_json::json!({"ok": 300}));

    // Every connection was announced (most as kits taken: a grant's first
    // connect and each refill go through the daemon), flow-logged once
    // and counted once.
    let log = lab.dir.join("flow.log");
    let attempts = || lines(&log).into_iter().filter(|r| r["event"] == "attempt").collect::<Vec<_>>();
    assert!(wait_until(Duration::from_secs(5), || attempts().len() == 300), "{} attempts", attempts().len());
    let from_kits =
        attempts().iter().filter(|r| r["decided_by"].as_str().is_some_and(|d| d.contains("; kit of grant "))).count();
    assert!(from_kits >= 250, "{from_kits} of 300 connections took kits");
    let mut ids: Vec<u64> = attempts().iter().map(|r| r["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 300, "each connection is logged once");
    assert!(attempts().iter().all(|r| !r["client"].as_str().unwrap().ends_with(":0")), "every port is known");
    let guests = lab.ctl("guests").unwrap();
    let guest = |name: &str| guests.as_array().unwrap().iter().find(|g| g["name"] == name).unwrap().clone();
    assert_eq!(guest("a")["connections_out"], 300, "{guests}");
    assert_eq!(guest("b")["connections_in"], 300, "{guests}");
    let closes = || lines(&log).iter().filter(|r| r["event"] == "close").count();
    assert!(wait_until(Duration::from_secs(5), || closes() == 300), "{} closes", closes());
    // Most kits after the first batches came in pieces whose two ends
    // kept the doorbell of the connection before (ARCHITECTURE §3c,
    // stage 6), and every connection made from them worked as any other.
    let reused = lab.ctl("status").unwrap()["doorbells_reused"].as_u64().unwrap();
    assert!(reused >= 100, "{reused} of 300 connections reused a kept doorbell");

    // The policy no longer allows the flow: the same process, which still
    // holds kits of its grant, is refused from its next connect on.
    let out = lab.ctl_output(&["rule", "remove", "svc", "ingress", "tcp", "7000", "--cidr", "10.10.0.0/24"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&step, "").unwrap();
    assert!(wait_until(Duration::from_secs(60), || lines(&client_log).len() == 2), "second phase done");
    assert_eq!(lines(&client_log)[1], serde_json::json!({"errno111": 40}));
    assert_eq!(attempts().len(), 340);
    assert_eq!(attempts().iter().filter(|r| r["verdict"] == "rejected").count(), 40);
}

/// A client that connects `n` times, writes to each connection and closes
/// it, then exits: all before its server accepts any.
const WRITE_AND_GO: &str = "import socket, sys
for i in range(int(sys.argv[1])):
    c = socket.create_connection(('10.10.0.3', 7000))
    c.sendall(b'm%02d' % i)
    c.close()
print('sent', flush=True)
";

#[test]
fn a_client_that_writes_and_exits_before_the_server_accepts_loses_nothing() {
    // As on the kernel path, where its connections wait in the backlog:
    // the kits the client took are connections made, not revoked when
    // its process (and its request channel) goes.
    for via in [Via::Kernel, Via::Vsocket] {
        let name = if via == Via::Kernel { "tkitgonek" } else { "tkitgone" };
        let mut lab = Lab::start_host(name, ONE_PORT, "flow_log = \"{dir}/flow.log\"").unwrap();
        let go = lab.dir.join("go");
        let go = go.to_str().unwrap();
        let late = asset("late_accept.py");
        lab.spawn("b", via, "python3", &[late.to_str().unwrap(), go, "12"], "server.log").unwrap();
        lab.wait_listening("b", 7000).unwrap();
        let out = lab.run("a", via, "python3", &["-c", WRITE_AND_GO, "12"]).unwrap();
        assert!(out.status.success(), "{out:?}");
        if via == Via::Vsocket {
            // The client's grant ended with its process, before any accept.
            let grants = || lab.ctl("listeners").unwrap()[0]["grants"].as_u64();
            assert!(wait_until(Duration::from_secs(5), || grants() == Some(0)), "{:?}", lab.ctl("listeners"));
            let log = lab.dir.join("flow.log");
            let kits = || kit_attempts(&log);
            assert!(wait_until(Duration::from_secs(5), || kits() >= 8), "{} of 12 took kits", kits());
        }
        std::fs::write(go, "").unwrap();
        let server_log = lab.dir.join("server.log");
        let read = || std::fs::read_to_string(&server_log).unwrap_or_default();
        let all: Vec<String> = (0..12).map(|i| format!("m{i:02}")).collect();
        assert!(wait_until(Duration::from_secs(20), || read().trim() == all.join(" ")), "{via:?}: {}", read());
    }
}

#[test]
fn an_accept_short_of_descriptors_leaves_the_kit_for_the_next() {
    let mut lab = Lab::start_host("tkitemfile", ONE_PORT, "flow_log = \"{dir}/flow.log\"").unwrap();
    let go = lab.dir.join("go");
    let go = go.to_str().unwrap();
    let late = asset("late_accept.py");
    lab.spawn("b", Via::Vsocket, "python3", &[late.to_str().unwrap(), go, "8", "cramped"], "server.log").unwrap();
    lab.wait_listening("b", 7000).unwrap();
    let out = lab.run("a", Via::Vsocket, "python3", &["-c", WRITE_AND_GO, "8"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    // The third connect on took kits.
    let log = lab.dir.join("flow.log");
    let kits = || kit_attempts(&log);
    assert!(wait_until(Duration::from_secs(5), || kits() >= 5), "{} of 8 took kits", kits());
    std::fs::write(go, "").unwrap();
    let server_log = lab.dir.join("server.log");
    let read = || std::fs::read_to_string(&server_log).unwrap_or_default();
    let all: Vec<String> = (0..8).map(|i| format!("m{i:02}")).collect();
    let expected = format!("emfile\nemfile\n{}\n", all.join(" "));
    assert!(wait_until(Duration::from_secs(20), || read() == expected), "{}", read());
}

/// Echoes each connection's first message and says which connection
/// ended when it ends.
const ECHO_AND_TELL: &str = "import select, socket
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('10.10.0.3', 7000))
l.listen(64)
names = {}
while True:
    ready, _, _ = select.select([l] + list(names), [], [])
    for s in ready:
        if s is l:
            names[l.accept()[0]] = None
            continue
        data = s.recv(100)
        if data:
            names[s] = data.decode()
            s.sendall(data)
        else:
            print('eof', names.pop(s), flush=True)
            s.close()
";

/// Connects `argv[1]` times and keeps every connection; a forked child
/// holds the last one and exits without closing it, after the parent
/// closed its own copy; the parent then holds the others `argv[2]`
/// seconds more.
const LAST_HOLDER_DIES: &str = "import os, socket, sys, time
kept = []
for i in range(int(sys.argv[1])):
    c = socket.create_connection(('10.10.0.3', 7000))
    c.sendall(b'c%02d' % i)
    assert c.recv(100) == b'c%02d' % i
    kept.append(c)
child = os.fork()
if child == 0:
    time.sleep(0.3)
    os._exit(0)
kept[-1].close()
os.waitpid(child, 0)
print('child gone', flush=True)
time.sleep(float(sys.argv[2]))
";

#[test]
fn a_kit_connection_whose_last_holder_dies_without_closing_it_ends_for_its_peer() {
    // As on the kernel path, where the socket's last descriptor closes
    // with the child: the server sees that one connection end while the
    // client's parent still holds the others, made ahead in the same
    // batches (one end of stream per connection, not per batch).
    for via in [Via::Kernel, Via::Vsocket] {
        let name = if via == Via::Kernel { "tkitdiek" } else { "tkitdie" };
        let mut lab = Lab::start_host(name, ONE_PORT, "flow_log = \"{dir}/flow.log\"").unwrap();
        lab.spawn("b", via, "python3", &["-c", ECHO_AND_TELL], "server.log").unwrap();
        lab.wait_listening("b", 7000).unwrap();
        lab.spawn("a", via, "python3", &["-c", LAST_HOLDER_DIES, "12", "6"], "client.log").unwrap();
        let read = |log: &str| std::fs::read_to_string(lab.dir.join(log)).unwrap_or_default();
        assert!(wait_until(Duration::from_secs(20), || read("client.log").contains("child gone")), "{via:?}");
        assert!(
            wait_until(Duration::from_secs(3), || read("server.log").contains("eof c11")),
            "{via:?}: the server did not see the end of the connection whose last holder died: {}",
            read("server.log")
        );
        assert_eq!(read("server.log").lines().count(), 1, "{via:?}: only that one ended: {}", read("server.log"));
        if via == Via::Vsocket {
            let kits = kit_attempts(&lab.dir.join("flow.log"));
            assert!(kits >= 8, "{kits} of 12 connections took kits");
        }
        // The parent's exit ends the others.
        assert!(
            wait_until(Duration::from_secs(15), || read("server.log").lines().count() == 12),
            "{via:?}: {}",
            read("server.log")
        );
    }
}
