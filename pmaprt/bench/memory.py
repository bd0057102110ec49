"""Peak memory of a process tree while something runs (psutil, sampled from a thread).

Two sums over the processes (this process and its descendants, e.g. a pool's
workers), both from ``/proc/PID/smaps_rollup``:

- USS (unique set size): the pages mapped by one process only. Summed, it
  leaves out every page two processes share, so shared memory that parent
  and workers both map (a shared array) is counted by neither.
- PSS (proportional set size): a page mapped by k processes counts 1/k in
  each. Summed over all the processes that map it, every page counts once:
  the tree's real footprint, never less than the USS sum.

Neither counts shared memory that no process of the tree maps. pmaprt maps
all of its own: its memfds are populated (MADV_POPULATE_WRITE) where they
are created, and a result's memfd is mapped with MAP_POPULATE by the parent.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Callable, Dict, List, Optional

import psutil


def trim_heap() -> None:
    """Give this process's free heap memory back to the system (glibc's
    malloc_trim), so that memory freed by earlier runs does not hide the next
    run's growth. A no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tree_pids(root: Optional[int] = None) -> List[int]:
    """root (default: this process) and its descendants."""
    p = psutil.Process(root or os.getpid())
    try:
        kids = p.children(recursive=True)
    except psutil.Error:
        kids = []
    return [p.pid] + [k.pid for k in kids]


def sample(pids: List[int]) -> Dict[str, int]:
    """{"uss", "pss", "rss": sums in bytes, "n": processes read} over pids."""
    out = {"uss": 0, "pss": 0, "rss": 0, "n": 0}
    for pid in pids:
        try:
            m = psutil.Process(pid).memory_full_info()
        except (psutil.Error, OSError):
            continue
        pss = getattr(m, "pss", m.uss)
        out["uss"] += m.uss
        out["pss"] += pss
        out["rss"] += m.rss
        out["n"] += 1
    return out


class PeakMemory:
    """Context manager: samples every `interval` seconds while the block runs.

    ``baseline`` is the sample taken on entry, ``peak`` the per-key maxima
    (including a last sample on exit, ``last``); ``growth()`` is peak minus
    baseline, ``growth_at_end()`` last minus baseline.

    Sampling skew: the processes are read one after another, so a page that
    changes hands meanwhile is counted 1 + 1/k or 0 + 1/k. Each sample reads
    them forward and backward and averages, which cancels that on average,
    but the maximum over many samples of a quantity with that noise reads
    high: while workers are mapping a large shared array for the first time
    the PSS peak read up to about 15 % high on the loaded 2-core VM. The USS
    sum cannot read high that way (a page going from one process to shared
    leaves the USS of the first and never enters another's), and the last
    sample, taken when nothing moves, is exact.
    pids: a callable returning the pids to sum (default: this process tree),
    called at each sample, so workers started meanwhile count.
    """

    def __init__(self, pids: Optional[Callable[[], List[int]]] = None, interval: float = 0.005):
        self.pids = pids or tree_pids
        self.interval = interval
        self.baseline: Dict[str, int] = {}
        self.peak: Dict[str, int] = {}
        self.last: Dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = None

    def _take(self):
        # Pages change hands while the processes are read one after another: a
        # page a worker maps between the two reads counts 1 + 1/2 in the PSS
        # sum when the parent is read first, 0 + 1/2 when last. Reading forward
        # then backward and averaging cancels that to first order. The USS sum
        # can only read low that way: the larger of the two passes.
        pids = self.pids()
        a, b = sample(pids), sample(pids[::-1])
        s = {k: (a[k] + b[k]) // 2 for k in ("pss", "rss")}
        s["uss"] = max(a["uss"], b["uss"])
        self.samples += 1
        for k in ("uss", "pss", "rss"):
            if s[k] > self.peak.get(k, 0):
                self.peak[k] = s[k]
        return s

    def _run(self):
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval)

    def __enter__(self):
        self.baseline = sample(self.pids())
        self.peak = dict(self.baseline)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pmaprt-peak-memory")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.last = self._take()
        return False

    def growth(self, key: str = "pss") -> int:
        return self.peak.get(key, 0) - self.baseline.get(key, 0)

    def growth_at_end(self, key: str = "pss") -> int:
        return self.last.get(key, 0) - self.baseline.get(key, 0)


def measure(run: Callable[[], object], pids: Optional[Callable[[], List[int]]] = None,
            interval: float = 0.005) -> Dict[str, float]:
    """Run once under PeakMemory; the growth of the USS and PSS sums, in bytes."""
    t0 = time.perf_counter()
    with PeakMemory(pids, interval) as pm:
        res = run()   # kept until the last sample: results count
    del res
    return {"peak_uss_bytes": pm.growth("uss"), "peak_pss_bytes": pm.growth("pss"),
            "baseline_pss_bytes": pm.baseline.get("pss", 0), "samples": pm.samples,
            "wall_s": time.perf_counter() - t0}
