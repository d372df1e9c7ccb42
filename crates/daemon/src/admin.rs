//! The operator's socket: one JSON request per line, one JSON reply per
//! line. Only root can reach it (the socket file is mode 0600).
//!
//! `change` and `reload` change the policy live ([`crate::live`]); their
//! reply is what changed, or `{"error": "..."}` with the policy untouched.

use crate::daemon::Daemon;
use serde::Deserialize;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

/// A request from `vsocketctl`.
#[derive(Debug, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    Guests,
    Listeners,
    Connections,
    /// The fabric's peer hosts: state and traffic.
    Peers,
    /// A live edit: `{"command":"change","change":{"op":"add_rule",...}}`.
    Change {
        change: vsocket_policy::Change,
    },
    /// Read the config file again and apply what differs.
    Reload,
}

/// Serves the admin socket on a thread.
pub fn serve(daemon: &Arc<Daemon>) -> std::io::Result<()> {
    let path = crate::admin_socket_path(&daemon.policy().config.host().run_dir);
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

fn handle(daemon: &Arc<Daemon>, stream: UnixStream) {
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

fn answer(daemon: &Arc<Daemon>, request: &Request) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let policy = daemon.policy();
    let host = policy.config.host();
    match request {
        Request::Status => {
            let guests = daemon.guest_reports();
            let exceeded = |f: fn(&crate::reports::GuestReport) -> u64| guests.iter().map(f).sum::<u64>();
            serde_json::json!({
                "host": host.name,
                "guests": guests.len(),
                "listeners": daemon.listener_reports().len(),
                "connections": daemon.connection_reports().len(),
                "flow_log": host.flow_log.as_ref().map(|f| f.path.display().to_string()),
                "flow_log_dropped": daemon.flow_log_dropped(),
                "metrics": host.metrics.map(|a| a.to_string()),
                "segments_created": daemon.segments.created.load(Relaxed),
                "segments_reused": daemon.segments.reused.load(Relaxed),
                "segments_kept": daemon.segments.kept(),
                "deny_action": host.deny_action.to_string(),
                "on_policy_change": host.on_policy_change.to_string(),
                "policy_changes": daemon.policy_changes.load(Relaxed),
                "policy_resets": daemon.policy_resets.load(Relaxed),
                "quota_exceeded_connections": exceeded(|g| g.exceeded_connections),
                "quota_exceeded_shared_memory": exceeded(|g| g.exceeded_shared_memory),
                "quota_exceeded_channels": exceeded(|g| g.exceeded_channels),
                "fabric": daemon.fabric.get().map(|f| f.kind.to_string()),
                "fabric_peers_up": daemon.fabric.get().map(|f| f.status().iter().filter(|p| p.state == "up").count()),
            })
        }
        Request::Change { change } => {
            drop(policy);
            changed(crate::live::change(daemon, change))
        }
        Request::Reload => {
            drop(policy);
            changed(crate::live::reload(daemon))
        }
        Request::Guests => serde_json::to_value(daemon.guest_reports()).unwrap_or_default(),
        Request::Listeners => serde_json::to_value(daemon.listener_reports()).unwrap_or_default(),
        Request::Connections => serde_json::to_value(daemon.connection_reports()).unwrap_or_default(),
        Request::Peers => {
            let peers = daemon.fabric.get().map(|f| f.status()).unwrap_or_default();
            serde_json::to_value(peers).unwrap_or_default()
        }
    }
}

fn changed(result: Result<crate::live::Applied, crate::live::ChangeError>) -> serde_json::Value {
    match result {
        Ok(applied) => serde_json::to_value(applied).unwrap_or_default(),
        Err(error) => serde_json::json!({ "error": error.to_string() }),
    }
}
