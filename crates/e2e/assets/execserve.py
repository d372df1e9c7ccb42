#!/usr/bin/env python3
"""Servers that hand each connection to a program they exec, the way
inetd-style servers do, and a client that checks the echo.

    execserve.py serve ADDR PORT MODE PROGRAM [ARGS...]
    execserve.py check ADDR PORT BYTES SEED
    execserve.py give ADDR PORT BYTES SEED
    execserve.py digest BYTES SEED
    execserve.py failexec ADDR PORT
    execserve.py kitexec ADDR PORT BYTES SEED

`serve` accepts connections for ever; each runs PROGRAM with the
connection as its stdin and stdout, started by MODE:
  fork   os.fork, then dup2 onto 0 and 1 and os.execv in the child; the
         parent closes its copy at once;
  spawn  subprocess.Popen(stdin=conn, stdout=conn) (vfork and execve in
         CPython), then the parent closes its copy at once;
  keep   runs PROGRAM with subprocess (vfork, closing every descriptor
         from 3 up in the child) and waits for it, then echoes the
         connection itself: the child must not take the parent's
         connections with it.
`check` sends BYTES of pseudo-random data (from SEED) in random chunk
sizes, half-closes, reads until end of stream and prints
"sent=N received=M match=yes|no".
`give` sends each connection BYTES of pseudo-random data (from SEED) and
closes it; `digest` prints the sha256 of those bytes. `failexec`
connects to an echo server, lets the socket cross exec, execs a program
that does not exist, then checks an echo on the connection it still has.
`kitexec` connects to an echo server three times in one process (the
second connect brings the grant's kits, the third takes one: a
connection whose memory is a piece of a chunk), closing the first two,
and execs itself to `check` the echo over the third from the new image.
"""
import hashlib
import os
import random
import socket
import subprocess
import sys
import threading


def serve(addr, port, mode, argv):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        if mode == "fork":
            pid = os.fork()
            if pid == 0:
                listener.close()
                os.dup2(conn.fileno(), 0)
                os.dup2(conn.fileno(), 1)
                conn.close()
                os.execv(argv[0], argv)
            conn.close()
            os.waitpid(pid, os.WNOHANG)
        elif mode == "spawn":
            child = subprocess.Popen(argv, stdin=conn, stdout=conn)
            conn.close()
            threading.Thread(target=child.wait, daemon=True).start()
        else:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
            threading.Thread(target=echo, args=(conn,), daemon=True).start()


def echo(conn):
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        conn.sendall(chunk)
    conn.close()


def check(addr, port, size, seed):
    check_on(socket.create_connection((addr, port), timeout=30), size, seed)


def check_on(s, size, seed):
    rng = random.Random(seed)
    data = rng.randbytes(size)
    received = hashlib.sha256()
    count = [0]

    def reader():
        while True:
            chunk = s.recv(rng_reader.randint(1, 65536))
            if not chunk:
                return
            received.update(chunk)
            count[0] += len(chunk)

    rng_reader = random.Random(seed + 1)
    t = threading.Thread(target=reader)
    t.start()
    sent = 0
    while sent < size:
        n = rng.randint(1, 100_000)
        s.sendall(data[sent:sent + n])
        sent += min(n, size - sent)
    s.shutdown(socket.SHUT_WR)
    t.join(60)
    match = received.hexdigest() == hashlib.sha256(data).hexdigest()
    print(f"sent={sent} received={count[0]} match={'yes' if match else 'no'}")


def give(addr, port, size, seed):
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(16)
    data = random.Random(seed).randbytes(size)
    while True:
        conn, _ = listener.accept()
        conn.sendall(data)
        conn.close()


def failexec(addr, port):
    s = socket.create_connection((addr, port), timeout=30)
    os.set_inheritable(s.fileno(), True)
    try:
        os.execv("/nonexistent/program", ["program"])
    except OSError as e:
        failed = e.errno
    s.sendall(b"still here")
    got = b""
    while len(got) < 10:
        chunk = s.recv(10 - len(got))
        if not chunk:
            break
        got += chunk
    print(f"exec failed with errno {failed}; echo {got.decode()}")


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
    elif command == "check":
        check(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif command == "failexec":
        failexec(sys.argv[2], int(sys.argv[3]))
    elif command == "kitexec":
        for _ in range(2):
            socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=30).close()
        kit = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=30)
        os.set_inheritable(kit.fileno(), True)
        os.execv(sys.executable, [sys.executable, __file__, "check-fd", str(kit.fileno()), sys.argv[4], sys.argv[5]])
    elif command == "check-fd":
        s = socket.socket(fileno=int(sys.argv[2]))
        # (Left non-blocking by the timeout the first image set.)
        s.settimeout(30)
        check_on(s, int(sys.argv[3]), int(sys.argv[4]))
    elif command == "give":
        give(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        size, seed = int(sys.argv[2]), int(sys.argv[3])
        print(hashlib.sha256(random.Random(seed).randbytes(size)).hexdigest())
