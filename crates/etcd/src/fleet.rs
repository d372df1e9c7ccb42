//! The fleet's tenant model in etcd (layout in `vsocket_policy::store`):
//! read whole, written as one change, and the hosts' status; what vsocketd
//! and vsocketctl both do with the store.
//!
//! A reader takes the model as of the generation marker's revision, so it
//! never sees half a change ([`read_model`]); what it read is also what a
//! host keeps in its run directory ([`Seen::save`]). A change is one
//! transaction: the objects that differ are put, those gone are deleted,
//! and the generation marker is incremented, all only if the generation
//! is still what was read. Two writers at once: one wins, the other is
//! told and writes nothing.

use crate::{Client, Compare, Header, Op};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
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
    Store(crate::Error),
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

impl From<crate::Error> for WriteError {
    fn from(e: crate::Error) -> WriteError {
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

/// The file in a host's run directory that keeps the model in force there.
pub const SNAPSHOT_FILE: &str = "store-snapshot.json";

/// The store's model as one reader saw it: the generation marker, and
/// the objects (JSON text) as of the marker's revision. A host keeps the
/// one in force in its run directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// 0: the store holds no model (no marker).
    pub generation: u64,
    marker_revision: i64,
    /// The store's revision and cluster when it was read.
    pub revision: i64,
    pub cluster_id: u64,
    pub entries: BTreeMap<String, String>,
}

impl Seen {
    /// The objects as `vsocket_policy::store::assemble` takes them.
    pub fn entries(&self) -> Vec<(String, Vec<u8>)> {
        self.entries.iter().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect()
    }

    /// Keeps it in `path` (written aside, then renamed).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let aside = path.with_extension("new");
        std::fs::write(&aside, serde_json::to_vec(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&aside, path)
    }

    /// What [`save`](Self::save) kept in `path`, if it reads.
    pub fn load(path: &Path) -> Option<Seen> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

/// The generation marker now: the answer's header, the generation (0 if
/// there is none) and the marker's own revision (0 if absent).
pub fn read_generation(client: &Client, layout: &Layout) -> Result<(Header, u64, i64), WriteError> {
    let (header, marker) = client.get(layout.generation().as_bytes())?;
    match marker {
        Some(kv) => {
            let text = String::from_utf8_lossy(&kv.value).into_owned();
            let generation = text.trim().parse::<u64>().map_err(|_| WriteError::BadGeneration(text))?;
            Ok((header, generation, kv.mod_revision))
        }
        None => Ok((header, 0, 0)),
    }
}

/// Reads the store's model whole (as of the generation marker's revision).
pub fn read_model(client: &Client, layout: &Layout) -> Result<Seen, WriteError> {
    let (header, generation, marker_revision) = read_generation(client, layout)?;
    let prefix = layout.prefix().as_bytes();
    let (_, stored) = match client.range_prefix(prefix, marker_revision) {
        // The marker's revision is compacted away: nothing has changed
        // since while the marker is still at it (a change since would be
        // refused by its guard, or moved the marker), so read the latest.
        Err(crate::Error::Compacted { .. }) => client.range_prefix(prefix, 0)?,
        other => other?,
    };
    let entries = stored
        .into_iter()
        .filter_map(|kv| Some((String::from_utf8(kv.key).ok()?, String::from_utf8(kv.value).ok()?)))
        .filter(|(k, _)| layout.is_model(k))
        .collect();
    Ok(Seen { generation, marker_revision, revision: header.revision, cluster_id: header.cluster_id, entries })
}

/// Reads the store and works out the change that makes its model
/// `document`'s.
pub fn prepare(client: &Client, layout: &Layout, document: &Document) -> Result<Prepared, WriteError> {
    Ok(change_from(&read_model(client, layout)?, layout, document))
}

/// The change from what `seen` read to `document`, guarded by the
/// generation `seen` read: if another change came since, it is refused.
pub fn change_from(seen: &Seen, layout: &Layout, document: &Document) -> Prepared {
    let generation_key = layout.generation();
    let wanted = entries(document, layout);
    let mut ops = Vec::new();
    let wanted_keys: std::collections::BTreeSet<&str> = wanted.iter().map(|(k, _)| k.as_str()).collect();
    for key in seen.entries.keys().filter(|k| !wanted_keys.contains(k.as_str())) {
        ops.push(Op::Delete { key: key.as_bytes().to_vec() });
    }
    let deleted = ops.len();
    for (key, value) in &wanted {
        if seen.entries.get(key).map(String::as_bytes) != Some(value.as_slice()) {
            ops.push(Op::Put { key: key.as_bytes().to_vec(), value: value.clone(), lease: 0 });
        }
    }
    let put = ops.len() - deleted;
    let next = (seen.generation + 1).to_string().into_bytes();
    ops.push(Op::Put { key: generation_key.as_bytes().to_vec(), value: next, lease: 0 });
    let guard = Compare::ModRevision { key: generation_key.into_bytes(), revision: seen.marker_revision };
    Prepared { ops, guard, seen: seen.generation, put, deleted }
}

/// Makes `change` (a live edit, as `vsocketctl rule` and the rest make
/// them) to the store's model: read, edited and validated as a host
/// would (with `local`, the file of the host it is made from), and
/// written only if no other change came in between.
pub fn edit_model(
    client: &Client,
    layout: &Layout,
    local: &Document,
    change: &vsocket_policy::Change,
) -> Result<Written, EditError> {
    let seen = read_model(client, layout)?;
    let origin = std::path::PathBuf::from(format!("etcd {}", layout.prefix()));
    let (document, _) =
        vsocket_policy::store::assemble(local, &seen.entries(), layout, &origin).map_err(EditError::Stored)?;
    let (edited, _) = document.with_change(change, &origin).map_err(EditError::Change)?;
    Ok(commit(client, layout, change_from(&seen, layout, &edited))?)
}

/// Why an edit of the store's model failed; nothing was written.
#[derive(Debug)]
pub enum EditError {
    Write(WriteError),
    /// What the store holds does not validate.
    Stored(vsocket_policy::ConfigError),
    /// The edit leaves an invalid model.
    Change(vsocket_policy::ChangeError),
}

impl fmt::Display for EditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EditError::Write(e) => e.fmt(f),
            EditError::Stored(e) => write!(f, "{e}; nothing written"),
            EditError::Change(e) => write!(f, "{e}; nothing written"),
        }
    }
}

impl std::error::Error for EditError {}

impl From<WriteError> for EditError {
    fn from(e: WriteError) -> EditError {
        EditError::Write(e)
    }
}

impl From<crate::Error> for EditError {
    fn from(e: crate::Error) -> EditError {
        EditError::Write(WriteError::Store(e))
    }
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

/// A host of the fleet as the store shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostStatus {
    pub host: String,
    /// `up` while its daemon keeps its status key alive, else `down`.
    pub state: &'static str,
    /// The generation its daemon applied.
    pub generation: Option<u64>,
    pub version: Option<String>,
}

/// Every host the store knows (by its status key, its membership, its
/// fabric entry, or a guest placed on it), with its status; and the
/// store's generation.
pub fn hosts(client: &Client, layout: &Layout) -> Result<(u64, Vec<HostStatus>), crate::Error> {
    let (_, kvs) = client.range_prefix(layout.prefix().as_bytes(), 0)?;
    let mut generation = 0;
    let mut known = std::collections::BTreeMap::<String, HostStatus>::new();
    let down = |host: &str| HostStatus { host: host.to_owned(), state: "down", generation: None, version: None };
    let statuses = layout.statuses();
    for kv in kvs {
        let Ok(key) = String::from_utf8(kv.key) else { continue };
        let value: serde_json::Value = serde_json::from_slice(&kv.value).unwrap_or_default();
        if key == layout.generation() {
            generation = String::from_utf8_lossy(&kv.value).trim().parse().unwrap_or(0);
        } else if let Some(host) = key.strip_prefix(&statuses) {
            known.insert(
                host.to_owned(),
                HostStatus {
                    host: host.to_owned(),
                    state: "up",
                    generation: value["generation"].as_u64(),
                    version: value["version"].as_str().map(str::to_owned),
                },
            );
        } else if let Some(host) =
            key.strip_prefix(&format!("{}host/", layout.prefix())).or_else(|| key.strip_prefix(&layout.members()))
        {
            known.entry(host.to_owned()).or_insert_with(|| down(host));
        } else if key.starts_with(&format!("{}guest/", layout.prefix())) {
            if let Some(host) = value["host"].as_str() {
                known.entry(host.to_owned()).or_insert_with(|| down(host));
            }
        }
    }
    Ok((generation, known.into_values().collect()))
}

/// Waits, at most `limit`, until every host that is up reports
/// `generation` applied; the hosts that did not, if any.
pub fn wait_applied(
    client: &Client,
    layout: &Layout,
    generation: u64,
    limit: std::time::Duration,
) -> Result<Vec<String>, crate::Error> {
    let began = std::time::Instant::now();
    loop {
        let (_, hosts) = hosts(client, layout)?;
        let behind: Vec<String> = hosts
            .iter()
            .filter(|h| h.state == "up" && h.generation.is_none_or(|g| g < generation))
            .map(|h| h.host.clone())
            .collect();
        if behind.is_empty() || began.elapsed() >= limit {
            return Ok(behind);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
