"""The examples run and do what they say (at a small size)."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(240)
def test_hyperparam_search_same_results_on_local_pool_and_dask():
    pytest.importorskip("distributed")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "hyperparam_search.py"), "--small",
         "--dask-workers", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "8 configurations" in proc.stdout
    assert "local pool and Dask agree: True" in proc.stdout


@pytest.mark.timeout(240)
def test_worker_state_example_builds_once_per_worker():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "worker_state.py"),
                           "--small"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = [ln for ln in proc.stdout.splitlines() if ln.startswith("initializer:")][0]
    built = int(first.split("vocabulary built ")[1].split()[0])
    assert 1 <= built <= os.cpu_count()
    assert "lazily: every worker built its vocabulary at most once: True" in proc.stdout
