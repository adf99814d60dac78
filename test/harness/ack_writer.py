"""Writes a unique pattern into distinct 4 KiB slots through libnbd with many requests in
flight, and records each slot in LOG only after the server acknowledged its write. Run until
COUNT slots are written or the connection dies (the server was killed): either way LOG holds
exactly the acknowledged writes. With FLUSH_EVERY, a FLUSH follows every FLUSH_EVERY writes and
LOG holds only the flushed ones: a slot is logged once a FLUSH sent after its write was
acknowledged has been acknowledged. `verify` mode checks every logged slot reads back intact.

usage: ack_writer.py write URI LOG COUNT [DEPTH [SPAN [FLUSH_EVERY]]]
       (SPAN: only the first SPAN slots; 0: the whole volume)
       ack_writer.py verify URI LOG
"""
import random
import struct
import sys

import nbd

SLOT = 4096
MAGIC = 0x4C4F434B53544550  # "LOCKSTEP"


def pattern(slot):
    return struct.pack(">QQ", slot, MAGIC) * (SLOT // 16)


def cycle_pattern(slot, cycle):
    """A slot's content in its CYCLE-th write (follow_writer.py's CYCLE mode)."""
    return struct.pack(">QQQQ", slot, MAGIC, cycle, ~cycle & 0xFFFFFFFFFFFFFFFF) * (SLOT // 32)


def write(uri, log_path, count, depth, span, flush_every):
    h = nbd.NBD()
    h.connect_uri(uri)
    slots = list(range(min(span, h.get_size() // SLOT) if span else h.get_size() // SLOT))
    random.shuffle(slots)
    slots = slots[:count]
    acked = 0
    unflushed = []  # acknowledged, and no FLUSH sent since
    with open(log_path, "w", buffering=1) as log:
        def done(slot):
            def cb(err):
                nonlocal acked
                if err.value == 0:
                    if flush_every:
                        unflushed.append(slot)
                    else:
                        log.write("%d\n" % slot)
                    acked += 1
                return 1
            return cb

        def flushed(covered):
            def cb(err):
                if err.value == 0:
                    log.write("".join("%d\n" % s for s in covered))
                return 1
            return cb

        def send_flush():
            covered = unflushed[:]
            unflushed.clear()
            h.aio_flush(completion=flushed(covered))

        try:
            nxt = 0
            while nxt < len(slots) or h.aio_in_flight() > 0:
                while nxt < len(slots) and h.aio_in_flight() < depth:
                    h.aio_pwrite(pattern(slots[nxt]), slots[nxt] * SLOT, completion=done(slots[nxt]))
                    nxt += 1
                    if flush_every and nxt % flush_every == 0:
                        send_flush()
                h.poll(-1)
            if flush_every:
                send_flush()
                while h.aio_in_flight() > 0:
                    h.poll(-1)
            else:
                h.flush()
            print("acked=%d flushed" % acked)
        except nbd.Error as e:
            print("acked=%d connection lost: %s" % (acked, e))


def verify(uri, log_path):
    h = nbd.NBD()
    h.connect_uri(uri)
    # Lines are "SLOT", or "SLOT CYCLE" from a writer that writes its slots over and over: then
    # the slot must hold the newest cycle acknowledged, or a later one (written, not yet acked).
    newest = {}
    with open(log_path) as f:
        for line in f:
            fields = line.split()
            if fields:
                slot, cycle = int(fields[0]), int(fields[1]) if len(fields) > 1 else -1
                newest[slot] = max(cycle, newest.get(slot, -1))
    bad = []
    for s in sorted(newest):
        got = h.pread(SLOT, s * SLOT)
        if newest[s] < 0:
            ok = got == pattern(s)
        else:
            on_disk = struct.unpack(">QQQQ", got[:32])[2]
            ok = on_disk >= newest[s] and got == cycle_pattern(s, on_disk)
        if not ok:
            bad.append(s)
    print("checked=%d bad=%d" % (len(newest), len(bad)))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "write":
        depth = int(sys.argv[5]) if len(sys.argv) > 5 else 16
        span = int(sys.argv[6]) if len(sys.argv) > 6 else 0
        flush_every = int(sys.argv[7]) if len(sys.argv) > 7 else 0
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]), depth, span, flush_every)
    elif mode == "verify":
        verify(sys.argv[2], sys.argv[3])
    else:
        sys.exit("unknown mode " + mode)
