"""The joblib backend, through joblib.Parallel: results, exceptions,
generators, return_as="generator", nested calls, and that the work runs on
pmaprt's worker processes."""
import os
import threading
from concurrent.futures.process import _RemoteTraceback

import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

import pmaprt  # noqa: E402
import pmaprt.joblib as pj  # noqa: E402

pytestmark = pytest.mark.timeout(120)


class MyError(Exception):
    pass


def square(x):
    return x * x


def fail_on(x, bad):
    if x == bad:
        raise MyError("item %d failed" % x)
    return x


def where(_):
    return os.getpid()


def backend_name(_):
    """Which joblib backend a call inside a task gets, and its effective n_jobs."""
    from joblib.parallel import get_active_backend
    backend, n_jobs = get_active_backend()
    return type(backend).__name__, n_jobs


def nested_sum(n):
    # A Parallel call inside a task: joblib's nesting rule gives it threads.
    inner = Parallel(n_jobs=2)(delayed(square)(i) for i in range(n))
    return sum(inner), threading.current_thread().name


def nested_pmaprt(n):
    # Asking for this backend inside a worker: runs sequentially there.
    with parallel_config(backend="pmaprt"):
        return Parallel(n_jobs=2)(delayed(where)(i) for i in range(n))


def gen_items(n, log):
    for i in range(n):
        log.append(i)
        yield delayed(square)(i)


@pytest.fixture(scope="module", autouse=True)
def stop_backend_executors():
    yield
    pj.shutdown()


def test_registered_and_runs_on_pmaprt_workers():
    with parallel_config(backend="pmaprt"):
        out = Parallel(n_jobs=2)(delayed(square)(i) for i in range(100))
        pids = set(Parallel(n_jobs=2)(delayed(where)(i) for i in range(20)))
    assert out == [i * i for i in range(100)]
    assert os.getpid() not in pids
    assert pids <= set(pj._executor_for(2).pool.pids())


def test_many_small_calls_with_auto_batching():
    with parallel_config(backend="pmaprt"):
        out = Parallel(n_jobs=2, batch_size="auto")(delayed(square)(i) for i in range(5000))
    assert out == [i * i for i in range(5000)]


def test_exception_reaches_the_caller_with_its_type():
    with parallel_config(backend="pmaprt"):
        with pytest.raises(MyError, match="item 7 failed") as info:
            Parallel(n_jobs=2)(delayed(fail_on)(i, 7) for i in range(50))
    # As ProcessPoolExecutor: the standard library's _RemoteTraceback as the cause.
    assert type(info.value.__cause__) is _RemoteTraceback
    # The backend still works after an error.
    with parallel_config(backend="pmaprt"):
        assert Parallel(n_jobs=2)(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]


def test_input_generator_is_consumed_lazily():
    log = []
    with parallel_config(backend="pmaprt"):
        out = Parallel(n_jobs=2, pre_dispatch="2*n_jobs", batch_size=1)(gen_items(40, log))
    assert out == [i * i for i in range(40)]
    assert log == list(range(40))


def test_return_as_generator():
    with parallel_config(backend="pmaprt"):
        g = Parallel(n_jobs=2, return_as="generator")(delayed(square)(i) for i in range(30))
        assert not isinstance(g, list)
        first = next(g)
        rest = list(g)
        assert [first] + rest == [i * i for i in range(30)]
        g = Parallel(n_jobs=2, return_as="generator_unordered")(
            delayed(square)(i) for i in range(30))
        assert sorted(g) == sorted(i * i for i in range(30))


def test_return_as_generator_raises_at_the_failing_item():
    with parallel_config(backend="pmaprt"):
        g = Parallel(n_jobs=2, return_as="generator", batch_size=1)(
            delayed(fail_on)(i, 3) for i in range(10))
        got = []
        with pytest.raises(MyError):
            for x in g:
                got.append(x)
    # joblib raises an error as soon as it is known, so fewer results may
    # come first; never one past the failing item, never out of order.
    assert got == list(range(len(got))) and len(got) <= 3


def test_nested_calls_run_on_threads_inside_the_workers():
    with parallel_config(backend="pmaprt"):
        out = Parallel(n_jobs=2)(delayed(nested_sum)(n) for n in range(6))
    assert [s for s, _ in out] == [sum(i * i for i in range(n)) for n in range(6)]
    with parallel_config(backend="pmaprt"):
        names = Parallel(n_jobs=2)(delayed(backend_name)(i) for i in range(2))
    assert all(name == "ThreadingBackend" for name, _ in names)


def test_nested_pmaprt_backend_runs_sequentially_in_the_worker():
    with parallel_config(backend="pmaprt"):
        out = Parallel(n_jobs=2)(delayed(nested_pmaprt)(4) for _ in range(2))
    for pids in out:
        assert len(set(pids)) == 1 and pids[0] != os.getpid()


def test_n_jobs_one_runs_in_the_caller_and_zero_is_an_error():
    with parallel_config(backend="pmaprt"):
        assert Parallel(n_jobs=1)(delayed(where)(i) for i in range(3)) == [os.getpid()] * 3
        with pytest.raises(ValueError):
            Parallel(n_jobs=0)(delayed(square)(i) for i in range(3))


def test_on_a_given_pool():
    with pmaprt.Pool(2) as pool:
        with parallel_config(backend="pmaprt", pool=pool):
            pids = set(Parallel(n_jobs=-1)(delayed(where)(i) for i in range(10)))
        assert pids <= set(pool.pids())


def slow_square(x):
    import time
    time.sleep(0.01)
    return x * x


@pytest.mark.filterwarnings("ignore:.*tasks have been successfully executed:UserWarning")
def test_abandoned_generator_does_not_block_later_calls():
    with parallel_config(backend="pmaprt"):
        g = Parallel(n_jobs=2, return_as="generator", batch_size=1)(
            delayed(slow_square)(i) for i in range(200))
        assert next(g) == 0
        g.close()
        del g
        assert Parallel(n_jobs=2)(delayed(square)(i) for i in range(10)) == [i * i for i in range(10)]


# --- worker set-up, aborts and fork (drop-in for loky)


def set_initialized(status):
    status[os.getpid()] = "initialized"


def check_status(status):
    return status.get(os.getpid())


def blas_threads(_):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numpy  # noqa: F401
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def sleep_or_fail(i):
    if i == 0:
        raise MyError("first task failed")
    import time
    time.sleep(30)
    return i


def test_initializer_through_parallel_with_a_manager_dict():
    import multiprocessing
    with multiprocessing.Manager() as mgr:
        status = mgr.dict()
        out = Parallel(n_jobs=2, backend="pmaprt", initializer=set_initialized,
                       initargs=(status,))(delayed(check_status)(status) for _ in range(20))
        assert out == ["initialized"] * 20
        with parallel_config(backend="pmaprt", n_jobs=2, initializer=set_initialized,
                             initargs=(status,)):
            assert Parallel()(delayed(check_status)(status) for _ in range(4)) == ["initialized"] * 4
        # The same set-up reuses the executor; another one replaces it.
        ex = pj.executors()
        Parallel(n_jobs=2, backend="pmaprt", initializer=set_initialized,
                 initargs=(status,))(delayed(check_status)(status) for _ in range(4))
        assert pj.executors() == ex
        other = mgr.dict()
        Parallel(n_jobs=2, backend="pmaprt", initializer=set_initialized,
                 initargs=(other,))(delayed(check_status)(other) for _ in range(4))
        assert pj.executors() != ex


@pytest.mark.parametrize("inner", [None, 2])
def test_inner_max_num_threads_caps_blas_in_workers(inner):
    pytest.importorskip("threadpoolctl")
    cores = pmaprt._options.CORES
    with parallel_config(backend="pmaprt", inner_max_num_threads=inner):
        out = Parallel(n_jobs=2)(delayed(blas_threads)(i) for i in range(2))
    want = inner if inner is not None else max(1, cores // 2)
    assert all(t and all(n == want for n in t) for t in out), out


def test_an_error_stops_the_running_tasks_so_the_next_call_does_not_wait():
    import time
    Parallel(n_jobs=2, backend="pmaprt")(delayed(square)(i) for i in range(4))   # warm
    with pytest.raises(MyError):
        Parallel(n_jobs=2, backend="pmaprt", batch_size=1)(
            delayed(sleep_or_fail)(i) for i in range(4))
    t0 = time.monotonic()
    assert Parallel(n_jobs=2, backend="pmaprt")(delayed(square)(i) for i in range(4)) == \
        [0, 1, 4, 9]
    # Behind the abandoned 30 s tasks it would take 30 s; a fresh executor
    # starts in well under that even on a loaded machine.
    assert time.monotonic() - t0 < 20


FORK_CHILD_TIMEOUT_S = 60


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_backend_used_in_a_parent_then_in_a_forked_child():
    import time
    assert Parallel(n_jobs=2, backend="pmaprt")(delayed(square)(i) for i in range(6)) == \
        [i * i for i in range(6)]
    parent_pids = {pid for ex in pj.executors() for pid in ex.pids()}
    pid = os.fork()
    if pid == 0:    # the child: exits with 0 only if the backend works here
        code = 1
        try:
            out = Parallel(n_jobs=2, backend="pmaprt")(delayed(where)(i) for i in range(6))
            mine = {p for ex in pj.executors() for p in ex.pids()}
            code = 0 if len(out) == 6 and not (set(out) & parent_pids) and mine else 2
            pj.shutdown()
        finally:
            os._exit(code)
    deadline = time.monotonic() + FORK_CHILD_TIMEOUT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung using the joblib backend")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's executor still works.
    assert Parallel(n_jobs=2, backend="pmaprt")(delayed(square)(i) for i in range(3)) == [0, 1, 4]
