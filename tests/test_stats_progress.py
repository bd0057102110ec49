"""What a user reads of a map: ``it.stats`` (a short repr, ``summary()``,
the full chunk log behind attributes) and the ``progress=True`` bar."""
import builtins
import sys

import pytest

import pmaprt
from pmaprt._stats import MapStats, WorkerStats, describe_mode


def square(x):
    return x * x


def _stats_with_many_chunks(n_chunks=20_000):
    st = MapStats(mode="index", workers=[WorkerStats(0), WorkerStats(1)], t0=0.0)
    for k in range(n_chunks):
        st.record(k % 2, 4 * k, 4, 1e-5 * k, 1e-5 * k + 5e-6, k % 7 == 0)
    st.finish(0.5)
    return st


def test_repr_is_one_line_per_worker_at_most():
    st = _stats_with_many_chunks()
    text = repr(st)
    lines = text.splitlines()
    assert len(lines) == 1 + len(st.workers)
    assert lines[0] == ("MapStats(mode='index', items=80000, wall=0.5000s, chunks=20000, "
                        "steals=2858)")
    assert "chunk_log=<10000 entries>" in lines[1]
    assert len(text) < 400   # the log (20,000 tuples) stays behind its attribute


def test_full_log_behind_attributes_and_summary():
    st = _stats_with_many_chunks(10)
    log = st.chunk_log
    assert len(log) == 10 and log[0] == (0, 0.0, 5e-6, 0, 4)
    assert [row[1] for row in log] == sorted(row[1] for row in log)   # in start order
    assert len(st.workers[1].chunk_log) == 5 and st.chunksizes == [4] * 10
    s = st.summary()
    assert s == str(st)
    assert s.splitlines()[1] == "  ran on the workers, items read by index from shared memory"
    assert "worker 1: items=20 chunks=5" in s


def test_mode_in_words():
    assert describe_mode("index+inline") == (
        "on the workers, items read by index from shared memory; then in the calling "
        "process (items cheaper to run than to ship)")
    assert describe_mode("") == "not started"


def test_real_map_stats_repr_is_short():
    with pmaprt.Pool(2) as pool:
        it = pool.map(square, range(5000), chunksize=10, inline=False)
        assert list(it) == [x * x for x in range(5000)]
    assert len(repr(it.stats).splitlines()) <= 1 + 2
    log = it.stats.chunk_log
    assert len(log) == sum(len(w.chunk_log) for w in it.stats.workers) == it.stats.chunks
    assert sum(row[4] for row in log) == 5000


def test_progress_bar_is_labelled_with_a_total(capsys):
    pytest.importorskip("tqdm")
    with pmaprt.Pool(2) as pool:
        assert list(pool.map(square, range(300), progress=True)) == [x * x for x in range(300)]
        err = capsys.readouterr().err
        assert "square:" in err and "300/300" in err
        # a generator has no length: a count, with its total once it ends
        gen = (x for x in range(50))
        assert list(pool.map(square, gen, progress=True)) == [x * x for x in range(50)]
        err = capsys.readouterr().err
        assert "square:" in err and "50/50" in err


def test_progress_without_tqdm_names_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_tqdm(name, *a, **kw):
        if name == "tqdm" or name.startswith("tqdm."):
            raise ModuleNotFoundError("No module named 'tqdm'")
        return real_import(name, *a, **kw)

    for m in [m for m in sys.modules if m == "tqdm" or m.startswith("tqdm.")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with pmaprt.Pool(2) as pool:
        with pytest.raises(ImportError, match=r"progress=True needs tqdm.*pip install tqdm"):
            pool.map(square, range(10), progress=True)
        # the pool is unharmed: no job was posted
        assert list(pool.map(square, range(10))) == [x * x for x in range(10)]
