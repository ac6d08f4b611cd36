#!/usr/bin/env python3
"""What the roster's unsynced append costs a record's write, on the filesystem alone.

A record write is cellar's: a temporary file written and fsynced, renamed over the record, and its
directory fsynced. With `on`, each record write is followed by one unsynced O_APPEND line to
another file of the same filesystem (a pool's roster); `off` leaves it out. Rounds alternate which
mode runs first, since fsync latency on a VM's disk drifts from one run to the next; the reading is
the mean of the paired differences, not one round.

    python3 bench/append-cost.py                       # in /var/tmp, 8 rounds of 400 records
    python3 bench/append-cost.py --dir /data/x --rounds 12
"""
import argparse
import os
import shutil
import statistics
import time

LINE = (b'{"put":{"id":"local:n1:default:pvc-8d1f2a9c-0b7e-4c21-9a53-6c0e5f4d3b21",'
        b'"name":"pvc-8d1f2a9c-0b7e-4c21-9a53-6c0e5f4d3b21","capacity_bytes":1073741824,'
        b'"layout":"dir"}}\n')


def run(place, records, append):
    os.makedirs(place)
    took = []
    for i in range(records):
        start = time.perf_counter()
        path = os.path.join(place, f"r{i}")
        fd = os.open(path + ".tmp", os.O_CREAT | os.O_WRONLY, 0o600)
        os.write(fd, b"x" * 300)
        os.fsync(fd)
        os.close(fd)
        os.rename(path + ".tmp", path)
        dfd = os.open(place, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        if append:
            fd = os.open(os.path.join(place, "roster"), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            os.write(fd, LINE)
            os.close(fd)
        took.append(time.perf_counter() - start)
    shutil.rmtree(place)
    return statistics.median(took) * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp/append-cost")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--records", type=int, default=400)
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    diffs = []
    print("| round | first | record p50 ms, no append | with append | difference |")
    print("|---|---|---:|---:|---:|")
    for r in range(1, a.rounds + 1):
        order = ["on", "off"] if r % 2 else ["off", "on"]
        p50 = {}
        for mode in order:
            p50[mode] = run(os.path.join(a.dir, f"{mode}-{r}"), a.records, mode == "on")
        diffs.append(p50["on"] - p50["off"])
        print(f"| {r} | {order[0]} | {p50['off']:.3f} | {p50['on']:.3f} | {diffs[-1]:+.3f} |")
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    print(f"\nmean difference {statistics.mean(diffs):+.3f} ms (standard deviation {spread:.3f} ms, {len(diffs)} rounds)")
    os.rmdir(a.dir)


if __name__ == "__main__":
    main()
