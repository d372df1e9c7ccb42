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
        let pid = pid_file(config, &name);
        std::fs::write(&pid, keeper.id().to_string()).map_err(io_error(&pid))?;
    }
    Ok(backend)
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

/// The pid in `pid_path`, if that process is alive.
fn running(pid_path: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_path).ok()?.trim().parse().ok()?;
    process_alive(pid).then_some(pid)
}

fn process_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}
