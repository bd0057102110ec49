"""The GPU workloads, each beside its CuPy reference in the same run.

- device-resident y = 2x + 1 through ``pmap(device="gpu")`` against one
  direct ElementwiseKernel call;
- host-resident y = 2x + 1 against the measured pinned host->device
  bandwidth and against ``cupy.asarray`` + kernel + ``.get()``, with and
  without ``register=True``;
- a ring all-reduce over 4 logical ranks on GPU 0 (busbw) against the
  device's copy bandwidth.

CuPy is optional: without it (or without a GPU) the workload is skipped
with a note.
"""
from __future__ import annotations

import types

import numpy as np

import pmaprt

from .. import gpu as G
from .records import fill_times, new_record, new_workload_entry
from .session import Session


def run_gpu(session: Session, avail):
    """The GPU workloads, each beside its CuPy reference in the same run:
    device-resident y = 2x + 1 (vs one direct ElementwiseKernel call),
    host-resident y = 2x + 1 (vs measured pinned host->device bandwidth and vs
    cupy.asarray + kernel + .get()), and a ring all-reduce over 4 logical ranks
    on one GPU (busbw vs the device's copy bandwidth)."""
    entry = new_workload_entry("gpu")
    session.entries["gpu"] = entry
    ok, why = avail
    if not ok:
        entry.update(status="skipped", note=f"pmaprt not available: {why}")
        return
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
    cfg = session.cfg
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
            times, _, note = session.timed(fn)
            fill_times(rec, times, n)
            gbps = moved / rec["median_s"] / 1e9
            rec["stats"] = {"gbps": gbps}
            rec["note"] = "; ".join(x for x in (f"{gbps:.1f} GB/s", note) if x)
        except Exception as e:
            rec["status"], rec["note"] = "error", f"{type(e).__name__}: {e}"
        session.results.append(rec)
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
        stream = cp.cuda.Stream(non_blocking=True)

        def h2d():
            rt.memcpyAsync(dpin.data.ptr, pin.ctypes.data, pin.nbytes, rt.memcpyHostToDevice,
                           stream.ptr)
            stream.synchronize()
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
