"""What one run of the suite shares between its workloads, and how it times a runner.

A :class:`Session` holds the resolved config, the calibration, the records
written so far (``results``), the workload entries (``entries``), the inputs
built once (``built``) and builtin map's results (``expected``, what every
other runner is checked against). The per-workload modules (``map_runs``,
``sweep_runs``, ``array_runs``, ``allreduce_runs``, ``gpu_runs``) take a
session and append to it.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import workloads as W
from .config import Config
from .memory import measure, trim_heap
from .records import fill_times

# Workloads this large are first timed on a prefix; a runner whose projected
# single run exceeds PROBE_LIMIT_FACTOR * max_runner_s is skipped with a note:
# a hopeless peer (one task per item over millions of items) would otherwise
# hold the suite for minutes, while the prefix costs 1% of a run.
PROBE_MIN_ITEMS = 50_000
PROBE_LIMIT_FACTOR = 5.0


class Session:
    """The shared state of one run of the suite (see the module's docstring)."""

    def __init__(self, cfg: Config, cal: W.Calibration):
        self.cfg = cfg
        self.cal = cal
        self.results: List[Dict[str, Any]] = []
        self.entries: Dict[str, Dict[str, Any]] = {}
        self.built: Dict[str, W.Workload] = {}
        self.expected: Dict[str, List[Any]] = {}

    def build(self, name: str) -> W.Workload:
        """The input of workload ``name`` at this run's size (built anew)."""
        cfg = self.cfg
        return W.build(name, full=cfg.full, scale=cfg.size_scale, workers=cfg.workers,
                       cal=self.cal)

    def timed(self, run: Callable[[], Any], pair: Optional[Callable[[], Any]] = None,
              paired: Optional[List[float]] = None):
        """Run up to ``repeat`` times, stopping early once ``max_runner_s`` is
        spent (at least one run).  Returns (times, first result, note).

        pair: a reference run (builtin map over the same input) timed just
        before each run, its times appended to ``paired``. On a shared machine
        the speed of a core drifts by up to 2x over seconds: a ratio between
        runs a fraction of a second apart drifts far less than one between
        medians taken minutes apart, runner after runner."""
        times, first = [], None
        spent = 0.0
        for k in range(self.cfg.repeat):
            if pair is not None:
                t0 = time.perf_counter()
                pair()
                paired.append(time.perf_counter() - t0)
                spent += paired[-1]
            t0 = time.perf_counter()
            res = run()
            dt = time.perf_counter() - t0
            if k == 0:
                first = res
            del res
            times.append(dt)
            spent += dt
            if spent >= self.cfg.max_runner_s and k + 1 < self.cfg.repeat:
                break
        note = None
        if len(times) < self.cfg.repeat:
            note = f"{len(times)} of {self.cfg.repeat} runs (time cap {self.cfg.max_runner_s:g} s)"
        return times, first, note

    def probe(self, run: Callable[[List[Any]], Any], w: W.Workload) -> Optional[str]:
        """For a large workload, time one run over a 1% prefix (at least 1,000
        items); return a skip note if a full run projects past the limit."""
        if w.n < PROBE_MIN_ITEMS:
            return None
        k = max(1000, w.n // 100)
        t0 = time.perf_counter()
        run(w.args[:k])
        projected = (time.perf_counter() - t0) * w.n / k
        limit = PROBE_LIMIT_FACTOR * self.cfg.max_runner_s
        if projected > limit:
            return (f"projected {projected:.0f} s per run (from {k:,} items) > "
                    f"{limit:g} s; raise --max-runner-s to run it")
        return None

    def timed_record(self, rec, run, n_items, check=None, warm=None):
        """One untimed run under the memory sampler (after warm(), before the
        timed runs, whose freed memory stays in the heaps), then time run()
        into rec; check(first_result) -> error note or None. Appends rec;
        returns the first timed result (None on error)."""
        first = None
        try:
            mem = peak_memory(run, warm=warm)
            times, first, note = self.timed(run)
            fill_times(rec, times, n_items)
            rec["note"] = note
            rec["params"] = dict(rec["params"] or {}, **mem)
            bad = check(first) if check is not None else None
            if bad:
                rec["status"], rec["note"] = "error", bad
        except Exception as e:
            rec["status"], rec["note"] = "error", f"{type(e).__name__}: {e}"
            first = None
        self.results.append(rec)
        return first


def peak_memory(run: Callable[[], Any], warm: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    """One untimed run under the memory sampler: how much the PSS and USS
    sums of this process and its children grew (bytes). warm() runs first
    (workers import what the function needs), then free heap memory of this
    process goes back to the system (malloc_trim), then the baseline."""
    try:
        if warm is not None:
            warm()
        trim_heap()
        m = measure(run)
    except Exception as e:  # /proc unreadable: no figure, not an error
        return {"peak_memory_note": f"{type(e).__name__}: {e}"}
    return {"peak_pss_bytes": int(m["peak_pss_bytes"]), "peak_uss_bytes": int(m["peak_uss_bytes"])}


def with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """Run fn in a daemon thread; raise TimeoutError if it has not returned."""
    box: Dict[str, Any] = {}

    def target():
        try:
            box["v"] = fn()
        except BaseException as e:  # pragma: no cover - passed back below
            box["e"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer in {timeout:g} s")
    if "e" in box:
        raise box["e"]
    return box.get("v")
