"""The job board: slots in the control segment that hold the jobs being run.

Every map and every task is a job in one slot. A slot is reused once its job
is over and every worker that entered it has left.

Protocol, step by step:

1. Post (parent, lock held): find a slot that is SLOT_FREE, or SLOT_CLOSED
   with S_REFS == 0 (no worker inside). Store S_STATE = SLOT_FREE first (a
   worker that reads the slot meanwhile skips it), then the job's words: a
   new S_GEN (ids only increase), mode, flags, counts, S_CANCEL = 0, its
   range words cleared, its descriptor (inline at desc_off, or a segment id
   and offset). Then S_STATE = SLOT_ACTIVE and the slot's bit in
   H_ACTIVE_MASK, and wake workers (wake.py).
2. Find (worker): read H_ACTIVE_MASK; for each active slot read S_GEN, and
   take the oldest job first that has work for this rank (rank < S_NWORK,
   not cancelled, items or chunks left to claim).
3. Enter (worker): add 1 to S_REFS, then store slot + 1 in W_SLOT (the
   reference first: a kill between the two leaks a reference rather than
   letting the parent drop one that is not held). Read S_STATE, S_GEN and
   S_CANCEL again: the job may have ended, and the slot been posted again,
   between 2 and 3. Run its chunks (chunk.py) while it has any.
4. Leave (worker): W_SLOT = 0, then S_REFS - 1.
5. Retire (parent, lock held, the job over): if the slot still holds this
   S_GEN, S_CANCEL = 1 (workers stop claiming), S_STATE = SLOT_CLOSED, clear
   its bit in H_ACTIVE_MASK. The slot is free again once S_REFS is 0.
6. A worker killed inside a job (W_SLOT non-zero): the parent stores
   W_SLOT = 0 and drops its reference for it (`_drop_dead_ref`).
"""
import time

from .._errors import TooManyMapsError
from .._shm import (
    FLAG_SPMD, H_ACTIVE_MASK, H_BOARD_SLEEPERS, MODE_INDEX, MODE_TASK, RETRY_RANGES,
    S_CANCEL, S_CHUNK, S_DESC_LEN, S_DESC_OFF, S_DESC_SEG, S_FLAGS, S_GEN, S_LIMIT, S_MAX_ITEMS,
    S_MODE, S_N, S_NEXT, S_NWORK, S_RANGES, S_REFS, S_SPMD_SEG, S_STATE, SLOT_ACTIVE,
    SLOT_CLOSED, SLOT_FREE, W_SLOT,
)
from .claims import slot_has_work
from .wake import WAKE_AFTER_S, wake_sleepers


class BoardPoster:
    """The parent's side (a runtime mixin). State: _jobs (gen -> job), _gen."""

    def _init_board(self):
        self._jobs = {}
        self._gen = 0

    def _free_slot(self):
        """Step 1: a slot to post into, as (slot, offset). Lock held."""
        r, lay = self._r, self._layout
        for s in range(lay.nslots):
            off = lay.slot(s)
            st = r.load32(off + S_STATE)
            if st == SLOT_FREE or (st == SLOT_CLOSED and r.load32(off + S_REFS) == 0):
                return s, off
        raise TooManyMapsError(
            "pmaprt: %d maps are already live on this pool; consume or close some of the "
            "iterators (or create the Pool with a larger max_jobs)" % lay.nslots)

    def _post(self, job, desc, mode, n, limit, chunk, nwork, desc_seg, desc_off=0, flags=0,
              max_items=0, spmd_seg=None, start=0, dear=False):
        """Put a job on the board. Lock held. Returns (gen, slot, offset).
        spmd_seg: an SPMD map's collective segment; worker w alone runs item w.
        dear: the caller has seen its items cost much (they ran in the caller
        before `start`): every worker it may use is woken now."""
        r, lay = self._r, self._layout
        slot, off = self._free_slot()
        self._gen += 1
        gen = self._gen
        r.store32(off + S_STATE, SLOT_FREE)
        r.store64(off + S_GEN, gen)
        r.store32(off + S_MODE, mode)
        r.store32(off + S_FLAGS, flags)
        r.store64(off + S_MAX_ITEMS, max_items or 0)
        r.store64(off + S_N, n)
        r.store64(off + S_LIMIT, limit)
        r.store64(off + S_NEXT, start)   # items before start ran elsewhere
        r.store32(off + S_CANCEL, 0)
        r.store32(off + S_CHUNK, chunk)
        r.store32(off + S_NWORK, nwork)
        for w in range(self.workers):
            r.range_set(off + S_RANGES + 8 * w, 0, 0)
        for j in range(RETRY_RANGES):
            r.range_set(off + lay.retry_off + 8 * j, 0, 0)
        if spmd_seg is not None:
            r.store32(off + S_FLAGS, flags | FLAG_SPMD)
            r.store64(off + S_SPMD_SEG, spmd_seg.id)
            r.store64(off + S_NEXT, n)
            for w in range(n):
                r.range_set(off + S_RANGES + 8 * w, w, 1)
        r.store32(off + S_DESC_LEN, len(desc))
        if desc_seg is None:
            r.store64(off + S_DESC_SEG, 0)
            base = off + lay.desc_off
            self._res.ctl.buf[base: base + len(desc)] = desc
        else:
            r.store64(off + S_DESC_SEG, desc_seg.id)
            r.store64(off + S_DESC_OFF, desc_off)
        r.store32(off + S_STATE, SLOT_ACTIVE)
        r.store64(H_ACTIVE_MASK, r.load64(H_ACTIVE_MASK) | (1 << slot))
        self._jobs[gen] = job
        # A job that only some ranks may join (an SPMD map, workers=k) wakes
        # every worker: a futex wake picks sleepers at random, and a woken
        # rank >= nwork would not take part (the others would sleep up to a
        # second). An index map open to every worker wakes one (none if the
        # hot spinner takes it); each worker that claims its first chunk
        # wakes the others the map can still use (wake.py, step 5), so a
        # short map that one worker takes whole wakes one process, not W,
        # and the parent pays one wake call at most; if it still runs
        # WAKE_AFTER_S later, the waiting parent wakes the others (wake.py,
        # step 9). A feed map wakes as many workers as it has items.
        job.wake_due = None
        if spmd_seg is not None or nwork < self.workers or (dear and mode == MODE_INDEX):
            self.wake_workers()
        elif mode == MODE_INDEX:
            self.wake_workers(1, hot=True)
            if nwork > 1:
                job.wake_due = time.perf_counter() + WAKE_AFTER_S
        else:
            self.wake_workers(nwork if n < 0 else max(1, min(nwork, n)))
        return gen, slot, off

    def _retire(self, gen, slot, off):
        """Step 5: the job is over: workers stop claiming; the slot is reused once they left."""
        with self._lock:
            r = self._r
            if self._res.ctl is None:
                self._jobs.pop(gen, None)
                return
            if r.load64(off + S_GEN) == gen:
                r.store32(off + S_CANCEL, 1)
                r.store32(off + S_STATE, SLOT_CLOSED)
                r.store64(H_ACTIVE_MASK, r.load64(H_ACTIVE_MASK) & ~(1 << slot))
            self._jobs.pop(gen, None)

    def _drop_dead_ref(self, w):
        """Step 6: worker w was killed inside a job: its reference to the slot
        goes with it (else the slot, closed, could never be posted to again)."""
        r = self._r
        area = self._layout.worker(w)
        held = r.load32(area + W_SLOT)
        if held:
            r.store32(area + W_SLOT, 0)
            r.add32(self._layout.slot(held - 1) + S_REFS, -1)


class BoardReader:
    """The worker's side (a worker mixin): finding and entering jobs."""

    def work_once(self):
        """Steps 2-4: join the oldest active job with work; True if any work was done."""
        r = self.r
        mask = r.load64(H_ACTIVE_MASK)
        if not mask:
            self.owe_wake = False
            return False
        cands = []
        s = 0
        while mask:
            if mask & 1:
                off = self.layout.slot(s)
                cands.append((r.load64(off + S_GEN), s, off))
            mask >>= 1
            s += 1
        cands.sort()
        did = False
        for i, (gen, s, off) in enumerate(cands):
            if self.rank >= r.load32(off + S_NWORK) or not self.has_work(off):
                continue
            if self.hot_held:      # about to work: tasks must wake a sleeper again
                self._release_hot()
            self.owe_wake = False
            if i + 1 < len(cands) and r.load32(H_BOARD_SLEEPERS) \
                    and any(self.has_work(o) for _, _, o in cands[i + 1:]):
                # wake.py, step 5: later jobs wait too (a task whose post
                # relied on this worker's spin, a map posted with one wake):
                # a sleeper looks at the board now.
                wake_sleepers(r, 1)
            r.add32(off + S_REFS, 1)
            r.store32(self.area + W_SLOT, s + 1)
            self.cur_slot = s
            try:
                if r.load32(off + S_STATE) == SLOT_ACTIVE and r.load64(off + S_GEN) == gen \
                        and not r.load32(off + S_CANCEL):
                    did |= self.run_job(s, gen, off)
            finally:
                r.store32(self.area + W_SLOT, 0)
                r.add32(off + S_REFS, -1)
            if did:
                return True
        self.owe_wake = False   # nothing taken: the task went to another worker
        return did

    def has_work(self, off):
        return slot_has_work(self.r, off, off + self.layout.retry_off)

    def run_job(self, s, gen, off):
        """The job entered: a task is run once, a map's chunks until none is left."""
        if self.r.load32(off + S_MODE) == MODE_TASK:
            return self.run_task(gen, off)
        return self.run_chunks(s, gen, off)
