//! The relay's table of streams: each found by its slot (which is also its
//! doorbell's epoll token) or by its key on the wire.
//!
//! A slot is reused once its stream is removed, so a slot kept past
//! removal (in a list of streams to pump) may name a newer stream; every
//! use of a slot must therefore be harmless for any stream it finds, which
//! looking at a stream's rings is.

use std::collections::HashMap;
use std::hash::Hash;

/// Where a stream lives in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(usize);

impl Slot {
    /// The slot as an offset from a base epoll token.
    pub fn token(self, base: u64) -> u64 {
        base + self.0 as u64
    }

    /// The slot a token at or above `base` names.
    pub fn from_token(token: u64, base: u64) -> Slot {
        Slot((token - base) as usize)
    }
}

/// Streams by slot and by key.
pub struct Table<K, V> {
    entries: Vec<Option<(K, V)>>,
    free: Vec<usize>,
    slots: HashMap<K, Slot>,
}

impl<K: Copy + Eq + Hash, V> Default for Table<K, V> {
    fn default() -> Self {
        Table { entries: Vec::new(), free: Vec::new(), slots: HashMap::new() }
    }
}

impl<K: Copy + Eq + Hash, V> Table<K, V> {
    /// Adds `value` under `key`, in a free slot; `None` if `key` is taken.
    pub fn insert(&mut self, key: K, value: V) -> Option<Slot> {
        if self.slots.contains_key(&key) {
            return None;
        }
        let slot = match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some((key, value));
                Slot(i)
            }
            None => {
                self.entries.push(Some((key, value)));
                Slot(self.entries.len() - 1)
            }
        };
        self.slots.insert(key, slot);
        Some(slot)
    }

    /// Removes the stream in `slot`, freeing the slot and its key.
    pub fn remove(&mut self, slot: Slot) -> Option<V> {
        let (key, value) = self.entries.get_mut(slot.0)?.take()?;
        self.slots.remove(&key);
        self.free.push(slot.0);
        Some(value)
    }

    /// The slot of the stream with `key`.
    pub fn find(&self, key: &K) -> Option<Slot> {
        self.slots.get(key).copied()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.slots.contains_key(key)
    }

    /// The key of the stream in `slot`.
    pub fn key(&self, slot: Slot) -> Option<K> {
        self.entries.get(slot.0)?.as_ref().map(|(k, _)| *k)
    }

    pub fn get(&self, slot: Slot) -> Option<&V> {
        self.entries.get(slot.0)?.as_ref().map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut V> {
        self.entries.get_mut(slot.0)?.as_mut().map(|(_, v)| v)
    }

    /// Every stream, with its key.
    pub fn iter(&self) -> impl Iterator<Item = (K, &V)> {
        self.entries.iter().flatten().map(|(k, v)| (*k, v))
    }

    /// The slots of the streams whose key passes `keep`.
    pub fn slots_where(&self, keep: impl Fn(&K) -> bool) -> Vec<Slot> {
        self.slots.iter().filter(|(k, _)| keep(k)).map(|(_, s)| *s).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_found_by_slot_and_by_key_until_removed() {
        let mut t: Table<(u8, u64), &str> = Table::default();
        let a = t.insert((0, 1), "a").unwrap();
        let b = t.insert((0, 2), "b").unwrap();
        assert_ne!(a, b);
        assert_eq!(t.find(&(0, 2)), Some(b));
        assert_eq!(t.get(a), Some(&"a"));
        assert_eq!(t.key(b), Some((0, 2)));
        assert_eq!(t.remove(a), Some("a"));
        assert_eq!(t.get(a), None);
        assert_eq!(t.find(&(0, 1)), None);
        assert_eq!(t.remove(a), None, "a slot is removed once");
        assert_eq!(t.iter().count(), 1);
    }

    #[test]
    fn a_key_is_taken_once_and_freed_slots_are_reused() {
        let mut t: Table<u64, u32> = Table::default();
        let a = t.insert(7, 1).unwrap();
        assert_eq!(t.insert(7, 2), None, "a key in use is not taken again");
        assert_eq!(t.get(a), Some(&1));
        t.remove(a);
        let b = t.insert(8, 3).unwrap();
        assert_eq!(b, a, "the freed slot is reused");
        assert_eq!(t.key(b), Some(8));
        assert_eq!(t.find(&7), None);
        let c = t.insert(7, 4).unwrap();
        assert_ne!(c, b);
        assert_eq!(t.slots_where(|k| *k == 7), vec![c]);
    }

    #[test]
    fn a_slot_beyond_the_table_names_nothing() {
        let mut t: Table<u64, u32> = Table::default();
        let far = Slot::from_token(1 << 40 | 9, 1 << 40);
        assert_eq!(far.token(1 << 40), 1 << 40 | 9);
        assert_eq!(t.get(far), None);
        assert_eq!(t.get_mut(far), None);
        assert_eq!(t.key(far), None);
        assert_eq!(t.remove(far), None);
    }
}
