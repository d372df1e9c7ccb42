//! Address families and loopback: dual-stack IPv6 sockets carrying IPv4
//! flows, and connections inside one guest (to 127.0.0.1 or to the
//! guest's own address), all over vSocket.

use std::time::Duration;
use vsocket_e2e::{asset, redis_server_args, wait_until, Lab, Via, TWO_GUESTS};

fn addrs() -> String {
    asset("addrs.py").to_str().unwrap().to_string()
}

#[test]
fn dual_stack_server_on_ipv6_any_takes_ipv4_clients() {
    let mut lab = Lab::start("tdual", TWO_GUESTS).unwrap();
    let s = addrs();
    lab.spawn("b", Via::Vsocket, "python3", &[&s, "serve", "inet6", "::", "8300"], "server.log").unwrap();
    lab.wait_listening("b", 8300).unwrap();
    // An AF_INET client, then an AF_INET6 client using the mapped address.
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[&s, "connect", "10.10.0.3", "8300"]).unwrap();
    let (server, client) = out.trim().split_once(" | ").unwrap();
    assert!(server.starts_with("server peer=::ffff:10.10.0.2:"), "{out}");
    assert!(server.ends_with("local=::ffff:10.10.0.3:8300"), "{out}");
    assert!(client.starts_with("client local=10.10.0.2:") && client.ends_with("peer=10.10.0.3:8300"), "{out}");
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[&s, "connect", "::ffff:10.10.0.3", "8300"]).unwrap();
    let (server, client) = out.trim().split_once(" | ").unwrap();
    assert!(server.starts_with("server peer=::ffff:10.10.0.2:"), "{out}");
    assert!(client.starts_with("client local=::ffff:10.10.0.2:"), "{out}");
    assert!(client.ends_with("peer=::ffff:10.10.0.3:8300"), "{out}");
    assert_eq!(lab.counter("a", "connections_out"), 2);
    assert_eq!(lab.counter("b", "connections_in"), 2);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

#[test]
fn node_server_listening_without_an_address_is_reached_over_vsocket() {
    // `server.listen(port)` binds `::`, dual-stack: Node's (and Java's)
    // default.
    let mut lab = Lab::start("tnode6", TWO_GUESTS).unwrap();
    let server = "require('http').createServer((q, s) => s.end(`hi ${q.socket.remoteAddress} ${q.socket.localAddress}`)).listen(8310)";
    lab.spawn("b", Via::Vsocket, "node", &["-e", server], "node.log").unwrap();
    lab.wait_listening("b", 8310).unwrap();
    let out = lab.run_ok("a", Via::Vsocket, "curl", &["-sS", "http://10.10.0.3:8310/"]).unwrap();
    assert_eq!(out, "hi ::ffff:10.10.0.2 ::ffff:10.10.0.3");
    assert_eq!(lab.counter("a", "connections_out"), 1);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

#[test]
fn redis_with_its_default_bind_of_both_families() {
    // redis' default `bind * -::*`: an IPv4 socket and an IPv6-only one.
    let mut lab = Lab::start("tredis6", TWO_GUESTS).unwrap();
    let mut args = redis_server_args(6390, &[]);
    let at = args.iter().position(|a| a == "--bind").unwrap();
    args.splice(at..at + 2, ["--bind".to_string(), "*".to_string(), "-::*".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn("b", Via::Vsocket, "redis-server", &args, "redis.log").unwrap();
    lab.wait_listening("b", 6390).unwrap();
    let cli = ["-h", "10.10.0.3", "-p", "6390"];
    let set: Vec<&str> = cli.iter().copied().chain(["set", "k", "dual"]).collect();
    let get: Vec<&str> = cli.iter().copied().chain(["get", "k"]).collect();
    assert_eq!(lab.run_ok("a", Via::Vsocket, "redis-cli", &set).unwrap().trim(), "OK");
    assert_eq!(lab.run_ok("a", Via::Vsocket, "redis-cli", &get).unwrap().trim(), "dual");
    assert_eq!(lab.counter("a", "connections_out"), 2);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

#[test]
fn connections_inside_one_guest_take_shared_memory() {
    let mut lab = Lab::start("tlocal", TWO_GUESTS).unwrap();
    let s = addrs();
    // One server on loopback only, one on every address.
    lab.spawn("a", Via::Vsocket, "python3", &[&s, "serve", "inet", "127.0.0.1", "8400"], "lo.log").unwrap();
    lab.spawn("a", Via::Vsocket, "python3", &[&s, "serve", "inet6", "::", "8401"], "any.log").unwrap();
    lab.wait_listening("a", 8400).unwrap();
    lab.wait_listening("a", 8401).unwrap();

    let out = lab.run_ok("a", Via::Vsocket, "python3", &[&s, "connect", "127.0.0.1", "8400"]).unwrap();
    assert!(out.starts_with("server peer=127.0.0.1:") && out.contains("local=127.0.0.1:8400"), "{out}");
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[&s, "connect", "127.0.0.1", "8401"]).unwrap();
    assert!(out.starts_with("server peer=::ffff:127.0.0.1:"), "{out}");
    // To the guest's own address: the kernel would use it as the source too.
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[&s, "connect", "10.10.0.2", "8401"]).unwrap();
    assert!(out.starts_with("server peer=::ffff:10.10.0.2:") && out.contains("local=::ffff:10.10.0.2:8401"), "{out}");
    assert_eq!(lab.counter("a", "connections_out"), 3);
    assert_eq!(lab.counter("a", "connections_in"), 3);
    assert_eq!(lab.counter("a", "fallbacks"), 0);

    // Another guest's loopback is its own: nothing listens there.
    let out = lab.run_ok("b", Via::Vsocket, "python3", &[&s, "refused", "127.0.0.1", "8400"]).unwrap();
    assert_eq!(out.trim(), "refused");
    // The loopback-only server is not reachable from the VPC either.
    let out = lab.run_ok("b", Via::Vsocket, "python3", &[&s, "refused", "10.10.0.2", "8400"]).unwrap();
    assert_eq!(out.trim(), "refused");
    assert_eq!(lab.counter("b", "connections_out"), 0);
}

#[test]
fn redis_benchmark_against_a_local_redis() {
    // A cache beside its application, on 127.0.0.1 in one guest.
    let mut lab = Lab::start("tlocalredis", TWO_GUESTS).unwrap();
    let mut args = redis_server_args(6391, &[]);
    let at = args.iter().position(|a| a == "--bind").unwrap();
    args[at + 1] = "127.0.0.1".to_string();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn("a", Via::Vsocket, "redis-server", &args, "redis.log").unwrap();
    lab.wait_listening("a", 6391).unwrap();
    let out = lab
        .run_ok(
            "a",
            Via::Vsocket,
            "redis-benchmark",
            &["-h", "127.0.0.1", "-p", "6391", "-c", "20", "-n", "20000", "-t", "set,get", "-q"],
        )
        .unwrap();
    assert!(out.contains("SET") && out.contains("GET"), "{out}");
    let dbsize = lab.run_ok("a", Via::Vsocket, "redis-cli", &["-h", "127.0.0.1", "-p", "6391", "dbsize"]).unwrap();
    assert_eq!(dbsize.trim(), "1", "redis-benchmark's SETs use one key");
    assert!(lab.counter("a", "connections_out") >= 21, "{}", lab.counter("a", "connections_out"));
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

/// With every ephemeral port of a guest in TIME_WAIT (a busy client's
/// recent connections), the kernel's connect still finds a port for
/// another destination, as it needs only a unique address pair; a connect
/// through the library must too, not fail because the port it reserves
/// with bind(0) must be free of every other use.
#[test]
fn a_connect_finds_a_port_where_the_kernels_would_with_the_ports_in_time_wait() {
    let mut lab = Lab::start("ttimewait", TWO_GUESTS).unwrap();
    let soak = asset("soak.py");
    let soak = soak.to_str().unwrap();
    for port in ["7600", "7601"] {
        lab.spawn("b", Via::Vsocket, "python3", &[soak, "serve", port], &format!("echo{port}.log")).unwrap();
        lab.wait_listening("b", port.parse().unwrap()).unwrap();
    }
    lab.run_ok("a", Via::Kernel, "sysctl", &["-w", "net.ipv4.ip_local_port_range=40000 40003"]).unwrap();
    // Connections that the client closes first, until each of the four
    // ports stays in TIME_WAIT, paired with port 7600 (more tries than
    // ports: a port whose TIME_WAIT the kernel reuses, or a connect that
    // finds none free, is harmless).
    let fill = "import socket\nfor _ in range(8):\n  try: socket.create_connection(('10.10.0.3', 7600), timeout=5).close()\n  \
                except OSError as e: print(e)";
    let in_time_wait = || {
        let out = lab.run_ok("a", Via::Kernel, "ss", &["-Htan", "state", "time-wait"]).unwrap();
        out.lines().count()
    };
    // Filled again until all four are held: a round whose connects fail
    // (the guests' network still settling on a busy machine) fills none.
    let mut said = String::new();
    let filled = wait_until(Duration::from_secs(30), || {
        said = lab.run_ok("a", Via::Kernel, "python3", &["-c", fill]).unwrap_or_else(|e| e.to_string());
        wait_until(Duration::from_secs(2), || in_time_wait() == 4)
    });
    assert!(filled, "TIME_WAIT: {}; the last round said: {said}", in_time_wait());
    let probe = "import socket\ntry:\n  c = socket.create_connection(('10.10.0.3', 7601), timeout=5)\n  \
                 print('connected', c.getsockname()[1])\nexcept OSError as e:\n  print('failed:', e)";
    let kernel = lab.run_ok("a", Via::Kernel, "python3", &["-c", probe]).unwrap();
    assert!(kernel.starts_with("connected 4000"), "the kernel's own connect: {kernel}");
    let library = lab.run_ok("a", Via::Vsocket, "python3", &["-c", probe]).unwrap();
    assert!(library.starts_with("connected 4000"), "through the library: {library}");
}

/// A connect the daemon sends to the kernel path (no vSocket listener
/// there) has been bound to a port by the library first. Its TIME_WAIT
/// then must not keep the port from the kernel's other connects, as the
/// same connection made without the library would not: those need only a
/// unique address pair.
#[test]
#[ignore = "fails: a fallback connect was bound by the library first (ARCHITECTURE.md §9, ports of connections that fell back)"]
fn a_fallback_connection_in_time_wait_leaves_its_port_to_other_destinations() {
    let mut lab = Lab::start("tfallbacktw", TWO_GUESTS).unwrap();
    let soak = asset("soak.py");
    let soak = soak.to_str().unwrap();
    // 7600 has no vSocket listener (its server runs without the library).
    lab.spawn("b", Via::Kernel, "python3", &[soak, "serve", "7600"], "echo7600.log").unwrap();
    lab.spawn("b", Via::Kernel, "python3", &[soak, "serve", "7601"], "echo7601.log").unwrap();
    for port in [7600, 7601] {
        lab.wait_listening("b", port).unwrap();
    }
    lab.run_ok("a", Via::Kernel, "sysctl", &["-w", "net.ipv4.ip_local_port_range=40000 40003"]).unwrap();
    let fill = "import socket\nfor _ in range(4): socket.create_connection(('10.10.0.3', 7600)).close()";
    lab.run_ok("a", Via::Vsocket, "python3", &["-c", fill]).unwrap();
    assert_eq!(lab.counter("a", "fallbacks"), 4);
    let probe = "import socket\ntry:\n  c = socket.create_connection(('10.10.0.3', 7601), timeout=5)\n  \
                 print('connected', c.getsockname()[1])\nexcept OSError as e:\n  print('failed:', e)";
    let kernel = lab.run_ok("a", Via::Kernel, "python3", &["-c", probe]).unwrap();
    assert!(kernel.starts_with("connected 4000"), "the kernel's connect to another destination: {kernel}");
}
