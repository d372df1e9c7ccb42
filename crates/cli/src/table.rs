//! `vsocketctl`'s tables, the way kubectl shows resources: by default a
//! narrow view of each list, its most telling fields with short headers
//! and byte counts made readable, that fits a 100-column terminal; with
//! `-o wide` every field the daemon reports, as it reports it (`--json`,
//! or `-o json`, prints the reply itself).

use serde_json::Value;

/// What one cell of a column shows of a row.
#[derive(Debug, Clone, Copy)]
pub enum Cell {
    /// A field as it is.
    Field(&'static str),
    /// A byte count, made readable (`1.5MiB`).
    Bytes(&'static str),
    /// Bytes per second, made readable (`1.5MiB/s`).
    Rate(&'static str),
    /// A guest and one of its addresses: `guest/address`.
    Endpoint { guest: &'static str, address: &'static str },
    /// A list's first item, and how many more: `10.0.0.2+1`.
    First(&'static str),
    /// A duration in seconds, made readable (`3h12m`).
    Seconds(&'static str),
}

/// One column of a narrow view.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub header: &'static str,
    pub cell: Cell,
}

/// A list's two views.
#[derive(Debug, Clone, Copy)]
pub struct View {
    /// The default: fits 100 columns for the values a list usually holds.
    pub narrow: &'static [Column],
    /// `-o wide`: these fields, headed by their names.
    pub wide: &'static [&'static str],
}

/// Which view to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    Narrow,
    Wide,
}

const fn col(header: &'static str, cell: Cell) -> Column {
    Column { header, cell }
}

use Cell::{Bytes, Endpoint, Field, First, Rate, Seconds};

pub const GUESTS: View = View {
    narrow: &[
        col("NAME", Field("name")),
        col("VPC", Field("vpc")),
        col("ADDRESS", First("addresses")),
        col("OPEN", Field("connections_open")),
        col("OUT", Field("connections_out")),
        col("IN", Field("connections_in")),
        col("DENIED", Field("denied")),
        col("SENT", Bytes("bytes_sent")),
        col("RECEIVED", Bytes("bytes_received")),
    ],
    wide: &[
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
        "region_used",
        "region_size",
    ],
};

pub const LISTENERS: View = View {
    narrow: &[
        col("ID", Field("id")),
        col("GUEST", Field("guest")),
        col("VPC", Field("vpc")),
        col("ADDRESS", Field("address")),
        col("ACCEPTED", Field("accepted")),
    ],
    wide: &["id", "guest", "vpc", "address", "accepted", "grants"],
};

pub const CONNECTIONS: View = View {
    narrow: &[
        col("ID", Field("id")),
        col("CLIENT", Field("client_guest")),
        col("SERVER", Endpoint { guest: "server_guest", address: "server" }),
        col("UP", Bytes("bytes_client_to_server")),
        col("DOWN", Bytes("bytes_server_to_client")),
        col("AGE", Seconds("age_seconds")),
    ],
    wide: &[
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
};

pub const PEERS: View = View {
    narrow: &[
        col("NAME", Field("name")),
        col("ADDRESS", Field("address")),
        col("TRANSPORT", Field("transport")),
        col("STATE", Field("state")),
        col("CONNS", Field("connections")),
        col("SENT", Bytes("bytes_sent")),
        col("RECEIVED", Bytes("bytes_received")),
    ],
    wide: &[
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
};

pub const GUEST_RATES: View = View {
    narrow: &[
        col("NAME", Field("name")),
        col("VPC", Field("vpc")),
        col("OPEN", Field("connections_open")),
        col("SENT/S", Rate("sent_bytes_per_second")),
        col("RECEIVED/S", Rate("received_bytes_per_second")),
    ],
    wide: &["name", "vpc", "connections_open", "sent_bytes_per_second", "received_bytes_per_second"],
};

pub const CONNECTION_RATES: View = View {
    narrow: &[
        col("ID", Field("id")),
        col("CLIENT", Field("client_guest")),
        col("SERVER", Endpoint { guest: "server_guest", address: "server" }),
        col("UP/S", Rate("client_to_server_bytes_per_second")),
        col("DOWN/S", Rate("server_to_client_bytes_per_second")),
    ],
    wide: &[
        "id",
        "vpc",
        "client_guest",
        "client",
        "server_guest",
        "server",
        "client_to_server_bytes_per_second",
        "server_to_client_bytes_per_second",
    ],
};

pub const HOSTS: View = View {
    narrow: &[
        col("HOST", Field("host")),
        col("STATE", Field("state")),
        col("GENERATION", Field("generation")),
        col("VERSION", Field("version")),
    ],
    wide: &["host", "state", "generation", "version"],
};

/// A value as a table cell: strings bare, lists joined by commas, null as
/// `-`, fractions to one place.
pub fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(plain).collect::<Vec<_>>().join(","),
        Value::Number(n) if n.is_f64() => format!("{:.1}", n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

/// `bytes` in binary units, three significant digits at most past the
/// first unit: `512B`, `1.5KiB`, `20.0MiB`, `3.25GiB`.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes.max(0.0);
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{value:.0}B"),
        _ if value < 10.0 => format!("{value:.2}{}", UNITS[unit]),
        _ => format!("{value:.1}{}", UNITS[unit]),
    }
}

/// A duration in its two largest units: `4.2s`, `5m12s`, `3h12m`, `2d4h`.
pub fn human_seconds(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        return format!("{s:.1}s");
    }
    let whole = s as u64;
    let (d, h, m) = (whole / 86400, whole / 3600 % 24, whole / 60 % 60);
    match (d, h) {
        (0, 0) => format!("{m}m{}s", whole % 60),
        (0, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

fn cell(row: &Value, cell: Cell) -> String {
    let number = |field: &str| row[field].as_f64();
    match cell {
        Field(field) => plain(&row[field]),
        Bytes(field) => number(field).map_or_else(|| plain(&row[field]), human_bytes),
        Rate(field) => number(field).map_or_else(|| plain(&row[field]), |n| format!("{}/s", human_bytes(n))),
        Endpoint { guest, address } => format!("{}/{}", plain(&row[guest]), plain(&row[address])),
        Seconds(field) => number(field).map_or_else(|| plain(&row[field]), human_seconds),
        First(field) => match row[field].as_array().map(Vec::as_slice) {
            Some([]) => "-".into(),
            Some([only]) => plain(only),
            Some([first, rest @ ..]) => format!("{}+{}", plain(first), rest.len()),
            None => plain(&row[field]),
        },
    }
}

/// `rows` (a JSON array of objects) as `view`'s table, `width` wide: a
/// header line, then a line per row, columns two spaces apart.
pub fn render(rows: &Value, view: &View, width: Width) -> String {
    let empty = Vec::new();
    let rows = rows.as_array().unwrap_or(&empty);
    let (headers, cells): (Vec<String>, Vec<Vec<String>>) = match width {
        Width::Narrow => (
            view.narrow.iter().map(|c| c.header.to_string()).collect(),
            rows.iter().map(|r| view.narrow.iter().map(|c| cell(r, c.cell)).collect()).collect(),
        ),
        Width::Wide => (
            view.wide.iter().map(|f| f.to_uppercase()).collect(),
            rows.iter().map(|r| view.wide.iter().map(|f| plain(&r[*f])).collect()).collect(),
        ),
    };
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| cells.iter().map(|r| r[i].chars().count()).chain([headers[i].len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for line in std::iter::once(&headers).chain(&cells) {
        let padded: Vec<String> = line.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn byte_counts_read_as_people_write_them() {
        assert_eq!(human_bytes(0.0), "0B");
        assert_eq!(human_bytes(1023.0), "1023B");
        assert_eq!(human_bytes(1536.0), "1.50KiB");
        assert_eq!(human_bytes(20.0 * 1048576.0), "20.0MiB");
        assert_eq!(human_bytes(3.25 * 1073741824.0), "3.25GiB");
        assert_eq!(human_bytes(-5.0), "0B");
        assert_eq!(human_seconds(4.25), "4.2s");
        assert_eq!(human_seconds(312.0), "5m12s");
        assert_eq!(human_seconds(11520.0), "3h12m");
        assert_eq!(human_seconds(187200.0), "2d4h");
    }

    /// Rows with the widest values a busy host shows: long names, several
    /// addresses, counts in the millions, terabytes moved.
    fn busy() -> [(View, Value); 7] {
        let guest = json!({
            "name": "tenant-db-01", "vpc": "tenant-blue", "addresses": ["10.110.200.201", "10.110.200.202"],
            "connections_open": 40960, "connections_out": 12345678, "connections_in": 12345678,
            "denied": 1234567, "fallbacks": 1234567, "bytes_sent": 5.5e12, "bytes_received": 5.5e12,
        });
        let connection = json!({
            "id": 12345678, "vpc": "tenant-blue", "client_guest": "tenant-web-01", "client": "10.110.200.201:65535",
            "server_guest": "tenant-db-01", "server": "10.110.200.202:65535",
            "bytes_client_to_server": 5.5e12, "bytes_server_to_client": 5.5e12, "age_seconds": 86400.5,
        });
        let peer = json!({
            "name": "host-rack12-07", "address": "192.168.100.200:7470", "transport": "tcp", "state": "down",
            "connections": 40960, "bytes_sent": 5.5e12, "bytes_received": 5.5e12, "last_error": "x".repeat(200),
        });
        let listener = json!({ "id": 12345678, "guest": "tenant-db-01", "vpc": "tenant-blue",
            "address": "10.110.200.202:65535", "accepted": 12345678 });
        let guest_rate = json!({ "name": "tenant-db-01", "vpc": "tenant-blue", "connections_open": 40960,
            "sent_bytes_per_second": 1.25e10, "received_bytes_per_second": 1.25e10 });
        let connection_rate = json!({
            "id": 12345678, "vpc": "tenant-blue", "client_guest": "tenant-web-01", "client": "10.110.200.201:65535",
            "server_guest": "tenant-db-01", "server": "10.110.200.202:65535",
            "client_to_server_bytes_per_second": 1.25e10, "server_to_client_bytes_per_second": 1.25e10,
        });
        [
            (GUESTS, json!([guest])),
            (CONNECTIONS, json!([connection])),
            (PEERS, json!([peer])),
            (LISTENERS, json!([listener])),
            (GUEST_RATES, json!([guest_rate])),
            (CONNECTION_RATES, json!([connection_rate])),
            (
                HOSTS,
                json!([{ "host": "host-rack12-07.example", "state": "down", "generation": 12345678,
                "version": "0.1.0" }]),
            ),
        ]
    }

    #[test]
    fn every_narrow_table_fits_a_hundred_columns() {
        for (view, rows) in busy() {
            let text = render(&rows, &view, Width::Narrow);
            for line in text.lines() {
                assert!(line.chars().count() <= 100, "{} columns:\n{text}", line.chars().count());
            }
            assert_eq!(text.lines().count(), 2, "{text}");
        }
    }

    #[test]
    fn the_wide_table_shows_every_field_as_reported() {
        let (view, rows) = busy().into_iter().next().unwrap();
        let text = render(&rows, &view, Width::Wide);
        let header = text.lines().next().unwrap();
        assert!(header.starts_with("NAME") && header.contains("EXCEEDED_SHARED_MEMORY"), "{header}");
        assert!(text.contains("5500000000000"), "{text}");
        assert_eq!(render(&json!([]), &view, Width::Narrow).lines().count(), 1);
    }
}
