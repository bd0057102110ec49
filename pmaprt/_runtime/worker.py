"""The worker process: its loop, and `main`, the entry its command line runs.

A worker maps the pool's control segment, then loops: find the oldest active
job on the board that has work, join it, run its chunks until none is left,
leave (board.py, chunk.py); with nothing to do, spin briefly and sleep on
the board's futex word (wake.py). Between busy turns it reads its socket for
lent segments (lent.py). Its results go into its ring (ring.py).

`Worker` composes the worker's side of each protocol; each mixin's module
holds the other side too.
"""
import os
import signal
import socket
import sys
import time

from .. import _arrays
from .._shm import H_BOARD_SEQ, H_SHUTDOWN, W_CUR_DONE, W_PID, W_STATE
from .._shm import Layout, Segment, WSTATE_READY, WSTATE_RECYCLED, core, recv_msg
from .board import BoardReader
from .chunk import ChunkRunner
from .claims import ClaimTaker
from .lent import SegmentCache
from .ring import RingWriter
from .startup import prepare_worker
from .task import TaskRunner
from .wake import WorkerWake, wake_sleepers

# True inside a worker: a nested pmap runs serially there.
IN_WORKER = False
# Functions a worker keeps decoded, by their pickled bytes; past this many
# the cache starts again (a long-lived worker may see many lambdas).
FN_CACHE_MAX = 32

# A worker busy with one job after another reads its socket this often (a
# system call per turn would cost a good part of a round trip).
SOCKET_POLL_S = 0.001


class Worker(BoardReader, ClaimTaker, ChunkRunner, RingWriter, WorkerWake, SegmentCache,
             TaskRunner):
    def __init__(self, rank, sock, start, ctl_fd):
        self.rank = rank
        self.sock = sock
        self.parent_pid = start.parent_pid
        self.layout = Layout(start.nworkers, start.nslots)
        self.ctl = Segment(self.layout.size, fd=ctl_fd)
        self.r = self.ctl.region
        self.area = self.layout.worker(rank)
        self.seed = start.seed
        # Worker recycling: exit (and be replaced) after this many items (0: never).
        self.max_items = start.max_items_per_worker
        self.items_done = 0
        self.cur_slot = -1     # the job slot being worked on (for H_PARENT_WANT)
        self.claim_seq = 0     # W_CLAIM: odd while items move between shared words
        self.jobs = {}
        self.fns = _arrays.FunctionCache(FN_CACHE_MAX)
        self.t_items = {}
        # Items of the current chunk finished, for the parent (retries, timeouts).
        self.prog = self.ctl.buf[self.area + W_CUR_DONE: self.area + W_CUR_DONE + 8].cast("q")
        self._init_ring_writer()
        self._init_wake()
        self._init_segments()
        self.oob = _arrays.ResultEncoder(sock)   # results with large arrays: through shared memory
        _arrays.set_resolver(self.segment)       # items that refer to shared arrays

    def run(self):
        r = self.r
        r.store32(self.area + W_PID, os.getpid())
        r.store32(self.area + W_STATE, WSTATE_READY)
        hot = False
        polled = 0.0
        clock = time.perf_counter
        while True:
            if r.load32(H_SHUTDOWN):
                return
            # The socket carries rare messages (segments, frees): between
            # busy turns it is looked at every SOCKET_POLL_S, not at each.
            seq = r.load32(H_BOARD_SEQ)
            now = clock()
            if now - polled > SOCKET_POLL_S:
                polled = now
                self.poll_socket()
            if self.work_once():
                hot = True
                continue
            if hot:
                hot = False
                if self.hot_spin(seq):
                    continue
            # Before sleeping, always: a freed segment's mapping goes now (the
            # parent bumps the sequence after sending, so nothing is missed).
            self.poll_socket()
            polled = clock()
            if not self.sleep(seq) and os.getppid() != self.parent_pid:
                return

    def recycling(self):
        return bool(self.max_items and self.items_done >= self.max_items)

    def recycle(self):
        """max_items_per_worker reached: leave cleanly; the parent starts a fresh worker."""
        r = self.r
        if self.hot_held and self._release_hot():
            wake_sleepers(r, 1)     # a task relied on this worker: another looks
        self.owe_wake = False
        r.store32(self.area + W_STATE, WSTATE_RECYCLED)
        raise SystemExit(0)


def main():
    """A fresh worker's entry (processes.py starts `python -c`): rank, socket
    and control segment descriptors on its command line."""
    rank, sock_fd, ctl_fd = (int(x) for x in sys.argv[1:4])
    os._exit(serve(rank, socket.socket(fileno=sock_fd), ctl_fd))


def serve(rank, sock, ctl_fd, watch=None):
    """Be worker `rank` until told to leave; returns the exit code. `watch`:
    the parent it dies with (None: the pool's process; a worker forked by
    the zygote, zygote.py, watches the zygote)."""
    global IN_WORKER
    IN_WORKER = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start, fds = recv_msg(sock)
    except (EOFError, OSError):
        return 0        # the parent went before the start message
    sys.path[:] = start.sys_path
    try:
        core().set_pdeathsig(signal.SIGKILL)
    except OSError:
        pass
    watch = start.parent_pid if watch is None else watch
    if os.getppid() != watch:
        return 0
    prepare_worker(start.setup, fds, rank)   # authkey, initializer (startup.py)
    worker = Worker(rank, sock, start._replace(parent_pid=watch), ctl_fd)
    code = 0
    try:
        worker.run()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except EOFError:
        code = 0
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
    return code
