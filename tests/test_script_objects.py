"""Objects of the caller's script (``__main__``) through every entry point.

A script defines a class and a function, then passes instances through
pmap, Pool.apply, Executor.submit/map and the joblib backend. Workers are
fresh interpreters whose ``__main__`` is not the script: the instances must
still arrive as instances of the script's class, and results come back as
the parent's own class (``isinstance`` holds on both sides). The script has
no ``if __name__ == "__main__":`` guard on purpose for one case: workers must
not run it again.
"""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import os, sys
    import pmaprt
    import pmaprt.joblib
    from joblib import Parallel, delayed

    class P:
        def __init__(self, x):
            self.x = x
        def __eq__(self, o):
            return type(o) is P and o.x == self.x
        def __repr__(self):
            return "P(%r)" % self.x

    def double(p):
        assert isinstance(p, P), type(p)
        return P(p.x * 2)

    def check(name, got, want):
        assert got == want and all(type(g) is P for g in got), (name, got)
        print("ok", name, flush=True)

    GUARD
        check("pmap", list(pmaprt.pmap(double, [P(i) for i in range(50)])),
              [P(2 * i) for i in range(50)])
        with pmaprt.Pool(2) as pool:
            check("apply", [pool.apply(double, P(7))], [P(14)])
            check("map-unordered", sorted(pool.map(double, [P(1), P(2)], inline=False,
                                                   ordered=False), key=lambda p: p.x),
                  [P(2), P(4)])
        with pmaprt.Executor(2) as ex:
            check("submit", [ex.submit(double, P(3)).result(timeout=60)], [P(6)])
            check("executor-map", list(ex.map(double, [P(1), P(5)], timeout=60)), [P(2), P(10)])
        check("joblib", Parallel(n_jobs=2, backend="pmaprt")(delayed(double)(P(i)) for i in range(3)),
              [P(0), P(2), P(4)])
        print("pid", os.getpid(), flush=True)
''')


def _run(tmp_path, guard):
    body = SCRIPT.replace("GUARD", 'if __name__ == "__main__":' if guard else "if True:")
    path = tmp_path / "script_with_class.py"
    path.write_text(body)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(path)], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "no-guard"])
def test_script_class_through_every_entry_point(tmp_path, guard):
    proc = _run(tmp_path, guard)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.split()
    for name in ("pmap", "apply", "map-unordered", "submit", "executor-map", "joblib"):
        assert ("ok", name) in zip(lines, lines[1:]), proc.stdout
    # The script ran once: the workers did not import it again.
    assert proc.stdout.count("pid ") == 1, proc.stdout
