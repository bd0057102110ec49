"""What the benchmark ran on: cores, memory, CPU and GPU model, versions."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from importlib.metadata import version
from typing import Any, Dict, List, Optional

import psutil

import pmaprt

from .runners import pmaprt_version


def _pkg_version(name: str) -> Optional[str]:
    try:
        return version(name)
    except Exception:
        return None


def cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def gpus() -> List[Dict[str, Any]]:
    """GPUs through NVML (nvidia-ml-py), else through ``pmaprt.devices``; [] if none."""
    out: List[Dict[str, Any]] = []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                if isinstance(name, bytes):
                    name = name.decode()
                mem = pynvml.nvmlDeviceGetMemoryInfo(h).total
                out.append({"index": i, "name": name, "memory_bytes": int(mem)})
        finally:
            pynvml.nvmlShutdown()
        return out
    except Exception:
        pass
    try:
        devs = getattr(pmaprt, "devices", None)
        if callable(devs):
            devs = devs()
        for i, d in enumerate(devs or ()):
            name = getattr(d, "name", None) or (d.get("name") if isinstance(d, dict) else str(d))
            kind = str(getattr(d, "kind", "") or (d.get("kind", "") if isinstance(d, dict) else ""))
            if kind and kind.lower() not in ("gpu", "cuda"):
                continue
            out.append({"index": i, "name": str(name), "memory_bytes": None})
    except Exception:
        pass
    return out


def describe(workers: int) -> Dict[str, Any]:
    """The ``machine`` object of results.json."""
    try:
        mem = int(psutil.virtual_memory().total)
        phys = psutil.cpu_count(logical=False)
    except Exception:
        mem, phys = None, None
    try:
        affinity = len(os.sched_getaffinity(0))
    except Exception:
        affinity = None
    versions = {
        "python": platform.python_version(),
        "pmaprt": pmaprt_version(),
        "numpy": _pkg_version("numpy"),
        "joblib": _pkg_version("joblib"),
        "mpire": _pkg_version("mpire"),
        "matplotlib": _pkg_version("matplotlib"),
        "tqdm": _pkg_version("tqdm"),
        "psutil": _pkg_version("psutil"),
    }
    return {
        "cores_logical": os.cpu_count(),
        "cores_physical": phys,
        "cores_available": affinity,
        "memory_bytes": mem,
        "cpu_model": cpu_model(),
        "gpus": gpus(),
        "platform": platform.platform(),
        "python_implementation": platform.python_implementation(),
        "python_executable_version": sys.version.split()[0],
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "workers": workers,
    }
