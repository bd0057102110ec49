"""The scheduler simulator: exact on cases with a known answer, driving the
runtime's own policy code, the peers' documented chunk sizes, determinism."""
import math

import pytest

from pmaprt import _sched
from pmaprt._runtime import claims
from pmaprt.bench import sim, sim_peers as P
from pmaprt.bench.sim_engine import FREE, Costs, Engine, Overheads
from pmaprt.bench.sim_pmaprt import simulate_pmaprt

OVER = Overheads("test", start_s=1e-4, claim_s=1e-6, chunk_s=2e-6, item_s=1e-7,
                 parent_chunk_s=5e-6, parent_item_s=1e-8)


def test_equal_items_static_chunks_follow_the_ceil_arithmetic():
    # 100 items of 1 ms, 4 workers, chunks of 7: 14 chunks of 7 and one of 2,
    # taken in turn: ceil(15 / 4) = 4 rounds, each as long as a chunk of 7.
    n, W, t = 100, 4, 1e-3
    e = Engine(W, Costs([t] * n), FREE)
    r = P._run(e, P.QueueSim(e, P.static_chunks(n, 7)), "static")
    assert r.chunks == math.ceil(n / 7)
    assert r.makespan_s == pytest.approx(math.ceil(15 / 4) * 7 * t)
    # mp.Pool's own size for 100 items on 4 workers: ceil(100 / 16) = 7
    assert P.mp_pool_chunksize(n, W) == 7
    r = P.simulate_peer("mp_pool_map", Costs([t] * n), W, FREE)
    assert r.makespan_s == pytest.approx(28 * t)


def test_overheads_add_up_exactly_on_one_worker():
    n, t = 10, 1e-3
    e = Engine(1, Costs([t] * n), OVER)
    r = P._run(e, P.QueueSim(e, P.static_chunks(n, 5)), "static")
    worker = OVER.start_s + 2 * (OVER.claim_s + OVER.chunk_s) + n * (t + OVER.item_s)
    assert r.makespan_s == pytest.approx(worker + OVER.parent_chunk_s + 5 * OVER.parent_item_s)


def test_one_huge_item_bounds_every_policy():
    # one item of 1 s among 999 of 1 us: the ideal is the item itself, and the
    # even share (total / W) is W times smaller than the makespan
    costs = Costs([1.0] + [1e-6] * 999)
    for W in (2, 16, 64):
        for policy in ("pmaprt",) + P.PEERS:
            if policy == "dask":
                continue
            r = sim.simulate(policy, costs, W, {"pmaprt": FREE, "pipe": FREE})
            assert r.makespan_s >= 1.0
            assert r.over_ideal == pytest.approx(1.0, abs=0.01), (policy, W)
            assert r.over_even_share == pytest.approx(W, rel=0.01)


def test_pmaprt_accounts_for_every_item_and_stays_near_the_ideal():
    costs = Costs([1e-5 * (1 + (i * 7919) % 13) for i in range(5000)])
    r = simulate_pmaprt(costs, 64, OVER)     # the engine raises unless all 5000 ran
    assert r.items == 5000 and 0 < sum(r.chunk_sizes) <= 5000
    assert 1.0 <= r.over_ideal < 2.0
    with pytest.raises(RuntimeError, match="ran 0 of 3 items"):
        Engine(2, Costs([1.0] * 3), FREE).run("nothing")


def test_the_simulation_drives_the_runtime_claim_code(monkeypatch):
    calls = []
    real = claims.ClaimTaker._claim_index

    def spy(self, ctx):
        got = real(self, ctx)
        calls.append(got)
        return got
    monkeypatch.setattr(claims.ClaimTaker, "_claim_index", spy)
    simulate_pmaprt(Costs([1e-4] * 500), 4, OVER, probe=False, warm=False)
    taken = sorted((lo, n) for lo, n, _ in filter(None, calls))
    # the claims cover [0, 500) once each (a preempted chunk's rest may come back)
    assert taken[0][0] == 0 and sum(n for _, n in taken) >= 500
    assert calls[-1] is None


def test_a_scheduler_constant_changes_the_simulated_result(monkeypatch):
    costs = Costs([1e-4] * 4000)
    base = simulate_pmaprt(costs, 16, OVER, warm=False)
    monkeypatch.setattr(_sched, "TARGET_CHUNK_S", 0.02)
    monkeypatch.setattr(_sched, "MAX_TARGET_S", 0.02)
    big = simulate_pmaprt(costs, 16, OVER, warm=False)
    assert max(big.chunk_sizes) > max(base.chunk_sizes)
    assert big.chunks < base.chunks
    monkeypatch.setattr(_sched, "SPAN_FACTOR", 1000)
    assert simulate_pmaprt(costs, 16, OVER, warm=False).makespan_s != big.makespan_s


def test_first_chunk_from_a_carried_estimate_takes_an_even_share_at_most():
    z = _sched.ChunkSizer(t_item=1e-6)           # 2 ms target: 2,000 items
    assert z.size(remaining=10_000, workers=100) == 100
    z.observe(100, 100 * 1e-6)
    assert z.size(remaining=9_900, workers=100) > 100     # measured now: no cap


def test_peer_chunk_sizes_are_their_documented_ones():
    assert P.mp_pool_chunksize(1000, 2) == 125          # ceil(1000 / 8)
    assert P.mp_pool_chunksize(1001, 2) == 126
    assert P.mpire_chunksize(51200, 16) == 50           # ceil(51200 / 1024)
    costs = Costs([1e-3] * 640)
    r = P.simulate_peer("mpire", costs, 2, FREE)
    assert set(r.chunk_sizes) == {5}
    r = P.simulate_peer("mp_pool_imap", costs, 2, FREE)
    assert set(r.chunk_sizes) == {1}
    r = P.simulate_peer("dask", Costs([1e-3] * 100), 4, FREE)
    assert r.makespan_s >= 100 * P.DASK_TASK_S        # a serial scheduler: 1 ms per task


def test_joblib_batches_start_at_one_then_grow_toward_its_duration_bounds():
    e = Engine(2, Costs([1e-4] * 20_000), FREE)
    j = P.JoblibSim(e)
    r = P._run(e, j, "joblib")
    assert j.batch_sizes[:4] == [1, 1, 1, 1]          # pre_dispatch: 2W batches of one
    # batches of 0.1 ms items double while they last under 0.2 s
    grown = [b for b in j.batch_sizes if b > 1]
    assert grown and all(b <= 2 * a for a, b in zip(j.batch_sizes, j.batch_sizes[1:])
                         if b > a)
    assert r.items == 20_000


def test_joblib_shrinks_a_batch_past_two_seconds():
    e = Engine(1, Costs([1e-3]), FREE)
    j = P.JoblibSim(e)
    j.effective, j.smoothed = 64, 3.2             # 64 items took 3.2 s
    assert j.compute_batch_size() == max(2 * int(64 * 0.2 / 3.2), 1) == 8
    j.effective, j.smoothed = 4, 0.05             # too fast: at most double
    assert j.compute_batch_size() == 8


def test_same_seed_same_schedule_other_seed_may_differ():
    costs = Costs([1e-5 * (1 + (i * 31) % 97) for i in range(8000)])
    a = simulate_pmaprt(costs, 64, OVER, seed=3)
    b = simulate_pmaprt(costs, 64, OVER, seed=3)
    assert (a.makespan_s, a.chunk_sizes, a.steals) == (b.makespan_s, b.chunk_sizes, b.steals)


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="item costs"):
        Costs([])
    with pytest.raises(ValueError, match="finite"):
        Costs([1.0, -1.0])
    with pytest.raises(ValueError, match="workers"):
        Engine(0, Costs([1.0]), FREE)
    with pytest.raises(ValueError, match="unknown policy"):
        P.simulate_peer("nope", Costs([1.0]), 2, FREE)


def test_the_table_and_plot_show_every_policy_and_worker_count(tmp_path):
    rows = []
    for W in (2, 16):
        costs = Costs([1e-4] * 800)
        for p in sim.POLICIES:
            rows.append(dict(sim.simulate(p, costs, W, {"pmaprt": OVER, "pipe": OVER})
                             .as_dict(), workload="medium"))
    text = sim.render(rows, {"pmaprt": OVER})
    for p in sim.POLICIES:
        assert p in text
    assert "W=16" in text
    pytest.importorskip("matplotlib")
    fig = sim.ideal_figure(rows)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == len(sim.POLICIES) + 1       # + the goal line
    fig.savefig(tmp_path / "x.png")


def test_heavy_tailed_draws_compare_the_probe_and_the_references():
    cal = sim.WL.Calibration(iters_per_us=1000.0)
    rows = sim.heavy_draws({"pmaprt": OVER, "pipe": OVER}, cal, 2, workers=(2, 16))
    assert {(r["workers"], r["draw_seed"]) for r in rows} == {
        (W, 20240601 + k) for W in (2, 16) for k in range(2)}
    for r in rows:
        assert all(r[c] >= 1.0 - 1e-9 for c in ("pmaprt_no_probe", "mp_pool_map", "greedy"))
        # the probe's caller finishes its item while the workers take the
        # rest: one core more than the bound counts, never more
        W = r["workers"]
        assert r["pmaprt"] >= W / (W + 1) - 1e-9
    # different draws are different inputs
    assert rows[0]["greedy"] != rows[1]["greedy"] or rows[0]["pmaprt"] != rows[1]["pmaprt"]
    text = sim.render_draws(rows)
    assert "2 draws" in text and "pmaprt_no_probe" in text


def test_even_pieces_keep_every_item_in_order_in_runs_of_about_equal_cost():
    from pmaprt.bench.sim_measure import even_pieces
    args = [1] * 100
    pieces = even_pieces(args, 8)
    assert [a for p in pieces for a in p] == args
    assert len(pieces) == 8 and all(sum(p) >= 100 / 8 for p in pieces[:-1])
    skewed = [1, 1, 50, 1, 1, 1, 1, 1, 1, 1]
    pieces = even_pieces(skewed, 4)
    assert [a for p in pieces for a in p] == skewed
    assert pieces[0] == [1, 1, 50]          # a dear item closes its run alone

