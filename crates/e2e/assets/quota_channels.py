#!/usr/bin/env python3
"""Opens LISTENERS listening sockets on ports 7100, 7101, ... (each a
control channel to vsocketd), then connects to ADDR PORT and echoes a byte.
Prints "listening K" and "connected" (or "errno E"), then waits for the file
GO to exist before exiting."""
import os
import socket
import sys
import time

addr, port, listeners, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
held = []
for i in range(listeners):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7100 + i))
    s.listen(8)
    held.append(s)
print(f"listening {len(held)}", flush=True)
c = socket.socket()
try:
    c.connect((addr, port))
    c.sendall(b"z")
    assert c.recv(1) == b"z"
    print("connected", flush=True)
except OSError as e:
    print(f"errno {e.errno}", flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
