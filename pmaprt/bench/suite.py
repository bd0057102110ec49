"""Runs the benchmark suite and assembles the results document.

The document's layout is described (and kept stable) in the docstring of
:mod:`pmaprt.bench`.
"""
from __future__ import annotations

import inspect
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from . import workloads as W
from .runners import BuiltinMap, Runner, all_runners, Pmaprt, RUNNER_IDS

SCHEMA_VERSION = 1

MAP_WORKLOADS = ("tiny", "medium", "heavy_tailed", "cost_shift", "numpy")
#: workloads run by a method of their own (``_extra_<name>``), after the runners
EXTRA_WORKLOADS = ("numpy_shared", "preprocess", "allreduce", "gpu")
#: map workloads whose every runner also gets one untimed run under a memory sampler
MEMORY_WORKLOADS = ("numpy",)

#: every per-result record has exactly these keys (None where not applicable)
RESULT_KEYS = (
    "workload", "runner", "label", "kind", "status", "note", "metric", "params",
    "items", "times_s", "paired_serial_s", "runs", "median_s", "min_s", "items_per_s", "latency_us",
    "busbw_gbps", "speedup_vs_map", "speedup_vs_best_peer", "makespan_over_ideal",
    "efficiency", "startup_s", "stats",
)

#: every entry of the "workloads" object has exactly these keys
WORKLOAD_KEYS = (
    "name", "description", "status", "note", "params", "items", "serial_s",
    "longest_item_s", "ideal_s", "best_peer", "best_peer_s", "adaptive_chunksize",
    "sweep", "timeline",
)

TOP_KEYS = (
    "schema_version", "created", "argv", "config", "machine", "calibration",
    "workloads", "results", "files", "duration_s",
)

TIMELINE_MAX_CHUNKS = 20_000

#: workloads this large are first timed on a prefix; a runner whose projected
#: single run exceeds PROBE_LIMIT_FACTOR * max_runner_s is skipped with a note
PROBE_MIN_ITEMS = 50_000
PROBE_LIMIT_FACTOR = 5.0


@dataclass
class Config:
    full: bool = False
    repeat: Optional[int] = None  # None: 3 quick, 5 full
    size_scale: float = 1.0
    workers: Optional[int] = None  # None: os.cpu_count()
    workloads: Optional[List[str]] = None  # None: all
    out_dir: str = os.path.join("bench", "results")
    progress: bool = True
    max_runner_s: Optional[float] = None  # None: 3 s quick, 60 s full
    sweep: bool = True
    # each timed run of a parallel runner comes right after a run of builtin
    # map over the same input; vs map, eff and /ideal are then medians of the
    # per-pair ratios (see Suite.timed)
    pair: bool = True
    plots: bool = True
    runners: Optional[List[str]] = None  # None: all (builtin map always runs)
    argv: List[str] = field(default_factory=list)

    def resolve(self) -> "Config":
        if self.repeat is None:
            self.repeat = 5 if self.full else 3
        self.repeat = max(1, int(self.repeat))
        if self.workers is None:
            self.workers = os.cpu_count() or 1
        self.workers = max(1, int(self.workers))
        if self.max_runner_s is None:
            self.max_runner_s = 60.0 if self.full else 3.0
        if not self.size_scale or self.size_scale <= 0:
            raise ValueError("size_scale must be > 0")
        names = self.workloads or list(W.ALL)
        seen = []
        for n in names:
            c = W.canonical(n)
            if c not in seen:
                seen.append(c)
        self.workloads = [n for n in W.ALL if n in seen]
        if self.runners is not None:
            for r in self.runners:
                if r not in RUNNER_IDS:
                    raise ValueError(f"unknown runner {r!r}; choose from {', '.join(RUNNER_IDS)}")
        return self

    def as_dict(self) -> Dict[str, Any]:
        return {
            "mode": "full" if self.full else "quick",
            "repeat": self.repeat,
            "size_scale": self.size_scale,
            "workers": self.workers,
            "workloads": list(self.workloads or []),
            "max_runner_s": self.max_runner_s,
            "sweep": self.sweep,
            "pair": self.pair,
            "plots": self.plots,
            "runners": list(self.runners) if self.runners is not None else None,
        }


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def new_record(workload: str, runner: Runner, **kw) -> Dict[str, Any]:
    rec = {k: None for k in RESULT_KEYS}
    rec.update(workload=workload, runner=runner.id, label=runner.label, kind=runner.kind,
               status="ok", metric="wall")
    rec.update(kw)
    return rec


def new_workload_entry(name: str, **kw) -> Dict[str, Any]:
    e = {k: None for k in WORKLOAD_KEYS}
    e.update(name=name, description=W.DESCRIPTIONS.get(name, ""), status="ok")
    e.update(kw)
    return e


def _fnum(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _inum(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def _same(got, want) -> bool:
    if want is None:
        return True
    try:
        if len(got) != len(want):
            return False
    except TypeError:
        return False
    try:
        import numpy as np

        if want and isinstance(want[0], float):
            return bool(np.allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float)))
    except Exception:
        pass
    return list(got) == list(want)


def stats_summary(st) -> Optional[Dict[str, Any]]:
    """A JSON-able summary of a ``pmaprt.MapStats`` (missing fields -> None)."""
    if st is None:
        return None
    cs = [int(c) for c in (getattr(st, "chunksizes", None) or [])]
    workers = []
    for w in getattr(st, "workers", None) or []:
        log = getattr(w, "chunk_log", None) or []
        workers.append({
            "items": _inum(getattr(w, "items", None)),
            "chunks": _inum(getattr(w, "chunks", None)),
            "steals": _inum(getattr(w, "steals", None)),
            "busy_s": _fnum(getattr(w, "busy_s", None)),
            "idle_s": _fnum(getattr(w, "idle_s", None)),
            "rank": _inum(getattr(w, "rank", len(workers))),
            "chunk_log_len": len(log),
        })
    return {
        "mode": getattr(st, "mode", None),
        "wall_s": _fnum(getattr(st, "wall_s", None)),
        "items": _inum(getattr(st, "items", None)),
        "n_chunks": len(cs),
        "chunksize_median": adaptive_chunksize(st),
        "chunksize_min": min(cs) if cs else None,
        "chunksize_max": max(cs) if cs else None,
        "chunksizes": cs if len(cs) <= 10_000 else None,
        "workers": workers,
    }


def busy_seconds(st) -> Optional[float]:
    """The workers' seconds inside chunks (reading items, running them),
    summed over workers; None for a map that ran (partly) inline."""
    if st is None or "inline" in (getattr(st, "mode", "") or ""):
        return None
    return float(sum(getattr(w, "busy_s", 0.0) for w in getattr(st, "workers", None) or []))


def split_efficiency(busy: List[float], times: List[float], serial: List[float],
                     workers: int) -> Optional[Dict[str, float]]:
    """Efficiency serial/(W*t) = busy fraction / work inflation, per run:
    busy fraction = busy/(W*t), the share of the workers' wall time spent in
    chunks (what the scheduler controls: idle workers, dispatch); work
    inflation = busy/serial, how much longer the same items took in W
    processes at once than in one (what the machine does: shared caches,
    memory bandwidth, clock, other tenants). Medians over the runs."""
    if not busy or len(busy) != len(times) or len(serial) != len(times):
        return None
    rows = [(b, t, s_) for b, t, s_ in zip(busy, times, serial) if b and t and s_]
    if not rows:
        return None
    return {"busy_fraction": statistics.median(b / (workers * t) for b, t, _ in rows),
            "work_inflation": statistics.median(b / s_ for b, _, s_ in rows)}


def vs_adaptive(fixed: Dict[str, Any], adaptive: Optional[Dict[str, Any]]) -> Optional[float]:
    """A fixed chunk size's speed relative to the adaptive choice (adaptive
    time / fixed time; > 1: the fixed size was faster): the median of its
    per-run ratios against the adaptive run just before each (paired sweeps),
    else the ratio of medians."""
    pa = (fixed.get("stats") or {}).get("paired_adaptive_s")
    ts = fixed.get("times_s") or []
    if pa and len(pa) == len(ts) and all(ts):
        return statistics.median(a / t for a, t in zip(pa, ts))
    if adaptive and adaptive.get("median_s") and fixed.get("median_s"):
        return adaptive["median_s"] / fixed["median_s"]
    return None


def adaptive_chunksize(st) -> Optional[int]:
    cs = getattr(st, "chunksizes", None) if st is not None else None
    if not cs:
        return None
    return int(round(statistics.median(cs)))


def timeline(st) -> Optional[Dict[str, Any]]:
    """Per-worker chunk log ``[[t_start, t_end, start_index, count], ...]``."""
    if st is None:
        return None
    rows, truncated = [], False
    for w in getattr(st, "workers", None) or []:
        log = list(getattr(w, "chunk_log", None) or [])
        if len(log) > TIMELINE_MAX_CHUNKS:
            log, truncated = log[:TIMELINE_MAX_CHUNKS], True
        row = []
        for e in log:
            try:
                t0, t1, s, c = e[0], e[1], e[2], e[3]
                row.append([float(t0), float(t1), int(s), int(c)])
            except Exception:
                continue
        rows.append(row)
    if not any(rows):
        return None
    return {"wall_s": _fnum(getattr(st, "wall_s", None)), "mode": getattr(st, "mode", None),
            "workers": rows, "truncated": truncated}


def _accepts(fn, name: str) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    ps = sig.parameters
    return name in ps or any(p.kind is p.VAR_KEYWORD for p in ps.values())


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="pmaprt.bench", unit="step",
                                file=sys.stderr, dynamic_ncols=True, leave=True)
            except Exception:
                self.bar = None

    def step(self, what: str = "", n: int = 1):
        if self.bar is not None:
            self.bar.set_postfix_str(what[:40], refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------


class Suite:
    def __init__(self, cfg: Config):
        self.cfg = cfg.resolve()
        self.results: List[Dict[str, Any]] = []
        self.entries: Dict[str, Dict[str, Any]] = {}
        self.built: Dict[str, W.Workload] = {}
        self.expected: Dict[str, List[Any]] = {}
        self.cal: Optional[W.Calibration] = None

    # timing ---------------------------------------------------------------
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

    def _fill_times(self, rec, times, n_items):
        rec["times_s"] = [float(t) for t in times]
        rec["runs"] = len(times)
        rec["median_s"] = float(statistics.median(times))
        rec["min_s"] = float(min(times))
        rec["items"] = n_items
        if rec["median_s"] > 0 and n_items:
            rec["items_per_s"] = n_items / rec["median_s"]

    # phases ---------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        t_start = time.perf_counter()
        cfg = self.cfg
        from .machine import describe

        machine = describe(cfg.workers)
        self.cal = W.calibrate()

        runners = [r for r in all_runners(optional=cfg.runners is not None)
                   if r.kind == "baseline" or cfg.runners is None or r.id in cfg.runners]
        avail = {r.id: r.available() for r in runners}
        wl = cfg.workloads
        map_wl = [n for n in wl if n in MAP_WORKLOADS]
        swept = [n for n in W.SWEPT if n in map_wl] if cfg.sweep else []

        # inputs
        for name in map_wl:
            self.built[name] = W.build(name, full=cfg.full, scale=cfg.size_scale,
                                       workers=cfg.workers, cal=self.cal)
            w = self.built[name]
            self.entries[name] = new_workload_entry(name, params=w.params, items=w.n)
        n_rt = W.roundtrip_calls(full=cfg.full, scale=cfg.size_scale)
        if "roundtrip" in wl:
            self.entries["roundtrip"] = new_workload_entry(
                "roundtrip", params={"calls_per_sample": n_rt}, items=n_rt)

        # plan the progress bar
        sweep_pts = {n: W.sweep_chunksizes(self.built[n].n, cfg.workers, cfg.full) for n in swept}
        total = 0
        for r in runners:
            total += len(map_wl) + (1 if ("roundtrip" in wl and r.has_call) else 0)
        total += sum(len(v) for v in sweep_pts.values())
        total += sum(1 for n in EXTRA_WORKLOADS if n in wl)
        prog = _Progress(total, cfg.progress)
        try:
            for r in runners:
                if not map_wl and not ("roundtrip" in wl and r.has_call):
                    continue  # nothing for this runner: do not even start its pool
                ok, why = avail[r.id]
                if not ok:
                    self._skip_runner(r, map_wl, "roundtrip" in wl, why or "not available")
                    prog.step(r.label, len(map_wl) + (1 if ("roundtrip" in wl and r.has_call) else 0))
                    continue
                self._run_runner(r, map_wl, "roundtrip" in wl, n_rt, sweep_pts, prog)
            for name in EXTRA_WORKLOADS:
                if name in wl:
                    getattr(self, f"_extra_{name}")(avail.get("pmaprt", (False, None)))
                    prog.step(name)
        finally:
            _shutdown_default_pool()
            prog.close()
            for w in self.built.values():
                if w.cleanup:
                    w.cleanup()

        self._derive()
        self.entries = {n: self.entries[n] for n in W.ALL if n in self.entries}
        doc = {
            "schema_version": SCHEMA_VERSION,
            "created": machine["date"],
            "argv": list(cfg.argv),
            "config": cfg.as_dict(),
            "machine": machine,
            "calibration": {"spin_iters_per_us": self.cal.iters_per_us,
                            "samples": list(self.cal.samples)},
            "workloads": self.entries,
            "results": self.results,
            "files": {"json": "results.json", "table": "table.txt", "plots": []},
            "duration_s": time.perf_counter() - t_start,
        }
        return doc

    def _skip_runner(self, r, map_wl, rt, why):
        for name in map_wl:
            self.results.append(new_record(name, r, status="skipped", note=why,
                                           items=self.built[name].n))
        if rt and r.has_call:
            self.results.append(new_record("roundtrip", r, status="skipped", note=why,
                                           metric="latency"))

    def _run_runner(self, r: Runner, map_wl, rt, n_rt, sweep_pts, prog):
        cfg = self.cfg
        startup = None
        try:
            t0 = time.perf_counter()
            r.start(cfg.workers)
            r.warm()
            startup = time.perf_counter() - t0
        except Exception as e:  # a peer that cannot start is skipped, not fatal
            try:
                r.close()
            except Exception:
                pass
            note = f"could not start: {type(e).__name__}: {e}"
            for name in map_wl:
                self.results.append(new_record(name, r, status="error", note=note,
                                               items=self.built[name].n))
            if rt and r.has_call:
                self.results.append(new_record("roundtrip", r, status="error", note=note,
                                               metric="latency"))
            prog.step(r.label, len(map_wl) + (1 if rt and r.has_call else 0))
            return
        try:
            for name in map_wl:
                w = self.built[name]
                rec = new_record(name, r, params=r.params(w.n), items=w.n, startup_s=startup)
                first = None
                try:
                    skip = self._probe(lambda a: r.map(w.fn, a), w) if r.kind != "baseline" else None
                    if skip:
                        rec["status"], rec["note"] = "skipped", skip
                        self.results.append(rec)
                        prog.step(f"{r.label} {name}")
                        if isinstance(r, Pmaprt) and name in sweep_pts:
                            self._sweep(r, w, sweep_pts[name], prog)
                        continue
                    mem = None
                    if name in MEMORY_WORKLOADS:
                        # before the timed runs: their freed memory stays in the heaps
                        mem = _peak_memory(lambda: r.map(w.fn, w.args),
                                           warm=lambda: r.map(w.fn, w.args[: 2 * cfg.workers]))
                    pair, paired = None, []
                    if cfg.pair and r.kind != "baseline":
                        pair = lambda: BuiltinMap().map(w.fn, w.args)  # noqa: E731
                    busy = []   # pmaprt: the workers' seconds in chunks, per timed run

                    def run_map(r=r, w=w, busy=busy):
                        out = r.map(w.fn, w.args)
                        if isinstance(r, Pmaprt):
                            busy.append(busy_seconds(r.last_stats))
                        return out
                    times, first, note = self.timed(run_map, pair, paired)
                    self._fill_times(rec, times, w.n)
                    if paired:
                        rec["paired_serial_s"] = [float(t) for t in paired]
                    rec["note"] = note
                    if mem:
                        rec["params"] = dict(rec["params"] or {}, **mem)
                    if r.kind == "baseline":
                        self.expected[name] = first
                        self._baseline_extras(w)
                    elif not _same(first, self.expected.get(name)):
                        rec["status"] = "error"
                        rec["note"] = "wrong results"
                    if isinstance(r, Pmaprt):
                        st = r.last_stats
                        rec["stats"] = stats_summary(st)
                        if rec["stats"] is not None and None not in busy:
                            rec["stats"]["busy_s_runs"] = [float(b) for b in busy]
                        ac = adaptive_chunksize(st)
                        self.entries[name]["adaptive_chunksize"] = ac
                        if ac is not None:
                            rec["params"] = dict(rec["params"], adaptive_chunksize_median=ac)
                        self.entries[name]["timeline"] = timeline(st)
                except Exception as e:
                    rec["status"] = "error"
                    rec["note"] = f"{type(e).__name__}: {e}"
                del first
                self.results.append(rec)
                prog.step(f"{r.label} {name}")
                if isinstance(r, Pmaprt) and name in sweep_pts:
                    self._sweep(r, w, sweep_pts[name], prog)
            if rt and r.has_call:
                self._roundtrip(r, n_rt, startup)
                prog.step(f"{r.label} roundtrip")
        finally:
            try:
                r.close()
            except Exception:
                pass

    def _probe(self, run: Callable[[List[Any]], Any], w: W.Workload) -> Optional[str]:
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

    def _baseline_extras(self, w: W.Workload):
        e = self.entries[w.name]
        if w.ideal and w.longest_arg is not None:
            e["longest_item_s"] = W.time_call(w.fn, w.longest_arg, repeat=3)

    def _sweep(self, r: Pmaprt, w: W.Workload, points: List[int], prog):
        for cs in points:
            rec = new_record(w.name, r, kind="sweep", params={"workers": r.workers, "chunksize": cs},
                             items=w.n)
            first = None
            try:
                skip = self._probe(lambda a: r.map(w.fn, a, chunksize=cs), w)
                if skip:
                    rec["status"], rec["note"] = "skipped", skip
                    self.results.append(rec)
                    prog.step(f"sweep {w.name} cs={cs}")
                    continue
                # Paired: each fixed run right after an adaptive one, so that
                # "vs adaptive" compares runs a moment apart (Suite.timed).
                pair, paired = None, []
                if self.cfg.pair:
                    pair = lambda: r.map(w.fn, w.args)  # noqa: E731
                times, first, note = self.timed(lambda: r.map(w.fn, w.args, chunksize=cs),
                                                pair, paired)
                self._fill_times(rec, times, w.n)
                rec["note"] = note
                if not _same(first, self.expected.get(w.name)):
                    rec["status"], rec["note"] = "error", "wrong results"
                st = r.last_stats
                if st is not None:
                    rec["stats"] = {"mode": getattr(st, "mode", None),
                                    "chunksize_median": adaptive_chunksize(st)}
                    if paired:
                        rec["stats"]["paired_adaptive_s"] = [float(t) for t in paired]
            except Exception as e:
                rec["status"], rec["note"] = "error", f"{type(e).__name__}: {e}"
            del first
            self.results.append(rec)
            prog.step(f"sweep {w.name} cs={cs}")

    def _roundtrip(self, r: Runner, calls: int, startup):
        rec = new_record("roundtrip", r, metric="latency", startup_s=startup,
                         params={"workers": r.workers if r.kind != "baseline" else 1,
                                 "calls_per_sample": calls})
        try:
            for i in range(min(5, calls)):  # untimed warm-up
                r.call(W.noop, i)
            samples = []
            spent = 0.0
            for k in range(self.cfg.repeat):
                t0 = time.perf_counter()
                for i in range(calls):
                    r.call(W.noop, i)
                dt = time.perf_counter() - t0
                samples.append(dt / calls)
                spent += dt
                if spent >= self.cfg.max_runner_s and k + 1 < self.cfg.repeat:
                    rec["note"] = (f"{k + 1} of {self.cfg.repeat} samples "
                                   f"(time cap {self.cfg.max_runner_s:g} s)")
                    break
            if r.call(W.noop, 12345) != 12345:
                rec["status"], rec["note"] = "error", "wrong result"
            self._fill_times(rec, samples, None)
            rec["items"] = calls
            rec["items_per_s"] = None
            rec["latency_us"] = rec["median_s"] * 1e6
        except Exception as e:
            rec["status"], rec["note"] = "error", f"{type(e).__name__}: {e}"
        self.results.append(rec)

    # workloads that depend on optional pmaprt features ---------------------
    def _timed_record(self, rec, run, n_items, check=None, warm=None):
        """One untimed run under the memory sampler (after warm(), before the
        timed runs, whose freed memory stays in the heaps), then time run()
        into rec; check(first_result) -> error note or None. Appends rec;
        returns the first timed result (None on error)."""
        first = None
        try:
            mem = _peak_memory(run, warm=warm)
            times, first, note = self.timed(run)
            self._fill_times(rec, times, n_items)
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

    def _extra_numpy_shared(self, avail):
        """The numpy workload's array, shared (handed to workers without a
        copy) and plain (one copy, ``chunks=``), against serial / W."""
        entry = new_workload_entry("numpy_shared")
        self.entries["numpy_shared"] = entry
        ok, why = avail
        if not ok:
            entry.update(status="skipped", note=f"pmaprt not available: {why}")
            return
        import pmaprt

        if getattr(pmaprt, "asarray", None) is None or getattr(pmaprt, "Pool", None) is None:
            entry.update(status="skipped", note="needs issue 4: pmaprt has no shared arrays")
            return
        import numpy as np

        cfg = self.cfg
        w = self.built.get("numpy") or W.build("numpy", full=cfg.full, scale=cfg.size_scale,
                                                workers=cfg.workers, cal=self.cal)
        rows = np.stack(w.args)                     # (256, k) float64, plain
        shared = pmaprt.asarray(rows, shared=True)  # the same, in shared memory
        flat = rows.reshape(-1)
        k = rows.shape[1]
        params = dict(w.params, input_bytes=int(rows.nbytes))
        entry.update(params=params, items=w.n)
        base = new_record("numpy_shared", all_runners()[0], items=w.n, params={"workers": 1})
        want = self._timed_record(base, lambda: list(map(w.fn, shared)), w.n)
        if want is None:
            entry.update(status="error", note="the serial run failed")
            return
        entry["longest_item_s"] = W.time_call(w.fn, shared[0], repeat=5)
        pool = pmaprt.Pool(cfg.workers)
        # the same, where workers may not read the parent: the plain array is copied
        copying = pmaprt.Pool(cfg.workers)
        copying.arrays.pvm = False
        try:
            reads = pool.arrays.pvm_allowed()
            few = 2 * cfg.workers
            variants = [
                ("pmaprt (shared array)", pool, shared, {}),
                ("pmaprt (plain ndarray, chunks=)" + (", read by workers" if reads else ", copied"),
                 pool, flat, {"chunks": k})]
            if reads:
                variants.append(("pmaprt (plain ndarray, chunks=, copied)", copying, flat,
                                 {"chunks": k}))
            for label, p, src, kw in variants:
                rec = new_record("numpy_shared", Pmaprt(), items=w.n, label=label,
                                 params={"workers": cfg.workers})
                span = few * kw.get("chunks", 1)
                self._timed_record(
                    rec, lambda p=p, src=src, kw=kw: list(p.map(w.fn, src, **kw)), w.n,
                    warm=lambda p=p, src=src, kw=kw: list(p.map(w.fn, src[:span], **kw)),
                    check=lambda got: None if _same(got, want) else "wrong results")
        finally:
            pool.close()
            copying.close()

    def _extra_preprocess(self, avail):
        entry = new_workload_entry("preprocess")
        self.entries["preprocess"] = entry
        ok, why = avail
        if not ok:
            entry.update(status="skipped", note=f"pmaprt not available: {why}")
            return
        import pmaprt

        pmap = getattr(pmaprt, "pmap", None)
        if pmap is None or not _accepts(pmap, "out"):
            entry.update(status="skipped", note="needs issue 4 (zero-copy): pmaprt.pmap has no out=")
            return
        import numpy as np

        cfg = self.cfg
        w = W.build("preprocess", full=cfg.full, scale=cfg.size_scale, workers=cfg.workers,
                    cal=self.cal)
        x = w.args                                     # (blocks, rows, 16) float32, plain
        nbytes = int(x.nbytes)
        entry.update(params=w.params, items=w.n)
        # outputs exist, touched, before anything is measured: peak memory is what a run adds
        out = np.empty_like(x)
        out.fill(0.0)

        def serial():
            for i, blk in enumerate(x):
                out[i] = w.fn(blk)
            return out
        base = new_record("preprocess", all_runners()[0], items=w.n, label="serial numpy (1 process)",
                          params={"workers": 1})
        want = self._timed_record(base, serial, w.n)
        if want is None:
            entry.update(status="error", note="the serial run failed")
            return
        want = want.copy()

        def close(got):
            return None if np.allclose(got, want) else "wrong results in out="
        dst = np.empty_like(x)
        dst.fill(0.0)
        mc = new_record("preprocess", all_runners()[0], items=w.n, label="numpy memcpy (1 process)",
                        params={"workers": 1, "what": "np.copyto of the same bytes"})
        self._timed_record(mc, lambda: np.copyto(dst, x), w.n)
        del dst
        xs, outs = None, None
        if getattr(pmaprt, "asarray", None) is not None:
            xs = pmaprt.asarray(x, shared=True)
            outs = pmaprt.empty_like(x)

        def run_pm(src, dst):
            def run():
                for _ in pmap(w.fn, src, workers=cfg.workers, out=dst):
                    pass
                return dst
            return run
        variants = []
        if xs is not None:
            variants.append(("pmaprt (shared in, shared out=)", xs, outs))
        plain_out = np.empty_like(x)
        plain_out.fill(0.0)
        variants.append(("pmaprt (plain in, plain out=)", x, plain_out))
        for label, src, dst in variants:
            rec = new_record("preprocess", Pmaprt(), items=w.n, label=label,
                             params={"workers": cfg.workers, "out": True})
            few = 2 * cfg.workers
            self._timed_record(rec, run_pm(src, dst), w.n, check=close,
                               warm=run_pm(src[:few], dst[:few]))
        # mp.Pool.map over the same blocks, results gathered into out
        mp_runner = next(r for r in all_runners() if r.id == "mp_pool_map")
        rec = new_record("preprocess", mp_runner, items=w.n, params={"workers": cfg.workers})
        try:
            mp_runner.start(cfg.workers)
            blocks = list(x)

            def run_mp():
                for i, r in enumerate(mp_runner.map(w.fn, blocks)):
                    out[i] = r
                return out
            self._timed_record(rec, run_mp, w.n, check=close,
                               warm=lambda: mp_runner.map(w.fn, blocks[: 2 * cfg.workers]))
        except Exception as e:
            rec["status"], rec["note"] = "error", f"{type(e).__name__}: {e}"
            self.results.append(rec)
        finally:
            mp_runner.close()
        memcpy_s = mc["median_s"] if mc["status"] == "ok" else None
        for r in self.results:
            if r["workload"] == "preprocess" and r["status"] == "ok" and r["median_s"]:
                gbs = nbytes / r["median_s"] / 1e9
                r["params"] = dict(r["params"] or {}, gb_per_s=gbs)
                if memcpy_s:
                    r["params"]["vs_memcpy"] = memcpy_s / r["median_s"]

    def _extra_allreduce(self, avail):
        """pmaprt.allreduce timed inside an SPMD map of W workers, against a naive
        mp.Pool all-reduce and single-process memcpy of the same bytes, measured
        in this run (see pmaprt.bench.collective)."""
        from . import collective as C

        entry = new_workload_entry("allreduce")
        self.entries["allreduce"] = entry
        ok, why = avail
        if not ok:
            entry.update(status="skipped", note=f"pmaprt not available: {why}")
            return
        cfg = self.cfg
        wk = cfg.workers
        if wk < 2:
            entry.update(status="skipped", note="an all-reduce needs at least 2 workers")
            return
        top = 256 << 20 if cfg.full else 4 << 20
        top = max(4 << 10, int(top * min(1.0, cfg.size_scale)))
        sizes = W.geometric(4 << 10, top, 4)
        samples = cfg.repeat
        entry.update(params={"sizes_bytes": sizes, "dtype": "float32", "op": "sum",
                             "busbw": "2*(W-1)/W * bytes / t",
                             "timing": "inside the ranks of an SPMD map, slowest rank per sample",
                             "calls_per_sample": {str(n): C.calls_for(n) for n in sizes}},
                     items=len(sizes))
        measured = {}
        gloo_ok, gloo_why = C.gloo_available()
        runs = [(Pmaprt(), lambda: C.time_pmaprt(sizes, wk, samples)),
                (C.NAIVE, lambda: C.time_naive(sizes, wk, samples)),
                (C.MEMCPY, lambda: C.time_memcpy(sizes, samples)),
                (C.MEMCPY_ALL, lambda: C.time_memcpy_all(sizes, wk, samples))]
        if gloo_ok:
            runs.append((C.GLOO, lambda: C.time_gloo(sizes, wk, samples)))
        for runner, run in runs:
            try:
                measured[runner.id] = (runner, _with_timeout(run, 600.0))
            except Exception as e:
                rec = new_record("allreduce", runner, metric="busbw", status="error",
                                 note=f"{type(e).__name__}: {e}", params={"workers": wk})
                self.results.append(rec)
        for rid, (runner, times) in measured.items():
            for nbytes in sizes:
                ts = times[nbytes]
                rec = new_record("allreduce", runner, metric="busbw",
                                 params={"workers": 1 if rid == C.MEMCPY.id else wk,
                                         "bytes": nbytes, "calls_per_sample": C.calls_for(nbytes)})
                self._fill_times(rec, ts, 1)
                rec["items_per_s"] = None
                t = rec["median_s"]
                if rid == C.MEMCPY.id:
                    rec["busbw_gbps"] = nbytes / t / 1e9
                elif rid == C.MEMCPY_ALL.id:
                    rec["busbw_gbps"] = wk * nbytes / t / 1e9
                else:
                    rec["busbw_gbps"] = C.busbw(nbytes, t, wk)
                self.results.append(rec)
        recs = {(r["runner"], r["params"].get("bytes")): r for r in self.results
                if r["workload"] == "allreduce" and r["status"] == "ok"}
        for nbytes in sizes:
            me = recs.get(("pmaprt", nbytes))
            if me is None:
                continue
            naive = recs.get((C.NAIVE.id, nbytes))
            mem = recs.get((C.MEMCPY.id, nbytes))
            mem_all = recs.get((C.MEMCPY_ALL.id, nbytes))
            notes = []
            if naive is not None:
                me["speedup_vs_best_peer"] = naive["median_s"] / me["median_s"]
                notes.append(f"{me['speedup_vs_best_peer']:.1f}x naive mp.Pool busbw")
            gloo = recs.get((C.GLOO.id, nbytes))
            if gloo is not None:
                notes.append(f"{gloo['median_s'] / me['median_s']:.1f}x gloo busbw")
            if mem is not None:
                notes.append(f"{100 * me['busbw_gbps'] / mem['busbw_gbps']:.0f}% of memcpy")
            if mem_all is not None:
                notes.append(f"{100 * me['busbw_gbps'] / mem_all['busbw_gbps']:.0f}% of aggregate")
            me["note"] = "; ".join(notes) or None
        if not gloo_ok:
            self.results.append(new_record("allreduce", C.GLOO, metric="busbw", status="skipped",
                                           note=gloo_why, params={"workers": wk}))
        if ("pmaprt", sizes[0]) not in recs:
            entry.update(status="error", note="pmaprt's all-reduce did not run")

    def _extra_gpu(self, avail):
        """The issue-6 GPU workloads, each beside its CuPy reference in the same run:
        device-resident y = 2x + 1 (vs one direct ElementwiseKernel call),
        host-resident y = 2x + 1 (vs measured pinned host->device bandwidth and vs
        cupy.asarray + kernel + .get()), and a ring all-reduce over 4 logical ranks
        on one GPU (busbw vs the device's copy bandwidth)."""
        entry = new_workload_entry("gpu")
        self.entries["gpu"] = entry
        ok, why = avail
        if not ok:
            entry.update(status="skipped", note=f"pmaprt not available: {why}")
            return
        import pmaprt

        devs = pmaprt.devices()
        if not devs.gpu_count:
            entry.update(status="skipped", note=f"no GPU: {devs.reason or 'none found'}")
            return
        try:
            import cupy as cp
            import cupyx
        except ImportError as e:
            entry.update(status="skipped", note=f"GPU present but CuPy is not installed ({e}); "
                                                 "pip install '.[gpu]'")
            return
        import types

        import numpy as np

        from .. import gpu as G

        cfg = self.cfg
        nbytes = (2 << 30) if cfg.full else (256 << 20)
        nbytes = max(1 << 20, int(nbytes * min(1.0, cfg.size_scale)) // 4 * 4)
        n = nbytes // 4
        ranks, ar_bytes = 4, max(1 << 20, int((256 << 20) * min(1.0, cfg.size_scale)))
        g0 = devs.gpus[0]
        entry.update(params={"gpus": [g.name for g in devs.gpus], "bytes": nbytes,
                             "dtype": "float32", "kernel": "y = 2x + 1",
                             "allreduce_bytes": ar_bytes, "allreduce_ranks": ranks},
                     items=n)
        ew = cp.ElementwiseKernel("T x", "T y", "y = 2 * x + 1", "pmaprt_bench_affine")

        def runner(rid, label, kind):
            return types.SimpleNamespace(id=rid, label=label, kind=kind)

        def sync():
            cp.cuda.Device().synchronize()

        def add(rid, label, kind, fn, moved, note_fn=None, **params):
            rec = new_record("gpu", runner(rid, label, kind), items=n, params=params)
            try:
                fn()                      # warm: compile, pools, pinned buffers
                times, _, note = self.timed(fn)
                self._fill_times(rec, times, n)
                gbps = moved / rec["median_s"] / 1e9
                rec["stats"] = {"gbps": gbps}
                rec["note"] = "; ".join(x for x in (f"{gbps:.1f} GB/s", note) if x)
            except Exception as e:
                rec["status"], rec["note"] = "error", f"{type(e).__name__}: {e}"
            self.results.append(rec)
            return rec

        def ratio(rec, ref, goal, what):
            if rec["status"] == "ok" and ref["status"] == "ok":
                r = rec["stats"]["gbps"] / ref["stats"]["gbps"]
                rec["stats"][f"over_{what}"] = r
                rec["note"] += f"; {r:.2f} of {what} (goal {goal:.2f})" if goal else f"; {r:.2f} of {what}"

        try:
            # 1. device-resident: bytes moved = read x + write y
            x = cp.arange(n, dtype=cp.float32)
            y = cp.empty_like(x)
            ref = add("cupy-direct", "CuPy: one ElementwiseKernel call", "reference",
                      lambda: (ew(x, y), sync()), 2 * nbytes, where="device")
            ours = add("pmaprt-device", "pmaprt pmap(device='gpu'), device input", "pmaprt",
                       lambda: G.device_map(ew, (x,), device="gpu", out=y), 2 * nbytes,
                       where="device")
            if ours["status"] == "ok" and not bool(cp.all(y == 2 * x + 1)):
                ours["status"], ours["note"] = "error", "wrong results"
            ratio(ours, ref, 0.9, "direct CuPy")
            x = y = None          # free the device memory before the next part
            # 2. host-resident: end-to-end bytes = input size (as the goal is stated)
            xh = np.arange(n, dtype=np.float32)
            yh = np.empty_like(xh)
            pin = cupyx.empty_pinned(min(n, (256 << 20) // 4), np.float32)
            dpin = cp.empty(pin.shape, cp.float32)
            rt = cp.cuda.runtime
            s = cp.cuda.Stream(non_blocking=True)

            def h2d():
                rt.memcpyAsync(dpin.data.ptr, pin.ctypes.data, pin.nbytes, rt.memcpyHostToDevice, s.ptr)
                s.synchronize()
            pinned = add("pinned-h2d", f"pinned host->device copy ({pin.nbytes >> 20} MiB)",
                         "reference", h2d, pin.nbytes, where="host")
            naive = add("cupy-naive", "cupy.asarray + kernel + .get()", "reference",
                        lambda: ew(cp.asarray(xh)).get(), nbytes, where="host")
            ours_h = add("pmaprt-host", "pmaprt pmap(device='gpu'), host input", "pmaprt",
                         lambda: G.device_map(ew, (xh,), device="gpu", out=yh), nbytes,
                         where="host")
            if ours_h["status"] == "ok" and not np.array_equal(yh[:1 << 20], 2 * xh[:1 << 20] + 1):
                ours_h["status"], ours_h["note"] = "error", "wrong results"
            ratio(ours_h, pinned, 0.8, "pinned H2D bandwidth")
            ratio(ours_h, naive, None, "asarray+get")
            ours_r = add("pmaprt-host-register",
                         "pmaprt pmap(device='gpu', register=True), host input", "pmaprt",
                         lambda: G.device_map(ew, (xh,), device="gpu", out=yh, register=True),
                         nbytes, where="host", register=True)
            ratio(ours_r, pinned, 0.8, "pinned H2D bandwidth")
            xh = yh = pin = dpin = None
            # 3. all-reduce, 4 logical ranks on GPU 0; busbw = 2(N-1)/N * S / t
            m = ar_bytes // 4
            bufs = [cp.full(m, r + 1, cp.float32) for r in range(ranks)]
            src, dst = cp.ones(m, cp.float32), cp.empty(m, cp.float32)
            copy = add("d2d-copy", "device-to-device copy", "reference",
                       lambda: (dst.data.copy_from_device(src.data, ar_bytes), sync()), ar_bytes,
                       where="device")
            ar = add("pmaprt-allreduce", f"pmaprt GPU ring all-reduce, {ranks} ranks on GPU 0",
                     "pmaprt", lambda: G.allreduce(bufs, "max", inplace=True, method="ring"),
                     2 * (ranks - 1) / ranks * ar_bytes, ranks=ranks, bytes=ar_bytes)
            if ar["status"] == "ok":
                ar["metric"] = "busbw"
                ar["busbw_gbps"] = ar["stats"]["gbps"]
                ar["note"] = ar["note"].replace("GB/s", "GB/s busbw", 1)
                ratio(ar, copy, None, "device copy bandwidth")
        except Exception as e:
            entry.update(status="error", note=f"{type(e).__name__}: {e}")
        finally:
            try:
                cp.get_default_memory_pool().free_all_blocks()
                cp.get_default_pinned_memory_pool().free_all_blocks()
            except Exception:
                pass
        entry["note"] = f"on {g0.name}; {len(devs.gpus)} GPU(s)"

    # ratios -----------------------------------------------------------------
    def _derive(self):
        wk = self.cfg.workers
        by_wl: Dict[str, List[Dict[str, Any]]] = {}
        for rec in self.results:
            by_wl.setdefault(rec["workload"], []).append(rec)
        for name, recs in by_wl.items():
            entry = self.entries.get(name)
            ok = [r for r in recs if r["status"] == "ok" and r["median_s"]]
            base = next((r for r in ok if r["kind"] == "baseline"), None)
            peers = [r for r in ok if r["kind"] == "peer"]
            best = min(peers, key=lambda r: r["median_s"]) if peers else None
            serial = base["median_s"] if base else None
            ideal = None
            if entry is not None:
                entry["serial_s"] = serial if name != "roundtrip" else None
                entry["best_peer"] = best["runner"] if best else None
                entry["best_peer_s"] = best["median_s"] if best else None
                if serial and entry.get("longest_item_s") is not None:
                    ideal = max(serial / wk, entry["longest_item_s"])
                    entry["ideal_s"] = ideal
            longest = entry.get("longest_item_s") if entry is not None else None
            for r in ok:
                if r["metric"] == "busbw":
                    continue
                ps = r.get("paired_serial_s")
                if ps and len(ps) == len(r["times_s"]) and r["metric"] == "wall":
                    # medians of per-pair ratios (Suite.timed)
                    pairs = list(zip(ps, r["times_s"]))
                    r["speedup_vs_map"] = statistics.median(s_ / t for s_, t in pairs)
                    r["efficiency"] = statistics.median(s_ / (wk * t) for s_, t in pairs)
                    if longest is not None:
                        r["makespan_over_ideal"] = statistics.median(
                            t / max(s_ / wk, longest) for s_, t in pairs)
                elif serial and r["metric"] == "wall":
                    r["speedup_vs_map"] = serial / r["median_s"]
                    if r["kind"] != "baseline":
                        r["efficiency"] = serial / (wk * r["median_s"])
                    if ideal:
                        r["makespan_over_ideal"] = r["median_s"] / ideal
                elif ideal:
                    r["makespan_over_ideal"] = r["median_s"] / ideal
                if best and not (r["metric"] == "latency" and r["kind"] == "baseline"):
                    r["speedup_vs_best_peer"] = best["median_s"] / r["median_s"]
                st = r.get("stats")
                if st and st.get("busy_s_runs") and r["metric"] == "wall":
                    ser = ps or ([serial] * len(r["times_s"]) if serial else [])
                    split = split_efficiency(st["busy_s_runs"], r["times_s"], ser, wk)
                    if split:
                        st.update(split)
            if entry is not None and name in W.SWEPT:
                sw = [r for r in ok if r["kind"] == "sweep"]
                if sw:
                    ad = next((r for r in ok if r["kind"] == "pmaprt"), None)
                    for r in sw:
                        r["stats"] = r.get("stats") or {}
                        r["stats"]["vs_adaptive"] = vs_adaptive(r, ad)
                    paired = all(r["stats"].get("paired_adaptive_s") for r in sw)
                    if paired:
                        # fastest against the adaptive runs beside it
                        bestfix = max(sw, key=lambda r: r["stats"]["vs_adaptive"] or 0.0)
                    else:
                        bestfix = min(sw, key=lambda r: r["median_s"])
                    rel = bestfix["stats"]["vs_adaptive"]
                    entry["sweep"] = {
                        "chunksizes": [r["params"]["chunksize"] for r in sw],
                        "items_per_s": [r["items_per_s"] for r in sw],
                        "best_fixed_chunksize": bestfix["params"]["chunksize"],
                        "best_fixed_items_per_s": bestfix["items_per_s"],
                        "adaptive_chunksize": entry.get("adaptive_chunksize"),
                        "adaptive_items_per_s": ad["items_per_s"] if ad else None,
                        "adaptive_over_best_fixed": (1.0 / rel) if rel else None,
                        "paired": paired,
                    }


def _peak_memory(run: Callable[[], Any], warm: Optional[Callable[[], Any]] = None) -> Dict[str, Any]:
    """One untimed run under the memory sampler: how much the PSS and USS
    sums of this process and its children grew (bytes). warm() runs first
    (workers import what the function needs), then free heap memory of this
    process goes back to the system (malloc_trim), then the baseline."""
    try:
        from .memory import measure, trim_heap

        if warm is not None:
            warm()
        trim_heap()
        m = measure(run)
    except Exception as e:  # psutil missing, /proc unreadable: no figure, not an error
        return {"peak_memory_note": f"{type(e).__name__}: {e}"}
    return {"peak_pss_bytes": int(m["peak_pss_bytes"]), "peak_uss_bytes": int(m["peak_uss_bytes"])}


def _shutdown_default_pool() -> None:
    """Stop pmaprt's default pool if this run started one (pmap in the extras)."""
    mod = sys.modules.get("pmaprt")
    fn = getattr(mod, "shutdown", None) if mod is not None else None
    if callable(fn):
        try:
            fn()
        except Exception:
            pass


def _with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
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


def run_suite(cfg: Config) -> Dict[str, Any]:
    """Run the suite described by cfg and return the results document
    (nothing is written; see :func:`pmaprt.bench.cli.main` for that)."""
    return Suite(cfg).run()
