"""The suite's configuration: what to run, at what size, how many times."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from . import workloads as W
from .runners import RUNNER_IDS


@dataclass
class Config:
    full: bool = False
    # None: 5. Verdicts need pairs: with 3 runs a side, two runners of equal
    # speed read "faster" (no overlap) 1 time in 20; with 5, 1 in 252.
    repeat: Optional[int] = None
    size_scale: float = 1.0
    workers: Optional[int] = None  # None: os.cpu_count()
    workloads: Optional[List[str]] = None  # None: all
    out_dir: str = os.path.join("bench", "results")
    progress: bool = True
    max_runner_s: Optional[float] = None  # None: 3 s quick, 60 s full
    sweep: bool = True
    # each timed run of a parallel runner comes right after a run of builtin
    # map over the same input; vs map, eff and /ideal are then medians of the
    # per-pair ratios (see Session.timed)
    pair: bool = True
    plots: bool = True
    runners: Optional[List[str]] = None  # None: all (builtin map always runs)
    argv: List[str] = field(default_factory=list)

    def resolve(self) -> "Config":
        if self.repeat is None:
            self.repeat = 5
        self.repeat = max(1, int(self.repeat))
        if self.workers is None:
            self.workers = os.cpu_count() or 1
        self.workers = max(1, int(self.workers))
        if self.max_runner_s is None:
            self.max_runner_s = 60.0 if self.full else 3.0
        if not self.size_scale or self.size_scale <= 0:
            raise ValueError("size_scale must be > 0")
        names = self.workloads or list(W.ALL)
        seen = []
        for n in names:
            c = W.canonical(n)
            if c not in seen:
                seen.append(c)
        self.workloads = [n for n in W.ALL if n in seen]
        if self.runners is not None:
            for r in self.runners:
                if r not in RUNNER_IDS:
                    raise ValueError(f"unknown runner {r!r}; choose from {', '.join(RUNNER_IDS)}")
        return self

    def as_dict(self) -> Dict[str, Any]:
        return {
            "mode": "full" if self.full else "quick",
            "repeat": self.repeat,
            "size_scale": self.size_scale,
            "workers": self.workers,
            "workloads": list(self.workloads or []),
            "max_runner_s": self.max_runner_s,
            "sweep": self.sweep,
            "pair": self.pair,
            "plots": self.plots,
            "runners": list(self.runners) if self.runners is not None else None,
        }
