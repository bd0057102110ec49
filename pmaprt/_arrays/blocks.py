"""chunks=: a map over contiguous blocks of rows.

``pmap(fn, arr, chunks=k)`` maps fn over blocks ``arr[lo:hi]`` of k rows (or
of the given row counts). A block rule says where each block starts and ends
without listing them: ("every", k, n) for k rows each over n rows, or
("bounds", (0, b1, ..., n)) for given lengths. A `BlockView` is an input seen
as its blocks; the workers get the rule and slice the blocks themselves.
"""
import collections.abc

import numpy as np


def block_rule(n, chunks):
    """The rule for blocks over n rows: ("every", k, n) or ("bounds", (0, b1, ..., n))."""
    if isinstance(chunks, (bool, str, bytes)):
        raise TypeError("pmaprt: chunks must be a positive int (rows per block) or a sequence "
                        "of block lengths, got %r" % (chunks,))
    if isinstance(chunks, (int, np.integer)):
        k = int(chunks)
        if k < 1:
            raise ValueError("pmaprt: chunks must be >= 1 rows per block, got %d" % k)
        return ("every", k, n)
    try:
        sizes = [int(c) for c in chunks]
    except (TypeError, ValueError):
        raise TypeError("pmaprt: chunks must be a positive int (rows per block) or a sequence "
                        "of block lengths, got %r" % (chunks,)) from None
    if any(c < 0 for c in sizes) or sum(sizes) != n:
        raise ValueError("pmaprt: the block lengths in chunks= must be >= 0 and add up to the "
                         "input's %d rows (they add up to %d)" % (n, sum(sizes)))
    bounds = [0]
    for c in sizes:
        bounds.append(bounds[-1] + c)
    return ("bounds", tuple(bounds))


def rule_len(rule):
    """How many blocks a rule makes."""
    if rule[0] == "every":
        _, k, n = rule
        return (n + k - 1) // k
    return len(rule[1]) - 1


def rule_rows(rule, i):
    """Rows [lo, hi) of block i."""
    if rule[0] == "every":
        _, k, n = rule
        lo = i * k
        return lo, min(lo + k, n)
    b = rule[1]
    return b[i], b[i + 1]


def rule_total_rows(rule):
    """The rows a rule covers."""
    return rule[2] if rule[0] == "every" else rule[1][-1]


class BlockView(collections.abc.Sequence):
    """The blocks of a sliceable input: item i is base[lo_i:hi_i]."""

    def __init__(self, base, rule):
        self.base = base
        self.rule = rule
        self.n = rule_len(rule)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError("block index out of range")
        lo, hi = rule_rows(self.rule, i)
        return self.base[lo:hi]


_SLICEABLE = (list, tuple, range, str, bytes)


def wrap_chunks(iterables, chunks):
    """The iterables as BlockViews (chunks given) or as they are."""
    if chunks is None:
        return iterables, None
    n = None
    for i, x in enumerate(iterables):
        if not (isinstance(x, _SLICEABLE) or (isinstance(x, np.ndarray) and x.ndim >= 1)):
            raise TypeError("pmaprt: chunks= needs inputs that can be sliced into blocks "
                            "(ndarray, list, tuple, range); argument %d is a %s"
                            % (i + 2, type(x).__name__))
        if n is None:
            n = len(x)
        elif len(x) != n:
            raise ValueError("pmaprt: with chunks= every input must have the same length "
                             "(%d and %d)" % (n, len(x)))
    rule = block_rule(n, chunks)
    return tuple(BlockView(x, rule) for x in iterables), rule
