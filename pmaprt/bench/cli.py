"""Command line of ``python -m pmaprt.bench``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np

from . import workloads as W
from .config import Config
from .plots import write_all
from .report import render
from .runners import RUNNER_IDS
from .suite import run_suite


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pmaprt.bench",
        description="Benchmark pmaprt against builtin map, multiprocessing, "
                    "concurrent.futures, joblib and mpire.  Without options: the quick "
                    "suite (every workload at reduced size, 5 paired runs each).",
    )
    p.add_argument("--full", action="store_true",
                   help="the whole suite at full size (takes a long while)")
    p.add_argument("--workload", action="append", metavar="NAME",
                   help="run only this workload (repeatable): " + ", ".join(W.ALL))
    p.add_argument("--out", default=os.path.join("bench", "results"), metavar="DIR",
                   help="where results.json, table.txt and the PNG plots go "
                        "(default: %(default)s)")
    p.add_argument("--repeat", type=int, default=None, metavar="K",
                   help="K timed runs per runner and workload (default 5)")
    p.add_argument("--size-scale", type=float, default=1.0, metavar="F",
                   help="multiply every workload's size by F (default 1)")
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help="worker count for every runner (default os.cpu_count())")
    p.add_argument("--max-runner-s", type=float, default=None, metavar="S",
                   help="stop repeating one runner on one workload once it has used S "
                        "seconds (at least one run; default 3 quick, 60 full)")
    p.add_argument("--runner", action="append", metavar="ID",
                   help="run only these runners besides builtin map (repeatable): "
                        + ", ".join(RUNNER_IDS))
    p.add_argument("--no-sweep", action="store_true", help="skip the chunk-size sweeps")
    p.add_argument("--no-pair", action="store_true",
                   help="do not run builtin map before each timed run of a parallel runner "
                        "(vs map, eff and /ideal then come from the medians)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for n in W.ALL:
            print(f"{n:14s} {W.DESCRIPTIONS[n]}")
        return 0
    try:
        cfg = Config(
            full=args.full,
            repeat=args.repeat,
            size_scale=args.size_scale,
            workers=args.workers,
            workloads=args.workload,
            out_dir=args.out,
            progress=not args.no_progress,
            max_runner_s=args.max_runner_s,
            sweep=not args.no_sweep,
            pair=not args.no_pair,
            plots=not args.no_plots,
            runners=args.runner,
            argv=list(sys.argv[1:] if argv is None else argv),
        ).resolve()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(cfg.out_dir, exist_ok=True)
    doc = run_suite(cfg)
    write_outputs(doc, cfg.out_dir, plots=cfg.plots)
    sys.stdout.write(render(doc))
    sys.stdout.write(f"results in {os.path.join(cfg.out_dir, 'results.json')}\n")
    sys.stdout.flush()
    return 0


def write_outputs(doc, out_dir: str, plots: bool = True) -> None:
    """results.json, table.txt and (unless plots=False) the PNG plots."""
    os.makedirs(out_dir, exist_ok=True)
    if plots:
        doc["files"]["plots"] = write_all(doc, out_dir)
    with open(os.path.join(out_dir, "table.txt"), "w") as f:
        f.write(render(doc))
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=_jsonable)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, "results.json"))


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)
