#!/usr/bin/env python3
"""A plain echo server on ADDR PORT (run without the library: the kernel side of a relay)."""
import socket
import sys

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(4)
while True:
    conn, _ = listener.accept()
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()
