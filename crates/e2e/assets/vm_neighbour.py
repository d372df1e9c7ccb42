#!/usr/bin/env python3
"""What a process in one VM can try against another VM on the same host.

    vm_neighbour.py CID REGION_BYTES

Prints, one per line:
- `devices N SIZE`: the ivshmem devices this VM sees and the first's size
  (its own region: the other VM's region is not there to map);
- `neighbour control: ...`: a vsock connect to the other VM's context id
  on the control port (its attachment belongs to its own backend);
- `forged bells closed N of M`: bell streams naming connection ids 1..64,
  either end, each of which the daemon must close (none is this VM's).
"""
import glob
import os
import socket
import sys


def devices():
    found = []
    for dev in sorted(glob.glob("/sys/bus/pci/devices/*")):
        ids = [open(os.path.join(dev, n)).read().strip() for n in ("vendor", "device")]
        if ids == ["0x1af4", "0x1110"]:
            found.append(os.path.getsize(os.path.join(dev, "resource2")))
    return found


def neighbour_control(cid):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((cid, 7471))
        return "connected"
    except OSError as e:
        return "refused (%s)" % type(e).__name__
    finally:
        s.close()


def forged_bells():
    closed = total = 0
    for conn_id in range(1, 65):
        for end in (0, 1):
            total += 1
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect((socket.VMADDR_CID_HOST, 7472))
                s.sendall(conn_id.to_bytes(8, "little") + bytes([end]))
                if s.recv(1) == b"":
                    closed += 1
            except OSError:
                closed += 1
            finally:
                s.close()
    return closed, total


if __name__ == "__main__":
    found = devices()
    print("devices", len(found), found[0] if found else 0, flush=True)
    print("neighbour control:", neighbour_control(int(sys.argv[1])), flush=True)
    print("forged bells closed %d of %d" % forged_bells(), flush=True)
