"""Exceptions raised by pmaprt, rooted in the standard library's types."""
from concurrent.futures.process import BrokenProcessPool
import signal


class WorkerCrashedError(BrokenProcessPool):
    """A worker process died (killed by a signal, or exited) while it held work.

    Attributes: ``pid``, ``exitcode`` (negative: the signal number, as
    ``subprocess`` reports it), ``items`` (the ``(start, stop)`` index range
    the worker held, or None).
    """

    def __init__(self, message, pid=None, exitcode=None, items=None):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.items = items


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, set as its ``__cause__``."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


class PoolClosedError(RuntimeError):
    """The pool was closed or terminated; create a new one."""


def oom_hint(exitcode):
    """A sentence to add when the exit looks like the out-of-memory killer."""
    if exitcode is not None and exitcode == -signal.SIGKILL:
        return " (SIGKILL is often the out-of-memory killer)"
    return ""


def describe_exit(exitcode):
    """'was killed by signal SIGKILL (9)' or 'exited with code 3'."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = "signal %d" % -exitcode
        return "was killed by signal %s (%d)" % (name, -exitcode)
    return "exited with code %d" % exitcode
