"""Large copies split over threads (memcpy and numpy.copyto release the GIL).

A copy is first cut into tasks (callables, each copying one piece), then
`run_tasks` runs them: in this thread when the total is small, else on a few
threads that take tasks from a shared iterator until none is left.
"""
import numpy as np

from .. import _shm
from .._options import CORES
from .._threads import run_pieces

memcpy = _shm.core().memcpy

# Below this total a copy runs in the calling thread: starting threads costs
# more than it saves on a copy that fits in a few milliseconds.
PARALLEL_COPY_MIN = 32 << 20
# One task's share of a copy: large enough that taking a task is cheap next
# to doing it, small enough that the threads finish close together.
COPY_PIECE = 16 << 20
# More threads than this no longer add memory bandwidth.
MAX_COPY_THREADS = 8


def run_tasks(tasks, total):
    """Run copy callables; in threads when there are many bytes."""
    nthreads = min(MAX_COPY_THREADS, CORES, len(tasks), max(1, total // COPY_PIECE))
    run_pieces(tasks, nthreads if total >= PARALLEL_COPY_MIN else 1)


def byte_tasks(dst, off, src, tasks):
    """Tasks that copy the contiguous buffer src into dst at off, in pieces."""
    mv = memoryview(src).cast("B") if not isinstance(src, (bytes, bytearray)) else memoryview(src)
    n = mv.nbytes
    for a in range(0, n, COPY_PIECE):
        piece = mv[a: a + COPY_PIECE]
        tasks.append(lambda piece=piece, o=off + a: memcpy(dst, o, piece))
    return n


def array_tasks(dst, src, tasks):
    """Tasks that copy ndarray src into ndarray dst (same shape), by row blocks."""
    if src.ndim == 0 or src.shape[0] <= 1 or src.nbytes <= COPY_PIECE:
        tasks.append(lambda: np.copyto(dst, src, casting="unsafe"))
        return src.nbytes
    rows = max(1, COPY_PIECE // max(1, src.nbytes // src.shape[0]))
    for a in range(0, src.shape[0], rows):
        tasks.append(lambda a=a: np.copyto(dst[a: a + rows], src[a: a + rows], casting="unsafe"))
    return src.nbytes


def copy_array(dst, src):
    """np.copyto(dst, src), in threads for large arrays."""
    tasks = []
    total = array_tasks(dst, src, tasks)
    run_tasks(tasks, total)
