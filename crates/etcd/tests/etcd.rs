//! The client against a real etcd (Debian's etcd-server, on loopback):
//! ranges at a revision, transactions that lose, watches across changes
//! and compaction, leases.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vsocket_etcd::{Client, Compare, Event, Op, Watched};

/// One etcd member in a directory of its own, killed when dropped.
struct Etcd {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn etcd(name: &str) -> Etcd {
    let dir = std::env::temp_dir().join(format!("vsocket-etcd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let child = Command::new("etcd")
        .arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("{name}=http://127.0.0.1:{peer}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
        .spawn()
        .expect("etcd (Debian's etcd-server) runs");
    let etcd = Etcd { child, dir, url };
    let client = Client::new(std::slice::from_ref(&etcd.url), Duration::from_secs(2)).unwrap();
    let began = Instant::now();
    while client.status().is_err() {
        assert!(began.elapsed() < Duration::from_secs(20), "etcd did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    etcd
}

#[test]
fn ranges_transactions_and_watches_against_a_real_etcd() {
    let etcd = etcd("kv");
    let client = Client::new(&["http://127.0.0.1:1".into(), etcd.url.clone()], Duration::from_secs(2)).unwrap();
    // The first endpoint answers nothing: the second is used.
    let first = client.put(b"/t/a", b"1", 0).unwrap();
    client.put(b"/t/b", b"2", 0).unwrap();
    client.put(b"/u/c", b"3", 0).unwrap();
    let (header, kvs) = client.range_prefix(b"/t/", 0).unwrap();
    assert_eq!(
        kvs.iter().map(|kv| (kv.key.as_slice(), kv.value.as_slice())).collect::<Vec<_>>(),
        [(&b"/t/a"[..], &b"1"[..]), (&b"/t/b"[..], &b"2"[..])]
    );
    assert_eq!(header.cluster_id, first.cluster_id);
    // As of the first put's revision, only that key was there.
    let (_, then) = client.range_prefix(b"/t/", first.revision).unwrap();
    assert_eq!(then.len(), 1);

    // A transaction on a stale revision loses and changes nothing; on the
    // current one it wins, whole.
    let (_, a) = client.get(b"/t/a").unwrap();
    let a = a.unwrap();
    let ops = [
        Op::Delete { key: b"/t/a".to_vec() },
        Op::Delete { key: b"/t/b".to_vec() },
        Op::Put { key: b"/t/z".to_vec(), value: b"9".to_vec(), lease: 0 },
    ];
    let stale = [Compare::ModRevision { key: b"/t/a".to_vec(), revision: a.mod_revision - 1 }];
    assert!(!client.txn(&stale, &ops).unwrap().1);
    assert_eq!(client.range_prefix(b"/t/", 0).unwrap().1.len(), 2);
    let watch_from = client.status().unwrap().revision + 1;
    let current = [Compare::ModRevision { key: b"/t/a".to_vec(), revision: a.mod_revision }];
    let (done, won) = client.txn(&current, &ops).unwrap();
    assert!(won);
    let (_, now) = client.range_prefix(b"/t/", 0).unwrap();
    assert_eq!(now.iter().map(|kv| kv.key.as_slice()).collect::<Vec<_>>(), [&b"/t/z"[..]]);

    // A watch from before the transaction sees it as one revision.
    let mut watch = client.watch_prefix(b"/t/", watch_from).unwrap();
    let Watched::Events { header, events } = watch.next_message().unwrap() else { panic!("no events") };
    assert_eq!(header.revision, done.revision);
    let deleted = events.iter().filter(|e| matches!(e, Event::Delete(_))).count();
    assert_eq!((deleted, events.len()), (2, 3), "{events:?}");
    // And what comes after, as it comes.
    client.put(b"/t/y", b"8", 0).unwrap();
    let Watched::Events { events, .. } = watch.next_message().unwrap() else { panic!("no events") };
    assert!(matches!(&events[..], [Event::Put(kv)] if kv.key == b"/t/y"));
    // A prefix's deletion is one operation too.
    client.txn(&[], &[Op::DeletePrefix { prefix: b"/t/".to_vec() }]).unwrap();
    assert!(client.range_prefix(b"/t/", 0).unwrap().1.is_empty());
    assert_eq!(client.range_prefix(b"/u/", 0).unwrap().1.len(), 1, "other prefixes stay");
}

#[test]
fn a_watch_from_a_compacted_revision_says_so() {
    let etcd = etcd("compact");
    let client = Client::new(std::slice::from_ref(&etcd.url), Duration::from_secs(2)).unwrap();
    let old = client.put(b"/t/a", b"1", 0).unwrap();
    client.put(b"/t/a", b"2", 0).unwrap();
    let latest = client.put(b"/t/a", b"3", 0).unwrap();
    let out = Command::new("etcdctl")
        .args(["--endpoints", &etcd.url, "compact", &latest.revision.to_string()])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut watch = client.watch_prefix(b"/t/", old.revision).unwrap();
    assert!(
        matches!(watch.next_message().unwrap(), Watched::Compacted { compact_revision } if compact_revision == latest.revision)
    );
    assert!(matches!(client.range_prefix(b"/t/", old.revision), Err(vsocket_etcd::Error::Compacted { .. })));
}

#[test]
fn a_key_on_a_lease_goes_when_the_lease_is_not_kept() {
    let etcd = etcd("lease");
    let client = Client::new(std::slice::from_ref(&etcd.url), Duration::from_secs(2)).unwrap();
    let lease = client.lease_grant(2).unwrap();
    client.put(b"/s/h1", b"up", lease).unwrap();
    assert!(client.lease_keep_alive(lease).unwrap() > 0);
    assert_eq!(client.get(b"/s/h1").unwrap().1.unwrap().lease, lease);
    let began = Instant::now();
    while client.get(b"/s/h1").unwrap().1.is_some() {
        assert!(began.elapsed() < Duration::from_secs(10), "the key outlived its lease");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(client.lease_keep_alive(lease).unwrap(), 0, "an expired lease is not kept");
    drop(etcd);
    // No member: the error says which were tried.
    let error = client.status().unwrap_err().to_string();
    assert!(
        error.starts_with("no etcd member answered") && error.contains(&client.endpoints()[0].to_string()),
        "{error}"
    );
}
