//! Descriptor limits: a program runs out of descriptors over vSocket where
//! it would over the kernel.

use vsocket_e2e::{asset, Lab, Via, TWO_GUESTS};

/// Connections a client with a soft RLIMIT_NOFILE of `soft` holds to a
/// server of the same kind (`via`) before a connect fails, and the errno.
fn held(lab: &mut Lab, via: Via, port: u16, soft: u32) -> (u32, i32) {
    let script = asset("fdlimit.py");
    let script = script.to_str().unwrap();
    let port_arg = port.to_string();
    lab.spawn("b", via, "python3", &[script, "server", &port_arg], &format!("fdlimit-{port}.log")).unwrap();
    lab.wait_listening("b", port).unwrap();
    let out = lab.run_ok("a", via, "python3", &[script, "client", "10.10.0.3", &port_arg, &soft.to_string()]).unwrap();
    let fields: Vec<i64> = out.split_whitespace().map(|f| f.parse().unwrap()).collect();
    (fields[0] as u32, fields[1] as i32)
}

#[test]
fn a_client_runs_out_of_descriptors_where_the_kernel_path_does() {
    let mut lab = Lab::start("tfdlimit", TWO_GUESTS).unwrap();
    let (kernel, kernel_errno) = held(&mut lab, Via::Kernel, 7001, 1024);
    let (vsocket, vsocket_errno) = held(&mut lab, Via::Vsocket, 7002, 1024);
    eprintln!("connections held at RLIMIT_NOFILE 1024: kernel {kernel}, vSocket {vsocket}");
    assert_eq!(kernel_errno, libc::EMFILE);
    assert_eq!(vsocket_errno, libc::EMFILE, "vSocket's connect failed otherwise: held {vsocket}");
    assert!(kernel > 1000, "kernel path held {kernel}");
    assert!(vsocket.abs_diff(kernel) <= 3, "vSocket held {vsocket}, the kernel path {kernel}");
    // They were vSocket connections, but for the last few: at the limit the
    // descriptors a vSocket connection arrives with have no room even for
    // a moment, and that connect takes the kernel path.
    let brokered = lab.counter("a", "connections_out");
    assert!(brokered + 3 >= u64::from(vsocket), "{brokered} brokered: {}", lab.guest("a").unwrap());
}
