"""Shared arrays: NumPy arrays whose memory is a memfd the workers can map.

``empty/zeros/empty_like/zeros_like/asarray(..., shared=True)`` return a plain
``numpy.ndarray`` whose memory is an anonymous memfd mapped with
``_core.Mapping``. The mapping owns the memfd; both go when the last reference
to the memory (the array, any view of it, a worker's view of it) goes: the
kernel counts the mappings. Its memory is allocated when it is created
(MADV_POPULATE_WRITE, or ``posix_fallocate``, after comparing the size with the
memory available), so running short is a MemoryError then, never a SIGBUS
later. Nothing is in /dev/shm.

A shared array, or any view of it, is described to a worker by a spec (the
segment it lies in, dtype, shape, strides, offset): see `shared_spec` and
`open_shared`. How the segment reaches the workers is lent.py's concern.
"""
import os
import pickle

import numpy as np

from .. import _shm
from .copy import copy_array

_core = _shm.core()
Mapping = _core.Mapping


def new_mapping(nbytes, name="pmaprt-array"):
    """A memfd of nbytes (at least 1), mapped here, its pages allocated now
    (_shm.populate); the mapping owns the fd. Running out of memory is a
    MemoryError here, never a SIGBUS at a later write."""
    size = max(int(nbytes), 1)
    _shm.check_room(size)
    fd = _shm.new_memfd(size, name, reserve=False)
    try:
        m = Mapping(fd, size, own_fd=True)
    except BaseException:
        os.close(fd)
        raise
    _shm.populate(m, size, m.fd)
    return m


def empty(shape, dtype=float, order="C", *, shared=True):
    """numpy.empty; with shared=True (the default) the array lives in shared
    memory and reaches pmaprt's workers without a copy. Its memory is
    allocated now: a MemoryError here, never a SIGBUS later. (Fresh shared
    memory reads as zeros.)"""
    if not shared:
        return np.empty(shape, dtype, order)
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError("pmaprt: a shared array cannot hold Python objects (dtype %s)" % dt)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    count = 1
    for s in shape:
        if s < 0:
            raise ValueError("pmaprt: negative dimensions are not allowed: %r" % (shape,))
        count *= s
    m = new_mapping(count * dt.itemsize)
    return np.ndarray(shape, dt, buffer=m, order=order)


def zeros(shape, dtype=float, order="C", *, shared=True):
    """numpy.zeros in shared memory (shared=True)."""
    if not shared:
        return np.zeros(shape, dtype, order)
    return empty(shape, dtype, order)   # a new memfd is zero-filled


def empty_like(a, dtype=None, *, shared=True):
    a = np.asarray(a)
    return empty(a.shape, a.dtype if dtype is None else dtype,
                 "F" if (a.flags.f_contiguous and not a.flags.c_contiguous) else "C", shared=shared)


def zeros_like(a, dtype=None, *, shared=True):
    return empty_like(a, dtype, shared=shared)


def asarray(a, dtype=None, *, shared=True):
    """numpy.asarray; with shared=True the result is a shared array: `a`
    itself when it already is one (and dtype matches), else one copy."""
    if not shared:
        return np.asarray(a, dtype)
    if isinstance(a, np.ndarray) and is_shared(a) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    src = np.asarray(a, dtype)
    dst = empty_like(src)
    copy_array(dst, src)
    return dst


def is_shared(a):
    """True if `a` (an ndarray or a view of one) lives in a pmaprt shared array."""
    m = find_mapping(a)
    return m is not None and m.fd >= 0


# How many owners (.base, .obj) find_mapping follows before giving up: views
# of views are a few levels deep; a longer chain is not one of ours.
MAX_BASE_CHAIN = 64


def find_mapping(obj):
    """The _core.Mapping whose memory `obj` (an ndarray, memoryview, ...) views, or None."""
    for _ in range(MAX_BASE_CHAIN):
        if isinstance(obj, Mapping):
            return obj
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        elif isinstance(obj, pickle.PickleBuffer):
            obj = memoryview(obj).obj
        else:
            return None
    return None


def array_address(a):
    """The address of an ndarray's first element."""
    return a.__array_interface__["data"][0]


def shared_spec(a, seg_id, mapping):
    """What a worker needs to rebuild a view of `a` (inside `mapping`)."""
    off = array_address(a) - mapping.address
    return ("sharr", seg_id, a.dtype, a.shape, a.strides, off)


def open_shared(spec, resolve):
    """The worker's ndarray for a shared_spec; resolve(seg_id) -> segment with .buf."""
    _, seg_id, dtype, shape, strides, off = spec
    seg = resolve(seg_id)
    return np.ndarray(shape, dtype, buffer=seg.buf, offset=off, strides=strides)
