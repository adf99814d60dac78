"""A client that follows a primary as it moves: writes ack_writer's unique pattern into distinct
4 KiB slots with many requests in flight and logs each slot once the server acknowledged it.
When the connection ends it reconnects to whichever of URIS accepts writes (the others are
read-only secondaries) and sends again every write that was in flight, never acknowledged. A
write the server answers with an error is a failure: reported, and the exit status is 1.
Runs until STOP exists (then flushes) or every slot is written; prints one JSON line. With
CYCLE, every slot written, it starts over on the same slots with the next cycle number in the
pattern, and logs "SLOT CYCLE": a long run stays within SPAN slots, and a lost acknowledged
write still shows (the slot reads back an older cycle than one acknowledged; ack_writer's verify).

usage: follow_writer.py URIS LOG STOP [DEPTH [SPAN [CYCLE]]]   (URIS: comma-separated)
"""
import errno
import json
import os
import random
import sys
import time

import nbd

from ack_writer import SLOT, cycle_pattern, pattern

# A write lost with its connection (libnbd's own errors; a server never sends them), or one the
# server refused because it is going away (ESHUTDOWN): both go again, to the current primary.
CONNECTION_LOST = {errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE, errno.ESHUTDOWN}
RECONNECT_PATIENCE_S = 60


def writable(uris):
    """A handle on the first export that takes writes, waiting for one to appear."""
    deadline = time.time() + RECONNECT_PATIENCE_S
    while True:
        for uri in uris:
            h = nbd.NBD()
            try:
                h.connect_uri(uri)
                if not h.is_read_only():
                    return h
            except nbd.Error:
                pass
            del h  # closes the connection
        if time.time() > deadline:
            sys.exit("no export among %s took writes for %d s" % (uris, RECONNECT_PATIENCE_S))
        time.sleep(0.05)


def main(uris, log_path, stop_path, depth, span, cycle):
    h = writable(uris)
    slots = list(range(min(span, h.get_size() // SLOT) if span else h.get_size() // SLOT))
    random.shuffle(slots)
    todo = slots[::-1]  # popped from the end
    turn = 0  # the cycle (CYCLE mode): every slot is written once per cycle
    stats = {"acked": 0, "failed": 0, "reconnects": 0, "resent": 0}
    errors = []
    with open(log_path, "w", buffering=1) as log:
        while True:
            inflight = set()
            lost = []

            def done(slot, turn):
                def cb(err):
                    inflight.discard(slot)
                    if err.value == 0:
                        log.write("%d %d\n" % (slot, turn) if cycle else "%d\n" % slot)
                        stats["acked"] += 1
                    elif err.value in CONNECTION_LOST:
                        lost.append(slot)
                    else:
                        stats["failed"] += 1
                        errors.append("slot %d: %s" % (slot, os.strerror(err.value)))
                    return 1
                return cb

            try:
                while not lost and not os.path.exists(stop_path) and (todo or inflight):
                    if cycle and not todo:
                        todo = slots[::-1]
                        turn += 1
                    while todo and len(inflight) < depth and not os.path.exists(stop_path):
                        slot = todo.pop()
                        inflight.add(slot)
                        data = cycle_pattern(slot, turn) if cycle else pattern(slot)
                        h.aio_pwrite(data, slot * SLOT, completion=done(slot, turn))
                    h.poll(-1)
                if not lost:
                    while inflight:
                        h.poll(-1)
                if not lost:
                    h.flush()
                    break
            except nbd.Error:
                pass
            # Whatever was not acknowledged goes again, to the export that now takes writes.
            lost.extend(inflight)
            stats["resent"] += len(lost)
            todo.extend(lost)
            h = writable(uris)
            stats["reconnects"] += 1
    stats["errors"] = errors[:10]
    print(json.dumps(stats))
    sys.exit(1 if stats["failed"] else 0)


if __name__ == "__main__":
    main(
        sys.argv[1].split(","),
        sys.argv[2],
        sys.argv[3],
        int(sys.argv[4]) if len(sys.argv) > 4 else 16,
        int(sys.argv[5]) if len(sys.argv) > 5 else 0,
        len(sys.argv) > 6 and sys.argv[6] == "cycle",
    )
