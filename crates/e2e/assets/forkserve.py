#!/usr/bin/env python3
"""Accept-then-fork, the pattern of inetd-style and pre-threading servers.

    forkserve.py serve ADDR PORT COUNT
    forkserve.py client ADDR PORT

The server accepts COUNT connections; for each it forks, the parent closes
its copy at once, and the child (after a pause) answers "child:" + request
and exits. The client prints what it received up to end of stream.
"""
import os
import socket
import sys
import time


def serve(addr, port, count):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(8)
    children = []
    for _ in range(count):
        conn, _ = listener.accept()
        pid = os.fork()
        if pid == 0:
            listener.close()
            time.sleep(0.3)
            request = conn.recv(100)
            conn.sendall(b"child:" + request)
            conn.close()
            os._exit(0)
        conn.close()
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)


def client(addr, port):
    sock = socket.create_connection((addr, port))
    sock.sendall(b"hello")
    reply = b""
    while True:
        chunk = sock.recv(100)
        if not chunk:
            break
        reply += chunk
    print(reply.decode(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        client(sys.argv[2], int(sys.argv[3]))
