"""pmap on a dask.distributed cluster: the same call when one machine is not enough.

    pmap(fn, xs, backend="dask", address="tcp://scheduler:8786")
    pmap(fn, xs, backend="dask")            # a LocalCluster for this map
    DaskBackend(client).map(fn, xs)         # an existing Client

    caller --iterables--> chunks (sized from measured durations) --submit-->
        Dask futures, at most MAX_IN_FLIGHT_PER_THREAD x threads running and
        BUFFER_PER_THREAD x threads not yet consumed
                                  |
    each chunk task runs fn over its items on a Dask worker and returns
    (results, packed exception (_errors.pack_exception) or None, seconds)
                                  |
    results in input order (or as they finish), lazily, like map

- Chunk size: the first chunk is one item; later chunks aim at
  TARGET_CHUNK_S of work from the measured seconds per item (the scheduler's
  ChunkSizer: EWMA, growth at most 4x per chunk), and, when the input's length
  is known, at most 1/(2 x threads) of what is left, so the end of the map is
  spread over every thread.
- A NumPy array given as an iterable, when larger than SCATTER_BYTES, is
  scattered to the cluster once; chunks carry only (start, stop) and slice it
  on the worker. A function whose pickle is that large (a partial holding
  arrays) is scattered once too, not sent with every chunk.
- An exception in fn is raised at its position, after the results before it,
  with the worker's traceback as ``__cause__``. A worker that dies is Dask's
  to handle: it reruns the chunk elsewhere; once Dask gives up
  (``distributed.scheduler.allowed-failures``) the map raises
  WorkerCrashedError naming the items.
- pmaprt's collectives (all-reduce, SPMD with axis_name) are not available
  across machines yet: asking for them here raises NotImplementedError (see
  docs/ARCHITECTURE.md for the planned design).
"""
import collections
import itertools
import logging
import math
import pickle
import time
import weakref

from . import _serialize
from ._api import register_backend
from ._errors import WorkerCrashedError, pack_exception, rebuild_exception
from ._options import check_call, default_workers
from ._sched import GROWTH, MAX_CHUNK, ChunkSizer

__all__ = ["DaskBackend", "dask_map", "in_dask_task", "COLLECTIVES_ERROR"]

# Seconds of work per chunk. A Dask task costs about a millisecond of
# scheduler and network time (pmaprt's own chunks: 10-20 us), so chunks are
# longer than the local pool's 2 ms; shorter would spend more on dispatch,
# longer would leave a longer tail at the end of the map.
TARGET_CHUNK_S = 0.05
# Chunks running or queued on the cluster, per worker thread: two keeps every
# thread busy while the next chunk's data travels.
MAX_IN_FLIGHT_PER_THREAD = 2
# Chunks finished but not yet consumed (ordered results wait for the slowest),
# per worker thread: bounds the results held for a lazy consumer.
BUFFER_PER_THREAD = 8
# Arrays (and functions) at least this large are scattered once.
SCATTER_BYTES = 1 << 20
# Bounds on waits for the cluster to start and stop.
START_TIMEOUT_S = 60
CLOSE_TIMEOUT_S = 30

COLLECTIVES_ERROR = (
    "pmaprt: collectives (allreduce, SPMD with axis_name=) are not available on the Dask "
    "backend yet: they run across the local pool's workers only. Use the local pool "
    "(backend=None) for SPMD maps; see docs/ARCHITECTURE.md for the planned design "
    "(torch.distributed with NCCL or gloo across Dask workers).")

_IN_TASK = False


def in_dask_task():
    """True inside a chunk that the Dask backend runs (collectives check this)."""
    return _IN_TASK


class _Sizer(ChunkSizer):
    __slots__ = ("target",)

    def __init__(self, fixed, target):
        super().__init__(fixed)
        self.target = target

    def size(self):
        if self.fixed:
            return self.fixed
        if self.t_item is None:
            return 1
        c = int(self.target / max(self.t_item, 1e-9))
        return max(1, min(c, self.last * GROWTH, MAX_CHUNK))


# --- worker side


def _run_chunk(fn, star, spec, *arrays):
    """One chunk on a Dask worker: (results, packed exception (_errors.pack_exception) or None, seconds)."""
    global _IN_TASK
    t0 = time.perf_counter()
    cols = [arrays[c[1]][c[2]:c[3]] if c[0] == "array" else c[1] for c in spec]
    out = []
    app = out.append
    _IN_TASK = True
    try:
        if len(cols) > 1:
            for args in zip(*cols):
                app(fn(*args))
        elif star:
            for args in cols[0]:
                app(fn(*args))
        else:
            for x in cols[0]:
                app(fn(x))
    except Exception as e:
        return out, pack_exception(e), time.perf_counter() - t0
    finally:
        _IN_TASK = False
    return out, None, time.perf_counter() - t0


# --- parent side


def _is_big_array(x):
    t = type(x)
    return (t.__module__ == "numpy" and t.__name__ == "ndarray" and x.ndim >= 1
            and x.nbytes >= SCATTER_BYTES)


def _local_cluster(n_workers):
    from distributed import LocalCluster
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                        host="127.0.0.1", dashboard_address=None, silence_logs=logging.ERROR)


class DaskBackend:
    """Runs maps on a dask.distributed cluster.

    ``DaskBackend(client)`` uses an existing ``distributed.Client`` (left
    open); ``DaskBackend(address="tcp://...")`` connects to a scheduler;
    ``DaskBackend()`` starts a LocalCluster (worker processes on loopback,
    one thread each, ``n_workers`` of them, one per core by default). What the
    backend started, ``close()`` (or the ``with`` block) stops.
    """

    def __init__(self, client=None, *, address=None, n_workers=None,
                 target_chunk_s=TARGET_CHUNK_S):
        try:
            import distributed
        except ImportError as e:  # pragma: no cover
            raise ImportError("pmaprt: the Dask backend needs dask.distributed: "
                              "pip install 'dask[distributed]' (or pmaprt[dask])") from e
        if client is not None and address is not None:
            raise ValueError("pmaprt: pass a Dask client or an address, not both")
        if not (isinstance(target_chunk_s, (int, float)) and target_chunk_s > 0):
            raise ValueError("pmaprt: target_chunk_s must be a positive number of seconds, got %r"
                             % (target_chunk_s,))
        self.target_chunk_s = float(target_chunk_s)
        self._cluster = None
        self._owns_client = client is None
        if client is not None:
            if not isinstance(client, distributed.Client):
                raise TypeError("pmaprt: client must be a distributed.Client, got %r" % (client,))
            self.client = client
        elif address is not None:
            if not isinstance(address, str):
                raise TypeError("pmaprt: address must be a string such as 'tcp://host:8786', "
                                "got %r" % (address,))
            self.client = distributed.Client(address, timeout=START_TIMEOUT_S)
        else:
            self._cluster = _local_cluster(n_workers or default_workers())
            try:
                self.client = distributed.Client(self._cluster, timeout=START_TIMEOUT_S)
            except BaseException:
                self._cluster.close(timeout=CLOSE_TIMEOUT_S)
                raise

    @property
    def threads(self):
        """Worker threads in the cluster (at least 1)."""
        return max(1, sum(self.client.nthreads().values()))

    def map(self, fn, *iterables, chunksize=None, ordered=True, star=False, axis_name=None):
        """Lazy map(fn, *iterables) on the cluster, in order unless ordered=False."""
        if axis_name is not None:
            raise NotImplementedError(COLLECTIVES_ERROR)
        check_call(fn, iterables)
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int)
                                      or chunksize < 1):
            raise ValueError("pmaprt: chunksize must be a positive int or None, got %r"
                             % (chunksize,))
        return _DaskMap(self, fn, iterables, chunksize or 0, ordered, star)

    def starmap(self, fn, iterable, *, chunksize=None, ordered=True):
        return self.map(fn, iterable, chunksize=chunksize, ordered=ordered, star=True)

    def close(self):
        """Close the client and the cluster this backend started."""
        client, self.client = getattr(self, "client", None), None
        if client is not None and self._owns_client:
            try:
                client.close(timeout=CLOSE_TIMEOUT_S)
            except Exception:
                pass
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close(timeout=CLOSE_TIMEOUT_S)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        where = "LocalCluster" if self._cluster is not None else "client"
        return "<pmaprt.DaskBackend %s %r>" % (where, self.client)


class _Entry:
    __slots__ = ("start", "count", "future", "value", "error")

    def __init__(self, start, count, future):
        self.start = start
        self.count = count
        self.future = future
        self.value = None
        self.error = None


class _DaskMap:
    """The iterator of one map on the cluster; ``close()`` cancels what is left."""

    def __init__(self, backend, fn, iterables, fixed, ordered, star):
        self.backend = backend
        self.client = client = backend.client
        self.ordered = ordered
        self.star = star or len(iterables) > 1
        self.sizer = _Sizer(fixed, backend.target_chunk_s)
        self.threads = backend.threads
        self.max_in_flight = MAX_IN_FLIGHT_PER_THREAD * self.threads
        self.max_buffered = (BUFFER_PER_THREAD + MAX_IN_FLIGHT_PER_THREAD) * self.threads
        self.scattered = []
        # The function: scattered once when its pickle is large.
        fn_bytes = _serialize.dumps_fn(fn)
        self.fn = client.scatter(fn, broadcast=True, hash=False) if len(fn_bytes) >= SCATTER_BYTES else fn
        if self.fn is not fn:
            self.scattered.append(self.fn)
        # Columns: ("array", index, length) for scattered arrays, ("iter", iterator).
        self.arrays = []
        self.cols = []
        self.total = None
        for x in iterables:
            if _is_big_array(x):
                fut = client.scatter(x, broadcast=False, hash=False)
                self.scattered.append(fut)
                self.cols.append(("array", len(self.arrays), len(x)))
                self.arrays.append(fut)
            else:
                self.cols.append(("iter", iter(x)))
        sizes = []
        for x in iterables:
            try:
                sizes.append(len(x))
            except TypeError:
                pass
        if len(sizes) == len(iterables):
            self.total = min(sizes)
        self.fed = 0
        self.exhausted = False
        self.pending = collections.deque()
        self._it = self._results()

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self):
        self._it.close()

    # --- feeding

    def _next_size(self):
        c = self.sizer.size()
        if self.total is not None and not self.sizer.fixed:
            left = self.total - self.fed
            c = min(c, max(1, math.ceil(left / (2 * self.threads))))
        return c

    def _submit_one(self):
        c = self._next_size()
        spec = []
        k = c
        for col in self.cols:
            if col[0] == "iter":
                items = list(itertools.islice(col[1], k))
                if len(items) < k:
                    self.exhausted = True
                    k = len(items)
                spec.append(["items", items])
            else:
                left = col[2] - self.fed
                if left <= k:
                    self.exhausted = True
                    k = max(0, left)
                spec.append(["array", col[1], self.fed, None])
        if k <= 0:
            self.exhausted = True
            return
        for s in spec:
            if s[0] == "items":
                del s[1][k:]
            else:
                s[3] = s[2] + k
        spec = [tuple(s) for s in spec]
        fut = self.client.submit(_run_chunk, self.fn, self.star, spec, *self.arrays, pure=False)
        self.pending.append(_Entry(self.fed, k, fut))
        self.fed += k

    def _fill(self):
        while not self.exhausted:
            running = sum(1 for e in self.pending if e.value is None and e.error is None
                          and not e.future.done())
            if running >= self.max_in_flight or len(self.pending) >= self.max_buffered:
                return
            self._submit_one()

    # --- collecting

    def _fetch(self, e):
        """The result of a finished chunk (one round trip); feeds the sizer."""
        if e.value is not None or e.error is not None:
            return
        try:
            e.value = e.future.result()
        except BaseException as exc:
            e.error = exc
        else:
            out, err, seconds = e.value
            self.sizer.observe(len(out) + (1 if err is not None else 0), seconds)
        e.future = None

    def _wait_any(self):
        from distributed import wait
        fs = [e.future for e in self.pending if e.future is not None and not e.future.done()]
        if fs:
            wait(fs, return_when="FIRST_COMPLETED")
        for e in self.pending:
            if e.future is not None and e.future.done():
                self._fetch(e)

    def _take(self, e):
        if e.error is not None:
            exc = e.error
            try:
                from distributed.scheduler import KilledWorker
            except ImportError:  # pragma: no cover
                KilledWorker = ()
            if isinstance(exc, KilledWorker):
                raise WorkerCrashedError(
                    "pmaprt: Dask workers died while running items %d..%d of this map and Dask "
                    "gave up retrying them (distributed.scheduler.allowed-failures): %s"
                    % (e.start, e.start + e.count - 1, exc), items=(e.start, e.start + e.count)
                ) from exc
            raise exc
        out, err, _ = e.value
        if err is None:
            return out, None
        exc = rebuild_exception(*err)
        if hasattr(exc, "add_note"):
            exc.add_note("pmaprt: raised by the function on item %d of the map (Dask)"
                         % (e.start + len(out)))
        return out, exc

    def _results(self):
        try:
            while True:
                self._fill()
                if not self.pending:
                    return
                entry = None
                if self.ordered:
                    head = self.pending[0]
                    if head.future is not None and head.future.done():
                        self._fetch(head)
                    if head.future is None:
                        entry = self.pending.popleft()
                else:
                    for e in self.pending:
                        if e.future is not None and e.future.done():
                            self._fetch(e)
                        if e.future is None:
                            entry = e
                            break
                    if entry is not None:
                        self.pending.remove(entry)
                if entry is None:
                    self._wait_any()
                    continue
                out, exc = self._take(entry)
                yield from out
                if exc is not None:
                    raise exc
        finally:
            self._release()

    def _release(self):
        for e in self.pending:
            if e.future is not None:
                e.future.cancel()
        self.pending.clear()
        for f in self.scattered:
            try:
                f.release()
            except Exception:
                pass
        self.scattered = []


def dask_map(fn, *iterables, address=None, client=None, chunksize=None, ordered=True,
             axis_name=None, n_workers=None, star=False):
    """pmap on Dask: a lazy iterator of fn's results in order.

    client: an existing ``distributed.Client``; address: a scheduler to
    connect to; neither: a LocalCluster is started for this map and stopped
    when the iterator ends or is closed.
    """
    if axis_name is not None:
        raise NotImplementedError(COLLECTIVES_ERROR)
    backend = DaskBackend(client, address=address, n_workers=n_workers)
    try:
        it = backend.map(fn, *iterables, chunksize=chunksize, ordered=ordered, star=star)
    except BaseException:
        backend.close()
        raise
    return _OwnedMap(it, backend)


class _OwnedMap:
    """A map whose backend (and LocalCluster) lives as long as the iterator:
    closed when the results end, on close(), or when the iterator is dropped."""

    def __init__(self, it, backend):
        self._it = it
        self._backend = backend
        self._finalizer = weakref.finalize(self, _close_all, it, backend)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._it)
        except BaseException:
            self.close()
            raise

    def close(self):
        self._finalizer()


def _close_all(it, backend):
    try:
        it.close()
    finally:
        backend.close()


register_backend("dask", dask_map)   # pmap(backend="dask") reaches it through _api
