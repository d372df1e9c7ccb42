"""Descriptor limits: how many connections a client holds at a given
RLIMIT_NOFILE before socket() or connect() fails.

    fdlimit.py server PORT [SOFT]  accepts and holds every connection,
                                   printing "accepted N" after each (soft
                                   limit SOFT, 8192 unless given)
    fdlimit.py client HOST PORT N [COUNT]
                                   soft limit N; connects until it fails
                                   (or has COUNT connections), then prints
                                   "<connections held> <errno>" (0: none)
"""
import errno
import resource
import socket
import sys


def server(port, soft):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard), hard))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4096)
    held = []
    while True:
        conn, _ = listener.accept()
        held.append(conn)
        print("accepted", len(held), flush=True)


def client(host, port, soft, count):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    held = []
    while len(held) < count:
        try:
            conn = socket.create_connection((host, port), timeout=10)
        except OSError as e:
            print(len(held), e.errno or errno.EIO, flush=True)
            return
        # Each connection works: a byte there and back is not needed, but
        # the server must have taken it.
        held.append(conn)
    print(len(held), 0, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 8192)
    else:
        count = int(sys.argv[5]) if len(sys.argv) > 5 else float("inf")
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), count)
