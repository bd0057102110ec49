"""A crash in fn (a segfault, os._exit) gives the same outcome for the same
call whatever ran before it: nothing is remembered from one map to the next.

Under inline="auto" a map over a list, tuple or range runs its first item in
the calling process, as map would, so a crash there ends the caller, in a
fresh process and after any number of earlier maps alike. With inline=False
(or retries=, timeout=, on_error=) every item runs on a worker and a crash is
a WorkerCrashedError. Each case runs in a process of its own, under a timeout."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import os, signal, sys
sys.path.insert(0, %(repo)r)
import pmaprt

def segv_at_zero(x):
    if x == 0:
        os.kill(os.getpid(), signal.SIGSEGV)
    return x + 1

if %(primed)r:
    # Earlier maps of the same function, cheap and crash-free.
    for _ in range(6):
        assert list(pmaprt.pmap(segv_at_zero, [1] * 20000)) == [2] * 20000
        assert list(pmaprt.pmap(segv_at_zero, range(1, 11))) == list(range(2, 12))
try:
    print(list(pmaprt.pmap(segv_at_zero, [0] + [1] * 99, **%(kw)r))[:3])
except pmaprt.WorkerCrashedError as e:
    print("WorkerCrashedError", "SIGSEGV" in str(e))
sys.stdout.flush()
"""


def outcome(primed, **kw):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT % dict(
        repo=REPO, primed=primed, kw=kw))], capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout.strip()


def test_a_crash_on_the_first_item_ends_the_caller_fresh_or_not():
    fresh = outcome(False)
    assert fresh == (-signal.SIGSEGV, ""), fresh
    assert outcome(True) == fresh


@pytest.mark.parametrize("kw", [dict(inline=False), dict(retries=0, timeout=60),
                                dict(on_error="raise", inline=False)])
def test_with_workers_only_a_crash_is_a_worker_crashed_error_fresh_or_not(kw):
    fresh = outcome(False, **kw)
    assert fresh == (0, "WorkerCrashedError True"), fresh
    assert outcome(True, **kw) == fresh
