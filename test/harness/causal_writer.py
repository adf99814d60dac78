"""A writer whose writes depend on each other across two volumes, and a reader of what a
snapshot of them holds.

`write` loops: sequence number n (u64 little-endian, 8 bytes at offset 0) to volume 1, wait for
its answer, then n to volume 2, wait, n + 1. So whenever volume 2 holds n, volume 1 held n
before it, and volume 1 holds n + 1 only after volume 2 answered n: any snapshot of the two
taken at one write-order point reads (n, n) or (n, n - 1), never volume 2 ahead of volume 1 nor
volume 1 more than one ahead. It runs until SIGTERM or SIGINT, then prints `writes=N` (the last
n written to both) and exits 0; an NBD error ends it with status 1.

`read` prints, for each URI in order, the u64 at offset 0 (one per line).

usage: causal_writer.py write URI1 URI2
       causal_writer.py read URI...
"""
import signal
import struct
import sys

import nbd

stop = False


def on_signal(_signum, _frame):
    global stop
    stop = True


def write(uri1, uri2):
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    h1 = nbd.NBD()
    h1.connect_uri(uri1)
    h2 = nbd.NBD()
    h2.connect_uri(uri2)
    print("connected", flush=True)
    n = 0
    try:
        while not stop:
            seq = struct.pack("<Q", n + 1)
            h1.pwrite(seq, 0)
            h2.pwrite(seq, 0)
            n += 1
    except nbd.Error as e:
        print("writes=%d error: %s" % (n, e), flush=True)
        sys.exit(1)
    h1.shutdown()
    h2.shutdown()
    print("writes=%d" % n, flush=True)


def read(uris):
    for uri in uris:
        h = nbd.NBD()
        h.connect_uri(uri)
        print(struct.unpack("<Q", h.pread(8, 0))[0])
        h.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "read":
        read(sys.argv[2:])
    else:
        sys.exit("unknown mode " + sys.argv[1])
