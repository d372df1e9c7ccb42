#!/usr/bin/env python3
"""A hostile guest on its control socket (no library: raw SOCK_SEQPACKET).

    hostile_control.py malformed SOCK OWN_IP OTHER_IP
    hostile_control.py flood SOCK IP PORT COUNT
    hostile_control.py deaf-listener SOCK IP PORT STOPFILE
    hostile_control.py connect-until-refused SOCK IP PORT LIMIT
    hostile_control.py reattach SOCK ID...

malformed: one channel per case; prints a JSON line per case with what the
daemon did: "closed" (end of stream), "reply <hex>" then "closed", or
"open" (nothing within 5 s).
flood: sends COUNT Connect requests to IP:PORT on one channel without
reading a reply, holds the channel 1 s, closes it; prints how many sends
the daemon took within 5 s each.
deaf-listener: registers a listener on IP:PORT and never reads its channel
again, until STOPFILE exists.
connect-until-refused: sends Connect requests one at a time, dropping the
descriptors of each Connected, until a Refused (or LIMIT); prints the count
of Connected and the seconds the last request took.
reattach: asks for both ends' segment halves of each connection ID, each
time with a pipe of its own as the lifeline that should prove it holds the
end, and once without any descriptor; prints a JSON line per request with
what the daemon did (as for malformed).
"""
import array
import json
import os
import socket
import struct
import sys
import time

CONNECT, CONNECTED, LISTEN, LISTEN_OK, REFUSED, REATTACH = 1, 2, 6, 7, 4, 11


def addr(ip, port):
    return socket.inet_aton(ip) + struct.pack("<H", port)


def channel(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.settimeout(5)
    return s


def outcome(s):
    """What the daemon does next on this channel."""
    seen = []
    try:
        while True:
            msg, fds, _, _ = socket.recv_fds(s, 64, 8)
            for fd in fds:
                os.close(fd)
            if not msg:
                seen.append("closed")
                return seen
            seen.append("reply " + msg.hex())
    except socket.timeout:
        seen.append("open")
        return seen
    except ConnectionResetError:
        seen.append("closed")
        return seen


def malformed(path, own_ip, other_ip):
    good_connect = bytes([CONNECT]) + addr("0.0.0.0", 0) + addr(other_ip, 9)
    info = struct.pack("<Q", 1) + addr(own_ip, 1) + addr(other_ip, 2) + struct.pack("<I", 1 << 16)
    devnull = os.open("/dev/null", os.O_RDONLY)
    cases = [
        ("empty", b"", []),
        ("truncated", bytes([CONNECT]) + addr(own_ip, 1), []),
        ("oversized", good_connect + b"\0" * 4000, []),
        ("unknown_kind", bytes([0xEE]) + good_connect[1:], []),
        ("daemon_kind_connected", bytes([CONNECTED]) + info, []),
        ("daemon_kind_listen_ok", bytes([LISTEN_OK]), []),
        ("listen_wrong_length", bytes([LISTEN]) + addr(own_ip, 80) + b"\0" * 6, []),
        ("descriptor_attached", good_connect, [devnull]),
        ("many_descriptors", good_connect, [devnull] * 250),
        ("listen_foreign_address", bytes([LISTEN]) + addr(other_ip, 7100) + struct.pack("<I", 16), []),
        ("listen_outside_vpc", bytes([LISTEN]) + addr("192.168.77.1", 7100) + struct.pack("<I", 16), []),
        ("listen_port_zero", bytes([LISTEN]) + addr(own_ip, 0) + struct.pack("<I", 16), []),
    ]
    for name, msg, fds in cases:
        s = channel(path)
        try:
            if fds:
                socket.send_fds(s, [msg], fds)
            else:
                s.send(msg)
            result = outcome(s)
        except (BrokenPipeError, ConnectionResetError):
            result = ["closed"]
        s.close()
        print(json.dumps({"case": name, "result": result}), flush=True)
    # A channel that behaved is closed all the same once it misbehaves.
    s = channel(path)
    s.send(good_connect)
    first, fds, _, _ = socket.recv_fds(s, 64, 8)
    for fd in fds:
        os.close(fd)
    s.send(b"\x01garbage")
    print(json.dumps({"case": "garbage_after_a_good_request", "result": ["reply " + first.hex()] + outcome(s)}), flush=True)
    s.close()


def flood(path, ip, port, count):
    s = channel(path)
    msg = bytes([CONNECT]) + addr("0.0.0.0", 0) + addr(ip, port)
    sent = 0
    try:
        for _ in range(count):
            s.send(msg)
            sent += 1
    except (socket.timeout, OSError):
        pass
    time.sleep(1)
    s.close()
    print(f"sent={sent}", flush=True)


def deaf_listener(path, ip, port, stopfile):
    s = channel(path)
    s.send(bytes([LISTEN]) + addr(ip, port) + struct.pack("<I", 128))
    print("reply " + s.recv(64).hex(), flush=True)
    while not os.path.exists(stopfile):
        time.sleep(0.1)
    s.close()


def connect_until_refused(path, ip, port, limit):
    s = channel(path)
    s.settimeout(30)
    msg = bytes([CONNECT]) + addr("0.0.0.0", 0) + addr(ip, port)
    connected = 0
    last = ""
    took = 0.0
    for _ in range(limit):
        start = time.monotonic()
        s.send(msg)
        reply, fds, _, _ = socket.recv_fds(s, 64, 8)
        took = time.monotonic() - start
        for fd in fds:
            os.close(fd)
        last = reply.hex()
        if reply[0] != CONNECTED:
            break
        connected += 1
    s.close()
    print(json.dumps({"connected": connected, "last": last, "seconds": round(took, 2)}), flush=True)


def reattach(path, ids):
    s = channel(path)
    s.settimeout(1)
    _, forged = os.pipe()
    for conn in ids:
        for end in (0, 1):
            msg = bytes([REATTACH]) + struct.pack("<QB", conn, end)
            socket.send_fds(s, [msg], [forged])
            reply, fds, _, _ = socket.recv_fds(s, 64, 8)
            print(json.dumps({"id": conn, "end": end, "reply": reply.hex(), "fds": len(fds)}), flush=True)
            for fd in fds:
                os.close(fd)
    s.close()
    s = channel(path)
    s.send(bytes([REATTACH]) + struct.pack("<QB", ids[0], 0))
    print(json.dumps({"case": "reattach_without_lifeline", "result": outcome(s)}), flush=True)
    s.close()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "malformed":
        malformed(*args)
    elif cmd == "flood":
        flood(args[0], args[1], int(args[2]), int(args[3]))
    elif cmd == "deaf-listener":
        deaf_listener(args[0], args[1], int(args[2]), args[3])
    elif cmd == "connect-until-refused":
        connect_until_refused(args[0], args[1], int(args[2]), int(args[3]))
    elif cmd == "reattach":
        reattach(args[0], [int(a) for a in args[1:]])
    else:
        sys.exit(__doc__)
