"""pmap on GPUs: ``pmap(fn, arr, device="gpu" | "auto")``, the GPU all-reduce, and
``devices()``, what this machine offers.

The modules, from the bottom up (each imports only those above it in this list,
and the ground floor of pmaprt; none imports CuPy, Numba or pynvml at module
level, so ``import pmaprt``, which loads ``discovery``, never imports them):

    discovery   devices(): CPU cores and memory, GPUs through NVML
    forkguard   CUDA used in this process, refused in a fork of it
    ring        the ring all-reduce schedule over any array module
    collective  allreduce(): NCCL, or the ring over peer copies or host arrays
    engines     what fn is; CuPy and Numba behind one small engine interface
    pipeline    host arrays through pinned staging buffers, double-buffered
    dispatch    device_map(): chunking one array over the GPUs' worker threads

A device map:

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
- A host array goes through the double-buffered pipeline of ``pipeline``; a
  device array (CuPy / Numba) stays on its device: kernels run on slices of
  it on one stream, into a device result; no host round trip.
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
  child. A process forked after this package initialized CUDA refuses to use
  it (CUDA's state does not survive fork) and says so.
- Libraries (``pip install 'pmaprt[gpu]'``): chosen by fn and the input, never
  by what is imported: a numba.cuda kernel over host or Numba device arrays
  runs on Numba's own streams and pinned arrays (and so under Numba's CUDA
  simulator); CuPy kernels and functions, CuPy inputs and ``register=True``
  run on CuPy. ``engine="cupy" | "numba"`` chooses.
- Checks before any work: a scalar is refused; a device ``out=`` must be on
  the input's GPU; a RawKernel's input and ``out=`` must be C-contiguous (it
  sees bare pointers); a function's result must have one row per input row
  in every chunk.
"""
from .collective import allreduce
from .discovery import devices
from .dispatch import GPUMemoryError, device_map
from .engines import kernel_kind
from .._api import register_device_map

register_device_map(device_map)   # pmap(device=...) reaches it through _api

__all__ = ["device_map", "allreduce", "GPUMemoryError", "kernel_kind", "devices"]
