"""What this machine offers: CPU cores and memory (psutil), GPUs (NVML).

    >>> d = pmaprt.devices()
    >>> d.cpu.cores_available, [g.name for g in d.gpus], d.reason

- GPUs come from NVML through nvidia-ml-py's ``pynvml`` (the ``gpu`` extra).
  NVML never creates a CUDA context, so discovery is safe in any process,
  forked or not, and costs no device memory.
- Memory is in bytes (NVML reports bytes); utilization is NVML's percentage
  of the last sample period (0-100), None where the device does not report it
  (NVML_ERROR_NOT_SUPPORTED, for example on MIG instances).
- ``CUDA_VISIBLE_DEVICES`` is honoured: NVML sees every GPU of the machine,
  CUDA only the listed ones, renumbered from 0. ``GPU.index`` is the CUDA
  ordinal (what ``cupy.cuda.Device(i)`` and ``numba.cuda.gpus[i]`` take),
  ``GPU.nvml_index`` NVML's own.
- Never raises: without pynvml, without a driver, or without a GPU, ``gpus`` is
  empty and ``reason`` says why. A GPU that fails a query (NVMLError, a lost
  GPU) is listed with ``error`` set and its unknown fields None.
"""
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a hard dependency
    psutil = None

from .._options import default_workers

__all__ = ["devices", "Devices", "CPUInfo", "GPUInfo"]


@dataclass(frozen=True)
class CPUInfo:
    cores_logical: Optional[int]
    cores_physical: Optional[int]
    cores_available: Optional[int]      # sched_getaffinity: what this process may use
    memory_total: Optional[int]         # bytes
    memory_available: Optional[int]     # bytes


@dataclass(frozen=True)
class GPUInfo:
    index: int                          # CUDA ordinal (after CUDA_VISIBLE_DEVICES)
    nvml_index: int
    name: Optional[str]
    uuid: Optional[str]
    memory_total: Optional[int]         # bytes
    memory_free: Optional[int]          # bytes
    memory_used: Optional[int]          # bytes
    utilization_gpu: Optional[int]      # percent of time a kernel ran, last sample period
    utilization_memory: Optional[int]   # percent of time memory was read or written
    error: Optional[str] = None
    kind: str = "gpu"


@dataclass(frozen=True)
class Devices:
    cpu: CPUInfo
    gpus: Tuple[GPUInfo, ...] = field(default_factory=tuple)
    reason: Optional[str] = None        # why gpus is empty (or a device failed)

    @property
    def gpu_count(self):
        return sum(1 for g in self.gpus if g.error is None)


def _cpu():
    avail = default_workers()
    total = free = phys = None
    if psutil is not None:
        try:
            vm = psutil.virtual_memory()
            total, free = int(vm.total), int(vm.available)
            phys = psutil.cpu_count(logical=False)
        except Exception:
            pass
    return CPUInfo(os.cpu_count(), phys, avail, total, free)


def _text(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return None if v is None else str(v)


def visible_order(env, nvml_count, uuids):
    """NVML indices CUDA will see, in CUDA's order, from CUDA_VISIBLE_DEVICES.

    env None: all devices. Entries are indices or UUID prefixes ("GPU-..."); as
    CUDA does, the list stops at the first entry that matches no device, and
    an empty value hides every device.
    """
    if env is None:
        return list(range(nvml_count))
    out = []
    for tok in env.split(","):
        tok = tok.strip()
        if not tok:
            break
        if tok.lstrip("-").isdigit():
            i = int(tok)
            if not 0 <= i < nvml_count:
                break
        else:
            hits = [i for i, u in enumerate(uuids) if u and u.startswith(tok)]
            if len(hits) != 1:
                break
            i = hits[0]
        if i in out:
            break
        out.append(i)
    return out


def _nvml_call(nv, fn, *args):
    """fn(*args), or (None, message) on NVMLError; (value, None) on success."""
    try:
        return getattr(nv, fn)(*args), None
    except nv.NVMLError as e:
        return None, "%s: %s" % (fn, e)


def _not_supported(nv, err_value):
    return err_value == getattr(nv, "NVML_ERROR_NOT_SUPPORTED", 3)


def _gpus(nv):
    """GPUInfo per visible device, and a reason string (or None)."""
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        return (), "NVML could not start (no NVIDIA driver?): %s" % (e,)
    try:
        count, err = _nvml_call(nv, "nvmlDeviceGetCount")
        if err:
            return (), err
        handles, uuids, herr = [], [], []
        for i in range(count):
            h, e = _nvml_call(nv, "nvmlDeviceGetHandleByIndex", i)
            handles.append(h)
            herr.append(e)
            u = None
            if h is not None:
                u, _ = _nvml_call(nv, "nvmlDeviceGetUUID", h)
            uuids.append(_text(u))
        order = visible_order(os.environ.get("CUDA_VISIBLE_DEVICES"), count, uuids)
        out, problems = [], []
        for cuda_i, i in enumerate(order):
            h, err = handles[i], herr[i]
            name = mem = util = None
            if h is not None:
                name, err = _nvml_call(nv, "nvmlDeviceGetName", h)
                if err is None:
                    mem, err = _nvml_call(nv, "nvmlDeviceGetMemoryInfo", h)
                if err is None:
                    try:
                        util = nv.nvmlDeviceGetUtilizationRates(h)
                    except nv.NVMLError as e:
                        if not _not_supported(nv, getattr(e, "value", None)):
                            err = "nvmlDeviceGetUtilizationRates: %s" % (e,)
            if err:
                problems.append("GPU %d: %s" % (i, err))
            out.append(GPUInfo(
                index=cuda_i, nvml_index=i, name=_text(name), uuid=uuids[i],
                memory_total=int(mem.total) if mem is not None else None,
                memory_free=int(mem.free) if mem is not None else None,
                memory_used=int(mem.used) if mem is not None else None,
                utilization_gpu=int(util.gpu) if util is not None else None,
                utilization_memory=int(util.memory) if util is not None else None,
                error=err))
        if not out:
            reason = ("no GPU found by NVML" if count == 0 else
                      "CUDA_VISIBLE_DEVICES=%r hides all %d GPUs"
                      % (os.environ.get("CUDA_VISIBLE_DEVICES"), count))
            return (), reason
        return tuple(out), ("; ".join(problems) or None)
    finally:
        try:
            nv.nvmlShutdown()
        except Exception:
            pass


def devices():
    """The CPU and GPU picture of this machine (see the module docstring)."""
    cpu = _cpu()
    try:
        import pynvml as nv
    except ImportError:
        return Devices(cpu, (), "nvidia-ml-py (pynvml) is not installed; "
                                "pip install 'pmaprt[gpu]' to discover GPUs")
    try:
        gpus, reason = _gpus(nv)
    except Exception as e:  # a broken pynvml must not break the caller
        gpus, reason = (), "NVML query failed: %s: %s" % (type(e).__name__, e)
    return Devices(cpu, gpus, reason)
