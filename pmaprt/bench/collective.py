"""The all-reduce workload: pmaprt's all-reduce against its bound and peers, same run.

Inside one SPMD map of W workers (the ranks), for each size, samples of
back-to-back calls of each of these, the order reversed every other sample,
each sample started right after a tiny all-reduce that lines the ranks up; a
sample's time is the slowest rank's, per call:

* ``pmaprt``: ``pmaprt.allreduce(x, out=res)``, float32 sum, x a plain array
  of the rank (as gradient buffers are reused in training);
* ``pmaprt_shared_input``: the same with x a row of a shared array every rank
  maps (``pmaprt.zeros`` made by the parent), read in place by the others;
* ``pmaprt_float16`` / ``pmaprt_bfloat16``: the same bytes as float16 or
  bfloat16 (as uint16 words with ``as_dtype`` where ml_dtypes is missing);
* ``allreduce_bound``: the memory traffic an all-reduce needs at minimum,
  and nothing else: each rank reads every rank's input once (rows of a
  shared array, written by their ranks) and writes its result once, in one
  pass (``reduce_into``), with no synchronisation; the reference line;
* ``memcpy_aggregate``: each rank copies S bytes (``np.copyto``) at once; its
  figure is the aggregate bandwidth W * S / t.

Outside the map:

* peer ``mp_naive_allreduce``: what one writes with multiprocessing alone:
  gather every worker's array to the parent (``Pool.map``), sum there,
  broadcast the sum back (``Pool.map`` again). Timed in the parent.
* baseline ``memcpy``: one process copying the same bytes.
* peer ``gloo``: torch.distributed's gloo all-reduce, only where torch is
  installed (skipped with a note otherwise).

busbw = (S / t) * 2(W-1)/W, as nccl-tests defines it, for every all-reduce
and for the bound; for memcpy the field holds S / t, for the aggregate W S / t.
"""
from __future__ import annotations

import multiprocessing as mp
import socket
import time
from typing import Any, Dict, List, Tuple

import numpy as np

import pmaprt
from pmaprt import _core

from .runners import Runner

# Back-to-back calls per timed sample aim at about this many bytes (at least 1
# call, at most MAX_CALLS): small messages are timed over many calls.
SAMPLE_BYTES = 8 << 20
MAX_CALLS = 200


class _Peer(Runner):
    def __init__(self, id_, label, kind):
        super().__init__()
        self.id, self.label, self.kind = id_, label, kind


PMAPRT = _Peer("pmaprt", "pmaprt.allreduce float32", "pmaprt")
SHARED = _Peer("pmaprt_shared_input", "pmaprt.allreduce float32, shared-array input", "pmaprt")
F16 = _Peer("pmaprt_float16", "pmaprt.allreduce float16", "pmaprt")
BF16 = _Peer("pmaprt_bfloat16", "pmaprt.allreduce bfloat16", "pmaprt")
BOUND = _Peer("allreduce_bound", "bound: every input read once, result written once",
              "baseline")
MEMCPY_ALL = _Peer("memcpy_aggregate", "memcpy (W processes at once)", "baseline")
NAIVE = _Peer("mp_naive_allreduce", "mp.Pool gather+sum+broadcast", "peer")
MEMCPY = _Peer("memcpy", "memcpy (1 process)", "baseline")
GLOO = _Peer("gloo", "torch.distributed gloo", "peer")

#: what runs inside the SPMD map, in this order on even samples
IN_MAP = (PMAPRT, SHARED, F16, BF16, BOUND, MEMCPY_ALL)


def calls_for(nbytes: int) -> int:
    return max(1, min(MAX_CALLS, SAMPLE_BYTES // max(1, nbytes)))


def busbw(nbytes: int, t: float, workers: int) -> float:
    return 2.0 * (workers - 1) / workers * nbytes / t / 1e9


def _half_arrays(n: int, r: int):
    """float16 and bfloat16 inputs of n elements, and the keyword that reads
    them (bfloat16 as uint16 words where ml_dtypes is missing)."""
    f16 = np.full(n, r + 1, np.float16)
    try:
        import ml_dtypes
        return f16, np.full(n, r + 1, ml_dtypes.bfloat16), {}
    except ImportError:
        bits = (np.full(n, r + 1, np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return f16, bits, {"as_dtype": "bfloat16"}


# --- inside the ranks


def rank_times(shared, sizes: List[int], samples: int) -> Dict[int, Dict[str, List[float]]]:
    """One rank of the SPMD map: per-call seconds of each sample, per size and
    runner id. shared: a (W, n) float32 shared array, one row per rank."""
    r, w = pmaprt.axis_index("bench"), pmaprt.axis_size("bench")
    tiny = np.zeros(1, np.float32)
    out = {}
    for nbytes in sizes:
        n = nbytes // 4
        rows = shared[:, :n]
        rows[r] = r + 1
        x = np.full(n, r + 1, np.float32)
        res = np.empty(n, np.float32)
        h16, b16, bkw = _half_arrays(2 * n, r)
        hres, bres = np.empty_like(h16), np.empty_like(b16)
        srcs, offs = tuple(rows), (0,) * w
        fns = {
            PMAPRT.id: lambda: pmaprt.allreduce(x, out=res),
            SHARED.id: lambda: pmaprt.allreduce(rows[r], out=res),
            F16.id: lambda: pmaprt.allreduce(h16, out=hres),
            BF16.id: lambda: pmaprt.allreduce(b16, out=bres, **bkw),
            BOUND.id: lambda: _core.reduce_into(res, 0, srcs, offs, n, _core.REDUCE_F32,
                                                _core.REDUCE_SUM, 1.0),
            MEMCPY_ALL.id: lambda: np.copyto(res, x),
        }
        k = calls_for(nbytes)
        ts = {name: [] for name in fns}
        for f in fns.values():   # warm: pages touched, slots in use
            pmaprt.allreduce(tiny)
            f()
        names = list(fns)
        for i in range(samples):
            for name in (names if i % 2 == 0 else names[::-1]):
                f = fns[name]
                pmaprt.allreduce(tiny)
                t0 = time.perf_counter()
                for _ in range(k):
                    f()
                ts[name].append((time.perf_counter() - t0) / k)
        out[nbytes] = ts
    return out


def time_in_map(sizes: List[int], workers: int, samples: int
                ) -> Dict[str, Dict[int, List[float]]]:
    """Per-call seconds (slowest rank) of each sample, per runner id and size."""
    shared = pmaprt.zeros((workers, max(sizes) // 4), np.float32)
    with pmaprt.Pool(workers) as pool:
        per_rank = list(pool.starmap(rank_times, [(shared, sizes, samples)] * workers,
                                     axis_name="bench"))
    return {p.id: {s: [max(r[s][p.id][i] for r in per_rank) for i in range(samples)]
                   for s in sizes} for p in IN_MAP}


def paired_ratio(base: List[float], ts: List[float]) -> Tuple[float, float, float]:
    """(median, min, max) of base[i] / ts[i] over samples taken side by side."""
    q = sorted(b / t for b, t in zip(base, ts))
    return q[len(q) // 2], q[0], q[-1]


# --- the naive peer


_PARTS: Dict[int, Any] = {}


def _part(nbytes: int):
    """This worker's input (allocated once per size, like a gradient buffer)."""
    a = _PARTS.get(nbytes)
    if a is None:
        _PARTS.clear()
        a = _PARTS[nbytes] = np.ones(nbytes // 4, np.float32)
    return a


def _take(a) -> int:
    return a.nbytes


def time_naive(sizes: List[int], workers: int, samples: int) -> Dict[int, List[float]]:
    out = {}
    pool = mp.get_context("spawn").Pool(workers)
    try:
        for nbytes in sizes:
            k = calls_for(nbytes)

            def once():
                parts = pool.map(_part, [nbytes] * workers, chunksize=1)
                total = parts[0].copy()
                for p in parts[1:]:
                    np.add(total, p, out=total)
                pool.map(_take, [total] * workers, chunksize=1)
            once()
            ts = []
            for _ in range(samples):
                t0 = time.perf_counter()
                for _ in range(k):
                    once()
                ts.append((time.perf_counter() - t0) / k)
            out[nbytes] = ts
    finally:
        pool.terminate()
        pool.join()
    return out


def time_memcpy(sizes: List[int], samples: int) -> Dict[int, List[float]]:
    out = {}
    for nbytes in sizes:
        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        k = calls_for(nbytes)
        ts = []
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(k):
                np.copyto(dst, src)
            ts.append((time.perf_counter() - t0) / k)
        out[nbytes] = ts
    return out


# --- gloo, where torch is installed


def gloo_available():
    try:
        import torch.distributed as dist
    except Exception:
        return False, "torch is not installed: no gloo peer in this run"
    if not dist.is_available() or not dist.is_gloo_available():
        return False, "this torch build has no gloo backend"
    return True, None


def _gloo_rank(rank, workers, port, sizes, samples, q):
    """One gloo rank (a spawned process): per-call seconds per sample, per size."""
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port,
                                rank=rank, world_size=workers)
        tiny = torch.zeros(1)
        out = {}
        for nbytes in sizes:
            x = torch.ones(nbytes // 4, dtype=torch.float32)
            k = calls_for(nbytes)
            dist.all_reduce(x)
            ts = []
            for _ in range(samples):
                dist.all_reduce(tiny)
                t0 = time.perf_counter()
                for _ in range(k):
                    dist.all_reduce(x)
                ts.append((time.perf_counter() - t0) / k)
            out[nbytes] = ts
        dist.destroy_process_group()
        q.put((rank, out, None))
    except BaseException as e:  # reported to the parent
        q.put((rank, None, "%s: %s" % (type(e).__name__, e)))


def time_gloo(sizes: List[int], workers: int, samples: int) -> Dict[int, List[float]]:
    """torch.distributed's gloo all-reduce over W spawned processes on this host
    (TCP rendezvous on loopback): per-call seconds (slowest rank) per sample."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, workers, port, sizes, samples, q))
             for r in range(workers)]
    for p in procs:
        p.start()
    try:
        per_rank = []
        for _ in range(workers):
            rank, out, err = q.get(timeout=600)
            if err:
                raise RuntimeError("gloo rank %d: %s" % (rank, err))
            per_rank.append(out)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return {s: [max(r[s][i] for r in per_rank) for i in range(samples)] for s in sizes}
