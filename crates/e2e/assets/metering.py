"""Moves exactly known numbers of bytes, for the metering tests.

serve HOST PORT        for each connection: read an 8-byte big-endian M,
                       then everything up to EOF; answer M bytes; close.
client HOST PORT N:M.. one connection per pair: send the header and N bytes,
                       shut down writing, read to EOF and check M bytes came
                       back; print "LOCALPORT SENT RECEIVED" (SENT = 8 + N).
slow HOST PORT SECONDS BYTES_PER_SECOND
                       one connection sending a tenth of the rate every
                       100 ms for SECONDS, then as for client with M = 0.
probe HOST PORT        connect with a 2 s timeout; print the outcome.
"""
import socket
import struct
import sys
import time


def serve(host, port):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        with conn:
            header = b""
            while len(header) < 8:
                chunk = conn.recv(8 - len(header))
                if not chunk:
                    break
                header += chunk
            if len(header) < 8:
                continue
            (reply,) = struct.unpack(">Q", header)
            while conn.recv(1 << 16):
                pass
            block = b"r" * 65536
            while reply:
                n = conn.send(block[: min(reply, len(block))])
                reply -= n


def finish(sock, expected):
    sock.shutdown(socket.SHUT_WR)
    got = 0
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        got += len(chunk)
    if got != expected:
        sys.exit(f"expected {expected} bytes back, got {got}")
    return got


def client(host, port, pairs):
    for pair in pairs:
        n, m = (int(x) for x in pair.split(":"))
        with socket.create_connection((host, port)) as sock:
            local_port = sock.getsockname()[1]
            sock.sendall(struct.pack(">Q", m) + b"s" * n)
            finish(sock, m)
            print(local_port, 8 + n, m, flush=True)


def slow(host, port, seconds, rate):
    with socket.create_connection((host, port)) as sock:
        sock.sendall(struct.pack(">Q", 0))
        chunk = b"s" * (rate // 10)
        sent = 8
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
            time.sleep(0.1)
        finish(sock, 0)
        print(sock.getsockname()[1], sent, 0, flush=True)


def probe(host, port):
    sock = socket.socket()
    sock.settimeout(2.0)
    try:
        sock.connect((host, port))
        print("connected")
    except socket.timeout:
        print("timeout")
    except OSError as e:
        print("error", e.errno)


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        serve(host, port)
    elif mode == "client":
        client(host, port, sys.argv[4:])
    elif mode == "slow":
        slow(host, port, float(sys.argv[4]), int(sys.argv[5]))
    elif mode == "probe":
        probe(host, port)
    else:
        sys.exit(f"unknown mode {mode}")


main()
