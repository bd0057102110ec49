"""The harness's judgements on constructed data: the verdict from pairs, the
sweep summary, the lower bound behind /ideal, the noise flag, the closing
summary and the plots' axes (read back from the figure objects)."""
import random

import pytest

from pmaprt.bench import verdict as V
from pmaprt.bench.derive import derive
from pmaprt.bench.records import new_record, new_workload_entry
from pmaprt.bench.report import render
from pmaprt.bench.runners import BuiltinMap, MpPoolMap, Pmaprt, PPE
from pmaprt.bench.summary import closing_summary


# --- verdict from pairs


def test_verdict_from_the_pairs_spread():
    assert V.verdict(V.interval([1.2, 1.3, 1.1])) == V.FASTER
    assert V.verdict(V.interval([0.8, 0.9, 0.95])) == V.SLOWER
    assert V.verdict(V.interval([1.4, 0.98, 1.3])) == V.SAME   # one pair disagrees
    iv = V.interval([1.2, 1.3, 1.1])
    assert (iv["ratio"], iv["lo"], iv["hi"], iv["pairs"]) == (1.2, 1.1, 1.3, 3)
    # a noisy machine: the win must clear the margin in every pair
    assert V.verdict(iv, margin=1.5) == V.NOISY
    assert V.verdict(V.interval([3.0, 2.0, 2.5]), margin=1.5) == V.FASTER
    assert V.verdict(V.interval([0.3, 0.5]), margin=1.5) == V.SLOWER
    assert V.verdict(None) is None


def test_cross_interval_takes_the_extreme_pairings():
    iv = V.cross_interval([2.0, 1.8, 1.9], [1.0, 1.2, 1.1])
    assert iv["ratio"] == pytest.approx(1.9 / 1.1)
    assert iv["lo"] == pytest.approx(1.8 / 1.2) and iv["hi"] == pytest.approx(2.0 / 1.0)
    assert V.verdict(iv) == V.FASTER
    assert V.verdict(V.cross_interval([1.0, 1.5], [1.2, 1.3])) == V.SAME


def test_quiet_and_loaded_runs_never_give_opposite_verdicts():
    """The goal's property on simulated runs: a true 10 % difference either
    way (or none) measured quietly (+-5 % per run) and under load (each run
    slowed by up to the noise check's factor, the loaded run's margin): the
    two verdicts are never one faster and the other slower."""
    rng = random.Random(7)
    for truth in (0.9, 1.0, 1.1):
        for _ in range(300):
            def runs(speed, slow):
                return [speed * rng.uniform(0.95, 1.05) / rng.uniform(1.0, slow)
                        for _ in range(5)]
            quiet = V.verdict(V.cross_interval(runs(truth, 1.0), runs(1.0, 1.0)))
            loaded = V.verdict(V.cross_interval(runs(truth, 1.9), runs(1.0, 1.9)), margin=1.9)
            assert {quiet, loaded} != {V.FASTER, V.SLOWER}, (truth, quiet, loaded)
            if truth == 1.0:
                assert quiet != V.FASTER or loaded != V.FASTER


# --- the lower bound behind /ideal


def test_ideal_bound_is_a_lower_bound():
    # fastest serial run / W, or the dearest item alone, whichever is larger
    assert V.ideal_bound([0.3, 0.2, 0.25], 0.05, 2) == pytest.approx(0.1)
    assert V.ideal_bound([0.3, 0.2], 0.15, 2) == pytest.approx(0.15)
    assert V.ideal_bound([], 0.1, 2) is None


def _heavy(times_pm, serial=(0.2, 0.2, 0.2), paired=(0.2, 0.2, 0.2), longest=0.01):
    entries = {"heavy_tailed": new_workload_entry("heavy_tailed", longest_item_s=longest)}
    base = new_record("heavy_tailed", BuiltinMap(), times_s=list(serial),
                      median_s=sorted(serial)[1], max_s=max(serial), min_s=min(serial))
    pm = new_record("heavy_tailed", Pmaprt(), times_s=list(times_pm),
                    median_s=sorted(times_pm)[len(times_pm) // 2], min_s=min(times_pm),
                    max_s=max(times_pm), paired_serial_s=list(paired))
    return entries, base, pm


def test_over_ideal_uses_the_fastest_serial_run_and_flags_below_one():
    entries, base, pm = _heavy([0.11, 0.12, 0.13], paired=[0.24, 0.22, 0.2])
    derive([base, pm], entries, 2)
    assert entries["heavy_tailed"]["ideal_s"] == pytest.approx(0.1)  # 0.2 / 2, not 0.24 / 2
    assert pm["makespan_over_ideal"] == pytest.approx(1.2)
    assert pm["ranges"]["makespan_over_ideal"] == pytest.approx([1.1, 1.3])
    doc = _doc(entries, [base, pm])
    assert "1.20 (1.10-1.30)" in render(doc) and "/ideal '!'" not in render(doc)
    # a run below the bound is a measurement error, flagged
    entries, base, pm = _heavy([0.09, 0.12, 0.13])
    derive([base, pm], entries, 2)
    text = render(_doc(entries, [base, pm]))
    assert "1.20 (0.90-1.30)!" in text and "/ideal '!': a run read below the lower bound" in text


# --- the noise flag


def _check(when, speedups):
    return {"when": when, "workers": 2, "speedups": speedups, "median": sorted(speedups)[1],
            "min": min(speedups), "max": max(speedups)}


def test_noise_flag_and_margin():
    quiet = [_check("start", [1.9, 1.95, 1.8]), _check("end", [1.85, 1.9, 1.92])]
    assert V.noise_trusted(quiet, 2) == {"trusted": True, "margin": 1.0, "note": None}
    loaded = [_check("start", [1.9, 1.95, 1.8]), _check("end", [1.2, 1.4, 1.3])]
    n = V.noise_trusted(loaded, 2)
    assert n["trusted"] is False and n["margin"] == pytest.approx(2 / 1.2)
    assert "end: 1.30x median, 1.20x lowest" in n["note"]
    dip = [_check("start", [1.9, 1.95, 1.3])]   # one pair below 0.7 W
    assert V.noise_trusted(dip, 2)["trusted"] is False
    assert V.noise_trusted([], 1)["trusted"] is True


def _map_workload(pm_times, mp_times, serial=0.2):
    entries = {"medium": new_workload_entry("medium")}
    base = new_record("medium", BuiltinMap(), times_s=[serial] * 3, median_s=serial)
    pm = new_record("medium", Pmaprt(), times_s=pm_times, median_s=sorted(pm_times)[1],
                    paired_serial_s=[serial] * 3)
    mp = new_record("medium", MpPoolMap(), times_s=mp_times, median_s=sorted(mp_times)[1],
                    paired_serial_s=[serial] * 3)
    slow = new_record("medium", PPE(), times_s=[1.0] * 3, median_s=1.0,
                      paired_serial_s=[serial] * 3)
    return entries, [base, pm, mp, slow]


def test_verdicts_per_workload_and_the_noisy_machine():
    entries, recs = _map_workload([0.11, 0.1, 0.105], [0.14, 0.15, 0.16])
    derive(recs, entries, 2)
    vs = {v["against"]: v for v in entries["medium"]["verdicts"]}
    assert vs["builtin_map"]["verdict"] == V.FASTER
    assert vs["builtin_map"]["ratio"] == pytest.approx(0.2 / 0.105)
    assert vs["mp_pool_map"]["verdict"] == V.FASTER
    assert vs["mp_pool_map"]["lo"] == pytest.approx(0.14 / 0.11)
    assert entries["medium"]["best_peer"] == "mp_pool_map"
    # the same data on a machine that failed the noise check (margin 1.6):
    # 1.27-1.6x over mp.Pool is within its noise, 5x over cf.PPE is not
    entries, recs = _map_workload([0.11, 0.1, 0.105], [0.14, 0.15, 0.16])
    derive(recs, entries, 2, margin=1.6)
    vs = {v["against"]: v for v in entries["medium"]["verdicts"]}
    assert vs["mp_pool_map"]["verdict"] == V.NOISY
    assert vs["ppe_cs1"]["verdict"] == V.FASTER
    noise = {"trusted": False, "margin": 1.6, "note": "the machine was not giving 2 cores",
             "checks": [_check("start", [1.2, 1.3, 1.25])]}
    doc = _doc(entries, recs, noise=noise)
    text = render(doc)
    assert "NOISY MACHINE: the machine was not giving 2 cores" in text
    assert "no verdict: within the noise (every pair, but not by 1.60x)" in text
    summary = "\n".join(doc["summary"])
    assert summary.startswith("noise check FAILED")
    assert "medium: pmaprt vs builtin map: faster 1.90x (1.82-2.00)" in summary  # clears 1.6x
    assert "vs the best peer, mp.Pool.map: no verdict: within the noise 1.43x" in summary
    assert "faster than 1 of 2 peers" in summary and "no verdict (noise) for 1" in summary


def test_an_unsteady_workload_raises_its_own_margin():
    entries, recs = _map_workload([0.11, 0.1, 0.105], [0.14, 0.15, 0.16])
    recs[1]["paired_serial_s"] = [0.2, 0.4, 0.2]   # a neighbour woke up mid-workload
    derive(recs, entries, 2)
    e = entries["medium"]
    assert e["serial_spread"] == pytest.approx(2.0)
    assert "differed by 2.00x" in e["noise_note"]
    assert all(v["margin"] == pytest.approx(2.0) for v in e["verdicts"])


# --- the sweep summary


def _sweep(points, adaptive=0.1, inline=False):
    """points: chunksize -> (fixed times, adaptive times beside them)."""
    entries = {"medium": new_workload_entry("medium", adaptive_chunksize=None if inline else 78)}
    base = new_record("medium", BuiltinMap(), times_s=[0.2] * 3, median_s=0.2)
    ad = new_record("medium", Pmaprt(), times_s=[adaptive] * 3, median_s=adaptive,
                    stats={"mode": "inline" if inline else "index"})
    recs = [base, ad]
    for cs, (ft, at) in points.items():
        recs.append(new_record("medium", Pmaprt(), kind="sweep", params={"chunksize": cs},
                               times_s=ft, median_s=sorted(ft)[1], items_per_s=1.0,
                               stats={"paired_adaptive_s": at}))
    derive(recs, entries, 2)
    return entries, recs


def test_sweep_summary_names_the_known_best_and_agrees_with_its_table():
    # 256 is 25 % faster than adaptive in every pair; 1,024's single fast
    # median came from a fast moment (adaptive beside it was as fast)
    entries, recs = _sweep({
        16: ([0.15, 0.16, 0.14], [0.1] * 3),
        256: ([0.08, 0.08, 0.081], [0.1, 0.1, 0.1]),
        1024: ([0.05, 0.06, 0.055], [0.05, 0.061, 0.05]),
    })
    sw = entries["medium"]["sweep"]
    assert sw["best"] == sw["best_fixed_chunksize"] == 256
    assert sw["verdict"] == V.FASTER
    assert "best fixed chunk size 256 ran 1.25x adaptive's speed" in sw["text"]
    assert sw["adaptive_over_best_fixed"] == pytest.approx(0.8)
    # the table ranks by the same figure and marks the same row; the summary says the same
    doc = _doc(entries, recs)
    table = render(doc).splitlines()
    marked = [line for line in table if "<- best" in line]
    assert len(marked) == 1 and marked[0].split()[0] == "256"
    rows = {p["chunksize"]: p["vs_adaptive"] for p in sw["points"]}
    assert max(rows, key=rows.get) == 256
    assert any(line.strip() == "medium chunk sizes: " + sw["text"] for line in doc["summary"])


def test_sweep_where_adaptive_wins_and_where_it_ran_inline():
    entries, recs = _sweep({4: ([0.3] * 3, [0.1] * 3), 64: ([0.12] * 3, [0.1] * 3)})
    sw = entries["medium"]["sweep"]
    assert sw["best"] == 64 and sw["verdict"] == V.SLOWER
    assert sw["text"].startswith("adaptive beat every fixed chunk size; the best, 64")
    entries, recs = _sweep({64: ([0.1, 0.11, 0.09], [0.1] * 3)}, inline=True)
    text = render(_doc(entries, recs))
    assert "adaptive (ran in the caller: no chunks)" in text
    assert "not distinguishable from adaptive" in entries["medium"]["sweep"]["text"]


# --- plots: axes read back from the figures


def _doc(entries, recs, noise=None, workers=2):
    noise = noise or {"trusted": True, "margin": 1.0, "note": None, "checks": []}
    return {"config": {"mode": "quick", "repeat": 3, "workers": workers, "size_scale": 1.0,
                       "pair": True},
            "machine": {"versions": {}}, "noise": noise, "workloads": entries, "results": recs,
            "summary": closing_summary(entries, noise), "files": {}, "duration_s": 1.0}


def test_chunksize_plot_axes_and_marks():
    pytest.importorskip("matplotlib")
    from pmaprt.bench.plots import chunksize_figure

    entries, recs = _sweep({1: ([1.0] * 3, [0.01] * 3), 64: ([0.012] * 3, [0.01] * 3),
                            1024: ([0.009] * 3, [0.01] * 3)})
    fig = chunksize_figure(_doc(entries, recs), "medium")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert ax.get_yscale() == "log"   # 0.01 to 1.1: two decades
    labels = ax.get_legend_handles_labels()[1]
    assert any(lab.startswith("adaptive: its median chunk size (78)") for lab in labels)
    assert any(lab.startswith("best fixed size (1,024)") for lab in labels)
    star = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert list(star[0].get_xdata()) == [78] and list(star[0].get_ydata()) == [1.0]
    assert "relative to pmaprt's adaptive chunking" in ax.get_title()
    entries, recs = _sweep({64: ([0.1] * 3, [0.1] * 3), 256: ([0.09] * 3, [0.1] * 3)},
                           inline=True)
    ax = chunksize_figure(_doc(entries, recs), "medium").axes[0]
    assert ax.get_yscale() == "linear"
    assert not [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert "adaptive ran in the calling process: no chunks" in ax.get_legend_handles_labels()[1]


def test_allreduce_and_timeline_plots():
    pytest.importorskip("matplotlib")
    from types import SimpleNamespace as NS

    from pmaprt.bench.plots import allreduce_figure, timeline_figure

    recs = []
    for label, rid, bw in (("pmaprt", "pmaprt", 0.5), ("memcpy (1 process)", "memcpy", 80.0),
                           ("mp.Pool gather+sum+broadcast", "mp_naive_allreduce", 0.03)):
        for nbytes in (4096, 65536):
            recs.append(new_record("allreduce", NS(id=rid, label=label, kind="peer"),
                                   metric="busbw", params={"bytes": nbytes}, busbw_gbps=bw,
                                   times_s=[1e-3], median_s=1e-3))
    doc = _doc({"allreduce": new_workload_entry("allreduce")}, recs)
    ax = allreduce_figure(doc).axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.get_legend_handles_labels()[1]) == 3
    tl = {"wall_s": 1.0, "mode": "index+inline", "truncated": False,
          "workers": [[[0.0, 0.5, 0, 10]], [[0.1, 0.4, 10, 5]]]}
    doc = _doc({"medium": new_workload_entry("medium", timeline=tl)}, [])
    ax = timeline_figure(doc, "medium").axes[0]
    title = ax.get_title()
    assert "mode index+inline" not in title
    assert "then in the calling process" in title
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "running a chunk", "idle (or the map had ended)"]
