"""Benchmarks of pmaprt under other frameworks' APIs, each against that
framework's own default in the same run:

- joblib: ``Parallel(n_jobs=W)`` on the "pmaprt" backend against joblib's
  default backend (loky), both with ``batch_size="auto"``, on the medium and
  heavy-tailed workloads of ``pmaprt.bench.workloads``.
- Executor: many small ``submit`` calls, and ``map``, on ``pmaprt.Executor``
  against ``concurrent.futures.ProcessPoolExecutor``.
- Dask: ``pmap(fn, xs, backend="dask", client=c)`` (adaptive chunks) against
  ``client.gather(client.map(fn, xs))`` (one task per item), on one
  LocalCluster (W worker processes, one thread each, loopback).

Usage::

    python -m pmaprt.bench.integrations                 # quick (about a minute on 2 cores)
    python -m pmaprt.bench.integrations --full
    python -m pmaprt.bench.integrations --only joblib --only dask --out DIR
    python -m pmaprt.bench.integrations --size-scale 0.01 --repeat 1   # a smoke run

Every pool is started and warmed before it is timed; each figure is the
median of ``--repeat`` runs. A framework that is not installed is skipped with
a note. Prints a table; ``--out DIR`` also writes ``integrations.json`` there.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import pmaprt

from . import workloads as W

SECTIONS = ("joblib", "executor", "dask")

# quick / full sizes
SIZES = {
    "medium": (4_000, 20_000),
    "heavy_tailed": (4_000, 4_000),
    "submits": (5_000, 50_000),
    # one Dask task per item costs milliseconds on the scheduler: the peer's
    # inputs are kept small enough to finish in seconds
    "dask_medium": (1_000, 4_000),
    "dask_heavy": (500, 4_000),
}


_SCALE = 1.0


def _size(key, full):
    return max(8, int(round(SIZES[key][1 if full else 0] * _SCALE)))


def _timed(fn: Callable[[], Any], repeat: int, check: Optional[Callable[[Any], bool]] = None):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        if check is not None and not check(out):
            raise RuntimeError("wrong results")
    return statistics.median(times), times


def _row(section, workload, runner, items, median, times, serial=None, peer=None, note=None):
    return {
        "section": section, "workload": workload, "runner": runner, "items": items,
        "median_s": median, "times_s": times,
        "speedup_vs_map": (serial / median) if serial and median else None,
        "vs_peer": (peer / median) if peer and median else None,
        "note": note,
    }


def _workload(name, n, workers, cal, full=False):
    wl = W.build(name, full=full, scale=1.0, workers=workers, cal=cal)
    args = (wl.args * (n // max(1, len(wl.args)) + 1))[:n]
    return wl.fn, args


def bench_joblib(workers, cal, full, repeat, log):
    rows = []
    try:
        from joblib import Parallel, delayed, parallel_config
        import pmaprt.joblib as pj
    except ImportError as e:
        return [_row("joblib", "-", "-", 0, None, [], note="skipped: %s" % e)]
    for name in ("medium", "heavy_tailed"):
        n = _size(name, full)
        fn, args = _workload(name, n, workers, cal, full)
        expected = list(map(fn, args))
        serial, st = _timed(lambda: list(map(fn, args)), repeat)
        rows.append(_row("joblib", name, "builtin map", n, serial, st, serial))
        res = {}
        for backend in ("loky", "pmaprt"):
            with parallel_config(backend=backend):
                with Parallel(n_jobs=workers, batch_size="auto") as par:
                    par(delayed(W.noop)(i) for i in range(8 * workers))  # warm
                    med, ts = _timed(lambda: par(delayed(fn)(a) for a in args), repeat,
                                     lambda out: out == expected)
            res[backend] = (med, ts)
            log("joblib %s %s: %.3f s" % (name, backend, med))
        rows.append(_row("joblib", name, "joblib loky (default)", n, *res["loky"], serial))
        rows.append(_row("joblib", name, "joblib pmaprt backend", n, *res["pmaprt"], serial,
                         peer=res["loky"][0]))
        try:
            from joblib.externals.loky import get_reusable_executor
            get_reusable_executor().shutdown(wait=True)
        except Exception:
            pass
    pj.shutdown()
    return rows


def bench_executor(workers, cal, full, repeat, log):
    rows = []
    n = _size("submits", full)
    xs = list(range(n))
    expected = [W.double(x) for x in xs]

    def submits(ex):
        fs = [ex.submit(W.double, x) for x in xs]
        return [f.result() for f in fs]

    nm = _size("medium", full)
    fn, margs = _workload("medium", nm, workers, cal, full)
    mexp = list(map(fn, margs))
    serial_m, _ = _timed(lambda: list(map(fn, margs)), 1)
    res = {}
    for label, make in (("ProcessPoolExecutor", lambda: cf.ProcessPoolExecutor(workers)),
                        ("pmaprt.Executor", lambda: pmaprt.Executor(workers))):
        with make() as ex:
            list(ex.map(W.noop, range(8 * workers)))  # warm: every worker started
            res[(label, "submit")] = _timed(lambda: submits(ex), repeat,
                                            lambda out: out == expected)
            res[(label, "medium")] = _timed(lambda: list(ex.map(fn, margs)), repeat,
                                            lambda out: out == mexp)
        log("executor %s: submit %.3f s, medium %.3f s"
            % (label, res[(label, "submit")][0], res[(label, "medium")][0]))
    for label in ("ProcessPoolExecutor", "pmaprt.Executor"):
        peer = None if label == "ProcessPoolExecutor" else res[("ProcessPoolExecutor", "submit")][0]
        rows.append(_row("executor", "%d submits of x*2" % n, label, n,
                         *res[(label, "submit")], peer=peer))
    for label in ("ProcessPoolExecutor", "pmaprt.Executor"):
        peer = None if label == "ProcessPoolExecutor" else res[("ProcessPoolExecutor", "medium")][0]
        rows.append(_row("executor", "medium via map (chunksize 1)", label, nm,
                         *res[(label, "medium")], serial_m, peer=peer))
    return rows


def bench_dask(workers, cal, full, repeat, log):
    try:
        import distributed
    except ImportError as e:
        return [_row("dask", "-", "-", 0, None, [], note="skipped: %s" % e)]
    rows = []
    t0 = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None,
                                       silence_logs=logging.ERROR)
    client = distributed.Client(cluster, timeout=60)
    try:
        client.wait_for_workers(workers, timeout=60)
        log("dask LocalCluster started in %.1f s" % (time.perf_counter() - t0))
        client.gather(client.map(W.noop, range(8 * workers), pure=False))  # warm
        for name, key in (("medium", "dask_medium"), ("heavy_tailed", "dask_heavy")):
            n = _size(key, full)
            fn, args = _workload(name, n, workers, cal, full)
            expected = list(map(fn, args))
            serial, st = _timed(lambda: list(map(fn, args)), 1)
            peer = _timed(lambda: client.gather(client.map(fn, args, pure=False)), repeat,
                          lambda out: out == expected)
            ours = _timed(lambda: list(pmaprt.pmap(fn, args, backend="dask", client=client)), repeat,
                          lambda out: out == expected)
            log("dask %s: client.map %.3f s, pmaprt %.3f s" % (name, peer[0], ours[0]))
            rows.append(_row("dask", name, "builtin map", n, serial, st, serial))
            rows.append(_row("dask", name, "client.map (one task per item)", n, *peer, serial))
            rows.append(_row("dask", name, "pmap backend='dask'", n, *ours, serial,
                             peer=peer[0]))
    finally:
        client.close(timeout=30)
        cluster.close(timeout=30)
    return rows


def render(rows, header):
    out = [header, "",
           "| section | workload | runner | items | median | x map | x peer |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["median_s"] is None:
            out.append("| %s | %s | %s | | | | %s |" % (r["section"], r["workload"], r["runner"],
                                                       r["note"] or ""))
            continue
        out.append("| %s | %s | %s | %d | %.1f ms | %s | %s |" % (
            r["section"], r["workload"], r["runner"], r["items"], 1e3 * r["median_s"],
            "%.2fx" % r["speedup_vs_map"] if r["speedup_vs_map"] else "",
            "%.2fx" % r["vs_peer"] if r["vs_peer"] else ""))
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pmaprt.bench.integrations",
                                description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="full sizes (longer)")
    p.add_argument("--repeat", type=int, default=3, metavar="K", help="median of K runs (3)")
    p.add_argument("--size-scale", type=float, default=1.0, metavar="F",
                   help="multiply every input size by F (default 1)")
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help="workers for every framework (default: one per core)")
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="run only this section (repeatable)")
    p.add_argument("--out", default=None, metavar="DIR", help="also write integrations.json here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if not args.size_scale > 0:
        p.error("--size-scale must be > 0")
    global _SCALE
    _SCALE = args.size_scale
    workers = args.workers or (os.cpu_count() or 1)
    if workers < 1:
        p.error("--workers must be >= 1")

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    cal = W.calibrate()
    rows: List[Dict[str, Any]] = []
    sections = args.only or list(SECTIONS)
    runners = {"joblib": bench_joblib, "executor": bench_executor, "dask": bench_dask}
    t0 = time.perf_counter()
    for s in SECTIONS:
        if s in sections:
            rows.extend(runners[s](workers, cal, args.full, args.repeat, log))
    pmaprt.shutdown()
    header = ("pmaprt integrations benchmark: W=%d, %s, median of %d, %s, %.0f s"
              % (workers, "full" if args.full else "quick", args.repeat,
                 time.strftime("%Y-%m-%d", time.gmtime()), time.perf_counter() - t0))
    text = render(rows, header)
    sys.stdout.write(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "integrations.json"), "w") as f:
            json.dump({"workers": workers, "mode": "full" if args.full else "quick",
                       "repeat": args.repeat, "argv": list(sys.argv[1:] if argv is None else argv),
                       "rows": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
