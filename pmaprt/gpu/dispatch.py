"""The dispatch: one array over the GPUs, ``device_map`` (``pmap(fn, arr, device=...)``).

- ``device_map`` checks the options, decides where the map runs (the GPUs, or
  with ``device="auto"`` the CPU pool) and picks the engine for fn's kind.
- A host array is cut into chunks of rows (``plan_chunk``: CHUNK_BYTES of
  input, bounded by each device's free memory), claimed by one worker thread
  per listed device, each running the double-buffered pipeline of
  ``pipeline.py``.
- A device array stays on its device: kernels run on slices of it on one
  stream, into a device result; no host round trip.
- ``cpu_chunk_map`` is the ``device="auto"`` fallback: fn over row chunks on
  the CPU pool, concatenated.
"""
import math
import threading
import warnings

import numpy as np

from .._api import pmap
from .._options import default_workers
from .discovery import devices as discover_devices
from .engines import array_kind, engine_for, engine_name, kernel_kind
from .forkguard import check_not_forked, mark_cuda_used
from .pipeline import HostMap

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
# CUDA streams (so staging slots) per GPU worker: two let one chunk's copies
# overlap the next one's kernel; each more costs another chunk of pinned and
# device memory.
DEFAULT_STREAMS = 2
# device="auto" on the CPU pool: row chunks per CPU worker when the caller gives
# no chunksize; more even out uneven rows, fewer cost less dispatch and concatenation.
CPU_CHUNKS_PER_WORKER = 4


class GPUMemoryError(MemoryError):
    """A chunk that cannot fit in the device's free memory."""


def plan_chunk(rows, in_row_bytes, out_row_bytes, free_bytes, streams, chunksize=None,
               temps=1, device=0, workers=1):
    """Rows per chunk: chunksize, or CHUNK_BYTES of input, bounded by free memory.

    Every one of the device's ``workers`` (a device listed k times has k) holds
    ``streams`` chunks at once. free_bytes None: unknown (no bound). Raises
    GPUMemoryError when an explicit chunksize, or a single row, does not fit.
    """
    per_row = max(1, in_row_bytes + out_row_bytes * temps) * streams * workers
    limit = None
    if free_bytes is not None and math.isfinite(free_bytes):
        limit = int(free_bytes * MEM_FRACTION) // per_row
        if limit < 1:
            raise GPUMemoryError(
                "pmaprt: one row needs %d bytes on GPU %d (%d workers x %d streams) but only %d "
                "of its %d free bytes may be used" % (per_row, device, workers, streams,
                                                      int(free_bytes * MEM_FRACTION), int(free_bytes)))
    if chunksize is not None:
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError("pmaprt: chunksize must be a positive int, got %r" % (chunksize,))
        if limit is not None and chunksize > limit:
            raise GPUMemoryError(
                "pmaprt: chunksize=%d rows needs %d bytes on GPU %d (%d workers x %d streams x "
                "input and output), more than %.0f%% of its %d free bytes; use chunksize <= %d or "
                "leave it to pmaprt" % (chunksize, chunksize * per_row, device, workers, streams,
                                        MEM_FRACTION * 100, int(free_bytes), limit))
        return max(1, min(chunksize, rows))
    c = max(1, CHUNK_BYTES // max(1, in_row_bytes))
    if limit is not None:
        c = min(c, limit)
    return max(1, min(c, rows))


# Keys of the fallback warnings already given in this process: each says once.
_warned = set()
_warn_lock = threading.Lock()


def _say_once(key, msg):
    """warnings.warn(msg) the first time key is seen in this process."""
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def gpu_presence(eng):
    """(True, None) or (False, why): NVML first (it creates no CUDA state); where
    NVML finds none (not installed, failing to start, or no device) CUDA itself
    through the engine, since NVML can be missing where CUDA works."""
    d = discover_devices()
    if d.gpu_count:
        return True, None
    n = eng.device_count()
    mark_cuda_used()                    # asking CUDA initialized it in this process
    if n > 0:
        return True, None
    return False, "%s; %s reports no CUDA device" % (d.reason or "no GPU found by NVML", eng.name)


def _check_array(arr):
    if np.ndim(arr) == 0:
        raise TypeError("pmaprt: a device map needs an array with at least one dimension (rows "
                        "are chunked), not a scalar %r" % (type(arr).__name__,))


def device_map(fn, iterables, device="gpu", chunksize=None, workers=None, out=None,
               devices=None, launch=None, streams=DEFAULT_STREAMS, dtype=None, register=False,
               engine=None, **unknown):
    """pmap(fn, arr, device=...): see the docstring of the pmaprt.gpu package."""
    if unknown:
        raise TypeError("pmaprt: option(s) %s do not apply to a device map (device=%r); its "
                        "options are out=, devices=, launch=, streams=, dtype=, register=, "
                        "engine=, chunksize=" % (", ".join(sorted(unknown)), device))
    if device not in ("gpu", "cuda", "auto"):
        raise ValueError("pmaprt: device must be 'gpu', 'auto' or 'cpu', not %r" % (device,))
    if len(iterables) != 1:
        raise TypeError("pmaprt: a device map takes one array (rows are chunked), got %d iterables"
                        % len(iterables))
    arr = iterables[0]
    _check_array(arr)
    kind = kernel_kind(fn)
    if device == "auto" and kind == "function" and array_kind(arr) == "host":
        _say_once("auto-function", "pmaprt: device='auto' ran %s on the CPU pool: it is not a "
                  "GPU kernel (pass device='gpu' to run a function over CuPy arrays on the GPU)"
                  % getattr(fn, "__name__", "fn"))
        return cpu_chunk_map(fn, arr, out=out, chunksize=chunksize, workers=workers)
    name = engine_name(kind, arr, engine, register)
    if workers is not None:
        raise ValueError("pmaprt: workers= counts CPU workers; pick GPUs with devices=[...]")
    if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
        raise ValueError("pmaprt: streams must be a positive int, got %r" % (streams,))
    check_not_forked()
    eng = engine_for(name)
    if device == "auto":
        ok, why = gpu_presence(eng)
        if not ok:
            if kind != "function":
                raise RuntimeError("pmaprt: device='auto' has no GPU (%s), and %s is a %s kernel "
                                   "that cannot run on the CPU" % (why, getattr(fn, "__name__", fn), kind))
            _say_once("auto-nogpu", "pmaprt: device='auto' found no GPU (%s); running on the CPU "
                      "pool instead" % why)
            return cpu_chunk_map(fn, arr, out=out, chunksize=chunksize, workers=workers)
    mark_cuda_used()
    if eng.is_device_array(arr):
        return _device_input(eng, kind, fn, arr, out, chunksize, launch, dtype, devices)
    return _host_input(eng, kind, fn, arr, out, chunksize, launch, dtype, devices, streams,
                       register)


def _pick_devices(eng, devices):
    n = eng.device_count()
    if n == 0:
        raise RuntimeError("pmaprt: device='gpu' but no CUDA device is visible (%s)"
                           % (gpu_presence(eng)[1]))
    if devices is None:
        return list(range(n))
    devs = list(devices)
    if not devs or any(not isinstance(d, int) or not 0 <= d < n for d in devs):
        raise ValueError("pmaprt: devices= must list CUDA ordinals in 0..%d, got %r" % (n - 1, devices))
    return devs


def _out_spec(kind, arr, dtype, out):
    if out is not None:
        if np.ndim(out) == 0 or out.shape[:1] != arr.shape[:1]:
            raise ValueError("pmaprt: out= has %s rows, the input %d"
                             % (out.shape[0] if np.ndim(out) else "no", arr.shape[0]))
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
                           temps=temps, device=d, workers=devs.count(d))
                for d in sorted(set(devs)))
    if register:
        if out is None:
            raise ValueError("pmaprt: register=True with a plain function needs out= (the result "
                             "is registered before the map starts)")
        if not out.flags.c_contiguous:
            raise ValueError("pmaprt: register=True needs a C-contiguous out=")
    state = HostMap(eng, kind, fn, arr, out, chunk, launch, odt, streams, direct=register)
    regs = eng.register([arr, out]) if register else []
    try:
        _run_workers(state, devs)
    finally:
        eng.unregister(regs)        # every worker has ended: no copy is in flight
    if state.error is not None:
        raise state.error
    return state.out


def _run_workers(state, devs):
    """One thread per listed device running state.worker; returns when all have
    ended. Interrupted (Ctrl-C) while waiting: the workers stop claiming chunks,
    and this waits for them still, since their copies in flight write into the
    caller's out= and into memory about to be unregistered. That wait is bounded
    by the chunks in flight (streams per worker); a second Ctrl-C does not cut it."""
    threads = [threading.Thread(target=state.worker, args=(d,), name="pmaprt-gpu%d" % d,
                                daemon=True) for d in devs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException as e:
        state.cancel(e)
        for t in threads:
            while t.is_alive():
                try:
                    t.join()
                except KeyboardInterrupt:
                    pass
        raise


def _device_input(eng, kind, fn, arr, out, chunksize, launch, dtype, devices):
    dev = eng.device_of(arr)
    if devices is not None and list(devices) != [dev]:
        raise ValueError("pmaprt: a device array stays on its device (GPU %d); devices=%r would "
                         "need peer copies: move the array first, or pass host data" % (dev, devices))
    if out is not None:
        if not eng.is_device_array(out):
            raise TypeError("pmaprt: for a device input, out= must be a device array of the same "
                            "library on GPU %d, not %s" % (dev, type(out).__name__))
        if eng.device_of(out) != dev:
            raise ValueError("pmaprt: out= is on GPU %d, the input on GPU %d: a device map writes "
                             "on the input's device" % (eng.device_of(out), dev))
    if kind == "raw":       # a RawKernel sees a bare pointer: strides would be ignored
        for what, a in (("input", arr), ("out=", out)):
            if a is not None and not eng.is_c_contiguous(a):
                raise ValueError("pmaprt: a RawKernel reads and writes through bare pointers, so "
                                 "its %s must be C-contiguous (cupy.ascontiguousarray(x) makes "
                                 "one)" % what)
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
                    if r.ndim == 0 or r.shape[0] != hi - lo:
                        raise ValueError("pmaprt: fn must return one row per input row: got shape "
                                         "%s for %d rows" % (tuple(r.shape), hi - lo))
                    out = eng.empty((rows,) + tuple(r.shape[1:]), r.dtype, stream)
                if tuple(r.shape) != (hi - lo,) + tuple(out.shape[1:]):
                    raise ValueError("pmaprt: fn returned shape %s for rows %d:%d; the result "
                                     "needs %s (one row per input row)"
                                     % (tuple(r.shape), lo, hi, (hi - lo,) + tuple(out.shape[1:])))
                eng.copy_into(out[lo:hi], r, stream)
            else:
                eng.launch(kind, fn, arr[lo:hi], out[lo:hi], stream, launch)
        eng.synchronize(eng.record(stream))
    return out


def cpu_chunk_map(fn, arr, out=None, chunksize=None, workers=None):
    """fn over row chunks of arr on the CPU pool, concatenated (device='auto' fallback)."""
    arr = np.asarray(arr)
    rows = len(arr)
    if chunksize is None:
        parts = CPU_CHUNKS_PER_WORKER * (workers or default_workers())
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


