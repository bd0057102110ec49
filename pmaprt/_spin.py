"""When to spin: only while every runnable thread of the machine has a core.

A waiter that spins on a shared word sees it change within a fraction of a
microsecond; one that sleeps on a futex pays a wake-up of tens of
microseconds (more on a VM). But a spin holds a core. On a machine whose
cores are all taken, it takes one from the work it waits for, or from the
user's other processes, and every round trip gets slower, not faster. So a
waiter spins only where the machine has room for it, and sleeps at once
where it has none.

- `spin_budget` is the decision, a pure function of plain numbers.
- `SpinGate` feeds it: the count of threads runnable right now (the fourth
  field of /proc/loadavg: the kernel's instantaneous count, not the
  one-minute average), read at most every SAMPLE_S, and the decision made
  from the lower of the last two readings: one reading often catches a
  kernel thread or a process that runs for a few microseconds, and a
  machine taken as full for SAMPLE_S after each would spin half as often
  when it is idle; a machine that stays full reads full twice in a row.
  One gate per process (`gate`), shared by the parent's waits, the
  workers' idle and hot spins (_runtime/wake.py), and open to any other
  waiter of the package (the collective's).
"""
import os
import time

from ._options import CORES

# How old a reading of the runnable count may be. Reading costs about a
# microsecond (a pread of a short file); a waiter asks at every wait, so the
# reading is shared by the waits of SAMPLE_S. Longer: a machine that fills
# up is noticed later; shorter: more reads per round trip.
SAMPLE_S = 0.005
# A machine whose load cannot be read (no /proc) is taken as idle: the
# package spun there before it had a gate, and the spins stay short.
UNKNOWN = None


def machine_cores():
    """The machine's online CPUs: what /proc/loadavg's runnable count is shared over."""
    return os.cpu_count() or 1


def spin_budget(cores, runnable, spinners, spin_ns, machine=None):
    """Nanoseconds the caller may spin before it sleeps (0: sleep at once).

    cores: the cores this process may run on; runnable: threads runnable on
    the machine when it was last read, the caller among them (None:
    unknown, taken as idle); spinners: the pool's other processes on a core
    now, spinning or working (known exactly from the pool's shared words,
    which a reading a few ms old may have missed); spin_ns: what the caller
    would spin on an idle machine; machine: the machine's CPUs, over which
    `runnable` is counted (default: cores).

    The caller spins only if every runnable thread, the caller and the
    pool's awake processes included, has a CPU of the machine, and the
    pool's awake processes with the caller fit its own cores: a spinner
    never takes a core that a worker, or another process, would run on.
    One core: never (the spin would hold the only core the answer needs).
    """
    if spin_ns <= 0 or cores < 2:
        return 0
    machine = cores if machine is None else machine
    if runnable is not UNKNOWN and max(runnable, 1 + spinners) > machine:
        return 0
    if 1 + spinners > cores:
        return 0
    return spin_ns


def read_runnable(fd):
    """The machine's runnable threads now (/proc/loadavg's 'running/total'
    field), from an open descriptor of that file; None if it cannot be read."""
    try:
        text = os.pread(fd, 128, 0)
        return int(text.split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return UNKNOWN


class SpinGate:
    """This process's view of the machine's load, for `spin_budget`.

    read: returns the runnable count now (default: /proc/loadavg); clock:
    seconds, monotonic. PMAPRT_SPIN=0 in the environment (workers inherit
    it) turns every spin off: a machine shared with latency-critical work."""

    __slots__ = ("cores", "machine", "runnable", "off", "_t", "_last", "_fd", "_pid", "_read",
                 "_clock")

    def __init__(self, cores=CORES, machine=None, read=None, clock=time.monotonic):
        self.cores = cores
        self.machine = machine_cores() if machine is None else machine
        self.runnable = UNKNOWN
        self.off = os.environ.get("PMAPRT_SPIN", "1").strip() == "0"
        self._t = None
        self._last = UNKNOWN     # the last reading (runnable: the lower of it and the one before)
        self._fd = None
        self._pid = None
        self._read = self._read_proc if read is None else read
        self._clock = clock

    def budget(self, spin_ns, spinners=0):
        """What this caller may spin now (see spin_budget)."""
        if spin_ns <= 0 or self.off:
            return 0
        now = self._clock()
        if self._t is None or now - self._t >= SAMPLE_S:
            self._t = now
            new, last = self._read(), self._last
            self.runnable = new if new is UNKNOWN or last is UNKNOWN else min(new, last)
            self._last = new
        return spin_budget(self.cores, self.runnable, spinners, spin_ns, self.machine)

    def _read_proc(self):
        if self._pid != os.getpid():     # first use, or a fork's child: a descriptor of its own
            self._pid = os.getpid()
            try:
                self._fd = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._fd = None
        if self._fd is None:
            return UNKNOWN
        return read_runnable(self._fd)


# The process's gate: every waiter of the package asks it.
gate = SpinGate()
