"""Hyperparameter search with pmap: the same call on the local pool and on a Dask cluster.

A grid of configurations (learning rate, L2 penalty, hidden units, epochs) for a
small NumPy model, a one-hidden-layer network trained by full-batch gradient
descent on a synthetic classification task, is trained once per configuration.
Each training is independent, so the grid is a map:

    results = list(pmap(train, grid))                    # local worker processes
    results = list(pmap(train, grid, backend="dask"))    # a Dask LocalCluster
    results = list(pmap(train, grid, backend="dask", address="tcp://host:8786"))

The script runs both and checks that they agree.

    python examples/hyperparam_search.py            # 48 configurations
    python examples/hyperparam_search.py --small    # 8 small ones (what the test runs)
"""
import argparse
import itertools
import sys
import time

import numpy as np

from pmaprt import pmap, shutdown


# Data made in a process, kept for its later trainings (each worker makes it
# once from the seed: nothing large travels with the tasks).
_DATA = {}


def make_data(n, d, seed):
    """A synthetic two-class problem, the same in every process (seeded):
    train and validation splits."""
    key = (n, d, seed)
    if key not in _DATA:
        _DATA.clear()
        _DATA[key] = _make_data(n, d, seed)
    return _DATA[key]


def _make_data(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    w = rng.normal(size=d)
    logits = x @ w + 2.0 * x[:, 0] * x[:, 1]
    y = (logits + 0.3 * rng.normal(size=n) > 0).astype(np.float64)
    cut = int(0.8 * n)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def train(config):
    """Train one configuration; returns (config, validation loss, validation accuracy)."""
    lr, l2, hidden, epochs, (n, d, seed) = config
    xtr, ytr, xva, yva = make_data(n, d, seed)
    rng = np.random.default_rng(seed + hidden)
    w1 = rng.normal(scale=1.0 / np.sqrt(d), size=(d, hidden))
    b1 = np.zeros(hidden)
    w2 = rng.normal(scale=1.0 / np.sqrt(hidden), size=hidden)
    b2 = 0.0
    m = len(ytr)
    for _ in range(epochs):
        h = np.tanh(xtr @ w1 + b1)
        p = 1.0 / (1.0 + np.exp(-(h @ w2 + b2)))
        g = (p - ytr) / m                     # d loss / d logit
        gw2 = h.T @ g + l2 * w2
        gb2 = g.sum()
        gh = np.outer(g, w2) * (1.0 - h * h)
        gw1 = xtr.T @ gh + l2 * w1
        gb1 = gh.sum(axis=0)
        w1 -= lr * gw1
        b1 -= lr * gb1
        w2 -= lr * gw2
        b2 -= lr * gb2
    h = np.tanh(xva @ w1 + b1)
    p = np.clip(1.0 / (1.0 + np.exp(-(h @ w2 + b2))), 1e-12, 1 - 1e-12)
    loss = float(-np.mean(yva * np.log(p) + (1 - yva) * np.log(1 - p)))
    acc = float(np.mean((p > 0.5) == (yva > 0.5)))
    return {"lr": lr, "l2": l2, "hidden": hidden, "epochs": epochs}, loss, acc


def grid(small):
    if small:
        data = (400, 8, 0)
        return list(itertools.product([0.1, 0.5], [0.0, 1e-3], [8, 16], [30], [data]))
    data = (2000, 10, 0)
    return list(itertools.product([0.05, 0.2, 0.5, 1.0], [0.0, 1e-4, 1e-2], [8, 16],
                                  [50, 100], [data]))


def search(configs, **pmap_options):
    t0 = time.perf_counter()
    results = list(pmap(train, configs, **pmap_options))
    return results, time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a small grid (a few seconds)")
    ap.add_argument("--address", default=None,
                    help="a Dask scheduler (tcp://host:port); default: a LocalCluster")
    ap.add_argument("--dask-workers", type=int, default=None,
                    help="LocalCluster worker processes (default: one per core)")
    args = ap.parse_args(argv)
    configs = grid(args.small)

    local, t_local = search(configs)
    opts = {"backend": "dask", "address": args.address}
    if args.address is None and args.dask_workers:
        opts["n_workers"] = args.dask_workers
    on_dask, t_dask = search(configs, **opts)

    print("%d configurations: local pool %.2f s, Dask %.2f s" % (len(configs), t_local, t_dask))
    best = min(local, key=lambda r: r[1])
    print("best: %s  validation loss %.4f  accuracy %.3f" % (best[0], best[1], best[2]))
    same_configs = [r[0] for r in local] == [r[0] for r in on_dask]
    loss_local = np.array([r[1] for r in local])
    loss_dask = np.array([r[1] for r in on_dask])
    agree = same_configs and np.allclose(loss_local, loss_dask, rtol=1e-9, atol=1e-12)
    print("local pool and Dask agree: %s (largest loss difference %.3g)"
          % (agree, float(np.max(np.abs(loss_local - loss_dask))) if len(configs) else 0.0))
    shutdown()
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
