"""Reliability figures: chaos, a lazy consumer's memory, worker replacement.

    python bench/reliability.py [--items 200000] [--runs 3] [--json out.json]

- chaos: `Pool(2).map(square_work, range(items), retries=3, chunksize=64)`
  while a thread SIGKILLs a random worker every 20-100 ms; each run is paired
  with the same map without kills (order alternating), and checked equal to
  `map` (every item exactly once, in order). Reports kills, runs completed and
  the time ratio kills / no kills per pair.
- lazy consumer: an endless generator of 1 MiB float64 arrays through
  `Pool(2).map(same, ...)`, 200 results taken with a 20 ms pause every 10;
  peak growth of the process tree's proportional set size (parent and
  workers), against workers x the map's chunk bytes (its largest fed chunk);
  and the map's own accounting (items in flight and results not taken, its
  peak) against its bound (window.ahead_bytes).
- replacement: a worker SIGKILLed while the parent waits on a map; seconds
  from the kill until the replacement's W_STATE is READY (median of 20, after
  the pool's first loss started its zygote).
"""
import argparse
import itertools
import json
import os
import random
import signal
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np          # noqa: E402
import psutil               # noqa: E402

from pmaprt import Pool     # noqa: E402
from pmaprt._shm import W_STATE, WSTATE_READY   # noqa: E402

MIB = 1 << 20


def square_work(x):
    s = 0
    for i in range(60):
        s += (x ^ i) & 7
    return x * x + s


def same(a):
    return a


def ident(x):
    return x


def chaos_run(items, kill, seed):
    rng = random.Random(seed)
    stop = threading.Event()
    kills = [0]
    with Pool(2) as p:
        list(p.map(ident, range(100), inline=False))

        def killer():
            while not stop.wait(rng.uniform(0.02, 0.1)):
                try:
                    os.kill(rng.choice(p.pids()), signal.SIGKILL)
                    kills[0] += 1
                except (ProcessLookupError, IndexError):
                    pass

        t0 = time.perf_counter()
        it = p.map(square_work, range(items), retries=3, chunksize=64)
        t = threading.Thread(target=killer) if kill else None
        if t:
            t.start()
        try:
            got = list(it)
        finally:
            stop.set()
            if t:
                t.join(30)
        wall = time.perf_counter() - t0
    return wall, got, kills[0]


def chaos(items, runs):
    want = [square_work(x) for x in range(items)]
    pairs = []
    for r in range(runs):
        order = (True, False) if r % 2 == 0 else (False, True)
        out = {}
        for kill in order:
            wall, got, kills = chaos_run(items, kill, 1000 + r)
            out[kill] = (wall, got == want, kills)
        pairs.append({"kill_s": out[True][0], "calm_s": out[False][0], "exact": out[True][1]
                      and out[False][1], "kills": out[True][2],
                      "ratio": out[True][0] / out[False][0]})
    return pairs


def tree_pss(pool):
    total = 0
    for pid in [os.getpid()] + pool.pids():
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except psutil.Error:
            pass
    return total


def lazy_consumer():
    def gen():
        for i in itertools.count():
            a = np.empty(MIB // 8)
            a.fill(i)
            yield a

    with Pool(2) as p:
        # warm: the workers import NumPy before the base is read
        list(p.map(same, [np.zeros(10)] * 8, chunksize=1, inline=False))
        base = tree_pss(p)
        it = p.map(same, gen())
        peak, chunk, ahead, bound = 0, 0, 0, 0
        for k, a in enumerate(itertools.islice(it, 200)):
            f = it._state.feeder
            chunk = max([chunk] + [e[4] for e in f.outstanding.values()])
            with p._lock:   # the map's own accounting: items in flight, results not taken
                ahead = max(ahead, f.inflight_bytes + it._state.book.held_bytes)
                bound = max(bound, f.ahead_bytes(max([1] + [e[5] for e in f.outstanding.values()])))
            if k % 10 == 0:
                time.sleep(0.02)
                peak = max(peak, tree_pss(p) - base)
        it.close()
        chunk_bytes = 2 * chunk        # a chunk's items and their results
        return {"peak_growth_mib": peak / MIB, "chunk_mib": chunk_bytes / MIB,
                "workers_x_chunk_mib": 2 * chunk_bytes / MIB,
                "ratio": peak / (2 * chunk_bytes), "ahead_peak_mib": ahead / MIB,
                "ahead_bound_mib": bound / MIB, "ahead_ratio": ahead / (2 * chunk_bytes)}


def replacement(n=20):
    def one(p, w):
        pid = p.pids()[w]
        area = p._layout.worker(w)
        t = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while True:
            list(p.map(ident, range(4), inline=False))
            if p.pids()[w] != pid and p._r.load32(area + W_STATE) == WSTATE_READY:
                return time.perf_counter() - t

    with Pool(2) as p:
        list(p.map(ident, range(100), inline=False))
        first = one(p, 0)           # a fresh interpreter; the zygote starts
        deadline = time.monotonic() + 60
        while not p._res.zygote.usable() and time.monotonic() < deadline:
            time.sleep(0.05)
        ts = [one(p, i % 2) for i in range(n)]
    return {"first_s": first, "median_ms": statistics.median(ts) * 1e3,
            "max_ms": max(ts) * 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {"load_avg": os.getloadavg(), "replacement": replacement(),
           "lazy_consumer": lazy_consumer(), "chaos": chaos(args.items, args.runs)}
    out["load_avg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
