"""The all-reduce's precisions and paths inside SPMD maps: float16 and
bfloat16 (ml_dtypes, or uint16 words with as_dtype) with float32
accumulation, both algorithms (direct and reduce-scatter + all-gather) at
every rank count, and shared-array inputs read in place.

Each rank builds every rank's input from a seed and checks its result against
the documented order itself: x_0 op x_1 op ... op x_{N-1}, halves in float32
and rounded once. What comes back is a verdict and a digest of the bits.
"""
import contextlib
import hashlib

import numpy as np
import pytest

import pmaprt
from pmaprt import Pool
from pmaprt._collective import api, reduce as R
from pmaprt._collective.segment import HD_SRC_SEG, MAX_SLOT_BYTES
from test_collective import run as run_bounded   # list(it) in a thread, bounded

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need ml_dtypes")

TIMEOUT_S = 120.0
OPS = ("sum", "mean", "min", "max")
HALF_ROUND = MAX_SLOT_BYTES // 2          # float16 elements in one round
SIZES = (0, 1, 7, 1001, HALF_ROUND - 1, HALF_ROUND + 3, 3 * HALF_ROUND + 11)


@pytest.fixture(scope="module")
def pool():
    with Pool(3) as p:
        yield p


def run(it):
    return run_bounded(it, TIMEOUT_S)


def make(seed, rank, n, dtype):
    rng = np.random.default_rng([seed, rank, n])
    return (rng.standard_normal(n) * 8).astype(np.float32).astype(dtype)


def expected(xs, op, world):
    """The documented result: in rank order, halves in float32, one rounding."""
    dt = xs[0].dtype
    acc = xs[0].astype(np.float32)
    f = {"sum": np.add, "mean": np.add, "min": np.minimum, "max": np.maximum}[op]
    for x in xs[1:]:
        acc = f(acc, x.astype(np.float32))
    if op == "mean":
        acc = acc / np.float32(world)
    return acc.astype(dt)


def digest(a):
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()


@contextlib.contextmanager
def force(mode):
    """Make this rank use one algorithm (every rank of the map sets the same)."""
    saved = R.DIRECT_RANKS, R.DIRECT_BYTES
    if mode == "split":
        R.DIRECT_RANKS, R.DIRECT_BYTES = 1, 0
    elif mode == "direct":
        R.DIRECT_RANKS, R.DIRECT_BYTES = 1 << 30, 1 << 62
    try:
        yield
    finally:
        R.DIRECT_RANKS, R.DIRECT_BYTES = saved


def step_halves(seed, kind, op, mode):
    with force(mode):
        r, n = pmaprt.axis_index("b"), pmaprt.axis_size("b")
        dtype = np.float16 if kind == "float16" else ml_dtypes.bfloat16
        out = []
        for size in SIZES:
            want = expected([make(seed, q, size, dtype) for q in range(n)], op, n)
            x = make(seed, r, size, dtype)
            if kind == "bits":
                got = pmaprt.allreduce(x.view(np.uint16), op, as_dtype="bfloat16")
                ok = got.dtype == np.uint16 and got.tobytes() == want.tobytes()
            else:
                got = pmaprt.allreduce(x, op)
                ok = got.dtype == want.dtype and got.tobytes() == want.tobytes()
            out.append((ok, digest(got)))
        return out


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "bits"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n, mode", [(2, None), (3, None), (2, "split"), (3, "direct")])
def test_half_precisions_in_float32_every_rank_the_same_bits(pool, kind, op, n, mode):
    res = run(pool.map(step_halves, [5] * n, [kind] * n, [op] * n, [mode] * n, axis_name="b"))
    for rank, rows in enumerate(res):
        for size, (ok, _) in zip(SIZES, rows):
            assert ok, "rank %d, %d elements: not the float32-accumulated result" % (rank, size)
    assert all([d for _, d in rows] == [d for _, d in res[0]] for rows in res)


def step_modes(seed, mode, dtype, op):
    with force(mode):
        r, n = pmaprt.axis_index("b"), pmaprt.axis_size("b")
        out = []
        for size in (5, MAX_SLOT_BYTES // 8 + 1, 2 * MAX_SLOT_BYTES // 4 + 3):
            rng = [np.random.default_rng([seed, q, size]) for q in range(n)]
            xs = [(g.standard_normal(size) * 100).astype(dtype) for g in rng]
            got = pmaprt.allreduce(xs[r], op)
            acc = xs[0]
            f = {"sum": np.add, "min": np.minimum, "max": np.maximum}[op]
            for x in xs[1:]:
                acc = f(acc, x)
            out.append((got.tobytes() == acc.tobytes(), digest(got)))
        return out


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("op", ["sum", "min", "max"])
def test_both_algorithms_give_the_bits_of_rank_order(pool, dtype, op):
    """direct and split reduce each element once, in rank order: the same bits
    as NumPy's left-to-right reduction, whichever runs, at 2 and 3 ranks."""
    digests = []
    for n in (2, 3):
        for mode in ("direct", "split"):
            res = run(pool.map(step_modes, [9] * n, [mode] * n, [dtype] * n, [op] * n,
                               axis_name="b"))
            assert all(ok for rows in res for ok, _ in rows), (n, mode)
            assert all(rows == res[0] for rows in res)
            digests.append((n, [d for _, d in res[0]]))
    assert digests[0] == digests[1] and digests[2] == digests[3]


# --- shared-array inputs, read in place


def step_shared(arr, mode, in_place):
    with force(mode):
        r, n = pmaprt.axis_index("b"), pmaprt.axis_size("b")
        rows = arr.shape[1]
        before = arr.copy()
        want = before[0].copy()
        for q in range(1, n):
            want = want + before[q]
        ctx = api._CTX
        x = arr[r]
        if in_place:
            got = pmaprt.allreduce(x, out=x)
        else:
            got = pmaprt.allreduce(x)
        last = (ctx.sent - 1) % ctx.slots
        in_place_read = ctx.r.load64(ctx.stage[last][r] + HD_SRC_SEG) != 0
        return got.tobytes() == want.tobytes(), in_place_read, rows


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("n, mode", [(2, None), (2, "split"), (3, None), (3, "direct")])
def test_shared_array_input_is_read_in_place(pool, n, mode, in_place):
    """A rank's input in a shared array every worker maps is read by the
    others where it is; out=x, the input itself, is safe: a rank writes its
    result only after every rank has read that part of it (split), or stages
    the input first (direct)."""
    size = 3 * MAX_SLOT_BYTES // 4 + 17          # several rounds
    arr = pmaprt.zeros((n, size), np.float32)
    arr[:] = np.random.default_rng(1).standard_normal((n, size)).astype(np.float32)
    orig = arr.copy()
    for ok, read_in_place, _ in run(pool.map(step_shared, [arr] * n, [mode] * n,
                                             [in_place] * n, axis_name="b")):
        assert ok
        # direct stages an input its result overwrites; otherwise it is read in
        # place (by default a call of a few rounds takes split at any n)
        used = mode or "split"
        assert read_in_place == (used == "split" or not in_place)
    if in_place:   # every row now holds the sum
        want = orig[0].copy()
        for q in range(1, n):
            want = want + orig[q]
        assert all(arr[q].tobytes() == want.tobytes() for q in range(n))
    else:
        assert arr.tobytes() == orig.tobytes()


def step_bad_as_dtype(kind):
    if kind == "as_dtype":
        return pmaprt.psum(np.ones(3, np.uint16), "b", as_dtype="float8")
    return pmaprt.psum(np.ones(3, np.uint16), "b")


@pytest.mark.parametrize("kind, exc, match", [
    ("as_dtype", ValueError, "as_dtype must be None, 'float16' or 'bfloat16'"),
    ("uint16", TypeError, "uint16 words with as_dtype"),
])
def test_bad_half_calls(pool, kind, exc, match):
    with pytest.raises(exc, match=match):
        run(pool.map(step_bad_as_dtype, [kind] * 2, axis_name="b"))


def step_tree_halves():
    r = pmaprt.axis_index("b")
    tree = {"h": np.full(5, r + 1, np.float16), "b": np.full(3, r + 0.5, ml_dtypes.bfloat16),
            "f": np.full(2, r, np.float32), "w": [np.full(4, r + 2, np.float16)] * 3}
    return pmaprt.pmean(tree, "b")


def test_tree_of_mixed_precisions_keeps_dtypes(pool):
    for out in run(pool.starmap(step_tree_halves, [(), ()], axis_name="b")):
        assert out["h"].dtype == np.float16 and out["h"].tolist() == [1.5] * 5
        assert out["b"].dtype == ml_dtypes.bfloat16 and out["b"].astype(float).tolist() == [1.0] * 3
        assert out["f"].dtype == np.float32 and out["f"].tolist() == [0.5] * 2
        assert all(w.dtype == np.float16 and w.tolist() == [2.5] * 4 for w in out["w"])
