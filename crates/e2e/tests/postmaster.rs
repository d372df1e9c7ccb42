//! PostgreSQL's accept loop: a blocking listening socket, signals
//! unblocked only around select, SIGCHLD, a fork per connection. A
//! blocking accept must never become a sleep on the kernel socket alone
//! while vSocket clients wait.

use std::path::{Path, PathBuf};
use std::process::Command;
use vsocket_e2e::{asset, compile, Lab, Via, TWO_GUESTS};

/// Clients at once, per wave: more than the server's descriptors hold.
const CLIENTS: &str = "24";
/// Each client's deadline for connect, send and reply, in seconds: a hung
/// accept fails the test instead of hanging it.
const CLIENT_TIMEOUT_S: &str = "10";

#[test]
fn a_postmaster_out_of_descriptors_serves_every_waiting_client() {
    let mut lab = Lab::start("tpostmaster", TWO_GUESTS).unwrap();
    let server = compile("postmaster.c", &lab.dir).unwrap();
    let server = server.to_str().unwrap();
    let burst = asset("burst.py");
    let burst = burst.to_str().unwrap();
    // RLIMIT_NOFILE 40 and children that hold their connection 300 ms: a
    // wave of 24 clients runs the parent out of descriptors, so accept
    // fails with EMFILE until children are reaped.
    for (via, port) in [(Via::Kernel, "7500"), (Via::Vsocket, "7501")] {
        lab.spawn("b", via, server, &["10.10.0.3", port, "40", "300"], &format!("postmaster-{port}.log")).unwrap();
        lab.wait_listening("b", port.parse().unwrap()).unwrap();
        let out = lab.run("a", via, "python3", &[burst, "10.10.0.3", port, "3", CLIENTS, CLIENT_TIMEOUT_S]).unwrap();
        let log = std::fs::read_to_string(lab.dir.join(format!("postmaster-{port}.log"))).unwrap_or_default();
        assert!(
            out.status.success(),
            "{via:?}: {}{}\nserver log:\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if via == Via::Vsocket {
            // The clients waited while accept failed for want of descriptors.
            assert!(log.contains("accept: Too many open files"), "the server never ran out:\n{log}");
        }
    }
    assert_eq!(lab.counter("a", "fallbacks"), 0);
    assert_eq!(lab.counter("b", "connections_in"), 72);
}

/// The newest installed PostgreSQL's programs (Debian's layout).
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (cargo xtask test installs it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    versions.sort_by_key(|bin| bin.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()));
    versions.pop().expect("a PostgreSQL server in /usr/lib/postgresql/*/bin")
}

/// Makes a cluster in `data`, owned by the `postgres` user (the server
/// refuses to run as root), that trusts the lab's clients.
fn initdb(bin: &Path, data: &Path) {
    std::fs::create_dir_all(data).unwrap();
    assert!(Command::new("chown").arg("postgres:postgres").arg(data).status().unwrap().success());
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("initdb"))
        .arg("-D")
        .arg(data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync"])
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
    let hba = data.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).unwrap();
    rules.push_str("host all all 10.10.0.0/24 trust\n");
    std::fs::write(hba, rules).unwrap();
}

/// pgbench from guest a against the server in b; every connect has a
/// deadline (libpq's `PGCONNECT_TIMEOUT`), so a server that stops
/// accepting fails the run.
fn pgbench(lab: &Lab, args: &[&str]) -> String {
    let mut full = vec!["PGCONNECT_TIMEOUT=10", "pgbench", "-h", "10.10.0.3", "-U", "postgres"];
    full.extend_from_slice(args);
    full.push("postgres");
    let out = lab.run("a", Via::Vsocket, "env", &full).unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench {args:?}: {text}\nserver log:\n{}", server_log(lab));
    text
}

fn server_log(lab: &Lab) -> String {
    std::fs::read_to_string(lab.dir.join("postgres.log")).unwrap_or_default()
}

#[test]
fn postgres_serves_pgbench_and_every_new_connection() {
    // The reported run: the postmaster in b, pgbench -i -s 4 and then
    // pgbench -c 8 -j 2 -T 15 from a, both with the library; then a
    // connection per transaction, so that the postmaster accepts and
    // forks under load while its backends exit (SIGCHLD).
    let mut lab = Lab::start("tpostgres", TWO_GUESTS).unwrap();
    let bin = postgres_bin();
    let data = lab.dir.join("pgdata");
    initdb(&bin, &data);
    let (data, postgres) = (data.to_str().unwrap(), bin.join("postgres"));
    let args = [
        "--reuid=postgres",
        "--regid=postgres",
        "--clear-groups",
        "--",
        postgres.to_str().unwrap(),
        "-D",
        data,
        "-k",
        data,
        "-p",
        "5432",
        "-c",
        "listen_addresses=10.10.0.3",
        "-c",
        "fsync=off",
    ];
    lab.spawn("b", Via::Vsocket, "setpriv", &args, "postgres.log").unwrap();
    lab.wait_listening("b", 5432).unwrap();
    pgbench(&lab, &["-i", "-s", "4"]);
    let steady = pgbench(&lab, &["-c", "8", "-j", "2", "-T", "15"]);
    assert!(steady.contains("number of failed transactions: 0"), "{steady}");
    let churn = pgbench(&lab, &["-c", "8", "-j", "2", "-C", "-t", "25"]);
    assert!(churn.contains("number of transactions actually processed: 200/200"), "{churn}");
    assert_eq!(lab.counter("a", "fallbacks"), 0);
    // pgbench -i and each run's setup connect too.
    assert!(lab.counter("b", "connections_in") >= 8 + 200, "{}", lab.counter("b", "connections_in"));
}
