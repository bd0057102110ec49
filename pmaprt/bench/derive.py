"""Ratios derived from the timed records, once every runner has run.

Each record gets ``speedup_vs_map``, ``efficiency``, ``makespan_over_ideal``
and ``speedup_vs_best_peer``; each workload entry its ``serial_s``,
``best_peer``, ``ideal_s`` and, for swept workloads, ``sweep``. A paired
record (a builtin map run, or an adaptive run, just before each timed run)
is judged by the median of its per-pair ratios: on a shared machine the
speed of a core drifts by up to 2x over seconds, and a ratio between runs a
fraction of a second apart drifts far less than one between medians taken
minutes apart.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

from . import workloads as W


def split_efficiency(busy: List[float], times: List[float], serial: List[float],
                     workers: int) -> Optional[Dict[str, float]]:
    """Efficiency serial/(W*t) = busy fraction / work inflation, per run:
    busy fraction = busy/(W*t), the share of the workers' wall time spent in
    chunks (what the scheduler controls: idle workers, dispatch); work
    inflation = busy/serial, how much longer the same items took in W
    processes at once than in one (what the machine does: shared caches,
    memory bandwidth, clock, other tenants). Medians over the runs."""
    if not busy or len(busy) != len(times) or len(serial) != len(times):
        return None
    rows = [(b, t, s_) for b, t, s_ in zip(busy, times, serial) if b and t and s_]
    if not rows:
        return None
    return {"busy_fraction": statistics.median(b / (workers * t) for b, t, _ in rows),
            "work_inflation": statistics.median(b / s_ for b, _, s_ in rows)}


def vs_adaptive(fixed: Dict[str, Any], adaptive: Optional[Dict[str, Any]]) -> Optional[float]:
    """A fixed chunk size's speed relative to the adaptive choice (adaptive
    time / fixed time; > 1: the fixed size was faster): the median of its
    per-run ratios against the adaptive run just before each (paired sweeps),
    else the ratio of medians."""
    pa = (fixed.get("stats") or {}).get("paired_adaptive_s")
    ts = fixed.get("times_s") or []
    if pa and len(pa) == len(ts) and all(ts):
        return statistics.median(a / t for a, t in zip(pa, ts))
    if adaptive and adaptive.get("median_s") and fixed.get("median_s"):
        return adaptive["median_s"] / fixed["median_s"]
    return None


def derive(results: List[Dict[str, Any]], entries: Dict[str, Dict[str, Any]], workers: int) -> None:
    """Fill the derived figures of every record and workload entry in place."""
    wk = workers
    by_wl: Dict[str, List[Dict[str, Any]]] = {}
    for rec in results:
        by_wl.setdefault(rec["workload"], []).append(rec)
    for name, recs in by_wl.items():
        entry = entries.get(name)
        ok = [r for r in recs if r["status"] == "ok" and r["median_s"]]
        base = next((r for r in ok if r["kind"] == "baseline"), None)
        peers = [r for r in ok if r["kind"] == "peer"]
        best = min(peers, key=lambda r: r["median_s"]) if peers else None
        serial = base["median_s"] if base else None
        ideal = None
        if entry is not None:
            entry["serial_s"] = serial if name != "roundtrip" else None
            entry["best_peer"] = best["runner"] if best else None
            entry["best_peer_s"] = best["median_s"] if best else None
            if serial and entry.get("longest_item_s") is not None:
                ideal = max(serial / wk, entry["longest_item_s"])
                entry["ideal_s"] = ideal
        longest = entry.get("longest_item_s") if entry is not None else None
        for r in ok:
            if r["metric"] == "busbw":
                continue
            ps = r.get("paired_serial_s")
            if ps and len(ps) == len(r["times_s"]) and r["metric"] == "wall":
                # medians of per-pair ratios (Session.timed)
                pairs = list(zip(ps, r["times_s"]))
                r["speedup_vs_map"] = statistics.median(s_ / t for s_, t in pairs)
                r["efficiency"] = statistics.median(s_ / (wk * t) for s_, t in pairs)
                if longest is not None:
                    r["makespan_over_ideal"] = statistics.median(
                        t / max(s_ / wk, longest) for s_, t in pairs)
            elif serial and r["metric"] == "wall":
                r["speedup_vs_map"] = serial / r["median_s"]
                if r["kind"] != "baseline":
                    r["efficiency"] = serial / (wk * r["median_s"])
                if ideal:
                    r["makespan_over_ideal"] = r["median_s"] / ideal
            elif ideal:
                r["makespan_over_ideal"] = r["median_s"] / ideal
            if best and not (r["metric"] == "latency" and r["kind"] == "baseline"):
                r["speedup_vs_best_peer"] = best["median_s"] / r["median_s"]
            st = r.get("stats")
            if st and st.get("busy_s_runs") and r["metric"] == "wall":
                ser = ps or ([serial] * len(r["times_s"]) if serial else [])
                split = split_efficiency(st["busy_s_runs"], r["times_s"], ser, wk)
                if split:
                    st.update(split)
        if entry is not None and name in W.SWEPT:
            sw = [r for r in ok if r["kind"] == "sweep"]
            if sw:
                ad = next((r for r in ok if r["kind"] == "pmaprt"), None)
                for r in sw:
                    r["stats"] = r.get("stats") or {}
                    r["stats"]["vs_adaptive"] = vs_adaptive(r, ad)
                paired = all(r["stats"].get("paired_adaptive_s") for r in sw)
                if paired:
                    # fastest against the adaptive runs beside it
                    bestfix = max(sw, key=lambda r: r["stats"]["vs_adaptive"] or 0.0)
                else:
                    bestfix = min(sw, key=lambda r: r["median_s"])
                rel = bestfix["stats"]["vs_adaptive"]
                entry["sweep"] = {
                    "chunksizes": [r["params"]["chunksize"] for r in sw],
                    "items_per_s": [r["items_per_s"] for r in sw],
                    "best_fixed_chunksize": bestfix["params"]["chunksize"],
                    "best_fixed_items_per_s": bestfix["items_per_s"],
                    "adaptive_chunksize": entry.get("adaptive_chunksize"),
                    "adaptive_items_per_s": ad["items_per_s"] if ad else None,
                    "adaptive_over_best_fixed": (1.0 / rel) if rel else None,
                    "paired": paired,
                }
