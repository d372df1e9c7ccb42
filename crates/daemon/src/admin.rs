//! The operator's socket: one JSON request per line, one JSON reply per
//! line. Only root can reach it (the socket file is mode 0600).
//!
//! The messages are [`vsocket_admin`]'s, which `vsocketctl` speaks too.
//! `change` and `reload` change the policy live ([`crate::live`]); their
//! reply is what changed, or `{"error": "..."}` with the policy untouched.

use crate::daemon::Daemon;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use vsocket_admin::{LinkState, Reply, Request, StatusReport};

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
            Ok(request) => answer(daemon, request),
            Err(e) => Reply::refused(format!("bad request: {e}")),
        };
        let line = match vsocket_admin::encode(&reply) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "admin reply not encoded");
                return;
            }
        };
        if writeln!(writer, "{line}").is_err() {
            return;
        }
    }
}

fn answer(daemon: &Arc<Daemon>, request: Request) -> Reply {
    use std::sync::atomic::Ordering::Relaxed;
    let policy = daemon.policy();
    let host = policy.config.host();
    match request {
        Request::Status => {
            let guests = daemon.guest_reports();
            let exceeded = |f: fn(&crate::reports::GuestReport) -> u64| guests.iter().map(f).sum::<u64>();
            let fabric = daemon.fabric.get();
            Reply::Status(StatusReport {
                host: host.name.clone(),
                guests: guests.len(),
                listeners: daemon.listener_reports().len(),
                connections: daemon.connection_reports().len(),
                flow_log: host.flow_log.as_ref().map(|f| f.path.display().to_string()),
                flow_log_dropped: daemon.flow_log_dropped(),
                metrics: host.metrics,
                segments_created: daemon.segments.created.load(Relaxed),
                segments_reused: daemon.segments.reused.load(Relaxed),
                segments_kept: daemon.segments.kept(),
                kit_chunks: daemon.segments.chunks.load(Relaxed),
                kit_pieces_kept: daemon.segments.kept_pieces(),
                doorbells_reused: daemon.segments.bells_reused.load(Relaxed),
                rings_trimmed: daemon.rings_trimmed.load(Relaxed),
                deny_action: host.deny_action,
                on_policy_change: host.on_policy_change,
                policy_changes: daemon.policy_changes.load(Relaxed),
                policy_resets: daemon.policy_resets.load(Relaxed),
                quota_exceeded_connections: exceeded(|g| g.exceeded_connections),
                quota_exceeded_shared_memory: exceeded(|g| g.exceeded_shared_memory),
                quota_exceeded_channels: exceeded(|g| g.exceeded_channels),
                fabric: fabric.map(|f| f.kind),
                fabric_peers_up: fabric.map(|f| f.status().iter().filter(|p| p.state == LinkState::Up).count()),
                store: daemon.store.get().map(|health| health.status()),
            })
        }
        Request::Change { change } => {
            drop(policy);
            changed(crate::live::change(daemon, &change))
        }
        Request::Reload => {
            drop(policy);
            changed(crate::live::reload(daemon))
        }
        Request::Guests => Reply::Guests(daemon.guest_reports()),
        Request::Listeners => Reply::Listeners(daemon.listener_reports()),
        Request::Connections => Reply::Connections(daemon.connection_reports()),
        Request::Peers => Reply::Peers(daemon.fabric.get().map(|f| f.status()).unwrap_or_default()),
    }
}

fn changed(result: Result<crate::live::Applied, crate::live::ChangeError>) -> Reply {
    match result {
        Ok(applied) => Reply::Applied(applied),
        Err(error) => Reply::refused(error.to_string()),
    }
}
