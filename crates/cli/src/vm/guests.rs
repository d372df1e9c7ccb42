//! The lab's VM guests: `vsocket lab up` boots one QEMU per VM guest of
//! the config, `lab down` stops them, `lab status` shows them.
//!
//! Each VM is started by a keeper (`vsocket lab vm`, a process of its own
//! group, so it outlives the `lab up` that started it) which waits for
//! the running vsocketd's vsock backend and region for that guest (the
//! daemon makes both), enters the guest's network namespace and becomes
//! QEMU. The VM runs the guest agent (`vsocket agent`), through which
//! `vsocket run --guest VM` runs programs. The keeper's pid (QEMU's, after
//! it becomes QEMU) and the console are under `<run_dir>/lab`.

use super::{io_error, vsock_backend, Boot, Image, VmError};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vsocket_admin::paths::vm_paths;
use vsocket_policy::{Config, VmGuest};

/// Where the lab's VM machinery is cached: `VSOCKET_VM_CACHE`, else this.
pub const DEFAULT_CACHE: &str = "/var/cache/vsocket/vm";

/// How long a keeper waits for vsocketd to serve its VM.
const DAEMON_WAIT: Duration = Duration::from_secs(600);

/// The cache the lab's VM machinery is kept in.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("VSOCKET_VM_CACHE").filter(|p| !p.is_empty()).map_or_else(|| DEFAULT_CACHE.into(), PathBuf::from)
}

/// The local VM guests of `config`: name, network namespace, VM.
pub fn vm_guests(config: &Config) -> Vec<(String, String, VmGuest)> {
    config
        .guests()
        .filter(|(id, _)| config.is_local(*id))
        .filter_map(|(_, g)| g.vm.map(|vm| (g.name.clone(), g.netns.clone(), vm)))
        .collect()
}

/// Where the lab keeps its VMs' pid files and consoles.
pub fn lab_dir(config: &Config) -> PathBuf {
    config.host().run_dir.join("lab")
}

fn pid_file(config: &Config, guest: &str) -> PathBuf {
    lab_dir(config).join(format!("{guest}.pid"))
}

/// VM guest `guest`'s console (what its kernel and agent print).
pub fn console_file(config: &Config, guest: &str) -> PathBuf {
    lab_dir(config).join(format!("{guest}.console"))
}

/// Makes what VMs need (the image and the vsock backend, in the cache)
/// and starts a keeper for each VM guest of `config` (read from
/// `config_path`), stopping any left from before. Returns the backend's
/// path, which the config's `host.vsock_backend` must name.
pub fn start(config: &Config, config_path: &Path) -> Result<PathBuf, VmError> {
    let cache = cache_dir();
    Image::ensure(&cache)?;
    let backend = vsock_backend(&cache)?;
    stop(config);
    let dir = lab_dir(config);
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let me = std::env::current_exe().map_err(io_error(Path::new("/proc/self/exe")))?;
    if !vm_guests(config).is_empty() && !visible_in_guest(&me) {
        return Err(VmError::Command {
            what: "VM guests".into(),
            output: format!(
                "{} is not visible in a VM guest, which has a /tmp and a /run of its own over the host's \
                 root: build and run the workspace from another directory",
                me.display()
            ),
        });
    }
    for (name, _, _) in vm_guests(config) {
        let console = console_file(config, &name);
        let out = std::fs::File::create(&console).map_err(io_error(&console))?;
        let err = out.try_clone().map_err(io_error(&console))?;
        let keeper = Command::new(&me)
            .args(["lab", "vm", "--guest", &name, "--config"])
            .arg(config_path)
            .env("VSOCKET_VM_CACHE", &cache)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io_error(&me))?;
        // The pid with its start time: a later process given the same pid
        // (the VM long gone) is not taken for it.
        let pid = pid_file(config, &name);
        let started = start_time(keeper.id()).unwrap_or_default();
        std::fs::write(&pid, format!("{} {started}", keeper.id())).map_err(io_error(&pid))?;
    }
    Ok(backend)
}

/// Does a VM guest see the host's file at `path`? It sees the host's root
/// read-only, except for its own `/tmp` and `/run` (see `super::Image`),
/// where the lab's binaries (the agent, the library) must not be.
fn visible_in_guest(path: &Path) -> bool {
    !(path.starts_with("/tmp") || path.starts_with("/run"))
}

/// The keeper of VM guest `guest`: waits for vsocketd to serve it, then
/// becomes its QEMU (in the guest's network namespace), running the guest
/// agent. Returns only on failure.
pub fn keep(config: &Config, guest: &str) -> VmError {
    let Some((_, netns, vm)) = vm_guests(config).into_iter().find(|(name, _, _)| name == guest) else {
        return VmError::Command { what: format!("guest {guest}"), output: "is no VM guest of this host".into() };
    };
    let paths = vm_paths(&config.host().run_dir, guest);
    let began = Instant::now();
    while !paths.vhost.exists() {
        if began.elapsed() > DAEMON_WAIT {
            return VmError::Command {
                what: format!("VM guest {guest}"),
                output: format!(
                    "no vsock backend at {} after {DAEMON_WAIT:?}: is vsocketd running?",
                    paths.vhost.display()
                ),
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let image = match Image::ensure(&cache_dir()) {
        Ok(image) => image,
        Err(e) => return e,
    };
    let me = match std::env::current_exe() {
        Ok(me) => me,
        Err(e) => return VmError::Io { path: "/proc/self/exe".into(), error: e },
    };
    let script = format!("exec {} agent", me.display());
    let boot = Boot {
        memory_mib: (vm.memory >> 20) as u32,
        script: &script,
        vsock: Some(&paths.vhost),
        region: Some((&paths.region, vm.region)),
    };
    let netns_path = Path::new("/run/netns").join(&netns);
    if let Err(e) = vsocket_sys::enter_netns(&netns_path) {
        return VmError::Io { path: netns_path, error: e };
    }
    let error = image.command(&boot).exec();
    VmError::Command { what: "qemu-system-x86_64".into(), output: error.to_string() }
}

/// Stops the lab's VMs (their QEMU processes), if any.
pub fn stop(config: &Config) {
    for (name, _, _) in vm_guests(config) {
        let pid_path = pid_file(config, &name);
        if let Some(pid) = running(&pid_path) {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            let began = Instant::now();
            while process_alive(pid) && began.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_file(&pid_path);
    }
}

/// Each VM guest of `config` and its QEMU's pid, if it runs.
pub fn status(config: &Config) -> Vec<(String, Option<u32>)> {
    vm_guests(config).into_iter().map(|(name, _, _)| (name.clone(), running(&pid_file(config, &name)))).collect()
}

/// The pid in `pid_path`, if that process is alive and is the one the
/// file names (started when it says).
fn running(pid_path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(pid_path).ok()?;
    let mut words = text.split_whitespace();
    let pid: u32 = words.next()?.parse().ok()?;
    let started: Option<u64> = words.next().and_then(|w| w.parse().ok());
    let same = started.is_none_or(|s| start_time(pid) == Some(s));
    (same && process_alive(pid)).then_some(pid)
}

/// When process `pid` started, in clock ticks after boot.
fn start_time(pid: u32) -> Option<u64> {
    // Field 22 of the stat line; the state is field 3.
    vsocket_sys::stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    vsocket_sys::process_running(pid) == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_under_the_guests_own_tmp_or_run_are_not_visible_there() {
        assert!(visible_in_guest(Path::new("/work/main/target/release/vsocket")));
        assert!(visible_in_guest(Path::new("/tmpfiles/vsocket")), "only the directory itself");
        assert!(!visible_in_guest(Path::new("/tmp/tree/target/release/vsocket")));
        assert!(!visible_in_guest(Path::new("/run/build/vsocket")));
    }

    #[test]
    fn a_pid_file_names_its_process_by_pid_and_start_time() {
        let me = std::process::id();
        let started = start_time(me).expect("this process has a start time");
        let file = std::env::temp_dir().join(format!("vsocket-pidfile-{me}"));
        let says = |text: String| {
            std::fs::write(&file, text).unwrap();
            running(&file)
        };
        assert_eq!(says(format!("{me} {started}")), Some(me));
        assert_eq!(says(format!("{me} {}", started + 1)), None, "another process given the same pid");
        assert_eq!(says(format!("{me}")), Some(me), "a file without a start time");
        assert_eq!(says("not a pid".into()), None);
        let _ = std::fs::remove_file(&file);
    }
}
