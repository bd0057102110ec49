"""CPython's process-pool tests, run against pmaprt.Executor or the standard library.

Run by ``tests/conformance/run.py``, which imports this module (as
``cpython_futures``, with ``build/conformance/shim`` and this directory on
PYTHONPATH, see fetch.py) and calls ``main(["pmaprt" | "stdlib", ...])``. It
imports ``test.test_concurrent_futures`` and runs its process-pool mixins
(MIXINS) on the spawn start method: for ``stdlib`` the file's own
``ProcessPoolSpawn*`` classes, for ``pmaprt`` the same mixins with
``executor_type = pmaprt.Executor``, built when this module is imported (a
test that submits a classmethod pickles its class by reference, and the
workers import this module to find it). It prints a line ``RESULT {json}``:
counts and the names of the tests that did not pass.

Adaptations (ADAPTED below, each a test that reads a private attribute of
ProcessPoolExecutor, rewritten to its public pmaprt equivalent; the test's
checks are otherwise the same):

- ``executor._processes`` -> ``executor.pids()`` (the worker processes now
  running); ``p.terminate()`` -> ``os.kill(pid, SIGTERM)``; ``p.join()``
  after shutdown -> wait until the pid is gone.
- ``executor._executor_manager_thread.join()`` and
  ``executor._call_queue.join_thread()`` -> wait until the workers are gone.
- ``executor._broken`` -> ``executor.broken``.
- ``executor._mp_context`` -> ``executor.mp_context``.
- ``futures.ProcessPoolExecutor(...)`` inside a test -> ``self.executor_type(...)``.

Both runs: the tests that start a Python subprocess import the fetched file
through PYTHONPATH (they ask for an isolated interpreter, which would not see
it); for pmaprt the subprocess's ``from concurrent.futures import Executor``
(the test formats the executor's class name into its code) becomes ``from
pmaprt import Executor``, and ``test_hang_gh83386``'s code (skipped for
ProcessPoolExecutor) gets the ``import multiprocessing`` it lacks.
"""
import json
import os
import signal
import sys
import time
import unittest

MIXINS = ["InitializerMixin", "FailingInitializerMixin", "ProcessPoolShutdownTest", "WaitTests",
          "AsCompletedTests", "ProcessPoolExecutorTest", "ExecutorDeadlockTest"]
GONE_TIMEOUT_S = 30.0


def _strip(name):
    if name.endswith(("Mixin", "Tests")):
        return name[:-5]
    return name[:-4] if name.endswith("Test") else name


def wait_gone(test, pids, timeout=GONE_TIMEOUT_S):
    end = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < end:
        left = [p for p in left if _alive(p)]
        time.sleep(0.01)
    test.assertEqual(left, [], "worker processes still running after shutdown")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for this purpose only once its parent reaps it.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wrap_subprocess_runs(mod, pmaprt_run):
    orig = mod.assert_python_ok

    def assert_python_ok(*args, **env):
        args = list(args)
        if pmaprt_run:
            args = [a.replace("from concurrent.futures import Executor",
                              "from pmaprt import Executor")
                    .replace("multiprocessing.set_start_method",
                             "__import__('multiprocessing').set_start_method")
                    for a in args]
        env.setdefault("__isolated", False)
        env.setdefault("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        return orig(*args, **env)

    mod.assert_python_ok = assert_python_ok


def adapted(mod):
    """The rewritten tests (see the module's docstring), as a mixin placed first."""
    futures = mod.futures
    BrokenProcessPool = mod.BrokenProcessPool
    support = mod.support

    class Adapted:
        # --- ProcessPoolShutdownTest
        def test_processes_terminate(self):
            def acquire_lock(lock):
                lock.acquire()

            sem = self.get_context().Semaphore(0)
            for _ in range(3):
                self.executor.submit(acquire_lock, sem)
            self.assertEqual(len(self.executor.pids()), 3)
            for _ in range(3):
                sem.release()
            pids = self.executor.pids()
            self.executor.shutdown()
            wait_gone(self, pids)

        def test_context_manager_shutdown(self):
            with self.executor_type(max_workers=5, mp_context=self.get_context()) as e:
                self.assertEqual(list(e.map(abs, range(-5, 5))), [5, 4, 3, 2, 1, 0, 1, 2, 3, 4])
                pids = e.pids()
            wait_gone(self, pids)

        def test_del_shutdown(self):
            executor = self.executor_type(max_workers=5, mp_context=self.get_context())
            res = executor.map(abs, range(-5, 5))
            pids = executor.pids()
            del executor
            support.gc_collect()
            wait_gone(self, pids)
            assert all([r == abs(v) for r, v in zip(res, range(-5, 5))])

        def test_shutdown_no_wait(self):
            executor = self.executor_type(max_workers=5, mp_context=self.get_context())
            res = executor.map(abs, range(-5, 5))
            pids = executor.pids()
            executor.shutdown(wait=False)
            wait_gone(self, pids)
            assert all([r == abs(v) for r, v in zip(res, range(-5, 5))])

        # --- ProcessPoolExecutorTest
        def test_killed_child(self):
            fs = [self.executor.submit(time.sleep, 3)]
            os.kill(self.executor.pids()[0], signal.SIGTERM)
            for fut in fs:
                self.assertRaises(BrokenProcessPool, fut.result)
            self.assertRaises(BrokenProcessPool, self.executor.submit, pow, 2, 8)

        def test_saturation(self):
            executor = self.executor
            sem = self.get_context().Semaphore(0)
            job_count = 15 * executor._max_workers
            for _ in range(job_count):
                executor.submit(sem.acquire)
            self.assertEqual(len(executor.pids()), executor._max_workers)
            for _ in range(job_count):
                sem.release()

        def test_idle_process_reuse_one(self):
            executor = self.executor
            assert executor._max_workers >= 4
            executor.submit(mod.mul, 21, 2).result()
            executor.submit(mod.mul, 6, 7).result()
            executor.submit(mod.mul, 3, 14).result()
            self.assertEqual(len(executor.pids()), 1)

        def test_idle_process_reuse_multiple(self):
            executor = self.executor
            assert executor._max_workers <= 5
            executor.submit(mod.mul, 12, 7).result()
            executor.submit(mod.mul, 33, 25)
            executor.submit(mod.mul, 25, 26).result()
            executor.submit(mod.mul, 18, 29)
            executor.submit(mod.mul, 1, 2).result()
            executor.submit(mod.mul, 0, 9)
            self.assertLessEqual(len(executor.pids()), 3)
            executor.shutdown()

        def test_max_tasks_per_child(self):
            executor = self.executor_type(1, mp_context=self.get_context(), max_tasks_per_child=3)
            original_pid = executor.submit(os.getpid).result()
            self.assertEqual(executor.submit(os.getpid).result(), original_pid)
            self.assertEqual(len(executor.pids()), 1)
            self.assertEqual(executor.submit(os.getpid).result(), original_pid)
            new_pid = executor.submit(os.getpid).result()
            self.assertNotEqual(original_pid, new_pid)
            self.assertEqual(len(executor.pids()), 1)
            executor.shutdown()

        def test_max_tasks_per_child_defaults_to_spawn_context(self):
            executor = self.executor_type(1, max_tasks_per_child=3)
            self.assertEqual(executor.mp_context.get_start_method(), "spawn")
            executor.shutdown()

        # --- ExecutorDeadlockTest
        def _fail_on_deadlock(self, executor):
            for pid in executor.pids():
                os.kill(pid, signal.SIGTERM)
            executor.shutdown(wait=True)
            self.fail("Executor deadlock")

        def test_shutdown_deadlock_pickle(self):
            self.executor.shutdown(wait=True)
            with self.executor_type(max_workers=2, mp_context=self.get_context()) as executor:
                self.executor = executor
                executor.submit(id, 42).result()
                pids = executor.pids()
                f = executor.submit(id, mod.ErrorAtPickle())
                executor.shutdown(wait=False)
                with self.assertRaises(mod.PicklingError):
                    f.result()
            wait_gone(self, pids)

    class AdaptedFailingInitializer:
        def test_initializer(self):
            with self._assert_logged('ValueError: error in initializer'):
                try:
                    future = self.executor.submit(mod.get_init_status)
                except mod.BrokenExecutor:
                    pass
                else:
                    with self.assertRaises(mod.BrokenExecutor):
                        future.result()
                t1 = time.monotonic()
                while not self.executor.broken:
                    if time.monotonic() - t1 > 5:
                        self.fail("executor not broken after 5 s.")
                    time.sleep(0.01)
                with self.assertRaises(mod.BrokenExecutor):
                    self.executor.submit(mod.get_init_status)

    del futures
    return Adapted, AdaptedFailingInitializer


def _build_pmaprt(mod):
    import pmaprt

    class PmaprtMixin(mod.ProcessPoolSpawnMixin):
        executor_type = pmaprt.Executor

    Adapted, AdaptedFailingInitializer = adapted(mod)
    out = []
    for m in MIXINS:
        name = "Pmaprt%sTest" % _strip(m)
        first = AdaptedFailingInitializer if m == "FailingInitializerMixin" else Adapted
        mixin = getattr(mod, m)
        keep = {k: getattr(first, k) for k in vars(first)
                if k.startswith(("test_", "_fail_on")) and hasattr(mixin, k)}
        keep["__module__"] = __name__
        keep["__qualname__"] = name
        cls = type(name, (mixin, PmaprtMixin, mod.BaseTestCase), keep)
        globals()[name] = cls
        out.append(cls)
    return out


import test.test_concurrent_futures as _mod  # noqa: E402  (after the helpers it needs)

PMAPRT_CLASSES = _build_pmaprt(_mod)


def build(mod, impl):
    """The test classes of this run."""
    if impl == "stdlib":
        return [getattr(mod, "ProcessPoolSpawn%sTest" % _strip(m)) for m in MIXINS]
    return PMAPRT_CLASSES


def main(argv):
    impl = argv[0]
    verbose = "-v" in argv
    pattern = argv[argv.index("-k") + 1] if "-k" in argv else None
    mod = _mod
    _wrap_subprocess_runs(mod, impl == "pmaprt")
    loader = unittest.TestLoader()
    if pattern:
        loader.testNamePatterns = ["*%s*" % pattern]
    suite = unittest.TestSuite(loader.loadTestsFromTestCase(c) for c in build(mod, impl))
    mod.setUpModule()
    runner = unittest.TextTestRunner(verbosity=2 if verbose else 1, stream=sys.stderr)
    t0 = time.monotonic()
    res = runner.run(suite)
    unittest.case.doModuleCleanups()
    bad = [t.id().split(".", 1)[-1] for t, _ in res.failures + res.errors]
    skipped = len(res.skipped)
    passed = res.testsRun - len(res.failures) - len(res.errors) - skipped \
        - len(res.expectedFailures) - len(res.unexpectedSuccesses)
    print("RESULT " + json.dumps({"suite": "cpython", "impl": impl, "total": res.testsRun, "passed": passed,
                      "failed": len(bad), "skipped": skipped, "not_passed": sorted(bad),
                      "seconds": round(time.monotonic() - t0, 1)}))
    return 0
