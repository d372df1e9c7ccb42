//! Virtual-machine guests (QEMU under TCG) on vSocket: unmodified
//! programs in a VM reach namespace guests, other VMs and other hosts, and
//! serve them, through their VM's attachment (a vsock backend of its own,
//! a region the daemon carves each connection out of, and the bridge); a
//! hostile or dying VM breaks only its own connections.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use vsocket_admin::paths::{vm_paths, VmPaths};
use vsocket_cli::vm::{exit_status, vsock_backend, Boot, Image};
use vsocket_e2e::{asset, wait_until, Lab, Via};

const BODY: &str = r#"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[security_group]]
name = "web"
[[security_group.ingress]]
protocol = "tcp"
ports = "7600"
cidr = "10.10.0.0/24"

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["web"]

[[guest]]
name = "v"
vpc = "blue"
addresses = ["10.10.0.4"]
max_shared_memory = "64MiB"
[guest.vm]
cid = 5
region = "16MiB"
"#;

/// The program in the VM: asks the daemon, over the control stream, to
/// connect to b's listeners on ports 7600 (allowed) and 7601 (no rule
/// allows it), and
/// reports the replies; and reports the size of its ivshmem region.
const SCRIPT: &str = r#"python3 -c '
import glob, os, socket, struct
def addr(ip, port):
    return socket.inet_aton(ip) + struct.pack("<H", port)
def ask(port):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.connect((socket.VMADDR_CID_HOST, 7471))
    msg = bytes([1]) + addr("0.0.0.0", 0) + addr("10.10.0.3", port)
    s.sendall(bytes([len(msg)]) + msg)
    n = s.recv(1)[0]
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return body.hex()
print("allowed", ask(7600))
print("denied", ask(7601))
for dev in glob.glob("/sys/bus/pci/devices/*"):
    if open(dev + "/device").read().strip() == "0x1110":
        print("region", os.path.getsize(dev + "/resource2"))
'"#;

/// Each VM guest's region, as the configs here give it.
const REGION: u64 = 16 << 20;

/// A boot of a VM guest with its daemon's vsock backend and region.
fn vm_boot<'a>(script: &'a str, paths: &'a VmPaths) -> Boot<'a> {
    Boot { memory_mib: 512, script, vsock: Some(&paths.vhost), region: Some((&paths.region, REGION)) }
}

fn cache() -> PathBuf {
    vsocket_e2e::vm_cache()
}

/// The image VMs boot, and the `[host]` lines (`extra`, then the vsock
/// backend, both made in the cache first) of a daemon that serves VMs.
fn vm_host(extra: &str) -> (Image, String) {
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    (image, format!("{extra}\nvsock_backend = \"{}\"", backend.display()))
}

/// VM guest `guest`'s files, once its daemon has started its backend.
fn backend_of(lab: &Lab, guest: &str) -> VmPaths {
    let paths = vm_paths(&lab.run_dir, guest);
    assert!(wait_until(Duration::from_secs(10), || paths.vhost.exists()), "no vsock backend:\n{}", lab.daemon_log());
    paths
}

/// `script` for a VM guest, its programs run with the library attached to
/// the VM's vsocketd.
fn attached(script: &str) -> String {
    format!("export LD_PRELOAD={} VSOCKET_CONTROL=vsock\n{script}", vsocket_e2e::bin("libvsocket.so").display())
}

/// A VM running in the background, its console in a file; killed when
/// dropped.
struct Background {
    qemu: std::process::Child,
    console: PathBuf,
}

impl Background {
    /// Boots `boot`, its console in `console` (QEMU's own messages beside
    /// it, `.err`).
    fn start(image: &Image, boot: &Boot<'_>, console: PathBuf) -> Background {
        let file = |path: &Path| std::fs::File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let qemu = image
            .command(boot)
            .stdin(Stdio::null())
            .stdout(file(&console))
            .stderr(file(&console.with_extension("err")))
            .spawn()
            .unwrap_or_else(|e| panic!("qemu: {e}"));
        Background { qemu, console }
    }

    /// What the VM and QEMU printed so far.
    fn console(&self) -> String {
        let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
        format!("{}{}", read(&self.console), read(&self.console.with_extension("err")))
    }

    /// Waits, at most `limit`, for the VM's script to end; its status.
    fn wait_exit(&self, limit: Duration) -> Option<i32> {
        wait_until(limit, || exit_status(&self.console()).is_some());
        exit_status(&self.console())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

/// The `[[guest]]` table of a second VM guest in VPC `vpc`.
fn second_vm(name: &str, vpc: &str, address: &str, cid: u32, extra: &str) -> String {
    format!(
        "\n[[guest]]\nname = \"{name}\"\nvpc = \"{vpc}\"\naddresses = [\"{address}\"]\n{extra}\n\
         [guest.vm]\ncid = {cid}\nregion = \"16MiB\"\n"
    )
}

/// Spawns `program ARGS` in namespace guest `guest` over vSocket, logging
/// to `log`, and waits for it to listen on `port`.
fn serve(lab: &mut Lab, guest: &str, port: u16, program: &str, args: &[&str], log: &str) {
    lab.spawn(guest, Via::Vsocket, program, args, log).unwrap();
    lab.wait_listening(guest, port).unwrap();
}

/// A redis-server on guest b's address, port `port`.
fn serve_redis(lab: &mut Lab, port: u16) {
    let args = vsocket_e2e::redis_server_args(port, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    serve(lab, "b", port, "redis-server", &args, &format!("redis-{port}.log"));
}

/// `transfer.py serve` on guest b's address, port `port`, into `server.log`.
fn serve_transfer(lab: &mut Lab, port: u16) -> String {
    let transfer = asset("transfer.py").to_string_lossy().into_owned();
    serve(lab, "b", port, "python3", &[&transfer, "serve", "10.10.0.3", &port.to_string()], "server.log");
    transfer
}

/// The line of `console` after `prefix`, trimmed.
fn line_after<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console.lines().find_map(|l| l.trim().strip_prefix(prefix))
}

/// Has a VM guest `guest` registered a listener with `lab`'s daemon (at
/// least `count`)?
fn listening(lab: &Lab, guest: &str, count: usize) -> bool {
    lab.ctl("listeners")
        .is_ok_and(|l| l.as_array().is_some_and(|l| l.iter().filter(|l| l["guest"] == guest).count() >= count))
}

/// The script a VM runs to serve redis on its VPC address (on its
/// loopback: the VMs here have no network device at all, as a cloud VM
/// has it on its NIC), `then`.
fn redis_in_vm(address: &str, ports: &[u16], then: &str) -> String {
    let mut script = format!("ip link set lo up && ip addr add {address}/32 dev lo || exit 1\n");
    for port in ports {
        script.push_str(&format!(
            "redis-server --port {port} --bind {address} --save '' --appendonly no --protected-mode no --daemonize yes\n"
        ));
    }
    script.push_str(then);
    attached(&script)
}

#[test]
fn a_vm_guest_attaches_and_its_connects_follow_policy() {
    let (image, host) = vm_host("deny_action = \"reject\"");
    let mut lab = Lab::start_host("tvm", BODY, &host).unwrap();
    let echo = asset("kernel_echo.py").to_string_lossy().into_owned();
    // Listeners on both ports: with none, a connect takes the kernel path
    // before policy is asked (the kernel's network is the judge there).
    for port in [7600, 7601] {
        serve(&mut lab, "b", port, "python3", &[&echo, "10.10.0.3", &port.to_string()], "echo.log");
    }
    let paths = backend_of(&lab, "v");
    let output = image.run(&vm_boot(SCRIPT, &paths), Duration::from_secs(180)).unwrap_or_else(|e| panic!("{e}"));
    let console = String::from_utf8_lossy(&output.stdout);
    assert_eq!(exit_status(&console), Some(0), "{console}\n{}", String::from_utf8_lossy(&output.stderr));
    // CONNECTED_AT (kind 9): allowed, placed in the VM's region; REFUSED
    // (kind 4) with ECONNREFUSED (111): denied, as deny_action = "reject"
    // says.
    assert!(line_after(&console, "allowed ").is_some_and(|m| m.starts_with("09")), "{console}");
    assert_eq!(line_after(&console, "denied "), Some("046f000000"), "{console}");
    // The daemon made the region the config gives, and QEMU mapped it.
    assert_eq!(line_after(&console, "region "), Some(REGION.to_string().as_str()), "{console}");
    // Both attempts are the VM guest's, as the backend it came through says.
    assert_eq!(lab.counter("v", "fallbacks"), 0);
    assert_eq!(lab.counter("v", "denied"), 1);
    assert_eq!(lab.counter("v", "connections_out"), 1);
    assert_eq!(lab.counter("b", "connections_in"), 1);
}

/// Unmodified programs in a VM guest reach a namespace guest over
/// vSocket: their connections are placed in the VM's region and carried
/// by the daemon's bridge, which meters them.
#[test]
fn programs_in_a_vm_reach_a_namespace_guest_over_vsocket() {
    const BYTES: u64 = 64 << 20;
    let (image, host) = vm_host("");
    let body = BODY.replace("ports = \"7600\"", "ports = \"7600-7601\"");
    let mut lab = Lab::start_host("tvmdata", &body, &host).unwrap();
    serve_redis(&mut lab, 7600);
    let transfer = serve_transfer(&mut lab, 7601);
    let paths = backend_of(&lab, "v");
    let script = attached(&format!(
        "redis-cli -h 10.10.0.3 -p 7600 set greeting hello-from-a-vm\n\
         echo \"got $(redis-cli -h 10.10.0.3 -p 7600 get greeting)\"\n\
         echo \"sent $(python3 {transfer} send 10.10.0.3 7601 {BYTES} 4242)\"\n"
    ));
    let output = image.run(&vm_boot(&script, &paths), Duration::from_secs(400)).unwrap_or_else(|e| panic!("{e}"));
    let console = String::from_utf8_lossy(&output.stdout);
    let context = || format!("{console}\n{}\n{}", String::from_utf8_lossy(&output.stderr), lab.daemon_log());
    assert_eq!(exit_status(&console), Some(0), "{}", context());
    assert_eq!(line_after(&console, "got "), Some("hello-from-a-vm"), "{}", context());
    let sent = line_after(&console, "sent ").unwrap_or_else(|| panic!("{}", context())).to_string();
    assert!(sent.starts_with(&format!("bytes={BYTES} sha256=")), "{}", context());
    lab.stop_background();
    let received = std::fs::read_to_string(lab.dir.join("server.log")).unwrap();
    assert_eq!(received.trim(), sent, "the namespace guest got something else");
    // Over vSocket, not the kernel (the VM has no network device at all),
    // and metered by the bridge.
    assert_eq!(lab.counter("v", "fallbacks"), 0);
    assert_eq!(lab.counter("v", "connections_out"), 3);
    assert_eq!(lab.counter("b", "connections_in"), 3);
    assert!(lab.counter("b", "bytes_received") >= BYTES, "{}", lab.daemon_log());
    // `vsocketctl guests` shows the VM's region; its pieces all came back.
    assert_eq!(lab.counter("v", "region_size"), REGION);
    assert_eq!(lab.counter("b", "region_size"), 0);
    assert!(wait_until(Duration::from_secs(10), || lab.counter("v", "region_used") == 0));
}

/// QEMU killed in the middle of a transfer: the namespace guest's end of
/// the connection ends (EOF or ECONNRESET) at once, and the daemon's
/// descriptors and the VM's pieces come back.
#[test]
fn a_vm_killed_mid_transfer_ends_its_peers_connection() {
    let (image, host) = vm_host("");
    let mut lab = Lab::start_host("tvmkill", BODY, &host).unwrap();
    let transfer = serve_transfer(&mut lab, 7600);
    let paths = backend_of(&lab, "v");
    let before = lab.daemon_fds().unwrap();
    let script = attached(&format!("python3 {transfer} send 10.10.0.3 7600 {} 99\n", 1u64 << 40));
    let vm = Background::start(&image, &vm_boot(&script, &paths), lab.dir.join("console.log"));
    let flowing = wait_until(Duration::from_secs(120), || lab.counter("b", "bytes_received") > 8 << 20);
    assert!(flowing, "no transfer:\n{}\n{}", vm.console(), lab.daemon_log());
    drop(vm);
    let killed = Instant::now();
    let server_log = lab.dir.join("server.log");
    let ended = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&server_log).is_ok_and(|log| log.contains("bytes=") || log.contains("Error"))
    });
    assert!(ended, "the namespace guest's end never ended:\n{}", lab.daemon_log());
    eprintln!("peer saw the end {:?} after QEMU was killed", killed.elapsed());
    // The VM's streams, pieces and the connection's record are gone.
    assert!(
        wait_until(Duration::from_secs(10), || lab.daemon_fds().is_ok_and(|n| n <= before)),
        "daemon descriptors: {} before the VM, {:?} after",
        before,
        lab.daemon_fds()
    );
    assert_eq!(lab.counter("v", "region_used"), 0, "the VM's pieces were not given back");
}

/// redis-server in a VM guest serves redis-cli and redis-benchmark in a
/// namespace guest over vSocket: the VM's listener gets each connection
/// placed in its region, and the bridge meters it exactly.
#[test]
fn a_redis_server_in_a_vm_serves_a_namespace_guest_over_vsocket() {
    let (image, host) = vm_host("");
    let body = BODY.replace("addresses = [\"10.10.0.4\"]", "addresses = [\"10.10.0.4\"]\nsecurity_groups = [\"web\"]");
    let lab = Lab::start_host("tvmredis", &body, &host).unwrap();
    let paths = backend_of(&lab, "v");
    let script = redis_in_vm("10.10.0.4", &[7600], "sleep 600\n");
    let vm = Background::start(&image, &vm_boot(&script, &paths), lab.dir.join("console.log"));
    assert!(wait_until(Duration::from_secs(120), || listening(&lab, "v", 1)), "no listener:\n{}", vm.console());
    let cli = |args: &[&str]| {
        let mut all = vec!["-h", "10.10.0.4", "-p", "7600"];
        all.extend_from_slice(args);
        lab.run_ok("b", Via::Vsocket, "redis-cli", &all).unwrap().trim().to_string()
    };
    assert_eq!(cli(&["set", "greeting", "hello-vm"]), "OK");
    assert_eq!(cli(&["get", "greeting"]), "hello-vm");
    let args = ["-h", "10.10.0.4", "-p", "7600", "-t", "set,get", "-n", "2000", "-c", "4", "-r", "100", "-q"];
    let out = lab.run_ok("b", Via::Vsocket, "redis-benchmark", &args).unwrap();
    assert_eq!(vsocket_e2e::redis_benchmark_rates(&out).len(), 2, "benchmark output: {out}\n{}", vm.console());
    let keys: u64 = cli(&["dbsize"]).parse().unwrap();
    assert!(keys > 50, "dbsize {keys}");
    // Every connection was brokered to the VM, none took the kernel.
    let (b, v) = (lab.guest("b").unwrap(), lab.guest("v").unwrap());
    assert_eq!(b["fallbacks"], 0, "{b}");
    assert!(b["connections_out"].as_u64().unwrap() >= 3 + 4, "{b}");
    assert_eq!(b["connections_out"], v["connections_in"]);
    assert!(v["bytes_received"].as_u64().unwrap() > 2000 * 20, "{v}");
    assert_eq!(b["bytes_sent"], v["bytes_received"], "the bridge's count is the connection's metering");
    assert_eq!(b["bytes_received"], v["bytes_sent"]);
}

/// Two VMs on one host talk over vSocket, as their security groups say:
/// redis-cli and redis-benchmark in one VM reach redis-server in the
/// other on an allowed port (both ends pieces of their own VMs' regions,
/// the bridge between them), and a port no rule allows is refused.
#[test]
fn two_vms_talk_over_vsocket_as_their_security_groups_allow() {
    let (image, host) = vm_host("deny_action = \"reject\"");
    let body = format!("{BODY}{}", second_vm("w", "blue", "10.10.0.5", 6, "security_groups = [\"web\"]"));
    let lab = Lab::start_host("tvmvm", &body, &host).unwrap();
    let (server_paths, client_paths) = (backend_of(&lab, "w"), backend_of(&lab, "v"));
    let server_script = redis_in_vm("10.10.0.5", &[7600, 7601], "sleep 600\n");
    let server = Background::start(&image, &vm_boot(&server_script, &server_paths), lab.dir.join("w.log"));
    assert!(wait_until(Duration::from_secs(120), || listening(&lab, "w", 2)), "no listeners:\n{}", server.console());
    let client_script = attached(
        "echo \"set $(redis-cli -h 10.10.0.5 -p 7600 set greeting from-another-vm)\"\n\
         echo \"get $(redis-cli -h 10.10.0.5 -p 7600 get greeting)\"\n\
         redis-benchmark -h 10.10.0.5 -p 7600 -t set,get -n 500 -c 2 -q\n\
         echo \"denied $(redis-cli -h 10.10.0.5 -p 7601 ping 2>&1)\"\n",
    );
    let boot = vm_boot(&client_script, &client_paths);
    let output = image.run(&boot, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
    let out = String::from_utf8_lossy(&output.stdout);
    let context = || format!("{out}\n{}\n{}", server.console(), lab.daemon_log());
    assert_eq!(exit_status(&out), Some(0), "{}", context());
    assert_eq!(line_after(&out, "set "), Some("OK"), "{}", context());
    assert_eq!(line_after(&out, "get "), Some("from-another-vm"), "{}", context());
    assert_eq!(vsocket_e2e::redis_benchmark_rates(&out).len(), 2, "{}", context());
    assert!(line_after(&out, "denied ").is_some_and(|l| l.contains("refused")), "{}", context());
    let (v, w) = (lab.guest("v").unwrap(), lab.guest("w").unwrap());
    assert_eq!(v["fallbacks"], 0, "{v}");
    // redis-cli tries its connect again before it gives up.
    assert!(v["denied"].as_u64().unwrap() >= 1, "{v}");
    assert!(v["connections_out"].as_u64().unwrap() >= 2 + 2, "{v}");
    assert_eq!(v["connections_out"], w["connections_in"]);
    assert!(w["bytes_received"].as_u64().unwrap() > 500 * 20, "{w}");
    assert_eq!(v["bytes_sent"], w["bytes_received"], "the bridge's count is the connection's metering");
    assert_eq!(v["bytes_received"], w["bytes_sent"]);
    let pieces_back = || lab.guest("v").is_ok_and(|v| v["region_used"] == 0);
    assert!(wait_until(Duration::from_secs(10), pieces_back), "{}", lab.daemon_log());
}

/// A VM guest on one host reaches a namespace guest on another over the
/// fabric, and is reached from it: the VM's piece, the bridge, a segment
/// whose far end is the relay, the link, and the other host's relay and
/// guest.
#[test]
fn a_vm_on_one_host_reaches_a_guest_on_another_over_the_fabric() {
    const BYTES: u64 = 16 << 20;
    let (image, host) = vm_host("");
    let body = BODY
        .replace("ports = \"7600\"", "ports = \"7600-7602\"")
        .replace("addresses = [\"10.10.0.4\"]", "addresses = [\"10.10.0.4\"]\nsecurity_groups = [\"web\"]");
    let (first, mut second) = Lab::start_pair("tvmfab", [&body, &body], [&host, ""], "tcp", &["b"]).unwrap();
    serve_redis(&mut second, 7600);
    let transfer = serve_transfer(&mut second, 7601);
    let paths = backend_of(&first, "v");
    // The VM also serves: a redis-server the other host's guest reaches,
    // and the VM stays up until that guest says it is done (a list it
    // pushes to on its own redis, which the VM waits on).
    let script = redis_in_vm(
        "10.10.0.4",
        &[7602],
        &format!(
            "redis-cli -h 10.10.0.3 -p 7600 set greeting across-hosts\n\
             echo \"got $(redis-cli -h 10.10.0.3 -p 7600 get greeting)\"\n\
             echo \"sent $(python3 {transfer} send 10.10.0.3 7601 {BYTES} 77)\"\n\
             echo \"released $(redis-cli -h 10.10.0.3 -p 7600 blpop served 120)\"\n"
        ),
    );
    let output = std::thread::scope(|scope| {
        let served = scope.spawn(|| {
            let registered = wait_until(Duration::from_secs(120), || listening(&first, "v", 1));
            let cli = |host: &str, port: &str, args: &[&str]| {
                let mut all = vec!["-h", host, "-p", port];
                all.extend_from_slice(args);
                second.run_ok("b", Via::Vsocket, "redis-cli", &all).map(|out| out.trim().to_string())
            };
            let answers = registered.then(|| {
                [cli("10.10.0.4", "7602", &["set", "k", "from-another-host"]), cli("10.10.0.4", "7602", &["get", "k"])]
            });
            // Whatever happened, let the VM go.
            let _ = cli("10.10.0.3", "7600", &["rpush", "served", "1"]);
            answers
        });
        let output = image.run(&vm_boot(&script, &paths), Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
        let answers = served.join().unwrap().expect("no listener in the VM");
        assert_eq!(answers[0].as_deref().ok(), Some("OK"), "{answers:?}");
        assert_eq!(answers[1].as_deref().ok(), Some("from-another-host"), "{answers:?}");
        output
    });
    let console = String::from_utf8_lossy(&output.stdout);
    let context = || format!("{console}\n{}\n{}", first.daemon_log(), second.daemon_log());
    assert_eq!(exit_status(&console), Some(0), "{}", context());
    assert_eq!(line_after(&console, "got "), Some("across-hosts"), "{}", context());
    let sent = line_after(&console, "sent ").unwrap_or_else(|| panic!("{}", context())).to_string();
    assert!(sent.starts_with(&format!("bytes={BYTES} sha256=")), "{}", context());
    assert_eq!(first.counter("v", "fallbacks"), 0, "{}", context());
    second.stop_background();
    let received = std::fs::read_to_string(second.dir.join("server.log")).unwrap();
    assert_eq!(received.trim(), sent, "the other host's guest got something else");
    assert_eq!(first.counter("v", "connections_out"), 4);
    assert_eq!(first.counter("v", "connections_in"), 2, "from the other host, over vSocket");
    assert_eq!(second.counter("b", "fallbacks"), 0);
    assert!(first.counter("v", "bytes_sent") >= BYTES, "{}", first.daemon_log());
    assert!(second.counter("b", "bytes_received") >= BYTES);
}

/// A VM that scribbles over its whole region (headers, indices, flags,
/// random bytes) while it holds connections breaks only its own
/// connections: the daemon goes on, a transfer between two other guests
/// arrives intact meanwhile, and so do the rounds of a transfer a second
/// VM makes through the bridge the whole time; the VM's next connection
/// works, and the daemon's descriptors and the VM's pieces come back.
#[test]
fn a_vm_scribbling_on_its_region_breaks_only_its_own_connections() {
    const BYTES: u64 = 256 << 20;
    let (image, host) = vm_host("");
    let body = format!(
        "{}\n[[guest]]\nname = \"a\"\nvpc = \"blue\"\naddresses = [\"10.10.0.2\"]\n{}",
        BODY.replace("ports = \"7600\"", "ports = \"7600-7602\""),
        second_vm("w", "blue", "10.10.0.5", 6, "")
    );
    let mut lab = Lab::start_host("tvmhost", &body, &host).unwrap();
    serve_redis(&mut lab, 7600);
    let transfer = serve_transfer(&mut lab, 7601);
    // The second VM sends 32 MiB rounds to b, one after another, until b
    // stops serving them (told by a file here) and its next is refused.
    let rounds_log = lab.dir.join("rounds.log");
    let stop = lab.dir.join("stop-rounds");
    let stop_s = stop.to_string_lossy().into_owned();
    let serve_rounds = [transfer.as_str(), "rounds", "10.10.0.3", "7602", &stop_s];
    lab.spawn("b", Via::Vsocket, "python3", &serve_rounds, "rounds.log").unwrap();
    lab.wait_listening("b", 7602).unwrap();
    let w_script = attached(&format!(
        "i=0; while python3 {transfer} send 10.10.0.3 7602 {} $i 2>/dev/null; do i=$((i+1)); done\n",
        32 << 20
    ));
    let w_paths = backend_of(&lab, "w");
    let w = Background::start(&image, &vm_boot(&w_script, &w_paths), lab.dir.join("w-console.log"));
    let rounds = || std::fs::read_to_string(&rounds_log).unwrap_or_default().lines().count();
    let flowing = wait_until(Duration::from_secs(120), || rounds() >= 1);
    assert!(flowing, "the second VM's rounds: {}\n{}", w.console(), lab.daemon_log());
    let paths = backend_of(&lab, "v");
    let before = lab.daemon_fds().unwrap();
    let rounds_before = rounds();
    let script = attached(&format!("python3 {} hold 10.10.0.3 7600\n", asset("vm_hostile.py").display()));
    let vm = Background::start(&image, &vm_boot(&script, &paths), lab.dir.join("console.log"));
    let held = wait_until(Duration::from_secs(120), || vm.console().contains("held 4"));
    // Two other guests move a quarter gibibyte while the VM scribbles.
    let sent = held.then(|| {
        let args = [transfer.as_str(), "send", "10.10.0.3", "7601", &BYTES.to_string(), "5"];
        lab.run_ok("a", Via::Vsocket, "python3", &args)
    });
    let status = vm.wait_exit(Duration::from_secs(180));
    let out = vm.console();
    let context = || format!("{out}\n{}", lab.daemon_log());
    assert!(held, "{}", context());
    assert_eq!(status, Some(0), "{}", context());
    assert!(out.contains("scribbled"), "{}", context());
    assert_eq!(line_after(&out, "fresh "), Some("PONG"), "a new connection after the scribbling: {}", context());
    // The daemon serves on; the other guests' redis too.
    let pong = lab.run_ok("a", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "-p", "7600", "ping"]).unwrap();
    assert_eq!(pong.trim(), "PONG");
    let sent = sent.unwrap().unwrap();
    // The second VM's rounds went on through the bridge meanwhile, each
    // arriving as sent.
    let rounds_during = rounds() - rounds_before;
    std::fs::write(&stop, "").unwrap();
    let w_status = w.wait_exit(Duration::from_secs(120));
    let w_out = w.console();
    assert!(w_status.is_some(), "the second VM's rounds did not stop: {w_out}\n{}", lab.daemon_log());
    let w_sent: Vec<&str> = w_out.lines().map(str::trim).filter(|l| l.starts_with("bytes=")).collect();
    let served = std::fs::read_to_string(&rounds_log).unwrap();
    let w_received: Vec<&str> = served.lines().map(str::trim).collect();
    assert_eq!(w_sent, w_received, "the second VM's rounds were touched");
    assert!(rounds_during >= 1, "no round of the second VM ended while the first VM ran");
    eprintln!("the second VM sent {} rounds, {rounds_during} while the first ran", w_sent.len());
    lab.stop_background();
    let received = std::fs::read_to_string(lab.dir.join("server.log")).unwrap();
    assert_eq!(received.trim(), sent.trim(), "the other guests' transfer was touched");
    assert_eq!(lab.counter("a", "fallbacks"), 0);
    let pieces_back = || lab.guest("v").is_ok_and(|v| v["region_used"] == 0);
    assert!(wait_until(Duration::from_secs(10), pieces_back), "{}", lab.daemon_log());
    assert!(
        wait_until(Duration::from_secs(10), || lab.daemon_fds().is_ok_and(|n| n <= before)),
        "daemon descriptors: {} before the VM, {:?} after",
        before,
        lab.daemon_fds()
    );
}

/// A VM guest's connections count against its quotas, its region's room
/// is a limit of its own, and what it sends is metered to the byte.
#[test]
fn vm_guests_are_metered_exactly_and_held_to_their_quotas() {
    const BYTES: u64 = 3_000_017;
    let (image, host) = vm_host("");
    // v may hold 3 connections; w's region has room for one.
    let body = format!(
        "{}\n[[guest]]\nname = \"w\"\nvpc = \"blue\"\naddresses = [\"10.10.0.5\"]\n[guest.vm]\ncid = 6\nregion = \"1MiB\"\n",
        BODY.replace("ports = \"7600\"", "ports = \"7600-7601\"")
            .replace("max_shared_memory = \"64MiB\"", "max_shared_memory = \"64MiB\"\nmax_connections = 3")
    );
    let mut lab = Lab::start_host("tvmquota", &body, &host).unwrap();
    let echo = asset("kernel_echo.py").to_string_lossy().into_owned();
    serve(&mut lab, "b", 7600, "python3", &[&echo, "10.10.0.3", "7600"], "echo.log");
    let transfer = serve_transfer(&mut lab, 7601);
    // Connections until one is refused; then the transfer, metered.
    let hold = "python3 -c '\n\
        import errno, socket\n\
        held = []\n\
        try:\n    \
            while len(held) < 10:\n        \
                held.append(socket.create_connection((\"10.10.0.3\", 7600), timeout=5))\n\
        except OSError as e:\n    \
            print(\"refused after\", len(held), errno.errorcode[e.errno])\n'\n";
    let runs = [
        ("v", REGION, format!("python3 {transfer} send 10.10.0.3 7601 {BYTES} 3\n"), "3 EADDRNOTAVAIL"),
        ("w", 1 << 20, String::new(), "1 ENOBUFS"),
    ];
    for (guest, region, then, expected) in runs {
        let paths = backend_of(&lab, guest);
        let script = attached(&format!("{hold}{then}"));
        let boot = Boot { region: Some((&paths.region, region)), ..vm_boot(&script, &paths) };
        let output = image.run(&boot, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
        let console = String::from_utf8_lossy(&output.stdout);
        assert_eq!(exit_status(&console), Some(0), "{console}\n{}", lab.daemon_log());
        assert_eq!(line_after(&console, "refused after "), Some(expected), "{guest}: {console}\n{}", lab.daemon_log());
    }
    let (v, w) = (lab.guest("v").unwrap(), lab.guest("w").unwrap());
    assert!(v["exceeded_connections"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["fallbacks"], 0, "{v}");
    assert_eq!(w["fallbacks"], 0, "{w}");
    // Exact: the transfer's bytes, and nothing else (the held connections
    // sent nothing), however the bytes were cut up on the way.
    assert!(wait_until(Duration::from_secs(10), || lab.guest("v").is_ok_and(|v| v["bytes_sent"] == BYTES)));
    assert_eq!(lab.counter("v", "bytes_received"), 0);
    assert_eq!(lab.counter("b", "bytes_received"), BYTES);
    assert_eq!(lab.counter("w", "bytes_sent"), 0);
    for guest in ["v", "w"] {
        let pieces_back = || lab.guest(guest).is_ok_and(|g| g["region_used"] == 0 && g["connections_live"] == 0);
        assert!(wait_until(Duration::from_secs(10), pieces_back), "{}", lab.daemon_log());
    }
    lab.stop_background();
}

/// Two VPCs with the same addresses, a VM in each: each VM's connect to
/// 10.10.0.3 reaches its own VPC's server; a process in one VM sees only
/// its own region, cannot open the other VM's control port, and a bell
/// stream it forges for any connection id is closed, while the other VM's
/// connection carries on.
#[test]
fn vms_in_two_vpcs_with_the_same_addresses_stay_apart() {
    let (image, host) = vm_host("");
    let body = format!(
        "{BODY}\n[[vpc]]\nname = \"red\"\ncidr = \"10.10.0.0/24\"\n\n\
         [[guest]]\nname = \"r\"\nvpc = \"red\"\naddresses = [\"10.10.0.3\"]\nsecurity_groups = [\"web\"]\n{}",
        second_vm("x", "red", "10.10.0.4", 6, "")
    );
    let mut lab = Lab::start_host("tvmvpc", &body, &host).unwrap();
    for (guest, tenant) in [("b", "blue"), ("r", "red")] {
        let args = vsocket_e2e::redis_server_args(7600, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        serve(&mut lab, guest, 7600, "redis-server", &args, &format!("{guest}.log"));
        let set =
            lab.run_ok(guest, Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "-p", "7600", "set", "tenant", tenant]);
        assert_eq!(set.unwrap().trim(), "OK");
    }
    let (v_paths, x_paths) = (backend_of(&lab, "v"), backend_of(&lab, "x"));
    // x keeps one connection to its VPC's server busy meanwhile.
    let x_script = attached(
        "python3 -c '\n\
         import socket, time\n\
         s = socket.create_connection((\"10.10.0.3\", 7600), timeout=10)\n\
         ok = 0\n\
         for _ in range(60):\n    \
             s.sendall(b\"GET tenant\\r\\n\")\n    \
             ok += s.recv(64) == b\"$3\\r\\nred\\r\\n\"\n    \
             time.sleep(0.1)\n\
         print(\"x rounds ok\", ok)\n'\n",
    );
    let x = Background::start(&image, &vm_boot(&x_script, &x_paths), lab.dir.join("x.log"));
    let x_connected = wait_until(Duration::from_secs(120), || lab.counter("x", "connections_out") == 1);
    assert!(x_connected, "x never connected:\n{}\n{}", x.console(), lab.daemon_log());
    let v_script = attached(&format!(
        "echo \"tenant $(redis-cli -h 10.10.0.3 -p 7600 get tenant)\"\n\
         env -u LD_PRELOAD python3 {} 6\n",
        asset("vm_neighbour.py").display()
    ));
    let v_output = image.run(&vm_boot(&v_script, &v_paths), Duration::from_secs(300));
    let x_status = x.wait_exit(Duration::from_secs(120));
    let v_output = v_output.unwrap_or_else(|e| panic!("{e}"));
    let v_out = String::from_utf8_lossy(&v_output.stdout);
    let x_out = x.console();
    let context = || format!("{v_out}\n{x_out}\n{}", lab.daemon_log());
    assert_eq!(exit_status(&v_out), Some(0), "{}", context());
    assert_eq!(x_status, Some(0), "{}", context());
    assert_eq!(line_after(&v_out, "tenant "), Some("blue"), "{}", context());
    assert_eq!(line_after(&v_out, "devices "), Some(format!("1 {REGION}").as_str()), "{}", context());
    assert!(line_after(&v_out, "neighbour control: ").is_some_and(|l| l.starts_with("refused")), "{}", context());
    assert_eq!(line_after(&v_out, "forged bells closed "), Some("128 of 128"), "{}", context());
    assert_eq!(line_after(&x_out, "x rounds ok "), Some("60"), "{}", context());
    for guest in ["v", "x"] {
        assert_eq!(lab.counter(guest, "fallbacks"), 0, "{}", context());
    }
    assert_eq!(lab.counter("b", "connections_in"), 1 + 1, "one redis-cli of b's own, one of v's");
    assert_eq!(lab.counter("r", "connections_in"), 1 + 1, "one redis-cli of r's own, one of x's");
    lab.stop_background();
}

/// The VM's attachment goes away under it (its vsock backend killed, as a
/// reset or a migration would take it) in the middle of a transfer: the
/// program in the VM gets an error rather than hanging, and the peer in a
/// namespace guest sees the end.
#[test]
fn a_vms_attachment_gone_ends_its_connections_on_both_sides() {
    let (image, host) = vm_host("");
    let mut lab = Lab::start_host("tvmreset", BODY, &host).unwrap();
    let transfer = serve_transfer(&mut lab, 7600);
    let paths = backend_of(&lab, "v");
    let script = attached(&format!(
        "python3 {transfer} send 10.10.0.3 7600 {} 8 2>/dev/null\necho \"sender exit $?\"\n",
        1u64 << 40
    ));
    let vm = Background::start(&image, &vm_boot(&script, &paths), lab.dir.join("console.log"));
    let flowing = wait_until(Duration::from_secs(120), || lab.counter("b", "bytes_received") > 8 << 20);
    assert!(flowing, "no transfer:\n{}\n{}", vm.console(), lab.daemon_log());
    // The backend is the process serving this VM's vhost-user socket.
    let pattern = format!("vhost-device-vsock.*{}", paths.uds.display());
    let killed = std::process::Command::new("pkill").args(["-KILL", "-f", &pattern]).status();
    assert!(killed.is_ok_and(|s| s.success()), "no backend to kill");
    let began = Instant::now();
    let vm_saw_it = wait_until(Duration::from_secs(30), || vm.console().contains("sender exit"));
    let vm_took = began.elapsed();
    let server_log = lab.dir.join("server.log");
    let peer_saw_it = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&server_log).is_ok_and(|log| log.contains("bytes=") || log.contains("Error"))
    });
    let context = || format!("{}\n{}", vm.console(), lab.daemon_log());
    assert!(vm_saw_it, "the program in the VM hung:\n{}", context());
    assert_ne!(line_after(&vm.console(), "sender exit "), Some("0"), "{}", context());
    assert!(peer_saw_it, "the peer never saw the end:\n{}", context());
    eprintln!("the VM's program saw the end {vm_took:?} after its backend was killed");
    let pieces_back = || lab.guest("v").is_ok_and(|v| v["region_used"] == 0);
    assert!(wait_until(Duration::from_secs(10), pieces_back), "{}", lab.daemon_log());
}

/// Servers in a VM accept as real servers do, with real clients in a
/// namespace guest: four prefork workers share one listening socket
/// (every answer whole and right, whichever worker reads the
/// announcement), a listener that accepts only after its clients waited
/// in its backlog longer than a client's bell may take still gets them,
/// and a policy change that denies a connection resets it at both ends
/// at once, the VM's end (behind the bridge) included.
#[test]
fn servers_in_a_vm_accept_as_they_would_from_the_kernel() {
    let (image, host) = vm_host("on_policy_change = \"reset\"");
    let body = BODY
        .replace("addresses = [\"10.10.0.4\"]", "addresses = [\"10.10.0.4\"]\nsecurity_groups = [\"web\"]")
        .replace("ports = \"7600\"", "ports = \"7600-7603\"");
    let mut lab = Lab::start_host("tvmaccept", &body, &host).unwrap();
    let paths = backend_of(&lab, "v");
    let acceptors = asset("vm_acceptors.py").to_string_lossy().into_owned();
    // The late listener accepts this long after listening: its clients
    // wait three times as long as a client's bell may take (the bridge's
    // BELL_TIMEOUT, 5 s).
    let delay = 15;
    let script = format!(
        "ip link set lo up && ip addr add 10.10.0.4/32 dev lo || exit 1\n\
         python3 {acceptors} serve 10.10.0.4 {delay}\nsleep 600\n"
    );
    let vm = Background::start(&image, &vm_boot(&attached(&script), &paths), lab.dir.join("console.log"));
    let served = wait_until(Duration::from_secs(120), || listening(&lab, "v", 3));
    assert!(served, "no listeners:\n{}", vm.console());
    let client = |what: &[&str], log: &str, lab: &mut Lab| {
        let mut args = vec![acceptors.as_str(), what[0], "10.10.0.4"];
        args.extend_from_slice(&what[1..]);
        lab.spawn("b", Via::Vsocket, "python3", &args, log).unwrap();
    };
    client(&["late"], "late.log", &mut lab);
    let log = |lab: &Lab, name: &str| std::fs::read_to_string(lab.dir.join(name)).unwrap_or_default();
    let burst = lab.run_ok("b", Via::Vsocket, "python3", &[&acceptors, "burst", "10.10.0.4", "160"]).unwrap();
    let context = |lab: &Lab| format!("{}\n{}", vm.console(), lab.daemon_log());
    let workers: u32 = line_after(&burst, "burst ok 160 workers ")
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("{burst}\n{}", context(&lab)));
    assert!(workers >= 2, "one worker took every connection: the test shows nothing\n{burst}");
    let late = wait_until(Duration::from_secs(120), || log(&lab, "late.log").contains("late ok"));
    assert!(late, "late.log: {}\n{}", log(&lab, "late.log"), context(&lab));
    assert!(!lab.daemon_log().contains("opened no bell stream"), "{}", context(&lab));
    // A held connection, then a policy change that denies it. The client
    // in b does not read for a while: the VM must hear of the reset from
    // the daemon, not from b's program closing its end.
    client(&["hold", "20"], "hold.log", &mut lab);
    let held = wait_until(Duration::from_secs(60), || {
        vm.console().contains("held: accepted") && log(&lab, "hold.log").contains("hold: connected")
    });
    assert!(held, "hold.log: {}\n{}", log(&lab, "hold.log"), context(&lab));
    let removed = lab.ctl_output(&["member", "remove", "v", "web"]).unwrap();
    assert!(removed.status.success(), "{}", String::from_utf8_lossy(&removed.stderr));
    let vm_reset = wait_until(Duration::from_secs(10), || vm.console().contains("held: reset"));
    assert!(vm_reset, "hold.log: {}\n{}", log(&lab, "hold.log"), context(&lab));
    assert!(!log(&lab, "hold.log").contains("hold: reset"), "b's client read too early to show anything");
    let b_reset = wait_until(Duration::from_secs(60), || log(&lab, "hold.log").contains("hold: reset"));
    assert!(b_reset, "hold.log: {}\n{}", log(&lab, "hold.log"), context(&lab));
    assert_eq!(lab.ctl("status").unwrap()["policy_resets"], 1);
    assert_eq!(lab.counter("b", "fallbacks"), 0);
}

/// The lab boots a config's VM guests (QEMU with the guest agent, once
/// vsocketd serves each), `vsocket run --guest VM` runs programs in them
/// with the library loaded and gives back their output and exit status,
/// and `vsocket lab down` stops them.
#[test]
fn the_lab_boots_vm_guests_and_runs_programs_in_them() {
    let (_image, host) = vm_host("");
    let body = BODY.replace("addresses = [\"10.10.0.4\"]", "addresses = [\"10.10.0.4\"]\nsecurity_groups = [\"web\"]");
    let mut lab = Lab::start_host("tvmagent", &body, &host).unwrap();
    serve_redis(&mut lab, 7600);
    // Before the VM boots, vsocket run says so at once.
    let early = lab.run("v", Via::Vsocket, "true", &[]).unwrap();
    assert_eq!(early.status.code(), Some(1), "{early:?}");
    assert!(String::from_utf8_lossy(&early.stderr).contains("VM guest v is not running"), "{early:?}");
    let said = lab.boot_vms().unwrap();
    assert!(said.contains("vm v: booting"), "{said}");
    // Output, error output and the exit status come back.
    let out = lab.run("v", Via::Vsocket, "sh", &["-c", "echo out; echo err >&2; exit 7"]).unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // The program runs with the library loaded and attached to its VM.
    let seen = lab
        .run_ok("v", Via::Vsocket, "sh", &["-c", "grep -c libvsocket /proc/self/maps; echo $VSOCKET_CONTROL"])
        .unwrap();
    let lines: Vec<&str> = seen.lines().collect();
    assert!(lines.len() == 2 && lines[0].parse::<u32>().is_ok_and(|n| n > 0) && lines[1] == "vsock", "{seen}");
    let kernel = lab.run_ok("v", Via::Kernel, "sh", &["-c", "grep -c libvsocket /proc/self/maps"]);
    assert!(kernel.is_err(), "--no-preload loads no library (grep finds nothing: {kernel:?})");
    // A real program reaches a namespace guest over vSocket.
    let set =
        lab.run_ok("v", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "-p", "7600", "set", "k", "from-the-lab"]);
    assert_eq!(set.unwrap().trim(), "OK");
    assert_eq!(lab.counter("v", "connections_out"), 1);
    // A program given the library but not VSOCKET_CONTROL finds its VM's
    // attachment in the file the agent wrote.
    let script = format!(
        "[ -z \"$VSOCKET_CONTROL\" ] && LD_PRELOAD={} redis-cli -h 10.10.0.3 -p 7600 get k",
        vsocket_e2e::bin("libvsocket.so").display()
    );
    let got = lab.run_ok("v", Via::Kernel, "sh", &["-c", &script]).unwrap();
    assert_eq!(got.trim(), "from-the-lab");
    assert_eq!(lab.counter("v", "connections_out"), 2);
    assert_eq!(lab.counter("v", "fallbacks"), 0);
    // The program's input is vsocket run's: a mebibyte piped in comes
    // out whole.
    let input: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let mut piped = lab.command("v", Via::Vsocket, "sha256sum", &[]);
    let mut child = piped
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input).map(|()| input));
    let out = child.wait_with_output().unwrap();
    let input = feeder.join().unwrap().unwrap();
    let mut local =
        std::process::Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut local.stdin.take().unwrap(), &input).unwrap();
    let expected = local.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&expected.stdout));
    // vsocket run killed: the program in the VM, and what it started, die
    // with it rather than run on unseen.
    let mut held = lab.command("v", Via::Vsocket, "sh", &["-c", "sleep 997 & echo started; exec sleep 998"]);
    let mut held = held.stdin(Stdio::null()).stdout(Stdio::piped()).spawn().unwrap();
    let mut started = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(held.stdout.take().unwrap()), &mut started).unwrap();
    assert_eq!(started, "started\n");
    let count = || lab.run("v", Via::Kernel, "pgrep", &["-c", "-f", "sleep 99[78]"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&count().stdout).trim(), "2");
    held.kill().unwrap();
    let _ = held.wait();
    let gone = wait_until(Duration::from_secs(20), || String::from_utf8_lossy(&count().stdout).trim() == "0");
    assert!(gone, "the programs outlived vsocket run: {}", String::from_utf8_lossy(&count().stdout));
    // A program that cannot be started is said so, with its own code.
    let missing = lab.run("v", Via::Vsocket, "no-such-program", &[]).unwrap();
    assert_eq!(missing.status.code(), Some(127), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no-such-program"), "{missing:?}");
    // The lab shows the VM running, and stops it.
    let status = std::process::Command::new(vsocket_e2e::bin("vsocket"))
        .args(["lab", "status", "--config"])
        .arg(&lab.config)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let pid: u32 = line_after(&status, "vm v: running (pid ")
        .and_then(|rest| rest.trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("{status}"));
    let down = std::process::Command::new(vsocket_e2e::bin("vsocket"))
        .args(["lab", "down", "--config"])
        .arg(&lab.config)
        .status()
        .unwrap();
    assert!(down.success());
    // Gone, or a zombie its new parent has yet to reap.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z')), "{stat}");
}
