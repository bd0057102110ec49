"""Encoding of functions, items and results.

- Functions: pickled by reference when that round-trips (module-level
  functions of an importable module); cloudpickle by value otherwise (lambdas,
  closures, functions defined in ``__main__`` or locally).
- Lists of items or results: pickle protocol 5, cloudpickle when pickle
  fails (a lambda inside an item). The first byte says which. With an
  encoder from _array, buffers of 64 KiB or more (ndarrays anywhere inside
  the items) travel out of band through shared memory (tag b"O", b"R"). (marshal is not
  used: it writes any buffer-protocol object, a NumPy scalar among them, as
  bytes, and measured no faster than pickle for lists of ints or floats.)
"""
import pickle

from . import _array

_PICKLE = b"P"
_CLOUD = b"C"

PROTOCOL = 5


def _cloudpickle():
    import cloudpickle
    return cloudpickle


def by_reference(fn):
    """Whether fn is pickled by reference (by its module and name)."""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", "")
    return mod not in (None, "__main__", "__mp_main__") and "<locals>" not in qual \
        and "<lambda>" not in qual


def dumps_fn(fn):
    """Bytes that rebuild fn in a worker process."""
    if by_reference(fn):
        try:
            return pickle.dumps(fn, PROTOCOL)
        except Exception:
            pass
    try:
        return _cloudpickle().dumps(fn, PROTOCOL)
    except Exception as e:
        raise TypeError("pmaprt: the function %r cannot be pickled for the workers: %s" % (fn, e)) from e


def loads_fn(data):
    return pickle.loads(data)


def dumps_obj(obj):
    """pickle, then cloudpickle (for lambdas and the like inside objects)."""
    try:
        return pickle.dumps(obj, PROTOCOL)
    except Exception:
        return _cloudpickle().dumps(obj, PROTOCOL)


def dumps_list(items, enc=None):
    """Encode a list; raises the pickling error of the first bad object.
    enc (an _array.ItemEncoder or ResultEncoder): large buffers (ndarrays)
    go out of band, through shared memory; the result may then be an
    _array.Encoded (parent) or a stub whose memfd went ahead (worker)."""
    if enc is not None:
        return enc.dumps(items)
    try:
        return _PICKLE + pickle.dumps(items, PROTOCOL)
    except Exception as first:
        try:
            return _CLOUD + _cloudpickle().dumps(items, PROTOCOL)
        except Exception:
            raise first


def loads_list(data):
    if isinstance(data, _array.ResultPayload):
        return _array.load_oob(data.blob, data.mapping)
    tag = bytes(data[:1])
    if tag == _PICKLE or tag == _CLOUD:
        return pickle.loads(memoryview(data)[1:])
    if tag == _array.TAG_OOB:
        return _array.load_oob(data)
    raise ValueError("pmaprt: corrupt payload (tag %r)" % tag)


# What the parent treats as "this item cannot be pickled". A KeyboardInterrupt
# while pickling is the user's Ctrl-C and goes on up; a SystemExit from an
# object's __reduce__ is that object failing to pickle, not a reason to exit.
PICKLE_ERRORS = (Exception, SystemExit)


def find_unpicklable(items, catch=PICKLE_ERRORS):
    """(index, exception) of the first item that cannot be encoded, or None.
    Workers pass BaseException: there everything is reported to the parent."""
    for i, x in enumerate(items):
        try:
            dumps_list([x])
        except catch as e:
            return i, e
    return None
