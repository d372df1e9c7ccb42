//! Project tasks, run as `cargo xtask <task>`:
//!
//! - `demo`: installs what it needs, builds, and runs unmodified redis and
//!   sockperf between two guests over the kernel path and over vSocket,
//!   side by side;
//! - `test`: installs what it needs, builds, and runs every test (unit,
//!   model-checking, fuzzing bounds, end to end);
//! - `bench`: the benchmark, kernel path against vSocket (see
//!   docs/BENCHMARKS.md);
//! - `modules`: each crate's module import graph, failing on a cycle.
#![forbid(unsafe_code)]

mod bench;
mod modgraph;
mod package;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use vsocket_e2e::{redis_benchmark_rates, sockperf_latency, Lab, Via, TWO_GUESTS};

/// Debian packages the demo and the tests run.
const PACKAGES: &[&str] = &[
    "redis-server",
    "redis-tools",
    "sockperf",
    "iperf3",
    "iproute2",
    "python3",
    "procps",
    "socat",
    "nginx-light",
    "curl",
    "memcached",
    "libucx-dev",
    "libmemcached-tools",
    "wrk",
    "postgresql",
    "etcd-server",
    "etcd-client",
];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("test") => test(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("package") => ensure_packages().and_then(|()| build()).and_then(|()| package::build()).and_then(|deb| {
            println!("{}", deb.display());
            match args.get(1).map(String::as_str) {
                Some("--check") => package::check(&deb),
                _ => Ok(()),
            }
        }),
        Some("modules") => modgraph::run(),
        _ => {
            eprintln!(
                "usage: cargo xtask demo | test [TEST FILTER...] | bench [--json FILE] [--repeats N] | package [--check] | modules"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) type Result<T = ()> = std::result::Result<T, String>;

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> Result {
    let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{cmd:?} failed: {status}"));
    }
    Ok(())
}

/// Installs the Debian packages that are missing.
pub(crate) fn ensure_packages() -> Result {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !Command::new("dpkg").args(["-s", p]).output().map(|o| o.status.success()).unwrap_or(false))
        .collect();
    let mut missing = missing;
    // Node.js may come from outside Debian's packages; install it only if
    // there is none at all.
    if !Command::new("node").arg("--version").output().map(|o| o.status.success()).unwrap_or(false) {
        missing.push("nodejs");
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub(crate) fn build() -> Result {
    run(cargo().args(["build", "--workspace", "--release"]))?;
    std::env::set_var("VSOCKET_BIN_DIR", root().join("target/release"));
    Ok(())
}

fn test(filter: &[String]) -> Result {
    ensure_packages()?;
    build()?;
    // End-to-end tests share two cores with the programs they run: one at a time.
    run(cargo().args(["test", "--workspace", "--release", "--"]).args(filter).arg("--test-threads=1"))?;
    if filter.is_empty() {
        // A daemon without UCX (the tcp fabric only) still builds.
        run(cargo()
            .args(["check", "-p", "vsocketd", "--no-default-features", "--release"])
            .env("CARGO_TARGET_DIR", root().join("target/tcp-only")))?;
        // The ring's wake-up protocol, model-checked.
        run(cargo()
            .args(["test", "-p", "vsocket-ring", "--test", "loom", "--release"])
            .env("RUSTFLAGS", "--cfg loom")
            .env("CARGO_TARGET_DIR", root().join("target/loom")))?;
        // The Debian package: built, installed, started from, purged.
        package::check(&package::build()?)?;
    }
    Ok(())
}

/// One side's figures in the demo.
#[derive(Default)]
struct Figures {
    set: f64,
    get: f64,
    p50: f64,
    p99: f64,
}

fn measure(lab: &mut Lab, via: Via) -> Result<Figures> {
    let err = |e: std::io::Error| e.to_string();
    let mut f = Figures::default();
    let args = vsocket_e2e::redis_server_args(6379, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn("b", via, "redis-server", &args, "redis.log").map_err(err)?;
    lab.wait_listening("b", 6379).map_err(err)?;
    let out = lab
        .run_ok(
            "a",
            via,
            "redis-benchmark",
            &["-h", "10.10.0.3", "-p", "6379", "-t", "set,get", "-n", "200000", "-c", "50", "-q"],
        )
        .map_err(err)?;
    for (name, rate) in redis_benchmark_rates(&out) {
        match name.as_str() {
            "SET" => f.set = rate,
            "GET" => f.get = rate,
            _ => {}
        }
    }
    lab.stop_background();
    lab.spawn("b", via, "sockperf", &["server", "--tcp", "-i", "10.10.0.3", "-p", "11111"], "sockperf.log")
        .map_err(err)?;
    lab.wait_listening("b", 11111).map_err(err)?;
    let out = lab
        .run_ok(
            "a",
            via,
            "sockperf",
            &["ping-pong", "--tcp", "-i", "10.10.0.3", "-p", "11111", "-t", "5", "-m", "64", "--mps", "1000000"],
        )
        .map_err(err)?;
    let lat = sockperf_latency(&out).ok_or_else(|| format!("cannot read sockperf's output:\n{out}"))?;
    f.p50 = lat.p50;
    f.p99 = lat.p99;
    lab.stop_background();
    Ok(f)
}

/// On Ctrl-C: stop the programs we started; the lab is then removed as
/// the task unwinds.
pub(crate) fn on_interrupt() -> Result {
    ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        let _ = Command::new("pkill").args(["-TERM", "-P", &std::process::id().to_string()]).status();
    })
    .map_err(|e| e.to_string())
}

fn demo() -> Result {
    ensure_packages()?;
    build()?;
    ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        // Stop what we started; the lab is removed as the demo unwinds.
        let _ = Command::new("pkill").args(["-TERM", "-P", &std::process::id().to_string()]).status();
    })
    .map_err(|e| e.to_string())?;
    println!("Bringing up guests a (10.10.0.2) and b (10.10.0.3) in VPC blue, and vsocketd...");
    let mut lab = Lab::start("demo", TWO_GUESTS).map_err(|e| e.to_string())?;
    let interrupted = || INTERRUPTED.load(Ordering::SeqCst);
    println!("Kernel path (veth + bridge): redis-benchmark, sockperf ping-pong...");
    let kernel = measure(&mut lab, Via::Kernel);
    if interrupted() {
        return Err("interrupted; lab removed".into());
    }
    println!("vSocket (shared memory): the same programs, unmodified...");
    let vsocket = measure(&mut lab, Via::Vsocket);
    if interrupted() {
        return Err("interrupted; lab removed".into());
    }
    let (kernel, vsocket) = (kernel?, vsocket?);
    println!();
    println!("{:<38} {:>12} {:>12} {:>8}", "metric", "kernel", "vSocket", "ratio");
    let row = |name: &str, k: f64, v: f64| println!("{name:<38} {k:>12.2} {v:>12.2} {:>7.2}x", v / k);
    row("redis-benchmark SET -c 50 (ops/s)", kernel.set, vsocket.set);
    row("redis-benchmark GET -c 50 (ops/s)", kernel.get, vsocket.get);
    row("sockperf 64 B one-way p50 (usec)", kernel.p50, vsocket.p50);
    row("sockperf 64 B one-way p99 (usec)", kernel.p99, vsocket.p99);
    println!();
    println!("vsocketd's counters (vsocketctl guests):");
    let out = Command::new(vsocket_e2e::bin("vsocketctl")).arg("--config").arg(&lab.config).arg("guests").output();
    if let Ok(out) = out {
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    drop(lab);
    println!("Lab removed.");
    Ok(())
}
