//! Policy and isolation: security groups, VPCs with the same addresses,
//! and attachments from the wrong namespace.

use std::process::Command;
use std::time::{Duration, Instant};
use vsocket_e2e::{bin, Lab, Via};

/// Guest `a` may reach `b` on 6379 only; `c` accepts nothing (no groups).
const GUARDED: &str = r#"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[security_group]]
name = "redis"
[[security_group.ingress]]
protocol = "tcp"
ports = "6379"
cidr = "10.10.0.0/24"

[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["redis"]
"#;

const SERVER_6379: &[&str] = &["--port", "6379", "--bind", "10.10.0.3", "--save", "", "--protected-mode", "no"];
const SERVER_6380: &[&str] = &["--port", "6380", "--bind", "10.10.0.3", "--save", "", "--protected-mode", "no"];

/// Connects from `a` with Python (timeout `secs`) and prints the outcome.
const PROBE: &str = "import socket,sys\ns=socket.socket()\ns.settimeout(float(sys.argv[3]))\ntry:\n    s.connect((sys.argv[1], int(sys.argv[2])))\n    print('connected')\nexcept socket.timeout:\n    print('timeout')\nexcept OSError as e:\n    print('error', e.errno)\n";

#[test]
fn security_groups_reject_and_drop() {
    for (action, expected) in [("reject", format!("error {}", libc_econnrefused())), ("drop", "timeout".to_string())] {
        let mut lab = Lab::start_with(&format!("tsg{}", &action[..1]), GUARDED, action).unwrap();
        lab.spawn("b", Via::Vsocket, "redis-server", SERVER_6379, "allowed.log").unwrap();
        lab.spawn("b", Via::Vsocket, "redis-server", SERVER_6380, "denied.log").unwrap();
        lab.wait_listening("b", 6379).unwrap();
        lab.wait_listening("b", 6380).unwrap();
        let ok = lab.run_ok("a", Via::Vsocket, "python3", &["-c", PROBE, "10.10.0.3", "6379", "5"]).unwrap();
        assert_eq!(ok.trim(), "connected");
        let start = Instant::now();
        let denied = lab.run_ok("a", Via::Vsocket, "python3", &["-c", PROBE, "10.10.0.3", "6380", "2"]).unwrap();
        assert_eq!(denied.trim(), expected, "deny_action = {action}");
        if action == "reject" {
            assert!(start.elapsed() < Duration::from_secs(2), "a reject is immediate");
        }
        // Denied by policy, not sent to the kernel path.
        assert_eq!(lab.counter("a", "denied"), 1);
        assert_eq!(lab.counter("a", "fallbacks"), 0);
        assert!(lab.daemon_log().contains("connect denied"));
    }
}

fn libc_econnrefused() -> i32 {
    111
}

/// Two tenants, identical addresses, one host.
const TWO_TENANTS: &str = r#"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[vpc]]
name = "red"
cidr = "10.10.0.0/24"

[[security_group]]
name = "blue-open"
[[security_group.ingress]]
protocol = "tcp"
ports = "all"
cidr = "10.10.0.0/24"

[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["blue-open"]

[[guest]]
name = "x"
vpc = "red"
addresses = ["10.10.0.2"]

[[guest]]
name = "y"
vpc = "red"
addresses = ["10.10.0.3"]
security_groups = ["blue-open"]
"#;

#[test]
fn tenants_with_the_same_addresses_never_meet() {
    let mut lab = Lab::start("tvpc", TWO_TENANTS).unwrap();
    for g in ["b", "y"] {
        lab.spawn(g, Via::Vsocket, "redis-server", SERVER_6379, &format!("{g}.log")).unwrap();
    }
    lab.wait_listening("b", 6379).unwrap();
    lab.wait_listening("y", 6379).unwrap();
    let cli = |guest: &str, args: &[&str]| {
        let mut full = vec!["-h", "10.10.0.3"];
        full.extend_from_slice(args);
        lab.run_ok(guest, Via::Vsocket, "redis-cli", &full).unwrap().trim().to_string()
    };
    assert_eq!(cli("a", &["set", "tenant", "blue"]), "OK");
    assert_eq!(cli("x", &["set", "tenant", "red"]), "OK");
    for _ in 0..3 {
        assert_eq!(cli("a", &["get", "tenant"]), "blue");
        assert_eq!(cli("x", &["get", "tenant"]), "red");
    }
    assert_eq!(lab.counter("b", "connections_in"), 4);
    assert_eq!(lab.counter("y", "connections_in"), 4);
    assert_eq!(lab.counter("a", "fallbacks") + lab.counter("x", "fallbacks"), 0);
}

#[test]
fn tenants_with_the_same_addresses_carry_traffic_at_once_and_never_meet() {
    let mut lab = Lab::start("tvpc2", TWO_TENANTS).unwrap();
    for g in ["b", "y"] {
        lab.spawn(g, Via::Vsocket, "redis-server", SERVER_6379, &format!("{g}.log")).unwrap();
    }
    lab.wait_listening("b", 6379).unwrap();
    lab.wait_listening("y", 6379).unwrap();
    let cli = |guest: &str, args: &[&str]| {
        let mut full = vec!["-h", "10.10.0.3"];
        full.extend_from_slice(args);
        lab.run_ok(guest, Via::Vsocket, "redis-cli", &full).unwrap().trim().to_string()
    };
    assert_eq!(cli("a", &["set", "tenant", "blue"]), "OK");
    assert_eq!(cli("x", &["set", "tenant", "red"]), "OK");
    // Both tenants load their own server at once, over different key
    // spaces (1000 keys for blue, 50 for red), so a request that crossed
    // would show in the other server's key count.
    let bench = |guest: &str, keys: &str| {
        lab.command(
            guest,
            Via::Vsocket,
            "redis-benchmark",
            &["-h", "10.10.0.3", "-c", "20", "-n", "150000", "-r", keys, "-t", "set,get", "-q"],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
    };
    let blue = bench("a", "1000");
    let red = bench("x", "50");
    // While both run, each tenant keeps seeing its own data.
    for _ in 0..5 {
        assert_eq!(cli("a", &["get", "tenant"]), "blue");
        assert_eq!(cli("x", &["get", "tenant"]), "red");
    }
    for (name, child) in [("blue", blue), ("red", red)] {
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("SET") && text.contains("GET"), "{name}: {text}");
    }
    let blue_keys: u64 = cli("a", &["dbsize"]).parse().unwrap();
    let red_keys: u64 = cli("x", &["dbsize"]).parse().unwrap();
    assert!(blue_keys > 51 && blue_keys <= 1001, "blue has {blue_keys} keys");
    assert!(red_keys <= 51, "red has {red_keys} keys: blue's requests reached it");
    assert_eq!(cli("a", &["get", "tenant"]), "blue");
    assert_eq!(cli("x", &["get", "tenant"]), "red");
    assert!(lab.counter("b", "connections_in") >= 20 && lab.counter("y", "connections_in") >= 20);
    assert_eq!(lab.counter("a", "fallbacks") + lab.counter("x", "fallbacks"), 0);
    assert!(lab.counter("b", "bytes_received") > 1_000_000 && lab.counter("y", "bytes_received") > 1_000_000);
}

#[test]
fn attachment_from_another_namespace_is_refused() {
    let mut lab = Lab::start("tattach", vsocket_e2e::TWO_GUESTS).unwrap();
    lab.spawn("b", Via::Vsocket, "redis-server", SERVER_6379, "redis.log").unwrap();
    lab.wait_listening("b", 6379).unwrap();
    // A process in guest a's namespace that presents itself at guest b's
    // control socket (as a hostile library would).
    let lib = bin("libvsocket.so");
    let out = Command::new("ip")
        .args(["netns", "exec", "tattach-a", "env"])
        .arg(format!("LD_PRELOAD={}", lib.display()))
        .arg(format!("VSOCKET_CONTROL={}", lab.run_dir.join("guests/b.sock").display()))
        .args(["python3", "-c", PROBE, "10.10.0.3", "6379", "5"])
        .output()
        .unwrap();
    // Refused at the control socket, the library falls back to the kernel.
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "connected");
    assert_eq!(lab.counter("b", "refused_attachments"), 1);
    assert_eq!(lab.counter("b", "connections_in"), 0);
    assert!(lab.daemon_log().contains("refused attachment"), "{}", lab.daemon_log());
}
