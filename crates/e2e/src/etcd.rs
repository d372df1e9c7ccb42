//! Real etcd members (Debian's etcd-server) on loopback for tests: one, or
//! a cluster, each member in a directory of its own, killed when dropped.

use crate::in_netns;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An etcd cluster of one or more members, on loopback or in a network
/// namespace.
pub struct Etcd {
    members: Vec<Option<Child>>,
    commands: Vec<Command>,
    dir: PathBuf,
    /// The namespace the members run in, if not the machine's own.
    netns: Option<String>,
    /// Each member's client URL, `http://IP:PORT`.
    pub urls: Vec<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    /// A cluster of `size` members named `NAME-0`.., on loopback, started
    /// and healthy.
    pub fn start(name: &str, size: usize) -> Etcd {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        Self::start_at(name, None, "127.0.0.1", &ports)
    }

    /// As [`Etcd::start`], in namespace `netns` (which exists), listening
    /// on `ip` there (an address of one of its interfaces): hosts whose
    /// daemons run in other namespaces reach it over the lab's network.
    pub fn start_in(name: &str, size: usize, netns: &str, ip: &str) -> Etcd {
        // The namespace is the cluster's own: any ports do.
        let ports: Vec<(u16, u16)> = (0..size as u16).map(|i| (2379 + 2 * i, 2380 + 2 * i)).collect();
        Self::start_at(name, Some(netns), ip, &ports)
    }

    fn start_at(name: &str, netns: Option<&str>, ip: &str, ports: &[(u16, u16)]) -> Etcd {
        // On tmpfs where there is one: every write a member makes waits for
        // its fsync, and on this shared machine's disk one can stall for
        // seconds, long enough for the cluster to lose its leader and a
        // test's request to time out on every member. A test's store need
        // not outlive the machine.
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        let dir = base.join(format!("vsocket-etcd-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let peers: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("{name}-{i}=http://{ip}:{peer}")).collect();
        let urls: Vec<String> = ports.iter().map(|(client, _)| format!("http://{ip}:{client}")).collect();
        let mut commands = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let mut command = in_netns(netns, "etcd");
            command
                .arg("--name")
                .arg(format!("{name}-{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("member-{i}")))
                .arg("--listen-client-urls")
                .arg(format!("http://{ip}:{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://{ip}:{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://{ip}:{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{ip}:{peer}"))
                .arg("--initial-cluster")
                .arg(peers.join(","))
                .arg("--initial-cluster-token")
                .arg(name)
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            commands.push(command);
        }
        let mut etcd = Etcd { members: Vec::new(), commands, dir, netns: netns.map(str::to_owned), urls };
        for i in 0..ports.len() {
            let child = etcd.spawn(i);
            etcd.members.push(Some(child));
        }
        etcd.wait_healthy();
        etcd
    }

    fn spawn(&mut self, member: usize) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("member-{member}.log")))
            .unwrap();
        self.commands[member].stderr(log).spawn().expect("etcd (Debian's etcd-server) runs")
    }

    /// Every member's client URL, comma-separated (as `--etcd` takes them).
    pub fn endpoints(&self) -> String {
        self.urls.join(",")
    }

    /// Runs `etcdctl ARGS` against the cluster; its output, or its error.
    pub fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command("etcdctl")
            .arg("--endpoints")
            .arg(self.endpoints())
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .map_err(|e| format!("etcdctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `program`, to run where the cluster is reachable (in its namespace).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_netns(self.netns.as_deref(), program)
    }

    /// Waits until the cluster answers a write.
    pub fn wait_healthy(&self) {
        let began = Instant::now();
        while self.ctl(&["put", "/vsocket-test/ready", "1"]).is_err() {
            assert!(began.elapsed() < Duration::from_secs(30), "etcd did not become healthy:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops member `member` (SIGKILL, as a crash).
    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `member` again, on its data.
    pub fn restart(&mut self, member: usize) {
        self.kill(member);
        let child = self.spawn(member);
        self.members[member] = Some(child);
    }

    /// What the members logged.
    pub fn logs(&self) -> String {
        (0..self.commands.len())
            .map(|i| std::fs::read_to_string(self.dir.join(format!("member-{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test's store: how its members ended and what its
            // namespace's sockets and addresses were, for the test's output.
            eprintln!("--- the store when the test failed ({}):", self.dir.display());
            for i in 0..self.commands.len() {
                let log = std::fs::read_to_string(self.dir.join(format!("member-{i}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("member {i}, last lines of its log:\n{}", lines[lines.len().saturating_sub(25)..].join("\n"));
            }
            for what in [&["ss", "-ltn"][..], &["ss", "-tn", "state", "syn-sent"], &["ip", "-br", "addr"]] {
                if let Ok(out) = self.command(what[0]).args(&what[1..]).output() {
                    eprintln!("{}:\n{}", what.join(" "), String::from_utf8_lossy(&out.stdout));
                }
            }
        }
        for member in 0..self.members.len() {
            self.kill(member);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
