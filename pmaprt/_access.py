"""How a map's input reaches the workers.

Parent side, `plan_input` sorts the iterables into one of two modes:

- index mode, for sized inputs whose items can be fetched by position in the
  worker: range, ndarray, list, tuple, str, bytes, blocks of them
  (``chunks=``), and sequences iterated through ``__getitem__``. Workers
  claim index ranges; no item is sent by message. A range costs nothing to
  send; a shared array (pmaprt.empty/asarray) is sent by handle, no copy;
  another ndarray is read by the workers straight from the parent's memory
  (process_vm_readv) where that is allowed, else copied once into the job's
  segment; a list or tuple is encoded once, in blocks sized to about 64 KiB
  (counting the arrays items refer to), so a worker decodes only the blocks
  its ranges touch, with large buffers inside items (ndarrays) out of band:
  by handle when shared, read from the parent, or copied once into the
  segment. A long list of plain items is encoded lazily (`LazyBlocks`): the
  blocks of the first window upfront, the others as the job's window moves
  on, each batch into a segment of its own, named in a block table that
  the parent fills before it raises the limit the workers claim below. A map
  that goes inline never encodes the rest.
- feed mode, for everything else (generators, iterators, dict views, files):
  the parent pulls items lazily and publishes encoded chunks in a table and a
  byte ring of the job's segment, with a bound on what is in flight.

Worker side, `open_spec` turns the picklable spec back into ``get(a, b)``, the
items ``[a, b)``.
"""
import collections.abc
import struct

from . import _arrays, _serialize

BLOCK_BYTES = 64 * 1024
MAX_BLOCK_ITEMS = 4096
SMALL_INLINE_BYTES = 16 * 1024

FEED_ENTRY = struct.Struct("<qIIQQ")  # start, count, nbytes, offset, segment id
# Lazy list blocks: one entry per block (segment id, 0 = the job's own; offset; bytes).
BLOCK_ENTRY = struct.Struct("<QQQ")
# Lists of at least this many items (and more than the first window) are
# encoded lazily; shorter ones upfront, in one pass.
LAZY_MIN_ITEMS = 32768


def _is_ndarray(x):
    t = type(x)
    return t.__module__ == "numpy" and t.__name__ == "ndarray"


def _indexable(x):
    if isinstance(x, (range, list, tuple, str, bytes)):
        return True
    if _is_ndarray(x):
        return x.ndim >= 1
    t = type(x)
    if isinstance(x, collections.abc.Sequence) and getattr(t, "__iter__", None) is collections.abc.Sequence.__iter__:
        return True
    return hasattr(t, "__len__") and hasattr(t, "__getitem__") and not hasattr(t, "__iter__")


class IndexPlan:
    """A sized input: `n` items, a picklable `spec`, and `blobs`, the
    (offset, bytes-like) pieces the job's data segment must hold."""

    mode = "index"

    def __init__(self, n, spec, blobs, data_size, error=None, lazy=()):
        self.n = n
        self.spec = spec
        self.blobs = blobs
        self.data_size = data_size
        self.error = error  # (index, exception): encoding stopped there
        self.lazy = list(lazy)  # LazyBlocks: blocks still to encode as the window moves


class FeedPlan:
    mode = "feed"

    def __init__(self, iterator):
        self.iterator = iterator


class _DataArea:
    def __init__(self):
        self.size = 0
        self.blobs = []
        self.lazy = []     # LazyBlocks of this plan

    def add(self, data, nbytes):
        off = self.size
        self.blobs.append((off, data))
        self.size = (off + nbytes + 63) // 64 * 64
        return off


def plan_input(iterables, star, enc=None, upfront=None, start=0):
    """IndexPlan or FeedPlan for map(fn, *iterables); `star`: items are arg tuples.
    enc: the job's _arrays.ItemEncoder (shared arrays, out-of-band buffers).
    upfront: items the workers may claim at first (the job's first window):
    a long list need only be encoded that far before the job starts.
    start: the workers start at this item (the caller ran those before it):
    a list's items before it are not pickled (placeholders; blocks wholly
    before it are left out)."""
    if all(_indexable(x) for x in iterables):
        area = _DataArea()
        specs, error, n = [], None, min(len(x) for x in iterables)
        for x in iterables:
            if upfront is not None and isinstance(x, (list, tuple)):
                spec, err = _blocks_spec(x, n, area, enc, upfront, start)
            else:
                spec, err = _index_spec(x, n, area, enc, start)
            specs.append(spec)
            if err is not None and (error is None or err[0] < error[0]):
                error = err
        if error is not None:
            n = error[0]
        spec = specs[0] if len(specs) == 1 else ("zip", specs)
        return IndexPlan(n, spec, area.blobs, area.size, error, area.lazy)
    if len(iterables) == 1:
        return FeedPlan(iter(iterables[0]))
    return FeedPlan(zip(*iterables))


def _index_spec(x, n, area, enc=None, start=0):
    if isinstance(x, range):
        return ("slice", x), None
    if _is_ndarray(x):
        return _array_spec(x, area, enc), None
    if isinstance(x, (str, bytes)):
        return ("slice", x), None
    if isinstance(x, (list, tuple)):
        return _blocks_spec(x, n, area, enc, start=start)
    if isinstance(x, _arrays.BlockView):
        inner, err = _index_spec(x.base, len(x.base), area, enc)
        if err is not None:
            # the block holding the bad row fails, at its position
            i = 0
            while _arrays.rule_rows(x.rule, i)[1] <= err[0]:
                i += 1
            err = (i, err[1])
        return ("chunked", inner, x.rule), err
    return ("seq", x), None


def _array_spec(a, area, enc=None):
    if a.dtype.hasobject:
        return ("slice", a)
    if enc is not None:
        m = _arrays.find_mapping(a)
        if m is not None and m.fd >= 0:
            # a shared array, however small: by handle, no copy (fn sees the parent's memory)
            return _arrays.shared_spec(a, enc.share(m), m)
    if a.nbytes <= SMALL_INLINE_BYTES:
        return ("slice", a)
    if enc is not None and a.flags.c_contiguous and a.nbytes >= _arrays.PVM_MIN and enc.use_pvm():
        # the workers read their rows straight from this process: no copy here
        enc.keep(a)
        return _arrays.pvm_spec(a)
    # one copy, straight from `a` (any layout) into the segment
    off = area.add(a, a.nbytes)
    return ("array", a.dtype, a.shape, off)


def _blocks_spec(x, n, area, enc=None, upfront=None, start=0):
    """Encode x[:n] in blocks; stops at the first item that cannot be encoded.
    With `upfront`, a long list of plain items (no out-of-band buffers) is
    encoded only as far as the first `upfront` items: see LazyBlocks. Blocks
    wholly before item `start` are left out (the workers never read them)."""
    if n == 0:
        return ("slice", ()), None
    start = min(start, n - 1)
    probe = x[start: min(n, start + 32)]
    oob = False
    try:
        data = _arrays.dumps_list(list(probe), enc)
        # the arrays it refers to count: a block is what one worker decodes at once
        per_item = max(1, (len(data) + getattr(enc, "ref_bytes", 0)) // len(probe))
        oob = data[:1] != b"P" and data[:1] != b"C"   # arrays out of band: never in the descriptor
    except _serialize.PICKLE_ERRORS:
        per_item = 1024
    if n * per_item <= SMALL_INLINE_BYTES and not oob:
        # Small: the items travel inside the descriptor (no segment, no message).
        # Items before `start` ran already: placeholders, never pickled.
        items = _from(x, 0, n, start)
        try:
            _serialize.dumps_list(items)
            return ("slice", items if start else x[:n]), None
        except _serialize.PICKLE_ERRORS:
            pass  # the block encoder below names the item that fails
    bsize = max(1, min(MAX_BLOCK_ITEMS, BLOCK_BYTES // per_item))
    if upfront is not None and not oob and not getattr(enc, "ref_bytes", 0) \
            and n >= LAZY_MIN_ITEMS and n > upfront + bsize:
        return _lazy_blocks_spec(x, n, area, bsize, upfront, enc, start)
    first = start // bsize
    offsets, error = [(0, 0)] * first, None
    for lo in range(first * bsize, n, bsize):
        block = _from(x, lo, min(lo + bsize, n), start)
        try:
            data = _arrays.dumps_list(block, enc)
        except _serialize.PICKLE_ERRORS:
            bad = _serialize.find_unpicklable(block)
            j, exc = bad if bad is not None else (0, TypeError("cannot be pickled"))
            error = (lo + j, _unpicklable_item(lo + j, block[j], exc))
            if j:
                data = _arrays.dumps_list(block[:j], enc)
                offsets.append((area.add(data, len(data)), len(data)))
            break
        offsets.append((area.add(data, len(data)), len(data)))
    return ("blocks", bsize, offsets), error


def _from(x, lo, hi, start):
    """list(x[lo:hi]), with None in place of the items before `start` (items
    the caller has already run: a job posted for the rest of a map must not
    pickle them, nor fail on one that cannot be)."""
    if start <= lo:
        return list(x[lo:hi])
    if start >= hi:
        return [None] * (hi - lo)
    return [None] * (start - lo) + list(x[start:hi])


def _encode_block(x, lo, hi, enc=None, start=0):
    """(data, None) for items [lo, hi) of x (bytes, or an _arrays.Encoded with
    enc), or (data of those before the first bad item, (index, error)) when
    one cannot be pickled, or the list has shrunk since the map began.
    Items before `start`: placeholders (see _from)."""
    block = _from(x, lo, hi, start)
    short = None
    if len(block) < hi - lo:
        short = (lo + len(block), RuntimeError(
            "pmaprt: the input list changed size during the map (it had at least %d items "
            "when the map began, %d now)" % (hi, len(x))))
    try:
        return _arrays.dumps_list(block, enc), short
    except _serialize.PICKLE_ERRORS:
        bad = _serialize.find_unpicklable(block)
        j, exc = bad if bad is not None else (0, TypeError("cannot be pickled"))
        return _arrays.dumps_list(block[:j], enc), (lo + j, _unpicklable_item(lo + j, block[j], exc))


def _lazy_blocks_spec(x, n, area, bsize, upfront, enc=None, start=0):
    nblocks = (n + bsize - 1) // bsize
    table = bytearray(nblocks * BLOCK_ENTRY.size)
    table_off = area.add(table, len(table))
    lazy = LazyBlocks(x, n, bsize, nblocks, table_off)
    lazy.k = lazy.k0 = start // bsize   # blocks before start: never read, never encoded
    error = None
    for k in range(lazy.k, min(nblocks, (upfront + bsize - 1) // bsize)):
        lo = k * bsize
        data, error = _encode_block(x, lo, min(lo + bsize, n), enc, start)
        if data:
            BLOCK_ENTRY.pack_into(table, k * BLOCK_ENTRY.size, 0, area.add(data, len(data)), len(data))
        lazy.k = k + 1
        if error is not None:
            lazy.k = nblocks   # the map ends at the bad item: nothing more to encode
            break
    area.lazy.append(lazy)
    return ("lblocks", bsize, table_off, nblocks), error


class LazyBlocks:
    """The parent's side of a lazily encoded list: blocks [0, k) are encoded
    and in the table; `encode(upto)` encodes those that items below `upto`
    touch."""

    def __init__(self, x, n, bsize, nblocks, table_off):
        self.x, self.n, self.bsize, self.nblocks, self.table_off = x, n, bsize, nblocks, table_off
        self.k = 0
        self.k0 = 0     # the first block encoded (a job for the rest of a map starts later)

    def encode(self, upto, enc=None):
        """[(block, data)], error: the blocks items below `upto` need, up to
        the first item that cannot be pickled (error = (index, exception)).
        enc: the job's item encoder (arrays in items travel as at the start)."""
        out = []
        end = min(self.nblocks, (min(upto, self.n) + self.bsize - 1) // self.bsize)
        while self.k < end:
            lo = self.k * self.bsize
            data, error = _encode_block(self.x, lo, min(lo + self.bsize, self.n), enc)
            out.append((self.k, data))
            self.k += 1
            if error is not None:
                self.k = self.nblocks
                return out, error
        return out, None


def _unpicklable_item(index, item, exc):
    err = TypeError("pmaprt: item %d of the input (%s) cannot be pickled to send it to a worker: %s"
                    % (index, _short_repr(item), exc))
    err.__cause__ = exc
    return err


def _short_repr(obj, limit=80):
    try:
        r = repr(obj)
    except Exception:
        r = "<%s object>" % type(obj).__name__
    return r if len(r) <= limit else r[: limit - 3] + "..."


# --- worker side

def open_spec(spec, segbuf):
    kind = spec[0]
    if kind == "slice":
        obj = spec[1]
        return lambda a, b: obj[a:b]
    if kind == "array":
        import numpy as np
        _, dtype, shape, off = spec
        count = 1
        for s in shape:
            count *= s
        arr = np.frombuffer(segbuf, dtype=dtype, count=count, offset=off).reshape(shape)
        return lambda a, b: arr[a:b]
    if kind == "sharr":
        arr = _arrays.open_shared(spec, _arrays.resolve)
        return lambda a, b: arr[a:b]
    if kind == "pvm":
        return _arrays.open_pvm(spec)
    if kind == "chunked":
        rows = open_spec(spec[1], segbuf)
        rule = spec[2]
        span = _arrays.rule_rows
        return lambda a, b: [rows(*span(rule, i)) for i in range(a, b)]
    if kind == "blocks":
        return _BlockReader(spec[1], spec[2], segbuf).get
    if kind == "lblocks":
        return _LazyBlockReader(spec[1], spec[2], segbuf).get
    if kind == "seq":
        obj = spec[1]
        return lambda a, b: [obj[i] for i in range(a, b)]
    if kind == "zip":
        getters = [open_spec(s, segbuf) for s in spec[1]]
        return lambda a, b: list(zip(*[g(a, b) for g in getters]))
    raise ValueError("pmaprt: unknown input spec %r" % (kind,))


class _BlockReader:
    def __init__(self, bsize, offsets, segbuf):
        self.bsize = bsize
        self.offsets = offsets
        self.segbuf = segbuf
        self.cache = {}

    def block(self, k):
        b = self.cache.get(k)
        if b is None:
            off, nbytes = self.offsets[k]
            b = _arrays.loads_list(self.segbuf[off: off + nbytes])
            if len(self.cache) >= 4:
                self.cache.clear()
            self.cache[k] = b
        return b

    def get(self, a, b):
        bs = self.bsize
        k0, k1 = a // bs, (b - 1) // bs
        if k0 == k1:
            return self.block(k0)[a - k0 * bs: b - k0 * bs]
        out = []
        for k in range(k0, k1 + 1):
            blk = self.block(k)
            out.extend(blk[max(a - k * bs, 0): min(b - k * bs, len(blk))])
        return out


class _LazyBlockReader(_BlockReader):
    """Blocks named in the job's block table (LazyBlocks): in the job's
    segment or in a segment of their own."""

    def __init__(self, bsize, table_off, segbuf):
        super().__init__(bsize, None, segbuf)
        self.table_off = table_off

    def block(self, k):
        b = self.cache.get(k)
        if b is None:
            seg_id, off, nbytes = BLOCK_ENTRY.unpack_from(
                self.segbuf, self.table_off + k * BLOCK_ENTRY.size)
            buf = _arrays.resolve(seg_id).buf if seg_id else self.segbuf
            b = _arrays.loads_list(buf[off: off + nbytes])
            if len(self.cache) >= 4:
                self.cache.clear()
            self.cache[k] = b
        return b
