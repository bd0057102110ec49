"""The Dask backend on a real LocalCluster: two worker processes on loopback,
one thread each, started and stopped here. Ordered results, an exception in
a task, a scattered array, and a killed Dask worker (Dask reruns its chunk;
when Dask gives up, a clear WorkerCrashedError)."""
import os
import pickle
import signal
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402

import pmaprt  # noqa: E402
from pmaprt import pmap  # noqa: E402
from pmaprt.dask import DaskBackend, SCATTER_BYTES  # noqa: E402

pytestmark = pytest.mark.timeout(180)


class MyError(Exception):
    pass


def square(x):
    return x * x


def jittered(x):
    # later items finish first: order must come from the backend, not timing
    time.sleep(0.02 if x % 5 == 0 else 0.0)
    return x * 10


def fail_on(x, bad):
    if x == bad:
        raise MyError("item %d failed" % x)
    return x


def row_sum(row):
    return float(row.sum())


def kill_once(x, marker):
    """Kills its Dask worker process the first time item 3 runs."""
    if x == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return x + 1


def kill_always(x):
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.fixture(scope="module")
def backend():
    # Dask gives up on a chunk after it killed this many workers (default 3):
    # keeps the crash test short. The scheduler runs in this process.
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, silence_logs=50)
        client = distributed.Client(cluster, timeout=60)
        try:
            client.wait_for_workers(2, timeout=60)
            yield DaskBackend(client)
        finally:
            client.close(timeout=30)
            cluster.close(timeout=30)


def test_ordered_results(backend):
    xs = list(range(60))
    assert list(backend.map(jittered, xs)) == [x * 10 for x in xs]
    assert list(backend.map(square, iter(range(1000)))) == [x * x for x in range(1000)]
    assert sorted(backend.map(jittered, xs, ordered=False)) == [x * 10 for x in xs]
    assert list(backend.map(pow, range(5), [2] * 7)) == [x ** 2 for x in range(5)]


def test_exception_in_a_task(backend):
    it = backend.map(fail_on, range(40), [17] * 40, chunksize=4)
    got = []
    with pytest.raises(MyError, match="item 17 failed") as info:
        for x in it:
            got.append(x)
    assert got == list(range(17))
    assert isinstance(info.value.__cause__, pmaprt.RemoteTraceback)
    assert "fail_on" in str(info.value.__cause__)


def test_large_array_is_scattered_once(backend):
    a = np.arange(4 * SCATTER_BYTES // 8, dtype=np.float64).reshape(-1, 512)
    sent = []
    client = backend.client
    real_submit = client.submit

    def spy(fn, *args, **kw):
        sent.append(len(pickle.dumps([x for x in args if not isinstance(x, distributed.Future)])))
        return real_submit(fn, *args, **kw)

    client.submit = spy
    try:
        out = list(backend.map(row_sum, a))
    finally:
        del client.submit
    assert out == [float(r.sum()) for r in a]
    assert len(sent) > 1 and max(sent) < a.nbytes // 10  # chunks carry ranges, not rows


def test_lazy_with_a_bound_on_chunks_in_flight(backend):
    pulled = []

    def gen():
        for i in range(10 ** 9):
            pulled.append(i)
            yield i

    it = backend.map(square, gen())
    assert [next(it) for _ in range(5)] == [0, 1, 4, 9, 16]
    it.close()
    assert len(pulled) < 10000


def test_killed_worker_chunk_is_rerun(backend, tmp_path):
    marker = str(tmp_path / "killed")
    out = list(backend.map(kill_once, range(8), [marker] * 8, chunksize=1))
    assert os.path.exists(marker)  # a worker really died
    assert out == [x + 1 for x in range(8)]
    backend.client.wait_for_workers(2, timeout=60)


def test_killed_worker_past_retries_is_a_clear_error(backend):
    # Dask counts a death against every task assigned to the dead worker, so a
    # task queued beside the killer (item 1 or 3) may be given up on first.
    with pytest.raises(pmaprt.WorkerCrashedError, match=r"items [123]\.\.[123] of this map") as info:
        list(backend.map(kill_always, range(4), chunksize=1))
    assert info.value.items in ((1, 2), (2, 3), (3, 4))
    backend.client.wait_for_workers(2, timeout=60)


def test_collectives_and_bad_options_are_clear_errors(backend):
    with pytest.raises(NotImplementedError, match="collectives"):
        backend.map(square, range(3), axis_name="batch")
    with pytest.raises(NotImplementedError, match="collectives"):
        pmap(square, range(3), backend="dask", axis_name="batch")
    with pytest.raises(ValueError, match="unknown backend"):
        pmap(square, range(3), backend="spark")
    with pytest.raises(TypeError, match="address"):
        pmap(square, range(3), address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="chunksize"):
        backend.map(square, range(3), chunksize=0)
    assert list(pmap(square, range(4), backend="dask", client=backend.client)) == [0, 1, 4, 9]


def test_pmap_with_a_scheduler_address(backend):
    address = backend.client.scheduler.address
    assert address.startswith("tcp://127.0.0.1:")
    it = pmap(square, range(50), backend="dask", address=address)
    assert list(it) == [x * x for x in range(50)]
