#!/usr/bin/env python3
"""A VM guest that scribbles over its own region while it holds connections.

    vm_hostile.py hold ADDR PORT     (run with libvsocket.so loaded)
    vm_hostile.py scribble           (run by `hold`, without the library)

`hold` opens four connections to a redis-server over vSocket, runs
`scribble` (a process without the library, as root, mapping the region
through its PCI device) which writes random bytes over every page's header
and control lines and forged indices all over the region, then uses the
old connections (each may fail, none may hang: every call has a timeout)
and makes a new connection, which must work. It prints what it saw.
"""
import glob
import mmap
import os
import random
import socket
import subprocess
import sys


def region_file():
    for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
        ids = [open(os.path.join(dev, name)).read().strip() for name in ("vendor", "device")]
        if ids == ["0x1af4", "0x1110"]:
            return os.path.join(dev, "resource2")
    raise SystemExit("no region device")


def scribble():
    fd = os.open(region_file(), os.O_RDWR)
    region = mmap.mmap(fd, 0)
    size = len(region)
    rng = random.Random(2019)
    # Every page's first 512 bytes: each half's header and its control
    # lines (indices, flags, holders) wherever a piece starts.
    for page in range(0, size, 4096):
        region[page:page + 512] = rng.randbytes(512)
    forged = [2**63, 2**40, 0, 2**64 - 1, 4096, 2**32 + 17]
    for _ in range(50000):
        at = rng.randrange(0, size - 8) & ~7
        value = rng.choice(forged) if rng.random() < 0.5 else int.from_bytes(rng.randbytes(8), "little")
        region[at:at + 8] = value.to_bytes(8, "little")
    print("scribbled", size, flush=True)


def ping(sock):
    sock.sendall(b"PING\r\n")
    return sock.recv(64) == b"+PONG\r\n"


def hold(addr, port):
    conns = []
    for _ in range(4):
        sock = socket.create_connection((addr, port), timeout=5)
        assert ping(sock)
        conns.append(sock)
    print("held", len(conns), flush=True)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    subprocess.run([sys.executable, __file__, "scribble"], env=env, check=True)
    answered = 0
    for sock in conns:
        try:
            answered += ping(sock)
        except OSError:
            pass
    print("old connections that still answer", answered, flush=True)
    for sock in conns:
        sock.close()
    fresh = socket.create_connection((addr, port), timeout=5)
    print("fresh", "PONG" if ping(fresh) else "broken", flush=True)
    fresh.close()


if __name__ == "__main__":
    if sys.argv[1] == "scribble":
        scribble()
    else:
        hold(sys.argv[2], int(sys.argv[3]))
