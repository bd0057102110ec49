"""pmaprt.bench: the benchmark harness, ``python -m pmaprt.bench``.

Usage::

    python -m pmaprt.bench                      # quick suite (~2 min on 2 cores)
    python -m pmaprt.bench --full               # the whole suite, full sizes
    python -m pmaprt.bench --workload medium --workload heavy-tailed
    python -m pmaprt.bench --out DIR --repeat K --size-scale F --workers W

Every runner (pmaprt, builtin ``map``, ``multiprocessing.Pool.map`` and
``.imap``, ``concurrent.futures.ProcessPoolExecutor.map`` with chunksize 1 and
with chunksize ceil(n/4W), ``joblib.Parallel`` with automatic batching, and
``mpire.WorkerPool.map``) gets the same worker count, has its pool created and
warmed before anything is timed, and is timed over the same inputs; each figure
is the median of ``repeat`` runs (fewer when one runner has used up
``max_runner_s`` on one workload).  A peer that is not installed or cannot
start is reported as skipped/error with a note, never fatal.  The ``gpu``
workload is skipped with a note on a machine without a GPU or without CuPy.
The ``allreduce`` workload times ``pmaprt.allreduce`` inside an SPMD map against
a naive multiprocessing all-reduce and memcpy (see ``pmaprt.bench.collective``).

NumPy workloads: ``numpy`` (every runner over a list of 256 plain ndarray
chunks; each runner also gets one untimed run under a memory sampler,
``pmaprt/bench/memory.py``, for ``peak_pss_bytes`` / ``peak_uss_bytes``),
``numpy_shared`` (the same array as a pmaprt shared array, and as a plain 1-d
array mapped with ``chunks=``; its ``ideal_s`` is serial/W, so ``/ideal`` is
t / (serial/W)) and ``preprocess`` (standardize and clip float32 rows x 16 in
blocks, written into ``out=``: shared in/out, plain in/out, mp.Pool.map with
the results gathered into the output, a serial loop and a one-process
``np.copyto`` of the same bytes; ``params.gb_per_s`` and ``params.vs_memcpy``).

Output, in ``--out`` (default ``bench/results/``): ``table.txt`` (the report
also printed to stdout), ``results.json`` and PNG plots
(``chunksize_<workload>.png``, ``timeline_<workload>.png``,
``allreduce_busbw.png``).

results.json (schema_version 1)
-------------------------------
Top-level keys (all always present):

``schema_version``  int, 1.
``created``         str, ISO-8601 UTC time of the run.
``argv``            list of str, the command-line arguments.
``config``          object: ``mode`` ("quick"|"full"), ``repeat`` (int),
                    ``size_scale`` (float), ``workers`` (int), ``workloads``
                    (list of str), ``max_runner_s`` (float), ``sweep`` (bool),
                    ``plots`` (bool), ``runners`` (list of str or null = all).
``machine``         object: ``cores_logical``, ``cores_physical``,
                    ``cores_available`` (int or null), ``memory_bytes`` (int or
                    null), ``cpu_model`` (str or null), ``gpus`` (list of
                    ``{index, name, memory_bytes}``, empty without a GPU),
                    ``platform``, ``python_implementation``,
                    ``python_executable_version`` (str), ``versions`` (object:
                    python, pmaprt, numpy, joblib, mpire, matplotlib, tqdm,
                    psutil -> str or null), ``date`` (str), ``workers`` (int).
``calibration``     object: ``spin_iters_per_us`` (float: busy-loop iterations
                    per microsecond, measured once per run), ``samples``.
``workloads``       object, workload name -> entry (keys below), for every
                    workload selected, including skipped ones.
``results``         list of result records (keys below), one per (workload,
                    runner) and one per chunk-size sweep point or all-reduce
                    size.
``files``           object: ``json``, ``table`` (file names) and ``plots``
                    (list of PNG file names written).
``duration_s``      float, wall time of the whole run.

Workload entry keys (all always present, null where not applicable):
``name``, ``description`` (str); ``status`` ("ok"|"skipped"|"error");
``note`` (str or null: why skipped); ``params`` (object: sizes, per-item
costs, seed); ``items`` (int); ``serial_s`` (median builtin-map time);
``longest_item_s`` (heavy_tailed, cost_shift: the dearest item alone);
``ideal_s`` (max(serial_s/W, longest_item_s)); ``best_peer`` (runner id of the
fastest parallel peer) and ``best_peer_s``; ``adaptive_chunksize`` (int:
median of pmaprt's ``MapStats.chunksizes`` in its last adaptive run);
``sweep`` (swept workloads: ``chunksizes``, ``items_per_s``,
``best_fixed_chunksize``, ``best_fixed_items_per_s``, ``adaptive_chunksize``,
``adaptive_items_per_s``, ``adaptive_over_best_fixed`` (best fixed time /
adaptive time: with ``paired``, each fixed run followed an adaptive run and
this is the median of those per-pair ratios for the fixed size fastest
against them)); ``timeline``
(``{wall_s, mode, truncated, workers: [[[t_start, t_end, start_index,
count], ...] per worker]}`` from the last adaptive run's chunk logs).

Result record keys (all always present, null where not applicable):

``workload``  str, a workload name.
``runner``    str, one of ``builtin_map``, ``pmaprt``, ``mp_pool_map``,
              ``mp_pool_imap``, ``ppe_cs1``, ``ppe_tuned``, ``joblib``,
              ``mpire``.
``label``     str, the runner's name in the table.
``kind``      "baseline" (builtin map), "pmaprt" (adaptive chunk size),
              "peer", or "sweep" (pmaprt with the fixed chunk size in
              ``params.chunksize``).
``status``    "ok", "skipped" (e.g. not installed) or "error" (exception or
              wrong results; the message is in ``note``).
``note``      str or null.
``metric``    "wall" (time to map every item, results consumed),
              "latency" (roundtrip: seconds per one-task call) or "busbw".
``params``    object: ``workers`` and the runner's chunking (``chunksize``,
              ``adaptive_chunksize_median``, ``bytes``, ...); numpy workloads:
              ``peak_pss_bytes``, ``peak_uss_bytes`` (how much the PSS / USS
              sum over this process and its children grew during one extra
              run); preprocess: ``gb_per_s`` (input bytes / median_s),
              ``vs_memcpy`` (memcpy time / this time).
``items``     int, items per run (calls per sample for roundtrip).
``times_s``   list of float, every timed run's seconds (raw; per-call
              seconds for roundtrip).
``paired_serial_s``  list of float or null: the time of a builtin map run
              over the same input taken just before each timed run (parallel
              runners of map workloads, unless --no-pair).
``runs``      int, len(times_s).
``median_s``, ``min_s``  float.
``items_per_s``          float, items / median_s.
``latency_us``           float, roundtrip only.
``busbw_gbps``           float, allreduce only: 2(W-1)/W * bytes / t / 1e9
                         (the memcpy baseline: bytes / t / 1e9).
``speedup_vs_map``       float, serial_s / median_s (>1: faster than map);
                         with paired_serial_s, the median of the per-run
                         ratios paired_serial_s[k] / times_s[k] (as are
                         efficiency and makespan_over_ideal).
``speedup_vs_best_peer`` float, best_peer_s / median_s (>1: faster than the
                         fastest parallel peer).
``makespan_over_ideal``  float, median_s / ideal_s (1 is perfect).
``efficiency``           float, serial_s / (W * median_s).
``startup_s``            float, pool creation + warm-up (not in times_s).
``stats``                object or null, pmaprt's MapStats of the last run:
                         ``mode``, ``wall_s``, ``items``, ``n_chunks``,
                         ``chunksize_median``/``_min``/``_max``, ``chunksizes``
                         (null past 10,000 chunks), ``workers`` (list of
                         ``{items, chunks, steals, busy_s, idle_s, rank,
                         chunk_log_len}``); for a map run on the workers,
                         ``busy_s_runs`` (the workers' seconds in chunks,
                         per timed run), ``busy_fraction`` (median of
                         busy / (W * t)) and ``work_inflation`` (median of
                         busy / the paired serial time): in each run,
                         efficiency = busy fraction / work inflation.
                         Sweep records: ``paired_adaptive_s`` (the adaptive
                         run before each fixed run) and ``vs_adaptive``.

A workload of 50,000 items or more is first run on a 1% prefix by each
runner; a runner whose full run projects past 5 * ``max_runner_s`` is recorded
as skipped with the projection in ``note`` (raise ``--max-runner-s`` to run it).
"""

from .cli import main  # noqa: F401
from .config import Config  # noqa: F401
from .records import RESULT_KEYS, SCHEMA_VERSION, TOP_KEYS, WORKLOAD_KEYS  # noqa: F401
from .suite import run_suite  # noqa: F401

__all__ = ["main", "Config", "run_suite", "RESULT_KEYS", "WORKLOAD_KEYS", "TOP_KEYS",
           "SCHEMA_VERSION"]
