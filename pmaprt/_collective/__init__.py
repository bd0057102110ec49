"""Collectives for SPMD maps: an all-reduce over shared memory.

    pmap(step, shards, axis_name="batch")      (parent: one collective segment per map)
       rank i = shard i = worker i, all ranks at once; inside step:
       psum(g, "batch") / pmean / allreduce(x, op)

Read from the bottom up:
- segment.py: the segment's layout and words, the parent's set-up
  (`SpmdParent`), a rank's attach, and the protocol of waits, rings and aborts;
- reduce.py:  the all-reduce over that segment (every rank reads every
  rank's buffer directly: `direct`, or reduce-scatter + all-gather), fusion
  of small arrays, dtypes and ops;
- api.py:     what a pmapped function calls (allreduce, psum, pmean, pmax,
  pmin, axis_index, axis_size), the axis context, and `spmd_inputs`.

Errors (CollectiveError, CollectiveAbortedError) live in pmaprt._errors.
"""
from .api import (allreduce, axis_index, axis_size, pmax, pmean, pmin, psum, rank_fn,
                  spmd_inputs)
from .segment import SpmdParent

__all__ = ["SpmdParent", "allreduce", "axis_index", "axis_size", "pmax", "pmean", "pmin",
           "psum", "rank_fn", "spmd_inputs"]
