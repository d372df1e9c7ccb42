#!/usr/bin/env python3
"""Load for the soak test: echo servers and checking clients.

    soak.py serve PORT               echo server, a thread per connection
    soak.py forkserve PORT           echo server, a forked child per connection
    soak.py client HOST PORT SECONDS SEED MAXBYTES
                                     connection after connection for SECONDS:
                                     send a random payload (up to MAXBYTES, in
                                     random chunk sizes), half-close, read the
                                     echo to its end and compare it

The client prints one line: "ok=N failed=M corrupt=K hung=H". A connection
that fails (reset, refused) is counted as failed; one whose echo ends
normally but differs from what was sent is corrupt; one where a call
outlasted the timeout (20 s) is hung.
"""
import hashlib
import os
import random
import signal
import socket
import sys
import threading
import time

TIMEOUT = 20


def echo(conn):
    with conn:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)


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


def one(host, port, rng, maxbytes):
    payload = rng.randbytes(rng.randint(1, maxbytes))
    with socket.create_connection((host, port), timeout=TIMEOUT) as conn:
        sent = 0

        def send():
            nonlocal sent
            while sent < len(payload):
                n = rng_send.randint(1, 65536)
                conn.sendall(payload[sent:sent + n])
                sent += n
            conn.shutdown(socket.SHUT_WR)

        rng_send = random.Random(rng.random())
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = hashlib.sha256()
        length = 0
        while True:
            chunk = conn.recv(rng.randint(1, 65536))
            if not chunk:
                break
            got.update(chunk)
            length += len(chunk)
        sender.join(TIMEOUT)
        if sender.is_alive():
            raise socket.timeout("send")
    if length != len(payload) or got.digest() != hashlib.sha256(payload).digest():
        return "corrupt"
    return "ok"


def client(host, port, seconds, seed, maxbytes):
    rng = random.Random(seed)
    counts = {"ok": 0, "failed": 0, "corrupt": 0, "hung": 0}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            counts[one(host, port, rng, maxbytes)] += 1
        except socket.timeout:
            counts["hung"] += 1
        except OSError:
            counts["failed"] += 1
    print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]))
    elif mode == "forkserve":
        forkserve(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
