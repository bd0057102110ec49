"""Encoding of functions, items and results.

- Functions: pickled by reference when that round-trips (module-level
  functions of an importable module); cloudpickle by value otherwise (lambdas,
  closures, functions defined in ``__main__`` or locally).
- Lists of items or results: marshal when every object is of a builtin type
  marshal keeps exactly (it is several times faster than pickle for ints,
  floats and strings), pickle protocol 5 otherwise, cloudpickle last.
  The first byte says which.
"""
import marshal
import pickle

_MARSHAL = b"M"
_PICKLE = b"P"

PROTOCOL = 5


def _cloudpickle():
    import cloudpickle
    return cloudpickle


def dumps_fn(fn):
    """Bytes that rebuild fn in a worker process."""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", "")
    if mod not in (None, "__main__", "__mp_main__") and "<locals>" not in qual and "<lambda>" not in qual:
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


def dumps_list(items):
    """Encode a list; raises the pickling error of the first bad object."""
    try:
        return _MARSHAL + marshal.dumps(items)
    except (ValueError, TypeError):
        pass
    try:
        return _PICKLE + pickle.dumps(items, PROTOCOL)
    except Exception as first:
        try:
            return _PICKLE + _cloudpickle().dumps(items, PROTOCOL)
        except Exception:
            raise first


def loads_list(data):
    tag = bytes(data[:1])
    if tag == _MARSHAL:
        return marshal.loads(data[1:])
    if tag == _PICKLE:
        return pickle.loads(data[1:])
    raise ValueError("pmaprt: corrupt payload (tag %r)" % tag)


def find_unpicklable(items):
    """(index, exception) of the first item that cannot be encoded, or None."""
    for i, x in enumerate(items):
        try:
            dumps_list([x])
        except BaseException as e:  # noqa: B902 - reported to the caller
            return i, e
    return None
