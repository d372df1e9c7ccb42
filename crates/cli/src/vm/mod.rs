//! Virtual-machine guests' machinery: QEMU, a guest kernel and an
//! initramfs, kept in a cache this module fills and checks.
//!
//! Nothing is installed on the machine: QEMU 7.2 and the libraries it
//! needs, SeaBIOS, Debian's guest kernel and a static busybox are fetched
//! with `apt-get download` and unpacked with `dpkg -x` into the cache
//! (installing `qemu-system-x86` with apt would replace packages the
//! machine ships). The guest runs under TCG (software emulation): there
//! is no KVM here.
//!
//! A guest boots Debian's kernel with an initramfs made here (`init.sh`,
//! busybox, and the kernel modules for virtio, 9p and vsock, in the order
//! their `.modinfo` gives), mounts the host's root read-only over 9p and
//! runs the host's own binaries (the built workspace, redis, python3), with
//! writable `/tmp` and `/run` of its own. [`Image::command`] runs one
//! script that way and powers off; [`exit_status`] reads its status from
//! the console. A guest may have a vsock device, served by rust-vmm's
//! vhost-device-vsock ([`vsock_backend`], built into the cache): a
//! guest's connect to the host (CID 2) reaches a unix socket on the host.

pub mod agent;
mod cpio;
pub mod guests;
mod modules;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The Debian packages the cache holds, besides the guest kernel
/// (`linux-image-amd64`'s current version): QEMU and what it loads.
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
    "libcapstone4",
    "libfdt1",
    "libpmem1",
    "libndctl6",
    "libdaxctl1",
    "libslirp0",
    "libvdeplug2",
    "busybox-static",
];

/// The modules the initramfs loads (with what they depend on).
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "vmw_vsock_virtio_transport"];

/// What the cache's `ready` stamp says; a cache with another is made again.
const STAMP: &str = "vsocket vm cache 2";

/// Why the VM machinery is not ready.
#[derive(Debug)]
pub enum VmError {
    /// A command failed: what it was for, and its output.
    Command { what: String, output: String },
    /// A file of the cache could not be read or written.
    Io { path: PathBuf, error: io::Error },
    /// The guest kernel's package holds no kernel, or several.
    Kernel(String),
    /// The guest's kernel modules could not be gathered.
    Modules(modules::ModuleError),
    /// A guest ran longer than it was given, and was killed.
    RanOver(Duration),
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Command { what, output } => write!(f, "{what} failed: {output}"),
            VmError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            VmError::Kernel(why) => write!(f, "guest kernel: {why}"),
            VmError::Modules(e) => write!(f, "guest kernel modules: {e}"),
            VmError::RanOver(limit) => write!(f, "the guest ran over {limit:?} and was killed"),
        }
    }
}

impl std::error::Error for VmError {}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> VmError + '_ {
    move |error| VmError::Io { path: path.to_path_buf(), error }
}

/// Runs `command`; its stdout, or an error naming `what` with its output.
fn run(what: &str, command: &mut Command) -> Result<String, VmError> {
    let output = command.output().map_err(|e| VmError::Command { what: what.to_string(), output: e.to_string() })?;
    if !output.status.success() {
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        return Err(VmError::Command { what: what.to_string(), output: text.trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs an apt command; if it fails, once more after `apt-get update` (a
/// fresh machine may have no package lists yet).
fn apt(what: &str, mut command: impl FnMut() -> Command) -> Result<String, VmError> {
    match run(what, &mut command()) {
        Ok(out) => Ok(out),
        Err(_) => {
            run("apt-get update", Command::new("apt-get").args(["update", "-qq"]))?;
            run(what, &mut command())
        }
    }
}

/// What boots a guest: QEMU with its libraries and firmware, the kernel
/// and the initramfs.
#[derive(Debug, Clone)]
pub struct Image {
    root: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// One guest boot.
#[derive(Debug, Clone)]
pub struct Boot<'a> {
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Run by `/bin/sh -c` in the guest, over the host's root.
    pub script: &'a str,
    /// The vhost-user socket of the guest's vsock device's backend (see
    /// [`vsock_backend`]), if it has one. The guest's memory is then a
    /// shared memfd, which vhost-user needs.
    pub vsock: Option<&'a Path>,
    /// A shared-memory file (on a tmpfs), of `region_bytes`, given to the
    /// guest as an ivshmem-plain PCI device (vendor 0x1af4, device
    /// 0x1110): its BAR 2, which guest programs map through
    /// `/sys/bus/pci/devices/*/resource2`.
    pub region: Option<(&'a Path, u64)>,
}

/// The vsock device's backend, rust-vmm's vhost-device-vsock: a guest's
/// connect to CID 2, port P reaches the host's unix socket `UDS_P`.
const VSOCK_BACKEND: &str = "vhost-device-vsock";
/// The version built (with its own lock file, `--locked`).
const VSOCK_BACKEND_VERSION: &str = "0.3.0";

/// The vsock backend's program in `cache`, built there first if it is
/// not (with `cargo install`, from crates.io; about 40 s on two cores).
pub fn vsock_backend(cache: &Path) -> Result<PathBuf, VmError> {
    let tools = cache.join("tools");
    std::fs::create_dir_all(&tools).map_err(io_error(&tools))?;
    let lock_path = tools.join("lock");
    let lock = File::create(&lock_path).map_err(io_error(&lock_path))?;
    lock.lock().map_err(io_error(&lock_path))?;
    let program = tools.join("bin").join(VSOCK_BACKEND);
    if !program.exists() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // Built in the cache, whatever target directory the caller's
        // environment names, and the build removed after.
        let build = tools.join("build");
        run(
            &format!("cargo install {VSOCK_BACKEND} {VSOCK_BACKEND_VERSION}"),
            Command::new(cargo)
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("CARGO_BUILD_TARGET_DIR")
                .args(["install", "--locked", "--quiet", "--version", VSOCK_BACKEND_VERSION, VSOCK_BACKEND])
                .arg("--root")
                .arg(&tools)
                .arg("--target-dir")
                .arg(&build),
        )?;
        let _ = std::fs::remove_dir_all(&build);
    }
    Ok(program)
}

impl Image {
    /// The image in `cache`, fetched and made first if it is not there (or
    /// was made by another version). Safe to call from several processes
    /// at once: they take turns on a lock in the cache.
    pub fn ensure(cache: &Path) -> Result<Image, VmError> {
        std::fs::create_dir_all(cache).map_err(io_error(cache))?;
        let lock_path = cache.join("lock");
        let lock = File::create(&lock_path).map_err(io_error(&lock_path))?;
        lock.lock().map_err(io_error(&lock_path))?;
        let stamp = cache.join("ready");
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(STAMP) {
            make(cache)?;
            std::fs::write(&stamp, STAMP).map_err(io_error(&stamp))?;
        }
        let image = Image::open(cache)?;
        image.check()?;
        Ok(image)
    }

    fn open(cache: &Path) -> Result<Image, VmError> {
        let root = cache.join("root");
        Ok(Image { kernel: kernel_in(&root)?, initrd: cache.join("initrd.cpio"), root })
    }

    fn libraries(&self) -> PathBuf {
        self.root.join("usr/lib/x86_64-linux-gnu")
    }

    fn qemu(&self) -> Command {
        let mut command = Command::new(self.root.join("usr/bin/qemu-system-x86_64"));
        command.env("LD_LIBRARY_PATH", self.libraries());
        command.arg("-L").arg(self.root.join("usr/share/qemu"));
        command.arg("-L").arg(self.root.join("usr/share/seabios"));
        command
    }

    /// QEMU runs (every library it needs is in the cache).
    fn check(&self) -> Result<(), VmError> {
        run("qemu-system-x86_64 --version", self.qemu().arg("--version")).map(drop)
    }

    /// Boots a guest for `boot` and waits for it to power off, at most
    /// `limit` (then it is killed): its console (stdout) and QEMU's stderr.
    pub fn run(&self, boot: &Boot<'_>, limit: Duration) -> Result<Output, VmError> {
        let qemu = |e: io::Error| VmError::Command { what: "qemu-system-x86_64".into(), output: e.to_string() };
        let child = self
            .command(boot)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(qemu)?;
        let pid = child.id().to_string();
        let (done, finished) = mpsc::channel();
        // Read both pipes to the end while waiting, so a chatty guest never
        // blocks on a full pipe.
        let waiter = std::thread::spawn(move || {
            let output = child.wait_with_output();
            let _ = done.send(());
            output
        });
        let ran_over = finished.recv_timeout(limit).is_err();
        if ran_over {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        let output = waiter.join().map_err(|_| qemu(io::Error::other("waiter panicked")))?.map_err(qemu)?;
        if ran_over {
            return Err(VmError::RanOver(limit));
        }
        Ok(output)
    }

    /// The command that boots a guest for `boot` and powers it off when
    /// the script ends; the guest's console is the command's stdout.
    pub fn command(&self, boot: &Boot<'_>) -> Command {
        let mut command = self.qemu();
        command.args(["-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "1"]);
        command.arg("-m").arg(boot.memory_mib.to_string());
        command.args(["-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nic", "none"]);
        command.arg("-kernel").arg(&self.kernel).arg("-initrd").arg(&self.initrd);
        command
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 vsocket.run={}", base64(boot.script.as_bytes())));
        command.args(["-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"]);
        command.args(["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"]);
        if let Some(socket) = boot.vsock {
            let memory = format!("memory-backend-memfd,id=ram,size={}M,share=on", boot.memory_mib);
            command.args(["-object", &memory, "-numa", "node,memdev=ram"]);
            command.arg("-chardev").arg(format!("socket,id=vsock,path={}", socket.display()));
            command.args(["-device", "vhost-user-vsock-pci,chardev=vsock"]);
        }
        if let Some((path, bytes)) = boot.region {
            // master=on: the one peer of this memory, so the VM stays
            // migratable as far as the device goes.
            let memory = format!("memory-backend-file,id=region,mem-path={},size={bytes},share=on", path.display());
            command.args(["-object", &memory, "-device", "ivshmem-plain,memdev=region,master=on"]);
        }
        command
    }
}

/// The guest script's exit status, as the guest's console reports it.
pub fn exit_status(console: &str) -> Option<i32> {
    console.lines().rev().find_map(|l| l.trim().strip_prefix("vsocket-vm-exit=")).and_then(|s| s.parse().ok())
}

/// Fetches, unpacks and builds the image into `cache`.
fn make(cache: &Path) -> Result<(), VmError> {
    let debs = cache.join("debs");
    let root = cache.join("root");
    for dir in [&debs, &root] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io_error(dir))?;
        }
        std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    }
    let depends = apt("apt-cache depends linux-image-amd64", || {
        let mut c = Command::new("apt-cache");
        c.args(["depends", "linux-image-amd64"]);
        c
    })?;
    let kernel_package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")))
        .ok_or_else(|| VmError::Kernel(format!("linux-image-amd64 names no kernel: {depends}")))?
        .to_string();
    apt("apt-get download", || {
        let mut c = Command::new("apt-get");
        c.current_dir(&debs).arg("download").args(PACKAGES).arg(&kernel_package);
        c
    })?;
    let entries = std::fs::read_dir(&debs).map_err(io_error(&debs))?;
    for deb in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "deb")) {
        run(&format!("dpkg -x {}", deb.display()), Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    }
    std::fs::remove_dir_all(&debs).map_err(io_error(&debs))?;
    let initrd = initramfs(&root)?;
    let path = cache.join("initrd.cpio");
    std::fs::write(&path, initrd).map_err(io_error(&path))?;
    // The modules the guest needs are in the initramfs; the rest of the
    // kernel's tree (most of the cache) is not.
    let modules = root.join("lib/modules");
    std::fs::remove_dir_all(&modules).map_err(io_error(&modules))
}

/// The kernel the cache's root holds (`boot/vmlinuz-*`, exactly one).
fn kernel_in(root: &Path) -> Result<PathBuf, VmError> {
    let boot = root.join("boot");
    let entries = std::fs::read_dir(&boot).map_err(io_error(&boot))?;
    let kernels: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .collect();
    match kernels.as_slice() {
        [kernel] => Ok(kernel.clone()),
        other => Err(VmError::Kernel(format!("{} kernels in {}", other.len(), boot.display()))),
    }
}

/// The initramfs: busybox, the modules and `init.sh`.
fn initramfs(root: &Path) -> Result<Vec<u8>, VmError> {
    let kernel = kernel_in(root)?;
    let version = kernel.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("vmlinuz-")).unwrap_or("");
    let tree = root.join("lib/modules").join(version).join("kernel");
    let modules = modules::gather(&tree, MODULES).map_err(VmError::Modules)?;
    let busybox_path = root.join("bin/busybox");
    let busybox = std::fs::read(&busybox_path).map_err(io_error(&busybox_path))?;
    let mut archive = cpio::Archive::new();
    for dir in ["bin", "modules", "proc", "sys", "dev", "mnt"] {
        archive.directory(dir);
    }
    archive.file("bin/busybox", 0o755, &busybox);
    archive.file("init", 0o755, include_str!("init.sh").as_bytes());
    let mut order = String::new();
    for (name, bytes) in &modules {
        archive.file(&format!("modules/{name}.ko"), 0o644, bytes);
        order.push_str(name);
        order.push('\n');
    }
    archive.file("modules/order", 0o644, order.as_bytes());
    Ok(archive.finish())
}

/// Standard base64 (RFC 4648, padded), for the script on the kernel's
/// command line (busybox's `base64 -d` reads it back).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_rfc_4648_gives_it() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn the_exit_status_is_the_last_the_console_reports() {
        assert_eq!(exit_status("boot\nvsocket-vm-exit=3\r\n[ 1.0] reboot: Power down\n"), Some(3));
        assert_eq!(exit_status("vsocket-vm-exit=1\nvsocket-vm-exit=0\n"), Some(0));
        assert_eq!(exit_status("Kernel panic\n"), None);
    }
}
