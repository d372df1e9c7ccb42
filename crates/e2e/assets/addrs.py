"""Socket addresses as a program sees them, over either address family.

  addrs.py serve FAMILY HOST PORT    FAMILY: inet, or inet6 (dual-stack:
                                     IPV6_V6ONLY off); answers each client
                                     with what it sees of the connection
  addrs.py connect HOST PORT         prints what the server saw, then what
                                     the client sees: "server peer=... local=...
                                     | client local=... peer=..."
  addrs.py refused HOST PORT         prints "refused" if the connect is
                                     refused, "connected" otherwise
"""
import socket
import sys


def show(addr):
    return f"{addr[0]}:{addr[1]}"


def serve(family, host, port):
    fam = socket.AF_INET6 if family == "inet6" else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((host, port))
    s.listen(16)
    while True:
        c, peer = s.accept()
        with c:
            data = b""
            while not data.endswith(b"\n"):
                chunk = c.recv(100)
                if not chunk:
                    break
                data += chunk
            assert show(peer) == show(c.getpeername()), (peer, c.getpeername())
            c.sendall(f"server peer={show(peer)} local={show(c.getsockname())}\n".encode())


def connect(host, port):
    c = socket.create_connection((host, port), timeout=30)
    c.sendall(b"hello\n")
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = c.recv(200)
        if not chunk:
            break
        reply += chunk
    print(f"{reply.decode().strip()} | client local={show(c.getsockname())} peer={show(c.getpeername())}")


def refused(host, port):
    try:
        socket.create_connection((host, port), timeout=10).close()
        print("connected")
    except ConnectionRefusedError:
        print("refused")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "connect":
        connect(sys.argv[2], int(sys.argv[3]))
    elif cmd == "refused":
        refused(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown command {cmd}")
