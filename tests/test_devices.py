"""pmaprt.devices(): the CPU picture always, GPUs through NVML (a fake pynvml here)."""
import sys
import types

import psutil
import pytest

import pmaprt
from pmaprt.gpu import discovery as devmod


class NVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return {3: "Not Supported", 9: "Driver Not Loaded", 15: "GPU is lost"}.get(
            self.value, "error %d" % self.value)


def fake_nvml(gpus, init_error=None, calls=None):
    """A pynvml stand-in with NVML's names: gpus is a list of dicts (name, total,
    free, used, util, or fail={function name: error code})."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = NVMLError
    nv.NVML_ERROR_NOT_SUPPORTED = 3
    calls = calls if calls is not None else []

    def rec(name):
        calls.append(name)

    def dev(h):                 # an int: a GPU; (i, k): MIG instance k of GPU i
        return gpus[h] if isinstance(h, int) else gpus[h[0]]["migs"][h[1]]

    def dev_fn(fname, make):
        def f(h):
            rec(fname)
            code = dev(h).get("fail", {}).get(fname)
            if code is not None:
                raise NVMLError(code)
            return make(dev(h))
        return f

    def mig_handle(h, k):
        rec("nvmlDeviceGetMigDeviceHandleByIndex")
        migs = gpus[h].get("migs", [])
        if k >= len(migs) or migs[k] is None:
            raise NVMLError(6)          # NVML_ERROR_NOT_FOUND: an empty slot
        return (h, k)

    def init():
        rec("nvmlInit")
        if init_error is not None:
            raise NVMLError(init_error)

    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: rec("nvmlShutdown")
    nv.nvmlDeviceGetCount = lambda: len(gpus)
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetUUID = dev_fn("nvmlDeviceGetUUID", lambda g: g.get("uuid", "GPU-%s" % g["name"]))
    nv.nvmlDeviceGetName = dev_fn("nvmlDeviceGetName", lambda g: g["name"].encode())  # bytes, as older NVML
    nv.nvmlDeviceGetMemoryInfo = dev_fn("nvmlDeviceGetMemoryInfo", lambda g: types.SimpleNamespace(
        total=g["total"], free=g["free"], used=g["total"] - g["free"]))
    nv.nvmlDeviceGetUtilizationRates = dev_fn("nvmlDeviceGetUtilizationRates",
                                              lambda g: types.SimpleNamespace(gpu=g["util"][0], memory=g["util"][1]))
    if all("bus" in g for g in gpus):
        nv.nvmlDeviceGetPciInfo = dev_fn("nvmlDeviceGetPciInfo",
                                         lambda g: types.SimpleNamespace(busId=g["bus"].encode()))
    nv.nvmlDeviceGetMaxMigDeviceCount = dev_fn("nvmlDeviceGetMaxMigDeviceCount",
                                               lambda g: 7 if "migs" in g else 0)
    nv.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    nv.nvmlDeviceGetGpuInstanceId = dev_fn("nvmlDeviceGetGpuInstanceId", lambda g: g["gi"])
    nv.nvmlDeviceGetComputeInstanceId = dev_fn("nvmlDeviceGetComputeInstanceId", lambda g: g["ci"])
    return nv


H100 = dict(name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa", total=85520809984, free=84935966720, util=(37, 12))
A100 = dict(name="NVIDIA A100-SXM4-40GB", uuid="GPU-bbbb", total=42949672960, free=1 << 30, util=(0, 0))


@pytest.fixture
def nvml(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")

    def install(*gpus, **kw):
        calls = []
        monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(list(gpus), calls=calls, **kw))
        return calls
    return install


def test_public_and_cpu_side_matches_psutil():
    d = pmaprt.devices()
    assert d.cpu.cores_logical == psutil.cpu_count()
    assert d.cpu.memory_total == psutil.virtual_memory().total
    assert 1 <= d.cpu.cores_available <= d.cpu.cores_logical


def test_no_pynvml_gives_cpu_and_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)   # import raises ImportError
    d = pmaprt.devices()
    assert d.gpus == () and d.gpu_count == 0
    assert "pynvml" in d.reason and "pmaprt[gpu]" in d.reason
    assert d.cpu.cores_logical >= 1


def test_nvml_fields_mapped_in_bytes_and_percent(nvml):
    calls = nvml(H100, A100)
    d = pmaprt.devices()
    assert d.reason is None and d.gpu_count == 2
    g0, g1 = d.gpus
    assert (g0.index, g0.nvml_index, g0.name, g0.uuid) == (0, 0, H100["name"], "GPU-aaaa")
    assert g0.memory_total == 85520809984 and g0.memory_free == 84935966720
    assert g0.memory_used == 85520809984 - 84935966720
    assert (g0.utilization_gpu, g0.utilization_memory) == (37, 12)
    assert g1.name == A100["name"] and g1.memory_free == 1 << 30
    assert calls[0] == "nvmlInit" and calls[-1] == "nvmlShutdown"


def test_init_failure_is_a_reason_not_an_exception(nvml):
    calls = nvml(H100, init_error=9)
    d = pmaprt.devices()
    assert d.gpus == () and "Driver Not Loaded" in d.reason
    assert "nvmlShutdown" not in calls


def test_error_on_one_device_keeps_the_others(nvml):
    lost = dict(A100, fail={"nvmlDeviceGetMemoryInfo": 15})
    calls = nvml(H100, lost)
    d = pmaprt.devices()
    assert d.gpu_count == 1 and len(d.gpus) == 2
    assert d.gpus[0].error is None and d.gpus[0].memory_total == H100["total"]
    bad = d.gpus[1]
    assert "GPU is lost" in bad.error and bad.memory_total is None and bad.name == A100["name"]
    assert "GPU 1" in d.reason and "GPU is lost" in d.reason
    assert calls[-1] == "nvmlShutdown"


def test_utilization_not_supported_is_none_not_an_error(nvml):
    nvml(dict(H100, fail={"nvmlDeviceGetUtilizationRates": 3}))
    (g,) = pmaprt.devices().gpus
    assert g.error is None and g.utilization_gpu is None and g.memory_free == H100["free"]


def test_zero_gpus(nvml):
    nvml()
    d = pmaprt.devices()
    assert d.gpus == () and d.reason == "no GPU found by NVML"


def test_cuda_visible_devices_renumbers(nvml, monkeypatch):
    nvml(H100, A100)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    (g,) = pmaprt.devices().gpus
    assert (g.index, g.nvml_index, g.name) == (0, 1, A100["name"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb,0")
    assert [(g.index, g.nvml_index) for g in pmaprt.devices().gpus] == [(0, 1), (1, 0)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    d = pmaprt.devices()
    assert d.gpus == () and "hides all 2 GPUs" in d.reason


@pytest.mark.parametrize("env,want", [
    (None, [0, 1, 2]), ("2,0", [2, 0]), ("0,7,1", [0]), ("-1", []), ("GPU-b", [1]),
    ("GPU-", []), ("1,1", [1]), ("MIG-x", []),
])
def test_visible_order_follows_cuda_rules(env, want):
    assert devmod.visible_order(env, 3, ["GPU-a0", "GPU-b1", "GPU-c2"]) == want


def test_a_broken_pynvml_never_raises(monkeypatch):
    broken = types.ModuleType("pynvml")      # no NVMLError, no functions
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    d = pmaprt.devices()
    assert d.gpus == () and "NVML query failed" in d.reason


MIG = dict(name="NVIDIA A100-SXM4-40GB MIG 1g.5gb", uuid="MIG-1111-2222", total=5 << 30,
           free=4 << 30, gi=7, ci=0, fail={"nvmlDeviceGetUtilizationRates": 3})


def test_a_mig_uuid_lists_that_instance(nvml, monkeypatch):
    # CUDA sees the MIG instance named by its UUID; before, no GPU matched it
    nvml(H100, dict(A100, migs=[None, MIG]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1111-2222")
    d = pmaprt.devices()
    assert d.reason is None and d.gpu_count == 1
    (g,) = d.gpus
    assert (g.kind, g.index, g.nvml_index, g.uuid) == ("mig", 0, 1, "MIG-1111-2222")
    assert g.name == MIG["name"] and g.memory_total == 5 << 30 and g.memory_free == 4 << 30
    assert g.utilization_gpu is None        # NVML does not report it for MIG instances
    # the older form, MIG-GPU-<parent uuid>/<GPU instance>/<compute instance>
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-GPU-bbbb/7/0")
    assert [g.uuid for g in pmaprt.devices().gpus] == ["MIG-1111-2222"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-9999")
    d = pmaprt.devices()
    assert d.gpus == () and "CUDA_VISIBLE_DEVICES='MIG-9999'" in d.reason


def test_cuda_device_order_pci_bus_id(nvml, monkeypatch):
    # NVML lists the A100 first, but its PCI bus comes after the H100's
    nvml(dict(A100, bus="00000000:81:00.0"), dict(H100, bus="00000000:3B:00.0"))
    d = pmaprt.devices()
    assert [(g.index, g.nvml_index, g.name) for g in d.gpus] == [
        (0, 1, H100["name"]), (1, 0, A100["name"])]
    assert d.reason is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")         # CUDA ordinal 1: the A100
    assert [g.name for g in pmaprt.devices().gpus] == [A100["name"]]


def test_fastest_first_over_different_models_says_indices_may_differ(nvml, monkeypatch):
    nvml(dict(A100, bus="00000000:81:00.0"), dict(H100, bus="00000000:3B:00.0"))
    monkeypatch.delenv("CUDA_DEVICE_ORDER")                 # CUDA's default, FASTEST_FIRST
    d = pmaprt.devices()
    assert d.gpu_count == 2 and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in d.reason
    # one model: FASTEST_FIRST is PCI order, nothing to say
    nvml(dict(H100, bus="00000000:81:00.0", uuid="GPU-z"), dict(H100, bus="00000000:3B:00.0"))
    d = pmaprt.devices()
    assert d.reason is None and [g.uuid for g in d.gpus] == ["GPU-aaaa", "GPU-z"]


@pytest.mark.parametrize("order_env", ["PCI_BUS_ID", "FASTEST_FIRST"])
def test_cuda_order_sorts_by_bus(order_env):
    order, note = devmod.cuda_order(order_env, ["0000:81:00.0", "0000:3b:00.0", "0000:02:00.0"],
                                    ["A", "A", "A"])
    assert order == [2, 1, 0] and note is None
    assert devmod.cuda_order(order_env, None, ["A", "A"]) == ([0, 1], None)
