//! A soak under faults: vsocketd killed (and now and then upgraded) at
//! random moments under a mixed load, again and again. No byte of a
//! connection that reports success is lost, duplicated or reordered; no
//! program hangs; the daemon's descriptors and memory come back to their
//! baseline.
//!
//! `VSOCKET_SOAK_RESTARTS` (default 20) and `VSOCKET_SOAK_SEED` (default:
//! from the clock, printed) set the run; a longer one is
//! `VSOCKET_SOAK_RESTARTS=100 cargo xtask test soak_`.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vsocket_e2e::{asset, redis_server_args, wait_until, Lab, Via, TWO_GUESTS};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A small deterministic generator (xorshift), so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The daemon's resident memory, in KiB.
fn daemon_rss_kib(lab: &Lab) -> u64 {
    let pid = lab.daemon_pid().expect("a daemon runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Waits for `child` at most until `deadline`; its stdout, or a panic
/// naming `what` if it is still running then.
fn finish(mut child: Child, what: &str, deadline: Instant) -> String {
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("{what} hung: still running at its deadline");
}

#[test]
fn soak_daemon_killed_and_upgraded_under_load() {
    let restarts = env_u64("VSOCKET_SOAK_RESTARTS", 20);
    let seed = env_u64(
        "VSOCKET_SOAK_SEED",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1,
    );
    eprintln!("soak: {restarts} restarts, VSOCKET_SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let mut lab = Lab::start("tsoak", TWO_GUESTS).unwrap();
    let script = asset("soak.py");
    let script = script.to_str().unwrap();
    let redis = redis_server_args(6379, &[]);
    let redis: Vec<&str> = redis.iter().map(String::as_str).collect();
    lab.spawn("b", Via::Vsocket, "redis-server", &redis, "redis.log").unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[script, "serve", "7401"], "echo.log").unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[script, "forkserve", "7402"], "fork.log").unwrap();
    for port in [6379, 7401, 7402] {
        lab.wait_listening("b", port).unwrap();
    }
    let baseline_fds = lab.daemon_fds().unwrap();
    let baseline_rss = daemon_rss_kib(&lab);

    // The load runs through every restart, and a while after the last.
    let seconds = (restarts as f64 * 0.6 + 5.0).to_string();
    let client = |lab: &Lab, port: &str, seed: u64, max: &str| -> Child {
        lab.command(
            "a",
            Via::Vsocket,
            "python3",
            &[script, "client", "10.10.0.3", port, &seconds, &seed.to_string(), max],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let clients = [
        ("bulk transfers", client(&lab, "7401", rng.next(), "2000000")),
        ("connect/close loop", client(&lab, "7401", rng.next(), "64")),
        ("fork-per-connection server", client(&lab, "7402", rng.next(), "100000")),
    ];
    let benchmark = lab
        .command("a", Via::Vsocket, "redis-benchmark", &["-h", "10.10.0.3", "-n", "100000000", "-c", "4", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let started = Instant::now();
    for i in 0..restarts {
        std::thread::sleep(Duration::from_millis(100 + rng.below(500)));
        if i % 5 == 4 {
            lab.upgrade_daemon().unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
        } else {
            lab.kill_daemon();
            std::thread::sleep(Duration::from_millis(rng.below(200)));
            lab.start_daemon().unwrap_or_else(|e| panic!("restart {i}: {e}"));
        }
    }
    eprintln!("soak: {restarts} restarts in {:.1} s", started.elapsed().as_secs_f64());

    let deadline = Instant::now() + Duration::from_secs_f64(seconds.parse::<f64>().unwrap() + 40.0);
    let mut ok = 0;
    for (what, child) in clients {
        let out = finish(child, what, deadline);
        eprintln!("soak: {what}: {}", out.trim());
        let count = |name: &str| -> u64 {
            let field = out
                .split_whitespace()
                .find(|f| f.starts_with(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{what}: {out}"));
            field[name.len() + 1..].parse().unwrap()
        };
        assert_eq!(count("corrupt"), 0, "{what}: bytes lost, duplicated or reordered: {out}");
        assert_eq!(count("hung"), 0, "{what}: a call outlasted its timeout: {out}");
        ok += count("ok");
    }
    assert!(ok > 50, "too little got through: {ok} connections");
    let mut benchmark = benchmark;
    assert!(benchmark.try_wait().unwrap().is_none(), "redis-benchmark ended early");
    let _ = benchmark.kill();
    let _ = benchmark.wait();
    let pong = lab.run_ok("a", Via::Vsocket, "redis-cli", &["-h", "10.10.0.3", "ping"]).unwrap();
    assert_eq!(pong.trim(), "PONG");

    // With the load gone, the daemon's descriptors and memory come back.
    let settled = wait_until(Duration::from_secs(15), || {
        lab.daemon_fds().is_ok_and(|fds| fds <= baseline_fds + 8) && daemon_rss_kib(&lab) <= baseline_rss + 32 * 1024
    });
    let log = lab.daemon_log();
    assert!(
        settled,
        "the daemon holds {} descriptors (baseline {baseline_fds}) and {} KiB (baseline {baseline_rss} KiB)",
        lab.daemon_fds().unwrap_or(0),
        daemon_rss_kib(&lab)
    );
    assert!(!log.contains("panicked"), "{log}");
}
