//! The admin socket's messages: one JSON request per line from the
//! operator, one JSON reply per line from the daemon.
//!
//! A reply carries no tag saying which request it answers: the asker knows
//! what it asked and reads the reply as that request's type
//! ([`crate::Client`] does). Every message is written with its object keys
//! in sorted order ([`encode`]), as the socket has always carried them.

use crate::report::{Applied, ConnectionReport, GuestReport, ListenerReport, PeerStatus, StatusReport};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// The host and its counters: a [`StatusReport`].
    Status,
    /// Every guest: [`GuestReport`]s.
    Guests,
    /// Every vSocket listener: [`ListenerReport`]s.
    Listeners,
    /// Every open connection: [`ConnectionReport`]s.
    Connections,
    /// The fabric's peer hosts, state and traffic: [`PeerStatus`]es.
    Peers,
    /// A live edit: `{"command":"change","change":{"op":"add_rule",...}}`;
    /// [`Applied`] or a refusal.
    Change {
        /// The edit.
        change: Box<vsocket_policy::Change>,
    },
    /// Read the config file again and apply what differs; [`Applied`] or a
    /// refusal.
    Reload,
}

/// The daemon's answer to one request, as it goes on the wire (no tag: the
/// variant is the request's).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Status(StatusReport),
    Guests(Vec<GuestReport>),
    Listeners(Vec<ListenerReport>),
    Connections(Vec<ConnectionReport>),
    Peers(Vec<PeerStatus>),
    /// What a change or a reload did.
    Applied(Applied),
    /// The request was not understood, or the change was refused (the
    /// policy in force is then untouched).
    Refused(Refusal),
}

/// `{"error": "..."}`: why the daemon did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The reason, a sentence for the operator.
    pub error: String,
}

impl Reply {
    /// A refusal saying `error`.
    pub fn refused(error: impl Into<String>) -> Reply {
        Reply::Refused(Refusal { error: error.into() })
    }
}

/// `message` as one line of the socket (without its newline): JSON with
/// every object's keys sorted.
pub fn encode<T: Serialize>(message: &T) -> serde_json::Result<String> {
    // A `Value`'s objects keep their keys sorted: going through one writes
    // the same bytes whatever order a type declares its fields in.
    Ok(serde_json::to_value(message)?.to_string())
}

/// A reply line read as `R`, the type of the request's reply, or as the
/// daemon's refusal (`{"error": ...}`, which no reply type has).
pub fn decode_reply<R: DeserializeOwned>(line: &str) -> serde_json::Result<Result<R, Refusal>> {
    let reply: serde_json::Value = serde_json::from_str(line)?;
    if reply.get("error").is_some() {
        return Refusal::deserialize(reply).map(Err);
    }
    R::deserialize(reply).map(Ok)
}
