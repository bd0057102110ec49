"""The zygote: a preloaded interpreter that forks replacement workers.

A fresh worker (`python -c`, processes.py) spends some hundreds of
milliseconds starting Python and importing pmaprt before it is ready: under
churn (workers killed every few tens of milliseconds) the pool would spend
most of its time starting workers. So once a pool has lost a worker it
starts a zygote: a fresh interpreter, started like a worker (the parent's
sys.path, the pool's control memfd inherited, killed with the parent), that
imports the worker's modules and then only forks. A fork of it is a ready
worker in milliseconds. The zygote is single-threaded and has never run user
code or touched CUDA, so forking it is safe where forking the parent is not.

Protocol, step by step:

1. Parent: `ZygoteClient.start` starts it (`python -c` as for a worker,
   with its socket and the control memfd) when the pool first loses a
   worker, and sends `ZygoteStart` (the parent's sys.path). Past its
   imports, the zygote answers `ZygoteReady`; until then replacements start
   as fresh interpreters.
2. Parent: `fork(rank, sock)` sends `ForkRequest(rank)` with the worker's
   end of a new socketpair (SCM_RIGHTS) and waits for `Forked(rank, pid)`.
3. Zygote: forks. The child closes the zygote's socket, restores default
   signal handling, reseeds what a fork copies (NumPy's global generator;
   `random` reseeds itself), sets PR_SET_PDEATHSIG (it dies with the zygote,
   which dies with the parent) and runs the worker's main on the given
   socket, with the zygote as the parent it watches (worker.py).
4. Zygote: reaps its children (SIGCHLD wakes its select through a wakeup
   pipe), sends `Exited(pid, returncode)` (negative: the signal), as
   Popen.returncode has it, then bumps H_DEATHS and H_RESULTS_SEQ and wakes
   the parent, which checks its workers at once (wake.py), not POLL_S later.
5. Parent: a `ForkedWorker` is the worker's handle (Popen's poll, wait,
   kill, send_signal, pid): `poll` reads the zygote's reports without
   blocking. A zygote that dies (EOF) is not restarted for the pool; its
   workers die with it (their PR_SET_PDEATHSIG), each seen as killed, and
   replacements start as fresh interpreters again.
"""
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

from .. import _shm
from .._shm import H_DEATHS, H_RESULTS_SEQ

# How long the parent waits for the zygote's answer to a fork request before
# it gives up on the zygote (it then starts a fresh interpreter instead).
FORK_REPLY_S = 5.0


class ZygoteStart(NamedTuple):
    sys_path: list


class ZygoteReady(NamedTuple):
    """zygote -> parent: imports done, fork requests are served at once."""
    pid: int


class ForkRequest(NamedTuple):
    rank: int


class Forked(NamedTuple):
    rank: int
    pid: int


class Exited(NamedTuple):
    pid: int
    returncode: int


# --- the parent's side

class ForkedWorker:
    """A zygote-born worker's handle, with the parts of Popen the pool uses."""

    def __init__(self, pid, zygote):
        self.pid = pid
        self.returncode = None
        self._zygote = zygote

    def poll(self):
        if self.returncode is None:
            self.returncode = self._zygote.returncode(self.pid)
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("pmaprt worker %d" % self.pid, timeout)
            self._zygote.wait_report(0.05 if left is None else min(left, 0.05))
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


class ZygoteClient:
    """The parent's side: one zygote per pool, started on its first loss."""

    def __init__(self):
        self.proc = None
        self.sock = None
        self.dead = False
        self.ready = False
        self._exits = {}        # pid -> returncode, reported by the zygote
        self._mine = set()      # pids it forked for this pool

    def start(self, spawner, ctl_fd, pkg_parent):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            cmd = [sys.executable, "-c", zygote_command(pkg_parent), str(theirs.fileno()),
                   str(ctl_fd)]
            self.proc = spawner.popen(cmd, pass_fds=(theirs.fileno(), ctl_fd), close_fds=True,
                                      stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self.sock = ours
        try:
            _shm.send_msg(ours, ZygoteStart(list(sys.path)))
        except OSError:
            self._died()

    def usable(self):
        """Started, alive and past its imports (a fork request then answers
        in milliseconds; before, the pool starts fresh interpreters)."""
        if self.proc is None or self.dead:
            return False
        if not self.ready:
            self.reap()
        return self.ready and not self.dead

    def fork(self, rank, sock):
        """A ForkedWorker for rank, running on `sock`'s peer; None if the
        zygote is gone or does not answer."""
        try:
            _shm.send_msg(self.sock, ForkRequest(rank), fds=[sock.fileno()])
            deadline = time.monotonic() + FORK_REPLY_S
            while True:
                msg = self._read(deadline - time.monotonic())
                if msg is None:
                    raise OSError("no answer")
                if type(msg) is Forked:
                    self._mine.add(msg.pid)
                    return ForkedWorker(msg.pid, self)
        except (OSError, EOFError):
            self._died()
            return None

    def returncode(self, pid):
        self.reap()
        rc = self._exits.pop(pid, None)
        if rc is None and self.dead and not _exists(pid):
            rc = -signal.SIGKILL      # died with its zygote (PR_SET_PDEATHSIG)
        if rc is not None:
            self._mine.discard(pid)
        return rc

    def reap(self):
        """Take every report waiting on the socket (never blocks)."""
        while not self.dead and self._read(0) is not None:
            pass

    def wait_report(self, timeout):
        if self.dead:
            time.sleep(timeout)
            return
        self._read(timeout)

    def _read(self, timeout):
        """One message (Exited ones are recorded), or None after timeout."""
        if self.dead:
            return None
        try:
            if not select.select([self.sock], [], [], max(0.0, timeout))[0]:
                return None
            msg, _ = _shm.recv_msg(self.sock)
        except (OSError, EOFError, ValueError):
            self._died()
            return None
        if type(msg) is Exited:
            self._exits[msg.pid] = msg.returncode
        elif type(msg) is ZygoteReady:
            self.ready = True
        return msg

    def _died(self):
        self.dead = True

    def close(self, graceful=True):
        """End the zygote (its workers are the pool's to end first)."""
        if self.proc is None:
            return
        if self.sock is not None:
            self.sock.close()         # EOF: the zygote leaves
        try:
            self.proc.wait(1.0 if graceful else 0.2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        self.dead = True


def _exists(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# --- the zygote's side

def zygote_command(pkg_parent):
    # As the worker's (processes.py): the working directory python -c puts
    # first on sys.path goes before any import.
    return ("import sys; sys.path[:0 if getattr(sys.flags, 'safe_path', 0) else 1] = [%r]; "
            "from pmaprt._runtime import worker, zygote; zygote.main(worker.serve)" % pkg_parent)


def main(serve):
    """The zygote's entry: serve fork requests until the parent's socket
    closes. `serve` is worker.serve, which its command line imported (the
    preloading that is the point of a zygote; this module cannot import
    the worker's, which is above it through wake.py and processes.py)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock_fd, ctl_fd = (int(x) for x in sys.argv[1:3])
    sock = socket.socket(fileno=sock_fd)
    start, _ = _shm.recv_msg(sock)
    sys.path[:] = start.sys_path
    parent = os.getppid()
    try:
        _shm.core().set_pdeathsig(signal.SIGKILL)
    except OSError:
        pass
    if os.getppid() != parent:
        os._exit(0)
    # The control segment's header, to tell a waiting parent of a death.
    header = mmap.mmap(ctl_fd, mmap.PAGESIZE)
    region = _shm.Region(header)
    _shm.send_msg(sock, ZygoteReady(os.getpid()))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *a: None)
    try:
        while True:
            ready = select.select([sock, wake_r], [], [])[0]
            if wake_r in ready:
                os.read(wake_r, 4096)
            _report_exits(sock, region)
            if sock in ready:
                try:
                    req, fds = _shm.recv_msg(sock)
                except (EOFError, OSError):
                    return
                me = os.getpid()
                pid = os.fork()
                if pid == 0:
                    _become_worker(serve, req.rank, fds[0], ctl_fd, me, sock, wake_r, wake_w)
                for fd in fds:
                    os.close(fd)
                _shm.send_msg(sock, Forked(req.rank, pid))
    finally:
        os._exit(0)


def _report_exits(sock, region):
    reaped = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        _shm.send_msg(sock, Exited(pid, os.waitstatus_to_exitcode(status)))
        reaped = True
    if reaped:
        # After the reports: the parent that wakes finds them on its socket.
        region.add32(H_DEATHS, 1)
        region.add32(H_RESULTS_SEQ, 1)
        region.wake32(H_RESULTS_SEQ, 1 << 30)


def _become_worker(serve, rank, wsock_fd, ctl_fd, zygote_pid, zsock, wake_r, wake_w):
    """In the forked child: drop the zygote's own state, then be a worker."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        zsock.close()
        os.close(wake_r)
        os.close(wake_w)
        np_random = sys.modules.get("numpy.random")
        if np_random is not None:
            np_random.seed()      # else every fork draws the zygote's numbers
        code = serve(rank, socket.socket(fileno=wsock_fd), ctl_fd, watch=zygote_pid)
    finally:
        os._exit(code)
