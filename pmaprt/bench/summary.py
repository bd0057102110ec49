"""The closing summary: in one place, where pmaprt won, lost or could not be told apart.

Built from the workload entries' ``verdicts`` and ``sweep`` (see ``derive``),
so it cannot say what the tables do not; stored as ``summary`` in
results.json and printed last.
"""
from __future__ import annotations

from typing import Any, Dict, List

from . import verdict as V


def fmt_iv(v: Dict[str, Any]) -> str:
    """``1.85x (1.70-1.95)``: the median ratio and its spread."""
    return f"{v['ratio']:.2f}x ({v['lo']:.2f}-{v['hi']:.2f})"


def _size(n) -> str:
    for div, suf in ((1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:g} {suf}"
    return f"{n} B"


def _line(name: str, e: Dict[str, Any]) -> List[str]:
    vs = e.get("verdicts") or []
    if not vs:
        return []
    if any(v.get("bytes") is not None for v in vs):
        parts = []
        for label in dict.fromkeys(v["label"] for v in vs):
            mine = [v for v in vs if v["label"] == label]
            counts = {k: sum(v["verdict"] == k for v in mine) for k in (V.FASTER, V.SLOWER)}
            noisy = sum(v["verdict"] == V.NOISY for v in mine)
            word = (f"faster at {counts[V.FASTER]}, slower at {counts[V.SLOWER]}"
                    + (f", no verdict (noise) at {noisy}" if noisy else "")
                    + f" of {len(mine)} sizes")
            lo, hi = min(mine, key=lambda v: v["ratio"]), max(mine, key=lambda v: v["ratio"])
            parts.append(f"vs {label}: {word} ({lo['ratio']:.1f}x at {_size(lo['bytes'])} to "
                         f"{hi['ratio']:.1f}x at {_size(hi['bytes'])})")
        return [f"{name}: " + "; ".join(parts)]
    base = next((v for v in vs if v["against"] == "builtin_map"), None)
    peers = [v for v in vs if v["against"] != "builtin_map"]
    bits = []
    if base is not None:
        bits.append(f"vs {base['label']}: {base['verdict']} {fmt_iv(base)}")
    best = next((v for v in peers if v["against"] == e.get("best_peer")), None)
    if best is not None:
        bits.append(f"vs the best peer, {best['label']}: {best['verdict']} {fmt_iv(best)}")
    if peers:
        n = {k: sum(v["verdict"] == k for v in peers) for k in (V.FASTER, V.SLOWER, V.SAME,
                                                                V.NOISY)}
        tally = f"faster than {n[V.FASTER]} of {len(peers)} peers, slower than {n[V.SLOWER]}"
        tally += f", not distinguishable from {n[V.SAME]}"
        if n[V.NOISY]:
            tally += f", no verdict (noise) for {n[V.NOISY]}"
        bits.append(tally)
    out = [f"{name}: pmaprt " + "; ".join(bits)]
    if e.get("sweep"):
        out.append(f"{name} chunk sizes: {e['sweep']['text']}")
    if e.get("noise_note"):
        out.append(f"{name}: {e['noise_note']}")
    return out


def closing_summary(entries: Dict[str, Dict[str, Any]], noise: Dict[str, Any]) -> List[str]:
    """One line or a few per workload that has verdicts, the noise first.
    A ratio is pmaprt's speed over the other's (>1: pmaprt faster), median
    and (min-max) over the pairs."""
    lines = []
    checks = noise.get("checks") or []
    meds = ", ".join(f"{c['when']} {c['median']:.2f}x" for c in checks
                     if c.get("median") is not None)
    if noise.get("trusted"):
        lines.append("noise check: pure CPU work ran at " + (meds or "-")
                     + " on the workers (median speed-up): the machine gave its cores")
    else:
        lines.append("noise check FAILED: " + (noise.get("note") or ""))
    for name, e in entries.items():
        if e.get("status") == "ok":
            lines += _line(name, e)
    return lines
