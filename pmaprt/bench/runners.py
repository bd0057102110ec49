"""The runners a benchmark compares: pmaprt and its peers.

Every runner has the same small interface::

    r.available()        -> (bool, note)   is it installed / usable here?
    r.start(workers)     creates its pool and warms it (every worker started)
    r.map(fn, args)      runs fn over args to completion, returns the list
    r.call(fn, x)        one task round trip on the warm pool (or None if the
                         runner has no separate latency path: see has_call)
    r.close()            shuts the pool down

Pools are created and warmed in ``start`` so that no timed run pays for
process start-up; every runner uses the same worker count.
"""
from __future__ import annotations

import math
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from typing import Any, Callable, Dict, List, Optional, Tuple

import pmaprt

from . import workloads as W


def default_chunksize(n: int, workers: int) -> int:
    """The usual hand-tuned chunk size: four chunks per worker (what
    ``multiprocessing.Pool.map`` picks by itself)."""
    return max(1, math.ceil(n / (4 * max(1, workers))))


class Runner:
    id = "?"
    label = "?"
    kind = "peer"  # "baseline" | "pmaprt" | "peer"
    has_call = True  # takes part in the round-trip table

    def __init__(self):
        self.workers = 1

    def available(self) -> Tuple[bool, Optional[str]]:
        return True, None

    def start(self, workers: int) -> None:
        self.workers = workers

    def warm(self) -> None:
        out = self.map(W.noop, list(range(8 * max(1, self.workers))))
        if len(out) != 8 * max(1, self.workers):
            raise RuntimeError("warm-up returned the wrong number of results")

    def params(self, n: int) -> Dict[str, Any]:
        return {"workers": self.workers}

    def map(self, fn: Callable, args: List[Any]) -> List[Any]:
        raise NotImplementedError

    def call(self, fn: Callable, x: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def version(self) -> Optional[str]:
        return None


class BuiltinMap(Runner):
    id = "builtin_map"
    label = "builtin map"
    kind = "baseline"

    def start(self, workers):
        self.workers = workers

    def warm(self):
        pass

    def params(self, n):
        return {"workers": 1}

    def map(self, fn, args):
        return list(map(fn, args))

    def call(self, fn, x):
        return fn(x)


class MpPoolMap(Runner):
    id = "mp_pool_map"
    label = "mp.Pool.map"

    def start(self, workers):
        self.workers = workers
        self.pool = mp.Pool(workers)

    def params(self, n):
        return {"workers": self.workers, "chunksize": "default (n/(4W))"}

    def map(self, fn, args):
        return self.pool.map(fn, args)

    def call(self, fn, x):
        return self.pool.apply(fn, (x,))

    def close(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.terminate()
            pool.join()
            self.pool = None


class MpPoolImap(MpPoolMap):
    id = "mp_pool_imap"
    label = "mp.Pool.imap"
    has_call = False  # same path as apply

    def params(self, n):
        return {"workers": self.workers, "chunksize": default_chunksize(n, self.workers)}

    def map(self, fn, args):
        return list(self.pool.imap(fn, args, chunksize=default_chunksize(len(args), self.workers)))


class PPE(Runner):
    id = "ppe_cs1"
    label = "cf.PPE cs=1"
    fixed_chunksize: Optional[int] = 1

    def start(self, workers):
        self.workers = workers
        self.ex = ProcessPoolExecutor(max_workers=workers)

    def _cs(self, n):
        return self.fixed_chunksize or default_chunksize(n, self.workers)

    def params(self, n):
        return {"workers": self.workers, "chunksize": self._cs(n)}

    def map(self, fn, args):
        return list(self.ex.map(fn, args, chunksize=self._cs(len(args))))

    def call(self, fn, x):
        return self.ex.submit(fn, x).result()

    def close(self):
        ex = getattr(self, "ex", None)
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
            self.ex = None


class PPETuned(PPE):
    id = "ppe_tuned"
    label = "cf.PPE cs=n/4W"
    fixed_chunksize = None
    has_call = False  # same path as ppe_cs1


class Joblib(Runner):
    id = "joblib"
    label = "joblib"

    def available(self):
        try:
            import joblib  # noqa: F401  (is it installed?)
        except ImportError:
            return False, "joblib not installed"
        return True, None

    def version(self):
        import joblib

        return joblib.__version__

    def start(self, workers):
        from joblib import Parallel

        self.workers = workers
        self.par = Parallel(n_jobs=workers)  # loky backend, batch_size="auto"
        self.par.__enter__()  # keeps the same pool across calls

    def params(self, n):
        return {"workers": self.workers, "batch_size": "auto", "backend": "loky"}

    def map(self, fn, args):
        from joblib import delayed

        d = delayed(fn)
        return self.par(d(a) for a in args)

    def call(self, fn, x):
        from joblib import delayed

        return self.par([delayed(fn)(x)])[0]

    def close(self):
        par = getattr(self, "par", None)
        if par is not None:
            try:
                par.__exit__(None, None, None)
            finally:
                self.par = None
                # loky keeps its workers for reuse: stop them, so that they do
                # not sit beside the runners timed after this one
                try:
                    from joblib.externals.loky import get_reusable_executor

                    get_reusable_executor().shutdown(wait=True)
                except Exception:
                    pass


class Mpire(Runner):
    id = "mpire"
    label = "mpire"

    def available(self):
        try:
            import mpire  # noqa: F401
        except ImportError:
            return False, "mpire not installed"
        return True, None

    def version(self):
        try:
            return version("mpire")
        except Exception:
            return None

    def start(self, workers):
        from mpire import WorkerPool

        self.workers = workers
        self.pool = WorkerPool(n_jobs=workers, keep_alive=True)
        self.pool.__enter__()

    def params(self, n):
        return {"workers": self.workers, "chunk_size": "default"}

    def map(self, fn, args):
        # mpire unpacks tuple/list/dict items into arguments; ours are ints or
        # ndarrays, which it passes through as they are
        return self.pool.map(fn, args, iterable_len=len(args))

    def call(self, fn, x):
        return self.pool.apply(fn, (x,))

    def close(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            try:
                pool.__exit__(None, None, None)
            finally:
                self.pool = None


class Pmaprt(Runner):
    """pmaprt on a pool of its own (``pmaprt.Pool``).  ``chunksize=None`` is
    pmaprt's adaptive choice; ``last_stats`` is the MapStats of the latest
    completed map."""

    id = "pmaprt"
    label = "pmaprt"
    kind = "pmaprt"

    def __init__(self, chunksize: Optional[int] = None):
        super().__init__()
        self.chunksize = chunksize
        self.last_stats = None
        self.pool = None

    def version(self):
        return pmaprt_version()

    def start(self, workers):
        self.pool = pmaprt.Pool(workers=workers)
        self.workers = self.pool.workers

    def params(self, n):
        return {"workers": self.workers,
                "chunksize": self.chunksize if self.chunksize else "adaptive"}

    def _iter(self, fn, args, chunksize):
        return self.pool.map(fn, args, chunksize=chunksize)

    def map(self, fn, args, chunksize: Any = "default"):
        cs = self.chunksize if chunksize == "default" else chunksize
        it = self._iter(fn, args, cs)
        out = list(it)
        self.last_stats = getattr(it, "stats", None)
        return out

    def call(self, fn, x):
        # one call on the warm pool (as mp.Pool.apply for multiprocessing)
        return self.pool.apply(fn, x)

    def close(self):
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()


def pmaprt_version() -> Optional[str]:
    return str(pmaprt.__version__)


class PmaprtRetries(Pmaprt):
    """pmaprt with retries=3 (progress tracking on every item): what crash
    tolerance costs when nothing fails. Runs only when named (--runner)."""

    id = "pmaprt-retries"
    label = "pmaprt retries=3"
    optional = True

    def _iter(self, fn, args, chunksize):
        return self.pool.map(fn, args, chunksize=chunksize, retries=3)


def all_runners(optional: bool = False) -> List[Runner]:
    """Every runner, in the order the suite runs them (builtin map first);
    optional=True adds those that run only when asked for by name."""
    rs = [BuiltinMap(), Pmaprt(), MpPoolMap(), MpPoolImap(), PPE(), PPETuned(), Joblib(), Mpire()]
    if optional:
        rs.insert(2, PmaprtRetries())
    return rs


RUNNER_IDS = tuple(r.id for r in all_runners(optional=True))
