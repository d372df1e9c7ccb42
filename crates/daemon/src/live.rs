//! Live policy changes: `vsocketctl` edits (rules, memberships, guests) and
//! `vsocketctl reload`, applied without restarting the daemon.
//!
//! A change never edits the policy in force. It edits a copy of the policy's
//! [`Document`] (or reads the file again), validates the result as a whole
//! with the config file's rules, and only then:
//!
//! 1. makes the control sockets of guests that appear (a failure here still
//!    leaves the old policy in force);
//! 2. swaps in the new [`Policy`] snapshot: every connect from then on is
//!    decided by it;
//! 3. removes the guests that went: their control sockets and channels are
//!    shut down (a guest whose VPC, addresses or namespace changed is
//!    removed and added again, with a new slot);
//! 4. with `[host] on_policy_change = "reset"`, resets every established
//!    connection the new policy does not allow ([`Daemon::enforce`]); with
//!    `"keep"` (the default) established connections are left alone.
//!
//! The `source` lock puts changes in order; connects never take it.

use crate::attach::{self, namespace::NamespaceAttachment};
use crate::daemon::Daemon;
use crate::guest::GuestSlot;
use crate::policy::Policy;
use crate::sync::lock;
use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use vsocket_policy::{Change, Config, Document, HostConfig, PolicyChangeAction};

pub use vsocket_admin::Applied;

/// How errors of live edits name the document they were found in.
pub const LIVE_ORIGIN: &str = "the running config";

/// Which guests a change keeps, adds and removes, by name. A guest whose
/// VPC, addresses or namespace changed is in both `added` and `removed`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GuestDiff {
    pub kept: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

/// Compares the guests of the policy in force with those of `new`.
pub fn diff(old: &Policy, new: &Config) -> GuestDiff {
    let mut out = GuestDiff::default();
    for slot in old.slots() {
        match new.guest_by_name(&slot.name) {
            Some(id) if slot.is(new, id) => out.kept.push(slot.name.clone()),
            _ => out.removed.push(slot.name.clone()),
        }
    }
    for (id, guest) in new.guests() {
        if !old.slot_by_name(&guest.name).is_some_and(|slot| slot.is(new, id)) {
            out.added.push(guest.name.clone());
        }
    }
    out
}

/// `[host]` settings that differ between `old` and `new` and that only a
/// restart can change. `deny_action`, `on_policy_change` and the default
/// quotas (`default_max_*`: limits are read from the policy in force at
/// each connect and channel) change live.
pub fn restart_only_changes(old: &HostConfig, new: &HostConfig) -> Vec<&'static str> {
    let mut fields = Vec::new();
    let mut push_if = |differs: bool, field| {
        if differs {
            fields.push(field);
        }
    };
    push_if(old.name != new.name, "host.name");
    push_if(old.run_dir != new.run_dir, "host.run_dir");
    push_if(old.ring_size != new.ring_size, "host.ring_size");
    push_if(old.flow_log != new.flow_log, "host.flow_log");
    push_if(old.metrics != new.metrics, "host.metrics");
    // Settings added later are restart-only unless listed above as live.
    let live_only = HostConfig {
        deny_action: old.deny_action,
        on_policy_change: old.on_policy_change,
        default_quotas: old.default_quotas,
        ..new.clone()
    };
    if fields.is_empty() && live_only != *old {
        fields.push("host");
    }
    fields
}

/// Why a change was refused; the policy in force is untouched.
#[derive(Debug)]
pub enum ChangeError {
    /// The edit leaves an invalid policy.
    Edit(vsocket_policy::ChangeError),
    /// The source no longer reads as a valid policy.
    Source(vsocket_policy::ConfigError),
    /// These settings change only with a restart.
    RestartOnly(Vec<&'static str>),
    /// A new guest's attachment could not be made.
    Attachment { guest: String, error: std::io::Error },
    /// The policy is the fleet's, kept in this store: change it there.
    KeptElsewhere(String),
}

impl fmt::Display for ChangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChangeError::Edit(e) => write!(f, "{e}"),
            ChangeError::Source(e) => write!(f, "{e}"),
            ChangeError::RestartOnly(fields) => {
                write!(f, "{} cannot change while vsocketd runs (restart it)", fields.join(", "))
            }
            ChangeError::Attachment { guest, error } => write!(f, "guest \"{guest}\": {error}"),
            ChangeError::KeptElsewhere(origin) => {
                write!(f, "this host's policy comes from {origin}: change it there (vsocketctl import)")
            }
        }?;
        f.write_str("; nothing changed")
    }
}

impl std::error::Error for ChangeError {}

/// Makes `change` to the policy in force.
pub fn change(daemon: &Arc<Daemon>, change: &Change) -> Result<Applied, ChangeError> {
    let mut source = lock(&daemon.source);
    if !source.editable() {
        return Err(ChangeError::KeptElsewhere(source.origin().display().to_string()));
    }
    let (document, config) =
        source.document().with_change(change, Path::new(LIVE_ORIGIN)).map_err(ChangeError::Edit)?;
    let applied = apply(daemon, config)?;
    source.set_document(document);
    Ok(applied)
}

/// How the fabric of a new policy differs from the one in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FabricChange {
    None,
    /// Only other hosts joined, left or moved: the relay follows live.
    Hosts,
    /// A fabric came or went, or a setting or this host's own address
    /// changed: only a restart applies it.
    Restart,
}

/// How fabric `new` differs from `old` for host `this`.
pub fn fabric_change(
    old: Option<&vsocket_policy::FabricConfig>,
    new: Option<&vsocket_policy::FabricConfig>,
    this: &str,
) -> FabricChange {
    match (old, new) {
        (None, None) => FabricChange::None,
        (Some(old), Some(new)) if old == new => FabricChange::None,
        (Some(old), Some(new)) if old.same_but_peers(new, this) => FabricChange::Hosts,
        _ => FabricChange::Restart,
    }
}

/// Reads the policy's source again and applies what differs.
pub fn reload(daemon: &Arc<Daemon>) -> Result<Applied, ChangeError> {
    let mut source = lock(&daemon.source);
    let (document, config): (Document, Config) = source.read().map_err(ChangeError::Source)?;
    let applied = apply(daemon, config)?;
    source.set_document(document);
    Ok(applied)
}

/// Puts `config` in force (see the module docs). The caller holds `source`.
fn apply(daemon: &Arc<Daemon>, config: Config) -> Result<Applied, ChangeError> {
    let old = daemon.policy();
    let mut restart = restart_only_changes(old.config.host(), config.host());
    let fabric_change = fabric_change(old.config.fabric(), config.fabric(), &config.host().name);
    if fabric_change == FabricChange::Restart {
        restart.push("fabric");
    }
    // A VM guest's attachment (its vsock backend and region) is made at
    // start only.
    let vms = |config: &vsocket_policy::Config| -> Vec<(String, vsocket_policy::VmGuest)> {
        config.guests().filter_map(|(_, g)| g.vm.map(|vm| (g.name.clone(), vm))).collect()
    };
    if vms(&old.config) != vms(&config) {
        restart.push("guest.vm");
    }
    if !restart.is_empty() {
        return Err(ChangeError::RestartOnly(restart));
    }
    let diff = diff(&old, &config);
    let run_dir = config.host().run_dir.clone();

    // Sockets of guests with new names are made before anything changes; a
    // replaced guest's (same name, so same path) once the old one is gone.
    let mut sockets: Vec<(Arc<GuestSlot>, Option<NamespaceAttachment>)> = Vec::new();
    let mut slots = Vec::with_capacity(config.guests().len());
    for (id, guest) in config.guests() {
        let kept = old.slot_by_name(&guest.name);
        if let Some(slot) = kept.filter(|slot| slot.is(&config, id)) {
            slots.push(slot.clone());
            continue;
        }
        let slot = Arc::new(GuestSlot::new(daemon.ids.slot(), &config, id));
        let socket = match kept {
            Some(_) => None,
            None if !slot.local => None,
            None => match NamespaceAttachment::open(&run_dir, &slot) {
                Ok(socket) => Some(socket),
                Err(e) => {
                    for (made, _) in &sockets {
                        let _ = std::fs::remove_file(crate::guest_socket_path(&run_dir, &made.name));
                    }
                    return Err(ChangeError::Attachment { guest: guest.name.clone(), error: e });
                }
            },
        };
        sockets.push((slot.clone(), socket));
        slots.push(slot);
    }
    // Hosts that joined are known to the relay before a connect can
    // decide to reach them.
    if let (FabricChange::Hosts, Some(fabric), Some(relay)) = (fabric_change, config.fabric(), daemon.fabric.get()) {
        relay.set_hosts(fabric, &config.host().name);
    }
    let policy = Policy::new(config, slots);
    let action = policy.config.host().on_policy_change;
    let removed: Vec<Arc<GuestSlot>> =
        old.slots().iter().filter(|slot| policy.guest_id(slot).is_none()).cloned().collect();
    drop(old);
    daemon.publish(policy);
    daemon.policy_changes.fetch_add(1, Ordering::Relaxed);
    // Connections made ahead for a flow the new policy denies are never
    // taken (ARCHITECTURE §3b), whatever `on_policy_change` does to those
    // already taken.
    crate::kits::enforce(daemon, &daemon.policy());

    for slot in &removed {
        slot.remove();
        let _ = std::fs::remove_file(crate::guest_socket_path(&run_dir, &slot.name));
        tracing::info!(guest = %slot.name, "guest removed");
    }
    let mut errors = Vec::new();
    for (slot, socket) in sockets {
        if !slot.local {
            tracing::info!(guest = %slot.name, host = %slot.host, "guest added on another host");
            continue;
        }
        let served = match socket {
            Some(socket) => attach::serve(daemon, &slot, socket),
            None => NamespaceAttachment::open(&run_dir, &slot).and_then(|socket| attach::serve(daemon, &slot, socket)),
        };
        match served {
            Ok(()) => tracing::info!(guest = %slot.name, "guest added"),
            Err(e) => {
                tracing::error!(guest = %slot.name, error = %e, "cannot serve the guest's control socket");
                errors.push(format!("guest \"{}\": {e}", slot.name));
            }
        }
    }
    let connections_reset = match action {
        PolicyChangeAction::Keep => 0,
        PolicyChangeAction::Reset => daemon.enforce(&daemon.policy()),
    };
    tracing::info!(added = ?diff.added, removed = ?diff.removed, %action, connections_reset, "policy changed");
    Ok(Applied {
        guests_added: diff.added,
        guests_removed: diff.removed,
        on_policy_change: action,
        connections_reset,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[host]
name = "h"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"
[[security_group]]
name = "web"
[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]
[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["web"]
"#;

    fn config(text: &str) -> Config {
        vsocket_policy::parse(text, Path::new("t.toml")).unwrap()
    }

    fn policy(text: &str) -> Policy {
        let config = config(text);
        let slots = config
            .guests()
            .map(|(id, _)| Arc::new(GuestSlot::new(crate::ids::SlotId(id.index() as u64 + 1), &config, id)))
            .collect();
        Policy::new(config, slots)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn membership_changes_keep_the_guest() {
        let old = policy(BASE);
        let new = config(&BASE.replace("security_groups = [\"web\"]", ""));
        assert_eq!(diff(&old, &new), GuestDiff { kept: names(&["a", "b"]), ..Default::default() });
    }

    #[test]
    fn guests_added_removed_and_replaced() {
        let old = policy(BASE);
        let text = BASE.replace("addresses = [\"10.10.0.2\"]", "addresses = [\"10.10.0.9\"]").replace(
            "name = \"b\"\nvpc = \"blue\"\naddresses = [\"10.10.0.3\"]",
            "name = \"c\"\nvpc = \"blue\"\naddresses = [\"10.10.0.4\"]",
        );
        let new = config(&text);
        // a's address changed: it is replaced (a new slot), b went, c came.
        assert_eq!(
            diff(&old, &new),
            GuestDiff { kept: vec![], added: names(&["a", "c"]), removed: names(&["a", "b"]) }
        );
        let netns = config(&BASE.replace("name = \"a\"", "name = \"a\"\nnetns = \"other\""));
        assert_eq!(diff(&old, &netns).removed, names(&["a"]));
    }

    #[test]
    fn slots_map_to_the_ids_of_their_own_snapshot() {
        let old = policy(BASE);
        let b = old.slot_by_name("b").unwrap().clone();
        // Remove a: b's index moves from 1 to 0, its slot stays.
        let without_a =
            config(&BASE.replacen("[[guest]]\nname = \"a\"\nvpc = \"blue\"\naddresses = [\"10.10.0.2\"]\n", "", 1));
        let new = Policy::new(without_a, vec![b.clone()]);
        assert_eq!(new.guest_id(&b).map(|id| id.index()), Some(0));
        assert_eq!(new.guest_id(old.slot_by_name("a").unwrap()), None);
        assert_eq!(old.guest_id(&b).map(|id| id.index()), Some(1));
    }

    #[test]
    fn only_deny_action_on_policy_change_and_default_quotas_change_live() {
        let old = config(BASE);
        let live = config(&BASE.replace(
            "name = \"h\"",
            "name = \"h\"\ndeny_action = \"reject\"\non_policy_change = \"reset\"\ndefault_max_connections = 3\n\
             default_max_shared_memory = \"64MiB\"\ndefault_max_channels = 5",
        ));
        assert_eq!(live.host().default_quotas.max_connections, 3);
        assert!(restart_only_changes(old.host(), live.host()).is_empty());
        let restart = config(&BASE.replace("name = \"h\"", "name = \"h\"\nring_size = 4096\nrun_dir = \"/tmp/x\""));
        assert_eq!(restart_only_changes(old.host(), restart.host()), ["host.run_dir", "host.ring_size"]);
    }

    #[test]
    fn other_hosts_joining_leaving_or_moving_change_the_fabric_live() {
        let with = |hosts: &[(&str, &str)], extra: &str| {
            let mut text = format!("[host]\nname = \"h1\"\n[fabric]\nkind = \"tcp\"\n{extra}");
            for (name, address) in hosts {
                text.push_str(&format!("[[fabric.host]]\nname = \"{name}\"\naddress = \"{address}\"\n"));
            }
            config(&text)
        };
        let change = |old: &Config, new: &Config| fabric_change(old.fabric(), new.fabric(), "h1");
        let two = with(&[("h1", "10.99.0.1:7470"), ("h2", "10.99.0.2:7470")], "");
        let three = with(&[("h1", "10.99.0.1:7470"), ("h2", "10.99.0.2:7470"), ("h3", "10.99.0.3:7470")], "");
        let alone = with(&[("h1", "10.99.0.1:7470")], "");
        let h2_moved = with(&[("h1", "10.99.0.1:7470"), ("h2", "10.99.0.9:7470")], "");
        assert_eq!(change(&two, &two), FabricChange::None);
        assert_eq!(change(&two, &three), FabricChange::Hosts, "h3 joins");
        assert_eq!(change(&three, &alone), FabricChange::Hosts, "h2 and h3 leave");
        assert_eq!(change(&two, &h2_moved), FabricChange::Hosts, "h2 moves");
        let me_moved = with(&[("h1", "10.99.0.7:7470"), ("h2", "10.99.0.2:7470")], "");
        assert_eq!(change(&two, &me_moved), FabricChange::Restart, "this host's own address");
        let no_polling = with(&[("h1", "10.99.0.1:7470"), ("h2", "10.99.0.2:7470")], "busy_poll_us = 0\n");
        assert_eq!(change(&two, &no_polling), FabricChange::Restart, "a setting");
        assert_eq!(fabric_change(None, two.fabric(), "h1"), FabricChange::Restart, "a fabric comes");
        assert_eq!(fabric_change(two.fabric(), None, "h1"), FabricChange::Restart, "the fabric goes");
        assert_eq!(fabric_change(None, None, "h1"), FabricChange::None);
    }

    #[test]
    fn a_guest_added_as_json_takes_its_quotas() {
        // The admin socket's JSON gives numbers as u64; sizes may be either.
        let change: vsocket_policy::Change = serde_json::from_str(
            r#"{"op":"add_guest","guest":{"name":"c","vpc":"blue","addresses":["10.10.0.4"],
                "max_connections":5,"max_shared_memory":1048576,"max_channels":2}}"#,
        )
        .unwrap();
        let (document, _) = vsocket_policy::parse_document(BASE, Path::new("t.toml")).unwrap();
        let (_, config) = document.with_change(&change, Path::new(LIVE_ORIGIN)).unwrap();
        let c = config.guest(config.guest_by_name("c").unwrap());
        assert_eq!((c.quotas.max_connections, c.quotas.max_shared_memory, c.quotas.max_channels), (5, 1 << 20, 2));
    }
}
