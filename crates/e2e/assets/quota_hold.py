#!/usr/bin/env python3
"""Holds N connections to ADDR PORT open (each checked with an echoed byte),
tries one more, and prints what became of each step:

    held N
    extra connected | extra errno E
    extra_async connected | extra_async errno E   (the same, by asyncio)
    again connected | again errno E

It waits for the file GO to exist before closing the N and connecting once
more ("again"), retrying for up to 10 s while that fails (the server
closes its ends a moment after the client does)."""
import asyncio
import os
import socket
import sys
import time

addr, port, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]


def connect():
    s = socket.socket()
    try:
        s.connect((addr, port))
        return s, 0
    except OSError as e:
        s.close()
        return None, e.errno


def outcome(s, err):
    return "connected" if s else f"errno {err}"


held = []
for i in range(n):
    s, err = connect()
    if s is None:
        print(f"held {i} errno {err}", flush=True)
        sys.exit(1)
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    held.append(s)
print(f"held {len(held)}", flush=True)
s, err = connect()
print(f"extra {outcome(s, err)}", flush=True)


async def extra_async():
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(addr, port), 10)
        writer.write(b"a")
        await writer.drain()
        writer.close()
        return "connected"
    except OSError as e:
        return f"errno {e.errno}"


print(f"extra_async {asyncio.run(extra_async())}", flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
for s in held:
    s.close()
deadline = time.time() + 10
while True:
    s, err = connect()
    if s or time.time() > deadline:
        break
    time.sleep(0.05)
if s:
    s.sendall(b"y")
    assert s.recv(1) == b"y"
print(f"again {outcome(s, err)}", flush=True)
