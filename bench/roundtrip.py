"""Round trips and short maps: pmaprt against multiprocessing.Pool, in pairs.

    python bench/roundtrip.py [--pairs 300] [--busy 0 2] [--only map10 apply] [--json out.json]

Both pools are started once and warmed; then, pair after pair, a block of
calls (BLOCK) runs on one pool and the same block on the other, the order swapped
at every pair (so neither side always runs first on a warmer machine). A
pair's ratio is pmaprt's block time over multiprocessing's; the report gives
the median ratio, its interquartile range and its min-max over the pairs,
and each side's median microseconds per call. Absolute times on a shared
machine swing several-fold from moment to moment; the ratio of two blocks
taken moments apart does not.

Workloads (a trivial function; the worker path is what is measured, so the
maps are inline=False: under inline="auto" a map of trivial items runs in
the caller at map's own speed, shown as `map10-auto`):
- map10, map100: list(pool.map(double, xs)) for a list of 10 or 100 ints
  (mp: pool.map, its default chunksize);
- apply: pool.apply(noop);
- map10-auto: pmaprt's default map of 10 trivial items, for reference.

--busy N: N busy-loop processes per core run beside the pools during that
phase (several values: one phase each, e.g. --busy 0 2); they are ended by
pid when the phase ends, whatever happens. The load average and the
instantaneous count of runnable threads are printed with each phase.
"""
import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pmaprt  # noqa: E402

WORKLOADS = ("map10", "map100", "apply", "map10-auto")
# Calls per block, each block about 10 ms on a quiet 2-core VM: long enough
# that the clock's and the loop's own costs vanish and that, beside busy
# loops, a block spans several of the scheduler's time slices (a block
# shorter than a slice either gets a core or waits a whole slice, and its
# ratio says only which); short enough that a pair's two blocks are moments
# apart. Fixed counts, so that runs compare.
BLOCK = {"map10": 24, "map100": 16, "apply": 64, "map10-auto": 64}


def double(x):
    return 2 * x


def noop():
    return None


def cores():
    return len(os.sched_getaffinity(0))


def machine_load():
    """(1-minute load average, threads runnable right now) from /proc."""
    with open("/proc/loadavg") as f:
        load1 = float(f.read().split()[0])
    running = None
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                running = int(line.split()[1])
    return load1, running


BUSY_LOOP = "import os\nos.nice(0)\nwhile True:\n    pass\n"


def start_busy(n):
    return [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(n)]


def stop_busy(procs):
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=10)


def calls(pm, mp):
    """Per workload: (pmaprt block, multiprocessing block), each a callable."""
    xs10, xs100 = list(range(10)), list(range(100))
    return {
        "map10": (lambda: list(pm.map(double, xs10, inline=False)),
                  lambda: mp.map(double, xs10)),
        "map100": (lambda: list(pm.map(double, xs100, inline=False)),
                   lambda: mp.map(double, xs100)),
        "apply": (lambda: pm.apply(noop), lambda: mp.apply(noop)),
        "map10-auto": (lambda: list(pm.map(double, xs10)), lambda: mp.map(double, xs10)),
    }


def block_time(fn, k):
    t = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - t) / k


def quantile(xs, q):
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def run_phase(pm, mp, want, pairs):
    table = {}
    fns = calls(pm, mp)
    for w in want:
        a, b = fns[w]
        k = BLOCK[w]
        for _ in range(2):          # warm this call path on both sides
            block_time(a, k)
            block_time(b, k)
        ra, rb = [], []
        for i in range(pairs):
            if i % 2:
                tb = block_time(b, k)
                ta = block_time(a, k)
            else:
                ta = block_time(a, k)
                tb = block_time(b, k)
            ra.append(ta)
            rb.append(tb)
        ratios = [x / y for x, y in zip(ra, rb)]
        table[w] = {
            "pairs": pairs, "calls_per_block": k,
            "pmaprt_us": statistics.median(ra) * 1e6,
            "mp_us": statistics.median(rb) * 1e6,
            "ratio_median": statistics.median(ratios),
            "ratio_q1": quantile(ratios, 0.25), "ratio_q3": quantile(ratios, 0.75),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
        }
    return table


def report(busy, load_before, load_after, table):
    print("busy=%d per core  load1 %.2f -> %.2f  runnable %s -> %s" % (
        busy, load_before[0], load_after[0], load_before[1], load_after[1]))
    print("  %-11s %6s %10s %10s %8s %15s %15s" % ("workload", "calls", "pmaprt us", "mp us",
                                                    "ratio", "IQR", "min-max"))
    for w, t in table.items():
        print("  %-11s %6d %10.1f %10.1f %8.3f %7.3f-%-7.3f %7.3f-%-7.3f" % (
            w, t["calls_per_block"], t["pmaprt_us"], t["mp_us"], t["ratio_median"], t["ratio_q1"],
            t["ratio_q3"], t["ratio_min"], t["ratio_max"]))
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=300, help="alternated pairs per workload")
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 2],
                    help="busy-loop processes per core, one phase per value (default: 0 2)")
    ap.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--workers", type=int, default=None, help="workers of each pool (cores)")
    ap.add_argument("--json", help="write the tables here")
    args = ap.parse_args(argv)
    if args.pairs < 1 or any(b < 0 for b in args.busy):
        ap.error("--pairs must be >= 1 and --busy >= 0")
    n = args.workers or cores()
    out = {"cores": cores(), "workers": n, "date": time.strftime("%Y-%m-%d"), "phases": []}
    print("pmaprt %s vs multiprocessing.Pool, %d workers each, %d cores, %d pairs" % (
        pmaprt.__version__, n, cores(), args.pairs))
    # multiprocessing's pool first: its workers fork from a process with no pmaprt pool yet.
    with multiprocessing.Pool(n) as mp, pmaprt.Pool(n) as pm:
        list(pm.map(double, range(1000)))
        mp.map(double, range(1000))
        for busy in args.busy:
            procs = start_busy(busy * cores())
            try:
                time.sleep(0.5 if procs else 0)     # let the busy loops reach the CPU
                before = machine_load()
                table = run_phase(pm, mp, args.only, args.pairs)
                after = machine_load()
            finally:
                stop_busy(procs)
            report(busy, before, after, table)
            out["phases"].append({"busy_per_core": busy, "load_before": before,
                                  "load_after": after, "table": table})
    pmaprt.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
