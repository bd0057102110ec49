"""The all-reduce workload: pmaprt's ring all-reduce against peers in the same run.

* pmaprt: an SPMD map of W workers; inside each rank, for each size, a warm-up
  call, then ``repeat`` timed samples of back-to-back ``pmaprt.allreduce``
  calls (float32, sum, into a preallocated ``out=``, as gradient buffers are
  reused in training), each sample started right after a tiny all-reduce that
  lines the ranks up. A sample's time is the slowest rank's; the record holds
  the per-call seconds of every sample.
* peer ``mp_naive_allreduce``: what one writes with multiprocessing alone:
  gather every worker's array to the parent (``Pool.map``), sum there,
  broadcast the sum back (``Pool.map`` again). Timed in the parent.
* baseline ``memcpy``: one process copying the same bytes (``np.copyto``),
  the machine's single-core copy bandwidth.
* baseline ``memcpy_aggregate``: W processes copying S bytes each at once (the
  ranks of an SPMD map, lined up like the all-reduce's samples); its figure is
  the aggregate bandwidth W * S / t of the slowest.
* peer ``gloo``: torch.distributed's gloo all-reduce, only where torch is
  installed (skipped with a note otherwise).

busbw = (S / t) * 2(W-1)/W, as nccl-tests defines it; for memcpy the field
holds plain bandwidth S / t.
"""
from __future__ import annotations

import multiprocessing as mp
import socket
import time
from typing import Any, Dict, List

import numpy as np

import pmaprt

from .runners import Runner

# Back-to-back calls per timed sample aim at about this many bytes (at least 1
# call, at most MAX_CALLS): small messages are timed over many calls.
SAMPLE_BYTES = 8 << 20
MAX_CALLS = 200


class _Peer(Runner):
    def __init__(self, id_, label, kind):
        super().__init__()
        self.id, self.label, self.kind = id_, label, kind


NAIVE = _Peer("mp_naive_allreduce", "mp.Pool gather+sum+broadcast", "peer")
MEMCPY = _Peer("memcpy", "memcpy (1 process)", "baseline")
MEMCPY_ALL = _Peer("memcpy_aggregate", "memcpy (W processes at once)", "baseline")
GLOO = _Peer("gloo", "torch.distributed gloo", "peer")


def calls_for(nbytes: int) -> int:
    return max(1, min(MAX_CALLS, SAMPLE_BYTES // max(1, nbytes)))


def busbw(nbytes: int, t: float, workers: int) -> float:
    return 2.0 * (workers - 1) / workers * nbytes / t / 1e9


# --- pmaprt: runs inside the ranks


def rank_times(sizes: List[int], samples: int) -> Dict[int, List[float]]:
    """One rank of the SPMD map: per-call seconds of each sample, per size."""
    tiny = np.zeros(1, np.float32)
    out = {}
    for nbytes in sizes:
        x = np.ones(nbytes // 4, np.float32)
        res = np.empty_like(x)
        k = calls_for(nbytes)
        pmaprt.allreduce(x, out=res)
        ts = []
        for _ in range(samples):
            pmaprt.allreduce(tiny)
            t0 = time.perf_counter()
            for _ in range(k):
                pmaprt.allreduce(x, out=res)
            ts.append((time.perf_counter() - t0) / k)
        out[nbytes] = ts
    return out


def rank_memcpy_times(sizes: List[int], samples: int) -> Dict[int, List[float]]:
    """One rank: per-copy seconds of np.copyto of each size, all ranks copying at
    once (lined up by a tiny all-reduce before each sample)."""
    tiny = np.zeros(1, np.float32)
    out = {}
    for nbytes in sizes:
        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        k = calls_for(nbytes)
        ts = []
        for _ in range(samples):
            pmaprt.allreduce(tiny)
            t0 = time.perf_counter()
            for _ in range(k):
                np.copyto(dst, src)
            ts.append((time.perf_counter() - t0) / k)
        out[nbytes] = ts
    return out


def _spmd_times(fn, sizes, workers, samples):
    with pmaprt.Pool(workers) as pool:
        per_rank = list(pool.starmap(fn, [(sizes, samples)] * workers, axis_name="bench"))
    return {s: [max(r[s][i] for r in per_rank) for i in range(samples)] for s in sizes}


def time_pmaprt(sizes: List[int], workers: int, samples: int) -> Dict[int, List[float]]:
    """Per-call seconds (slowest rank) of each sample, per size."""
    return _spmd_times(rank_times, sizes, workers, samples)


def time_memcpy_all(sizes: List[int], workers: int, samples: int) -> Dict[int, List[float]]:
    """Per-copy seconds (slowest process) with every worker copying at once; the
    aggregate bandwidth is workers * bytes / t."""
    return _spmd_times(rank_memcpy_times, sizes, workers, samples)


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
