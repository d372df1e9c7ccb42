"""fork_while_connecting.py HOST PORT FORKS

One thread connects to HOST:PORT again and again while the main thread
forks FORKS times; each child connects once, sends a byte, reads the
server's and exits. Prints {"forks": N, "hung": H, "failed": F}: H children
still running 3 s after they were forked (killed then), F that exited
with an error.
"""
import json
import os
import socket
import sys
import threading
import time

host, port, forks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stop = threading.Event()


def churn():
    while not stop.is_set():
        s = socket.create_connection((host, port))
        s.close()


threading.Thread(target=churn, daemon=True).start()
time.sleep(0.2)
hung = failed = 0
for _ in range(forks):
    pid = os.fork()
    if pid == 0:
        try:
            c = socket.create_connection((host, port))
            c.sendall(b"x")
            ok = c.recv(1) == b"x"
            c.close()
            os._exit(0 if ok else 1)
        except OSError:
            os._exit(1)
    deadline = time.monotonic() + 3
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            failed += status != 0
            break
        if time.monotonic() > deadline:
            hung += 1
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.0005)
stop.set()
print(json.dumps({"forks": forks, "hung": hung, "failed": failed}), flush=True)
