//! The end-to-end harness: a lab of guests (network namespaces on a Linux
//! bridge), a running vsocketd, and helpers to run unmodified programs in
//! guests over vSocket or over the kernel path.
//!
//! Used by the end-to-end tests and by `cargo xtask demo` and `bench`.
//! Everything a lab creates (namespaces, daemon, servers) is removed when
//! the [`Lab`] is dropped, also when a test fails.

mod etcd;

pub use etcd::Etcd;

use serde_json::Value;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Which data path a program in a guest uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Loaded with libvsocket.so and attached to its guest.
    Vsocket,
    /// The plain kernel network (veth and bridge): the baseline.
    Kernel,
}

/// Where the built binaries are: `$VSOCKET_BIN_DIR`, or the cargo profile
/// directory this executable was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VSOCKET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current executable");
    let mut dir = exe.parent().expect("executable directory").to_path_buf();
    // Test executables live in <profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A built binary of the project.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// The longest a program run by [`Lab::run`] may take.
pub const RUN_LIMIT: Duration = Duration::from_secs(180);

/// A running lab: config, namespaces, daemon, and background programs.
pub struct Lab {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub run_dir: PathBuf,
    daemon: Option<Child>,
    /// Daemons told to stop (SIGTERM) that may still be handing over.
    stopping: Vec<Child>,
    /// The namespace the daemon runs in (a fabric host's switch), if not
    /// the machine's own.
    daemon_netns: Option<String>,
    /// The namespace `vsocket lab` and `vsocket run` run in (with the
    /// machine's own mounts), if not the machine's own.
    tools_netns: Option<String>,
    /// Guests' namespaces are `<netns_prefix>-<guest>`.
    netns_prefix: String,
    background: Vec<Child>,
}

/// Where a lab's programs run, when not in the machine's own namespace.
#[derive(Default, Clone, Copy)]
struct Namespaces<'a> {
    /// The daemon, and vsocketctl beside it.
    daemon: Option<&'a str>,
    /// `vsocket lab` and `vsocket run`.
    tools: Option<&'a str>,
}

/// The fabric addresses of [`Lab::start_pair`]'s two hosts.
pub const FABRIC_ADDRESSES: [&str; 2] = ["10.99.0.1:7470", "10.99.0.2:7470"];

/// A config body: VPC `blue` (10.10.0.0/24), security group `open`
/// (TCP on every port from the VPC), and one member of it per
/// `(name, address, extra lines)` (extra lines such as quotas go into that
/// guest's table).
pub fn open_vpc(guests: &[(&str, &str, &str)]) -> String {
    let mut body = String::from(
        "[[vpc]]\nname = \"blue\"\ncidr = \"10.10.0.0/24\"\n\n[[security_group]]\nname = \"open\"\n\
         [[security_group.ingress]]\nprotocol = \"tcp\"\nports = \"all\"\ncidr = \"10.10.0.0/24\"\n",
    );
    for (name, address, extra) in guests {
        body.push_str(&format!(
            "\n[[guest]]\nname = \"{name}\"\nvpc = \"blue\"\naddresses = [\"{address}\"]\nsecurity_groups = [\"open\"]\n"
        ));
        if !extra.is_empty() {
            body.push_str(extra);
            body.push('\n');
        }
    }
    body
}

/// Four guests `a` to `d` (10.10.0.2 to .5) in [`open_vpc`].
pub fn four_guests() -> String {
    open_vpc(&[("a", "10.10.0.2", ""), ("b", "10.10.0.3", ""), ("c", "10.10.0.4", ""), ("d", "10.10.0.5", "")])
}

/// Two guests `a` (10.10.0.2) and `b` (10.10.0.3) in VPC `blue`; `b`
/// accepts TCP from the VPC on port 7000 only (security group `svc`, whose
/// rule a test may remove: `svc ingress tcp 7000 --cidr 10.10.0.0/24`).
pub const ONE_PORT: &str = r#"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[security_group]]
name = "svc"
[[security_group.ingress]]
protocol = "tcp"
ports = "7000"
cidr = "10.10.0.0/24"

[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["svc"]
"#;

/// Two guests `a` (10.10.0.2) and `b` (10.10.0.3) in VPC `blue`, each
/// accepting TCP on every port from the VPC (the body [`open_vpc`] makes
/// for them).
pub const TWO_GUESTS: &str = r#"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[security_group]]
name = "open"
[[security_group.ingress]]
protocol = "tcp"
ports = "all"
cidr = "10.10.0.0/24"

[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]
security_groups = ["open"]

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["open"]
"#;

impl Lab {
    /// Starts a lab named `name` (unique among concurrent labs) from the
    /// VPC/guest/group part of a config; the `[host]` table is added here,
    /// and every guest's `netns` is set to `<name>-<guest>` unless given.
    pub fn start(name: &str, body: &str) -> io::Result<Lab> {
        Self::start_with(name, body, "drop")
    }

    /// As [`Lab::start`], with the host's `deny_action`.
    pub fn start_with(name: &str, body: &str, deny_action: &str) -> io::Result<Lab> {
        Self::start_host(name, body, &format!("deny_action = \"{deny_action}\""))
    }

    /// As [`Lab::start`], with more lines for the `[host]` table (after
    /// `name` and `run_dir`); `{dir}` in them stands for the lab's directory
    /// ([`Lab::dir_of`]).
    pub fn start_host(name: &str, body: &str, host_lines: &str) -> io::Result<Lab> {
        let mut lab = Self::launch(name, name, body, host_lines, &|_| None, Namespaces::default())?;
        lab.start_daemon()?;
        Ok(lab)
    }

    /// Two hosts, `<name>-1` and `<name>-2`, joined by a fabric of `kind`
    /// ("tcp" or "ucx"), each running its own vsocketd in its switch
    /// namespace. `bodies` are the two hosts' views of the VPC/guest/group
    /// part (normally the same text; they may differ to show that each host
    /// decides with its own policy) and `host_lines` their `[host]` extras,
    /// as for [`Lab::start_host`]. Guests named in `second` run on the second
    /// host, the others on the first. Returns once the fabric link is up.
    pub fn start_pair(
        name: &str,
        bodies: [&str; 2],
        host_lines: [&str; 2],
        kind: &str,
        second: &[&str],
    ) -> io::Result<(Lab, Lab)> {
        let hosts = [format!("{name}-1"), format!("{name}-2")];
        // Both hosts hold one fabric key, as an operator would set them up.
        let key = Self::fabric_key_file(name);
        write_key(&key, &format!("{name}-fabric-key-0123456789abcdef"))?;
        let fabric = format!(
            "[fabric]\nkind = \"{kind}\"\nkey_file = \"{}\"\n[[fabric.host]]\nname = \"{}\"\naddress = \"{}\"\n\
             [[fabric.host]]\nname = \"{}\"\naddress = \"{}\"\n",
            key.display(),
            hosts[0],
            FABRIC_ADDRESSES[0],
            hosts[1],
            FABRIC_ADDRESSES[1]
        );
        let place = |guest: &str| Some(if second.contains(&guest) { hosts[1].clone() } else { hosts[0].clone() });
        let mut labs = Vec::new();
        for (k, host) in hosts.iter().enumerate() {
            let switch = format!("vsw-{host}");
            labs.push(Self::launch(
                host,
                name,
                bodies[k],
                &format!("{}\n{fabric}", host_lines[k]),
                &place,
                Namespaces { daemon: Some(&switch), tools: None },
            )?);
        }
        // Both hosts' networks exist before either daemon starts, as on
        // real hosts.
        for lab in &mut labs {
            lab.start_daemon()?;
        }
        let second_lab = labs.pop().expect("two labs");
        let first_lab = labs.pop().expect("two labs");
        // Up: the one peer is listed, and its link is up.
        let up = |lab: &Lab| {
            lab.ctl("peers").is_ok_and(|p| p.as_array().is_some_and(|a| a.len() == 1 && a[0]["state"] == "up"))
        };
        if !wait_until(Duration::from_secs(30), || up(&first_lab) && up(&second_lab)) {
            return Err(io::Error::other(format!(
                "the fabric link did not come up; logs:\n{}\n{}",
                first_lab.daemon_log(),
                second_lab.daemon_log()
            )));
        }
        Ok((first_lab, second_lab))
    }

    /// Host `host` of fleet `fleet`, whose tenant model and fabric hosts
    /// come from a store: its file holds only `[host]`, with `host_lines`
    /// (which name the store and may end with a `[fabric]` table of
    /// settings, without hosts). Its lab is built from the store's model;
    /// guests' namespaces are `<fleet>-<guest>`, and its daemon runs in its
    /// switch namespace, as [`Lab::start_pair`]'s do. The store is reached
    /// from namespace `management` (the daemon reaches it from its own):
    /// `vsocket lab` and `vsocket run` run there.
    pub fn start_fleet_host(fleet: &str, host: &str, host_lines: &str, management: &str) -> io::Result<Lab> {
        let switch = format!("vsw-{host}");
        let netns = Namespaces { daemon: Some(&switch), tools: Some(management) };
        let mut lab = Self::launch(host, fleet, "", host_lines, &|_| None, netns)?;
        lab.start_daemon()?;
        Ok(lab)
    }

    /// Writes the config of host `host` (guests' namespaces named after
    /// `netns_prefix`, guests placed by `place`) and brings its lab up; its
    /// daemon will run in namespace `daemon_netns`, if given
    /// ([`Lab::start_daemon`]).
    fn launch(
        host: &str,
        netns_prefix: &str,
        body: &str,
        host_lines: &str,
        place: &dyn Fn(&str) -> Option<String>,
        netns: Namespaces,
    ) -> io::Result<Lab> {
        let dir = Self::dir_of(host);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let run_dir = dir.join("run");
        let host_lines = host_lines.replace("{dir}", &dir.display().to_string());
        let mut config = String::new();
        let mut fabric_after = String::new();
        // A [fabric] table in the extras must follow [host]'s own keys.
        let (own, fabric) = match host_lines.find("[fabric]") {
            Some(at) => host_lines.split_at(at),
            None => (host_lines.as_str(), ""),
        };
        fabric_after.push_str(fabric);
        config.push_str(&format!(
            "[host]\nname = \"{host}\"\nrun_dir = \"{}\"\n{own}\n{fabric_after}\n",
            run_dir.display()
        ));
        for line in body.lines() {
            config.push_str(line);
            config.push('\n');
            if let Some(guest) = line.trim().strip_prefix("name = \"").and_then(|r| r.strip_suffix('"')) {
                // Guest tables get their namespace right after their name.
                if last_table(&config) == Some("[[guest]]") {
                    if !body.contains("netns") {
                        config.push_str(&format!("netns = \"{netns_prefix}-{guest}\"\n"));
                    }
                    if let Some(on) = place(guest) {
                        config.push_str(&format!("host = \"{on}\"\n"));
                    }
                }
            }
        }
        let path = dir.join("vsocket.toml");
        std::fs::write(&path, config)?;
        let lab = Lab {
            name: host.to_string(),
            dir,
            config: path,
            run_dir,
            daemon: None,
            stopping: Vec::new(),
            daemon_netns: netns.daemon.map(str::to_string),
            tools_netns: netns.tools.map(str::to_string),
            netns_prefix: netns_prefix.to_string(),
            background: Vec::new(),
        };
        // VM guests boot only when a test asks (`boot_vms`): most tests
        // that have them boot their own with a script.
        lab.vsocket(&["lab", "up", "--no-vms", "--config"])?;
        Ok(lab)
    }

    /// Boots the lab's VM guests, as `vsocket lab up` does (each once the
    /// daemon serves it, with the guest agent; `Lab::run` and `Lab::spawn`
    /// then work in them). The VM machinery is cached in `target/vm-cache`.
    pub fn boot_vms(&self) -> io::Result<String> {
        let out = Command::new(bin("vsocket"))
            .args(["lab", "vms", "--config"])
            .arg(&self.config)
            .env("VSOCKET_VM_CACHE", vm_cache())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!("vsocket lab vms: {}", String::from_utf8_lossy(&out.stderr))));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the daemon (again, after [`Lab::kill_daemon`]) and waits for
    /// its admin socket.
    pub fn start_daemon(&mut self) -> io::Result<()> {
        let admin = self.run_dir.join("vsocketd.sock");
        let _ = std::fs::remove_file(&admin);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("vsocketd.log"))?;
        let daemon = self
            .where_the_daemon_runs("vsocketd")
            .arg("--config")
            .arg(&self.config)
            .env("VSOCKET_LOG", std::env::var("VSOCKET_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.daemon = Some(daemon);
        if !wait_until(Duration::from_secs(10), || admin.exists()) {
            return Err(io::Error::other(format!("vsocketd did not start; log: {}", self.daemon_log())));
        }
        Ok(())
    }

    /// Upgrades the daemon as an operator would: SIGTERM to the running
    /// one, then a new one started at once, which takes over from it.
    /// Returns when the old one has exited and the new one serves.
    pub fn upgrade_daemon(&mut self) -> io::Result<()> {
        let Some(old) = self.daemon.take() else {
            return Err(io::Error::other("no daemon running"));
        };
        let _ = Command::new("kill").arg("-TERM").arg(old.id().to_string()).status();
        self.stopping.push(old);
        self.start_daemon()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.stopping.iter_mut().all(|d| d.try_wait().is_ok_and(|s| s.is_some())) {
                self.stopping.clear();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::other(format!("the old vsocketd did not exit; log: {}", self.daemon_log())))
    }

    /// Kills the daemon at once (SIGKILL), as a crash would.
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// The directory of the lab named `name`: its config, logs and run_dir.
    pub fn dir_of(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vsocket-lab-{name}"))
    }

    /// The fabric key file both hosts of pair `name` use
    /// ([`Lab::start_pair`]).
    pub fn fabric_key_file(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vsocket-lab-{name}.key"))
    }

    fn vsocket(&self, args: &[&str]) -> io::Result<()> {
        let out = self.tool("vsocket").args(args).arg(&self.config).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "vsocket {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// The daemon's process id.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// How many descriptors the daemon has open (`/proc/PID/fd`).
    pub fn daemon_fds(&self) -> io::Result<usize> {
        let pid = self.daemon_pid().ok_or_else(|| io::Error::other("no daemon"))?;
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// The daemon's log so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vsocketd.log")).unwrap_or_default()
    }

    /// A command that runs `program` in `guest` over the given path.
    pub fn command(&self, guest: &str, via: Via, program: &str, args: &[&str]) -> Command {
        let mut cmd = self.tool("vsocket");
        cmd.arg("run").arg("--guest").arg(guest).arg("--config").arg(&self.config);
        if via == Via::Kernel {
            cmd.arg("--no-preload");
        }
        cmd.arg("--").arg(program).args(args);
        cmd.env("VSOCKET_LIB", bin("libvsocket.so"));
        cmd
    }

    /// Runs a program to completion and returns its output.
    /// A program that runs longer than [`RUN_LIMIT`] is killed and reported
    /// as an error, so a hang fails its test instead of the whole run.
    pub fn run(&self, guest: &str, via: Via, program: &str, args: &[&str]) -> io::Result<Output> {
        let child = self
            .command(guest, via, program, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let id = child.id();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let done = done.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + RUN_LIMIT;
                while Instant::now() < deadline {
                    if done.load(std::sync::atomic::Ordering::Relaxed) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = Command::new("kill").arg("-KILL").arg(id.to_string()).status();
                true
            })
        };
        let out = child.wait_with_output();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        if watchdog.join().unwrap_or(false) {
            return Err(io::Error::other(format!(
                "{program} {args:?} in {guest} ({via:?}) ran over {RUN_LIMIT:?}; killed"
            )));
        }
        out
    }

    /// Runs a program to completion; fails unless it exits 0. Returns stdout.
    pub fn run_ok(&self, guest: &str, via: Via, program: &str, args: &[&str]) -> io::Result<String> {
        let out = self.run(guest, via, program, args)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{program} {args:?} in {guest} ({via:?}) failed with {}:\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a program with `input` on its standard input; fails unless it
    /// exits 0. Returns stdout.
    pub fn run_input(&self, guest: &str, via: Via, program: &str, args: &[&str], input: &[u8]) -> io::Result<String> {
        use std::io::Write;
        let mut child = self
            .command(guest, via, program, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output()?;
        feeder.join().map_err(|_| io::Error::other("stdin writer panicked"))??;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{program} {args:?} in {guest} ({via:?}) failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a program in the background; it is stopped when the lab is.
    /// Its output goes to `<lab dir>/<log>`.
    pub fn spawn(&mut self, guest: &str, via: Via, program: &str, args: &[&str], log: &str) -> io::Result<()> {
        let out = std::fs::File::create(self.dir.join(log))?;
        let child = self
            .command(guest, via, program, args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        self.background.push(child);
        Ok(())
    }

    /// Waits until something in `guest` listens on TCP `port`.
    pub fn wait_listening(&self, guest: &str, port: u16) -> io::Result<()> {
        let netns = format!("{}-{guest}", self.netns_prefix);
        let listening = wait_until(Duration::from_secs(15), || {
            Command::new("ip")
                .args(["netns", "exec", &netns, "ss", "-Hltn", &format!("sport = :{port}")])
                .output()
                .map(|o| !o.stdout.is_empty())
                .unwrap_or(false)
        });
        if !listening {
            return Err(io::Error::other(format!("nothing listens on port {port} in {guest}")));
        }
        // A program with the library registers its listener with the daemon
        // just after the kernel's listen returns: wait for that too, or a
        // client started at once may find no vSocket listener yet. (Some
        // never register: an IPv6-only socket, an address the daemon
        // refuses; those are given 2 s.)
        let out =
            Command::new("ip").args(["netns", "exec", &netns, "ss", "-Hltnp", &format!("sport = :{port}")]).output()?;
        let listing = String::from_utf8_lossy(&out.stdout);
        let preloaded = listing.split("pid=").skip(1).filter_map(|p| p.split(',').next()).any(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| String::from_utf8_lossy(&env).contains("libvsocket"))
        });
        if preloaded {
            let suffix = format!(":{port}");
            let guest = guest.to_string();
            wait_until(Duration::from_secs(2), || {
                self.ctl("listeners").is_ok_and(|l| {
                    l.as_array().is_some_and(|l| {
                        l.iter().any(|l| {
                            l["guest"] == guest.as_str() && l["address"].as_str().is_some_and(|a| a.ends_with(&suffix))
                        })
                    })
                })
            });
        }
        Ok(())
    }

    /// The project's program `program`, to run where the lab's tools run.
    /// `nsenter --net` changes the network namespace only: `vsocket lab`
    /// makes namespaces, which must be seen outside it (`ip netns exec`
    /// would give it mounts of its own).
    fn tool(&self, program: &str) -> Command {
        match &self.tools_netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{netns}")).arg(bin(program));
                c
            }
            None => Command::new(bin(program)),
        }
    }

    /// The project's program `program`, to run in the daemon's namespace.
    fn where_the_daemon_runs(&self, program: &str) -> Command {
        in_netns(self.daemon_netns.as_deref(), bin(program))
    }

    /// `vsocketctl --config <lab config>`, run where the daemon runs (its
    /// namespace), as an operator on that host would.
    fn vsocketctl(&self) -> Command {
        let mut command = self.where_the_daemon_runs("vsocketctl");
        command.arg("--config").arg(&self.config);
        command
    }

    /// `vsocketctl --json <what>`.
    pub fn ctl(&self, what: &str) -> io::Result<Value> {
        let out = self.vsocketctl().arg("--json").arg(what).output()?;
        if !out.status.success() {
            return Err(io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
        serde_json::from_slice(&out.stdout).map_err(io::Error::other)
    }

    /// `vsocketctl --config <lab config> ARGS...`, whatever its outcome.
    pub fn ctl_output(&self, args: &[&str]) -> io::Result<Output> {
        self.vsocketctl().args(args).output()
    }

    /// One guest's counters from the daemon.
    pub fn guest(&self, name: &str) -> io::Result<Value> {
        let all = self.ctl("guests")?;
        all.as_array()
            .and_then(|a| a.iter().find(|g| g["name"] == name).cloned())
            .ok_or_else(|| io::Error::other(format!("no guest {name}")))
    }

    /// A numeric counter of one guest.
    pub fn counter(&self, guest: &str, field: &str) -> u64 {
        self.guest(guest).ok().and_then(|g| g[field].as_u64()).unwrap_or(0)
    }

    /// Stops the background programs (servers), leaving the daemon.
    pub fn stop_background(&mut self) {
        for mut child in self.background.drain(..) {
            stop(&mut child);
        }
    }
}

fn last_table(text: &str) -> Option<&str> {
    text.lines().rev().map(str::trim).find(|l| l.starts_with('['))
}

fn stop(child: &mut Child) {
    // SIGTERM first so servers exit cleanly, then SIGKILL.
    stop_with(child, "-TERM");
}

/// Sends `signal` (as kill(1) spells it), then SIGKILL if the child has not
/// exited within 3 s.
fn stop_with(child: &mut Child, signal: &str) {
    let _ = Command::new("kill").arg(signal).arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_background();
        // SIGINT: a daemon stops at once (SIGTERM would offer a hand-over
        // while any process is still attached).
        if let Some(mut d) = self.daemon.take() {
            stop_with(&mut d, "-INT");
        }
        for mut d in self.stopping.drain(..) {
            stop_with(&mut d, "-INT");
        }
        let _ = self.tool("vsocket").args(["lab", "down", "--config"]).arg(&self.config).output();
        if std::env::var_os("VSOCKET_KEEP_LAB").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `program`, to run in network namespace `netns` (`ip netns exec`) if
/// there is one, else here.
pub fn in_netns(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(netns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Where the VM machinery (QEMU, the guest kernel, the vsock backend) is
/// cached for the tests: the workspace's `target/vm-cache`.
pub fn vm_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/vm-cache")
}

/// Writes a fabric key file (mode 0600, as `fabric.key_file` requires).
pub fn write_key(path: &Path, key: &str) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    io::Write::write_all(&mut file, format!("{key}\n").as_bytes())
}

/// Polls `ready` every 20 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Path of a file shipped with the e2e crate (scripts).
pub fn asset(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join(name)
}

/// Arguments for a redis-server on guest `b`'s address that keeps nothing
/// on disk, followed by `extra` (for example `--dir` or `--maxclients`).
pub fn redis_server_args(port: u16, extra: &[&str]) -> Vec<String> {
    redis_server_args_at("10.10.0.3", port, extra)
}

/// As [`redis_server_args`], bound to `ip` (another guest's address).
pub fn redis_server_args_at(ip: &str, port: u16, extra: &[&str]) -> Vec<String> {
    let port = port.to_string();
    let base = ["--port", &port, "--bind", ip, "--save", "", "--appendonly", "no", "--protected-mode", "no"];
    base.iter().chain(extra).map(|a| a.to_string()).collect()
}

/// Writes `<dir>/nginx.conf` for nginx in the foreground, a master and two
/// workers (forked after listen), sendfile on, serving `<dir>/www` on
/// `listen` (`ip:port`), with the given `accept_mutex` (`on` or `off`), and
/// every file it writes kept in `dir`. Creates `www`; returns the config's path.
pub fn nginx_config(dir: &Path, listen: &str, accept_mutex: &str) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    let d = dir.display();
    let conf = format!(
        "daemon off; worker_processes 2; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{ worker_connections 256; accept_mutex {accept_mutex}; }}\n\
         http {{ access_log off; sendfile on; client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp;\n\
         fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
         server {{ listen {listen}; root {d}/www; }} }}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// Compiles a C program shipped in `assets/` into `dir`; returns its path.
pub fn compile(asset_name: &str, dir: &Path) -> io::Result<PathBuf> {
    let out = dir.join(asset_name.trim_end_matches(".c"));
    let status = Command::new("cc").args(["-O2", "-Wall", "-o"]).arg(&out).arg(asset(asset_name)).status()?;
    if !status.success() {
        return Err(io::Error::other(format!("cc {asset_name} failed")));
    }
    Ok(out)
}

/// Runs a 2-second 64-byte `sockperf ping-pong` from `guest` of `lab` to
/// a sockperf server at 10.10.0.3:11111; returns its output and latency.
pub fn sockperf_ping_pong(lab: &Lab, guest: &str, via: Via) -> io::Result<(String, SockperfLatency)> {
    let args = ["ping-pong", "--tcp", "-i", "10.10.0.3", "-p", "11111", "-t", "2", "-m", "64", "--mps", "1000000"];
    let out = lab.run_ok(guest, via, "sockperf", &args)?;
    match sockperf_latency(&out) {
        Some(latency) => Ok((out, latency)),
        None => Err(io::Error::other(format!("no latency in: {out}"))),
    }
}

/// Parses `sockperf ping-pong` output: (percentile, one-way usec) pairs
/// for 50, 99 and 99.9, plus the average.
pub fn sockperf_latency(output: &str) -> Option<SockperfLatency> {
    let pct = |p: &str| {
        output
            .lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next()?.trim().parse().ok())
    };
    let avg = output
        .lines()
        .find(|l| l.contains("Summary: Latency is"))
        .and_then(|l| l.split("Latency is").nth(1)?.split_whitespace().next()?.parse().ok());
    Some(SockperfLatency { p50: pct("50.000")?, p99: pct("99.000")?, p999: pct("99.900")?, avg: avg? })
}

/// One-way latency figures from sockperf, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct SockperfLatency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub avg: f64,
}

/// Parses `redis-benchmark -q` (or `--csv`) output into (test, requests/s).
pub fn redis_benchmark_rates(output: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in output.split(['\n', '\r']) {
        if let Some((name, rest)) = line.split_once(": ") {
            if let Some(num) = rest
                .strip_suffix(" requests per second")
                .or_else(|| rest.split(" requests per second").next().filter(|_| rest.contains("requests per second")))
            {
                if let Ok(v) = num.trim().parse::<f64>() {
                    out.push((name.trim().to_string(), v));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf() {
        let text = "sockperf: Summary: Latency is 1.040 usec\nsockperf: ---> percentile 99.900 =    3.5\nsockperf: ---> percentile 99.000 =    1.852\nsockperf: ---> percentile 50.000 =    0.922\n";
        let l = sockperf_latency(text).unwrap();
        assert_eq!((l.p50, l.p99, l.p999, l.avg), (0.922, 1.852, 3.5, 1.04));
    }

    #[test]
    fn parses_redis_benchmark() {
        let text = "SET: rps=0.0 (overall: -nan)\r SET: 89206.06 requests per second, p50=0.263 msec\nGET: 80580.17 requests per second, p50=0.271 msec\n";
        assert_eq!(redis_benchmark_rates(text), vec![("SET".to_string(), 89206.06), ("GET".to_string(), 80580.17)]);
    }
}

#[cfg(test)]
mod config_body_tests {
    #[test]
    fn open_vpc_makes_the_two_guest_body() {
        let made = super::open_vpc(&[("a", "10.10.0.2", ""), ("b", "10.10.0.3", "")]);
        let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(norm(&made), norm(super::TWO_GUESTS));
    }
}
