"""The array side of one map: its blocks, its out= and its item encoder.

`JobArrays` is what one map in a pool holds (parent side): the inputs as
blocks (chunks=), the array the workers write into (out=), the encoder of its
items, and the shared arrays its items refer to, held until the workers have
mapped them. `local_map` is the same map run in this process (a pmap inside
a worker).
"""
import itertools

from .blocks import rule_rows, wrap_chunks
from .copy import copy_array
from .out import OutSink, check_out
from .shared import empty_like, find_mapping, is_shared, shared_spec
from .transport import ItemEncoder


def _common_len(iterables):
    """The length of the shortest input, or None when one has no len()."""
    if all(hasattr(x, "__len__") for x in iterables):
        try:
            return min(len(x) for x in iterables)
        except TypeError:
            return None
    return None


class JobArrays:
    """The array side of one map, parent side: chunks=, out= and the item
    encoder. `segs` is the job's list of segments (unshared when it ends).

    A shared array that items refer to must outlive the items here until a
    worker has taken them (else the pool would tell the workers to drop it
    first): the mappings an encoding referred to are held, for a fed chunk
    until its record arrives (hold/done), otherwise until the map ends
    (release)."""

    def __init__(self, pool, segs, iterables, out, chunks, star):
        self.pool = pool
        self.segs = segs
        self.started = False     # set once the job is posted; its _finish then unshares
        self._fresh = []         # mappings referred to since the last hold()
        self._chunks = {}        # fed chunk's first item -> the mappings it refers to
        self.iterables, self.rule = wrap_chunks(iterables, chunks)
        self.out = None
        self.target = None       # a plain out=: copied back as results are taken
        self.on_take = None
        self._pvm = None
        self._pins = set()       # captured segments its function refers to (captured.py)
        self.encoder = ItemEncoder(self)
        if out is None:
            return
        check_out(out, _common_len(self.iterables), self.rule)
        if is_shared(out):
            self.out = out
        else:
            # One extra copy: workers write into a shared twin, the parent
            # copies each chunk into the caller's array as it is taken.
            self.out = empty_like(out)
            self.target = out
            self.on_take = self._copy_back

    def __del__(self):
        # A map that never reached its end; getattr: the constructor may have
        # raised before it set _pins.
        if getattr(self, "_pins", None):
            try:
                self.pool.arrays.captured.unpin(self._pins)
            except Exception:
                pass
        # The map's constructor raised after segments were shared: give them back.
        if not self.started and self.segs:
            segs, self.segs[:] = list(self.segs), []
            pool = self.pool
            try:
                if pool._res.ctl is not None:
                    with pool._lock:
                        for seg in segs:
                            pool.unshare(seg)
            except Exception:
                pass

    def dumps_fn(self, fn):
        """The map's function for its workers, its large arrays in shared
        segments pinned until the map ends (captured.py)."""
        return self.pool.arrays.captured.dumps_fn(fn, self._pins)

    def share(self, mapping):
        if not self._fresh or self._fresh[-1] is not mapping:
            self._fresh.append(mapping)
        return self.pool.arrays.share(mapping)

    def keep(self, obj):
        """Keep obj (a buffer the workers read from this process) as long as a shared array would be."""
        self._fresh.append(obj)

    def use_pvm(self):
        """Whether workers read plain arrays from this process. While the map is
        being planned (before it is posted, outside the pool's lock) the pool
        may be asked; later (a fed chunk, under the lock) only a known answer counts."""
        if self._pvm is None:
            arrays = self.pool.arrays
            known = arrays.pvm
            if known is None and self.started:
                return False
            self._pvm = known if known is not None else arrays.pvm_allowed()
        return self._pvm

    def hold(self, start):
        """The arrays encoded since the last call belong to the fed chunk at `start`."""
        if self._fresh:
            self._chunks.setdefault(start, []).extend(self._fresh)
            self._fresh = []

    def done(self, start):
        """The chunk at `start` came back: its workers have mapped what it refers to."""
        if self._chunks:
            self._chunks.pop(start, None)

    def release(self):
        """The map is over: let go of its shared arrays (an array nobody else
        holds is then unshared and freed)."""
        self._fresh = []
        self._chunks.clear()
        self.out = self.target = None
        if self._pins:
            self.pool.arrays.captured.unpin(self._pins)
        self.pool.arrays.release_gone()

    def desc_extra(self):
        """What the job's descriptor carries for the workers (a tuple to append)."""
        if self.out is None:
            return ()
        m = find_mapping(self.out)
        sid = self.share(m)
        return ({"out": shared_spec(self.out, sid, m), "rule": self.rule},)

    def _copy_back(self, start, count):
        if count <= 0:
            return
        if self.rule is None:
            lo, hi = start, start + count
        else:
            lo, hi = rule_rows(self.rule, start)[0], rule_rows(self.rule, start + count - 1)[1]
        copy_array(self.target[lo:hi], self.out[lo:hi])


def local_map(fn, iterables, star, out=None, chunks=None):
    """What pmap does, in this process (a pmap inside a worker)."""
    its, rule = wrap_chunks(iterables, chunks)
    if out is not None:
        n = min(len(x) for x in its) if all(hasattr(x, "__len__") for x in its) else None
        check_out(out, n, rule)
        fn = OutSink(fn, out, rule)
    if star and len(its) == 1:
        return itertools.starmap(fn, its[0])
    return map(fn, *its)
