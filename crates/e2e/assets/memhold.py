#!/usr/bin/env python3
"""Connections that hold memory, for the benchmark's memory rows.

Usage:
    memhold.py server ADDR PORT MODE
    memhold.py client ADDR PORT N BYTES MODE

MODE idle: each client sends BYTES, the server echoes them, the client reads
them back; then the connection says nothing more (an idle connection that
has been used). MODE busy: each client sends BYTES, which the server never
reads (a connection with data in flight); with BYTES 0, a connection that
has said nothing at all (the benchmark's idle-mix row holds such).

The server prints "listening" once it listens and runs until killed. The
client prints "held N" once all N connections are in their state (or
"failed after K: ERROR"), then holds them until its input ends.
"""
import resource
import selectors
import socket
import sys


def room():
    """Raises the soft descriptor limit to the hard one. A lower soft limit
    (just what the connections need) would leave the vSocket library too
    little room of its own above it for connections made ahead, and every
    connect would go through vsocketd instead, at three descriptors a
    connection in this process and more in the daemon."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def server(addr, port, mode):
    room()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((addr, port))
    lsock.listen(4096)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    print("listening", flush=True)
    held = []
    while True:
        for key, _ in sel.select():
            if key.fileobj is lsock:
                conn, _ = lsock.accept()
                held.append(conn)
                if mode == "idle":
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
            else:
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                if data:
                    key.fileobj.setblocking(True)
                    key.fileobj.sendall(data)
                    key.fileobj.setblocking(False)
                else:
                    sel.unregister(key.fileobj)


def client(addr, port, n, size, mode):
    room()
    payload = b"m" * size
    held = []
    for i in range(n):
        s = socket.socket()
        try:
            s.connect((addr, port))
            if payload:
                s.sendall(payload)
            if mode == "idle":
                got = 0
                while got < size:
                    chunk = s.recv(size - got)
                    if not chunk:
                        raise OSError("closed by the server")
                    got += len(chunk)
        except OSError as e:
            print(f"failed after {i}: {e}", flush=True)
            sys.exit(1)
        held.append(s)
    print(f"held {len(held)}", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "server":
        server(args[0], int(args[1]), args[2])
    elif cmd == "client":
        client(args[0], int(args[1]), int(args[2]), int(args[3]), args[4])
    else:
        sys.exit(__doc__)
