#!/usr/bin/env python3
"""A stalled reader beside a busy connection between the same two guests.

    stall.py serve ADDR PORT
    stall.py run ADDR PORT BYTES

The server accepts two connections. The first ("stalled") it does not read
until the client says so on the second; the second ("busy") it reads to
the end, checksumming, and answers with the digest.

The client fills the stalled connection until a non-blocking send would
block (so the whole path to the server is full), then sends BYTES on the
busy one and reads back the digest. It prints "busy_ok stalled_bytes=N"
when the busy transfer arrived intact while the stalled connection stayed
full, and finally checks that every stalled byte arrives once the server
reads it.
"""
import hashlib
import socket
import sys
import time


def pattern(n, offset=0):
    return bytes((offset + i) % 251 for i in range(n))


def read_line(sock):
    """Bytes up to and including a newline, or all there were at the end."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        line += chunk
    return line


def serve(addr, port):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(4)
    stalled, _ = listener.accept()
    busy, _ = listener.accept()
    digest = hashlib.sha256()
    want = int(read_line(busy))
    got = 0
    while got < want:
        chunk = busy.recv(1 << 16)
        if not chunk:
            break
        digest.update(chunk)
        got += len(chunk)
    busy.sendall(f"{got} {digest.hexdigest()}\n".encode())
    # Now drain the stalled connection, checking its pattern.
    total = 0
    ok = True
    while True:
        chunk = stalled.recv(1 << 16)
        if not chunk:
            break
        if chunk != pattern(len(chunk), total):
            ok = False
        total += len(chunk)
    stalled.sendall(f"{total} {'intact' if ok else 'CORRUPT'}\n".encode())
    stalled.close()


def run(addr, port, nbytes):
    stalled = socket.create_connection((addr, port))
    time.sleep(0.2)
    busy = socket.create_connection((addr, port))
    stalled.setblocking(False)
    filled = 0
    quiet_since = time.time()
    # Fill until sends have been refused for a while (every buffer on the
    # way is full and nothing moves).
    while time.time() - quiet_since < 1.0:
        try:
            n = stalled.send(pattern(65536, filled % 251))
            filled += n
            quiet_since = time.time()
        except BlockingIOError:
            time.sleep(0.01)
    digest = hashlib.sha256()
    busy.sendall(f"{nbytes}\n".encode())
    sent = 0
    block = pattern(1 << 20)
    start = time.time()
    while sent < nbytes:
        part = block[: min(len(block), nbytes - sent)]
        busy.sendall(part)
        digest.update(part)
        sent += len(part)
    answer = read_line(busy)
    elapsed = time.time() - start
    expected = f"{nbytes} {digest.hexdigest()}"
    if answer.decode().strip() != expected:
        print(f"busy_corrupt answer={answer!r}", flush=True)
        sys.exit(1)
    print(f"busy_ok stalled_bytes={filled} seconds={elapsed:.2f}", flush=True)
    stalled.setblocking(True)
    stalled.shutdown(socket.SHUT_WR)
    answer = read_line(stalled)
    print(f"stalled_end {answer.decode().strip()}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
