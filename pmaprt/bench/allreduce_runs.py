"""The all-reduce workload: records of ``pmaprt.allreduce`` inside an SPMD map
against its peers and baselines (measured by :mod:`pmaprt.bench.collective`),
one record per runner and message size, with busbw as nccl-tests defines it.
"""
from __future__ import annotations

from . import collective as C
from . import workloads as W
from .records import fill_times, new_record, new_workload_entry
from .runners import Pmaprt
from .session import Session, with_timeout

# Seconds one all-reduce runner may take over every size before it is
# recorded as an error: far above a quick run's few seconds, but a hung
# collective must not hold the suite forever.
RUNNER_TIMEOUT_S = 600.0


def run_allreduce(session: Session, avail):
    """pmaprt.allreduce timed inside an SPMD map of W workers, against a naive
    mp.Pool all-reduce and single-process memcpy of the same bytes, measured
    in this run (see pmaprt.bench.collective)."""
    entry = new_workload_entry("allreduce")
    session.entries["allreduce"] = entry
    ok, why = avail
    if not ok:
        entry.update(status="skipped", note=f"pmaprt not available: {why}")
        return
    cfg = session.cfg
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
            measured[runner.id] = (runner, with_timeout(run, RUNNER_TIMEOUT_S))
        except Exception as e:
            rec = new_record("allreduce", runner, metric="busbw", status="error",
                             note=f"{type(e).__name__}: {e}", params={"workers": wk})
            session.results.append(rec)
    for rid, (runner, times) in measured.items():
        for nbytes in sizes:
            ts = times[nbytes]
            rec = new_record("allreduce", runner, metric="busbw",
                             params={"workers": 1 if rid == C.MEMCPY.id else wk,
                                     "bytes": nbytes, "calls_per_sample": C.calls_for(nbytes)})
            fill_times(rec, ts, 1)
            rec["items_per_s"] = None
            t = rec["median_s"]
            if rid == C.MEMCPY.id:
                rec["busbw_gbps"] = nbytes / t / 1e9
            elif rid == C.MEMCPY_ALL.id:
                rec["busbw_gbps"] = wk * nbytes / t / 1e9
            else:
                rec["busbw_gbps"] = C.busbw(nbytes, t, wk)
            session.results.append(rec)
    recs = {(r["runner"], r["params"].get("bytes")): r for r in session.results
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
        session.results.append(new_record("allreduce", C.GLOO, metric="busbw", status="skipped",
                                          note=gloo_why, params={"workers": wk}))
    if ("pmaprt", sizes[0]) not in recs:
        entry.update(status="error", note="pmaprt's all-reduce did not run")
