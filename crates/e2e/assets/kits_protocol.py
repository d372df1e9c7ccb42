#!/usr/bin/env python3
"""Both ends of a grant, spoken on the control socket without the library
(raw SOCK_SEQPACKET), to check what vsocketd does with kits
(ARCHITECTURE §3b).

    kits_protocol.py listen SOCK IP PORT OUT STOPFILE
    kits_protocol.py connect SOCK IP PORT STEPS
    kits_protocol.py connect-v1 SOCK IP PORT
    kits_protocol.py connect-v2 SOCK IP PORT
    kits_protocol.py connect-v3 SOCK IP PORT
    kits_protocol.py connect-again SOCK IP PORT

listen: registers a listener that takes kits (ListenKits) and writes one
JSON line to OUT for each message the daemon sends on its channel or its
kit channel; it
keeps every descriptor, so the kits stay held; on Revoke it adds the
claim words of the kits it holds. Ends when STOPFILE exists.
connect: connects twice on one request channel (ConnectKits); the second
reply brings a grant's kits. It takes the batch's first kit as a client
library would (a slot in the connect queue, a byte on the bell), prints a
JSON line, then waits for STEPS/check, prints the claim words of its
kits, and waits for STEPS/exit.
connect-again: as connect, but once the kit is taken, connects a third
time through the daemon at once (as a library does whose kits ran out),
prints that reply's kind, and exits.
connect-v1: connects twice as a library from before the take word asked
for kits, and prints the replies' kinds and descriptor counts.
connect-v2: the same, as a library from before chunks (whose kits each
came with their own two memfds) asked; connect-v3, as a library from
before kept doorbells (every kit of whose batches came with its own).

A kit's memory is a piece of a chunk: a batch brings its lifeline (one
for all its kits), each chunk's files (this end's read-write, the peer's
read-only), then a doorbell per kit but those whose bit is set in the
batch's `kept` mask (which use the doorbell the connection before them
in their piece had), and names each kit's (chunk, piece).
"""
import json
import os
import select
import socket
import struct
import sys
import time

CONNECTED, INCOMING, REFUSED = 2, 8, 4
CONNECT_KITS, LISTEN_KITS, LISTEN_OK_KITS, CONNECTED_KITS, KITS, REVOKE = 25, 26, 15, 16, 17, 18
# What a library that did not set a kit's take word sent for ConnectKits,
# one from before chunks, and one from before kept doorbells.
CONNECT_KITS_V1, CONNECT_KITS_V2, CONNECT_KITS_V3 = 13, 20, 22
GRANT_LEN = 8 + 4 + 1 + 1 + 4 + 32
# Offsets (vsocket_abi::layout, ::grant). The claim word is in the
# server's half, the take word at the same place in the client's.
CLAIM = TAKE = 3 * 128 + 12
KIT_TAKEN = 1 << 16
PRODUCED, SLOTS_AT, SLOTS = 128, 256, 64


def addr(ip, port):
    return socket.inet_aton(ip) + struct.pack("<H", port)


def channel(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    return s


def grant_of(body):
    gid, first, count, chunks, _kept = struct.unpack("<QIBBI", body[:18])
    places = [(b >> 5, b & 31) for b in body[18:18 + count]]
    return gid, first, count, chunks, places


# A chunk file starts with every piece's lines, 512 bytes each.
PIECE_LINES = 512


def pieces(fds, chunks, places, mine):
    """(file, offset of its lines) of each kit's half: this end's (mine)
    or the peer's, from the chunk files that open `fds`."""
    files = [fds[2 * c + (0 if mine else 1)] for c in range(chunks)]
    return [(files[c], p * PIECE_LINES) for c, p in places]


def claim(at):
    fd, offset = at
    return struct.unpack("<I", os.pread(fd, 4, offset + CLAIM))[0]


def listen(path, ip, port, out, stop):
    s = channel(path)
    s.send(bytes([LISTEN_KITS]) + addr(ip, port) + struct.pack("<I", 64))
    msg, fds, _, _ = socket.recv_fds(s, 64, 8)
    # The bell, then the kit channel.
    kit_channel = socket.socket(fileno=fds[1]) if len(fds) == 2 else None
    held = []
    with open(out, "a") as log:
        def note(**kv):
            log.write(json.dumps(kv) + "\n")
            log.flush()
        note(kind="registered", reply=msg[0] if msg else None, fds=len(fds))
        channels = [s] + ([kit_channel] if kit_channel else [])
        while not os.path.exists(stop):
            ready, _, _ = select.select(channels, [], [], 0.2)
            if not ready:
                continue
            msg, fds, _, _ = socket.recv_fds(ready[0], 64, 253)
            if not msg:
                note(kind="closed")
                return
            kind = msg[0]
            if kind == KITS:
                gid, first, count, chunks, places = grant_of(msg[1:])
                # The queue page, the batch's lifeline, the chunks' files,
                # then each kit's bell; its claim word is in its piece of
                # the server's file.
                kits = pieces(fds[2:], chunks, places, True)
                held.append((gid, kits))
                client = msg[1 + GRANT_LEN:1 + GRANT_LEN + 4]
                note(kind="kits", grant=gid, first=first, count=count, chunks=chunks, fds=len(fds),
                     client=socket.inet_ntoa(client), claims=[claim(at) for at in kits])
            elif kind == INCOMING:
                note(kind="incoming", fds=len(fds))
            elif kind == REVOKE:
                (gid,) = struct.unpack("<Q", msg[1:9])
                claims = [claim(at) for g, kits in held if g == gid for at in kits]
                note(kind="revoke", grant=gid, claims=claims)
            else:
                note(kind="other", code=kind, fds=len(fds))


def connect(path, ip, port, steps, kind=CONNECT_KITS, again=False):
    s = channel(path)
    s.settimeout(10)
    replies = []
    kits = None
    for local_port in (0, 0):
        s.send(bytes([kind]) + addr("0.0.0.0", local_port) + addr(ip, port))
        msg, fds, _, _ = socket.recv_fds(s, 64, 253)
        replies.append({"kind": msg[0], "fds": len(fds)})
        if msg[0] == CONNECTED_KITS:
            kits = grant_of(msg[1 + 24:]) + (fds,)
    if kits is None:
        print(json.dumps({"replies": replies}), flush=True)
        return
    gid, first, count, chunks, places, fds = kits
    page, bell = fds[4], fds[5]
    # Taken: the take word in the client's half of the first kit.
    own, offset = pieces(fds[7:], chunks, places, True)[0]
    os.pwrite(own, struct.pack("<I", KIT_TAKEN | 41000), offset + TAKE)
    # The server's half of each kit (read-only here): its claim word.
    server_halves = pieces(fds[7:], chunks, places, False)
    produced = struct.unpack("<Q", os.pread(page, 8, PRODUCED))[0]
    slot = (1 << 63) | (41000 << 32) | first
    os.pwrite(page, struct.pack("<Q", slot), SLOTS_AT + 8 * (produced % SLOTS))
    os.pwrite(page, struct.pack("<Q", produced + 1), PRODUCED)
    os.write(bell, b"k")
    print(json.dumps({"replies": replies, "grant": gid, "first": first, "count": count, "chunks": chunks,
                      "claims": [claim(at) for at in server_halves]}), flush=True)
    if again:
        s.send(bytes([kind]) + addr("0.0.0.0", 0) + addr(ip, port))
        msg, fds, _, _ = socket.recv_fds(s, 64, 253)
        print(json.dumps({"again": msg[0], "fds": len(fds)}), flush=True)
        return
    while not os.path.exists(os.path.join(steps, "check")):
        time.sleep(0.05)
    print(json.dumps({"claims": [claim(at) for at in server_halves]}), flush=True)
    while not os.path.exists(os.path.join(steps, "exit")):
        time.sleep(0.05)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "listen":
        listen(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6])
    elif what == "connect":
        connect(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif what == "connect-again":
        connect(sys.argv[2], sys.argv[3], int(sys.argv[4]), None, again=True)
    elif what == "connect-v1":
        connect(sys.argv[2], sys.argv[3], int(sys.argv[4]), None, CONNECT_KITS_V1)
    elif what == "connect-v2":
        connect(sys.argv[2], sys.argv[3], int(sys.argv[4]), None, CONNECT_KITS_V2)
    elif what == "connect-v3":
        connect(sys.argv[2], sys.argv[3], int(sys.argv[4]), None, CONNECT_KITS_V3)
