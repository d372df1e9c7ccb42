//! Where vsocketd's sockets and the guests' namespaces are on the host:
//! one layout that the daemon creates and the tools (`vsocketctl`,
//! `vsocket run`, `vsocket lab`) find.

use std::path::{Path, PathBuf};

/// Where the control socket of guest `name` lives under `run_dir`.
pub fn guest_socket_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("guests").join(format!("{name}.sock"))
}

/// Where VM guest `name`'s files live under `run_dir`: its vsock
/// backend's vhost-user socket (QEMU's `-chardev socket,path=`), the unix
/// sockets guest streams arrive on (`vsock.sock_<port>`), and its memory
/// region (QEMU's ivshmem `mem-path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
    pub vhost: PathBuf,
    pub uds: PathBuf,
    pub region: PathBuf,
}

/// [`VmPaths`] of VM guest `name`.
pub fn vm_paths(run_dir: &Path, name: &str) -> VmPaths {
    let dir = run_dir.join("vms").join(name);
    VmPaths { vhost: dir.join("vhost.sock"), uds: dir.join("vsock.sock"), region: dir.join("region"), dir }
}

/// The unix socket on which streams to `port` from a VM with `uds` arrive.
pub fn vm_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Where the operator's socket lives under `run_dir`.
pub fn admin_socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("vsocketd.sock")
}

/// Where a network namespace named by the config is bound (iproute2's
/// place for named namespaces).
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new("/run/netns").join(netns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_under_run_dir() {
        let run_dir = Path::new("/run/vsocket");
        assert_eq!(guest_socket_path(run_dir, "a"), Path::new("/run/vsocket/guests/a.sock"));
        assert_eq!(admin_socket_path(run_dir), Path::new("/run/vsocket/vsocketd.sock"));
        assert_eq!(netns_path("vs-a"), Path::new("/run/netns/vs-a"));
    }
}
