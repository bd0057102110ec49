"""Chunk sizing, spans and victims: the scheduler's rules, one by one, and
what a real map's statistics show of them."""
import math

import pytest

from pmaprt import Pool, _sched as S


def feed(z, count, t_item):
    """One chunk of `count` items at `t_item` seconds each."""
    z.observe(count, count * t_item)


def test_first_chunk_measures_then_chunks_grow_at_most_growth_x():
    z = S.ChunkSizer()
    assert z.size() == 1                    # a function never seen: one item measures
    feed(z, 1, 1e-5)                        # 10 us: the 2 ms target is 200 items
    sizes = [z.size()]
    for _ in range(4):
        feed(z, sizes[-1], 1e-5)
        sizes.append(z.size())
    assert sizes[:3] == [S.GROWTH, S.GROWTH ** 2, S.GROWTH ** 3]
    assert all(b <= a * S.GROWTH for a, b in zip(sizes, sizes[1:]))


def test_target_doubles_while_steady_up_to_max_then_resets_on_a_change():
    t = 1e-5
    z = S.ChunkSizer(t_item=t)              # a known function: sized at once
    targets = []
    for _ in range(8):
        c = z.size()
        targets.append(c * t)
        feed(z, c, t)
    # 2 ms, 4, 8, 16, then held at MAX_TARGET_S
    assert targets[0] == pytest.approx(S.TARGET_CHUNK_S, rel=0.01)
    assert targets[3] == pytest.approx(S.MAX_TARGET_S, rel=0.01)
    assert max(targets) == pytest.approx(S.MAX_TARGET_S, rel=0.01)
    # items 3x dearer (outside STEADY): back to the 2 ms target, sized from
    # the moving estimate
    feed(z, z.size(), 3 * t)
    assert z.grown == S.TARGET_CHUNK_S
    assert z.size() * z.t_item == pytest.approx(S.TARGET_CHUNK_S, rel=0.01)


def test_moving_estimate_follows_a_cost_change_within_a_few_chunks():
    z = S.ChunkSizer(t_item=1e-5)
    for _ in range(4):
        feed(z, z.size(), 1e-3)             # items now 100x dearer
    assert z.t_item == pytest.approx(1e-3, rel=0.15)
    # sized from the new cost: at most the largest target's worth of 1 ms items
    assert z.size() * 1e-3 <= 1.2 * S.MAX_TARGET_S


def test_feed_sizer_and_hold_keep_the_base_target():
    t = 1e-5
    z = S.ChunkSizer(t_item=t, grow=False)
    for _ in range(5):
        feed(z, z.size(), t)
    assert z.size() * t == pytest.approx(S.TARGET_CHUNK_S, rel=0.01)
    z = S.ChunkSizer(t_item=t)
    for _ in range(3):
        feed(z, z.size(), t)
    assert z.size() * t > S.TARGET_CHUNK_S
    z.hold()                                # a chunk's results were large
    assert z.size() * t == pytest.approx(S.TARGET_CHUNK_S, rel=0.01)


def test_chunks_shrink_toward_the_end():
    t = 1e-5
    z = S.ChunkSizer(t_item=t)
    for _ in range(5):
        feed(z, z.size(), t)                # grown to 16 ms: 1,600 items
    def about(a, b):
        return abs(a - b) <= 1              # float rounding of target / t

    assert about(z.size(remaining=10 ** 6, workers=4), S.MAX_TARGET_S / t)
    # near the end: half an even share of what is unclaimed, never below 2 ms
    assert about(z.size(remaining=1000, workers=4), S.TARGET_CHUNK_S / t)
    assert about(z.size(remaining=8000, workers=4), S.TAIL_SHARE * 8000 / 4)
    sizes = [z.size(remaining=r, workers=4) for r in (10 ** 6, 8000, 4000, 1000, 100)]
    assert sizes == sorted(sizes, reverse=True)
    assert S.ChunkSizer(fixed=7).size(remaining=3, workers=4) == 7   # chunksize=N as given


def test_tiny_items_are_capped_at_max_chunk():
    z = S.ChunkSizer(t_item=1e-9)
    assert z.size() == S.MAX_CHUNK


def test_span_size_is_guided_self_scheduling():
    W = 4
    assert S.span_size(10, 10_000, W) == math.ceil(10_000 / (S.SPAN_FACTOR * W))
    assert S.span_size(5000, 10_000, W) == 5000     # at least one chunk
    assert S.span_size(50, 30, W) == 30             # at most what is left
    spans, left = [], 100_000
    while left:
        s = S.span_size(16, left, W)
        spans.append(s)
        left -= s
    assert spans == sorted(spans, reverse=True) and spans[-1] <= 16
    assert len(spans) < 100                          # O(W log n) claims, not n / 16


def test_victim_order_is_reproducible_from_the_seed():
    def orders(seed, rank, workers=8, draws=20):
        rng = S.victim_rng(seed, rank)
        return [S.victims(rng, rank, workers) for _ in range(draws)]

    a = orders(7, 3)
    assert a == orders(7, 3)                         # same seed, same rank: same schedule
    assert all(sorted(v) == [0, 1, 2, 4, 5, 6, 7] for v in a)   # every other rank, once
    assert a != orders(8, 3) and a != orders(7, 2)  # seed and rank both matter
    assert len({tuple(v) for v in a}) > 1            # not one fixed order


def spin(n):
    s = 0
    for i in range(n):
        s += i
    return s


def test_a_real_map_grows_then_shrinks_its_chunks_and_accounts_busy_and_idle():
    with Pool(2) as pool:
        n = 6000
        it = pool.map(spin, [2000] * n, inline=False)      # ~50-100 us each
        assert list(it) == [spin(2000)] * n
        st = it.stats
    assert st.items == n
    for w in st.workers:
        if not w.chunks:
            continue
        # busy: the sum of its chunks' times; idle: the rest of the map's wall time
        assert w.busy_s == pytest.approx(sum(t1 - t0 for t0, t1, _, _ in w.chunk_log), rel=1e-6)
        assert w.busy_s > 0 and w.idle_s >= 0
        assert w.busy_s + w.idle_s == pytest.approx(max(st.wall_s, w.busy_s), rel=1e-6)
    log = sorted(c for w in st.workers for c in w.chunk_log)   # by start time
    sizes = [c[3] for c in log]
    assert sizes[0] == 1                                    # the first chunk measures
    assert max(sizes) > S.GROWTH                            # then chunks grow
    # the last chunks to start are smaller than the largest: the tail is short
    assert max(sizes[-2:]) < max(sizes)


def test_short_work_is_taken_whole_and_longer_work_an_even_share():
    """With a cost per item carried from an earlier map, a first chunk whose
    work all ends within SHORT_WORK_S takes it whole (one claim, one record,
    no second worker); more work takes an even share of what is unclaimed."""
    assert S.ChunkSizer(0, 1e-6).size(10, 2) >= 10      # 10 us of work: whole
    assert S.ChunkSizer(0, 1e-6).size(1000, 2) == 500   # 1 ms of work: an even share
    assert S.ChunkSizer(0, 1e-6).size(1000, 4) == 250
