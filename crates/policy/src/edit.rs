//! Live changes: the config's content as written, edited by `vsocketctl`.
//!
//! A [`Document`] holds what a config file says, before validation. A
//! [`Change`] edits it (adds or removes a security-group rule, a guest's
//! membership of a group, or a guest); the edited document is then
//! validated as a whole by [`Document::validate`], with the very rules and
//! messages a file gets, so a change can never produce a `Config` a file
//! could not. Fields are named by their place in the edited document: a
//! rule added to group "web" that already has two ingress rules is
//! `security_group "web".ingress[2]`, a new guest is the last `guest[N]`.
//!
//! Applying a change never touches the running policy: the caller swaps in
//! the new `Config` only if validation succeeds.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{
    ConfigError, Document, RawFabricHost, RawGuest, RawRule, RawSecurityGroup, RulePeerSpec, Validator,
};
use crate::model::{Config, Direction, ProtocolFilter};

/// A security-group rule as the file writes it (`protocol`, `ports`, and one
/// of `cidr` or `group`), (de)serialized with the same field names.
#[derive(Clone, Deserialize, Serialize)]
#[serde(transparent)]
pub struct RuleSpec(RawRule);

impl RuleSpec {
    /// A rule as a command line gives it: `ports` as written (`"80"`,
    /// `"1000-2000"`, `"all"`; `None` for all), validated with the edit.
    pub fn new(protocol: ProtocolFilter, ports: Option<String>, peer: RulePeerSpec) -> RuleSpec {
        RuleSpec(RawRule::new(protocol, ports, peer))
    }
}

/// A `[[guest]]` table as the file writes it (`name`, `vpc`, `addresses`,
/// `security_groups`, `netns`), (de)serialized with the same field names.
#[derive(Clone, Deserialize, Serialize)]
#[serde(transparent)]
pub struct GuestSpec(RawGuest);

impl GuestSpec {
    /// A guest with its VPC, addresses (as written) and security groups;
    /// everything else defaults as in a file.
    pub fn new(name: String, vpc: String, addresses: Vec<String>, security_groups: Vec<String>) -> GuestSpec {
        GuestSpec(RawGuest::new(name, vpc, addresses, security_groups))
    }

    /// Its network namespace (default `vs-NAME`).
    pub fn with_netns(mut self, netns: String) -> GuestSpec {
        self.0.netns = Some(netns);
        self
    }

    /// The host it runs on (default: this host), one of the fabric's.
    pub fn with_host(mut self, host: String) -> GuestSpec {
        self.0.host = Some(host);
        self
    }

    /// Its quota of live connections.
    pub fn with_max_connections(mut self, connections: i64) -> GuestSpec {
        self.0.max_connections = Some(connections);
        self
    }

    /// Its quota of shared memory, as text: digits are bytes, as in the
    /// file; anything else is a size like `"64MiB"`.
    pub fn with_max_shared_memory(mut self, size: &str) -> GuestSpec {
        self.0.set_max_shared_memory(size);
        self
    }

    /// Its quota of control channels.
    pub fn with_max_channels(mut self, channels: i64) -> GuestSpec {
        self.0.max_channels = Some(channels);
        self
    }
}

impl fmt::Debug for RuleSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RuleSpec")
    }
}

impl fmt::Debug for GuestSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("GuestSpec").field(&self.0.name).finish()
    }
}

/// One live edit of the policy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// Appends a rule to a security group's ingress or egress rules.
    AddRule {
        /// The security group's name.
        group: String,
        /// Ingress or egress.
        direction: Direction,
        /// The rule.
        rule: RuleSpec,
    },
    /// Removes the first of a group's rules that equals `rule` once
    /// validated (so `ports = 80` and `ports = "80"` are the same rule).
    RemoveRule {
        /// The security group's name.
        group: String,
        /// Ingress or egress.
        direction: Direction,
        /// The rule.
        rule: RuleSpec,
    },
    /// Makes a guest a member of a security group (listed last).
    AddMembership {
        /// The guest's name.
        guest: String,
        /// The security group's name.
        group: String,
    },
    /// Ends a guest's membership of a security group.
    RemoveMembership {
        /// The guest's name.
        guest: String,
        /// The security group's name.
        group: String,
    },
    /// Adds a guest (listed last).
    AddGuest {
        /// The guest's table.
        guest: GuestSpec,
    },
    /// Removes a guest.
    RemoveGuest {
        /// The guest's name.
        name: String,
    },
    /// Adds a host to the fabric (listed last): the other hosts link with
    /// it without restarting.
    AddHost {
        /// Its `host.name`.
        name: String,
        /// Where its daemon takes fabric links, `IP:PORT`.
        address: String,
    },
    /// Removes a host from the fabric: its links and the connections over
    /// them end. Guests placed on it must go first.
    RemoveHost {
        /// Its `host.name`.
        name: String,
    },
}

/// Why a change was not made.
#[derive(Debug)]
pub enum ChangeError {
    /// The edited config breaks a rule of the model: the same error a file
    /// with that content gets.
    Invalid(ConfigError),
    /// `no security group "{0}"`
    UnknownGroup(String),
    /// `no guest "{0}"`
    UnknownGuest(String),
    /// `security group "{group}" has no such {direction} rule`
    NoSuchRule {
        /// The group searched.
        group: String,
        /// Its rules searched.
        direction: Direction,
    },
    /// `no fabric: the config has no [fabric] table`
    NoFabric,
    /// `no fabric host "{0}"`
    UnknownHost(String),
    /// `guest "{guest}" is not a member of security group "{group}"`
    NotMember {
        /// The guest.
        guest: String,
        /// The group.
        group: String,
    },
}

impl fmt::Display for ChangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(err) => err.fmt(f),
            Self::UnknownGroup(name) => write!(f, "no security group \"{name}\""),
            Self::UnknownGuest(name) => write!(f, "no guest \"{name}\""),
            Self::NoFabric => f.write_str("no fabric: the config has no [fabric] table"),
            Self::UnknownHost(name) => write!(f, "no fabric host \"{name}\""),
            Self::NoSuchRule { group, direction } => {
                write!(f, "security group \"{group}\" has no such {direction} rule")
            }
            Self::NotMember { guest, group } => {
                write!(f, "guest \"{guest}\" is not a member of security group \"{group}\"")
            }
        }
    }
}

impl std::error::Error for ChangeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Its message is this error's message.
            Self::Invalid(err) => err.source(),
            _ => None,
        }
    }
}

impl From<ConfigError> for ChangeError {
    fn from(err: ConfigError) -> Self {
        Self::Invalid(err)
    }
}

impl Document {
    /// The document with `change` made, and its validated config. `self`
    /// is left as it was, whatever the outcome; `origin` names the edited
    /// document in errors.
    pub fn with_change(&self, change: &Change, origin: &Path) -> Result<(Document, Config), ChangeError> {
        let mut edited = self.clone();
        edited.apply(change, origin)?;
        let config = edited.validate(origin)?;
        Ok((edited, config))
    }

    fn apply(&mut self, change: &Change, origin: &Path) -> Result<(), ChangeError> {
        match change {
            Change::AddRule { group, direction, rule } => {
                rules_mut(self.group_mut(group)?, *direction).push(rule.0.clone());
            }
            Change::RemoveRule { group, direction, rule } => {
                let index = self.find_rule(group, *direction, rule, origin)?;
                rules_mut(self.group_mut(group)?, *direction).remove(index);
            }
            Change::AddMembership { guest, group } => {
                self.guest_mut(guest)?.security_groups.push(group.clone());
            }
            Change::RemoveMembership { guest, group } => {
                let g = self.guest_mut(guest)?;
                let before = g.security_groups.len();
                g.security_groups.retain(|name| name != group);
                if g.security_groups.len() == before {
                    return Err(ChangeError::NotMember { guest: guest.clone(), group: group.clone() });
                }
            }
            Change::AddGuest { guest } => self.raw.guest.push(guest.0.clone()),
            Change::RemoveGuest { name } => {
                let before = self.raw.guest.len();
                self.raw.guest.retain(|g| g.name != *name);
                if self.raw.guest.len() == before {
                    return Err(ChangeError::UnknownGuest(name.clone()));
                }
            }
            Change::AddHost { name, address } => {
                let fabric = self.raw.fabric.as_mut().ok_or(ChangeError::NoFabric)?;
                fabric.host.push(RawFabricHost { name: name.clone(), address: address.clone() });
            }
            Change::RemoveHost { name } => {
                let fabric = self.raw.fabric.as_mut().ok_or(ChangeError::NoFabric)?;
                let before = fabric.host.len();
                fabric.host.retain(|h| h.name != *name);
                if fabric.host.len() == before {
                    return Err(ChangeError::UnknownHost(name.clone()));
                }
            }
        }
        Ok(())
    }

    fn group_mut(&mut self, name: &str) -> Result<&mut RawSecurityGroup, ChangeError> {
        self.raw
            .security_group
            .iter_mut()
            .find(|g| g.name == name)
            .ok_or_else(|| ChangeError::UnknownGroup(name.to_owned()))
    }

    fn guest_mut(&mut self, name: &str) -> Result<&mut RawGuest, ChangeError> {
        self.raw.guest.iter_mut().find(|g| g.name == name).ok_or_else(|| ChangeError::UnknownGuest(name.to_owned()))
    }

    /// Where `rule`, validated as the file would validate it, is among the
    /// group's rules. Rules compare by meaning, not spelling.
    fn find_rule(
        &self,
        group: &str,
        direction: Direction,
        rule: &RuleSpec,
        origin: &Path,
    ) -> Result<usize, ChangeError> {
        let config = self.validate(origin)?;
        let group_id =
            config.security_group_by_name(group).ok_or_else(|| ChangeError::UnknownGroup(group.to_owned()))?;
        let ids_by_name = config.security_groups().map(|(id, g)| (g.name.clone(), id)).collect();
        let field = format!("security_group \"{group}\".{direction}[-]");
        let wanted = Validator { file: origin }.rule(&field, rule.0.clone(), &ids_by_name)?;
        config
            .security_group(group_id)
            .rules(direction)
            .iter()
            .position(|r| *r == wanted)
            .ok_or(ChangeError::NoSuchRule { group: group.to_owned(), direction })
    }
}

fn rules_mut(group: &mut RawSecurityGroup, direction: Direction) -> &mut Vec<RawRule> {
    match direction {
        Direction::Ingress => &mut group.ingress,
        Direction::Egress => &mut group.egress,
    }
}
