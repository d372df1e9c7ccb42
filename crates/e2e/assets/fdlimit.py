"""Descriptor limits: how many connections a client holds at a given
RLIMIT_NOFILE before socket() or connect() fails.

    fdlimit.py server PORT         accepts and holds every connection
    fdlimit.py client HOST PORT N  soft limit N; connects until it fails,
                                   then prints "<connections held> <errno>"
"""
import errno
import resource
import socket
import sys


def server(port):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4096)
    held = []
    while True:
        conn, _ = listener.accept()
        held.append(conn)


def client(host, port, soft):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    held = []
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=10)
        except OSError as e:
            print(len(held), e.errno or errno.EIO, flush=True)
            return
        # Each connection works: a byte there and back is not needed, but
        # the server must have taken it.
        held.append(conn)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
