//! Writing the tenant model into a store (etcd): `vsocketctl import`.
//!
//! A change is one transaction: the objects that differ are put, those
//! gone are deleted, and the generation marker is incremented, all only if
//! the generation is still what was read (see `vsocket_policy::store`).
//! Two writers at once: one wins, the other is told and writes nothing.

use std::fmt;
use vsocket_etcd::{Client, Compare, Op};
use vsocket_policy::store::{entries, Layout};
use vsocket_policy::Document;

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The generation the change made.
    pub generation: u64,
    /// Objects put (new or changed).
    pub put: usize,
    /// Objects deleted.
    pub deleted: usize,
}

/// Why a write failed; nothing was written.
#[derive(Debug)]
pub enum WriteError {
    /// The store could not be read or written.
    Store(vsocket_etcd::Error),
    /// Another change came first (generation `seen` was read, `now` is
    /// there).
    Conflict { seen: u64, now: String },
    /// The generation marker holds something that is no number.
    BadGeneration(String),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Store(e) => write!(f, "{e}; nothing written"),
            WriteError::Conflict { seen, now } => write!(
                f,
                "another change came first (generation {seen} was read, the store has {now}); nothing written: \
                 read it again and retry"
            ),
            WriteError::BadGeneration(text) => write!(f, "the store's generation marker holds {text:?}, not a number"),
        }
    }
}

impl std::error::Error for WriteError {}

impl From<vsocket_etcd::Error> for WriteError {
    fn from(e: vsocket_etcd::Error) -> WriteError {
        WriteError::Store(e)
    }
}

/// Makes the store's tenant model under `layout` the one `document` holds.
pub fn write_model(client: &Client, layout: &Layout, document: &Document) -> Result<Written, WriteError> {
    let prepared = prepare(client, layout, document)?;
    commit(client, layout, prepared)
}

/// A change read and worked out, not yet written.
#[derive(Debug)]
pub struct Prepared {
    ops: Vec<Op>,
    guard: Compare,
    seen: u64,
    put: usize,
    deleted: usize,
}

/// Reads the store and works out the change that makes its model
/// `document`'s.
pub fn prepare(client: &Client, layout: &Layout, document: &Document) -> Result<Prepared, WriteError> {
    let generation_key = layout.generation();
    let (_, marker) = client.get(generation_key.as_bytes())?;
    let (seen, marker_revision) = match &marker {
        Some(kv) => {
            let text = String::from_utf8_lossy(&kv.value).into_owned();
            (text.trim().parse::<u64>().map_err(|_| WriteError::BadGeneration(text))?, kv.mod_revision)
        }
        None => (0, 0),
    };
    // The model as of the marker's revision or later: the transaction's
    // compare makes sure nothing changed since.
    let (_, stored) = client.range_prefix(layout.prefix().as_bytes(), 0)?;
    let stored: std::collections::BTreeMap<String, Vec<u8>> = stored
        .into_iter()
        .filter_map(|kv| String::from_utf8(kv.key).ok().map(|k| (k, kv.value)))
        .filter(|(k, _)| layout.is_model(k))
        .collect();
    let wanted = entries(document, layout);
    let mut ops = Vec::new();
    let wanted_keys: std::collections::BTreeSet<&str> = wanted.iter().map(|(k, _)| k.as_str()).collect();
    for key in stored.keys().filter(|k| !wanted_keys.contains(k.as_str())) {
        ops.push(Op::Delete { key: key.as_bytes().to_vec() });
    }
    let deleted = ops.len();
    for (key, value) in &wanted {
        if stored.get(key) != Some(value) {
            ops.push(Op::Put { key: key.as_bytes().to_vec(), value: value.clone(), lease: 0 });
        }
    }
    let put = ops.len() - deleted;
    ops.push(Op::Put { key: generation_key.as_bytes().to_vec(), value: (seen + 1).to_string().into_bytes(), lease: 0 });
    let guard = Compare::ModRevision { key: generation_key.into_bytes(), revision: marker_revision };
    Ok(Prepared { ops, guard, seen, put, deleted })
}

/// Writes `prepared` if the store's generation is still the one it read.
pub fn commit(client: &Client, layout: &Layout, prepared: Prepared) -> Result<Written, WriteError> {
    let Prepared { ops, guard, seen, put, deleted } = prepared;
    let (_, won) = client.txn(&[guard], &ops)?;
    if !won {
        let now = match client.get(layout.generation().as_bytes())?.1 {
            Some(kv) => String::from_utf8_lossy(&kv.value).into_owned(),
            None => "none".into(),
        };
        return Err(WriteError::Conflict { seen, now });
    }
    Ok(Written { generation: seen + 1, put, deleted })
}
