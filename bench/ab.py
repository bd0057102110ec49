"""Alternated A/B of two commits of pmaprt on the same machine.

    python bench/ab.py OLD NEW [--rounds 8] [--workload tiny ...] [--json out.json]

OLD and NEW are git revisions of this repository. Each is checked out into a
temporary worktree and its C extension built there. Then, round after round,
each workload runs once in a fresh process per side, in the order A B, then
B A (so neither side always runs first on a warmer machine). A side's figure
for a round is the median of its repetitions inside that process; the ratio
NEW / OLD is taken per round, and the report gives the median ratio with its
min-max over the rounds. A ratio whose range straddles 1 is "within noise".

Workloads (the public API only, so that any two commits can be compared):
- tiny: list(pmap(double, range(2e6))) on the default pool;
- medium: 4,000 items of 50 us of pure-Python work, adaptive chunks;
- heavy_tailed: 4,000 items of Pareto(1.2) cost, 10 us minimum (the harness's
  quick draw, seed 20240601), each a wait on the clock for its cost;
- roundtrip: Pool.apply of a no-op, median of 2,000 calls;
- map10: a 10-item map on a warm pool, median of 300 maps;
- numpy: a 64 MiB float64 array summed in 256 row blocks (chunks=).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

WORKLOADS = ("tiny", "medium", "heavy_tailed", "roundtrip", "map10", "numpy")

# What one child process runs: the tree's own pmaprt, warm, then timed.
CHILD = r'''
import json, sys, time
sys.path.insert(0, TREE)
import numpy as np
import pmaprt

def double(x):
    return 2 * x

def spin50(x):
    t = time.perf_counter() + 50e-6
    while time.perf_counter() < t:
        pass
    return x

def spin_us(us):
    t = time.perf_counter() + us * 1e-6
    while time.perf_counter() < t:
        pass
    return us

def noop():
    return None

def block_sum(a):
    return float(a.sum())

def median_of(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]

out = {}
with pmaprt.Pool() as pool:
    list(pool.map(double, range(1000)))        # warm: workers started and past import
    if "tiny" in WANT:
        xs = range(2_000_000)
        list(pmaprt.pmap(double, range(1000)))
        out["tiny"] = median_of(lambda: list(pmaprt.pmap(double, xs)), 3)
    if "medium" in WANT:
        out["medium"] = median_of(lambda: list(pool.map(spin50, range(4000))), 3)
    if "heavy_tailed" in WANT:
        costs = (10.0 * (1.0 + np.random.default_rng(20240601).pareto(1.2, 4000))).tolist()
        out["heavy_tailed"] = median_of(lambda: list(pool.map(spin_us, costs)), 3)
    if "roundtrip" in WANT:
        for _ in range(200):
            pool.apply(noop)
        out["roundtrip"] = median_of(lambda: pool.apply(noop), 2000)
    if "map10" in WANT:
        for _ in range(30):
            list(pool.map(double, range(10)))
        out["map10"] = median_of(lambda: list(pool.map(double, range(10))), 300)
    if "numpy" in WANT:
        a = np.random.default_rng(0).random(8 << 20)
        rows = a.shape[0] // 256
        list(pool.map(block_sum, a, chunks=rows))
        out["numpy"] = median_of(lambda: list(pool.map(block_sum, a, chunks=rows)), 5)
pmaprt.shutdown()
print(json.dumps(out))
'''


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def checkout(rev, where):
    """A worktree of rev at `where`, its extension built in place."""
    _run(["git", "worktree", "add", "--detach", "-q", where, rev])
    _run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=where)
    return _run(["git", "rev-parse", "--short", "HEAD"], cwd=where).stdout.strip()


def run_side(tree, want):
    code = "TREE = %r\nWANT = %r\n" % (tree, list(want)) + CHILD
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True,
                         text=True, timeout=900)
    if res.returncode:
        raise RuntimeError("a timed run in %s failed:\n%s" % (tree, res.stderr[-4000:]))
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarize(rounds, want):
    """Per workload: each side's median seconds, and NEW/OLD per round as
    median with min and max."""
    table = {}
    for w in want:
        ratios = [r["new"][w] / r["old"][w] for r in rounds]
        table[w] = {
            "old_s": statistics.median(r["old"][w] for r in rounds),
            "new_s": statistics.median(r["new"][w] for r in rounds),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "within_noise": min(ratios) <= 1.0 <= max(ratios),
        }
    return table


def _fmt_s(s):
    return "%.1f us" % (s * 1e6) if s < 1e-3 else "%.2f ms" % (s * 1e3) if s < 1 else "%.3f s" % s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--workload", action="append", choices=WORKLOADS)
    ap.add_argument("--json", help="write the rounds and the summary here")
    args = ap.parse_args(argv)
    want = args.workload or list(WORKLOADS)
    tmp = tempfile.mkdtemp(prefix="pmaprt-ab-")
    trees = {"old": os.path.join(tmp, "old"), "new": os.path.join(tmp, "new")}
    try:
        revs = {k: checkout(rev, trees[k]) for k, rev in (("old", args.old), ("new", args.new))}
        rounds = []
        for i in range(args.rounds):
            order = ("old", "new") if i % 2 == 0 else ("new", "old")
            r = {side: run_side(trees[side], want) for side in order}
            rounds.append(r)
            print("round %d: %s" % (i + 1, "  ".join(
                "%s %.3f" % (w, r["new"][w] / r["old"][w]) for w in want)), flush=True)
        table = summarize(rounds, want)
    finally:
        for t in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", t], capture_output=True)
    print("\nNEW %s / OLD %s, %d alternated rounds, %d cores" % (
        revs["new"], revs["old"], args.rounds, os.cpu_count() or 1))
    print("%-10s %12s %12s %8s %17s" % ("workload", "old", "new", "ratio", "range"))
    for w, t in table.items():
        print("%-10s %12s %12s %8.3f %8.3f-%-8.3f%s" % (
            w, _fmt_s(t["old_s"]), _fmt_s(t["new_s"]), t["ratio_median"], t["ratio_min"],
            t["ratio_max"], "  within noise" if t["within_noise"] else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"old": revs["old"], "new": revs["new"], "rounds": rounds,
                       "summary": table}, f, indent=1)


if __name__ == "__main__":
    main()
