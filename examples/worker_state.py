"""Per-worker state: load a costly object once per worker, use it for every item.

The ML case: a tokenizer or a model is slow to build and too big to send with
each item. Each worker builds it once and keeps it in ``pmaprt.worker_state()``,
a dict private to the worker process that lives across items and maps. Two
ways to fill it:

    # 1. an initializer, run once in each worker before its first item
    pmap(tokenize, texts, initializer=load_vocab, initargs=(vocab_size,))

    # 2. lazily, on the first item a worker runs
    def tokenize(text):
        st = pmaprt.worker_state()
        if "vocab" not in st:
            st["vocab"] = build_vocab(...)
        ...

The same works with ``Pool(initializer=...)``, ``Executor(initializer=...)``
and joblib's ``Parallel(initializer=...)`` on the pmaprt backend.
``pmaprt.worker_rank()`` gives the worker's index (0 .. workers - 1), for
example to pick a GPU: ``device = rank % n_gpus``.

    python examples/worker_state.py            # 20,000 texts
    python examples/worker_state.py --small    # 2,000 (what the test runs)
"""
import argparse
import hashlib
import os
import time

import pmaprt
from pmaprt import pmap

# What building the "model" costs here (a stand-in for loading weights).
BUILD_S = 0.3


def build_vocab(size):
    """A deterministic word -> id table, slow to build (as loading a model is)."""
    time.sleep(BUILD_S)
    return {"w%d" % i: i for i in range(size)}


def load_vocab(size):
    """The initializer: runs once in each worker."""
    st = pmaprt.worker_state()
    st["vocab"] = build_vocab(size)
    st["loaded_by"] = os.getpid()


def tokenize(text):
    """Uses the worker's vocabulary; reports which worker ran it."""
    st = pmaprt.worker_state()
    vocab = st["vocab"]
    ids = [vocab.get(w, 0) for w in text.split()]
    return sum(ids), st["loaded_by"], pmaprt.worker_rank()


def tokenize_lazily(text):
    """The same without an initializer: the first item a worker runs builds it."""
    st = pmaprt.worker_state()
    if "lazy_vocab" not in st:
        st["lazy_vocab"] = build_vocab(1000)
        st["lazy_builds"] = st.get("lazy_builds", 0) + 1
    ids = [st["lazy_vocab"].get(w, 0) for w in text.split()]
    return sum(ids), st["lazy_builds"]


def make_texts(n):
    out = []
    for i in range(n):
        h = hashlib.sha256(str(i).encode()).digest()
        out.append(" ".join("w%d" % (b * 4 % 1000) for b in h[:12]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    texts = make_texts(2000 if args.small else 20000)
    expected = [sum(int(w[1:]) for w in t.split()) for t in texts]

    t0 = time.perf_counter()
    out = list(pmap(tokenize, texts, initializer=load_vocab, initargs=(1000,)))
    t1 = time.perf_counter()
    assert [r[0] for r in out] == expected
    loaders = {r[1] for r in out}
    ranks = {r[2] for r in out}
    print("initializer: %d texts in %.2f s; vocabulary built %d times (once per worker "
          "that ran items), worker ranks %s" % (len(texts), t1 - t0, len(loaders), sorted(ranks)))

    out = list(pmap(tokenize_lazily, texts))
    assert [r[0] for r in out] == expected
    print("lazily: every worker built its vocabulary at most once: %s"
          % all(r[1] == 1 for r in out))
    pmaprt.shutdown()


if __name__ == "__main__":
    main()
