//! The operator's socket: one JSON request per line, one JSON reply per
//! line. Only root can reach it (the socket file is mode 0600).

use crate::state::Daemon;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

/// A request from `vsocketctl`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Guests,
    Listeners,
    Connections,
}

/// Serves the admin socket on a thread.
pub fn serve(daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let path = crate::admin_socket_path(&daemon.config.host().run_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    vsocket_sys::chmod(&path, 0o600)?;
    let daemon = daemon.clone();
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let daemon = daemon.clone();
            let _ = std::thread::Builder::new().name("admin-conn".into()).spawn(move || handle(&daemon, stream));
        }
    })?;
    Ok(())
}

fn handle(daemon: &Daemon, stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => answer(daemon, &request),
            Err(e) => serde_json::json!({ "error": format!("bad request: {e}") }),
        };
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

fn answer(daemon: &Daemon, request: &Request) -> serde_json::Value {
    match request {
        Request::Status => {
            let guests = daemon.guest_reports();
            let exceeded = |f: fn(&crate::state::GuestReport) -> u64| guests.iter().map(f).sum::<u64>();
            serde_json::json!({
                "host": daemon.config.host().name,
                "guests": guests.len(),
                "listeners": daemon.listener_reports().len(),
                "connections": daemon.connection_reports().len(),
                "flow_log": daemon.config.host().flow_log.as_ref().map(|f| f.path.display().to_string()),
                "flow_log_dropped": daemon.flow_log_dropped(),
                "metrics": daemon.config.host().metrics.map(|a| a.to_string()),
                "segments_created": daemon.segments.created.load(std::sync::atomic::Ordering::Relaxed),
                "segments_reused": daemon.segments.reused.load(std::sync::atomic::Ordering::Relaxed),
                "segments_kept": daemon.segments.kept(),
                "quota_exceeded_connections": exceeded(|g| g.exceeded_connections),
                "quota_exceeded_shared_memory": exceeded(|g| g.exceeded_shared_memory),
                "quota_exceeded_channels": exceeded(|g| g.exceeded_channels),
            })
        }
        Request::Guests => serde_json::to_value(daemon.guest_reports()).unwrap_or_default(),
        Request::Listeners => serde_json::to_value(daemon.listener_reports()).unwrap_or_default(),
        Request::Connections => serde_json::to_value(daemon.connection_reports()).unwrap_or_default(),
    }
}
