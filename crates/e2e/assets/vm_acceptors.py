#!/usr/bin/env python3
"""Servers in a VM guest that accept the ways real servers do.

    vm_acceptors.py serve ADDR DELAY     (in the VM, with libvsocket.so)
    vm_acceptors.py burst ADDR N         (a client elsewhere)
    vm_acceptors.py late ADDR            (a client elsewhere)
    vm_acceptors.py hold ADDR IDLE       (a client elsewhere)

`serve` listens on three ports of ADDR and prints "serving" when all are:
- 7600: a prefork server, four worker processes accepting on the one
  listening socket (as nginx's workers or a preforking server do); each
  answers a line with the line upper-cased and its pid;
- 7602: a listener that accepts only DELAY seconds after listening (its
  clients wait in its backlog meanwhile), then echoes one line to each of
  three clients;
- 7603: accepts one connection and prints how its first read ends
  ("held: reset", "held: eof" or "held: data").

`burst` makes N connections to port 7600 from eight threads, checks each
answer, and prints "burst ok N workers K" (K distinct pids answered) or
the first failure. `late` connects three clients to port 7602, each
sends a line, and prints "late ok" once all three are echoed. `hold`
connects to port 7603, stays idle (not reading) IDLE seconds, then prints
how its first read ends, as `serve` does.
"""
import os
import socket
import sys
import threading
import time


def listen(addr, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(128)
    return s


def read_line(conn):
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def first_read(conn):
    try:
        return "data" if conn.recv(100) else "eof"
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return f"error {e}"


def serve(addr, delay):
    prefork, late, held = listen(addr, 7600), listen(addr, 7602), listen(addr, 7603)
    for _ in range(4):
        if os.fork() == 0:
            late.close()
            held.close()
            while True:
                conn, _ = prefork.accept()
                line = read_line(conn)
                conn.sendall(line.strip().upper() + b" %d\n" % os.getpid())
                conn.close()
    prefork.close()
    if os.fork() == 0:
        held.close()
        time.sleep(delay)
        conns = [late.accept()[0] for _ in range(3)]
        for conn in conns:
            conn.sendall(read_line(conn))
            conn.close()
        os._exit(0)
    late.close()
    print("serving", flush=True)
    conn, _ = held.accept()
    print("held: accepted", flush=True)
    print("held:", first_read(conn), flush=True)


def burst(addr, n):
    pids, failures = set(), []
    lock = threading.Lock()

    def client(first):
        for i in range(first, n, 8):
            try:
                with socket.create_connection((addr, 7600), timeout=60) as conn:
                    conn.sendall(b"hello-%d\n" % i)
                    answer = read_line(conn).split()
                    if len(answer) != 2 or answer[0] != b"HELLO-%d" % i:
                        raise ValueError(f"answer {answer!r} to hello-{i}")
                    with lock:
                        pids.add(answer[1])
            except Exception as e:
                with lock:
                    failures.append(f"connection {i}: {e!r}")
                return

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        print("burst failed", failures[0], flush=True)
    else:
        print(f"burst ok {n} workers {len(pids)}", flush=True)


def late(addr):
    conns = [socket.create_connection((addr, 7602), timeout=120) for _ in range(3)]
    for i, conn in enumerate(conns):
        conn.sendall(b"waited-%d\n" % i)
    print("late connected", flush=True)
    for i, conn in enumerate(conns):
        echoed = read_line(conn)
        if echoed != b"waited-%d\n" % i:
            print(f"late failed: {echoed!r}", flush=True)
            return
    print("late ok", flush=True)


def hold(addr, idle):
    conn = socket.create_connection((addr, 7603), timeout=10)
    conn.settimeout(120)
    print("hold: connected", flush=True)
    time.sleep(idle)
    print("hold:", first_read(conn), flush=True)


if __name__ == "__main__":
    what, addr = sys.argv[1], sys.argv[2]
    if what == "serve":
        serve(addr, float(sys.argv[3]))
    elif what == "burst":
        burst(addr, int(sys.argv[3]))
    elif what == "late":
        late(addr)
    elif what == "hold":
        hold(addr, float(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {what}")
