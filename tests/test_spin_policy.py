"""The spin gate (pmaprt/_spin.py): a waiter spins only where the machine has
a core for it. The decision is a pure function, checked on its inputs; the
pool is checked to deliver with every spin off (all wake-ups by futex)."""
import os
import subprocess
import sys
import textwrap

import pytest

from pmaprt import _spin
from pmaprt._spin import SAMPLE_S, SpinGate, read_runnable, spin_budget


@pytest.mark.parametrize("cores, runnable, spinners, machine, expect", [
    # an idle machine: spin
    (2, 1, 0, None, 50_000),
    (2, 2, 0, None, 50_000),        # the caller and the worker it waits for: one core each
    (16, 9, 0, None, 50_000),
    # every core taken and one more runnable: sleep at once
    (2, 3, 0, None, 0),
    (2, 6, 0, None, 0),             # two busy loops per core beside the pool
    (16, 17, 0, None, 0),
    # one core: the spin would hold the core the answer needs
    (1, 1, 0, None, 0),
    # the pool's awake processes (spinning or working) count, even where
    # the reading missed them: never more spinners than idle cores
    (2, 1, 1, None, 50_000),        # apply: one worker runs it, the caller spins on the other core
    (2, 1, 2, None, 0),             # a map on both workers of 2 cores: the caller sleeps
    (4, 1, 3, None, 50_000),
    (4, 1, 4, None, 0),
    (4, 4, 1, None, 50_000),
    (4, 5, 1, None, 0),
    # the runnable count is the machine's: a process on 2 of 8 CPUs
    (2, 5, 0, 8, 50_000),
    (2, 9, 0, 8, 0),
    # load unknown (no /proc): taken as idle
    (2, None, 1, None, 50_000),
    (2, None, 2, None, 0),
])
def test_spin_budget_decision(cores, runnable, spinners, machine, expect):
    assert spin_budget(cores, runnable, spinners, 50_000, machine) == expect


def test_no_spin_asked_is_no_spin():
    assert spin_budget(16, 1, 0, 0) == 0
    assert SpinGate(cores=16, machine=16, read=lambda: 1).budget(0) == 0


def test_read_runnable_parses_loadavg(tmp_path):
    p = tmp_path / "loadavg"
    p.write_bytes(b"0.57 0.60 1.03 3/88 30588\n")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert read_runnable(fd) == 3
    finally:
        os.close(fd)
    p.write_bytes(b"garbage\n")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert read_runnable(fd) is None
    finally:
        os.close(fd)


def test_gate_reads_this_machine():
    g = SpinGate()
    g.budget(1000)
    if os.path.exists("/proc/loadavg"):
        assert isinstance(g.runnable, int) and g.runnable >= 1   # the reader itself runs


def test_gate_rereads_at_most_every_sample():
    now = [0.0]
    reads = []
    values = iter([1, 5, 5, 1])

    def read():
        reads.append(now[0])
        return next(values)

    g = SpinGate(cores=2, machine=2, read=read, clock=lambda: now[0])
    assert g.budget(1000) == 1000          # 1 runnable: spin
    now[0] += SAMPLE_S / 2
    assert g.budget(1000) == 1000          # the same reading: no new read
    assert len(reads) == 1
    now[0] += SAMPLE_S
    assert g.budget(1000) == 1000          # 5 runnable once: a passing thread, still spin
    now[0] += SAMPLE_S
    assert g.budget(1000) == 0             # 5 runnable twice on 2 cores: sleep at once
    now[0] += SAMPLE_S
    assert g.budget(1000) == 1000          # the machine emptied: spin again
    assert len(reads) == 4


def test_gate_env_turns_spinning_off(monkeypatch):
    monkeypatch.setenv("PMAPRT_SPIN", "0")
    assert SpinGate(cores=16, machine=16, read=lambda: 1).budget(1000) == 0


def test_pool_delivers_with_every_spin_off():
    """No spin anywhere (parent and workers): every hand-over is a futex
    wake-up, and none is lost: maps, short maps and applies all finish."""
    code = textwrap.dedent("""
        import pmaprt
        from pmaprt import _spin
        assert _spin.gate.off
        def sq(x):
            return x * x
        with pmaprt.Pool(2) as p:
            for i in range(200):
                assert list(p.map(sq, range(10), inline=False)) == [x * x for x in range(10)]
                assert p.apply(sq, i) == i * i
            assert list(p.map(sq, range(5000), inline=False)) == [x * x for x in range(5000)]
            its = [p.map(sq, range(50), inline=False) for _ in range(4)]
            assert [list(it) for it in its] == [[x * x for x in range(50)]] * 4
        print("ok")
    """)
    env = dict(os.environ, PMAPRT_SPIN="0")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(_spin.__file__)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "ok"
