"""fork_while_connecting.py HOST PORT FORKS

One thread connects to HOST:PORT again and again while the main thread
forks FORKS times; each child connects once, sends a byte, reads the
server's and exits. Prints {"forks": N, "hung": H, "failed": F}: H children
still running 3 s after they were forked (killed then), F that exited
with an error; when F is not 0, also "errors": what they failed with
(an errno's name, or "reply" for a wrong or missing byte), counted.
"""
import errno
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
errors = {}
for _ in range(forks):
    pid = os.fork()
    if pid == 0:
        try:
            c = socket.create_connection((host, port))
            c.sendall(b"x")
            ok = c.recv(1) == b"x"
            c.close()
            os._exit(0 if ok else 1)
        except OSError as e:
            # The errno, told by the exit status (2 and up).
            os._exit(2 + min(e.errno or 0, 200))
    deadline = time.monotonic() + 3
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if status != 0:
                failed += 1
                code = os.waitstatus_to_exitcode(status)
                name = "reply" if code == 1 else errno.errorcode.get(code - 2, f"status {code}")
                errors[name] = errors.get(name, 0) + 1
            break
        if time.monotonic() > deadline:
            hung += 1
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.0005)
stop.set()
result = {"forks": forks, "hung": hung, "failed": failed}
if errors:
    result["errors"] = errors
print(json.dumps(result), flush=True)
