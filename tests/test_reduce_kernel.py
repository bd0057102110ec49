"""The all-reduce's arithmetic, pmaprt._core.reduce_into, against NumPy.

It must give exactly the bits of the documented order: ((x_0 op x_1) op x_2)
..., float32/float64 rounded after each operation, float16 and bfloat16
accumulated in float32 and rounded once (to nearest even), integer sums
wrapping, min/max as np.minimum/np.maximum (NaN first, later of two equal).
"""
import numpy as np
import pytest

from pmaprt import _core as C

# the references overflow to inf and make NaNs on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 references need ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

OPS = {"sum": C.REDUCE_SUM, "min": C.REDUCE_MIN, "max": C.REDUCE_MAX}
UFUNC = {"sum": np.add, "min": np.minimum, "max": np.maximum}
SAME = {np.dtype(np.float32): C.REDUCE_F32, np.dtype(np.float64): C.REDUCE_F64,
        np.dtype(np.int32): C.REDUCE_I32, np.dtype(np.int64): C.REDUCE_I64}
HALF = {np.dtype(np.float16): C.REDUCE_F16, BF16: C.REDUCE_BF16}


def reduce(xs, kind, op, divisor=1.0, generic=False, n=None):
    d = np.empty_like(xs[0])
    n = d.size if n is None else n
    C.reduce_into(d.view(np.uint8), 0, tuple(x.view(np.uint8) for x in xs), (0,) * len(xs), n,
                  kind, OPS[op], float(divisor), generic)
    return d


def inputs(dtype, w, n, seed):
    rng = np.random.default_rng([seed, w, n])
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        return [rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
                for _ in range(w)]
    xs = [(rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(np.float64)
          for _ in range(w)]
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-8, -1e-8, 65504.0, 70000.0])
    for q, x in enumerate(xs):
        x[: len(specials)] = np.roll(specials, q)
    return [x.astype(dtype) for x in xs]


def reference(xs, op, divisor=1.0):
    half = xs[0].dtype in HALF
    acc = xs[0].astype(np.float32) if half else xs[0].copy()
    with np.errstate(all="ignore"):
        for x in xs[1:]:
            acc = UFUNC[op](acc, x.astype(np.float32) if half else x)
        if divisor != 1.0:
            acc = acc / acc.dtype.type(divisor)
    return acc.astype(xs[0].dtype)


def same_bits(got, want):
    """Equal bits, except that any NaN matches any NaN (payloads may differ)."""
    if got.dtype.kind == "f" or got.dtype in HALF:
        g, w = got.astype(np.float64), want.astype(np.float64)
        nan = np.isnan(w)
        assert np.array_equal(np.isnan(g), nan)
        got, want = got[~nan], want[~nan]
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("dtype", list(SAME) + list(HALF), ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("w", [1, 2, 3, 5])
def test_matches_numpy_in_rank_order(dtype, op, w):
    xs = inputs(dtype, w, 5003, 1)   # not a multiple of the block or vector width
    kind = SAME.get(dtype, HALF.get(dtype))
    same_bits(reduce(xs, kind, op), reference(xs, op))
    if op == "sum" and dtype.kind == "f" or dtype in HALF and op == "sum":
        same_bits(reduce(xs, kind, op, divisor=w), reference(xs, op, divisor=w))


@pytest.mark.parametrize("op", OPS)
def test_float16_portable_conversion_equals_f16c(op):
    xs = inputs(np.dtype(np.float16), 3, 40_000, 2)
    a = reduce(xs, C.REDUCE_F16, op)
    b = reduce(xs, C.REDUCE_F16, op, generic=True)
    same_bits(b, a)
    same_bits(b, reference(xs, op))


@pytest.mark.parametrize("generic", [False, True])
def test_every_float16_value_survives_and_rounds_to_nearest_even(generic):
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    same_bits(reduce([every], C.REDUCE_F16, "sum", generic=generic), every)
    # x + x is exact in float32: the rounding back (overflow to inf included)
    # is float32 -> float16, to nearest even, as NumPy's astype
    same_bits(reduce([every, every], C.REDUCE_F16, "sum", generic=generic),
              (every.astype(np.float32) * 2).astype(np.float16))
    # sums that fall between two halves, ties included
    rng = np.random.default_rng(3)
    a = every[rng.integers(0, 1 << 16, 200_000)]
    b = every[rng.integers(0, 1 << 16, 200_000)]
    same_bits(reduce([a, b], C.REDUCE_F16, "sum", generic=generic), reference([a, b], "sum"))
    same_bits(reduce([a, b], C.REDUCE_F16, "sum", 3.0, generic), reference([a, b], "sum", 3.0))


def test_bfloat16_rounds_to_nearest_even():
    rng = np.random.default_rng(4)
    every = np.arange(1 << 16, dtype=np.uint16).view(BF16)
    same_bits(reduce([every], C.REDUCE_BF16, "sum"), every)
    a = every[rng.integers(0, 1 << 16, 200_000)]
    b = every[rng.integers(0, 1 << 16, 200_000)]
    same_bits(reduce([a, b], C.REDUCE_BF16, "sum"), reference([a, b], "sum"))


def test_integer_sums_wrap():
    big = np.full(7, np.iinfo(np.int32).max, np.int32)
    assert reduce([big, big, big], C.REDUCE_I32, "sum").tolist() == \
        (big + big + big).tolist()
    low = np.full(3, np.iinfo(np.int64).min, np.int64)
    assert reduce([low, low], C.REDUCE_I64, "sum").tolist() == [0, 0, 0]


def test_offsets_partial_lengths_and_in_place():
    x = np.arange(100, dtype=np.float64)
    y = np.arange(100, dtype=np.float64) * 10
    # dst = x[10:30] + y[20:40], written into x[10:30] (the destination is a source)
    C.reduce_into(x, 80, (x, y), (80, 160), 20, C.REDUCE_F64, C.REDUCE_SUM, 1.0)
    assert x[10:30].tolist() == [i + 10 * (i + 10) for i in range(10, 30)]
    assert x[:10].tolist() == list(range(10)) and x[30:].tolist() == list(range(30, 100))


def test_many_sources():
    xs = [np.full(9, q, np.float32) for q in range(40)]   # past the stack's sources
    assert reduce(xs, C.REDUCE_F32, "sum").tolist() == [float(sum(range(40)))] * 9


@pytest.mark.parametrize("args, exc, match", [
    ((np.zeros(4), 0, (np.zeros(4),), (0,), 5, C.REDUCE_F64, 0, 1.0), IndexError, "do not fit"),
    ((np.zeros(4), 8, (np.zeros(4),), (0,), 4, C.REDUCE_F64, 0, 1.0), IndexError, "dst"),
    ((np.zeros(4), 0, (np.zeros(4),), (-8,), 1, C.REDUCE_F64, 0, 1.0), IndexError, "source 0"),
    ((np.zeros(4), 0, (np.zeros(4),), (4,), 1, C.REDUCE_F64, 0, 1.0), ValueError, "aligned"),
    ((np.zeros(4), 0, (np.zeros(4),), (0,), 1, 99, 0, 1.0), ValueError, "kind"),
    ((np.zeros(4), 0, (np.zeros(4),), (0,), 1, C.REDUCE_F64, 7, 1.0), ValueError, "op"),
    ((np.zeros(4), 0, (np.zeros(4),), (0,), 1, C.REDUCE_F64, 0, 0.0), ValueError, "divisor"),
    ((np.zeros(4), 0, (), (), 1, C.REDUCE_F64, 0, 1.0), TypeError, "at least 1"),
    ((np.zeros(4), 0, (np.zeros(4),), (0, 0), 1, C.REDUCE_F64, 0, 1.0), TypeError, "same length"),
    ((np.zeros(4)[::2], 0, (np.zeros(4),), (0,), 1, C.REDUCE_F64, 0, 1.0), (ValueError, BufferError), None),
    ((b"abcdefgh", 0, (np.zeros(4),), (0,), 1, C.REDUCE_F64, 0, 1.0), (TypeError, BufferError), None),
])
def test_bad_arguments_raise_clearly(args, exc, match):
    with pytest.raises(exc, match=match):
        C.reduce_into(*args)
