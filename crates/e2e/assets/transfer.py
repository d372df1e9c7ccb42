#!/usr/bin/env python3
"""Checksummed bulk transfer over TCP, both ends driven by epoll.

    transfer.py serve ADDR PORT
    transfer.py rounds ADDR PORT STOPFILE
    transfer.py send ADDR PORT BYTES SEED

The sender streams BYTES of pseudo-random data (from SEED) in random chunk
sizes, non-blocking, waiting with epoll; the server reads with epoll in
random chunk sizes. Each prints "bytes=N sha256=HEX", so a test can check
that what arrived is exactly what was sent. `rounds` serves one sender
after another, each as `serve` does, until the file STOPFILE exists.
"""
import hashlib
import random
import select
import socket
import sys


def serve(addr, port):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(16)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    conn = None
    digest = hashlib.sha256()
    total = 0
    rng = random.Random(7)
    while True:
        for fd, events in ep.poll(30):
            if fd == listener.fileno():
                conn, _ = listener.accept()
                conn.setblocking(False)
                ep.register(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
                continue
            while True:
                try:
                    chunk = conn.recv(rng.randint(1, 1 << 18))
                except BlockingIOError:
                    break
                if not chunk:
                    print(f"bytes={total} sha256={digest.hexdigest()}", flush=True)
                    return
                digest.update(chunk)
                total += len(chunk)


def send(addr, port, nbytes, seed):
    rng = random.Random(seed)
    sock = socket.create_connection((addr, port))
    sock.setblocking(False)
    ep = select.epoll()
    ep.register(sock.fileno(), select.EPOLLOUT)
    digest = hashlib.sha256()
    sent = 0
    block = b""
    offset = 0
    while sent < nbytes:
        if offset == len(block):
            block = rng.randbytes(min(1 << 20, nbytes - sent))
            digest.update(block)
            offset = 0
        size = min(rng.randint(1, 1 << 17), len(block) - offset)
        try:
            n = sock.send(memoryview(block)[offset:offset + size])
        except BlockingIOError:
            ep.poll(30)
            continue
        offset += n
        sent += n
    sock.shutdown(socket.SHUT_WR)
    sock.setblocking(True)
    sock.recv(1)
    print(f"bytes={sent} sha256={digest.hexdigest()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "rounds":
        import os
        while not os.path.exists(sys.argv[4]):
            serve(sys.argv[2], int(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
