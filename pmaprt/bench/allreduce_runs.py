"""The all-reduce workload: records of ``pmaprt.allreduce`` inside an SPMD map
against its bound, baselines and peers (measured by
:mod:`pmaprt.bench.collective`), one record per runner, worker count and
message size, with busbw as nccl-tests defines it.

Worker counts: 2 and the configured count (``--workers``, by default the
cores), and with ``--full`` the powers of two between. A pmaprt record's
``params`` hold ``vs_bound`` and ``vs_bound_range``: the bound's time over
pmaprt's, per sample taken side by side, median and range (1.0: as fast as
the bound; the goal is 0.5 or more at 1 MB and above).
"""
from __future__ import annotations

from . import collective as C
from . import workloads as W
from .records import fill_times, new_record, new_workload_entry
from .session import Session, with_timeout

# Seconds one all-reduce runner may take over every size before it is
# recorded as an error: far above a quick run's few seconds, but a hung
# collective must not hold the suite forever.
RUNNER_TIMEOUT_S = 600.0
# The largest message: W shared rows of it and each rank's inputs must fit.
MAX_BYTES = 256 << 20


def worker_counts(workers: int, full: bool):
    counts = {2, workers}
    if full:
        k = 4
        while k < workers:
            counts.add(k)
            k *= 2
    return sorted(c for c in counts if c >= 2)


def message_sizes(full, scale):
    """4 KiB and every 4x up to 4 MiB times `scale` (16: 64 MiB), or with
    `full` 256 MiB times `scale`; at most MAX_BYTES."""
    top = 256 << 20 if full else 4 << 20
    return W.geometric(4 << 10, max(4 << 10, min(MAX_BYTES, int(top * scale))), 4)


def _busbw(rid, nbytes, t, wk):
    if rid == C.MEMCPY.id:
        return nbytes / t / 1e9
    if rid == C.MEMCPY_ALL.id:
        return wk * nbytes / t / 1e9
    return C.busbw(nbytes, t, wk)


def run_allreduce(session: Session, avail):
    """pmaprt.allreduce timed inside an SPMD map of W workers, against the
    bound, memcpy and peers measured in this run (see pmaprt.bench.collective)."""
    entry = new_workload_entry("allreduce")
    session.entries["allreduce"] = entry
    ok, why = avail
    if not ok:
        entry.update(status="skipped", note=f"pmaprt not available: {why}")
        return
    cfg = session.cfg
    if cfg.workers < 2:
        entry.update(status="skipped", note="an all-reduce needs at least 2 workers")
        return
    sizes = message_sizes(cfg.full, cfg.size_scale)
    samples = cfg.repeat
    counts = worker_counts(cfg.workers, cfg.full)
    entry.update(params={"sizes_bytes": sizes, "workers": counts, "dtype": "float32",
                         "op": "sum", "busbw": "2*(W-1)/W * bytes / t",
                         "timing": "inside the ranks of an SPMD map, slowest rank per sample, "
                                   "runners alternated sample by sample",
                         "calls_per_sample": {str(n): C.calls_for(n) for n in sizes}},
                 items=len(sizes))
    gloo_ok, gloo_why = C.gloo_available()
    for wk in counts:
        measured = {}
        runs = [("in_map", lambda: C.time_in_map(sizes, wk, samples)),
                (C.NAIVE, lambda: C.time_naive(sizes, wk, samples))]
        if wk == counts[0]:
            runs.append((C.MEMCPY, lambda: C.time_memcpy(sizes, samples)))
        if gloo_ok:
            runs.append((C.GLOO, lambda: C.time_gloo(sizes, wk, samples)))
        for runner, run in runs:
            try:
                got = with_timeout(run, RUNNER_TIMEOUT_S)
            except Exception as e:
                for r in (C.IN_MAP if runner == "in_map" else [runner]):
                    session.results.append(new_record(
                        "allreduce", r, metric="busbw", status="error",
                        note=f"{type(e).__name__}: {e}", params={"workers": wk}))
                continue
            if runner == "in_map":
                for r in C.IN_MAP:
                    measured[r.id] = (r, got[r.id])
            else:
                measured[runner.id] = (runner, got)
        _records(session, measured, sizes, wk)
    if not gloo_ok:
        session.results.append(new_record("allreduce", C.GLOO, metric="busbw", status="skipped",
                                          note=gloo_why, params={"workers": cfg.workers}))
    if not any(r["runner"] == "pmaprt" and r["status"] == "ok" for r in session.results
               if r["workload"] == "allreduce"):
        entry.update(status="error", note="pmaprt's all-reduce did not run")


def _records(session, measured, sizes, wk):
    recs = {}
    for rid, (runner, times) in measured.items():
        for nbytes in sizes:
            rec = new_record("allreduce", runner, metric="busbw",
                             params={"workers": 1 if rid == C.MEMCPY.id else wk,
                                     "bytes": nbytes, "calls_per_sample": C.calls_for(nbytes)})
            fill_times(rec, times[nbytes], 1)
            rec["items_per_s"] = None
            rec["busbw_gbps"] = _busbw(rid, nbytes, rec["median_s"], wk)
            session.results.append(rec)
            recs[(rid, nbytes)] = rec
    for nbytes in sizes:
        bound = measured.get(C.BOUND.id)
        mem_all = recs.get((C.MEMCPY_ALL.id, nbytes))
        naive = recs.get((C.NAIVE.id, nbytes))
        gloo = recs.get((C.GLOO.id, nbytes))
        for p in (C.PMAPRT, C.SHARED, C.F16, C.BF16):
            me = recs.get((p.id, nbytes))
            if me is None:
                continue
            notes = []
            if bound is not None:
                med, lo, hi = C.paired_ratio(bound[1][nbytes], measured[p.id][1][nbytes])
                me["params"].update(vs_bound=med, vs_bound_range=[lo, hi])
                notes.append(f"{100 * med:.0f}% of bound ({100 * lo:.0f}-{100 * hi:.0f}%)")
            if mem_all is not None:
                notes.append(f"{100 * me['busbw_gbps'] / mem_all['busbw_gbps']:.0f}% of "
                             f"aggregate memcpy")
            if naive is not None:
                me["speedup_vs_best_peer"] = naive["median_s"] / me["median_s"]
                notes.append(f"{me['speedup_vs_best_peer']:.1f}x naive mp.Pool")
            if gloo is not None:
                notes.append(f"{gloo['median_s'] / me['median_s']:.1f}x gloo busbw")
            me["note"] = "; ".join(notes) or None
