"""numba kernels for test_numpy's compile count, in a module of their own so
that the workers of the other tests do not import numba.

Importing this module registers a numba compile-event listener that counts
the compilations in this process (a worker imports it when it loads the
functions below by reference)."""
import os
import time

import numba
from numba.core import event

COMPILES = [0]


class _CompileCounter(event.Listener):
    def on_start(self, ev):
        pass

    def on_end(self, ev):
        COMPILES[0] += 1


event.register("numba:compile", _CompileCounter())


@numba.njit
def nb_kernel(x):
    return x * 2.0 + 1.0


def calls_kernel(x):
    return nb_kernel(x)


def compiles_here(_):
    time.sleep(0.05)
    return os.getpid(), COMPILES[0]
