"""Session-wide hygiene: a test run must leave no worker processes and no
shared-memory names behind.

At session start the fixture records the entries of /dev/shm and this
process's child processes; at session end it stops the default pool
(``pmaprt.shutdown()``) and, after a grace period for processes to exit,
fails the session if a new /dev/shm entry or a child process remains.

Not counted: the standard library's per-process helpers (multiprocessing's
resource tracker and forkserver, started by tests that compare against
multiprocessing; they live as long as this process by design), and POSIX
named semaphores and joblib/loky entries in /dev/shm (pmaprt uses futexes and
anonymous memfd segments, never named ones; those names belong to the
libraries the benchmarks compare against, or to other processes on the
machine).
"""
import gc
import os
import time

import psutil
import pytest

from _waits import wait_for

SHM_DIR = "/dev/shm"
STDLIB_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
FOREIGN_SHM_PREFIX = "sem."        # POSIX named semaphores
FOREIGN_SHM_WORDS = ("loky", "joblib")


def shm_entries():
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return set()
    return {n for n in names if not n.startswith(FOREIGN_SHM_PREFIX)
            and not any(w in n for w in FOREIGN_SHM_WORDS)}


def _is_stdlib_helper(proc):
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(h in cmd for h in STDLIB_HELPERS)


def child_processes():
    """This process's descendants, zombies included (an unreaped child is a
    leak too), less the standard library's long-lived helpers."""
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in kids if not _is_stdlib_helper(p)]


def describe(procs):
    out = []
    for p in procs:
        try:
            out.append("pid %d %s: %s" % (p.pid, p.status(), " ".join(p.cmdline())[:200]))
        except psutil.Error:
            out.append("pid %d (gone)" % p.pid)
    return out


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes_or_shm():
    shm_before = shm_entries()
    kids_before = {p.pid for p in child_processes()}
    yield
    import pmaprt

    pmaprt.shutdown()
    gc.collect()  # pools dropped without close() are terminated by their finalizers

    def new_kids():
        return [p for p in child_processes() if p.pid not in kids_before]

    def new_shm():
        return sorted(shm_entries() - shm_before)

    wait_for(lambda: not new_kids() and not new_shm())
    left = new_kids()
    assert not left, "child processes left at the end of the session:\n" + "\n".join(describe(left))
    shm = new_shm()
    assert not shm, "new /dev/shm entries left at the end of the session: %s" % shm
