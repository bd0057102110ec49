"""scikit-learn's n_jobs on the pmaprt joblib backend against loky: the same
results, bit for bit, and the time as a ratio.

    python tests/conformance/sklearn_check.py [--rounds 3] [--json OUT]

Four workloads (GridSearchCV, cross_val_score, a RandomForest fit,
permutation_importance), each run with ``parallel_config(backend="loky")``
and ``backend="pmaprt"`` alternately, ``--rounds`` times, after one warm-up
of each. Prints, per workload, whether the results are identical and the
median pmaprt/loky time ratio with its range (below 1: pmaprt faster).
Needs scikit-learn (the bench extra).
"""
import json
import statistics
import sys
import time

import numpy as np
from joblib import parallel_config

import pmaprt.joblib

N_JOBS = 2


def _data():
    from sklearn.datasets import make_classification
    return make_classification(n_samples=1500, n_features=20, n_informative=8, random_state=0)


def grid_search(X, y):
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC
    gs = GridSearchCV(SVC(), {"C": [0.1, 1, 10], "gamma": [0.01, 0.1]}, cv=4, n_jobs=N_JOBS)
    gs.fit(X, y)
    return gs.cv_results_["mean_test_score"]


def cross_val(X, y):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import cross_val_score
    return cross_val_score(RandomForestClassifier(n_estimators=50, random_state=0), X, y, cv=5,
                           n_jobs=N_JOBS)


def forest(X, y):
    from sklearn.ensemble import RandomForestClassifier
    rf = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=N_JOBS).fit(X, y)
    return rf.feature_importances_


def permutation(X, y):
    from sklearn.inspection import permutation_importance
    from sklearn.linear_model import LogisticRegression
    model = LogisticRegression(max_iter=500).fit(X, y)
    r = permutation_importance(model, X, y, n_repeats=10, random_state=0, n_jobs=N_JOBS)
    return r.importances


WORKLOADS = [grid_search, cross_val, forest, permutation]


def run(fn, backend, X, y):
    with parallel_config(backend=backend):
        t0 = time.perf_counter()
        out = fn(X, y)
        return np.asarray(out), time.perf_counter() - t0


def main(argv):
    rounds = int(argv[argv.index("--rounds") + 1]) if "--rounds" in argv else 3
    X, y = _data()
    rows = []
    for fn in WORKLOADS:
        run(fn, "loky", X, y)
        run(fn, "pmaprt", X, y)
        ratios, same = [], True
        for _ in range(rounds):
            ref, t_loky = run(fn, "loky", X, y)
            got, t_pmaprt = run(fn, "pmaprt", X, y)
            same = same and np.array_equal(ref, got)
            ratios.append(t_pmaprt / t_loky)
        rows.append(dict(workload=fn.__name__, identical=bool(same),
                         ratio_median=round(statistics.median(ratios), 3),
                         ratio_min=round(min(ratios), 3), ratio_max=round(max(ratios), 3)))
        print("%-12s identical=%s  pmaprt/loky time %.2f (%.2f-%.2f)" % (
            fn.__name__, same, rows[-1]["ratio_median"], rows[-1]["ratio_min"],
            rows[-1]["ratio_max"]), flush=True)
    pmaprt.joblib.shutdown()
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
