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
    /// Create the namespaces, bridges and veths (replacing leftovers).
    Up(ConfigArg),
    /// Delete them; does nothing if they are absent.
    Down(ConfigArg),
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
        Command::Run(args) => Err(run(args)),
        Command::Lab { action } => lab(action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("vsocket: {}", chain(&*failure.error));
            ExitCode::from(failure.code)
        }
    }
}

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
        LabAction::Up(config) => lab::up(&load(&config)?).map_err(lab_failure),
        LabAction::Down(config) => lab::down(&load(&config)?).map_err(lab_failure),
        LabAction::Status(config) => {
            for namespace in lab::status(&load(&config)?).map_err(lab_failure)? {
                println!("{namespace}");
            }
            Ok(())
        }
    }
}

fn load(config: &ConfigArg) -> Result<Config, Failure> {
    vsocket_policy::load(&config.path()).map_err(|error| Failure { error: Box::new(error), code: USAGE })
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
