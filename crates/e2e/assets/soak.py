#!/usr/bin/env python3
"""Load for the soak test: echo servers and the programs that check them.

    soak.py serve PORT               echo server, a thread per connection
    soak.py forkserve PORT           echo server, a forked child per connection
    soak.py transfer HOST PORTS CONTROL SEED MAXBYTES
                                     connection after connection, each to one
                                     of PORTS (comma-separated): send a
                                     pseudo-random payload (up to MAXBYTES, in
                                     random chunk sizes) from a second thread,
                                     half-close, read the echo in random chunk
                                     sizes to its end, compare length and digest
    soak.py churn HOST PORTS CONTROL SEED
                                     connect and close, again and again (now
                                     and then half-closing and reading the
                                     server's end of stream first)
    soak.py bench HOST PORT CONTROL REQUESTS
                                     redis-benchmark runs, one after another,
                                     alternating a connection per request and
                                     kept connections

CONTROL is a file the test writes: "run", "pause" or "stop". Between
connections (or benchmark runs) each program reads it; on "pause" it writes
"paused" to CONTROL.<its mode> and waits; on "stop" it prints one line and
exits:

    ok=N failed=M corrupt=K hung=H [incr=I]

A connection (or benchmark run) that fails with an error (reset, refused,
a non-zero exit) is failed; one where every send succeeded and the echo
ended normally but differs from what was sent is corrupt (each is also
described on stderr); one where a call outlasted TIMEOUT is hung. `incr` is
how many INCRs the successful benchmark runs made, so that the test can
compare it with the counter in redis.
"""
import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

TIMEOUT = 20


def echo(conn):
    try:
        with conn:
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
    except OSError:
        # A client that closed without reading the echo; nothing to check.
        pass


def listener(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(128)
    return s


def serve(port):
    s = listener(port)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def forkserve(port):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    s = listener(port)
    while True:
        conn, _ = s.accept()
        if os.fork() == 0:
            s.close()
            try:
                echo(conn)
            finally:
                os._exit(0)
        conn.close()


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def transfer_one(host, ports, rng, maxbytes, number):
    port = rng.choice(ports)
    payload = rng.randbytes(rng.randint(1, maxbytes))
    send_rng = random.Random(rng.random())
    send_error = []
    with socket.create_connection((host, port), timeout=TIMEOUT) as conn:

        def send():
            try:
                sent = 0
                while sent < len(payload):
                    n = send_rng.randint(1, 65536)
                    conn.sendall(payload[sent:sent + n])
                    sent += n
                conn.shutdown(socket.SHUT_WR)
            except OSError as e:
                send_error.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = bytearray()
        while chunk := conn.recv(rng.randint(1, 65536)):
            received += chunk
        sender.join(TIMEOUT)
        if sender.is_alive():
            raise socket.timeout("send")
    if send_error:
        raise send_error[0]
    if len(received) != len(payload) or hashlib.sha256(received).digest() != hashlib.sha256(payload).digest():
        print(f"corrupt: connection {number} (to port {port}): sent {len(payload)} bytes, the echo had {len(received)}, "
              f"first difference at byte {first_difference(payload, received)}", file=sys.stderr, flush=True)
        return "corrupt"
    return "ok"


def churn_one(host, ports, rng):
    port = rng.choice(ports)
    with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
        if rng.random() < 0.3:
            conn.shutdown(socket.SHUT_WR)
            if conn.recv(1) != b"":
                return "corrupt"
    return "ok"


def bench_one(host, port, requests, reconnect):
    """One redis-benchmark run; its outcome and the INCRs it made."""
    args = ["redis-benchmark", "-h", host, "-p", str(port), "-c", "4", "-n", str(requests),
            "-k", "0" if reconnect else "1", "-t", "set,get,incr", "-q"]
    try:
        run = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT * 3)
    except subprocess.TimeoutExpired:
        return "hung", 0
    if run.returncode != 0:
        print(f"redis-benchmark failed ({run.returncode}): {run.stderr.decode(errors='replace').strip()}",
              file=sys.stderr, flush=True)
        return "failed", 0
    return "ok", requests


def controlled(control, name, one):
    """Calls `one()` until CONTROL says stop, pausing when it says pause."""
    counts = {"ok": 0, "failed": 0, "corrupt": 0, "hung": 0}
    acknowledged = None
    while True:
        with open(control) as f:
            state = f.read().strip()
        if state == "stop":
            return counts
        if state == "pause":
            if acknowledged != "paused":
                with open(f"{control}.{name}", "w") as f:
                    f.write("paused")
                acknowledged = "paused"
            time.sleep(0.02)
            continue
        acknowledged = None
        try:
            counts[one()] += 1
        except socket.timeout:
            counts["hung"] += 1
        except OSError:
            counts["failed"] += 1


def ports_of(text):
    return [int(p) for p in text.split(",")]


def report(counts, **extra):
    fields = {**counts, **extra}
    print(" ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def main():
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]))
    elif mode == "forkserve":
        forkserve(int(sys.argv[2]))
    elif mode == "transfer":
        host, ports, control, seed, maxbytes = sys.argv[2], ports_of(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(
            sys.argv[6])
        rng = random.Random(seed)
        number = iter(range(1 << 62))
        report(controlled(control, mode, lambda: transfer_one(host, ports, rng, maxbytes, next(number))))
    elif mode == "churn":
        host, ports, control, seed = sys.argv[2], ports_of(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        rng = random.Random(seed)
        report(controlled(control, mode, lambda: churn_one(host, ports, rng)))
    elif mode == "bench":
        host, port, control, requests = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        runs = iter(range(1 << 62))
        incr = 0

        def one():
            nonlocal incr
            outcome, made = bench_one(host, port, requests, next(runs) % 2 == 0)
            incr += made
            return outcome

        report(controlled(control, mode, one), incr=incr)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
