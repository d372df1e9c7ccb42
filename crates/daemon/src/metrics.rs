//! The Prometheus endpoint: `GET /metrics` over HTTP/1.1, answered in the
//! text exposition format 0.0.4.
//!
//! A deliberately small responder on a [`TcpListener`], in one thread:
//! requests are answered one at a time, each connection closed after its
//! response, and a client gets 2 s to send its request head. Anything but
//! `GET /metrics` is a 404 (or 405 for another method on `/metrics`).
//!
//! Every per-guest series is labelled `guest` and `vpc`. Bytes include the
//! connections still open (their ring totals now), so the byte counters only
//! grow, and once a connection is closed they equal the sums in the flow
//! log's close records.

use crate::daemon::Daemon;
use crate::quota::Quota;
use crate::reports::{GuestReport, ListenerReport};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The longest request head read.
const MAX_HEAD: usize = 8192;

/// How long a client may take to send its request or read the response.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds `addr` and serves metrics from a thread.
pub fn serve(daemon: &Arc<Daemon>, addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let daemon = daemon.clone();
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            if let Err(e) = respond(&daemon, stream) {
                tracing::debug!(error = %e, "metrics request failed");
            }
        }
    })?;
    tracing::info!(%addr, "serving Prometheus metrics");
    Ok(())
}

fn respond(daemon: &Daemon, mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let response = route(&head, || {
        let mut text = render(&daemon.guest_reports(), &daemon.listener_reports(), daemon.flow_log_dropped());
        if let Some(health) = daemon.store.get() {
            text.push_str(&render_store(&health.status()));
        }
        text
    });
    stream.write_all(&response.to_bytes())?;
    stream.flush()
}

/// Reads up to the blank line ending the request head (a client whose
/// request is left unread might see its response cut by a reset).
fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() >= MAX_HEAD {
            break;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// An HTTP response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Response {
        Response { status, content_type: "text/plain; charset=utf-8", body: format!("{body}\n") }
    }

    /// The response on the wire; the connection closes after it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.status.starts_with("405") {
            out.push_str("Allow: GET\r\n");
        }
        out.push_str("\r\n");
        out.push_str(&self.body);
        out.into_bytes()
    }
}

/// Answers a request head; `metrics` makes the body of `GET /metrics`.
pub fn route(head: &str, metrics: impl FnOnce() -> String) -> Response {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => Response { status: "200 OK", content_type: CONTENT_TYPE, body: metrics() },
        (_, "/metrics") => Response::text("405 Method Not Allowed", "only GET"),
        _ => Response::text("404 Not Found", "not found; metrics are at /metrics"),
    }
}

/// One metric family: its name, type, help, and how to read a guest's value.
struct GuestMetric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&GuestReport) -> u64,
}

const GUEST_METRICS: &[GuestMetric] = &[
    GuestMetric {
        name: "vsocket_connections_denied_total",
        kind: "counter",
        help: "Connects from the guest denied by policy.",
        value: |g| g.denied,
    },
    GuestMetric {
        name: "vsocket_connections_fallback_total",
        kind: "counter",
        help: "Connects from the guest sent to the kernel path (no vSocket listener there).",
        value: |g| g.fallbacks,
    },
    GuestMetric {
        name: "vsocket_bytes_sent_total",
        kind: "counter",
        help: "Bytes the guest sent over vSocket connections, open ones included.",
        value: |g| g.bytes_sent,
    },
    GuestMetric {
        name: "vsocket_bytes_received_total",
        kind: "counter",
        help: "Bytes the guest received over vSocket connections, open ones included.",
        value: |g| g.bytes_received,
    },
    GuestMetric {
        name: "vsocket_connections_open",
        kind: "gauge",
        help: "vSocket connections of the guest open now (one inside the guest counts twice).",
        value: |g| g.connections_open,
    },
    GuestMetric {
        name: "vsocket_channels",
        kind: "gauge",
        help: "Control channels the guest has open (request and listener channels).",
        value: |g| g.channels,
    },
    GuestMetric {
        name: "vsocket_attachments_refused_total",
        kind: "counter",
        help: "Processes refused at the guest's control socket (not in the guest's network namespace).",
        value: |g| g.refused_attachments,
    },
];

/// A per-guest family with one sample per quota (labelled `quota`, in the
/// order of [`Quota::ALL`]).
struct QuotaMetric {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    values: fn(&GuestReport) -> [u64; 3],
}

const QUOTA_METRICS: &[QuotaMetric] = &[
    QuotaMetric {
        name: "vsocket_quota_exceeded_total",
        kind: "counter",
        help: "Refusals because the guest was at a quota: connects it made or that reached it, and control channels.",
        values: |g| [g.exceeded_connections, g.exceeded_shared_memory, g.exceeded_channels],
    },
    QuotaMetric {
        name: "vsocket_quota_used",
        kind: "gauge",
        help: "What the guest holds of each quota now: live connections (one inside the guest counts once), \
               their shared memory in bytes, control channels.",
        values: |g| [g.connections_live, g.shared_memory, g.channels],
    },
    QuotaMetric {
        name: "vsocket_quota_limit",
        kind: "gauge",
        help: "The guest's quotas: max_connections, max_shared_memory (bytes) and max_channels.",
        values: |g| [g.max_connections, g.max_shared_memory, g.max_channels],
    },
];

/// The metrics in the text exposition format 0.0.4.
pub fn render(guests: &[GuestReport], listeners: &[ListenerReport], flow_log_dropped: u64) -> String {
    let mut out = String::new();
    let labels = |g: &GuestReport| format!("guest=\"{}\",vpc=\"{}\"", escape(&g.name), escape(&g.vpc));
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };

    header(
        &mut out,
        "vsocket_connections_opened_total",
        "counter",
        "vSocket connections opened, by the guest's side: out (it connected) or in (it accepted).",
    );
    for g in guests {
        for (direction, value) in [("out", g.connections_out), ("in", g.connections_in)] {
            let _ =
                writeln!(out, "vsocket_connections_opened_total{{{},direction=\"{direction}\"}} {value}", labels(g));
        }
    }
    for metric in GUEST_METRICS {
        header(&mut out, metric.name, metric.kind, metric.help);
        for g in guests {
            let _ = writeln!(out, "{}{{{}}} {}", metric.name, labels(g), (metric.value)(g));
        }
    }
    for metric in QUOTA_METRICS {
        header(&mut out, metric.name, metric.kind, metric.help);
        for g in guests {
            for (quota, value) in Quota::ALL.iter().zip((metric.values)(g)) {
                let _ = writeln!(out, "{}{{{},quota=\"{}\"}} {value}", metric.name, labels(g), quota.name());
            }
        }
    }
    header(&mut out, "vsocket_listeners", "gauge", "vSocket listeners the guest has registered.");
    for g in guests {
        let count = listeners.iter().filter(|l| l.guest == g.name && l.vpc == g.vpc).count();
        let _ = writeln!(out, "vsocket_listeners{{{}}} {count}", labels(g));
    }
    header(
        &mut out,
        "vsocket_flow_log_records_dropped_total",
        "counter",
        "Flow log records not written: the writer's queue was full, or the write failed.",
    );
    let _ = writeln!(out, "vsocket_flow_log_records_dropped_total {flow_log_dropped}");
    out
}

/// The etcd store's health, for a host whose policy comes from one.
pub fn render_store(store: &vsocket_admin::StoreStatus) -> String {
    let mut out = String::new();
    for (name, help, value) in [
        (
            "vsocket_store_connected",
            "1 while the host watches its etcd store and the store has quorum, else 0.",
            u64::from(store.connected),
        ),
        ("vsocket_store_generation", "The generation of the store's policy in force here.", store.generation),
        ("vsocket_store_last_heard_seconds", "Seconds since the store's watch last said anything.", store.last_heard_s),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
    }
    out
}

/// A label value escaped as the format requires: backslash, double quote
/// and line feed.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_s_health_is_three_gauges() {
        let text = render_store(&vsocket_admin::StoreStatus { connected: true, generation: 7, last_heard_s: 2 });
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            ["vsocket_store_connected 1", "vsocket_store_generation 7", "vsocket_store_last_heard_seconds 2"]
        );
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE") && l.ends_with(" gauge")).count(), 3);
    }

    fn guest(name: &str, vpc: &str) -> GuestReport {
        GuestReport {
            name: name.into(),
            vpc: vpc.into(),
            addresses: vec!["10.10.0.2".parse().unwrap()],
            security_groups: vec![],
            netns: format!("vs-{name}"),
            channels: 2,
            connections_live: 1,
            shared_memory: 528_384,
            max_connections: 4096,
            max_shared_memory: 1 << 32,
            max_channels: 1024,
            exceeded_connections: 8,
            exceeded_shared_memory: 0,
            exceeded_channels: 9,
            refused_attachments: 1,
            connections_open: 1,
            connections_out: 5,
            connections_in: 3,
            denied: 4,
            fallbacks: 6,
            bytes_sent: 1 << 40,
            bytes_received: 12_345,
            region_size: 0,
            region_used: 0,
        }
    }

    fn listener(guest: &str, vpc: &str) -> ListenerReport {
        ListenerReport {
            id: 1,
            guest: guest.into(),
            vpc: vpc.into(),
            address: "0.0.0.0:80".parse().unwrap(),
            accepted: 0,
            grants: 0,
        }
    }

    #[test]
    fn exposition_has_help_type_and_one_sample_per_guest() {
        let text = render(
            &[guest("a", "blue"), guest("b", "red")],
            &[listener("a", "blue"), listener("a", "blue"), listener("b", "red")],
            7,
        );
        let expected_samples = [
            "vsocket_connections_opened_total{guest=\"a\",vpc=\"blue\",direction=\"out\"} 5",
            "vsocket_connections_opened_total{guest=\"a\",vpc=\"blue\",direction=\"in\"} 3",
            "vsocket_connections_denied_total{guest=\"a\",vpc=\"blue\"} 4",
            "vsocket_connections_fallback_total{guest=\"b\",vpc=\"red\"} 6",
            "vsocket_bytes_sent_total{guest=\"a\",vpc=\"blue\"} 1099511627776",
            "vsocket_bytes_received_total{guest=\"b\",vpc=\"red\"} 12345",
            "vsocket_connections_open{guest=\"a\",vpc=\"blue\"} 1",
            "vsocket_channels{guest=\"a\",vpc=\"blue\"} 2",
            "vsocket_attachments_refused_total{guest=\"a\",vpc=\"blue\"} 1",
            "vsocket_listeners{guest=\"a\",vpc=\"blue\"} 2",
            "vsocket_quota_exceeded_total{guest=\"a\",vpc=\"blue\",quota=\"connections\"} 8",
            "vsocket_quota_exceeded_total{guest=\"b\",vpc=\"red\",quota=\"shared_memory\"} 0",
            "vsocket_quota_exceeded_total{guest=\"b\",vpc=\"red\",quota=\"channels\"} 9",
            "vsocket_quota_used{guest=\"a\",vpc=\"blue\",quota=\"shared_memory\"} 528384",
            "vsocket_quota_limit{guest=\"a\",vpc=\"blue\",quota=\"shared_memory\"} 4294967296",
            "vsocket_quota_limit{guest=\"a\",vpc=\"blue\",quota=\"channels\"} 1024",
            "vsocket_listeners{guest=\"b\",vpc=\"red\"} 1",
            "vsocket_flow_log_records_dropped_total 7",
        ];
        let lines: Vec<&str> = text.lines().collect();
        for sample in expected_samples {
            assert!(lines.contains(&sample), "{sample} missing from\n{text}");
        }
        // Every family: HELP, then TYPE, then its samples, nothing between.
        let mut family = "";
        for (i, line) in lines.iter().enumerate() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                family = rest.split(' ').next().unwrap();
                let kind = lines[i + 1].strip_prefix(&format!("# TYPE {family} ")).expect("TYPE after HELP");
                assert!(kind == "counter" || kind == "gauge", "{line}");
                assert_eq!(kind == "counter", family.ends_with("_total"), "{family}");
            } else if !line.starts_with("# TYPE ") {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, family, "{line}");
                let value = line.rsplit(' ').next().unwrap();
                value.parse::<u64>().unwrap_or_else(|_| panic!("{line}"));
            }
        }
        assert_eq!(lines.iter().filter(|l| l.starts_with("# HELP")).count(), 13);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("plain-name"), "plain-name");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn only_get_metrics_is_served() {
        let ok = route("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", || "m 1\n".into());
        assert_eq!((ok.status, ok.content_type, ok.body.as_str()), ("200 OK", CONTENT_TYPE, "m 1\n"));
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0\r\n\r\n", || "m 1\n".into()).status, "200 OK");
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n", String::new).status, "404 Not Found");
        assert_eq!(route("GET /metricsx HTTP/1.1\r\n\r\n", String::new).status, "404 Not Found");
        assert_eq!(route("", String::new).status, "404 Not Found");
        let post = route("POST /metrics HTTP/1.1\r\n\r\n", || unreachable!());
        assert_eq!(post.status, "405 Method Not Allowed");
        let wire = String::from_utf8(post.to_bytes()).unwrap();
        assert!(wire.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{wire}");
        assert!(wire.contains("\r\nAllow: GET\r\n"), "{wire}");
        let wire = String::from_utf8(ok.to_bytes()).unwrap();
        assert_eq!(
            wire,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
             Content-Length: 4\r\nConnection: close\r\n\r\nm 1\n"
        );
    }
}
