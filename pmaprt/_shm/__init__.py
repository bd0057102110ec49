"""Shared memory and the control socket: the floor the runtime stands on.

- `layout`: the control segment's words, their offsets, and `Layout`;
- `segment`: memfd segments (`Segment`), reserved up front, and the memory
  checks that make running out a clear MemoryError;
- `framing`: length-prefixed messages and blobs on a worker's socket;
- `loader`: the C extension, or a loud error that says how to build it.

Nothing here knows about jobs, workers or maps. The names that other layers
use are re-exported here.
"""
from .layout import *  # noqa: F401,F403  (the control segment's constants)
from .layout import Layout, align  # noqa: F401
from .loader import _core, core  # noqa: F401
from .segment import (  # noqa: F401
    NOT_DEV_SHM, Region, Segment, available_memory, check_room, new_memfd, populate,
)
from .framing import (  # noqa: F401
    frame, recv_blob, recv_exact, recv_msg, send_blob, send_msg, send_nowait,
)
