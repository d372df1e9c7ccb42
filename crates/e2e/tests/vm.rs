//! VM guests attach to vsocketd: a process in a QEMU guest (TCG) opens a
//! control stream over its vsock device, whose backend vsocketd runs for
//! that VM alone, and is known as that guest by the daemon. Policy decides
//! its connects; one it allows is placed in the VM's region.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vsocket_admin::paths::vm_paths;
use vsocket_cli::vm::{exit_status, vsock_backend, Boot, Image};
use vsocket_e2e::{asset, Lab, Via};

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
fn vm_boot<'a>(script: &'a str, paths: &'a vsocket_admin::paths::VmPaths) -> Boot<'a> {
    Boot { memory_mib: 512, script, vsock: Some(&paths.vhost), region: Some((&paths.region, REGION)) }
}

fn cache() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/vm-cache")
}

#[test]
fn a_vm_guest_attaches_and_its_connects_follow_policy() {
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("deny_action = \"reject\"\nvsock_backend = \"{}\"", backend.display());
    let mut lab = Lab::start_host("tvm", BODY, &host).unwrap();
    let echo = asset("kernel_echo.py");
    // Listeners on both ports: with none, a connect takes the kernel path
    // before policy is asked (the kernel's network is the judge there).
    for port in ["7600", "7601"] {
        lab.spawn("b", Via::Vsocket, "python3", &[echo.to_str().unwrap(), "10.10.0.3", port], "echo.log").unwrap();
        lab.wait_listening("b", port.parse().unwrap()).unwrap();
    }

    let paths = vm_paths(&lab.run_dir, "v");
    let began = Instant::now();
    while !paths.vhost.exists() {
        assert!(began.elapsed() < Duration::from_secs(10), "no vsock backend:\n{}", lab.daemon_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let boot = vm_boot(SCRIPT, &paths);
    let output = image.run(&boot, Duration::from_secs(180)).unwrap_or_else(|e| panic!("{e}"));
    let console = String::from_utf8_lossy(&output.stdout);
    assert_eq!(exit_status(&console), Some(0), "{console}\n{}", String::from_utf8_lossy(&output.stderr));
    // CONNECTED_AT (kind 9): allowed, placed in the VM's region; REFUSED
    // (kind 4) with ECONNREFUSED (111): denied, as deny_action = "reject"
    // says.
    assert!(console.lines().any(|l| l.trim().starts_with("allowed 09")), "{console}");
    assert!(console.lines().any(|l| l.trim() == "denied 046f000000"), "{console}");
    // The daemon made the region the config gives, and QEMU mapped it.
    assert!(console.lines().any(|l| l.trim() == format!("region {REGION}")), "{console}");
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
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("vsock_backend = \"{}\"", backend.display());
    let body = BODY.replace("ports = \"7600\"", "ports = \"7600-7601\"");
    let mut lab = Lab::start_host("tvmdata", &body, &host).unwrap();
    let redis_args = vsocket_e2e::redis_server_args(7600, &[]);
    let redis_args: Vec<&str> = redis_args.iter().map(String::as_str).collect();
    lab.spawn("b", Via::Vsocket, "redis-server", &redis_args, "redis.log").unwrap();
    lab.wait_listening("b", 7600).unwrap();
    let transfer = asset("transfer.py");
    let transfer = transfer.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[transfer, "serve", "10.10.0.3", "7601"], "server.log").unwrap();
    lab.wait_listening("b", 7601).unwrap();

    let paths = vm_paths(&lab.run_dir, "v");
    let began = Instant::now();
    while !paths.vhost.exists() {
        assert!(began.elapsed() < Duration::from_secs(10), "no vsock backend:\n{}", lab.daemon_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let library = vsocket_e2e::bin("libvsocket.so");
    let script = format!(
        "export LD_PRELOAD={} VSOCKET_CONTROL=vsock\n\
         redis-cli -h 10.10.0.3 -p 7600 set greeting hello-from-a-vm\n\
         echo \"got $(redis-cli -h 10.10.0.3 -p 7600 get greeting)\"\n\
         echo \"sent $(python3 {transfer} send 10.10.0.3 7601 {BYTES} 4242)\"\n",
        library.display()
    );
    let boot = vm_boot(&script, &paths);
    let output = image.run(&boot, Duration::from_secs(400)).unwrap_or_else(|e| panic!("{e}"));
    let console = String::from_utf8_lossy(&output.stdout);
    let context = || format!("{console}\n{}\n{}", String::from_utf8_lossy(&output.stderr), lab.daemon_log());
    assert_eq!(exit_status(&console), Some(0), "{}", context());
    assert!(console.lines().any(|l| l.trim() == "got hello-from-a-vm"), "{}", context());
    let sent = console.lines().find_map(|l| l.trim().strip_prefix("sent ")).unwrap_or_else(|| panic!("{}", context()));
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
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || lab.counter("v", "region_used") == 0));
}

/// QEMU killed in the middle of a transfer: the namespace guest's end of
/// the connection ends (EOF or ECONNRESET) within the documented bound,
/// and the daemon's descriptors come back to what they were.
#[test]
fn a_vm_killed_mid_transfer_ends_its_peers_connection() {
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("vsock_backend = \"{}\"", backend.display());
    let mut lab = Lab::start_host("tvmkill", BODY, &host).unwrap();
    let transfer = asset("transfer.py");
    let transfer = transfer.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[transfer, "serve", "10.10.0.3", "7600"], "server.log").unwrap();
    lab.wait_listening("b", 7600).unwrap();
    let paths = vm_paths(&lab.run_dir, "v");
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || paths.vhost.exists()), "{}", lab.daemon_log());
    let before = lab.daemon_fds().unwrap();

    let script = format!(
        "export LD_PRELOAD={} VSOCKET_CONTROL=vsock\npython3 {transfer} send 10.10.0.3 7600 {} 99\n",
        vsocket_e2e::bin("libvsocket.so").display(),
        1u64 << 40
    );
    let boot = vm_boot(&script, &paths);
    let console = lab.dir.join("console.log");
    let mut qemu = image
        .command(&boot)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(console.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let flowing = vsocket_e2e::wait_until(Duration::from_secs(120), || lab.counter("b", "bytes_received") > 8 << 20);
    if !flowing {
        let _ = qemu.kill();
        panic!("no transfer:\n{}\n{}", std::fs::read_to_string(&console).unwrap_or_default(), lab.daemon_log());
    }
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    let killed = Instant::now();
    let server_log = lab.dir.join("server.log");
    let ended = vsocket_e2e::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&server_log).is_ok_and(|log| log.contains("bytes=") || log.contains("Error"))
    });
    assert!(ended, "the namespace guest's end never ended:\n{}", lab.daemon_log());
    eprintln!("peer saw the end {:?} after QEMU was killed", killed.elapsed());
    // The VM's streams, pieces and the connection's record are gone.
    assert!(
        vsocket_e2e::wait_until(Duration::from_secs(10), || lab.daemon_fds().is_ok_and(|n| n <= before)),
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
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("vsock_backend = \"{}\"", backend.display());
    let body = BODY.replace("addresses = [\"10.10.0.4\"]", "addresses = [\"10.10.0.4\"]\nsecurity_groups = [\"web\"]");
    let lab = Lab::start_host("tvmredis", &body, &host).unwrap();
    let paths = vm_paths(&lab.run_dir, "v");
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || paths.vhost.exists()), "{}", lab.daemon_log());
    // The VM has its VPC address (on its loopback: it has no network
    // device at all), as a cloud VM has it on its NIC.
    let script = format!(
        "ip link set lo up && ip addr add 10.10.0.4/32 dev lo || exit 1\n\
         export LD_PRELOAD={} VSOCKET_CONTROL=vsock\n\
         exec redis-server --port 7600 --bind 10.10.0.4 --save '' --appendonly no --protected-mode no\n",
        vsocket_e2e::bin("libvsocket.so").display()
    );
    let boot = vm_boot(&script, &paths);
    let console = lab.dir.join("console.log");
    let mut qemu = image
        .command(&boot)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(console.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let registered = vsocket_e2e::wait_until(Duration::from_secs(120), || {
            lab.ctl("listeners").is_ok_and(|l| l.as_array().is_some_and(|l| l.iter().any(|l| l["guest"] == "v")))
        });
        let qemu_said = std::fs::read_to_string(console.with_extension("err")).unwrap_or_default();
        let console = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(registered, "no listener in the VM:\n{console}\n{qemu_said}");
        let cli = |args: &[&str]| {
            let mut all = vec!["-h", "10.10.0.4", "-p", "7600"];
            all.extend_from_slice(args);
            lab.run_ok("b", Via::Vsocket, "redis-cli", &all).unwrap().trim().to_string()
        };
        assert_eq!(cli(&["set", "greeting", "hello-vm"]), "OK");
        assert_eq!(cli(&["get", "greeting"]), "hello-vm");
        let out = lab
            .run_ok(
                "b",
                Via::Vsocket,
                "redis-benchmark",
                &["-h", "10.10.0.4", "-p", "7600", "-t", "set,get", "-n", "2000", "-c", "4", "-r", "100", "-q"],
            )
            .unwrap();
        let rates = vsocket_e2e::redis_benchmark_rates(&out);
        assert_eq!(rates.len(), 2, "benchmark output: {out}");
        let keys: u64 = cli(&["dbsize"]).parse().unwrap();
        assert!(keys > 50, "dbsize {keys}");
        // Every connection was brokered to the VM, none took the kernel.
        let b = lab.guest("b").unwrap();
        let v = lab.guest("v").unwrap();
        assert_eq!(b["fallbacks"], 0, "{b}");
        assert!(b["connections_out"].as_u64().unwrap() >= 3 + 4, "{b}");
        assert_eq!(b["connections_out"], v["connections_in"]);
        assert!(v["bytes_received"].as_u64().unwrap() > 2000 * 20, "{v}");
        assert_eq!(b["bytes_sent"], v["bytes_received"], "the bridge's count is the connection's metering");
        assert_eq!(b["bytes_received"], v["bytes_sent"]);
    }));
    let _ = qemu.kill();
    let _ = qemu.wait();
    if let Err(panic) = checked {
        eprintln!("{}", std::fs::read_to_string(&console).unwrap_or_default());
        eprintln!("{}", lab.daemon_log());
        std::panic::resume_unwind(panic);
    }
}

/// Two VMs on one host talk over vSocket, as their security groups say:
/// redis-cli and redis-benchmark in one VM reach redis-server in the
/// other on an allowed port (both ends pieces of their own VMs' regions,
/// the bridge between them), and a port no rule allows is refused.
#[test]
fn two_vms_talk_over_vsocket_as_their_security_groups_allow() {
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("deny_action = \"reject\"\nvsock_backend = \"{}\"", backend.display());
    let body = format!(
        "{BODY}\n[[guest]]\nname = \"w\"\nvpc = \"blue\"\naddresses = [\"10.10.0.5\"]\nsecurity_groups = [\"web\"]\n\
         max_shared_memory = \"64MiB\"\n[guest.vm]\ncid = 6\nregion = \"16MiB\"\n"
    );
    let lab = Lab::start_host("tvmvm", &body, &host).unwrap();
    let library = vsocket_e2e::bin("libvsocket.so");
    let (server_paths, client_paths) = (vm_paths(&lab.run_dir, "w"), vm_paths(&lab.run_dir, "v"));
    let backends_up = || server_paths.vhost.exists() && client_paths.vhost.exists();
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), backends_up), "{}", lab.daemon_log());
    let redis = "--save '' --appendonly no --protected-mode no --bind 10.10.0.5";
    let server_script = format!(
        "ip link set lo up && ip addr add 10.10.0.5/32 dev lo || exit 1\n\
         export LD_PRELOAD={} VSOCKET_CONTROL=vsock\n\
         redis-server --port 7601 {redis} --daemonize yes\n\
         exec redis-server --port 7600 {redis}\n",
        library.display()
    );
    let server_boot = vm_boot(&server_script, &server_paths);
    let console = lab.dir.join("server-console.log");
    let mut server = image
        .command(&server_boot)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(console.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let listening = vsocket_e2e::wait_until(Duration::from_secs(120), || {
            lab.ctl("listeners")
                .is_ok_and(|l| l.as_array().is_some_and(|l| l.iter().filter(|l| l["guest"] == "w").count() == 2))
        });
        let qemu_said = std::fs::read_to_string(console.with_extension("err")).unwrap_or_default();
        let console = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(listening, "no listeners in the server VM:\n{console}\n{qemu_said}");
        let client_script = format!(
            "export LD_PRELOAD={} VSOCKET_CONTROL=vsock\n\
             echo \"set $(redis-cli -h 10.10.0.5 -p 7600 set greeting from-another-vm)\"\n\
             echo \"get $(redis-cli -h 10.10.0.5 -p 7600 get greeting)\"\n\
             redis-benchmark -h 10.10.0.5 -p 7600 -t set,get -n 500 -c 2 -q\n\
             echo \"denied $(redis-cli -h 10.10.0.5 -p 7601 ping 2>&1)\"\n",
            library.display()
        );
        let client_boot = vm_boot(&client_script, &client_paths);
        let output = image.run(&client_boot, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
        let out = String::from_utf8_lossy(&output.stdout);
        assert_eq!(exit_status(&out), Some(0), "{out}");
        assert!(out.lines().any(|l| l.trim() == "set OK"), "{out}");
        assert!(out.lines().any(|l| l.trim() == "get from-another-vm"), "{out}");
        assert_eq!(vsocket_e2e::redis_benchmark_rates(&out).len(), 2, "{out}");
        let denied = out.lines().find(|l| l.trim().starts_with("denied")).unwrap_or_else(|| panic!("{out}"));
        assert!(denied.contains("refused"), "{denied}");
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
        assert!(vsocket_e2e::wait_until(Duration::from_secs(10), pieces_back), "{}", lab.daemon_log());
    }));
    let _ = server.kill();
    let _ = server.wait();
    if let Err(panic) = checked {
        eprintln!("{}", std::fs::read_to_string(&console).unwrap_or_default());
        eprintln!("{}", lab.daemon_log());
        std::panic::resume_unwind(panic);
    }
}

/// A VM guest on one host reaches a namespace guest on another over the
/// fabric, and is reached from it: the VM's piece, the bridge, a segment
/// whose far end is the relay, the link, and the other host's relay and
/// guest.
#[test]
fn a_vm_on_one_host_reaches_a_guest_on_another_over_the_fabric() {
    const BYTES: u64 = 16 << 20;
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("vsock_backend = \"{}\"", backend.display());
    let body = BODY
        .replace("ports = \"7600\"", "ports = \"7600-7602\"")
        .replace("addresses = [\"10.10.0.4\"]", "addresses = [\"10.10.0.4\"]\nsecurity_groups = [\"web\"]");
    let (first, mut second) = Lab::start_pair("tvmfab", [&body, &body], [&host, ""], "tcp", &["b"]).unwrap();
    let redis_args = vsocket_e2e::redis_server_args(7600, &[]);
    let redis_args: Vec<&str> = redis_args.iter().map(String::as_str).collect();
    second.spawn("b", Via::Vsocket, "redis-server", &redis_args, "redis.log").unwrap();
    second.wait_listening("b", 7600).unwrap();
    let transfer = asset("transfer.py");
    let transfer = transfer.to_str().unwrap();
    second.spawn("b", Via::Vsocket, "python3", &[transfer, "serve", "10.10.0.3", "7601"], "server.log").unwrap();
    second.wait_listening("b", 7601).unwrap();

    let paths = vm_paths(&first.run_dir, "v");
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || paths.vhost.exists()), "{}", first.daemon_log());
    // The VM also serves: a redis-server the other host's guest reaches,
    // and the VM stays up until that guest says it is done (a list it
    // pushes to on its own redis, which the VM waits on).
    let script = format!(
        "ip link set lo up && ip addr add 10.10.0.4/32 dev lo || exit 1\n\
         export LD_PRELOAD={} VSOCKET_CONTROL=vsock\n\
         redis-server --port 7602 --bind 10.10.0.4 --save '' --appendonly no --protected-mode no --daemonize yes\n\
         redis-cli -h 10.10.0.3 -p 7600 set greeting across-hosts\n\
         echo \"got $(redis-cli -h 10.10.0.3 -p 7600 get greeting)\"\n\
         echo \"sent $(python3 {transfer} send 10.10.0.3 7601 {BYTES} 77)\"\n\
         echo \"released $(redis-cli -h 10.10.0.3 -p 7600 blpop served 120)\"\n",
        vsocket_e2e::bin("libvsocket.so").display()
    );
    let boot = vm_boot(&script, &paths);
    let output = std::thread::scope(|scope| {
        let served = scope.spawn(|| {
            let registered = vsocket_e2e::wait_until(Duration::from_secs(120), || {
                first.ctl("listeners").is_ok_and(|l| l.as_array().is_some_and(|l| l.iter().any(|l| l["guest"] == "v")))
            });
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
        let output = image.run(&boot, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
        let answers = served.join().unwrap().expect("no listener in the VM");
        assert_eq!(answers[0].as_deref().ok(), Some("OK"), "{answers:?}");
        assert_eq!(answers[1].as_deref().ok(), Some("from-another-host"), "{answers:?}");
        output
    });
    let console = String::from_utf8_lossy(&output.stdout);
    let context = || format!("{console}\n{}\n{}", first.daemon_log(), second.daemon_log());
    assert_eq!(exit_status(&console), Some(0), "{}", context());
    assert!(console.lines().any(|l| l.trim() == "got across-hosts"), "{}", context());
    let sent = console.lines().find_map(|l| l.trim().strip_prefix("sent ")).unwrap_or_else(|| panic!("{}", context()));
    assert!(sent.starts_with(&format!("bytes={BYTES} sha256=")), "{}", context());
    assert_eq!(first.counter("v", "fallbacks"), 0, "{}", context());
    let sent = sent.to_string();
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
/// arrives intact meanwhile, the VM's next connection works, and the
/// daemon's descriptors and the VM's pieces come back.
#[test]
fn a_vm_scribbling_on_its_region_breaks_only_its_own_connections() {
    const BYTES: u64 = 256 << 20;
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("vsock_backend = \"{}\"", backend.display());
    let body = format!(
        "{}\n[[guest]]\nname = \"a\"\nvpc = \"blue\"\naddresses = [\"10.10.0.2\"]\n",
        BODY.replace("ports = \"7600\"", "ports = \"7600-7601\"")
    );
    let mut lab = Lab::start_host("tvmhost", &body, &host).unwrap();
    let redis_args = vsocket_e2e::redis_server_args(7600, &[]);
    let redis_args: Vec<&str> = redis_args.iter().map(String::as_str).collect();
    lab.spawn("b", Via::Vsocket, "redis-server", &redis_args, "redis.log").unwrap();
    lab.wait_listening("b", 7600).unwrap();
    let transfer = asset("transfer.py");
    let transfer = transfer.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[transfer, "serve", "10.10.0.3", "7601"], "server.log").unwrap();
    lab.wait_listening("b", 7601).unwrap();
    let paths = vm_paths(&lab.run_dir, "v");
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || paths.vhost.exists()), "{}", lab.daemon_log());
    let before = lab.daemon_fds().unwrap();

    let script = format!(
        "export LD_PRELOAD={} VSOCKET_CONTROL=vsock\npython3 {} hold 10.10.0.3 7600\n",
        vsocket_e2e::bin("libvsocket.so").display(),
        asset("vm_hostile.py").display()
    );
    let console = lab.dir.join("console.log");
    let mut qemu = image
        .command(&vm_boot(&script, &paths))
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(console.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let read_console = || std::fs::read_to_string(&console).unwrap_or_default();
    let held = vsocket_e2e::wait_until(Duration::from_secs(120), || read_console().contains("held 4"));
    // Two other guests move a quarter gibibyte while the VM scribbles.
    let sent = held.then(|| {
        let args = [transfer, "send", "10.10.0.3", "7601", &BYTES.to_string(), "5"];
        lab.run_ok("a", Via::Vsocket, "python3", &args)
    });
    let exited = vsocket_e2e::wait_until(Duration::from_secs(180), || exit_status(&read_console()).is_some());
    if !exited {
        let _ = qemu.kill();
    }
    let _ = qemu.wait();
    let out = read_console();
    let context = || format!("{out}\n{}", lab.daemon_log());
    assert!(held, "{}", context());
    assert_eq!(exit_status(&out), Some(0), "{}", context());
    assert!(out.contains("scribbled"), "{}", context());
    assert!(out.lines().any(|l| l.trim() == "fresh PONG"), "a new connection after the scribbling: {}", context());
    // The daemon serves on; the other guests' redis too.
    let pong = lab.run_ok("a", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "-p", "7600", "ping"]).unwrap();
    assert_eq!(pong.trim(), "PONG");
    let sent = sent.unwrap().unwrap();
    lab.stop_background();
    let received = std::fs::read_to_string(lab.dir.join("server.log")).unwrap();
    assert_eq!(received.trim(), sent.trim(), "the other guests' transfer was touched");
    assert_eq!(lab.counter("a", "fallbacks"), 0);
    let pieces_back = || lab.guest("v").is_ok_and(|v| v["region_used"] == 0);
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), pieces_back), "{}", lab.daemon_log());
    assert!(
        vsocket_e2e::wait_until(Duration::from_secs(10), || lab.daemon_fds().is_ok_and(|n| n <= before)),
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
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("vsock_backend = \"{}\"", backend.display());
    // v may hold 3 connections; w's region has room for one.
    let body = format!(
        "{}\n[[guest]]\nname = \"w\"\nvpc = \"blue\"\naddresses = [\"10.10.0.5\"]\n[guest.vm]\ncid = 6\nregion = \"1MiB\"\n",
        BODY.replace("ports = \"7600\"", "ports = \"7600-7601\"")
            .replace("max_shared_memory = \"64MiB\"", "max_shared_memory = \"64MiB\"\nmax_connections = 3")
    );
    let mut lab = Lab::start_host("tvmquota", &body, &host).unwrap();
    lab.spawn(
        "b",
        Via::Vsocket,
        "python3",
        &[&asset("kernel_echo.py").to_string_lossy(), "10.10.0.3", "7600"],
        "echo.log",
    )
    .unwrap();
    lab.wait_listening("b", 7600).unwrap();
    let transfer = asset("transfer.py");
    let transfer = transfer.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[transfer, "serve", "10.10.0.3", "7601"], "server.log").unwrap();
    lab.wait_listening("b", 7601).unwrap();
    let library = vsocket_e2e::bin("libvsocket.so");
    // Connections until one is refused; then the transfer, metered.
    let hold = "python3 -c '\n\
        import errno, socket\n\
        held = []\n\
        try:\n    \
            while len(held) < 10:\n        \
                held.append(socket.create_connection((\"10.10.0.3\", 7600), timeout=5))\n\
        except OSError as e:\n    \
            print(\"refused after\", len(held), errno.errorcode[e.errno])\n'\n";
    for (guest, then) in [("v", format!("python3 {transfer} send 10.10.0.3 7601 {BYTES} 3\n")), ("w", String::new())] {
        let paths = vm_paths(&lab.run_dir, guest);
        assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || paths.vhost.exists()), "{}", lab.daemon_log());
        let script = format!("export LD_PRELOAD={} VSOCKET_CONTROL=vsock\n{hold}{then}", library.display());
        let boot = Boot {
            region: Some((&paths.region, if guest == "w" { 1 << 20 } else { REGION })),
            ..vm_boot(&script, &paths)
        };
        let output = image.run(&boot, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"));
        let console = String::from_utf8_lossy(&output.stdout);
        assert_eq!(exit_status(&console), Some(0), "{console}\n{}", lab.daemon_log());
        let expected = if guest == "v" { "refused after 3 EADDRNOTAVAIL" } else { "refused after 1 ENOBUFS" };
        assert!(console.lines().any(|l| l.trim() == expected), "{guest}: {console}\n{}", lab.daemon_log());
    }
    let (v, w) = (lab.guest("v").unwrap(), lab.guest("w").unwrap());
    assert!(v["exceeded_connections"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["fallbacks"], 0, "{v}");
    assert_eq!(w["fallbacks"], 0, "{w}");
    // Exact: the transfer's bytes, and nothing else (the held connections
    // sent nothing), however the bytes were cut up on the way.
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || lab
        .guest("v")
        .is_ok_and(|v| v["bytes_sent"] == BYTES)));
    assert_eq!(lab.counter("v", "bytes_received"), 0);
    assert_eq!(lab.counter("b", "bytes_received"), BYTES);
    assert_eq!(lab.counter("w", "bytes_sent"), 0);
    for guest in ["v", "w"] {
        let pieces_back = || lab.guest(guest).is_ok_and(|g| g["region_used"] == 0 && g["connections_live"] == 0);
        assert!(vsocket_e2e::wait_until(Duration::from_secs(10), pieces_back), "{}", lab.daemon_log());
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
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("vsock_backend = \"{}\"", backend.display());
    let body = format!(
        "{BODY}\n[[vpc]]\nname = \"red\"\ncidr = \"10.10.0.0/24\"\n\n\
         [[guest]]\nname = \"r\"\nvpc = \"red\"\naddresses = [\"10.10.0.3\"]\nsecurity_groups = [\"web\"]\n\n\
         [[guest]]\nname = \"x\"\nvpc = \"red\"\naddresses = [\"10.10.0.4\"]\n[guest.vm]\ncid = 6\nregion = \"8MiB\"\n"
    );
    let mut lab = Lab::start_host("tvmvpc", &body, &host).unwrap();
    for (guest, tenant) in [("b", "blue"), ("r", "red")] {
        let args = vsocket_e2e::redis_server_args(7600, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(guest, Via::Vsocket, "redis-server", &args, &format!("{guest}.log")).unwrap();
        lab.wait_listening(guest, 7600).unwrap();
        let set =
            lab.run_ok(guest, Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "-p", "7600", "set", "tenant", tenant]);
        assert_eq!(set.unwrap().trim(), "OK");
    }
    let library = vsocket_e2e::bin("libvsocket.so");
    let (v_paths, x_paths) = (vm_paths(&lab.run_dir, "v"), vm_paths(&lab.run_dir, "x"));
    let backends_up = || v_paths.vhost.exists() && x_paths.vhost.exists();
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), backends_up), "{}", lab.daemon_log());
    // x keeps one connection to its VPC's server busy meanwhile.
    let x_script = format!(
        "export LD_PRELOAD={} VSOCKET_CONTROL=vsock\npython3 -c '\n\
         import socket, time\n\
         s = socket.create_connection((\"10.10.0.3\", 7600), timeout=10)\n\
         ok = 0\n\
         for _ in range(60):\n    \
             s.sendall(b\"GET tenant\\r\\n\")\n    \
             ok += s.recv(64) == b\"$3\\r\\nred\\r\\n\"\n    \
             time.sleep(0.1)\n\
         print(\"x rounds ok\", ok)\n'\n",
        library.display()
    );
    let x_boot = Boot { region: Some((&x_paths.region, 8 << 20)), ..vm_boot(&x_script, &x_paths) };
    let x_console = lab.dir.join("x-console.log");
    let mut x = image
        .command(&x_boot)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&x_console).unwrap())
        .stderr(std::fs::File::create(x_console.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let x_connected = vsocket_e2e::wait_until(Duration::from_secs(120), || lab.counter("x", "connections_out") == 1);
    let v_script = format!(
        "export LD_PRELOAD={} VSOCKET_CONTROL=vsock\n\
         echo \"tenant $(redis-cli -h 10.10.0.3 -p 7600 get tenant)\"\n\
         env -u LD_PRELOAD python3 {} 6\n",
        library.display(),
        asset("vm_neighbour.py").display()
    );
    let v_output = x_connected.then(|| image.run(&vm_boot(&v_script, &v_paths), Duration::from_secs(300)));
    let x_done = vsocket_e2e::wait_until(Duration::from_secs(120), || {
        exit_status(&std::fs::read_to_string(&x_console).unwrap_or_default()).is_some()
    });
    if !x_done {
        let _ = x.kill();
    }
    let _ = x.wait();
    let x_out = std::fs::read_to_string(&x_console).unwrap_or_default();
    assert!(x_connected, "x never connected:\n{x_out}\n{}", lab.daemon_log());
    let v_output = v_output.unwrap().unwrap_or_else(|e| panic!("{e}"));
    let v_out = String::from_utf8_lossy(&v_output.stdout);
    let context = || format!("{v_out}\n{x_out}\n{}", lab.daemon_log());
    assert_eq!(exit_status(&v_out), Some(0), "{}", context());
    assert!(v_out.lines().any(|l| l.trim() == "tenant blue"), "{}", context());
    assert!(v_out.lines().any(|l| l.trim() == format!("devices 1 {REGION}")), "{}", context());
    assert!(v_out.lines().any(|l| l.trim().starts_with("neighbour control: refused")), "{}", context());
    assert!(v_out.lines().any(|l| l.trim() == "forged bells closed 128 of 128"), "{}", context());
    assert!(x_out.lines().any(|l| l.trim() == "x rounds ok 60"), "{}", context());
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
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let host = format!("vsock_backend = \"{}\"", backend.display());
    let mut lab = Lab::start_host("tvmreset", BODY, &host).unwrap();
    let transfer = asset("transfer.py");
    let transfer = transfer.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[transfer, "serve", "10.10.0.3", "7600"], "server.log").unwrap();
    lab.wait_listening("b", 7600).unwrap();
    let paths = vm_paths(&lab.run_dir, "v");
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || paths.vhost.exists()), "{}", lab.daemon_log());
    let script = format!(
        "export LD_PRELOAD={} VSOCKET_CONTROL=vsock\n\
         python3 {transfer} send 10.10.0.3 7600 {} 8 2>/dev/null\necho \"sender exit $?\"\n",
        vsocket_e2e::bin("libvsocket.so").display(),
        1u64 << 40
    );
    let console = lab.dir.join("console.log");
    let mut qemu = image
        .command(&vm_boot(&script, &paths))
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(console.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    let flowing = vsocket_e2e::wait_until(Duration::from_secs(120), || lab.counter("b", "bytes_received") > 8 << 20);
    // The backend is the process serving this VM's vhost-user socket.
    let uds = paths.uds.to_string_lossy().into_owned();
    let killed = flowing
        && std::process::Command::new("pkill")
            .args(["-KILL", "-f", &format!("vhost-device-vsock.*{uds}")])
            .status()
            .is_ok_and(|s| s.success());
    let read_console = || std::fs::read_to_string(&console).unwrap_or_default();
    let began = Instant::now();
    let vm_saw_it =
        killed && vsocket_e2e::wait_until(Duration::from_secs(30), || read_console().contains("sender exit"));
    let vm_took = began.elapsed();
    let server_log = lab.dir.join("server.log");
    let peer_saw_it = vsocket_e2e::wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&server_log).is_ok_and(|log| log.contains("bytes=") || log.contains("Error"))
    });
    let _ = qemu.kill();
    let _ = qemu.wait();
    let context = || format!("{}\n{}", read_console(), lab.daemon_log());
    assert!(flowing && killed, "no transfer, or no backend to kill:\n{}", context());
    assert!(vm_saw_it, "the program in the VM hung:\n{}", context());
    assert!(!read_console().contains("sender exit 0"), "{}", context());
    assert!(peer_saw_it, "the peer never saw the end:\n{}", context());
    eprintln!("the VM's program saw the end {vm_took:?} after its backend was killed");
    let pieces_back = || lab.guest("v").is_ok_and(|v| v["region_used"] == 0);
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), pieces_back), "{}", lab.daemon_log());
}
