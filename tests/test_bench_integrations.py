"""python -m pmaprt.bench.integrations at tiny sizes: every section runs,
checks its results against map, and reports a row per runner. No timing is
asserted. It runs in a child process: loky leaves a helper process that
lives as long as the process that used it."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(300)
def test_integrations_bench_runs_every_section(tmp_path):
    pytest.importorskip("distributed")
    pytest.importorskip("joblib")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pmaprt.bench.integrations", "--size-scale", "0.01",
         "--repeat", "1", "--workers", "2", "--quiet", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for runner in ("joblib loky (default)", "joblib pmaprt backend", "ProcessPoolExecutor",
                   "pmaprt.Executor", "client.map (one task per item)", "pmap backend='dask'"):
        assert runner in proc.stdout
    doc = json.loads((tmp_path / "integrations.json").read_text())
    rows = [r for r in doc["rows"] if r["median_s"] is not None]
    assert {r["section"] for r in rows} == {"joblib", "executor", "dask"}
    assert all(r["median_s"] > 0 for r in rows)
    # every pmaprt row is compared against its peer measured in the same run
    assert all(r["vs_peer"] for r in rows if "pmaprt" in r["runner"] or "pmap" in r["runner"])
