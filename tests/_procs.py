"""Helpers of the process tests (reliability, failed starts, closure state):
functions the workers run, and bounded waits.

Functions here are module-level in an importable module: workers (given the
parent's sys.path) import them by name.
"""
import os
import signal
import time


def once(marker):
    """True the first time any process calls it with this marker path."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def kill_once_at(args):
    """x * x, but the first process to reach x == at SIGKILLs itself."""
    x, at, marker = args
    if x == at and once(marker):
        os.kill(os.getpid(), signal.SIGKILL)
    return x * x


def worker_pid(_=None):
    return os.getpid()


def square_work(x):
    """A few microseconds of pure-Python work."""
    s = 0
    for i in range(60):
        s += (x ^ i) & 7
    return x * x + s


def wait_until(pred, timeout, step=0.05):
    """Whether pred() became true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
