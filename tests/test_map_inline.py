"""The inline cost model's decisions, on constructed numbers (as test_sched
does for the scheduler): no pool, no clock."""
import pytest

from pmaprt._map import inline as I


def test_per_item_takes_the_least_of_the_largest_chunks():
    p = I.PerItem()
    p.add(4e-6, 1)                  # a first, small chunk: its fixed part inflates it
    assert p.est == 4e-6 and p.samples == 1
    p.add(16 * 1e-7, 16)            # 16 > SPAN x 1: the estimate starts afresh
    assert p.est == pytest.approx(1e-7) and p.samples == 1
    p.add(8 * 2e-7, 8)              # within SPAN of the largest: the least is kept
    assert p.est == pytest.approx(1e-7) and p.samples == 2
    p.add(16 * 5e-8, 16)
    assert p.est == pytest.approx(5e-8) and p.samples == 3
    p.add(1e-3, 1)                  # under 1/SPAN of the largest: ignored
    assert p.est == pytest.approx(5e-8) and p.samples == 3 and p.largest == 16


def test_decode_cost_is_trusted_only_from_two_chunks_large_enough():
    t = 1e-6
    # the largest / SPAN chunk's fixed part must be under DEC_MAX_ERROR of its items' cost
    enough = int(I.DEC_FIXED_S / (t * I.DEC_MAX_ERROR) * I.PerItem.SPAN) + I.PerItem.SPAN
    assert I.decode_known(t, 2, enough)
    assert not I.decode_known(t, 1, enough)           # one chunk only
    assert not I.decode_known(t, 2, 8)                # chunks too small
    assert not I.decode_known(None, 5, enough)        # no CPU time measured yet


def test_parallel_item_is_bounded_by_parent_cores_and_workers():
    # the parent's decode bounds it when it dominates
    assert I.parallel_item_s(1e-7, 1e-6, 0.0, 0.0, 16, cores=16) == pytest.approx(1e-6 + I.CONSUME_ITEM_S)
    # all the CPU shared over the cores
    par = I.parallel_item_s(1e-3, 1e-7, 1e-7, 0.0, 64, cores=4)
    assert par == pytest.approx((1e-3 + 1e-7 + 1e-7 + I.CONSUME_ITEM_S) / 4)
    # the workers: fewer of them than cores
    assert I.parallel_item_s(1e-3, 1e-7, 0.0, 0.0, 2, cores=16) == pytest.approx(1e-3 / 2)
    assert I.overhead_item_s(1e-7, 2e-7, 3e-7) == pytest.approx(6e-7 + I.CONSUME_ITEM_S)


def test_tiny_by_model_where_decoding_costs_as_much_as_the_call():
    # 1e-7 s items, decoded at 1e-7 s each: map is as fast
    assert I.tiny_by_model(1e-7, 1e-7, 0.0, 0.0, 16, cores=16)
    # 1e-4 s items on 16 cores: the workers win by far
    assert not I.tiny_by_model(1e-4, 1e-7, 1e-7, 0.0, 16, cores=16)
    # the margin: tiny while par * INLINE_MARGIN >= t
    dec = 1e-6 - I.CONSUME_ITEM_S
    assert I.tiny_by_model(1e-6 * I.INLINE_MARGIN * 0.99, dec, 0.0, 0.0, 64, cores=64)
    assert not I.tiny_by_model(1e-6 * I.INLINE_MARGIN * 1.01, dec, 0.0, 0.0, 64, cores=64)


def test_tiny_by_model_corrected_by_what_the_consumer_waited():
    t, dec = 1e-6, 1e-8     # the model alone: the workers win on 16 cores
    args = (t, dec, 0.0, 0.0, 16)
    assert not I.tiny_by_model(*args, cores=16)
    waited = (1000, 1000 * 1e-6, I.INLINE_MIN_CHUNKS)     # it waited 1 us per item
    assert I.tiny_by_model(*args, wall=t, waited=waited, cores=16)
    # not with too few records observed, nothing consumed since, or items that block
    assert not I.tiny_by_model(*args, wall=t, waited=(1000, 1e-3, I.INLINE_MIN_CHUNKS - 1), cores=16)
    assert not I.tiny_by_model(*args, wall=t, waited=(0, 1e-3, I.INLINE_MIN_CHUNKS), cores=16)
    assert not I.tiny_by_model(*args, wall=3 * t, waited=waited, cores=16)
    assert not I.tiny_by_model(*args, wall=None, waited=waited, cores=16)
    # nor for items above INLINE_OBS_MAX_T (a wait there says little)
    t = 2 * I.INLINE_OBS_MAX_T
    assert not I.tiny_by_model(t, dec, 0.0, 0.0, 16, wall=t, waited=(1000, 1.0, 10), cores=16)


def test_rest_worth_inline_and_computing():
    assert I.rest_worth_inline(int(I.INLINE_MIN_WORK_S / 1e-6) + 1, 1e-6)
    assert not I.rest_worth_inline(int(I.INLINE_MIN_WORK_S / 1e-6) - 1, 1e-6)
    assert I.computing(1e-6, 2e-6) and not I.computing(1e-6, 2.1e-6)
    assert not I.computing(1e-6, None)


def test_probe_break_even_is_the_models():
    # The probe keeps a map here while items cost under the model's break-even
    # with the parallel path's costs assumed; more cores, a lower bound.
    assert I.probe_item_s(1, 1) == pytest.approx(I.PROBE_MAX_ITEM_S)   # one worker: the cap
    for nwork, cores in ((2, 2), (16, 16)):
        t = I.probe_item_s(nwork, cores)
        assert I.tiny_by_model(t * 0.99, I.PROBE_DEC_S, I.PROBE_WENC_S, 0.0, nwork, cores=cores)
        assert not I.tiny_by_model(t * 1.01, I.PROBE_DEC_S, I.PROBE_WENC_S, 0.0, nwork,
                                   cores=cores)
    assert I.probe_item_s(16, 16) < I.probe_item_s(2, 2)


def test_map_costs_feed_the_model():
    c = I.MapCosts(0, 16)
    assert c.cpu_item is None and not c.decode_known()
    c.on_chunk(100, 0.0, 1e-4, 1e-4, 0.0, consumed=0)
    assert c.cpu_item == pytest.approx(1e-6)
    c.on_chunk(100, 0.0, 1e-4, 3e-4, 0.0, consumed=0)
    assert c.cpu_item == pytest.approx(2e-6)      # an even moving average
    assert c.obs_consumed is None                 # no chunk ran its full target yet
    c.on_chunk(10_000, 0.0, 0.01, 0.01, 0.0, consumed=500)
    assert c.obs_consumed == 500 and c.obs_records == 0
    c.on_encoded(1e-3, 1000)
    assert c.enc_item == pytest.approx(1e-6)
    c.on_encoded(3e-3, 1000)
    assert c.enc_item == pytest.approx(2e-6)


def test_probe_pieces_shrink_with_the_workers_to_a_floor():
    # nwork workers wait through a piece: its budget keeps nwork x piece
    # about PROBE_IDLE_WORKERS full pieces, down to the floor.
    full = I.PROBE_PIECE_S
    assert I.probe_piece_s(1) == I.probe_piece_s(I.PROBE_IDLE_WORKERS) == full
    assert I.probe_piece_s(2 * I.PROBE_IDLE_WORKERS) == pytest.approx(full / 2)
    assert I.probe_piece_s(16) == pytest.approx(full * I.PROBE_IDLE_WORKERS / 16)
    assert I.probe_piece_s(1024) == I.PROBE_MIN_PIECE_S
    assert I.PROBE_MIN_PIECE_S > 2 * I.PROBE_SLACK_S    # dear items must still look dear
    ws = [1, 2, 4, 8, 16, 64, 256, 1024]
    assert all(I.probe_piece_s(a) >= I.probe_piece_s(b) for a, b in zip(ws, ws[1:]))
