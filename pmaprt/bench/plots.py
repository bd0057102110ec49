"""PNG plots of a results document (matplotlib, Agg backend).

* ``chunksize_<workload>.png``: pmaprt throughput vs fixed chunk size, with the
  adaptive choice (median of ``MapStats.chunksizes``) marked;
* ``timeline_<workload>.png``: per-worker busy (chunks) / idle (gaps) timeline
  of the last adaptive pmaprt run, from ``MapStats``' chunk logs;
* ``allreduce_busbw.png``: all-reduce bus bandwidth vs message size (only if
  that workload ran).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def chunksize_plot(doc: Dict[str, Any], name: str, path: str) -> bool:
    recs = [r for r in doc["results"]
            if r["workload"] == name and r["kind"] == "sweep" and r["status"] == "ok"]
    if not recs:
        return False
    plt = _plt()
    xs = [r["params"]["chunksize"] for r in recs]
    ys = [r["items_per_s"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.plot(xs, ys, "o-", color="tab:blue", label="pmaprt, fixed chunksize")
    e = doc["workloads"].get(name, {})
    ad = next((r for r in doc["results"] if r["workload"] == name and r["kind"] == "pmaprt"
               and r["status"] == "ok"), None)
    ac = e.get("adaptive_chunksize")
    if ad is not None:
        x = ac if ac else xs[len(xs) // 2]
        ax.plot([x], [ad["items_per_s"]], marker="*", markersize=16, color="tab:red",
                linestyle="none", label=f"pmaprt adaptive (median chunksize {ac})")
        if ac:
            ax.axvline(ac, color="tab:red", linestyle=":", linewidth=1)
    base = next((r for r in doc["results"] if r["workload"] == name and r["kind"] == "baseline"
                 and r["status"] == "ok"), None)
    if base is not None and base["items_per_s"]:
        ax.axhline(base["items_per_s"], color="gray", linestyle="--", linewidth=1,
                   label="builtin map")
    bp = e.get("best_peer")
    bpr = next((r for r in doc["results"] if r["workload"] == name and r["runner"] == bp
                and r["kind"] == "peer"), None)
    if bpr is not None and bpr.get("items_per_s"):
        ax.axhline(bpr["items_per_s"], color="tab:green", linestyle="-.", linewidth=1,
                   label=f"best peer ({bpr['label']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("chunk size (items)")
    ax.set_ylabel("throughput (items/s)")
    W = doc["config"].get("workers")
    ax.set_title(f"{name}: throughput vs chunk size (W={W})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def timeline_plot(doc: Dict[str, Any], name: str, path: str) -> bool:
    tl = doc["workloads"].get(name, {}).get("timeline")
    if not tl or not any(tl.get("workers") or []):
        return False
    plt = _plt()
    rows: List[List[List[float]]] = tl["workers"]
    nw = len(rows)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * nw), dpi=100)
    end = tl.get("wall_s") or 0.0
    for i, row in enumerate(rows):
        if row:
            end = max(end, max(e[1] for e in row))
    end = end or 1e-9
    for i, row in enumerate(rows):
        ax.broken_barh([(0, end)], (i - 0.4, 0.8), facecolors="#eeeeee")  # idle
        spans = [(e[0], max(e[1] - e[0], end * 1e-4)) for e in row]
        if spans:
            ax.broken_barh(spans, (i - 0.4, 0.8), facecolors="tab:blue", edgecolors="none")
        busy = sum(e[1] - e[0] for e in row)
        ax.text(end * 1.01, i, f"{100 * busy / end:.0f}% busy, {len(row)} chunks",
                va="center", fontsize=8)
    ax.set_yticks(range(nw))
    ax.set_yticklabels([f"worker {i}" for i in range(nw)])
    ax.set_ylim(-0.6, nw - 0.4)
    ax.set_xlim(0, end * 1.25)
    ax.invert_yaxis()
    ax.set_xlabel("time since map start (s)")
    mode = tl.get("mode")
    trunc = " (log truncated)" if tl.get("truncated") else ""
    ax.set_title(f"{name}: pmaprt per-worker timeline, blue = busy, grey = idle"
                 f"{', mode ' + str(mode) if mode else ''}{trunc}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def allreduce_plot(doc: Dict[str, Any], path: str) -> bool:
    recs = [r for r in doc["results"]
            if r["workload"] == "allreduce" and r["status"] == "ok" and r["busbw_gbps"]]
    if not recs:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    for label, wk in dict.fromkeys((r["label"], r["params"].get("workers")) for r in recs):
        mine = [r for r in recs if r["label"] == label and r["params"].get("workers") == wk]
        ax.plot([r["params"]["bytes"] for r in mine], [r["busbw_gbps"] for r in mine], "o-",
                label=f"{label}, W={wk}")
    ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s; memcpy: bandwidth)")
    ax.set_title("pmaprt.allreduce busbw vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def write_all(doc: Dict[str, Any], out_dir: str) -> List[str]:
    """Write every plot the document has data for; returns the file names."""
    written = []
    for name in doc["workloads"]:
        fn = f"chunksize_{name}.png"
        if chunksize_plot(doc, name, os.path.join(out_dir, fn)):
            written.append(fn)
    for name in doc["workloads"]:
        fn = f"timeline_{name}.png"
        if timeline_plot(doc, name, os.path.join(out_dir, fn)):
            written.append(fn)
    if allreduce_plot(doc, os.path.join(out_dir, "allreduce_busbw.png")):
        written.append("allreduce_busbw.png")
    return written
