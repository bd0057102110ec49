"""The round trip: seconds per one-task call on a warm pool, every runner in turn.

Every runner with a call path is started and warmed first; then each sample
round times ``calls`` calls on each runner, one runner after another (the
order rotating from round to round), so sample k of pmaprt and sample k of a
peer were taken moments apart. Their ratio is a pair (``params.interleaved``),
which a machine that drifts between seconds cannot turn into a winner: the
round trip's figures swing several-fold on a shared host.
"""
from __future__ import annotations

import time
from typing import List

from . import workloads as W
from .records import fill_times, new_record
from .runners import Runner
from .session import Session


def run_roundtrip(session: Session, runners: List[Runner], avail, calls: int, prog) -> None:
    """One latency record per runner with a call path (``has_call``)."""
    cfg = session.cfg
    live, recs = [], {}
    for r in runners:
        if not r.has_call:
            continue
        rec = new_record("roundtrip", r, metric="latency",
                         params={"workers": r.workers if r.kind != "baseline" else 1,
                                 "calls_per_sample": calls, "interleaved": True})
        recs[r.id] = rec
        ok, why = avail.get(r.id, (True, None))
        if not ok:
            rec.update(status="skipped", note=why or "not available")
            continue
        try:
            t0 = time.perf_counter()
            r.start(cfg.workers)
            r.warm()
            rec["startup_s"] = time.perf_counter() - t0
            rec["params"]["workers"] = r.workers if r.kind != "baseline" else 1
            for i in range(min(5, calls)):  # untimed warm-up of the call path
                r.call(W.noop, i)
            live.append(r)
        except Exception as e:  # a peer that cannot start is recorded, not fatal
            rec.update(status="error", note=f"could not start: {type(e).__name__}: {e}")
            _close(r)
    samples = {r.id: [] for r in live}
    spent = {r.id: 0.0 for r in live}
    try:
        for k in range(cfg.repeat):
            order = live[k % len(live):] + live[:k % len(live)] if live else []
            for r in order:
                if spent[r.id] >= cfg.max_runner_s:
                    continue  # capped: this runner's later rounds are not taken
                try:
                    t0 = time.perf_counter()
                    for i in range(calls):
                        r.call(W.noop, i)
                    dt = time.perf_counter() - t0
                except Exception as e:
                    recs[r.id].update(status="error", note=f"{type(e).__name__}: {e}")
                    spent[r.id] = float("inf")
                    continue
                samples[r.id].append(dt / calls)
                spent[r.id] += dt
        for r in live:
            rec = recs[r.id]
            if rec["status"] != "ok":
                continue
            if r.call(W.noop, 12345) != 12345:
                rec.update(status="error", note="wrong result")
                continue
            fill_times(rec, samples[r.id], None)
            rec["items"] = calls
            rec["items_per_s"] = None
            rec["latency_us"] = rec["median_s"] * 1e6
            if len(samples[r.id]) < cfg.repeat:
                rec["note"] = (f"{len(samples[r.id])} of {cfg.repeat} samples "
                               f"(time cap {cfg.max_runner_s:g} s)")
    finally:
        for r in live:
            _close(r)
    session.results.extend(recs.values())
    prog.step("roundtrip")


def _close(r: Runner) -> None:
    try:
        r.close()
    except Exception:
        pass
