#!/usr/bin/env python3
"""A server that accepts only late, to show that connections wait for it
whole, as in a kernel backlog.

    late_accept.py GOFILE N [cramped]

Listens on 10.10.0.3:7000, waits for GOFILE to exist, then accepts N
connections, reads each to its end and prints what each brought, sorted,
on one line.

cramped: it runs out of descriptors twice (its soft RLIMIT_NOFILE at
512, every free one taken): after the first two connections (the
daemon's, before the batch of kits the second brought is read) and after
the third (a kit: the batch is read). Each time its accept must fail with
EMFILE, printed as "emfile"; it then gives the descriptors back and goes
on.
"""
import errno
import os
import resource
import socket
import sys
import time

go, count = sys.argv[1], int(sys.argv[2])
cramped = sys.argv[3:] == ["cramped"]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.10.0.3", 7000))
s.listen(64)
while not os.path.exists(go):
    time.sleep(0.02)
s.settimeout(10)
got = []


def take():
    c, _ = s.accept()
    c.settimeout(10)
    data = b""
    while True:
        b = c.recv(4096)
        if not b:
            break
        data += b
    got.append(data.decode())
    c.close()


def out_of_descriptors():
    fillers = []
    try:
        while True:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        assert e.errno == errno.EMFILE, e
    try:
        s.accept()
        print("accepted with no descriptor free", flush=True)
        sys.exit(1)
    except OSError as e:
        print(errno.errorcode[e.errno].lower(), flush=True)
    for f in fillers:
        os.close(f)


if cramped:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    take()
    take()
    out_of_descriptors()
    take()
    out_of_descriptors()
    count -= 3
for _ in range(count):
    take()
print(" ".join(sorted(got)), flush=True)
