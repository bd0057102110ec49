"""The GPU path's ordering and checks, without a GPU (see tests/_cuda_standins.py).

- The ring all-reduce under a vector-clock race checker and under the
  asynchronous stream stand-in, with the waits ``ring.step_waits`` and
  ``ring.scale_waits`` that CupyLinks uses; broken waits are caught.
- The host staging pipeline and the device-input path under the stand-in
  engine: results right for every seed; a broken ordering gives wrong ones.
- The dispatch's checks: memory bound per worker, contiguity, rows per chunk,
  out= device, scalars, Ctrl-C, NVML failing where CUDA works.
- The all-reduce's steps over a stand-in ranks object: integer mean, the
  NCCL-or-ring choice, NCCL's call order; NCCL's set-up against the installed
  CuPy API where it imports.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import pmaprt
from pmaprt.gpu import collective, dispatch, engines, pipeline, ring
from pmaprt.gpu.ring import HostLinks, ring_allreduce

from _cuda_standins import (AsyncCuda, AsyncEngine, AsyncLinks, DevArray, RaceCheckLinks,
                            RecordingNccl, sentinel)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("sum", "mean", "min", "max")
CONFIGS = [(n, size) for n in (2, 3, 4, 5, 8) for size in (1, n - 1, n, 2 * n + 1, 37)
           if size > 0]


def ranks(n, size, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(dtype) for _ in range(n)]


def host_ring(bufs, op):
    """The ring's result with everything synchronous: the reference, bit for bit."""
    out = [b.copy() for b in bufs]
    ring_allreduce(out, op, links=HostLinks(np))
    return out


# -- the ring: race checker ---------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_ring_has_no_unordered_conflicting_access(op):
    for n, size in CONFIGS:
        links = RaceCheckLinks(np)
        bufs = ranks(n, size, seed=n * 100 + size)
        ring_allreduce(bufs, op, links=links)
        assert links.races == [], (n, size, links.races[:3])
        assert len(links.accesses) > 0


def test_race_checker_finds_the_mean_race_of_unordered_division(monkeypatch):
    # the ordering before the fix: each rank divided without waiting for its
    # successor's last all-gather copy, which reads the rank's buffer
    monkeypatch.setattr(ring, "scale_waits", lambda rank, n: ())
    racy = 0
    for n, size in CONFIGS:
        links = RaceCheckLinks(np)
        ring_allreduce(ranks(n, size, seed=1), "mean", links=links)
        racy += bool(links.races)
        assert all("scale" in (r[0], r[2]) for r in links.races)
    assert racy >= len(CONFIGS) // 2


def test_race_checker_finds_a_missing_wait_on_the_sender(monkeypatch):
    monkeypatch.setattr(ring, "step_waits", lambda src, dst, n: ((dst + 1) % n,))
    links = RaceCheckLinks(np)
    ring_allreduce(ranks(4, 37, seed=2), "sum", links=links)
    assert links.races        # a read of a segment its sender has not finished combining


# -- the ring: asynchronous streams -------------------------------------------------
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("eager", [0.0, 0.3, 0.9])
def test_ring_on_async_streams_matches_the_synchronous_ring(op, eager):
    for seed, (n, size) in enumerate(CONFIGS):
        bufs = ranks(n, size, seed=seed)
        want = host_ring(bufs, op)
        links = AsyncLinks(AsyncCuda(seed=seed, eager=eager))
        ring_allreduce(bufs, op, links=links)
        for r in range(n):
            np.testing.assert_array_equal(bufs[r], want[r], err_msg="n=%d size=%d rank %d"
                                          % (n, size, r))


def _wrong_results(op, eager):
    wrong = 0
    for seed, (n, size) in enumerate(CONFIGS):
        bufs = ranks(n, size, seed=seed)
        want = host_ring(bufs, op)
        ring_allreduce(bufs, op, links=AsyncLinks(AsyncCuda(seed=seed, eager=eager)))
        wrong += any(not np.array_equal(b, w) for b, w in zip(bufs, want))
    return wrong


def test_async_ring_is_sensitive_no_step_waits_gives_wrong_sums(monkeypatch):
    monkeypatch.setattr(ring, "step_waits", lambda src, dst, n: ())
    assert _wrong_results("sum", 0.3) > 0


def test_async_ring_is_sensitive_unordered_division_gives_wrong_means(monkeypatch):
    monkeypatch.setattr(ring, "scale_waits", lambda rank, n: ())
    assert _wrong_results("mean", 0.0) > 0


# -- the host pipeline and the device path on the stand-in engine ----------------------
def affine(x, out):
    """The stand-in engine's kernel: y = 2x + 1 (kind 'raw')."""
    np.multiply(x, 2, out=out)
    out += 1


@pytest.fixture
def standin(monkeypatch):
    made = []

    def make(**kw):
        eng = AsyncEngine(**kw)
        made.append(eng)
        monkeypatch.setattr(dispatch, "engine_name", lambda kind, arr, engine, register: "cupy")
        monkeypatch.setattr(dispatch, "engine_for", lambda name: eng)
        return eng
    monkeypatch.setattr(dispatch, "kernel_kind", lambda fn: "raw" if fn is affine else "function")
    return make


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("streams,devices", [(1, [0]), (2, [0]), (3, [0, 1]), (2, [0, 0, 1])])
def test_pipeline_on_async_streams_is_exact(standin, seed, streams, devices):
    eng = standin(ndev=2, seed=seed, eager=[0.0, 0.2, 0.9][seed % 3])
    x = np.random.default_rng(seed).standard_normal((101, 3)).astype(np.float32)
    y = pmaprt.pmap(affine, x, device="gpu", devices=devices, chunksize=7, streams=streams)
    np.testing.assert_array_equal(y, 2 * x + 1)
    f = pmaprt.pmap(lambda a: (a * 3).astype(np.float64), x, device="gpu", devices=devices,
                    chunksize=9, streams=streams)
    assert f.dtype == np.float64
    np.testing.assert_array_equal(f, (x * 3).astype(np.float64))
    out = sentinel(x.shape, np.float32)
    assert pmaprt.pmap(affine, x, device="gpu", devices=devices, chunksize=5, out=out,
                       register=True) is out
    np.testing.assert_array_equal(out, 2 * x + 1)
    assert eng.cuda.pending() == 0


def _finish_no_wait(self, s):
    """HostMap._finish with the event wait left out: a broken ordering."""
    if s.pending is None:
        return
    lo, hi, _ev = s.pending
    s.pending = None
    pipeline.host_copy(self.out[lo:hi], s.pin_out[:hi - lo])


def test_pipeline_stand_in_is_sensitive_reading_before_the_wait_gives_wrong_rows(standin,
                                                                                 monkeypatch):
    standin(seed=0, eager=0.0)
    monkeypatch.setattr(pipeline.HostMap, "_finish", _finish_no_wait)
    x = np.arange(60, dtype=np.float64)
    y = pmaprt.pmap(affine, x, device="gpu", devices=[0], chunksize=10, streams=2)
    assert not np.array_equal(y, 2 * x + 1)


def test_memory_bound_counts_every_worker_on_a_device(standin):
    # devices=[0, 0, 0, 0]: four workers on GPU 0, each with its streams' buffers
    free = 1 << 20
    eng = standin(ndev=1, free=free, eager=0.5)
    x = np.ones(1 << 17, np.float32)          # 512 KiB in, 512 KiB out
    y = pmaprt.pmap(affine, x, device="gpu", devices=[0, 0, 0, 0], streams=2)
    np.testing.assert_array_equal(y, 3)
    assert 0 < eng.device_bytes[0] <= dispatch.MEM_FRACTION * free
    with pytest.raises(pmaprt.gpu.GPUMemoryError, match=r"4 workers x 2 streams"):
        pmaprt.pmap(affine, x, device="gpu", devices=[0, 0, 0, 0], chunksize=1 << 14)


def test_device_input_on_async_streams(standin):
    eng = standin(seed=3, eager=0.0)
    x = np.arange(40, dtype=np.float32).view(DevArray)
    y = pmaprt.pmap(affine, x, device="gpu", chunksize=7)
    assert isinstance(y, DevArray)
    np.testing.assert_array_equal(np.asarray(y), 2 * np.arange(40) + 1)
    f = pmaprt.pmap(lambda a: np.asarray(a)[:, None] * [1.0, 2.0], x, device="gpu", chunksize=6)
    assert f.shape == (40, 2)
    np.testing.assert_array_equal(np.asarray(f)[:, 1], 2 * np.arange(40))
    assert eng.cuda.pending() == 0


def test_raw_kernel_refuses_a_strided_device_input_or_out(standin):
    standin()
    x = np.arange(20, dtype=np.float32).view(DevArray)
    with pytest.raises(ValueError, match="RawKernel.*input must be C-contiguous"):
        pmaprt.pmap(affine, x[::2], device="gpu")
    out = np.zeros((10, 2), np.float32).view(DevArray)[:, 0]
    with pytest.raises(ValueError, match="RawKernel.*out= must be C-contiguous"):
        pmaprt.pmap(affine, x[:10], device="gpu", out=out)


def test_device_function_rows_checked_on_every_chunk_and_with_out(standin):
    standin()
    x = np.arange(12, dtype=np.float32).view(DevArray)
    out = np.zeros(12, np.float32).view(DevArray)
    with pytest.raises(ValueError, match="one row per input row"):       # one value per chunk
        pmaprt.pmap(lambda a: a.sum(keepdims=True), x, device="gpu", out=out, chunksize=4)

    def short_last(a):          # right for the full chunks, one row short on the last
        return a if len(a) == 5 else a[:1]
    with pytest.raises(ValueError, match=r"rows 10:12"):
        pmaprt.pmap(short_last, x, device="gpu", chunksize=5)


def test_device_out_on_another_gpu_is_refused(standin):
    standin(ndev=2)
    x = np.arange(8, dtype=np.float32).view(DevArray)
    out = np.zeros(8, np.float32).view(DevArray)
    out.device_id = 1
    with pytest.raises(ValueError, match="out= is on GPU 1, the input on GPU 0"):
        pmaprt.pmap(affine, x, device="gpu", out=out)


@pytest.mark.parametrize("scalar", [np.float32(3), np.array(2.0), 5])
def test_a_scalar_is_refused_not_run_as_one_row(standin, scalar):
    standin()
    with pytest.raises(TypeError, match="at least one dimension"):
        pmaprt.pmap(affine, scalar, device="gpu")
    with pytest.raises(TypeError, match="at least one dimension"):
        pmaprt.pmap(affine, np.asarray(scalar).view(DevArray), device="gpu")


def test_ctrl_c_during_join_waits_for_the_workers_before_unregistering(standin):
    main = threading.main_thread().ident
    unregistered = threading.Event()
    state = {"sent": False}

    def interrupt_once():               # in a GPU worker thread, at a launch
        if not state["sent"]:
            state["sent"] = True
            signal.pthread_kill(main, signal.SIGINT)
            # stay busy: before the fix the caller unregistered now, under us
            unregistered.wait(1.0)
    eng = standin(ndev=2, eager=0.0, on_launch=interrupt_once)
    real_unregister = eng.unregister

    def unregister(ptrs):
        real_unregister(ptrs)
        unregistered.set()
    eng.unregister = unregister
    x = np.arange(4000, dtype=np.float64)
    out = np.zeros_like(x)
    with pytest.raises(KeyboardInterrupt):
        pmaprt.pmap(affine, x, device="gpu", chunksize=10, out=out, register=True)
    queued, alive = eng.at_unregister
    assert queued == 0 and alive == []          # nothing in flight, no worker left
    assert not [t for t in threading.enumerate() if t.name.startswith("pmaprt-gpu")]
    done = out != 0
    assert 0 < done.sum() < len(x)              # the map stopped early
    np.testing.assert_array_equal(out[done], 2 * x[done] + 1)


def test_auto_asks_cuda_when_nvml_fails_to_start(standin, monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    eng = standin(ndev=1, eager=0.0)
    broken = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init():
        raise NVMLError("NVML Shared Library Not Found")
    broken.NVMLError, broken.nvmlInit = NVMLError, init
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert pmaprt.devices().gpu_count == 0
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(pmaprt.pmap(affine, x, device="auto"), 2 * x + 1)
    assert any(op == "launch" for _, op in eng.log)          # ran on the GPU, not the CPU
    eng.ndev = 0
    with pytest.raises(RuntimeError, match="NVML could not start.*reports no CUDA device"):
        pmaprt.pmap(affine, x, device="auto")


# -- the engine is chosen by the kinds of fn and input --------------------------------
def test_engine_choice_does_not_depend_on_what_is_imported(monkeypatch):
    cases = [("numba", np.zeros(3), None, False, "numba"),
             ("numba", np.zeros(3), None, True, "cupy"),
             ("numba", np.zeros(3), "cupy", False, "cupy"),
             ("raw", np.zeros(3), None, False, "cupy"),
             ("function", np.zeros(3), None, False, "cupy")]
    for imported in (False, True):
        if imported:        # as after `import cupy` in the caller's program
            monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
        for kind, arr, engine, register, want in cases:
            assert engines.engine_name(kind, arr, engine, register) == want, (kind, engine)


def test_engine_choice_errors_name_the_problem():
    class NumbaDev:             # a Numba device array's type, as the simulator's
        __module__ = "numba.cuda.simulator.cudadrv.devicearray"

        def copy_to_host(self):
            pass

    class CupyDev:
        __module__ = "cupy._core.core"
        __cuda_array_interface__ = {}

    class TorchDev:
        __module__ = "torch"
        __cuda_array_interface__ = {}
    assert engines.array_kind(NumbaDev()) == "numba" and engines.array_kind(CupyDev()) == "cupy"
    assert engines.engine_name("numba", NumbaDev()) == "numba"
    assert engines.engine_name("numba", CupyDev()) == "cupy"
    with pytest.raises(ValueError, match="engine='numba' runs numba.cuda kernels only"):
        engines.engine_name("function", np.zeros(2), "numba")
    with pytest.raises(ValueError, match="cannot take a CuPy array"):
        engines.engine_name("numba", CupyDev(), "numba")
    with pytest.raises(ValueError, match="cannot take a Numba device array"):
        engines.engine_name("numba", NumbaDev(), "cupy")
    with pytest.raises(ValueError, match="register=True needs CuPy"):
        engines.engine_name("numba", np.zeros(2), "numba", register=True)
    with pytest.raises(ValueError, match="engine must be"):
        engines.engine_name("numba", np.zeros(2), "opencl")
    with pytest.raises(TypeError, match="another library's device array"):
        engines.engine_name("numba", TorchDev())


# -- the all-reduce's steps over stand-in ranks -----------------------------------------
class AsyncRanks:
    """Ranks as DevArrays (device_id) on AsyncCuda streams; nccl a RecordingNccl or None."""
    xp = np

    def __init__(self, nccl=False, seed=0, eager=0.3):
        self.cuda = AsyncCuda(seed, eager)
        self.current = None
        self.nccl = RecordingNccl(lambda: self.current) if nccl else None
        self.links_made = 0

    def device_of(self, b):
        return b.device_id

    def copy(self, b, dtype, dev):
        c = np.array(b, dtype=dtype, order="C").view(DevArray)
        c.device_id = dev
        return c

    def links(self, devs):
        self.links_made += 1
        return AsyncLinks(self.cuda)

    def device(self, d):
        ranks_ = self

        class Ctx:
            def __enter__(self):
                ranks_.current = d

            def __exit__(self, *a):
                ranks_.current = None
        return Ctx()

    def synchronize_device(self, d):
        pass

    def stream(self):
        return self.cuda.new_stream(self.current)

    def ptr(self, b):
        return b.__array_interface__["data"][0]

    def scale(self, b, n, stream):
        self.cuda.op(stream, lambda: np.divide(b, n, out=b))


def on_devices(arrays, devs):
    out = []
    for a, d in zip(arrays, devs):
        a = np.array(a).view(DevArray)
        a.device_id = d
        out.append(a)
    return out


def test_device_integer_mean_sums_in_float64():
    # int8 [100, 100]: summed in int8 it wraps to -56, and the mean read -28
    bufs = on_devices([np.full(5, 100, np.int8), np.full(5, 100, np.int8)], [0, 0])
    got = collective.reduce_ranks(bufs, "mean", False, "auto", AsyncRanks())
    for g in got:
        assert g.dtype == np.float64
        np.testing.assert_array_equal(g, 100.0)
    np.testing.assert_array_equal(bufs[0], 100)           # the inputs are untouched
    with pytest.raises(TypeError, match="in-place mean needs a floating dtype"):
        collective.reduce_ranks(bufs, "mean", True, "auto", AsyncRanks())
    host = pmaprt.gpu.allreduce([np.full(3, 100, np.int8)] * 2, op="mean")
    np.testing.assert_array_equal(host[0], 100.0)


@pytest.mark.parametrize("dtype", [np.int16, np.bool_, np.complex64, np.uint16])
def test_auto_uses_the_ring_for_dtypes_nccl_lacks(dtype):
    ranks_ = AsyncRanks(nccl=True)
    src = [np.array([1, 0, 1, 1]).astype(dtype), np.array([0, 0, 1, 3]).astype(dtype)]
    want = np.maximum(src[0], src[1]) if dtype is not np.complex64 else None
    got = collective.reduce_ranks(on_devices(src, [0, 1]), "sum", False, "auto", ranks_)
    assert ranks_.links_made == 1 and ranks_.nccl.log == []
    for g in got:
        np.testing.assert_array_equal(g, np.add(src[0], src[1]))
    assert want is None or want.dtype == np.dtype(dtype)
    with pytest.raises(TypeError, match="NCCL has no type for"):
        collective.reduce_ranks(on_devices(src, [0, 1]), "sum", False, "nccl", ranks_)


def test_method_choice():
    nccl = RecordingNccl(lambda: None)
    f32 = np.dtype(np.float32)
    assert collective.choose_method("auto", [0, 1], f32, nccl) == "nccl"
    assert collective.choose_method("auto", [0, 0], f32, nccl) == "ring"     # ranks share a GPU
    assert collective.choose_method("auto", [0], f32, nccl) == "ring"
    assert collective.choose_method("auto", [0, 1], f32, None) == "ring"     # no NCCL
    assert collective.choose_method("auto", [None, None], f32, None) == "ring"
    assert collective.choose_method("ring", [0, 1], f32, nccl) == "ring"
    with pytest.raises(ValueError, match="one rank per GPU"):
        collective.choose_method("nccl", [0, 0], f32, nccl)
    with pytest.raises(RuntimeError, match="not available"):
        collective.choose_method("nccl", [0, 1], f32, None)
    with pytest.raises(ValueError, match="NumPy arrays"):
        pmaprt.gpu.allreduce([np.zeros(2)] * 2, method="nccl")


@pytest.mark.parametrize("op", OPS)
def test_nccl_calls_in_order_one_group_each_rank_on_its_device(op):
    ranks_ = AsyncRanks(nccl=True, eager=0.0)
    devs = [1, 0, 2]
    bufs = on_devices([np.full(7, r + 1.0, np.float32) for r in range(3)], devs)
    collective.reduce_ranks(bufs, op, False, "auto", ranks_)
    log = ranks_.nccl.log
    nccl = ranks_.nccl
    assert log[0] == ("initAll", (1, 0, 2))
    assert log[1] == ("groupStart",) and log[5] == ("groupEnd",)
    red = {"sum": nccl.NCCL_SUM, "mean": nccl.NCCL_SUM, "min": nccl.NCCL_MIN,
           "max": nccl.NCCL_MAX}[op]
    for r, call in enumerate(log[2:5]):
        name, rank, dev, current, group, in_place, count, dtype, red_op, _stream = call
        assert (name, rank, dev, current, group) == ("allReduce", r, devs[r], devs[r], 1)
        assert in_place and count == 7 and dtype == nccl.NCCL_FLOAT32 and red_op == red
    assert sorted(log[6:]) == [("destroy", 0), ("destroy", 1), ("destroy", 2)]
    assert ranks_.cuda.pending() == 0


def test_nccl_failure_aborts_every_communicator_and_closes_the_group():
    ranks_ = AsyncRanks(nccl=True)
    ranks_.nccl = RecordingNccl(lambda: ranks_.current, fail_rank=1)
    bufs = on_devices([np.ones(4, np.float32)] * 2, [0, 1])
    with pytest.raises(RuntimeError, match="NCCL failed on rank 1"):
        collective.reduce_ranks(bufs, "sum", True, "nccl", ranks_)
    names = [c[0] for c in ranks_.nccl.log]
    assert names.count("groupStart") == names.count("groupEnd") == 1
    assert sorted(c for c in ranks_.nccl.log if c[0] == "abort") == [("abort", 0), ("abort", 1)]
    assert "destroy" not in names


def _real_nccl():
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", False) else None


REAL_NCCL = _real_nccl()
needs_cupy_nccl = pytest.mark.skipif(
    REAL_NCCL is None, reason="needs CuPy with cupy.cuda.nccl importable (pip install "
                              "cupy-cuda12x nvidia-nccl-cu12); no GPU needed")


def _params(doc_line):
    """Parameter names from a Cython signature line: 'f(self, int a, b)' -> ['a', 'b']."""
    inside = doc_line[doc_line.index("(") + 1:doc_line.rindex(")")]
    names = [p.split()[-1].split("=")[0] for p in inside.split(",") if p.strip()]
    return [n for n in names if n != "self"]


@needs_cupy_nccl
def test_recording_nccl_has_the_installed_cupy_signatures():
    import inspect

    fake = RecordingNccl(lambda: None)
    real_comm = REAL_NCCL.NcclCommunicator
    for name in ("initAll", "allReduce", "destroy", "abort"):
        want = _params(getattr(real_comm, name).__doc__.splitlines()[0])
        got = [p for p in inspect.signature(getattr(fake.NcclCommunicator, name)).parameters
               if p != "self"]
        assert got == want, name
    for name in ("groupStart", "groupEnd"):
        assert _params(getattr(REAL_NCCL, name).__doc__.splitlines()[0]) == []
        assert not inspect.signature(getattr(fake, name)).parameters
    for _, const in collective.NCCL_TYPE_NAMES + (("", "NCCL_SUM"), ("", "NCCL_MIN"),
                                                  ("", "NCCL_MAX")):
        assert hasattr(REAL_NCCL, const), const


NCCL_SETUP = """
import json
from cupy.cuda import nccl
from pmaprt.gpu import collective
try:
    comms = collective.nccl_communicators(nccl, [0])
    out = {"ok": len(comms)}
    for c in comms:
        c.destroy()
except Exception as e:
    out = {"error": type(e).__module__ + "." + type(e).__name__, "message": str(e)}
print("RESULT " + json.dumps(out))
"""


@needs_cupy_nccl
def test_nccl_setup_against_the_installed_cupy_api():
    # Without a GPU NCCL itself fails (a CUDA error); with one it returns a
    # communicator. What must never happen is a call CuPy's API does not have
    # (before: TypeError: initAll() takes exactly 1 positional argument).
    path = [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    r = subprocess.run([sys.executable, "-c", NCCL_SETUP], cwd=ROOT, capture_output=True,
                       text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)))
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stderr[-3000:]
    res = json.loads(line[0][7:])
    if "ok" in res:
        assert res["ok"] == 1
    else:
        assert re.search(r"NcclError|CUDARuntimeError|CUDADriverError", res["error"]), res
