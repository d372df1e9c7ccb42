//! redis-server and its own clients, unmodified, between two guests.

use vsocket_e2e::{redis_benchmark_rates, redis_server_args, Lab, Via, TWO_GUESTS};

const SERVER: &[&str] =
    &["--port", "6379", "--bind", "10.10.0.3", "--save", "", "--appendonly", "no", "--protected-mode", "no"];

fn cli(lab: &Lab, via: Via, args: &[&str]) -> String {
    let mut full = vec!["-h", "10.10.0.3", "-p", "6379"];
    full.extend_from_slice(args);
    lab.run_ok("a", via, "redis-cli", &full).unwrap().trim().to_string()
}

#[test]
fn redis_cli_and_benchmark_over_vsocket() {
    let mut lab = Lab::start("tredis", TWO_GUESTS).unwrap();
    lab.spawn("b", Via::Vsocket, "redis-server", SERVER, "redis.log").unwrap();
    lab.wait_listening("b", 6379).unwrap();

    assert_eq!(cli(&lab, Via::Vsocket, &["set", "greeting", "hello over shared memory"]), "OK");
    assert_eq!(cli(&lab, Via::Vsocket, &["get", "greeting"]), "hello over shared memory");
    assert_eq!(cli(&lab, Via::Vsocket, &["incrby", "counter", "41"]), "41");
    assert_eq!(cli(&lab, Via::Vsocket, &["incr", "counter"]), "42");
    // A value larger than one ring (256 KiB) must arrive intact.
    let big: String = (0..400_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let set = lab
        .run_input("a", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "-x", "set", "big"], big.as_bytes())
        .unwrap();
    assert_eq!(set.trim(), "OK");
    assert_eq!(cli(&lab, Via::Vsocket, &["strlen", "big"]), "400000");
    assert_eq!(cli(&lab, Via::Vsocket, &["get", "big"]), big);

    let out = lab
        .run_ok(
            "a",
            Via::Vsocket,
            "redis-benchmark",
            &["-h", "10.10.0.3", "-p", "6379", "-t", "set,get", "-n", "20000", "-c", "20", "-r", "1000", "-q"],
        )
        .unwrap();
    let rates = redis_benchmark_rates(&out);
    assert_eq!(rates.len(), 2, "benchmark output: {out}");
    assert!(rates.iter().all(|(_, r)| *r > 0.0), "{rates:?}");
    // The benchmark's SETs with random keys really landed in the server.
    let keys: u64 = cli(&lab, Via::Vsocket, &["dbsize"]).parse().unwrap();
    assert!(keys > 500, "dbsize {keys}");

    // The daemon saw it all go over vSocket: every client connection was
    // brokered, and the bytes are at least the big value twice.
    let a = lab.guest("a").unwrap();
    let b = lab.guest("b").unwrap();
    assert!(a["connections_out"].as_u64().unwrap() >= 7 + 20, "{a}");
    assert_eq!(a["connections_out"], b["connections_in"]);
    assert_eq!(a["fallbacks"], 0);
    assert!(a["bytes_sent"].as_u64().unwrap() > 400_000, "{a}");
    assert!(a["bytes_received"].as_u64().unwrap() > 400_000, "{a}");
    assert_eq!(a["bytes_sent"], b["bytes_received"]);
}

#[test]
fn kernel_client_reaches_vsocket_server() {
    let mut lab = Lab::start("tkcli", TWO_GUESTS).unwrap();
    lab.spawn("b", Via::Vsocket, "redis-server", SERVER, "redis.log").unwrap();
    lab.wait_listening("b", 6379).unwrap();
    assert_eq!(cli(&lab, Via::Kernel, &["set", "k", "from the kernel"]), "OK");
    assert_eq!(cli(&lab, Via::Vsocket, &["get", "k"]), "from the kernel");
    assert_eq!(cli(&lab, Via::Kernel, &["get", "k"]), "from the kernel");
    // Only the one vSocket client was brokered.
    assert_eq!(lab.counter("b", "connections_in"), 1);
}

#[test]
fn vsocket_client_falls_back_to_kernel_server() {
    let mut lab = Lab::start("tfall", TWO_GUESTS).unwrap();
    lab.spawn("b", Via::Kernel, "redis-server", SERVER, "redis.log").unwrap();
    lab.wait_listening("b", 6379).unwrap();
    assert_eq!(cli(&lab, Via::Vsocket, &["set", "k", "over the kernel"]), "OK");
    assert_eq!(cli(&lab, Via::Vsocket, &["get", "k"]), "over the kernel");
    // (redis-cli may connect more than once per run.)
    assert!(lab.counter("a", "fallbacks") >= 2);
    assert_eq!(lab.counter("a", "connections_out"), 0);
}

#[test]
fn bgsave_forks_while_clients_keep_working() {
    let mut lab = Lab::start("tbgsave", TWO_GUESTS).unwrap();
    let dir = lab.dir.to_str().unwrap().to_string();
    let args = redis_server_args(6379, &["--dir", &dir]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn("b", Via::Vsocket, "redis-server", &args, "redis.log").unwrap();
    lab.wait_listening("b", 6379).unwrap();
    // Clients connected before the fork stay usable in the parent while the
    // child saves, and after it exits.
    let bench = std::thread::scope(|scope| {
        let bench = scope.spawn(|| {
            lab.run_ok(
                "a",
                Via::Vsocket,
                "redis-benchmark",
                &["-h", "10.10.0.3", "-t", "set", "-n", "200000", "-c", "20", "-r", "5000", "-q"],
            )
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        for _ in 0..3 {
            assert_eq!(cli(&lab, Via::Vsocket, &["bgsave"]), "Background saving started");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while cli(&lab, Via::Vsocket, &["info", "persistence"]).contains("rdb_bgsave_in_progress:1") {
                assert!(std::time::Instant::now() < deadline, "BGSAVE never finished");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            assert!(cli(&lab, Via::Vsocket, &["info", "persistence"]).contains("rdb_last_bgsave_status:ok"));
        }
        bench.join().unwrap()
    })
    .unwrap();
    assert_eq!(redis_benchmark_rates(&bench).len(), 1, "{bench}");
    assert!(std::path::Path::new(&dir).join("dump.rdb").exists());
    let keys: u64 = cli(&lab, Via::Vsocket, &["dbsize"]).parse().unwrap();
    assert!(keys > 1000, "dbsize {keys}");
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}
