"""pmap on GPUs: ``pmap(fn, arr, device="gpu" | "auto")`` and the GPU all-reduce.

    host ndarray --> chunks of rows, claimed by one thread per GPU worker
      per worker: S streams (default 2), each with a pinned input and output
      staging buffer and a device input and output buffer of one chunk:
        slot k: [host -> pinned_in] -> H2D async -> kernel -> D2H async -> event
        next slot: wait for its previous event, [pinned_out -> result rows], reuse
      so chunk i+1's copy in, chunk i's kernel and chunk i-1's copy out run at once
    device array (CuPy / Numba) --> stays on its device: kernels run on slices of
      it on one stream, into a device result; no host round trip

- fn kinds: a numba.cuda kernel, launched as ``fn[blocks, threads, stream](x, out)``
  with blocks * threads >= len(x) (one thread per row; ``launch=threads`` or
  ``launch=(blocks, threads)`` overrides); a CuPy ``ElementwiseKernel`` called as
  ``fn(x, out)``; a CuPy ``RawKernel`` called as ``fn((blocks,), (threads,),
  (x, out, numpy.int64(x.size)))`` (declare ``long long n``) over x.size
  elements; or a plain function ``fn(x) -> array`` over CuPy arrays, run on the
  worker's stream (``device="gpu"``, or ``"auto"`` with a CuPy input: with
  ``"auto"`` and a NumPy input a plain function runs on the CPU pool, since
  nothing says it was written for CuPy).
- ``device="auto"``: a GPU kernel runs on the GPUs when NVML finds one (a
  kernel with no GPU is an error: it cannot run on the CPU); a plain function
  over a NumPy array, or any function when there is no GPU, runs on row
  chunks on the CPU pool, and a RuntimeWarning says so once per process.
- ``register=True`` (host input, CuPy): page-lock the caller's input and
  output in place (cudaHostRegister) for the map and copy from and to them
  directly, skipping both staging copies; registering costs time in
  proportion to the size, so it pays for large arrays.
- Chunk size: CHUNK_BYTES of input rows by default, bounded so that
  streams x (input + output chunk) fits in MEM_FRACTION of the device's free
  memory. An explicit ``chunksize`` over that bound raises GPUMemoryError.
- Devices: every visible GPU (``devices=[...]`` picks CUDA ordinals; a device
  listed twice gets two workers). Each worker is a thread of the calling
  process: CUDA releases the GIL while it waits, and pmaprt's CPU workers are
  spawned interpreters, never forks, so CUDA is never initialized in a forked
  child. A process forked after this module initialized CUDA refuses to use
  it (CUDA's state does not survive fork) and says so.
- Libraries: CuPy when installed (``pip install 'pmaprt[gpu]'``); a numba.cuda
  kernel over host or Numba device arrays also runs without CuPy, on Numba's
  own streams and pinned arrays (and so under Numba's CUDA simulator).
  This module is imported only when a map asks for a device: ``import pmaprt``
  never imports CuPy.
"""
import math
import os
import sys
import threading
import warnings

import numpy as np

from ._gpu_ring import CupyLinks, check_buffers, check_op, ring_allreduce

__all__ = ["device_map", "allreduce", "GPUMemoryError", "kernel_kind"]

# Input bytes per chunk when the caller gives no chunksize: large enough that
# a copy or a launch (~10 us) is a small fraction of the chunk's time at
# 50 GB/s (64 MiB: 1.3 ms), small enough that double buffering ends soon
# after the last copy in and that many chunks feed several GPUs.
CHUNK_BYTES = 64 << 20
# Share of a device's free memory one map's staging buffers may take; the rest
# is left for the kernel's own temporaries and for other users of the GPU.
MEM_FRACTION = 0.5
# A plain function allocates its result and temporaries itself: budget that
# many chunk-sized arrays for it.
FUNCTION_TEMPS = 4
DEFAULT_THREADS = 256
DEFAULT_STREAMS = 2


class GPUMemoryError(MemoryError):
    """A chunk that cannot fit in the device's free memory."""


# -- fork guard ----------------------------------------------------------------
_cuda_pid = None          # pid of the process in which this module touched CUDA


def _mark_cuda_used():
    global _cuda_pid
    if _cuda_pid is None:
        _cuda_pid = os.getpid()


def _check_not_forked():
    if _cuda_pid is not None and _cuda_pid != os.getpid():
        raise RuntimeError(
            "pmaprt: CUDA was initialized in process %d, and this process (%d) is a fork "
            "of it: CUDA cannot be used in a forked child. Start workers with spawn "
            "(pmaprt's own workers are spawned), or map on the GPU in the parent."
            % (_cuda_pid, os.getpid()))


# -- what fn is ----------------------------------------------------------------
def kernel_kind(fn):
    """'numba', 'elementwise', 'raw' or 'function' (a plain callable)."""
    t = type(fn)
    mod = t.__module__ or ""
    if mod.startswith("numba") and ".cuda" in mod and hasattr(fn, "__getitem__"):
        return "numba"
    cp = sys.modules.get("cupy")      # a CuPy kernel means CuPy is imported already
    if cp is not None:
        if isinstance(fn, cp.ElementwiseKernel):
            return "elementwise"
        if isinstance(fn, cp.RawKernel):
            return "raw"
    if callable(fn):
        return "function"
    raise TypeError("pmaprt: a device map needs a numba.cuda kernel, a CuPy ElementwiseKernel "
                    "or RawKernel, or a function over CuPy arrays; got %r" % (fn,))


def launch_config(n, launch=None):
    """(blocks, threads) covering n rows: launch None (DEFAULT_THREADS per block),
    an int (threads per block) or a (blocks, threads) pair (taken as given)."""
    if launch is None:
        threads = DEFAULT_THREADS
    elif isinstance(launch, (tuple, list)) and len(launch) == 2:
        blocks, threads = int(launch[0]), int(launch[1])
        if blocks < 1 or threads < 1:
            raise ValueError("pmaprt: launch=(blocks, threads) must be positive, got %r" % (launch,))
        return blocks, threads
    elif isinstance(launch, int) and not isinstance(launch, bool):
        threads = launch
    else:
        raise TypeError("pmaprt: launch= takes threads per block (int) or (blocks, threads), "
                        "not %r" % (launch,))
    if not 1 <= threads <= 1024:
        raise ValueError("pmaprt: threads per block must be in 1..1024 (CUDA's limit), got %d"
                         % threads)
    return max(1, -(-n // threads)), threads


def plan_chunk(rows, in_row_bytes, out_row_bytes, free_bytes, streams, chunksize=None,
               temps=1, device=0):
    """Rows per chunk: chunksize, or CHUNK_BYTES of input, bounded by free memory.

    free_bytes None: unknown (no bound). Raises GPUMemoryError when an explicit
    chunksize, or a single row, does not fit.
    """
    per_row = max(1, in_row_bytes + out_row_bytes * temps) * streams
    limit = None
    if free_bytes is not None and math.isfinite(free_bytes):
        limit = int(free_bytes * MEM_FRACTION) // per_row
        if limit < 1:
            raise GPUMemoryError(
                "pmaprt: one row needs %d bytes on GPU %d (%d streams) but only %d of its %d "
                "free bytes may be used" % (per_row, device, streams, int(free_bytes * MEM_FRACTION),
                                            int(free_bytes)))
    if chunksize is not None:
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError("pmaprt: chunksize must be a positive int, got %r" % (chunksize,))
        if limit is not None and chunksize > limit:
            raise GPUMemoryError(
                "pmaprt: chunksize=%d rows needs %d bytes on GPU %d (%d streams x input and "
                "output), more than %.0f%% of its %d free bytes; use chunksize <= %d or leave it "
                "to pmaprt" % (chunksize, chunksize * per_row, device, streams,
                               MEM_FRACTION * 100, int(free_bytes), limit))
        return max(1, min(chunksize, rows))
    c = max(1, CHUNK_BYTES // max(1, in_row_bytes))
    if limit is not None:
        c = min(c, limit)
    return max(1, min(c, rows))


# -- array libraries -------------------------------------------------------------
class _CupyEngine:
    name = "cupy"

    def __init__(self):
        import cupy
        import cupyx

        self.cp, self.cpx = cupy, cupyx

    def device_count(self):
        try:
            return self.cp.cuda.runtime.getDeviceCount()
        except self.cp.cuda.runtime.CUDARuntimeError:
            return 0

    def device(self, i):
        return self.cp.cuda.Device(i)

    def free_memory(self, i):
        with self.cp.cuda.Device(i):
            free, _total = self.cp.cuda.runtime.memGetInfo()
            return free + self.cp.get_default_memory_pool().free_bytes()

    def stream(self):
        return self.cp.cuda.Stream(non_blocking=True)

    def pinned(self, shape, dtype):
        return self.cpx.empty_pinned(shape, dtype)

    def empty(self, shape, dtype, stream):
        with stream:
            return self.cp.empty(shape, dtype)

    def h2d(self, dst, src, stream):
        rt = self.cp.cuda.runtime
        rt.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes, rt.memcpyHostToDevice, stream.ptr)

    def d2h(self, dst, src, stream):
        rt = self.cp.cuda.runtime
        rt.memcpyAsync(dst.ctypes.data, src.data.ptr, src.nbytes, rt.memcpyDeviceToHost, stream.ptr)

    def register(self, arrays):
        """Page-lock the host arrays in place (cudaHostRegister, portable to every
        device) so copies DMA from them directly; returns what to unregister."""
        rt, done, seen = self.cp.cuda.runtime, [], set()
        try:
            for a in arrays:
                if a is None or a.nbytes == 0 or a.ctypes.data in seen:
                    continue
                rt.hostRegister(a.ctypes.data, a.nbytes, 1)     # cudaHostRegisterPortable
                seen.add(a.ctypes.data)
                done.append(a.ctypes.data)
        except Exception:
            self.unregister(done)
            raise
        return done

    def unregister(self, ptrs):
        for p in ptrs:
            try:
                self.cp.cuda.runtime.hostUnregister(p)
            except Exception:
                pass

    def after_caller(self, stream):
        """stream waits for the work already queued on the caller's current stream."""
        stream.wait_event(self.cp.cuda.get_current_stream().record())

    def record(self, stream):
        return stream.record()

    def synchronize(self, event):
        event.synchronize()

    def is_device_array(self, a):
        return isinstance(a, self.cp.ndarray)

    def device_of(self, a):
        return a.device.id

    def copy_into(self, dst, src, stream):
        with stream:
            dst[...] = src

    def launch(self, kind, fn, x, out, stream, launch):
        if kind == "numba":
            from numba import cuda

            blocks, threads = launch_config(len(x), launch)
            with cuda.gpus[x.device.id]:
                # sync=False: no host wait on the stream the arrays were exported
                # under; the launch is ordered on `stream` with the copies
                xa, oa = cuda.as_cuda_array(x, sync=False), cuda.as_cuda_array(out, sync=False)
                fn[blocks, threads, cuda.external_stream(stream.ptr)](xa, oa)
        elif kind == "elementwise":
            with stream:
                fn(x, out)
        elif kind == "raw":
            blocks, threads = launch_config(x.size, launch)
            with stream:
                fn((blocks,), (threads,), (x, out, np.int64(x.size)))
        else:
            with stream:
                return self.cp.ascontiguousarray(self.cp.asarray(fn(x)))
        return out

    def astype(self, r, dtype, stream):
        with stream:
            return r.astype(dtype, copy=False)


_SIM_LOCK = threading.Lock()


class _NumbaEngine:
    """numba.cuda's own streams, pinned arrays and copies (numba kernels only)."""
    name = "numba"

    def __init__(self):
        from numba import cuda

        self.cuda = cuda
        from numba import config

        self.simulated = bool(config.ENABLE_CUDASIM)

    def device_count(self):
        try:
            return len(self.cuda.gpus) if self.cuda.is_available() else 0
        except Exception:
            return 0

    def device(self, i):
        return self.cuda.gpus[i]

    def free_memory(self, i):
        with self.cuda.gpus[i]:
            free, _total = self.cuda.current_context().get_memory_info()
            return free

    def stream(self):
        return self.cuda.stream()

    def pinned(self, shape, dtype):
        return self.cuda.pinned_array(shape, dtype=dtype)

    def empty(self, shape, dtype, stream):
        return self.cuda.device_array(shape, dtype=dtype, stream=stream)

    def h2d(self, dst, src, stream):
        dst.copy_to_device(src, stream=stream)

    def d2h(self, dst, src, stream):
        src.copy_to_host(dst, stream=stream)

    def record(self, stream):
        ev = self.cuda.event()
        ev.record(stream)
        return ev

    def synchronize(self, event):
        event.synchronize()

    def is_device_array(self, a):
        return _is_device_array(a) or type(a).__name__ in ("DeviceNDArray", "FakeCUDAArray")

    def device_of(self, a):
        try:
            return a.gpu_data.context.device.id
        except AttributeError:      # the simulator's arrays: one device
            return 0

    def copy_into(self, dst, src, stream):
        dst.copy_to_device(src, stream=stream)

    def after_caller(self, stream):
        self.cuda.synchronize()

    def unregister(self, ptrs):
        pass

    def launch(self, kind, fn, x, out, stream, launch):
        if kind != "numba":
            raise TypeError("pmaprt: without CuPy only numba.cuda kernels can run on the GPU "
                            "(pip install 'pmaprt[gpu]' for CuPy kernels and functions)")
        blocks, threads = launch_config(len(x), launch)
        if self.simulated:      # the simulator runs one kernel at a time, process-wide
            with _SIM_LOCK:
                fn[blocks, threads, stream](x, out)
        else:
            fn[blocks, threads, stream](x, out)
        return out


def _engine_for(kind, arr):
    cp_loaded = "cupy" in sys.modules
    if kind != "numba" or cp_loaded:
        try:
            return _CupyEngine()
        except ImportError:
            if kind != "numba":
                raise RuntimeError("pmaprt: CuPy is not installed; device maps of CuPy kernels "
                                   "and functions need it: pip install 'pmaprt[gpu]'") from None
    try:
        return _NumbaEngine()
    except ImportError:
        raise RuntimeError("pmaprt: neither CuPy nor numba.cuda can be imported; "
                           "pip install 'pmaprt[gpu]'") from None


# -- host copies ---------------------------------------------------------------------
# One thread copies pageable memory at about 5-10 GB/s, well under a pinned
# PCIe/NVLink-C2C copy (54 GB/s on the H100 host): copies larger than
# COPY_SPLIT_BYTES are split over COPY_THREADS threads (numpy releases the GIL
# while it copies).
COPY_SPLIT_BYTES = 8 << 20
COPY_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))
_copy_pool = None
_copy_pool_lock = threading.Lock()


def host_copy(dst, src):
    """np.copyto(dst, src) for C-contiguous arrays, in parallel when large."""
    global _copy_pool
    n = len(src)
    if src.nbytes < COPY_SPLIT_BYTES or COPY_THREADS < 2 or n < 2:
        np.copyto(dst, src)
        return
    with _copy_pool_lock:
        if _copy_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _copy_pool = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="pmaprt-copy")
    step = -(-n // COPY_THREADS)
    futs = [_copy_pool.submit(np.copyto, dst[lo:lo + step], src[lo:lo + step])
            for lo in range(step, n, step)]
    np.copyto(dst[:step], src[:step])
    for f in futs:
        f.result()


# -- the map ------------------------------------------------------------------------
_warned = set()
_warn_lock = threading.Lock()


def _say_once(key, msg):
    """warnings.warn(msg) the first time key is seen in this process."""
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _gpu_available():
    """(True, None) or (False, why): NVML first (creates no CUDA context)."""
    from ._devices import devices

    d = devices()
    if d.gpu_count:
        return True, None
    if d.reason and "not installed" in d.reason:    # no NVML bindings: ask CUDA itself
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                return True, None
        except Exception:
            pass
    return False, d.reason or "no GPU"


def device_map(fn, iterables, device="gpu", chunksize=None, workers=None, out=None,
               devices=None, launch=None, streams=DEFAULT_STREAMS, dtype=None, register=False,
               **unknown):
    """pmap(fn, arr, device=...): see the module docstring."""
    if unknown:
        raise TypeError("pmaprt: option(s) %s do not apply to a device map (device=%r); its "
                        "options are out=, devices=, launch=, streams=, dtype=, register=, chunksize="
                        % (", ".join(sorted(unknown)), device))
    if device not in ("gpu", "cuda", "auto"):
        raise ValueError("pmaprt: device must be 'gpu', 'auto' or 'cpu', not %r" % (device,))
    if len(iterables) != 1:
        raise TypeError("pmaprt: a device map takes one array (rows are chunked), got %d iterables"
                        % len(iterables))
    arr = iterables[0]
    kind = kernel_kind(fn)
    if device == "auto":
        if kind == "function" and not _is_device_array(arr):
            _say_once("auto-function", "pmaprt: device='auto' ran %s on the CPU pool: it is not a "
                      "GPU kernel (pass device='gpu' to run a function over CuPy arrays on the GPU)"
                      % getattr(fn, "__name__", "fn"))
            return cpu_chunk_map(fn, arr, out=out, chunksize=chunksize, workers=workers)
        ok, why = _gpu_available()
        if not ok:
            if kind != "function":
                raise RuntimeError("pmaprt: device='auto' has no GPU (%s), and %s is a %s kernel "
                                   "that cannot run on the CPU" % (why, getattr(fn, "__name__", fn), kind))
            _say_once("auto-nogpu", "pmaprt: device='auto' found no GPU (%s); running on the CPU "
                      "pool instead" % why)
            return cpu_chunk_map(fn, arr, out=out, chunksize=chunksize, workers=workers)
    if workers is not None:
        raise ValueError("pmaprt: workers= counts CPU workers; pick GPUs with devices=[...]")
    _check_not_forked()
    if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
        raise ValueError("pmaprt: streams must be a positive int, got %r" % (streams,))
    eng = _engine_for(kind, arr)
    _mark_cuda_used()
    if eng.is_device_array(arr):
        return _device_input(eng, kind, fn, arr, out, chunksize, launch, dtype, devices)
    if register and eng.name != "cupy":
        raise ValueError("pmaprt: register=True needs CuPy (cudaHostRegister)")
    return _host_input(eng, kind, fn, arr, out, chunksize, launch, dtype, devices, streams,
                       register)


def _is_device_array(a):
    return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)


def _pick_devices(eng, devices):
    n = eng.device_count()
    if n == 0:
        raise RuntimeError("pmaprt: device='gpu' but no CUDA device is visible (%s)"
                           % (_gpu_available()[1] or "CUDA reports none"))
    if devices is None:
        return list(range(n))
    devs = list(devices)
    if not devs or any(not isinstance(d, int) or not 0 <= d < n for d in devs):
        raise ValueError("pmaprt: devices= must list CUDA ordinals in 0..%d, got %r" % (n - 1, devices))
    return devs


def _out_spec(kind, arr, dtype, out):
    if out is not None:
        if out.shape[:1] != arr.shape[:1]:
            raise ValueError("pmaprt: out= has %d rows, the input %d" % (out.shape[0], arr.shape[0]))
        if kind != "function" and out.shape != arr.shape:
            raise ValueError("pmaprt: a kernel writes one output per input element: out= has "
                             "shape %s, the input %s" % (out.shape, arr.shape))
        return out.shape, out.dtype
    if kind == "function":
        return None, None           # known from the first chunk's result
    return arr.shape, np.dtype(dtype) if dtype is not None else arr.dtype


def _host_input(eng, kind, fn, arr, out, chunksize, launch, dtype, devices, streams,
                register=False):
    arr = np.ascontiguousarray(arr)
    if arr.ndim == 0:
        raise TypeError("pmaprt: a device map needs an array with at least one dimension")
    if out is not None and not isinstance(out, np.ndarray):
        raise TypeError("pmaprt: for a host (NumPy) input, out= must be a NumPy array, not %s"
                        % type(out).__name__)
    shape, odt = _out_spec(kind, arr, dtype, out)
    rows = arr.shape[0]
    if out is None and shape is not None:
        out = np.empty(shape, odt)
    if rows == 0:
        return out if out is not None else np.empty(arr.shape, dtype or arr.dtype)
    devs = _pick_devices(eng, devices)
    in_row = arr[0].nbytes if arr.ndim > 1 else arr.itemsize
    out_row = (int(np.prod(shape[1:], dtype=np.int64)) * odt.itemsize) if shape is not None else in_row
    temps = FUNCTION_TEMPS if kind == "function" else 1
    chunk = min(plan_chunk(rows, in_row, out_row, eng.free_memory(d), streams, chunksize,
                           temps=temps, device=d) for d in sorted(set(devs)))
    if register:
        if out is None:
            raise ValueError("pmaprt: register=True with a plain function needs out= (the result "
                             "is registered before the map starts)")
        if not out.flags.c_contiguous:
            raise ValueError("pmaprt: register=True needs a C-contiguous out=")
    state = _HostMap(eng, kind, fn, arr, out, chunk, launch, odt, streams, direct=register)
    regs = eng.register([arr, out]) if register else []
    try:
        threads = [threading.Thread(target=state.worker, args=(d,), name="pmaprt-gpu%d" % d,
                                    daemon=True) for d in devs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        eng.unregister(regs)
    if state.error is not None:
        raise state.error
    return state.out


class _Slot:
    __slots__ = ("stream", "pin_in", "pin_out", "d_in", "d_out", "pending")


class _HostMap:
    """Shared state of a host-input map: the next chunk to claim, the result."""

    def __init__(self, eng, kind, fn, arr, out, chunk, launch, odt, streams, direct=False):
        self.eng, self.kind, self.fn, self.arr, self.out = eng, kind, fn, arr, out
        self.direct = direct
        self.chunk, self.launch, self.odt, self.nstreams = chunk, launch, odt, streams
        self.next = 0
        self.lock = threading.Lock()
        self.error = None
        self.chunks_by_device = {}

    def claim(self):
        with self.lock:
            if self.error is not None or self.next >= len(self.arr):
                return None
            lo = self.next
            self.next = hi = min(lo + self.chunk, len(self.arr))
            return lo, hi

    def _result_for(self, r, m):
        """out, created from the first function result (shape and dtype per row)."""
        with self.lock:
            if self.out is None:
                if r.shape[:1] != (m,):
                    raise ValueError("pmaprt: fn must return one row per input row: got shape %s "
                                     "for %d rows" % (tuple(r.shape), m))
                self.out = np.empty((len(self.arr),) + tuple(r.shape[1:]), r.dtype)
            return self.out

    def worker(self, dev):
        eng = self.eng
        slots = []
        try:
            with eng.device(dev):
                for _ in range(self.nstreams):
                    s = _Slot()
                    s.stream = eng.stream()
                    rest = self.arr.shape[1:]
                    s.pin_in = None if self.direct else eng.pinned((self.chunk,) + rest,
                                                                   self.arr.dtype)
                    s.d_in = eng.empty((self.chunk,) + rest, self.arr.dtype, s.stream)
                    if self.kind != "function":
                        oshape = (self.chunk,) + self.out.shape[1:]
                        s.pin_out = None if self.direct else eng.pinned(oshape, self.odt)
                        s.d_out = eng.empty(oshape, self.odt, s.stream)
                    else:
                        s.pin_out = s.d_out = None
                    s.pending = None
                    slots.append(s)
                k = 0
                while True:
                    s = slots[k % self.nstreams]
                    k += 1
                    self._finish(s)
                    span = self.claim()
                    if span is None:
                        break
                    self._start(s, dev, *span)
                for j in range(self.nstreams):
                    self._finish(slots[(k + j) % self.nstreams])
        except BaseException as e:  # noqa: B902 - handed to the caller's thread
            with self.lock:
                if self.error is None:
                    self.error = e
            # copies may still be in flight into buffers about to be released
            for s in slots:
                try:
                    with eng.device(dev):
                        s.stream.synchronize()
                except Exception:
                    pass

    def _start(self, s, dev, lo, hi):
        eng, m = self.eng, hi - lo
        if self.direct:                               # registered: DMA from the caller's rows
            src = self.arr[lo:hi]
        else:
            src = s.pin_in[:m]
            host_copy(src, self.arr[lo:hi])           # pageable -> pinned (host memcpy)
        dst = self.out[lo:hi] if self.direct else None
        d_in = s.d_in[:m]
        eng.h2d(d_in, src, s.stream)
        if self.kind == "function":
            r = eng.launch(self.kind, self.fn, d_in, None, s.stream, self.launch)
            out = self._result_for(r, m)
            if r.shape != (m,) + out.shape[1:]:
                raise ValueError("pmaprt: fn returned shape %s for %d rows; earlier chunks gave "
                                 "rows of shape %s" % (tuple(r.shape), m, out.shape[1:]))
            if not self.direct and (s.pin_out is None or s.pin_out.shape[0] < self.chunk):
                s.pin_out = eng.pinned((self.chunk,) + out.shape[1:], out.dtype)
            r = eng.astype(r, out.dtype, stream=s.stream)
            s.d_out = r
            eng.d2h(dst if self.direct else s.pin_out[:m], r, s.stream)
        else:
            d_out = s.d_out[:m]
            eng.launch(self.kind, self.fn, d_in, d_out, s.stream, self.launch)
            eng.d2h(dst if self.direct else s.pin_out[:m], d_out, s.stream)
        s.pending = (lo, hi, eng.record(s.stream))
        with self.lock:
            self.chunks_by_device[dev] = self.chunks_by_device.get(dev, 0) + 1

    def _finish(self, s):
        if s.pending is None:
            return
        lo, hi, ev = s.pending
        s.pending = None
        self.eng.synchronize(ev)
        if not self.direct:
            host_copy(self.out[lo:hi], s.pin_out[:hi - lo])


def _device_input(eng, kind, fn, arr, out, chunksize, launch, dtype, devices):
    dev = eng.device_of(arr)
    if devices is not None and list(devices) != [dev]:
        raise ValueError("pmaprt: a device array stays on its device (GPU %d); devices=%r would "
                         "need peer copies: move the array first, or pass host data" % (dev, devices))
    if out is not None and not eng.is_device_array(out):
        raise TypeError("pmaprt: for a device input, out= must be a device array on GPU %d" % dev)
    shape, odt = _out_spec(kind, arr, dtype, out)
    rows = len(arr)
    with eng.device(dev):
        stream = eng.stream()
        eng.after_caller(stream)        # the input may still be being written
        if out is None and shape is not None:
            out = eng.empty(shape, odt, stream)
        if rows == 0:
            return out if out is not None else eng.empty(arr.shape, arr.dtype, stream)
        in_row = arr[0].nbytes if arr.ndim > 1 else arr.itemsize
        out_row = (int(np.prod(shape[1:], dtype=np.int64)) * odt.itemsize) if shape is not None else in_row
        if kind == "function":
            chunk = plan_chunk(rows, in_row, out_row, eng.free_memory(dev), 1, chunksize,
                               temps=FUNCTION_TEMPS, device=dev)
        else:   # no staging: the kernel reads the input where it is, in one launch by default
            chunk = rows if chunksize is None else plan_chunk(rows, in_row, out_row, None, 1, chunksize)
        for lo in range(0, rows, chunk):
            hi = min(rows, lo + chunk)
            if kind == "function":
                r = eng.launch(kind, fn, arr[lo:hi], None, stream, launch)
                if out is None:
                    if r.shape[:1] != (hi - lo,):
                        raise ValueError("pmaprt: fn must return one row per input row: got shape "
                                         "%s for %d rows" % (tuple(r.shape), hi - lo))
                    out = eng.empty((rows,) + tuple(r.shape[1:]), r.dtype, stream)
                eng.copy_into(out[lo:hi], r, stream)
            else:
                eng.launch(kind, fn, arr[lo:hi], out[lo:hi], stream, launch)
        eng.synchronize(eng.record(stream))
    return out


def cpu_chunk_map(fn, arr, out=None, chunksize=None, workers=None):
    """fn over row chunks of arr on the CPU pool, concatenated (device='auto' fallback)."""
    from ._api import pmap
    from ._options import default_workers

    arr = np.asarray(arr)
    rows = len(arr)
    if chunksize is None:
        parts = 4 * (workers or default_workers())
        chunksize = max(1, -(-rows // parts))
    pieces = list(pmap(fn, (arr[lo:lo + chunksize] for lo in range(0, rows, chunksize)),
                       workers=workers))
    pieces = [np.asarray(p) for p in pieces]
    got = sum(len(p) if p.ndim else 1 for p in pieces)
    if any(p.ndim == 0 for p in pieces) or got != rows:
        raise ValueError("pmaprt: fn must return one row per input row: got %d rows for %d"
                         % (got, rows))
    res = np.concatenate(pieces) if pieces else np.empty_like(arr)
    if out is not None:
        out[...] = res
        return out
    return res


# -- all-reduce --------------------------------------------------------------------
def allreduce(x, op="sum", inplace=False, method="auto"):
    """All-reduce over ranks: x is a sequence of arrays, one per rank (CuPy arrays on
    one or more GPUs; several ranks may share a GPU). Returns a list with every rank's
    result on that rank's device. op: "sum", "mean", "min" or "max".

    method "auto": NCCL (cupy.cuda.nccl) when each rank has its own GPU and NCCL
    is available, else the ring over peer copies ("ring"). NumPy arrays run the
    same ring on the host.
    """
    check_op(op)
    bufs = list(x)
    check_buffers(bufs)
    if method not in ("auto", "ring", "nccl"):
        raise ValueError("pmaprt: method must be 'auto', 'ring' or 'nccl', not %r" % (method,))
    if isinstance(bufs[0], np.ndarray):
        return _host_allreduce(bufs, op, inplace)
    _check_not_forked()
    import cupy as cp

    _mark_cuda_used()
    devs = [b.device.id for b in bufs]
    if op == "mean" and bufs[0].dtype.kind not in "fc":
        if inplace:
            raise TypeError("pmaprt: an in-place mean needs a floating dtype, not %s" % bufs[0].dtype)
        out = allreduce(bufs, "sum", False, method)
        res = []
        for o in out:
            with cp.cuda.Device(o.device.id):
                res.append(o / len(bufs))
        return res
    if not inplace:
        copies = []
        for b, d in zip(bufs, devs):
            with cp.cuda.Device(d):
                copies.append(cp.ascontiguousarray(b).copy())
        bufs = copies
    use_nccl = method == "nccl" or (method == "auto" and len(set(devs)) == len(devs) > 1
                                    and _nccl() is not None)
    if use_nccl:
        _nccl_allreduce(bufs, devs, op)
    else:
        ring_allreduce(bufs, op, xp=cp, links=CupyLinks(devs))
    return bufs


def _host_allreduce(bufs, op, inplace):
    if not inplace:
        if op == "mean" and bufs[0].dtype.kind not in "fc":
            bufs = [b.astype(np.float64) for b in bufs]
        else:
            bufs = [np.array(b, order="C") for b in bufs]
    return ring_allreduce(bufs, op, xp=np)


def _nccl():
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None


def _nccl_allreduce(bufs, devs, op):
    import cupy as cp

    nccl = _nccl()
    if nccl is None:
        raise RuntimeError("pmaprt: method='nccl' but cupy.cuda.nccl is not available")
    if len(set(devs)) != len(devs):
        raise ValueError("pmaprt: NCCL needs one rank per GPU; ranks share GPUs %s (use method='ring')"
                         % devs)
    types = {np.dtype(k): getattr(nccl, v) for k, v in (
        ("float16", "NCCL_FLOAT16"), ("float32", "NCCL_FLOAT32"), ("float64", "NCCL_FLOAT64"),
        ("int32", "NCCL_INT32"), ("int64", "NCCL_INT64"), ("uint8", "NCCL_UINT8"),
        ("int8", "NCCL_INT8"), ("uint32", "NCCL_UINT32"), ("uint64", "NCCL_UINT64"))
        if hasattr(nccl, v)}
    dt = bufs[0].dtype
    if dt not in types:
        raise TypeError("pmaprt: NCCL has no type for %s" % dt)
    red = {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM, "min": nccl.NCCL_MIN,
           "max": nccl.NCCL_MAX}[op]
    comm = nccl.NcclCommunicator.initAll(len(devs), devs)
    try:
        streams = []
        for d in devs:
            with cp.cuda.Device(d):
                cp.cuda.Device(d).synchronize()
                streams.append(cp.cuda.Stream(non_blocking=True))
        comm.groupStart()
        for r, (b, d) in enumerate(zip(bufs, devs)):
            comm.setCurrentComm(r)
            with cp.cuda.Device(d):
                comm.allReduce(b.data.ptr, b.data.ptr, b.size, types[dt], red, streams[r].ptr)
        comm.groupEnd()
        for b, d, s in zip(bufs, devs, streams):
            with cp.cuda.Device(d):
                s.synchronize()
                if op == "mean":
                    b /= len(bufs)
    finally:
        comm.destroy()
