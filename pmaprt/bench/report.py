"""The plain-text, fixed-width report printed at the end of a run."""
from __future__ import annotations

from typing import Any, Dict, List, Optional


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


def render(doc: Dict[str, Any]) -> str:
    m = doc.get("machine", {})
    cfg = doc.get("config", {})
    out: List[str] = []
    gpu = ", ".join(g.get("name", "?") for g in m.get("gpus") or []) or "none"
    out.append("pmaprt benchmark  ({} suite, median of {} runs, W={} workers, size scale {:g})".format(
        cfg.get("mode"), cfg.get("repeat"), cfg.get("workers"), cfg.get("size_scale", 1.0)))
    out.append("machine: {} cores ({} physical), {} RAM, CPU {}, GPU {}".format(
        m.get("cores_logical"), m.get("cores_physical"), fmt_bytes(m.get("memory_bytes")),
        m.get("cpu_model"), gpu))
    v = m.get("versions", {})
    out.append("versions: " + ", ".join(f"{k} {v[k]}" for k in v if v[k]))
    out.append("ratios: 'vs map' and 'vs best' are speedups (reference time / this time; >1 is "
               "faster); best = fastest parallel peer; eff = serial/(W*t); /ideal = t / "
               "max(serial/W, longest item)" + (
                   "; vs map, eff and /ideal: medians of per-run ratios, each run paired with "
                   "a builtin map run just before it" if cfg.get("pair") else ""))
    results = doc.get("results", [])
    for name, e in doc.get("workloads", {}).items():
        out.append("")
        head = f"== {name}: {e.get('description', '')}"
        out.append(head)
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
                rows.append([r["label"], fmt_f(r["latency_us"], 1), fmt_x(r["speedup_vs_best_peer"]),
                             str(r["runs"] or "-"), r["status"] if r["status"] != "ok" else "",
                             r["note"] or ""])
            out += _table(["runner", "latency us", "vs best", "runs", "status", "note"], rows, "lrrrll")
            continue
        if name == "allreduce":
            rows = [[r["label"], str(r["params"].get("workers")), fmt_bytes(r["params"].get("bytes")),
                     fmt_time(r["median_s"]), fmt_f(r["busbw_gbps"], 3),
                     r["status"] if r["status"] != "ok" else "", r["note"] or ""] for r in recs]
            out += _table(["runner", "W", "size", "median", "busbw GB/s", "status", "note"], rows,
                          "lrlrrll")
            continue
        extra = []
        if e.get("serial_s") is not None:
            extra.append(f"serial {fmt_time(e['serial_s'])}")
        if e.get("longest_item_s") is not None:
            extra.append(f"longest item {fmt_time(e['longest_item_s'])}")
        if e.get("ideal_s") is not None:
            extra.append(f"ideal {fmt_time(e['ideal_s'])}")
        if e.get("adaptive_chunksize") is not None:
            extra.append(f"pmaprt adaptive chunksize (median) {e['adaptive_chunksize']}")
        if extra:
            out.append("  " + ", ".join(extra))
        has_ideal = e.get("ideal_s") is not None
        has_gbs = any("gb_per_s" in (r["params"] or {}) for r in recs)
        has_mc = any("vs_memcpy" in (r["params"] or {}) for r in recs)
        has_mem = any("peak_pss_bytes" in (r["params"] or {}) for r in recs)
        headers = ["runner", "median", "items/s", "vs map", "vs best", "eff"]
        align = "lrrrrr"
        if has_ideal:
            headers.append("/ideal")
            align += "r"
        extra_cols = ([("GB/s", "gb_per_s", lambda v: fmt_f(v, 2))] if has_gbs else []) + \
            ([("vs memcpy", "vs_memcpy", fmt_x)] if has_mc else []) + \
            ([("peak PSS", "peak_pss_bytes", fmt_bytes), ("peak USS", "peak_uss_bytes", fmt_bytes)]
             if has_mem else [])
        headers += [c[0] for c in extra_cols]
        align += "r" * len(extra_cols)
        headers += ["runs", "note"]
        align += "rl"
        rows = []
        for r in recs:
            if r["status"] != "ok":
                row = [r["label"], "-", "-", "-", "-", "-"] + (["-"] if has_ideal else [])
                row += ["-"] * len(extra_cols)
                rows.append(row + ["-", f"{r['status']}: {r['note']}"])
                continue
            row = [r["label"], fmt_time(r["median_s"]), fmt_rate(r["items_per_s"]),
                   fmt_x(r["speedup_vs_map"]), fmt_x(r["speedup_vs_best_peer"]),
                   fmt_f(r["efficiency"])]
            if has_ideal:
                row.append(fmt_f(r["makespan_over_ideal"]))
            p = r["params"] or {}
            row += [fmt(p.get(key)) if p.get(key) is not None else "-" for _, key, fmt in extra_cols]
            row += [str(r["runs"]), r["note"] or ""]
            rows.append(row)
        out += _table(headers, rows, align)
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
        sw = [r for r in results if r["workload"] == name and r["kind"] == "sweep"]
        if sw:
            ad = e.get("adaptive_chunksize")
            swe = e.get("sweep") or {}
            out.append(f"  chunk-size sweep (pmaprt, fixed chunksize; adaptive median = {ad if ad is not None else '-'})"
                       + ("; vs adaptive: median of per-run ratios, each fixed run right after an "
                          "adaptive run" if swe.get("paired") else "") + ":")
            srows = []
            ad_rec = next((r for r in recs if r["kind"] == "pmaprt" and r["status"] == "ok"), None)
            for r in sw:
                rel = (r.get("stats") or {}).get("vs_adaptive")
                if rel is None and ad_rec and r["median_s"]:
                    rel = ad_rec["median_s"] / r["median_s"]
                srows.append([f"{r['params']['chunksize']:,}", fmt_time(r["median_s"]),
                              fmt_rate(r["items_per_s"]), fmt_x(rel), str(r["runs"] or "-"),
                              (f"{r['status']}: " if r["status"] != "ok" else "") + (r["note"] or "")])
            if ad_rec:
                srows.append([f"adaptive ({ad})", fmt_time(ad_rec["median_s"]),
                              fmt_rate(ad_rec["items_per_s"]), "1.00x", str(ad_rec["runs"]), ""])
            out += _table(["chunksize", "median", "items/s", "vs adaptive", "runs", "note"], srows,
                          "lrrrrl")
            x = swe.get("adaptive_over_best_fixed")
            if x:
                out.append("  best fixed chunksize {:,}: adaptive takes {:.2f}x its time".format(
                    swe.get("best_fixed_chunksize"), 1.0 / x))
    out.append("")
    files = doc.get("files", {})
    if files.get("plots"):
        out.append("plots: " + ", ".join(files["plots"]))
    out.append(f"total {fmt_time(doc.get('duration_s'))}")
    return "\n".join(out) + "\n"
