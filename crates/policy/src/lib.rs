//! vSocket's tenant network model and policy: who may connect to whom.
//!
//! vsocketd carries TCP between guests over shared memory, so no kernel
//! firewall sees that traffic; this crate decides instead, on the trusted
//! host side, when each connection is set up. It is pure: nothing here does
//! I/O except [`config::load`] reading the config file.
//!
//! - [`cidr`]: [`Ipv4Cidr`], the address blocks of VPCs and rule peers.
//! - [`model`]: the validated [`Config`]: the host's settings, VPCs (private
//!   address spaces that may overlap), guests (a VPC, addresses in it and
//!   security groups) and security groups (stateful allow rules), linked by
//!   small ids.
//! - [`config`]: the TOML file format, and parsing it into a [`Config`] with
//!   errors that name the file, the field and the problem.
//! - [`edit`]: a [`Document`], the config's content as written, and the
//!   live [`Change`]s `vsocketctl` makes to it; each edited document is
//!   validated as a whole, exactly as a file would be.
//! - [`store`]: the tenant model as keys of a store (etcd), and a host's
//!   file put together with what the store holds.
//! - [`evaluate`](mod@evaluate): the evaluator, [`evaluate()`], which
//!   applies the cloud defaults (ingress denied unless allowed, egress allowed
//!   unless restricted) to a [`Flow`] and says which rule decided.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cidr;
pub mod config;
pub mod edit;
pub mod evaluate;
pub mod model;
pub mod store;

pub use cidr::Ipv4Cidr;
pub use config::{load, load_document, parse, parse_document, ConfigError, Document, RulePeerSpec};
pub use edit::{Change, ChangeError, GuestSpec, RuleSpec};
pub use evaluate::{evaluate, Decider, Flow, Verdict};
pub use model::{
    Config, DenyAction, Direction, FabricConfig, FabricHost, FabricKey, FabricKind, FlowLogConfig, GroupId, Guest,
    GuestId, HostConfig, KeyError, Peer, PolicyChangeAction, PortRange, Protocol, ProtocolFilter, Quotas, Rule,
    SecurityGroup, StoreConfig, VmGuest, Vpc, VpcId,
};
