"""Data-parallel training with pmaprt: logistic regression on synthetic data.

Each step takes a global batch of B rows and splits it N ways; rank r computes
the gradient sum over its B/N rows, `pmaprt.psum` adds them over the ranks
(a ring all-reduce over shared memory), and every rank applies the same
update, so the weights stay identical on every rank. The loss curve matches
single-process training on the whole batch to rounding error.

    python examples/train_data_parallel.py [N]
"""
import sys

import os

import numpy as np

try:
    import pmaprt
except ImportError:  # run from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import pmaprt


def make_data(n_samples=4096, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, dim))
    w_true = rng.standard_normal(dim)
    y = (X @ w_true + 0.5 * rng.standard_normal(n_samples) > 0).astype(np.float64)
    return X, y


def loss_and_grad(w, b, X, y):
    """Sums over the rows of X (not means): sums add up across ranks."""
    z = X @ w + b
    p = 1.0 / (1.0 + np.exp(-z))
    # log(1 + e^z) - y z, computed stably
    loss = np.sum(np.logaddexp(0.0, z) - y * z)
    err = p - y
    return loss, X.T @ err, np.sum(err)


def batches(X, y, batch, steps):
    n = X.shape[0]
    for s in range(steps):
        i = (s * batch) % (n // batch * batch)
        yield X[i: i + batch], y[i: i + batch]


def train_serial(X, y, batch=256, steps=50, lr=0.5):
    """Single-process reference: the loss of each global batch, before its update."""
    w = np.zeros(X.shape[1])
    b = 0.0
    curve = []
    for Xb, yb in batches(X, y, batch, steps):
        loss, gw, gb = loss_and_grad(w, b, Xb, yb)
        curve.append(loss / len(yb))
        w -= lr * gw / len(yb)
        b -= lr * gb / len(yb)
    return curve


def rank_train(shard, batch, steps, lr):
    """One rank: its slice of every global batch; gradients summed with psum."""
    Xs, ys = shard
    w = np.zeros(Xs.shape[2])
    b = 0.0
    curve = []
    for s in range(steps):
        loss, gw, gb = loss_and_grad(w, b, Xs[s], ys[s])
        # One fused all-reduce for the loss, the weight gradient and the bias gradient.
        loss, gw, gb = pmaprt.psum([loss, gw, gb], "batch")
        curve.append(loss / batch)
        w -= lr * gw / batch
        b -= lr * gb / batch
    return curve


def shard_batches(X, y, batch, steps, n):
    """Rank r's rows of every global batch, as (steps, rows, dim) arrays."""
    bounds = [batch * r // n for r in range(n + 1)]
    shards = []
    for r in range(n):
        lo, hi = bounds[r], bounds[r + 1]
        bx = [Xb[lo:hi] for Xb, _ in batches(X, y, batch, steps)]
        by = [yb[lo:hi] for _, yb in batches(X, y, batch, steps)]
        shards.append((np.stack(bx), np.stack(by)))
    return shards


def train_parallel(X, y, n, batch=256, steps=50, lr=0.5, pool=None):
    """The same training on n workers; returns each rank's loss curve."""
    shards = shard_batches(X, y, batch, steps, n)
    if pool is None:
        return list(pmaprt.starmap(rank_train, [(s, batch, steps, lr) for s in shards],
                                   workers=n, axis_name="batch"))
    return list(pool.starmap(rank_train, [(s, batch, steps, lr) for s in shards],
                             axis_name="batch"))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    X, y = make_data()
    ref = np.array(train_serial(X, y))
    curves = train_parallel(X, y, n)
    got = np.array(curves[0])
    rel = np.max(np.abs(got - ref) / np.abs(ref))
    print("step   serial      %d workers" % n)
    for s in range(0, len(ref), 10):
        print("%4d   %.8f  %.8f" % (s, ref[s], got[s]))
    print("final  %.8f  %.8f" % (ref[-1], got[-1]))
    print("max relative difference: %.2e; ranks identical: %s"
          % (rel, all(np.array_equal(got, np.array(c)) for c in curves)))
    pmaprt.shutdown()


if __name__ == "__main__":
    main()
