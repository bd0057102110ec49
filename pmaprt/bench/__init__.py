"""pmaprt.bench: the benchmark harness, ``python -m pmaprt.bench``.

Usage::

    python -m pmaprt.bench                      # quick suite (~3 min on 2 cores)
    python -m pmaprt.bench --full               # the whole suite, full sizes
    python -m pmaprt.bench --workload medium --workload heavy-tailed
    python -m pmaprt.bench --out DIR --repeat K --size-scale F --workers W

Every runner (pmaprt, builtin ``map``, ``multiprocessing.Pool.map`` and
``.imap``, ``concurrent.futures.ProcessPoolExecutor.map`` with chunksize 1 and
with chunksize ceil(n/4W), ``joblib.Parallel`` with automatic batching, and
``mpire.WorkerPool.map``) gets the same worker count, has its pool created and
warmed before anything is timed, and is timed over the same inputs; each figure
is the median of ``repeat`` runs (fewer when one runner has used up
``max_runner_s`` on one workload), printed with its min-max.  Each timed run
of a parallel runner follows a builtin map run over the same input (a pair);
pmaprt's verdict against each other runner (faster, slower, not
distinguishable) comes from the pairs' spread (``pmaprt.bench.verdict``), and
a noise check at the start and the end (the parallel speed-up of pure CPU
work on W processes) decides whether the machine gave its cores: if not, a
winner must win every pair by the noise margin.  The report ends with a
summary of every workload's verdicts.  A peer that is not installed or cannot
start is reported as skipped/error with a note, never fatal.  The ``gpu``
workload is skipped with a note on a machine without a GPU or without CuPy.
``python -m pmaprt.bench.sim`` simulates the scheduler at 2 to 1,024 workers
(pmaprt's own policy code and the peers' policies on a virtual clock; see
``pmaprt.bench.sim``); its ``--validate`` compares it with real runs at W = 2.
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

results.json (schema_version 2)
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
``noise``           object: ``checks`` (list, the start's then the end's:
                    ``{when, workers, item_s, speedups: [W x one copy's time /
                    W copies' time at once, per pair], median, min, max,
                    note}``), ``trusted`` (bool: every check's median >=
                    0.85 W and every pair >= 0.7 W), ``margin`` (float >= 1:
                    1 when trusted, else W / the lowest speed-up: the factor
                    a winner must clear in every pair), ``note`` (str or
                    null: why not trusted).
``workloads``       object, workload name -> entry (keys below), for every
                    workload selected, including skipped ones.
``results``         list of result records (keys below), one per (workload,
                    runner) and one per chunk-size sweep point or all-reduce
                    size.
``summary``         list of str: the closing summary (the noise first, then
                    each workload's verdicts and sweep), as printed.
``files``           object: ``json``, ``table`` (file names) and ``plots``
                    (list of PNG file names written).
``duration_s``      float, wall time of the whole run.

Workload entry keys (all always present, null where not applicable):
``name``, ``description`` (str); ``status`` ("ok"|"skipped"|"error");
``note`` (str or null: why skipped); ``params`` (object: sizes, per-item
costs, seed); ``items`` (int); ``serial_s`` (median builtin-map time);
``serial_spread`` (max / min of every builtin map run of the workload: the
baseline's and each pair's; over 1.5 the workload's margin rises to it);
``longest_item_s`` (heavy_tailed, cost_shift, numpy_shared: the dearest item
alone, fastest of 3); ``ideal_s`` (a lower bound on any schedule's time:
max(fastest builtin map run / W, longest_item_s)); ``best_peer`` (runner id of
the fastest parallel peer, by paired speed-up) and ``best_peer_s``;
``adaptive_chunksize`` (int: median of pmaprt's ``MapStats.chunksizes`` in its
last adaptive run); ``verdicts`` (list: pmaprt's first record against builtin
map and each other runner, ``{against, label, ratio, lo, hi, pairs, margin,
verdict}``, ratio = pmaprt's speed / the other's, median and min/max over the
pairs; verdict "faster" (lo > margin), "slower" (hi < 1/margin), "no verdict:
within the noise" (every pair agrees, not by the margin) or "not
distinguishable"; allreduce rows add ``bytes``); ``noise_note`` (str or null:
this workload's serial runs spread past 1.5x); ``sweep`` (swept workloads:
``points`` (``[{chunksize, vs_adaptive, lo, hi, pairs}]``, vs_adaptive =
adaptive's time / the fixed size's, > 1: the fixed size was faster, median
and min/max over its pairs with the adaptive run just before each), ``best``
= ``best_fixed_chunksize`` (the point of highest vs_adaptive: the table's
and plot's best), ``best_vs_adaptive``, ``best_lo``, ``best_hi``,
``verdict``, ``text`` (the printed summary), ``paired``,
``adaptive_chunksize``, ``adaptive_mode``, ``adaptive_items_per_s``,
``adaptive_over_best_fixed`` (1 / best_vs_adaptive)); ``timeline``
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
              ``interleaved``: roundtrip samples taken in turn, so sample k
              of two runners is a pair,
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
``median_s``, ``min_s``, ``max_s``  float.
``ranges``    object or null: the spread of each derived figure over the
              runs (or pairs), ``name -> [min, max]`` for
              ``speedup_vs_map``, ``efficiency``, ``makespan_over_ideal``,
              ``speedup_vs_best_peer`` and (sweep records) ``vs_adaptive``.
``items_per_s``          float, items / median_s.
``latency_us``           float, roundtrip only.
``busbw_gbps``           float, allreduce only: 2(W-1)/W * bytes / t / 1e9
                         (the memcpy baseline: bytes / t / 1e9).
``speedup_vs_map``       float, serial_s / median_s (>1: faster than map);
                         with paired_serial_s, the median of the per-run
                         ratios paired_serial_s[k] / times_s[k] (as are
                         efficiency and makespan_over_ideal).
``speedup_vs_best_peer`` float, this runner's speed over the fastest
                         parallel peer's (>1: faster): the ratio of their
                         median paired speed-ups (roundtrip: median of the
                         per-sample ratios).
``makespan_over_ideal``  float, median over runs of t / ideal_s (1 is
                         perfect; below 1 only by a measurement error,
                         marked '!' in the table).
``efficiency``           float, speedup_vs_map / W.
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
