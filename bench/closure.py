"""A closure over a large array: the second map's time and each worker's memory.

    python bench/closure.py [--mib 381] [--pairs 5] [--json out.json]

- time: `Pool(2).map(fn, range(2), chunksize=1)` where fn reads the array
  (a strided sum of 1/64 of it per item), in alternated pairs, after a first
  map of each: (a) the closure over a plain array (captured: shipped once, by
  content, then checked at each map), (b) the same array as a pmaprt shared
  array passed as an argument (`pmaprt.asarray`, the shared-array path), (c)
  the plain array passed as an argument (read from the parent or copied per
  map). Ratio closure / shared per pair. The closure's array is hashed again
  only where the kernel's write tracking is missing or saw a write
  (`hashed_reused`: arrays hashed, hashes kept). joblib with loky over the same
  closure (2 workers, reused executor) is timed in the same rounds.
- a user's write to a tracked array: a full in-place write (`a += 1`) of the
  armed array against the same write of an untracked one, alternated.
- memory: each worker's RSS and PSS growth over its start, after a map that
  touches the whole array (a full sum), then after the array is freed (the
  parent's closure and array dropped, one more map of another function).
  RSS counts a shared mapping once per process that maps it (the strict
  measure asked for); PSS divides it among them.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np          # noqa: E402
import psutil               # noqa: E402

import pmaprt               # noqa: E402
from pmaprt import Pool     # noqa: E402
from pmaprt._arrays.captured import digest   # noqa: E402
from pmaprt._arrays.written import WATCH      # noqa: E402

MIB = 1 << 20


def part(a, i):
    return float(a[i::64].sum())


def ident(x):
    return x


def mem(pids):
    out = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        out.append((info.rss, info.pss))
    return out


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run(mib, pairs):
    a = np.random.default_rng(0).random(mib * MIB // 8)
    res = {"mib": mib, "load_avg": os.getloadavg()}
    with Pool(2) as p:
        list(p.map(ident, range(8), chunksize=1))
        shared = pmaprt.asarray(a)

        def closure():
            return list(p.map(lambda i: part(a, i), range(2), chunksize=1))

        def by_shared():
            return list(p.map(part, [shared, shared], range(2), chunksize=1))

        def by_plain():
            return list(p.map(part, [a, a], range(2), chunksize=1))

        want = [part(a, i) for i in range(2)]
        first = timed(closure)
        assert closure() == want and by_shared() == want and by_plain() == want
        store = p.arrays.captured
        made = store.made
        rows = {"closure": [], "shared": [], "plain": []}
        for k in range(pairs):
            order = ["closure", "shared", "plain"] if k % 2 == 0 else ["plain", "shared", "closure"]
            for name in order:
                rows[name].append(timed({"closure": closure, "shared": by_shared,
                                         "plain": by_plain}[name]))
        assert store.made == made, "the closure's array was shipped again"
        res["hashed_reused"] = [store.hashed, store.reused]
        res["write_tracking"] = WATCH.status() or "on"
        res["first_closure_map_s"] = first
        res["times_s"] = rows
        res["closure_over_shared"] = [c / s for c, s in zip(rows["closure"], rows["shared"])]
        res["captured_bytes_left_before_free"] = store.nbytes
    res["hash_s"] = min(timed(lambda: digest(a.view(np.uint8))) for _ in range(3))
    del a
    res["full_write_s"] = write_cost(mib, pairs)
    res["memory"] = memory(mib)
    res["joblib"] = joblib_times(mib, pairs)
    res["load_avg_end"] = os.getloadavg()
    return res


def write_cost(mib, pairs):
    """A full in-place write of the array (`a += 1`) while its writes are
    tracked and armed (each page's first write takes one fault), against
    the same write of an untracked array of the same size, alternated. The
    tracked array is armed again (as a map would) before each write."""
    a = np.random.default_rng(0).random(mib * MIB // 8)
    b = a.copy()
    if WATCH.generation(a) is None:
        return None
    rows = {"tracked": [], "untracked": []}
    for k in range(pairs):
        order = ["tracked", "untracked"] if k % 2 == 0 else ["untracked", "tracked"]
        for name in order:
            if name == "tracked":
                WATCH.generation(a)     # arms it again
                rows[name].append(timed(lambda: a.__iadd__(1.0)))
            else:
                rows[name].append(timed(lambda: b.__iadd__(1.0)))
    rows["tracked_over_untracked"] = [t / u for t, u in zip(rows["tracked"], rows["untracked"])]
    return rows


def memory(mib):
    """Each worker's growth after a map that reads the whole array through a
    closure, on a pool of its own (no other copy of the array there), and
    after the array is freed."""
    a = np.random.default_rng(0).random(mib * MIB // 8)
    with Pool(2) as p:
        list(p.map(ident, range(8), chunksize=1))
        pids = p.pids()
        base = mem(pids)
        list(p.map(lambda i: float(a.sum()) + i, range(2), chunksize=1))
        after = mem(pids)
        growth = [{"rss": (x[0] - b[0]) / MIB, "pss": (x[1] - b[1]) / MIB}
                  for x, b in zip(after, base)]
        del a
        gc.collect()
        time.sleep(0.5)
        freed = mem(pids)
        left = [{"rss": (x[0] - b[0]) / MIB, "pss": (x[1] - b[1]) / MIB}
                for x, b in zip(freed, base)]
        return {"worker_growth_mib": growth, "worker_growth_after_free_mib": left,
                "captured_bytes_left": p.arrays.captured.nbytes}


def joblib_times(mib, pairs):
    try:
        from joblib import Parallel, delayed
    except ImportError:
        return None
    a = np.random.default_rng(0).random(mib * MIB // 8)
    par = Parallel(n_jobs=2, backend="loky")
    f = lambda i: part(a, i)    # noqa: E731
    par(delayed(f)(i) for i in range(2))
    return [timed(lambda: par(delayed(f)(i) for i in range(2))) for _ in range(pairs)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=381)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = run(args.mib, args.pairs)
    out["closure_over_shared_median"] = statistics.median(out["closure_over_shared"])
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
