"""Encoding of functions, items and results.

- Functions: pickled by reference when that round-trips (module-level
  functions of an importable module); cloudpickle by value otherwise (lambdas,
  closures, functions defined in ``__main__`` or locally).
- Lists of items or results: pickle protocol 5, cloudpickle when pickle
  fails (a lambda inside an item) or when the pickle names ``__main__``
  (`names_main`). The first byte says which.
- Objects of the caller's script: a class or function defined in
  ``__main__`` pickles by reference as ``__main__.Name``, which a worker (a
  fresh interpreter, whose ``__main__`` is not the script) cannot resolve.
  Such pickles are made again by value with cloudpickle, which gives each
  class an id: a worker that receives the class in several pickles (the
  function's globals, an argument) rebuilds it once, and a result of that
  class comes back to the parent as the parent's own class. Workers never
  import the main script, so a script without an ``if __name__ ==
  "__main__":`` guard does not run again in them. (marshal is not
  used: it writes any buffer-protocol object, a NumPy scalar among them, as
  bytes, and is no faster than pickle for lists of ints or floats.)

This module is pure pickling and knows nothing of shared memory: the layer
above (_arrays.transport) adds the out-of-band buffers of large arrays, with
tags of its own, on top of these.
"""
import io
import pickle
import threading
import types
import weakref

TAG_PICKLE = b"P"
TAG_CLOUD = b"C"

PROTOCOL = 5

# How a pickle names the caller's script (pickle writes module names as
# plain strings). "__mp_main__" is multiprocessing's alias of it.
_MAIN_NAMES = (b"__main__", b"__mp_main__")


def names_main(data):
    """Whether a pickle refers to something of __main__ by reference (a
    false positive, the string "__main__" inside the data, only costs a
    pickle by value)."""
    return any(n in data for n in _MAIN_NAMES)


def cloudpickle():
    """The cloudpickle module. Imported on first use: a process that never
    pickles a function or item by value (most workers) does not pay its
    import at start."""
    import cloudpickle
    return cloudpickle


def by_reference(fn):
    """Whether fn is pickled by reference (by its module and name)."""
    mod = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", "")
    return mod not in (None, "__main__", "__mp_main__") and "<locals>" not in qual \
        and "<lambda>" not in qual


def dumps_fn(fn, capture=None, by_value=False):
    """Bytes that rebuild fn in a worker process (by_value: cloudpickle's
    pickle even where pickle's would do).

    capture(obj), when given, is asked about every object pickled with fn
    (its closure, globals, defaults, attributes, arguments): None pickles obj
    as usual, a (callable, args) pair pickles that call in its place (the
    layer above replaces large arrays by references to shared memory), and
    an exception stops the pickling (raised as the TypeError below)."""
    if not by_value and by_reference(fn):
        try:
            return _dump(pickle.Pickler, fn, capture)
        except Exception:
            pass
    key, data = BY_VALUE.get(fn)
    if data is not None:
        return data
    try:
        data = _dump(cloudpickle().Pickler, fn, capture)
    except Exception as e:
        raise TypeError("pmaprt: the function %r cannot be pickled for the workers: %s"
                        % (fn, e)) from e
    BY_VALUE.put(fn, key, data)
    return data


_ATOMS = frozenset((int, float, complex, str, bytes, bool, type(None), type(Ellipsis), range,
                    types.ModuleType, types.BuiltinFunctionType))
# A function's state that cloudpickle takes from its module's globals besides
# the names its code uses.
_BASE_GLOBALS = ("__package__", "__name__", "__path__", "__file__")
_ABSENT = object()
_SEEN = object()


class ByValueCache:
    """cloudpickle's pickles of functions whose pickled state cannot change
    unseen, reused while that state is the same objects.

    A function of __main__ or a lambda is pickled by value, with the values
    of the globals its code names, its defaults and its closure: 30-60 us
    per map, as much as the rest of a short map's setup. A pickle is reused
    only if every object it was made from is immutable (numbers, strings,
    tuples of those, modules, builtins, classes and functions pickled by
    name, and by-value functions that qualify in turn) and each is still the
    very object it was: a global rebound, a default or closure cell changed,
    a global defined since, each makes the key differ and the function is
    pickled afresh. A function whose state holds anything mutable (a list,
    an array, an instance, a class of __main__, attributes of its own) is
    not cached: it is pickled at every map, so that workers see its state
    as map would. Entries go with their functions (weak keys)."""

    MAX_ENTRIES = 256

    def __init__(self):
        self._entries = weakref.WeakKeyDictionary()    # fn -> (key, bytes)
        self._lock = threading.Lock()   # the Executor's runner threads pickle at once

    def get(self, fn):
        """(key, cached bytes or None); key None: fn is not cacheable."""
        key = []
        try:
            if not _add_function(fn, key, set()):
                return None, None
            with self._lock:
                hit = self._entries.get(fn)
        except Exception:       # an object that refuses a weak reference or a lookup
            return None, None
        if hit is not None and len(hit[0]) == len(key) \
                and all(a is b for a, b in zip(hit[0], key)):
            return key, hit[1]
        return key, None

    def put(self, fn, key, data):
        if key is None:
            return
        with self._lock:
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[fn] = (key, data)


def _add_function(fn, key, seen):
    """Append the objects fn's by-value pickle is made of to key; False if
    one of them may change without being rebound."""
    if id(fn) in seen:
        return True
    seen.add(id(fn))
    if type(fn) is not types.FunctionType or fn.__dict__:
        return False
    code = fn.__code__
    key += (code, fn.__defaults__, fn.__kwdefaults__, fn.__name__, fn.__qualname__,
            fn.__module__, fn.__doc__)
    values = list(fn.__defaults__ or ())
    for d in (fn.__kwdefaults__ or {}, fn.__annotations__):
        for k, v in d.items():
            key.append(k)
            values.append(v)
    for cell in fn.__closure__ or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:      # an empty cell
            values.append(_ABSENT)
    g = fn.__globals__
    cp = cloudpickle().cloudpickle
    for name in cp._extract_code_globals(code):
        values.append(g.get(name, _ABSENT))
    key += [g.get(name, _ABSENT) for name in _BASE_GLOBALS]
    return all(_add_value(v, key, seen, cp) for v in values)


def _add_value(v, key, seen, cp):
    t = type(v)
    # A function met before (recursion) is keyed by a marker: a key holding
    # the function it is cached under would keep it alive (weak keys).
    key.append(_SEEN if t is types.FunctionType and id(v) in seen else v)
    if t in _ATOMS or v is _ABSENT:
        return True
    if t is tuple or t is frozenset:
        return all(_add_value(x, key, seen, cp) for x in v)
    if t is types.FunctionType:
        return cp._should_pickle_by_reference(v) or _add_function(v, key, seen)
    if isinstance(v, type):
        return cp._should_pickle_by_reference(v)
    return False


BY_VALUE = ByValueCache()


def _dump(pickler_class, obj, capture):
    if capture is None:
        if pickler_class is pickle.Pickler:
            return pickle.dumps(obj, PROTOCOL)
        return cloudpickle().dumps(obj, PROTOCOL)
    f = io.BytesIO()
    _capturing(pickler_class)(f, PROTOCOL, capture).dump(obj)
    return f.getvalue()


_CAPTURING = {}


def _capturing(pickler_class):
    """A subclass of pickler_class that asks `capture` about each object
    before its own reducer_override (cloudpickle's pickles functions by value)."""
    cls = _CAPTURING.get(pickler_class)
    if cls is None:
        base_override = getattr(pickler_class, "reducer_override", None)

        class CapturingPickler(pickler_class):
            def __init__(self, file, protocol, capture):
                super().__init__(file, protocol)
                self._capture = capture

            def reducer_override(self, obj):
                rv = self._capture(obj)
                if rv is not None:
                    return rv
                if base_override is not None:
                    return base_override(self, obj)
                return NotImplemented

        cls = _CAPTURING[pickler_class] = CapturingPickler
    return cls


def loads_fn(data):
    return pickle.loads(data)


def dumps_obj(obj):
    """pickle, then cloudpickle (for lambdas and the like inside objects, and
    objects of __main__)."""
    try:
        data = pickle.dumps(obj, PROTOCOL)
    except Exception:
        return cloudpickle().dumps(obj, PROTOCOL)
    return cloudpickle().dumps(obj, PROTOCOL) if names_main(data) else data


def dumps_list(items):
    """Encode a list; raises the pickling error of the first bad object."""
    try:
        data = pickle.dumps(items, PROTOCOL)
        if not names_main(data):
            return TAG_PICKLE + data
        return TAG_CLOUD + cloudpickle().dumps(items, PROTOCOL)
    except Exception as first:
        try:
            return TAG_CLOUD + cloudpickle().dumps(items, PROTOCOL)
        except Exception:
            raise first


def loads_list(data):
    tag = bytes(data[:1])
    if tag == TAG_PICKLE or tag == TAG_CLOUD:
        return pickle.loads(memoryview(data)[1:])
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
