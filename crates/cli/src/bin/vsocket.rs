//! `vsocket`: run programs inside guests, and manage the lab network.
//!
//! Exit codes: 2 for usage and config errors, 1 for runtime errors, 127 when
//! the program given to `vsocket run` cannot be executed; otherwise `run`
//! becomes the program and exits with its status.

use std::error::Error;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vsocket_cli::lab::{self, LabError};
use vsocket_cli::run::{self, Launch, RunError};
use vsocket_cli::vm::{agent, guests};
use vsocket_policy::Config;

#[derive(Parser)]
#[command(name = "vsocket", version, about = "Run programs inside vSocket guests")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a program inside a guest, attached to vSocket.
    Run(RunArgs),
    /// Create, remove or inspect the kernel network a config describes.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Inside a VM guest: serve `vsocket run` requests from the host.
    #[command(hide = true)]
    Agent,
}

#[derive(Args)]
struct RunArgs {
    /// The guest to run in, as named in the config.
    #[arg(long, value_name = "NAME")]
    guest: String,
    #[command(flatten)]
    config: ConfigArg,
    /// Run on the kernel's network stack, without the vSocket library.
    #[arg(long)]
    no_preload: bool,
    /// The program and its arguments, usually after `--`.
    #[arg(value_name = "PROGRAM", required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

#[derive(Subcommand)]
enum LabAction {
    /// Create the namespaces, bridges and veths (replacing leftovers), and
    /// boot the VM guests (each as soon as vsocketd serves it).
    Up {
        #[command(flatten)]
        config: ConfigArg,
        /// Leave the VM guests alone.
        #[arg(long)]
        no_vms: bool,
    },
    /// Boot the VM guests only (stopping any left from before).
    Vms(ConfigArg),
    /// Stop the VM guests and delete the network; does nothing if absent.
    Down(ConfigArg),
    /// Become VM guest GUEST's QEMU once vsocketd serves it.
    #[command(hide = true)]
    Vm {
        #[arg(long)]
        guest: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show which namespaces exist and each guest's addresses.
    Status(ConfigArg),
}

#[derive(Args)]
struct ConfigArg {
    /// The config file [default: $VSOCKET_CONFIG, else /etc/vsocket/vsocket.toml].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    fn path(&self) -> PathBuf {
        vsocket_cli::config_path(self.config.clone())
    }
}

/// What went wrong, and the exit code that says what kind of thing it was.
struct Failure {
    error: Box<dyn Error>,
    code: u8,
}

const USAGE: u8 = 2;
const RUNTIME: u8 = 1;
const CANNOT_EXECUTE: u8 = 127;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => match run_in_vm(&args) {
            // The program's own exit code.
            Some(Ok(code)) => return ExitCode::from(code),
            Some(Err(failure)) => Err(failure),
            None => Err(run(args)),
        },
        Command::Lab { action } => lab(action),
        Command::Agent => vsocket_cli::vm::agent::serve().map_err(|e| Failure { error: Box::new(e), code: RUNTIME }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("vsocket: {}", chain(&*failure.error));
            ExitCode::from(failure.code)
        }
    }
}

/// Runs the program in the guest's VM through its agent, if the guest is a
/// VM; `None` for a namespace guest (and for a config that does not load:
/// `run` reports that).
fn run_in_vm(args: &RunArgs) -> Option<Result<u8, Failure>> {
    let config = vsocket_cli::store::load_config(&args.config.path()).ok()?;
    let guest = config.guest_by_name(&args.guest)?;
    config.guest(guest).vm?;
    let runtime = |error: Box<dyn Error>| Failure { error, code: RUNTIME };
    // Said at once, rather than after waiting for an agent that is not
    // coming.
    if !config.is_local(guest) {
        let why = format!("VM guest {} runs on another host: run it there", args.guest);
        return Some(Err(runtime(why.into())));
    }
    let booted =
        vsocket_cli::vm::guests::status(&config).into_iter().any(|(name, pid)| name == args.guest && pid.is_some());
    if !booted {
        let why = format!("VM guest {} is not running (vsocket lab up, or vsocket lab vms, boots it)", args.guest);
        return Some(Err(runtime(why.into())));
    }
    let mut env = Vec::new();
    if !args.no_preload {
        let library = match run::library_path() {
            Ok(library) => library,
            Err(e) => return Some(Err(runtime(Box::new(RunError::Library(e))))),
        };
        env.push(("LD_PRELOAD".to_owned(), library.to_string_lossy().into_owned()));
        env.push((run::CONTROL_ENV.to_owned(), "vsock".to_owned()));
        env.push((run::GUEST_ENV.to_owned(), args.guest.clone()));
    }
    let text = |s: &OsString| s.to_string_lossy().into_owned();
    let request =
        agent::Request { program: text(&args.command[0]), args: args.command[1..].iter().map(text).collect(), env };
    let uds = vsocket_admin::paths::vm_paths(&config.host().run_dir, &args.guest).uds;
    let ran = agent::connect(&uds, AGENT_WAIT).and_then(|stream| {
        agent::run(stream, &request, std::io::stdin(), &mut std::io::stdout().lock(), &mut std::io::stderr().lock())
    });
    Some(match ran {
        Ok(code) => Ok(u8::try_from(code).unwrap_or(1)),
        Err(e) => Err(runtime(Box::new(e))),
    })
}

/// How long `vsocket run` waits for a VM guest's agent (the VM may be
/// booting, or its image being made).
const AGENT_WAIT: std::time::Duration = std::time::Duration::from_secs(180);

/// Execs the program; returns only on failure.
fn run(args: RunArgs) -> Failure {
    let mut command = args.command.into_iter();
    let Some(program) = command.next() else {
        // clap enforces `required`; this only keeps the code total.
        return Failure { error: "no program given".into(), code: USAGE };
    };
    let launch = Launch {
        config: args.config.path(),
        guest: args.guest,
        program,
        args: command.collect(),
        preload: !args.no_preload,
    };
    let error = run::exec(&launch);
    let code = match error {
        RunError::Config(_) | RunError::UnknownGuest { .. } | RunError::OtherHost { .. } => USAGE,
        RunError::Library(_) | RunError::NoNamespace { .. } | RunError::EnterNamespace { .. } => RUNTIME,
        RunError::Exec { .. } => CANNOT_EXECUTE,
    };
    Failure { error: Box::new(error), code }
}

fn lab(action: LabAction) -> Result<(), Failure> {
    match action {
        LabAction::Up { config, no_vms } => {
            let loaded = load(&config)?;
            lab::up(&loaded).map_err(lab_failure)?;
            if no_vms {
                return Ok(());
            }
            start_vms(&loaded, &config)
        }
        LabAction::Vms(config) => start_vms(&load(&config)?, &config),
        LabAction::Down(config) => {
            let loaded = load(&config)?;
            guests::stop(&loaded);
            lab::down(&loaded).map_err(lab_failure)
        }
        LabAction::Vm { guest, config } => {
            Err(Failure { error: Box::new(guests::keep(&load(&config)?, &guest)), code: RUNTIME })
        }
        LabAction::Status(config) => {
            let loaded = load(&config)?;
            for namespace in lab::status(&loaded).map_err(lab_failure)? {
                println!("{namespace}");
            }
            for (name, pid) in guests::status(&loaded) {
                match pid {
                    Some(pid) => println!("vm {name}: running (pid {pid})"),
                    None => println!("vm {name}: not running"),
                }
            }
            Ok(())
        }
    }
}

/// Boots `config`'s VM guests, if it has any.
fn start_vms(config: &Config, arg: &ConfigArg) -> Result<(), Failure> {
    if guests::vm_guests(config).is_empty() {
        return Ok(());
    }
    let backend = guests::start(config, &arg.path()).map_err(|e| Failure { error: Box::new(e), code: RUNTIME })?;
    if config.host().vsock_backend != backend {
        eprintln!(
            "vsocket: note: VM guests need vsocketd's host.vsock_backend = \"{}\" (the config names {})",
            backend.display(),
            config.host().vsock_backend.display()
        );
    }
    for (name, _, _) in guests::vm_guests(config) {
        println!(
            "vm {name}: booting once vsocketd serves it; console {}",
            guests::console_file(config, &name).display()
        );
    }
    Ok(())
}

/// The config, with the model of the store it names, if it names one.
fn load(config: &ConfigArg) -> Result<Config, Failure> {
    vsocket_cli::store::load_config(&config.path()).map_err(|error| Failure { error: Box::new(error), code: USAGE })
}

fn lab_failure(error: LabError) -> Failure {
    let code = match error {
        LabError::NameClash { .. } | LabError::OptionLikeName { .. } => USAGE,
        LabError::Spawn { .. } | LabError::Failed { .. } | LabError::Output { .. } | LabError::NotReady { .. } => {
            RUNTIME
        }
    };
    Failure { error: Box::new(error), code }
}

/// The error's message followed by each of its sources', once each.
fn chain(error: &dyn Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
