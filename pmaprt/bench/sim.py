"""The scheduler at scale, by simulation: ``python -m pmaprt.bench.sim``.

A discrete-event simulator (``sim_engine``) runs one map of the harness's
workloads (tiny, medium, heavy-tailed Pareto 1.2, cost shift; their item
costs from ``workloads.build``) on W = 2, 16, 64, 256 and 1,024 virtual
workers, under pmaprt's policy, driven through its real claim and sizing
code (``sim_pmaprt``), and under the peers' policies (``sim_peers``), with
per-chunk and per-item overheads measured on this machine at the start
(``sim_measure``). It reports ``/ideal`` = makespan / max(total work / W,
the dearest item), the harness's lower bound, per workload, policy and W,
as a table (stdout and ``sim_table.txt``), ``sim.json`` and a plot
(``sim_ideal.png``) in ``--out`` (default ``bench/results``).

Items: each workload's quick size, raised to ITEMS_PER_WORKER x W.

``--validate``: real maps of pmaprt at W = 2 on the same items beside the
simulator's prediction, the ideal measured as the same work evenly divided
on the same pool (``sim_measure.compare_at_two``; about 2 minutes).

Limits of the model:

* Claims are instantaneous and serial on the virtual clock: no contention
  on the shared counter or a victim's range word (a real CAS retries), no
  cache-line transfer; overheads do not grow with W.
* No memory bandwidth, cache or NUMA effects; an item costs the same on
  every worker and at every moment; one worker per core, nothing else
  running; the parent has a core of its own. A real machine's cores are
  not that even (a VM's lose time to its host): the validation measures
  the ideal on the machine (see ``--validate``).
* The parent is one serial server for every record (decode) and, for the
  central peers, every hand-out; its per-chunk cost is the measured
  pipeline throughput (see ``sim_measure``), likely an over-estimate.
* Every worker starts at the post plus the measured start cost; the
  runtime wakes the others one hop later, and leaves work it expects to
  end within ``_sched.SHORT_WORK_S`` (100 us) to one worker: maps that
  short are not what the simulator is for.
* Workers that have left a job never come back to it (pmaprt: items given
  back by a preempted chunk after the others went to sleep run on their
  owner, as in the runtime, where nothing wakes a sleeper for them).
* The caller's probe is modelled from its constants (``sim_pmaprt``);
  the inline takeover midway through a map is not modelled. An item the
  caller finishes after its handoff runs beside the W workers, one core
  more than the bound counts (pmaprt's /ideal can dip under 1 at W = 2).
* The pipe-based peers share one measured overhead profile (multiprocessing's);
  Dask's is its documented scheduler cost per task.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

from . import workloads as WL
from .sim_engine import Costs, Overheads
from .sim_measure import SIM_WORKLOADS, compare_at_two, harness_costs, measure_overheads
from .sim_peers import PEERS, simulate_peer
from .sim_pmaprt import simulate_pmaprt

WORKERS = (2, 16, 64, 256, 1024)
ITEMS_PER_WORKER = 50
POLICIES = ("pmaprt",) + PEERS
#: the goal for pmaprt on the heavy-tailed workload at W >= 16
GOAL = 1.10


def items_for(name: str, workers: int) -> int:
    return max(WL.SIZES[name][0], ITEMS_PER_WORKER * workers)


def simulate(policy: str, costs: Costs, workers: int, profiles: Dict[str, Overheads], seed=0):
    if policy == "pmaprt":
        return simulate_pmaprt(costs, workers, profiles["pmaprt"], seed=seed)
    return simulate_peer(policy, costs, workers, profiles["pipe"])


def run_grid(profiles: Dict[str, Overheads], cal: WL.Calibration, workers=WORKERS,
             workloads=SIM_WORKLOADS, policies=POLICIES, seed=0) -> List[dict]:
    rows = []
    for name in workloads:
        for W in workers:
            costs = Costs(harness_costs(name, items_for(name, W), W, cal))
            for p in policies:
                r = simulate(p, costs, W, profiles, seed=seed)
                rows.append(dict(r.as_dict(), workload=name))
    return rows


def heavy_draws(profiles, cal, draws: int, workers=WORKERS, seed=0) -> List[dict]:
    """The heavy-tailed workload over `draws` draws of its costs (seeds from the
    harness's on): pmaprt as it runs, pmaprt with the caller's probe off (the
    workers from the first item), mp.Pool.map and the greedy reference."""
    out = []
    for W in workers:
        for k in range(draws):
            s = 20240601 + k
            costs = Costs(harness_costs("heavy_tailed", items_for("heavy_tailed", W), W, cal,
                                        seed=s))
            row = {"workers": W, "draw_seed": s}
            row["pmaprt"] = simulate_pmaprt(costs, W, profiles["pmaprt"], seed=seed).over_ideal
            row["pmaprt_no_probe"] = simulate_pmaprt(costs, W, profiles["pmaprt"], seed=seed,
                                                     probe=False).over_ideal
            for p in ("mp_pool_map", "greedy"):
                row[p] = simulate(p, costs, W, profiles).over_ideal
            out.append(row)
    return out


def render_draws(rows: List[dict]) -> str:
    cols = ("pmaprt", "pmaprt_no_probe", "mp_pool_map", "greedy")
    k = len({r["draw_seed"] for r in rows})
    out = ["heavy_tailed over %d draws of its costs: /ideal min-max (median)" % k,
           "%-8s" % "W" + "".join("%24s" % c for c in cols)]
    for W in sorted({r["workers"] for r in rows}):
        cells = []
        for c in cols:
            v = sorted(r[c] for r in rows if r["workers"] == W)
            cells.append("%24s" % ("%.3f-%.3f (%.3f)" % (v[0], v[-1], v[len(v) // 2])))
        out.append("%-8d" % W + "".join(cells))
    return "\n".join(out) + "\n"


def render(rows: List[dict], profiles: Dict[str, Overheads]) -> str:
    ws = sorted({r["workers"] for r in rows})
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    out = ["Simulated /ideal = makespan / max(total work / W, dearest item); "
           "items: max(quick size, %d x W)" % ITEMS_PER_WORKER]
    for name in dict.fromkeys(r["workload"] for r in rows):
        sub = {(r["policy"], r["workers"]): r for r in rows if r["workload"] == name}
        items = [sub[(pols[0], w)]["items"] for w in ws]
        out.append("")
        out.append("%s (items: %s)" % (name, ", ".join("%d" % i for i in items)))
        out.append("%-14s" % "policy" + "".join("%10s" % ("W=%d" % w) for w in ws))
        for p in pols:
            out.append("%-14s" % p + "".join("%10.3f" % sub[(p, w)]["over_ideal"] for w in ws))
    out.append("")
    for o in profiles.values():
        out.append("overheads %s: " % o.name + ", ".join(
            "%s %.3g us" % (k, v * 1e6) for k, v in o.as_dict().items() if k != "name"))
    return "\n".join(out) + "\n"


def ideal_figure(rows: List[dict]):
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), dpi=100,
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        for p in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["workers"], r["over_ideal"]) for r in rows
                         if r["workload"] == name and r["policy"] == p)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                    linewidth=2.5 if p == "pmaprt" else 1, label=p)
        ax.axhline(GOAL, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("workers W")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("simulated makespan / ideal (1 is perfect)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("The scheduler at scale, simulated (dotted: %.2f)" % GOAL, fontsize=11)
    fig.tight_layout()
    return fig


def render_validation(v) -> str:
    out = ["W = 2: pmaprt's measured /ideal beside the simulator's (%d pairs; the ideal: the "
           "same work in %d equal pieces per worker, alternated with the map)"
           % (v["repeat"], v["ref_pieces"]),
           "%-14s %-8s %6s %18s %10s %9s %12s %8s" % (
               "workload", "path", "items", "measured (IQR)", "simulated", "sim/meas",
               "serial/W def", "even x")]
    for r in v["rows"]:
        lo, hi = r["measured_range"]
        out.append("%-14s %-8s %6d %6.3f (%.2f-%.2f) %10.3f %9.3f %12.3f %8.2f" % (
            r["workload"], r["path"], r["items"], r["measured"], lo, hi, r["simulated"],
            r["sim_over_measured"], r["over_serial_w"], r["even_speedup"]))
    out.append("path default: the map as called (the caller's probe runs first items), simulated "
               "with the probe; workers: inline=False, simulated without it")
    out.append("serial/W def: /ideal with serial time / W as the ideal; even x: serial time over "
               "the even division's (the cores' worth the machine gave)")
    out.append("load average before %s, after %s" % (
        " ".join("%.2f" % x for x in v["loadavg_before"]),
        " ".join("%.2f" % x for x in v["loadavg_after"])))
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pmaprt.bench.sim",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("bench", "results"), metavar="DIR")
    p.add_argument("--workers", type=int, action="append", metavar="W",
                   help="simulate these worker counts (repeatable; default %s)"
                        % ", ".join(map(str, WORKERS)))
    p.add_argument("--workload", action="append", metavar="NAME",
                   help="only this workload (repeatable): " + ", ".join(SIM_WORKLOADS))
    p.add_argument("--seed", type=int, default=0, help="pmaprt's victim-order seed")
    p.add_argument("--draws", type=int, default=3, metavar="K",
                   help="also simulate heavy-tailed over K draws of its costs (0: not)")
    p.add_argument("--validate", action="store_true",
                   help="also run pmaprt for real at W = 2 and compare (about 2 minutes)")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    try:
        names = [WL.canonical(n) for n in (a.workload or SIM_WORKLOADS)]
        bad = [n for n in names if n not in SIM_WORKLOADS]
        if bad:
            raise ValueError("the simulator has no item costs for %s; choose from %s"
                             % (", ".join(bad), ", ".join(SIM_WORKLOADS)))
        ws = tuple(a.workers or WORKERS)
        if min(ws) < 1:
            raise ValueError("--workers must be >= 1")
        if a.draws < 0:
            raise ValueError("--draws must be >= 0")
    except ValueError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    meas = measure_overheads()
    profiles = {"pmaprt": meas["pmaprt"], "pipe": meas["pipe"]}
    cal = WL.calibrate()
    rows = run_grid(profiles, cal, workers=ws, workloads=names, seed=a.seed)
    text = render(rows, profiles)
    doc = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "overheads": {k: o.as_dict() for k, o in profiles.items()},
           "measured": {"parts": meas["parts"], "maps": meas["maps"],
                        "loadavg": meas["loadavg"]},
           "items_per_worker": ITEMS_PER_WORKER, "rows": rows}
    if a.draws and "heavy_tailed" in names:
        doc["heavy_draws"] = heavy_draws(profiles, cal, a.draws, workers=ws, seed=a.seed)
        text += "\n" + render_draws(doc["heavy_draws"])
    if a.validate:
        v = compare_at_two(profiles["pmaprt"])
        doc["validation"] = v
        text += "\n" + render_validation(v)
    doc["duration_s"] = time.perf_counter() - t0
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sim_table.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "sim.json"), "w") as f:
        json.dump(doc, f, indent=1)
    if not a.no_plots:
        fig = ideal_figure(rows)
        fig.savefig(os.path.join(a.out, "sim_ideal.png"))
    sys.stdout.write(text)
    sys.stdout.write("results in %s (%.1f s)\n" % (a.out, doc["duration_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
