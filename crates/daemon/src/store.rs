//! The policy from an etcd store (`[host.store]`): a fleet's tenant model,
//! which every host reads and watches (layout in `vsocket_policy::store`).
//!
//! [`StoreSource`] is the [`PolicySource`] seam's second implementation:
//! it reads this host's own file (its `[host]` and `[fabric]` settings)
//! and the store's model as of the generation marker's last revision, so
//! a change is seen whole or not at all. What it last applied is kept in
//! `run_dir` (`store-snapshot.json`): a daemon started while the store is
//! unreachable comes back with it.
//!
//! [`watch`] runs on a thread of its own: it watches the prefix from the
//! revision after the one read, and when the generation moves it reloads
//! (`live::reload`: read whole, apply the difference). When the watch is
//! lost, compacted away, or another cluster answers, it reads everything
//! again and applies it if the generation differs from the one applied;
//! while the store is unreachable the last policy stays in force.

use crate::daemon::Daemon;
pub use crate::health::StoreHealth;
use crate::policy::PolicySource;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vsocket_etcd::fleet::{read_generation, read_model, Seen, SNAPSHOT_FILE};
use vsocket_etcd::{Client, Watched};
use vsocket_policy::store::{assemble, Layout};
use vsocket_policy::{Config, ConfigError, Document, StoreConfig};

/// How long one call to the store may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the watcher waits before trying an unreachable store again.
const RETRY: Duration = Duration::from_secs(1);

/// The tenant model from etcd, with this host's own file.
pub struct StoreSource {
    file: PathBuf,
    origin: PathBuf,
    layout: Layout,
    client: Client,
    document: Document,
    snapshot_path: PathBuf,
    /// Read by the last `read`, persisted once it is in force.
    pending: Mutex<Option<Seen>>,
    pub health: Arc<StoreHealth>,
}

impl std::fmt::Debug for StoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSource").field("origin", &self.origin).finish()
    }
}

/// Why the store gave no policy at start.
#[derive(Debug)]
pub enum OpenError {
    /// What the store (or the snapshot) holds does not validate.
    Config(ConfigError),
    /// The store could not be read and no snapshot was kept.
    Unreachable { origin: PathBuf, error: String },
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Config(e) => e.fmt(f),
            OpenError::Unreachable { origin, error } => {
                write!(f, "{}: {error}, and no policy from it was kept in run_dir", origin.display())
            }
        }
    }
}

impl StoreSource {
    /// The store `store` names in this host's `file` (whose content is
    /// `local`): reads the model, or (unreachable) the snapshot kept in
    /// `run_dir`. Returns the source with the document and config to start
    /// with.
    pub fn open(
        file: &Path,
        local: Document,
        store: &StoreConfig,
        run_dir: &Path,
    ) -> Result<(StoreSource, Config), OpenError> {
        let client =
            Client::new(&store.endpoints, CALL_TIMEOUT).map_err(|e| OpenError::Config(read_error(file, &e)))?;
        let origin = store.origin();
        if let Err(e) = std::fs::create_dir_all(run_dir) {
            tracing::warn!(run_dir = %run_dir.display(), error = %e, "cannot make run_dir");
        }
        let mut source = StoreSource {
            file: file.to_owned(),
            origin,
            layout: Layout::new(&store.prefix),
            client,
            document: local,
            snapshot_path: run_dir.join(SNAPSHOT_FILE),
            pending: Mutex::new(None),
            health: Arc::new(StoreHealth::default()),
        };
        let snapshot = match source.read_store() {
            Ok(snapshot) => snapshot,
            Err(error) => match Seen::load(&source.snapshot_path) {
                Some(kept) => {
                    tracing::warn!(store = %source.origin.display(), %error, generation = kept.generation,
                            "the store is unreachable: starting with the policy last applied from it");
                    kept
                }
                None => return Err(OpenError::Unreachable { origin: source.origin.clone(), error }),
            },
        };
        let (document, config) = assemble(&source.document, &snapshot.entries(), &source.layout, &source.origin)
            .map_err(OpenError::Config)?;
        source.document = document;
        source.note_applied(&snapshot);
        source.persist(&snapshot);
        Ok((source, config))
    }

    /// The model as of the generation marker's last revision.
    fn read_store(&self) -> Result<Seen, String> {
        let seen = read_model(&self.client, &self.layout).map_err(|e| e.to_string())?;
        if seen.generation == 0 {
            return Err("the store holds no tenant model (vsocketctl import writes one)".into());
        }
        Ok(seen)
    }

    fn note_applied(&self, snapshot: &Seen) {
        self.health.generation.store(snapshot.generation, Ordering::Relaxed);
        self.health.revision.store(snapshot.revision, Ordering::Relaxed);
        self.health.cluster_id.store(snapshot.cluster_id, Ordering::Relaxed);
    }

    /// Keeps `snapshot` in run_dir.
    fn persist(&self, snapshot: &Seen) {
        if let Err(e) = snapshot.save(&self.snapshot_path) {
            tracing::warn!(path = %self.snapshot_path.display(), error = %e, "cannot keep the store's policy");
        }
    }
}

fn read_error(origin: &Path, error: &dyn std::fmt::Display) -> ConfigError {
    ConfigError::Read { file: origin.to_owned(), source: std::io::Error::other(error.to_string()) }
}

impl PolicySource for StoreSource {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn editable(&self) -> bool {
        false
    }

    fn document(&self) -> &Document {
        &self.document
    }

    fn read(&self) -> Result<(Document, Config), ConfigError> {
        let (local, _) = vsocket_policy::load_document(&self.file)?;
        let snapshot = self.read_store().map_err(|e| read_error(&self.origin, &e))?;
        let read = assemble(&local, &snapshot.entries(), &self.layout, &self.origin)?;
        *crate::sync::lock(&self.pending) = Some(snapshot);
        Ok(read)
    }

    fn set_document(&mut self, document: Document) {
        self.document = document;
        if let Some(snapshot) = crate::sync::lock(&self.pending).take() {
            self.note_applied(&snapshot);
            self.persist(&snapshot);
        }
    }
}

/// Reloads the policy from the store; logs what came of it. Returns
/// false if the store could not be read (worth trying again soon); a
/// policy that does not validate, or cannot change live, waits for the
/// next change.
fn reload(daemon: &Arc<Daemon>) -> bool {
    match crate::live::reload(daemon) {
        Ok(applied) => {
            tracing::info!(added = ?applied.guests_added, removed = ?applied.guests_removed,
                reset = applied.connections_reset, "policy from the store applied");
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "the store's policy was not applied");
            !matches!(e, crate::live::ChangeError::Source(ConfigError::Read { .. }))
        }
    }
}

/// Watches the store for changes and applies each whole; runs for ever.
pub fn watch(daemon: Arc<Daemon>, store: &StoreConfig, health: Arc<StoreHealth>) {
    let Ok(client) = Client::new(&store.endpoints, CALL_TIMEOUT) else { return };
    let layout = Layout::new(&store.prefix);
    let generation_key = layout.generation().into_bytes();
    loop {
        // Catch up first: a change missed while unwatched (or made before
        // this daemon read the store) is applied whole.
        let Ok((header, generation, _)) = read_generation(&client, &layout) else {
            health.connected.store(false, Ordering::Relaxed);
            std::thread::sleep(RETRY);
            continue;
        };
        let known_cluster = health.cluster_id.load(Ordering::Relaxed);
        let behind = generation != health.generation.load(Ordering::Relaxed)
            || (known_cluster != 0 && header.cluster_id != known_cluster);
        if behind && !reload(&daemon) {
            std::thread::sleep(RETRY);
            continue;
        }
        let from = health.revision.load(Ordering::Relaxed).max(header.revision) + 1;
        let mut stream = match client.watch_prefix(layout.prefix().as_bytes(), from) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch the store");
                health.connected.store(false, Ordering::Relaxed);
                std::thread::sleep(RETRY);
                continue;
            }
        };
        health.connected.store(true, Ordering::Relaxed);
        health.heard();
        loop {
            match stream.next_message() {
                Ok(Watched::Events { header, events }) => {
                    health.heard();
                    if header.cluster_id != health.cluster_id.load(Ordering::Relaxed) {
                        tracing::warn!("another etcd cluster answers: reading the store again");
                        break;
                    }
                    let moved = events.iter().any(|e| match e {
                        vsocket_etcd::Event::Put(kv) | vsocket_etcd::Event::Delete(kv) => kv.key == generation_key,
                    });
                    if moved && !reload(&daemon) {
                        // Read again from the top, after a pause.
                        std::thread::sleep(RETRY);
                        break;
                    }
                    health.revision.fetch_max(header.revision, Ordering::Relaxed);
                }
                Ok(Watched::Compacted { compact_revision }) => {
                    tracing::info!(compact_revision, "the store compacted past the watch: reading it again");
                    health.revision.store(0, Ordering::Relaxed);
                    break;
                }
                Ok(Watched::Canceled(why)) => {
                    tracing::warn!(%why, "the store ended the watch");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the store's watch was lost; keeping the policy in force");
                    break;
                }
            }
        }
        health.connected.store(false, Ordering::Relaxed);
    }
}

/// How long a host's status key outlives its last keep-alive: a host whose
/// daemon is gone shows as down after this.
pub const STATUS_TTL_S: i64 = 6;

/// Publishes this host's status (`PREFIX/status/HOST`: the generation it
/// applied and its version) on a lease it keeps alive, and again whenever
/// the generation moves; runs for ever. A lease lost (etcd unreachable
/// past its time) is granted anew.
pub fn publish_status(store: &StoreConfig, host: &str, health: Arc<StoreHealth>) {
    let Ok(client) = Client::new(&store.endpoints, CALL_TIMEOUT) else { return };
    let layout = Layout::new(&store.prefix);
    let key = layout.status(host);
    let mut member = false;
    let keep_alive_every = Duration::from_secs((STATUS_TTL_S / 3) as u64);
    let mut lease = 0;
    let mut published: Option<u64> = None;
    let mut kept = std::time::Instant::now();
    loop {
        if lease == 0 {
            match client.lease_grant(STATUS_TTL_S) {
                Ok(id) => {
                    lease = id;
                    published = None;
                    kept = std::time::Instant::now();
                    health.reachable.store(true, Ordering::Relaxed);
                }
                Err(_) => {
                    health.reachable.store(false, Ordering::Relaxed);
                    std::thread::sleep(RETRY);
                    continue;
                }
            }
        }
        if !member {
            member = client.put(layout.member(host).as_bytes(), b"{}", 0).is_ok();
        }
        let generation = health.generation.load(Ordering::Relaxed);
        if published != Some(generation) {
            let value = serde_json::json!({
                "host": host,
                "generation": generation,
                "version": env!("CARGO_PKG_VERSION"),
            });
            match client.put(key.as_bytes(), value.to_string().as_bytes(), lease) {
                Ok(_) => published = Some(generation),
                // Most likely the lease is gone: take a new one.
                Err(vsocket_etcd::Error::Refused { .. }) => lease = 0,
                Err(_) => {}
            }
        }
        if kept.elapsed() >= keep_alive_every {
            let answer = client.lease_keep_alive(lease);
            health.reachable.store(answer.is_ok(), Ordering::Relaxed);
            match answer {
                Ok(0) => lease = 0,
                Ok(_) => kept = std::time::Instant::now(),
                Err(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
