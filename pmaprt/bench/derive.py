"""Ratios, spreads and verdicts derived from the timed records, once every runner has run.

Each record gets ``speedup_vs_map``, ``efficiency``, ``makespan_over_ideal``
and ``speedup_vs_best_peer`` with their spread (``ranges``: min and max over
the runs); each workload entry its ``serial_s``, ``serial_spread``,
``ideal_s``, ``best_peer``, ``verdicts`` (pmaprt against builtin map and each
peer) and, for swept workloads, ``sweep``. A paired record (a builtin map
run, or an adaptive run, just before each timed run) is judged by its
per-pair ratios: on a shared machine the speed of a core drifts by up to 2x
over seconds, and a ratio between runs a fraction of a second apart drifts
far less than one between medians taken minutes apart. The rules themselves
are in :mod:`pmaprt.bench.verdict`.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

from . import verdict as V
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


def _paired(r: Dict[str, Any]) -> bool:
    ps = r.get("paired_serial_s")
    return bool(ps) and len(ps) == len(r.get("times_s") or []) and r["metric"] == "wall"


def speeds(r: Dict[str, Any], paired: bool) -> List[float]:
    """One speed per run: the speed-up over the builtin map run just before
    it (paired), else 1 / time (only comparable with another 1 / time)."""
    ts = r.get("times_s") or []
    if paired:
        return [s_ / t for s_, t in zip(r["paired_serial_s"], ts) if t > 0]
    return [1.0 / t for t in ts if t > 0]


def compare(a: Dict[str, Any], b: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """a's speed over b's with its spread: per-sample pairs where both were
    sampled in turn (``params.interleaved``), else every run of one against
    every run of the other (paired speed-ups where both have them)."""
    if (a.get("params") or {}).get("interleaved") and (b.get("params") or {}).get("interleaved"):
        return V.interval([tb / ta for ta, tb in zip(a["times_s"], b["times_s"]) if ta > 0])
    both = _paired(a) and _paired(b)
    return V.cross_interval(speeds(a, both), speeds(b, both))


def _range(xs) -> Optional[List[float]]:
    xs = [x for x in xs if x is not None]
    return [min(xs), max(xs)] if xs else None


def _verdict_row(against: Dict[str, Any], iv, margin: float, **extra) -> Dict[str, Any]:
    row = {"against": against["runner"], "label": against["label"], "ratio": iv["ratio"],
           "lo": iv["lo"], "hi": iv["hi"], "pairs": iv["pairs"], "margin": margin,
           "verdict": V.verdict(iv, margin)}
    row.update(extra)
    return row


def derive(results: List[Dict[str, Any]], entries: Dict[str, Dict[str, Any]], workers: int,
           margin: float = 1.0) -> None:
    """Fill the derived figures of every record and workload entry in place;
    margin: the factor a winner must clear (1, or more after a failed noise
    check: V.noise_trusted); a workload whose serial runs spread more than
    V.SERIAL_SPREAD_MAX raises it to that spread."""
    wk = workers
    by_wl: Dict[str, List[Dict[str, Any]]] = {}
    for rec in results:
        by_wl.setdefault(rec["workload"], []).append(rec)
    for name, recs in by_wl.items():
        entry = entries.get(name)
        ok = [r for r in recs if r["status"] == "ok" and r["median_s"]]
        for r in ok:
            r["max_s"] = max(r["times_s"]) if r.get("times_s") else r["median_s"]
        base = next((r for r in ok if r["kind"] == "baseline"), None)
        serial = base["median_s"] if base else None
        runs = list(base["times_s"]) if base and base["metric"] == "wall" else []
        for r in ok:
            if _paired(r):
                runs += r["paired_serial_s"]
        longest = entry.get("longest_item_s") if entry is not None else None
        ideal = V.ideal_bound(runs, longest, wk) if longest is not None else None
        spread = V.serial_spread(runs)
        wl_margin = margin
        if spread is not None and spread > V.SERIAL_SPREAD_MAX:
            wl_margin = max(margin, spread)
        for r in ok:
            if r["metric"] == "busbw":
                continue
            rg: Dict[str, Any] = {}
            ts = r["times_s"]
            if _paired(r):
                sp = speeds(r, True)
                r["speedup_vs_map"] = statistics.median(sp)
                r["efficiency"] = r["speedup_vs_map"] / wk
                rg["speedup_vs_map"] = _range(sp)
                rg["efficiency"] = _range(x / wk for x in sp)
            elif serial and r["metric"] == "wall":
                r["speedup_vs_map"] = serial / r["median_s"]
                rg["speedup_vs_map"] = _range(serial / t for t in ts if t > 0)
                if r["kind"] != "baseline":
                    r["efficiency"] = serial / (wk * r["median_s"])
                    rg["efficiency"] = _range(serial / (wk * t) for t in ts if t > 0)
            if ideal and r["metric"] == "wall":
                over = [t / ideal for t in ts]
                r["makespan_over_ideal"] = statistics.median(over)
                rg["makespan_over_ideal"] = _range(over)
            r["ranges"] = rg or None
            st = r.get("stats")
            if st and st.get("busy_s_runs") and r["metric"] == "wall":
                ser = r.get("paired_serial_s") or ([serial] * len(ts) if serial else [])
                split = split_efficiency(st["busy_s_runs"], ts, ser, wk)
                if split:
                    st.update(split)
        # the best peer: the fastest by paired speed-ups where every peer has them
        # (else by 1 / time: the two are not comparable with each other)
        peers = [r for r in ok if r["kind"] == "peer" and r["metric"] != "busbw"]
        all_paired = all(_paired(r) for r in peers)
        best = max(peers, key=lambda r: statistics.median(speeds(r, all_paired)),
                   default=None)
        if best is not None:
            for r in ok:
                if r["metric"] == "busbw" or (r["metric"] == "latency" and r["kind"] == "baseline"):
                    continue
                iv = compare(r, best)
                if iv:
                    r["speedup_vs_best_peer"] = iv["ratio"]
                    r["ranges"] = dict(r.get("ranges") or {},
                                       speedup_vs_best_peer=[iv["lo"], iv["hi"]])
        if entry is None:
            continue
        entry["serial_s"] = serial if name != "roundtrip" else None
        entry["serial_spread"] = spread
        entry["ideal_s"] = ideal
        entry["best_peer"] = best["runner"] if best else None
        entry["best_peer_s"] = best["median_s"] if best else None
        entry["noise_note"] = None
        if wl_margin > margin:
            entry["noise_note"] = (f"builtin map's runs in this workload differed by "
                                   f"{spread:.2f}x (> {V.SERIAL_SPREAD_MAX:g}x): the machine was "
                                   f"unsteady here; a winner must win every pair by more "
                                   f"than {wl_margin:.2f}x")
        entry["verdicts"] = workload_verdicts(ok, wl_margin)
        if name in W.SWEPT:
            entry["sweep"] = sweep_entry(ok, entry, wl_margin)


def _is_bound(r: Dict[str, Any]) -> bool:
    """A memcpy record: the hardware's bound, not a peer to beat."""
    return r["runner"].startswith("memcpy") or "memcpy" in (r.get("label") or "")


def workload_verdicts(ok: List[Dict[str, Any]], margin: float = 1.0) -> List[Dict[str, Any]]:
    """pmaprt (its first record: adaptive chunks) against builtin map and each
    peer of the workload; for the all-reduce, per message size."""
    me = next((r for r in ok if r["kind"] == "pmaprt"), None)
    if me is None:
        return []
    out = []
    if me["metric"] == "busbw":
        mine = {r["params"].get("bytes"): r for r in ok if r["kind"] == "pmaprt"}
        for r in ok:
            if r["kind"] == "pmaprt" or _is_bound(r):
                continue  # memcpy is the hardware's bound, not a peer
            m = mine.get(r["params"].get("bytes"))
            iv = compare(m, r) if m is not None else None
            if iv:
                out.append(_verdict_row(r, iv, margin, bytes=r["params"].get("bytes")))
        return out
    for r in ok:
        if r is me or r["kind"] == "sweep" or r["kind"] == "pmaprt":
            continue
        if r["metric"] == "latency" and r["kind"] == "baseline":
            continue  # a plain call in this process: no round trip to compare
        if _is_bound(r) or ((me.get("params") or {}).get("interleaved")
                            != (r.get("params") or {}).get("interleaved")):
            continue
        if _paired(me) and r["kind"] == "baseline":
            iv = V.interval(speeds(me, True))   # against the map run just before each run
        else:
            iv = compare(me, r)
        if iv:
            out.append(_verdict_row(r, iv, margin))
    return out


def sweep_entry(ok: List[Dict[str, Any]], entry: Dict[str, Any], margin: float = 1.0):
    """The sweep object of a workload entry (see verdict.sweep_summary)."""
    sw = [r for r in ok if r["kind"] == "sweep"]
    ad = next((r for r in ok if r["kind"] == "pmaprt"), None)
    if not sw:
        return None
    pts = []
    for r in sw:
        pa = (r.get("stats") or {}).get("paired_adaptive_s")
        p = {"chunksize": r["params"]["chunksize"]}
        if pa and len(pa) == len(r["times_s"]):
            p["pairs"] = list(zip(pa, r["times_s"]))
        else:
            p.update(adaptive_s=ad["median_s"] if ad else None, fixed_s=r["median_s"])
        pts.append(p)
        r["stats"] = r.get("stats") or {}
        r["stats"]["vs_adaptive"] = vs_adaptive(r, ad)
    summ = V.sweep_summary(pts, margin)
    if summ is None:
        return None
    rows = {row["chunksize"]: row for row in summ["points"]}
    for r in sw:
        row = rows.get(r["params"]["chunksize"])
        if row is None:
            continue
        r["stats"]["vs_adaptive"] = row["vs_adaptive"]
        r["ranges"] = dict(r.get("ranges") or {}, vs_adaptive=[row["lo"], row["hi"]])
    ac = entry.get("adaptive_chunksize")
    return dict(summ, paired=all(p.get("pairs") for p in pts), adaptive_chunksize=ac,
                adaptive_mode=((ad or {}).get("stats") or {}).get("mode"),
                adaptive_items_per_s=ad["items_per_s"] if ad else None,
                best_fixed_chunksize=summ["best"],
                adaptive_over_best_fixed=1.0 / summ["best_vs_adaptive"])
