"""What this machine offers: CPU cores and memory (psutil), GPUs (NVML).

    >>> d = pmaprt.devices()
    >>> d.cpu.cores_available, [g.name for g in d.gpus], d.reason

- GPUs come from NVML through nvidia-ml-py's ``pynvml`` (the ``gpu`` extra).
  NVML never creates a CUDA context, so discovery is safe in any process,
  forked or not, and costs no device memory.
- Memory is in bytes (NVML reports bytes); utilization is NVML's percentage
  of the last sample period (0-100), None where the device does not report it
  (NVML_ERROR_NOT_SUPPORTED, for example on MIG instances).
- ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` are honoured: NVML sees
  every GPU of the machine, CUDA only the listed ones, renumbered from 0 in
  CUDA's order (PCI bus order; see ``cuda_order`` for FASTEST_FIRST over
  different models). ``GPU.index`` is the CUDA ordinal (what
  ``cupy.cuda.Device(i)`` and ``numba.cuda.gpus[i]`` take), ``GPU.nvml_index``
  NVML's own. A MIG instance named by its UUID ("MIG-...") is listed with
  ``kind="mig"``, its own memory, and its parent GPU's ``nvml_index``.
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
    reason: Optional[str] = None        # why gpus is empty, a device failed, or indices may differ

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


def cuda_order(order_env, bus_ids, names):
    """NVML indices in CUDA's enumeration order, and a note when it is not certain.

    CUDA_DEVICE_ORDER=PCI_BUS_ID: PCI bus order. FASTEST_FIRST (CUDA's
    default): CUDA's own speed ranking, in PCI bus order among equal GPUs, so
    the same order on a machine of one GPU model; over different models the
    ranking is CUDA's heuristic, which NVML cannot reproduce. bus_ids None
    (unknown): NVML's order.
    """
    idx = list(range(len(names)))
    if bus_ids is not None:
        idx.sort(key=lambda i: bus_ids[i])
    if order_env == "PCI_BUS_ID" or len(set(names)) <= 1:
        return idx, None
    return idx, ("CUDA_DEVICE_ORDER is FASTEST_FIRST (CUDA's default) over different GPU models: "
                 "CUDA's ordinals follow its own speed ranking, and GPU.index here follows PCI "
                 "bus order; set CUDA_DEVICE_ORDER=PCI_BUS_ID to make them agree")


def visible_order(env, nvml_count, uuids, order=None, migs=()):
    """What CUDA will see, in CUDA's order, from CUDA_VISIBLE_DEVICES: a list of
    NVML indices of whole GPUs, and ("mig", j) for migs[j] (a MIG instance).

    env None: all devices, in ``order`` (CUDA's enumeration order of the NVML
    indices; NVML's own by default). Entries are CUDA ordinals (positions in
    that order), GPU UUID prefixes ("GPU-...") or MIG instance UUIDs
    ("MIG-..." or the older "MIG-GPU-<uuid>/<gi>/<ci>", matched against the
    names of each of ``migs``). As CUDA does, the list stops at the first entry
    that matches no device, and an empty value hides every device.
    """
    order = list(range(nvml_count)) if order is None else list(order)
    if env is None:
        return order
    out = []
    for tok in env.split(","):
        tok = tok.strip()
        if not tok:
            break
        if tok.lstrip("-").isdigit():
            i = int(tok)
            if not 0 <= i < len(order):
                break
            key = order[i]
        elif tok.startswith("MIG-"):
            hits = [j for j, names in enumerate(migs) if any(n and n.startswith(tok) for n in names)]
            if len(hits) != 1:
                break
            key = ("mig", hits[0])
        else:
            hits = [i for i, u in enumerate(uuids) if u and u.startswith(tok)]
            if len(hits) != 1:
                break
            key = hits[0]
        if key in out:
            break
        out.append(key)
    return out


def _nvml_call(nv, fn, *args):
    """fn(*args), or (None, message) on NVMLError or where this pynvml lacks fn
    (older bindings); (value, None) on success."""
    f = getattr(nv, fn, None)
    if f is None:
        return None, "%s: not in this pynvml" % fn
    try:
        return f(*args), None
    except nv.NVMLError as e:
        return None, "%s: %s" % (fn, e)


def _not_supported(nv, err_value):
    return err_value == getattr(nv, "NVML_ERROR_NOT_SUPPORTED", 3)


def _bus_ids(nv, handles):
    """Each device's PCI bus id (lower case), or None if any cannot be read."""
    out = []
    for h in handles:
        info, err = (None, "no handle") if h is None else _nvml_call(nv, "nvmlDeviceGetPciInfo", h)
        bus = _text(getattr(info, "busId", None)) if err is None else None
        if bus is None:
            return None
        out.append(bus.lower())
    return out


def _mig_instances(nv, handles, uuids):
    """[(parent NVML index, handle, (uuid, legacy uuid))] of every MIG instance."""
    out = []
    for i, h in enumerate(handles):
        if h is None:
            continue
        count, err = _nvml_call(nv, "nvmlDeviceGetMaxMigDeviceCount", h)
        for k in range(count or 0):
            m, err = _nvml_call(nv, "nvmlDeviceGetMigDeviceHandleByIndex", h, k)
            if err is not None:         # an empty slot
                continue
            u, _ = _nvml_call(nv, "nvmlDeviceGetUUID", m)
            gi, e1 = _nvml_call(nv, "nvmlDeviceGetGpuInstanceId", m)
            ci, e2 = _nvml_call(nv, "nvmlDeviceGetComputeInstanceId", m)
            legacy = ("MIG-%s/%d/%d" % (uuids[i], gi, ci)
                      if e1 is None and e2 is None and uuids[i] else None)
            out.append((i, m, (_text(u), legacy)))
    return out


def _describe(nv, h, err):
    """(name, memory info, utilization, error) of one NVML handle."""
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
    return name, mem, util, err


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
        handles, uuids, herr, names = [], [], [], []
        for i in range(count):
            h, e = _nvml_call(nv, "nvmlDeviceGetHandleByIndex", i)
            handles.append(h)
            herr.append(e)
            u = n = None
            if h is not None:
                u, _ = _nvml_call(nv, "nvmlDeviceGetUUID", h)
                n, _ = _nvml_call(nv, "nvmlDeviceGetName", h)
            uuids.append(_text(u))
            names.append(_text(n))
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        order, note = cuda_order(os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST").strip(),
                                 _bus_ids(nv, handles), names)
        migs = _mig_instances(nv, handles, uuids) if env and "MIG-" in env else []
        visible = visible_order(env, count, uuids, order, [names for _, _, names in migs])
        out, problems = [], [note] if note and len(visible) > 1 else []
        for cuda_i, key in enumerate(visible):
            if isinstance(key, tuple):          # a MIG instance
                i, h, (uuid, _legacy) = migs[key[1]]
                err, kind = None, "mig"
            else:
                i, h, uuid, err, kind = key, handles[key], uuids[key], herr[key], "gpu"
            name, mem, util, err = _describe(nv, h, err)
            if err:
                problems.append("GPU %d: %s" % (i, err))
            out.append(GPUInfo(
                index=cuda_i, nvml_index=i, name=_text(name), uuid=uuid,
                memory_total=int(mem.total) if mem is not None else None,
                memory_free=int(mem.free) if mem is not None else None,
                memory_used=int(mem.used) if mem is not None else None,
                utilization_gpu=int(util.gpu) if util is not None else None,
                utilization_memory=int(util.memory) if util is not None else None,
                error=err, kind=kind))
        if not out:
            reason = ("no GPU found by NVML" if count == 0 else
                      "CUDA_VISIBLE_DEVICES=%r hides all %d GPUs (or names a device NVML does "
                      "not list)" % (env, count))
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
