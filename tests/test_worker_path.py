"""Workers import modules as the parent does: with the parent's sys.path,
never from a working directory the parent did not have on it."""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLANT = """
import os
open(os.path.join(%r, "ran-%%d" %% os.getpid()), "w").close()
raise ImportError("a planted module ran")
"""

SCRIPT = """
import os, sys
sys.path.insert(0, %r)
import pmaprt

def where(x):
    return sys.path

if __name__ == "__main__":
    with pmaprt.Pool(2) as p:
        paths = list(p.map(where, range(4), inline=False))
    assert all(q == sys.path for q in paths), (paths[0], sys.path)
    print("ok", os.getcwd() in sys.path or "" in sys.path)
"""


def test_a_module_in_the_working_directory_does_not_run_in_workers(tmp_path):
    planted, scripts, marks = tmp_path / "cwd", tmp_path / "scripts", tmp_path / "marks"
    for d in (planted, scripts, marks):
        d.mkdir()
    # Modules a worker imports at start that the parent had imported already.
    for name in ("random", "struct", "queue", "selectors"):
        (planted / (name + ".py")).write_text(PLANT % str(marks))
    script = scripts / "run.py"
    script.write_text(textwrap.dedent(SCRIPT % REPO))
    out = subprocess.run([sys.executable, str(script)], cwd=str(planted), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", "False"]
    assert os.listdir(marks) == [], "a module planted in the working directory ran"


def test_a_parent_that_has_the_working_directory_on_its_path_shares_it(tmp_path):
    """`python -c` (or a REPL) has '' on sys.path: workers get it too, as
    with spawn, and resolve modules there as the parent does."""
    (tmp_path / "helper_mod_i18.py").write_text("def f(x):\n    return x + 1\n")
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        import pmaprt, helper_mod_i18
        with pmaprt.Pool(2) as p:
            print(list(p.map(helper_mod_i18.f, range(3), inline=False)))
    """ % REPO)
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[1, 2, 3]"
