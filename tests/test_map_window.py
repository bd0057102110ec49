"""The consumer window's size, on constructed numbers."""
from pmaprt._map import window as W


def test_window_holds_chunks_per_worker_and_a_floor():
    assert W.window_items(2, 1.0) == W.WINDOW_MIN_ITEMS
    big = W.window_items(16, 1000.0)
    assert big == W.WINDOW_CHUNKS_PER_WORKER * 16 * 1000


def test_window_is_short_while_the_map_may_go_inline():
    # tiny items: about INLINE_WINDOW_S of map's time ahead, never under the floor
    assert W.window_items(16, 1000.0, cpu_item=1e-7) == int(W.INLINE_WINDOW_S / 1e-7)
    assert W.window_items(16, 10.0, cpu_item=1e-3) == W.WINDOW_MIN_ITEMS
    # ... nor under 4 chunks per worker, or workers would wait for it
    assert W.window_items(16, 10_000.0, cpu_item=1e-3) == 4 * 16 * 10_000
    # no cost measured yet: the full window
    assert W.window_items(16, 1000.0, cpu_item=None) == W.window_items(16, 1000.0)
