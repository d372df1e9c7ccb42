#!/usr/bin/env python3
"""Bursts of clients, each with a deadline.

    burst.py ADDR PORT WAVES CLIENTS TIMEOUT_S

WAVES times, CLIENTS connections at once each send "ping\\n" and read a
line; every step has TIMEOUT_S. Prints "served N of M" and the first
failures, and exits non-zero unless every client was answered "pong".
"""
import socket
import sys
import threading


def one(addr, port, timeout, results):
    try:
        sock = socket.create_connection((addr, port), timeout=timeout)
        sock.settimeout(timeout)
        sock.sendall(b"ping\n")
        reply = sock.recv(16)
        sock.close()
        results.append("ok" if reply == b"pong\n" else f"reply {reply!r}")
    except OSError as e:
        results.append(f"{type(e).__name__}: {e}")


def main():
    addr, port = sys.argv[1], int(sys.argv[2])
    waves, clients, timeout = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    results = []
    for _ in range(waves):
        threads = [threading.Thread(target=one, args=(addr, port, timeout, results)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    served = results.count("ok")
    print(f"served {served} of {len(results)}", flush=True)
    failures = [r for r in results if r != "ok"]
    for f in failures[:5]:
        print(f, flush=True)
    sys.exit(0 if not failures else 1)


if __name__ == "__main__":
    main()
