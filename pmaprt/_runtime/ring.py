"""The result rings: one per worker, in its area of the control segment.

A worker writes one record per chunk (its results, or the error that ended
it) and the parent reads them, in order. The worker alone moves W_TAIL and
the parent alone moves W_HEAD, so neither takes a lock.

Protocol, step by step:

1. Worker (`put`): a record is a REC header (`RecordHeader`'s fields) then
   its payload, padded to 8 bytes. A payload over half the ring goes on the
   socket instead (a REC_BIG record, payload sent as a blob right after).
   A record that does not fit before the ring's end is preceded by a
   REC_WRAP record filling the rest; it then starts at offset 0.
2. Worker, no room (RING_SIZE - (tail - W_HEAD) too small): store
   W_SPACE_WAIT = 1, wake the parent if it sleeps (it may wait for another
   record and must drain this ring for this worker to go on), sleep on
   W_SPACE_SEQ while W_HEAD has not moved, then W_SPACE_WAIT = 0 and look
   again.
3. Worker: write the header and payload, then store W_TAIL (this publishes
   them), bump H_RESULTS_SEQ, and wake the parent by wake.py's step 7.
4. Parent (`_drain`, lock held): for each worker whose W_TAIL differs from
   the head it read up to, parse records from head to tail and hand each to
   its job (`job.on_record`; a job that is gone drops it). A REC_BIG record's
   payload is read from the socket; a result whose large arrays went ahead
   as memfds is attached to them (the arrays layer).
5. Parent: store W_HEAD, bump W_SPACE_SEQ, and wake the worker if
   W_SPACE_WAIT is set.
6. A dead worker's ring is drained before its losses are counted
   (processes.py): a chunk whose record arrived was not lost.
"""
import os
import pickle
import time
import traceback
from typing import NamedTuple

from .. import _arrays, _serialize, _shm
from .._shm import (
    H_HOT_SPINNER, H_PARENT_SLEEPING, H_PARENT_WANT, H_RESULTS_SEQ, REC, REC_BIG, REC_BIG_ERROR,
    REC_ERROR, REC_HAS_ERRORS, REC_KIND_MASK, REC_RESULT, REC_RESULT_ERRORS, REC_STOLEN,
    REC_WRAP, RING_SIZE, W_HEAD, W_RING, W_SPACE_SEQ, W_SPACE_WAIT, W_TAIL, WANT_POS_MASK,
    WANT_SHIFT,
)
from .._spin import gate
from .wake import WORKER_SPIN_NS, IDLE_TIMEOUT_S


class RecordHeader(NamedTuple):
    """A record's header, REC's fields in order. The drain and `put` unpack
    and pack them positionally, in this order: a tuple built per record
    would cost a call on the result path."""
    total_len: int     # header + payload + padding: where the next record starts
    kind: int          # REC_* kind | REC_STOLEN | REC_HAS_ERRORS | REC_BIG_ERROR
    gen: int           # the job
    start: int         # its first item
    count: int         # items it covers (results before the error, for an error)
    payload_len: int
    t0: float          # wall clock when the chunk started
    t1: float          # and ended
    cpu: float         # thread CPU seconds in the items' calls
    enc: float         # seconds the chunk spent on anything else (read, encode)


assert len(RecordHeader._fields) == len(REC.unpack(bytes(REC.size)))


class RingReader:
    """The parent's side (a runtime mixin). State: _heads (per worker, the
    bytes consumed), _tail_offs (each ring's W_TAIL offset)."""

    def _init_rings(self, n):
        self._heads = [0] * n
        self._tail_offs = [self._layout.worker(w) + W_TAIL for w in range(n)]

    def _drain_worker(self, w):
        """Steps 4-5: hand every record in worker w's ring to its job. Lock held.
        Returns the set of (gen, start) it saw."""
        r = self._r
        area = self._layout.worker(w)
        tail = r.load64(area + W_TAIL)
        head = self._heads[w]
        seen = set()
        if tail == head:
            return seen
        buf = self._ctl.buf
        base = area + W_RING
        jobs = self._jobs
        while head < tail:
            pos = head % RING_SIZE
            total, kind, gen, start, count, plen, t0, t1, cpu, enc = REC.unpack_from(buf, base + pos)
            k = kind & REC_KIND_MASK
            if k == REC_WRAP:
                head += total
                continue
            if k == REC_BIG:
                try:
                    payload = _shm.recv_blob(self._res.socks[w])
                except (EOFError, OSError):
                    # The worker died while sending it: the record never was;
                    # its death is handled (and the chunk run again) by _check_workers.
                    break
                k = REC_ERROR if kind & REC_BIG_ERROR else REC_RESULT
            else:
                p = base + pos + REC.size
                payload = bytes(buf[p: p + plen])
            if k == REC_RESULT and _arrays.is_result_stub(payload):
                # results with large arrays: their memfd came ahead on the socket
                payload = _arrays.attach_result(payload, self._res.socks[w])
            if kind & REC_HAS_ERRORS:
                k = REC_RESULT_ERRORS
            head += total
            seen.add((gen, start))
            job = jobs.get(gen)
            if job is not None:
                job.on_record(w, k, start, count, payload, t0, t1, cpu, bool(kind & REC_STOLEN), enc)
        self._heads[w] = head
        r.store64(area + W_HEAD, head)
        r.add32(area + W_SPACE_SEQ, 1)
        if r.load32(area + W_SPACE_WAIT):
            r.wake32(area + W_SPACE_SEQ, 1)
        return seen

    def _drain(self):
        # One load per worker for the common case, an empty ring: a waiting
        # parent drains every ring on each wake-up, so this runs per result.
        got = 0
        load, heads = self._r.load64, self._heads
        for w, off in enumerate(self._tail_offs):
            if load(off) != heads[w] and self._drain_worker(w):
                got += 1
        return got


class RingWriter:
    """The worker's side (a worker mixin). State: tail (bytes written), ring_off."""

    def _init_ring_writer(self):
        self.ring_off = self.area + W_RING
        self.tail = self.r.load64(self.area + W_TAIL)

    def put(self, kind, gen, start, count, payload, t0, t1, cpu=0.0, hot=False, enc=0.0):
        """Steps 1-3. hot: a task's record (wake.py, step 3)."""
        r, a = self.r, self.area
        if hot and not self.hot_held:
            # Taken just before the record goes out (after all user code: a
            # hold must stay short), so the caller's next task finds it awake.
            self.hot_held = r.cas64(H_HOT_SPINNER, 0, self.rank + 1)
        plen = len(payload)
        big = plen > RING_SIZE // 2
        if big:
            kind = (REC_BIG | (REC_BIG_ERROR if (kind & REC_KIND_MASK) == REC_ERROR else 0)
                    | (kind & (REC_STOLEN | REC_HAS_ERRORS)))
            body = 0
        else:
            body = plen
        need = (REC.size + body + 7) // 8 * 8
        while True:
            head = r.load64(a + W_HEAD)
            pos = self.tail % RING_SIZE
            wrap = RING_SIZE - pos if RING_SIZE - pos < need else 0
            if RING_SIZE - (self.tail - head) >= need + wrap:
                break
            seq = r.load32(a + W_SPACE_SEQ)
            r.store32(a + W_SPACE_WAIT, 1)
            if r.load32(H_PARENT_SLEEPING):
                r.add32(H_RESULTS_SEQ, 1)
                r.wake32(H_RESULTS_SEQ, 1 << 30)
            if r.load64(a + W_HEAD) == head:
                spin = gate.budget(WORKER_SPIN_NS, self.awake_peers())
                if not r.wait32(a + W_SPACE_SEQ, seq, IDLE_TIMEOUT_S, spin) \
                        and os.getppid() != self.parent_pid:
                    raise SystemExit(0)
            r.store32(a + W_SPACE_WAIT, 0)
        buf = self.ctl.buf
        base = self.ring_off
        if wrap:
            REC.pack_into(buf, base + pos, *RecordHeader(
                total_len=wrap, kind=REC_WRAP, gen=0, start=0, count=0, payload_len=0,
                t0=0.0, t1=0.0, cpu=0.0, enc=0.0))
            pos = 0
        REC.pack_into(buf, base + pos, need, kind, gen, start, count, plen, t0, t1, cpu, enc)
        if body:
            buf[base + pos + REC.size: base + pos + REC.size + plen] = payload
        self.tail += wrap + need
        r.store64(a + W_TAIL, self.tail)
        r.add32(H_RESULTS_SEQ, 1)
        if r.load32(H_PARENT_SLEEPING):
            want = r.load64(H_PARENT_WANT)
            # wake.py, step 7. A stub record's arrays went ahead as memfds on
            # the socket: the parent must read them, or the socket fills and
            # this worker blocks.
            if not want or big or (kind & REC_KIND_MASK) != REC_RESULT \
                    or _arrays.is_result_stub(payload) or (
                    want >> WANT_SHIFT == self.cur_slot + 1
                    and start <= (want & WANT_POS_MASK) < start + count):
                r.wake32(H_RESULTS_SEQ, 1 << 30)
        if big:
            _shm.send_blob(self.sock, payload)

    def put_error(self, gen, lo, n, ok, exc, where, t0, stolen, tb=True, hot=False):
        """An error record: results before the failure, then the exception
        and its traceback."""
        self.prog[0] = max(n, 0)  # no item is running any more: encoding (no timeout applies)
        tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if tb else ""
        if where:
            tb_text = "(%s)\n%s" % (where, tb_text)
        try:
            ok_payload = _serialize.dumps_list(ok)
        except BaseException:
            ok_payload, ok = _serialize.dumps_list([]), []
        try:
            exc_bytes = _serialize.dumps_obj(exc)
            pickle.loads(exc_bytes)
        except BaseException as pe:
            exc_bytes = pickle.dumps(RuntimeError(
                "pmaprt: %s: %s (the exception could not be pickled: %s)"
                % (type(exc).__name__, exc, pe)))
        payload = pickle.dumps((ok_payload, exc_bytes, tb_text, os.getpid()), 5)
        self.put(REC_ERROR | (REC_STOLEN if stolen else 0), gen, lo, len(ok), payload,
                 t0, time.perf_counter(), hot=hot)
