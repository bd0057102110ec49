"""Data-parallel training with pmaprt: an MLP on scikit-learn's digits.

A two-layer perceptron (64 pixels -> hidden tanh units -> 10 classes, softmax
cross-entropy) trained with plain SGD on the 8x8 digits that scikit-learn
ships (1,797 images; nothing is downloaded). Every step draws a global batch
of B rows (the same draw everywhere, from one seed) and splits it N ways: rank
r computes the loss and gradient *sums* over its rows, one fused
`pmaprt.psum` adds them over the ranks (a shared-memory all-reduce), and
every rank applies the same update, so the weights stay identical on every
rank. The loss curve equals single-process training on the whole batch to
float rounding.

    python examples/train_data_parallel.py [--workers N] [--steps S] [--hidden H]
                                           [--grads float32|bfloat16|float16]

--grads bfloat16 keeps the gradients in bfloat16 (as mixed-precision training
does) and all-reduces them as bfloat16, accumulated in float32: the curve
then follows the float32 one to bfloat16's rounding. Prints both curves and
the time per step of single-process training, of N ranks, and of the same
training under torch's DistributedDataParallel on gloo where torch is
installed (it says so where it is not).
"""
import argparse
import os
import sys
import time

import numpy as np

try:
    import pmaprt
except ImportError:  # run from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import pmaprt


def load_digits():
    """(X, y): the digits as float32 pixels in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits as sk_load
    d = sk_load()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def init_params(hidden, seed=0, n_in=64, n_out=10):
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32),
            "b1": np.zeros(hidden, np.float32),
            "w2": (rng.standard_normal((hidden, n_out)) / np.sqrt(hidden)).astype(np.float32),
            "b2": np.zeros(n_out, np.float32)}


def loss_and_grads(p, X, y):
    """Sums over the rows of X (not means): sums add up across ranks."""
    h = np.tanh(X @ p["w1"] + p["b1"])
    z = h @ p["w2"] + p["b2"]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    loss = np.float32(np.sum(np.log(s[:, 0]) - z[np.arange(len(y)), y]))
    dz = e / s
    dz[np.arange(len(y)), y] -= 1
    dh = (dz @ p["w2"].T) * (1 - h * h)
    return loss, {"w1": X.T @ dh, "b1": dh.sum(0), "w2": h.T @ dz, "b2": dz.sum(0)}


def batch_rows(n, batch, steps, seed=1):
    """The row indices of every global batch: one permutation per epoch."""
    rng = np.random.default_rng(seed)
    out, perm, pos = [], rng.permutation(n), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = rng.permutation(n), 0
        out.append(perm[pos: pos + batch])
        pos += batch
    return out


def sgd(p, g, lr, batch):
    for k in p:
        p[k] -= (lr / batch) * g[k].astype(np.float32)


def as_grads(g, kind):
    return g if kind == "float32" else {k: v.astype(half_dtype(kind)) for k, v in g.items()}


def half_dtype(kind):
    if kind == "float16":
        return np.float16
    import ml_dtypes
    return ml_dtypes.bfloat16


def train_serial(X, y, hidden=64, batch=240, steps=60, lr=0.5, grads="float32"):
    """Single-process training on each whole batch: (loss curve, seconds per step)."""
    p = init_params(hidden)
    curve = []
    t0 = time.perf_counter()
    for rows in batch_rows(len(X), batch, steps):
        loss, g = loss_and_grads(p, X[rows], y[rows])
        curve.append(float(loss) / batch)
        sgd(p, as_grads(g, grads), lr, batch)
    return curve, (time.perf_counter() - t0) / steps


def rank_train(job):
    """One rank: its slice of every global batch; loss and gradients summed
    over the ranks with one fused psum. -> (loss curve, seconds per step)."""
    X, y, hidden, batch, steps, lr, grads = job
    r, n = pmaprt.axis_index("batch"), pmaprt.axis_size("batch")
    # n ranks each running BLAS on every core would oversubscribe them n-fold
    limit_blas_threads(max(1, (os.cpu_count() or 1) // n))
    lo, hi = batch * r // n, batch * (r + 1) // n
    p = init_params(hidden)
    curve = []
    pmaprt.psum(np.zeros(1, np.float32), "batch")   # line the ranks up before timing
    t0 = time.perf_counter()
    for rows in batch_rows(len(X), batch, steps):
        mine = rows[lo:hi]
        loss, g = loss_and_grads(p, X[mine], y[mine])
        loss, g = pmaprt.psum([np.array([loss]), as_grads(g, grads)], "batch")
        curve.append(float(loss[0]) / batch)
        sgd(p, g, lr, batch)
    return curve, (time.perf_counter() - t0) / steps


def limit_blas_threads(k):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:   # comes with scikit-learn; without it BLAS keeps its threads
        return
    threadpool_limits(k, user_api="blas")


def train_parallel(X, y, n, hidden=64, batch=240, steps=60, lr=0.5, grads="float32",
                   pool=None):
    """The same training on n ranks: [(loss curve, seconds per step)] per rank."""
    X, y = pmaprt.asarray(X), pmaprt.asarray(y)   # shared: the ranks read them in place
    jobs = [(X, y, hidden, batch, steps, lr, grads)] * n     # one per rank
    if pool is None:
        return list(pmaprt.pmap(rank_train, jobs, workers=n, axis_name="batch"))
    return list(pool.map(rank_train, jobs, axis_name="batch"))


# --- torch DistributedDataParallel on gloo, where torch is installed


def torch_missing():
    try:
        import torch.distributed as dist
    except ImportError:
        return "torch is not installed: no DistributedDataParallel comparison"
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch build has no gloo backend"
    return None


def _ddp_rank(rank, n, port, X, y, hidden, batch, steps, lr, q):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=rank,
                            world_size=n)
    p = init_params(hidden)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.Tanh(),
                                torch.nn.Linear(hidden, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(p["w1"].T.copy()))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.from_numpy(p["w2"].T.copy()))
        model[2].bias.zero_()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    lo, hi = batch * rank // n, batch * (rank + 1) // n
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    dist.barrier()
    t0 = time.perf_counter()
    for rows in batch_rows(len(X), batch, steps):
        mine = torch.from_numpy(rows[lo:hi])
        # DDP averages gradients over ranks: a mean over each rank's rows,
        # scaled so the update is the whole batch's mean gradient
        loss = torch.nn.functional.cross_entropy(ddp(Xt[mine]), yt[mine], reduction="sum")
        opt.zero_grad()
        (loss * n / batch).backward()
        opt.step()
    q.put((rank, (time.perf_counter() - t0) / steps))
    dist.destroy_process_group()


def time_ddp(X, y, n, hidden, batch, steps, lr):
    """Seconds per step of the same training under DDP on gloo (n processes)."""
    import multiprocessing as mp
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, n, port, X, y, hidden, batch, steps, lr, q))
             for r in range(n)]
    for p in procs:
        p.start()
    try:
        return max(q.get(timeout=600)[1] for _ in range(n))
    finally:
        for p in procs:
            p.join(30)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=240)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--grads", choices=("float32", "bfloat16", "float16"), default="float32")
    a = ap.parse_args(argv)
    X, y = load_digits()
    kw = dict(hidden=a.hidden, batch=a.batch, steps=a.steps, lr=a.lr)
    train_serial(X, y, **dict(kw, steps=5))   # warm
    ref, t_serial = train_serial(X, y, grads=a.grads, **kw)
    runs = train_parallel(X, y, a.workers, grads=a.grads, **kw)
    got = np.array(runs[0][0])
    t_par = max(t for _, t in runs)
    print("step   1 process     %d ranks   (%s gradients)" % (a.workers, a.grads))
    for s in list(range(0, a.steps, max(1, a.steps // 10))) + [a.steps - 1]:
        print("%4d   %.6f    %.6f" % (s, ref[s], got[s]))
    rel = np.max(np.abs(got - np.array(ref)) / np.abs(ref))
    print("max relative difference of the curves: %.2e; every rank the same curve: %s"
          % (rel, all(c == runs[0][0] for c, _ in runs)))
    print("time per step: 1 process %.1f us, %d ranks %.1f us (%.2fx)"
          % (t_serial * 1e6, a.workers, t_par * 1e6, t_serial / t_par))
    why = torch_missing()
    if why:
        print("torch DDP on gloo: not measured (%s)" % why)
    else:
        t_ddp = time_ddp(X, y, a.workers, **kw)
        print("torch DDP on gloo, %d processes: %.1f us per step (pmaprt %.1fx faster)"
              % (a.workers, t_ddp * 1e6, t_ddp / t_par))
    pmaprt.shutdown()


if __name__ == "__main__":
    main()
