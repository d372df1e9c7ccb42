//! `vsocketctl`: the operator's view of vsocketd.
#![forbid(unsafe_code)]

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::Value;
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vsocket_admin::{Applied, Client, ClientError};
use vsocket_cli::{rates, table};
use vsocket_policy::{Change, Direction, GuestSpec, Protocol, ProtocolFilter, RulePeerSpec, RuleSpec};

/// Shows what vsocketd knows (guests, listeners and connections with their
/// byte counts) and changes its policy live: security-group rules, guests'
/// memberships, guests, and reloading the config file.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The daemon's configuration (its run_dir locates the daemon).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// The daemon's run directory, instead of --config.
    #[arg(long, global = true)]
    run_dir: Option<PathBuf>,
    /// Print the daemon's JSON reply instead of a table (`-o json`).
    #[arg(long, global = true)]
    json: bool,
    /// How to print lists: a table that fits 100 columns, a wide table
    /// with every field, or the daemon's JSON reply.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// For a change made in an etcd store (`import`, or a live edit on a
    /// host whose config names a store): return once every host that is
    /// up reports it applied (at most 30 s).
    #[arg(long, global = true)]
    wait: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Wide,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The host, and how many guests, listeners and connections it has.
    Status,
    /// Every guest: VPC, addresses, attachments, connections, bytes.
    Guests,
    /// Every vSocket listener.
    Listeners,
    /// Every open vSocket connection with its byte counts.
    Connections,
    /// The other hosts of the fabric: link state and traffic.
    Peers,
    /// Bytes per second of every open connection and every guest, from two
    /// samples `--interval` seconds apart.
    Rates {
        /// Seconds between the two samples.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Add or remove a security-group rule, live.
    Rule {
        #[command(subcommand)]
        action: RuleAction,
    },
    /// Add a guest to a security group, or take it out, live.
    Member {
        #[command(subcommand)]
        action: MemberAction,
    },
    /// Add or remove a guest, live.
    Guest {
        #[command(subcommand)]
        action: GuestAction,
    },
    /// Add a host to the fabric, or remove one, live: the other hosts link
    /// with it (or drop their link to it) without restarting.
    Host {
        #[command(subcommand)]
        action: HostAction,
    },
    /// Read the config file again and apply what changed (live edits made
    /// since are replaced by the file's content).
    Reload,
    /// Write a config file's tenant model (VPCs, security groups, guests,
    /// fabric hosts) into an etcd store, as one change: the hosts reading
    /// the store apply it. Needs no daemon.
    Import {
        /// The config file whose model is written (validated first).
        file: PathBuf,
        /// The store's members, `http://HOST:PORT`, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// The prefix the model's keys live under.
        #[arg(long, default_value = vsocket_policy::store::DEFAULT_PREFIX)]
        prefix: String,
    },
    /// The fleet's hosts as an etcd store shows them: up (its daemon keeps
    /// its status alive) or down, and the generation each applied.
    Hosts {
        /// The store's members, `http://HOST:PORT`, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// The prefix the model's keys live under.
        #[arg(long, default_value = vsocket_policy::store::DEFAULT_PREFIX)]
        prefix: String,
    },
}

#[derive(Debug, Subcommand)]
enum RuleAction {
    /// Append a rule to the group's ingress or egress rules.
    Add(RuleArgs),
    /// Remove the group's first rule equal to this one.
    Remove(RuleArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DirectionArg {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Tcp,
    Udp,
    Icmp,
    All,
}

#[derive(Debug, ClapArgs)]
struct RuleArgs {
    /// The security group.
    group: String,
    /// ingress (who may connect to members) or egress (whom members may
    /// connect to).
    direction: DirectionArg,
    /// tcp, udp, icmp or all.
    protocol: ProtocolArg,
    /// A port, a range like 1000-2000, or all (the default).
    ports: Option<String>,
    /// The peer: addresses in this block (like 10.10.0.0/24).
    #[arg(long, conflicts_with = "peer_group", required_unless_present = "peer_group")]
    cidr: Option<String>,
    /// The peer: members of this security group.
    #[arg(long)]
    peer_group: Option<String>,
}

#[derive(Debug, Subcommand)]
enum MemberAction {
    /// Make GUEST a member of GROUP.
    Add { guest: String, group: String },
    /// Take GUEST out of GROUP.
    Remove { guest: String, group: String },
}

#[derive(Debug, Subcommand)]
enum GuestAction {
    /// Add a guest: it gets its control socket at once.
    Add {
        /// Its name.
        name: String,
        /// Its VPC.
        #[arg(long)]
        vpc: String,
        /// Its addresses in the VPC (repeat for several).
        #[arg(long = "address", required = true)]
        addresses: Vec<String>,
        /// Its security groups (repeat for several).
        #[arg(long = "security-group")]
        security_groups: Vec<String>,
        /// Its network namespace (default vs-NAME).
        #[arg(long)]
        netns: Option<String>,
        /// The fabric host it runs on (default: the host whose config
        /// names it).
        #[arg(long)]
        host: Option<String>,
        /// Its quota of live connections (default: `[host]
        /// default_max_connections`).
        #[arg(long)]
        max_connections: Option<i64>,
        /// Its quota of shared memory: bytes, or a size like 64MiB (default:
        /// `[host] default_max_shared_memory`).
        #[arg(long)]
        max_shared_memory: Option<String>,
        /// Its quota of control channels (default: `[host]
        /// default_max_channels`).
        #[arg(long)]
        max_channels: Option<i64>,
    },
    /// Remove a guest: its control socket goes and its processes' channels
    /// close.
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
enum HostAction {
    /// Add host NAME, whose daemon takes fabric links at ADDRESS (IP:PORT).
    Add { name: String, address: String },
    /// Remove host NAME (guests placed on it must go first): links to it
    /// and the connections over them end.
    Remove { name: String },
}

/// The live change a command asks for, if it asks for one.
fn change_request(command: &Command) -> Option<Change> {
    let rule = |r: &RuleArgs| {
        let direction = match r.direction {
            DirectionArg::Ingress => Direction::Ingress,
            DirectionArg::Egress => Direction::Egress,
        };
        let protocol = match r.protocol {
            ProtocolArg::Tcp => ProtocolFilter::Only(Protocol::Tcp),
            ProtocolArg::Udp => ProtocolFilter::Only(Protocol::Udp),
            ProtocolArg::Icmp => ProtocolFilter::Only(Protocol::Icmp),
            ProtocolArg::All => ProtocolFilter::All,
        };
        // clap requires one of the two.
        let peer = match (&r.cidr, &r.peer_group) {
            (Some(cidr), _) => RulePeerSpec::Cidr(cidr.clone()),
            (None, group) => RulePeerSpec::Group(group.clone().unwrap_or_default()),
        };
        (r.group.clone(), direction, RuleSpec::new(protocol, r.ports.clone(), peer))
    };
    Some(match command {
        Command::Rule { action: RuleAction::Add(r) } => {
            let (group, direction, rule) = rule(r);
            Change::AddRule { group, direction, rule }
        }
        Command::Rule { action: RuleAction::Remove(r) } => {
            let (group, direction, rule) = rule(r);
            Change::RemoveRule { group, direction, rule }
        }
        Command::Member { action: MemberAction::Add { guest, group } } => {
            Change::AddMembership { guest: guest.clone(), group: group.clone() }
        }
        Command::Member { action: MemberAction::Remove { guest, group } } => {
            Change::RemoveMembership { guest: guest.clone(), group: group.clone() }
        }
        Command::Guest {
            action:
                GuestAction::Add {
                    name,
                    vpc,
                    addresses,
                    security_groups,
                    netns,
                    host,
                    max_connections,
                    max_shared_memory,
                    max_channels,
                },
        } => {
            let mut guest = GuestSpec::new(name.clone(), vpc.clone(), addresses.clone(), security_groups.clone());
            if let Some(netns) = netns {
                guest = guest.with_netns(netns.clone());
            }
            if let Some(host) = host {
                guest = guest.with_host(host.clone());
            }
            if let Some(n) = max_connections {
                guest = guest.with_max_connections(*n);
            }
            if let Some(size) = max_shared_memory {
                guest = guest.with_max_shared_memory(size);
            }
            if let Some(n) = max_channels {
                guest = guest.with_max_channels(*n);
            }
            Change::AddGuest { guest }
        }
        Command::Guest { action: GuestAction::Remove { name } } => Change::RemoveGuest { name: name.clone() },
        Command::Host { action: HostAction::Add { name, address } } => {
            Change::AddHost { name: name.clone(), address: address.clone() }
        }
        Command::Host { action: HostAction::Remove { name } } => Change::RemoveHost { name: name.clone() },
        _ => return None,
    })
}

/// Why vsocketctl stopped.
#[derive(Debug)]
enum CtlError {
    /// `{0}`: the config file that locates the daemon is unreadable.
    Config(vsocket_policy::ConfigError),
    /// `--interval {0}: expected seconds, more than 0 and at most 3600`
    Interval(f64),
    /// `{0}`: the daemon did not answer, or refused.
    Daemon(ClientError),
    /// `cannot print the daemon's reply: {0}`
    Print(serde_json::Error),
    /// `{0}`: the store could not be used (bad endpoints, a conflict, etcd
    /// unreachable).
    Store(String),
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => e.fmt(f),
            Self::Interval(interval) => {
                write!(f, "--interval {interval}: expected seconds, more than 0 and at most 3600")
            }
            Self::Daemon(e) => e.fmt(f),
            Self::Print(e) => write!(f, "cannot print the daemon's reply: {e}"),
            Self::Store(e) => f.write_str(e),
        }
    }
}

impl From<ClientError> for CtlError {
    fn from(e: ClientError) -> CtlError {
        CtlError::Daemon(e)
    }
}

impl CtlError {
    /// 2 for what the command line got wrong, 1 for what the daemon said.
    fn exit_status(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Interval(_) => 2,
            Self::Daemon(_) | Self::Print(_) | Self::Store(_) => 1,
        }
    }
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("vsocketctl: {e}");
        std::process::exit(e.exit_status());
    }
}

/// The daemon's run directory, from the arguments.
fn run_dir(args: &Args) -> Result<PathBuf, CtlError> {
    Ok(match (&args.run_dir, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(file)) => match vsocket_policy::load(file) {
            Ok(c) => c.host().run_dir.clone(),
            // `reload` must reach the daemon to hear what is wrong with the
            // file (and leave the policy in force as it is).
            Err(e) if matches!(args.command, Command::Reload) => {
                vsocket_policy::config::run_dir_of(file).ok_or(CtlError::Config(e))?
            }
            Err(e) => return Err(CtlError::Config(e)),
        },
        (None, None) => PathBuf::from(vsocket_policy::model::HostConfig::DEFAULT_RUN_DIR),
    })
}

fn run(args: Args) -> Result<(), CtlError> {
    let output = if args.json { Output::Json } else { args.output };
    match &args.command {
        Command::Import { file, etcd, prefix } => return import(file, etcd, prefix, args.wait),
        Command::Hosts { etcd, prefix } => return show_hosts(etcd, prefix, output),
        _ => {}
    }
    let client = Client::new(vsocket_admin::admin_socket_path(&run_dir(&args)?));
    let json = output == Output::Json;
    if let Some(change) = change_request(&args.command) {
        // A host whose policy is the fleet's: the change is the store's.
        if let Some(file) = &args.config {
            let (local, config) = vsocket_policy::load_document(file).map_err(CtlError::Config)?;
            if let Some(settings) = &config.host().store {
                return store_edit(&local, settings, &change, args.wait);
            }
        }
        return show_applied(&client.change(change)?, json);
    }
    match args.command {
        Command::Status => {
            let status = value(&client.status()?)?;
            if json {
                println!("{status}");
            } else {
                for (k, v) in status.as_object().into_iter().flatten() {
                    println!("{k}: {}", table::plain(v));
                }
            }
            Ok(())
        }
        Command::Guests => show_rows(&client.guests()?, &table::GUESTS, output),
        Command::Listeners => show_rows(&client.listeners()?, &table::LISTENERS, output),
        Command::Connections => show_rows(&client.connections()?, &table::CONNECTIONS, output),
        Command::Peers => show_rows(&client.peers()?, &table::PEERS, output),
        Command::Rates { interval } => show_rates(&client, interval, output),
        Command::Reload => show_applied(&client.reload()?, json),
        Command::Rule { .. }
        | Command::Member { .. }
        | Command::Guest { .. }
        | Command::Host { .. }
        | Command::Import { .. }
        | Command::Hosts { .. } => {
            unreachable!("live changes and imports are handled above")
        }
    }
}

/// A reply as JSON: objects with their keys sorted, as `--json` prints them
/// and the tables read them.
fn value<T: Serialize>(reply: &T) -> Result<Value, CtlError> {
    serde_json::to_value(reply).map_err(CtlError::Print)
}

/// A list reply as `output` says: JSON, or `view`'s table.
fn show_rows<T: Serialize>(rows: &[T], view: &table::View, output: Output) -> Result<(), CtlError> {
    let rows = value(&rows)?;
    match output {
        Output::Json => println!("{rows}"),
        Output::Table => print!("{}", table::render(&rows, view, table::Width::Narrow)),
        Output::Wide => print!("{}", table::render(&rows, view, table::Width::Wide)),
    }
    Ok(())
}

/// `vsocketctl rates`: samples connections and guests twice.
fn show_rates(client: &Client, interval: f64, output: Output) -> Result<(), CtlError> {
    if !(interval.is_finite() && interval > 0.0 && interval <= 3600.0) {
        return Err(CtlError::Interval(interval));
    }
    let sample = || -> Result<_, ClientError> {
        let start = Instant::now();
        let connections = client.connections()?;
        let guests = client.guests()?;
        Ok((start, connections, guests))
    };
    let (first, connections_before, guests_before) = sample()?;
    std::thread::sleep(Duration::from_secs_f64(interval));
    let (second, connections_after, guests_after) = sample()?;
    let seconds = second.duration_since(first).as_secs_f64();
    let connections = value(&rates::connection_rates(&connections_before, &connections_after, seconds))?;
    let guests = value(&rates::guest_rates(&guests_before, &guests_after, seconds))?;
    let width = match output {
        Output::Json => {
            let reply =
                serde_json::json!({ "interval_seconds": seconds, "connections": connections, "guests": guests });
            println!("{reply}");
            return Ok(());
        }
        Output::Table => table::Width::Narrow,
        Output::Wide => table::Width::Wide,
    };
    println!("over {seconds:.2} s:");
    print!("{}", table::render(&guests, &table::GUEST_RATES, width));
    println!();
    print!("{}", table::render(&connections, &table::CONNECTION_RATES, width));
    Ok(())
}

/// What a live change or a reload did (a refusal, the policy in force
/// unchanged, is an error before this).
fn show_applied(applied: &Applied, json: bool) -> Result<(), CtlError> {
    if json {
        println!("{}", value(applied)?);
        return Ok(());
    }
    let names = |list: &[String]| if list.is_empty() { "none".into() } else { list.join(",") };
    println!(
        "policy changed: guests added: {}; guests removed: {}; on_policy_change = {}: {} connection(s) reset",
        names(&applied.guests_added),
        names(&applied.guests_removed),
        applied.on_policy_change,
        applied.connections_reset,
    );
    for error in &applied.errors {
        eprintln!("vsocketctl: {error}");
    }
    Ok(())
}

/// The store `etcd` names, and its layout under `prefix`.
fn store(etcd: &[String], prefix: &str) -> Result<(vsocket_etcd::Client, vsocket_policy::store::Layout), CtlError> {
    let client =
        vsocket_etcd::Client::new(etcd, Duration::from_secs(5)).map_err(|e| CtlError::Store(format!("--etcd: {e}")))?;
    Ok((client, vsocket_policy::store::Layout::new(prefix)))
}

/// `vsocketctl hosts`.
fn show_hosts(etcd: &[String], prefix: &str, output: Output) -> Result<(), CtlError> {
    let (client, layout) = store(etcd, prefix)?;
    let (generation, hosts) =
        vsocket_cli::store::hosts(&client, &layout).map_err(|e| CtlError::Store(e.to_string()))?;
    if output == Output::Json {
        println!("{}", serde_json::json!({ "generation": generation, "hosts": hosts }));
        return Ok(());
    }
    show_rows(&hosts, &table::HOSTS, output)?;
    println!("store generation {generation}");
    Ok(())
}

/// A live edit made in the store `settings` names, from a host whose file
/// is `local`.
fn store_edit(
    local: &vsocket_policy::Document,
    settings: &vsocket_policy::StoreConfig,
    change: &Change,
    wait: bool,
) -> Result<(), CtlError> {
    let (client, layout) = store(&settings.endpoints, &settings.prefix)?;
    let written = vsocket_cli::store::edit_model(&client, &layout, local, change)
        .map_err(|e| CtlError::Store(format!("{}: {e}", client.endpoints()[0])))?;
    println!("changed in the store: generation {}", written.generation);
    if wait {
        wait_everywhere(&client, &layout, written.generation)?;
    }
    Ok(())
}

/// Waits for every host that is up to report `generation` applied.
fn wait_everywhere(
    client: &vsocket_etcd::Client,
    layout: &vsocket_policy::store::Layout,
    generation: u64,
) -> Result<(), CtlError> {
    let behind = vsocket_cli::store::wait_applied(client, layout, generation, Duration::from_secs(30))
        .map_err(|e| CtlError::Store(e.to_string()))?;
    if !behind.is_empty() {
        return Err(CtlError::Store(format!("written, but not applied within 30 s by: {}", behind.join(", "))));
    }
    println!("applied by every host that is up");
    Ok(())
}

/// `vsocketctl import`: writes `file`'s tenant model into the store.
fn import(file: &std::path::Path, etcd: &[String], prefix: &str, wait: bool) -> Result<(), CtlError> {
    let (document, _) = vsocket_policy::load_document(file).map_err(CtlError::Config)?;
    let (store, layout) = store(etcd, prefix)?;
    let written = vsocket_cli::store::write_model(&store, &layout, &document)
        .map_err(|e| CtlError::Store(format!("{}: {e}", store.endpoints()[0])))?;
    println!(
        "imported {}: generation {} ({} objects written, {} removed)",
        file.display(),
        written.generation,
        written.put,
        written.deleted
    );
    if wait {
        wait_everywhere(&store, &layout, written.generation)?;
    }
    Ok(())
}
