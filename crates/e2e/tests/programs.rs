//! Programs people run, unmodified, between two guests over vSocket.

use vsocket_e2e::{asset, nginx_config, Lab, Via, TWO_GUESTS};

fn script(name: &str) -> String {
    asset(name).to_str().unwrap().to_string()
}

#[test]
fn python_http_server_and_urllib() {
    let mut lab = Lab::start("thttp", TWO_GUESTS).unwrap();
    let root = lab.dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(root.join("blob"), &blob).unwrap();
    let root_s = root.to_str().unwrap().to_string();
    lab.spawn(
        "b",
        Via::Vsocket,
        "python3",
        &["-m", "http.server", "8000", "--bind", "10.10.0.3", "--directory", &root_s],
        "http.log",
    )
    .unwrap();
    lab.wait_listening("b", 8000).unwrap();
    let fetch = "import urllib.request,hashlib;d=urllib.request.urlopen('http://10.10.0.3:8000/blob').read();print(len(d),hashlib.sha256(d).hexdigest())";
    let out = lab.run_ok("a", Via::Vsocket, "python3", &["-c", fetch]).unwrap();
    let local = lab
        .run_ok(
            "a",
            Via::Kernel,
            "python3",
            &[
                "-c",
                &format!(
                    "import hashlib;d=open('{}','rb').read();print(len(d),hashlib.sha256(d).hexdigest())",
                    root.join("blob").display()
                ),
            ],
        )
        .unwrap();
    assert_eq!(out, local, "the file arrived changed");
    assert_eq!(lab.counter("a", "fallbacks"), 0);
    assert!(lab.counter("b", "bytes_sent") >= blob.len() as u64);
}

#[test]
fn python_asyncio_server_and_client() {
    let mut lab = Lab::start("tasync", TWO_GUESTS).unwrap();
    let s = script("asyncio_echo.py");
    lab.spawn("b", Via::Vsocket, "python3", &[&s, "serve", "10.10.0.3", "8100"], "server.log").unwrap();
    lab.wait_listening("b", 8100).unwrap();
    let out = lab.run_ok("a", Via::Vsocket, "python3", &[&s, "client", "10.10.0.3", "8100"]).unwrap();
    assert_eq!(out.trim(), "asyncio ok 345000");
    assert_eq!(lab.counter("a", "connections_out"), 1);
    assert!(lab.counter("a", "bytes_sent") >= 345_000);
}

#[test]
fn node_http_server_and_client() {
    let mut lab = Lab::start("tnode", TWO_GUESTS).unwrap();
    let s = script("node_http.js");
    lab.spawn("b", Via::Vsocket, "node", &[&s, "serve", "10.10.0.3", "8200"], "server.log").unwrap();
    lab.wait_listening("b", 8200).unwrap();
    for path in ["/one", "/two"] {
        let out = lab.run_ok("a", Via::Vsocket, "node", &[&s, "get", &format!("http://10.10.0.3:8200{path}")]).unwrap();
        assert_eq!(out.trim(), format!("hello from node {path}"));
    }
    assert_eq!(lab.counter("a", "connections_out"), 2);
    assert_eq!(lab.counter("a", "fallbacks"), 0);
}

#[test]
fn iperf3_with_eight_parallel_streams() {
    let mut lab = Lab::start("tip8", TWO_GUESTS).unwrap();
    lab.spawn("b", Via::Vsocket, "iperf3", &["-s", "-B", "10.10.0.3", "-p", "5301", "-1"], "server.log").unwrap();
    lab.wait_listening("b", 5301).unwrap();
    let out = lab
        .run_ok("a", Via::Vsocket, "iperf3", &["-c", "10.10.0.3", "-p", "5301", "-t", "2", "-P", "8", "-J"])
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report["error"].is_null(), "{}", report["error"]);
    assert_eq!(report["end"]["streams"].as_array().map(Vec::len), Some(8));
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap();
    // The control connection and the eight streams all took vSocket.
    assert_eq!(lab.counter("a", "connections_out"), 9);
    assert!(lab.counter("b", "bytes_received") >= received);
}

#[test]
fn socat_relays_vsocket_to_a_kernel_connection() {
    let mut lab = Lab::start("tsocat", TWO_GUESTS).unwrap();
    // In b: a kernel echo server on loopback, and socat (with the library)
    // relaying vSocket connections on 10.10.0.3:9000 to it.
    lab.spawn("b", Via::Kernel, "python3", &[&script("kernel_echo.py"), "127.0.0.1", "9001"], "echo.log").unwrap();
    lab.spawn(
        "b",
        Via::Vsocket,
        "socat",
        &["TCP-LISTEN:9000,bind=10.10.0.3,reuseaddr,fork", "TCP:127.0.0.1:9001"],
        "socat.log",
    )
    .unwrap();
    lab.wait_listening("b", 9001).unwrap();
    lab.wait_listening("b", 9000).unwrap();
    // The client reads while it writes (a thread sends): an echo through a
    // relay must not depend on the buffers holding the whole megabyte.
    let check = "import socket,os,threading\ns=socket.create_connection(('10.10.0.3',9000))\nd=os.urandom(1<<20)\ndef send():\n    s.sendall(d)\n    s.shutdown(socket.SHUT_WR)\nt=threading.Thread(target=send)\nt.start()\ng=b''\nwhile c:=s.recv(65536): g+=c\nt.join()\nprint(len(g), g==d)";
    for _ in 0..2 {
        let out = lab.run_ok("a", Via::Vsocket, "python3", &["-c", check]).unwrap();
        assert_eq!(out.trim(), "1048576 True");
    }
    // Two vSocket connections came in; the relay's own side is loopback (kernel).
    assert_eq!(lab.counter("b", "connections_in"), 2);
    assert_eq!(lab.counter("b", "connections_out"), 0);
}

#[test]
fn nginx_master_and_workers_serve_files_byte_for_byte() {
    for accept_mutex in ["on", "off"] {
        let mut lab = Lab::start(&format!("tngx{}", &accept_mutex[1..2]), TWO_GUESTS).unwrap();
        // Two workers forked after listen, sendfile on; the accept mutex both ways.
        let conf_path = nginx_config(&lab.dir, "10.10.0.3:8080", accept_mutex).unwrap();
        let root = lab.dir.join("www");
        let files: Vec<(&str, Vec<u8>)> = [("small.txt", 6usize), ("mid", 70_000), ("big", 3_000_000)]
            .into_iter()
            .map(|(name, len)| (name, (0..len).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect()))
            .collect();
        for (name, data) in &files {
            std::fs::write(root.join(name), data).unwrap();
        }
        lab.spawn("b", Via::Vsocket, "nginx", &["-c", conf_path.to_str().unwrap()], "nginx.log").unwrap();
        lab.wait_listening("b", 8080).unwrap();
        let mut expected_connections = 0;
        for round in 0..3 {
            for (name, data) in &files {
                let out_path = lab.dir.join(format!("got-{round}-{name}"));
                lab.run_ok(
                    "a",
                    Via::Vsocket,
                    "curl",
                    &["-sf", "-o", out_path.to_str().unwrap(), &format!("http://10.10.0.3:8080/{name}")],
                )
                .unwrap();
                assert!(std::fs::read(&out_path).unwrap() == *data, "{name} differs (accept_mutex {accept_mutex})");
                expected_connections += 1;
            }
        }
        assert_eq!(lab.counter("b", "connections_in"), expected_connections);
        assert_eq!(lab.counter("a", "fallbacks"), 0);
    }
}
