#!/usr/bin/env python3
"""A misbehaving peer host: fabric_peer.py SOURCE_IP HOST:PORT NAME VPC LISTENER:PORT [KEY_FILE]

Speaks the tcp fabric's frames to a vsocketd as host NAME (from that host's
own address, so the Hello is accepted; with KEY_FILE, proving the fabric
key as a compromised host can), then:
1. opens a stream claiming a client guest that NAME does not host
   ("b" at 10.10.0.3): expects Refuse;
2. opens a stream from guest "a" (10.10.0.2), which NAME does host, to
   LISTENER (whose program never reads): expects Accept;
3. sends more than the window the Accept allowed: expects Reset of that
   stream, with the link still up (a Ping still comes).
Prints one line per step: "refused", "accepted WINDOW", "reset", "alive".
"""
import hashlib
import hmac
import os
import socket
import struct
import sys
import time

HELLO, OPEN, ACCEPT, REFUSE, DATA, CREDIT, FIN, RESET, PING, PROOF = range(1, 11)


def frame(kind, ident, payload=b"", origin=0):
    return struct.pack("<IBBHQ", len(payload), kind, origin, 0, ident) + payload


def name(text):
    return bytes([len(text)]) + text.encode()


def addr(text):
    ip, port = text.rsplit(":", 1)
    return socket.inet_aton(ip) + struct.pack("<H", int(port))


class Link:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def next(self, timeout=10):
        deadline = time.time() + timeout
        while True:
            if len(self.buf) >= 16:
                length, kind, origin, _, ident = struct.unpack("<IBBHQ", self.buf[:16])
                if len(self.buf) >= 16 + length:
                    payload = self.buf[16:16 + length]
                    self.buf = self.buf[16 + length:]
                    return kind, origin, ident, payload
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("no frame")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("link closed")
            self.buf += chunk

    def expect(self, kinds, ident=None):
        while True:
            kind, origin, got, payload = self.next()
            if kind in kinds and (ident is None or got == ident):
                return kind, payload


source, target, me, vpc, listener = sys.argv[1:6]
host, port = target.rsplit(":", 1)
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.bind((source, 0))
sock.connect((host, int(port)))
link = Link(sock)
nonce = os.urandom(16)
sock.sendall(frame(HELLO, 0, struct.pack("<I", 2) + nonce + name(me)))
_, hello = link.expect({HELLO})
if len(sys.argv) > 6:
    # The proof vsocketd expects (crates/daemon/src/fabric/auth.rs).
    with open(sys.argv[6], "rb") as f:
        key = f.read().rstrip()
    theirs, their_nonce = hello[21:].decode(), hello[4:20]
    msg = b"vsocket fabric link proof v2"
    for n in (me, theirs):
        msg += struct.pack("<I", len(n)) + n.encode()
    msg += nonce + their_nonce
    sock.sendall(frame(PROOF, 0, hmac.new(key, msg, hashlib.sha256).digest()))
    link.expect({PROOF})

# 1. A guest this host does not place here.
sock.sendall(frame(OPEN, 1, addr("10.10.0.3:41000") + addr(listener) + struct.pack("<I", 65536) + name(vpc) + name("b")))
kind, payload = link.expect({REFUSE, ACCEPT}, 1)
print("refused" if kind == REFUSE else "ACCEPTED-FORGED", flush=True)

# 2. A guest it does host.
sock.sendall(frame(OPEN, 2, addr("10.10.0.2:41001") + addr(listener) + struct.pack("<I", 65536) + name(vpc) + name("a")))
kind, payload = link.expect({REFUSE, ACCEPT}, 2)
if kind != ACCEPT:
    print("refused-valid", flush=True)
    sys.exit(1)
window = struct.unpack("<I", payload[:4])[0]
print(f"accepted {window}", flush=True)

# 3. More than the window, to a program that does not read.
sent = 0
chunk = b"x" * 65536
while sent <= window:
    sock.sendall(frame(DATA, 2, chunk, origin=0))
    sent += len(chunk)
link.expect({RESET}, 2)
print("reset", flush=True)
link.expect({PING})
print("alive", flush=True)
