//! Several waiters on one connection all wake promptly: no waiter withdraws
//! another's wake-up.

use vsocket_e2e::{compile, Lab, Via, TWO_GUESTS};

/// (largest, median) delay in microseconds between the end of a stream and
/// each of four waiters waking for it, over `rounds` connections, and which
/// waiter was the latest.
fn delays(lab: &Lab, via: Via, port: u16, rounds: u32) -> (u64, u64, String) {
    let exe = compile("waiters.c", &lab.dir).unwrap();
    let out = lab.run_ok("a", via, exe.to_str().unwrap(), &[&port.to_string(), &rounds.to_string()]).unwrap();
    let field = |name: &str| -> u64 {
        let part = out.split_whitespace().find(|f| f.starts_with(name)).unwrap_or_else(|| panic!("{out}"));
        part[name.len()..].parse().unwrap()
    };
    let worst = out.split_whitespace().find_map(|f| f.strip_prefix("worst=")).unwrap_or("?").to_owned();
    (field("max_us="), field("median_us="), worst)
}

#[test]
fn four_waiters_on_one_connection_wake_promptly() {
    let lab = Lab::start("twaiters", TWO_GUESTS).unwrap();
    let (kernel_max, kernel_median, _) = delays(&lab, Via::Kernel, 7201, 30);
    let (max, median, worst) = delays(&lab, Via::Vsocket, 7202, 30);
    eprintln!("wake-up delay, 4 waiters x 30 rounds: kernel max {kernel_max} us median {kernel_median} us; vSocket max {max} us median {median} us");
    assert!(lab.counter("a", "connections_out") >= 30, "{}", lab.guest("a").unwrap());
    // A waiter whose wake-up another took would sleep until the library's
    // 200 ms cap.
    assert!(max < 100_000, "a waiter ({worst}) woke {max} us after the end of the stream (median {median} us)");
}
