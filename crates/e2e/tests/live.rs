//! Live policy changes with real programs: rules removed and added with
//! vsocketctl take effect for new connects at once; established connections
//! are kept (`on_policy_change = "keep"`) or reset (`"reset"`); guests are
//! added and removed; a reload of an invalid file changes nothing.

use std::process::Command;
use std::time::{Duration, Instant};
use vsocket_e2e::{wait_until, Lab, Via};

/// Guest `b` accepts TCP 7000 and 7001 from the VPC; `a` has no groups.
const BODY: &str = r#"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[security_group]]
name = "svc"
[[security_group.ingress]]
protocol = "tcp"
ports = "7000"
cidr = "10.10.0.0/24"
[[security_group.ingress]]
protocol = "tcp"
ports = "7001"
cidr = "10.10.0.0/24"

[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["svc"]
"#;

const RULE_7000: &[&str] = &["svc", "ingress", "tcp", "7000", "--cidr", "10.10.0.0/24"];

/// An echo server on `argv[1]:argv[2]`, a thread per connection; a reset
/// connection is reported.
const ECHO_SERVER: &str = "import socket,sys,threading
srv=socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(16)
def serve(c):
    try:
        while True:
            d=c.recv(4096)
            if not d:
                break
            c.sendall(d)
    except OSError as e:
        print('server error', e.errno, flush=True)
while True:
    c,_=srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
";

/// Sends a numbered line every 20 ms on one connection and checks the echo;
/// prints `ok N` every 10 exchanges, and `error ERRNO` if the connection fails.
const PINGER: &str = "import socket,sys,time
s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
print('connected', flush=True)
n=0
try:
    while True:
        msg=b'ping %d\\n' % n
        s.sendall(msg)
        got=b''
        while not got.endswith(b'\\n'):
            chunk=s.recv(100)
            if not chunk:
                print('eof', n, flush=True)
                sys.exit(0)
            got+=chunk
        assert got == msg, (got, msg)
        n+=1
        if n % 10 == 0:
            print('ok', n, flush=True)
        time.sleep(0.02)
except OSError as e:
    print('error', e.errno, n, flush=True)
";

/// Connects with a timeout of `argv[3]` seconds and prints the outcome.
const PROBE: &str = "import socket,sys\ns=socket.socket()\ns.settimeout(float(sys.argv[3]))\ntry:\n    s.connect((sys.argv[1], int(sys.argv[2])))\n    print('connected')\nexcept socket.timeout:\n    print('timeout')\nexcept OSError as e:\n    print('error', e.errno)\n";

const ECONNREFUSED: &str = "error 111";

fn probe(lab: &Lab, guest: &str, port: &str, secs: &str) -> String {
    lab.run_ok(guest, Via::Vsocket, "python3", &["-c", PROBE, "10.10.0.3", port, secs]).unwrap().trim().to_string()
}

/// `vsocketctl ARGS` must succeed; returns its stdout.
fn ctl_ok(lab: &Lab, args: &[&str]) -> String {
    let out = lab.ctl_output(args).unwrap();
    assert!(out.status.success(), "vsocketctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn rule(action: &str) -> Vec<&str> {
    let mut args = vec!["rule", action];
    args.extend_from_slice(RULE_7000);
    args
}

fn start_echo(lab: &mut Lab, port: &str) {
    lab.spawn("b", Via::Vsocket, "python3", &["-c", ECHO_SERVER, "10.10.0.3", port], &format!("echo{port}.log"))
        .unwrap();
    lab.wait_listening("b", port.parse().unwrap()).unwrap();
}

fn log(lab: &Lab, name: &str) -> String {
    std::fs::read_to_string(lab.dir.join(name)).unwrap_or_default()
}

/// The highest `ok N` a pinger printed so far.
fn progress(lab: &Lab, name: &str) -> u64 {
    log(lab, name).lines().filter_map(|l| l.strip_prefix("ok ")?.trim().parse().ok()).max().unwrap_or(0)
}

/// The daemon still answers.
fn daemon_alive(lab: &Lab) -> bool {
    lab.ctl("status").is_ok()
}

#[test]
fn removing_a_rule_denies_new_connects_at_once_and_adding_it_back_allows_them() {
    let mut lab = Lab::start_with("tlrm", BODY, "reject").unwrap();
    start_echo(&mut lab, "7000");
    assert_eq!(probe(&lab, "a", "7000", "5"), "connected");

    let out = ctl_ok(&lab, &rule("remove"));
    assert!(out.contains("policy changed"), "{out}");
    let start = Instant::now();
    assert_eq!(probe(&lab, "a", "7000", "5"), ECONNREFUSED, "denied at once after the rule went");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(lab.counter("a", "denied"), 1);
    assert!(daemon_alive(&lab));

    // Removing it again names the problem and changes nothing.
    let again = lab.ctl_output(&rule("remove")).unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr)
        .contains("security group \"svc\" has no such ingress rule; nothing changed"));

    ctl_ok(&lab, &rule("add"));
    assert_eq!(probe(&lab, "a", "7000", "5"), "connected", "allowed again");
    assert_eq!(lab.counter("a", "denied"), 1);

    // A membership taken away denies too; an invalid rule is refused with the file's message.
    ctl_ok(&lab, &["member", "remove", "b", "svc"]);
    assert_eq!(probe(&lab, "a", "7000", "5"), ECONNREFUSED);
    let bad = lab.ctl_output(&["rule", "add", "svc", "ingress", "tcp", "70000", "--cidr", "10.10.0.0/24"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr).trim(),
        "vsocketctl: the running config: security_group \"svc\".ingress[2].ports: port 70000 is outside 1-65535; \
         nothing changed"
    );
    ctl_ok(&lab, &["member", "add", "b", "svc"]);
    assert_eq!(probe(&lab, "a", "7000", "5"), "connected");
    let status = lab.ctl("status").unwrap();
    assert_eq!(status["policy_changes"], 4, "{status}");
    assert!(daemon_alive(&lab));
}

#[test]
fn keep_leaves_established_connections_working() {
    let mut lab = Lab::start("tlkp", BODY).unwrap();
    start_echo(&mut lab, "7000");
    lab.spawn("a", Via::Vsocket, "python3", &["-c", PINGER, "10.10.0.3", "7000"], "pinger.log").unwrap();
    assert!(wait_until(Duration::from_secs(15), || progress(&lab, "pinger.log") >= 10), "{}", log(&lab, "pinger.log"));

    let out = ctl_ok(&lab, &rule("remove"));
    assert!(out.contains("on_policy_change = keep: 0 connection(s) reset"), "{out}");
    let at_change = progress(&lab, "pinger.log");
    // New connects are dropped (deny_action = "drop")...
    assert_eq!(probe(&lab, "a", "7000", "1"), "timeout");
    // ...while the established one carries on, checked byte for byte.
    assert!(
        wait_until(Duration::from_secs(10), || progress(&lab, "pinger.log") >= at_change + 50),
        "{}",
        log(&lab, "pinger.log")
    );
    assert!(!log(&lab, "pinger.log").contains("error"), "{}", log(&lab, "pinger.log"));
    assert_eq!(lab.ctl("connections").unwrap().as_array().unwrap().len(), 1);
    assert_eq!(lab.ctl("status").unwrap()["policy_resets"], 0);
}

#[test]
fn reset_ends_denied_connections_and_spares_allowed_ones() {
    let host = "on_policy_change = \"reset\"\nflow_log = \"{dir}/flow.log\"";
    let mut lab = Lab::start_host("tlrs", BODY, host).unwrap();
    start_echo(&mut lab, "7000");
    start_echo(&mut lab, "7001");
    lab.spawn("a", Via::Vsocket, "python3", &["-c", PINGER, "10.10.0.3", "7000"], "denied.log").unwrap();
    lab.spawn("a", Via::Vsocket, "python3", &["-c", PINGER, "10.10.0.3", "7001"], "allowed.log").unwrap();
    assert!(wait_until(Duration::from_secs(15), || progress(&lab, "denied.log") >= 10
        && progress(&lab, "allowed.log") >= 10));

    let start = Instant::now();
    let out = ctl_ok(&lab, &rule("remove"));
    assert!(out.contains("on_policy_change = reset: 1 connection(s) reset"), "{out}");
    // The client sees ECONNRESET; a sleeper notices within the library's 200 ms cap.
    assert!(
        wait_until(Duration::from_secs(3), || log(&lab, "denied.log").contains("error 104")),
        "{}",
        log(&lab, "denied.log")
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    // So does the server's end of it.
    assert!(wait_until(Duration::from_secs(3), || log(&lab, "echo7000.log").contains("server error 104")));
    // The connection still allowed keeps carrying checked bytes.
    let at_reset = progress(&lab, "allowed.log");
    assert!(wait_until(Duration::from_secs(10), || progress(&lab, "allowed.log") >= at_reset + 50));
    assert!(!log(&lab, "allowed.log").contains("error"), "{}", log(&lab, "allowed.log"));
    assert!(!log(&lab, "echo7001.log").contains("error"));

    assert_eq!(lab.ctl("status").unwrap()["policy_resets"], 1);
    assert!(lab.daemon_log().contains("connection reset by a policy change"));
    let flow = std::fs::read_to_string(lab.dir.join("flow.log")).unwrap();
    let resets: Vec<&str> = flow.lines().filter(|l| l.contains("\"event\":\"reset\"")).collect();
    assert_eq!(resets.len(), 1, "{flow}");
    assert!(resets[0].contains("\"server\":\"10.10.0.3:7000\"") && resets[0].contains("\"verdict\":\"reset\""));
    assert!(resets[0].contains("policy change: denied on ingress"), "{}", resets[0]);
    // A second change does not reset it again, and the reset connection is retired.
    ctl_ok(&lab, &rule("add"));
    assert!(wait_until(Duration::from_secs(5), || lab.ctl("connections").unwrap().as_array().unwrap().len() == 1));
    assert_eq!(lab.ctl("status").unwrap()["policy_resets"], 1);
}

/// Deletes a network namespace the test made, also when it fails.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).stderr(std::process::Stdio::null()).status();
    }
}

/// Connects to b:7000, prints the outcome, waits for `argv[1]` to exist,
/// connects again and prints that outcome.
const TWICE: &str = "import socket,sys,os,time
def attempt():
    s=socket.socket()
    s.settimeout(3)
    try:
        s.connect(('10.10.0.3', 7000))
        return 'connected'
    except socket.timeout:
        return 'timeout'
    except OSError as e:
        return 'error %d' % e.errno
print('first', attempt(), flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print('second', attempt(), flush=True)
";

#[test]
fn guests_added_and_removed_live() {
    let mut lab = Lab::start("tlgs", BODY).unwrap();
    start_echo(&mut lab, "7000");
    let netns = Netns("tlgs-c".into());
    let _ = Command::new("ip").args(["netns", "del", &netns.0]).stderr(std::process::Stdio::null()).status();
    assert!(Command::new("ip").args(["netns", "add", &netns.0]).status().unwrap().success());
    assert!(Command::new("ip").args(["-n", &netns.0, "link", "set", "lo", "up"]).status().unwrap().success());

    let unknown = lab.run("c", Via::Vsocket, "true", &[]).unwrap();
    assert!(!unknown.status.success());

    let out = ctl_ok(&lab, &["guest", "add", "c", "--vpc", "blue", "--address", "10.10.0.4", "--netns", "tlgs-c"]);
    assert!(out.contains("guests added: c"), "{out}");
    let socket = lab.run_dir.join("guests/c.sock");
    assert!(socket.exists());
    assert_eq!(probe(&lab, "c", "7000", "5"), "connected", "the new guest is served at once");
    assert_eq!(lab.counter("c", "connections_out"), 1);
    // Its addresses are taken: a second guest with them is refused with the file's message.
    let dup = lab.ctl_output(&["guest", "add", "d", "--vpc", "blue", "--address", "10.10.0.4"]).unwrap();
    assert!(String::from_utf8_lossy(&dup.stderr)
        .contains("guest[3].addresses[0]: 10.10.0.4 in VPC \"blue\" duplicates guest[2].addresses[0]"));

    let go = lab.dir.join("go");
    lab.spawn("c", Via::Vsocket, "python3", &["-c", TWICE, go.to_str().unwrap()], "twice.log").unwrap();
    assert!(wait_until(Duration::from_secs(15), || log(&lab, "twice.log").contains("first connected")));
    let out = ctl_ok(&lab, &["guest", "remove", "c"]);
    assert!(out.contains("guests removed: c"), "{out}");
    assert!(!socket.exists(), "the control socket goes");
    assert!(wait_until(Duration::from_secs(5), || lab.ctl("guests").unwrap().as_array().unwrap().len() == 2));
    std::fs::write(&go, "").unwrap();
    // The process's channel was closed: its connect falls back to the
    // kernel, where c has no route.
    assert!(wait_until(Duration::from_secs(10), || log(&lab, "twice.log").contains("second")));
    assert!(log(&lab, "twice.log").contains("second error 101"), "{}", log(&lab, "twice.log"));
    let gone = lab.run("c", Via::Vsocket, "true", &[]).unwrap();
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no guest \"c\""));
    assert!(lab.daemon_log().contains("guest removed"));
    assert_eq!(probe(&lab, "a", "7000", "5"), "connected", "other guests are unaffected");
    assert!(daemon_alive(&lab));
    drop(netns);
}

#[test]
fn reload_applies_the_file_and_an_invalid_file_changes_nothing() {
    let mut lab = Lab::start_with("tlrl", BODY, "reject").unwrap();
    start_echo(&mut lab, "7000");
    let original = std::fs::read_to_string(&lab.config).unwrap();

    let b_vpc = "vpc = \"blue\"\naddresses = [\"10.10.0.3\"]";
    assert!(original.contains(b_vpc), "{original}");
    let invalid = original.replacen(b_vpc, "vpc = \"red\"\naddresses = [\"10.10.0.3\"]", 1);
    std::fs::write(&lab.config, invalid).unwrap();
    let out = lab.ctl_output(&["reload"]).unwrap();
    assert!(!out.status.success());
    let expected = format!("{}: guest[1].vpc: unknown VPC \"red\"; nothing changed", lab.config.display());
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), format!("vsocketctl: {expected}"));
    // (`vsocket run` reads the file too.)
    std::fs::write(&lab.config, &original).unwrap();
    assert_eq!(probe(&lab, "a", "7000", "5"), "connected", "the old policy is in force");
    assert_eq!(lab.ctl("status").unwrap()["policy_changes"], 0);

    // A valid file without the 7000 rule: applied at once.
    let without = original.replacen("ports = \"7000\"", "ports = \"7002\"", 1);
    std::fs::write(&lab.config, &without).unwrap();
    let out = ctl_ok(&lab, &["reload"]);
    assert!(out.contains("policy changed"), "{out}");
    assert_eq!(probe(&lab, "a", "7000", "5"), ECONNREFUSED);
    std::fs::write(&lab.config, original).unwrap();
    ctl_ok(&lab, &["reload"]);
    assert_eq!(probe(&lab, "a", "7000", "5"), "connected");
    assert!(daemon_alive(&lab));
}
