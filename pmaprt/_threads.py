"""Running pieces of one large memory operation on a few threads.

A copy or a page population that releases the GIL is cut into pieces
(callables); `run_pieces` runs them on `nthreads` threads that take pieces
from a shared iterator until none is left, and raises the first exception
one of them raised, in the calling thread, once all have stopped.
"""
import threading


def run_pieces(pieces, nthreads):
    """Run every callable in `pieces`; on `nthreads` threads when above 1."""
    if nthreads <= 1:
        for piece in pieces:
            piece()
        return
    lock = threading.Lock()
    it = iter(pieces)
    errors = []

    def run():
        while True:
            with lock:
                piece = next(it, None)
            if piece is None:
                return
            try:
                piece()
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)
                return

    threads = [threading.Thread(target=run, daemon=True) for _ in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
