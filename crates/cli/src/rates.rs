//! `vsocketctl rates`: bytes per second per connection and per guest,
//! from two samples of the daemon's counters taken `seconds` apart.
//!
//! The samples are the admin socket's `connections` and `guests` replies.
//! A connection that opened between the samples started from zero bytes;
//! one that closed in between is left out of the connection rates (its
//! bytes still count in its guests' rates, which come from the guests'
//! totals).

use serde_json::{json, Value};

/// Rates of the connections open at the second sample, by id.
pub fn connection_rates(before: &Value, after: &Value, seconds: f64) -> Vec<Value> {
    let earlier = |id: &Value, field: &str| -> u64 {
        rows(before).iter().find(|c| &c["id"] == id).and_then(|c| c[field].as_u64()).unwrap_or(0)
    };
    rows(after)
        .iter()
        .map(|c| {
            let rate = |field: &str| per_second(c[field].as_u64().unwrap_or(0), earlier(&c["id"], field), seconds);
            json!({
                "id": c["id"],
                "vpc": c["vpc"],
                "client_guest": c["client_guest"],
                "client": c["client"],
                "server_guest": c["server_guest"],
                "server": c["server"],
                "client_to_server_bytes_per_second": rate("bytes_client_to_server"),
                "server_to_client_bytes_per_second": rate("bytes_server_to_client"),
            })
        })
        .collect()
}

/// Rates of every guest, from its byte totals (closed connections included).
pub fn guest_rates(before: &Value, after: &Value, seconds: f64) -> Vec<Value> {
    rows(after)
        .iter()
        .map(|g| {
            let prior = rows(before).iter().find(|p| p["name"] == g["name"]).cloned().unwrap_or(Value::Null);
            let rate =
                |field: &str| per_second(g[field].as_u64().unwrap_or(0), prior[field].as_u64().unwrap_or(0), seconds);
            json!({
                "name": g["name"],
                "vpc": g["vpc"],
                "connections_open": g["connections_open"],
                "sent_bytes_per_second": rate("bytes_sent"),
                "received_bytes_per_second": rate("bytes_received"),
            })
        })
        .collect()
}

fn rows(sample: &Value) -> &[Value] {
    sample.as_array().map(Vec::as_slice).unwrap_or_default()
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

    fn conn(id: u64, up: u64, down: u64) -> Value {
        json!({ "id": id, "vpc": "blue", "client_guest": "a", "client": "10.10.0.2:4000",
                "server_guest": "b", "server": "10.10.0.3:80",
                "bytes_client_to_server": up, "bytes_server_to_client": down })
    }

    #[test]
    fn connections_are_matched_by_id_and_new_ones_start_at_zero() {
        let before = json!([conn(1, 100, 1000), conn(2, 5, 5)]);
        let after = json!([conn(1, 300, 1000), conn(3, 50, 0)]);
        let rates = connection_rates(&before, &after, 2.0);
        assert_eq!(rates.len(), 2, "closed connection 2 is left out");
        assert_eq!(rates[0]["id"], 1);
        assert_eq!(rates[0]["client_to_server_bytes_per_second"], 100.0);
        assert_eq!(rates[0]["server_to_client_bytes_per_second"], 0.0);
        assert_eq!(rates[0]["server"], "10.10.0.3:80");
        assert_eq!(rates[1]["id"], 3);
        assert_eq!(rates[1]["client_to_server_bytes_per_second"], 25.0);
    }

    #[test]
    fn guests_rates_come_from_their_totals() {
        let guest = |sent: u64, received: u64| json!({ "name": "a", "vpc": "blue", "connections_open": 1, "bytes_sent": sent, "bytes_received": received });
        let rates = guest_rates(&json!([guest(1000, 10)]), &json!([guest(4000, 10)]), 0.5);
        assert_eq!(rates[0]["name"], "a");
        assert_eq!(rates[0]["sent_bytes_per_second"], 6000.0);
        assert_eq!(rates[0]["received_bytes_per_second"], 0.0);
        // A total that went back, or no time passed: no rate.
        assert_eq!(guest_rates(&json!([guest(10, 10)]), &json!([guest(5, 10)]), 1.0)[0]["sent_bytes_per_second"], 0.0);
        assert_eq!(guest_rates(&json!([]), &json!([guest(5, 10)]), 0.0)[0]["sent_bytes_per_second"], 0.0);
    }
}
