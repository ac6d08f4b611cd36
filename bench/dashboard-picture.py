#!/usr/bin/env python3
"""Renders docs/images/dashboard.png: the main panels of charts/cellar/files/dashboard.json, drawn
from the real metrics of a real run (not a Grafana screenshot: no Grafana or Prometheus needed).

It starts `cellar all-in-one` on a private data directory with --metrics-listen, scrapes /metrics
every second while `cellar csi bench` drives volumes through their lifecycle and a few volumes and
snapshots are left behind, then evaluates the panels' queries over the scrapes (rates and p99 over
a 5 s window) and plots them with matplotlib.

    sudo python3 bench/dashboard-picture.py [--cellar target/release/cellar] [--out docs/images/dashboard.png]

Needs root (the bench stages and publishes volumes) and matplotlib.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')
LABEL = re.compile(r'(\w+)="([^"]*)"')
WINDOW = 5  # seconds, the rate window of every panel


def parse(text):
    """One scrape: {(name, frozenset(labels)): value}."""
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = frozenset(LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def series(scrapes, name, by):
    """{label value of `by`: [(t, value summed over the other labels)]} of a metric."""
    out = {}
    for t, s in scrapes:
        sums = {}
        for (n, labels), v in s.items():
            if n == name:
                key = dict(labels).get(by, "")
                sums[key] = sums.get(key, 0.0) + v
        for k, v in sums.items():
            out.setdefault(k, []).append((t, v))
    return out


def rate(points):
    """Per-second increase over WINDOW seconds, at each point that has a point WINDOW back."""
    out = []
    for i, (t, v) in enumerate(points):
        j = i
        while j > 0 and t - points[j - 1][0] <= WINDOW:
            j -= 1
        if j < i and t > points[j][0]:
            out.append((t, max(0.0, v - points[j][1]) / (t - points[j][0])))
    return out


def p99(scrapes, method):
    """The 0.99 quantile of cellar_csi_request_duration_seconds over WINDOW, per scrape."""
    out = []
    for i, (t, s) in enumerate(scrapes):
        j = i
        while j > 0 and t - scrapes[j - 1][0] <= WINDOW:
            j -= 1
        if j == i:
            continue
        old = scrapes[j][1]
        buckets = []
        for (n, labels), v in s.items():
            d = dict(labels)
            if n == "cellar_csi_request_duration_seconds_bucket" and d.get("method") == method:
                le = float("inf") if d["le"] == "+Inf" else float(d["le"])
                buckets.append((le, v - old.get((n, labels), 0.0)))
        buckets.sort()
        total = buckets[-1][1] if buckets else 0
        if total <= 0:
            continue
        want, below, lower = 0.99 * total, 0.0, 0.0
        for le, count in buckets:
            if count >= want:
                if le == float("inf"):
                    le = lower
                share = (want - below) / max(count - below, 1e-9)
                out.append((t, lower + (le - lower) * share))
                break
            below, lower = count, le
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cellar", default=os.path.join(repo, "target/release/cellar"))
    ap.add_argument("--out", default=os.path.join(repo, "docs/images/dashboard.png"))
    ap.add_argument("--volumes", type=int, default=300)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = tempfile.mkdtemp(prefix="cellar-test-picture-")
    log_path = os.path.join(work, "driver.log")
    endpoint = "unix://" + os.path.join(work, "csi.sock")
    driver = subprocess.Popen(
        [args.cellar, "all-in-one", "--endpoint", endpoint, "--node-id", "node-1",
         "--data-dir", os.path.join(work, "data"), "--metrics-listen", "127.0.0.1:0"],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    scrapes, stop = [], threading.Event()
    try:
        port = None
        for _ in range(200):
            m = re.search(r"addr=127\.0\.0\.1:(\d+)", open(log_path).read())
            if m and os.path.exists(endpoint[len("unix://"):]):
                port = int(m.group(1))
                break
            time.sleep(0.05)
        if port is None:
            raise SystemExit("the driver did not start:\n" + open(log_path).read())
        start = time.time()

        def scrape():
            while not stop.is_set():
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
                scrapes.append((time.time() - start, parse(body)))
                stop.wait(1.0)

        scraper = threading.Thread(target=scrape)
        scraper.start()
        csi = [args.cellar, "csi", "--endpoint", endpoint]
        time.sleep(3)
        bench_dir = os.path.join(work, "bench")
        os.makedirs(bench_dir)
        subprocess.run(csi + ["bench", "--volumes", str(args.volumes), "--concurrency", "2",
                              "--work-dir", bench_dir], check=True, stdout=subprocess.DEVNULL)
        for i in range(6):
            vid = subprocess.run(csi + ["create", f"pvc-kept-{i}", "--size", "256M"], check=True,
                                 capture_output=True, text=True).stdout.strip()
            if i < 3:
                subprocess.run(csi + ["snapshot", f"snap-kept-{i}", vid], check=True, stdout=subprocess.DEVNULL)
            time.sleep(0.5)
        time.sleep(8)
        stop.set()
        scraper.join()
    finally:
        stop.set()
        driver.send_signal(signal.SIGTERM)
        driver.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    fig, axes = plt.subplots(2, 2, figsize=(14, 8))
    fig.suptitle("cellar dashboard (charts/cellar/files/dashboard.json): panels drawn from a bench run's metrics")
    ax = axes[0][0]
    for method, pts in sorted(series(scrapes, "cellar_csi_requests_total", "method").items()):
        r = rate(pts)
        if any(v > 0 for _, v in r):
            ax.plot([t for t, _ in r], [v for _, v in r], label=method)
    ax.set_title("CSI calls per second, by method")
    ax.set_ylabel("calls/s")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    methods = sorted({dict(l).get("method") for _, s in scrapes for (n, l) in s
                      if n == "cellar_csi_request_duration_seconds_bucket"})
    for method in methods:
        q = p99(scrapes, method)
        if q:
            ax.plot([t for t, _ in q], [v * 1000 for _, v in q], label=method)
    ax.set_title("Latency p99, by method")
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    free = series(scrapes, "cellar_pool_free_bytes", "pool")
    total = series(scrapes, "cellar_pool_total_bytes", "pool")
    prov = series(scrapes, "cellar_pool_provisioned_bytes", "pool")
    for pool in sorted(free):
        fill = [(t, 1 - f / tot) for (t, f), (_, tot) in zip(free[pool], total[pool])]
        ax.plot([t for t, _ in fill], [v * 100 for _, v in fill], label=f"{pool}: fill")
        pr = [(t, p / tot) for (t, p), (_, tot) in zip(prov[pool], total[pool])]
        ax.plot([t for t, _ in pr], [v * 100 for _, v in pr], label=f"{pool}: provisioned / size")
    ax.set_title("Pool fill (1 - free / total) and provisioned against size")
    ax.set_ylabel("%")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    for name, label in [("cellar_volumes", "volumes"), ("cellar_snapshots", "snapshots"),
                        ("cellar_volumes_abnormal", "abnormal volumes"),
                        ("cellar_node_stale_mounts", "stale mounts")]:
        pts = [(t, sum(v for (n, _), v in s.items() if n == name)) for t, s in scrapes]
        ax.plot([t for t, _ in pts], [v for _, v in pts], label=label)
    ax.set_title("Volumes and snapshots; abnormal volumes; stale mounts")
    ax.legend(fontsize=7)
    for row in axes:
        for ax in row:
            ax.set_xlabel("seconds into the run")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"{args.out}: {len(scrapes)} scrapes")


if __name__ == "__main__":
    main()
