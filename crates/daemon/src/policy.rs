//! The policy in force, and where it comes from.
//!
//! A [`Policy`] is one validated config with the guests' slots in it. The
//! daemon keeps the one in force behind an `ArcSwap`: a connect loads the
//! current one (no lock, never waits for a change) and decides with it; a
//! live change builds a whole new snapshot and swaps it in (see
//! [`crate::live`]).
//!
//! A [`PolicySource`] is where the policy is read from and where live
//! edits are kept: the config file today ([`FileSource`]); a cluster-wide
//! store is another implementation of the same seam.

use crate::guest::GuestSlot;
use crate::ids::SlotId;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vsocket_policy::{Config, ConfigError, Document, GuestId, Quotas};

/// The policy in force: a validated config and the guests' slots in it.
#[derive(Debug)]
pub struct Policy {
    pub config: Config,
    /// By `GuestId` index of `config`.
    slots: Vec<Arc<GuestSlot>>,
    ids: HashMap<SlotId, GuestId>,
}

impl Policy {
    /// A snapshot of `config`, whose guests have `slots` (in its order).
    pub fn new(config: Config, slots: Vec<Arc<GuestSlot>>) -> Policy {
        assert_eq!(slots.len(), config.guests().len(), "one slot per guest");
        let ids = config.guests().map(|(id, _)| (slots[id.index()].id, id)).collect();
        Policy { config, slots, ids }
    }

    /// The guest's id in this snapshot; none if it is not in it (removed).
    pub fn guest_id(&self, slot: &GuestSlot) -> Option<GuestId> {
        self.ids.get(&slot.id).copied()
    }

    /// The slot of guest `id` of this snapshot's config.
    pub fn slot(&self, id: GuestId) -> &Arc<GuestSlot> {
        &self.slots[id.index()]
    }

    /// The slot of the guest named `name`, if it is in this snapshot.
    pub fn slot_by_name(&self, name: &str) -> Option<&Arc<GuestSlot>> {
        self.config.guest_by_name(name).map(|id| self.slot(id))
    }

    /// The quotas of `slot`'s guest in this snapshot; for a guest no longer
    /// in it (removed), the `[host]` defaults.
    pub fn quotas(&self, slot: &GuestSlot) -> Quotas {
        match self.guest_id(slot) {
            Some(id) => self.config.guest(id).quotas,
            None => self.config.host().default_quotas,
        }
    }

    /// Every guest's slot, in config order.
    pub fn slots(&self) -> &[Arc<GuestSlot>] {
        &self.slots
    }
}

/// Where the policy in force comes from, and where live edits are kept.
/// Calls are put in order by the daemon (one change at a time).
pub trait PolicySource: Send + fmt::Debug {
    /// The source as errors name it (the config file's path).
    fn origin(&self) -> &Path;
    /// The policy in force as a document, with every live change made.
    fn document(&self) -> &Document;
    /// Reads the source again, whole and validated.
    fn read(&self) -> Result<(Document, Config), ConfigError>;
    /// Records that `document` is now in force.
    fn set_document(&mut self, document: Document);
    /// May the policy be edited here (`vsocketctl rule`, ...)? Not when
    /// it is a fleet's, kept elsewhere: an edit here would be this host's
    /// alone, and undone by the next change there.
    fn editable(&self) -> bool {
        true
    }
}

/// The config file: read at start and by `vsocketctl reload`; live edits
/// are kept in memory (the file is the operator's).
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    document: Document,
}

impl FileSource {
    /// The file at `path`, whose content in force is `document`.
    pub fn new(path: PathBuf, document: Document) -> FileSource {
        FileSource { path, document }
    }
}

impl PolicySource for FileSource {
    fn origin(&self) -> &Path {
        &self.path
    }
    fn document(&self) -> &Document {
        &self.document
    }
    fn read(&self) -> Result<(Document, Config), ConfigError> {
        vsocket_policy::load_document(&self.path)
    }
    fn set_document(&mut self, document: Document) {
        self.document = document;
    }
}
