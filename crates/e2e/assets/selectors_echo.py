#!/usr/bin/env python3
"""selectors echo: `selectors_echo.py serve ADDR PORT [KIND]` or
`selectors_echo.py client ADDR PORT [KIND]`, KIND the selector: `epoll`
(the default), `poll` or `select`.

The server is one thread with a `selectors.DefaultSelector` (epoll on
Linux) and non-blocking sockets: it echoes every connection until the
client's EOF, then closes it, holding back reads while a connection's
unsent echo is large.

The client opens several connections and first makes the server answer
all of them at once (a greeting on each, the echoes collected in reverse
order: a server that served one connection at a time would never answer
the last while the first is open). Then it sends data of a different size
on each connection, interleaved by its own selector, half-closes each when
its data is out, reads every echo to EOF, compares it byte for byte, and
prints "selectors ok CONNECTIONS BYTES"."""
import os
import selectors
import socket
import sys

# Bytes per connection: tiny, around the 64 KiB read size, around one ring
# (256 KiB), and several rings.
SIZES = [1, 100, 4096, 65_535, 262_144, 262_145, 1_000_003, 3_000_000]
HOLD_BACK = 1 << 20


class Echo:
    def __init__(self):
        self.pending = bytearray()
        self.eof = False


def serve(addr, port):
    sel = SELECTOR()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(64)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    open_now = most_at_once = served = 0
    while True:
        for key, mask in sel.select():
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, Echo())
                open_now += 1
                most_at_once = max(most_at_once, open_now)
                continue
            conn, echo = key.fileobj, key.data
            if mask & selectors.EVENT_READ:
                try:
                    data = conn.recv(65536)
                    if data:
                        echo.pending += data
                    else:
                        echo.eof = True
                except BlockingIOError:
                    pass
            if mask & selectors.EVENT_WRITE and echo.pending:
                try:
                    sent = conn.send(echo.pending)
                    del echo.pending[:sent]
                except BlockingIOError:
                    pass
            events = 0
            if not echo.eof and len(echo.pending) < HOLD_BACK:
                events |= selectors.EVENT_READ
            if echo.pending:
                events |= selectors.EVENT_WRITE
            if events:
                sel.modify(conn, events, echo)
            else:
                sel.unregister(conn)
                conn.close()
                open_now -= 1
                served += 1
                print(f"served {served} connections, at most {most_at_once} at once", flush=True)


def recv_exactly(sock, n):
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, "EOF before the greeting's echo"
        got += chunk
    return got


def client(addr, port):
    conns = [socket.create_connection((addr, port)) for _ in SIZES]
    greetings = [b"hello %d\n" % i for i in range(len(conns))]
    for sock, greeting in zip(conns, greetings):
        sock.sendall(greeting)
    for sock, greeting in reversed(list(zip(conns, greetings))):
        assert recv_exactly(sock, len(greeting)) == greeting, "greeting came back different"

    sel = SELECTOR()
    outgoing = {}
    for i, (sock, size) in enumerate(zip(conns, SIZES)):
        sock.setblocking(False)
        data = os.urandom(size)
        # [data, bytes sent, bytes received back]
        outgoing[sock] = [data, 0, bytearray()]
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
    remaining = len(conns)
    while remaining:
        events = sel.select(timeout=60)
        assert events, f"nothing happened for 60 s with {remaining} connections open"
        for key, mask in events:
            sock = key.fileobj
            state = outgoing[sock]
            data, sent, echoed = state
            if mask & selectors.EVENT_WRITE and sent < len(data):
                try:
                    state[1] += sock.send(data[sent : sent + 262_144])
                except BlockingIOError:
                    pass
                if state[1] == len(data):
                    sock.shutdown(socket.SHUT_WR)
                    sel.modify(sock, selectors.EVENT_READ, key.data)
            if mask & selectors.EVENT_READ:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                if chunk:
                    echoed += chunk
                    assert len(echoed) <= len(data), f"connection {key.data}: more came back than was sent"
                else:
                    assert state[1] == len(data), f"connection {key.data}: EOF before all was sent"
                    assert echoed == data, f"connection {key.data}: the echo differs ({len(echoed)} of {len(data)})"
                    sel.unregister(sock)
                    sock.close()
                    remaining -= 1
    print("selectors ok", len(conns), sum(SIZES), flush=True)


if __name__ == "__main__":
    SELECTOR = {
        "epoll": selectors.DefaultSelector,
        "poll": selectors.PollSelector,
        "select": selectors.SelectSelector,
    }[sys.argv[4] if len(sys.argv) > 4 else "epoll"]
    run = serve if sys.argv[1] == "serve" else client
    run(sys.argv[2], int(sys.argv[3]))
