"""Handing a probed map to the workers while its first item still runs here.

A map over a list, tuple or range starts by running its first item in the
caller (inline.py). If that item turns out dear, the workers should not sit
idle until it ends: one helper thread per process, armed before the item and
disarmed after it, posts the job for the rest once the item has run
PROBE_HANDOFF_S. Arming costs two stores, disarming a lock (no thread is
started or woken per map while maps keep coming). The helper runs only the post (pickling the function, planning
the input) while the caller's thread runs fn: the post holds the pool's lock
as any post does; the caller reads the outcome after disarming.

After os.fork() the helper thread is gone in the child: a new one starts on
the child's first arm.
"""
import os
import threading
import time

_clock = time.monotonic


# One armed handoff is a list (cheaper to make than an object, per map):
# [post, deadline, state, result, error]; state: ARMED -> DISARMED, or
# ARMED -> RUNNING -> RAN.
POST, DEADLINE, STATE, RESULT, ERROR = range(5)
ARMED, DISARMED, RUNNING, RAN = range(4)


class HandoffThread:
    """The process's helper (see the module's text). While maps come, it
    looks for an armed handoff every POLL_S; after IDLE_S without one it
    sleeps until an arm wakes it. So a map that arms while it is looking
    costs two plain stores and a lock, and no thread switch."""

    POLL_S = 0.001
    IDLE_S = 0.5

    def __init__(self):
        self._reset()

    def _reset(self):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._armed = None
        self._active = False
        self._started = False

    def arm(self, post, delay):
        """post() runs on the helper after `delay` seconds unless disarmed."""
        h = [post, _clock() + delay, ARMED, None, None]
        self._armed = h
        if not self._active:
            with self._lock:
                self._active = True
                if not self._started:
                    self._started = True
                    threading.Thread(target=self._run, args=(self._cond,),
                                     name="pmaprt-handoff", daemon=True).start()
                self._cond.notify()
        return h

    def disarm(self, h):
        """(posted, result): whether post() ran, and what it returned (its
        exception is raised here)."""
        with self._lock:
            if h[STATE] == ARMED:
                h[STATE] = DISARMED
                if self._armed is h:
                    self._armed = None
                return False, None
            while h[STATE] == RUNNING:
                self._cond.wait()
        if h[ERROR] is not None:
            raise h[ERROR]
        return True, h[RESULT]

    def _run(self, cond):
        seen = _clock()
        while True:
            with cond:
                now = _clock()
                h = self._armed
                if h is None or h[STATE] != ARMED:
                    if now - seen > self.IDLE_S:
                        self._active = False
                        # an arm between the look above and this store: seen below
                        if self._armed is None or self._armed[STATE] != ARMED:
                            cond.wait()
                        self._active = True
                        seen = _clock()
                    else:
                        cond.wait(self.POLL_S)
                    continue
                seen = now
                if h[DEADLINE] > now:
                    cond.wait(min(self.POLL_S, h[DEADLINE] - now))
                    continue
                self._armed = None
                h[STATE] = RUNNING
            try:
                h[RESULT] = h[POST]()
            except BaseException as e:
                h[ERROR] = e
            with cond:
                h[STATE] = RAN
                cond.notify_all()


handoff = HandoffThread()
# The helper thread does not survive a fork (and its lock may have been held).
os.register_at_fork(after_in_child=handoff._reset)
