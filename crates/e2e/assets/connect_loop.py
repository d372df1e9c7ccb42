#!/usr/bin/env python3
"""Connects again and again from one process, as a client that opens a
connection per request does.

    connect_loop.py ADDR PORT N [STEPFILE M]

Makes N connections one after another (each sends a byte, waits for the
server's byte, closes) and prints a JSON line counting the outcomes
("ok", "errnoE", "timeout", "short"); then, given STEPFILE, waits for it
to exist and makes M more, printing a second line.
"""
import collections
import json
import os
import socket
import sys
import time


def one(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect((addr, port))
        s.sendall(b"x")
        return "ok" if s.recv(1) == b"x" else "short"
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return "errno%d" % e.errno
    finally:
        s.close()


def phase(addr, port, n):
    counts = collections.Counter(one(addr, port) for _ in range(n))
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    phase(addr, port, n)
    if len(sys.argv) > 4:
        step, m = sys.argv[4], int(sys.argv[5])
        while not os.path.exists(step):
            time.sleep(0.05)
        phase(addr, port, m)
