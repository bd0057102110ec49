"""The noise check: is the machine giving W cores' worth right now?

Pure CPU work (the calibrated busy loop) is timed once in this process, then
W copies at once on W worker processes (``multiprocessing.Pool``, no pmaprt:
the check must not depend on what it judges); speed-up = W x one copy's time
/ the W copies' time, W on an idle machine. Pairs alternate, so each ratio
compares moments a fraction of a second apart. The suite runs it at the start
and the end; ``verdict.noise_trusted`` decides whether the machine gave its
cores, and if not, by how much a winner must win (the noise margin).
"""
from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any, Dict

from . import workloads as W

#: seconds of busy loop per copy: long against a pool's dispatch (~0.3 ms),
#: short enough that the two checks add about two seconds to a run
ITEM_S = 0.05
PAIRS = 5


def noise_check(workers: int, cal: W.Calibration, when: str, pairs: int = PAIRS,
                item_s: float = ITEM_S) -> Dict[str, Any]:
    """One noise check: ``{"when", "workers", "item_s", "speedups": [...],
    "median", "min", "max"}`` (speed-ups None and a ``note`` if the pool
    could not start)."""
    out: Dict[str, Any] = {"when": when, "workers": workers, "item_s": item_s,
                           "speedups": [], "median": None, "min": None, "max": None,
                           "note": None}
    if workers < 2:
        out["note"] = "one worker: nothing runs in parallel"
        return out
    n = cal.iters_for(item_s * 1e6)
    try:
        pool = mp.Pool(workers)
    except Exception as e:  # no processes on this system: no check, said so
        out["note"] = f"could not start {workers} processes: {type(e).__name__}: {e}"
        return out
    try:
        pool.map(W.spin, [n] * workers, chunksize=1)  # every worker started and warm
        for _ in range(pairs):
            t0 = time.perf_counter()
            W.spin(n)
            one = time.perf_counter() - t0
            t0 = time.perf_counter()
            pool.map(W.spin, [n] * workers, chunksize=1)
            par = time.perf_counter() - t0
            out["speedups"].append(workers * one / par)
    finally:
        pool.terminate()
        pool.join()
    sp = out["speedups"]
    out.update(median=statistics.median(sp), min=min(sp), max=max(sp))
    return out
