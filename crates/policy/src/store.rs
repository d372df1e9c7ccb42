//! The tenant model as keys of a store (etcd), laid out for watching.
//!
//! Under a prefix (default [`DEFAULT_PREFIX`]) each object of the
//! operator's intent is one key, its value the object as JSON (the same
//! fields as in the config file):
//!
//! | key | value |
//! |---|---|
//! | `PREFIX/vpc/NAME` | a `[[vpc]]` |
//! | `PREFIX/security_group/NAME` | a `[[security_group]]` with its rules |
//! | `PREFIX/guest/NAME` | a `[[guest]]`, with its placement (`host`) |
//! | `PREFIX/host/NAME` | a fabric host: `{"name", "address"}` |
//! | `PREFIX/generation` | the change's number, written last in every change |
//! | `PREFIX/status/HOST` | what host HOST applied (its own key, on a lease) |
//! | `PREFIX/member/HOST` | that host HOST has served from this store (kept) |
//!
//! A change is one etcd transaction that rewrites what differs and
//! increments the generation, guarded by the generation's revision (two
//! writers: one wins, the other is told). A reader takes the tenant model
//! as of the generation's last revision, so it never sees half a change.
//! What stays in each host's own file: `[host]` and the `[fabric]`
//! settings but its host list (the fabric key never enters the store).

use crate::config::{RawFabricHost, RawGuest, RawSecurityGroup, RawVpc};
use crate::{ConfigError, Document};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// Where the tenant model lives unless the config names another prefix.
pub const DEFAULT_PREFIX: &str = crate::StoreConfig::DEFAULT_PREFIX;

/// The keys of one tenant model in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

/// The kinds of objects, by their key's second part.
const KINDS: [&str; 4] = ["vpc", "security_group", "guest", "host"];

impl Layout {
    /// The layout under `prefix` (a `/` is added if it does not end with one).
    pub fn new(prefix: &str) -> Layout {
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Layout { prefix }
    }

    /// Every key of the model starts with this.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The generation marker's key.
    pub fn generation(&self) -> String {
        format!("{}generation", self.prefix)
    }

    /// Host `host`'s status key.
    pub fn status(&self, host: &str) -> String {
        format!("{}status/{host}", self.prefix)
    }

    /// The prefix of every host's status key.
    pub fn statuses(&self) -> String {
        format!("{}status/", self.prefix)
    }

    /// Host `host`'s membership key: written once, kept when the host goes,
    /// so that a host gone shows as down.
    pub fn member(&self, host: &str) -> String {
        format!("{}member/{host}", self.prefix)
    }

    /// The prefix of every membership key.
    pub fn members(&self) -> String {
        format!("{}member/", self.prefix)
    }

    /// The key of object `name` of `kind`.
    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}/{name}", self.prefix)
    }

    /// Is `key` one of the tenant model's objects (not the generation or a
    /// status)?
    pub fn is_model(&self, key: &str) -> bool {
        key.strip_prefix(&self.prefix)
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(kind, name)| KINDS.contains(&kind) && !name.is_empty())
    }
}

/// The tenant model of `document` as keys and JSON values, in key order.
pub fn entries(document: &Document, layout: &Layout) -> Vec<(String, Vec<u8>)> {
    let raw = &document.raw;
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    out.extend(raw.vpc.iter().map(|v| (layout.key("vpc", &v.name), json(v))));
    out.extend(raw.security_group.iter().map(|g| (layout.key("security_group", &g.name), json(g))));
    out.extend(raw.guest.iter().map(|g| (layout.key("guest", &g.name), json(g))));
    if let Some(fabric) = &raw.fabric {
        out.extend(fabric.host.iter().map(|h| (layout.key("host", &h.name), json(h))));
    }
    out.sort();
    out
}

/// An object as the store holds it.
fn json<T: Serialize>(object: &T) -> Vec<u8> {
    serde_json::to_vec(object).expect("the config's objects serialize")
}

/// `local` (a host's own file: its `[host]` and `[fabric]` settings) with
/// the tenant model the store's `entries` hold (keys and values, as read
/// at one revision; keys that are not the model's are ignored), validated
/// as a file is. `origin` names the store in errors; an object that does
/// not read names its key.
pub fn assemble(
    local: &Document,
    entries: &[(String, Vec<u8>)],
    layout: &Layout,
    origin: &Path,
) -> Result<(Document, crate::Config), ConfigError> {
    let mut raw = local.raw.clone();
    raw.vpc.clear();
    raw.security_group.clear();
    raw.guest.clear();
    let mut hosts = Vec::new();
    for (key, value) in entries {
        if !layout.is_model(key) {
            continue;
        }
        let rest = &key[layout.prefix.len()..];
        let (kind, name) = rest.split_once('/').expect("is_model checked");
        match kind {
            "vpc" => raw.vpc.push(object::<RawVpc>(key, name, value, origin, |v| &v.name)?),
            "security_group" => {
                raw.security_group.push(object::<RawSecurityGroup>(key, name, value, origin, |g| &g.name)?)
            }
            "guest" => raw.guest.push(object::<RawGuest>(key, name, value, origin, |g| &g.name)?),
            _ => hosts.push(object::<RawFabricHost>(key, name, value, origin, |h| &h.name)?),
        }
    }
    match (&mut raw.fabric, hosts.is_empty()) {
        (Some(fabric), _) => fabric.host = hosts,
        (None, true) => {}
        (None, false) => {
            return Err(ConfigError::Invalid {
                file: origin.to_owned(),
                field: "host".into(),
                problem: crate::config::Problem::Store(
                    "the store names fabric hosts, but this host's file has no [fabric]".into(),
                ),
            })
        }
    }
    let document = Document { raw };
    let config = document.validate(origin)?;
    Ok((document, config))
}

/// The object of type `T` stored at `key` as `value`, which must be named
/// `name` (the key's last part).
fn object<T: DeserializeOwned + Serialize>(
    key: &str,
    name: &str,
    value: &[u8],
    origin: &Path,
    name_of: impl Fn(&T) -> &String,
) -> Result<T, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        file: origin.to_owned(),
        field: key.to_owned(),
        problem: crate::config::Problem::Store(message),
    };
    let object: T = serde_json::from_slice(value).map_err(|e| invalid(format!("not a valid object: {e}")))?;
    if name_of(&object) != name {
        return Err(invalid(format!("names {:?}, not the key's {name:?}", name_of(&object))));
    }
    Ok(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = r#"
[host]
name = "h1"
[fabric]
kind = "tcp"
[[fabric.host]]
name = "h1"
address = "10.99.0.1:7470"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"
[[security_group]]
name = "web"
[[security_group.ingress]]
protocol = "tcp"
ports = "80"
cidr = "10.10.0.0/24"
[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]
security_groups = ["web"]
[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
host = "h1"
"#;

    fn doc(text: &str) -> Document {
        crate::parse_document(text, Path::new("h1.toml")).unwrap().0
    }

    #[test]
    fn a_document_goes_into_the_store_and_comes_back_the_same() {
        let layout = Layout::new("/vsocket");
        let document = doc(LOCAL);
        let stored = entries(&document, &layout);
        let keys: Vec<&str> = stored.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "/vsocket/guest/a",
                "/vsocket/guest/b",
                "/vsocket/host/h1",
                "/vsocket/security_group/web",
                "/vsocket/vpc/blue"
            ]
        );
        // A host whose file has only its own settings (and itself on the
        // fabric) gets the whole model back.
        let bare = doc(
            "[host]\nname = \"h1\"\n[fabric]\nkind = \"tcp\"\n[[fabric.host]]\nname = \"h1\"\naddress = \"10.99.0.9:1\"\n",
        );
        let (again, config) = assemble(&bare, &stored, &layout, Path::new("etcd")).unwrap();
        assert_eq!(entries(&again, &layout), stored);
        assert_eq!(config.guests().count(), 2);
        // Keys beside the model are not objects.
        let mut with_more = stored.clone();
        with_more.push((layout.generation(), b"7".to_vec()));
        with_more.push((layout.status("h1"), b"{}".to_vec()));
        assert!(assemble(&bare, &with_more, &layout, Path::new("etcd")).is_ok());
    }

    #[test]
    fn a_bad_object_names_its_key() {
        let layout = Layout::new(DEFAULT_PREFIX);
        let bare = doc("[host]\nname = \"h1\"\n");
        let bad = |entries: Vec<(&str, &str)>| {
            let entries: Vec<(String, Vec<u8>)> =
                entries.into_iter().map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec())).collect();
            assemble(&bare, &entries, &layout, Path::new("etcd http://127.0.0.1:2379")).unwrap_err().to_string()
        };
        let e = bad(vec![("/vsocket/vpc/blue", "{\"name\": \"blue\"}")]);
        assert!(
            e.starts_with("etcd http://127.0.0.1:2379: /vsocket/vpc/blue: not a valid object: missing field `cidr`"),
            "{e}"
        );
        let e = bad(vec![("/vsocket/vpc/blue", "{\"name\": \"red\", \"cidr\": \"10.0.0.0/8\"}")]);
        assert!(e.contains("/vsocket/vpc/blue: names \"red\", not the key's \"blue\""), "{e}");
        // Whole-model rules name the field, as for a file.
        let e = bad(vec![("/vsocket/guest/a", "{\"name\": \"a\", \"vpc\": \"nope\", \"addresses\": [\"10.0.0.1\"]}")]);
        assert!(e.contains("guest[0].vpc"), "{e}");
        let e = bad(vec![("/vsocket/host/h2", "{\"name\": \"h2\", \"address\": \"10.99.0.2:7470\"}")]);
        assert!(e.contains("has no [fabric]"), "{e}");
    }

    #[test]
    fn model_keys_are_told_from_the_rest() {
        let layout = Layout::new("/v/");
        assert!(layout.is_model("/v/guest/a"));
        for other in ["/v/generation", "/v/status/h1", "/v/guest/", "/v/other/x", "/w/guest/a"] {
            assert!(!layout.is_model(other), "{other}");
        }
    }
}
