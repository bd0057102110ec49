"""What the simulator takes from this machine, and its check against real runs.

``measure_overheads``: the seconds a runtime spends besides the items, per
chunk and per item, for pmaprt and for a pipe-based pool (multiprocessing,
standing in for every pipe-based peer). The worker's parts that pmaprt's own
code can run in this process are timed here, on that code: a claim
(``ClaimTaker.claim_index`` on a local region), encoding and decoding a
chunk's results (``_arrays.dumps_list`` / ``loads_list``), the item loop. The
rest comes from real maps of a no-op on warm pools, medians of several:

* start_s: a map of W one-item chunks, less one chunk's modelled costs;
* parent_chunk_s: a one-worker map of chunk 1 over N items, time / N: the
  steady throughput of the pipeline (worker and parent overlap, so the
  slower stage sets it); charged to the parent, which is serial, so the
  model errs toward a slower parent at large W, never a faster one.

``compare_at_two``: the harness's own runs of pmaprt at W = 2 (its ``/ideal``:
time / max(serial / W, dearest item), both measured) beside the simulator's
prediction for the same items, scaled to the measured serial time.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from typing import Dict, List

from .. import Pool, _arrays
from .sim_engine import Costs, Engine, Overheads
from .sim_pmaprt import PmaprtSim, simulate_pmaprt
from . import workloads as WL
from .config import Config
from .suite import run_suite

#: workloads the simulator runs (the harness's map workloads with item costs)
SIM_WORKLOADS = ("tiny", "medium", "heavy_tailed", "cost_shift")


def _median_time(fn, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _per_call(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def in_process_parts() -> Dict[str, float]:
    """pmaprt's per-chunk and per-item parts timed on its own code here."""
    sim = PmaprtSim(Engine(2, Costs([1e-6] * 200_000), Overheads("probe")), probe=False,
                    chunksize=1)
    sim.start()
    wk, ctx = sim.workers[0], sim.ctxs[0]
    claim = _per_call(lambda: wk.claim_index(ctx), 20_000)
    one, many = [0], list(range(256))
    enc1 = _per_call(lambda: _arrays.dumps_list(one), 20_000)
    enc_n = _per_call(lambda: _arrays.dumps_list(many), 2_000)
    p1, pn = _arrays.dumps_list(one), _arrays.dumps_list(many)
    dec1 = _per_call(lambda: _arrays.loads_list(p1), 20_000)
    dec_n = _per_call(lambda: _arrays.loads_list(pn), 2_000)
    fn, items = WL.noop, list(range(10_000))

    def loop():
        out = []
        app = out.append
        for x in items:
            app(fn(x))
    item_loop = _per_call(loop, 20) / len(items)
    return {"claim_s": claim, "encode_chunk_s": enc1,
            "encode_item_s": max(0.0, (enc_n - enc1) / 255), "decode_chunk_s": dec1,
            "decode_item_s": max(0.0, (dec_n - dec1) / 255), "item_loop_s": item_loop}


def measure_overheads(workers: int = 2, items: int = 2000, repeat: int = 15) -> Dict[str, object]:
    """Overheads for pmaprt ("pmaprt") and the pipe-based peers ("pipe"),
    measured on this machine now (a few seconds), with what they rest on."""
    parts = in_process_parts()
    noop, xs, few = WL.noop, list(range(items)), list(range(workers))
    with Pool(workers=workers) as pool:
        list(pool.map(noop, xs, chunksize=1, inline=False))
        t_few = _median_time(lambda: list(pool.map(noop, few, chunksize=1, inline=False)), repeat)
    with Pool(workers=1) as pool:
        list(pool.map(noop, xs, chunksize=1, inline=False))
        t_one = _median_time(lambda: list(pool.map(noop, xs, chunksize=1, inline=False)), 3)
    chunk_w = parts["encode_chunk_s"]
    pm = Overheads(
        "pmaprt",
        start_s=max(0.0, t_few - parts["claim_s"] - chunk_w - parts["decode_chunk_s"]),
        claim_s=parts["claim_s"], chunk_s=chunk_w,
        item_s=parts["item_loop_s"] + parts["encode_item_s"],
        parent_chunk_s=max(parts["decode_chunk_s"], t_one / items),
        parent_item_s=parts["decode_item_s"])
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as p:
        p.map(noop, xs, chunksize=1)
        t_few_mp = _median_time(lambda: p.map(noop, few, chunksize=1), repeat)
    with ctx.Pool(1) as p:
        p.map(noop, xs, chunksize=1)
        t_one_mp = _median_time(lambda: p.map(noop, xs, chunksize=1), 3)
        t_big_mp = _median_time(lambda: p.map(noop, xs, chunksize=items), 5)
    per_chunk_mp = t_one_mp / items
    pipe = Overheads(
        "pipe", start_s=max(0.0, t_few_mp - per_chunk_mp), claim_s=0.0, chunk_s=0.0,
        item_s=parts["item_loop_s"], parent_chunk_s=per_chunk_mp,
        parent_item_s=max(0.0, (t_big_mp - t_few_mp) / items - parts["item_loop_s"]))
    return {"pmaprt": pm, "pipe": pipe, "parts": parts, "workers": workers,
            "loadavg": os.getloadavg(),
            "maps": {"pmaprt_W_items_s": t_few, "pmaprt_one_worker_chunk1_s": t_one,
                     "mp_W_items_s": t_few_mp, "mp_one_worker_chunk1_s": t_one_mp,
                     "mp_one_worker_one_chunk_s": t_big_mp, "items": items}}


def harness_costs(name: str, n: int, workers: int, cal: WL.Calibration, seed=None) -> List[float]:
    """Item costs in seconds of the harness's workload `name` with n items:
    its own builder (``workloads.build``), read back through the busy loop's
    measured speed; tiny's items cost what one call of its function costs."""
    scale = n / WL.SIZES[name][0]
    kw = {} if seed is None else {"seed": seed}
    w = WL.build(name, full=False, scale=scale, workers=workers, cal=cal, **kw)
    if name == "tiny":
        per = _per_call(lambda: WL.double(12345), 200_000)
        return [per] * w.n
    return [it / (cal.iters_per_us * 1e6) for it in w.args]


def compare_at_two(over: Overheads, repeat: int = 5, workers: int = 2) -> List[Dict[str, object]]:
    """The harness's quick runs of pmaprt at W = workers beside the simulator's
    /ideal for the same items (their costs scaled to the measured serial
    time), one row per workload."""
    cfg = Config(workloads=list(SIM_WORKLOADS), runners=["pmaprt"], workers=workers,
                 repeat=repeat, sweep=False, plots=False, progress=False).resolve()
    load = os.getloadavg()
    doc = run_suite(cfg)
    cal = WL.Calibration(iters_per_us=doc["calibration"]["spin_iters_per_us"])
    rows = []
    for name in SIM_WORKLOADS:
        e = doc["workloads"][name]
        rec = next((r for r in doc["results"] if r["workload"] == name
                    and r["runner"] == "pmaprt"), None)
        if rec is None or rec["status"] != "ok" or not e.get("serial_s"):
            rows.append({"workload": name, "note": rec["note"] if rec else "no run"})
            continue
        secs = harness_costs(name, e["items"], workers, cal)
        scale = e["serial_s"] / sum(secs)
        costs = Costs([s * scale for s in secs])
        sim = simulate_pmaprt(costs, workers, over)
        ranges = rec.get("ranges") or {}
        measured = rec["makespan_over_ideal"]
        lo_hi = ranges.get("makespan_over_ideal")
        if measured is None and rec.get("efficiency"):
            # no dearest-item bound for this workload: t / (serial / W) = 1 / efficiency
            measured = 1.0 / rec["efficiency"]
            eff = ranges.get("efficiency")
            lo_hi = [1.0 / eff[1], 1.0 / eff[0]] if eff and eff[0] > 0 else None
        rows.append({"workload": name, "items": e["items"], "measured": measured,
                     "measured_range": lo_hi, "simulated": sim.over_ideal,
                     "sim_over_measured": sim.over_ideal / measured if measured else None,
                     "serial_s": e["serial_s"], "noise_trusted": doc["noise"]["trusted"]})
    return {"rows": rows, "loadavg_before": load, "loadavg_after": os.getloadavg(),
            "noise": doc["noise"].get("note")}
