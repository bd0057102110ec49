"""pmap(..., device=...): the GPU backend.

Three layers:
- planning, dispatch and fallback logic, run here in-process (no GPU needed);
- the numba.cuda kernel path end to end under Numba's CUDA simulator
  (NUMBA_ENABLE_CUDASIM=1, in a child process: the variable must be set before
  numba.cuda is imported), which runs the same pipeline (streams, pinned
  staging, chunks, device threads) with kernels executed on the CPU;
- real-GPU tests (CuPy kernels, pinned streams, all-reduce on logical ranks),
  skipped with the reason when no GPU is present.
"""
import json
import os
import subprocess
import sys
import textwrap
import types
import warnings

import numpy as np
import pytest

import pmaprt
from pmaprt import gpu
from pmaprt.gpu import collective, dispatch, engines, forkguard, pipeline
from pmaprt.gpu.ring import CupyLinks, HostLinks, ring_allreduce

from _cuda_standins import DevArray, EngineStandIn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_reason():
    """None when CuPy sees a GPU, else why the GPU tests skip."""
    try:
        import cupy
    except ImportError:
        return "no GPU: CuPy is not installed (pip install '.[gpu]' on a GPU machine)"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return "no GPU: %s" % (e,)
    return None if n > 0 else "no GPU: CUDA reports 0 devices"


GPU_REASON = _gpu_reason()
CUPY_INSTALLED = not GPU_REASON or "CuPy is not installed" not in GPU_REASON


def needs_gpu(what):
    """Skip unless CuPy sees a GPU; the reason names what the test runs on the device."""
    return pytest.mark.skipif(GPU_REASON is not None,
                              reason="needs a CUDA GPU for %s (%s)" % (what, GPU_REASON))


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())


# -- no GPU needed -------------------------------------------------------------
def test_import_pmaprt_imports_no_gpu_library():
    # pmaprt.gpu itself is imported (pmaprt.devices lives in it); the CUDA
    # libraries are imported only when a device map or all-reduce runs.
    code = ("import sys, pmaprt; pmaprt.pmap; pmaprt.devices();"
            "bad = [m for m in ('cupy', 'cupyx', 'numba') if m in sys.modules];"
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


def test_kernel_kind():
    from numba import cuda

    @cuda.jit
    def k(x, out):
        pass

    assert gpu.kernel_kind(k) == "numba"
    assert gpu.kernel_kind(np.sqrt) == "function"
    assert gpu.kernel_kind(lambda x: x) == "function"
    with pytest.raises(TypeError, match="numba.cuda kernel, a CuPy ElementwiseKernel"):
        gpu.kernel_kind(42)


@pytest.mark.parametrize("n,launch,want", [
    (1, None, (1, 256)), (256, None, (1, 256)), (257, None, (2, 256)),
    (1000, 128, (8, 128)), (5, (3, 32), (3, 32)), (0, None, (1, 256)),
])
def test_launch_config(n, launch, want):
    assert engines.launch_config(n, launch) == want


@pytest.mark.parametrize("bad,err", [(0, ValueError), (2048, ValueError), ((0, 32), ValueError),
                                     ("x", TypeError), (True, TypeError)])
def test_launch_config_rejects(bad, err):
    with pytest.raises(err, match="threads|launch"):
        engines.launch_config(10, bad)


def test_chunk_default_and_memory_bound():
    rows = 1 << 30
    # 4-byte rows, no bound: CHUNK_BYTES of input
    assert dispatch.plan_chunk(rows, 4, 4, None, 2) == dispatch.CHUNK_BYTES // 4
    # 1 MiB free: 2 streams x (4 + 4) bytes per row within half of it
    assert dispatch.plan_chunk(rows, 4, 4, 1 << 20, 2) == (1 << 19) // 16
    assert dispatch.plan_chunk(10, 4, 4, 1 << 20, 2) == 10           # never more than the rows
    assert dispatch.plan_chunk(10, 4, 4, float("inf"), 2) == 10      # unknown free memory
    assert dispatch.plan_chunk(rows, 4, 4, 1 << 20, 2, chunksize=1000) == 1000


def test_chunk_larger_than_free_memory_is_a_clear_error():
    with pytest.raises(gpu.GPUMemoryError, match=r"chunksize=100000 rows.*GPU 3.*chunksize <= 32768"):
        dispatch.plan_chunk(1 << 20, 4, 4, 1 << 20, 2, chunksize=100000, device=3)
    with pytest.raises(gpu.GPUMemoryError, match="one row needs"):
        dispatch.plan_chunk(10, 1 << 30, 1 << 30, 1 << 20, 2)
    with pytest.raises(ValueError, match="chunksize must be a positive int"):
        dispatch.plan_chunk(10, 4, 4, None, 2, chunksize=0)
    assert issubclass(gpu.GPUMemoryError, MemoryError)


def double(x):
    return 2 * x + 1


def test_auto_runs_a_plain_function_on_the_cpu_pool_and_says_so_once(fresh_warnings):
    x = np.arange(1001, dtype=np.float32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = pmaprt.pmap(double, x, device="auto")
        b = pmaprt.pmap(double, x[:7], device="auto", chunksize=3)
    msgs = [str(m.message) for m in w if "pmaprt" in str(m.message)]
    assert len(msgs) == 1 and "CPU pool" in msgs[0] and "double" in msgs[0]
    assert w[0].filename == __file__          # points at the caller's line
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(a, 2 * x + 1)
    np.testing.assert_array_equal(b, 2 * x[:7] + 1)


def test_auto_without_gpu_and_a_kernel_is_a_clear_error(monkeypatch, fresh_warnings):
    from numba import cuda

    @cuda.jit
    def k(x, out):
        pass

    monkeypatch.setattr(dispatch, "gpu_presence", lambda eng: (False, "no GPU found by NVML"))
    with pytest.raises(RuntimeError, match="no GPU found by NVML.*cannot run on the CPU"):
        pmaprt.pmap(k, np.zeros(4), device="auto")


def test_auto_fallback_writes_out_and_checks_rows(fresh_warnings):
    x = np.arange(10.0)
    out = np.empty(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = pmaprt.pmap(double, x, device="auto", out=out)
        assert r is out
        np.testing.assert_array_equal(out, 2 * x + 1)
        with pytest.raises(ValueError, match="one row per input row"):
            pmaprt.pmap(np.sum, x, device="auto", chunksize=5)


@pytest.mark.parametrize("kw,err,match", [
    (dict(device="tpu"), ValueError, "device must be"),
    (dict(device="gpu", backend="dask"), ValueError, "backend="),
    (dict(device="gpu", ordered=False), ValueError, "ordered="),
    (dict(device="gpu", retries=2), TypeError, "retries"),
])
def test_bad_device_options_name_the_problem(kw, err, match):
    with pytest.raises(err, match=match):
        pmaprt.pmap(double, np.zeros(3), **kw)


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is present")
def test_gpu_kernel_without_a_gpu_is_a_clear_error():
    from numba import cuda

    @cuda.jit
    def k(x, out):
        pass

    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        pmaprt.pmap(k, np.zeros(4), device="gpu")


def test_two_arrays_are_refused():
    with pytest.raises(TypeError, match="one array"):
        pmaprt.pmap(double, np.zeros(3), np.zeros(3), device="gpu")


def test_forked_child_refuses_cuda(monkeypatch):
    monkeypatch.setattr(forkguard, "_cuda_pid", os.getpid() + 1)     # as if CUDA began in a parent
    with pytest.raises(RuntimeError, match="cannot be used in a forked child"):
        forkguard.check_not_forked()
    monkeypatch.setattr(forkguard, "_cuda_pid", os.getpid())
    forkguard.check_not_forked()


@pytest.mark.parametrize("op", ["sum", "mean", "min", "max"])
def test_allreduce_api_on_host_arrays(op):
    xs = [np.arange(5, dtype=np.int64) * (r + 1) - r for r in range(3)]
    before = [x.copy() for x in xs]
    got = gpu.allreduce(xs, op=op)
    want = {"sum": np.sum, "mean": np.mean, "min": np.min, "max": np.max}[op](np.stack(before), 0)
    for g in got:
        np.testing.assert_allclose(g, want)
    for x, b in zip(xs, before):
        np.testing.assert_array_equal(x, b)                    # not in place by default
    with pytest.raises(ValueError, match="op must be one of"):
        gpu.allreduce(xs, op="prod")


# -- numba.cuda kernels under the CUDA simulator (child process) ------------------------
SIM_SCRIPT = textwrap.dedent(r'''
    import json, math, sys, types
    import numpy as np
    from numba import cuda
    import pmaprt
    from pmaprt import gpu
    from pmaprt.gpu import engines

    @cuda.jit
    def affine(x, out):
        i = cuda.grid(1)
        if i < x.shape[0]:
            out[i] = 2 * x[i] + 1

    @cuda.jit
    def strided(x, out):                       # grid-stride loop: any launch covers x
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            out[i] = x[i] * x[i]

    @cuda.jit
    def grid_size(x, out):                     # records the launch it got
        i = cuda.grid(1)
        if i < x.shape[0]:
            out[i] = cuda.gridDim.x * cuda.blockDim.x

    @cuda.jit
    def rows3(x, out):
        i = cuda.grid(1)
        if i < x.shape[0]:
            for j in range(x.shape[1]):
                out[i, j] = x[i, j] - j

    res = {}
    def check(name, fn):
        try:
            res[name] = fn()
        except Exception as e:
            res[name] = "%s: %s" % (type(e).__name__, e)

    def odd_sizes():
        out = []
        for n in (1, 2, 7, 129, 1001):
            x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
            y = pmaprt.pmap(affine, x, device="gpu", launch=32, chunksize=100)
            out.append(isinstance(y, np.ndarray) and y.dtype == np.float32
                       and np.allclose(y, 2 * x + 1))
        return out
    check("odd_sizes", odd_sizes)

    def numba_sizes_host_and_device():     # the real-GPU test's small sizes, default chunks
        out = []
        for n in (1, 3, 1001):
            x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
            y = pmaprt.pmap(affine, x, device="gpu", chunksize=max(1, n // 5))
            yd = pmaprt.pmap(affine, cuda.to_device(x), device="gpu")
            out.append([type(y).__name__, bool(np.allclose(y, 2 * x + 1, rtol=1e-6)),
                        type(yd).__name__, bool(np.allclose(yd.copy_to_host(), 2 * x + 1,
                                                            rtol=1e-6))])
        return out
    check("numba_sizes", numba_sizes_host_and_device)

    def fewer_rows_than_workers():
        x = np.arange(3, dtype=np.int64)
        y = pmaprt.pmap(affine, x, device="gpu", devices=[0, 0, 0, 0], chunksize=1, launch=8)
        return y.tolist()
    check("fewer_rows_than_workers", fewer_rows_than_workers)

    def many_workers_many_chunks():
        x = np.arange(500, dtype=np.float64)
        y = pmaprt.pmap(affine, x, device="gpu", devices=[0, 0, 0], chunksize=37, launch=16,
                        streams=3)
        return bool(np.array_equal(y, 2 * x + 1))
    check("many_workers_many_chunks", many_workers_many_chunks)

    def default_launch():
        x = np.zeros(300, dtype=np.int64)
        return pmaprt.pmap(grid_size, x, device="gpu", chunksize=300)[:1].tolist()
    check("default_launch", default_launch)

    def override_threads():
        x = np.zeros(100, dtype=np.int64)
        return pmaprt.pmap(grid_size, x, device="gpu", launch=16, chunksize=100)[:1].tolist()
    check("override_threads", override_threads)

    def override_grid():
        x = np.arange(50, dtype=np.float64)
        y = pmaprt.pmap(strided, x, device="gpu", launch=(2, 4), chunksize=50)
        return bool(np.array_equal(y, x * x))
    check("override_grid", override_grid)

    def nd_rows_and_out():
        x = np.arange(63, dtype=np.float32).reshape(21, 3)
        out = np.full_like(x, -1)
        r = pmaprt.pmap(rows3, x, device="gpu", out=out, chunksize=4, launch=8)
        return [r is out, bool(np.array_equal(out, x - np.arange(3)))]
    check("nd_rows_and_out", nd_rows_and_out)

    def dtype_option():
        x = np.arange(10, dtype=np.int32)
        y = pmaprt.pmap(affine, x, device="gpu", dtype=np.float64, launch=8)
        return [str(y.dtype), y.tolist() == (2 * x + 1).astype(float).tolist()]
    check("dtype_option", dtype_option)

    def device_input_stays():
        d = cuda.to_device(np.arange(40, dtype=np.float32))
        y = pmaprt.pmap(affine, d, device="gpu", launch=16)
        return [type(y).__name__, bool(np.array_equal(y.copy_to_host(),
                                                      2 * np.arange(40, dtype=np.float32) + 1))]
    check("device_input_stays", device_input_stays)

    def empty():
        return pmaprt.pmap(affine, np.zeros(0, np.float32), device="gpu").shape
    check("empty", empty)

    def chunk_over_free_memory():
        engines.NumbaEngine.free_memory = lambda self, i: 4096
        try:
            pmaprt.pmap(affine, np.zeros(10000, np.float32), device="gpu", chunksize=5000)
        except gpu.GPUMemoryError as e:
            msg = str(e)
        y = pmaprt.pmap(affine, np.zeros(10000, np.float32), device="gpu", launch=64)
        return [msg, float(y.sum())]
    check("chunk_over_free_memory", chunk_over_free_memory)

    def plain_function_needs_cupy():
        try:
            pmaprt.pmap(np.sqrt, np.zeros(4), device="gpu")
        except RuntimeError as e:
            return str(e)
    check("plain_function_needs_cupy", plain_function_needs_cupy)

    def bad_devices():
        try:
            pmaprt.pmap(affine, np.zeros(4), device="gpu", devices=[1])
        except ValueError as e:
            return str(e)
    check("bad_devices", bad_devices)

    def register_needs_cupy():          # register=True picks CuPy (cudaHostRegister)
        try:
            pmaprt.pmap(affine, np.zeros(4), device="gpu", register=True)
        except RuntimeError as e:
            return str(e)
    check("register_needs_cupy", register_needs_cupy)

    def strided_device_input():         # a numba kernel indexes by strides
        d = cuda.to_device(np.arange(40, dtype=np.float32))
        y = pmaprt.pmap(affine, d[::2], device="gpu", launch=8)
        return bool(np.array_equal(y.copy_to_host(), 2 * np.arange(0, 40, 2) + 1))
    check("strided_device_input", strided_device_input)

    def device_out():
        d = cuda.to_device(np.arange(30, dtype=np.float32))
        o = cuda.device_array(30, np.float32)
        r = pmaprt.pmap(affine, d, device="gpu", out=o, chunksize=7, launch=8)
        return [r is o, bool(np.array_equal(o.copy_to_host(), 2 * np.arange(30) + 1))]
    check("device_out", device_out)

    def host_out_for_device_input():
        try:
            pmaprt.pmap(affine, cuda.to_device(np.zeros(4)), device="gpu", out=np.zeros(4))
        except TypeError as e:
            return str(e)
    check("host_out_for_device_input", host_out_for_device_input)

    def scalar():
        try:
            pmaprt.pmap(affine, np.float32(3), device="gpu")
        except TypeError as e:
            return str(e)
    check("scalar", scalar)

    def engine_errors():
        out = []
        for fn, arr, engine in ((affine, cuda.to_device(np.zeros(4)), "cupy"),
                                (np.sqrt, np.zeros(4), "numba")):
            try:
                pmaprt.pmap(fn, arr, device="gpu", engine=engine)
            except ValueError as e:
                out.append(str(e))
        return out
    check("engine_errors", engine_errors)

    def auto_where_nvml_fails():        # NVML installed but failing: CUDA is asked
        nv = types.ModuleType("pynvml")
        class NVMLError(Exception):
            pass
        def init():
            raise NVMLError("Driver Not Loaded")
        nv.NVMLError, nv.nvmlInit = NVMLError, init
        sys.modules["pynvml"] = nv
        x = np.arange(9, dtype=np.float32)
        y = pmaprt.pmap(affine, x, device="auto", launch=8)
        del sys.modules["pynvml"]
        return [pmaprt.devices().gpu_count, bool(np.array_equal(y, 2 * x + 1))]
    check("auto_where_nvml_fails", auto_where_nvml_fails)

    def after_import_cupy():            # last: the engine must not follow what is imported
        try:
            import cupy
            which = "cupy"
        except ImportError:
            sys.modules["cupy"] = types.ModuleType("cupy")
            which = "stand-in"
        d = cuda.to_device(np.arange(10, dtype=np.float32))
        y = pmaprt.pmap(affine, d, device="gpu", launch=8)
        x = np.arange(10.0)
        h = pmaprt.pmap(affine, x, device="gpu", launch=8, chunksize=3)
        return [which, type(y).__name__,
                bool(np.array_equal(y.copy_to_host(), 2 * np.arange(10) + 1)),
                bool(np.array_equal(h, 2 * x + 1))]
    check("after_import_cupy", after_import_cupy)

    print("RESULT " + json.dumps(res))
''')


@pytest.fixture(scope="module")
def sim():
    path = [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, "-c", SIM_SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and line, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(line[0][len("RESULT "):])


def test_sim_odd_sizes_match_numpy(sim):
    assert sim["odd_sizes"] == [True] * 5


def test_sim_numba_sizes(sim):
    assert sim["numba_sizes"] == [["ndarray", True, "FakeCUDAArray", True]] * 3


def test_sim_fewer_rows_than_device_workers(sim):
    assert sim["fewer_rows_than_workers"] == [1, 3, 5]


def test_sim_several_workers_several_streams(sim):
    assert sim["many_workers_many_chunks"] is True


def test_sim_launch_config_chosen_and_overridable(sim):
    assert sim["default_launch"] == [2 * 256]          # ceil(300 / 256) blocks of 256
    assert sim["override_threads"] == [7 * 16]         # ceil(100 / 16) blocks of 16
    assert sim["override_grid"] is True                # (2, 4) as given; kernel strides


def test_sim_rows_out_and_dtype(sim):
    assert sim["nd_rows_and_out"] == [True, True]
    assert sim["dtype_option"] == ["float64", True]
    assert sim["empty"] == [0]


def test_sim_device_input_stays_on_device(sim):
    assert sim["device_input_stays"] == ["FakeCUDAArray", True]


def test_sim_chunk_over_free_memory(sim):
    msg, total = sim["chunk_over_free_memory"]
    assert "chunksize=5000 rows" in msg and "free bytes" in msg
    assert total == 10000.0        # the default chunk shrinks to fit instead


def test_sim_errors(sim):
    if CUPY_INSTALLED:      # a plain function runs on CuPy, which finds no device
        assert "no CUDA device is visible" in sim["plain_function_needs_cupy"]
    else:
        assert "CuPy is not installed" in sim["plain_function_needs_cupy"]
    assert "devices= must list CUDA ordinals in 0..0" in sim["bad_devices"]
    if CUPY_INSTALLED:
        assert "no CUDA device is visible" in sim["register_needs_cupy"]
    else:
        assert "CuPy is not installed" in sim["register_needs_cupy"]
        assert "register=True" in sim["register_needs_cupy"]


def test_sim_device_strides_and_out(sim):
    assert sim["strided_device_input"] is True
    assert sim["device_out"] == [True, True]
    assert "out= must be a device array" in sim["host_out_for_device_input"]


def test_sim_scalar_and_engine_errors(sim):
    assert "at least one dimension" in sim["scalar"]
    assert len(sim["engine_errors"]) == 2
    assert "engine='cupy' cannot take a Numba device array" in sim["engine_errors"][0]
    assert "engine='numba' runs numba.cuda kernels only" in sim["engine_errors"][1]


def test_sim_auto_finds_the_gpu_through_cuda_when_nvml_fails(sim):
    assert sim["auto_where_nvml_fails"] == [0, True]


def test_sim_engine_does_not_follow_what_is_imported(sim):
    # after `import cupy` a Numba device array stays a Numba device array, and a
    # host array still runs on Numba (before, CuPy was picked and failed)
    which, kind, device_ok, host_ok = sim["after_import_cupy"]
    assert which == ("cupy" if CUPY_INSTALLED else "stand-in")
    assert (kind, device_ok, host_ok) == ("FakeCUDAArray", True, True)


# -- real GPU ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


def _kernels(cp):
    ew = cp.ElementwiseKernel("T x", "T y", "y = 2 * x + 1", "pmaprt_affine")
    raw = cp.RawKernel(r'''
        extern "C" __global__ void pmaprt_affine_raw(const float* x, float* y, long long n) {
            long long i = (long long)blockDim.x * blockIdx.x + threadIdx.x;
            if (i < n) y[i] = 2.0f * x[i] + 1.0f;
        }''', "pmaprt_affine_raw")
    return {"elementwise": ew, "raw": raw, "function": lambda x: 2 * x + 1}


@needs_gpu("CuPy ElementwiseKernel, RawKernel and functions, and numba.cuda kernels over CuPy arrays, launched on a device")
@pytest.mark.parametrize("kind,n", [(k, n) for k in ("elementwise", "raw", "function")
                                    for n in (1, 3, 1001, (1 << 20) + 7)]
                         + [("numba", (1 << 20) + 7)])      # smaller: test_sim_numba_sizes
def test_gpu_kernels_match_numpy_host_and_device(cp, kind, n):
    if kind == "numba":
        from numba import cuda

        @cuda.jit
        def fn(x, out):
            i = cuda.grid(1)
            if i < x.shape[0]:
                out[i] = 2 * x[i] + 1
    else:
        fn = _kernels(cp)[kind]
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    y = pmaprt.pmap(fn, x, device="gpu", chunksize=max(1, n // 5))
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, 2 * x + 1, rtol=1e-6)
    d = cp.asarray(x)
    yd = pmaprt.pmap(fn, d, device="gpu")
    assert isinstance(yd, cp.ndarray) and yd.device.id == d.device.id
    np.testing.assert_allclose(yd.get(), 2 * x + 1, rtol=1e-6)


@needs_gpu("a CuPy ElementwiseKernel writing out= on each device")
def test_gpu_out_and_sizes_below_device_count(cp):
    ew = _kernels(cp)["elementwise"]
    ndev = cp.cuda.runtime.getDeviceCount()
    x = np.arange(ndev + 1 if ndev > 1 else 1, dtype=np.float32)[: max(1, ndev - 1)]
    out = np.empty_like(x)
    assert pmaprt.pmap(ew, x, device="gpu", out=out, chunksize=1) is out
    np.testing.assert_array_equal(out, 2 * x + 1)
    dout = cp.empty(5, cp.float32)
    assert pmaprt.pmap(ew, cp.arange(5, dtype=cp.float32), device="gpu", out=dout) is dout


@needs_gpu("cudaHostRegister of the caller's arrays (register=True)")
@pytest.mark.parametrize("kind", ["elementwise", "function"])
def test_gpu_registered_host_memory(cp, kind):
    fn = _kernels(cp)[kind]
    x = np.random.default_rng(5).standard_normal((1 << 20) + 11).astype(np.float32)
    out = np.empty_like(x)
    assert pmaprt.pmap(fn, x, device="gpu", out=out, register=True, chunksize=1 << 18) is out
    np.testing.assert_allclose(out, 2 * x + 1, rtol=1e-6)
    # unregistered afterwards: registering again succeeds
    cp.cuda.runtime.hostRegister(x.ctypes.data, x.nbytes, 0)
    cp.cuda.runtime.hostUnregister(x.ctypes.data)
    if kind == "function":
        with pytest.raises(ValueError, match="needs out="):
            pmaprt.pmap(fn, x, device="gpu", register=True)


@needs_gpu("the device's own free memory (cudaMemGetInfo)")
def test_gpu_chunk_larger_than_free_memory(cp):
    ew = _kernels(cp)["elementwise"]
    free, _ = cp.cuda.runtime.memGetInfo()
    rows = int(free // 4)          # 2 streams x (in + out) x rows x 4 bytes > half of free
    with pytest.raises(gpu.GPUMemoryError, match="free bytes"):
        pmaprt.pmap(ew, np.zeros(8, np.float32), device="gpu", chunksize=rows)


@needs_gpu("device='auto' finding a real GPU for a CuPy kernel")
def test_gpu_auto_runs_a_kernel_on_the_gpu(cp, fresh_warnings):
    ew = _kernels(cp)["elementwise"]
    x = np.arange(100, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no fallback warning
        np.testing.assert_array_equal(pmaprt.pmap(ew, x, device="auto"), 2 * x + 1)


@needs_gpu("the ring over cudaMemcpyPeerAsync and CUDA events on one device")
@pytest.mark.parametrize("op", ["sum", "mean", "min", "max"])
@pytest.mark.parametrize("ranks,size", [(4, 1001), (3, 2), (4, (1 << 20) + 3), (2, 1)])
def test_gpu_ring_logical_ranks_on_one_device(cp, op, ranks, size):
    rng = np.random.default_rng(size)
    host = [rng.standard_normal(size).astype(np.float64) for _ in range(ranks)]
    bufs = [cp.asarray(h) for h in host]
    links = CupyLinks([0] * ranks)
    got = gpu.allreduce(bufs, op=op, method="ring")
    # bit for bit against the same ring on the host: its summation order is the
    # ring's (rotated per segment), not np.sum's, and IEEE adds and divides round
    # the same on both
    want = [h.copy() for h in host]
    ring_allreduce(want, op, links=HostLinks(np))
    for g in got:
        np.testing.assert_array_equal(g.get(), want[0])
    # the same schedule moves the same bytes as the host reference
    hl = HostLinks(np)
    ring_allreduce([h.copy() for h in host], op, links=hl)
    bufs2 = [cp.asarray(h) for h in host]
    ring_allreduce(bufs2, op, xp=cp, links=links)
    assert links.sent == hl.sent


@needs_gpu("NCCL across two or more GPUs")
def test_gpu_nccl_across_devices(cp):
    n = cp.cuda.runtime.getDeviceCount()
    if n < 2 or collective.nccl_module() is None:
        pytest.skip("needs 2 or more CUDA GPUs and cupy.cuda.nccl for NCCL across devices "
                    "(have %d GPU(s))" % n)
    xs = []
    for d in range(n):
        with cp.cuda.Device(d):
            xs.append(cp.full(1001, d + 1, cp.float32))
    for g in gpu.allreduce(xs, op="sum", method="nccl"):
        assert float(g[0]) == n * (n + 1) / 2


@pytest.mark.parametrize("rows", [1, 2, 7, 1001])
def test_host_copy_split_over_threads_is_exact(monkeypatch, rows):
    monkeypatch.setattr(pipeline, "COPY_SPLIT_BYTES", 1)
    monkeypatch.setattr(pipeline, "COPY_THREADS", 3)
    src = np.random.default_rng(rows).standard_normal((rows, 5))
    dst = np.zeros_like(src)
    pipeline.host_copy(dst, src)
    np.testing.assert_array_equal(dst, src)


def _bench_gpu_entry():
    from pmaprt.bench import workloads
    from pmaprt.bench.config import Config
    from pmaprt.bench.gpu_runs import run_gpu
    from pmaprt.bench.session import Session

    session = Session(Config(workloads=["gpu"], progress=False, plots=False),
                      workloads.Calibration(iters_per_us=1.0))
    run_gpu(session, (True, None))
    return session


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is present: the benchmark runs instead")
def test_bench_gpu_workload_skips_cleanly_without_a_gpu(monkeypatch):
    suite = _bench_gpu_entry()
    e = suite.entries["gpu"]
    assert e["status"] == "skipped" and e["note"].startswith("no GPU") and not suite.results
    # a GPU seen by NVML but no CuPy: still a skip that says what to install
    from pmaprt.gpu.discovery import CPUInfo, Devices, GPUInfo

    fake = Devices(CPUInfo(2, 1, 2, 1 << 30, 1 << 29),
                   (GPUInfo(0, 0, "NVIDIA H100", "GPU-x", 80 << 30, 79 << 30, 0, 0, 0),))
    monkeypatch.setattr(pmaprt, "devices", lambda: fake)
    monkeypatch.setitem(sys.modules, "cupy", None)
    suite = _bench_gpu_entry()
    e = suite.entries["gpu"]
    assert e["status"] == "skipped" and "CuPy is not installed" in e["note"]


# -- the pipeline's logic with a recording stand-in for the CUDA library -------------------
class FakeEngine(EngineStandIn):
    """The engine interface of pmaprt.gpu.engines over NumPy: copies happen at once,
    events are labels, and every operation is logged as (device, op)."""

    def _dev(self):
        return getattr(self.current, "dev", None)

    def stream(self):
        return types.SimpleNamespace(synchronize=lambda: None)

    def pinned(self, shape, dtype):
        return np.empty(shape, dtype)

    def empty(self, shape, dtype, stream):
        return np.empty(shape, dtype).view(DevArray)

    def h2d(self, dst, src, stream):
        dst[...] = src
        self._note("h2d")

    def d2h(self, dst, src, stream):
        dst[...] = src
        self._note("d2h")

    def record(self, stream):
        return len(self.log)

    def synchronize(self, event):
        self._note("wait")

    def device_of(self, a):
        return 0

    def copy_into(self, dst, src, stream):
        dst[...] = src

    def astype(self, r, dtype, stream):
        return r.astype(dtype, copy=False)

    def register(self, arrays):
        self.registered = [a for a in arrays if a is not None]
        return ["reg"]

    def unregister(self, ptrs):
        if ptrs:
            self._note("unregister:%d" % len(ptrs))

    def launch(self, kind, fn, x, out, stream, launch):
        self._note("launch")
        if kind == "function":
            return np.ascontiguousarray(fn(np.asarray(x))).view(DevArray)
        out[...] = 2 * np.asarray(x) + 1
        return out


@pytest.fixture
def fake(monkeypatch):
    eng = FakeEngine()
    monkeypatch.setattr(dispatch, "engine_name", lambda kind, arr, engine, register: "cupy")
    monkeypatch.setattr(dispatch, "engine_for", lambda name: eng)
    monkeypatch.setattr(dispatch, "kernel_kind", lambda fn: "function" if fn is not KERNEL else "raw")
    return eng


KERNEL = object()       # stands for a CuPy kernel computing 2x + 1


def test_pipeline_enqueues_the_next_chunk_before_waiting_on_the_last(fake):
    x = np.arange(10, dtype=np.float32)
    y = pmaprt.pmap(KERNEL, x, device="gpu", devices=[0], chunksize=2, streams=2)
    np.testing.assert_array_equal(y, 2 * x + 1)
    ops = [op for _, op in fake.log]
    # two chunks are in flight before the first wait, never three
    assert ops[:7] == ["h2d", "launch", "d2h", "h2d", "launch", "d2h", "wait"]
    in_flight = peak = 0
    for op in ops:
        in_flight += op == "h2d"
        in_flight -= op == "wait"
        peak = max(peak, in_flight)
    assert peak == 2 and in_flight == 0 and ops.count("wait") == 5


def test_pipeline_with_one_stream_is_serial(fake):
    pmaprt.pmap(KERNEL, np.zeros(6), device="gpu", devices=[0], chunksize=2, streams=1)
    ops = [op for _, op in fake.log]
    assert ops == ["h2d", "launch", "d2h", "wait"] * 3


@pytest.mark.parametrize("rows", [1, 3, 1001])
def test_pipeline_spreads_chunks_over_devices(fake, rows):
    fake.ndev = 4
    x = np.arange(rows, dtype=np.float64)
    y = pmaprt.pmap(KERNEL, x, device="gpu", chunksize=10)
    np.testing.assert_array_equal(y, 2 * x + 1)
    devs = {d for d, op in fake.log if op == "launch"}
    assert devs <= {0, 1, 2, 3} and len([1 for _, op in fake.log if op == "launch"]) == -(-rows // 10)


def test_pipeline_plain_function_learns_the_result_shape(fake):
    x = np.arange(24, dtype=np.int32).reshape(12, 2)
    y = pmaprt.pmap(lambda a: a.sum(axis=1, keepdims=True) * 0.5, x, device="gpu", chunksize=5)
    assert y.shape == (12, 1) and y.dtype == np.float64
    np.testing.assert_array_equal(y, x.sum(axis=1, keepdims=True) * 0.5)
    with pytest.raises(ValueError, match="one row per input row"):
        pmaprt.pmap(lambda a: a.sum(), x, device="gpu", chunksize=5)


def test_pipeline_device_input_function_allocates_on_device(fake):
    x = np.arange(9, dtype=np.float32).view(DevArray)
    y = pmaprt.pmap(lambda a: a * 3, x, device="gpu", chunksize=4)
    assert isinstance(y, DevArray)
    np.testing.assert_array_equal(np.asarray(y), np.arange(9) * 3)
    assert not any(op in ("h2d", "d2h") for _, op in fake.log)      # no host round trip


def test_pipeline_register_skips_staging_and_unregisters(fake):
    x = np.arange(7, dtype=np.float32)
    out = np.empty_like(x)
    assert pmaprt.pmap(KERNEL, x, device="gpu", out=out, register=True, chunksize=3) is out
    np.testing.assert_array_equal(out, 2 * x + 1)
    assert fake.registered[0] is x or np.shares_memory(fake.registered[0], x)
    assert fake.log[-1][1] == "unregister:1"


def test_pipeline_error_in_fn_reaches_the_caller(fake):
    def bad(a):
        raise KeyError("boom")
    with pytest.raises(KeyError, match="boom"):
        pmaprt.pmap(bad, np.zeros(50), device="gpu", chunksize=5)


def test_pipeline_out_shape_checked(fake):
    with pytest.raises(ValueError, match="out= has 3 rows, the input 4"):
        pmaprt.pmap(KERNEL, np.zeros(4), device="gpu", out=np.zeros(3))
    with pytest.raises(TypeError, match="must be a NumPy array"):
        pmaprt.pmap(KERNEL, np.zeros(4), device="gpu", out=[0, 0, 0, 0])
