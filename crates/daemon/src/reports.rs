//! What the operator sees: the daemon's guests, listeners and connections
//! as `vsocketctl` and the metrics endpoint report them.

use crate::daemon::Daemon;
use crate::quota::Quota;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use vsocket_admin::{ConnectionReport, GuestReport, ListenerReport};

impl Daemon {
    /// A snapshot of every guest, for `vsocketctl guests`.
    pub fn guest_reports(&self) -> Vec<GuestReport> {
        // Kits taken since the last reap are connections already: what the
        // operator reads counts them (see `Daemon::announce_kits`).
        self.announce_kits();
        let policy = self.policy();
        let config = &policy.config;
        // Bytes and counts of live connections, by guest (slot order).
        let slots = policy.slots();
        let mut live = vec![(0u64, 0u64, 0u64); slots.len()];
        // The bytes of connections that closed, read with the table still
        // held: each connection is counted once, live or closed.
        let read_closed = || -> Vec<(u64, u64)> {
            slots
                .iter()
                .map(|s| {
                    let c = &s.counters;
                    (c.closed_bytes_sent.load(Ordering::Relaxed), c.closed_bytes_received.load(Ordering::Relaxed))
                })
                .collect()
        };
        let closed = self.connections.snapshot(
            |conn| {
                let (up, down) = (conn.bytes_client_to_server(), conn.bytes_server_to_client());
                for (slot, (sent, received, open)) in slots.iter().zip(live.iter_mut()) {
                    if Arc::ptr_eq(&conn.client, slot) {
                        *sent += up;
                        *received += down;
                        *open += 1;
                    }
                    if Arc::ptr_eq(&conn.server, slot) {
                        *sent += down;
                        *received += up;
                        *open += 1;
                    }
                }
            },
            read_closed,
        );
        config
            .guests()
            .map(|(id, g)| {
                let slot = policy.slot(id);
                let c = &slot.counters;
                let (live_sent, live_received, open) = live[id.index()];
                let (closed_sent, closed_received) = closed[id.index()];
                GuestReport {
                    name: g.name.clone(),
                    vpc: config.vpc(g.vpc).name.clone(),
                    addresses: g.addresses.clone(),
                    security_groups: g.groups.iter().map(|&group| config.security_group(group).name.clone()).collect(),
                    netns: g.netns.clone(),
                    channels: c.quota.channels(),
                    connections_live: c.quota.connections(),
                    shared_memory: c.quota.shared_memory(),
                    max_connections: g.quotas.max_connections,
                    max_shared_memory: g.quotas.max_shared_memory,
                    max_channels: g.quotas.max_channels,
                    exceeded_connections: c.quota.exceeded(Quota::Connections),
                    exceeded_shared_memory: c.quota.exceeded(Quota::SharedMemory),
                    exceeded_channels: c.quota.exceeded(Quota::Channels),
                    refused_attachments: c.refused_attachments.load(Ordering::Relaxed),
                    connections_open: open,
                    connections_out: c.connections_out.load(Ordering::Relaxed),
                    connections_in: c.connections_in.load(Ordering::Relaxed),
                    denied: c.denied.load(Ordering::Relaxed),
                    fallbacks: c.fallbacks.load(Ordering::Relaxed),
                    bytes_sent: closed_sent + live_sent,
                    bytes_received: closed_received + live_received,
                    region_size: slot.vm_memory.get().map_or(0, |vm| vm.usage().1),
                    region_used: slot.vm_memory.get().map_or(0, |vm| vm.usage().0),
                }
            })
            .collect()
    }

    pub fn listener_reports(&self) -> Vec<ListenerReport> {
        self.announce_kits();
        let grants = self.grants.all();
        self.listeners
            .all()
            .iter()
            .map(|l| ListenerReport {
                grants: grants.iter().filter(|g| g.key.listener == l.id).count() as u64,
                id: l.id.0,
                guest: l.guest.name.clone(),
                vpc: l.guest.vpc.to_string(),
                address: l.local,
                accepted: l.accepted.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub fn connection_reports(&self) -> Vec<ConnectionReport> {
        self.announce_kits();
        let mut out = Vec::new();
        self.connections.each(|c| {
            out.push(ConnectionReport {
                id: c.id.0,
                vpc: c.client.vpc.to_string(),
                client_guest: c.client.name.clone(),
                client: c.client_addr,
                server_guest: c.server.name.clone(),
                server: c.server_addr,
                bytes_client_to_server: c.bytes_client_to_server(),
                bytes_server_to_client: c.bytes_server_to_client(),
                age_seconds: c.opened.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0),
            })
        });
        out
    }
}
