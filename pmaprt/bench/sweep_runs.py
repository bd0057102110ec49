"""The chunk-size sweep: pmaprt at fixed chunk sizes beside its adaptive choice.

Each fixed size is timed right after an adaptive run (paired), so that its
``vs_adaptive`` compares runs a moment apart; ``derive`` picks the best
fixed size from those per-pair ratios.
"""
from __future__ import annotations

from typing import List

from . import workloads as W
from .records import adaptive_chunksize, fill_times, new_record, same_results
from .runners import Pmaprt
from .session import Session


def run_sweep(session: Session, r: Pmaprt, w: W.Workload, points: List[int], prog):
    """One sweep record per fixed chunk size in points, on r's warm pool."""
    for cs in points:
        rec = new_record(w.name, r, kind="sweep", params={"workers": r.workers, "chunksize": cs},
                         items=w.n)
        first = None
        try:
            skip = session.probe(lambda a: r.map(w.fn, a, chunksize=cs), w)
            if skip:
                rec["status"], rec["note"] = "skipped", skip
                session.results.append(rec)
                prog.step(f"sweep {w.name} cs={cs}")
                continue
            # Paired: each fixed run right after an adaptive one, so that
            # "vs adaptive" compares runs a moment apart (Session.timed).
            pair, paired = None, []
            if session.cfg.pair:
                pair = lambda: r.map(w.fn, w.args)  # noqa: E731
            times, first, note = session.timed(lambda: r.map(w.fn, w.args, chunksize=cs),
                                               pair, paired)
            fill_times(rec, times, w.n)
            rec["note"] = note
            if not same_results(first, session.expected.get(w.name)):
                rec["status"], rec["note"] = "error", "wrong results"
            st = r.last_stats
            if st is not None:
                rec["stats"] = {"mode": getattr(st, "mode", None),
                                "chunksize_median": adaptive_chunksize(st)}
                if paired:
                    rec["stats"]["paired_adaptive_s"] = [float(t) for t in paired]
        except Exception as e:
            rec["status"], rec["note"] = "error", f"{type(e).__name__}: {e}"
        del first
        session.results.append(rec)
        prog.step(f"sweep {w.name} cs={cs}")
