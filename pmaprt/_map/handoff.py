"""Handing a probed map to the workers while one of its items still runs here.

A map over a list, tuple or range starts by running its first item, then
timed pieces, in the caller (inline.py). If an item turns out dear, the
workers should not sit idle until it ends: one helper thread per process,
armed before the first item and before each piece and disarmed after it,
posts the job for the rest once the item has run PROBE_HANDOFF_S (a piece:
PROBE_HANDOFF_S past its budget; the helper first cuts the piece after the
item running, collect.py). Arming costs a few stores, disarming a list pop
(no lock, no thread started or woken per map or piece while maps keep
coming). The helper runs only the post (pickling the function, planning
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
# [post, deadline, done, result, error], in a one-element box that the
# helper and the caller both try to pop: list.pop is atomic, so exactly one
# of them takes it, with no lock on the caller's path.
POST, DEADLINE, DONE, RESULT, ERROR = range(5)


class HandoffThread:
    """The process's helper (see the module's text). While maps come, it
    looks for an armed handoff every POLL_S; after IDLE_S without one it
    sleeps until an arm wakes it. So a map that arms while it is looking
    costs a few stores, and disarming a pop: no lock, no thread switch."""

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
        h = [post, _clock() + delay, False, None, None]
        box = [h]
        self._armed = box
        if not self._active:
            with self._lock:
                self._active = True
                if not self._started:
                    self._started = True
                    threading.Thread(target=self._run, args=(self._cond,),
                                     name="pmaprt-handoff", daemon=True).start()
                self._cond.notify()
        return box, h

    def disarm(self, armed):
        """(posted, result): whether post() ran, and what it returned (its
        exception is raised here)."""
        box, h = armed
        try:
            box.pop()
            return False, None
        except IndexError:
            pass            # the helper took it: wait for its post
        with self._cond:
            while not h[DONE]:
                self._cond.wait()
        if h[ERROR] is not None:
            raise h[ERROR]
        return True, h[RESULT]

    def _run(self, cond):
        seen = _clock()
        while True:
            with cond:
                now = _clock()
                box = self._armed
                if not box:
                    if now - seen > self.IDLE_S:
                        self._active = False
                        # an arm between the look above and this store: seen below
                        if not self._armed:
                            cond.wait()
                        self._active = True
                        seen = _clock()
                    else:
                        cond.wait(self.POLL_S)
                    continue
                seen = now
                try:
                    h = box[0]
                except IndexError:
                    continue        # disarmed since the look above
                if h[DEADLINE] > now:
                    cond.wait(min(self.POLL_S, h[DEADLINE] - now))
                    continue
                try:
                    box.pop()
                except IndexError:
                    continue        # the caller disarmed first
                if self._armed is box:
                    self._armed = None
            try:
                h[RESULT] = h[POST]()
            except BaseException as e:
                h[ERROR] = e
            with cond:
                h[DONE] = True
                cond.notify_all()


handoff = HandoffThread()
# The helper thread does not survive a fork (and its lock may have been held).
os.register_at_fork(after_in_child=handoff._reset)
