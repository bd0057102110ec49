"""A worker's death, on the map's side: what runs again, on a Recovery built
from plain values (no pool, no process)."""
from pmaprt._errors import WorkerCrashedError
from pmaprt._map.collect import ResultBook
from pmaprt._map.recovery import Recovery
from pmaprt._stats import MapStats


def _recovery(**options):
    return Recovery(ResultBook(True), MapStats(), **options)


def test_untracked_map_fails_at_the_lost_chunk():
    rec = _recovery()
    assert rec.on_lost("worker 0 (pid 9) was killed", 9, -9, 10, 8, 3, None) is None
    assert rec.book.error_at == 10
    assert isinstance(rec.book.errors[10], WorkerCrashedError)


def test_item_running_at_death_is_charged_the_others_run_again_free():
    rec = _recovery(retries=1, tracked=True)
    # chunk [10, 18) lost with 3 items done: those, the item at fault, the rest
    assert rec.on_lost("worker 0 died", 9, 1, 10, 8, 3, None) == [(10, 3), (13, 1), (14, 4)]
    assert rec.attempts == {13: 1} and rec.stats.retried == 1 and rec.stats.lost_chunks == 1
    # again on item 13: its retries are used up; the map fails there, the rest is not run
    assert rec.on_lost("worker 1 died", 9, 1, 13, 5, 0, None) == []
    assert rec.book.error_at == 13
    assert "after 1 retry" in str(rec.book.errors[13])


def test_returned_errors_take_the_item_s_place_and_the_rest_runs():
    rec = _recovery(return_errors=True, tracked=True)
    assert rec.on_lost("worker 0 died", 9, 1, 0, 4, 1, None) == [(0, 1), (2, 2)]
    kind, count, payload = rec.book.pending[1]
    assert count == 1 and isinstance(payload[0], WorkerCrashedError)
    assert rec.book.error_at is None


def test_death_after_every_item_ran_halves_the_chunk_free_of_charge():
    rec = _recovery(retries=1, tracked=True)
    assert rec.on_lost("worker 0 died", 9, 1, 0, 8, 8, None) == [(0, 4), (4, 4)]
    assert rec.attempts == {}
    # alone, the item is charged
    assert rec.on_lost("worker 0 died", 9, 1, 5, 1, 1, None) == [(5, 1)]
    assert rec.attempts == {5: 1}


def test_spurious_timeout_runs_the_chunk_again_and_a_recorded_chunk_nothing():
    rec = _recovery(timeout=1.0, tracked=True)
    assert rec.on_lost("worker 0 was killed", 9, -9, 0, 4, 2, "spurious") == [(0, 4)]
    rec.book.add(20, 1, 4, b"")
    assert rec.on_lost("worker 0 died", 9, 1, 20, 4, 0, None) is None


def test_load_crashes_fail_the_map_after_enough_in_a_row():
    err = WorkerCrashedError("died loading", 9, 1)
    rec = _recovery()
    rec.on_load_crash(err)
    assert rec.book.here_error is err          # no retries: at once
    rec = _recovery(retries=1, nwork=2, tracked=True)
    for _ in range((1 + 1) * (2 + 2)):
        rec.on_load_crash(err)
    assert rec.book.here_error is None
    rec.on_load_crash(err)
    assert rec.book.here_error is err


class _Words:
    """Retry words: put succeeds while a word is free."""

    def __init__(self, free):
        self.free, self.put = free, []

    def range_put(self, off, a, k):
        if self.free:
            self.free -= 1
            self.put.append((off, a, k))
            return True
        return False


def test_backlog_flushes_while_retry_words_are_free():
    rec = _recovery()
    rec.backlog.extend([(0, 5), (10, 5), (20, 5)])
    words, wakes = _Words(2), []
    rec.flush(words, 1000, lambda: wakes.append(1))
    assert [(a, k) for _, a, k in words.put] == [(0, 5), (10, 5)]
    assert rec.backlog == [(20, 5)] and len(wakes) == 2
