//! `vsocket run`: start an unmodified program inside a guest.
//!
//! The program is exec'd (it replaces `vsocket`, keeping its pid, so signals
//! and exit codes pass straight through) after three things are arranged:
//!
//! 1. the calling thread has joined the guest's network namespace,
//!    `/run/netns/<netns>`, which `vsocket lab up` creates;
//! 2. `LD_PRELOAD` starts with the vSocket library (see [`library_path`]);
//! 3. [`guest_env`] tells the library which guest it is in and where that
//!    guest's control socket is.
//!
//! The daemon does not trust any of this: it checks that whoever connects to
//! a guest's control socket lives in that guest's namespace. The environment
//! only spares the library from guessing.
//!
//! With `--no-preload` the program runs in the namespace on the plain kernel
//! network stack, the baseline vSocket is measured against.
//!
//! Unlike `ip netns exec`, this does not remount `/sys`: a program that
//! lists interfaces through `/sys/class/net` sees the host's, while netlink
//! and sockets see the guest's.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vsocket_policy::{Config, ConfigError, GuestId};

/// The preload library's file name.
pub const LIBRARY_FILE_NAME: &str = "libvsocket.so";

/// Where the library is installed system-wide, the last place
/// [`library_path`] looks.
pub const INSTALLED_LIBRARY: &str = "/usr/lib/vsocket/libvsocket.so";

/// The environment variable that overrides where the library is.
pub const LIBRARY_ENV: &str = "VSOCKET_LIB";

/// The environment variable through which the library finds its guest's
/// control socket; without it the library leaves every call to the kernel.
pub const CONTROL_ENV: &str = "VSOCKET_CONTROL";

/// The environment variable naming the guest, for the program's own use
/// (logs, prompts).
pub const GUEST_ENV: &str = "VSOCKET_GUEST";

/// What `vsocket run` was asked to do.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The config file that describes the guest.
    pub config: PathBuf,
    /// The name of the guest to run in.
    pub guest: String,
    /// The program, looked up in `PATH` like a shell would.
    pub program: OsString,
    /// Its arguments, not including the program name.
    pub args: Vec<OsString>,
    /// Whether to load and attach the library; `false` runs the program on
    /// the kernel's network stack.
    pub preload: bool,
}

/// Why `vsocket run` could not start the program.
#[derive(Debug)]
pub enum RunError {
    /// The config file could not be loaded; its message names the problem.
    Config(ConfigError),
    /// `no guest "{name}" in {config} (guests: {known})`
    UnknownGuest {
        /// The name asked for.
        name: String,
        /// The config file searched.
        config: PathBuf,
        /// Every guest the config does have, in file order.
        known: Vec<String>,
    },
    /// `no usable vSocket library (set VSOCKET_LIB, or pass --no-preload to
    /// use the kernel's network stack)`; the I/O error says where it looked
    /// or what is wrong with the one found.
    Library(io::Error),
    /// `guest "{guest}" runs on host "{host}": use that host's config`
    OtherHost {
        /// The guest.
        guest: String,
        /// The host its config places it on.
        host: String,
    },
    /// `network namespace "{netns}" of guest "{guest}" does not exist (create
    /// it with `vsocket lab up`)`
    NoNamespace {
        /// The guest.
        guest: String,
        /// Its namespace's name.
        netns: String,
    },
    /// `cannot enter network namespace {path}`; the I/O error is the source.
    EnterNamespace {
        /// The namespace file.
        path: PathBuf,
        /// What `setns` (or opening the file) said.
        source: io::Error,
    },
    /// `cannot execute {program}`; the I/O error is the source.
    Exec {
        /// The program as given.
        program: OsString,
        /// What `execvp` said.
        source: io::Error,
    },
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(err) => err.fmt(f),
            Self::UnknownGuest { name, config, known } => {
                write!(f, "no guest \"{name}\" in {}", config.display())?;
                if known.is_empty() {
                    f.write_str(" (it defines no guests)")
                } else {
                    write!(f, " (guests: {})", known.join(", "))
                }
            }
            Self::Library(_) => f.write_str(
                "no usable vSocket library (set VSOCKET_LIB, or pass --no-preload to use the \
                 kernel's network stack)",
            ),
            Self::OtherHost { guest, host } => {
                write!(f, "guest \"{guest}\" runs on host \"{host}\": use that host's config")
            }
            Self::NoNamespace { guest, netns } => write!(
                f,
                "network namespace \"{netns}\" of guest \"{guest}\" does not exist (create it \
                 with `vsocket lab up`)"
            ),
            Self::EnterNamespace { path, .. } => {
                write!(f, "cannot enter network namespace {}", path.display())
            }
            Self::Exec { program, .. } => {
                write!(f, "cannot execute {}", Path::new(program).display())
            }
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // The config error's own message is this error's message, so its
            // source comes next in the chain, not the error itself.
            Self::Config(err) => err.source(),
            Self::Library(source) | Self::EnterNamespace { source, .. } | Self::Exec { source, .. } => Some(source),
            Self::UnknownGuest { .. } | Self::OtherHost { .. } | Self::NoNamespace { .. } => None,
        }
    }
}

/// Runs `launch.program` in the guest; returns only if that failed.
///
/// On success the current process image is replaced. Joining the namespace
/// changes the calling thread only, so call this from a single-threaded
/// process (or at least from the thread that will exec).
pub fn exec(launch: &Launch) -> RunError {
    let config = match crate::store::load_config(&launch.config) {
        Ok(config) => config,
        Err(err) => return RunError::Config(err),
    };
    // A guest added live (`vsocketctl guest add`) is not in the file: the
    // daemon knows it.
    let Some(guest) = config
        .guest_by_name(&launch.guest)
        .map(|id| config.guest(id))
        .map(|g| (g.name.clone(), g.netns.clone()))
        .or_else(|| live_guest(&config, &launch.guest))
    else {
        return RunError::UnknownGuest {
            name: launch.guest.clone(),
            config: launch.config.clone(),
            known: config.guests().map(|(_, guest)| guest.name.clone()).collect(),
        };
    };
    let (name, netns_name) = guest;
    if let Some(id) = config.guest_by_name(&name).filter(|id| !config.is_local(*id)) {
        return RunError::OtherHost { guest: name, host: config.guest(id).host.clone() };
    }

    let mut command = Command::new(&launch.program);
    command.args(&launch.args);
    if launch.preload {
        // Found before entering the namespace so a missing library leaves
        // the process where it was.
        let library = match library_path() {
            Ok(library) => library,
            Err(err) => return RunError::Library(err),
        };
        let existing = std::env::var_os("LD_PRELOAD");
        command.env("LD_PRELOAD", ld_preload(&library, existing.as_deref()));
        command.envs(guest_env_named(&config.host().run_dir, &name));
    } else {
        command.env_remove(CONTROL_ENV).env_remove(GUEST_ENV);
        if let Some(list) = std::env::var_os("LD_PRELOAD") {
            match without_library(&list) {
                Some(rest) => command.env("LD_PRELOAD", rest),
                None => command.env_remove("LD_PRELOAD"),
            };
        }
    }

    let netns = vsocket_admin::netns_path(&netns_name);
    if let Err(source) = vsocket_sys::enter_netns(&netns) {
        return if source.kind() == io::ErrorKind::NotFound {
            RunError::NoNamespace { guest: name, netns: netns_name }
        } else {
            RunError::EnterNamespace { path: netns, source }
        };
    }

    RunError::Exec { program: launch.program.clone(), source: command.exec() }
}

/// Where the preload library is: `$VSOCKET_LIB` if set, else
/// `libvsocket.so` next to the running executable (as in a build tree or a
/// release tarball), else [`INSTALLED_LIBRARY`].
///
/// The path returned exists and is absolute, since `LD_PRELOAD` would
/// resolve a relative one against each program's working directory. A
/// `$VSOCKET_LIB` that names a missing file is an error rather than a reason
/// to look elsewhere: whoever set it wanted that library.
pub fn library_path() -> io::Result<PathBuf> {
    let library = if let Some(explicit) = std::env::var_os(LIBRARY_ENV).filter(|p| !p.is_empty()) {
        let explicit = PathBuf::from(explicit);
        if !explicit.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{LIBRARY_ENV}={} is not a file", explicit.display()),
            ));
        }
        explicit
    } else {
        let beside_executable =
            std::env::current_exe().ok().and_then(|exe| exe.parent().map(|dir| dir.join(LIBRARY_FILE_NAME)));
        let candidates: Vec<PathBuf> =
            beside_executable.into_iter().chain([PathBuf::from(INSTALLED_LIBRARY)]).collect();
        match candidates.iter().find(|path| path.is_file()) {
            Some(found) => found.clone(),
            None => {
                let tried: Vec<String> = candidates.iter().map(|path| path.display().to_string()).collect();
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("not at {}", tried.join(" nor "))));
            }
        }
    };
    let library = std::path::absolute(&library)?;
    // ld.so splits LD_PRELOAD at both separators, with no way to escape them.
    if library.as_os_str().as_bytes().iter().any(|b| matches!(b, b':' | b' ')) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains ':' or ' ', which LD_PRELOAD cannot carry", library.display()),
        ));
    }
    Ok(library)
}

/// The environment the library needs to attach a program to `guest`:
/// [`CONTROL_ENV`] (its control socket under the config's `run_dir`) and
/// [`GUEST_ENV`]. `LD_PRELOAD` is not included; see [`ld_preload`].
pub fn guest_env(config: &Config, guest: GuestId) -> Vec<(String, String)> {
    guest_env_named(&config.host().run_dir, &config.guest(guest).name)
}

fn guest_env_named(run_dir: &Path, name: &str) -> Vec<(String, String)> {
    let control = vsocket_admin::guest_socket_path(run_dir, name);
    vec![
        // run_dir came from a TOML string, so the path is valid UTF-8.
        (CONTROL_ENV.to_owned(), control.to_string_lossy().into_owned()),
        (GUEST_ENV.to_owned(), name.to_owned()),
    ]
}

/// The name and namespace of guest `name` as the running daemon knows it
/// (its admin socket, readable by root only, as `vsocket run` runs), if it
/// does.
fn live_guest(config: &Config, name: &str) -> Option<(String, String)> {
    let path = vsocket_admin::admin_socket_path(&config.host().run_dir);
    let client = vsocket_admin::Client::new(path).with_timeout(std::time::Duration::from_secs(5));
    let guest = client.guests().ok()?.into_iter().find(|g| g.name == name)?;
    Some((guest.name, guest.netns))
}

/// The `LD_PRELOAD` value that loads `library` first, before the entries of
/// `existing` (the inherited value), which are kept.
pub fn ld_preload(library: &Path, existing: Option<&OsStr>) -> OsString {
    let mut value = library.as_os_str().to_owned();
    if let Some(existing) = existing.filter(|existing| !existing.is_empty()) {
        value.push(":");
        value.push(existing);
    }
    value
}

/// `list` (an `LD_PRELOAD` value) without any entry naming the vSocket
/// library, so that `--no-preload` means it even when started from a
/// program that was itself preloaded; `None` if nothing is left.
fn without_library(list: &OsStr) -> Option<OsString> {
    let kept: Vec<&[u8]> = list
        .as_bytes()
        .split(|b| matches!(b, b':' | b' '))
        .filter(|entry| !entry.is_empty())
        .filter(|entry| Path::new(OsStr::from_bytes(entry)).file_name() != Some(OsStr::new(LIBRARY_FILE_NAME)))
        .collect();
    if kept.is_empty() {
        None
    } else {
        Some(OsString::from_vec(kept.join(&b':')))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_goes_first_and_existing_entries_stay() {
        let library = Path::new("/opt/vs/libvsocket.so");
        assert_eq!(ld_preload(library, None), "/opt/vs/libvsocket.so");
        assert_eq!(ld_preload(library, Some(OsStr::new(""))), "/opt/vs/libvsocket.so");
        assert_eq!(
            ld_preload(library, Some(OsStr::new("libfoo.so /x/libbar.so"))),
            "/opt/vs/libvsocket.so:libfoo.so /x/libbar.so"
        );
    }

    #[test]
    fn no_preload_strips_only_the_vsocket_library() {
        assert_eq!(without_library(OsStr::new("/a/libvsocket.so")), None);
        assert_eq!(
            without_library(OsStr::new("libfoo.so:/a/libvsocket.so /b/libbar.so")),
            Some(OsString::from("libfoo.so:/b/libbar.so"))
        );
        assert_eq!(without_library(OsStr::new("/a/libvsocket.so.1")), Some(OsString::from("/a/libvsocket.so.1")));
    }

    #[test]
    fn guest_env_names_the_guest_socket_under_run_dir() {
        let text = r#"
            [host]
            name = "h"
            run_dir = "/run/vs-test"
            [[vpc]]
            name = "blue"
            cidr = "10.1.0.0/24"
            [[guest]]
            name = "web"
            vpc = "blue"
            addresses = ["10.1.0.2"]
        "#;
        let config = vsocket_policy::parse(text, Path::new("test.toml")).expect("valid config");
        let web = config.guest_by_name("web").expect("guest web");
        assert_eq!(
            guest_env(&config, web),
            [
                (CONTROL_ENV.to_owned(), "/run/vs-test/guests/web.sock".to_owned()),
                (GUEST_ENV.to_owned(), "web".to_owned()),
            ]
        );
    }
}
