//! `vsocketctl`: the operator's view of vsocketd.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vsocket_cli::rates;

/// Shows what vsocketd knows: guests, listeners and connections with their
/// byte counts.
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
    /// Bytes per second of every open connection and every guest, from two
    /// samples `--interval` seconds apart.
    Rates {
        /// Seconds between the two samples.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
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
            Err(e) => fail(2, e),
        },
        (None, None) => PathBuf::from(vsocket_policy::model::HostConfig::DEFAULT_RUN_DIR),
    };
    let path = vsocketd::admin_socket_path(&run_dir);
    let command = match args.command {
        Command::Status => "status",
        Command::Guests => "guests",
        Command::Listeners => "listeners",
        Command::Connections => "connections",
        Command::Rates { interval } => return rates(&path, interval, args.json),
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
    let mut stream = UnixStream::connect(path)?;
    writeln!(stream, "{}", serde_json::json!({ "command": command }))?;
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
