#!/usr/bin/env python3
"""memcached text protocol check: `memcached_check.py ADDR PORT`.

Sets 300 keys with values of varied sizes (empty, small, a few KiB, and
up to about 1 MB, under memcached's default 1 MiB item limit; random bytes,
so also CR and LF) and flags, reads every one back with `get`, then all of
them again with multi-key `get`s, compares values and flags byte for byte,
and prints "memcached ok KEYS BYTES"."""
import random
import socket
import sys

KEYS = 300


class Client:
    def __init__(self, addr, port):
        self.sock = socket.create_connection((addr, port))
        self.buf = bytearray()

    def line(self):
        while (end := self.buf.find(b"\r\n")) < 0:
            self.fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def exactly(self, n):
        while len(self.buf) < n:
            self.fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def fill(self):
        chunk = self.sock.recv(65536)
        assert chunk, "memcached closed the connection"
        self.buf += chunk

    def set(self, key, flags, value):
        self.sock.sendall(b"set %s %d 0 %d\r\n" % (key, flags, len(value)) + value + b"\r\n")
        reply = self.line()
        assert reply == b"STORED", f"set {key}: {reply!r}"

    def get(self, keys):
        self.sock.sendall(b"get " + b" ".join(keys) + b"\r\n")
        found = {}
        while (header := self.line()) != b"END":
            word, key, flags, size = header.split(b" ")
            assert word == b"VALUE", f"get: {header!r}"
            found[key] = (int(flags), self.exactly(int(size)))
            assert self.exactly(2) == b"\r\n", f"get {key}: value not followed by CRLF"
        return found


def size_for(i, rng):
    if i % 50 == 7:
        return rng.randrange(300_000, 1_000_000)
    if i % 10 == 3:
        return rng.randrange(10_000, 120_000)
    if i % 37 == 0:
        return 0
    return rng.randrange(1, 3_000)


def main(addr, port):
    rng = random.Random(20240611)
    values = {}
    for i in range(KEYS):
        values[b"key:%04d" % i] = (i * 7919 % 65536, rng.randbytes(size_for(i, rng)))
    writer = Client(addr, port)
    for key, (flags, value) in values.items():
        writer.set(key, flags, value)
    reader = Client(addr, port)
    for key, expected in values.items():
        got = reader.get([key])
        assert got == {key: expected}, f"get {key}: came back different"
    keys = list(values)
    for start in range(0, len(keys), 40):
        batch = keys[start : start + 40]
        got = reader.get(batch)
        assert got == {k: values[k] for k in batch}, f"multi-get from {batch[0]}: came back different"
    print("memcached ok", len(values), sum(len(v) for _, v in values.values()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
