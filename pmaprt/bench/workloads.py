"""Benchmark workloads: the item functions and the inputs they run over.

Every function a worker runs is defined at module level here, so that every
runner (pmaprt, multiprocessing, concurrent.futures, joblib, mpire) pickles it
by reference (``pmaprt.bench.workloads.spin``) rather than by value.

A workload is described by a :class:`Workload`: its canonical name, the item
function, the argument list, a few numbers for the report (``params``) and
what the report compares against (``ideal``: whether ``max(serial/W, longest
item)`` is meaningful for it).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

# --------------------------------------------------------------------------
# item functions (module level: pickled by reference)
# --------------------------------------------------------------------------


def double(x):
    """The tiny workload: as little work per item as there can be."""
    return x * 2


def noop(x):
    """The round-trip task: returns its argument."""
    return x


def spin(n):
    """A pure-Python busy loop of ``n`` iterations (holds the GIL throughout).

    Its cost per iteration is measured once per run by :func:`calibrate`, so a
    workload can ask for "about 50 microseconds" and get it on any machine.
    """
    acc = 0
    for i in range(n):
        acc += i
    return acc


def sqrt_sum(a):
    """The numpy workload: one chunk of a large float64 array."""
    return float(np.sqrt(a).sum())


#: the preprocessing workload's per-column mean and spread (16 float32 columns)
PRE_COLS = 16
PRE_CLIP = 3.0


def _pre_stats():
    mu = np.linspace(-1.0, 1.0, PRE_COLS, dtype=np.float32)
    sigma = np.linspace(0.5, 2.0, PRE_COLS, dtype=np.float32)
    return mu, sigma


_PRE = None


def normalize_clip(block):
    """The preprocessing workload: standardize each column of a float32 block
    of rows, then clip to +-PRE_CLIP (one temporary, float32 throughout)."""
    global _PRE
    if _PRE is None:
        mu, sigma = _pre_stats()
        _PRE = (mu, (1.0 / sigma).astype(np.float32))
    mu, inv = _PRE
    y = block - mu
    y *= inv
    np.clip(y, -PRE_CLIP, PRE_CLIP, out=y)
    return y


# --------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------


@dataclass
class Calibration:
    """How many :func:`spin` iterations make one microsecond, on this machine."""

    iters_per_us: float
    samples: List[float] = field(default_factory=list)

    def iters_for(self, us: float) -> int:
        return max(1, int(round(us * self.iters_per_us)))


def calibrate(min_sample_s: float = 0.02, samples: int = 5) -> Calibration:
    """Measure :func:`spin`'s speed in this process (median of ``samples``)."""
    n = 1000
    # grow n until one call takes at least min_sample_s
    while True:
        t0 = time.perf_counter()
        spin(n)
        dt = time.perf_counter() - t0
        if dt >= min_sample_s or n >= 1 << 30:
            break
        n = int(n * max(2.0, min(10.0, min_sample_s / max(dt, 1e-9))))
    rates = []
    for _ in range(samples):
        t0 = time.perf_counter()
        spin(n)
        dt = time.perf_counter() - t0
        rates.append(n / (dt * 1e6))
    return Calibration(iters_per_us=statistics.median(rates), samples=rates)


def time_call(fn: Callable, arg: Any, repeat: int = 3) -> float:
    """Median wall time of ``fn(arg)`` in this process, in seconds."""
    ts = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn(arg)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# --------------------------------------------------------------------------
# workload descriptions
# --------------------------------------------------------------------------

#: canonical names, in the order the suite runs them
ALL = (
    "tiny",
    "medium",
    "heavy_tailed",
    "cost_shift",
    "numpy",
    "numpy_shared",
    "preprocess",
    "allreduce",
    "gpu",
    "roundtrip",
)

#: one-line descriptions (for --list and the report)
DESCRIPTIONS = {
    "tiny": "x*2 over range(N): per-item overhead dominates",
    "medium": "~50 us pure-Python items (calibrated busy loop)",
    "heavy_tailed": "4,000 items with Pareto(1.2) costs: load balance",
    "cost_shift": "first half cheap, second half 100x dearer: adaptivity",
    "numpy": "np.sqrt(a).sum() over 256 chunks of a float64 array (plain ndarrays)",
    "numpy_shared": "the numpy workload over a shared array (no copy) and a plain one "
                    "(chunks=); /ideal = t / (serial/W)",
    "preprocess": "standardize + clip float32 rows x 16 in blocks, written into out=; "
                  "GB/s vs a 1-process memcpy",
    "allreduce": "pmaprt.allreduce busbw vs size, inside an SPMD map; naive mp.Pool and memcpy peers",
    "gpu": "GPU map (needs a GPU)",
    "roundtrip": "latency of one tiny task on a warm pool",
}

#: the workloads swept over fixed chunk sizes
SWEPT = ("medium", "tiny")


def canonical(name: str) -> str:
    """``heavy-tailed`` / ``Heavy_Tailed`` -> ``heavy_tailed``; ValueError if unknown."""
    key = name.strip().lower().replace("-", "_")
    aliases = {"heavy": "heavy_tailed", "shift": "cost_shift", "round_trip": "roundtrip",
               "latency": "roundtrip", "np": "numpy", "shared": "numpy_shared",
               "numpy-shared": "numpy_shared"}
    key = aliases.get(key, key)
    if key not in ALL:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(ALL)}")
    return key


@dataclass
class Workload:
    name: str
    fn: Callable
    args: List[Any]
    params: Dict[str, Any]
    description: str = ""
    ideal: bool = False  # report makespan vs max(serial/W, longest item)
    longest_arg: Any = None  # the single most expensive item (for the ideal)
    cleanup: Optional[Callable[[], None]] = None

    @property
    def n(self) -> int:
        return len(self.args)


def _scaled(n: int, scale: float, minimum: int) -> int:
    return max(minimum, int(round(n * scale)))


# sizes: (quick, full)
SIZES = {
    "tiny": (20_000, 2_000_000),
    "medium": (4_000, 80_000),
    "heavy_tailed": (4_000, 4_000),
    "cost_shift": (2_000, 20_000),
    "numpy_bytes": (64 << 20, 1 << 30),
    "preprocess_rows": (1_000_000, 10_000_000),
    "roundtrip_calls": (200, 2_000),
}
NUMPY_CHUNKS = 256
#: rows per block of the preprocessing workload (4,000 x 16 float32 = 250 KiB)
PRE_BLOCK_ROWS = 4_000


def build(name: str, *, full: bool, scale: float, workers: int, cal: Calibration,
          seed: int = 20240601) -> Workload:
    """Build the named workload's inputs (not used for allreduce/gpu/roundtrip);
    seed: the heavy-tailed costs' draw."""
    i = 1 if full else 0
    min_items = max(8, 2 * workers)
    if name == "tiny":
        n = _scaled(SIZES["tiny"][i], scale, min_items)
        return Workload(name, double, range(n), {"n": n}, DESCRIPTIONS[name])
    if name == "medium":
        n = _scaled(SIZES["medium"][i], scale, min_items)
        it = cal.iters_for(50.0)
        return Workload(name, spin, [it] * n,
                        {"n": n, "item_us_target": 50.0, "spin_iters": it}, DESCRIPTIONS[name])
    if name == "heavy_tailed":
        n = _scaled(SIZES["heavy_tailed"][i], scale, min_items)
        unit_us = 50.0 if full else 10.0
        rng = np.random.default_rng(seed)
        # classical Pareto with minimum 1 and shape 1.2 (mean 6): numpy's
        # pareto() is the Lomax form, so shift by one
        costs_us = unit_us * (1.0 + rng.pareto(1.2, n))
        iters = [cal.iters_for(c) for c in costs_us.tolist()]
        longest = max(iters)
        return Workload(name, spin, iters,
                        {"n": n, "pareto_shape": 1.2, "min_item_us": unit_us, "seed": seed,
                         "nominal_serial_us": float(costs_us.sum()),
                         "nominal_longest_us": float(costs_us.max())},
                        DESCRIPTIONS[name], ideal=True, longest_arg=longest)
    if name == "cost_shift":
        n = _scaled(SIZES["cost_shift"][i], scale, min_items)
        cheap_us = 5.0 if full else 2.0
        dear_us = 100.0 * cheap_us
        half = n // 2
        a, b = cal.iters_for(cheap_us), cal.iters_for(dear_us)
        args = [a] * half + [b] * (n - half)
        return Workload(name, spin, args,
                        {"n": n, "cheap_us": cheap_us, "dear_us": dear_us, "ratio": 100},
                        DESCRIPTIONS[name], ideal=True, longest_arg=b)
    if name == "numpy":
        nbytes = _scaled(SIZES["numpy_bytes"][i], scale, NUMPY_CHUNKS * 8)
        count = max(NUMPY_CHUNKS, nbytes // 8)
        count -= count % NUMPY_CHUNKS
        arr = np.arange(count, dtype=np.float64)
        chunks = list(arr.reshape(NUMPY_CHUNKS, -1))
        return Workload(name, sqrt_sum, chunks,
                        {"n": NUMPY_CHUNKS, "array_bytes": int(arr.nbytes),
                         "chunk_bytes": int(chunks[0].nbytes), "dtype": "float64"},
                        DESCRIPTIONS[name])
    if name == "preprocess":
        rows = _scaled(SIZES["preprocess_rows"][i], scale, min_items)
        block = max(1, min(PRE_BLOCK_ROWS, rows // (4 * max(1, workers))))
        nblocks = max(1, rows // block)
        rows = nblocks * block
        mu, sigma = _pre_stats()
        rng = np.random.default_rng(7)
        x = rng.standard_normal((nblocks, block, PRE_COLS), dtype=np.float32)
        x *= 1.5 * sigma
        x += mu
        # one item per block: args[i] is a (block, 16) float32 array, out[i] its result
        return Workload(name, normalize_clip, x,
                        {"n": nblocks, "rows": rows, "cols": PRE_COLS, "block_rows": block,
                         "dtype": "float32", "bytes": int(x.nbytes), "clip": PRE_CLIP},
                        DESCRIPTIONS[name])
    raise ValueError(f"workload {name!r} has no map inputs")


def roundtrip_calls(*, full: bool, scale: float) -> int:
    return _scaled(SIZES["roundtrip_calls"][1 if full else 0], scale, 5)


def geometric(lo: int, hi: int, factor: int = 2) -> List[int]:
    """``lo, lo*factor, ...`` up to ``hi``, with ``hi`` itself always included."""
    lo, hi = max(1, int(lo)), max(1, int(hi))
    out = []
    v = lo
    while v < hi:
        out.append(v)
        v *= factor
    out.append(hi)
    return sorted(set(out))


def sweep_chunksizes(n: int, workers: int, full: bool) -> List[int]:
    """The fixed chunk sizes swept for one workload: 1 .. ceil(n/W), geometric."""
    hi = max(1, math.ceil(n / max(1, workers)))
    return geometric(1, hi, 2 if full else 4)
