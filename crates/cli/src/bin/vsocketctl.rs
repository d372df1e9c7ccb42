//! `vsocketctl`: the operator's view of vsocketd.
#![forbid(unsafe_code)]

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vsocket_cli::rates;

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
    /// Print the daemon's JSON reply instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
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
    /// Read the config file again and apply what changed (live edits made
    /// since are replaced by the file's content).
    Reload,
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

#[derive(Debug, ClapArgs)]
struct RuleArgs {
    /// The security group.
    group: String,
    /// ingress (who may connect to members) or egress (whom members may
    /// connect to).
    direction: DirectionArg,
    /// tcp, udp, icmp or all.
    protocol: String,
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

/// The admin request for a live change, as JSON.
fn change_request(command: &Command) -> Option<Value> {
    use serde_json::json;
    let rule = |op: &str, r: &RuleArgs| {
        let mut rule = json!({ "protocol": r.protocol });
        if let Some(ports) = &r.ports {
            rule["ports"] = json!(ports);
        }
        if let Some(cidr) = &r.cidr {
            rule["cidr"] = json!(cidr);
        }
        if let Some(group) = &r.peer_group {
            rule["group"] = json!(group);
        }
        let direction = match r.direction {
            DirectionArg::Ingress => "ingress",
            DirectionArg::Egress => "egress",
        };
        json!({ "op": op, "group": r.group, "direction": direction, "rule": rule })
    };
    let change = match command {
        Command::Rule { action: RuleAction::Add(r) } => rule("add_rule", r),
        Command::Rule { action: RuleAction::Remove(r) } => rule("remove_rule", r),
        Command::Member { action: MemberAction::Add { guest, group } } => {
            json!({ "op": "add_membership", "guest": guest, "group": group })
        }
        Command::Member { action: MemberAction::Remove { guest, group } } => {
            json!({ "op": "remove_membership", "guest": guest, "group": group })
        }
        Command::Guest {
            action:
                GuestAction::Add {
                    name,
                    vpc,
                    addresses,
                    security_groups,
                    netns,
                    max_connections,
                    max_shared_memory,
                    max_channels,
                },
        } => {
            let mut guest =
                json!({ "name": name, "vpc": vpc, "addresses": addresses, "security_groups": security_groups });
            if let Some(netns) = netns {
                guest["netns"] = json!(netns);
            }
            if let Some(n) = max_connections {
                guest["max_connections"] = json!(n);
            }
            if let Some(size) = max_shared_memory {
                // A plain number is bytes, as in the file; anything else is
                // a size string ("64MiB") the daemon validates.
                guest["max_shared_memory"] = match size.parse::<i64>() {
                    Ok(bytes) => json!(bytes),
                    Err(_) => json!(size),
                };
            }
            if let Some(n) = max_channels {
                guest["max_channels"] = json!(n);
            }
            json!({ "op": "add_guest", "guest": guest })
        }
        Command::Guest { action: GuestAction::Remove { name } } => json!({ "op": "remove_guest", "name": name }),
        Command::Reload => return Some(json!({ "command": "reload" })),
        _ => return None,
    };
    Some(json!({ "command": "change", "change": change }))
}

fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    eprintln!("vsocketctl: {msg}");
    std::process::exit(code)
}

fn main() {
    let args = Args::parse();
    let run_dir = match (&args.run_dir, &args.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(file)) => match vsocket_policy::load(file) {
            Ok(c) => c.host().run_dir.clone(),
            // `reload` must reach the daemon to hear what is wrong with the
            // file (and leave the policy in force as it is).
            Err(_) if matches!(args.command, Command::Reload) => vsocket_policy::config::run_dir_of(file)
                .unwrap_or_else(|| {
                    fail(2, vsocket_policy::load(file).err().map(|e| e.to_string()).unwrap_or_default())
                }),
            Err(e) => fail(2, e),
        },
        (None, None) => PathBuf::from(vsocket_policy::model::HostConfig::DEFAULT_RUN_DIR),
    };
    let path = vsocketd::admin_socket_path(&run_dir);
    if let Some(request) = change_request(&args.command) {
        return live_change(&path, &request, args.json);
    }
    let command = match args.command {
        Command::Status => "status",
        Command::Guests => "guests",
        Command::Listeners => "listeners",
        Command::Connections => "connections",
        Command::Peers => "peers",
        Command::Rates { interval } => return rates(&path, interval, args.json),
        _ => unreachable!("live changes are handled above"),
    };
    let reply = checked_query(&path, command);
    if args.json {
        println!("{reply}");
        return;
    }
    match command {
        "status" => {
            for (k, v) in reply.as_object().into_iter().flatten() {
                println!("{k}: {}", plain(v));
            }
        }
        "guests" => table(
            &reply,
            &[
                "name",
                "vpc",
                "addresses",
                "netns",
                "channels",
                "connections_open",
                "connections_out",
                "connections_in",
                "denied",
                "fallbacks",
                "refused_attachments",
                "connections_live",
                "max_connections",
                "shared_memory",
                "max_shared_memory",
                "max_channels",
                "exceeded_connections",
                "exceeded_shared_memory",
                "exceeded_channels",
                "bytes_sent",
                "bytes_received",
            ],
        ),
        "listeners" => table(&reply, &["id", "guest", "vpc", "address", "accepted"]),
        "peers" => table(
            &reply,
            &[
                "name",
                "address",
                "transport",
                "state",
                "links_up",
                "connections",
                "opened",
                "accepted",
                "bytes_sent",
                "bytes_received",
                "last_error",
            ],
        ),
        _ => table(
            &reply,
            &[
                "id",
                "vpc",
                "client_guest",
                "client",
                "server_guest",
                "server",
                "bytes_client_to_server",
                "bytes_server_to_client",
                "age_seconds",
            ],
        ),
    }
}

/// `vsocketctl rates`: samples connections and guests twice.
fn rates(path: &Path, interval: f64, json: bool) {
    if !(interval.is_finite() && interval > 0.0 && interval <= 3600.0) {
        fail(2, format!("--interval {interval}: expected seconds, more than 0 and at most 3600"));
    }
    let sample = || {
        let start = Instant::now();
        let connections = checked_query(path, "connections");
        let guests = checked_query(path, "guests");
        (start, connections, guests)
    };
    let (first, connections_before, guests_before) = sample();
    std::thread::sleep(Duration::from_secs_f64(interval));
    let (second, connections_after, guests_after) = sample();
    let seconds = second.duration_since(first).as_secs_f64();
    let connections = Value::from(rates::connection_rates(&connections_before, &connections_after, seconds));
    let guests = Value::from(rates::guest_rates(&guests_before, &guests_after, seconds));
    if json {
        println!(
            "{}",
            serde_json::json!({ "interval_seconds": seconds, "connections": connections, "guests": guests })
        );
        return;
    }
    println!("over {seconds:.2} s, bytes per second:");
    table(&guests, &["name", "vpc", "connections_open", "sent_bytes_per_second", "received_bytes_per_second"]);
    println!();
    table(
        &connections,
        &[
            "id",
            "vpc",
            "client_guest",
            "client",
            "server_guest",
            "server",
            "client_to_server_bytes_per_second",
            "server_to_client_bytes_per_second",
        ],
    );
}

/// Sends a live change; prints what changed, or fails with the daemon's
/// reason (the policy in force is then unchanged).
fn live_change(path: &Path, request: &Value, json: bool) {
    let reply = request_reply(path, request)
        .unwrap_or_else(|e| fail(1, format!("{}: {e} (is vsocketd running?)", path.display())));
    if let Some(err) = reply.get("error") {
        fail(1, plain(err));
    }
    if json {
        println!("{reply}");
        return;
    }
    let list = |key: &str| plain(&reply[key]);
    println!(
        "policy changed: guests added: {}; guests removed: {}; on_policy_change = {}: {} connection(s) reset",
        if reply["guests_added"].as_array().is_some_and(|a| !a.is_empty()) {
            list("guests_added")
        } else {
            "none".into()
        },
        if reply["guests_removed"].as_array().is_some_and(|a| !a.is_empty()) {
            list("guests_removed")
        } else {
            "none".into()
        },
        list("on_policy_change"),
        list("connections_reset"),
    );
    for error in reply["errors"].as_array().into_iter().flatten() {
        eprintln!("vsocketctl: {}", plain(error));
    }
}

/// A query whose failure ends the program.
fn checked_query(path: &Path, command: &str) -> Value {
    let reply =
        query(path, command).unwrap_or_else(|e| fail(1, format!("{}: {e} (is vsocketd running?)", path.display())));
    if let Some(err) = reply.get("error") {
        fail(1, err);
    }
    reply
}

fn query(path: &Path, command: &str) -> std::io::Result<Value> {
    request_reply(path, &serde_json::json!({ "command": command }))
}

fn request_reply(path: &Path, request: &Value) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(path)?;
    writeln!(stream, "{request}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(plain).collect::<Vec<_>>().join(","),
        Value::Number(n) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

fn table(rows: &Value, columns: &[&str]) {
    let rows: Vec<Vec<String>> = rows
        .as_array()
        .map(|a| a.iter().map(|r| columns.iter().map(|c| plain(&r[*c])).collect()).collect())
        .unwrap_or_default();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| rows.iter().map(|r| r[i].len()).max().unwrap_or(0).max(c.len()))
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(columns.iter().map(|c| c.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}
