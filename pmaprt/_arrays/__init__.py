"""NumPy arrays through shared memory: shared arrays, how a buffer travels, blocks, out=.

This layer sits on the ground floor (_options, _serialize) and _shm, and
under everything that runs a map. Its modules, read from the bottom up (each
imports only those above it in this list):

- copy        large copies split over threads
- shared      shared arrays (``pmaprt.empty`` and friends): memfd-backed
              ndarrays, and the spec a worker rebuilds a view from
- pvm         workers reading plain arrays straight from the parent's memory
- lent        shared arrays lent to a pool's workers, both sides; a pool's
              array state (`PoolArrays`, held as ``pool.arrays``)
- transport   the one decision of how a buffer travels (by handle, read from
              the parent, or copied) and the out-of-band pickle format
- blocks      chunks=: block rules and `BlockView`
- out         out=: the parent's checks and the worker's writer
- written     whether an array was written since it was hashed (the
              kernel's record of written pages)
- captured    a function's large captured arrays, shipped once per pool
              through content-addressed read-only segments (both sides)
- jobarrays   what one map holds (`JobArrays`), and `local_map`

Other layers import the names below from here.
"""
from .captured import (CAPTURE_MIN, CapturedStore, FunctionCache, loads_fn, on_segment_freed,
                       segment_freed)
from .blocks import BlockView, rule_rows, wrap_chunks
from .copy import copy_array
from .jobarrays import JobArrays, local_map
from .lent import (ArraySeg, MappedSegment, PoolArrays, received_segment_id, resolve,
                   set_resolver)
from .out import OutSink, check_out, open_sink
from .pvm import open_pvm, pvm_spec
from .shared import (
    Mapping, array_address, asarray, empty, empty_like, find_mapping, is_shared, new_mapping, open_shared,
    shared_spec, zeros, zeros_like,
)
from .transport import (
    OOB_MIN, PVM_MIN, Encoded, ItemEncoder, ResultEncoder, ResultPayload, attach_result,
    dumps_list, has_inline_buffers, is_result_stub, load_oob, loads_list, write_blobs,
)

__all__ = [
    "CAPTURE_MIN", "CapturedStore", "FunctionCache", "loads_fn", "on_segment_freed", "segment_freed",
    "BlockView", "rule_rows", "wrap_chunks",
    "copy_array",
    "JobArrays", "local_map",
    "ArraySeg", "MappedSegment", "PoolArrays", "received_segment_id", "resolve", "set_resolver",
    "OutSink", "check_out", "open_sink",
    "open_pvm", "pvm_spec",
    "Mapping", "array_address", "asarray", "empty", "empty_like", "find_mapping", "is_shared", "new_mapping",
    "open_shared", "shared_spec", "zeros", "zeros_like",
    "OOB_MIN", "PVM_MIN", "Encoded", "ItemEncoder", "ResultEncoder", "ResultPayload",
    "attach_result", "dumps_list", "has_inline_buffers", "is_result_stub", "load_oob",
    "loads_list", "write_blobs",
]
