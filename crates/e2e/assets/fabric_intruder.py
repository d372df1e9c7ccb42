#!/usr/bin/env python3
"""Claims to be a fabric host: fabric_intruder.py SOURCE_IP HOST:PORT NAME

Connects from SOURCE_IP to a vsocketd's fabric address, says Hello as host
NAME, and prints "closed" if the daemon then closes the link (within 10 s),
"open" if it keeps talking to us.
"""
import socket
import struct
import sys

source, target, name = sys.argv[1], sys.argv[2], sys.argv[3]
host, port = target.rsplit(":", 1)
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.bind((source, 0))
sock.connect((host, int(port)))
# Hello: protocol version 2, a 16-byte nonce, the name.
payload = struct.pack("<I", 2) + bytes(16) + bytes([len(name)]) + name.encode()
# Header: payload length, kind 1 (Hello), origin 0, two zero bytes, id 0.
sock.sendall(struct.pack("<IBBHQ", len(payload), 1, 0, 0, 0) + payload)
sock.settimeout(10)
try:
    while sock.recv(4096):
        pass
    print("closed")
except ConnectionResetError:
    print("closed")
except socket.timeout:
    print("open")
