//! The client against a stand-in daemon on a real unix socket: it sends one
//! request line, reads one reply line, and types it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;
use vsocket_admin::{Client, ClientError, LinkState};
use vsocket_policy::{Change, FabricKind, PolicyChangeAction};

/// A directory of its own under the system's temporary one, removed when
/// the test ends.
struct RunDir(PathBuf);

impl RunDir {
    fn new(test: &str) -> RunDir {
        let dir = std::env::temp_dir().join(format!("vsocket-admin-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        RunDir(dir)
    }

    fn socket(&self) -> PathBuf {
        vsocket_admin::admin_socket_path(&self.0)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Answers one connection with `reply`; returns the request line it read.
fn daemon(path: &PathBuf, reply: &'static str) -> JoinHandle<String> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut request = String::new();
        BufReader::new(&stream).read_line(&mut request).unwrap();
        writeln!(&stream, "{reply}").unwrap();
        request
    })
}

#[test]
fn a_query_gets_its_typed_reply() {
    let run_dir = RunDir::new("query");
    let path = run_dir.socket();
    let served = daemon(
        &path,
        "[{\"accepted\":0,\"address\":\"192.0.2.2:7700\",\"bytes_received\":0,\"bytes_sent\":0,\
         \"connections\":0,\"corrupt\":0,\"frames_received\":0,\"frames_sent\":0,\"last_error\":null,\
         \"links_up\":1,\"name\":\"h2\",\"opened\":0,\"since\":1700000000,\"state\":\"up\",\"transport\":\"ucx\"}]",
    );
    let peers = Client::new(&path).peers().unwrap();
    assert_eq!(served.join().unwrap(), "{\"command\":\"peers\"}\n");
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].state, LinkState::Up);
    assert_eq!(peers[0].transport, FabricKind::Ucx);
}

#[test]
fn a_change_gets_what_it_did_or_the_refusal() {
    let run_dir = RunDir::new("change");
    let path = run_dir.socket();
    let served = daemon(
        &path,
        "{\"connections_reset\":0,\"errors\":[],\"guests_added\":[],\"guests_removed\":[\"c\"],\
         \"on_policy_change\":\"keep\"}",
    );
    let client = Client::new(&path).with_timeout(Duration::from_secs(5));
    let applied = client.change(Change::RemoveGuest { name: "c".into() }).unwrap();
    assert_eq!(
        served.join().unwrap(),
        "{\"change\":{\"name\":\"c\",\"op\":\"remove_guest\"},\"command\":\"change\"}\n"
    );
    assert_eq!(applied.guests_removed, ["c"]);
    assert_eq!(applied.on_policy_change, PolicyChangeAction::Keep);

    std::fs::remove_file(&path).unwrap();
    let served = daemon(&path, "{\"error\":\"no guest \\\"c\\\"; nothing changed\"}");
    let refused = client.change(Change::RemoveGuest { name: "c".into() }).unwrap_err();
    served.join().unwrap();
    assert!(matches!(refused, ClientError::Refused(_)));
    assert_eq!(refused.to_string(), "no guest \"c\"; nothing changed");
}

#[test]
fn a_reply_of_another_shape_is_malformed() {
    let run_dir = RunDir::new("malformed");
    let path = run_dir.socket();
    let served = daemon(&path, "{\"host\":\"h1\"}");
    let err = Client::new(&path).guests().unwrap_err();
    served.join().unwrap();
    assert!(matches!(err, ClientError::Malformed { .. }), "{err}");
}

#[test]
fn no_daemon_says_so() {
    let run_dir = RunDir::new("absent");
    let path = run_dir.socket();
    let err = Client::new(&path).status().unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }));
    assert_eq!(
        err.to_string(),
        format!("{}: No such file or directory (os error 2) (is vsocketd running?)", path.display())
    );
}
