"""The benchmark harness: `python -m pmaprt.bench` end to end at tiny sizes.

No timing is asserted (the machine is noisy): only that the suite runs, writes
the documented JSON schema, valid PNG plots and a table naming every workload.
"""
import json
import os
import statistics
import subprocess
import sys

import pytest

from pmaprt.bench import RESULT_KEYS, SCHEMA_VERSION, TOP_KEYS, WORKLOAD_KEYS
from pmaprt.bench import workloads as W
from pmaprt.bench.report import fmt_bytes, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIG = b"\x89PNG\r\n\x1a\n"
RUN_TIMEOUT = 240

NUM = (int, float)
OPT = type(None)

RESULT_TYPES = {
    "workload": (str,), "runner": (str,), "label": (str,), "kind": (str,), "status": (str,),
    "note": (str, OPT), "metric": (str,), "params": (dict, OPT), "items": (int, OPT),
    "times_s": (list, OPT), "paired_serial_s": (list, OPT), "runs": (int, OPT), "median_s": (float, OPT), "min_s": (float, OPT),
    "max_s": (float, OPT), "ranges": (dict, OPT),
    "items_per_s": (float, OPT), "latency_us": (float, OPT), "busbw_gbps": (float, OPT),
    "speedup_vs_map": (float, OPT), "speedup_vs_best_peer": (float, OPT),
    "makespan_over_ideal": (float, OPT), "efficiency": (float, OPT), "startup_s": (float, OPT),
    "stats": (dict, OPT),
}
WORKLOAD_TYPES = {
    "name": (str,), "description": (str,), "status": (str,), "note": (str, OPT),
    "params": (dict, OPT), "items": (int, OPT), "serial_s": (float, OPT),
    "serial_spread": (float, OPT), "verdicts": (list, OPT), "noise_note": (str, OPT),
    "longest_item_s": (float, OPT), "ideal_s": (float, OPT), "best_peer": (str, OPT),
    "best_peer_s": (float, OPT), "adaptive_chunksize": (int, OPT), "sweep": (dict, OPT),
    "timeline": (dict, OPT),
}


def test_documented_key_lists_match_the_checks():
    assert set(RESULT_TYPES) == set(RESULT_KEYS)
    assert set(WORKLOAD_TYPES) == set(WORKLOAD_KEYS)
    import pmaprt.bench as B

    for k in (*TOP_KEYS, *RESULT_KEYS, *WORKLOAD_KEYS):
        assert f"``{k}``" in B.__doc__, f"{k} is not documented in pmaprt.bench"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MPLBACKEND"] = "Agg"
    return env


def _bench(args, cwd, timeout=RUN_TIMEOUT):
    return subprocess.run([sys.executable, "-m", "pmaprt.bench", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick suite, every workload, at 1/1000 size, one run each."""
    out = tmp_path_factory.mktemp("bench") / "results"
    proc = _bench(["--size-scale", "0.001", "--repeat", "1", "--out", str(out)],
                  cwd=str(out.parent))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        doc = json.load(f)
    return out, doc, proc


def _check_types(obj, types, where):
    assert set(obj) == set(types), f"{where}: keys {sorted(set(obj) ^ set(types))}"
    for k, ts in types.items():
        v = obj[k]
        if float in ts and isinstance(v, int) and not isinstance(v, bool):
            continue  # JSON may write a whole float as an int
        assert isinstance(v, ts), f"{where}.{k} = {v!r} is not {ts}"


def test_json_top_level(quick):
    out, doc, _ = quick
    assert set(doc) == set(TOP_KEYS)
    assert doc["schema_version"] == SCHEMA_VERSION
    assert isinstance(doc["created"], str) and doc["created"]
    assert isinstance(doc["argv"], list)
    cfg = doc["config"]
    assert cfg["mode"] == "quick" and cfg["repeat"] == 1 and cfg["size_scale"] == 0.001
    assert cfg["workers"] == (os.cpu_count() or 1)
    assert cfg["workloads"] == list(W.ALL)
    m = doc["machine"]
    for k in ("cores_logical", "cores_physical", "memory_bytes", "cpu_model", "gpus", "platform",
              "versions", "date", "workers"):
        assert k in m, k
    assert m["cores_logical"] == os.cpu_count()
    assert isinstance(m["memory_bytes"], int) and m["memory_bytes"] > 0
    assert isinstance(m["gpus"], list)
    for k in ("python", "numpy", "pmaprt", "joblib", "mpire"):
        assert k in m["versions"]
    noise = doc["noise"]
    assert [c["when"] for c in noise["checks"]] == ["start", "end"]
    for c in noise["checks"]:
        if (os.cpu_count() or 1) > 1:
            assert len(c["speedups"]) == 5 and c["min"] <= c["median"] <= c["max"]
    assert isinstance(noise["trusted"], bool) and noise["margin"] >= 1.0
    assert (noise["note"] is None) == noise["trusted"]
    assert isinstance(doc["summary"], list) and doc["summary"]
    assert doc["summary"][0].startswith("noise check")
    assert isinstance(doc["calibration"]["spin_iters_per_us"], NUM)
    assert doc["calibration"]["spin_iters_per_us"] > 0
    assert doc["files"]["json"] == "results.json"
    assert isinstance(doc["duration_s"], NUM) and doc["duration_s"] > 0


def test_json_workloads_and_results(quick):
    _, doc, _ = quick
    assert list(doc["workloads"]) == list(W.ALL)
    for name, e in doc["workloads"].items():
        _check_types(e, WORKLOAD_TYPES, f"workloads.{name}")
        assert e["name"] == name
        assert e["status"] in ("ok", "skipped", "error")
        if e["status"] != "ok":
            assert e["note"], f"{name} skipped without a note"
    for name in ("tiny", "medium", "heavy_tailed", "cost_shift", "numpy", "roundtrip"):
        assert doc["workloads"][name]["status"] == "ok"
    for name in ("heavy_tailed", "cost_shift"):
        e = doc["workloads"][name]
        assert e["ideal_s"] is not None and e["ideal_s"] >= e["longest_item_s"]

    results = doc["results"]
    assert results
    kinds = {"baseline", "pmaprt", "peer", "sweep"}
    for i, r in enumerate(results):
        _check_types(r, RESULT_TYPES, f"results[{i}]")
        assert set(r) == set(RESULT_KEYS)
        assert r["kind"] in kinds
        assert r["status"] in ("ok", "skipped", "error")
        assert r["metric"] in ("wall", "latency", "busbw")
        if r["status"] == "ok":
            assert r["times_s"] and r["runs"] == len(r["times_s"])
            assert r["min_s"] <= r["median_s"] <= r["max_s"]
            for k, (lo, hi) in (r["ranges"] or {}).items():
                assert lo <= hi, (k, r)
            assert all(isinstance(t, NUM) and t >= 0 for t in r["times_s"])
            assert r["median_s"] >= 0
        else:
            assert r["note"]
    # builtin map ran every map workload and the round trip
    for name in ("tiny", "medium", "heavy_tailed", "cost_shift", "numpy", "roundtrip"):
        base = [r for r in results if r["workload"] == name and r["runner"] == "builtin_map"]
        assert len(base) == 1 and base[0]["status"] == "ok", name
    # each timed run of a parallel runner was paired with a builtin map run
    for r in results:
        if r["status"] == "ok" and r["kind"] in ("pmaprt", "peer") and \
                r["workload"] in ("tiny", "medium", "heavy_tailed", "cost_shift", "numpy"):
            assert len(r["paired_serial_s"]) == r["runs"], r
            assert all(isinstance(t, NUM) and t > 0 for t in r["paired_serial_s"])
        elif r["kind"] == "baseline":
            assert r["paired_serial_s"] is None
    # every peer has a record per map workload: ok, or skipped/error with a note
    for rid in ("mp_pool_map", "mp_pool_imap", "ppe_cs1", "ppe_tuned", "joblib", "mpire",
                "pmaprt"):
        for name in ("tiny", "medium", "heavy_tailed", "cost_shift", "numpy"):
            recs = [r for r in results if r["workload"] == name and r["runner"] == rid
                    and r["kind"] != "sweep"]
            assert len(recs) == 1, (rid, name)
    # the chunk-size sweeps (when pmaprt ran the workload)
    for name in W.SWEPT:
        ad = [r for r in results if r["workload"] == name and r["kind"] == "pmaprt"]
        if ad and ad[0]["status"] == "ok":
            sw = [r for r in results if r["workload"] == name and r["kind"] == "sweep"]
            assert len(sw) >= 2
            assert all(isinstance(r["params"]["chunksize"], int) for r in sw)
            swe = doc["workloads"][name]["sweep"]
            assert swe is not None
            # the summary's best is the table's best: the highest vs_adaptive
            best = max(swe["points"], key=lambda p: (p["vs_adaptive"], p["chunksize"]))
            assert swe["best"] == best["chunksize"]
            assert f"{best['chunksize']:,}" in swe["text"]
    # verdicts: pmaprt against builtin map and each peer that ran, per map workload
    for name in ("medium", "heavy_tailed", "cost_shift"):
        vs = doc["workloads"][name]["verdicts"]
        assert {v["against"] for v in vs} >= {"builtin_map", "mp_pool_map"}, name
        for v in vs:
            assert v["verdict"] in ("faster", "slower", "not distinguishable",
                                    "no verdict: within the noise")
            assert v["lo"] <= v["ratio"] <= v["hi"]


def test_pngs_valid(quick):
    out, doc, _ = quick
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert sorted(doc["files"]["plots"]) == pngs
    ok = {n for n, e in doc["workloads"].items() if e["status"] == "ok"}
    pm_ok = {r["workload"] for r in doc["results"] if r["kind"] == "pmaprt" and r["status"] == "ok"}
    for name in W.SWEPT:
        if name in pm_ok:
            assert f"chunksize_{name}.png" in pngs
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.image as mpimg
    from PIL import Image

    for p in pngs:
        path = out / p
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIG, p
        with Image.open(path) as im:
            im.verify()
        arr = mpimg.imread(str(path))
        assert arr.ndim == 3 and arr.shape[0] > 50 and arr.shape[1] > 50, p
        name = p[:-4].split("_", 1)[1]
        assert name in ok or name == "busbw", p


def test_table_names_every_workload(quick):
    out, doc, proc = quick
    with open(out / "table.txt") as f:
        table = f.read()
    assert table in proc.stdout
    for name, e in doc["workloads"].items():
        assert f"== {name}:" in table
        if e["status"] != "ok":
            assert e["note"] in table
    for label in ("builtin map", "pmaprt", "mp.Pool.map", "joblib", "mpire"):
        assert label in table
    # the closing summary is the document's, printed last
    assert "== summary" in table
    tail = table[table.index("== summary"):]
    for line in doc["summary"]:
        assert line in tail
    for c in doc["noise"]["checks"]:
        assert f"noise check ({c['when']})" in table


def test_list_and_bad_workload(tmp_path):
    p = _bench(["--list"], cwd=str(tmp_path), timeout=60)
    assert p.returncode == 0
    for name in W.ALL:
        assert name in p.stdout
    p = _bench(["--workload", "nope", "--out", str(tmp_path / "r")], cwd=str(tmp_path), timeout=60)
    assert p.returncode == 2 and "unknown workload" in p.stderr
    assert not (tmp_path / "r" / "results.json").exists()


def test_one_workload_missing_peer(tmp_path, monkeypatch):
    """--workload selects; a peer that is not installed is skipped with a note."""
    from pmaprt.bench import cli
    from pmaprt.bench.runners import Joblib

    monkeypatch.setattr(Joblib, "available", lambda self: (False, "joblib not installed"))
    out = tmp_path / "r"
    rc = cli.main(["--workload", "heavy-tailed", "--runner", "joblib", "--size-scale", "0.002",
                   "--repeat", "1", "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    with open(out / "results.json") as f:
        doc = json.load(f)
    assert list(doc["workloads"]) == ["heavy_tailed"]
    recs = {r["runner"]: r for r in doc["results"]}
    assert set(recs) == {"builtin_map", "joblib"}
    assert recs["joblib"]["status"] == "skipped"
    assert recs["joblib"]["note"] == "joblib not installed"
    assert recs["builtin_map"]["status"] == "ok"
    assert doc["files"]["plots"] == []
    with open(out / "table.txt") as f:
        assert "joblib not installed" in f.read()


def test_canonical_names_and_sizes():
    assert W.canonical("heavy-tailed") == "heavy_tailed"
    assert W.canonical("Cost-Shift") == "cost_shift"
    with pytest.raises(ValueError):
        W.canonical("nope")
    assert W.geometric(1, 100, 4) == [1, 4, 16, 64, 100]
    assert W.sweep_chunksizes(1000, 2, full=True)[-1] == 500
    cal = W.Calibration(iters_per_us=10.0)
    w = W.build("numpy", full=False, scale=0.001, workers=2, cal=cal)
    assert w.n == W.NUMPY_CHUNKS and all(c.dtype.name == "float64" for c in w.args)
    w = W.build("cost_shift", full=False, scale=0.01, workers=2, cal=cal)
    half = w.n // 2
    assert w.args[-1] == 100 * w.args[0] and w.args[half - 1] == w.args[0]


def test_render_minimal_doc():
    doc = {"config": {"mode": "quick", "repeat": 1, "workers": 2, "size_scale": 1.0},
           "machine": {"versions": {}}, "workloads": {
               "gpu": {"status": "skipped", "note": "no GPU found", "description": "d"}},
           "results": [], "files": {}, "duration_s": 1.0}
    text = render(doc)
    assert "== gpu:" in text and "no GPU found" in text


def test_probe_skips_hopeless_runner(tmp_path):
    """A large workload is probed on a prefix; a runner projected far past the
    time cap is skipped with the projection in its note."""
    out = tmp_path / "r"
    # in a subprocess: stdlib pools leave multiprocessing's resource tracker
    # running for the life of the process that used them
    p = _bench(["--workload", "tiny", "--runner", "ppe_cs1", "--size-scale", "2.5",
                "--repeat", "1", "--max-runner-s", "0.0001", "--out", str(out),
                "--no-progress", "--no-plots", "--no-sweep"], cwd=str(tmp_path), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "results.json") as f:
        doc = json.load(f)
    recs = {r["runner"]: r for r in doc["results"]}
    assert recs["builtin_map"]["status"] == "ok" and recs["builtin_map"]["items"] >= 50_000
    assert recs["ppe_cs1"]["status"] == "skipped"
    assert "projected" in recs["ppe_cs1"]["note"]


def test_stats_helpers_are_defensive():
    """MapStats fields the core may not have yet read as null, not errors."""
    from types import SimpleNamespace as NS

    from pmaprt.bench.records import adaptive_chunksize, stats_summary, timeline

    assert stats_summary(None) is None and timeline(None) is None
    assert adaptive_chunksize(NS()) is None
    st = NS(chunksizes=[4, 8, 8], workers=[NS(items=12, chunk_log=[(0.0, 0.1, 0, 4), "junk"]),
                                           NS()])
    s = stats_summary(st)
    assert s["chunksize_median"] == 8 and s["mode"] is None and s["wall_s"] is None
    assert s["workers"][0]["items"] == 12 and s["workers"][1]["busy_s"] is None
    tl = timeline(st)
    assert tl["workers"][0] == [[0.0, 0.1, 0, 4]] and tl["workers"][1] == []
    json.dumps(s), json.dumps(tl)


def test_array_and_allreduce_workloads(tmp_path):
    """The preprocess workload runs pmaprt's out= against its peers; the
    all-reduce workload runs for real against its peers, and its plot is written."""
    from pmaprt.bench import cli

    out = tmp_path / "r"
    rc = cli.main(["--workload", "preprocess", "--workload", "allreduce", "--size-scale", "0.01",
                   "--repeat", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    with open(out / "results.json") as f:
        doc = json.load(f)
    assert doc["workloads"]["preprocess"]["status"] == "ok"
    pre = {r["runner"]: r for r in doc["results"] if r["workload"] == "preprocess"}
    assert pre["pmaprt"]["status"] == "ok", pre["pmaprt"]["note"]
    assert pre["builtin_map"]["status"] == "ok"
    ar = [r for r in doc["results"] if r["workload"] == "allreduce"]
    timed = [r for r in ar if r["runner"] != "gloo"]
    assert {r["runner"] for r in timed} == {
        "pmaprt", "pmaprt_shared_input", "pmaprt_float16", "pmaprt_bfloat16", "allreduce_bound",
        "memcpy_aggregate", "mp_naive_allreduce", "memcpy"}
    assert all(r["status"] == "ok" and r["busbw_gbps"] > 0 for r in timed)
    sizes = doc["workloads"]["allreduce"]["params"]["sizes_bytes"]
    assert sizes[0] == 4096 and all(r["params"]["bytes"] in sizes for r in timed)
    mine = [r for r in timed if r["runner"].startswith("pmaprt")]
    assert all(r["speedup_vs_best_peer"] > 0 for r in mine)
    # each all-reduce against the bound measured beside it, sample by sample
    for r in mine:
        lo, hi = r["params"]["vs_bound_range"]
        assert 0 < lo <= r["params"]["vs_bound"] <= hi and "of bound" in r["note"]
    gloo = [r for r in ar if r["runner"] == "gloo"]
    from pmaprt.bench.collective import gloo_available
    if gloo_available()[0]:   # torch with gloo on this machine: the peer runs
        assert {r["params"]["bytes"] for r in gloo} == set(sizes)
        assert all(r["status"] == "ok" and r["busbw_gbps"] > 0 for r in gloo)
    else:
        assert len(gloo) == 1 and gloo[0]["status"] == "skipped" and "torch" in gloo[0]["note"]
    assert doc["files"]["plots"] == ["allreduce_busbw.png"]
    with open(out / "allreduce_busbw.png", "rb") as f:
        assert f.read(8) == PNG_SIG
    # the goal lines: the 4 KiB time and the % of the bound per size, per input kind
    counts = doc["workloads"]["allreduce"]["params"]["workers"]
    goals = [line for line in (out / "table.txt").read_text().splitlines()
             if line.startswith("  goals, W=")]
    assert len(goals) == 2 * len(counts)
    assert all("4 KiB in" in g and "% of bound" in g for g in goals)
    assert all(fmt_bytes(n) in goals[0] for n in sizes)


def test_allreduce_message_sizes_follow_size_scale():
    from pmaprt.bench.allreduce_runs import MAX_BYTES, message_sizes
    assert message_sizes(False, 1.0) == [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
    assert message_sizes(False, 16)[-1] == 64 << 20
    assert message_sizes(False, 0.0001) == [4 << 10]
    assert message_sizes(True, 1.0)[-1] == 256 << 20
    assert message_sizes(True, 100)[-1] == MAX_BYTES


def test_paired_ratios_are_medians_of_per_run_ratios():
    """vs map, eff and /ideal of a paired runner come from its own pairs: a
    machine twice as fast during one runner's runs must not read as a 2x
    difference between runners."""
    from pmaprt.bench.derive import derive
    from pmaprt.bench.records import new_record, new_workload_entry
    from pmaprt.bench.runners import BuiltinMap, MpPoolMap, Pmaprt

    entries = {"heavy_tailed": new_workload_entry("heavy_tailed", longest_item_s=0.01)}
    base = new_record("heavy_tailed", BuiltinMap(), times_s=[0.2, 0.2, 0.2], median_s=0.2)
    # pmaprt ran while the machine was twice as fast: serial 0.1 beside it
    pm = new_record("heavy_tailed", Pmaprt(), times_s=[0.06, 0.05, 0.07], median_s=0.06,
                    paired_serial_s=[0.1, 0.1, 0.1])
    mp = new_record("heavy_tailed", MpPoolMap(), times_s=[0.125, 0.1, 0.1], median_s=0.1,
                    paired_serial_s=[0.2, 0.2, 0.2])
    old = new_record("heavy_tailed", MpPoolMap(), times_s=[0.1], median_s=0.1)
    derive([base, pm, mp, old], entries, 2)
    assert pm["speedup_vs_map"] == pytest.approx(0.1 / 0.06)
    assert pm["efficiency"] == pytest.approx(0.1 / (2 * 0.06))
    assert mp["efficiency"] == pytest.approx(1.0)
    # /ideal divides by a lower bound: the fastest serial run (0.1, beside
    # pmaprt) / W, not each pair's serial run
    assert pm["makespan_over_ideal"] == pytest.approx(0.06 / 0.05)
    assert mp["makespan_over_ideal"] == pytest.approx(0.1 / 0.05)
    # unpaired: against the baseline's median, as before
    assert old["speedup_vs_map"] == pytest.approx(2.0)
    # vs best compares the paired speed-ups too: pmaprt's 1.67x against mp's 2x
    assert entries["heavy_tailed"]["best_peer"] == "mp_pool_map"
    assert pm["speedup_vs_best_peer"] == pytest.approx((0.1 / 0.06) / 2.0)


def test_efficiency_splits_into_busy_fraction_and_work_inflation():
    """eff = busy fraction / work inflation, per run, from the workers' busy
    seconds: a map whose workers were never idle but whose items took 1.25x
    their serial time reads busy 1.0, inflation 1.25, eff 0.8."""
    from pmaprt.bench.derive import derive, split_efficiency
    from pmaprt.bench.records import new_record, new_workload_entry
    from pmaprt.bench.runners import BuiltinMap, Pmaprt

    # W=2; serial 0.2 s per run; the map took 0.125 s with 2 x 0.125 s busy
    split = split_efficiency([0.25, 0.25, 0.2], [0.125, 0.125, 0.125], [0.2, 0.2, 0.2], 2)
    assert split["busy_fraction"] == pytest.approx(1.0)
    assert split["work_inflation"] == pytest.approx(1.25)
    assert split_efficiency([], [0.1], [0.2], 2) is None
    assert split_efficiency([0.1], [0.1, 0.1], [0.2, 0.2], 2) is None

    entries = {"medium": new_workload_entry("medium")}
    base = new_record("medium", BuiltinMap(), times_s=[0.2, 0.2, 0.2], median_s=0.2)
    pm = new_record("medium", Pmaprt(), times_s=[0.125, 0.125, 0.125], median_s=0.125,
                    paired_serial_s=[0.2, 0.2, 0.2],
                    stats={"busy_s_runs": [0.2, 0.2, 0.2]})
    derive([base, pm], entries, 2)
    assert pm["efficiency"] == pytest.approx(0.8)
    assert pm["stats"]["busy_fraction"] == pytest.approx(0.8)
    assert pm["stats"]["work_inflation"] == pytest.approx(1.0)
    assert pm["efficiency"] == pytest.approx(
        pm["stats"]["busy_fraction"] / pm["stats"]["work_inflation"])


def test_quick_suite_splits_pmaprt_efficiency(tmp_path):
    # Large enough that pmaprt's maps run on its workers: a map over a list
    # starts in the caller and hands over once it runs past its probe (the
    # 1/1000 quick suite's 8 items never do).
    out = tmp_path / "results"
    proc = _bench(["--size-scale", "0.05", "--repeat", "2", "--no-sweep", "--no-plots",
                   "--workload", "medium", "--workload", "cost_shift", "--runner", "pmaprt",
                   "--out", str(out)], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        doc = json.load(f)
    checked = 0
    for name in ("medium", "cost_shift"):
        r = next(r for r in doc["results"] if r["workload"] == name and r["kind"] == "pmaprt")
        if r["status"] != "ok" or "inline" in (r["stats"] or {}).get("mode", ""):
            continue
        checked += 1
        st = r["stats"]
        b, t, s_ = st["busy_s_runs"], r["times_s"], r["paired_serial_s"]
        assert len(b) == r["runs"] == len(t) == len(s_)
        assert st["busy_fraction"] == pytest.approx(statistics.median(
            x / (doc["config"]["workers"] * y) for x, y in zip(b, t)))
        assert st["work_inflation"] == pytest.approx(statistics.median(
            x / z for x, z in zip(b, s_)))
        assert 0 < st["busy_fraction"] <= 1.0 + 1e-9, st["busy_fraction"]
        assert st["work_inflation"] > 0
        assert "eff %.2f; busy %.2f, inflation %.2f" % (
            r["efficiency"], st["busy_fraction"], st["work_inflation"]) in proc.stdout
    assert checked, "no pmaprt map of the quick suite ran on its workers"


def test_paired_sweep_compares_each_fixed_size_with_the_adaptive_run_beside_it():
    """A machine twice as fast during one fixed size's runs must not make it
    the best fixed size: each is judged against the adaptive runs just before
    its own runs."""
    from pmaprt.bench.derive import derive
    from pmaprt.bench.records import new_record, new_workload_entry
    from pmaprt.bench.runners import BuiltinMap, Pmaprt

    entries = {"medium": new_workload_entry("medium")}
    base = new_record("medium", BuiltinMap(), times_s=[0.2] * 3, median_s=0.2)
    ad = new_record("medium", Pmaprt(), times_s=[0.12] * 3, median_s=0.12)
    # cs=16 ran while the machine was twice as fast (adaptive beside it: 0.06)
    fast = new_record("medium", Pmaprt(), kind="sweep", params={"chunksize": 16},
                      times_s=[0.066] * 3, median_s=0.066, items_per_s=1.0,
                      stats={"paired_adaptive_s": [0.06] * 3})
    # cs=64 is really 5 % faster than adaptive
    good = new_record("medium", Pmaprt(), kind="sweep", params={"chunksize": 64},
                      times_s=[0.114] * 3, median_s=0.114, items_per_s=1.0,
                      stats={"paired_adaptive_s": [0.12] * 3})
    derive([base, ad, fast, good], entries, 2)
    sw = entries["medium"]["sweep"]
    assert sw["paired"] is True
    assert sw["best_fixed_chunksize"] == 64
    assert sw["adaptive_over_best_fixed"] == pytest.approx(0.114 / 0.12)
    assert fast["stats"]["vs_adaptive"] == pytest.approx(0.06 / 0.066)
    # unpaired: medians, as before
    for r in (fast, good):
        del r["stats"]["paired_adaptive_s"]
    derive([base, ad, fast, good], entries, 2)
    sw = entries["medium"]["sweep"]
    assert sw["paired"] is False and sw["best_fixed_chunksize"] == 16
