//! The tenant model in a real etcd (Debian's etcd-server, on loopback):
//! the client (ranges at a revision, transactions that lose, watches
//! across changes and compaction, leases) and `vsocketctl import`.

use std::process::Command;
use std::time::{Duration, Instant};
use vsocket_e2e::Etcd;
use vsocket_etcd::{Client, Compare, Event, Op, Watched};

fn etcd(name: &str) -> Etcd {
    Etcd::start(name, 1)
}

#[test]
fn ranges_transactions_and_watches_against_a_real_etcd() {
    let etcd = etcd("kv");
    let client = Client::new(&["http://127.0.0.1:1".into(), etcd.urls[0].clone()], Duration::from_secs(2)).unwrap();
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
    let client = Client::new(std::slice::from_ref(&etcd.urls[0]), Duration::from_secs(2)).unwrap();
    let old = client.put(b"/t/a", b"1", 0).unwrap();
    client.put(b"/t/a", b"2", 0).unwrap();
    let latest = client.put(b"/t/a", b"3", 0).unwrap();
    let out = Command::new("etcdctl")
        .args(["--endpoints", &etcd.urls[0], "compact", &latest.revision.to_string()])
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
    let client = Client::new(std::slice::from_ref(&etcd.urls[0]), Duration::from_secs(2)).unwrap();
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

/// A fleet's tenant model, as an operator writes it.
const FLEET: &str = r#"
[host]
name = "h1"

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

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["web"]
"#;

/// `vsocketctl ARGS`: its exit code, stdout and stderr.
fn vsocketctl(args: &[&str]) -> (i32, String, String) {
    outcome(Command::new(vsocket_e2e::bin("vsocketctl")).args(args))
}

/// What `command` came to: its exit code, and its output and error, trimmed.
fn outcome(command: &mut Command) -> (i32, String, String) {
    let out = command.output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// The model's keys and values in the store, and its generation.
fn stored(client: &Client) -> (Vec<(String, Vec<u8>)>, String) {
    let layout = vsocket_policy::store::Layout::new(vsocket_policy::store::DEFAULT_PREFIX);
    let (_, kvs) = client.range_prefix(layout.prefix().as_bytes(), 0).unwrap();
    let mut model = Vec::new();
    let mut generation = String::new();
    for kv in kvs {
        let key = String::from_utf8(kv.key).unwrap();
        if key == layout.generation() {
            generation = String::from_utf8(kv.value).unwrap();
        } else if layout.is_model(&key) {
            model.push((key, kv.value));
        }
    }
    (model, generation)
}

#[test]
fn vsocketctl_import_writes_a_file_s_model_as_one_change() {
    let etcd = etcd("import");
    let client = Client::new(&etcd.urls, Duration::from_secs(2)).unwrap();
    let dir = std::env::temp_dir().join("vsocket-import-test");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fleet.toml");
    let file_s = file.to_string_lossy().into_owned();
    std::fs::write(&file, FLEET).unwrap();
    let endpoints = etcd.endpoints();
    let import = || vsocketctl(&["import", &file_s, "--etcd", &endpoints]);

    let (code, out, err) = import();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("imported {file_s}: generation 1 (4 objects written, 0 removed)"));
    let (model, generation) = stored(&client);
    let document = vsocket_policy::load_document(&file).unwrap().0;
    let layout = vsocket_policy::store::Layout::new(vsocket_policy::store::DEFAULT_PREFIX);
    assert_eq!(model, vsocket_policy::store::entries(&document, &layout));
    assert_eq!(generation, "1");

    // A second import writes what differs only, in one revision.
    let edited = FLEET.replace("ports = \"80\"", "ports = \"8080\"");
    let edited = &edited[..edited.find("[[guest]]\nname = \"b\"").unwrap()];
    std::fs::write(&file, edited).unwrap();
    let from = client.status().unwrap().revision + 1;
    let (code, out, err) = import();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("imported {file_s}: generation 2 (1 objects written, 1 removed)"));
    let mut watch = client.watch_prefix(b"/vsocket/", from).unwrap();
    let Watched::Events { events, .. } = watch.next_message().unwrap() else { panic!("no events") };
    let keys: Vec<String> = events
        .iter()
        .map(|e| match e {
            Event::Put(kv) => format!("put {}", String::from_utf8_lossy(&kv.key)),
            Event::Delete(kv) => format!("delete {}", String::from_utf8_lossy(&kv.key)),
        })
        .collect();
    assert_eq!(keys, ["delete /vsocket/guest/b", "put /vsocket/security_group/web", "put /vsocket/generation"]);

    // A file that does not validate is refused before the store is touched.
    std::fs::write(&file, FLEET.replace("10.10.0.3", "10.20.0.3")).unwrap();
    let (code, _, err) = import();
    assert_eq!(code, 2);
    assert!(err.starts_with(&format!("vsocketctl: {file_s}: guest[1].addresses[0]")), "{err}");
    assert_eq!(stored(&client).1, "2");
    // No store: said, nothing else.
    let (code, _, err) = vsocketctl(&["import", &file_s, "--etcd", "http://127.0.0.1:1"]);
    std::fs::write(&file, FLEET).unwrap();
    let (code2, _, err2) = vsocketctl(&["import", &file_s, "--etcd", "http://127.0.0.1:1"]);
    assert_eq!((code, code2), (2, 1), "{err}\n{err2}");
    assert!(err2.contains("no etcd member answered"), "{err2}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_writers_at_once_one_wins_and_the_other_writes_nothing() {
    let etcd = etcd("conflict");
    let client = Client::new(&etcd.urls, Duration::from_secs(2)).unwrap();
    let layout = vsocket_policy::store::Layout::new(vsocket_policy::store::DEFAULT_PREFIX);
    let parse = |text: &str| vsocket_policy::parse_document(text, std::path::Path::new("fleet.toml")).unwrap().0;
    vsocket_cli::store::write_model(&client, &layout, &parse(FLEET)).unwrap();
    // Both read generation 1; the first to write wins.
    let first = parse(&FLEET.replace("ports = \"80\"", "ports = \"81\""));
    let second = parse(&FLEET.replace("10.10.0.3", "10.10.0.9"));
    let prepared_first = vsocket_cli::store::prepare(&client, &layout, &first).unwrap();
    let prepared_second = vsocket_cli::store::prepare(&client, &layout, &second).unwrap();
    let won = vsocket_cli::store::commit(&client, &layout, prepared_first).unwrap();
    assert_eq!(won.generation, 2);
    let lost = vsocket_cli::store::commit(&client, &layout, prepared_second).unwrap_err().to_string();
    assert_eq!(
        lost,
        "another change came first (generation 1 was read, the store has 2); nothing written: read it again and retry"
    );
    let (model, generation) = stored(&client);
    assert_eq!((model, generation), (vsocket_policy::store::entries(&first, &layout), "2".to_owned()));
}

/// The fleet's model for a lab host (netns names given, so the file the
/// lab writes and the model in the store agree).
const LAB_MODEL: &str = r#"
[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[security_group]]
name = "svc"
[[security_group.ingress]]
protocol = "tcp"
ports = "7000"
cidr = "10.10.0.0/24"

[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]
netns = "LAB-a"

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["svc"]
netns = "LAB-b"
"#;

/// The fleet's model for lab `lab` (its namespaces are `LAB-GUEST`).
fn lab_model(lab: &str) -> String {
    LAB_MODEL.replace("LAB-", &format!("{lab}-"))
}

/// `vsocketctl import` of `model` (under a `[host]` of its own) into
/// `etcd`, through the file `file`; its output.
fn import_model(file: &std::path::Path, etcd: &Etcd, model: &str, wait: bool) -> String {
    std::fs::write(file, format!("[host]\nname = \"operator\"\n{model}")).unwrap();
    let file = file.to_string_lossy().into_owned();
    let endpoints = etcd.endpoints();
    let mut args = vec!["import", file.as_str(), "--etcd", endpoints.as_str()];
    if wait {
        args.push("--wait");
    }
    let (code, out, err) = vsocketctl(&args);
    assert_eq!(code, 0, "{err}");
    out
}

/// A lab host `name` whose policy comes from `etcd` (deny_action reject,
/// on_policy_change reset), with an accepting server on b's port 7000,
/// once its daemon reports generation 1 from the store. Its file holds
/// the model too if `file_model`, else only `[host]` and the store.
fn host_on_etcd(name: &str, etcd: &Etcd, file_model: bool) -> vsocket_e2e::Lab {
    let urls: Vec<String> = etcd.urls.iter().map(|u| format!("\"{u}\"")).collect();
    let host =
        format!("deny_action = \"reject\"\non_policy_change = \"reset\"\n[host.store]\netcd = [{}]\n", urls.join(", "));
    let body = if file_model { lab_model(name) } else { String::new() };
    let mut lab = vsocket_e2e::Lab::start_host(name, &body, &host).unwrap();
    let ready = vsocket_e2e::wait_until(Duration::from_secs(10), || store_at(&lab, 1));
    assert!(ready, "{}\n{}", store_of(&lab), lab.daemon_log());
    let echo = "import socket\nl = socket.socket()\nl.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                l.bind(('10.10.0.3', 7000))\nl.listen(64)\nwhile True:\n    c, _ = l.accept()\n    c.close()\n";
    lab.spawn("b", vsocket_e2e::Via::Vsocket, "python3", &["-c", echo], "echo.log").unwrap();
    lab.wait_listening("b", 7000).unwrap();
    lab
}

/// What `vsocketctl status` says of the store.
fn store_of(lab: &vsocket_e2e::Lab) -> serde_json::Value {
    lab.ctl("status").unwrap()["store"].clone()
}

/// Is the lab's daemon watching the store, at `generation`?
fn store_at(lab: &vsocket_e2e::Lab, generation: u64) -> bool {
    let s = store_of(lab);
    s["connected"] == true && s["generation"] == generation
}

/// A connect from guest a to b's port 7000: "connected", or the error.
fn probe(lab: &vsocket_e2e::Lab) -> String {
    const PROBE: &str = "import socket\ns = socket.socket()\ns.settimeout(3)\ntry:\n    \
                         s.connect(('10.10.0.3', 7000))\n    print('connected')\nexcept OSError as e:\n    \
                         print(type(e).__name__)\n";
    lab.run_ok("a", vsocket_e2e::Via::Vsocket, "python3", &["-c", PROBE]).unwrap().trim().to_owned()
}

#[test]
fn a_host_on_etcd_follows_the_store_and_keeps_its_policy_while_etcd_is_down() {
    let mut etcd = etcd("fleet");
    let dir = std::env::temp_dir().join("vsocket-fleet-test");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model.toml");
    let endpoints = etcd.endpoints();
    import_model(&model, &etcd, &lab_model("tst"), false);
    // The host's file names the store; the daemon takes the model from it.
    let mut lab = host_on_etcd("tst", &etcd, true);
    assert_eq!(probe(&lab), "connected");

    // The host shows in the store, up, with what it applied.
    let hosts = || {
        let (code, out, err) = vsocketctl(&["--json", "hosts", "--etcd", &endpoints]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let up_at = |generation: u64| {
        let h = hosts();
        h["hosts"][0]["host"] == "tst" && h["hosts"][0]["state"] == "up" && h["hosts"][0]["generation"] == generation
    };
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || up_at(1)), "{}", hosts());

    // A live edit on a host of the fleet is made in the store, and --wait
    // returns once every host applied it.
    let edit = |args: &[&str]| {
        let out = lab.ctl_output(args).unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{stderr}");
        stdout.into_owned()
    };
    let out = edit(&["--wait", "member", "remove", "b", "svc"]);
    assert_eq!(out, "changed in the store: generation 2\napplied by every host that is up\n");
    assert_eq!(probe(&lab), "ConnectionRefusedError", "{}", lab.daemon_log());
    assert!(edit(&["member", "add", "b", "svc", "--wait"]).starts_with("changed in the store: generation 3"));
    assert_eq!(probe(&lab), "connected");
    // Through the daemon alone (nothing names the store) it would be this
    // host's edit only: refused.
    let run_dir = lab.run_dir.to_string_lossy().into_owned();
    let (code, _, said) = vsocketctl(&["--run-dir", &run_dir, "member", "remove", "b", "svc"]);
    assert!(code != 0 && said.contains("this host's policy comes from etcd http://"), "{said}");

    // A change in the store with --wait returns once this host applied
    // it: enforced at once, whole.
    let closed = lab_model("tst").replace("ports = \"7000\"", "ports = \"7001\"");
    let out = import_model(&model, &etcd, &closed, true);
    assert!(out.contains("generation 4") && out.ends_with("applied by every host that is up"), "{out}");
    assert_eq!(probe(&lab), "ConnectionRefusedError", "{}", lab.daemon_log());
    assert!(store_at(&lab, 4), "{}", store_of(&lab));
    assert!(up_at(4), "{}", hosts());

    // etcd down: the host says so and keeps the last policy, also across
    // a restart of its daemon.
    etcd.kill(0);
    let down = vsocket_e2e::wait_until(Duration::from_secs(10), || store_of(&lab)["connected"] == false);
    assert!(down, "{}", store_of(&lab));
    assert_eq!(probe(&lab), "ConnectionRefusedError");
    lab.kill_daemon();
    lab.start_daemon().unwrap();
    assert_eq!(store_of(&lab)["generation"], 4, "{}", lab.daemon_log());
    // (b's server attaches again on its own, within its back-off.)
    let listening = || lab.ctl("listeners").is_ok_and(|l| l.as_array().is_some_and(|l| l.len() == 1));
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), listening), "{}", lab.daemon_log());
    assert_eq!(probe(&lab), "ConnectionRefusedError");

    // etcd back: changes flow again.
    etcd.restart(0);
    etcd.wait_healthy();
    assert!(import_model(&model, &etcd, &lab_model("tst"), false).contains("generation 5"));
    let allowed = vsocket_e2e::wait_until(Duration::from_secs(15), || probe(&lab) == "connected");
    assert!(allowed, "{}\n{}", store_of(&lab), lab.daemon_log());
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || store_at(&lab, 5)), "{}", store_of(&lab));
    // A host whose daemon is gone shows as down once its lease runs out.
    lab.kill_daemon();
    let down = vsocket_e2e::wait_until(Duration::from_secs(20), || hosts()["hosts"][0]["state"] == "down");
    assert!(down, "{}", hosts());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_three_member_store_losing_quorum_leaves_the_policy_in_force() {
    let mut etcd = Etcd::start("quorum", 3);
    let dir = std::env::temp_dir().join("vsocket-quorum-test");
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("model.toml");
    import_model(&model, &etcd, &lab_model("tq"), false);
    let lab = host_on_etcd("tq", &etcd, true);
    assert_eq!(probe(&lab), "connected");
    // Two of three members gone: no quorum. The member left still holds
    // the watch open; the host sees the store down all the same, and its
    // guests' connects follow the policy in force.
    etcd.kill(1);
    etcd.kill(2);
    let down = vsocket_e2e::wait_until(Duration::from_secs(20), || store_of(&lab)["connected"] == false);
    assert!(down, "{}\n{}", store_of(&lab), lab.daemon_log());
    assert_eq!(probe(&lab), "connected");
    // Quorum back: changes flow again, --wait included.
    etcd.restart(1);
    etcd.restart(2);
    etcd.wait_healthy();
    let closed = lab_model("tq").replace("ports = \"7000\"", "ports = \"7001\"");
    let out = import_model(&model, &etcd, &closed, true);
    assert!(out.ends_with("applied by every host that is up"), "{out}");
    assert_eq!(probe(&lab), "ConnectionRefusedError", "{}", lab.daemon_log());
    assert!(vsocket_e2e::wait_until(Duration::from_secs(10), || store_at(&lab, 2)), "{}", store_of(&lab));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_lab_host_whose_file_names_only_the_store_gets_its_guests_from_it() {
    let etcd = etcd("modelless");
    let dir = std::env::temp_dir().join("vsocket-modelless-test");
    std::fs::create_dir_all(&dir).unwrap();
    import_model(&dir.join("model.toml"), &etcd, &lab_model("tsm"), false);
    // vsocket lab up makes the store's guests' namespaces, vsocket run finds
    // them, and vsocketd serves them: the file has no guest at all.
    let lab = host_on_etcd("tsm", &etcd, false);
    assert!(!std::fs::read_to_string(&lab.config).unwrap().contains("[[guest]]"));
    assert_eq!(probe(&lab), "connected");
    assert_eq!(lab.counter("a", "connections_out"), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fleet of [`three_hosts_follow_one_policy_and_hosts_join_and_leave_without_restarts`]:
/// hosts `tf-1` to `tf-3`, guest `a` on the first, `b` on the second, `c`
/// (once it joins) on the third; their namespaces `tf-GUEST`.
const FLEET_NAME: &str = "tf";
/// The namespace joining the fleet's hosts (the lab's fabric network,
/// `vsf-` and the first host's name), where the store runs.
const MANAGEMENT: &str = "vsf-tf-1";
/// The store's address on that network.
const STORE_IP: &str = "10.99.0.250";
/// The management bridge's MAC (locally administered).
const MANAGEMENT_BRIDGE_MAC: &str = "02:00:0a:63:00:fe";

/// What the operator imports: two hosts, each with one guest serving on
/// port 7000 to the VPC.
const FLEET_MODEL: &str = r#"
[host]
name = "tf-1"
[fabric]
kind = "tcp"
[[fabric.host]]
name = "tf-1"
address = "10.99.0.1:7470"
[[fabric.host]]
name = "tf-2"
address = "10.99.0.2:7470"

[[vpc]]
name = "blue"
cidr = "10.10.0.0/24"

[[security_group]]
name = "svc"
[[security_group.ingress]]
protocol = "tcp"
ports = "7000"
cidr = "10.10.0.0/24"

[[guest]]
name = "a"
vpc = "blue"
addresses = ["10.10.0.2"]
security_groups = ["svc"]
netns = "tf-a"
host = "tf-1"

[[guest]]
name = "b"
vpc = "blue"
addresses = ["10.10.0.3"]
security_groups = ["svc"]
netns = "tf-b"
host = "tf-2"
"#;

/// `ip ARGS`, which must succeed.
fn ip(args: &str) {
    let status = Command::new("ip").args(args.split_whitespace()).status().unwrap();
    assert!(status.success(), "ip {args}");
}

/// The fleet's management network: a namespace with a bridge `fbr`, which
/// the lab wires each host's fabric address into, and the store's
/// interface `store0` on it (the lab leaves a namespace with an interface
/// it did not make in place when its hosts go). Removed when dropped.
struct Management;

impl Management {
    fn new() -> Management {
        // What a killed run left behind.
        let _ = Command::new("ip").args(["netns", "delete", MANAGEMENT]).stderr(std::process::Stdio::null()).status();
        ip(&format!("netns add {MANAGEMENT}"));
        ip(&format!("-n {MANAGEMENT} link set lo up"));
        // The bridge has an address of its own (left to itself it takes its
        // lowest port's, which changes as hosts join; a host that cached
        // the old one, from the bridge answering ARP for the store's
        // address, had its SYNs dropped as not the bridge's), and only the
        // store's interface answers ARP for the store's address.
        ip(&format!("-n {MANAGEMENT} link add fbr address {MANAGEMENT_BRIDGE_MAC} type bridge"));
        let arp = Command::new("ip")
            .args(["netns", "exec", MANAGEMENT, "sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=1"])
            .status()
            .unwrap();
        assert!(arp.success());
        ip(&format!("-n {MANAGEMENT} link set fbr up"));
        ip(&format!("-n {MANAGEMENT} link add store0 type veth peer name store1"));
        ip(&format!("-n {MANAGEMENT} link set store1 master fbr up"));
        ip(&format!("-n {MANAGEMENT} addr add {STORE_IP}/24 dev store0"));
        ip(&format!("-n {MANAGEMENT} link set store0 up"));
        Management
    }
}

impl Drop for Management {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", MANAGEMENT]).status();
    }
}

/// vsocketctl run on the management network (where the store is).
fn fleet_ctl(etcd: &Etcd, args: &[&str]) -> (i32, String, String) {
    outcome(etcd.command(vsocket_e2e::bin("vsocketctl")).args(args))
}

/// Host `tf-K` (K = `k`), fabric address 10.99.0.K, on `etcd`; returns
/// once its daemon serves the store's generation `generation`.
fn fleet_host(k: usize, etcd: &Etcd, key: &std::path::Path, generation: u64) -> vsocket_e2e::Lab {
    let urls: Vec<String> = etcd.urls.iter().map(|u| format!("\"{u}\"")).collect();
    let host = format!("{FLEET_NAME}-{k}");
    // The host's own file: its store, its fabric settings and its own
    // fabric address; the other hosts come from the store.
    let lines = format!(
        "deny_action = \"reject\"\non_policy_change = \"reset\"\n[host.store]\netcd = [{}]\n\
         [fabric]\nkind = \"tcp\"\nkey_file = \"{}\"\n[[fabric.host]]\nname = \"{host}\"\naddress = \"10.99.0.{k}:7470\"\n",
        urls.join(", "),
        key.display()
    );
    let lab = vsocket_e2e::Lab::start_fleet_host(FLEET_NAME, &host, &lines, MANAGEMENT).unwrap();
    let ready = vsocket_e2e::wait_until(Duration::from_secs(10), || store_at(&lab, generation));
    assert!(ready, "{}\n{}", store_of(&lab), lab.daemon_log());
    lab
}

/// Starts guest `guest`'s server: accepts on port 7000 and closes.
fn serve(lab: &mut vsocket_e2e::Lab, guest: &str, address: &str) {
    let echo = format!(
        "import socket\nl = socket.socket()\nl.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         l.bind(('{address}', 7000))\nl.listen(64)\nwhile True:\n    c, _ = l.accept()\n    c.close()\n"
    );
    lab.spawn(guest, vsocket_e2e::Via::Vsocket, "python3", &["-c", &echo], &format!("{guest}.log")).unwrap();
    lab.wait_listening(guest, 7000).unwrap();
}

/// A connect from `guest` (on `lab`) to `to` port 7000: "connected", or
/// the error's name.
fn connect(lab: &vsocket_e2e::Lab, guest: &str, to: &str) -> String {
    let probe = format!(
        "import socket\ns = socket.socket()\ns.settimeout(5)\ntry:\n    s.connect(('{to}', 7000))\n    \
         print('connected')\nexcept OSError as e:\n    print(type(e).__name__)\n"
    );
    lab.run_ok(guest, vsocket_e2e::Via::Vsocket, "python3", &["-c", &probe]).unwrap().trim().to_owned()
}

/// The names of the peers `lab`'s daemon links with that are up, sorted.
fn peers_up(lab: &vsocket_e2e::Lab) -> Vec<String> {
    let peers = lab.ctl("peers").unwrap_or_default();
    let mut up: Vec<String> = (peers.as_array().into_iter().flatten())
        .filter(|p| p["state"] == "up")
        .filter_map(|p| p["name"].as_str().map(str::to_owned))
        .collect();
    up.sort();
    up
}

/// A live edit on `lab`'s host, made in the store; its output.
fn edit(lab: &vsocket_e2e::Lab, args: &[&str]) -> String {
    let out = lab.ctl_output(args).unwrap();
    assert!(out.status.success(), "{args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), path_to_store(lab));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How `lab`'s host sees the way to the store: its neighbours, its
/// connections still being made, and whether the store's address answers
/// a connect now (for a failed edit's message).
fn path_to_store(lab: &vsocket_e2e::Lab) -> String {
    let switch = format!("vsw-{}", lab.name);
    let probe = format!("echo > /dev/tcp/{STORE_IP}/2379 && echo the first member takes a connect");
    let runs: [&[&str]; 4] = [
        &["ip", "neigh", "show"],
        &["ss", "-tn", "state", "syn-sent"],
        &["ip", "-s", "-br", "link"],
        &["timeout", "3", "bash", "-c", &probe],
    ];
    let mut report = format!("the way to the store from {switch}:\n");
    for run in runs {
        let out = Command::new("ip").args(["netns", "exec", &switch]).args(run).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr));
        report.push_str(&format!("$ {}\n{}\n", run.join(" "), text.unwrap_or_else(|e| e.to_string())));
    }
    report
}

/// How many times `lab`'s daemon has started (its log says so each time).
fn starts(lab: &vsocket_e2e::Lab) -> usize {
    lab.daemon_log().matches("fabric started").count()
}

#[test]
fn three_hosts_follow_one_policy_and_hosts_join_and_leave_without_restarts() {
    // The management network, made first to hold the store (dropped last).
    let _management = Management::new();
    let etcd = Etcd::start_in("fleet3", 3, MANAGEMENT, STORE_IP);
    let endpoints = etcd.endpoints();
    let dir = std::env::temp_dir().join("vsocket-fleet3-test");
    std::fs::create_dir_all(&dir).unwrap();
    let key = vsocket_e2e::Lab::fabric_key_file(FLEET_NAME);
    vsocket_e2e::write_key(&key, "tf-fabric-key-0123456789abcdef").unwrap();
    let model = dir.join("model.toml");
    std::fs::write(&model, FLEET_MODEL).unwrap();
    let (code, _, err) = fleet_ctl(&etcd, &["import", &model.to_string_lossy(), "--etcd", &endpoints]);
    assert_eq!(code, 0, "{err}");

    let mut one = fleet_host(1, &etcd, &key, 1);
    let mut two = fleet_host(2, &etcd, &key, 1);
    let linked = |lab: &vsocket_e2e::Lab, peers: &[&str]| peers_up(lab) == peers;
    assert!(vsocket_e2e::wait_until(Duration::from_secs(20), || linked(&one, &["tf-2"]) && linked(&two, &["tf-1"])));
    serve(&mut one, "a", "10.10.0.2");
    serve(&mut two, "b", "10.10.0.3");
    assert_eq!(connect(&one, "a", "10.10.0.3"), "connected");
    assert_eq!(connect(&two, "b", "10.10.0.2"), "connected");

    // A third host joins: added to the store with a guest placed on it,
    // then brought up. The first two link with it without restarting.
    let out = edit(&one, &["host", "add", "tf-3", "10.99.0.3:7470"]);
    assert!(out.starts_with("changed in the store: generation 2"), "{out}");
    let add_c = [
        "guest",
        "add",
        "c",
        "--vpc",
        "blue",
        "--address",
        "10.10.0.4",
        "--security-group",
        "svc",
        "--netns",
        "tf-c",
        "--host",
        "tf-3",
        "--wait",
    ];
    assert!(edit(&two, &add_c).contains("generation 3"));
    let mut three = fleet_host(3, &etcd, &key, 3);
    let all_linked = |one: &vsocket_e2e::Lab, two: &vsocket_e2e::Lab, three: &vsocket_e2e::Lab| {
        linked(one, &["tf-2", "tf-3"]) && linked(two, &["tf-1", "tf-3"]) && linked(three, &["tf-1", "tf-2"])
    };
    assert!(
        vsocket_e2e::wait_until(Duration::from_secs(20), || all_linked(&one, &two, &three)),
        "{:?} {:?} {:?}\n{}",
        peers_up(&one),
        peers_up(&two),
        peers_up(&three),
        one.daemon_log()
    );
    serve(&mut three, "c", "10.10.0.4");
    for (lab, guest, to) in [(&one, "a", "10.10.0.4"), (&two, "b", "10.10.0.4"), (&three, "c", "10.10.0.2")] {
        assert_eq!(connect(lab, guest, to), "connected", "{guest} to {to}");
    }

    // A rule changed on one host with --wait is enforced on all three at
    // once: ingress is decided on each server's host.
    let rule = ["rule", "remove", "svc", "ingress", "tcp", "7000", "--cidr", "10.10.0.0/24", "--wait"];
    let out = edit(&two, &rule);
    assert!(out.contains("generation 4") && out.contains("applied by every host that is up"), "{out}");
    for (lab, guest, to) in [(&one, "a", "10.10.0.3"), (&two, "b", "10.10.0.4"), (&three, "c", "10.10.0.2")] {
        assert_eq!(connect(lab, guest, to), "ConnectionRefusedError", "{guest} to {to}");
    }
    let mut back = rule;
    back[1] = "add";
    assert!(edit(&three, &back).contains("generation 5"));
    for (lab, guest, to) in [(&one, "a", "10.10.0.3"), (&two, "b", "10.10.0.4"), (&three, "c", "10.10.0.2")] {
        assert_eq!(connect(lab, guest, to), "connected", "{guest} to {to}");
    }

    // The third host cut off from the store (and the fabric) while two
    // changes are made and the store is compacted past them: back on the
    // network, it ends with the last policy. Only a may reach c's port
    // now, and c's host decides that.
    ip("-n vsw-tf-3 link set fab0 down");
    edit(&one, &["rule", "remove", "svc", "ingress", "tcp", "7000", "--cidr", "10.10.0.0/24"]);
    edit(&one, &["rule", "add", "svc", "ingress", "tcp", "7000", "--cidr", "10.10.0.2/32"]);
    let header: serde_json::Value =
        serde_json::from_str(&etcd.ctl(&["get", "/vsocket/generation", "-w", "json"]).unwrap()).unwrap();
    let revision = header["header"]["revision"].as_u64().unwrap().to_string();
    etcd.ctl(&["compact", &revision]).unwrap();
    assert_eq!(store_of(&three)["generation"], 5, "cut off, it keeps what it had");
    ip("-n vsw-tf-3 link set fab0 up");
    let caught_up = vsocket_e2e::wait_until(Duration::from_secs(30), || store_at(&three, 7));
    assert!(caught_up, "{}\n{}", store_of(&three), three.daemon_log());
    assert!(vsocket_e2e::wait_until(Duration::from_secs(20), || all_linked(&one, &two, &three)));
    assert_eq!(connect(&one, "a", "10.10.0.4"), "connected");
    assert_eq!(connect(&two, "b", "10.10.0.4"), "ConnectionRefusedError");

    // The third host leaves: its daemon dies, it shows down, and once its
    // guest and its entry are removed the others drop it, still linked
    // with each other, never restarted.
    three.kill_daemon();
    let hosts = || {
        let (code, out, err) = fleet_ctl(&etcd, &["--json", "hosts", "--etcd", &endpoints]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let state_of = |h: &serde_json::Value, name: &str| {
        h["hosts"].as_array().unwrap().iter().find(|x| x["host"] == name).map(|x| x["state"].clone())
    };
    let down = vsocket_e2e::wait_until(Duration::from_secs(20), || state_of(&hosts(), "tf-3") == Some("down".into()));
    assert!(down, "{}", hosts());
    assert_eq!(state_of(&hosts(), "tf-1"), Some("up".into()));
    let refused = one.ctl_output(&["host", "remove", "tf-3"]).unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("unknown host \"tf-3\""), "{said}");
    edit(&one, &["guest", "remove", "c"]);
    assert!(edit(&one, &["host", "remove", "tf-3", "--wait"]).contains("generation 9"));
    let dropped = |lab: &vsocket_e2e::Lab, other: &str| {
        lab.ctl("peers").is_ok_and(|p| p.as_array().is_some_and(|p| p.len() == 1 && p[0]["name"] == other))
    };
    assert!(dropped(&one, "tf-2") && dropped(&two, "tf-1"), "{:?} {:?}", one.ctl("peers"), two.ctl("peers"));
    // Still linked, still following the policy: only a may reach port 7000.
    assert_eq!(connect(&one, "a", "10.10.0.3"), "connected");
    assert_eq!(connect(&two, "b", "10.10.0.2"), "ConnectionRefusedError");
    assert_eq!((starts(&one), starts(&two)), (1, 1), "no daemon restarted");
    // A host that left the fleet still tears its lab down (from the model
    // its daemon last applied).
    drop(three);
    for netns in ["vsw-tf-3", "tf-c"] {
        assert!(!std::path::Path::new("/run/netns").join(netns).exists(), "{netns} is left");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
