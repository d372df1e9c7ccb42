#!/usr/bin/env python3
"""A connected socket shared with a forked child, used by the child, by the
parent, or by both in turn.

    forkturns.py ADDR PORT      (against an echo server; prints "turns ok")

Three connections:
  1. the child talks, exits; then the parent talks;
  2. the child exits at once without touching it; the parent talks;
  3. parent and child take five turns each (passing the turn over pipes),
     then the child exits and the parent talks last.
Each exchange sends a line and reads its echo back; the process that exits
last closes the socket, and the echo must then end (end of stream).
"""
import os
import socket
import sys


def exchange(sock, text):
    data = text.encode() + b"\n"
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        if not chunk:
            raise SystemExit(f"{os.getpid()}: end of stream during {text!r}")
        got += chunk
    if got != data:
        raise SystemExit(f"{os.getpid()}: sent {data!r}, echo {got!r}")


def finish(sock):
    sock.shutdown(socket.SHUT_WR)
    if sock.recv(1) != b"":
        raise SystemExit("data after our FIN")
    sock.close()


def waited(pid):
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"child failed: {status}")


def child_then_parent(addr):
    sock = socket.create_connection(addr)
    pid = os.fork()
    if pid == 0:
        exchange(sock, "child first")
        os._exit(0)
    waited(pid)
    exchange(sock, "then the parent")
    finish(sock)


def parent_only(addr):
    sock = socket.create_connection(addr)
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    waited(pid)
    exchange(sock, "the parent, after its child exited")
    finish(sock)


def in_turn(addr):
    sock = socket.create_connection(addr)
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        for i in range(5):
            os.read(to_child_r, 1)
            exchange(sock, f"child turn {i}")
            os.write(to_parent_w, b"t")
        os._exit(0)
    for i in range(5):
        exchange(sock, f"parent turn {i}")
        os.write(to_child_w, b"t")
        os.read(to_parent_r, 1)
    waited(pid)
    exchange(sock, "parent last")
    finish(sock)


if __name__ == "__main__":
    addr = (sys.argv[1], int(sys.argv[2]))
    child_then_parent(addr)
    parent_only(addr)
    in_turn(addr)
    print("turns ok")
