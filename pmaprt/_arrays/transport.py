"""How a buffer travels between the parent and its workers.

Items and results are pickled (protocol 5) with a ``buffer_callback``. A
buffer of OOB_MIN bytes or more (a large ndarray inside a tuple, a dict, ...)
is left out of the pickle and travels one of three ways, decided in one place
for each direction:

- parent to workers (`ItemEncoder.route`): a buffer that lies inside a shared
  array goes by handle (segment, offset); any other is read by the worker
  straight from the parent's memory (pvm.py), or, where that is not allowed,
  copied once into the job's segment, after the pickle, and the worker's
  array is a view of it;
- workers to parent (`ResultEncoder`): a buffer inside a shared array the
  worker received goes by handle; any other is copied once into a memfd the
  worker creates, whose descriptor goes to the parent over the worker's
  socket (SCM_RIGHTS) before the result's record; the parent maps it, and the
  result arrays are views of that mapping.

Smaller buffers stay in the pickle. An encoded list with out-of-band buffers
is a blob::

    HDR (tag, nbuf, body_off, body_len) | nbuf x ENTRY | body | buffers

tag b"O": buffers are in the blob (kind 0), in a shared segment (kind 1), in
the result mapping attached to the payload (kind 2) or in the parent's memory
(kind 3). A result whose buffers went into a memfd reaches the parent's ring as
b"R" + blob (or b"r" + where the blob lies in the memfd, when it is large), so
that the ring record stays small and the parent knows to take the descriptor
from the socket.

`dumps_list` / `loads_list` are _serialize's, made aware of these blobs: the
runtime and the map encode and decode every list of items or results with them.
"""
import os
import pickle
import struct

import numpy as np

from .. import _serialize, _shm
from .copy import array_tasks, byte_tasks, run_tasks
from .lent import received_segment_id, resolve
from .pvm import read_parent
from .shared import Mapping, find_mapping, new_mapping

_core = _shm.core()
memcpy = _core.memcpy
buffer_address = _core.buffer_address

# Buffers of at least this many bytes travel out of band. Below it the copy
# into the pickle is cheaper than a separate buffer with its own entry, page
# alignment and (for results) a memfd.
OOB_MIN = 64 * 1024
# Smallest plain array or buffer that workers read from the parent's memory;
# a smaller one is copied into the job's segment instead.
PVM_MIN = OOB_MIN
# Out-of-band buffers start on this boundary inside a blob or a memfd (a cache
# line: aligned loads for the worker's arrays).
ALIGN = 64

TAG_OOB = b"O"
TAG_RESULT = b"R"        # b"R" + blob; the memfd went ahead of the record, on the socket
TAG_RESULT_FAR = b"r"    # b"r" + (offset, length) of the blob inside the memfd

HDR = struct.Struct("<c3xIQQ")        # tag, nbuf, body_off, body_len
ENTRY = struct.Struct("<IIQQQ")       # kind, 0, segment id (kind 3: pid), offset (address), length
FAR = struct.Struct("<QQ")
KIND_BLOB, KIND_SEGMENT, KIND_MAPPING, KIND_PARENT = 0, 1, 2, 3
# A result stub bigger than this puts its blob into the memfd, so that the
# result ring's record stays small.
RESULT_STUB_MAX = 64 * 1024


def align(n, a=ALIGN):
    return (n + a - 1) // a * a


# --------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------


def pickle_oob(items):
    """(tag, body, [PickleBuffer]) with buffers >= OOB_MIN left out of band."""
    bufs = []

    def cb(pb):
        try:
            raw = pb.raw()
        except BufferError:   # not contiguous: in band
            return True
        if raw.nbytes < OOB_MIN:
            return True
        bufs.append(pb)
        return False

    try:
        body = pickle.dumps(items, 5, buffer_callback=cb)
        if not _serialize.names_main(body):
            return _serialize.TAG_PICKLE, body, bufs
        del bufs[:]     # objects of __main__: by value (see _serialize)
        return _serialize.TAG_CLOUD, _serialize.cloudpickle().dumps(items, 5, buffer_callback=cb), bufs
    except Exception as first:
        del bufs[:]
        try:
            return (_serialize.TAG_CLOUD,
                    _serialize.cloudpickle().dumps(items, 5, buffer_callback=cb), bufs)
        except Exception:
            raise first


def _blob(entries, body):
    """header + entries + body; the body starts right after the entries."""
    body_off = HDR.size + ENTRY.size * len(entries)
    parts = [HDR.pack(TAG_OOB, len(entries), body_off, len(body))]
    parts += [ENTRY.pack(k, 0, seg, off, n) for k, seg, off, n in entries]
    parts.append(body)
    return b"".join(parts)


class Encoded:
    """A list encoded with its large buffers out of band, not yet written:
    len() is its size; write_blobs() writes it (the one copy of each buffer)."""

    __slots__ = ("head", "inline", "nbytes")

    def __init__(self, head, inline, nbytes):
        self.head = head        # header + entries + body (bytes)
        self.inline = inline    # [(offset in the blob, PickleBuffer)]
        self.nbytes = nbytes

    def __len__(self):
        return self.nbytes

    def tasks(self, buf, off, tasks):
        tasks.append(lambda: memcpy(buf, off, self.head))
        n = len(self.head)
        for boff, pb in self.inline:
            n += byte_tasks(buf, off + boff, pb.raw(), tasks)
        return n


def has_inline_buffers(data):
    """True for an Encoded that carries buffers to be copied with it."""
    return isinstance(data, Encoded) and bool(data.inline)


def write_blobs(buf, blobs):
    """Write each (offset, blob) into the writable buffer `buf`: bytes-like,
    an Encoded, or an ndarray (copied element-wise into place). Large totals
    are copied by several threads."""
    tasks = []
    total = 0
    for off, blob in blobs:
        if isinstance(blob, Encoded):
            total += blob.tasks(buf, off, tasks)
        elif isinstance(blob, np.ndarray):
            dst = np.frombuffer(buf, dtype=blob.dtype, count=blob.size, offset=off).reshape(blob.shape)
            total += array_tasks(dst, blob, tasks)
        else:
            total += byte_tasks(buf, off, blob, tasks)
    run_tasks(tasks, total)


class ItemEncoder:
    """Parent side: items with large buffers. jobarrays.share(mapping) ->
    segment id lends a shared array's memfd to the workers; jobarrays.keep(obj)
    keeps a buffer the workers read from this process (use_pvm()) alive."""

    def __init__(self, jobarrays):
        self.share = jobarrays.share
        self.keep = jobarrays.keep
        self.use_pvm = jobarrays.use_pvm
        self.ref_bytes = 0     # bytes the last dumps() referred to outside its blob

    def route(self, obj, address, nbytes):
        """How a buffer of nbytes at `address` (viewing obj) reaches the
        workers: (KIND_SEGMENT, segment id, offset) by handle when it lies in
        a shared array; (KIND_PARENT, pid, address) when they read it from
        this process (obj is then kept alive); None when it is copied."""
        m = find_mapping(obj)
        if m is not None and m.fd >= 0:
            off = address - m.address
            if 0 <= off and off + nbytes <= m.size:
                return KIND_SEGMENT, self.share(m), off
        if self.use_pvm():
            self.keep(obj)
            return KIND_PARENT, os.getpid(), address
        return None

    def dumps(self, items):
        self.ref_bytes = 0
        tag, body, bufs = pickle_oob(items)
        if not bufs:
            return tag + body
        entries, inline = [], []
        pos = HDR.size + ENTRY.size * len(bufs) + len(body)
        for pb in bufs:
            raw = pb.raw()
            n = raw.nbytes
            where = self.route(pb, buffer_address(raw)[0], n)
            if where is not None:
                entries.append(where + (n,))
                self.ref_bytes += n
                continue
            pos = align(pos)
            entries.append((KIND_BLOB, 0, pos, n))
            inline.append((pos, pb))
            pos += n
        head = _blob(entries, body)
        if not inline:
            return head          # only references (shared arrays, the parent's memory): plain bytes
        return Encoded(head, inline, pos)


class ResultEncoder:
    """Worker side: results with large buffers. A buffer inside a shared
    array goes by reference; the others are copied into one memfd per
    chunk, sent to the parent before the chunk's record."""

    def __init__(self, sock):
        self.sock = sock
        self.moved = 0      # bytes the last chunk's results took (pickle, copied buffers)

    def dumps(self, items):
        tag, body, bufs = pickle_oob(items)
        self.moved = len(body)  # + the buffers copied below (not those of shared arrays)
        if not bufs:
            return tag + body
        entries, copies = [], []
        size = 0
        for pb in bufs:
            raw = pb.raw()
            n = raw.nbytes
            m = find_mapping(pb)
            sid = received_segment_id(m) if m is not None else None
            if sid is not None:
                off = buffer_address(raw)[0] - m.address
                if 0 <= off and off + n <= m.size:
                    entries.append((KIND_SEGMENT, sid, off, n))
                    continue
            entries.append((KIND_MAPPING, 0, size, n))
            copies.append((size, raw))
            self.moved += n
            size = align(size + n)
        blob = _blob(entries, body)
        if not copies:
            return blob
        far = len(blob) > RESULT_STUB_MAX
        blob_off = size
        if far:
            size = blob_off + len(blob)
        try:
            m = new_mapping(size, "pmaprt-result")
        except MemoryError:
            return _serialize.dumps_list(items)
        try:
            for off, raw in copies:
                memcpy(m, off, raw)
            if far:
                memcpy(m, blob_off, blob)
            _shm.send_msg(self.sock, ("res", size), fds=[m.fd])
        finally:
            del m  # unmapped and closed here; the parent holds its own mapping
        if far:
            return TAG_RESULT_FAR + FAR.pack(blob_off, len(blob))
        return TAG_RESULT + blob


# --------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------


class ResultPayload:
    """A result payload whose buffers lie in a mapping the worker sent."""

    __slots__ = ("blob", "mapping")

    def __init__(self, blob, mapping):
        self.blob = blob
        self.mapping = mapping


def is_result_stub(payload):
    t = payload[:1]
    return t == TAG_RESULT or t == TAG_RESULT_FAR


def attach_result(payload, sock):
    """Parent, draining a worker's ring: take the memfd that came before this
    record from the worker's socket and map it."""
    msg, fds = _shm.recv_msg(sock)
    if not fds or msg[0] != "res":
        for fd in fds:
            os.close(fd)
        raise RuntimeError("pmaprt: expected a result buffer from the worker, got %r" % (msg,))
    try:
        m = Mapping(fds[0], msg[1], populate=True)  # its pages exist: map them all at once
    finally:
        for fd in fds:
            os.close(fd)
    if payload[:1] == TAG_RESULT_FAR:
        off, n = FAR.unpack_from(payload, 1)
        return ResultPayload(memoryview(m)[off: off + n], m)
    return ResultPayload(memoryview(payload)[1:], m)


def load_oob(blob, mapping=None):
    """Decode a b"O" blob (bytes or memoryview); kind-2 buffers lie in `mapping`."""
    mv = memoryview(blob)
    tag, nbuf, body_off, body_len = HDR.unpack_from(mv, 0)
    buffers = []
    mm = None
    for i in range(nbuf):
        kind, _, seg, off, n = ENTRY.unpack_from(mv, HDR.size + i * ENTRY.size)
        if kind == KIND_BLOB:
            buffers.append(mv[off: off + n])
        elif kind == KIND_SEGMENT:
            buffers.append(resolve(seg).buf[off: off + n])
        elif kind == KIND_PARENT:
            buffers.append(read_parent(seg, off, n))
        else:
            if mm is None:
                mm = memoryview(mapping)
            buffers.append(mm[off: off + n])
    return pickle.loads(mv[body_off: body_off + body_len], buffers=buffers)


# --------------------------------------------------------------------------
# lists of items or results, whichever way their buffers travel
# --------------------------------------------------------------------------


def dumps_list(items, enc=None):
    """Encode a list; raises the pickling error of the first bad object.
    enc (an ItemEncoder or ResultEncoder): large buffers (ndarrays) go out of
    band; the result may then be an Encoded (parent) or a stub whose memfd
    went ahead (worker). Without enc: _serialize.dumps_list."""
    if enc is not None:
        return enc.dumps(items)
    return _serialize.dumps_list(items)


def loads_list(data):
    """Decode what dumps_list made (or a ResultPayload attach_result made)."""
    if isinstance(data, ResultPayload):
        return load_oob(data.blob, data.mapping)
    if bytes(data[:1]) == TAG_OOB:
        return load_oob(data)
    return _serialize.loads_list(data)
