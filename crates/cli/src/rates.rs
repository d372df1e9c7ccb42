//! `vsocketctl rates`: bytes per second per connection and per guest,
//! from two samples of the daemon's counters taken `seconds` apart.
//!
//! The samples are the admin socket's `connections` and `guests` replies.
//! A connection that opened between the samples started from zero bytes;
//! one that closed in between is left out of the connection rates (its
//! bytes still count in its guests' rates, which come from the guests'
//! totals).

use serde::Serialize;
use std::net::SocketAddrV4;
use vsocket_admin::{ConnectionReport, GuestReport};

/// One open connection's rates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectionRate {
    pub id: u64,
    pub vpc: String,
    pub client_guest: String,
    pub client: SocketAddrV4,
    pub server_guest: String,
    pub server: SocketAddrV4,
    pub client_to_server_bytes_per_second: f64,
    pub server_to_client_bytes_per_second: f64,
}

/// One guest's rates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuestRate {
    pub name: String,
    pub vpc: String,
    pub connections_open: u64,
    pub sent_bytes_per_second: f64,
    pub received_bytes_per_second: f64,
}

/// Rates of the connections open at the second sample, by id.
pub fn connection_rates(before: &[ConnectionReport], after: &[ConnectionReport], seconds: f64) -> Vec<ConnectionRate> {
    after
        .iter()
        .map(|c| {
            let earlier = before.iter().find(|b| b.id == c.id);
            let rate = |field: fn(&ConnectionReport) -> u64| per_second(field(c), earlier.map_or(0, field), seconds);
            ConnectionRate {
                id: c.id,
                vpc: c.vpc.clone(),
                client_guest: c.client_guest.clone(),
                client: c.client,
                server_guest: c.server_guest.clone(),
                server: c.server,
                client_to_server_bytes_per_second: rate(|c| c.bytes_client_to_server),
                server_to_client_bytes_per_second: rate(|c| c.bytes_server_to_client),
            }
        })
        .collect()
}

/// Rates of every guest, from its byte totals (closed connections included).
pub fn guest_rates(before: &[GuestReport], after: &[GuestReport], seconds: f64) -> Vec<GuestRate> {
    after
        .iter()
        .map(|g| {
            let prior = before.iter().find(|p| p.name == g.name);
            let rate = |field: fn(&GuestReport) -> u64| per_second(field(g), prior.map_or(0, field), seconds);
            GuestRate {
                name: g.name.clone(),
                vpc: g.vpc.clone(),
                connections_open: g.connections_open,
                sent_bytes_per_second: rate(|g| g.bytes_sent),
                received_bytes_per_second: rate(|g| g.bytes_received),
            }
        })
        .collect()
}

/// Bytes per second from `before` to `now`; totals never go back, so a
/// smaller `now` (a guest rewriting its ring) counts as no progress.
fn per_second(now: u64, before: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    now.saturating_sub(before) as f64 / seconds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64, up: u64, down: u64) -> ConnectionReport {
        ConnectionReport {
            id,
            vpc: "blue".into(),
            client_guest: "a".into(),
            client: "10.10.0.2:4000".parse().unwrap(),
            server_guest: "b".into(),
            server: "10.10.0.3:80".parse().unwrap(),
            bytes_client_to_server: up,
            bytes_server_to_client: down,
            age_seconds: 0.0,
        }
    }

    #[test]
    fn connections_are_matched_by_id_and_new_ones_start_at_zero() {
        let before = [conn(1, 100, 1000), conn(2, 5, 5)];
        let after = [conn(1, 300, 1000), conn(3, 50, 0)];
        let rates = connection_rates(&before, &after, 2.0);
        assert_eq!(rates.len(), 2, "closed connection 2 is left out");
        assert_eq!(rates[0].id, 1);
        assert_eq!(rates[0].client_to_server_bytes_per_second, 100.0);
        assert_eq!(rates[0].server_to_client_bytes_per_second, 0.0);
        assert_eq!(rates[0].server.to_string(), "10.10.0.3:80");
        assert_eq!(rates[1].id, 3);
        assert_eq!(rates[1].client_to_server_bytes_per_second, 25.0);
    }

    #[test]
    fn guests_rates_come_from_their_totals() {
        let guest = |sent: u64, received: u64| GuestReport {
            name: "a".into(),
            vpc: "blue".into(),
            addresses: vec![],
            security_groups: vec![],
            netns: "vs-a".into(),
            channels: 0,
            connections_live: 0,
            shared_memory: 0,
            max_connections: 0,
            max_shared_memory: 0,
            max_channels: 0,
            exceeded_connections: 0,
            exceeded_shared_memory: 0,
            exceeded_channels: 0,
            refused_attachments: 0,
            connections_open: 1,
            connections_out: 0,
            connections_in: 0,
            denied: 0,
            fallbacks: 0,
            bytes_sent: sent,
            bytes_received: received,
            region_size: 0,
            region_used: 0,
        };
        let rates = guest_rates(&[guest(1000, 10)], &[guest(4000, 10)], 0.5);
        assert_eq!(rates[0].name, "a");
        assert_eq!(rates[0].sent_bytes_per_second, 6000.0);
        assert_eq!(rates[0].received_bytes_per_second, 0.0);
        // A total that went back, or no time passed: no rate.
        assert_eq!(guest_rates(&[guest(10, 10)], &[guest(5, 10)], 1.0)[0].sent_bytes_per_second, 0.0);
        assert_eq!(guest_rates(&[], &[guest(5, 10)], 0.0)[0].sent_bytes_per_second, 0.0);
    }

    #[test]
    fn rates_go_out_under_the_names_they_always_had() {
        let json = serde_json::to_value(connection_rates(&[], &[conn(1, 10, 0)], 1.0)).unwrap();
        assert_eq!(
            json.to_string(),
            "[{\"client\":\"10.10.0.2:4000\",\"client_guest\":\"a\",\"client_to_server_bytes_per_second\":10.0,\
             \"id\":1,\"server\":\"10.10.0.3:80\",\"server_guest\":\"b\",\"server_to_client_bytes_per_second\":0.0,\
             \"vpc\":\"blue\"}]"
        );
    }
}
