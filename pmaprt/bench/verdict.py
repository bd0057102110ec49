"""The judgements the harness prints, as pure functions of measured numbers.

- ``interval`` / ``cross_interval``: a ratio with its spread (median, min,
  max) from per-run pairs;
- ``verdict``: faster, slower, or not distinguishable at this noise, from
  that spread;
- ``ideal_bound``: the lower bound that "/ideal" divides by;
- ``noise_trusted``: whether the noise check found the machine giving its
  cores, and if not, the margin a winner must clear (``noise_margin``);
- ``sweep_summary``: the chunk-size sweep's ranking and best point.

Kept free of I/O so each rule is tested on constructed data
(tests/test_bench_verdicts.py).
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence

FASTER = "faster"
SLOWER = "slower"
SAME = "not distinguishable"
#: printed instead of a winner whose every pair wins, but by less than the
#: machine's noise (a failed noise check, or an unsteady workload)
NOISY = "no verdict: within the noise"

# The noise check's bar, on the parallel speed-up of pure CPU work on W
# cores. Its median must reach TRUST_MEDIAN * W and every pair TRUST_MIN * W.
# Two busy processes beside a 2-core run read about 1.5x (0.75 W): flagged.
# A higher bar flags a quiet shared VM (its pairs dip to 1.6x); a lower one
# lets a loaded run declare winners that a quiet run reverses.
TRUST_MEDIAN = 0.85
TRUST_MIN = 0.70

# A workload whose builtin-map runs (the baseline's and every pair's) differ
# by more than this factor ran on an unsteady machine: its winners must clear
# that spread even when the checks at the start and end passed. Quiet runs
# of the quick suite stay well under it; a busy neighbour starting or
# stopping mid-workload goes over.
SERIAL_SPREAD_MAX = 1.5


def interval(ratios: Sequence[float]) -> Optional[Dict[str, float]]:
    """Median, min and max of per-pair ratios (None without any)."""
    rs = [float(r) for r in ratios if r is not None and r > 0]
    if not rs:
        return None
    return {"ratio": statistics.median(rs), "lo": min(rs), "hi": max(rs), "pairs": len(rs)}


def cross_interval(a: Sequence[float], b: Sequence[float]) -> Optional[Dict[str, float]]:
    """A's speed over B's from two sets of per-run speeds (each run's speed-up
    over the builtin map run just before it, or 1/time): the ratio of the
    medians, between min(a)/max(b) and max(a)/min(b), the extremes over every
    pairing of one run of A with one of B."""
    a = [float(x) for x in a if x and x > 0]
    b = [float(x) for x in b if x and x > 0]
    if not a or not b:
        return None
    return {"ratio": statistics.median(a) / statistics.median(b), "lo": min(a) / max(b),
            "hi": max(a) / min(b), "pairs": min(len(a), len(b))}


def verdict(iv: Optional[Dict[str, float]], margin: float = 1.0) -> Optional[str]:
    """``faster`` when every pair reads above ``margin``, ``slower`` when
    every pair reads below 1/margin, NOISY when every pair agrees on a winner
    but not by the margin, else ``not distinguishable``. margin is 1 on a
    machine that passed the noise check; else how far short of its cores it
    fell (``noise_margin``): a run given S of W cores' worth can slow one side
    of a pair by W/S, so only a win by more than that holds from run to run."""
    if iv is None:
        return None
    m = max(1.0, float(margin))
    if iv["lo"] > m:
        return FASTER
    if iv["hi"] < 1.0 / m:
        return SLOWER
    if iv["lo"] > 1.0 or iv["hi"] < 1.0:
        return NOISY
    return SAME


def noise_margin(checks: List[Dict[str, Any]], workers: int) -> float:
    """W / the lowest speed-up any noise check read (at least 1): how much
    the machine could have slowed one side of a pair."""
    sp = [x for c in checks for x in (c.get("speedups") or []) if x and x > 0]
    if workers < 2 or not sp:
        return 1.0
    return max(1.0, workers / min(sp))


def ideal_bound(serial_runs: Sequence[float], longest_item_s: Optional[float],
                workers: int) -> Optional[float]:
    """A lower bound on any schedule's time for the items on W workers:
    max(fastest serial run / W, the dearest item alone, at its fastest). Each
    item must run somewhere, and the work cannot shrink below what one
    process took at its fastest. t / bound below 1 is a measurement error
    (the serial runs or the item were all slowed, or the parallel run was
    given more than W cores' worth of work per second)."""
    runs = [s for s in serial_runs if s and s > 0]
    if not runs:
        return None
    bound = min(runs) / max(1, workers)
    if longest_item_s:
        bound = max(bound, longest_item_s)
    return bound


def noise_trusted(checks: List[Dict[str, Any]], workers: int) -> Dict[str, Any]:
    """Whether the machine gave its cores: every noise check's median
    parallel speed-up is at least TRUST_MEDIAN * W and none of its pairs is
    below TRUST_MIN * W. Returns ``{"trusted", "margin", "note"}``: margin 1
    when trusted, else ``noise_margin``, the factor a winner must clear."""
    if workers < 2:
        return {"trusted": True, "margin": 1.0,
                "note": "one worker: no parallel speed-up to check"}
    bad = []
    for c in checks:
        sp = c.get("speedups") or []
        if not sp:
            bad.append(f"{c.get('when')}: not measured")
            continue
        med, lo = statistics.median(sp), min(sp)
        if med < TRUST_MEDIAN * workers or lo < TRUST_MIN * workers:
            bad.append(f"{c.get('when')}: {med:.2f}x median, {lo:.2f}x lowest")
    if bad:
        m = noise_margin(checks, workers)
        return {"trusted": False, "margin": m,
                "note": (f"pure CPU work ran below {TRUST_MEDIAN * workers:.2f}x (median) or "
                         f"{TRUST_MIN * workers:.2f}x (any pair) on {workers} cores ("
                         + "; ".join(bad) + f"): the machine was not giving {workers} cores' "
                         f"worth; a winner must win every pair by more than {m:.2f}x")}
    return {"trusted": True, "margin": 1.0, "note": None}


def serial_spread(serial_runs: Sequence[float]) -> Optional[float]:
    """max / min of a workload's builtin map runs (None with fewer than 2)."""
    runs = [s for s in serial_runs if s and s > 0]
    return max(runs) / min(runs) if len(runs) >= 2 else None


def sweep_summary(points: List[Dict[str, Any]], margin: float = 1.0) -> Optional[Dict[str, Any]]:
    """The chunk-size sweep judged on one figure per point: ``vs_adaptive``,
    adaptive's time over the fixed size's (> 1: the fixed size was faster),
    from each fixed run's pair with the adaptive run just before it (or the
    medians' ratio for an unpaired point). The table lists that figure, the
    plot draws it, and the best point is its maximum.

    points: ``{"chunksize", "pairs": [(adaptive_s, fixed_s), ...]}`` or
    ``{"chunksize", "adaptive_s", "fixed_s"}`` (medians, unpaired).
    Returns ``{"points": [{chunksize, vs_adaptive, lo, hi, pairs}], "best",
    "verdict", "text"}``; None without a point."""
    rows = []
    for p in points:
        pairs = p.get("pairs")
        if pairs:
            iv = interval([a / f for a, f in pairs if f > 0])
        elif p.get("adaptive_s") and p.get("fixed_s"):
            r = p["adaptive_s"] / p["fixed_s"]
            iv = {"ratio": r, "lo": r, "hi": r, "pairs": 0}
        else:
            iv = None
        if iv is None:
            continue
        rows.append({"chunksize": int(p["chunksize"]), "vs_adaptive": iv["ratio"],
                     "lo": iv["lo"], "hi": iv["hi"], "pairs": iv["pairs"]})
    if not rows:
        return None
    # ties go to the larger chunk size (less scheduling traffic)
    best = max(rows, key=lambda r: (r["vs_adaptive"], r["chunksize"]))
    v = verdict(best, margin) if best["pairs"] else SAME
    cs = f"{best['chunksize']:,}"
    spread = (f"{best['lo']:.2f}-{best['hi']:.2f}x over {best['pairs']} pairs"
              if best["pairs"] else "unpaired medians")
    if v == FASTER:
        text = (f"best fixed chunk size {cs} ran {best['vs_adaptive']:.2f}x adaptive's speed "
                f"({spread}): faster than adaptive")
    elif v == SLOWER:
        text = (f"adaptive beat every fixed chunk size; the best, {cs}, ran "
                f"{best['vs_adaptive']:.2f}x its speed ({spread})")
    elif v == NOISY:
        text = (f"best fixed chunk size {cs} read {best['vs_adaptive']:.2f}x adaptive's speed "
                f"({spread}); {NOISY}")
    else:
        text = (f"best fixed chunk size {cs} ran {best['vs_adaptive']:.2f}x adaptive's speed "
                f"({spread}): not distinguishable from adaptive")
    return {"points": rows, "best": best["chunksize"], "best_vs_adaptive": best["vs_adaptive"],
            "best_lo": best["lo"], "best_hi": best["hi"], "verdict": v, "text": text}
