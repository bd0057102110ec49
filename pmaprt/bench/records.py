"""The data model of results.json: its key lists and the records' builders.

The document's layout is described (and kept stable) in the docstring of
:mod:`pmaprt.bench`. Format history: 1, the first; 2 added the spread
(``max_s``, ``ranges``), the verdicts, ``noise`` and ``summary``, and made
``ideal_s`` a lower bound. A change that renames or removes a key bumps it.

- ``new_record`` / ``new_workload_entry``: a result record or a workload
  entry with every documented key present (None where not applicable).
- ``fill_times``: a record's times and the figures read off them.
- ``stats_summary``, ``timeline``, ``adaptive_chunksize``, ``busy_seconds``:
  JSON-able figures from a ``pmaprt.MapStats`` (missing fields read as None).
- ``same_results``: whether a runner's results match builtin map's.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional

import numpy as np

from . import workloads as W

SCHEMA_VERSION = 2

#: every per-result record has exactly these keys (None where not applicable)
RESULT_KEYS = (
    "workload", "runner", "label", "kind", "status", "note", "metric", "params",
    "items", "times_s", "paired_serial_s", "runs", "median_s", "min_s", "max_s", "items_per_s",
    "latency_us", "ranges",
    "busbw_gbps", "speedup_vs_map", "speedup_vs_best_peer", "makespan_over_ideal",
    "efficiency", "startup_s", "stats",
)

#: every entry of the "workloads" object has exactly these keys
WORKLOAD_KEYS = (
    "name", "description", "status", "note", "params", "items", "serial_s",
    "serial_spread", "longest_item_s", "ideal_s", "best_peer", "best_peer_s",
    "adaptive_chunksize", "verdicts", "noise_note", "sweep", "timeline",
)

TOP_KEYS = (
    "schema_version", "created", "argv", "config", "machine", "calibration", "noise",
    "workloads", "results", "summary", "files", "duration_s",
)

# Chunks kept per worker in a timeline: enough to draw any quick run whole,
# while a full run's millions of tiny chunks would make results.json hundreds
# of MB; past it the timeline is cut and marked ``truncated``.
TIMELINE_MAX_CHUNKS = 20_000


def new_record(workload: str, runner, **kw) -> Dict[str, Any]:
    """A result record of ``runner`` (anything with ``id``, ``label``, ``kind``)."""
    rec = {k: None for k in RESULT_KEYS}
    rec.update(workload=workload, runner=runner.id, label=runner.label, kind=runner.kind,
               status="ok", metric="wall")
    rec.update(kw)
    return rec


def new_workload_entry(name: str, **kw) -> Dict[str, Any]:
    """A workload entry with its description from ``workloads.DESCRIPTIONS``."""
    e = {k: None for k in WORKLOAD_KEYS}
    e.update(name=name, description=W.DESCRIPTIONS.get(name, ""), status="ok")
    e.update(kw)
    return e


def fill_times(rec: Dict[str, Any], times: List[float], n_items: Optional[int]) -> None:
    """Store a record's timed runs and the figures read off them."""
    rec["times_s"] = [float(t) for t in times]
    rec["runs"] = len(times)
    rec["median_s"] = float(statistics.median(times))
    rec["min_s"] = float(min(times))
    rec["max_s"] = float(max(times))
    rec["items"] = n_items
    if rec["median_s"] > 0 and n_items:
        rec["items_per_s"] = n_items / rec["median_s"]


def _fnum(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _inum(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def same_results(got, want) -> bool:
    """True when got matches builtin map's results (floats: allclose);
    always true without a reference."""
    if want is None:
        return True
    try:
        if len(got) != len(want):
            return False
    except TypeError:
        return False
    try:
        if want and isinstance(want[0], float):
            return bool(np.allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float)))
    except Exception:
        pass
    return list(got) == list(want)


def stats_summary(st) -> Optional[Dict[str, Any]]:
    """A JSON-able summary of a ``pmaprt.MapStats`` (missing fields -> None)."""
    if st is None:
        return None
    cs = [int(c) for c in (getattr(st, "chunksizes", None) or [])]
    workers = []
    for w in getattr(st, "workers", None) or []:
        log = getattr(w, "chunk_log", None) or []
        workers.append({
            "items": _inum(getattr(w, "items", None)),
            "chunks": _inum(getattr(w, "chunks", None)),
            "steals": _inum(getattr(w, "steals", None)),
            "busy_s": _fnum(getattr(w, "busy_s", None)),
            "idle_s": _fnum(getattr(w, "idle_s", None)),
            "rank": _inum(getattr(w, "rank", len(workers))),
            "chunk_log_len": len(log),
        })
    return {
        "mode": getattr(st, "mode", None),
        "wall_s": _fnum(getattr(st, "wall_s", None)),
        "items": _inum(getattr(st, "items", None)),
        "n_chunks": len(cs),
        "chunksize_median": adaptive_chunksize(st),
        "chunksize_min": min(cs) if cs else None,
        "chunksize_max": max(cs) if cs else None,
        "chunksizes": cs if len(cs) <= 10_000 else None,
        "workers": workers,
    }


def busy_seconds(st) -> Optional[float]:
    """The workers' seconds inside chunks (reading items, running them),
    summed over workers; None for a map that ran (partly) inline."""
    if st is None or "inline" in (getattr(st, "mode", "") or ""):
        return None
    return float(sum(getattr(w, "busy_s", 0.0) for w in getattr(st, "workers", None) or []))


def adaptive_chunksize(st) -> Optional[int]:
    """The median chunk size of a map's run (None without chunks)."""
    cs = getattr(st, "chunksizes", None) if st is not None else None
    if not cs:
        return None
    return int(round(statistics.median(cs)))


def timeline(st) -> Optional[Dict[str, Any]]:
    """Per-worker chunk log ``[[t_start, t_end, start_index, count], ...]``."""
    if st is None:
        return None
    rows, truncated = [], False
    for w in getattr(st, "workers", None) or []:
        log = list(getattr(w, "chunk_log", None) or [])
        if len(log) > TIMELINE_MAX_CHUNKS:
            log, truncated = log[:TIMELINE_MAX_CHUNKS], True
        row = []
        for e in log:
            try:
                t0, t1, s, c = e[0], e[1], e[2], e[3]
                row.append([float(t0), float(t1), int(s), int(c)])
            except Exception:
                continue
        rows.append(row)
    if not any(rows):
        return None
    return {"wall_s": _fnum(getattr(st, "wall_s", None)), "mode": getattr(st, "mode", None),
            "workers": rows, "truncated": truncated}
