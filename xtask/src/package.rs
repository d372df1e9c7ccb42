//! `cargo xtask package`: the Debian package, made with Debian's own
//! `dpkg-deb` from the release build and `packaging/`; and its check,
//! which installs it, starts vsocketd from the installed files and talks
//! to it with the installed vsocketctl, then removes it.

use crate::{root, run, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where each built file goes, and its mode.
const FILES: &[(&str, &str, u32)] = &[
    ("target/release/vsocketd", "usr/sbin/vsocketd", 0o755),
    ("target/release/vsocketctl", "usr/bin/vsocketctl", 0o755),
    ("target/release/vsocket", "usr/bin/vsocket", 0o755),
    ("target/release/libvsocket.so", "usr/lib/vsocket/libvsocket.so", 0o644),
    ("packaging/vsocketd.service", "lib/systemd/system/vsocketd.service", 0o644),
    ("packaging/vsocket.toml", "etc/vsocket/vsocket.toml", 0o644),
    ("README.md", "usr/share/doc/vsocket/README.md", 0o644),
    ("crates/policy/examples/lab.toml", "usr/share/doc/vsocket/examples/lab.toml", 0o644),
    ("crates/policy/examples/vm.toml", "usr/share/doc/vsocket/examples/vm.toml", 0o644),
];

/// The package's version: the workspace's.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// An I/O error on `what`, as text.
fn io(what: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", what.display())
}

/// Makes `target/debian/vsocket_VERSION_amd64.deb` from the release build
/// (which must be there); returns its path.
pub fn build() -> Result<PathBuf> {
    let root_dir = root();
    let out = root_dir.join("target/debian");
    let stage = out.join("root");
    let _ = std::fs::remove_dir_all(&stage);
    for (from, to, mode) in FILES {
        let (from, to) = (root_dir.join(from), stage.join(to));
        std::fs::create_dir_all(to.parent().unwrap()).map_err(io(&to))?;
        std::fs::copy(&from, &to).map_err(io(&from))?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(*mode)).map_err(io(&to))?;
        if *mode == 0o755 || to.extension().is_some_and(|e| e == "so") {
            // The release profile keeps debug info; the package does not.
            run(Command::new("strip").arg("--strip-debug").arg(&to))?;
        }
    }
    let control_dir = stage.join("DEBIAN");
    std::fs::create_dir_all(&control_dir).map_err(io(&control_dir))?;
    let template = root_dir.join("packaging/control");
    let control = std::fs::read_to_string(&template).map_err(io(&template))?.replace("@VERSION@", VERSION);
    std::fs::write(control_dir.join("control"), control).map_err(io(&control_dir))?;
    // The config is the operator's: an upgrade keeps their edits.
    std::fs::write(control_dir.join("conffiles"), "/etc/vsocket/vsocket.toml\n").map_err(io(&control_dir))?;
    let deb = out.join(format!("vsocket_{VERSION}_amd64.deb"));
    run(Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&stage).arg(&deb))?;
    Ok(deb)
}

/// Installs `deb`, checks its unit file, starts vsocketd from the
/// installed files with the installed config, asks it for its status with
/// the installed vsocketctl, stops it, and removes the package (purged:
/// the machine is left as it was).
pub fn check(deb: &Path) -> Result {
    if Path::new("/usr/sbin/vsocketd").exists() && !installed() {
        return Err("/usr/sbin/vsocketd exists but is no package's: not overwriting it".into());
    }
    let run_dir = Path::new("/run/vsocket");
    let had_run_dir = run_dir.exists();
    run(Command::new("dpkg").arg("-i").arg(deb))?;
    let checked = started_from_installed_files();
    if !had_run_dir {
        let _ = std::fs::remove_dir_all(run_dir);
    }
    let removed = run(Command::new("dpkg").args(["--purge", "vsocket"]));
    checked?;
    removed?;
    for gone in ["/usr/sbin/vsocketd", "/usr/lib/vsocket/libvsocket.so", "/etc/vsocket/vsocket.toml"] {
        if Path::new(gone).exists() {
            return Err(format!("{gone} is still there after the package was purged"));
        }
    }
    println!("package: installed, vsocketd started from it and answered, purged");
    Ok(())
}

fn installed() -> bool {
    Command::new("dpkg").args(["-s", "vsocket"]).output().is_ok_and(|o| o.status.success())
}

fn started_from_installed_files() -> Result {
    for file in ["/usr/sbin/vsocketd", "/usr/bin/vsocketctl", "/usr/bin/vsocket", "/usr/lib/vsocket/libvsocket.so"] {
        if !Path::new(file).is_file() {
            return Err(format!("the package did not install {file}"));
        }
    }
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let verify = Command::new("systemd-analyze")
            .args(["verify", "/lib/systemd/system/vsocketd.service"])
            .output()
            .map_err(|e| format!("systemd-analyze: {e}"))?;
        let said = String::from_utf8_lossy(&verify.stderr);
        // It also judges the machine's other units; only ours counts here.
        if said.lines().any(|l| l.contains("vsocketd.service")) {
            return Err(format!("systemd-analyze verify vsocketd.service:\n{said}"));
        }
    }
    let config = "/etc/vsocket/vsocket.toml";
    let mut daemon = Command::new("/usr/sbin/vsocketd")
        .args(["--config", config])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("/usr/sbin/vsocketd: {e}"))?;
    let began = Instant::now();
    let status = loop {
        let out = Command::new("/usr/bin/vsocketctl").args(["--config", config, "status"]).output();
        match out {
            Ok(out) if out.status.success() => break Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            _ if began.elapsed() > Duration::from_secs(10) => break Err("the installed vsocketd never answered"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = Command::new("kill").args(["-INT", &daemon.id().to_string()]).status();
    let _ = daemon.wait();
    let status = status?;
    if !status.lines().any(|l| l == "host: localhost") {
        return Err(format!("the installed vsocketd's status:\n{status}"));
    }
    Ok(())
}
