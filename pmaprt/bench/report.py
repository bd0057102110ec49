"""The plain-text, fixed-width report printed at the end of a run.

Every figure is printed with its spread (min-max over the runs or pairs);
each workload ends with pmaprt's verdicts, and the report with the closing
summary (``summary``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from . import verdict as V
from .summary import fmt_iv


def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_rate(r: Optional[float]) -> str:
    if r is None:
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if r >= div:
            return f"{r / div:.1f}{suf}"
    return f"{r:.1f}"


def fmt_x(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_f(x: Optional[float], nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for div, suf in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suf}"
    return f"{int(n)} B"


NOTE_WIDTH = 72


def _clip(s: str, width: int = NOTE_WIDTH) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= width else s[: width - 3] + "..."


def _table(headers: List[str], rows: List[List[str]], align: str) -> List[str]:
    rows = [[*r[:-1], _clip(r[-1])] for r in rows]  # the last column is a note
    widths = [len(h) for h in headers]
    for row in rows:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(c.ljust(widths[i]) if align[i] == "l" else c.rjust(widths[i]))
        return "  " + "  ".join(out).rstrip()

    lines = [line(headers), "  " + "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in rows]
    return lines


def _params_line(p: Optional[Dict[str, Any]]) -> str:
    if not p:
        return ""
    parts = []
    for k, v in p.items():
        if isinstance(v, float):
            v = f"{v:g}"
        elif isinstance(v, int) and not isinstance(v, bool) and k.endswith("bytes"):
            v = fmt_bytes(v)
        elif isinstance(v, int) and not isinstance(v, bool) and k != "seed":
            v = f"{v:,}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def fmt_range(x: Optional[float], rg, fmt=fmt_x) -> str:
    """``1.78x (1.60-1.90)``; just the figure without a spread."""
    if x is None:
        return "-"
    if not rg:
        return fmt(x)
    lo, hi = rg
    strip = (lambda v: fmt(v)[:-1]) if fmt is fmt_x else fmt
    return f"{fmt(x)} ({strip(lo)}-{strip(hi)})"


def fmt_ideal(x: Optional[float], rg) -> str:
    """/ideal with its spread; a '!' marks a reading below 1 (a measurement error)."""
    if x is None:
        return "-"
    s = fmt_range(x, rg, lambda v: f"{v:.2f}")
    return s + ("!" if rg and rg[0] < 1.0 else "")


LEGEND = [
    "how to read: every figure is the median over the runs, (min-max) beside it. 'vs map' is "
    "the speed-up over builtin map, per run against a map run just before it; 'vs best' is "
    "the speed over the fastest parallel peer's; eff = vs map / W; /ideal = t / max(fastest "
    "serial run / W, dearest item alone), a lower bound on any schedule's time (1 is perfect; "
    "a '!' marks a run below 1: a measurement error).",
    "verdicts: pmaprt's speed over each other runner, median (min-max) over the pairs: "
    "'faster' when every pair reads above 1, 'slower' when every pair reads below 1, else "
    "'not distinguishable' at this run's noise; on a noisy machine a winner must clear the "
    "noise margin in every pair, else 'no verdict: within the noise'.",
]


def _header(doc, out):
    m = doc.get("machine", {})
    cfg = doc.get("config", {})
    gpu = ", ".join(g.get("name", "?") for g in m.get("gpus") or []) or "none"
    out.append("pmaprt benchmark  ({} suite, {} runs each, W={} workers, size scale {:g})".format(
        cfg.get("mode"), cfg.get("repeat"), cfg.get("workers"), cfg.get("size_scale", 1.0)))
    out.append("machine: {} cores ({} physical), {} RAM, CPU {}, GPU {}".format(
        m.get("cores_logical"), m.get("cores_physical"), fmt_bytes(m.get("memory_bytes")),
        m.get("cpu_model"), gpu))
    v = m.get("versions", {})
    out.append("versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]))
    noise = doc.get("noise") or {}
    for c in noise.get("checks") or []:
        if c.get("median") is None:
            out.append(f"noise check ({c.get('when')}): {c.get('note')}")
            continue
        out.append("noise check ({}): {} copies of pure CPU work on {} processes ran {:.2f}x "
                   "({:.2f}-{:.2f}) as fast as one (ideal {})".format(
                       c["when"], c["workers"], c["workers"], c["median"], c["min"], c["max"],
                       c["workers"]))
    if noise and not noise.get("trusted", True):
        out.append("NOISY MACHINE: " + (noise.get("note") or ""))
    out += LEGEND


def _verdict_lines(e) -> List[str]:
    vs = e.get("verdicts") or []
    if not vs:
        return []
    out = ["  verdicts (pmaprt's speed over each, median (min-max) over the pairs):"]
    width = max(len(v["label"]) for v in vs)
    for v in vs:
        what = v["label"] + (f" at {fmt_bytes(v['bytes'])}" if v.get("bytes") is not None else "")
        say = v["verdict"]
        if say == V.NOISY:
            say += f" (every pair, but not by {v['margin']:.2f}x)"
        out.append(f"    vs {what.ljust(width + (11 if v.get('bytes') is not None else 0))}  "
                   f"{fmt_iv(v):>22}  {say}")
    if e.get("noise_note"):
        out.append("  " + e["noise_note"])
    return out


# The all-reduce's goals (issue 22, at W = 2): a 4 KiB call within 10 us, and
# at least half the bound's speed from 1 MiB.
GOAL_SMALL_BYTES, GOAL_SMALL_S = 4 << 10, 10e-6
GOAL_FROM_BYTES, GOAL_VS_BOUND = 1 << 20, 0.5


def allreduce_goal_lines(recs) -> List[str]:
    """Per worker count and input kind (private, shared): the 4 KiB time and
    the % of the bound per size (min-max over the pairs), against the goals."""
    out = []
    by_w: Dict[Any, Dict[str, List[Dict[str, Any]]]] = {}
    for r in recs:
        if r["runner"] in ("pmaprt", "pmaprt_shared_input") and r["status"] == "ok":
            by_w.setdefault(r["params"].get("workers"), {}).setdefault(r["runner"], []).append(r)
    for wk in sorted(by_w, key=lambda w: w or 0):
        for rid, what in (("pmaprt", "private input"), ("pmaprt_shared_input", "shared input")):
            rs = sorted(by_w[wk].get(rid, []), key=lambda r: r["params"]["bytes"])
            if not rs:
                continue
            parts = []
            head = f"W={wk} {what}:"
            for r in rs:
                n, p = r["params"]["bytes"], r["params"]
                if n == GOAL_SMALL_BYTES and r["median_s"]:
                    ok = "ok" if r["median_s"] <= GOAL_SMALL_S else "over"
                    head += (f" 4 KiB in {r['median_s'] * 1e6:.1f} us (goal <= "
                             f"{GOAL_SMALL_S * 1e6:.0f} us: {ok});")
                if p.get("vs_bound") is None:
                    continue
                lo, hi = p["vs_bound_range"]
                mark = "" if n < GOAL_FROM_BYTES else (
                    " ok" if p["vs_bound"] >= GOAL_VS_BOUND else " LOW")
                parts.append(f"{fmt_bytes(n)} {100 * p['vs_bound']:.0f}% "
                             f"({100 * lo:.0f}-{100 * hi:.0f}){mark}")
            out.append(f"{head} % of bound (goal >= {100 * GOAL_VS_BOUND:.0f}% from "
                       f"{fmt_bytes(GOAL_FROM_BYTES)}): " + ", ".join(parts))
    return out


def _map_table(e, recs, cfg) -> List[str]:
    out = []
    has_ideal = e.get("ideal_s") is not None
    has_gbs = any("gb_per_s" in (r["params"] or {}) for r in recs)
    has_mc = any("vs_memcpy" in (r["params"] or {}) for r in recs)
    has_mem = any("peak_pss_bytes" in (r["params"] or {}) for r in recs)
    headers = ["runner", "median", "min-max", "items/s", "vs map", "vs best", "eff"]
    align = "lrrrrrr"
    if has_ideal:
        headers.append("/ideal")
        align += "r"
    extra_cols = ([("GB/s", "gb_per_s", lambda v: fmt_f(v, 2))] if has_gbs else []) + \
        ([("vs memcpy", "vs_memcpy", fmt_x)] if has_mc else []) + \
        ([("peak PSS", "peak_pss_bytes", fmt_bytes), ("peak USS", "peak_uss_bytes", fmt_bytes)]
         if has_mem else [])
    headers += [c[0] for c in extra_cols] + ["runs", "note"]
    align += "r" * len(extra_cols) + "rl"
    rows = []
    for r in recs:
        if r["status"] != "ok":
            rows.append([r["label"]] + ["-"] * (len(headers) - 2) + [f"{r['status']}: {r['note']}"])
            continue
        rg = r.get("ranges") or {}
        row = [r["label"], fmt_time(r["median_s"]),
               f"{fmt_time(r['min_s'])}-{fmt_time(r.get('max_s'))}", fmt_rate(r["items_per_s"]),
               fmt_range(r["speedup_vs_map"], rg.get("speedup_vs_map")),
               fmt_range(r["speedup_vs_best_peer"], rg.get("speedup_vs_best_peer")),
               fmt_f(r["efficiency"])]
        if has_ideal:
            row.append(fmt_ideal(r["makespan_over_ideal"], rg.get("makespan_over_ideal")))
        p = r["params"] or {}
        row += [fmt(p.get(key)) if p.get(key) is not None else "-" for _, key, fmt in extra_cols]
        row += [str(r["runs"]), r["note"] or ""]
        rows.append(row)
    out += _table(headers, rows, align)
    if has_ideal and any((r.get("ranges") or {}).get("makespan_over_ideal", [2])[0] < 1.0
                         for r in recs if r["status"] == "ok"):
        out.append("  /ideal '!': a run read below the lower bound: a measurement error (the "
                   "serial runs or the dearest item were slowed, or the run got more than W "
                   "cores' worth)")
    for r in recs:
        st = r.get("stats") or {}
        if r["status"] == "ok" and st.get("busy_fraction") is not None:
            out.append("  {}: eff {}; busy {}, inflation {} (medians; in each run eff = "
                       "busy / inflation): its workers spent {:.0%} of the wall time in "
                       "chunks, reading and running items (the scheduler's share); the "
                       "items took {:.2f}x their serial time when {} ran at once (the "
                       "machine's)".format(
                           r["label"], fmt_f(r["efficiency"]), fmt_f(st["busy_fraction"]),
                           fmt_f(st["work_inflation"]), st["busy_fraction"],
                           st["work_inflation"], cfg.get("workers")))
    if has_mem:
        out.append("  peak PSS / USS: how much the sum over this process and its children "
                   "grew during one extra, untimed run (PSS counts a shared page once; USS "
                   "leaves shared pages out)")
    return out


def _sweep_table(e, recs, sw) -> List[str]:
    swe = e.get("sweep") or {}
    ad = e.get("adaptive_chunksize")
    ad_rec = next((r for r in recs if r["kind"] == "pmaprt" and r["status"] == "ok"), None)
    mode = ((ad_rec or {}).get("stats") or {}).get("mode") or ""
    ad_label = ("adaptive (ran in the caller: no chunks)" if ad is None and "inline" in mode
                else f"adaptive (median chunk {ad if ad is not None else '-'})")
    out = ["  chunk-size sweep: pmaprt at fixed chunk sizes; 'vs adaptive' = adaptive's time / "
           "this size's" + (", per pair: each fixed run right after an adaptive run"
                            if swe.get("paired") else "") + " (>1: the fixed size was faster)"]
    rows = []
    for r in sw:
        rel = (r.get("stats") or {}).get("vs_adaptive")
        rg = (r.get("ranges") or {}).get("vs_adaptive")
        best = r["params"]["chunksize"] == swe.get("best") and r["status"] == "ok"
        rows.append([f"{r['params']['chunksize']:,}", fmt_range(rel, rg),
                     fmt_time(r["median_s"]), str(r["runs"] or "-"),
                     ("<- best" if best else "") + (f"{r['status']}: " if r["status"] != "ok"
                                                    else "") + (r["note"] or "")])
    if ad_rec:
        rows.append([ad_label, "1.00x", fmt_time(ad_rec["median_s"]), str(ad_rec["runs"]), ""])
    out += _table(["chunksize", "vs adaptive", "median", "runs", "note"], rows, "lrrrl")
    if swe.get("text"):
        out.append("  " + swe["text"])
    return out


def render(doc: Dict[str, Any]) -> str:
    cfg = doc.get("config", {})
    out: List[str] = []
    _header(doc, out)
    results = doc.get("results", [])
    for name, e in doc.get("workloads", {}).items():
        out.append("")
        out.append(f"== {name}: {e.get('description', '')}")
        if e.get("status") != "ok":
            out.append(f"  {e.get('status')}: {e.get('note')}")
            continue
        pl = _params_line(e.get("params"))
        if pl:
            out.append("  " + pl)
        recs = [r for r in results if r["workload"] == name and r["kind"] != "sweep"]
        if name == "roundtrip":
            rows = []
            for r in recs:
                ok = r["status"] == "ok"
                rows.append([r["label"], fmt_f(r["latency_us"], 1),
                             f"{fmt_f(r['min_s'] * 1e6, 1)}-{fmt_f(r['max_s'] * 1e6, 1)}"
                             if ok and r.get("max_s") else "-",
                             fmt_range(r["speedup_vs_best_peer"],
                                       (r.get("ranges") or {}).get("speedup_vs_best_peer")),
                             str(r["runs"] or "-"), r["status"] if not ok else "", r["note"] or ""])
            out.append("  samples taken in turn, every runner once per round (the order "
                       "rotating), so each pmaprt sample pairs with one of each peer")
            out += _table(["runner", "latency us", "min-max", "vs best", "runs", "status", "note"],
                          rows, "lrrrrll")
            out += _verdict_lines(e)
            continue
        if name == "allreduce":
            rows = [[r["label"], str(r["params"].get("workers")), fmt_bytes(r["params"].get("bytes")),
                     fmt_time(r["median_s"]),
                     f"{fmt_time(r['min_s'])}-{fmt_time(r.get('max_s'))}" if r["median_s"] else "-",
                     fmt_f(r["busbw_gbps"], 3), r["status"] if r["status"] != "ok" else "",
                     r["note"] or ""] for r in recs]
            out += _table(["runner", "W", "size", "median", "min-max", "busbw GB/s", "status",
                           "note"], rows, "lrlrrrll")
            out += ["  goals, " + line for line in allreduce_goal_lines(recs)]
            out += _verdict_lines(e)
            continue
        extra = []
        if e.get("serial_s") is not None:
            extra.append(f"serial {fmt_time(e['serial_s'])}")
        if e.get("serial_spread") is not None:
            extra.append(f"serial runs spread {e['serial_spread']:.2f}x (max/min)")
        if e.get("longest_item_s") is not None:
            extra.append(f"dearest item {fmt_time(e['longest_item_s'])}")
        if e.get("ideal_s") is not None:
            extra.append(f"lower bound {fmt_time(e['ideal_s'])}")
        if e.get("adaptive_chunksize") is not None:
            extra.append(f"pmaprt adaptive chunksize (median) {e['adaptive_chunksize']}")
        if extra:
            out.append("  " + ", ".join(extra))
        out += _map_table(e, recs, cfg)
        out += _verdict_lines(e)
        sw = [r for r in results if r["workload"] == name and r["kind"] == "sweep"]
        if sw:
            out += _sweep_table(e, recs, sw)
    if doc.get("summary"):
        out.append("")
        out.append("== summary: pmaprt's speed over each, median (min-max) over the pairs")
        out += ["  " + line for line in doc["summary"]]
    out.append("")
    files = doc.get("files", {})
    if files.get("plots"):
        out.append("plots: " + ", ".join(files["plots"]))
    out.append(f"total {fmt_time(doc.get('duration_s'))}")
    return "\n".join(out) + "\n"
