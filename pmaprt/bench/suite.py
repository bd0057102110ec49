"""Runs the benchmark suite and assembles the results document.

The suite is split as a harness is (runner, per-workload runs, data model,
compare, formatter):

- ``suite`` (this module): the order of things: describe the machine,
  calibrate, check the noise, build the inputs, run every runner over the
  map workloads, the round trip with every runner in turn, the workloads
  that have a module of their own, check the noise again, derive the ratios
  and verdicts, assemble the document;
- ``config``: what to run; ``session``: the state the runs share and how a
  runner is timed;
- ``noise`` (the parallel speed-up of pure CPU work, at the start and end),
  ``map_runs`` (every runner over the map workloads), ``roundtrip_runs``,
  ``sweep_runs`` (pmaprt at fixed chunk sizes), ``array_runs`` (shared arrays
  and ``out=``), ``allreduce_runs``, ``gpu_runs``;
- ``records``: the document's data model; ``verdict``: the rules (spread,
  verdict, lower bound, noise, sweep summary); ``derive``: applies them to
  the records; ``report`` (with ``summary``, the closing verdicts) and
  ``plots``: the table and the PNG files.

The document's layout is described (and kept stable) in the docstring of
:mod:`pmaprt.bench`.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict

import pmaprt

from . import workloads as W
from .allreduce_runs import run_allreduce
from .array_runs import run_numpy_shared, run_preprocess
from .config import Config
from .derive import derive
from .gpu_runs import run_gpu
from .machine import describe
from .map_runs import run_runner, skip_runner
from .noise import noise_check
from .records import SCHEMA_VERSION, new_workload_entry
from .roundtrip_runs import run_roundtrip
from .runners import all_runners
from .session import Session
from .summary import closing_summary
from .verdict import noise_trusted

MAP_WORKLOADS = ("tiny", "medium", "heavy_tailed", "cost_shift", "numpy")
#: workloads with a module of their own, run after the runners, in this order;
#: each takes the session and whether pmaprt is available (and selected)
EXTRA_WORKLOADS = {
    "numpy_shared": run_numpy_shared,
    "preprocess": run_preprocess,
    "allreduce": run_allreduce,
    "gpu": run_gpu,
}


class _Progress:
    """A tqdm bar on stderr, one step per (runner, workload); silent without tqdm."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="pmaprt.bench", unit="step",
                                file=sys.stderr, dynamic_ncols=True, leave=True)
            except Exception:
                self.bar = None

    def step(self, what: str = "", n: int = 1):
        if self.bar is not None:
            self.bar.set_postfix_str(what[:40], refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _shutdown_default_pool() -> None:
    """Stop pmaprt's default pool if this run started one (pmap in the extras)."""
    try:
        pmaprt.shutdown()
    except Exception:
        pass


class Suite:
    """One run of the suite: ``Suite(cfg).run()`` returns the results document."""

    def __init__(self, cfg: Config):
        self.cfg = cfg.resolve()

    def run(self) -> Dict[str, Any]:
        t_start = time.perf_counter()
        cfg = self.cfg
        machine = describe(cfg.workers)
        session = Session(cfg, W.calibrate())
        checks = [noise_check(cfg.workers, session.cal, "start")]

        runners = [r for r in all_runners(optional=cfg.runners is not None)
                   if r.kind == "baseline" or cfg.runners is None or r.id in cfg.runners]
        avail = {r.id: r.available() for r in runners}
        wl = cfg.workloads
        map_wl = [n for n in wl if n in MAP_WORKLOADS]
        swept = [n for n in W.SWEPT if n in map_wl] if cfg.sweep else []
        rt = "roundtrip" in wl

        # inputs
        for name in map_wl:
            w = session.built[name] = session.build(name)
            session.entries[name] = new_workload_entry(name, params=w.params, items=w.n)
        n_rt = W.roundtrip_calls(full=cfg.full, scale=cfg.size_scale)
        if rt:
            session.entries["roundtrip"] = new_workload_entry(
                "roundtrip", params={"calls_per_sample": n_rt}, items=n_rt)

        # plan the progress bar
        sweep_pts = {n: W.sweep_chunksizes(session.built[n].n, cfg.workers, cfg.full)
                     for n in swept}
        total = len(runners) * len(map_wl) + (1 if rt else 0)
        total += sum(len(v) for v in sweep_pts.values())
        total += sum(1 for n in EXTRA_WORKLOADS if n in wl)
        prog = _Progress(total, cfg.progress)
        try:
            for r in runners:
                if not map_wl:
                    continue  # nothing for this runner: do not even start its pool
                ok, why = avail[r.id]
                if not ok:
                    skip_runner(session, r, map_wl, why or "not available")
                    prog.step(r.label, len(map_wl))
                    continue
                run_runner(session, r, map_wl, sweep_pts, prog)
            if rt:
                run_roundtrip(session, runners, avail, n_rt, prog)
            for name, run_extra in EXTRA_WORKLOADS.items():
                if name in wl:
                    run_extra(session, avail.get("pmaprt", (False, None)))
                    prog.step(name)
        finally:
            _shutdown_default_pool()
            prog.close()
            for w in session.built.values():
                if w.cleanup:
                    w.cleanup()

        checks.append(noise_check(cfg.workers, session.cal, "end"))
        noise = dict(noise_trusted(checks, cfg.workers), checks=checks)
        derive(session.results, session.entries, cfg.workers, margin=noise["margin"])
        entries = {n: session.entries[n] for n in W.ALL if n in session.entries}
        return {
            "schema_version": SCHEMA_VERSION,
            "created": machine["date"],
            "argv": list(cfg.argv),
            "config": cfg.as_dict(),
            "machine": machine,
            "calibration": {"spin_iters_per_us": session.cal.iters_per_us,
                            "samples": list(session.cal.samples)},
            "noise": noise,
            "workloads": entries,
            "results": session.results,
            "summary": closing_summary(entries, noise),
            "files": {"json": "results.json", "table": "table.txt", "plots": []},
            "duration_s": time.perf_counter() - t_start,
        }


def run_suite(cfg: Config) -> Dict[str, Any]:
    """Run the suite described by cfg and return the results document
    (nothing is written; see :func:`pmaprt.bench.cli.main` for that)."""
    return Suite(cfg).run()
