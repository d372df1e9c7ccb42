#!/usr/bin/env python3
"""Connection churn: many short connections, each checked.

    churn.py serve ADDR PORT              an echo server, a thread per connection
    churn.py run ADDR PORT COUNT SEED     prints "churn ok COUNT BYTES"

`run` opens COUNT connections one after another; on each it sends a
payload of a random size (seeded; some larger than a ring) from a second
thread, half-closes, reads the echo to end of stream and checks it byte
for byte.
"""
import random
import socket
import sys
import threading


def echo(conn):
    with conn:
        while chunk := conn.recv(65536):
            conn.sendall(chunk)


def serve(addr, port):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def send(sock, payload):
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)


def run(addr, port, count, seed):
    rng = random.Random(seed)
    total = 0
    for i in range(count):
        size = rng.choice([1, 7, 100, 1000, 20_000, rng.randrange(1, 600_000)])
        payload = rng.randbytes(size)
        s = socket.create_connection((addr, port))
        sender = threading.Thread(target=send, args=(s, payload))
        sender.start()
        got = bytearray()
        while chunk := s.recv(65536):
            got += chunk
        sender.join()
        s.close()
        if got != payload:
            sys.exit(f"connection {i}: sent {size} bytes, echo of {len(got)} differs")
        total += size
    print(f"churn ok {count} {total}")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
