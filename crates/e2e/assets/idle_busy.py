#!/usr/bin/env python3
"""Many connections, a few busy at a time, on one selector (epoll):

    idle_busy.py ADDR PORT CONNECTIONS ROUNDS

Opens CONNECTIONS connections to an echo server (selectors_echo.py serve),
then for ROUNDS rounds takes a few of them out of the selector and back
in, as event loops do, and sends a numbered message on each, chosen
at random so that most have been idle a while (long enough to leave the
server's and this client's epoll scans), and waits in one selector for
every echo (no wait may report one connection twice). Between rounds it
pauses a few milliseconds now and then, and twice for longer than the
library's 200 ms sweep. Every echo is checked
byte for byte. Prints "idle_busy ok CONNECTIONS ROUNDS", or exits 1 naming
the first wrong or missing echo (each round has 10 s)."""
import random
import selectors
import socket
import sys
import time

addr, port = sys.argv[1], int(sys.argv[2])
count, rounds = int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(7)
sel = selectors.DefaultSelector()
conns = []
for i in range(count):
    s = socket.create_connection((addr, port))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, i)
    conns.append(s)

for r in range(rounds):
    busy = rng.sample(range(count), rng.randint(1, 8))
    expected = {}
    for i in busy:
        # As event loops do (libuv): out of the set and back in around a
        # request, under the same number.
        sel.unregister(conns[i])
        sel.register(conns[i], selectors.EVENT_READ, i)
        message = f"round {r} connection {i} {'x' * rng.randint(0, 3000)}\n".encode()
        conns[i].sendall(message)
        expected[i] = message
    got = {i: b"" for i in busy}
    deadline = time.monotonic() + 10
    while any(len(got[i]) < len(expected[i]) for i in busy):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = [i for i in busy if len(got[i]) < len(expected[i])]
            print(f"round {r}: no full echo on {missing} in 10 s", flush=True)
            sys.exit(1)
        events = sel.select(timeout=left)
        fds = [key.fd for key, _ in events]
        if len(set(fds)) != len(fds):
            print(f"round {r}: one wait reported a connection twice: {sorted(fds)}", flush=True)
            sys.exit(1)
        for key, _ in events:
            i = key.data
            data = key.fileobj.recv(65536)
            if i not in got or not data:
                print(f"round {r}: connection {i} said {data!r} out of turn", flush=True)
                sys.exit(1)
            got[i] += data
    for i in busy:
        if got[i] != expected[i]:
            print(f"round {r}: connection {i} echoed {got[i][:60]!r}, not {expected[i][:60]!r}", flush=True)
            sys.exit(1)
    if r in (rounds // 3, 2 * rounds // 3):
        time.sleep(0.3)
    elif rng.random() < 0.2:
        time.sleep(rng.uniform(0.001, 0.005))

for s in conns:
    s.close()
print(f"idle_busy ok {count} {rounds}", flush=True)
