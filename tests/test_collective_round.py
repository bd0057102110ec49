"""A call of one round in C (`_core.one_round`, reduce.py's `_round`) and the
shortest path of one array (`reduce_array`).

The protocol tests drive one rank's one_round in this process against a
segment whose other rank is played by the test (its words and slots written
by hand), so every status and every word the call writes is checked without
depending on scheduling. The map tests check what users rely on: results in
rank order, the same bits on every rank, inputs mixed between shared arrays
read in place and private arrays, in place, and the same errors as before.
"""
import mmap
import time
import types

import numpy as np
import pytest

import pmaprt
from pmaprt import Pool, _core
from pmaprt._collective import reduce as R, segment as S
from test_collective import run as run_bounded   # list(it) in a thread, bounded

TIMEOUT_S = 120.0
F32, SUM = _core.REDUCE_F32, _core.REDUCE_SUM
WAIT_FREE, WAIT_PUB, WAIT_RED = _core.ROUND_WAIT_FREE, _core.ROUND_WAIT_PUB, _core.ROUND_WAIT_RED
MISMATCH, IN_PLACE = _core.ROUND_MISMATCH, _core.ROUND_IN_PLACE


def run(it):
    return run_bounded(it, TIMEOUT_S)


def test_round_layout_matches_the_segment():
    assert _core.ROUND_LAYOUT == (S.H_ABORT, S.H_BELL, S.H_SLEEPERS, S.L_PUB, S.L_RED,
                                  S.L_FREE, S.HEAD, S.HD_STAMP, S.HD_SRC_SEG, S.HD_SRC_OFF)


# --------------------------------------------------------------------------
# one rank's one_round against a hand-played peer


def make_segment(world):
    """An initialized collective segment in this process: (rank 0's endpoint,
    the mapping)."""
    mm = mmap.mmap(-1, S.segment_size(world))
    r = _core.Region(mm)
    slot = S.slot_bytes(world)
    r.store32(S.H_WORLD, world)
    r.store32(S.H_SLOTS, S.SLOTS)
    r.store64(S.H_SLOT_BYTES, slot)
    r.store64(S.H_RED_BYTES, S.red_bytes(world, slot))
    r.store64(S.H_MAGIC, S.MAGIC)
    seg = types.SimpleNamespace(region=r, mm=mm, buf=memoryview(mm))
    return R.ReduceRank(seg, 0), mm


def call(ep, x, out, m, stamp, split=False, phase=0, spin_ns=0, place=None, inputs=None):
    j = (m - 1) % ep.slots
    return _core.one_round(ep.mm, x, out, ep.stage[j], ep.red[j] if split else None, ep.lines,
                           ep.rank, m, ep.slots, stamp, F32, SUM, 1.0, spin_ns, phase, place,
                           inputs)


def play_peer_stage(ep, q, x, m, stamp, skip=None):
    """Rank q stages x for round m (all of it, or all but [a, b) elements)."""
    head = ep.stage[(m - 1) % ep.slots][q]
    data = x.view(np.uint8)
    if skip is None:
        ep.seg.buf[head + S.HEAD: head + S.HEAD + x.nbytes] = data
    else:
        a, b = skip
        ep.seg.buf[head + S.HEAD: head + S.HEAD + 4 * a] = data[: 4 * a]
        ep.seg.buf[head + S.HEAD + 4 * b: head + S.HEAD + x.nbytes] = data[4 * b:]
    ep.r.store64(head + S.HD_STAMP, stamp)
    ep.r.store32(ep.lines[q] + S.L_PUB, m)


def status(q, code):
    return (q << 8) | code


def test_direct_round_publishes_waits_and_reduces_in_rank_order():
    ep, _ = make_segment(2)
    x0 = np.arange(1000, dtype=np.float32)
    x1 = np.full(1000, 0.5, np.float32)
    out = np.zeros(1000, np.float32)
    # The peer has not published: rank 0 stages, publishes PUB = 1, and
    # comes back to wait for rank 1 (no spin).
    assert call(ep, x0, out, 1, 77) == status(1, WAIT_PUB)
    assert ep.r.load32(ep.lines[0] + S.L_PUB) == 1
    head = ep.stage[0][0]
    assert np.array_equal(np.frombuffer(ep.seg.buf[head + S.HEAD: head + S.HEAD + 4000],
                                        np.float32), x0)
    assert ep.r.load64(head + S.HD_STAMP) == 77
    assert not out.any()
    play_peer_stage(ep, 1, x1, 1, 77)
    assert call(ep, x0, out, 1, 77, phase=1) == _core.ROUND_DONE
    assert out.tobytes() == (x0 + x1).tobytes()
    assert ep.r.load32(ep.lines[0] + S.L_FREE) == 1


def test_round_that_reuses_a_slot_waits_for_its_readers_first():
    ep, _ = make_segment(2)
    x = np.ones(8, np.float32)
    out = np.empty_like(x)
    m = S.SLOTS + 1            # slot 0 again: rank 1 must have freed round 1
    ep.r.store32(ep.lines[0] + S.L_PUB, m - 1)
    assert call(ep, x, out, m, 5) == status(1, WAIT_FREE)
    assert ep.r.load32(ep.lines[0] + S.L_PUB) == m - 1        # nothing published
    ep.r.store32(ep.lines[1] + S.L_FREE, 1)
    assert call(ep, x, out, m, 5) == status(1, WAIT_PUB)
    assert ep.r.load32(ep.lines[0] + S.L_PUB) == m


def test_a_different_stamp_is_a_mismatch_and_an_input_in_place_goes_back():
    ep, _ = make_segment(2)
    x = np.ones(16, np.float32)
    out = np.zeros_like(x)
    assert call(ep, x, out, 1, 9) == status(1, WAIT_PUB)
    play_peer_stage(ep, 1, x, 1, 10)
    assert call(ep, x, out, 1, 9, phase=1) == status(1, MISMATCH)
    play_peer_stage(ep, 1, x, 1, 9)
    ep.r.store64(ep.stage[0][1] + S.HD_SRC_SEG, 3)     # rank 1 lent a shared array
    assert call(ep, x, out, 1, 9, phase=1) == status(1, IN_PLACE)
    assert not out.any() and ep.r.load32(ep.lines[0] + S.L_FREE) == 0
    # called again with every rank's input where it is (rank 1's: a buffer of
    # its own, at an offset aligned only to the element)
    lent = np.arange(20, dtype=np.float32)
    head = ep.stage[0][0] + S.HEAD
    inputs = ((ep.mm, lent), (head, 4))
    assert call(ep, x, out, 1, 9, phase=1, inputs=inputs) == _core.ROUND_DONE
    assert out.tobytes() == (x + lent[1:17]).tobytes()
    assert ep.r.load32(ep.lines[0] + S.L_FREE) == 1
    with pytest.raises(IndexError, match="input 1 does not hold the round's 64 bytes"):
        call(ep, x, out, 1, 9, phase=1, inputs=((ep.mm, lent), (head, 24)))


def test_split_round_names_a_lent_input_instead_of_copying_it():
    ep, _ = make_segment(2)
    x = np.ones(10, np.float32)
    out = np.zeros_like(x)
    head = ep.stage[0][0]
    assert call(ep, x, out, 1, 4, split=True, place=(7, 1234)) == status(1, WAIT_PUB)
    assert ep.r.load64(head + S.HD_SRC_SEG) == 7 and ep.r.load64(head + S.HD_SRC_OFF) == 1234
    assert not np.frombuffer(ep.seg.buf[head + S.HEAD: head + S.HEAD + 40], np.float32).any()
    # its own SRC_SEG does not send it back: it reads its own slice from x
    play_peer_stage(ep, 1, np.full(10, 2.0, np.float32), 1, 4, skip=(5, 10))
    assert call(ep, x, out, 1, 4, split=True, phase=1, place=(7, 1234)) == status(1, WAIT_RED)


def test_split_round_stages_all_but_its_slice_and_gathers():
    ep, _ = make_segment(2)
    n, h = 1001, 500                       # rank 0 reduces [0, 500), rank 1 [500, 1001)
    x0 = np.arange(n, dtype=np.float32)
    x1 = np.full(n, 2.0, np.float32)
    out = np.zeros(n, np.float32)
    head = ep.stage[0][0] + S.HEAD
    ep.seg.buf[head: head + 4 * n] = np.full(n, -7.0, np.float32).view(np.uint8)
    assert call(ep, x0, out, 1, 3, split=True) == status(1, WAIT_PUB)
    staged = np.frombuffer(ep.seg.buf[head: head + 4 * n], np.float32)
    assert (staged[:h] == -7.0).all()      # its own slice is read from x0, not staged
    assert np.array_equal(staged[h:], x0[h:])
    play_peer_stage(ep, 1, x1, 1, 3, skip=(h, n))
    assert call(ep, x0, out, 1, 3, split=True, phase=1) == status(1, WAIT_RED)
    red0 = ep.red[0][0]
    assert np.frombuffer(ep.seg.buf[red0: red0 + 4 * h], np.float32).tobytes() \
        == (x0[:h] + x1[:h]).tobytes()
    assert ep.r.load32(ep.lines[0] + S.L_RED) == 1
    red1 = ep.red[0][1]
    ep.seg.buf[red1: red1 + 4 * (n - h)] = (x0[h:] + x1[h:]).view(np.uint8)
    ep.r.store32(ep.lines[1] + S.L_RED, 1)
    assert call(ep, x0, out, 1, 3, split=True, phase=2) == _core.ROUND_DONE
    assert out.tobytes() == (x0 + x1).tobytes()
    assert ep.r.load32(ep.lines[0] + S.L_FREE) == 1


def test_spin_is_bounded_and_an_abort_ends_it():
    ep, _ = make_segment(2)
    x = np.ones(4, np.float32)
    out = np.empty_like(x)
    t0 = time.monotonic()
    assert call(ep, x, out, 1, 1, spin_ns=2_000_000) == status(1, WAIT_PUB)
    assert time.monotonic() - t0 < 5.0
    ep.r.store32(S.H_ABORT, 2)
    t0 = time.monotonic()
    assert call(ep, x, out, 1, 1, phase=1, spin_ns=60_000_000_000) == status(1, WAIT_PUB)
    assert time.monotonic() - t0 < 5.0     # not the 60 s spin


@pytest.mark.parametrize("change, exc, match", [
    ("heads", TypeError, "heads must be a tuple of 2 offsets"),
    ("far", IndexError, r"heads\[1\] = .* is out of the segment"),
    ("dst", ValueError, "src .* and dst .* must be the same"),
    ("phase", ValueError, "phase 3"),
    ("place", ValueError, "a place needs split"),
    ("inputs", TypeError, "inputs must be None or"),
    ("kind", ValueError, "kind 99"),
])
def test_bad_arguments_raise_clearly(change, exc, match):
    ep, mm = make_segment(2)
    x = np.ones(4, np.float32)
    args = [mm, x, np.empty(4, np.float32), ep.stage[0], None, ep.lines, 0, 1, ep.slots, 1,
            F32, SUM, 1.0, 0, 0, None, None]
    if change == "heads":
        args[3] = ep.stage[0][:1]
    elif change == "far":
        args[3] = (ep.stage[0][0], len(mm) - 8)
    elif change == "dst":
        args[2] = np.empty(5, np.float32)
    elif change == "phase":
        args[14] = 3
    elif change == "place":
        args[15] = (5, 0)              # a place needs split
    elif change == "inputs":
        args[16] = ((x,), (0,))
    else:
        args[10] = 99
    with pytest.raises(exc, match=match):
        _core.one_round(*args)


# --------------------------------------------------------------------------
# inside SPMD maps


@pytest.fixture(scope="module")
def pool():
    with Pool(3) as p:
        yield p


ONE_ROUND = S.MAX_SLOT_BYTES // 4 // 2 + 3    # float32 elements: one round, above SMALL_BYTES


def step_mixed_inputs(rows, lend, in_place):
    """Rank r's input: row r of a shared array (lent, read in place) where
    lend[r], else a private copy of it. -> (right?, bits, whether this rank's
    C round came back for another rank's input lent in place)."""
    r = pmaprt.axis_index("b")
    x = rows[r] if lend[r] else rows[r].copy()
    want = rows[0].copy()
    for q in range(1, len(lend)):
        want = want + rows[q]
    handed = []
    sources = R.ReduceRank._sources

    def counted(self, *args):
        handed.append(1)
        return sources(self, *args)
    R.ReduceRank._sources = counted
    try:
        got = pmaprt.allreduce(x, out=x) if in_place else pmaprt.allreduce(x)
    finally:
        R.ReduceRank._sources = sources
    return got.tobytes() == want.tobytes(), got.tobytes(), bool(handed)


@pytest.mark.parametrize("world, lend", [(2, (True, False)), (2, (False, True)),
                                         (3, (False, True, False)), (2, (False, False)),
                                         (2, (True, True)), (3, (True, True, False))])
@pytest.mark.parametrize("in_place", [False, True])
def test_one_round_with_inputs_lent_or_private_every_rank_the_same_bits(pool, world, lend,
                                                                          in_place):
    rows = pmaprt.zeros((world, ONE_ROUND), np.float32)
    rows[:] = np.random.default_rng(4).standard_normal((world, ONE_ROUND)).astype(np.float32)
    got = run(pool.map(step_mixed_inputs, [rows] * world, [lend] * world, [in_place] * world,
                       axis_name="b"))
    assert all(ok for ok, _, _ in got)
    assert len({bits for _, bits, _ in got}) == 1
    # every rank runs the round in C; where another rank lent its input, the
    # call comes back once for that input's buffer
    assert [handed for _, _, handed in got] == [any(lend[:r] + lend[r + 1:])
                                                 for r in range(world)]


def step_paths(kind):
    r = pmaprt.axis_index("b")
    x = np.arange(12, dtype=np.float32).reshape(3, 4) + r
    if kind == "2d":
        return pmaprt.psum(x, "b")
    if kind == "strided":
        return pmaprt.allreduce(x[:, ::2])
    if kind == "scalar0d":
        return pmaprt.allreduce(np.float32(r + 1) * np.ones((), np.float32))
    if kind == "mean_int":
        return pmaprt.pmean(np.arange(4) + r, "b")
    if kind == "op_list":
        return pmaprt.allreduce(x, op=["sum"])
    if kind == "as_dtype_list":
        return pmaprt.psum(x, "b", as_dtype=["bfloat16"])
    if kind == "out_strided":
        out = np.empty((3, 8), np.float32)[:, ::2]
        return pmaprt.allreduce(x, out=out)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, want", [
    ("2d", lambda: np.arange(12, dtype=np.float32).reshape(3, 4) * 2 + 1),
    ("strided", lambda: (np.arange(12, dtype=np.float32).reshape(3, 4) * 2 + 1)[:, ::2]),
    ("scalar0d", lambda: np.array(3.0, np.float32)),
    ("mean_int", lambda: np.arange(4) + 0.5),
])
def test_one_array_keeps_shape_and_dtype(pool, kind, want):
    a, b = run(pool.map(step_paths, [kind] * 2, axis_name="b"))
    w = want()
    for got in (a, b):
        assert got.shape == w.shape and got.dtype == w.dtype
        assert got.tobytes() == w.tobytes()


def test_an_out_that_is_not_c_contiguous_is_refused(pool):
    with pytest.raises(ValueError, match="out must be a writeable C-contiguous float32 array"):
        run(pool.map(step_paths, ["out_strided"] * 2, axis_name="b"))


@pytest.mark.parametrize("kind, exc, match", [
    ("op_list", ValueError, "op must be one of sum, mean, min, max"),
    ("as_dtype_list", ValueError, "as_dtype must be None, 'float16' or 'bfloat16'"),
])
def test_unhashable_op_or_as_dtype_get_the_usual_error(pool, kind, exc, match):
    with pytest.raises(exc, match=match):
        run(pool.map(step_paths, [kind] * 2, axis_name="b"))
