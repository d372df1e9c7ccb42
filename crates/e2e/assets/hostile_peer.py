#!/usr/bin/env python3
"""The honest side of the hostile-guest tests: a checking echo server and a
checking client, both speaking one fixed byte pattern.

    hostile_peer.py serve ADDR PORT
    hostile_peer.py steady ADDR PORT STOPFILE

The stream is the pattern byte(i) = (i % 251 + i // 251) & 0xff, from
offset 0 (scribbler.c sends the same). The server echoes every byte it
receives and checks it against the pattern; when a connection ends it
prints one JSON line: the client's port, the bytes received, how it ended
("eof", "reset", "epipe", "timeout", or "error N") and whether everything
received was the pattern (a prefix of what an honest client sends).

The steady client sends the pattern in round trips, checking every echoed
byte, until the file STOPFILE exists; it prints "ok bytes=N" or exits
non-zero.
"""
import errno
import json
import os
import socket
import sys
import threading

PERIOD = 251 * 256
BLOCK = bytes((i % 251 + i // 251) & 0xFF for i in range(PERIOD)) * 2


def pattern(offset, length):
    out = bytearray()
    while len(out) < length:
        start = (offset + len(out)) % PERIOD
        take = min(length - len(out), PERIOD)
        out += BLOCK[start : start + take]
    return bytes(out)


def serve_one(conn, port, lock):
    conn.settimeout(30)
    received = 0
    prefix = True
    end = "eof"
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            if prefix and chunk != pattern(received, len(chunk)):
                prefix = False
            received += len(chunk)
            conn.sendall(chunk)
    except ConnectionResetError:
        end = "reset"
    except BrokenPipeError:
        end = "epipe"
    except socket.timeout:
        end = "timeout"
    except OSError as e:
        end = f"error {errno.errorcode.get(e.errno, e.errno)}"
    finally:
        conn.close()
    with lock:
        print(json.dumps({"port": port, "received": received, "end": end, "prefix": prefix}), flush=True)


def serve(addr, port):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(64)
    lock = threading.Lock()
    while True:
        conn, peer = listener.accept()
        threading.Thread(target=serve_one, args=(conn, peer[1], lock), daemon=True).start()


def steady(addr, port, stopfile):
    s = socket.create_connection((addr, port), timeout=30)
    sent = 0
    size = 1
    while not os.path.exists(stopfile):
        size = size * 3 % 65521 + 1
        data = pattern(sent, size)
        s.sendall(data)
        echoed = bytearray()
        while len(echoed) < size:
            chunk = s.recv(size - len(echoed))
            if not chunk:
                sys.exit(f"steady: end of stream after {sent + len(echoed)} bytes")
            echoed += chunk
        if bytes(echoed) != data:
            sys.exit(f"steady: echo differs at offset {sent}")
        sent += size
    s.close()
    print(f"ok bytes={sent}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "steady":
        steady(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(__doc__)
