"""Run the standard library's and joblib's own test suites against pmaprt,
and their reference implementations, and print the counts side by side.

    python tests/conformance/run.py [cpython] [joblib] [--json OUT] [-v]

- cpython: CPython's ``Lib/test/test_concurrent_futures.py`` process-pool
  mixins, with ``concurrent.futures.ProcessPoolExecutor`` (spawn) and with
  ``pmaprt.Executor`` (cpython_futures.py). The file comes from Debian's
  ``libpython3.X-testsuite`` package: on a fresh Debian or Ubuntu machine run
  ``apt-get update`` once; fetch.py then downloads and extracts it into
  ``build/conformance/`` (or set PMAPRT_CPYTHON_TESTS to the file).
- joblib: the installed ``joblib/test/test_parallel.py``, with loky and with
  the pmaprt backend in its place (joblib_parallel.py).

Each run is a subprocess with ``build/conformance/shim``, this directory and
the repository first on PYTHONPATH. Nothing here is collected by the test
suite (no file is named test_*); see bench/RESULTS.md for the last counts and
how long the runs take.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import fetch  # noqa: E402

RUNS = {"cpython": ("cpython_futures", ("stdlib", "pmaprt")),
        "joblib": ("joblib_parallel", ("loky", "pmaprt"))}
# A whole run's bound (the slowest, joblib's with loky, takes a few minutes).
RUN_TIMEOUT_S = 1800


def run_one(module, impl, verbose):
    shim = fetch.cpython_shim() if module == "cpython_futures" else None
    path = [p for p in (shim, HERE, fetch.ROOT, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    code = "import sys, %s as m; sys.exit(m.main(sys.argv[1:]))" % module
    args = [impl] + (["-v"] if verbose and module == "cpython_futures" else [])
    proc = subprocess.run([sys.executable, "-c", code] + args, env=env, cwd=fetch.ROOT,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            return json.loads(line.split("RESULT ", 1)[1])
    raise RuntimeError("%s %s gave no result:\n%s\n%s" % (module, impl, proc.stdout[-3000:],
                                                          proc.stderr[-3000:]))


def table(results):
    rows = ["| suite | implementation | tests | passed | failed | skipped | xfailed | minutes |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append("| %s | %s | %d | %d | %d | %d | %d | %.1f |" % (
            r["suite"], r["impl"], r["total"], r["passed"], r["failed"], r["skipped"],
            r.get("xfailed", 0), r["seconds"] / 60))
    return "\n".join(rows)


def main(argv):
    suites = [a for a in argv if a in RUNS] or list(RUNS)
    verbose = "-v" in argv
    out = argv[argv.index("--json") + 1] if "--json" in argv else None
    results = []
    for suite in suites:
        module, impls = RUNS[suite]
        for impl in impls:
            r = run_one(module, impl, verbose)
            results.append(r)
            print("%s/%s: %d passed, %d failed, %d skipped (%.0f s)%s" % (
                suite, impl, r["passed"], r["failed"], r["skipped"], r["seconds"],
                "".join("\n  not passed: " + n for n in r["not_passed"])), flush=True)
    print()
    print(table(results))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
