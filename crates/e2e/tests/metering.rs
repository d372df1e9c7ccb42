//! Metering: the flow log and the Prometheus counters against the bytes
//! real programs moved, flow log rotation, and `vsocketctl rates`.

use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use vsocket_e2e::{asset, bin, wait_until, Lab, Via, ONE_PORT};

/// Every record of the flow log at `path` and its rotated files, oldest first.
fn flow_records(path: &Path, keep: u32) -> Vec<Value> {
    let mut files: Vec<String> = (1..=keep).rev().map(|k| format!("{}.{k}", path.display())).collect();
    files.push(path.display().to_string());
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| text.lines().map(|l| serde_json::from_str(l).expect(l)).collect::<Vec<Value>>())
        .collect()
}

/// (client port, bytes sent, bytes received) per line of `metering.py client`.
fn transfers(output: &str) -> Vec<(u16, u64, u64)> {
    output
        .lines()
        .map(|l| {
            let f: Vec<u64> = l.split_whitespace().map(|x| x.parse().unwrap()).collect();
            (f[0] as u16, f[1], f[2])
        })
        .collect()
}

/// The samples of a Prometheus exposition, by series.
fn scrape(url: &str) -> HashMap<String, u64> {
    let out = Command::new("curl").args(["-sSf", url]).output().unwrap();
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn wait_reaped(lab: &Lab) {
    let reaped = wait_until(Duration::from_secs(10), || {
        lab.ctl("connections").map(|c| c.as_array().is_some_and(|a| a.is_empty())).unwrap_or(false)
    });
    assert!(reaped, "connections not retired: {:?}", lab.ctl("connections"));
}

#[test]
fn flow_log_and_metrics_match_the_bytes_programs_moved() {
    let host = "deny_action = \"reject\"\nflow_log = \"{dir}/flow.log\"\nmetrics = \"127.0.0.1:19464\"";
    let mut lab = Lab::start_host("tflow", ONE_PORT, host).unwrap();
    let script = asset("metering.py");
    let s = script.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[s, "serve", "10.10.0.3", "7000"], "allowed.log").unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[s, "serve", "10.10.0.3", "7001"], "denied.log").unwrap();
    lab.wait_listening("b", 7000).unwrap();
    lab.wait_listening("b", 7001).unwrap();

    // Empty, tiny, larger than a ring (256 KiB), exactly a ring, and 1 MiB.
    let pairs = ["0:0", "1:1", "1000:50000", "300000:7", "262144:262144", "1048576:3"];
    let mut args = vec![s, "client", "10.10.0.3", "7000"];
    args.extend(pairs);
    let moved = transfers(&lab.run_ok("a", Via::Vsocket, "python3", &args).unwrap());
    assert_eq!(moved.len(), pairs.len());
    let inside =
        transfers(&lab.run_ok("b", Via::Vsocket, "python3", &[s, "client", "10.10.0.3", "7000", "100:200"]).unwrap());
    let denied = lab.run_ok("a", Via::Vsocket, "python3", &[s, "probe", "10.10.0.3", "7001"]).unwrap();
    assert_eq!(denied.trim(), "error 111", "reject: ECONNREFUSED");
    let fallback = lab.run_ok("a", Via::Vsocket, "python3", &[s, "probe", "10.10.0.3", "7002"]).unwrap();
    assert_eq!(fallback.trim(), "error 111", "nothing listens there, on the kernel path either");
    wait_reaped(&lab);

    let log = lab.dir.join("flow.log");
    let closes_written = wait_until(Duration::from_secs(5), || {
        flow_records(&log, 0).iter().filter(|r| r["event"] == "close").count() == pairs.len() + 1
    });
    let records = flow_records(&log, 0);
    assert!(closes_written, "{records:#?}");
    for r in &records {
        let time = r["time"].as_str().unwrap();
        let b = time.as_bytes();
        assert!(b.len() == 24 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && time.ends_with('Z'), "{time}");
        assert_eq!(r["protocol"], "tcp");
        assert_eq!(r["vpc"], "blue");
    }
    let find = |event: &str, client: &str, server: &str| -> &Value {
        records
            .iter()
            .find(|r| r["event"] == event && r["client"] == client && r["server"] == server)
            .unwrap_or_else(|| panic!("no {event} record {client} -> {server} in {records:#?}"))
    };
    for &(port, sent, received) in &moved {
        let client = format!("10.10.0.2:{port}");
        let close = find("close", &client, "10.10.0.3:7000");
        assert_eq!(close["bytes_client_to_server"], sent, "{close}");
        assert_eq!(close["bytes_server_to_client"], received, "{close}");
        assert_eq!((&close["client_guest"], &close["server_guest"]), (&"a".into(), &"b".into()));
        assert!(close["duration_ms"].is_u64());
        let attempt = find("attempt", &client, "10.10.0.3:7000");
        assert_eq!(attempt["verdict"], "accepted");
        assert_eq!(attempt["id"], close["id"]);
        // (Connections after the first two take kits: their record says so
        // after the decision.)
        let decided_by = attempt["decided_by"].as_str().unwrap();
        assert!(
            decided_by.starts_with("allowed by default: egress allowed, security_group \"svc\" ingress[0]"),
            "{attempt}"
        );
    }
    let (port, up_inside, down_inside) = inside[0];
    let close = find("close", &format!("10.10.0.3:{port}"), "10.10.0.3:7000");
    assert_eq!(
        (close["bytes_client_to_server"].as_u64(), close["bytes_server_to_client"].as_u64()),
        (Some(108), Some(200))
    );
    let attempt = find("attempt", &format!("10.10.0.3:{port}"), "10.10.0.3:7000");
    assert_eq!(attempt["decided_by"], "within one guest: security groups do not apply");

    let denied = records.iter().find(|r| r["server"] == "10.10.0.3:7001").expect("a record of the denied connect");
    assert_eq!(denied["verdict"], "rejected", "{denied}");
    assert_eq!(denied["decided_by"], "denied on ingress by default: ingress denied", "{denied}");
    assert!(denied.get("id").is_none());
    let fallback = records.iter().find(|r| r["server"] == "10.10.0.3:7002").expect("a record of the fallback");
    assert_eq!(fallback["verdict"], "fallback", "{fallback}");
    assert!(fallback.get("server_guest").is_none());
    assert_eq!(records.len(), 2 * (pairs.len() + 1) + 2, "one attempt per connect, one close per accepted");

    // The counters equal what the programs moved, and the flow log's sums.
    let up: u64 = moved.iter().map(|m| m.1).sum();
    let down: u64 = moved.iter().map(|m| m.2).sum();
    let logged = |guest: &str, field: &str| -> u64 {
        records
            .iter()
            .filter(|r| r["event"] == "close" && r["client_guest"] == guest && r["server_guest"] == "b")
            .map(|r| r[field].as_u64().unwrap())
            .sum()
    };
    assert_eq!((logged("a", "bytes_client_to_server"), logged("a", "bytes_server_to_client")), (up, down));
    let metrics = scrape("http://127.0.0.1:19464/metrics");
    let a = |name: &str| metrics[&format!("{name}{{guest=\"a\",vpc=\"blue\"}}")];
    let b = |name: &str| metrics[&format!("{name}{{guest=\"b\",vpc=\"blue\"}}")];
    assert_eq!(a("vsocket_bytes_sent_total"), up);
    assert_eq!(a("vsocket_bytes_received_total"), down);
    let both_ways_inside = up_inside + down_inside;
    assert_eq!(b("vsocket_bytes_sent_total"), down + both_ways_inside);
    assert_eq!(b("vsocket_bytes_received_total"), up + both_ways_inside);
    assert_eq!(metrics["vsocket_connections_opened_total{guest=\"a\",vpc=\"blue\",direction=\"out\"}"], 6);
    assert_eq!(metrics["vsocket_connections_opened_total{guest=\"b\",vpc=\"blue\",direction=\"in\"}"], 7);
    assert_eq!(metrics["vsocket_connections_opened_total{guest=\"b\",vpc=\"blue\",direction=\"out\"}"], 1);
    assert_eq!(a("vsocket_connections_denied_total"), 1);
    assert_eq!(a("vsocket_connections_fallback_total"), 1);
    assert_eq!(a("vsocket_connections_open"), 0);
    assert_eq!(b("vsocket_listeners"), 2);
    assert_eq!(b("vsocket_attachments_refused_total"), 0);
    assert_eq!(metrics["vsocket_flow_log_records_dropped_total"], 0);
    // vsocketctl agrees.
    assert_eq!(lab.counter("a", "bytes_sent"), up);
    assert_eq!(lab.ctl("status").unwrap()["flow_log_dropped"], 0);

    let status = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://127.0.0.1:19464{path}")])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(status("/"), "404");
    assert_eq!(status("/metrics"), "200");
}

#[test]
fn a_rotating_flow_log_keeps_flow_log_keep_files() {
    let host = "flow_log = \"{dir}/flow.log\"\nflow_log_max_bytes = 4096\nflow_log_keep = 2";
    let mut lab = Lab::start_host("trot", vsocket_e2e::TWO_GUESTS, host).unwrap();
    let script = asset("metering.py");
    let s = script.to_str().unwrap();
    lab.spawn("b", Via::Vsocket, "python3", &[s, "serve", "10.10.0.3", "7100"], "server.log").unwrap();
    lab.wait_listening("b", 7100).unwrap();
    let pairs = vec!["10:20"; 40];
    let mut args = vec![s, "client", "10.10.0.3", "7100"];
    args.extend(pairs.iter().copied());
    let moved = transfers(&lab.run_ok("a", Via::Vsocket, "python3", &args).unwrap());
    assert_eq!(moved.len(), 40);
    wait_reaped(&lab);

    let log = lab.dir.join("flow.log");
    let last_port = moved.last().unwrap().0;
    let last_close_written = wait_until(Duration::from_secs(5), || {
        flow_records(&log, 2)
            .iter()
            .any(|r| r["event"] == "close" && r["client"] == format!("10.10.0.2:{last_port}").as_str())
    });
    assert!(last_close_written);
    for name in ["flow.log", "flow.log.1", "flow.log.2"] {
        let len = std::fs::metadata(lab.dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}")).len();
        assert!(len > 0 && len <= 4096, "{name}: {len} bytes");
    }
    assert!(!lab.dir.join("flow.log.3").exists());
    // The kept files hold the newest records, in order, each one whole.
    let records = flow_records(&log, 2);
    assert!(records.len() < 80, "older files were removed");
    let attempts: Vec<u64> =
        records.iter().filter(|r| r["event"] == "attempt").map(|r| r["id"].as_u64().unwrap()).collect();
    assert!(attempts.windows(2).all(|w| w[0] < w[1]), "{attempts:?}");
    assert!(records.iter().all(|r| r["event"] != "close" || r["bytes_client_to_server"] == 18));
}

#[test]
fn rates_show_bytes_per_second_of_a_live_connection() {
    let mut lab = Lab::start("trate", vsocket_e2e::TWO_GUESTS).unwrap();
    let script = asset("metering.py");
    let s = script.to_str().unwrap().to_string();
    lab.spawn("b", Via::Vsocket, "python3", &[&s, "serve", "10.10.0.3", "7200"], "server.log").unwrap();
    lab.wait_listening("b", 7200).unwrap();
    // 200 kB/s for 4 s, in 20 kB steps.
    lab.spawn("a", Via::Vsocket, "python3", &[&s, "slow", "10.10.0.3", "7200", "4", "200000"], "slow.log").unwrap();
    assert!(wait_until(Duration::from_secs(5), || lab.counter("a", "bytes_sent") > 20_000));
    let out = Command::new(bin("vsocketctl"))
        .args(["--json", "--config"])
        .arg(&lab.config)
        .args(["rates", "--interval", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rates: Value = serde_json::from_slice(&out.stdout).unwrap();
    let seconds = rates["interval_seconds"].as_f64().unwrap();
    assert!((1.0..3.0).contains(&seconds), "{rates}");
    let conn = &rates["connections"][0];
    assert_eq!(conn["client_guest"], "a", "{rates}");
    let up = conn["client_to_server_bytes_per_second"].as_f64().unwrap();
    // Sleeps only run long on a busy machine: the rate may fall, not rise.
    assert!((40_000.0..=250_000.0).contains(&up), "{rates}");
    assert_eq!(conn["server_to_client_bytes_per_second"], 0.0);
    let guest = |name: &str| rates["guests"].as_array().unwrap().iter().find(|g| g["name"] == name).unwrap().clone();
    // One connection: the guests' rates are the connection's, but sampled a
    // moment apart, so up to a step or two of 20 kB may differ.
    let near = |v: &Value| (v.as_f64().unwrap() - up).abs() <= 40_000.0 / seconds;
    assert!(near(&guest("a")["sent_bytes_per_second"]), "{rates}");
    assert!(near(&guest("b")["received_bytes_per_second"]), "{rates}");

    let table = |extra: &[&str]| {
        let out = Command::new(bin("vsocketctl"))
            .arg("--config")
            .arg(&lab.config)
            .args(["rates", "--interval", "0.2"])
            .args(extra)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    // Narrow by default (readable rates, under 100 columns); every field
    // as reported with -o wide.
    let text = table(&[]);
    assert!(text.contains("SENT/S") && text.contains("UP/S") && text.contains("b/10.10.0.3:7200"), "{text}");
    assert!(text.lines().all(|l| l.len() <= 100), "{text}");
    let wide = table(&["-o", "wide"]);
    assert!(wide.contains("SENT_BYTES_PER_SECOND") && wide.contains("CLIENT_TO_SERVER_BYTES_PER_SECOND"), "{wide}");
    let bad = Command::new(bin("vsocketctl"))
        .arg("--config")
        .arg(&lab.config)
        .args(["rates", "--interval", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
