"""Sleep and wake-up, both ways: idle workers, the hot spinner, a waiting parent.

Nobody polls for long: a waiter spins briefly on its word, then sleeps on it
in the kernel (a futex). A waker always changes the word first and calls the
kernel only when the sleepers' count says someone sleeps; the C wait counts
itself in that word before it sleeps and the kernel refuses to sleep once
the word has changed, so no wake-up is lost between a check and a sleep.
Every spin here asks the spin gate first (_spin.py): on a machine whose
runnable threads leave no core for the spinner, the waiter sleeps at once.

Workers waiting for work (board.py posts it):

1. A post stores the job in its slot, then bumps H_BOARD_SEQ, and calls
   wake on it only if H_BOARD_SLEEPERS is non-zero (`wake_workers`): an
   index map open to every worker wakes one (none if the hot spinner takes
   it, step 4), a task one, other jobs every worker or one per item.
2. An idle worker reads H_BOARD_SEQ before it looks at the board. Finding
   nothing, it spins WORKER_SPIN_NS on the word, then counts itself in
   H_BOARD_SLEEPERS and sleeps while the word holds the value it read, for
   IDLE_TIMEOUT_S at most (then it checks that its parent is alive).

The hot spinner (Pool.apply and Executor.submit loops):

3. A worker that has just finished work takes H_HOT_SPINNER (0 -> rank + 1)
   and spins HOT_SPIN_NS on H_BOARD_SEQ without counting itself a sleeper. A
   worker answering a task takes the word just before its result goes out
   (ring.py, task.py), so that the caller's next task finds it awake.
4. A task's or an index map's post that finds the word held and not yet
   claimed sets HOT_CLAIMED in it (compare-and-swap) *before* it bumps the
   sequence, and skips the wake call. One post per hold may skip it; later
   posts wake a sleeper as usual.
5. The spinner gives the word back when its spin ends or as it starts work,
   and looks at the board. Any worker that joins a job while a later job
   on the board has work, and someone sleeps, wakes one sleeper for it
   (board.py, `work_once`); any worker that claims its first chunk of a map
   since it entered it wakes, if the map has items left to claim, up to
   min(nwork - 1, items left) sleepers (`pay_wake`, chunk.py): at that
   claim if it does not know the items' cost or expects the chunk to take
   WAKE_AFTER_S or more; else at its first claim WAKE_AFTER_S or more after
   it entered. Found with nothing left to claim (its own chunk holds the
   rest), the wake stays owed to its next claim: a preempted chunk gives
   its rest back. So a post that woke one worker, or none, still gets every
   worker it can use, one hop later, and a short map of cheap items that
   one worker takes whole wakes no other: no wake call in that worker, and
   no second process on a core to stop the parent's spin.
6. A worker killed holding the word: the parent clears it and wakes every
   worker (`_release_dead_hot_spinner`, from processes.py).

A parent waiting for results (ring.py delivers them):

7. A worker stores its ring's W_TAIL, bumps H_RESULTS_SEQ, and calls wake
   only if H_PARENT_SLEEPING is non-zero and the record is one the parent
   waits for: H_PARENT_WANT is 0 (anything) or (slot + 1) << WANT_SHIFT | the
   position an ordered map's consumer needs; a record that is not a plain
   result always wakes.
8. The parent (`wait`) reads H_RESULTS_SEQ, drains every ring, and returns
   if its job has news. Else it stores what it waits for in H_PARENT_WANT
   (only while it is the one waiting thread; 0 with more), spins, then counts
   itself in H_PARENT_SLEEPING and sleeps while the sequence holds the value
   it read, for POLL_S at most (then it checks the workers).
9. A cost estimate can be wrong (one function, one dear call among cheap
   ones), and a worker inside a dear item claims nothing more: so an index
   map whose post woke one worker carries a deadline (`wake_due`,
   WAKE_AFTER_S after the post), and the parent, waiting for it past the
   deadline, wakes the other workers if the map still has items to claim
   (`_wake_rest`).
"""
import time

from .._errors import PoolClosedError
from .._options import CORES
from .._sched import SHORT_WORK_S
from .._spin import gate
from .._shm import (
    H_BOARD_SEQ, H_BOARD_SLEEPERS, H_DEATHS, H_HOT_SPINNER, H_PARENT_SLEEPING, H_PARENT_WANT,
    H_RESULTS_SEQ, HOT_CLAIMED, S_GEN, S_LIMIT, S_NEXT,
)
from .claims import slot_has_work
from .processes import POLL_S

# Every spin below is what a waiter spins on an idle machine; the spin
# gate (_spin.py) cuts it to 0 whenever the machine's runnable threads do
# not leave the spinner a core of its own, read afresh every few ms.
#
# The parent spins this long for a result before it sleeps (round trips,
# short maps): long enough for a short map on one worker (its claim, items
# and record: 50-150 us on a small VM), which a sleeping parent would see
# only after a wake-up of 50-250 us.
SPIN_NS = 200_000
# The parent waiting for one task (Pool.apply) spins this long first: a tiny
# call answers within it, and a waiting parent has nothing else to run.
TASK_SPIN_NS = 50_000
# A worker spins this long before it sleeps on a futex (for work, or for ring
# space). Long enough to catch the next job of a tight submit loop without a
# system call, short enough not to take a core from the user's work when
# nothing comes. Under 4 cores the hot spinner (below) alone spins: the
# other idle workers would take the cores the caller and the working
# workers need.
WORKER_SPIN_NS = 50_000 if CORES >= 4 else 0
# A worker that has just finished work, if no other worker holds the hot
# spinner word, spins this long for the next job before it sleeps: a loop of
# calls then finds it awake and posts without a wake call, which costs tens
# to hundreds of microseconds each way on a small VM. Long enough to cover
# the caller's turn between two short maps (taking one's results, building
# the next: 100-250 us there); at most this much of one otherwise idle core
# at the end of a burst of calls. One hot spinner at most.
HOT_SPIN_NS = 500_000
# A sleeping worker wakes this often to check that its parent is alive.
IDLE_TIMEOUT_S = 1.0
# A map of cheap items runs on the one worker its post woke until it has
# run this long (steps 5 and 9; _sched.SHORT_WORK_S says why).
WAKE_AFTER_S = SHORT_WORK_S


def wake_sleepers(r, count):
    """Move H_BOARD_SEQ, then wake up to `count` workers asleep on it, if
    any sleeps. The word moves first: a sleeper's wait compares it and
    sleeps again if it still holds the value the sleeper last read, so a
    wake-up alone, for work already on the board, could be lost."""
    r.add32(H_BOARD_SEQ, 1)
    if r.load32(H_BOARD_SLEEPERS):
        r.wake32(H_BOARD_SEQ, count)


def _enter_wait(res, want):
    """Count a thread into a futex wait on the control segment (which must
    not be unmapped under it), and publish what it waits for."""
    with res.waiters_lock:
        res.waiters += 1
        ctl = res.ctl
        if ctl is not None:
            # One waiter may name the record it waits for; with more than
            # one, any record may be someone's.
            ctl.region.store64(H_PARENT_WANT, want if res.waiters == 1 else 0)


def _leave_wait(res):
    with res.waiters_lock:
        res.waiters -= 1


class ParentWake:
    """The parent's side (a runtime mixin): waking workers, waiting for results."""

    def wake_workers(self, count=1 << 30, hot=False):
        """Tell idle workers the board moved; wake up to `count` sleepers.
        hot: a task or an index map that the hot spinner, if one spins, may
        take instead (step 4)."""
        r = self._r
        if hot:
            # Step 4. Claimed before the sequence moves: the spinner, which
            # gives the word back as soon as it sees the sequence move, cannot
            # slip in between.
            h = r.load64(H_HOT_SPINNER)
            if h and not h & HOT_CLAIMED and r.cas64(H_HOT_SPINNER, h, h | HOT_CLAIMED):
                r.add32(H_BOARD_SEQ, 1)
                return
        wake_sleepers(r, count)

    def awake_workers(self):
        """Workers on a core now, working or spinning: the started ones less
        those asleep on the board (one asleep for ring space counts as awake:
        the gate errs toward sleeping)."""
        return max(0, self.started - self._r.load32(H_BOARD_SLEEPERS))

    def _release_dead_hot_spinner(self, w):
        """Step 6: worker w died; if it held the hot spinner word, a task
        posted since then woke no one: the others look now. Lock held."""
        r = self._r
        h = r.load64(H_HOT_SPINNER)
        if h & ~HOT_CLAIMED == w + 1 and r.cas64(H_HOT_SPINNER, h, 0):
            self.wake_workers()

    def wait(self, job, spin_ns=None):
        """Wait until something arrives for any job (or POLL_S passes)."""
        r = self._r
        if r is None or self._res.ctl is None:
            raise PoolClosedError("pmaprt: the pool was terminated while a map was running")
        seq = r.load32(H_RESULTS_SEQ)
        with self._lock:
            got = self._drain()
            if time.monotonic() - self._last_check > POLL_S \
                    or r.load32(H_DEATHS) != self._deaths_seen:
                self._check_workers()
            else:
                self._flush_all()
        if got or job.has_news():
            return
        # Step 9: sleep no later than the map's wake deadline.
        timeout = POLL_S
        if job.wake_due is not None:
            timeout = job.wake_due - time.perf_counter()
            if timeout <= 0:
                self._wake_rest(job)
                timeout = POLL_S
        res = self._res
        _enter_wait(res, job.wait_key())
        try:
            if res.ctl is None:
                raise PoolClosedError("pmaprt: the pool was terminated while a map was running")
            # H_PARENT_SLEEPING counts the parent only while it sleeps in the
            # kernel: a worker that finds it spinning skips the wake call.
            spin = gate.budget(SPIN_NS if spin_ns is None else spin_ns, self.awake_workers())
            changed = r.wait32(H_RESULTS_SEQ, seq, timeout, min(spin, int(timeout * 1e9)),
                               H_PARENT_SLEEPING)
        finally:
            _leave_wait(res)
        with self._lock:
            if self._r is None or self._res.ctl is None:
                return      # terminated meanwhile: the caller's next wait says so
            # What woke this wait is handed over now, not on the next call.
            self._drain()
            if r.load32(H_DEATHS) != self._deaths_seen or not (changed or timeout < POLL_S):
                self._check_workers()
            elif not changed:
                self._wake_rest(job)

    def _wake_rest(self, job):
        """Step 9: the map posted with one wake-up still runs past its
        deadline: the sleepers it can use look at the board now."""
        job.wake_due = None
        r, off = self._r, job.off
        if r is not None and r.load32(H_BOARD_SLEEPERS) and r.load64(off + S_GEN) == job.gen \
                and slot_has_work(r, off, off + self._layout.retry_off):
            wake_sleepers(r, self.workers - 1)


class WorkerWake:
    """The worker's side (a worker mixin): its sleep and the hot spinner.
    State: hot_held (this worker holds H_HOT_SPINNER), owe_wake (a task's
    post skipped its wake call on this worker's word)."""

    def _init_wake(self):
        self.hot_held = False
        self.owe_wake = False

    def pay_wake(self, off, nwork):
        """Step 5, for a map: this worker, inside the map in slot offset
        `off`, has claimed a chunk it does not expect to end soon, or ran the
        map WAKE_AFTER_S; if items are left to claim, it wakes the sleepers
        the map can use (one per item left, at most nwork - 1). False if no
        item was left to claim (this worker's chunk holds the rest): the wake
        is still owed, as a preempted chunk may give items back."""
        r = self.r
        if nwork < 2:
            return True
        if not self.has_work(off):
            return False
        if r.load32(H_BOARD_SLEEPERS):
            left = r.load64(off + S_LIMIT) - r.load64(off + S_NEXT)
            wake_sleepers(r, max(1, min(nwork - 1, left)))
        return True

    def hot_spin(self, seq):
        """Steps 3 and 5, after work: spin for the next job holding the hot
        spinner word, then give it back. True if the board should be looked
        at again now (it moved, or a post relied on this spin)."""
        r = self.r
        if not (self.hot_held or r.cas64(H_HOT_SPINNER, 0, self.rank + 1)):
            return False
        self.hot_held = True
        # Spin only (timeout 0). A post that marked the word claimed bumped
        # the sequence after it, so its task is on the board.
        changed = r.wait32(H_BOARD_SEQ, seq, 0, gate.budget(HOT_SPIN_NS, self.awake_peers()))
        return self._release_hot() or changed

    def sleep(self, seq):
        """Step 2: sleep until the board moves past `seq` (False: timed out).
        Counted in H_BOARD_SLEEPERS only once asleep in the kernel: while this
        worker spins, a post needs no wake call."""
        return self.r.wait32(H_BOARD_SEQ, seq, IDLE_TIMEOUT_S,
                             gate.budget(WORKER_SPIN_NS, self.awake_peers()), H_BOARD_SLEEPERS)

    def awake_peers(self):
        """The pool's other workers on a core now (the pool's started count
        is the parent's: unstarted ones count as awake, erring toward sleep)."""
        return max(0, self.layout.nworkers - 1 - self.r.load32(H_BOARD_SLEEPERS))

    def _release_hot(self):
        """Give H_HOT_SPINNER back; True (and owe_wake set) if a task's post
        relied on it (skipped its wake call)."""
        r = self.r
        self.hot_held = False
        while True:
            h = r.load64(H_HOT_SPINNER)
            if r.cas64(H_HOT_SPINNER, h, 0):
                break
        if h & HOT_CLAIMED:
            self.owe_wake = True
            return True
        return False
