//! A virtual-machine guest: QEMU under TCG boots Debian's kernel with the
//! initramfs `vsocket_cli::vm` makes, and runs the host's own programs
//! over the host's root, read-only over 9p.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vsocket_cli::vm::{exit_status, vsock_backend, Boot, Image};

/// The cache the tests share (the workspace's target directory).
fn cache() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/vm-cache")
}

/// How long a boot may take under TCG before the test gives up on it.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// Boots a guest for `boot` and waits for it to power off: its output.
fn boot(image: &Image, boot: &Boot<'_>) -> Output {
    let began = Instant::now();
    let output = image.run(boot, BOOT_LIMIT).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("booted, ran and powered off in {:?}", began.elapsed());
    output
}

/// Kills the process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_vm_guest_boots_and_runs_the_hosts_programs() {
    let image = Image::ensure(&cache()).unwrap_or_else(|e| panic!("{e}"));
    let script = "python3 -c 'print(6 * 7)'; echo guest-kernel=$(uname -r); echo cpus=$(nproc); exit 3";
    let output = boot(&image, &Boot { memory_mib: 512, script, vsock: None, region: None });
    let console = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(console.lines().any(|l| l.trim() == "42"), "console:\n{console}\nstderr:\n{stderr}");
    // Its own kernel (Debian's guest kernel), not the host's, on one CPU.
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let guest_kernel =
        console.lines().find_map(|l| l.trim().strip_prefix("guest-kernel=")).expect("the guest's kernel");
    assert_ne!(guest_kernel, host_kernel.trim());
    assert!(console.lines().any(|l| l.trim() == "cpus=1"), "{console}");
    assert_eq!(exit_status(&console), Some(3), "{console}");
}

#[test]
fn a_vm_guest_reaches_the_host_over_vsock() {
    let cache = cache();
    let image = Image::ensure(&cache).unwrap_or_else(|e| panic!("{e}"));
    let backend = vsock_backend(&cache).unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("vsocket-vm-vsock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (vhost, uds) = (dir.join("vhost.sock"), dir.join("vsock.sock"));
    // A guest's connect to the host's port 5000 arrives at UDS_5000.
    let listener = UnixListener::bind(dir.join("vsock.sock_5000")).unwrap();
    let _backend = Killed(
        Command::new(&backend)
            .args(["--guest-cid", "3", "--socket"])
            .arg(&vhost)
            .arg("--uds-path")
            .arg(&uds)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let host = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut greeting = [0u8; 20];
        stream.read_exact(&mut greeting).unwrap();
        stream.write_all(b"hello from the host").unwrap();
        greeting
    });
    let began = Instant::now();
    while !vhost.exists() {
        assert!(began.elapsed() < Duration::from_secs(10), "{backend:?} made no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let script = "python3 -c '
import socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.connect((socket.VMADDR_CID_HOST, 5000))
s.sendall(b\"hello from the guest\")
print(\"guest got\", s.recv(100).decode())
'";
    let output = boot(&image, &Boot { memory_mib: 512, script, vsock: Some(&vhost), region: None });
    let console = String::from_utf8_lossy(&output.stdout);
    assert_eq!(exit_status(&console), Some(0), "{console}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(console.contains("guest got hello from the host"), "{console}");
    assert_eq!(&host.join().unwrap(), b"hello from the guest");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_vm_guest_program_shares_a_region_with_the_host() {
    let image = Image::ensure(&cache()).unwrap_or_else(|e| panic!("{e}"));
    const BYTES: u64 = 4 << 20;
    let path = PathBuf::from(format!("/dev/shm/vsocket-vm-region-{}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(BYTES).unwrap();
    // The host's words at the start; the guest answers at the end.
    std::os::unix::fs::FileExt::write_all_at(&file, b"from the host", 0).unwrap();
    let script = "python3 -c '
import glob, mmap, os
for dev in glob.glob(\"/sys/bus/pci/devices/*\"):
    ids = [open(os.path.join(dev, f)).read().strip() for f in (\"vendor\", \"device\")]
    if ids == [\"0x1af4\", \"0x1110\"]:
        break
fd = os.open(os.path.join(dev, \"resource2\"), os.O_RDWR | os.O_SYNC)
region = mmap.mmap(fd, 0)
print(\"region bytes\", len(region))
print(\"guest read\", region[:13].decode())
region[len(region) - 14:] = b\"from the guest\"
region.flush()
'";
    let output = boot(&image, &Boot { memory_mib: 512, script, vsock: None, region: Some((&path, BYTES)) });
    let console = String::from_utf8_lossy(&output.stdout);
    assert_eq!(exit_status(&console), Some(0), "{console}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(console.contains(&format!("region bytes {BYTES}")), "{console}");
    assert!(console.contains("guest read from the host"), "{console}");
    let mut answer = [0u8; 14];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut answer, BYTES - 14).unwrap();
    assert_eq!(&answer, b"from the guest");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_guest_that_runs_over_its_time_is_killed() {
    let image = Image::ensure(&cache()).unwrap_or_else(|e| panic!("{e}"));
    let began = Instant::now();
    let ran =
        image.run(&Boot { memory_mib: 256, script: "sleep 600", vsock: None, region: None }, Duration::from_secs(3));
    assert!(matches!(ran, Err(vsocket_cli::vm::VmError::RanOver(_))), "{ran:?}");
    assert!(began.elapsed() < Duration::from_secs(30), "{:?}", began.elapsed());
}
