"""The array workloads: pmaprt's shared arrays and ``out=`` against plain copies.

- ``numpy_shared``: the numpy workload's 256 chunks as one shared array
  (handed to workers without a copy), and as a plain 1-d array mapped with
  ``chunks=`` (read by the workers from the parent's memory where allowed,
  else copied; where reading is allowed, a pool that copies is timed too),
  against serial / W.
- ``preprocess``: standardize and clip float32 blocks written into ``out=``:
  shared in/out, plain in/out, mp.Pool.map with the results gathered into
  the output, a serial loop and a one-process ``np.copyto`` of the same bytes
  (``params.gb_per_s``, ``params.vs_memcpy``).
"""
from __future__ import annotations

import numpy as np

import pmaprt

from . import workloads as W
from .records import new_record, new_workload_entry, same_results
from .runners import Pmaprt, all_runners
from .session import Session


def run_numpy_shared(session: Session, avail):
    """The numpy workload's array, shared (handed to workers without a
    copy) and plain (one copy, ``chunks=``), against serial / W."""
    entry = new_workload_entry("numpy_shared")
    session.entries["numpy_shared"] = entry
    ok, why = avail
    if not ok:
        entry.update(status="skipped", note=f"pmaprt not available: {why}")
        return
    cfg = session.cfg
    w = session.built.get("numpy") or session.build("numpy")
    rows = np.stack(w.args)                     # (256, k) float64, plain
    shared = pmaprt.asarray(rows, shared=True)  # the same, in shared memory
    flat = rows.reshape(-1)
    k = rows.shape[1]
    params = dict(w.params, input_bytes=int(rows.nbytes))
    entry.update(params=params, items=w.n)
    base = new_record("numpy_shared", all_runners()[0], items=w.n, params={"workers": 1})
    want = session.timed_record(base, lambda: list(map(w.fn, shared)), w.n)
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
            session.timed_record(
                rec, lambda p=p, src=src, kw=kw: list(p.map(w.fn, src, **kw)), w.n,
                warm=lambda p=p, src=src, kw=kw: list(p.map(w.fn, src[:span], **kw)),
                check=lambda got: None if same_results(got, want) else "wrong results")
    finally:
        pool.close()
        copying.close()


def run_preprocess(session: Session, avail):
    """Standardize-and-clip blocks into out=: pmaprt (shared and plain),
    mp.Pool.map gathered into the output, a serial loop and a memcpy."""
    entry = new_workload_entry("preprocess")
    session.entries["preprocess"] = entry
    ok, why = avail
    if not ok:
        entry.update(status="skipped", note=f"pmaprt not available: {why}")
        return
    cfg = session.cfg
    w = session.build("preprocess")
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
    want = session.timed_record(base, serial, w.n)
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
    session.timed_record(mc, lambda: np.copyto(dst, x), w.n)
    del dst
    xs = pmaprt.asarray(x, shared=True)
    outs = pmaprt.empty_like(x)

    def run_pm(src, dst):
        def run():
            for _ in pmaprt.pmap(w.fn, src, workers=cfg.workers, out=dst):
                pass
            return dst
        return run
    plain_out = np.empty_like(x)
    plain_out.fill(0.0)
    variants = [("pmaprt (shared in, shared out=)", xs, outs),
                ("pmaprt (plain in, plain out=)", x, plain_out)]
    for label, src, dst in variants:
        rec = new_record("preprocess", Pmaprt(), items=w.n, label=label,
                         params={"workers": cfg.workers, "out": True})
        few = 2 * cfg.workers
        session.timed_record(rec, run_pm(src, dst), w.n, check=close,
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
        session.timed_record(rec, run_mp, w.n, check=close,
                             warm=lambda: mp_runner.map(w.fn, blocks[: 2 * cfg.workers]))
    except Exception as e:
        rec["status"], rec["note"] = "error", f"{type(e).__name__}: {e}"
        session.results.append(rec)
    finally:
        mp_runner.close()
    memcpy_s = mc["median_s"] if mc["status"] == "ok" else None
    for r in session.results:
        if r["workload"] == "preprocess" and r["status"] == "ok" and r["median_s"]:
            gbs = nbytes / r["median_s"] / 1e9
            r["params"] = dict(r["params"] or {}, gb_per_s=gbs)
            if memcpy_s:
                r["params"]["vs_memcpy"] = memcpy_s / r["median_s"]
