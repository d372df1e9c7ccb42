//! A small blocking etcd v3 client: ranges, transactions, watches and
//! leases, spoken as JSON to the gateway every etcd member serves beside
//! gRPC (`/v3/kv/range`, `/v3/kv/txn`, `/v3/watch`, ...). vsocketd and
//! vsocketctl need a handful of calls, synchronously, from ordinary
//! threads; this keeps them free of an async runtime and of generated
//! protobuf code. Keys and values are bytes (base64 on the wire), numbers
//! come as decimal strings.
//!
//! A [`Client`] holds the members' endpoints and tries them in turn: a
//! member that cannot be reached is skipped, one that answers is believed.

#![forbid(unsafe_code)]

pub mod base64;
pub mod fleet;
mod http;

pub use http::Endpoint;

use serde_json::{json, Value};
use std::fmt;
use std::io::{self, BufRead, BufReader};
use std::time::Duration;

/// The largest answer read (a range of the whole tenant model).
const MAX_BODY: u64 = 64 << 20;

/// Why a call failed.
#[derive(Debug)]
pub enum Error {
    /// No member answered: each one's error.
    Unreachable(Vec<String>),
    /// A member answered with an error.
    Refused { status: u16, message: String },
    /// The revision asked for is compacted away; the oldest there is.
    Compacted { compact_revision: i64 },
    /// The answer was not what the gateway sends.
    Malformed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unreachable(errors) => write!(f, "no etcd member answered ({})", errors.join("; ")),
            Error::Refused { status, message } => write!(f, "etcd refused the request ({status}): {message}"),
            Error::Compacted { compact_revision } => {
                write!(f, "the revision asked for is compacted (the oldest kept is {compact_revision})")
            }
            Error::Malformed(what) => write!(f, "etcd's answer was malformed: {what}"),
        }
    }
}

impl std::error::Error for Error {}

/// The store as an answer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Which cluster answered: another id is another store.
    pub cluster_id: u64,
    /// The store's revision when it answered.
    pub revision: i64,
}

/// A key and its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// Nonzero: the lease it is attached to.
    pub lease: i64,
}

/// One comparison of a transaction.
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key's last change was at `revision` (0: the key is absent).
    ModRevision { key: Vec<u8>, revision: i64 },
}

/// One operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Sets `key` to `value`, attached to `lease` (0: none).
    Put { key: Vec<u8>, value: Vec<u8>, lease: i64 },
    /// Deletes `key`.
    Delete { key: Vec<u8> },
    /// Deletes every key with `prefix`. etcd refuses a transaction whose
    /// operations touch one key twice (a delete of a prefix and a put
    /// under it).
    DeletePrefix { prefix: Vec<u8> },
}

/// One change a watch saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(Kv),
    Delete(Kv),
}

/// What a watch's next message said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// Changes, all of one revision or more, in order.
    Events { header: Header, events: Vec<Event> },
    /// The watch's start is compacted away: read everything again.
    Compacted { compact_revision: i64 },
    /// The store ended the watch.
    Canceled(String),
}

/// A watch over a prefix; [`Watch::next_message`] blocks for its next message.
pub struct Watch {
    lines: BufReader<io::Take<http::Body>>,
}

impl Watch {
    /// The next message: changes, or the watch's end. An error means the
    /// stream is gone (the member went away).
    pub fn next_message(&mut self) -> Result<Watched, Error> {
        loop {
            let mut line = String::new();
            match self.lines.read_line(&mut line) {
                Ok(0) => return Err(Error::Unreachable(vec!["the watch stream ended".into()])),
                Ok(_) => {}
                Err(e) => return Err(Error::Unreachable(vec![format!("the watch stream: {e}")])),
            }
            let message: Value =
                serde_json::from_str(line.trim()).map_err(|e| Error::Malformed(format!("a watch message: {e}")))?;
            if let Some(error) = message.get("error") {
                return Err(refused(200, error));
            }
            let result =
                message.get("result").ok_or_else(|| Error::Malformed("a watch message without a result".into()))?;
            let compacted = number(result.get("compact_revision"));
            if compacted > 0 {
                return Ok(Watched::Compacted { compact_revision: compacted });
            }
            if result.get("canceled").and_then(Value::as_bool).unwrap_or(false) {
                let why = result.get("cancel_reason").and_then(Value::as_str).unwrap_or("canceled").to_owned();
                return Ok(Watched::Canceled(why));
            }
            let events = match result.get("events").and_then(Value::as_array) {
                Some(events) => events,
                // The creation's acknowledgement, or a progress notice.
                None => continue,
            };
            let header = header(result)?;
            let events = events
                .iter()
                .map(|e| {
                    let kv = kv(e.get("kv").ok_or_else(|| Error::Malformed("an event without a kv".into()))?)?;
                    Ok(match e.get("type").and_then(Value::as_str) {
                        Some("DELETE") => Event::Delete(kv),
                        _ => Event::Put(kv),
                    })
                })
                .collect::<Result<Vec<Event>, Error>>()?;
            return Ok(Watched::Events { header, events });
        }
    }
}

/// The first key after every key with `prefix` (a range's end).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key: "\0" means "to the end" to etcd.
    vec![0]
}

/// A client of one etcd cluster.
#[derive(Debug, Clone)]
pub struct Client {
    endpoints: Vec<Endpoint>,
    timeout: Duration,
}

impl Client {
    /// A client of the members at `urls` (`http://HOST:PORT` each); each
    /// call waits at most `timeout` for a member.
    pub fn new(urls: &[String], timeout: Duration) -> Result<Client, String> {
        if urls.is_empty() {
            return Err("no etcd endpoint given".into());
        }
        let endpoints = urls.iter().map(|u| Endpoint::parse(u)).collect::<Result<Vec<_>, _>>()?;
        Ok(Client { endpoints, timeout })
    }

    /// The members' endpoints, as given.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// POSTs `body` to `path` on the first member that answers.
    fn call(&self, path: &str, body: &Value) -> Result<Value, Error> {
        let body = body.to_string();
        let mut errors = Vec::new();
        for endpoint in &self.endpoints {
            match http::post(endpoint, path, body.as_bytes(), self.timeout) {
                Ok(response) => {
                    let status = response.status;
                    let bytes = response.body.read_all(MAX_BODY).map_err(|e| Error::Malformed(e.to_string()))?;
                    let value: Value = serde_json::from_slice(&bytes)
                        .map_err(|e| Error::Malformed(format!("{} answered {status} with no JSON: {e}", endpoint)))?;
                    if status != 200 {
                        return Err(refused(status, &value));
                    }
                    return Ok(value);
                }
                Err(e) => errors.push(format!("{endpoint}: {e}")),
            }
        }
        Err(Error::Unreachable(errors))
    }

    /// Every key with `prefix`, as of `revision` (0: now).
    pub fn range_prefix(&self, prefix: &[u8], revision: i64) -> Result<(Header, Vec<Kv>), Error> {
        let mut request = json!({
            "key": base64::encode(prefix),
            "range_end": base64::encode(&prefix_end(prefix)),
        });
        if revision > 0 {
            request["revision"] = json!(revision.to_string());
        }
        let answer = self.call("/v3/kv/range", &request)?;
        let kvs = match answer.get("kvs").and_then(Value::as_array) {
            Some(kvs) => kvs.iter().map(kv).collect::<Result<Vec<Kv>, Error>>()?,
            None => Vec::new(),
        };
        Ok((header(&answer)?, kvs))
    }

    /// One key, now.
    pub fn get(&self, key: &[u8]) -> Result<(Header, Option<Kv>), Error> {
        let answer = self.call("/v3/kv/range", &json!({ "key": base64::encode(key) }))?;
        let found = match answer.get("kvs").and_then(Value::as_array).and_then(|kvs| kvs.first()) {
            Some(found) => Some(kv(found)?),
            None => None,
        };
        Ok((header(&answer)?, found))
    }

    /// Runs `success` if every comparison holds, atomically; says whether
    /// they held.
    pub fn txn(&self, compare: &[Compare], success: &[Op]) -> Result<(Header, bool), Error> {
        let compare: Vec<Value> = compare
            .iter()
            .map(|c| match c {
                Compare::ModRevision { key, revision } => json!({
                    "key": base64::encode(key),
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": revision.to_string(),
                }),
            })
            .collect();
        let success: Vec<Value> = success
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => json!({ "request_put": {
                    "key": base64::encode(key),
                    "value": base64::encode(value),
                    "lease": lease.to_string(),
                }}),
                Op::Delete { key } => json!({ "request_delete_range": { "key": base64::encode(key) }}),
                Op::DeletePrefix { prefix } => json!({ "request_delete_range": {
                    "key": base64::encode(prefix),
                    "range_end": base64::encode(&prefix_end(prefix)),
                }}),
            })
            .collect();
        let answer = self.call("/v3/kv/txn", &json!({ "compare": compare, "success": success }))?;
        let succeeded = answer.get("succeeded").and_then(Value::as_bool).unwrap_or(false);
        Ok((header(&answer)?, succeeded))
    }

    /// Sets `key` to `value` (attached to `lease`, 0 for none).
    pub fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<Header, Error> {
        let request = json!({
            "key": base64::encode(key),
            "value": base64::encode(value),
            "lease": lease.to_string(),
        });
        header(&self.call("/v3/kv/put", &request)?)
    }

    /// Watches every key with `prefix` from `start_revision` on; the
    /// stream waits for events without a timeout (the member's going ends
    /// it with an error).
    pub fn watch_prefix(&self, prefix: &[u8], start_revision: i64) -> Result<Watch, Error> {
        let request = json!({ "create_request": {
            "key": base64::encode(prefix),
            "range_end": base64::encode(&prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
            "progress_notify": true,
        }})
        .to_string();
        let mut errors = Vec::new();
        for endpoint in &self.endpoints {
            match http::post(endpoint, "/v3/watch", request.as_bytes(), self.timeout) {
                Ok(response) if response.status == 200 => {
                    // Progress notices come every ten minutes at most; a
                    // member that went silent longer is gone.
                    response
                        .body
                        .set_timeout(Some(Duration::from_secs(15 * 60)))
                        .map_err(|e| Error::Malformed(e.to_string()))?;
                    let lines = BufReader::new(io::Read::take(response.body, u64::MAX));
                    return Ok(Watch { lines });
                }
                Ok(response) => {
                    let status = response.status;
                    let body = response.body.read_all(MAX_BODY).unwrap_or_default();
                    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    return Err(refused(status, &value));
                }
                Err(e) => errors.push(format!("{endpoint}: {e}")),
            }
        }
        Err(Error::Unreachable(errors))
    }

    /// A lease of `ttl` seconds; its id.
    pub fn lease_grant(&self, ttl: i64) -> Result<i64, Error> {
        let answer = self.call("/v3/lease/grant", &json!({ "TTL": ttl.to_string() }))?;
        let id = number(answer.get("ID"));
        if id == 0 {
            return Err(Error::Malformed("a lease without an id".into()));
        }
        Ok(id)
    }

    /// Keeps lease `id` alive once; its remaining time to live (0: it had
    /// expired).
    pub fn lease_keep_alive(&self, id: i64) -> Result<i64, Error> {
        let answer = self.call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))?;
        let result = answer.get("result").unwrap_or(&answer);
        Ok(number(result.get("TTL")))
    }

    /// The answering member's view: its cluster and revision.
    pub fn status(&self) -> Result<Header, Error> {
        header(&self.call("/v3/maintenance/status", &json!({}))?)
    }
}

/// A gateway error message as an [`Error`].
fn refused(status: u16, value: &Value) -> Error {
    let message = value
        .get("message")
        .or_else(|| value.get("error"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| value.to_string());
    if message.contains("compacted") {
        return Error::Compacted { compact_revision: 0 };
    }
    Error::Refused { status, message }
}

/// An int64 as the gateway writes it (a decimal string), or 0.
fn number(value: Option<&Value>) -> i64 {
    match value {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn header(answer: &Value) -> Result<Header, Error> {
    let header = answer.get("header").ok_or_else(|| Error::Malformed("no header".into()))?;
    let cluster_id = match header.get("cluster_id") {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
        _ => 0,
    };
    Ok(Header { cluster_id, revision: number(header.get("revision")) })
}

fn kv(value: &Value) -> Result<Kv, Error> {
    let bytes = |field: &str| -> Result<Vec<u8>, Error> {
        match value.get(field).and_then(Value::as_str) {
            Some(text) => base64::decode(text).ok_or_else(|| Error::Malformed(format!("a {field} that is no base64"))),
            None => Ok(Vec::new()),
        }
    };
    Ok(Kv {
        key: bytes("key")?,
        value: bytes("value")?,
        mod_revision: number(value.get("mod_revision")),
        lease: number(value.get("lease")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_its_keys_do() {
        assert_eq!(prefix_end(b"/vsocket/"), b"/vsocket0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn gateway_messages_read_as_etcd_writes_them() {
        let answer = json!({"header": {"cluster_id": "14841639068965178418", "revision": "7"},
            "kvs": [{"key": "L3Zzb2NrZXQvYQ==", "mod_revision": "2", "value": "aGVsbG8="}]});
        assert_eq!(header(&answer).unwrap(), Header { cluster_id: 14841639068965178418, revision: 7 });
        let kv = kv(&answer["kvs"][0]).unwrap();
        assert_eq!((kv.key.as_slice(), kv.value.as_slice(), kv.mod_revision), (&b"/vsocket/a"[..], &b"hello"[..], 2));
        let compacted =
            json!({"error": {"grpc_code": 11, "message": "etcdserver: mvcc: required revision has been compacted"}});
        assert!(matches!(refused(200, &compacted["error"]), Error::Compacted { .. }));
        assert!(matches!(refused(400, &json!({"message": "bad"})), Error::Refused { status: 400, .. }));
    }
}
