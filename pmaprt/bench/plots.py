"""PNG plots of a results document (matplotlib, Agg backend).

* ``chunksize_<workload>.png``: each fixed chunk size's speed relative to
  pmaprt's adaptive chunking (the sweep table's "vs adaptive", median and
  min-max over the pairs), the best size ringed, adaptive drawn at its
  median chunk size (or as a line when it ran in the caller, with no chunks);
* ``timeline_<workload>.png``: what each worker did during the last adaptive
  pmaprt run (running a chunk or idle), from ``MapStats``' chunk logs;
* ``allreduce_busbw.png``: all-reduce bus bandwidth against message size,
  both axes logarithmic (memcpy and the naive peer differ by decades).

Each ``*_figure`` function returns the matplotlib figure (None without data),
so that a test can read its axes back; ``write_all`` saves and closes them.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from .._stats import describe_mode

#: an axis whose values span this factor or more is drawn logarithmic
LOG_SPAN = 10.0


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def scale_for(values) -> str:
    """"log" where positive values span LOG_SPAN or more, else "linear"."""
    vs = [v for v in values if v is not None and v > 0]
    return "log" if vs and max(vs) / min(vs) >= LOG_SPAN else "linear"


def chunksize_figure(doc: Dict[str, Any], name: str):
    e = doc["workloads"].get(name, {})
    sw = e.get("sweep") or {}
    pts = sw.get("points") or []
    if not pts:
        return None
    plt = _plt()
    xs = [p["chunksize"] for p in pts]
    ys = [p["vs_adaptive"] for p in pts]
    lo = [p["vs_adaptive"] - p["lo"] for p in pts]
    hi = [p["hi"] - p["vs_adaptive"] for p in pts]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color="tab:blue", capsize=3,
                label="fixed chunk size: median, bar = min-max over the pairs")
    best = next((p for p in pts if p["chunksize"] == sw.get("best")), None)
    if best is not None:
        ax.plot([best["chunksize"]], [best["vs_adaptive"]], marker="o", markersize=14,
                markerfacecolor="none", markeredgecolor="tab:green", linestyle="none",
                label=f"best fixed size ({best['chunksize']:,}): {sw.get('verdict')}")
    ac = sw.get("adaptive_chunksize")
    ax.axhline(1.0, color="tab:red", linestyle=":", linewidth=1,
               label="adaptive's speed (1 by definition)")
    if ac:
        ax.plot([ac], [1.0], marker="*", markersize=16, color="tab:red", linestyle="none",
                label=f"adaptive: its median chunk size ({ac:,})")
    elif "inline" in (sw.get("adaptive_mode") or ""):
        ax.plot([], [], linestyle="none", label="adaptive ran in the calling process: no chunks")
    ax.set_xscale("log")
    ax.set_yscale(scale_for([p["lo"] for p in pts] + [p["hi"] for p in pts] + [1.0]))
    ax.set_xlabel("fixed chunk size (items per chunk)")
    ax.set_ylabel("speed relative to adaptive (>1: faster)")
    ax.set_title(f"{name}: how fast each fixed chunk size ran, relative to pmaprt's adaptive "
                 f"chunking\n({doc['config'].get('workers')} workers; higher is better)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def timeline_figure(doc: Dict[str, Any], name: str):
    tl = doc["workloads"].get(name, {}).get("timeline")
    if not tl or not any(tl.get("workers") or []):
        return None
    plt = _plt()
    from matplotlib.patches import Patch

    rows: List[List[List[float]]] = tl["workers"]
    nw = len(rows)
    fig, ax = plt.subplots(figsize=(9, 1.8 + 0.55 * nw), dpi=100)
    end = tl.get("wall_s") or 0.0
    for row in rows:
        if row:
            end = max(end, max(e[1] for e in row))
    end = end or 1e-9
    for i, row in enumerate(rows):
        ax.broken_barh([(0, end)], (i - 0.4, 0.8), facecolors="#eeeeee")
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
    ax.set_xlabel("time since the map started (s)")
    ax.legend(handles=[Patch(color="tab:blue", label="running a chunk"),
                       Patch(color="#eeeeee", label="idle (or the map had ended)")],
              fontsize=8, loc="lower right")
    trunc = " (chunk log cut short)" if tl.get("truncated") else ""
    ax.set_title(f"{name}: what each worker did during pmaprt's last adaptive run{trunc}\n"
                 f"the map ran {describe_mode(tl.get('mode'))}", fontsize=9)
    fig.tight_layout()
    return fig


def allreduce_figure(doc: Dict[str, Any]):
    recs = [r for r in doc["results"]
            if r["workload"] == "allreduce" and r["status"] == "ok" and r["busbw_gbps"]]
    if not recs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    for label, wk in dict.fromkeys((r["label"], r["params"].get("workers")) for r in recs):
        mine = [r for r in recs if r["label"] == label and r["params"].get("workers") == wk]
        ax.plot([r["params"]["bytes"] for r in mine], [r["busbw_gbps"] for r in mine], "o-",
                label=f"{label}, W={wk}")
    ax.set_xscale("log", base=2)
    ax.set_yscale(scale_for(r["busbw_gbps"] for r in recs))
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth, GB/s (memcpy: plain bandwidth)")
    ax.set_title("all-reduce: bus bandwidth by message size and worker count W "
                 "(higher is better)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _save(fig, path: str) -> bool:
    if fig is None:
        return False
    plt = _plt()
    fig.savefig(path, format="png")
    plt.close(fig)
    return True


def write_all(doc: Dict[str, Any], out_dir: str) -> List[str]:
    """Write every plot the document has data for; returns the file names."""
    written: List[str] = []

    def put(fn: str, fig: Optional[Any]):
        if _save(fig, os.path.join(out_dir, fn)):
            written.append(fn)

    for name in doc["workloads"]:
        put(f"chunksize_{name}.png", chunksize_figure(doc, name))
    for name in doc["workloads"]:
        put(f"timeline_{name}.png", timeline_figure(doc, name))
    put("allreduce_busbw.png", allreduce_figure(doc))
    return written
