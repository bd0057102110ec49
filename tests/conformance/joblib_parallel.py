"""joblib's own test_parallel.py, run against the pmaprt backend or against loky.

``main(["pmaprt" | "loky", ...])`` (called by run.py) writes a copy of the
installed ``joblib/test/test_parallel.py`` for that target into
``build/conformance/joblib_<target>/`` and runs pytest on it with a small
plugin (CONFTEST) that keeps the same tests for both targets:

- for ``loky`` the file is joblib's, unchanged;
- for ``pmaprt`` (`transform`): the backend is registered (and made the
  default, as loky is joblib's default); every ``"loky"`` string becomes
  ``"pmaprt"`` (backend lists, parametrizations, the tests that hard-code
  loky) and ``LokyBackend`` in type checks ``PmaprtBackend``; the scripts some
  tests run in a subprocess import ``pmaprt.joblib``; loky's
  ``get_reusable_executor`` becomes pmaprt's equivalent (the executors the
  backend keeps, ``pmaprt.joblib.executors()``, and ``shutdown()``); the
  check that a script's worker log names ``LokyProcess`` is dropped.

Kept, in both runs: each test whose parameters name the target backend (or
the default backend, None), and each test whose source names loky and has
no backend parameter. A test parametrized with loky and another backend is
kept only once the other backend is not loky. It prints ``RESULT {json}``.
"""
import ast
import json
import os
import re
import subprocess
import sys
import time

import fetch

CONFTEST = '''
import json, os
import pytest
from joblib._parallel_backends import ParallelBackendBase
from joblib.parallel import BACKENDS

TARGET = os.environ["CONFORMANCE_TARGET"]
OTHER = "pmaprt" if TARGET == "loky" else "loky"
NAMED = set(json.loads(os.environ["CONFORMANCE_NAMED"]))
RESULTS = {}


def _is(v, name):
    if isinstance(v, str):
        return v == name
    cls = BACKENDS.get(name)
    return cls is not None and type(v) is cls


def _backend_value(name, v):
    return (isinstance(v, str) and v in BACKENDS) or isinstance(v, ParallelBackendBase) \\
        or (v is None and "backend" in name)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        values = [(k, v) for k, v in params.items()]
        fn = item.originalname or item.name
        backends = [(k, v) for k, v in values if _backend_value(k, v)]
        if any(_is(v, OTHER) for _, v in values):
            ok = False
        elif backends:
            ok = any(_is(v, TARGET) or (v is None and "backend" in k) for k, v in backends)
        else:
            ok = fn in NAMED
        (keep if ok else drop).append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=drop)


def pytest_runtest_logreport(report):
    r = RESULTS.setdefault(report.nodeid, "passed")
    if report.failed:
        RESULTS[report.nodeid] = "failed"
    elif report.skipped and r == "passed":
        RESULTS[report.nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
    elif report.when == "call" and hasattr(report, "wasxfail") and report.passed:
        RESULTS[report.nodeid] = "xpassed"


def pytest_sessionfinish(session):
    with open(os.environ["CONFORMANCE_OUT"], "w") as f:
        json.dump(RESULTS, f)
'''

PMAPRT_HEADER = '''
# --- conformance: the pmaprt backend in loky's place (tests/conformance/joblib_parallel.py)
import pmaprt.joblib
from pmaprt.joblib import PmaprtBackend

register_parallel_backend("pmaprt", PmaprtBackend, make_default=True)


class _PmaprtReusable:
    """loky's get_reusable_executor(), for pmaprt: the executors kept for
    later calls; shutdown() stops them."""

    def __init__(self):
        self.executors = pmaprt.joblib.executors()

    def __eq__(self, other):
        return self.executors == other.executors

    def shutdown(self):
        pmaprt.joblib.shutdown()


def get_reusable_executor(reuse=True):
    return _PmaprtReusable()

'''

ANCHOR = "pytestmark = pytest.mark.thread_unsafe\n"


def named_tests(src):
    """Test functions whose source (decorators included) names loky."""
    tree = ast.parse(src)
    lines = src.splitlines()
    out = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            text = "\n".join(lines[start - 1: node.end_lineno])
            if re.search(r"loky", text, re.IGNORECASE):
                out.add(node.name)
    return out


def transform(src):
    if ANCHOR not in src:
        raise RuntimeError("joblib's test_parallel.py changed: no %r line" % ANCHOR.strip())
    out = []
    for line in src.splitlines(keepends=True):
        if '"loky"' in line:
            line = line.replace('"loky"', '"pmaprt"')
        if "LokyBackend" in line and "_parallel_backends.LokyBackend" not in line \
                and line.strip() != "LokyBackend,":
            line = re.sub(r"\bLokyBackend\b", "PmaprtBackend", line)
        if re.match(r"^from joblib import Parallel, delayed", line):
            line = line + "import pmaprt.joblib\n"
        if 'stderr_regex=r"LokyProcess"' in line:
            line = line.replace('stderr_regex=r"LokyProcess"', "stderr_regex=None")
        out.append(line)
    text = "".join(out)
    return text.replace(ANCHOR, ANCHOR + PMAPRT_HEADER, 1)


def main(argv):
    target = argv[0]
    extra = argv[1:]
    src_path = fetch.joblib_test_file()
    with open(src_path) as f:
        src = f.read()
    work = os.path.join(fetch.CACHE, "joblib_" + target)
    os.makedirs(work, exist_ok=True)
    test_file = os.path.join(work, "test_parallel_%s.py" % target)
    with open(test_file, "w") as f:
        f.write(transform(src) if target == "pmaprt" else src)
    with open(os.path.join(work, "conftest.py"), "w") as f:
        f.write(CONFTEST)
    ini = os.path.join(work, "pytest.ini")
    with open(ini, "w") as f:
        f.write("[pytest]\ntimeout = 600\n")
    out_json = os.path.join(work, "results.json")
    env = dict(os.environ, CONFORMANCE_TARGET=target, CONFORMANCE_OUT=out_json,
               CONFORMANCE_NAMED=json.dumps(sorted(named_tests(src))))
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", ini,
                    "--rootdir", work, test_file] + extra, cwd=work, env=env)
    with open(out_json) as f:
        res = json.load(f)
    counts = {k: sum(1 for v in res.values() if v == k)
              for k in ("passed", "failed", "skipped", "xfailed", "xpassed")}
    bad = sorted(n.split("::", 1)[-1] for n, v in res.items() if v == "failed")
    print("RESULT " + json.dumps(dict(suite="joblib", impl=target, total=len(res),
                                      not_passed=bad, seconds=round(time.monotonic() - t0, 1),
                                      **counts)))
    return 0
