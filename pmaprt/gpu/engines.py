"""The kernel engines: what a device map's fn is, and the CUDA library that runs it.

- ``kernel_kind(fn)``: a numba.cuda kernel, a CuPy ``ElementwiseKernel`` or
  ``RawKernel``, or a plain function over CuPy arrays.
- ``launch_config``: the (blocks, threads) grid that covers a chunk's rows.
- An engine is the small interface the dispatch and the pipeline call for
  every CUDA operation (devices, streams, pinned and device buffers, async
  copies, events, launches); two implement it:
  ``CupyEngine`` (every kernel kind; page-locking the caller's arrays) and
  ``NumbaEngine`` (numba.cuda kernels only, on Numba's own streams and pinned
  arrays, and so also under Numba's CUDA simulator).
- ``engine_for(kind, arr, engine)``: chosen by the caller (``engine=``) or by
  the kinds of fn and of the input (``array_kind``), never by which library
  happens to be imported: a numba.cuda kernel over a NumPy or Numba device
  array runs on Numba; a CuPy kernel or function, a CuPy input, or
  ``register=True`` needs CuPy.

CuPy and Numba are imported inside the engines' constructors: importing this
module imports neither.
"""
import sys
import threading

import numpy as np

# Threads per block when the caller gives no launch=: a multiple of the warp
# size (32); smaller blocks leave warps idle, larger ones fit fewer blocks on a
# multiprocessor for a kernel that uses many registers.
DEFAULT_THREADS = 256


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


def is_device_array(a):
    """A device array of any CUDA library (it exports __cuda_array_interface__)."""
    return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)


def array_kind(a):
    """'host' (NumPy or anything NumPy converts), 'cupy', 'numba' (a Numba device
    array, also the simulator's), or 'device' (another library's device array),
    from the array's type, not from what is imported."""
    if isinstance(a, np.ndarray):
        return "host"
    top = (type(a).__module__ or "").split(".")[0]
    if top.startswith("numba") and hasattr(a, "copy_to_host"):
        return "numba"          # the simulator's arrays export no __cuda_array_interface__
    if not is_device_array(a):
        return "host"
    if top == "cupy":
        return "cupy"
    return "numba" if top.startswith("numba") else "device"


# -- array libraries -------------------------------------------------------------
class CupyEngine:
    """CuPy's streams, pinned arrays, raw async copies and events (every kernel kind)."""
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

    def is_c_contiguous(self, a):
        return a.flags.c_contiguous

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


class NumbaEngine:
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
        return array_kind(a) == "numba"

    def is_c_contiguous(self, a):
        return a.is_c_contiguous()

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


ENGINES = ("cupy", "numba")


def engine_name(kind, arr, engine=None, register=False):
    """'cupy' or 'numba': engine= as given, else from fn's kind and the input's
    (see the module docstring). ValueError for a combination no engine runs."""
    akind = array_kind(arr)
    if akind == "device":
        raise TypeError("pmaprt: a device map takes NumPy, CuPy or Numba arrays; %s is another "
                        "library's device array (cupy.asarray(x) wraps it without a copy)"
                        % type(arr).__name__)
    if engine is None:
        engine = "numba" if kind == "numba" and akind != "cupy" and not register else "cupy"
    elif engine not in ENGINES:
        raise ValueError("pmaprt: engine must be 'cupy' or 'numba', not %r" % (engine,))
    if engine == "numba":
        if kind != "numba":
            raise ValueError("pmaprt: engine='numba' runs numba.cuda kernels only; fn is a %s "
                             "(use engine='cupy')" % ("function" if kind == "function"
                                                      else "CuPy %s kernel" % kind))
        if akind == "cupy":
            raise ValueError("pmaprt: engine='numba' cannot take a CuPy array (use engine='cupy')")
        if register:
            raise ValueError("pmaprt: register=True needs CuPy (cudaHostRegister): use "
                             "engine='cupy' or leave engine= unset")
    elif akind == "numba":
        raise ValueError("pmaprt: engine='cupy' cannot take a Numba device array (use "
                         "engine='numba', or cupy.asarray(x) to wrap it)")
    return engine


def engine_for(name):
    """The engine called name ('cupy' or 'numba'); RuntimeError naming what to install."""
    try:
        return CupyEngine() if name == "cupy" else NumbaEngine()
    except ImportError:
        what = ("CuPy is not installed; device maps of CuPy kernels and functions, of CuPy "
                "arrays and with register=True need it" if name == "cupy" else
                "numba.cuda cannot be imported; numba.cuda kernels need it")
        raise RuntimeError("pmaprt: %s: pip install 'pmaprt[gpu]'" % what) from None
