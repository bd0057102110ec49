"""The ring all-reduce's schedule, run with NumPy buffers standing in for N devices
(the same code drives CuPy buffers over peer copies on GPUs)."""
import numpy as np
import pytest

from pmaprt.gpu.ring import HostLinks, ring_allreduce, ring_schedule, segment_bounds

WANT = {"sum": lambda a: a.sum(0), "mean": lambda a: a.mean(0),
        "min": lambda a: a.min(0), "max": lambda a: a.max(0)}


def ranks(n, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return [rng.standard_normal(shape).astype(dtype) for _ in range(n)]
    return [rng.integers(-1000, 1000, shape).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("op", ["sum", "mean", "min", "max"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("size", [0, 1, 2, 5, 64, 1001])
def test_every_rank_gets_numpys_reduction(op, n, size):
    bufs = ranks(n, (size,), np.float64, seed=n * 1000 + size)
    want = WANT[op](np.stack(bufs))
    out = ring_allreduce(bufs, op)
    assert out is bufs
    for r, b in enumerate(bufs):
        np.testing.assert_allclose(b, want, rtol=1e-12, atol=1e-12, err_msg="rank %d" % r)


@pytest.mark.parametrize("op", ["sum", "min", "max"])
def test_integers_exact_and_nd_shapes(op):
    bufs = ranks(5, (3, 7, 2), np.int32, seed=1)
    want = WANT[op](np.stack(bufs))
    ring_allreduce(bufs, op)
    for b in bufs:
        assert b.dtype == np.int32 and b.shape == (3, 7, 2)
        np.testing.assert_array_equal(b, want)


def test_float32_sum_matches_within_rounding():
    bufs = ranks(4, (10007,), np.float32, seed=2)
    want = np.stack(bufs).astype(np.float64).sum(0)
    ring_allreduce(bufs, "sum")
    for b in bufs:
        np.testing.assert_allclose(b, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_each_rank_sends_2_n_minus_1_over_n_of_the_buffer(n):
    size = 8 * 9 * 7   # divisible by every n here: exact segment sizes
    bufs = ranks(n, (size,), np.float32, seed=n)
    links = HostLinks(np)
    ring_allreduce(bufs, "sum", links=links)
    nbytes = bufs[0].nbytes
    assert links.sent == [2 * (n - 1) * nbytes // n] * n
    assert links.copies == 2 * (n - 1) * n


def test_smaller_than_rank_count_sends_no_empty_segments():
    bufs = ranks(6, (2,), np.float64, seed=3)
    want = np.stack(bufs).sum(0)
    links = HostLinks(np)
    ring_allreduce(bufs, "sum", links=links)
    for b in bufs:
        np.testing.assert_allclose(b, want)
    # two non-empty segments, each travelling 2(N-1) hops
    assert links.copies == 2 * 2 * (6 - 1)


def test_schedule_shape():
    n = 4
    steps = ring_schedule(n)
    assert [p for p, _, _ in steps] == ["reduce"] * 3 + ["gather"] * 3
    for _, _, moves in steps:
        assert sorted(s for s, _, _ in moves) == list(range(n))         # every rank sends once
        assert sorted(d for _, d, _ in moves) == list(range(n))         # and receives once
        assert all(d == (s + 1) % n for s, d, _ in moves)               # to its ring neighbour
    # after reduce-scatter rank r owns segment (r+1) % n; all-gather starts from it
    first_gather = steps[n - 1][2]
    assert [(s, g) for s, _, g in first_gather] == [(r, (r + 1) % n) for r in range(n)]
    assert ring_schedule(1) == []


def test_segment_bounds_cover_in_order():
    for size in (0, 1, 3, 10, 11):
        for n in (1, 2, 3, 4, 16):
            b = segment_bounds(size, n)
            assert len(b) == n and b[0][0] == 0 and b[-1][1] == size
            assert all(b[i][1] == b[i + 1][0] for i in range(n - 1))
            assert max(h - l for l, h in b) - min(h - l for l, h in b) <= 1


def test_bad_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="op must be one of"):
        ring_allreduce([np.zeros(3)], "prod")
    with pytest.raises(ValueError, match="rank 1 has"):
        ring_allreduce([np.zeros(3), np.zeros(4)])
    with pytest.raises(ValueError, match="at least one"):
        ring_allreduce([])
    with pytest.raises(TypeError, match="floating dtype"):
        ring_allreduce([np.zeros(3, np.int64)] * 2, "mean")
    with pytest.raises(ValueError, match="C-contiguous"):
        ring_allreduce([np.zeros((4, 4))[:, 1], np.zeros((4, 4))[:, 2]])


def ring_order_sum(xs):
    """The ring's summation order, written out: segment g is summed from rank g
    onwards around the ring, (x[g] + x[g+1]) + x[g+2] ..., a rotation per segment."""
    n = len(xs)
    out = np.empty_like(xs[0])
    for g, (lo, hi) in enumerate(segment_bounds(xs[0].size, n)):
        acc = xs[g][lo:hi].copy()
        for k in range(1, n):
            acc = acc + xs[(g + k) % n][lo:hi]
        out[lo:hi] = acc
    return out


@pytest.mark.parametrize("n,size", [(4, (1 << 20) + 3), (3, 2), (2, 1), (7, 1001)])
def test_ring_sum_is_the_rotated_order_bit_for_bit(n, size):
    # what a GPU run of the ring must equal exactly (np.sum's order differs)
    xs = ranks(n, (size,), np.float64, seed=size)
    want = ring_order_sum(xs)
    got = ring_allreduce([x.copy() for x in xs], "sum")
    for g in got:
        np.testing.assert_array_equal(g, want)
    if size > 1000:     # the premise of comparing bit for bit: np.sum rounds differently
        assert (want != np.stack(xs).sum(0)).any()
