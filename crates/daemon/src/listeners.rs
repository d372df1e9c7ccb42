//! The listener registry: which vSocket listener a connect reaches.
//!
//! A listener bound to one of its guest's VPC addresses is found from the
//! whole VPC; one bound to a loopback address only from inside its guest;
//! one bound to the wildcard from both (under each of the guest's addresses,
//! and as the guest's own 0.0.0.0). Several listeners on one address
//! (SO_REUSEPORT, forked workers) take turns.

use crate::channel::Channel;
use crate::guest::GuestSlot;
use crate::ids::{ListenerId, SlotId};
use crate::sync::lock;
use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A listening socket registered by a guest.
#[derive(Debug)]
pub struct ListenerRecord {
    pub id: ListenerId,
    pub guest: Arc<GuestSlot>,
    /// The address the program bound (may be 0.0.0.0).
    pub local: SocketAddrV4,
    /// The listener channel: `Incoming` messages go here.
    pub channel: Box<dyn Channel>,
    /// A VM guest's listener: its connections are placed in this region
    /// (and announced with `IncomingAt`).
    pub vm: Option<Arc<crate::placed::VmMemory>>,
    pub accepted: AtomicU64,
    /// The write end of the listener's bell, for the clients of its
    /// grants (ARCHITECTURE §3b); none where the library takes no kits.
    pub bell: Option<std::os::fd::OwnedFd>,
    /// The daemon's end of the listener's kit channel (non-blocking): its
    /// `Kits` and `Revoke` go there, not on the listener channel, so that
    /// they never make the listener look readable.
    pub kit_channel: Option<std::os::fd::OwnedFd>,
    /// The library said `NoKits`: no more grants for this listener.
    pub kits_off: std::sync::atomic::AtomicBool,
}

/// Where a listener's address is reachable from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    /// From the VPC (by name): the guest's own (VPC) addresses.
    Vpc(Arc<str>),
    /// From inside the guest only: loopback addresses (127.0.0.0/8), and
    /// the wildcard, stored as 0.0.0.0 and matching any of them.
    Guest(SlotId),
}

type Key = (Scope, Ipv4Addr, u16);

/// Every registered listener, by where it can be reached.
#[derive(Debug, Default)]
pub struct Listeners {
    map: Mutex<HashMap<Key, Vec<Arc<ListenerRecord>>>>,
    /// Listeners a predecessor daemon had (a hand-over), under the same
    /// keys, with the time until which their processes are expected to
    /// register them again.
    expected: Mutex<HashMap<Key, Instant>>,
}

impl Listeners {
    /// The keys under which a listener bound to `local` in `guest` is found.
    fn keys(guest: &GuestSlot, local: SocketAddrV4) -> Vec<Key> {
        let port = local.port();
        if local.ip().is_loopback() {
            vec![(Scope::Guest(guest.id), *local.ip(), port)]
        } else if local.ip().is_unspecified() {
            let mut keys: Vec<Key> =
                guest.addresses.iter().map(|ip| (Scope::Vpc(guest.vpc.clone()), *ip, port)).collect();
            keys.push((Scope::Guest(guest.id), Ipv4Addr::UNSPECIFIED, port));
            keys
        } else {
            vec![(Scope::Vpc(guest.vpc.clone()), *local.ip(), port)]
        }
    }

    /// Registers a listener; the caller checked that its guest owns the
    /// address.
    pub fn add(&self, listener: Arc<ListenerRecord>) {
        let mut map = lock(&self.map);
        for key in Self::keys(&listener.guest, listener.local) {
            map.entry(key).or_default().push(listener.clone());
        }
    }

    pub fn remove(&self, listener: &ListenerRecord) {
        let mut map = lock(&self.map);
        for key in Self::keys(&listener.guest, listener.local) {
            if let Some(list) = map.get_mut(&key) {
                list.retain(|l| l.id != listener.id);
                if list.is_empty() {
                    map.remove(&key);
                }
            }
        }
    }

    /// The keys, in order, under which a connect from `client` to `addr`
    /// looks: loopback addresses in the client's own guest only (the
    /// address, then the guest's wildcard); other addresses in its VPC.
    fn lookup(client: &GuestSlot, addr: SocketAddrV4) -> Vec<Key> {
        if addr.ip().is_loopback() {
            let scope = Scope::Guest(client.id);
            vec![(scope.clone(), *addr.ip(), addr.port()), (scope, Ipv4Addr::UNSPECIFIED, addr.port())]
        } else {
            vec![(Scope::Vpc(client.vpc.clone()), *addr.ip(), addr.port())]
        }
    }

    /// The listener a connect from `client` to `addr` reaches, if any (see
    /// `lookup`). Listeners sharing the address take turns by `turn`.
    pub fn find(&self, client: &GuestSlot, addr: SocketAddrV4, turn: u64) -> Option<Arc<ListenerRecord>> {
        let map = lock(&self.map);
        let list = Self::lookup(client, addr).into_iter().find_map(|key| map.get(&key))?;
        Some(list[turn as usize % list.len()].clone())
    }

    /// Expects a listener a predecessor daemon had, bound to `local` in
    /// `guest`, to be registered again before `until`.
    pub fn expect(&self, guest: &GuestSlot, local: SocketAddrV4, until: Instant) {
        let mut expected = lock(&self.expected);
        for key in Self::keys(guest, local) {
            expected.insert(key, until);
        }
    }

    /// Until when a connect from `client` to `addr` that finds no listener
    /// may wait for an expected one there (found as `find` would find it).
    pub fn awaited(&self, client: &GuestSlot, addr: SocketAddrV4) -> Option<Instant> {
        let now = Instant::now();
        let mut expected = lock(&self.expected);
        expected.retain(|_, until| *until > now);
        Self::lookup(client, addr).iter().find_map(|key| expected.get(key).copied())
    }

    /// Every listener once, by id.
    pub fn all(&self) -> Vec<Arc<ListenerRecord>> {
        let map = lock(&self.map);
        let mut seen = BTreeMap::new();
        for l in map.values().flatten() {
            seen.entry(l.id).or_insert_with(|| l.clone());
        }
        seen.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Handover;
    use std::path::Path;
    use vsocket_abi::control::Message;

    #[derive(Debug)]
    struct Nowhere;

    impl Channel for Nowhere {
        fn send(&self, _: &Message, _: Option<Handover<'_>>) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Guests a and b in VPC blue, c in VPC red with b's address.
    fn guests() -> [Arc<GuestSlot>; 3] {
        let text = r#"
            [host]
            name = "h"
            [[vpc]]
            name = "blue"
            cidr = "10.0.0.0/24"
            [[vpc]]
            name = "red"
            cidr = "10.0.0.0/24"
            [[guest]]
            name = "a"
            vpc = "blue"
            addresses = ["10.0.0.2"]
            [[guest]]
            name = "b"
            vpc = "blue"
            addresses = ["10.0.0.3", "10.0.0.13"]
            [[guest]]
            name = "c"
            vpc = "red"
            addresses = ["10.0.0.3"]
        "#;
        let config = vsocket_policy::parse(text, Path::new("t.toml")).unwrap();
        let slot = |name| {
            let id = config.guest_by_name(name).unwrap();
            Arc::new(GuestSlot::new(SlotId(id.index() as u64 + 1), &config, id))
        };
        [slot("a"), slot("b"), slot("c")]
    }

    fn listener(id: u64, guest: &Arc<GuestSlot>, local: &str) -> Arc<ListenerRecord> {
        Arc::new(ListenerRecord {
            id: ListenerId(id),
            guest: guest.clone(),
            local: local.parse().unwrap(),
            channel: Box::new(Nowhere),
            vm: None,
            accepted: AtomicU64::new(0),
            bell: None,
            kit_channel: None,
            kits_off: Default::default(),
        })
    }

    fn found(listeners: &Listeners, from: &GuestSlot, to: &str) -> Option<u64> {
        listeners.find(from, to.parse().unwrap(), 0).map(|l| l.id.0)
    }

    #[test]
    fn addresses_are_reached_from_their_vpc_and_loopback_from_inside() {
        let [a, b, c] = guests();
        let listeners = Listeners::default();
        listeners.add(listener(1, &b, "0.0.0.0:80"));
        listeners.add(listener(2, &b, "10.0.0.3:443"));
        listeners.add(listener(3, &b, "127.0.0.1:22"));
        listeners.add(listener(4, &c, "10.0.0.3:443"));
        // The wildcard: every address of b, in b's VPC, and b's own loopback.
        assert_eq!(found(&listeners, &a, "10.0.0.3:80"), Some(1));
        assert_eq!(found(&listeners, &a, "10.0.0.13:80"), Some(1));
        assert_eq!(found(&listeners, &b, "127.0.0.5:80"), Some(1));
        assert_eq!(found(&listeners, &a, "127.0.0.1:80"), None, "a's loopback is a's own");
        assert_eq!(found(&listeners, &c, "10.0.0.3:80"), None, "another VPC, the same address");
        // One address: from its VPC only; the same address in another VPC
        // is another listener.
        assert_eq!(found(&listeners, &a, "10.0.0.3:443"), Some(2));
        assert_eq!(found(&listeners, &a, "10.0.0.13:443"), None);
        assert_eq!(found(&listeners, &c, "10.0.0.3:443"), Some(4));
        // Loopback: from inside the guest only.
        assert_eq!(found(&listeners, &b, "127.0.0.1:22"), Some(3));
        assert_eq!(found(&listeners, &a, "10.0.0.3:22"), None);
        assert_eq!(listeners.all().iter().map(|l| l.id.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    }

    #[test]
    fn listeners_sharing_an_address_take_turns_and_leave_alone() {
        let [a, b, _] = guests();
        let listeners = Listeners::default();
        let (first, second) = (listener(1, &b, "0.0.0.0:80"), listener(2, &b, "10.0.0.3:80"));
        listeners.add(first.clone());
        listeners.add(second.clone());
        let to = "10.0.0.3:80".parse().unwrap();
        let turns: Vec<u64> = (0..4).map(|turn| listeners.find(&a, to, turn).unwrap().id.0).collect();
        assert_eq!(turns, [1, 2, 1, 2]);
        listeners.remove(&first);
        assert_eq!(found(&listeners, &a, "10.0.0.3:80"), Some(2));
        assert_eq!(found(&listeners, &a, "10.0.0.13:80"), None, "the wildcard's other keys went with it");
        listeners.remove(&second);
        assert!(listeners.all().is_empty());
    }

    #[test]
    fn an_expected_listener_is_awaited_where_it_will_be_found_until_its_time() {
        let [a, b, c] = guests();
        let listeners = Listeners::default();
        let until = Instant::now() + std::time::Duration::from_secs(60);
        listeners.expect(&b, "0.0.0.0:80".parse().unwrap(), until);
        listeners.expect(&b, "127.0.0.1:22".parse().unwrap(), until);
        let awaited = |from: &GuestSlot, to: &str| listeners.awaited(from, to.parse().unwrap());
        assert_eq!(awaited(&a, "10.0.0.3:80"), Some(until));
        assert_eq!(awaited(&a, "10.0.0.13:80"), Some(until));
        assert_eq!(awaited(&b, "127.0.0.9:80"), Some(until), "the wildcard, from inside its guest");
        assert_eq!(awaited(&a, "10.0.0.3:81"), None, "another port");
        assert_eq!(awaited(&c, "10.0.0.3:80"), None, "another VPC, the same address");
        assert_eq!(awaited(&a, "127.0.0.1:22"), None, "a's loopback is a's own");
        let past = Instant::now();
        listeners.expect(&b, "10.0.0.3:443".parse().unwrap(), past);
        assert_eq!(awaited(&a, "10.0.0.3:443"), None, "no longer expected");
    }
}
