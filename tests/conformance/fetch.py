"""The test files the conformance suites run, fetched or found.

- CPython's ``Lib/test/test_concurrent_futures.py`` is not shipped with most
  Python builds. Debian ships it in ``libpython3.X-testsuite``: this module
  downloads that package with ``apt-get download`` (no root needed for the
  download itself; run ``apt-get update`` once on a fresh machine) and
  extracts the one file with ``dpkg-deb``, into ``build/conformance/``.
  ``PMAPRT_CPYTHON_TESTS=path/to/test_concurrent_futures.py`` skips the
  download.
- joblib's ``joblib/test/test_parallel.py`` ships inside the joblib wheel.

The CPython file is placed in a small ``test`` package of its own
(``build/conformance/shim/test``) whose ``__path__`` also holds the
standard library's ``test`` package, so that ``test.support`` and
``test.test_concurrent_futures`` both import, in this process, in worker
processes and in the subprocesses some tests start.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, "build", "conformance")
SHIM = os.path.join(CACHE, "shim")
CPYTHON_FILE = "test_concurrent_futures.py"

_SHIM_INIT = '''"""The fetched CPython test file, beside the standard library's test package."""
import os
import sysconfig

__path__.append(os.path.join(sysconfig.get_path("stdlib"), "test"))
'''


def debian_package():
    return "libpython%d.%d-testsuite" % sys.version_info[:2]


def _download_cpython_file():
    """The path of test_concurrent_futures.py extracted from Debian's package."""
    pkg = debian_package()
    work = tempfile.mkdtemp(prefix="conformance-", dir=CACHE)
    try:
        r = subprocess.run(["apt-get", "download", pkg], cwd=work, capture_output=True, text=True)
        debs = glob.glob(os.path.join(work, pkg + "_*.deb"))
        if not debs:
            raise RuntimeError("could not download %s (apt-get download: %s); run `apt-get "
                               "update` first, or set PMAPRT_CPYTHON_TESTS to the file's path"
                               % (pkg, (r.stderr or r.stdout).strip()[-400:]))
        subprocess.run(["dpkg-deb", "-x", debs[0], os.path.join(work, "x")], check=True)
        found = glob.glob(os.path.join(work, "x", "usr", "lib", "python3*", "test", CPYTHON_FILE))
        if not found:
            raise RuntimeError("%s holds no %s" % (debs[0], CPYTHON_FILE))
        out = os.path.join(CACHE, CPYTHON_FILE)
        shutil.copyfile(found[0], out)
        with open(os.path.join(CACHE, "SOURCE"), "w") as f:
            f.write(os.path.basename(debs[0]) + "\n")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpython_shim():
    """The directory to put first on sys.path (and PYTHONPATH) so that
    ``test.test_concurrent_futures`` imports. Downloads the file once."""
    os.makedirs(CACHE, exist_ok=True)
    src = os.environ.get("PMAPRT_CPYTHON_TESTS")
    if not src:
        src = os.path.join(CACHE, CPYTHON_FILE)
        if not os.path.exists(src):
            src = _download_cpython_file()
    pkg = os.path.join(SHIM, "test")
    os.makedirs(pkg, exist_ok=True)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write(_SHIM_INIT)
    shutil.copyfile(src, os.path.join(pkg, CPYTHON_FILE))
    return SHIM


def joblib_test_file():
    import joblib
    path = os.path.join(os.path.dirname(joblib.__file__), "test", "test_parallel.py")
    if not os.path.exists(path):
        raise RuntimeError("this joblib install has no test/test_parallel.py (%s)" % path)
    return path


def stdlib_test_dir():
    return os.path.join(sysconfig.get_path("stdlib"), "test")
