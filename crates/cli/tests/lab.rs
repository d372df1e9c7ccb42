//! The lab network and `vsocket run`, against real namespaces.
//!
//! These tests create network namespaces, so they need root (CAP_SYS_ADMIN
//! and CAP_NET_ADMIN), iproute2 and python3. Each uses names unique to this
//! process and test, and removes everything it made even when it fails.
//!
//! The config is two VPCs that use the same subnet, so the same addresses
//! mean different guests depending on which side asks:
//!
//! ```text
//!  VPC blue 10.77.0.0/24:  a1 10.77.0.2   a2 10.77.0.3
//!  VPC red  10.77.0.0/24:  b1 10.77.0.2   b2 10.77.0.3
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;

use vsocket_cli::lab;
use vsocket_policy::Config;

/// The port every test HTTP server listens on, inside its own namespace.
const HTTP_PORT: u16 = 18080;

/// A lab built from the test config, torn down (servers first) when dropped.
struct TestLab {
    dir: PathBuf,
    config_path: PathBuf,
    config: Config,
    servers: Vec<Child>,
}

impl TestLab {
    /// Writes the config for a lab named after this process and `tag`,
    /// without building anything.
    fn configure(tag: &str) -> TestLab {
        let host = format!("t{}{tag}", std::process::id());
        let dir = std::env::temp_dir().join(format!("vsocket-cli-{host}"));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let config_path = dir.join("vsocket.toml");
        std::fs::write(&config_path, config_text(&host, &dir)).expect("write the config");
        let config = vsocket_policy::load(&config_path).expect("the test config is valid");
        TestLab { dir, config_path, config, servers: Vec::new() }
    }

    /// Writes the config and builds its lab.
    fn up(tag: &str) -> TestLab {
        let lab = TestLab::configure(tag);
        if let Err(err) = lab::up(&lab.config) {
            panic!("lab up: {err}");
        }
        lab
    }

    fn netns(&self, guest: &str) -> String {
        let id = self.config.guest_by_name(guest).expect("a guest of the test config");
        self.config.guest(id).netns.clone()
    }

    /// Every namespace the lab may create.
    fn namespaces(&self) -> Vec<String> {
        self.config.guests().map(|(_, guest)| guest.netns.clone()).chain([lab::switch_netns(&self.config)]).collect()
    }

    /// Starts an HTTP server in `guest` on `addr:port` whose file `who` holds
    /// `body`.
    fn serve(&mut self, guest: &str, addr: &str, port: u16, body: &str) {
        let root = self.dir.join(format!("www-{guest}-{port}"));
        std::fs::create_dir_all(&root).expect("create the web root");
        std::fs::write(root.join("who"), body).expect("write the served file");
        let server = Command::new("ip")
            .args(["netns", "exec", &self.netns(guest), python()])
            .args(["-m", "http.server", &port.to_string(), "--bind", addr])
            .arg("--directory")
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m http.server");
        self.servers.push(server);
    }

    /// Fetches `http://addr:port/who` from `guest`, retrying for a few
    /// seconds while servers start; the body, or the error after the last try.
    fn fetch(&self, guest: &str, addr: &str, port: u16) -> Result<String, String> {
        const FETCH: &str = r#"
import sys, time, urllib.request
deadline = time.monotonic() + 5
while True:
    try:
        body = urllib.request.urlopen(sys.argv[1], timeout=2).read()
        sys.stdout.write(body.decode())
        break
    except OSError as err:
        if time.monotonic() > deadline:
            sys.exit(str(err))
        time.sleep(0.05)
"#;
        let url = format!("http://{addr}:{port}/who");
        let output = in_netns(&self.netns(guest), &[python(), "-c", FETCH, &url]);
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!("{url}: {}", String::from_utf8_lossy(&output.stderr).trim()))
        }
    }

    /// One TCP connect from `guest` to `addr:port`: `"connected"`,
    /// `"refused"` or `"timeout"`.
    fn connect_once(&self, guest: &str, addr: &str, port: u16) -> String {
        const CONNECT: &str = r#"
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("timeout")
"#;
        let output = in_netns(&self.netns(guest), &[python(), "-c", CONNECT, addr, &port.to_string()]);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Stops the servers, then removes the lab. Safe to call repeatedly.
    fn down(&mut self) -> Result<(), lab::LabError> {
        for mut server in self.servers.drain(..) {
            let _ = server.kill();
            let _ = server.wait();
        }
        lab::down(&self.config)
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        if let Err(err) = self.down() {
            eprintln!("cleaning up the test lab: {err}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config_text(host: &str, dir: &Path) -> String {
    let mut text = format!(
        "[host]\nname = \"{host}\"\nrun_dir = \"{}\"\n\n\
         [[vpc]]\nname = \"blue\"\ncidr = \"10.77.0.0/24\"\n\n\
         [[vpc]]\nname = \"red\"\ncidr = \"10.77.0.0/24\"\n",
        dir.join("run").display()
    );
    for (guest, vpc, addr) in [
        ("a1", "blue", "10.77.0.2"),
        ("a2", "blue", "10.77.0.3"),
        ("b1", "red", "10.77.0.2"),
        ("b2", "red", "10.77.0.3"),
    ] {
        text.push_str(&format!(
            "\n[[guest]]\nname = \"{guest}\"\nvpc = \"{vpc}\"\naddresses = [\"{addr}\"]\n\
             netns = \"{host}-{guest}\"\n"
        ));
    }
    text
}

/// The real interpreter behind `python3`, so that version-manager shims do
/// not add their start-up time to every command.
fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .filter(|path| !path.is_empty())
            .unwrap_or_else(|| "python3".to_owned())
    })
}

fn in_netns(netns: &str, command: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", netns])
        .args(command)
        .stdin(Stdio::null())
        .output()
        .expect("run ip netns exec")
}

/// The names `ip netns list` shows.
fn listed_namespaces() -> Vec<String> {
    let output = Command::new("ip").args(["netns", "list"]).output().expect("run ip netns list");
    assert!(output.status.success(), "ip netns list failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn vsocket(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vsocket"))
        .args(args)
        .env_remove("VSOCKET_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run the vsocket binary")
}

#[test]
fn vpcs_sharing_a_subnet_are_isolated() {
    let mut lab = TestLab::up("i");
    let listed = listed_namespaces();
    for netns in lab.namespaces() {
        assert!(listed.contains(&netns), "{netns} missing after up: {listed:?}");
    }

    lab.serve("a2", "10.77.0.3", HTTP_PORT, "A");
    lab.serve("b2", "10.77.0.3", HTTP_PORT, "B");
    lab.serve("b2", "10.77.0.3", HTTP_PORT + 1, "red only");

    // The same address reaches the peer in the asker's own VPC.
    assert_eq!(lab.fetch("a1", "10.77.0.3", HTTP_PORT), Ok("A".to_owned()));
    assert_eq!(lab.fetch("b1", "10.77.0.3", HTTP_PORT), Ok("B".to_owned()));
    // A listener only red has is up, yet blue reaches a2 there, which
    // refuses: nothing of red is on blue's segment.
    assert_eq!(lab.fetch("b1", "10.77.0.3", HTTP_PORT + 1), Ok("red only".to_owned()));
    assert_eq!(lab.connect_once("a1", "10.77.0.3", HTTP_PORT + 1), "refused");

    lab.down().expect("lab down");
    let listed = listed_namespaces();
    for netns in lab.namespaces() {
        assert!(!listed.contains(&netns), "{netns} still there after down: {listed:?}");
    }
    lab.down().expect("a second lab down is a no-op");
}

#[test]
fn up_replaces_leftovers_and_status_reports_addresses() {
    let lab = TestLab::up("s");
    // A second `up` over a complete lab starts over rather than failing.
    lab::up(&lab.config).expect("second lab up");

    let report = lab::status(&lab.config).expect("lab status");
    assert_eq!(report.len(), 5, "{report:?}");
    assert!(report.iter().all(|namespace| namespace.exists), "{report:?}");
    let b1 = report
        .iter()
        .find(|namespace| namespace.guest.as_deref() == Some("b1"))
        .and_then(|namespace| namespace.interface.as_ref())
        .expect("b1 has an eth0");
    assert_eq!(b1.state, "UP");
    assert_eq!(b1.ipv4, [("10.77.0.2".parse().expect("an address"), 24)]);
}

#[test]
fn down_and_status_without_a_lab() {
    let lab = TestLab::configure("n");
    lab::down(&lab.config).expect("down with nothing to remove");
    let report = lab::status(&lab.config).expect("lab status");
    assert!(report.iter().all(|namespace| !namespace.exists && namespace.interface.is_none()));
}

#[test]
fn run_without_preload_executes_in_the_guest_namespace() {
    let lab = TestLab::up("r");
    let config = lab.config_path.to_str().expect("a UTF-8 temp path");
    let output = vsocket(&[
        "run",
        "--guest",
        "a1",
        "--config",
        config,
        "--no-preload",
        "--",
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "eth0",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "vsocket run failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("10.77.0.2/24"), "unexpected output: {stdout}");
}

#[test]
fn run_reports_an_unknown_guest_as_a_usage_error() {
    let lab = TestLab::configure("u");
    let config = lab.config_path.to_str().expect("a UTF-8 temp path");
    let output = vsocket(&["run", "--guest", "nosuch", "--config", config, "--", "true"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.starts_with("vsocket: "), "{stderr}");
    assert!(stderr.contains("\"nosuch\""), "{stderr}");
    assert!(stderr.contains("a1, a2, b1, b2"), "{stderr}");
}

#[test]
fn run_reports_a_missing_namespace() {
    let lab = TestLab::configure("m");
    let config = lab.config_path.to_str().expect("a UTF-8 temp path");
    let output = vsocket(&["run", "--guest", "a1", "--config", config, "--no-preload", "--", "true"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("vsocket lab up"), "{stderr}");
}

#[test]
fn up_refuses_namespace_names_it_cannot_own() {
    let host = format!("t{}c", std::process::id());
    let config_with_netns = |netns: &str| {
        let text = format!(
            "[host]\nname = \"{host}\"\n[[vpc]]\nname = \"blue\"\ncidr = \"10.77.0.0/24\"\n\
             [[guest]]\nname = \"a1\"\nvpc = \"blue\"\naddresses = [\"10.77.0.2\"]\n\
             netns = \"{netns}\"\n"
        );
        vsocket_policy::parse(&text, Path::new("names.toml")).expect("a valid config")
    };

    let clash = config_with_netns(&format!("vsw-{host}"));
    let err = lab::up(&clash).expect_err("a guest namespace named like the switch");
    assert!(matches!(err, lab::LabError::NameClash { .. }), "{err}");

    let option_like = config_with_netns("-all");
    let err = lab::down(&option_like).expect_err("a namespace named like an option");
    assert!(matches!(err, lab::LabError::OptionLikeName { .. }), "{err}");
    assert!(err.to_string().contains("\"-all\""), "{err}");
}
