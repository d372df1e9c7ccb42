//! What a connection holds of its guests' quotas (see [`crate::quota`]).

use crate::guest::GuestSlot;
use crate::quota::Quota;
use std::sync::Arc;
use vsocket_abi::layout::Endpoint;
use vsocket_policy::Quotas;

/// What one live connection holds of its guests' quotas: one connection
/// and `bytes` of shared memory from the client's guest, and from the
/// server's if that is another guest. It holds the guests' slots, so it
/// gives back to exactly the guests it took from, whatever policy changes
/// happen while the connection lives (a removed guest's slot, no longer in
/// any snapshot, still gets its share back). Given back once: by
/// [`Charge::give_back`], or when dropped if it was not.
#[derive(Debug)]
#[must_use]
pub struct Charge {
    client: Arc<GuestSlot>,
    server: Option<Arc<GuestSlot>>,
    bytes: u64,
    given_back: bool,
}

impl Charge {
    /// The guests charged: one or two.
    pub fn guests(&self) -> impl Iterator<Item = &Arc<GuestSlot>> + '_ {
        std::iter::once(&self.client).chain(self.server.as_ref())
    }

    /// Segment bytes taken from each guest charged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back what the charge holds; later calls (and the drop) do
    /// nothing.
    pub fn give_back(&mut self) {
        if std::mem::replace(&mut self.given_back, true) {
            return;
        }
        for slot in std::iter::once(&self.client).chain(self.server.as_ref()) {
            slot.counters.quota.give_back_connection(self.bytes);
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// Which end's guest a connect exceeded, and its quota.
#[derive(Debug, Clone)]
pub struct Exceeded {
    /// The guest over its quota.
    pub guest: Arc<GuestSlot>,
    pub quota: Quota,
    /// Its limit, as the policy in force set it.
    pub limit: u64,
    /// Which end's guest is over: the client's or the server's.
    pub side: Endpoint,
}

impl PartialEq for Exceeded {
    fn eq(&self, other: &Exceeded) -> bool {
        Arc::ptr_eq(&self.guest, &other.guest)
            && (self.quota, self.limit, self.side) == (other.quota, other.limit, other.side)
    }
}

impl Exceeded {
    /// The errno the connecting program gets (see docs/ARCHITECTURE.md §3, *Quotas*).
    ///
    /// - the client's guest has as many connections as it may:
    ///   `EADDRNOTAVAIL`, what Linux's connect gives when the host cannot
    ///   have another outgoing connection (its ephemeral ports are used
    ///   up); it clears when a connection closes. Not `EAGAIN`: asyncio
    ///   and others take `EAGAIN` from a non-blocking connect for "in
    ///   progress", wait for writability and then believe it connected;
    /// - the client's guest has no room for another segment: `ENOBUFS`,
    ///   "No buffer space available", what Linux gives when socket buffer
    ///   memory runs out;
    /// - the server's guest is over either quota: `ECONNREFUSED`, as when a
    ///   listener's backlog is full (vSocket refuses those too); the
    ///   client cannot tell it from the server being busy, and nothing of
    ///   the server's quota is told to another tenant.
    pub fn errno(&self) -> i32 {
        errno(self.side, self.quota)
    }
}

fn errno(side: Endpoint, quota: Quota) -> i32 {
    match (side, quota) {
        (Endpoint::Server, _) => libc::ECONNREFUSED,
        (Endpoint::Client, Quota::Connections | Quota::Channels) => libc::EADDRNOTAVAIL,
        (Endpoint::Client, Quota::SharedMemory) => libc::ENOBUFS,
    }
}

/// Takes a connection from `client` and, if it is another guest, from
/// `server`; `limits` gives a guest's quotas in the policy in force. All or
/// nothing: if the server's guest is over, the client's is given back.
pub fn charge(
    limits: impl Fn(&GuestSlot) -> Quotas,
    client: &Arc<GuestSlot>,
    server: &Arc<GuestSlot>,
    bytes: u64,
) -> Result<Charge, Exceeded> {
    let over = |slot: &Arc<GuestSlot>, quotas: &Quotas, quota: Quota, side| Exceeded {
        guest: slot.clone(),
        quota,
        limit: quota.limit(quotas),
        side,
    };
    let client_limits = limits(client);
    client
        .counters
        .quota
        .take_connection(&client_limits, bytes)
        .map_err(|q| over(client, &client_limits, q, Endpoint::Client))?;
    let mut charge = Charge { client: client.clone(), server: None, bytes, given_back: false };
    if Arc::ptr_eq(client, server) {
        return Ok(charge);
    }
    let server_limits = limits(server);
    // On an error `charge` (the client's share alone) is dropped: given back.
    server
        .counters
        .quota
        .take_connection(&server_limits, bytes)
        .map_err(|q| over(server, &server_limits, q, Endpoint::Server))?;
    charge.server = Some(server.clone());
    Ok(charge)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(connections: u64, shared_memory: u64) -> Quotas {
        Quotas { max_connections: connections, max_shared_memory: shared_memory, max_channels: 2 }
    }

    /// Three guests' slots (from a real config: slots are made from one).
    fn guests() -> [Arc<GuestSlot>; 3] {
        let text = r#"
            [host]
            name = "h"
            [[vpc]]
            name = "v"
            cidr = "10.0.0.0/24"
            [[guest]]
            name = "a"
            vpc = "v"
            addresses = ["10.0.0.2"]
            [[guest]]
            name = "b"
            vpc = "v"
            addresses = ["10.0.0.3"]
            [[guest]]
            name = "c"
            vpc = "v"
            addresses = ["10.0.0.4"]
        "#;
        let config = vsocket_policy::parse(text, std::path::Path::new("t.toml")).unwrap();
        let slots: Vec<Arc<GuestSlot>> = config
            .guests()
            .map(|(id, _)| Arc::new(GuestSlot::new(crate::ids::SlotId(id.index() as u64 + 1), &config, id)))
            .collect();
        [slots[0].clone(), slots[1].clone(), slots[2].clone()]
    }

    fn held(slot: &GuestSlot) -> (u64, u64) {
        (slot.counters.quota.connections(), slot.counters.quota.shared_memory())
    }

    fn over(guest: &Arc<GuestSlot>, quota: Quota, limit: u64, side: Endpoint) -> Option<Exceeded> {
        Some(Exceeded { guest: guest.clone(), quota, limit, side })
    }

    #[test]
    fn a_connection_is_charged_the_memory_its_segment_takes() {
        for ring_size in [4096u32, 1 << 18, 1 << 20] {
            let text = format!("[host]\nname = \"h\"\nring_size = {ring_size}\n");
            let config = vsocket_policy::parse(&text, std::path::Path::new("t.toml")).unwrap();
            let (_view, files) = vsocket_ring::Segment::create(ring_size).unwrap();
            let bytes: u64 =
                files.rw.iter().map(|f| std::fs::File::from(f.try_clone().unwrap()).metadata().unwrap().len()).sum();
            assert_eq!(config.host().segment_size(), bytes, "rings of {ring_size}");
            assert_eq!(bytes, vsocket_abi::layout::segment_size(ring_size) as u64);
        }
    }

    #[test]
    fn connections_are_limited_per_guest_and_given_back() {
        let [a, b, c] = guests();
        // a may hold 2, b 3, c plenty.
        let lim = |g: &GuestSlot| match g.name.as_str() {
            "a" => limits(2, 1000),
            "b" => limits(3, 1000),
            _ => limits(100, 1000),
        };
        let mut first = charge(lim, &a, &b, 10).unwrap();
        let second = charge(lim, &a, &b, 10).unwrap();
        assert_eq!(second.guests().map(|g| g.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(second.bytes(), 10);
        assert_eq!(charge(lim, &a, &b, 10).err(), over(&a, Quota::Connections, 2, Endpoint::Client));
        assert_eq!(held(&a), (2, 20));
        assert_eq!(held(&b).0, 2, "a's refusal took nothing from b");
        // c is not affected by a being full, but b fills up with c's.
        let third = charge(lim, &c, &b, 10).unwrap();
        assert_eq!(charge(lim, &c, &b, 10).err(), over(&b, Quota::Connections, 3, Endpoint::Server));
        assert_eq!(held(&c).0, 1, "c's side was given back when b's was over");
        first.give_back();
        assert_eq!((held(&a).0, held(&b).0), (1, 2));
        first.give_back();
        drop(first);
        assert_eq!((held(&a).0, held(&b).0), (1, 2), "given back once only");
        let fourth = charge(lim, &a, &c, 10).unwrap();
        drop(second);
        assert_eq!((held(&a), held(&b).1), ((1, 10), 10));
        drop((third, fourth));
        assert_eq!((held(&a), held(&b), held(&c)), ((0, 0), (0, 0), (0, 0)));
    }

    #[test]
    fn a_connection_inside_one_guest_counts_once() {
        let [a, ..] = guests();
        let lim = |_: &GuestSlot| limits(1, 1000);
        let mut inside = charge(lim, &a, &a, 100).unwrap();
        assert_eq!(inside.guests().count(), 1);
        assert_eq!(held(&a), (1, 100));
        inside.give_back();
        assert_eq!(held(&a), (0, 0));
    }

    #[test]
    fn shared_memory_is_limited_in_bytes() {
        let [a, b, _] = guests();
        let lim = |g: &GuestSlot| if g.name == "a" { limits(100, 250) } else { limits(100, 1000) };
        let _one = charge(lim, &a, &b, 100).unwrap();
        let _two = charge(lim, &a, &b, 100).unwrap();
        let third = charge(lim, &a, &b, 100).err().unwrap();
        assert_eq!(Some(third.clone()), over(&a, Quota::SharedMemory, 250, Endpoint::Client));
        assert_eq!(third.errno(), libc::ENOBUFS);
        let lim = |g: &GuestSlot| if g.name == "b" { limits(100, 150) } else { limits(100, 1000) };
        let full_server = charge(lim, &a, &b, 100).err().unwrap();
        assert_eq!(full_server.errno(), libc::ECONNREFUSED);
        assert_eq!(held(&a).1, 200, "the client's bytes were given back");
    }

    #[test]
    fn errnos_are_those_documented() {
        assert_eq!(errno(Endpoint::Client, Quota::Connections), libc::EADDRNOTAVAIL);
        assert_eq!(errno(Endpoint::Client, Quota::SharedMemory), libc::ENOBUFS);
        assert_eq!(errno(Endpoint::Server, Quota::Connections), libc::ECONNREFUSED);
        assert_eq!(errno(Endpoint::Server, Quota::SharedMemory), libc::ECONNREFUSED);
    }

    #[test]
    fn a_charge_is_given_back_once_to_its_own_slots() {
        let [a, b, _] = guests();
        let lim = |_: &GuestSlot| limits(5, 1000);
        let dropped = charge(lim, &a, &b, 7).unwrap();
        assert_eq!(held(&b).0, 1);
        drop(dropped);
        assert_eq!((held(&a).0, held(&b)), (0, (0, 0)));
        let mut kept = charge(lim, &a, &b, 7).unwrap();
        assert_eq!((held(&a).0, held(&b).0), (1, 1), "kept: still held");
        // The guest is removed from the policy: its slot still gets it back.
        b.remove();
        kept.give_back();
        kept.give_back();
        drop(kept);
        assert_eq!((held(&a).0, held(&b).0), (0, 0));
    }
}
