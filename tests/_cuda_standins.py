"""Stand-ins for CUDA's streams and events, to check the GPU path's ordering
without a GPU. None of them computes a result the real code would not: they
run the same NumPy operations, only at the moments CUDA would be free to.

- ``AsyncCuda``: streams whose operations are queued and run only when an
  event or stream is waited on, or at random moments (``eager``: the chance,
  at each enqueue, that a random stream runs some of its queue). A stream
  waiting on an event runs nothing past the wait before the event's stream
  has reached it. New buffers start as a sentinel byte pattern, so a read
  that comes before the write it needed gives a wrong result.
- ``AsyncEngine``: pmaprt.gpu's engine interface over ``AsyncCuda`` and
  NumPy arrays (``DevArray`` stands for device memory).
- ``AsyncLinks``: the ring all-reduce's links over ``AsyncCuda``.
- ``RaceCheckLinks``: the ring's links run at once, recording every access
  with its stream's vector clock: two accesses of different streams to
  overlapping bytes, one a write, neither ordered before the other by the
  events waited on, are a race.
- ``RecordingNccl``: cupy.cuda.nccl's names, recording calls (for order).
"""
import collections
import random
import threading

import numpy as np

from pmaprt.gpu.collective import NCCL_TYPE_NAMES
from pmaprt.gpu.ring import HostLinks

SENTINEL_BYTE = 0xA5


def sentinel(shape, dtype, cls=np.ndarray):
    a = np.empty(shape, dtype)
    a.view(np.uint8)[...] = SENTINEL_BYTE
    return a.view(cls) if cls is not np.ndarray else a


class DevArray(np.ndarray):
    """A NumPy array standing in for device memory; ``device_id`` is its GPU."""
    device_id = 0


class Stream:
    def __init__(self, cuda, device):
        self.cuda, self.device = cuda, device
        self.items = collections.deque()
        self.enqueued = self.done = 0
        self.ptr = id(self)

    def synchronize(self):
        self.cuda.run_until(self, self.enqueued)

    def wait_event(self, ev):
        self.cuda.enqueue(self, ("wait", ev))


class Event:
    def __init__(self, stream, seq):
        self.stream, self.seq = stream, seq

    def synchronize(self):
        self.stream.cuda.run_until(self.stream, self.seq)


class AsyncCuda:
    def __init__(self, seed=0, eager=0.3):
        self.rng = random.Random(seed)
        self.eager = eager
        self.lock = threading.RLock()
        self.streams = []

    def new_stream(self, device=0):
        with self.lock:
            s = Stream(self, device)
            self.streams.append(s)
            return s

    def enqueue(self, stream, item):
        with self.lock:
            stream.items.append(item)
            stream.enqueued += 1
            if self.eager and self.rng.random() < self.eager:
                busy = [s for s in self.streams if s.items]
                s = self.rng.choice(busy)
                self.run_until(s, s.done + self.rng.randint(1, len(s.items)))

    def op(self, stream, fn):
        self.enqueue(stream, ("op", fn))

    def record(self, stream):
        with self.lock:
            return Event(stream, stream.enqueued)

    def run_until(self, stream, seq):
        with self.lock:
            while stream.done < seq:
                kind, x = stream.items[0]
                if kind == "wait":
                    self.run_until(x.stream, x.seq)
                else:
                    x()
                stream.items.popleft()
                stream.done += 1

    def pending(self):
        with self.lock:
            return sum(len(s.items) for s in self.streams)


class EngineStandIn:
    """What every stand-in engine shares: devices selected per thread, a log of
    (device, op) in call order, the free memory it reports, device arrays as
    ``DevArray``. Subclasses give the copies, events and launches."""
    name = "cupy"

    def __init__(self, ndev=2, free=None):
        self.ndev, self.free = ndev, free
        self.current = threading.local()
        self.log = []
        self.registered = []

    def _dev(self):
        return getattr(self.current, "dev", 0)

    def _note(self, op):
        self.log.append((self._dev(), op))

    def device_count(self):
        return self.ndev

    def device(self, i):
        eng = self

        class Ctx:
            def __enter__(self):
                eng.current.dev = i

            def __exit__(self, *a):
                eng.current.dev = None
        return Ctx()

    def free_memory(self, i):
        return self.free

    def is_device_array(self, a):
        return isinstance(a, DevArray)

    def after_caller(self, stream):
        pass


class AsyncEngine(EngineStandIn):
    """The engine interface of pmaprt.gpu.engines over AsyncCuda and NumPy."""

    def __init__(self, ndev=2, seed=0, eager=0.3, free=None, on_launch=None):
        super().__init__(ndev, free)
        self.cuda = AsyncCuda(seed, eager)
        self.on_launch = on_launch
        self.device_bytes = collections.Counter()     # bytes of device buffers, per device
        self.at_unregister = None                     # (ops queued, GPU threads alive)

    def stream(self):
        return self.cuda.new_stream(self._dev())

    def pinned(self, shape, dtype):
        return sentinel(shape, dtype)

    def empty(self, shape, dtype, stream):
        a = sentinel(shape, dtype, DevArray)
        a.device_id = self._dev()
        self.device_bytes[a.device_id] += a.nbytes
        return a

    def h2d(self, dst, src, stream):
        self._note("h2d")
        self.cuda.op(stream, lambda: np.copyto(dst, src))

    def d2h(self, dst, src, stream):
        self._note("d2h")
        self.cuda.op(stream, lambda: np.copyto(dst, src))

    def copy_into(self, dst, src, stream):
        self.cuda.op(stream, lambda: np.copyto(dst, src, casting="unsafe"))

    def record(self, stream):
        return self.cuda.record(stream)

    def synchronize(self, event):
        self._note("wait")
        event.synchronize()

    def is_c_contiguous(self, a):
        return a.flags.c_contiguous

    def device_of(self, a):
        return a.device_id

    def register(self, arrays):
        self.registered = [a for a in arrays if a is not None]
        return ["registered"] * len(self.registered)

    def unregister(self, ptrs):
        if ptrs:
            alive = [t.name for t in threading.enumerate() if t.name.startswith("pmaprt-gpu")]
            self.at_unregister = (self.cuda.pending(), alive)
            self._note("unregister:%d" % len(ptrs))

    def launch(self, kind, fn, x, out, stream, launch):
        """A kernel is a Python callable k(x, out) run on the stream; a function's
        result shape is known at the call, as CuPy's is, and its values later."""
        self._note("launch")
        if self.on_launch is not None:
            self.on_launch()
        if kind == "function":
            probe = np.asarray(fn(np.zeros(x.shape, x.dtype)))
            r = sentinel(probe.shape, probe.dtype, DevArray)
            r.device_id = self._dev()
            self.cuda.op(stream, lambda: np.copyto(r, fn(np.asarray(x))))
            return r
        self.cuda.op(stream, lambda: fn(np.asarray(x), np.asarray(out)))
        return out

    def astype(self, r, dtype, stream):
        if r.dtype == dtype:
            return r
        a = sentinel(r.shape, dtype, DevArray)
        a.device_id = r.device_id
        self.cuda.op(stream, lambda: np.copyto(a, r, casting="unsafe"))
        return a


class AsyncLinks(HostLinks):
    """The ring's links over AsyncCuda: one stream per rank, events per step."""

    def __init__(self, cuda):
        super().__init__(np)
        self.cuda = cuda

    def setup(self, n):
        super().setup(n)
        self.streams = [self.cuda.new_stream(r) for r in range(n)]
        self.events = [None] * n

    def empty(self, rank, size, dtype):
        return sentinel(size, dtype)

    def wait(self, rank, on):
        for r in on:
            if self.events[r] is not None and r != rank:
                self.streams[rank].wait_event(self.events[r])

    def copy(self, dst_rank, dst, src_rank, src):
        self.sent[src_rank] += src.nbytes
        self.copies += 1
        self.cuda.op(self.streams[dst_rank], lambda: np.copyto(dst, src))

    def combine(self, rank, ufunc, d, t):
        self.cuda.op(self.streams[rank], lambda: ufunc(d, t, out=d))

    def scale(self, rank, f, n):
        self.cuda.op(self.streams[rank], lambda: np.divide(f, n, out=f))

    def step_done(self):
        self.events = [self.cuda.record(s) for s in self.streams]

    def finish(self):
        for s in self.streams:
            s.synchronize()


class RaceCheckLinks(HostLinks):
    """The ring's links, run at once, with a vector clock per rank's stream."""

    def setup(self, n):
        super().setup(n)
        self.n = n
        self.clock = [[0] * n for _ in range(n)]
        self.events = [None] * n
        self.accesses = []          # (rank, clock, lo, hi, write, what)
        self.races = []

    def _access(self, rank, clock, a, write, what):
        lo = a.__array_interface__["data"][0]
        hi = lo + a.nbytes
        for r2, c2, lo2, hi2, w2, what2 in self.accesses:
            if r2 != rank and (write or w2) and lo < hi2 and lo2 < hi and not c2[r2] <= clock[r2]:
                self.races.append((what2, r2, what, rank))
        self.accesses.append((rank, clock, lo, hi, write, what))

    def _op(self, rank, what, reads, writes):
        self.clock[rank][rank] += 1
        c = tuple(self.clock[rank])
        for a in reads:
            self._access(rank, c, a, False, what)
        for a in writes:
            self._access(rank, c, a, True, what)

    def wait(self, rank, on):
        for r in on:
            if self.events[r] is not None and r != rank:
                self.clock[rank] = [max(a, b) for a, b in zip(self.clock[rank], self.events[r])]

    def copy(self, dst_rank, dst, src_rank, src):
        super().copy(dst_rank, dst, src_rank, src)
        self._op(dst_rank, "copy", [src], [dst])

    def combine(self, rank, ufunc, d, t):
        super().combine(rank, ufunc, d, t)
        self._op(rank, "combine", [d, t], [d])

    def scale(self, rank, f, n):
        super().scale(rank, f, n)
        self._op(rank, "scale", [f], [f])

    def step_done(self):
        self.events = [tuple(c) for c in self.clock]


class RecordingNccl:
    """cupy.cuda.nccl's names (initAll, groupStart/groupEnd, allReduce, destroy,
    abort, the type and op constants); each call is logged with the device
    current at the time. It reduces nothing: the tests check order, not sums."""

    def __init__(self, current_device, fail_rank=None):
        self.log = []
        self.group = 0
        for i, (_, name) in enumerate(NCCL_TYPE_NAMES):
            setattr(self, name, 100 + i)
        self.NCCL_SUM, self.NCCL_MIN, self.NCCL_MAX = 0, 3, 2
        rec = self

        class NcclCommunicator:
            def __init__(self, dev, rank):
                self.dev, self.rank = dev, rank

            @staticmethod
            def initAll(devices):
                rec.log.append(("initAll", tuple(devices)))
                return [NcclCommunicator(d, r) for r, d in enumerate(devices)]

            def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
                if self.rank == fail_rank:
                    raise RuntimeError("NCCL failed on rank %d" % self.rank)
                rec.log.append(("allReduce", self.rank, self.dev, current_device(), rec.group,
                                sendbuf == recvbuf, count, datatype, op, stream))

            def destroy(self):
                rec.log.append(("destroy", self.rank))

            def abort(self):
                rec.log.append(("abort", self.rank))

        self.NcclCommunicator = NcclCommunicator

    def groupStart(self):
        self.group += 1
        self.log.append(("groupStart",))

    def groupEnd(self):
        self.group -= 1
        self.log.append(("groupEnd",))
