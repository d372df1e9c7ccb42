#!/usr/bin/env python3
"""Opens N connections to ADDR PORT and holds them, idle, until its input
ends: prints "held N" once all are open (or "failed after K: ERROR").

Usage: idle_clients.py ADDR PORT N"""
import resource
import socket
import sys

addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Room for N sockets and whatever each costs beside its descriptor.
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = max(hard, 8 * n + 1024)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (2 * n + 1024, want))
except (ValueError, OSError):
    pass
held = []
for i in range(n):
    s = socket.socket()
    try:
        s.connect((addr, port))
    except OSError as e:
        print(f"failed after {i}: {e}", flush=True)
        sys.exit(1)
    held.append(s)
print(f"held {len(held)}", flush=True)
sys.stdin.read()
