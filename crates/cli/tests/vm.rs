//! A virtual-machine guest: QEMU under TCG boots Debian's kernel with the
//! initramfs `vsocket_cli::vm` makes, and runs the host's own programs
//! over the host's root, read-only over 9p.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use vsocket_cli::vm::{exit_status, Boot, Image};

/// The cache the tests share (the workspace's target directory).
fn cache() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/vm-cache")
}

/// How long a boot may take under TCG before the test gives up on it.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

#[test]
fn a_vm_guest_boots_and_runs_the_hosts_programs() {
    let image = Image::ensure(&cache()).unwrap_or_else(|e| panic!("{e}"));
    let script = "python3 -c 'print(6 * 7)'; echo guest-kernel=$(uname -r); echo cpus=$(nproc); exit 3";
    let mut child = image
        .command(&Boot { memory_mib: 512, script })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let began = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if began.elapsed() > BOOT_LIMIT {
            let _ = child.kill();
            panic!("the guest ran over {BOOT_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    let console = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(console.lines().any(|l| l.trim() == "42"), "console:\n{console}\nstderr:\n{stderr}");
    // Its own kernel (Debian's guest kernel), not the host's, on one CPU.
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let guest_kernel = console.lines().find_map(|l| l.trim().strip_prefix("guest-kernel=")).expect("the guest's kernel");
    assert_ne!(guest_kernel, host_kernel.trim());
    assert!(console.lines().any(|l| l.trim() == "cpus=1"), "{console}");
    assert_eq!(exit_status(&console), Some(3), "{console}");
    eprintln!("booted, ran and powered off in {:?}", began.elapsed());
}
