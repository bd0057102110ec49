"""The runtime: worker processes and the protocols they share with the parent.

Each module holds one protocol with both its sides, and starts with its
step-by-step text; read them in this order:

- `job`: the Job protocol, what the runtime calls on a map or a task;
- `processes`: starting workers, noticing deaths and stuck items, replacing;
- `startup`: a worker's set-up at spawn (environment, thread caps, authkey,
  initializer) and its per-process state (`worker_state`);
- `lent`: segments lent to workers over their sockets;
- `board`: job slots, posting, finding and entering a job, retiring;
- `wake`: sleep and wake-up both ways, and the hot spinner;
- `claims`: how a worker takes items, the claim bracket, the parent's
  reconciliation after a death inside a claim, and the memory-ordering
  contract every protocol here relies on;
- `ring`: the result rings, a worker's records to the parent;
- `chunk`: running a map's chunks in a worker;
- `task`: one call (Pool.apply), both sides;
- `worker`: the worker's loop and `main`; `runtime`: the parent's `Runtime`.

This package imports only the floor below it (`_shm`, `_arrays`, `_access`,
`_options`, `_errors`, `_sched`, `_serialize`, `_collective`'s rank function),
never the map layer or the public API above it.
"""
from .job import Job  # noqa: F401
from .runtime import DEFAULT_MAX_JOBS, Runtime  # noqa: F401
from .task import Task, encode  # noqa: F401
from .startup import worker_rank, worker_state  # noqa: F401
