"""Loads the C extension. There is no slow pure-Python fallback: a missing build
is an error that says how to build it, never a silent slowdown."""
try:
    from .. import _core
except ImportError as e:
    raise ImportError(
        "pmaprt: the C extension pmaprt._core is not built or failed to load (%s). "
        "pmaprt needs it for its shared-memory atomics and futex waits and has no "
        "slow fallback. Build it with `python -m pip install -e .` (or "
        "`python setup.py build_ext --inplace` in a source checkout); a C compiler "
        "and the Python headers are required." % e
    ) from e


def core():
    """The C extension module (atomics, futex waits, range words, Results)."""
    return _core
