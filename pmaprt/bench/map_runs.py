"""The map workloads (tiny, medium, heavy-tailed, cost-shift, numpy), run by one
runner after another (the round trip, every runner in turn: ``roundtrip_runs``).

For each runner: start and warm its pool (``startup_s``), then per workload
probe a prefix when the input is large (``Session.probe``), take one untimed
run under the memory sampler for the numpy workload, time ``repeat`` runs,
each paired with a builtin map run just before it, and check the results
against builtin map's. pmaprt's adaptive run of a swept workload is followed
by its chunk-size sweep (``sweep_runs``).
"""
from __future__ import annotations

import time

from . import workloads as W
from .records import (adaptive_chunksize, busy_seconds, fill_times, new_record, same_results,
                      stats_summary, timeline)
from .runners import BuiltinMap, Pmaprt, Runner
from .session import Session, peak_memory
from .sweep_runs import run_sweep

#: map workloads whose every runner also gets one untimed run under a memory sampler
MEMORY_WORKLOADS = ("numpy",)


def skip_runner(session: Session, r, map_wl, why):
    """Records that runner r did not run (``why``) for every selected map workload."""
    for name in map_wl:
        session.results.append(new_record(name, r, status="skipped", note=why,
                                          items=session.built[name].n))


def run_runner(session: Session, r: Runner, map_wl, sweep_pts, prog):
    """Start and warm runner r, time it over every map workload, then close
    it; a runner that cannot start gets an error record per workload."""
    cfg = session.cfg
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
            session.results.append(new_record(name, r, status="error", note=note,
                                              items=session.built[name].n))
        prog.step(r.label, len(map_wl))
        return
    try:
        for name in map_wl:
            w = session.built[name]
            rec = new_record(name, r, params=r.params(w.n), items=w.n, startup_s=startup)
            first = None
            try:
                skip = session.probe(lambda a: r.map(w.fn, a), w) if r.kind != "baseline" else None
                if skip:
                    rec["status"], rec["note"] = "skipped", skip
                    session.results.append(rec)
                    prog.step(f"{r.label} {name}")
                    if isinstance(r, Pmaprt) and name in sweep_pts:
                        run_sweep(session, r, w, sweep_pts[name], prog)
                    continue
                mem = None
                if name in MEMORY_WORKLOADS:
                    # before the timed runs: their freed memory stays in the heaps
                    mem = peak_memory(lambda: r.map(w.fn, w.args),
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
                times, first, note = session.timed(run_map, pair, paired)
                fill_times(rec, times, w.n)
                if paired:
                    rec["paired_serial_s"] = [float(t) for t in paired]
                rec["note"] = note
                if mem:
                    rec["params"] = dict(rec["params"] or {}, **mem)
                if r.kind == "baseline":
                    session.expected[name] = first
                    baseline_extras(session, w)
                elif not same_results(first, session.expected.get(name)):
                    rec["status"] = "error"
                    rec["note"] = "wrong results"
                if isinstance(r, Pmaprt):
                    st = r.last_stats
                    rec["stats"] = stats_summary(st)
                    if rec["stats"] is not None and None not in busy:
                        rec["stats"]["busy_s_runs"] = [float(b) for b in busy]
                    ac = adaptive_chunksize(st)
                    session.entries[name]["adaptive_chunksize"] = ac
                    if ac is not None:
                        rec["params"] = dict(rec["params"], adaptive_chunksize_median=ac)
                    session.entries[name]["timeline"] = timeline(st)
            except Exception as e:
                rec["status"] = "error"
                rec["note"] = f"{type(e).__name__}: {e}"
            del first
            session.results.append(rec)
            prog.step(f"{r.label} {name}")
            if isinstance(r, Pmaprt) and name in sweep_pts:
                run_sweep(session, r, w, sweep_pts[name], prog)
    finally:
        try:
            r.close()
        except Exception:
            pass


def baseline_extras(session: Session, w: W.Workload):
    """What builtin map's run adds to a workload entry: the dearest item's
    time, its fastest of three (it enters a lower bound)."""
    e = session.entries[w.name]
    if w.ideal and w.longest_arg is not None:
        e["longest_item_s"] = min(W.time_call(w.fn, w.longest_arg, repeat=1) for _ in range(3))
