//! The operator's end of the admin socket: a request out, its typed reply
//! back, on a connection of its own.

use crate::protocol::{decode_reply, encode, Request};
use crate::report::{Applied, ConnectionReport, GuestReport, ListenerReport, PeerStatus, StatusReport};
use serde::de::DeserializeOwned;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Asks the daemon listening on one admin socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
}

/// Why a request got no reply of the type asked for.
#[derive(Debug)]
pub enum ClientError {
    /// `{path}: {source} (is vsocketd running?)`
    Unreachable {
        /// The admin socket.
        path: PathBuf,
        /// What connecting, writing or reading said.
        source: io::Error,
    },
    /// `{path}: the daemon's reply is not what was asked for: {source}`
    Malformed {
        /// The admin socket.
        path: PathBuf,
        /// Why the reply did not decode.
        source: serde_json::Error,
    },
    /// `{0}`: the daemon's refusal, in its own words.
    Refused(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable { path, source } => write!(f, "{}: {source} (is vsocketd running?)", path.display()),
            Self::Malformed { path, source } => {
                write!(f, "{}: the daemon's reply is not what was asked for: {source}", path.display())
            }
            Self::Refused(reason) => f.write_str(reason),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Unreachable { source, .. } => Some(source),
            Self::Malformed { source, .. } => Some(source),
            Self::Refused(_) => None,
        }
    }
}

impl Client {
    /// A client of the daemon whose admin socket is `path` (see
    /// [`crate::admin_socket_path`]); it waits as long as the daemon takes.
    pub fn new(path: impl Into<PathBuf>) -> Client {
        Client { path: path.into(), timeout: None }
    }

    /// The same client, giving up on a reply after `timeout`.
    pub fn with_timeout(self, timeout: Duration) -> Client {
        Client { timeout: Some(timeout), ..self }
    }

    /// The admin socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `request` and reads its reply as `R`, the request's reply type
    /// (the typed methods below name it).
    pub fn call<R: DeserializeOwned>(&self, request: &Request) -> Result<R, ClientError> {
        let malformed = |source| ClientError::Malformed { path: self.path.clone(), source };
        let line = encode(request).map_err(malformed)?;
        let reply =
            self.exchange(&line).map_err(|source| ClientError::Unreachable { path: self.path.clone(), source })?;
        decode_reply(&reply).map_err(malformed)?.map_err(|refusal| ClientError::Refused(refusal.error))
    }

    fn exchange(&self, line: &str) -> io::Result<String> {
        let mut stream = UnixStream::connect(&self.path)?;
        stream.set_read_timeout(self.timeout)?;
        stream.set_write_timeout(self.timeout)?;
        writeln!(stream, "{line}")?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok(reply)
    }

    /// The host and its counters.
    pub fn status(&self) -> Result<StatusReport, ClientError> {
        self.call(&Request::Status)
    }

    /// Every guest.
    pub fn guests(&self) -> Result<Vec<GuestReport>, ClientError> {
        self.call(&Request::Guests)
    }

    /// Every vSocket listener.
    pub fn listeners(&self) -> Result<Vec<ListenerReport>, ClientError> {
        self.call(&Request::Listeners)
    }

    /// Every open connection.
    pub fn connections(&self) -> Result<Vec<ConnectionReport>, ClientError> {
        self.call(&Request::Connections)
    }

    /// The fabric's peer hosts.
    pub fn peers(&self) -> Result<Vec<PeerStatus>, ClientError> {
        self.call(&Request::Peers)
    }

    /// Applies a live edit; a refusal leaves the policy in force untouched.
    pub fn change(&self, change: vsocket_policy::Change) -> Result<Applied, ClientError> {
        self.call(&Request::Change { change: Box::new(change) })
    }

    /// Has the daemon read its config file again.
    pub fn reload(&self) -> Result<Applied, ClientError> {
        self.call(&Request::Reload)
    }
}
