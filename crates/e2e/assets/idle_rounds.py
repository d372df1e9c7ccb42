#!/usr/bin/env python3
"""Connections that talk, fall quiet, and talk again, checking every byte.

Usage: idle_rounds.py ADDR PORT CONNECTIONS ROUNDS QUIET_SECONDS

Opens CONNECTIONS connections to an echo server (memhold.py server ... idle),
then ROUNDS times: sends a different pattern of a different size on each
connection (up to 200 KB, more than a ring holds), reads it back and compares
it, then says nothing for QUIET_SECONDS. Prints {"ok": ROUNDS} or
{"failed": ...} as JSON, and exits 0 only if every byte came back in order.
"""
import json
import socket
import sys
import time


def pattern(conn, rnd):
    size = 1 + (conn * 7919 + rnd * 104729) % 200_000
    seed = (conn * 31 + rnd * 17) % 251
    return bytes((seed + i) % 251 for i in range(size))


def main():
    addr, port, n, rounds, quiet = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    conns = [socket.create_connection((addr, port)) for _ in range(n)]
    for rnd in range(rounds):
        for i, c in enumerate(conns):
            data = pattern(i, rnd)
            c.sendall(data)
            got = bytearray()
            while len(got) < len(data):
                part = c.recv(len(data) - len(got))
                if not part:
                    print(json.dumps({"failed": f"round {rnd} connection {i}: end of stream"}), flush=True)
                    sys.exit(1)
                got += part
            if got != data:
                at = next(k for k in range(len(data)) if got[k] != data[k])
                print(json.dumps({"failed": f"round {rnd} connection {i}: byte {at} of {len(data)} differs"}), flush=True)
                sys.exit(1)
        print(json.dumps({"round": rnd}), flush=True)
        time.sleep(quiet)
    print(json.dumps({"ok": rounds}), flush=True)


main()
